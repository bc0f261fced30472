"""Defects found by exploratory testing of an operator's day with preforkd: `check` against a
start, stale pidfiles, what a reload or a failed start says, HUP and hook modules, USR1, the
access log's byte counts and a stream handler's client resets.

Each test fails on the code it was written against, because of the defect its docstring
names. Short-lived commands run through detached.preforkd (bounded by a timeout); servers
through server_factory, which stops them by pid (SIGTERM, then SIGKILL to the group) at
teardown whatever the test did; any other process a test starts is killed by pid in a
`finally`.
"""

from __future__ import annotations

import json
import re
import signal
import socket
import struct
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from detached import preforkd
from harness import (
    ServerFactory,
    connect,
    fetch,
    log_lines,
    wait_until,
    write_config,
)

NO_PYC = {"PYTHONDONTWRITEBYTECODE": "1"}

APP_V1 = """
def application(environ, start_response):
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [b"version one"]
"""

APP_V2 = """
def application(environ, start_response):
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [b"version two, longer"]
"""

RELOAD_DONE = re.compile(r"\] (reloaded: generation \d+ serving with \d+ workers?|reload failed.*)")


def metric(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    raise AssertionError(f"no {name} in\n{text}")


# --- check: the same outcome as a start ----------------------------------------------------


def test_check_fails_like_the_start_when_the_configured_syslog_does_not_answer(
    server_factory: ServerFactory, tmp_path: Path, short_tmp: Path
) -> None:
    """README: `check` exits with the status a start with the same file would, so that
    `check && reload` (or `check && systemctl restart`) does not pass a file the server then
    refuses. With `logging.syslog.enabled` and a unix socket nobody listens on, the start
    fails with 1 ("cannot open the logs: syslog ...": logs.reach_syslog), but `check` never
    tries the syslog socket and says everything is fine (0)."""
    missing = short_tmp / "no-syslog-here.sock"
    settings = {
        "app": "app:application",
        "logging": {"syslog": {"enabled": True, "address": str(missing)}},
    }
    server = server_factory(settings, app_source=APP_V1, wait_ready=False)
    start_status = server.wait_exit(20)
    assert start_status == 1, server.log_tail()

    result = preforkd("check", "-c", str(server.config))
    assert result.returncode == start_status, (
        f"check exited {result.returncode}, a start with the same file exits {start_status}"
        f"\n{result.stdout}{result.stderr}"
    )
    assert str(missing) in result.stderr


def test_check_imports_the_app_as_the_user_the_workers_run_as(
    server_factory: ServerFactory, tmp_path: Path
) -> None:
    """The workers drop to `user:` before they import the application (privileges.py), but
    `check` imports it as root (cli.check_imports): an app in a directory only root can
    read passes `check` with 0, and the start with the same file exits 3 ("the application
    could not be loaded"). `check` promises the status a start would have."""
    private = tmp_path / "private"
    private.mkdir()
    (private / "app.py").write_text(APP_V1)
    private.chmod(0o700)  # root's only: a release unpacked with a restrictive umask
    settings = {"app": "app:application", "pythonpath": [str(private)], "user": "nobody",
                "workers": {"count": 1}}
    server = server_factory(settings, wait_ready=False, env=NO_PYC)
    start_status = server.wait_exit(30)
    assert start_status == 3, server.log_tail()

    result = preforkd("check", "-c", str(server.config), env=NO_PYC)
    assert result.returncode == start_status, (
        f"check exited {result.returncode}, a start with the same file exits {start_status}"
        f"\n{result.stdout}{result.stderr}"
    )


# --- the pidfile -----------------------------------------------------------------------------


@pytest.fixture
def tail_of_a_preforkd_log(tmp_path: Path) -> Iterator[subprocess.Popen[bytes]]:
    """`tail -f .../preforkd.log`: a live process that is not preforkd but names it on its
    command line (an operator watching the log, whose pid a stale pidfile now names)."""
    log = tmp_path / "preforkd.log"
    log.write_text("")
    process = subprocess.Popen(["tail", "-f", str(log)], stdout=subprocess.DEVNULL)
    try:
        yield process
    finally:
        process.kill()
        process.wait(5)


def test_a_start_replaces_a_stale_pidfile_whose_pid_a_tail_of_the_log_now_has(
    server_factory: ServerFactory,
    short_tmp: Path,
    tail_of_a_preforkd_log: subprocess.Popen[bytes],
) -> None:
    """After a crash (SIGKILL, OOM, a reboot) the pidfile names a pid that another program
    now has. `stop` and `reload` call it stale ("is not a preforkd master ... the pidfile
    is stale", DESIGN: "even `tail -f preforkd.log`"), but a start refuses with "already
    running as pid N": PidFile.check asks only whether the command line contains "prefork"
    (is_preforkd), not whether it is a master (is_master). The operator can neither stop
    nor start the server until they find and delete the file by hand."""
    other = tail_of_a_preforkd_log
    pidfile = short_tmp / "app.pid"
    pidfile.write_text(f"{other.pid}\n")

    stop = preforkd("stop", "-p", str(pidfile), "--wait", "2")
    assert "the pidfile is stale" in stop.stderr, stop.stderr  # what stop says of it

    server = server_factory(
        {"app": "app:application", "pidfile": str(pidfile)}, app_source=APP_V1,
        wait_ready=False,
    )
    server.wait_ready(20)
    assert pidfile.read_text().strip() == str(server.pid)
    assert other.poll() is None, "the other program was signalled"


# --- what a failed reload or start says --------------------------------------------------------


HOOKS_SOURCE = """
def bad_post_fork(server, worker):
    raise RuntimeError("pf-found: database unreachable")
"""


def test_a_reload_refused_by_a_failing_post_fork_hook_says_why(
    server_factory: ServerFactory, short_tmp: Path
) -> None:
    """A reload whose new `post_fork` hook raises is abandoned (right), but `preforkd
    reload` (systemd's ExecReload) reports only "could not boot (exit code 3)": the worker
    sends the master its reason only when the application fails to import (worker_main:
    MSG_BOOT_ERROR), not when post_fork, post_worker_init or the user switch fail. The
    reason is in a traceback in the error log only; the command that asked says nothing
    an operator can act on (the same "a worker cannot start: exit code 3" reaches a
    daemon's launcher at startup)."""
    pidfile = short_tmp / "app.pid"
    settings = {"app": "app:application", "pidfile": str(pidfile), "workers": {"count": 1}}
    server = server_factory(settings, app_source=APP_V1, env=NO_PYC)
    (server.workdir / "pf_found_hooks.py").write_text(HOOKS_SOURCE)
    hooks = {"post_fork": "pf_found_hooks:bad_post_fork"}
    write_config(server.workdir, {**settings, "hooks": hooks})

    result = preforkd("reload", "-c", str(server.config), "--wait", "30")

    assert result.returncode == 1, result.stdout + result.stderr
    assert "reload failed" in result.stderr
    assert "database unreachable" in result.stderr or "post_fork" in result.stderr, (
        f"the reload's outcome does not say why: {result.stderr!r}"
    )


SLOW_APP = """
import time
time.sleep(4)
""" + APP_V1


def test_a_reload_abandoned_at_the_boot_timeout_says_so(
    server_factory: ServerFactory, short_tmp: Path
) -> None:
    """When the new generation's first worker does not load the app within
    workers.boot_timeout, the master kills it and abandons the reload (right), but the
    outcome `preforkd reload` prints is "could not boot (killed by SIGKILL)": it reads as a
    crash or the OOM killer, while the master itself killed it for the boot timeout
    (Master.boot_failed describes the wait status, not handle.reason)."""
    pidfile = short_tmp / "app.pid"
    settings = {"app": "app:application", "pidfile": str(pidfile),
                "workers": {"count": 1, "boot_timeout": 1}}
    server = server_factory(settings, app_source=APP_V1, env=NO_PYC)
    (server.workdir / "app.py").write_text(SLOW_APP)

    result = preforkd("reload", "-c", str(server.config), "--wait", "30")

    assert result.returncode == 1, result.stdout + result.stderr
    assert re.search(r"boot_timeout|did not boot within", result.stderr), (
        f"the reload's outcome does not name the boot timeout: {result.stderr!r}"
    )


EXITING_APP = """
raise SystemExit("pf-found: DATABASE_URL is not set")
"""


def test_an_app_that_exits_at_import_stops_the_start_with_status_3_and_the_reason(
    server_factory: ServerFactory,
) -> None:
    """An application module that calls sys.exit() at import (a settings module refusing a
    missing variable) cannot be loaded: `check` says so and exits 3, and README/DESIGN say a
    start stops with 3 and the reason instead of fork-looping. But worker_main catches only
    Exception around load_app, and System.spawn turns the SystemExit into a silent exit
    status 1: the master backs off and forks again for ever ("failed to boot (exit code
    1)", then "degraded"), the reason is never logged, and a daemon's launcher waits
    boot_timeout + 15 s and then says only that it did not report ready."""
    server = server_factory(
        {"app": "app:application", "workers": {"count": 1}}, app_source=EXITING_APP,
        wait_ready=False, env=NO_PYC,
    )
    try:
        status = server.wait_exit(15)
    except AssertionError:
        status = None
    assert status == 3, f"the start did not stop (status {status})\n{server.log_tail()}"
    assert "DATABASE_URL is not set" in server.log()


# --- HUP and hook modules ----------------------------------------------------------------------


HOOK_MODULE = """
import app  # a project's hooks module importing the project, as hooks usually do

def post_fork(server, worker):
    pass
"""


def test_hup_serves_new_code_when_a_hook_module_imports_the_app(
    server_factory: ServerFactory, tmp_path: Path
) -> None:
    """README/settings: without preload_app "each new worker imports the app itself, so HUP
    also loads new code", and hooks "are imported by the master at startup and reload". But
    Hooks resolves its modules with importlib.import_module, which returns the copy the
    master cached at startup: a changed hook is never run, and whatever a hook module
    imported (here the application) stays in the master's sys.modules, so every new worker
    inherits the old code. The reload reports "reloaded" and the old code keeps serving."""
    code = tmp_path / "code"
    code.mkdir()
    (code / "app.py").write_text(APP_V1)
    (code / "pf_found_hookmod.py").write_text(HOOK_MODULE)
    server = server_factory(
        {"app": "app:application", "pythonpath": [str(code)], "workers": {"count": 1},
         "hooks": {"post_fork": "pf_found_hookmod:post_fork"}},
        env=NO_PYC,
    )
    address = server.addresses()[0]
    assert fetch(address).body == b"version one"

    (code / "app.py").write_text(APP_V2)
    since = len(server.log())
    server.signal(signal.SIGHUP)
    done = server.wait_for_log(RELOAD_DONE, 20, since=since)
    assert done.group(1).startswith("reloaded"), done.group(0)

    assert fetch(address).body == b"version two, longer", "HUP kept serving the old code"


# --- USR1 ----------------------------------------------------------------------------------------


def test_usr1_that_cannot_reopen_the_masters_logs_does_not_say_they_were_reopened(
    server_factory: ServerFactory, tmp_path: Path
) -> None:
    """When the log directory has gone (moved by a rotation script, a full disk's cleanup),
    USR1 cannot reopen the files: the master logs "cannot reopen the log files ... still
    writing to the old one" and then, at INFO, "USR1: log files reopened" -- the success
    line an operator (or a logrotate postrotate check) looks for, right after the failure
    (Master.reopen_logs logs it whatever Logs.reopen did)."""
    logs = tmp_path / "logs"
    logs.mkdir()
    server = server_factory(
        {"app": "app:application", "workers": {"count": 1},
         "logging": {"error_log": str(logs / "error.log")}},
        app_source=APP_V1, wait_ready=False,
    )
    error_log = logs / "error.log"
    wait_until(lambda: any("ready:" in line for line in log_lines(error_log)), 15,
               message="the server did not become ready")
    moved = tmp_path / "logs.old"
    logs.rename(moved)

    server.signal(signal.SIGUSR1)
    master = f"[{server.pid}]"

    def master_lines() -> list[str]:
        return [line for line in log_lines(moved / "error.log") if master in line]

    wait_until(lambda: any("cannot reopen" in line for line in master_lines()), 10,
               message="the master did not report the failed reopen")
    wait_until(lambda: any("USR1: some log files could not be reopened" in line
                           for line in master_lines()), 10,
               message="the master did not sum up the failed reopen")
    claimed = [line for line in master_lines() if "log files reopened" in line]
    assert not claimed, f"the master says the logs were reopened after failing: {claimed}"


# --- the access log's bytes ------------------------------------------------------------------


BIG = 20_000_000
BIG_APP = f"""
def application(environ, start_response):
    start_response("200 OK", [("Content-Type", "application/octet-stream")])
    return [b"x" * {BIG}]
"""


def test_a_response_the_client_abandoned_logs_the_bytes_sent_not_the_body_size(
    server_factory: ServerFactory, short_tmp: Path
) -> None:
    """A client that asks for a 20 MB body, reads none of it and resets the connection gets
    an access-log line with the whole 20,000,000 bytes, and /metrics'
    preforkd_response_body_bytes_total ("Response body bytes sent") grows by as much:
    Response.send_whole (and write) count the bytes before sending them, although
    HttpServe.answered says the log of a response cut short "counts what was sent". With a
    4 KiB receive window the kernel cannot have taken more than a few MiB (tcp_wmem)."""
    pidfile = short_tmp / "app.pid"
    server = server_factory(
        {"app": "app:application", "pidfile": str(pidfile), "workers": {"count": 1},
         "logging": {"access_log": "-", "access_log_format": "%(s)s %(B)s %(U)s"}},
        app_source=BIG_APP,
    )
    address = server.addresses()[0]
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.settimeout(5)
        sock.connect((address[1], address[2]))
        sock.sendall(b"GET /big HTTP/1.1\r\nHost: x\r\n\r\n")
        assert sock.recv(1, socket.MSG_PEEK) == b"H"  # the response has begun: the worker
        # is sending, and soon blocked on the 4 KiB window
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    finally:
        sock.close()  # a reset: the client is gone

    line = wait_until(
        lambda: next((ln for ln in server.stdout().splitlines() if ln.endswith(" /big")), None),
        10, message="no access-log line for the abandoned response",
    )
    logged = int(line.split()[1])
    assert logged < BIG, f"the access log claims the whole body went out: {line!r}"

    metrics = fetch(str(pidfile) + ".sock", target="/metrics").body.decode()
    assert metric(metrics, "preforkd_response_body_bytes_total") < BIG


# --- protocol: tcp ---------------------------------------------------------------------------


ECHO = """
def handler(sock, addr):
    while True:
        data = sock.recv(65536)
        if not data:
            return
        sock.sendall(data)
"""


def test_a_client_reset_in_a_stream_handler_is_not_a_server_error_with_a_traceback(
    server_factory: ServerFactory, short_tmp: Path
) -> None:
    """protocol: tcp with the echo handler of etc/echo.py: a client that resets its
    connection (a mobile client dropping, a load balancer's health check closing hard) is
    logged at ERROR with a full traceback ("stream handler failed ... ConnectionResetError")
    and counted as a 5xx in /metrics and the access log, as if the server had failed. A
    client idle past stream.idle_timeout is handled as the client's doing (408, one INFO
    line), HTTP treats a client that went away as such (ClientDisconnected, at debug), and
    gunicorn ignores ECONNRESET/EPIPE; a reset by the peer is the same expected condition."""
    pidfile = short_tmp / "app.pid"
    server = server_factory(
        {"app": "echo:handler", "protocol": "tcp", "pidfile": str(pidfile),
         "workers": {"count": 1}},
        app_source=ECHO, module="echo",
    )
    address = server.addresses()[0]
    with connect(address) as sock:  # one normal session first
        sock.sendall(b"hello")
        assert sock.recv(16) == b"hello"
    sock = connect(address)
    try:
        sock.sendall(b"y" * 200_000)  # the handler is echoing it back when we reset
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    finally:
        sock.close()

    def served() -> float:
        body = fetch(str(pidfile) + ".sock", target="/status").body
        totals = json.loads(body)["totals"]
        return totals["requests"]

    wait_until(lambda: served() >= 2, 10, message="the reset session was not counted")
    metrics = fetch(str(pidfile) + ".sock", target="/metrics").body.decode()
    assert metric(metrics, 'preforkd_requests_total{class="5xx"}') == 0, (
        "a client reset counted as a server error"
    )
    assert "Traceback" not in server.log(), server.log_tail()
