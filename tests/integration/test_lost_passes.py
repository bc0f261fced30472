"""Connections passed between workers through a master whose loop is blocked (a preloaded
application importing on a reload) are answered, not closed.

A real preforkd with two workers, preload_app, http.balance_connections; an application
whose import sleeps PF_IMPORT_DELAY seconds (a reload applies its `env:` first). Raw client
sockets; every request must get its answer.
"""

from __future__ import annotations

import re
import signal
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from harness import (
    Server,
    ServerFactory,
    address,
    ask,
    connect,
    gone,
    http_request,
    read_response,
)
from prefork.worker import PASS_ANSWER_WAIT

APP = """
import os, sys, time

time.sleep(float(os.environ.get("PF_IMPORT_DELAY", "0")))

def application(environ, start_response):
    if environ["PATH_INFO"] == "/sleep":
        print("app: sleeping " + environ["QUERY_STRING"], file=sys.stderr, flush=True)
        time.sleep(float(environ["QUERY_STRING"]))
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [str(os.getpid()).encode()]
"""

HUP_STARTED = "[INFO] HUP: reloading"


def app_settings(**more: Any) -> dict[str, Any]:
    return {
        "app": "app:application",
        "preload_app": True,
        "workers": {"count": 2, "graceful_timeout": 30},
        "http": {"balance_connections": True, "keepalive_timeout": 30},
        "logging": {"level": "debug"},
        **more,
    }


@pytest.fixture
def sockets() -> Iterator[list[socket.socket]]:
    made: list[socket.socket] = []
    yield made
    for sock in made:
        sock.close()


def numbered_pids(server: Server) -> dict[int, int]:
    """worker number -> pid, from the `booted` lines."""
    booted = re.findall(r"worker (\d+) \(pid (\d+)\) booted", server.log())
    return {int(number): int(pid) for number, pid in booted}


def one_on_each(server: Server, made: list[socket.socket]) -> dict[int, socket.socket]:
    """pid -> a keep-alive connection that worker served and holds parked, one per worker."""
    held: dict[int, socket.socket] = {}
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and len(held) < 2:
        sock = connect(address(server), timeout=30)
        made.append(sock)
        held.setdefault(int(ask(sock).body), sock)
    assert len(held) == 2, f"connections landed on {sorted(held)} only"
    return held


def slow_import_on_reload(server: Server, seconds: float) -> None:
    """Rewrite the server's file so that the next reload's import takes `seconds`."""
    config = yaml.safe_load(server.config.read_text())
    config["env"] = {"PF_IMPORT_DELAY": str(seconds)}
    server.config.write_text(yaml.safe_dump(config))


class Answers:
    """Reads one response per socket in threads: status, or what ended it instead."""

    def __init__(self) -> None:
        self.got: dict[str, int | str] = {}
        self.threads: list[threading.Thread] = []

    def expect(self, name: str, sock: socket.socket) -> None:
        def read() -> None:
            try:
                self.got[name] = read_response(sock).status
            except (OSError, EOFError, ValueError) as exc:
                self.got[name] = f"no answer: {exc!r}"

        thread = threading.Thread(target=read, daemon=True)
        thread.start()
        self.threads.append(thread)

    def wait(self, timeout: float) -> dict[str, int | str]:
        deadline = time.monotonic() + timeout
        for thread in self.threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        return dict(self.got)


def outlast_the_old_wait(pid: int) -> None:
    """Bounded: the time a stopping worker used to wait for the master's answer about what
    it passed (PASS_ANSWER_WAIT), and a margin; ends early once `pid` has exited."""
    deadline = time.monotonic() + PASS_ANSWER_WAIT + 1.5
    while not gone(pid) and time.monotonic() < deadline:
        time.sleep(0.02)


def test_a_stop_during_a_reload_import_answers_what_a_stopping_worker_passed(
    server_factory: ServerFactory, sockets: list[socket.socket], tmp_path: Path
) -> None:
    """DEFECT. TTOU asks worker 2, inside a request, to stop and hand over; a HUP then
    blocks the master in a slow import. New clients queue (both workers are busy); worker
    2, out of its request, hands its keep-alive connection over and passes what it drains
    from the queue to the master, which does not read them. Worker 2 waited 1 s for an
    answer and exited; a TERM then abandoned the import, and the master, stopping, found
    no worker to take them but worker 2, gone: closed, a GET and a malformed request
    unanswered, and a request sent on the handed-over connection too."""
    server = server_factory(app_settings(), app_source=APP)
    pids = numbered_pids(server)
    held = one_on_each(server, sockets)
    first, second = held[pids[1]], held[pids[2]]
    first.sendall(http_request("GET", "/sleep?8"))
    server.wait_for_log("app: sleeping 8")
    second.sendall(http_request("GET", "/sleep?2"))
    server.wait_for_log("app: sleeping 2")
    since = len(server.log())
    server.signal(signal.SIGTTOU)
    server.wait_for_log("TTOU: 1 workers", since=since)
    slow_import_on_reload(server, 30)
    server.signal(signal.SIGHUP)
    server.wait_for_log(HUP_STARTED, since=since)
    # queued behind two busy workers, while the master imports
    plain = connect(address(server), timeout=30)
    sockets.append(plain)
    plain.sendall(http_request("GET", "/"))
    malformed = connect(address(server), timeout=30)
    sockets.append(malformed)
    malformed.sendall(b"NOT A REQUEST\r\n\r\n")
    assert read_response(second).status == 200  # worker 2 is out of its request
    server.wait_for_log(re.compile(r"worker 2: passed \d+ keep-alive connections on"),
                        since=since)
    second.sendall(http_request("GET", "/"))  # on the connection the master holds now
    outlast_the_old_wait(pids[2])
    answers = Answers()
    answers.expect("plain", plain)
    answers.expect("malformed", malformed)
    answers.expect("handed over", second)
    answers.expect("slow", first)
    server.signal(signal.SIGTERM)
    got = answers.wait(30)
    assert got == {"plain": 200, "malformed": 400, "handed over": 200, "slow": 200}, (
        f"{got}\n{server.log_tail()}"
    )
    assert server.wait_exit(30) == 0
