"""The master's status endpoint in process: it answers without ever blocking the master."""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from prefork.admin import AdminServer, open_admin

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


def test_a_status_socket_a_live_server_listens_on_is_refused_not_replaced(
    tmp_path: Path,
) -> None:
    """Defect: any socket file at the path was unlinked and re-bound, so a second instance
    configured with the same admin.socket took the first one's status endpoint."""
    path = str(tmp_path / "admin.sock")
    live = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    live.bind(path)
    live.listen(1)
    try:
        before = os.stat(path).st_ino
        with pytest.raises(OSError, match="another process is listening on it"):
            open_admin(path, None)
        assert os.stat(path).st_ino == before
    finally:
        live.close()


def test_a_stale_status_socket_is_replaced(tmp_path: Path) -> None:
    path = str(tmp_path / "admin.sock")
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(path)
    dead.close()  # the file stays, nobody listens: what a killed master leaves
    sockets, inode = open_admin(path, None)
    try:
        assert inode == (os.stat(path).st_dev, os.stat(path).st_ino)
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        probe.connect(path)
        probe.close()
    finally:
        AdminServer(sockets, lambda target: (200, "text/plain", b""), path, inode).close()
    assert not os.path.exists(path)


def test_closing_leaves_a_status_socket_another_instance_put_there(tmp_path: Path) -> None:
    """Defect: close() unlinked whatever was at the path by then, such as the socket of an
    instance started after this one's file was removed."""
    path = str(tmp_path / "admin.sock")
    sockets, inode = open_admin(path, None)
    admin = AdminServer(sockets, lambda target: (200, "text/plain", b""), path, inode)
    os.unlink(path)
    other = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    other.bind(path)
    try:
        admin.close()
        assert os.path.exists(path)
    finally:
        other.close()


def test_a_failed_status_bind_leaves_no_socket_file(tmp_path: Path) -> None:
    path = str(tmp_path / "admin.sock")
    taken = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    taken.bind(("127.0.0.1", 0))
    taken.listen(1)
    try:
        port = taken.getsockname()[1]
        with pytest.raises(OSError, match="cannot open the status endpoint"):
            open_admin(path, f"127.0.0.1:{port}")
        assert not os.path.exists(path)
    finally:
        taken.close()
