"""HUP applies the `logging` section, as gunicorn's reload does: the new generation's
workers log with the new settings from their fork, the master once that generation serves;
a setup that cannot be opened fails the reload, and an abandoned reload leaves the master
logging where it did.

The app logs each request at INFO on a child of the "prefork" logger, so the level a worker
runs with shows in the error log; its body is the worker's pid.
"""

from __future__ import annotations

import json
import re
import signal
import socket
from pathlib import Path
from typing import Any

import psutil

from detached import preforkd
from harness import (
    Datagrams,
    Server,
    ServerFactory,
    fetch,
    log_lines,
    parse_addresses,
    wait_until,
    write_config,
)

APP = """
import logging
import os

log = logging.getLogger("prefork.pftest")

def application(environ, start_response):
    log.info("pf-logreload: %s served by pid %d", environ["PATH_INFO"], os.getpid())
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [str(os.getpid()).encode()]
"""
BROKEN_APP = """
raise RuntimeError("pf-logreload: broken on purpose")
"""
NO_PYC = {"PYTHONDONTWRITEBYTECODE": "1"}  # app.py is rewritten within one second
RELOAD_DONE = re.compile(
    r"\] (reloaded: generation \d+ serving with \d+ workers?|reload failed.*)"
)


def settings(**more: Any) -> dict[str, Any]:
    return {"app": "app:application", "workers": {"count": 2}, **more}


def text(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except FileNotFoundError:
        return ""


def wait_in_file(
    server: Server, path: Path, pattern: str | re.Pattern[str], timeout: float = 10.0,
    *, since: int = 0,
) -> re.Match[str]:
    """Wait until `path` (from offset `since`) has `pattern`; fail at once if the server
    exited."""
    regex = re.compile(re.escape(pattern)) if isinstance(pattern, str) else pattern

    def found() -> re.Match[str] | None:
        exited = not server.running()  # before reading: no line can be missed
        match = regex.search(text(path), since)
        if match is None and exited:
            raise AssertionError(f"preforkd exited\n{server.log_tail()}\n{path}: {text(path)}")
        return match

    match = wait_until(found, timeout, message=f"{regex.pattern!r} not in {path}")
    assert match is not None
    return match


def rewrite(server: Server, **more: Any) -> None:
    """Replace the server's configuration file (the same directory, so `app.py` is found)."""
    write_config(server.workdir, settings(**more))


def hup(server: Server, error_log: Path | None = None) -> str:
    """HUP and the outcome line, read where the master logs it (the stderr by default)."""
    path = error_log or server.stderr_path
    since = len(text(path))
    server.signal(signal.SIGHUP)
    return wait_in_file(server, path, RELOAD_DONE, 20, since=since).group(1)


def replaced(server: Server, old: set[int], count: int = 2) -> set[int]:
    """Wait until `count` workers run and none of them is in `old`; their pids."""

    def check() -> set[int]:
        pids = set(server.worker_pids())
        return pids if len(pids) == count and not pids & old else set()

    return wait_until(check, 15, message=f"workers {sorted(old)} were not all replaced")


def served_by(server: Server, where: Any, target: str, pids: set[int]) -> int:
    """Request `target` until one of `pids` answers it (an exiting old worker may still take
    one); that worker's pid."""

    def ask() -> int:
        pid = int(fetch(where, "GET", target).body)
        return pid if pid in pids else 0

    return wait_until(ask, 10, message=f"none of {sorted(pids)} served {target}")


def holding(server: Server, path: Path) -> list[int]:
    """The server's processes (master and workers) that have `path` open."""
    return [
        pid
        for pid in [server.pid, *server.worker_pids()]
        if any(f.path == str(path) for f in psutil.Process(pid).open_files())
    ]


# --- tests -------------------------------------------------------------------------------------


def test_a_reload_to_a_lower_threshold_shows_the_new_workers_and_the_masters_info_lines(
    server_factory: ServerFactory, short_tmp: Path
) -> None:
    sock = short_tmp / "s.sock"  # at `warning` no "listening at" line tells the address
    server = server_factory(
        settings(bind=[f"unix:{sock}"], logging={"level": "warning"}),
        app_source=APP, env=NO_PYC, wait_ready=False,
    )
    wait_until(lambda: fetch(str(sock)).status == 200, 15, message="never served",
               ignore=(FileNotFoundError, ConnectionRefusedError))
    old = set(wait_until(lambda: server.worker_pids() if len(server.worker_pids()) == 2 else [],
                         10))
    served_by(server, str(sock), "/before", old)
    assert "[INFO]" not in server.log()

    rewrite(server, bind=[f"unix:{sock}"], logging={"level": "info"})
    since = len(server.log())
    server.signal(signal.SIGHUP)

    # an INFO line of the master's, at the end of the reload: written at the new level
    outcome = server.wait_for_log(RELOAD_DONE, 20, since=since).group(1)
    assert outcome.startswith("reloaded: generation 2 serving with 2 workers"), outcome
    new = replaced(server, old)
    pid = served_by(server, str(sock), "/after", new)
    server.wait_for_log(f"[{pid}] [INFO] pf-logreload: /after served by pid {pid}", 10)
    log = server.log()
    assert f"[{server.pid}] [INFO] reload: generation 2 is serving" in log
    assert "pf-logreload: /before" not in log  # the old workers logged at `warning`
    assert "HUP: reloading" not in log  # nor did the master before the new generation served


def test_a_reload_moves_the_access_log_to_a_new_file_and_format(
    server_factory: ServerFactory, tmp_path: Path
) -> None:
    first, second = tmp_path / "access-1.log", tmp_path / "access-2.log"
    server = server_factory(
        settings(logging={"access_log": str(first)}), app_source=APP, env=NO_PYC
    )
    where = server.addresses()[0]
    old = set(server.worker_pids())
    served_by(server, where, "/before", old)
    wait_in_file(server, first, '"GET /before HTTP/1.1" 200')

    rewrite(server, logging={"access_log": str(second), "access_log_format": "json"})
    outcome = hup(server)
    assert outcome.startswith("reloaded: generation 2 "), outcome
    assert (
        "reload: logging.access_log, logging.access_log_format changed; the new generation "
        f"logs with it (error log stderr, access log {second}, level info)" in server.log()
    )
    new = replaced(server, old)
    for n in range(4):
        served_by(server, where, f"/after{n}", new)
    wait_in_file(server, second, '"target": "/after3"')

    lines = [json.loads(line) for line in log_lines(second)]
    assert {line["target"] for line in lines} == {f"/after{n}" for n in range(4)}
    assert {line["pid"] for line in lines} <= new
    assert "/after" not in text(first)
    assert '"GET /before HTTP/1.1" 200' in text(first)
    # no one holds the old file any more: the master closed it when generation 2 took over
    wait_until(lambda: not holding(server, first), 10,
               message=f"{first} is still open", ignore=(psutil.NoSuchProcess,))
    assert holding(server, second)


def test_an_error_log_that_cannot_be_opened_fails_the_reload(
    server_factory: ServerFactory, tmp_path: Path
) -> None:
    pidfile = tmp_path / "preforkd.pid"
    server = server_factory(settings(pidfile=str(pidfile)), app_source=APP, env=NO_PYC)
    where = server.addresses()[0]
    old = set(server.worker_pids())
    # passes validation (its directory exists, it is no directory), but cannot be opened
    link = tmp_path / "error.log"
    link.symlink_to(tmp_path / "missing" / "error.log")
    rewrite(server, pidfile=str(pidfile), logging={"error_log": str(link), "level": "debug"})
    since = len(server.log())

    result = preforkd("reload", "-c", str(server.config), "--wait", "30")

    assert result.returncode == 1, result.stdout + result.stderr
    assert "reload failed: cannot open the logs: " in result.stderr
    assert str(link) in result.stderr and "No such file or directory" in result.stderr
    assert result.stderr.rstrip().endswith("still serving generation 1")
    assert "reload failed: cannot open the logs: " in server.log()[since:]
    assert not (tmp_path / "missing").exists()
    assert set(server.worker_pids()) == old
    served_by(server, where, "/still", old)
    # the old error log still gets the master's lines, at the old level
    server.signal(signal.SIGTTIN)
    server.wait_for_log("TTIN: 3 workers", 5, since=since)
    wait_until(lambda: len(server.worker_pids()) == 3, 10, message="TTIN added no worker")
    assert "[DEBUG]" not in server.log()


def test_an_abandoned_reload_leaves_the_master_logging_where_it_did(
    server_factory: ServerFactory, tmp_path: Path
) -> None:
    new_log = tmp_path / "new-error.log"
    server = server_factory(settings(), app_source=APP, env=NO_PYC)
    where = server.addresses()[0]
    old = set(server.worker_pids())
    (server.workdir / "app.py").write_text(BROKEN_APP)
    rewrite(server, logging={"error_log": str(new_log)})

    outcome = hup(server)

    failed = "reload failed: the new generation's first worker could not boot"
    assert outcome.startswith(failed), outcome
    # the canary logged with the new generation's setup: its traceback is in the new file
    wait_in_file(server, new_log, "pf-logreload: broken on purpose")
    assert "cannot load the application" in text(new_log)
    # the master did not: it logs on to its stderr, and nothing of its goes to the new file
    since = len(server.log())
    server.signal(signal.SIGUSR1)
    server.wait_for_log("USR1: log files reopened", 5, since=since)
    assert set(server.worker_pids()) == old
    served_by(server, where, "/still", old)
    server.wait_for_log("pf-logreload: /still served", 5, since=since)
    master = f"[{server.pid}] "
    assert not [line for line in log_lines(new_log) if master in line], text(new_log)
    assert "reload failed" in server.log()


def test_usr1_after_a_reload_reopens_the_new_files(
    server_factory: ServerFactory, tmp_path: Path
) -> None:
    error_1, access_1 = tmp_path / "error-1.log", tmp_path / "access-1.log"
    error_2, access_2 = tmp_path / "error-2.log", tmp_path / "access-2.log"
    server = server_factory(
        settings(logging={"error_log": str(error_1), "access_log": str(access_1)}),
        app_source=APP, env=NO_PYC, wait_ready=False,
    )
    wait_in_file(server, error_1, "ready: 2 workers", 15)
    (where,) = parse_addresses(text(error_1))
    old = set(server.worker_pids())

    rewrite(server, logging={"error_log": str(error_2), "access_log": str(access_2)})
    server.signal(signal.SIGHUP)
    # the master's lines move with the new generation: the outcome is in the new file
    outcome = wait_in_file(server, error_2, RELOAD_DONE, 20).group(1)
    assert outcome.startswith("reloaded: generation 2 "), outcome
    assert (
        f"reload: the master logs as generation 2 from now on (error log {error_2}, access log "
        f"{access_2}, level info)" in text(error_1)
    )
    new = replaced(server, old)
    served_by(server, where, "/after-reload", new)
    wait_in_file(server, access_2, "GET /after-reload HTTP/1.1")

    error_2.rename(tmp_path / "error-2.log.1")
    access_2.rename(tmp_path / "access-2.log.1")
    server.signal(signal.SIGUSR1)

    wait_in_file(server, error_2, "USR1: log files reopened", 5)

    def landed() -> bool:  # the workers reopen when they read the master's message
        served_by(server, where, "/after-usr1", new)
        return "GET /after-usr1 HTTP/1.1" in text(access_2)

    wait_until(landed, 5, interval=0.1, message=f"no access line in the reopened {access_2}")
    assert "USR1" not in text(error_1) and "/after" not in text(access_1)
    assert "cannot reopen" not in text(error_2) + text(tmp_path / "error-2.log.1")


def test_stderr_to_a_file_and_back(server_factory: ServerFactory, tmp_path: Path) -> None:
    """error_log "-" -> a file -> "-": the master keeps the stderr it was started with, so
    the third generation (and the master with it) writes there again."""
    error_log = tmp_path / "error.log"
    server = server_factory(settings(), app_source=APP, env=NO_PYC)
    where = server.addresses()[0]
    old = set(server.worker_pids())

    rewrite(server, logging={"error_log": str(error_log)})
    since = len(server.log())
    server.signal(signal.SIGHUP)
    assert wait_in_file(server, error_log, RELOAD_DONE, 20).group(1).startswith("reloaded")
    second = replaced(server, old)
    pid = served_by(server, where, "/to-file", second)
    wait_in_file(server, error_log, f"pf-logreload: /to-file served by pid {pid}")
    assert "pf-logreload" not in server.log()[since:]

    rewrite(server)
    size = len(text(error_log))
    outcome = hup(server)  # read from the stderr again
    assert outcome.startswith("reloaded: generation 3 "), outcome
    third = replaced(server, second)
    pid = served_by(server, where, "/back", third)
    server.wait_for_log(f"pf-logreload: /back served by pid {pid}", 10)
    assert "/back" not in text(error_log)[size:]


def test_a_reload_to_syslog_needs_a_socket_that_answers(
    server_factory: ServerFactory, short_tmp: Path
) -> None:
    """The first HUP names a syslog socket nobody listens on: the reload fails and says so.
    Once it is there, the next HUP moves the new workers' and the master's lines to it."""
    path = short_tmp / "log.sock"
    server = server_factory(settings(), app_source=APP, env=NO_PYC)
    where = server.addresses()[0]
    old = set(server.worker_pids())
    syslog = {"enabled": True, "address": f"unix:{path}", "ident": "pfreload"}
    rewrite(server, logging={"syslog": syslog})

    outcome = hup(server)
    assert outcome.startswith(f"reload failed: cannot open the logs: syslog {path}: "), outcome
    assert set(server.worker_pids()) == old

    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as receiver:
        receiver.bind(str(path))
        inbox = Datagrams(receiver)
        received, messages = inbox.received, inbox.messages

        since = len(server.log())
        server.signal(signal.SIGHUP)
        # generation 2: a reload that failed before it began gave out no number
        outcome = rf"pfreload\[{server.pid}\]: \[INFO\] reloaded: generation 2 "
        wait_until(lambda: received(outcome), 20, message=f"no outcome over syslog: {messages}")
        new = replaced(server, old)
        pid = served_by(server, where, "/syslog", new)
        wait_until(lambda: received(rf"pfreload\[{pid}\]: \[INFO\] pf-logreload: /syslog"), 10,
                   message=f"no line of the new worker's over syslog: {messages}")
    assert "reloaded: generation 2" not in server.log()[since:]
