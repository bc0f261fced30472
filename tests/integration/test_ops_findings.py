"""Findings of an operator running preforkd the classic way: as a detached daemon with its
logs in files or syslog, driven by `preforkd check/stop/reload` from init scripts and Ansible.

Each test marked "Defect" failed on the code it was written against and passes since its
fix; the others pin behaviour no other test checked. Daemons are stopped through their
pidfile by the `daemons` fixture, foreground servers by `server_factory`, rsyslogd (a private
one on its own socket, test_syslog.Rsyslog) by its fixture, whatever the test did.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from detached import LAUNCH_TIMEOUT, Daemons, alive, preforkd, preforkd_env, read_pid
from harness import (
    DEFAULT_COMMAND,
    PID_APP,
    REPO_ROOT,
    Server,
    ServerFactory,
    fetch,
    log_lines,
    parse_addresses,
    settings,
    wait_until,
    write_config,
)
from test_syslog import Rsyslog

# --- helpers ---------------------------------------------------------------------------------




@pytest.fixture
def make_immutable(require_tool: Callable[[str], str]) -> Iterator[Callable[[Path], None]]:
    """`make_immutable(path)`: chattr +i, which even root cannot write through (a stand-in
    for a file or directory the server's user may not write to); undone at teardown. Skips
    where the file system or the privileges do not allow it."""
    chattr = require_tool("chattr")
    marked: list[Path] = []

    def mark(path: Path) -> None:
        done = subprocess.run([chattr, "+i", str(path)], capture_output=True, timeout=10)
        if done.returncode != 0:
            pytest.skip(f"chattr +i {path}: {done.stderr.decode(errors='replace').strip()}")
        marked.append(path)

    try:
        yield mark
    finally:
        for path in reversed(marked):
            subprocess.run([chattr, "-i", str(path)], capture_output=True, timeout=10)


def daemon_settings(directory: Path, **more: Any) -> dict[str, Any]:
    """A daemon's settings: its pidfile beside the configuration."""
    return {
        "app": "app:application",
        "daemon": True,
        "pidfile": str(directory / "preforkd.pid"),
        "workers": {"count": 2},
        **more,
    }


def launch(daemons: Daemons, config: Path, *args: str, timeout: float = LAUNCH_TIMEOUT
           ) -> subprocess.CompletedProcess[str]:
    """The launcher, run to completion with its stdout and stderr on pipes (as Ansible's
    command module and `$(...)` run it); the daemon it leaves is stopped at teardown."""
    daemons.watch(config.parent / "preforkd.pid")
    try:
        return preforkd("-c", str(config), *args, timeout=timeout)
    finally:
        pid = read_pid(config.parent / "preforkd.pid")
        if pid is not None:
            daemons.adopt(pid)


def address_from(rsyslog: Rsyslog) -> tuple[Any, ...]:
    listening = rsyslog.wait_for(lambda line: "listening at" in line.message, "listening")
    return parse_addresses(listening.message)[0]


# --- logs of a detached daemon ---------------------------------------------------------------


def test_a_daemons_access_log_file_stays_a_file_when_its_error_log_falls_back_to_syslog(
    rsyslog: Rsyslog, daemons: Daemons, tmp_path: Path
) -> None:
    """Defect: `daemon: true` with the default error_log "-" sends the error log to syslog
    (the daemon has no stderr). That fallback also took the access log, whatever file
    `access_log` named: the file was never created and every access line went to syslog.
    The file is written, and USR1 reopens it after a rotation."""
    access = tmp_path / "access.log"
    config = write_config(
        tmp_path,
        daemon_settings(
            tmp_path,
            logging={"access_log": str(access),
                     "syslog": {"address": f"unix:{rsyslog.socket}"}},
        ),
        app_source=PID_APP,
    )
    result = launch(daemons, config)
    assert result.returncode == 0, result.stdout + result.stderr
    pid = read_pid(tmp_path / "preforkd.pid")
    assert pid is not None
    ready = rsyslog.wait_for(lambda line: "ready: 2 workers" in line.message, "ready")
    assert ready.pid == pid  # the error log: syslog, as before
    where = address_from(rsyslog)

    assert fetch(where, target="/to-the-file").status == 200
    wait_until(lambda: any('"GET /to-the-file HTTP/1.1" 200' in line
                           for line in log_lines(access)),
               10, message=f"no access line in {access}")
    assert not [line for line in rsyslog.lines() if "/to-the-file" in line.message]

    access.rename(tmp_path / "access.log.1")
    os.kill(pid, signal.SIGUSR1)
    rsyslog.wait_for(lambda line: "USR1: log files reopened" in line.message, "reopened")

    def rotated_in() -> bool:
        fetch(where, target="/after-usr1")
        return any('"GET /after-usr1 HTTP/1.1"' in line for line in log_lines(access))

    wait_until(rotated_in, 10, message="no access line in the new file after USR1")


def test_a_daemons_access_log_on_stdout_goes_to_syslog_not_to_dev_null(
    rsyslog: Rsyslog, daemons: Daemons, tmp_path: Path
) -> None:
    """Defect: a daemon's stdout is /dev/null, so `access_log: "-"` with the error log in a
    file (the example configuration plus `daemon: true` and an error_log) lost every access
    line without a word. Like the error log's "-", it goes to syslog."""
    error_log = tmp_path / "error.log"
    config = write_config(
        tmp_path,
        daemon_settings(
            tmp_path,
            logging={"error_log": str(error_log), "access_log": "-",
                     "syslog": {"address": f"unix:{rsyslog.socket}"}},
        ),
        app_source=PID_APP,
    )
    result = launch(daemons, config)
    assert result.returncode == 0, result.stdout + result.stderr + error_log.read_text()
    where = parse_addresses(error_log.read_text())[0]
    worker = int(fetch(where, target="/to-syslog").body)
    line = rsyslog.wait_for(lambda line: '"GET /to-syslog HTTP/1.1" 200' in line.message,
                            "with the access line")
    assert (line.program, line.pid) == ("preforkd", worker)
    assert "ready: 2 workers" in error_log.read_text()  # the error log stays in its file
    assert not [line for line in rsyslog.lines() if "ready:" in line.message]


@pytest.mark.parametrize(
    "logging",
    [{"error_log": "/dev/stderr"}, {"error_log": "ERROR_FILE", "access_log": "/dev/stdout"}],
    ids=["error_log-dev-stderr", "access_log-dev-stdout"],
)
def test_a_daemon_logging_to_dev_stderr_does_not_keep_the_launchers_pipe(
    rsyslog: Rsyslog, daemons: Daemons, tmp_path: Path, logging: dict[str, str]
) -> None:
    """Defect: with `error_log: /dev/stderr` (or `access_log: /dev/stdout`), set for running
    in a container and kept when the same file is started with -D, the daemon opened the
    launcher's pipe as its log file and held it: whoever read the launcher's output
    (Ansible, `$(preforkd -D ...)`, `| logger`) waited until the daemon exited. In a daemon
    such a path means what "-" means there: syslog."""
    chosen = {key: str(tmp_path / "error.log") if value == "ERROR_FILE" else value
              for key, value in logging.items()}
    config = write_config(
        tmp_path,
        daemon_settings(tmp_path, logging={**chosen,
                                           "syslog": {"address": f"unix:{rsyslog.socket}"}}),
        app_source=PID_APP,
    )
    # Launched with its stdout and stderr on pipes: run() returns at their end of file,
    # which a daemon holding one of them never gave (AssertionError: did not exit)
    result = launch(daemons, config, timeout=20)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    pid = read_pid(tmp_path / "preforkd.pid")
    assert f"preforkd: running in the background as pid {pid}" in output
    assert pid is not None and alive(pid)
    if "access_log" in chosen:  # the error log is a file; the access log goes to syslog
        where = parse_addresses((tmp_path / "error.log").read_text())[0]
        worker = int(fetch(where, target="/served").body)
        rsyslog.wait_for(lambda line: line.pid == worker and "/served" in line.message,
                         "with the access line")
    else:
        rsyslog.wait_for(lambda line: line.pid == pid and "ready: 2" in line.message, "ready")
        assert fetch(address_from(rsyslog), target="/served").status == 200


# --- check predicts the start ----------------------------------------------------------------


@pytest.mark.parametrize("which", ["error_log", "access_log"])
def test_check_fails_like_the_start_when_a_log_file_cannot_be_written(
    make_immutable: Callable[[Path], None], tmp_path: Path, which: str
) -> None:
    """Defect: `check` tried only a syslog socket, not the log files, so a log file the
    server may not write (owned by root from an earlier run, when the server now runs as a
    deploy user) passed `check` with 0 and failed the start with 1."""
    log = tmp_path / f"{which}.log"
    log.write_text("")
    make_immutable(log)
    config = write_config(
        tmp_path,
        settings(bind=["127.0.0.1:0"], logging={which: str(log)}),
    )

    checked = preforkd("check", "-c", str(config))
    started = preforkd("-c", str(config))

    assert started.returncode == 1, started.stdout + started.stderr
    assert f"preforkd: cannot open the logs: [Errno 1] Operation not permitted: '{log}'" in (
        started.stderr)
    assert checked.returncode == 1, checked.stdout + checked.stderr
    assert f"preforkd: cannot open the logs: [Errno 1] Operation not permitted: '{log}'" in (
        checked.stderr)


def test_a_pidfile_that_cannot_be_written_fails_check_and_the_start_before_binding(
    make_immutable: Callable[[Path], None], daemons: Daemons, tmp_path: Path, short_tmp: Path
) -> None:
    """Defect: a pidfile directory the server may not write to (/var/run for a non-root
    user) was found only after the daemon had bound its sockets and detached, and `check`
    said OK when the status endpoint was not PIDFILE.sock. Both now fail with the start's
    message, and the start binds nothing."""
    run = tmp_path / "run"
    run.mkdir()
    sock = short_tmp / "http.sock"
    config = write_config(
        tmp_path,
        daemon_settings(
            tmp_path,
            pidfile=str(run / "preforkd.pid"),
            bind=[f"unix:{sock}"],
            admin={"socket": str(short_tmp / "admin.sock")},
            logging={"error_log": str(tmp_path / "error.log")},
        ),
        app_source=PID_APP,
    )
    make_immutable(run)
    message = f"cannot write pidfile {run / 'preforkd.pid'}: Operation not permitted"

    checked = preforkd("check", "-c", str(config))
    daemons.watch(run / "preforkd.pid")
    started = daemons.launch(config)

    assert checked.returncode == 1, checked.stdout + checked.stderr
    assert f"preforkd: {message}" in checked.stderr
    assert started.returncode == 1, started.stdout + started.stderr
    assert f"preforkd: {message}" in started.stderr
    assert not (tmp_path / "error.log").exists(), "the start went on past the pidfile"
    assert not sock.exists(), "the start bound its address before it failed"


# --- the command line ------------------------------------------------------------------------


@pytest.mark.parametrize("wait", ["-1", "nan"])
@pytest.mark.parametrize("command", ["stop", "reload", "upgrade"])
def test_a_wait_that_is_not_a_duration_is_refused_and_nothing_is_sent(
    server_factory: ServerFactory, short_tmp: Path, command: str, wait: str
) -> None:
    """Defect: --wait took any float: `stop --wait -1` sent TERM and at once said the master
    still ran (exit 1) while it stopped; `reload --wait nan` sent HUP and gave up without
    waiting ("no reload result within nans"). A usage error now, with nothing sent."""
    server = server_factory(settings(pidfile=str(short_tmp / "app.pid")))
    before = len(server.log())

    result = preforkd(command, "-c", str(server.config), f"--wait={wait}")

    assert result.returncode == 2, result.stdout + result.stderr
    assert f"argument --wait: must be 0 or more seconds, got '{wait}'" in result.stderr
    assert server.running()
    assert server.log()[before:] == "", "the server was signalled"


@pytest.mark.parametrize(
    ("command", "code"), [("stop", 2), ("status", 1), ("reload", 1), ("upgrade", 2)]
)
def test_a_pidfile_naming_a_worker_signals_nothing(
    server_factory: ServerFactory, short_tmp: Path, command: str, code: int
) -> None:
    """Pins: a pidfile left naming a pid that a worker of another preforkd now has (its
    title says `preforkd: worker`, its command line `python -m prefork`): every command
    refuses it with its documented status and the worker is not signalled."""
    server = server_factory(settings(workers={"count": 1}))
    worker = server.worker_pids()[0]
    pidfile = short_tmp / "stale.pid"
    pidfile.write_text(f"{worker}\n")
    before = len(server.log())

    result = preforkd(command, "-p", str(pidfile), "--wait", "2")

    assert result.returncode == code, result.stdout + result.stderr
    assert "not running" in result.stderr
    assert server.worker_pids() == [worker]
    assert server.log()[before:] == "", "the worker or its master was signalled"


def test_two_daemons_started_at_once_on_one_pidfile_leave_one_running(
    daemons: Daemons, tmp_path: Path
) -> None:
    """Pins: an init script and an operator (or two Ansible runs) starting the same service
    at the same moment, here on different ports: one launcher succeeds, the other exits 1
    saying which pid runs, and the pidfile names the one that serves."""
    pidfile = tmp_path / "preforkd.pid"
    daemons.watch(pidfile)
    configs = [
        write_config(
            tmp_path / name,
            daemon_settings(tmp_path, logging={"error_log": str(tmp_path / name / "error.log")}),
            app_source=PID_APP,
        )
        for name in ("one", "two")
    ]
    launchers = [
        subprocess.Popen(
            [*DEFAULT_COMMAND, "-c", str(config)], env=preforkd_env(),
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        )
        for config in configs
    ]
    outputs = []
    for launcher in launchers:
        try:
            out, _ = launcher.communicate(timeout=LAUNCH_TIMEOUT)
        finally:
            launcher.kill()
            for config in configs:  # whatever detached: the fixture stops it
                log = config.parent / "error.log"
                for detached in _detached_pids(log):
                    daemons.adopt(detached)
        outputs.append(out.decode())
    codes = sorted(launcher.returncode for launcher in launchers)
    assert codes == [0, 1], outputs
    pid = read_pid(pidfile)
    assert pid is not None and alive(pid)
    refused = outputs[[launcher.returncode for launcher in launchers].index(1)]
    assert f"already running as pid {pid} (pidfile {pidfile})" in refused, outputs
    served = outputs[[launcher.returncode for launcher in launchers].index(0)]
    assert f"running in the background as pid {pid}" in served


def _detached_pids(log: Path) -> list[int]:
    text = log.read_text() if log.exists() else ""
    return [int(word) for line in text.splitlines() if "detached: master pid" in line
            for word in line.split()[-1:] if word.isdigit()]


# --- log rotation ----------------------------------------------------------------------------


def test_copytruncate_rotation_keeps_appending_at_the_start_of_the_file(
    server_factory: ServerFactory, tmp_path: Path
) -> None:
    """Pins: logrotate's copytruncate (copy, then truncate in place, no USR1). Every process
    writes with O_APPEND, so the next lines start the truncated file instead of leaving a
    hole of NUL bytes as long as the old content, which `less` and log shippers choke on."""
    error_log, access_log = tmp_path / "error.log", tmp_path / "access.log"
    server = server_factory(
        settings(logging={"error_log": str(error_log), "access_log": str(access_log)}),
        wait_ready=False,
    )
    wait_until(lambda: "ready: 2 workers" in error_log.read_text(), 15, message="not ready",
               ignore=(FileNotFoundError,))
    where = parse_addresses(error_log.read_text())[0]
    for n in range(5):
        assert fetch(where, target=f"/before/{n}").status == 200
    wait_until(lambda: len(log_lines(access_log)) == 5, 10, message="5 access lines")

    for path in (error_log, access_log):
        shutil.copyfile(path, path.with_name(path.name + ".1"))
        os.truncate(path, 0)
    assert fetch(where, target="/after-truncate").status == 200
    server.signal(signal.SIGTTIN)  # something for the master to log
    wait_until(lambda: log_lines(access_log), 10, message="no access line after truncation")
    wait_until(lambda: log_lines(error_log), 10, message="no error log line after truncation")

    for path in (error_log, access_log):
        data = path.read_bytes()
        assert not data.startswith(b"\0"), f"{path} has a hole: {data[:40]!r}"
    assert '"GET /after-truncate HTTP/1.1" 200' in log_lines(access_log)[0]


# --- the example configuration ---------------------------------------------------------------


def test_the_example_configuration_checks_and_serves_with_its_access_log_on_stdout(
    server_factory: ServerFactory, tmp_path: Path
) -> None:
    """Pins `make run`: etc/preforkd.yaml passes `check` and serves etc/hello.py, with an
    access line on stdout (the port is overridden on the command line: 8000 may be taken)."""
    example = REPO_ROOT / "etc" / "preforkd.yaml"
    checked = preforkd("check", "-c", str(example), "--bind", "127.0.0.1:0")
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "application OK: hello:application" in checked.stdout

    workdir = tmp_path / "example"
    workdir.mkdir()
    server = Server(workdir, example, ["--bind", "127.0.0.1:0"])
    server_factory.servers.append(server)  # stopped at teardown with the others
    server.start().wait_ready()
    response = fetch(server.addresses()[0], target="/")
    assert (response.status, response.body) == (200, b"Hello, world!\n")
    wait_until(lambda: '"GET / HTTP/1.1" 200 14 ' in server.stdout(), 10,
               message="no access line on stdout")


@pytest.mark.parametrize("content", ["EXITED", "not a pid"], ids=["exited-pid", "garbage"])
def test_a_stale_pidfile_that_cannot_be_removed_fails_the_start_with_a_reason(
    make_immutable: Callable[[Path], None], daemons: Daemons, tmp_path: Path, content: str
) -> None:
    """Defect: a stale pidfile (its process gone, or no pid in it) in a directory the server
    may not write to (left by a run as root; a pidfile directory made read-only) ended the
    start with a PermissionError traceback from unlink. It fails with the reason, exit 1,
    before anything is bound."""
    run = tmp_path / "run"
    run.mkdir()
    pidfile = run / "preforkd.pid"
    if content == "EXITED":
        content = f"{2**22 + 12345}\n"  # above the kernel's PID_MAX_LIMIT: never a process
    pidfile.write_text(content)
    config = write_config(
        tmp_path,
        daemon_settings(tmp_path, pidfile=str(pidfile),
                        logging={"error_log": str(tmp_path / "error.log")}),
        app_source=PID_APP,
    )
    make_immutable(run)
    daemons.watch(pidfile)

    started = daemons.launch(config)

    output = started.stdout + started.stderr
    assert started.returncode == 1, output
    assert "Traceback" not in output, output
    assert f"preforkd: cannot remove the stale pidfile {pidfile} (" in started.stderr, output
    assert "): Operation not permitted" in started.stderr
    assert pidfile.read_text() == content  # left as it was
