"""A reload's logging setup: prefork.logs.for_reload opens it aside, a worker installs it
after fork, the master when the generation takes over (Master.promote) or closes it when
the reload is abandoned; the reloader builds one only when `logging` changed.

Nothing here re-points this process's fd 2: a setup is installed only in a forked child,
which leaves through os._exit. The master's side runs against the fakes of fakes.py.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from prefork.channel import MSG_REOPEN
from prefork.cli import FIXED_AT_START, fixed_at_start, reloader
from prefork.config import Config, from_mapping
from prefork.hooks import HookImports
from prefork.loader import AppLoadError, Reimport
from prefork.logs import Logs, Stderr, for_reload, unused_fds
from prefork.master import Generation
from prefork.sockets import Listener
from prefork.worker import EXIT_APP_LOAD_ERROR
from tests.unit.fakes import Rig, exit_status, make_config

CHILD_TIMEOUT = 10.0


def logging_config(**settings: Any) -> Config:
    return from_mapping({"app": "m:app", "logging": settings})


@pytest.fixture(autouse=True)
def prefork_loggers() -> Iterator[None]:
    """Whatever a test does to the "prefork" loggers is undone afterwards."""
    loggers = [logging.getLogger("prefork"), logging.getLogger("prefork.access")]
    saved = [(list(lg.handlers), lg.level, lg.propagate) for lg in loggers]
    try:
        yield
    finally:
        for logger, (handlers, level, propagate) in zip(loggers, saved, strict=True):
            for handler in list(logger.handlers):
                logger.removeHandler(handler)
            for handler in handlers:
                logger.addHandler(handler)
            logger.setLevel(level)
            logger.propagate = propagate


def open_fds() -> set[int]:
    return {int(fd) for fd in os.listdir("/proc/self/fd")}


def same_file(a: int, b: int) -> bool:
    sa, sb = os.fstat(a), os.fstat(b)
    return (sa.st_dev, sa.st_ino) == (sb.st_dev, sb.st_ino)


def in_child(body: Callable[[], None]) -> int:
    """Run `body` in a forked child (as a worker runs after fork); its exit status: 0 when
    `body` returned."""
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            body()
            code = 0
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def first_setup(**kwargs: Any) -> Logs:
    """A setup as the start makes it, but not installed here (its fd 2 would be ours)."""
    return Logs(**kwargs, install=False)


# --- for_reload ------------------------------------------------------------------------------


def test_a_reload_opens_the_new_files_without_touching_this_process(tmp_path: Path) -> None:
    logger = logging.getLogger("prefork")
    before = (list(logger.handlers), logger.level)
    fd2 = os.dup(2)
    try:
        previous = first_setup()
        new = for_reload(
            previous,
            logging_config(
                level="debug",
                error_log=str(tmp_path / "error.log"),
                access_log=str(tmp_path / "access.log"),
            ).logging,
            (None, None),
        )
        try:
            assert (tmp_path / "error.log").exists() and (tmp_path / "access.log").exists()
            assert (list(logger.handlers), logger.level) == before
            assert same_file(2, fd2), "fd 2 was re-pointed before the generation took over"
            assert new.level == "debug" and new.access_enabled
            assert "error log " + str(tmp_path / "error.log") in new.describe()
        finally:
            new.close()
            previous.close()
    finally:
        os.close(fd2)


def test_a_file_that_cannot_be_opened_fails_the_reload_and_leaves_nothing_open(
    tmp_path: Path,
) -> None:
    # a dangling link into a directory that does not exist passes validation, not open()
    link = tmp_path / "error.log"
    link.symlink_to(tmp_path / "missing" / "error.log")
    previous = first_setup()
    fds = open_fds()
    with pytest.raises(OSError, match=r"cannot open the logs: .*No such file or directory") as info:
        for_reload(
            previous,
            logging_config(error_log=str(link), access_log=str(tmp_path / "access.log")).logging,
            (None, None),
        )
    assert str(link) in str(info.value)
    assert open_fds() == fds
    previous.close()


def test_a_new_syslog_socket_must_answer(tmp_path: Path) -> None:
    settings = logging_config(
        syslog={"enabled": True, "address": f"unix:{tmp_path}/nobody-listens"}
    ).logging
    previous = first_setup()
    fds = open_fds()
    with pytest.raises(OSError, match=rf"cannot open the logs: syslog \S*{tmp_path}/nobody-"):
        for_reload(previous, settings, (None, None))
    assert open_fds() == fds
    previous.close()


def test_the_syslog_socket_in_use_is_not_judged_again(tmp_path: Path) -> None:
    """Its daemon may be restarting: a reload that changes the level still goes through."""
    address = f"unix:{tmp_path}/restarting"
    previous = first_setup(syslog=(address, "user", "preforkd"))
    new = for_reload(
        previous,
        logging_config(level="debug", syslog={"enabled": True, "address": address}).logging,
        (None, None),
    )
    assert new.syslog == (f"{tmp_path}/restarting", "user", "preforkd")
    assert new.level == "debug"
    new.close()
    previous.close()


def test_a_listening_syslog_socket_is_taken(tmp_path: Path) -> None:
    path = tmp_path / "log.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as receiver:
        receiver.bind(str(path))
        previous = first_setup()
        new = for_reload(
            previous,
            logging_config(syslog={"enabled": True, "address": f"unix:{path}"}).logging,
            (None, None),
        )
        assert new.syslog is not None and new.describe().startswith(f"error log syslog {path}")
        new.close()
        previous.close()


# --- what "-" means ----------------------------------------------------------------------------


def test_the_first_setup_says_what_dash_means() -> None:
    """fd 2 is still the server's stderr unless the first setup pointed it at a file; with
    syslog, fd 2 is /dev/null only in a daemon, where "-" meant syslog."""
    assert first_setup().stderr() == Stderr(2)
    assert first_setup(error_log="/dev/null").stderr() == Stderr(None)
    # under pytest fd 2 is a capture file, not /dev/null: a foreground server
    syslog = first_setup(syslog=("udp://127.0.0.1:9", "user", "x"))
    assert syslog.stderr() == Stderr(2)

    def daemon() -> None:  # detached: fd 2 is /dev/null, as python-daemon leaves it
        null = os.open(os.devnull, os.O_WRONLY)
        os.dup2(null, 2)
        assert syslog.stderr() == Stderr(syslog=True)

    assert in_child(daemon) == 0
    syslog.close()


def test_dash_after_a_file_goes_back_to_the_stderr_the_server_started_with(
    tmp_path: Path,
) -> None:
    """"-" -> file -> "-": each setup a reload makes keeps its own copy of the original
    stderr and hands it on, so the third one writes there again."""
    original = first_setup()  # fd 2 is the original stderr
    to_file = for_reload(
        original, logging_config(error_log=str(tmp_path / "error.log")).logging, (None, None)
    )
    handed = to_file.stderr()
    assert handed.fd is not None and handed.fd != 2 and same_file(handed.fd, 2)
    back = for_reload(to_file, logging_config().logging, (None, None))
    assert back.error_path is None
    (error_fd,) = [fd for fd in back.worker_fds() if fd > 2]
    assert same_file(error_fd, 2)  # installing it puts the original stderr back on fd 2
    for setup in (back, to_file, original):
        setup.close()


def test_dash_after_a_file_from_the_start_keeps_the_file(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The first setup pointed fd 2 at a file: the stderr it replaced is gone, so the
    error log stays that file (and USR1 keeps reopening it), with a warning."""
    error_log = str(tmp_path / "error.log")
    previous = first_setup(error_log=error_log)
    logging.getLogger("prefork").addHandler(caplog.handler)
    new = for_reload(previous, logging_config(level="debug").logging, (None, None))
    assert new.error_path == error_log and new.level == "debug"
    assert f"the error log stays {error_log} until a restart" in caplog.text
    new.close()
    previous.close()


def test_a_daemon_whose_dash_meant_syslog_keeps_syslog(tmp_path: Path) -> None:
    """A detached daemon's "-" is syslog (cli.Startup.open_logs): a reload that changes
    only the level keeps it so, though logging.syslog.enabled is false."""
    address = f"unix:{tmp_path}/log.sock"
    # as a daemon's setup hands it on (the first one's fd 2 is /dev/null there)
    daemon = Logs(syslog=(address, "user", "preforkd"), stderr=Stderr(syslog=True), install=False)
    new = for_reload(
        daemon,
        logging_config(level="warning", syslog={"address": address}).logging,
        (None, None),
    )
    assert new.syslog == (f"{tmp_path}/log.sock", "user", "preforkd")
    assert new.level == "warning"
    assert new.stderr() == Stderr(syslog=True)
    new.close()
    daemon.close()


# --- install, close, and what a worker closes --------------------------------------------------


def test_a_worker_installs_its_generations_setup_right_after_fork(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The invariant: the error log is fd 2. In the child, the new file takes fd 2, the
    level and the handlers; the parent (the master, before promote) keeps its own."""
    # the server's sys.stderr writes to fd 2; pytest's capture object does not
    monkeypatch.setattr(sys, "stderr", open(2, "w", closefd=False))  # noqa: SIM115
    error_log, access_log = tmp_path / "error.log", tmp_path / "access.log"
    previous = first_setup()
    new = for_reload(
        previous,
        logging_config(level="debug", error_log=str(error_log), access_log=str(access_log))
        .logging,
        (None, None),
    )
    fd2 = os.dup(2)

    def worker() -> None:
        for fd in unused_fds(new, [previous, new]):
            os.close(fd)
        new.install()
        logging.getLogger("prefork").debug("pf-unit: a debug line from the worker")
        os.write(2, b"pf-unit: straight to fd 2\n")
        new.access("127.0.0.1", "GET", "/x", "1.1", 200, 2, "", "ua", 0.001, 1)

    try:
        assert in_child(worker) == 0
        assert same_file(2, fd2)
        text = error_log.read_text()
        assert "[DEBUG] pf-unit: a debug line from the worker" in text
        assert "pf-unit: straight to fd 2" in text
        assert '"GET /x HTTP/1.1" 200 2' in access_log.read_text()
    finally:
        os.close(fd2)
        new.close()
        previous.close()


def test_a_worker_closes_the_other_setups_and_the_stderr_copy(tmp_path: Path) -> None:
    current = first_setup(access_log=str(tmp_path / "old-access.log"))
    pending = for_reload(
        current,
        logging_config(error_log=str(tmp_path / "e.log"), access_log=str(tmp_path / "a.log"))
        .logging,
        (None, None),
    )
    stderr_copy = pending.stderr().fd
    assert stderr_copy is not None
    canary = unused_fds(pending, [current, current, pending])
    assert set(current.fds()) <= set(canary)  # the old access log
    assert stderr_copy in canary
    assert not set(pending.worker_fds()) & set(canary)  # its error and access files stay
    old_worker = unused_fds(current, [current, pending])
    assert set(pending.fds()) <= set(old_worker) and not set(current.fds()) & set(old_worker)
    assert all(fd > 2 for fd in canary + old_worker)
    assert unused_fds(object(), [object()]) == []
    pending.close()
    current.close()


def test_close_lets_go_of_everything(tmp_path: Path) -> None:
    fds = open_fds()
    previous = first_setup()
    new = for_reload(
        previous,
        logging_config(error_log=str(tmp_path / "e.log"), access_log="-").logging,
        (None, None),
    )
    new.close()
    previous.close()
    assert open_fds() == fds
    os.fstat(1)  # an access log on "-" is stdout, which stays open


def test_usr1_on_a_setup_not_installed_reopens_its_own_descriptor(tmp_path: Path) -> None:
    error_log = tmp_path / "e.log"
    fd2 = os.dup(2)
    previous = first_setup()
    pending = for_reload(previous, logging_config(error_log=str(error_log)).logging, (None, None))
    try:
        error_log.rename(tmp_path / "e.log.1")
        pending.reopen()
        assert error_log.exists()
        assert same_file(2, fd2)
        (error_fd,) = [fd for fd in pending.worker_fds() if fd > 2]
        assert os.fstat(error_fd).st_ino == error_log.stat().st_ino
    finally:
        os.close(fd2)
        pending.close()
        previous.close()


# --- the reloader: logging is no longer fixed at start ---------------------------------------


def test_logging_is_applied_by_a_reload_not_fixed_at_start() -> None:
    assert "logging" not in FIXED_AT_START
    old = from_mapping({"app": "m:app", "backlog": 128})
    new = from_mapping({"app": "m:app", "backlog": 64, "logging": {"level": "debug"}})
    assert fixed_at_start(old, new) == ["backlog"]


def reload_once(tmp_path: Path, current: Generation, **settings: Any) -> Generation:
    """cli.reloader's work for a file that now says `settings` (bound to a unix socket in
    `tmp_path`); its new sockets are closed again."""
    config = from_mapping({"app": "m:app", "bind": [f"unix:{tmp_path}/s.sock"], **settings})
    new = reloader(lambda: config, Reimport(), {}, HookImports())(current, [])
    for listener in new.listeners:
        listener.close()
    return new


def test_the_reloader_opens_a_new_setup_only_when_logging_changed(tmp_path: Path) -> None:
    first = first_setup()
    current = Generation(1, from_mapping({"app": "m:app"}), [], logs=first)

    same = reload_once(tmp_path, current, backlog=64)
    assert same.logs is first  # shared: nothing opened, nothing to fail

    changed = reload_once(tmp_path, current, logging={"level": "debug"})
    assert changed.logs is not first and changed.logs.level == "debug"
    changed.logs.close()
    first.close()


def test_a_reload_that_fails_after_opening_the_logs_closes_them(tmp_path: Path) -> None:
    first = first_setup()
    current = Generation(1, from_mapping({"app": "m:app"}), [], logs=first)
    fds = open_fds()
    with pytest.raises(AppLoadError):
        reload_once(
            tmp_path, current, preload_app=True, app="pf_no_such_module_here:app",
            logging={"error_log": str(tmp_path / "error.log")},
        )
    assert open_fds() == fds
    first.close()


# --- the master -------------------------------------------------------------------------------


class RecordingLogs:
    """A logging setup that remembers what the master did with it."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.calls: list[str] = []
        self.workers_as: tuple[str | None, str | None] = (None, None)

    def install(self) -> None:
        self.calls.append("install")

    def close(self) -> None:
        self.calls.append("close")

    def reopen(self) -> None:
        self.calls.append("reopen")

    def describe(self) -> str:
        return self.name


def reload_with_logs(config: Config, *setups: RecordingLogs):
    """A reloader whose generations 2, 3, ... log with `setups`, in turn."""
    queue = list(setups)

    def reloader(current: Generation, held: list[Listener]) -> Generation:
        return Generation(0, config, [], logs=queue.pop(0))

    return reloader


def rig_with_logs(
    make_rig: Callable[..., Rig], *setups: RecordingLogs
) -> tuple[Rig, RecordingLogs]:
    rig = make_rig(count=2, reloader=reload_with_logs(make_config(2), *setups))
    first = RecordingLogs("first")
    rig.master.current.logs = first
    rig.start()
    return rig, first


def test_the_first_generation_logs_as_the_master_started(make_rig: Callable[..., Rig]) -> None:
    rig = make_rig(count=1)
    assert rig.master.current.logs is rig.master.logs is rig.logs


def test_promote_installs_the_new_setup_and_closes_the_old_one(
    make_rig: Callable[..., Rig],
) -> None:
    new = RecordingLogs("new")
    rig, first = rig_with_logs(make_rig, new)

    rig.signal(signal.SIGHUP)
    assert rig.master.pending is not None and rig.master.pending.logs is new
    assert new.calls == [] and first.calls == []  # the master logs as before until promote

    rig.boot(rig.worker(1, generation=2).pid)

    assert rig.master.logs is new and rig.master.current.logs is new
    assert new.calls == ["install"]
    assert first.calls == ["close"]


def test_an_abandoned_reload_closes_its_setup_and_the_master_keeps_its_own(
    make_rig: Callable[..., Rig],
) -> None:
    new = RecordingLogs("new")
    rig, first = rig_with_logs(make_rig, new)

    rig.signal(signal.SIGHUP)
    rig.exit(rig.worker(1, generation=2).pid, exit_status(EXIT_APP_LOAD_ERROR))

    assert rig.master.pending is None and rig.master.current.number == 1
    assert new.calls == ["close"]
    assert rig.master.logs is first and first.calls == []


def test_a_second_hup_during_the_canary_closes_the_first_reloads_setup(
    make_rig: Callable[..., Rig],
) -> None:
    second, third = RecordingLogs("second"), RecordingLogs("third")
    rig, first = rig_with_logs(make_rig, second, third)

    rig.signal(signal.SIGHUP)
    rig.signal(signal.SIGHUP)

    assert second.calls == ["close"] and third.calls == [] and first.calls == []
    rig.boot(rig.worker(1, generation=3).pid)
    assert third.calls == ["install"] and first.calls == ["close"]


def test_a_setup_shared_with_the_serving_generation_is_never_closed(
    make_rig: Callable[..., Rig],
) -> None:
    """A reload that left `logging` alone shares the serving generation's setup."""
    first = RecordingLogs("first")

    def reloader(current: Generation, held: list[Listener]) -> Generation:
        return Generation(0, make_config(2), [], logs=current.logs)

    rig = make_rig(count=2, reloader=reloader)
    rig.master.current.logs = first
    rig.start()
    rig.signal(signal.SIGHUP)
    rig.exit(rig.worker(1, generation=2).pid, exit_status(EXIT_APP_LOAD_ERROR))  # abandoned
    rig.signal(signal.SIGHUP)
    rig.boot(rig.worker(1, generation=3).pid)  # promoted
    assert first.calls == [] and rig.master.logs is first


def test_usr1_reopens_the_serving_and_the_pending_setups(make_rig: Callable[..., Rig]) -> None:
    new = RecordingLogs("new")
    rig, first = rig_with_logs(make_rig, new)
    rig.signal(signal.SIGHUP)
    canary = rig.worker(1, generation=2)

    rig.signal(signal.SIGUSR1)

    assert first.calls == ["reopen"] and new.calls == ["reopen"]
    assert rig.kernel.received(canary.pid) == MSG_REOPEN


def test_a_daemon_reload_to_a_syslog_address_nobody_reads_says_what_to_do(
    tmp_path: Path,
) -> None:
    """As the start says it (cli.check_syslog): the daemon's "-" needs a syslog daemon."""
    daemon = Logs(syslog=(f"unix:{tmp_path}/log.sock", "user", "preforkd"),
                  stderr=Stderr(syslog=True), install=False)
    moved = logging_config(syslog={"address": f"unix:{tmp_path}/nobody-listens"}).logging
    with pytest.raises(OSError, match="set it to a file, or start a syslog daemon"):
        for_reload(daemon, moved, (None, None))
    daemon.close()
