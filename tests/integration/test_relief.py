"""A worker inside a long request passes its parked keep-alive connections to a free worker
(http.keepalive_relief).

A real preforkd with two workers and raw keep-alive client sockets. `/` on pf_testapp answers
with the serving worker's pid, `/sleep?s=N` does so after N seconds, `/hang` sleeps past any
workers.timeout set here. Each test first finds two connections parked on the same worker,
then keeps that worker busy on one of them and asks on the other.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from harness import (
    Server,
    ServerFactory,
    address,
    ask,
    connect,
    gone,
    http_request,
    read_response,
    settings,
    wait_until,
)


@pytest.fixture
def sockets() -> Iterator[list[socket.socket]]:
    made: list[socket.socket] = []
    yield made
    for sock in made:
        sock.close()


def on_one_worker(
    server: Server, made: list[socket.socket], count: int
) -> tuple[int, list[socket.socket]]:
    """(pid, connections): `count` keep-alive connections that worker `pid` served and holds
    parked, in the order it parked them."""
    held: dict[int, list[socket.socket]] = {}
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        sock = connect(address(server), timeout=20)
        made.append(sock)
        pid = int(ask(sock).body)
        held.setdefault(pid, []).append(sock)
        if len(held[pid]) == count:
            return pid, held[pid]
    raise AssertionError(f"no {count} connections on one worker: {held}")


def two_on_one_worker(
    server: Server, made: list[socket.socket]
) -> tuple[int, socket.socket, socket.socket]:
    """(pid, a, b): two keep-alive connections that worker `pid` served and holds parked."""
    pid, (a, b) = on_one_worker(server, made, 2)
    return pid, a, b


def start_slow(server: Server, sock: socket.socket, path: str, tag: str) -> None:
    """Send a request that keeps its worker busy; return once the application is in it."""
    sock.sendall(http_request("GET", path))
    server.wait_for_log(re.compile(rf"pf_testapp: (sleeping {tag}|hanging)"))


def test_a_client_parked_on_a_busy_worker_is_answered_by_a_free_one(
    server_factory: ServerFactory, sockets: list[socket.socket]
) -> None:
    server = server_factory(
        settings(workers={"count": 2}, http={"keepalive_relief": 0.2}, logging={"level": "debug"})
    )
    busy, a, b = two_on_one_worker(server, sockets)
    start_slow(server, a, "/sleep?s=6&tag=relief", "relief")
    asked = time.monotonic()
    response = ask(b)  # parked on `busy`, which sleeps for 6 s
    waited = time.monotonic() - asked
    assert int(response.body) != busy
    assert waited < 3, f"answered after {waited:.1f} s"
    assert (response.header("Connection") or "").lower() != "close"
    server.wait_for_log(re.compile(r"into a request; passed keep-alive connections to \d+"))
    # the slow request itself is still answered, on its own connection
    assert int(read_response(a).body) == busy


def test_without_relief_the_client_waits_for_the_busy_worker(
    server_factory: ServerFactory, sockets: list[socket.socket]
) -> None:
    server = server_factory(settings(workers={"count": 2}, http={"keepalive_relief": 0}))
    busy, a, b = two_on_one_worker(server, sockets)
    start_slow(server, a, "/sleep?s=2&tag=norelief", "norelief")
    asked = time.monotonic()
    response = ask(b)
    assert int(response.body) == busy
    assert time.monotonic() - asked > 1.0  # it waited behind the sleep
    assert int(read_response(a).body) == busy


def test_a_relieved_connection_outlives_the_worker_killed_at_timeout(
    server_factory: ServerFactory, sockets: list[socket.socket]
) -> None:
    """Before, the idle keep-alive connections of a worker stuck in a request died with it:
    the client's next request found the connection closed."""
    server = server_factory(
        settings(workers={"count": 2, "timeout": 2, "timeout_grace": 1},
                 http={"keepalive_relief": 0.2, "keepalive_timeout": 30})
    )
    busy, a, b = two_on_one_worker(server, sockets)
    start_slow(server, a, "/hang", "hang")
    server.wait_for_log(re.compile(rf"\(pid {busy}\) timed out after"), timeout=15)
    wait_until(lambda: gone(busy) or None, timeout=10)
    response = ask(b)  # the same connection: the killed worker no longer held it
    assert int(response.body) != busy
    assert a.recv(1) == b""  # the stuck request's own connection went with its worker


def test_a_stop_while_relieving_answers_every_request(
    server_factory: ServerFactory, sockets: list[socket.socket]
) -> None:
    """TERM while a worker sleeps in a request and a request waits on another of its
    connections: both are answered before the server exits."""
    server = server_factory(
        settings(workers={"count": 2, "graceful_timeout": 20}, http={"keepalive_relief": 0.2})
    )
    busy, a, b = two_on_one_worker(server, sockets)
    start_slow(server, a, "/sleep?s=2&tag=stop", "stop")
    b.sendall(http_request("GET", "/"))
    answers: dict[str, int] = {}

    def read(name: str, sock: socket.socket) -> None:
        answers[name] = read_response(sock).status

    readers = [threading.Thread(target=read, args=(n, s)) for n, s in (("a", a), ("b", b))]
    for reader in readers:
        reader.start()
    server.signal(signal.SIGTERM)
    for reader in readers:
        reader.join(timeout=15)
    assert answers == {"a": 200, "b": 200}
    assert server.stop(timeout=15) == 0


# --- without relief (or with one worker), a request that arrived while the worker was busy
# --- is answered once it is free, never closed as idle


def sockets_of(pid: int) -> int:
    fds = Path(f"/proc/{pid}/fd")
    return sum(1 for fd in fds.iterdir() if os.readlink(fd).startswith("socket:"))


def one_worker_holding_two(
    server_factory: ServerFactory, made: list[socket.socket], **http: float
) -> tuple[Server, int, socket.socket, socket.socket]:
    server = server_factory(settings(workers={"count": 1}, http={"keepalive_relief": 0, **http}))
    pid, a, b = two_on_one_worker(server, made)
    return server, pid, a, b


def test_a_request_sent_before_the_keepalive_deadline_is_answered_after_a_long_request(
    server_factory: ServerFactory, sockets: list[socket.socket]
) -> None:
    """Before, the worker's sweep after the long request found the connection past its
    keep-alive deadline, judged it idle without looking, and closed it over the unread
    request: the client got a reset."""
    server, pid, a, b = one_worker_holding_two(server_factory, sockets, keepalive_timeout=1)
    start_slow(server, a, "/sleep?s=2.5&tag=sweep", "sweep")
    b.sendall(http_request("GET", "/"))  # well within b's 1 s keep-alive
    assert int(read_response(a).body) == pid
    assert int(read_response(b).body) == pid


def test_a_graceful_stop_answers_a_request_that_arrived_during_a_long_one(
    server_factory: ServerFactory, sockets: list[socket.socket]
) -> None:
    """TERM, then, within the half second a stopping worker keeps idle keep-alive
    connections, a long request on one and a short one on the other. Before, the worker,
    free again after the long request, closed every idle keep-alive connection without
    looking: the request waiting on one was reset."""
    server, pid, a, b = one_worker_holding_two(server_factory, sockets)
    before = sockets_of(pid)
    server.signal(signal.SIGTERM)
    # the worker has begun its stop once it closed its copy of the listening socket
    wait_until(lambda: sockets_of(pid) < before or None, timeout=10)
    start_slow(server, a, "/sleep?s=2&tag=stopping", "stopping")
    b.sendall(http_request("GET", "/"))
    assert int(read_response(a).body) == pid
    response = read_response(b)
    assert response.status == 200
    assert (response.header("Connection") or "").lower() == "close"
    assert server.stop(timeout=15) == 0
