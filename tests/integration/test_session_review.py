"""A second reading of one session's changes (gunicorn flag spellings, held early signals,
USR2 under tini, Apache LogFormat, wsgi.errors to syslog, dot segments in PATH_INFO, the
master's gc, HUP bursts), each finding run against a real server.

DEFECT tests fail on the code before the fix their docstring names:
- test_a_wsgi_errors_line_without_its_newline_is_a_record_when_its_request_ends: with the
  error log on syslog, wsgi.errors kept a last line without its newline until the next
  write, which the next request (another client's) began with, or which the worker's exit
  lost; mod_wsgi flushes its wsgi.errors at the end of each request.
- test_a_reload_sent_during_an_abandoned_import_is_answered_at_once: a HUP read in the
  same pass of the loop as a later stop was dropped without a word, so the `preforkd
  reload` that sent it waited for the whole graceful stop, where a HUP read after the stop
  is answered at once ("HUP ignored: the server is stopping").

PINNED tests hold what no test checked yet: a TERM while a USR2-started master imports
(HUP, USR1, USR2, TTIN and TTOU ignored across the exec, the rest held by prefork.early)
stops only that new master, with status 0, and the old one serves on; a TERM or HUP that
reaches a daemon's launcher while it imports ends the launcher as it did before the
signals were held, leaving no daemon, no pidfile and no socket.

Servers run through server_factory (stopped by pid, then their process group, at
teardown); the launchers and `preforkd reload` through subprocess with a bounded wait, and
killed by pid in a `finally`. A master stopped with SIGSTOP is always continued in a
`finally`.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import threading
import time
from functools import partial
from pathlib import Path
from typing import Any

import psutil

from detached import Daemons, preforkd_env
from harness import (
    DEFAULT_COMMAND,
    ServerFactory,
    connect,
    fetch,
    gone,
    http_request,
    logging_to_datagrams,
    read_response,
    wait_until,
    write_config,
)

APP = """
import os, sys, time

def application(environ, start_response):
    path = environ["PATH_INFO"]
    if path == "/partial":
        environ["wsgi.errors"].write("app: " + environ["QUERY_STRING"])
    elif path == "/line":
        environ["wsgi.errors"].write("app: " + environ["QUERY_STRING"] + "\\n")
    elif path == "/slow":
        print("app: slow request started", file=sys.stderr, flush=True)
        time.sleep(float(environ["QUERY_STRING"]))
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [str(os.getpid()).encode()]
"""

# A preloaded application whose import takes PF_IMPORT_DELAY seconds (a large one's does)
SLOW_IMPORT_APP = APP + """
time.sleep(float(os.environ.get("PF_IMPORT_DELAY", "0")))
"""


def app_settings(**more: Any) -> dict[str, Any]:
    return {"app": "app:application", **more}


def signal_mask(pid: int, field: str) -> int:
    """A signal set from /proc/PID/status (ShdPnd: pending, sent with kill(); SigCgt:
    caught by a handler); 0 once the process is gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            line = next(line for line in f if line.startswith(f"{field}:"))
    except (OSError, StopIteration):
        return 0
    return int(line.split()[1], 16)


def pending(pid: int, sig: int) -> bool:
    return bool(signal_mask(pid, "ShdPnd") & (1 << (sig - 1)))


def catches(pid: int, sig: int) -> bool:
    return bool(signal_mask(pid, "SigCgt") & (1 << (sig - 1)))


def exec_and_catches(pid: int, sig: int) -> bool:
    """Whether `pid`, a master's child, has run its exec (its command line is its own,
    no longer the master's "preforkd: master ..." title) and catches `sig` since."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            if f.read().startswith(b"preforkd:"):
                return False
    except OSError:
        return False
    return catches(pid, sig)


# --- DEFECTS ---------------------------------------------------------------------------------


def test_a_wsgi_errors_line_without_its_newline_is_a_record_when_its_request_ends(
    server_factory: ServerFactory, short_tmp: Path
) -> None:
    """DEFECT. With the error log on syslog, wsgi.errors (wsgi.ErrorsToLog) kept what
    followed the last newline until a later write: `environ["wsgi.errors"].write("no
    newline")` logged nothing, then became the start of the next request's line (another
    client's: "app: first partialapp: second"), and was lost for good when the worker
    exited (os._exit flushes nothing; max_requests, a reload, a stop). On a file error log
    the same text reaches fd 2 at the worker's exit at the latest. mod_wsgi's wsgi.errors
    is a log object per request, flushed when the request ends, so each partial line is
    an [wsgi:error] line of its own. Now the worker flushes wsgi.errors after each
    request."""
    with logging_to_datagrams(server_factory, short_tmp, app_settings(), APP) as (
        _, inbox, http_socket
    ):
        with connect(str(http_socket)) as sock:
            sock.sendall(http_request("GET", "/partial?first-partial"))
            assert read_response(sock).status == 200
        # no later request, no exit: the request's end is what writes it
        record = r"^<11>preforkd\[\d+\]: \[ERROR\] app: first-partial$"
        wait_until(partial(inbox.received, record), 5,
                   message=f"the partial line was not logged: {inbox.messages}")
        with connect(str(http_socket)) as sock:
            sock.sendall(http_request("GET", "/line?second"))
            assert read_response(sock).status == 200
        wait_until(partial(inbox.received, r"\[ERROR\] app: second$"), 5,
                   message=f"the second line was not logged: {inbox.messages}")
    assert not any("first-partialapp" in message for message in inbox.messages)


def test_a_reload_sent_during_an_abandoned_import_is_answered_at_once(
    server_factory: ServerFactory,
) -> None:
    """DEFECT. A HUP that reached the master while a reload imported its application, and
    a TERM after it, which abandoned that import: the loop then read the HUP and the TERM
    together, and collapse_reloads dropped the HUP without a word. The `preforkd reload`
    that sent it (it had read the serial of the reload under way) waited for an outcome
    until the graceful stop ended (here a 5 s request; up to workers.graceful_timeout, or
    its --wait), then said "the server exited during the reload". A HUP read once the stop
    has begun is answered at once ("HUP ignored: the server is stopping"; reload() says so
    for that very reason). Now such a HUP goes after the stop and gets that answer. The
    master is held with SIGSTOP while `preforkd reload` sends its HUP, so that it lands
    during the import, before the TERM."""
    server = server_factory(
        app_settings(preload_app=True, workers={"count": 1, "graceful_timeout": 20},
                     pidfile="preforkd.pid", env={"PF_IMPORT_DELAY": "0"}),
        app_source=SLOW_IMPORT_APP,
    )
    pidfile = server.workdir / "preforkd.pid"
    status_file = Path(f"{pidfile}.status")
    results: list[Any] = []
    client = threading.Thread(target=lambda: results.append(fetch(
        server.addresses()[0], "GET", "/slow?5", timeout=20)))
    since = len(server.log())
    client.start()
    reload: subprocess.Popen[str] | None = None
    try:
        server.wait_for_log("app: slow request started", 10, since=since)
        config = server.config
        config.write_text(config.read_text().replace("PF_IMPORT_DELAY: '0'",
                                                     "PF_IMPORT_DELAY: '4'"))
        server.signal(signal.SIGHUP)  # its reload imports for 4 s, the loop blocked
        wait_until(lambda: '"reloading"' in status_file.read_text(), 5,
                   message="the reload never said it was under way")
        server.signal(signal.SIGSTOP)
        try:
            reload = subprocess.Popen(
                [*DEFAULT_COMMAND, "reload", "-p", str(pidfile), "--wait", "20"],
                env=preforkd_env(), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                stderr=subprocess.PIPE, text=True,
            )
            wait_until(lambda: pending(server.pid, signal.SIGHUP), 10,
                       message="`preforkd reload` sent no HUP")
        finally:
            server.signal(signal.SIGCONT)
        wait_until(lambda: not pending(server.pid, signal.SIGHUP), 5)  # in the queue now
        server.signal(signal.SIGTERM)
        server.wait_for_log("reload abandoned: SIGTERM arrived while it loaded", 5, since=since)
        sent = time.monotonic()
        out, err = reload.communicate(timeout=25)
        took = time.monotonic() - sent
        assert reload.returncode == 1, (out, err)
        assert "HUP ignored: the server is stopping" in err, (out, err, server.log_tail())
        assert took < 2.5, f"`preforkd reload` answered {took:.1f}s after the stop began"
        assert server.wait_exit(20) == 0
    finally:
        if reload is not None and reload.poll() is None:
            reload.kill()
            reload.wait(5)
        client.join(20)
    assert results and results[0].status == 200  # the graceful stop let it finish
    assert server.log()[since:].count("HUP: reloading") == 1


# --- PINNED ----------------------------------------------------------------------------------


def test_a_stop_while_a_usr2_master_imports_stops_only_it(
    server_factory: ServerFactory,
) -> None:
    """PINNED. A master started by USR2 inherits HUP, USR1, USR2, TTIN and TTOU ignored and
    holds TERM, INT, QUIT and WINCH from its entry point (prefork.early) until its handlers
    exist. A TERM sent while it still imports (its preloaded application takes 1 s) stops
    it before it serves, status 0 and said in the log; the old master takes its names back
    and serves on, and its workers are the same ones."""
    server = server_factory(
        app_settings(preload_app=True, workers={"count": 1}, pidfile="preforkd.pid",
                     env={"PF_IMPORT_DELAY": "0"}),
        app_source=SLOW_IMPORT_APP,
    )
    master = psutil.Process(server.pid)
    before = {child.pid for child in master.children()}
    config = server.config
    # the new master reads the file again: its import takes 1 s
    config.write_text(config.read_text().replace("PF_IMPORT_DELAY: '0'",
                                                 "PF_IMPORT_DELAY: '1'"))
    assert "PF_IMPORT_DELAY: '1'" in config.read_text()
    since = len(server.log())
    server.signal(signal.SIGUSR2)
    new = wait_until(lambda: {c.pid for c in master.children()} - before, 10,
                     interval=0.005, message="USR2 started no new master")
    (new_pid,) = new
    # exec'd (until then the forked copy has the old master's title and handlers), and its
    # entry point holds TERM: its modules import now (or, if this poll was slow, its
    # application does; a TERM stops it there the same way)
    wait_until(lambda: exec_and_catches(new_pid, signal.SIGTERM), 10, interval=0.002,
               message="the new master never caught TERM after its exec")
    os.kill(new_pid, signal.SIGHUP)  # ignored across the exec: changes nothing
    os.kill(new_pid, signal.SIGTERM)
    server.wait_for_log(f"[{new_pid}] [INFO] SIGTERM while starting: stopped before serving",
                        10, since=since)
    wait_until(lambda: gone(new_pid), 10, message="the new master did not exit")
    assert f"[{new_pid}] [INFO] ready:" not in server.log()
    assert fetch(server.addresses()[0]).status == 200
    assert {c.pid for c in master.children()} >= before
    wait_until(lambda: (server.workdir / "preforkd.pid").read_text().strip() == str(server.pid),
               10, message="the old master did not take its pidfile back")


def launch(daemons: Daemons, directory: Path, sig: int) -> tuple[int, Path, Path]:
    """Start a daemon's launcher, send it `sig` while it imports, and return its exit
    status, the pidfile and the unix socket its daemon would bind (a daemon it started
    after all is stopped at teardown: `daemons` watches the pidfile)."""
    directory.mkdir()
    pidfile, sock = directory / "d.pid", directory / "d.sock"
    daemons.watch(pidfile)
    config = write_config(directory, app_settings(
        daemon=True, pidfile=str(pidfile), bind=[f"unix:{sock}"], workers={"count": 1},
        logging={"error_log": str(directory / "error.log")},
    ), app_source=APP)
    launcher = subprocess.Popen(
        [*DEFAULT_COMMAND, "-c", str(config)], env=preforkd_env(), cwd=directory,
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        # its entry point holds `sig` from here until Startup.run gives it back: the
        # modules import meanwhile (if this poll was slow, the default takes it: the same)
        wait_until(lambda: catches(launcher.pid, sig), 10, interval=0.002,
                   message="the launcher never caught the signal")
        launcher.send_signal(sig)
        return launcher.wait(20), pidfile, sock
    finally:
        if launcher.poll() is None:
            launcher.kill()
            launcher.wait(5)


def test_a_signal_to_a_daemons_launcher_while_it_imports_ends_it_as_before(
    daemons: Daemons, short_tmp: Path
) -> None:
    """PINNED. A daemon's launcher gives the held signals their old dispositions back
    (Startup.run), before it binds or forks, so a TERM or HUP that reached it while the
    modules imported ends it as it did before signals were held: by that signal, with no
    daemon left behind (no pidfile, no socket, nothing in the log about serving)."""
    for index, sig in enumerate((signal.SIGTERM, signal.SIGHUP)):
        directory = short_tmp / f"d{index}"
        status, pidfile, sock = launch(daemons, directory, sig)
        assert status == -sig, status
        assert not pidfile.exists() and not sock.exists()
        log = directory / "error.log"
        assert not re.search("listening at|detached", log.read_text() if log.exists() else "")
