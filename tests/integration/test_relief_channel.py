"""Keep-alive relief reading the worker's channel (the relief thread takes what the master
sent before a long request began; what comes back stays for the main thread), and the 501
for an unknown method on a keep-alive connection, against a real preforkd with raw client
sockets.

`/` on pf_testapp answers with the serving worker's pid, `/sleep?s=N&tag=T` does so after N
seconds (and logs `pf_testapp: sleeping T` first).
"""

from __future__ import annotations

import re
import signal
import socket
import time

import psutil

from harness import (
    Server,
    ServerFactory,
    address,
    ask,
    connect,
    http_request,
    read_response,
    recv_within,
    settings,
    wait_until,
)
from test_relief import sockets, sockets_of, start_slow

__all__ = ["sockets"]  # the fixture, shared with test_relief

RELIEF_PASS = "into a request; passed keep-alive connections to the master"


def worker_numbers(server: Server) -> dict[int, int]:
    """Worker number -> pid, from the workers' process titles."""
    numbers: dict[int, int] = {}
    for pid in server.worker_pids():
        try:
            title = " ".join(psutil.Process(pid).cmdline())
        except psutil.NoSuchProcess:
            continue
        found = re.search(r"worker \[(\d+)\]", title)
        if found:
            numbers[int(found[1])] = pid
    return numbers


def numbered_workers(server: Server, count: int) -> dict[int, int]:
    """Worker number -> pid, once `count` workers are found."""

    def found() -> dict[int, int]:
        numbers = worker_numbers(server)
        return numbers if len(numbers) == count else {}

    return wait_until(found, 10, message=f"not {count} workers")


def one_on_each(
    server: Server, made: list[socket.socket], pids: set[int]
) -> dict[int, socket.socket]:
    """pid -> a keep-alive connection that worker served last and holds parked."""
    latest: dict[int, socket.socket] = {}
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        sock = connect(address(server), timeout=20)
        made.append(sock)
        latest[int(ask(sock).body)] = sock
        if set(latest) == pids:
            return latest
    raise AssertionError(f"not one connection on each of {pids}: {latest}")


# --- defect: the relief thread closed the connection its worker was serving --------------


def test_a_connection_passed_to_a_busy_worker_does_not_evict_the_request_in_progress(
    server_factory: ServerFactory, sockets: list[socket.socket]
) -> None:
    """Worker 1 sleeps in a request at workers.max_connections; TTOU stops worker 2, which
    passes what it drains from the accept queue to the only serving worker, worker 1. Its
    relief thread took that connection from the channel and parked it; parking at the limit
    evicts the longest-parked idle keep-alive connection, and the one being served (its
    request read whole, served before) was it: closed under the main thread, its client got
    no answer. Now it is answered, and so is the drained client."""
    server = server_factory(
        settings(
            workers={"count": 2, "max_connections": 2, "graceful_timeout": 10},
            http={"keepalive_relief": 0.05, "keepalive_timeout": 30},
        )
    )
    numbers = numbered_workers(server, 2)
    stuck, leaving = numbers[1], numbers[2]  # TTOU stops the highest number
    held = one_on_each(server, sockets, {stuck, leaving})
    start_slow(server, held[stuck], "/sleep?s=5&tag=evict-s", "evict-s")
    start_slow(server, held[leaving], "/sleep?s=1.5&tag=evict-t", "evict-t")
    log_size = len(server.log())
    server.signal(signal.SIGTTOU)  # worker 2 reads its hand-over after its request
    server.wait_for_log("TTOU: 1 workers", since=log_size)
    queued = connect(address(server), timeout=20)  # no worker accepts: both are busy
    sockets.append(queued)
    queued.sendall(http_request("GET", "/"))

    assert int(read_response(held[leaving]).body) == leaving
    wait_until(lambda: leaving not in server.worker_pids() or None, timeout=10,
               message="worker 2 did not exit")
    response = read_response(held[stuck])  # EOFError before: closed by the relief thread
    assert response.status == 200 and int(response.body) == stuck
    answer = read_response(queued)
    assert answer.status == 200 and int(answer.body) == stuck
    assert "Traceback" not in server.log()


# --- defect: relieved connections sent back were passed again on every tick --------------


def test_relief_does_not_ping_pong_what_nobody_else_can_take(
    server_factory: ServerFactory, sockets: list[socket.socket]
) -> None:
    """A stopping server's only worker sleeps in a request with another keep-alive client
    parked. Its relief passes that client to the master, which has no one else to give it to
    and sends it back (MSG_KEPT_BACK); the relief thread took it from the channel on its next
    tick and passed it again: a round trip per tick (40 a second here) for the whole
    request. Now it is passed once. A request sent meanwhile on the parked connection is
    still answered."""
    server = server_factory(
        settings(
            workers={"count": 1, "graceful_timeout": 15},
            http={"keepalive_relief": 0.05},
            logging={"level": "debug"},
        )
    )
    (pid,) = server.worker_pids()
    slow = connect(address(server), timeout=20)
    parked = connect(address(server), timeout=20)
    sockets += [slow, parked]
    assert int(ask(slow).body) == pid
    assert int(ask(parked).body) == pid
    before = sockets_of(pid)
    server.signal(signal.SIGTERM)
    # the worker has begun its stop once it closed its copy of the listening socket; its
    # idle keep-alive connections stay open half a second more
    wait_until(lambda: sockets_of(pid) < before or None, timeout=10)
    start_slow(server, slow, "/sleep?s=2&tag=pingpong", "pingpong")
    server.wait_for_log(RELIEF_PASS)
    parked.sendall(http_request("GET", "/"))  # relief keeps ticking: the request lasts 2 s

    assert int(read_response(slow).body) == pid
    assert read_response(parked).status == 200  # answered, with Connection: close
    assert server.stop(timeout=15) == 0
    passes = server.log().count(RELIEF_PASS)
    assert passes <= 2, f"passed {passes} times during one 2 s request"


# --- pinned: 501 for an unknown method, as a real server answers it ----------------------


def status_of(raw: bytes) -> int:
    status_line = raw.split(b"\r\n", 1)[0]
    return int(status_line.split()[1])


def test_an_unknown_method_on_a_keepalive_connection_gets_501_and_a_close(
    server_factory: ServerFactory, sockets: list[socket.socket]
) -> None:
    """Pinned: after a request served on the connection (the parser is reused), an unknown
    method in its own read is 501, the connection closes after it, the worker serves on."""
    server = server_factory(settings(workers={"count": 1}))
    sock = connect(address(server), timeout=10)
    sockets.append(sock)
    ask(sock)
    sock.sendall(b"BREW /pot HTTP/1.1\r\nHost: x\r\n\r\n")
    raw, closed = recv_within(sock, 5)
    assert closed and status_of(raw) == 501, raw
    assert b"connection: close" in raw.lower()
    with connect(address(server), timeout=10) as again:
        ask(again)
