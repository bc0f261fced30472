"""A worker's standard error reaches the error log when that is syslog: each worker's fd 2
is a pipe the master reads, and each line becomes an ERROR record with the worker's pid
(prefork/stderrpipe.py). Against a private rsyslogd (test_syslog.Rsyslog) and real
servers: a detached daemon (its fd 2 was /dev/null) and foreground ones.

Each test failed on the code before the pipe: the lines never reached syslog (in a daemon
they went to /dev/null, in the foreground to the terminal), and capture_output with syslog
was refused as a configuration error.
"""

from __future__ import annotations

import contextlib
import os
import signal
from pathlib import Path
from typing import Any

import psutil
import pytest

from detached import Daemons, alive, read_pid
from harness import (
    ServerFactory,
    connect,
    fetch,
    gone,
    http_request,
    parse_addresses,
    read_response,
    wait_until,
    write_config,
)
from test_syslog import Line, Rsyslog

APP = """
import logging
import os
import sys
import time

if os.path.exists(os.path.join(os.path.dirname(__file__), "slow")):
    # a reload's preloaded import that holds the master's loop for seconds
    open(os.path.join(os.path.dirname(__file__), "import-started"), "w").close()
    time.sleep(5)
    open(os.path.join(os.path.dirname(__file__), "import-done"), "w").close()


def hang_here():
    time.sleep(60)


def application(environ, start_response):
    path = environ["PATH_INFO"]
    if path == "/print":
        print("printed to stderr by", os.getpid(), file=sys.stderr)
        os.write(2, b"first of two\\nsecond \\xff of two\\n")
    elif path == "/partial":
        os.write(2, b"a last line without its newline")
        os._exit(3)
    elif path == "/hang":
        hang_here()
    elif path == "/burst":
        for number in range(3000):
            print(f"burst {number:04d} " + "x" * 100, file=sys.stderr)
    elif path == "/stdout":
        print("printed to stdout by", os.getpid())
    elif path == "/orphaned":
        print("waiting for the master's end", file=sys.stderr)
        marker = os.path.join(os.path.dirname(__file__), "master-killed")
        deadline = time.monotonic() + 20
        while not os.path.exists(marker) and time.monotonic() < deadline:
            time.sleep(0.02)
        environ["wsgi.errors"].write("wsgi.errors after the master's end\\n")
        logging.getLogger("app").warning("a record after the master's end")
        print("printed after the master's end", file=sys.stderr)
        sys.stderr.write("written after the master's end\\n")
        sys.stderr.flush()
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [str(os.getpid()).encode()]
"""




def address_from(rsyslog: Rsyslog, pid: int | None = None) -> tuple[Any, ...]:
    listening = rsyslog.wait_for(
        lambda line: "listening at" in line.message and pid in (None, line.pid), "listening")
    return parse_addresses(listening.message)[0]


def start_daemon(
    daemons: Daemons, tmp_path: Path, more: dict[str, Any]
) -> tuple[dict[str, Any], Path, int]:
    """Start a detached daemon serving APP with `more` settings, its pidfile
    tmp_path/preforkd.pid (watched: stopped at teardown); its settings, its configuration
    file and its master's pid."""
    pidfile = tmp_path / "preforkd.pid"
    settings = {
        "app": "app:application",
        "pythonpath": [str(tmp_path)],
        "daemon": True,
        "pidfile": str(pidfile),
        **more,
    }
    config = write_config(tmp_path, settings, app_source=APP)
    daemons.watch(pidfile)
    launched = daemons.launch(config)
    assert launched.returncode == 0, launched.stdout + launched.stderr
    master = read_pid(pidfile)
    assert master is not None
    return settings, config, master


def stderr_lines(rsyslog: Rsyslog, pid: int) -> list[Line]:
    return [line for line in rsyslog.lines() if line.pid == pid and " stderr: " in line.message]


def test_a_daemons_worker_stderr_and_its_stack_dump_at_the_timeout_reach_syslog(
    rsyslog: Rsyslog, daemons: Daemons, tmp_path: Path
) -> None:
    """A detached daemon whose error log is syslog ("-"): its fd 2 is /dev/null, and what a
    worker printed to stderr, and faulthandler's stack dump of a worker killed at
    workers.timeout (what an operator needs to see why it hung), were lost. Each line now
    arrives as an ERROR record with the worker's pid, the dump's lines in order; bytes that
    are not UTF-8 become U+FFFD, and a last line without its newline comes at the exit."""
    _, _, master = start_daemon(daemons, tmp_path, {
        "workers": {"count": 1, "timeout": 1, "timeout_grace": 2},
        "logging": {"syslog": {"address": f"unix:{rsyslog.socket}"}},
    })
    address = address_from(rsyslog)

    worker = int(fetch(address, target="/print").body)
    for text in (f"printed to stderr by {worker}", "first of two", "second \ufffd of two"):
        line = rsyslog.wait_for(
            lambda line, text=text: line.pid == worker  # type: ignore[misc]
            and line.message.endswith(f"worker 1 stderr: {text}"), repr(text))
        assert (line.severity, line.program) == ("err", "preforkd"), line

    with pytest.raises((OSError, EOFError)):
        fetch(address, target="/partial")  # the worker exits without an answer
    rsyslog.wait_for(lambda line: line.pid == worker and line.message.endswith(
        "worker 1 stderr: a last line without its newline"), "the last partial line")

    successor = wait_until(lambda: _worker_of(address, worker), 15, message="no new worker")
    with connect(address) as sock:
        sock.sendall(http_request("GET", "/hang"))
        rsyslog.wait_for(lambda line: line.pid == successor and "hang_here" in line.message,
                         "the stack dump", timeout=20)
    rsyslog.wait_for(lambda line: line.pid == master and "SIGABRT" in line.message
                     and "exited" in line.message, "the worker's end", timeout=10)
    dump = [line.message.split(" stderr: ", 1)[1] for line in stderr_lines(rsyslog, successor)]
    current = next(i for i, text in enumerate(dump) if text.startswith("Current thread 0x"))
    frames = dump[current + 1:]
    assert frames[0].startswith('  File "') and frames[0].endswith(" in hang_here"), dump
    assert frames[1].endswith(" in application"), dump  # most recent call first, in order


def _worker_of(address: tuple[Any, ...], old: int) -> int | None:
    try:
        pid = int(fetch(address, target="/", timeout=2).body)
    except (OSError, EOFError):
        return None
    return pid if pid != old else None


def test_a_burst_of_stderr_while_the_master_imports_a_reload_does_not_hold_the_worker(
    rsyslog: Rsyslog, server_factory: ServerFactory
) -> None:
    """While the master's loop is blocked (a reload importing a preloaded application for
    5 s), nobody reads the pipes: a worker writing ~320 KiB to stderr meanwhile must not
    block on a full pipe (64 KiB by default; 1 MiB asked for), and every line arrives, in
    order, once the master reads again."""
    server = server_factory({
        "app": "app:application",
        "preload_app": True,
        "workers": {"count": 1},
        "logging": {"syslog": {"enabled": True, "address": f"unix:{rsyslog.socket}"}},
    }, app_source=APP, wait_ready=False)
    address = address_from(rsyslog, server.pid)
    rsyslog.wait_for(lambda line: "ready: 1 worker" in line.message, "ready")
    directory = server.config.parent
    (directory / "slow").write_text("")
    server.signal(1)  # HUP
    wait_until((directory / "import-started").exists, 10, message="the reload's import")
    worker = int(fetch(address, target="/burst", timeout=4).body)
    assert not (directory / "import-done").exists(), "the worker waited for the master"

    def burst() -> list[str] | None:
        lines = [line.message.split(" stderr: ", 1)[1]
                 for line in stderr_lines(rsyslog, worker)]
        return lines if len(lines) >= 3000 else None

    lines = wait_until(burst, 30, message="not every line of the burst reached syslog")
    assert lines == [f"burst {number:04d} " + "x" * 100 for number in range(3000)]


def test_capture_output_with_syslog_sends_the_workers_stdout_there(
    rsyslog: Rsyslog, server_factory: ServerFactory
) -> None:
    """capture_output with the error log on syslog was refused ("there is no file for
    standard output to share"); the workers' fd 1 now shares their stderr's pipe."""
    server = server_factory({
        "app": "app:application",
        "workers": {"count": 1},
        "logging": {"capture_output": True,
                    "syslog": {"enabled": True, "address": f"unix:{rsyslog.socket}"}},
    }, app_source=APP, wait_ready=False)
    address = address_from(rsyslog, server.pid)
    worker = int(fetch(address, target="/stdout").body)
    rsyslog.wait_for(lambda line: line.pid == worker and line.message.endswith(
        f"worker 1 stderr: printed to stdout by {worker}"), "the printed line")
    assert "printed to" not in server.log() + server.stdout()


def test_a_worker_whose_master_was_killed_answers_its_request_and_leaves(
    rsyslog: Rsyslog, server_factory: ServerFactory
) -> None:
    """The master is SIGKILLed while a worker is inside a request; the application then
    writes to stderr (wsgi.errors, a log record, print, sys.stderr.write). Nobody reads the
    pipe that is the worker's fd 2 any more, so each write fails with EPIPE, and the print
    raised BrokenPipeError in the application: its client got a 500 for a log line. The
    request is answered as usual, and the orphaned worker leaves once it is done."""
    server = server_factory({
        "app": "app:application",
        "workers": {"count": 2},
        "logging": {"syslog": {"enabled": True, "address": f"unix:{rsyslog.socket}"}},
    }, app_source=APP, wait_ready=False)
    address = address_from(rsyslog, server.pid)
    rsyslog.wait_for(lambda line: "ready: 2 workers" in line.message, "ready")
    workers = server.worker_pids()
    assert len(workers) == 2, workers
    # orphans once the master is gone: stopped by pid below (psutil will not signal a pid
    # that another process has taken since)
    processes = [psutil.Process(pid) for pid in workers]
    try:
        with connect(address, timeout=10) as sock:
            sock.sendall(http_request("GET", "/orphaned"))
            busy = rsyslog.wait_for(
                lambda line: line.message.endswith("stderr: waiting for the master's end"),
                "the request in the application").pid
            server.signal(signal.SIGKILL)
            server.wait_exit()
            (server.config.parent / "master-killed").write_text("")
            response = read_response(sock)
        assert (response.status, response.body) == (200, str(busy).encode()), response
        for pid in workers:  # the idle one at once, the busy one once it has answered
            wait_until(lambda pid=pid: gone(pid), 5,  # type: ignore[misc]
                       message=f"worker {pid} outlived its master")
    finally:
        for process in processes:
            with contextlib.suppress(psutil.NoSuchProcess):
                process.kill()


MASTER_HOOKS = """
import os
import signal
import sys
import warnings


def when_ready(server):
    print("when_ready printed to stderr", file=sys.stderr)
    warnings.warn("a warning in the master")
    os.write(2, b"written to fd 2 by the master\\n")


def on_reload(server):
    # what a fatal error in the master does: a last write to fd 2, then its end
    os.write(2, b"the master's last words\\n")
    os.kill(os.getpid(), signal.SIGKILL)
"""


def test_a_daemons_master_stderr_reaches_syslog_even_its_last_words(
    rsyslog: Rsyslog, daemons: Daemons, tmp_path: Path
) -> None:
    """A detached daemon logging to syslog: what the master itself writes to fd 2 besides
    logging (a hook's print, a warning, os.write, C code, a fatal error's dump) went to
    /dev/null. It reaches syslog as ERROR records with the master's pid, read by a process
    of its own: even what the master writes just before it dies (here SIGKILL from its
    on_reload hook) arrives, and that reader leaves once the master is gone."""
    (tmp_path / "master_hooks.py").write_text(MASTER_HOOKS)
    _, _, master = start_daemon(daemons, tmp_path, {
        "workers": {"count": 1},
        "hooks": {"when_ready": "master_hooks:when_ready", "on_reload": "master_hooks:on_reload"},
        "logging": {"syslog": {"address": f"unix:{rsyslog.socket}"}},
    })
    for text in ("when_ready printed to stderr", "UserWarning: a warning in the master",
                 "written to fd 2 by the master"):
        line = rsyslog.wait_for(
            lambda line, text=text: line.pid == master  # type: ignore[misc]
            and "] master stderr: " in line.message and line.message.endswith(text), repr(text))
        assert (line.severity, line.program) == ("err", "preforkd"), line
    # the workers, and the process reading the master's stderr: the daemon's session
    sid = os.getsid(master)
    session = [process for process in psutil.process_iter()
               if process.pid != master and _session_of(process.pid) == sid]
    assert any("stderr relay" in _title(process) for process in session), session
    try:
        os.kill(master, signal.SIGHUP)
        rsyslog.wait_for(lambda line: line.pid == master and line.message.endswith(
            "master stderr: the master's last words"), "the master's last words")
        for process in session:
            wait_until(lambda process=process: not alive(process), 10,  # type: ignore[misc]
                       message=f"{process} outlived the master")
    finally:
        for process in session:
            with contextlib.suppress(psutil.NoSuchProcess):
                process.kill()


def _session_of(pid: int) -> int | None:
    try:
        return os.getsid(pid)
    except OSError:
        return None


def _title(process: psutil.Process) -> str:
    try:
        return " ".join(process.cmdline())
    except psutil.Error:  # gone, or a zombie
        return ""


STDOUT_HOOKS = """
def when_ready(server):
    print("when_ready printed to stdout")
"""


def test_a_daemons_master_stdout_with_capture_output_reaches_syslog(
    rsyslog: Rsyslog, daemons: Daemons, tmp_path: Path
) -> None:
    """capture_output points fd 1 where fd 2 points. A detached daemon's master did that
    before its stderr became the relay's pipe, so its fd 1 stayed /dev/null: a hook's
    print() was lost while the workers' reached syslog. It follows fd 2 to the relay."""
    (tmp_path / "stdout_hooks.py").write_text(STDOUT_HOOKS)
    _, _, master = start_daemon(daemons, tmp_path, {
        "workers": {"count": 1},
        "hooks": {"when_ready": "stdout_hooks:when_ready"},
        "logging": {"capture_output": True,
                    "syslog": {"address": f"unix:{rsyslog.socket}"}},
    })
    line = rsyslog.wait_for(
        lambda line: line.pid == master
        and line.message.endswith("master stderr: when_ready printed to stdout"),
        "the master's print to stdout")
    assert (line.severity, line.program) == ("err", "preforkd"), line


def _relays_of(master: int) -> list[psutil.Process]:
    """The stderr relays made for master `master` (by their title)."""
    found = []
    for process in psutil.process_iter():
        if _title(process).startswith(f"preforkd: stderr relay (master {master})"):
            found.append(process)
    return found


def test_an_upgraded_daemons_old_relay_leaves_with_the_old_master(
    rsyslog: Rsyslog, daemons: Daemons, tmp_path: Path
) -> None:
    """The master USR2 starts begins with the old master's fd 2, the old relay's pipe, and
    kept a copy of it for good (the launcher's console, which a plain daemon closes when it
    detaches), and so did each of its workers: the old master's relay outlived it for the
    life of the new one. Once the old master is gone, so is its relay; the new master's
    own relay carries its stderr."""
    (tmp_path / "master_hooks.py").write_text(MASTER_HOOKS)
    pidfile = tmp_path / "preforkd.pid"
    _, _, old = start_daemon(daemons, tmp_path, {
        "workers": {"count": 1},
        "hooks": {"when_ready": "master_hooks:when_ready"},
        "logging": {"syslog": {"address": f"unix:{rsyslog.socket}"}},
    })
    old_relays = wait_until(lambda: _relays_of(old), 10, message="the old master has no relay")
    try:
        os.kill(old, signal.SIGUSR2)
        new = wait_until(lambda: (read_pid(pidfile) or old) != old and read_pid(pidfile), 15,
                         message="no new pidfile")
        assert new is not None
        daemons.adopt(new)
        rsyslog.wait_for(lambda line: line.pid == new and "ready: 1 workers" in line.message,
                         "the new master ready")
        new_relays = wait_until(lambda: _relays_of(new), 10, message="the new master has no relay")
        os.kill(old, signal.SIGQUIT)
        wait_until(lambda: gone(old), 20, message="the old master did not stop")
        for process in old_relays:
            wait_until(lambda process=process: not alive(process), 10,  # type: ignore[misc]
                       message=f"{process} outlived the master {old}")
        assert all(alive(process) for process in new_relays), new_relays
        # the new master's stderr goes to its own relay
        rsyslog.wait_for(lambda line: line.pid == new
                         and line.message.endswith("master stderr: when_ready printed to stderr"),
                         "the new master's stderr")
    finally:
        for process in old_relays:
            with contextlib.suppress(psutil.NoSuchProcess):
                process.kill()


PRE_FORK_HOOKS = """
import sys


def pre_fork(server, worker):
    print(f"pre_fork of worker {worker.number}", file=sys.stderr)
"""


def test_a_reload_that_changes_syslog_moves_the_masters_stderr_with_the_log(
    rsyslog: Rsyslog, daemons: Daemons, tmp_path: Path
) -> None:
    """The relay was made once, with the start's syslog settings: after a reload that
    changed them (here the tag; the address, the facility, the level or the format alike)
    the master logged with the new ones and its stderr still went out with the old, to a
    syslog that may be gone. Once the reload serves, a relay with the new settings carries
    it, and the old relay ends."""
    (tmp_path / "pre_fork_hooks.py").write_text(PRE_FORK_HOOKS)
    settings, config, master = start_daemon(daemons, tmp_path, {
        "workers": {"count": 1},
        "hooks": {"pre_fork": "pre_fork_hooks:pre_fork"},
        "logging": {"syslog": {"address": f"unix:{rsyslog.socket}"}},
    })
    rsyslog.wait_for(lambda line: line.pid == master and line.program == "preforkd"
                     and line.message.endswith("master stderr: pre_fork of worker 1"),
                     "the first pre_fork")
    first = wait_until(lambda: _relays_of(master), 10, message="no relay")
    try:
        settings["logging"] = {"syslog": {"address": f"unix:{rsyslog.socket}",
                                          "ident": "preforkd-moved"}}
        write_config(tmp_path, settings, app_source=APP)
        os.kill(master, signal.SIGHUP)
        rsyslog.wait_for(lambda line: line.pid == master and line.program == "preforkd-moved"
                         and "reloaded: generation 2" in line.message, "the reload")
        os.kill(master, signal.SIGTTIN)  # one more worker: pre_fork in the master
        line = rsyslog.wait_for(
            lambda line: line.pid == master
            and line.message.endswith("master stderr: pre_fork of worker 2"), "the next pre_fork")
        assert line.program == "preforkd-moved", line
        for process in first:
            wait_until(lambda process=process: not alive(process), 10,  # type: ignore[misc]
                       message=f"the start's relay {process} outlived its settings")
    finally:
        for process in first:
            with contextlib.suppress(psutil.NoSuchProcess):
                process.kill()
