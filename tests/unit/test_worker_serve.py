"""The worker's accept and answers, in process: a client that gave up before the worker took
its connection costs that connection only, on plain and TLS listeners alike; requests that
arrived whole before a broken one are answered before its error; a connection closed while
its client still sends is half-closed first, so the answer is read, not reset."""

from __future__ import annotations

import socket
import ssl
import struct
import time
from pathlib import Path

import pytest

from prefork.scoreboard import Activity
from prefork.worker import Worker
from tests.unit.worker_rig import (
    DEADLINE,
    REQUEST,
    WorkerRig,
    read_until_closed,
    served_connection,
    wait_readable,
)


def tls_context(cert_and_key: tuple[Path, Path]) -> ssl.SSLContext:
    cert, key = cert_and_key
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(str(cert), str(key))
    return context


def reset_in_the_queue(rig: WorkerRig, send: bytes) -> None:
    """A client that connects, maybe sends, and resets while its connection waits in the
    accept queue; returns once the kernel has queued it."""
    client = rig.connect()
    if send:
        client.sendall(send)
    client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    client.close()  # RST: the queued connection is now reset, not yet accepted
    rig.clients.remove(client)


def take_reset(rig: WorkerRig, worker: Worker) -> None:
    deadline = time.monotonic() + DEADLINE
    while not worker.accept(rig.listener):
        assert time.monotonic() < deadline, "the reset connection was never queued"
        time.sleep(0.01)


@pytest.mark.parametrize("send", [b"", b"\x16"], ids=["silent", "sent-a-byte"])
def test_a_tls_client_that_reset_before_accept_costs_only_its_connection(
    worker_rig: WorkerRig, cert_and_key: tuple[Path, Path], send: bytes
) -> None:
    """Defect: wrap_socket raised (ENOTCONN probe: ConnectionResetError, or SSLError when a
    byte had arrived) out of accept and the worker exited with every connection it held."""
    worker, _ = worker_rig.worker(tls=tls_context(cert_and_key))
    reset_in_the_queue(worker_rig, send)

    take_reset(worker_rig, worker)  # raised before the fix

    assert not worker.conns
    assert worker.slot.requests == 0


def test_a_plain_client_that_reset_before_accept_costs_only_its_connection(
    worker_rig: WorkerRig,
) -> None:
    worker, _ = worker_rig.worker()
    kept = served_connection(worker_rig, worker)
    reset_in_the_queue(worker_rig, b"GET / HTTP/1.1\r\n")

    take_reset(worker_rig, worker)  # what it sent may be read before the reset is seen
    for conn in [c for c in worker.conns.values() if c.peer != kept.getsockname()]:
        wait_readable(worker, conn.fd)  # as the worker's loop would be told
        worker.on_readable(conn)

    assert [c.peer for c in worker.conns.values()] == [kept.getsockname()]


def test_whole_requests_before_a_broken_one_are_answered_before_its_error(
    worker_rig: WorkerRig,
) -> None:
    """Defect: the 400 for the second request went out as the only response, so the client
    paired it with the first, which was never answered."""
    worker, _ = worker_rig.worker()
    client = worker_rig.connect()
    client.sendall(REQUEST + b"GET /no-host HTTP/1.1\r\n\r\n")
    worker_rig.accept(worker)

    data = read_until_closed(client)

    first, _, rest = data.partition(b"\r\n\r\nok")
    assert first.startswith(b"HTTP/1.1 200 OK\r\n"), data
    assert rest.startswith(b"HTTP/1.1 400 "), data
    assert b"connection: close" in rest.lower()
    assert worker.slot.requests == 1


def test_an_error_in_a_body_answers_that_request_not_the_one_before(
    worker_rig: WorkerRig,
) -> None:
    worker, _ = worker_rig.worker()
    client = worker_rig.connect()
    broken = b"POST / HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n"
    client.sendall(REQUEST + broken)
    worker_rig.accept(worker)

    data = read_until_closed(client)

    assert data.startswith(b"HTTP/1.1 200 OK\r\n"), data
    assert data.count(b"HTTP/1.1 ") == 2 and b"HTTP/1.1 400 " in data, data
    assert worker.slot.requests == 1  # the POST never reached the application


def test_closing_on_an_unread_body_half_closes_so_the_answer_is_not_reset(
    worker_rig: WorkerRig,
) -> None:
    """Defect: the worker closed at once with the body still arriving; the reset that the
    unread bytes caused could destroy the response before the client read it."""
    worker, _ = worker_rig.worker()
    client = worker_rig.connect()
    client.sendall(
        b"POST /upload HTTP/1.1\r\nHost: t\r\nContent-Length: 1000000\r\n\r\n"
        + b"x" * 300_000
    )
    worker_rig.accept(worker)  # the app answers without reading; the rest is too much to drain
    (conn,) = worker.conns.values()
    assert conn.linger_until, "closed at once, with the client still sending"

    assert read_until_closed(client).startswith(b"HTTP/1.1 200 OK\r\n")
    client.close()
    worker_rig.clients.remove(client)
    deadline = time.monotonic() + DEADLINE
    while worker.conns:  # the worker reads and drops the rest until the client closes
        assert time.monotonic() < deadline, "the lingering connection was never closed"
        wait_readable(worker, conn.fd)
        worker.on_readable(conn)


def test_a_worker_whose_last_keep_alive_client_left_is_idle_again(
    worker_rig: WorkerRig,
) -> None:
    """Defect: after a keep-alive response the slot said KEEPALIVE, and only the count of
    held connections followed the client's close: status and metrics showed a worker in
    keep-alive, holding no connection, forever."""
    rig = worker_rig
    worker, _ = rig.worker(number=1)
    client = served_connection(rig, worker)
    assert rig.board.read(0).activity is Activity.KEEPALIVE  # worker 1's slot
    client.close()
    conn = next(iter(worker.conns.values()))
    deadline = time.monotonic() + DEADLINE
    while worker.conns:
        assert time.monotonic() < deadline, "the close was never noticed"
        wait_readable(worker, conn.fd)
        worker.on_readable(conn)
    assert rig.board.read(0).activity is Activity.IDLE
