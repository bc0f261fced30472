"""The master's status endpoint in process: it answers without ever blocking the master."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator

import pytest

from prefork.admin import AdminServer

BIG = b"x" * (8 << 20)  # far more than any socket buffer holds


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    server, client = socket.socketpair()
    server.setblocking(False)  # as AdminServer._accept leaves an accepted socket
    yield server, client
    server.close()
    client.close()


def test_an_answer_to_a_client_that_reads_nothing_never_blocks_the_master(
    pair: tuple[socket.socket, socket.socket], caplog: pytest.LogCaptureFixture,
    prefork_log_propagates: None,
) -> None:
    """Defect: the answer went out with a blocking sendall and a 1 s timeout, so a local
    client that never read could hold the master's loop a second per connection."""
    server, client = pair
    admin = AdminServer([], lambda target: (200, "text/plain", BIG))

    started = time.monotonic()
    admin._answer(server, b"GET /metrics HTTP/1.1\r\n\r\n")
    took = time.monotonic() - started

    assert took < 0.2, f"the master waited {took:.2f}s for a client that reads nothing"
    assert "the client read nothing" in caplog.text


def test_a_small_answer_goes_out_whole(pair: tuple[socket.socket, socket.socket]) -> None:
    server, client = pair
    admin = AdminServer([], lambda target: (200, "application/json", b'{"ok": true}\n'))

    admin._answer(server, b"GET /status HTTP/1.1\r\n\r\n")
    server.close()

    client.settimeout(5)
    data = b""
    while chunk := client.recv(65536):
        data += chunk
    assert data.startswith(b"HTTP/1.1 200 OK\r\n")
    assert data.endswith(b'\r\n\r\n{"ok": true}\n')
    assert b"Content-Length: 13\r\n" in data
