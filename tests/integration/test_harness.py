"""Self-tests of harness.py: waiting, response parsing, address parsing and teardown.

No preforkd is needed: responses come from a socketpair and the "server" is a stand-in
script that forks stubborn children.
"""

from __future__ import annotations

import signal
import socket
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from harness import (
    Response,
    ServerFactory,
    http_request,
    live_group_members,
    parse_addresses,
    read_response,
    send_raw,
    wait_until,
)

# --- wait_until ------------------------------------------------------------------------------


def test_wait_until_returns_the_first_truthy_value() -> None:
    calls = iter([0, None, "", "done", "later"])
    assert wait_until(lambda: next(calls), timeout=5, interval=0) == "done"


def test_wait_until_times_out_with_message_and_last_value() -> None:
    started = time.monotonic()
    with pytest.raises(AssertionError, match=r"workers never came up .*last seen: \[\]"):
        wait_until(lambda: [], timeout=0.2, message="workers never came up")
    assert time.monotonic() - started < 2


def test_wait_until_treats_ignored_exceptions_as_not_yet() -> None:
    attempts: Iterator[Exception | int] = iter(
        [ConnectionRefusedError(), ConnectionRefusedError(), 7]
    )

    def probe() -> int:
        value = next(attempts)
        if isinstance(value, Exception):
            raise value
        return value

    assert wait_until(probe, timeout=5, interval=0, ignore=(ConnectionRefusedError,)) == 7


def test_wait_until_reports_an_ignored_exception_as_last_seen() -> None:
    def refuse() -> None:
        raise ConnectionRefusedError("nope")

    with pytest.raises(AssertionError, match="ConnectionRefusedError"):
        wait_until(refuse, timeout=0.1, ignore=(ConnectionRefusedError,))


def test_wait_until_propagates_other_exceptions() -> None:
    with pytest.raises(ZeroDivisionError):
        wait_until(lambda: 1 / 0, timeout=1)


# --- read_response ---------------------------------------------------------------------------


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    """(client, server) ends of a connected stream socketpair, client with a timeout."""
    client, server = socket.socketpair()
    client.settimeout(5)
    with client, server:
        yield client, server


def test_content_length_body(pair: tuple[socket.socket, socket.socket]) -> None:
    client, server = pair
    server.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 5\r\n\r\nhello")
    response = read_response(client)
    status, headers, body = response
    assert status == 200
    assert headers == [("Content-Type", "text/plain"), ("Content-Length", "5")]
    assert body == b"hello"
    assert response.header("content-type") == "text/plain"
    assert response.header("X-Missing") is None


CHUNKED = (
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
    b"5;ext=1\r\nhello\r\n7\r\n, world\r\n0\r\nX-Trailer: yes\r\n\r\n"
)


def test_chunked_body_with_extension_and_trailer(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    client, server = pair
    server.sendall(CHUNKED)
    assert read_response(client).body == b"hello, world"


def test_close_delimited_body(pair: tuple[socket.socket, socket.socket]) -> None:
    client, server = pair
    server.sendall(b"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\n\r\nuntil close")
    server.close()
    assert read_response(client) == Response(200, [("Content-Type", "text/plain")], b"until close")


def test_pipelined_responses_are_read_one_at_a_time(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    client, server = pair
    first = b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\none"
    third = b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n"
    server.sendall(first + CHUNKED + third + b"leftover")
    assert read_response(client).body == b"one"
    assert read_response(client).body == b"hello, world"
    assert read_response(client).status == 404
    assert client.recv(100) == b"leftover"


def test_bytes_arriving_one_at_a_time(pair: tuple[socket.socket, socket.socket]) -> None:
    client, server = pair
    data = CHUNKED + b"HTTP/1.1 201 Created\r\nContent-Length: 2\r\n\r\nok"

    def trickle() -> None:
        for i in range(len(data)):
            server.sendall(data[i : i + 1])
            time.sleep(0.0005)

    sender = threading.Thread(target=trickle)
    sender.start()
    try:
        assert read_response(client).body == b"hello, world"
        assert read_response(client) == Response(201, [("Content-Length", "2")], b"ok")
    finally:
        sender.join()


def test_no_body_for_head_204_304_and_interim(pair: tuple[socket.socket, socket.socket]) -> None:
    client, server = pair
    server.sendall(
        b"HTTP/1.1 200 OK\r\nContent-Length: 13\r\n\r\n"
        b"HTTP/1.1 204 No Content\r\n\r\n"
        b"HTTP/1.1 304 Not Modified\r\nContent-Length: 13\r\n\r\n"
        b"HTTP/1.1 100 Continue\r\n\r\n"
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nhi"
    )
    assert read_response(client, method="HEAD") == Response(200, [("Content-Length", "13")], b"")
    assert read_response(client).status == 204
    assert read_response(client).status == 304
    assert read_response(client) == Response(100, [], b"")
    assert read_response(client).body == b"hi"


def test_early_close_raises_eof(pair: tuple[socket.socket, socket.socket]) -> None:
    client, server = pair
    server.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort")
    server.close()
    with pytest.raises(EOFError, match="short"):
        read_response(client)


def test_close_before_any_byte_raises_eof(pair: tuple[socket.socket, socket.socket]) -> None:
    client, server = pair
    server.close()
    with pytest.raises(EOFError):
        read_response(client)


# --- request bytes, send_raw, addresses ------------------------------------------------------


def test_http_request_bytes() -> None:
    assert http_request("POST", "/echo", [("Content-Type", "text/plain")], b"abc") == (
        b"POST /echo HTTP/1.1\r\nHost: localhost\r\nContent-Type: text/plain\r\n"
        b"Content-Length: 3\r\n\r\nabc"
    )
    assert http_request(version="HTTP/1.0", host=None) == b"GET / HTTP/1.0\r\n\r\n"


def test_send_raw_reads_until_close() -> None:
    with socket.create_server(("127.0.0.1", 0)) as listener:

        def answer() -> None:
            conn, _ = listener.accept()
            with conn:
                conn.recv(100)
                conn.sendall(b"HTTP/1.1 400 Bad Request\r\nConnection: close\r\n\r\n")

        thread = threading.Thread(target=answer)
        thread.start()
        try:
            reply = send_raw(listener.getsockname(), b"garbage\r\n\r\n")
        finally:
            thread.join()
    assert reply == b"HTTP/1.1 400 Bad Request\r\nConnection: close\r\n\r\n"


def test_parse_addresses_from_log() -> None:
    log = textwrap.dedent("""\
        [2026-11-21 06:21:41 +0000] [1234] [INFO] starting preforkd 0.1.0
        [2026-11-21 06:21:41 +0000] [1234] [INFO] listening at http://127.0.0.1:41235
        [2026-11-21 06:21:41 +0000] [1234] [INFO] listening at unix:/tmp/pf-x/a.sock
        [2026-11-21 06:21:41 +0000] [1234] [INFO] listening at http://[::1]:8000
        [2026-11-21 06:21:41 +0000] [1234] [INFO] listening at tcp://127.0.0.1:7000
        [2026-11-21 06:21:50 +0000] [1234] [INFO] listening at http://127.0.0.1:41235
    """)
    assert parse_addresses(log) == [
        ("http", "127.0.0.1", 41235),
        ("unix", "/tmp/pf-x/a.sock"),
        ("http", "::1", 8000),
        ("tcp", "127.0.0.1", 7000),
    ]


# --- Server lifecycle with a stand-in master -------------------------------------------------

FAKE_MASTER = """\
import os, signal, sys, time

mode = os.environ["FAKE_MODE"]
prefix = f"[2026-11-21 06:21:41 +0000] [{os.getpid()}]"
if mode == "crash":
    print(f"{prefix} [ERROR] cannot import app", file=sys.stderr)
    sys.exit(3)
for _ in range(2):
    if os.fork() == 0:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        while True:
            time.sleep(1)
if mode == "stubborn":
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
print(f"{prefix} [INFO] listening at http://127.0.0.1:41235", file=sys.stderr)
print(f"{prefix} [INFO] ready: 2 workers", file=sys.stderr)
while True:
    time.sleep(1)
"""


@pytest.fixture
def fake_command(tmp_path: Path) -> list[str]:
    script = tmp_path / "fake_master.py"
    script.write_text(FAKE_MASTER)
    return [sys.executable, str(script)]


def test_stop_kills_a_master_that_ignores_sigterm(
    server_factory: ServerFactory, fake_command: list[str]
) -> None:
    server = server_factory({}, command=fake_command, env={"FAKE_MODE": "stubborn"})
    assert server.url == "http://127.0.0.1:41235"
    assert len(server.worker_pids()) == 2
    assert server.stop(timeout=0.3) == -signal.SIGKILL
    assert live_group_members(server.pid) == []


def test_stop_kills_workers_orphaned_by_the_master(
    server_factory: ServerFactory, fake_command: list[str]
) -> None:
    server = server_factory({}, command=fake_command, env={"FAKE_MODE": "orphans"})
    workers = server.worker_pids()
    server.signal(signal.SIGTERM)
    assert server.wait_exit(5) == -signal.SIGTERM
    assert set(workers) <= set(live_group_members(server.pid))  # orphaned, still running
    server.stop()
    assert live_group_members(server.pid) == []


def test_wait_ready_fails_fast_with_the_log_when_the_master_exits(
    server_factory: ServerFactory, fake_command: list[str]
) -> None:
    started = time.monotonic()
    with pytest.raises(AssertionError, match=r"(?s)preforkd exited.*cannot import app"):
        server_factory({}, command=fake_command, env={"FAKE_MODE": "crash"})
    assert time.monotonic() - started < 10
    assert server_factory.servers[0].wait_exit(5) == 3
