"""Idle keep-alive connections survive a worker's replacement (http.keepalive_handover).

A real preforkd; one raw client socket that is never reopened. `/` on pf_testapp answers
with the pid of the worker that served it, so a client can see that its connection moved
from a replaced worker to its successor without being closed.
"""

from __future__ import annotations

import re
import signal
import socket
import time

from harness import (
    Response,
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
from prefork.worker import PEERS_INTERVAL


def closes(response: Response) -> bool:
    return (response.header("Connection") or "").lower() == "close"


def test_a_recycled_workers_connection_moves_to_its_successor(
    server_factory: ServerFactory,
) -> None:
    server = server_factory(settings(workers={"count": 1, "max_requests": 3}))
    (first,) = server.worker_pids()
    sock = connect(address(server), timeout=10)
    try:
        seen: list[int] = []
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and len(set(seen)) < 3:
            response = ask(sock)  # the same socket throughout: an EOF fails the test
            assert not closes(response), f"closed after {seen}"
            seen.append(int(response.body))
    finally:
        sock.close()
    assert seen[0] == first
    assert len(set(seen)) >= 3, f"one connection, served by {sorted(set(seen))} only"
    server.wait_for_log(
        re.compile(rf"worker 1 \(pid {first}\) exited \(recycled: max_requests\): exit code 0")
    )


def test_without_hand_over_a_recycle_closes_the_connection(
    server_factory: ServerFactory,
) -> None:
    server = server_factory(
        settings(workers={"count": 1, "max_requests": 3}, http={"keepalive_handover": False})
    )
    (first,) = server.worker_pids()
    sock = connect(address(server), timeout=10)
    try:
        deadline = time.monotonic() + 15
        closed = False
        pids: list[int] = []
        while time.monotonic() < deadline and not closed:
            response = ask(sock)
            pids.append(int(response.body))
            closed = closes(response)
        assert closed, "the recycled worker kept the connection"
        assert set(pids) == {first}  # closed by the worker that held it
        assert sock.recv(1) == b""
    finally:
        sock.close()


def test_a_reload_hands_idle_connections_to_the_new_generation(
    server_factory: ServerFactory,
) -> None:
    server = server_factory(settings(workers={"count": 2}))
    old = server.worker_pids()
    sock = connect(address(server), timeout=10)
    try:
        assert int(ask(sock).body) in old
        server.signal(signal.SIGHUP)
        server.wait_for_log(re.compile(r"reloaded: generation 2 serving with 2 workers"))
        wait_until(lambda: all(gone(pid) for pid in old) or None, timeout=10)
        # the connection sat idle through the reload; the next request is answered on it
        response = ask(sock)
        assert int(response.body) not in old
        assert not closes(response)
    finally:
        sock.close()


def burst_after_a_second_worker_joins(server_factory: ServerFactory, balance: bool) -> list[int]:
    """Worker 1 holds 12 keep-alive connections; TTIN adds worker 2; 12 more clients then
    connect one after another. Which worker served each of the 12."""
    server = server_factory(
        settings(workers={"count": 1}, http={"balance_connections": balance})
    )
    (first,) = server.worker_pids()
    socks: list[socket.socket] = []
    try:
        for _ in range(12):
            socks.append(connect(address(server), timeout=10))
            assert int(ask(socks[-1]).body) == first
        server.signal(signal.SIGTTIN)
        server.wait_for_log(re.compile(r"worker 2 \(pid \d+\) booted"))
        # a worker looks for the others of its generation at most PEERS_INTERVAL apart
        time.sleep(3 * PEERS_INTERVAL)
        served = []
        for _ in range(12):
            # paced, so that each newcomer arrives while both workers wait in epoll
            time.sleep(0.02)
            socks.append(connect(address(server), timeout=10))
            served.append(int(ask(socks[-1]).body))
        for sock in socks:  # every connection is still open and served where it lives
            assert not closes(ask(sock))
        return [0 if pid == first else 1 for pid in served]
    finally:
        for sock in socks:
            sock.close()


def test_a_busy_worker_passes_new_connections_to_an_idle_one(
    server_factory: ServerFactory,
) -> None:
    # Each newcomer arrives while both workers wait in epoll: the kernel wakes the one that
    # registered first (worker 1) every time. Worker 1, holding 12 against 0, passes them on.
    served = burst_after_a_second_worker_joins(server_factory, balance=True)
    assert sum(served) >= 10, f"worker 2 got {sum(served)} of 12: {served}"


def test_without_balancing_the_first_worker_keeps_them(server_factory: ServerFactory) -> None:
    # the control for the test above: the kernel's choice alone gives worker 2 nothing
    served = burst_after_a_second_worker_joins(server_factory, balance=False)
    assert sum(served) <= 3, f"worker 2 got {sum(served)} of 12 without balancing: {served}"


def test_max_lifetime_replaces_every_worker_and_the_connection_moves_on(
    server_factory: ServerFactory,
) -> None:
    """workers.max_lifetime: each worker retires after its serving time (the jitter spreads
    them), successor first; a client on one keep-alive connection sees no error."""
    server = server_factory(
        settings(workers={"count": 2, "max_lifetime": 1, "max_lifetime_jitter": 1})
    )
    first = set(server.worker_pids())
    sock = connect(address(server), timeout=10)
    try:
        served: set[int] = set()
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and not (served - first and first <= gone_pids(first)):
            response = ask(sock)  # the same socket throughout: an EOF fails the test
            served.add(int(response.body))
    finally:
        sock.close()
    assert first <= gone_pids(first), f"still serving after 20 s: {first - gone_pids(first)}"
    assert served - first, "the connection was never served by a successor"
    for number in (1, 2):
        server.wait_for_log(re.compile(
            rf"worker {number} \(pid \d+\) exited \(recycled: max_lifetime\): exit code 0"
        ))


def gone_pids(pids: set[int]) -> set[int]:
    return {pid for pid in pids if gone(pid)}


def test_a_hand_over_to_a_worker_one_short_of_max_connections_answers_its_request(
    server_factory: ServerFactory,
) -> None:
    """Worker 1 holds max_connections - 1 (one of them in a slow request), worker 2 one
    idle keep-alive connection. TTOU retires worker 2, which hands that connection over to
    worker 1 (the only one serving: it waits in worker 1's channel for the slow request),
    and its client sends a request on it meanwhile. Once out of the slow request, worker 1
    takes it: the request is answered (an idle connection of its own, with no request, is
    closed for room instead), and so is every other request sent."""
    server = server_factory(settings(
        workers={"count": 1, "max_connections": 4},
        http={"keepalive_relief": 0},  # the hand-over waits for the main thread
    ))
    (first,) = server.worker_pids()
    held = [connect(address(server), timeout=10) for _ in range(3)]
    try:
        for sock in held:  # one worker so far: every connection is worker 1's
            assert int(ask(sock).body) == first
        server.signal(signal.SIGTTIN)
        match = server.wait_for_log(re.compile(r"worker 2 \(pid (\d+)\) booted"))
        second = int(match.group(1))
        since = len(server.log())
        held[0].sendall(http_request("GET", "/sleep?s=3&tag=slow"))
        server.wait_for_log("pf_testapp: sleeping slow", since=since)
        # worker 1 is inside the slow request: only worker 2 waits for the next connection
        moved = connect(address(server), timeout=10)
        held.append(moved)
        assert int(ask(moved).body) == second
        server.signal(signal.SIGTTOU)  # retires worker 2, which hands `moved` to worker 1
        server.wait_for_log(re.compile(
            rf"worker 2 \(pid {second}\) exited \(fewer workers requested\): exit code 0"
        ), since=since)
        moved.sendall(http_request("GET", "/"))  # while it waits in worker 1's channel
        slow = read_response(held[0])
        assert (slow.status, int(slow.body)) == (200, first)
        try:
            answer = read_response(moved)
        except (EOFError, ConnectionResetError) as exc:
            raise AssertionError(f"the handed-over request was not answered: {exc!r}") from None
        assert (answer.status, int(answer.body)) == (200, first)
    finally:
        for sock in held:
            sock.close()
