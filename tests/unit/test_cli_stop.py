"""`preforkd stop`, the positional app, WEB_CONCURRENCY and a stdout its reader closed: the
command line's logic, with the processes faked (no server runs, nothing is signalled)."""

from __future__ import annotations

import contextlib
import io
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from prefork import cli
from prefork.cli import (
    EXIT_CONFIG_ERROR,
    Endpoint,
    from_environment,
    main,
    parse,
    say,
    stop_running,
    with_script_name,
    with_web_concurrency,
)
from prefork.config import ConfigError, load
from prefork.pidfile import alive, is_master_command

# --- the positional app -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "command", "app"),
    [
        (["etc.app:application"], "run", "etc.app:application"),
        (["-c", "f.yaml", "etc.app:application"], "run", "etc.app:application"),
        (["run", "etc.app:application"], "run", "etc.app:application"),
        (["run", "-c", "f.yaml", "etc.app:application", "-w", "3"], "run", "etc.app:application"),
        (["run", "etc.app"], "run", "etc.app"),  # after a command, a module alone is the app
        (["check", "-c", "f.yaml"], "check", None),
        (["-c", "f.yaml", "check"], "check", None),
        (["check", "mod:app"], "check", "mod:app"),
        (["run:app"], "run", "run:app"),  # a module named like a command, with its callable
        (["--app", "m:a", "m:a"], "run", "m:a"),  # the same twice is no conflict
        (["stop", "-p", "x.pid", "--force"], "stop", None),
        ([], "run", None),
    ],
)
def test_words_give_the_command_and_the_app(
    argv: list[str], command: str, app: str | None
) -> None:
    args = parse(argv)
    assert (args.command, args.app) == (command, app)
    assert not hasattr(args, "positional_app")


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["m:a", "--app", "other:app"], "the application is given twice: m:a and --app other:app"),
        (["stauts", "-c", "f.yaml"], "invalid command 'stauts' (choose from run, check, config, "
                                     "reload, status, stop, upgrade); an application is given as "
                                     "MODULE:CALLABLE"),
        (["status", "m:a"], "status takes no application (got 'm:a')"),
        (["stop", "m:a"], "stop takes no application (got 'm:a')"),
        (["m:a", "n:b"], "unexpected argument 'n:b'"),
    ],
)
def test_bad_words_are_usage_errors(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as info:
        parse(argv)
    assert info.value.code == EXIT_CONFIG_ERROR
    assert f"preforkd: error: {message}" in capsys.readouterr().err


def test_the_positional_app_reaches_the_configuration(tmp_path: Path) -> None:
    args = parse(["-c", str(tmp_path / "f.yaml"), "pkg.wsgi:application"])
    assert cli.overrides_from(args)["app"] == "pkg.wsgi:application"


# --- WEB_CONCURRENCY ---------------------------------------------------------------------------


def test_web_concurrency_is_the_worker_count_when_nothing_else_sets_it(tmp_path: Path) -> None:
    config = tmp_path / "f.yaml"
    config.write_text("app: m:a\nworkers:\n  timeout: 5\n")
    overrides = with_web_concurrency(str(config), {}, {"WEB_CONCURRENCY": "3"})
    assert overrides == {"workers.count": 3}
    assert load(str(config), overrides).workers.count == 3
    assert with_web_concurrency(None, {"app": "m:a"}, {"WEB_CONCURRENCY": " 5 "}) == {
        "app": "m:a", "workers.count": 5,
    }


def test_the_file_and_the_flag_win_over_web_concurrency(tmp_path: Path) -> None:
    config = tmp_path / "f.yaml"
    config.write_text("app: m:a\nworkers: {count: 1}\n")
    env = {"WEB_CONCURRENCY": "3"}
    assert with_web_concurrency(str(config), {}, env) == {}
    assert with_web_concurrency(None, {"workers.count": 2}, env) == {"workers.count": 2}
    assert with_web_concurrency(None, {}, {}) == {}
    assert with_web_concurrency(None, {}, {"WEB_CONCURRENCY": ""}) == {}  # empty: unset


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("abc", "WEB_CONCURRENCY: must be an integer from 1 to 1024, got 'abc'"),
        ("2.5", "WEB_CONCURRENCY: must be an integer from 1 to 1024, got '2.5'"),
        ("0", "WEB_CONCURRENCY: must be from 1 to 1024, got 0"),
        ("5000", "WEB_CONCURRENCY: must be from 1 to 1024, got 5000"),
    ],
)
def test_a_bad_web_concurrency_is_named_in_the_error(value: str, message: str) -> None:
    overrides = {"app": "m:a"}
    with pytest.raises(ConfigError) as info:
        load(None, with_web_concurrency(None, overrides, {"WEB_CONCURRENCY": value}))
    assert str(from_environment(info.value, overrides)) == message


def test_a_bad_w_flag_is_not_blamed_on_web_concurrency() -> None:
    overrides = {"app": "m:a", "workers.count": 0}
    with pytest.raises(ConfigError) as info:
        load(None, with_web_concurrency(None, overrides, {"WEB_CONCURRENCY": "3"}))
    assert str(from_environment(info.value, overrides)) == (
        "command line: workers.count: must be from 1 to 1024, got 0"
    )


def test_check_with_a_bad_web_concurrency_exits_2_before_anything_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("WEB_CONCURRENCY", "many")
    assert main(["check", "m:a"]) == EXIT_CONFIG_ERROR
    out, err = capsys.readouterr()
    assert err == ("preforkd: configuration error: WEB_CONCURRENCY: must be an integer from 1 "
                   "to 1024, got 'many'\n")
    assert out == ""


# --- is this pid a preforkd master? -----------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["preforkd: master [pf_testapp:app]", "", ""], True),
        (["/venv/bin/python3.11", "-m", "prefork", "-c", "/etc/a.yaml"], True),
        (["/venv/bin/python3", "-X", "dev", "-m", "prefork"], True),
        (["/venv/bin/python3.11", "/venv/bin/preforkd", "-c", "/b.yaml"], True),
        (["/usr/local/bin/preforkd", "-D"], True),
        (["preforkd: worker [1] pf_testapp:app"], False),  # a worker is not the master
        (["tail", "-f", "/var/log/preforkd.log"], False),  # is_preforkd would say yes
        (["vim", "prefork/cli.py"], False),
        (["less", "/usr/bin/preforkd"], False),
        (["sleep", "60"], False),
        (["python3", "-m", "pytest", "tests/unit/test_cli_stop.py"], False),
        ([], False),  # a zombie
    ],
)
def test_is_master_command(argv: list[str], expected: bool) -> None:
    assert is_master_command(argv) is expected


def test_alive_counts_a_zombie_as_exited() -> None:
    child = subprocess.Popen(["true"])
    try:
        deadline = time.monotonic() + 5
        while os.waitid(os.P_PID, child.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is None:
            assert time.monotonic() < deadline, "`true` did not exit"
            time.sleep(0.01)
        assert not alive(child.pid)  # exited, not reaped: a zombie
    finally:
        child.wait(5)
    assert alive(os.getpid())
    assert not alive(child.pid)


# --- stop, with a fake process table ----------------------------------------------------------


class FakeMaster:
    """A master as stop_running sees it: its command line and the signals sent to it. It
    exits on the signals in `exits_on`; every os.kill call but signal 0 is recorded."""

    def __init__(self, pid: int, argv: list[str], exits_on: tuple[int, ...]) -> None:
        self.pid = pid
        self.argv = argv
        self.exits_on = exits_on
        self.running = True
        self.sent: list[int] = []

    def kill(self, pid: int, sig: int) -> None:
        assert pid == self.pid, f"signal {sig} to pid {pid}, not the pidfile's {self.pid}"
        if sig == 0:
            if not self.running:
                raise ProcessLookupError
            return
        self.sent.append(sig)
        if sig in self.exits_on:
            self.running = False

    def cmdline(self, pid: int) -> list[str] | None:
        return self.argv if self.running else None


@pytest.fixture
def pidfile(tmp_path: Path) -> Path:
    path = tmp_path / "app.pid"
    path.write_text("4242\n")
    return path


def fake(
    monkeypatch: pytest.MonkeyPatch,
    argv: list[str] | None = None,
    exits_on: tuple[int, ...] = (signal.SIGTERM,),
) -> FakeMaster:
    master = FakeMaster(4242, argv or ["preforkd: master [m:a]"], exits_on)
    monkeypatch.setattr(cli.os, "kill", master.kill)
    monkeypatch.setattr(cli, "alive", lambda pid: master.running)
    monkeypatch.setattr(cli, "read_cmdline", master.cmdline)
    monkeypatch.setattr(cli, "is_master", lambda pid: master.running)
    return master


def test_stop_sends_term_and_waits_for_the_exit(
    pidfile: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    master = fake(monkeypatch)
    assert stop_running(Endpoint(str(pidfile)), wait=5.0, force=False) == 0
    assert master.sent == [signal.SIGTERM]
    assert capsys.readouterr().out == "preforkd: stopped (pid 4242)\n"


def test_stop_says_so_when_the_master_outlives_the_deadline(
    pidfile: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    master = fake(monkeypatch, exits_on=())
    assert stop_running(Endpoint(str(pidfile)), wait=0.2, force=False) == 1
    assert master.sent == [signal.SIGTERM]  # no escalation without --force
    assert capsys.readouterr().err.startswith(
        "preforkd: still running (pid 4242) 0.2s after TERM"
    )


def test_stop_force_kills_the_master_after_the_deadline(
    pidfile: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    master = fake(monkeypatch, exits_on=(signal.SIGKILL,))
    assert stop_running(Endpoint(str(pidfile)), wait=0.2, force=True) == 0
    assert master.sent == [signal.SIGTERM, signal.SIGKILL]
    assert "preforkd: killed (pid 4242): still running 0.2s after TERM" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv",
    [["sleep", "60"], ["tail", "-f", "/var/log/preforkd.log"], ["preforkd: worker [1] m:a"]],
)
def test_stop_sends_nothing_to_a_pid_that_is_not_a_master(
    pidfile: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
    argv: list[str],
) -> None:
    master = fake(monkeypatch, argv)
    assert stop_running(Endpoint(str(pidfile)), wait=5.0, force=True) == EXIT_CONFIG_ERROR
    assert master.sent == []
    err = capsys.readouterr().err
    assert err.startswith(f"preforkd: not running: pid 4242 (from {pidfile}) is not a "
                          f"preforkd master (it runs {' '.join(argv)!r}), so the pidfile is "
                          "stale; nothing was sent")


def test_stop_of_a_pid_that_has_exited_sends_nothing(
    pidfile: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    master = fake(monkeypatch)
    master.running = False
    assert stop_running(Endpoint(str(pidfile)), wait=5.0, force=False) == EXIT_CONFIG_ERROR
    assert master.sent == []
    assert capsys.readouterr().err == (
        f"preforkd: not running (pid 4242 has exited, from {pidfile}); nothing to stop\n"
    )


def test_stop_cannot_signal_another_users_master(
    pidfile: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    master = fake(monkeypatch)

    def refuse(pid: int, sig: int) -> None:
        if sig:
            raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(cli.os, "kill", refuse)
    assert stop_running(Endpoint(str(pidfile)), wait=5.0, force=False) == 1
    assert master.running
    assert "cannot signal preforkd (pid 4242): not permitted" in capsys.readouterr().err


def test_stop_without_a_pidfile_is_a_configuration_error(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert stop_running(Endpoint(), wait=5.0, force=False) == EXIT_CONFIG_ERROR
    assert "stop needs `pidfile`" in capsys.readouterr().err


def test_stop_with_only_a_missing_pidfile_says_not_running(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """From main: -p alone, no configuration file and no app, as `status -p`."""
    monkeypatch.chdir(tmp_path)
    assert main(["stop", "-p", "none.pid"]) == EXIT_CONFIG_ERROR
    err = capsys.readouterr().err
    assert "required setting is missing" not in err
    assert err == f"preforkd: not running (no pid in {tmp_path / 'none.pid'}); nothing to stop\n"


def test_stop_with_a_file_that_does_not_validate_warns_and_still_looks(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "bad.yaml"
    config.write_text(f"app: a:b\npidfile: {tmp_path / 'x.pid'}\nworkers: {{count: 0}}\n")
    assert main(["stop", "-c", str(config)]) == EXIT_CONFIG_ERROR
    first, second = capsys.readouterr().err.splitlines()
    assert first.startswith("preforkd: warning: the configuration has errors")
    assert second.startswith(f"preforkd: not running (no pid in {tmp_path / 'x.pid'})")


# --- a stdout whose reader has gone -----------------------------------------------------------


@contextlib.contextmanager
def closed_stdout() -> Iterator[int]:
    """sys.stdout on a pipe whose read end is closed: every write fails with EPIPE. Yields
    the write end's fd (which silence_stdout points at /dev/null). Used inside a test, not
    as a fixture: pytest sets its own sys.stdout when the test's call begins."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    stream = io.TextIOWrapper(io.BufferedWriter(io.FileIO(write_end, "w")), line_buffering=True)
    saved, sys.stdout = sys.stdout, stream
    try:
        yield write_end
    finally:
        sys.stdout = saved
        with contextlib.suppress(OSError):
            stream.close()


def is_devnull(fd: int) -> bool:
    here, null = os.fstat(fd), os.stat(os.devnull)
    return (here.st_dev, here.st_ino, here.st_rdev) == (null.st_dev, null.st_ino, null.st_rdev)


def test_say_on_a_closed_pipe_points_stdout_at_devnull() -> None:
    with closed_stdout() as fd:
        say("first line")  # raised BrokenPipeError before
        assert is_devnull(fd)
        say("later lines go nowhere, quietly")


def test_a_command_keeps_its_exit_status_when_its_reader_has_gone(
    pidfile: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`preforkd stop | true`: the server stops, and stop says so in its exit status."""
    master = fake(monkeypatch)
    with closed_stdout() as fd:
        assert main(["stop", "-p", str(pidfile)]) == 0
        assert is_devnull(fd)
    assert master.sent == [signal.SIGTERM]


def test_help_to_a_closed_pipe_ends_quietly() -> None:
    """argparse's --help leaves through SystemExit; what it could not write fails at the
    flush in main, which ends the command with 1 and no traceback."""
    with closed_stdout() as fd:
        assert main(["--help"]) == 1
        assert is_devnull(fd)


# --- SCRIPT_NAME -------------------------------------------------------------------------------


def test_script_name_from_the_environment_mounts_the_app_when_nothing_else_does(
    tmp_path: Path,
) -> None:
    config = tmp_path / "f.yaml"
    config.write_text("app: m:a\nhttp:\n  keepalive_timeout: 5\n")
    overrides = with_script_name(str(config), {}, {"SCRIPT_NAME": "/app"})
    assert overrides == {"http.script_name": "/app"}
    assert load(str(config), overrides).http.script_name == "/app"
    config.write_text("app: m:a\nhttp: {script_name: /site}\n")
    assert with_script_name(str(config), {}, {"SCRIPT_NAME": "/app"}) == {}  # the file wins
    flag = {"http.script_name": "/x"}
    assert with_script_name(None, flag, {"SCRIPT_NAME": "/app"}) == flag  # so does --set
    assert with_script_name(None, {}, {"SCRIPT_NAME": ""}) == {}  # empty: unset


def test_a_bad_script_name_in_the_environment_is_named_in_the_error() -> None:
    overrides = {"app": "m:a"}
    with pytest.raises(ConfigError) as info:
        load(None, with_script_name(None, overrides, {"SCRIPT_NAME": "app/"}))
    assert str(from_environment(info.value, overrides)).startswith(
        'SCRIPT_NAME: must be "" or a path that starts with "/"'
    )
