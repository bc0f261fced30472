"""What a stream handler's connection goes through (prefork/stream.py): PROXY headers read
exactly, timeouts, the slot marked WAITING while the handler waits on its client, and the
bytes it sends counted. Real TCP connections on loopback."""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
import time
from collections.abc import Iterator

import pytest

from prefork.devreload import error_app
from prefork.http.proxy import V2_SIGNATURE
from prefork.scoreboard import Activity, Scoreboard, Slot
from prefork.stream import StreamRefused, open_stream, peer_gone, sent_by


@pytest.fixture
def board() -> Iterator[Scoreboard]:
    scoreboard = Scoreboard(1)
    yield scoreboard
    scoreboard.close()


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    """(accepted server side, client) of one loopback TCP connection."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        client = socket.create_connection(listener.getsockname())
        server, _ = listener.accept()
    client.settimeout(5)
    yield server, client
    server.close()
    client.close()


def opened(
    server: socket.socket, slot: Slot, proxy: str | None = None, handshake: float = 2.0,
    idle: float = 5.0,
) -> tuple[socket.socket, tuple[str, int] | None]:
    return open_stream(
        server, slot, context=None, proxy_mode=proxy, handshake_timeout=handshake,
        idle_timeout=idle,
    )


def test_a_proxy_header_split_over_two_segments_is_consumed_exactly(
    board: Scoreboard, pair: tuple[socket.socket, socket.socket]
) -> None:
    server, client = pair
    client.sendall(b"PROXY TCP4 198.51.100.2 10.0.0.1 4000 ")

    def rest() -> None:
        time.sleep(0.1)
        client.sendall(b"25\r\npayload")

    sender = threading.Thread(target=rest)
    sender.start()
    stream, source = opened(server, board.slot(0), "v1")
    sender.join()
    assert source == ("198.51.100.2", 4000)
    assert stream.recv(100) == b"payload"
    stream.close()


def test_a_v2_header_and_the_bytes_after_it(
    board: Scoreboard, pair: tuple[socket.socket, socket.socket]
) -> None:
    server, client = pair
    body = socket.inet_aton("192.0.2.9") + socket.inet_aton("10.0.0.1") + struct.pack("!HH", 5, 6)
    client.sendall(V2_SIGNATURE + bytes([0x21, 0x11]) + struct.pack("!H", len(body)) + body + b"x")
    stream, source = opened(server, board.slot(0), "auto")
    assert source == ("192.0.2.9", 5)
    assert stream.recv(10) == b"x"
    stream.close()


def test_auto_without_a_header_leaves_every_byte_to_the_handler(
    board: Scoreboard, pair: tuple[socket.socket, socket.socket]
) -> None:
    server, client = pair
    client.sendall(b"HELO example.test\r\n")
    stream, source = opened(server, board.slot(0), "auto")
    assert source is None
    assert stream.recv(100) == b"HELO example.test\r\n"
    stream.close()


def test_a_malformed_header_refuses_the_connection(
    board: Scoreboard, pair: tuple[socket.socket, socket.socket]
) -> None:
    server, client = pair
    client.sendall(b"PROXY BOGUS\r\n")
    with pytest.raises(StreamRefused):
        opened(server, board.slot(0), "v1")
    assert server.fileno() == -1
    with contextlib.suppress(ConnectionResetError):  # closed with the header unread
        assert client.recv(10) == b""


def test_a_client_that_never_sends_its_header_is_refused_in_time(
    board: Scoreboard, pair: tuple[socket.socket, socket.socket]
) -> None:
    server, _ = pair
    started = time.monotonic()
    with pytest.raises(StreamRefused, match="PROXY header"):
        opened(server, board.slot(0), "v1", handshake=0.3)
    assert time.monotonic() - started < 2


def test_waiting_on_the_client_is_marked_and_bounded(
    board: Scoreboard, pair: tuple[socket.socket, socket.socket]
) -> None:
    """The slot says WAITING while the handler blocks on its client (the master does not
    take that for a hung handler), BUSY again after; idle_timeout ends the wait."""
    server, client = pair
    slot = board.slot(0)
    slot.busy(b"TCP", b"test")
    stream, _ = opened(server, slot, idle=0.5)
    seen: list[Activity] = []

    def watch() -> None:
        time.sleep(0.2)
        seen.append(board.read(0).activity)

    watcher = threading.Thread(target=watch)
    watcher.start()
    with pytest.raises(TimeoutError):
        stream.recv(10)
    watcher.join()
    assert seen == [Activity.WAITING]
    assert board.read(0).activity is Activity.BUSY
    stream.close()


def test_bytes_sent_are_counted_once_however_sent(
    board: Scoreboard, pair: tuple[socket.socket, socket.socket]
) -> None:
    server, client = pair
    stream, _ = opened(server, board.slot(0))
    stream.sendall(b"abc")
    stream.send(memoryview(b"defg"))
    with stream.makefile("wb") as out:
        out.write(b"hi")
    assert sent_by(stream) == 9
    stream.close()
    data = b""
    while chunk := client.recv(100):
        data += chunk
    assert data == b"abcdefghi"


def test_reload_mode_gives_a_stream_handler_that_sends_the_traceback(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    """Defect: with reload: true and protocol tcp, a handler that failed to import was
    replaced by the WSGI error page, called as handler(sock, addr): a TypeError per
    connection and a reset for the client."""
    server, client = pair
    try:
        raise SyntaxError("broken on purpose")
    except SyntaxError as exc:
        handler, _ = error_app(exc, stream=True)
    handler(server, ("127.0.0.1", 1))
    server.close()
    data = b""
    while chunk := client.recv(4096):
        data += chunk
    assert b"could not be loaded" in data and b"broken on purpose" in data


def test_peer_gone_tells_a_client_that_left_from_one_that_is_still_there() -> None:
    """A ConnectionResetError out of a stream handler is the client's (logged as a close,
    status 200) only when the client's socket shows it left; else it came from something
    the handler talks to, and is the handler's failure."""
    here, there = socket.socketpair()
    with here:
        assert not peer_gone(here)
        there.close()
        assert peer_gone(here)
