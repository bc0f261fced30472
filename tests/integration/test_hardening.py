"""HTTP hardening against a real preforkd: strict framing and smuggling, limits, slow clients,
trusted proxies (Forwarded / X-Forwarded-*, PROXY protocol) and the JSON access log.

Every rejection must answer once, say `Connection: close`, close the socket, and never answer
a second request sent behind it in the same packet. The app (apps/pf_hardening_app.py) never
raises on its own; `/body` records whether it got a complete body in $PF_BODY_RECORD.
"""

from __future__ import annotations

import json
import re
import resource
import selectors
import socket
import struct
import threading
import time
from pathlib import Path
from typing import Any

import pytest

import harness
from harness import (
    Address,
    Response,
    Server,
    ServerFactory,
    address,
    connect,
    fetch,
    http_request,
    log_lines,
    read_response,
    recv_until_close,
    send_raw,
    wait_until,
)

SMUGGLED = b"GET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n"
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"


def settings(**more: Any) -> dict[str, Any]:
    return harness.settings("pf_hardening_app:app", **more)


def environ_of(response: Response) -> dict[str, Any]:
    assert response.status == 200, response
    data: dict[str, Any] = json.loads(response.body)
    return data


def records(path: Path) -> list[dict[str, Any]]:
    """What /body wrote: one {"expected", "got", "error"} per request it handled."""
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line]


def rejected(server: Server, data: bytes, timeout: float = 5.0) -> tuple[Response, bytes]:
    """Send `data` followed by a second, valid request in the same send; return the first
    response and whatever followed it before the server closed (AssertionError if it did
    not close within `timeout`)."""
    with connect(address(server), timeout) as sock:
        sock.sendall(data + SMUGGLED)
        try:
            response = read_response(sock)
        except (EOFError, ValueError) as exc:
            raise AssertionError(f"no well-formed response: {exc}\n{server.log_tail()}") from None
        after = recv_until_close(sock, timeout)
    return response, after


def assert_rejected(server: Server, data: bytes, status: int) -> None:
    response, after = rejected(server, data)
    assert response.status == status, response
    assert (response.header("Connection") or "").lower() == "close", response.headers
    assert response.header("Content-Length") == str(len(response.body))
    assert after == b"", f"bytes after the rejection (a smuggled answer?): {after!r}"


# --- strict framing and smuggling ------------------------------------------------------------

H = b"Host: x\r\n"
TE = b"Transfer-Encoding: chunked\r\n"


def post(*fields: bytes, body: bytes = b"", version: bytes = b"HTTP/1.1") -> bytes:
    return b"POST /body " + version + b"\r\n" + b"".join(fields) + b"\r\n" + body


REJECTIONS: dict[str, tuple[bytes, int]] = {
    # Content-Length and Transfer-Encoding together (RFC 9112 6.3 item 3: a smuggling sign)
    "cl-then-te": (post(H, b"Content-Length: 5\r\n", TE, body=b"0\r\n\r\n"), 400),
    "te-then-cl": (post(H, TE, b"Content-Length: 5\r\n", body=b"0\r\n\r\n"), 400),
    "cl-and-te-not-chunked": (
        post(H, b"Content-Length: 3\r\n", b"Transfer-Encoding: gzip\r\n"),
        400,
    ),
    # Content-Length (RFC 9112 6.3 item 5)
    "cl-differing": (
        post(H, b"Content-Length: 5\r\n", b"Content-Length: 6\r\n", body=b"hello!"),
        400,
    ),
    "cl-identical-repeat": (post(H, b"Content-Length: 5\r\n" * 2, body=b"hello"), 400),
    "cl-list": (post(H, b"Content-Length: 5, 5\r\n", body=b"hello"), 400),
    "cl-plus-sign": (post(H, b"Content-Length: +5\r\n", body=b"hello"), 400),
    "cl-negative": (post(H, b"Content-Length: -5\r\n", body=b"hello"), 400),
    "cl-hex": (post(H, b"Content-Length: 0x5\r\n", body=b"hello"), 400),
    "cl-inner-space": (post(H, b"Content-Length: 1 2\r\n", body=b"hello"), 400),
    "cl-word": (post(H, b"Content-Length: five\r\n", body=b"hello"), 400),
    "cl-overflow": (post(H, b"Content-Length: 99999999999999999999999\r\n"), 400),
    # Transfer-Encoding (RFC 9112 6.1, 6.3 item 4)
    "te-in-http10": (post(TE, body=b"0\r\n\r\n", version=b"HTTP/1.0"), 400),
    "te-gzip-only": (post(H, b"Transfer-Encoding: gzip\r\n"), 400),
    "te-identity": (post(H, b"Transfer-Encoding: identity\r\n"), 400),
    "te-chunked-not-last": (post(H, b"Transfer-Encoding: chunked, gzip\r\n"), 400),
    "te-xchunked": (post(H, b"Transfer-Encoding: xchunked\r\n", body=b"0\r\n\r\n"), 400),
    "te-chunked-twice": (
        post(H, b"Transfer-Encoding: chunked, chunked\r\n", body=b"0\r\n\r\n"),
        400,
    ),
    "te-gzip-chunked": (post(H, b"Transfer-Encoding: gzip, chunked\r\n", body=b"0\r\n\r\n"), 501),
    "te-split-over-lines": (
        post(H, b"Transfer-Encoding: gzip\r\n", TE, body=b"0\r\n\r\n"),
        501,
    ),
    # chunked framing (RFC 9112 7.1)
    "chunk-size-not-hex": (post(H, TE, body=b"zz\r\nhello\r\n0\r\n\r\n"), 400),
    "chunk-size-negative": (post(H, TE, body=b"-1\r\nhello\r\n0\r\n\r\n"), 400),
    "chunk-size-trailing-space": (post(H, TE, body=b"5 \r\nhello\r\n0\r\n\r\n"), 400),
    "chunk-size-empty": (post(H, TE, body=b"\r\nhello\r\n0\r\n\r\n"), 400),
    "chunk-size-overflow": (post(H, TE, body=b"1" + b"0" * 20 + b"\r\nhello\r\n"), 400),
    "chunk-ext-nul": (post(H, TE, body=b"5;a\x00=b\r\nhello\r\n0\r\n\r\n"), 400),
    "chunk-ext-bare-lf": (post(H, TE, body=b"5;a\nb\r\nhello\r\n0\r\n\r\n"), 400),
    "chunk-data-longer-than-size": (post(H, TE, body=b"3\r\nhello\r\n0\r\n\r\n"), 400),
    "chunk-bare-lf": (post(H, TE, body=b"5\nhello\n0\n\n"), 400),
    # the head (RFC 9112 2.2, 5.1, 5.2; RFC 9110 5.5)
    "obs-fold": (b"GET / HTTP/1.1\r\nHost: x\r\nX-A: a\r\n b\r\n\r\n", 400),
    "space-before-colon": (b"GET / HTTP/1.1\r\nHost: x\r\nX-A : a\r\n\r\n", 400),
    "space-before-colon-cl": (post(H, b"Content-Length : 5\r\n", body=b"hello"), 400),
    "space-before-colon-te": (post(H, b"Transfer-Encoding : chunked\r\n", body=b"0\r\n\r\n"), 400),
    "nul-in-target": (b"GET /a\x00b HTTP/1.1\r\nHost: x\r\n\r\n", 400),
    "ctl-in-target": (b"GET /a\x01b HTTP/1.1\r\nHost: x\r\n\r\n", 400),
    "del-in-target": (b"GET /a\x7fb HTTP/1.1\r\nHost: x\r\n\r\n", 400),
    "cr-in-target": (b"GET /a\rb HTTP/1.1\r\nHost: x\r\n\r\n", 400),
    "nul-in-value": (b"GET / HTTP/1.1\r\nHost: x\r\nX-A: a\x00b\r\n\r\n", 400),
    "cr-in-value": (b"GET / HTTP/1.1\r\nHost: x\r\nX-A: a\rb\r\n\r\n", 400),
    "ctl-in-value": (b"GET / HTTP/1.1\r\nHost: x\r\nX-A: a\x01b\r\n\r\n", 400),
    "nul-in-name": (b"GET / HTTP/1.1\r\nHost: x\r\nX-\x00A: b\r\n\r\n", 400),
    "space-in-name": (b"GET / HTTP/1.1\r\nHost: x\r\nX A: b\r\n\r\n", 400),
    "header-without-colon": (b"GET / HTTP/1.1\r\nHost: x\r\nno colon\r\n\r\n", 400),
    "bare-lf-line-ends": (b"GET / HTTP/1.1\nHost: x\n\n", 400),
    "bare-cr-line-end": (b"GET / HTTP/1.1\rHost: x\r\n\r\n", 400),
    "method-not-a-token": (b"G@T / HTTP/1.1\r\nHost: x\r\n\r\n", 400),
    # a well-formed method llhttp does not parse (RFC 9110 9.1)
    "method-unknown": (b"BREW /pot HTTP/1.1\r\nHost: x\r\n\r\n", 501),
    "method-lowercase": (b"get / HTTP/1.1\r\nHost: x\r\n\r\n", 501),
    "method-with-nul": (b"GET\x00 / HTTP/1.1\r\nHost: x\r\n\r\n", 400),
    "tls-client-hello": (b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03\r\n\r\n", 400),
    # versions (RFC 9112 2.3; RFC 9110 15.6.6)
    "http09-no-version": (b"GET /\r\n\r\n", 400),
    "http09-version": (b"GET / HTTP/0.9\r\n\r\n", 400),
    "http20": (b"GET / HTTP/2.0\r\nHost: x\r\n\r\n", 505),
    # Host (RFC 9112 3.2)
    "missing-host": (b"GET / HTTP/1.1\r\n\r\n", 400),
    "repeated-host": (b"GET / HTTP/1.1\r\nHost: x\r\nHost: y\r\n\r\n", 400),
    "repeated-host-same": (b"GET / HTTP/1.1\r\nHost: x\r\nHost: x\r\n\r\n", 400),
    # Expect (RFC 9110 10.1.1)
    "expect-unknown": (post(H, b"Expect: teapot\r\n", b"Content-Length: 1\r\n", body=b"a"), 417),
}


@pytest.fixture(scope="module")
def strict_server(module_factory: ServerFactory) -> Server:
    return module_factory(settings(workers={"count": 1}))


@pytest.mark.parametrize("name", list(REJECTIONS))
def test_rejection_closes_and_never_answers_a_smuggled_request(
    strict_server: Server, name: str
) -> None:
    data, status = REJECTIONS[name]
    assert_rejected(strict_server, data, status)


ACCEPTED = {
    "get": b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
    "http10-without-host": b"GET / HTTP/1.0\r\n\r\n",
    "chunk-extension": post(H, TE, body=b"5;name=value\r\nhello\r\n0\r\n\r\n"),
    "chunk-uppercase-hex": post(H, TE, body=b"A\r\n0123456789\r\n0\r\n\r\n"),
    "chunk-trailer": post(H, TE, body=b"5\r\nhello\r\n0\r\nX-Trailer: t\r\n\r\n"),
    "cl-zero": post(H, b"Content-Length: 0\r\n"),
    "te-case-insensitive": post(H, b"Transfer-Encoding: Chunked\r\n", body=b"0\r\n\r\n"),
    "expect-100-continue": post(
        H, b"Expect: 100-continue\r\n", b"Content-Length: 1\r\n", body=b"a"
    ),
}


@pytest.mark.parametrize("name", list(ACCEPTED))
def test_valid_framing_is_served(strict_server: Server, name: str) -> None:
    """Controls for the rejections: the same server answers these, and (on a keep-alive
    connection) a pipelined second request behind them too."""
    data = ACCEPTED[name]
    keep_alive = b"HTTP/1.1\r\n" in data.split(b"\n", 1)[0] + b"\n"
    with connect(address(strict_server)) as sock:
        sock.sendall(data + SMUGGLED if keep_alive else data)
        first = read_response(sock)
        while first.status == 100:
            first = read_response(sock)
        assert first.status == 200, first
        if keep_alive:
            assert read_response(sock).status == 200


@pytest.mark.parametrize(
    "data",
    [
        b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        b"GET / HTTP/1.0\r\n\r\n",
    ],
    ids=["http11-connection-close", "http10"],
)
def test_request_that_closes_the_connection_is_answered_and_what_follows_ignored(
    strict_server: Server, data: bytes
) -> None:
    """RFC 9112 9.6: the server answers the request that carried "close" and processes no
    further request on the connection; what the client sent after it is not an error."""
    with connect(address(strict_server)) as sock:
        sock.sendall(data + SMUGGLED)
        response = read_response(sock)
        assert response.status == 200, response
        assert (response.header("Connection") or "").lower() == "close"
        assert recv_until_close(sock) == b""


# --- limits ----------------------------------------------------------------------------------

LIMITS = {
    "max_request_line": 256,
    "max_header_fields": 10,
    "max_field_size": 128,
    "max_header_size": 1024,
    "max_body_size": 100,
}


@pytest.fixture(scope="module")
def limited_server(module_factory: ServerFactory) -> Server:
    return module_factory(settings(workers={"count": 1}, http=LIMITS))


def fields(count: int, value_size: int = 1) -> list[tuple[str, str]]:
    return [(f"X-F{i:02d}", "v" * value_size) for i in range(count)]


@pytest.mark.parametrize(
    ("request_bytes", "status"),
    [
        (http_request("GET", "/" + "a" * 200), 200),
        (http_request("GET", "/" + "a" * 300), 414),
        (http_request("GET", "/?" + "q" * 5000), 414),
        (http_request("GET", "/", fields(9)), 200),  # Host + 9 = 10 fields
        (http_request("GET", "/", fields(10)), 431),  # 11 fields
        (http_request("GET", "/", fields(1, 100)), 200),
        (http_request("GET", "/", fields(1, 200)), 431),  # one field over max_field_size
        (http_request("GET", "/", [("X-" + "n" * 200, "v")]), 431),  # a long name counts too
        (http_request("GET", "/", fields(7, 110)), 200),  # under 1024 in total
        (http_request("GET", "/", fields(9, 115)), 431),  # each field fits, the head does not
        (http_request("POST", "/body", body=b"b" * 100), 200),
    ],
    ids=[
        "target-200",
        "target-300",
        "query-5000",
        "fields-10",
        "fields-11",
        "field-100",
        "field-200",
        "name-200",
        "head-under",
        "head-over",
        "body-at-limit",
    ],
)
def test_limits(limited_server: Server, request_bytes: bytes, status: int) -> None:
    if status == 200:
        with connect(address(limited_server)) as sock:
            sock.sendall(request_bytes)
            assert read_response(sock).status == 200
    else:
        assert_rejected(limited_server, request_bytes, status)


def test_413_from_content_length_comes_before_the_body_is_sent(limited_server: Server) -> None:
    with connect(address(limited_server)) as sock:
        sock.sendall(b"POST /body HTTP/1.1\r\nHost: x\r\nContent-Length: 101\r\n\r\n")
        started = time.monotonic()
        response = read_response(sock)  # no body byte was sent: the answer cannot wait for it
        assert time.monotonic() - started < 2.0
        assert response.status == 413
        assert (response.header("Connection") or "").lower() == "close"
        assert recv_until_close(sock) == b""


def test_413_while_streaming_a_chunked_body(server_factory: ServerFactory) -> None:
    record = Path(server_factory.base_dir) / "body.jsonl"
    server = server_factory(
        settings(workers={"count": 1}, http={"max_body_size": 100}),
        env={"PF_BODY_RECORD": str(record)},
    )
    with connect(address(server)) as sock:
        sock.sendall(b"POST /body HTTP/1.1\r\nHost: x\r\n" + TE + b"\r\n" + b"3c\r\n" + b"a" * 60)
        sock.sendall(b"\r\n")
        # 60 bytes are within the limit: the app is still reading, nothing is answered yet
        sock.settimeout(0.3)
        with pytest.raises(TimeoutError):
            sock.recv(1)
        sock.settimeout(5)
        sock.sendall(b"3c\r\n" + b"b" * 60 + b"\r\n")  # 120 bytes: over the limit, no last chunk
        response = read_response(sock)
        assert response.status == 413
        assert (response.header("Connection") or "").lower() == "close"
        assert recv_until_close(sock) == b""
    entries = wait_until(lambda: records(record), 5, message="the app recorded nothing")
    assert entries == [{"expected": None, "got": 0, "error": "ProtocolError"}]


# --- truncated bodies and timeouts -------------------------------------------------------------


@pytest.mark.parametrize("how", ["half-close", "close"])
@pytest.mark.parametrize("framing", ["content-length", "chunked"])
def test_truncated_body_is_never_complete(
    server_factory: ServerFactory, how: str, framing: str
) -> None:
    record = Path(server_factory.base_dir) / "body.jsonl"
    server = server_factory(settings(workers={"count": 1}), env={"PF_BODY_RECORD": str(record)})
    if framing == "content-length":
        data = b"POST /body HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\nabc"
    else:
        data = b"POST /body HTTP/1.1\r\nHost: x\r\n" + TE + b"\r\n5\r\nabc"
    with connect(address(server)) as sock:
        sock.sendall(data)
        if how == "half-close":
            sock.shutdown(socket.SHUT_WR)
            raw = recv_until_close(sock)
            assert b" 200 " not in raw, raw
    entries = wait_until(lambda: records(record), 5, message="the app recorded nothing")
    assert len(entries) == 1
    assert entries[0]["error"] is not None, f"a truncated body was read as complete: {entries}"
    assert entries[0]["got"] < 10
    assert fetch(address(server)).status == 200


def test_incomplete_head_gets_408_after_header_timeout(server_factory: ServerFactory) -> None:
    server = server_factory(settings(workers={"count": 1}, http={"header_timeout": 1}))
    with connect(address(server)) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n")
        started = time.monotonic()
        response = read_response(sock)
        elapsed = time.monotonic() - started
        assert response.status == 408
        assert (response.header("Connection") or "").lower() == "close"
        assert recv_until_close(sock) == b""
    assert 0.8 <= elapsed < 3.5, f"408 after {elapsed:.2f}s; header_timeout is 1s"


@pytest.mark.parametrize("defer", [None, 3])
def test_defer_accept_holds_silent_connections_in_the_kernel(
    server_factory: ServerFactory, defer: int | None
) -> None:
    """Default (off): a worker takes a silent connection at once and closes it after
    header_timeout. With http.defer_accept: N the kernel keeps it from the workers for N
    seconds first, so header_timeout starts only then."""
    http: dict[str, Any] = {"header_timeout": 1}
    if defer is not None:
        http["defer_accept"] = defer
    server = server_factory(settings(workers={"count": 1}, http=http))
    with connect(address(server)) as sock:
        started = time.monotonic()
        assert recv_until_close(sock, timeout=15) == b""
        elapsed = time.monotonic() - started
    if defer is None:
        assert 0.8 <= elapsed < 2.9, f"closed after {elapsed:.2f}s; header_timeout is 1s"
    else:
        # the kernel hands it over after `defer` s (rounded up to its retransmit timer)
        assert defer + 0.8 <= elapsed < defer + 8, f"closed after {elapsed:.2f}s"
    assert fetch(address(server)).status == 200


def test_header_timeout_bounds_the_whole_head_not_each_byte(server_factory: ServerFactory) -> None:
    """A client that keeps sending one byte at a time still gets 408 at header_timeout."""
    server = server_factory(settings(workers={"count": 1}, http={"header_timeout": 1}))
    head = b"GET / HTTP/1.1\r\nHost: x\r\nX-Pad: " + b"a" * 100
    with connect(address(server)) as sock:
        started = time.monotonic()
        raw = b""
        for byte in head:  # bounded: at most len(head) sends, ~0.1 s apart
            try:
                sock.sendall(bytes([byte]))
            except OSError:
                break
            sock.settimeout(0.1)
            try:
                raw = sock.recv(4096)
            except TimeoutError:
                continue
            break
        elapsed = time.monotonic() - started
    assert raw.startswith(b"HTTP/1.1 408 "), raw
    assert 0.8 <= elapsed < 3.5, f"408 after {elapsed:.2f}s; header_timeout is 1s"


def test_stalled_body_is_dropped_after_body_timeout(server_factory: ServerFactory) -> None:
    record = Path(server_factory.base_dir) / "body.jsonl"
    server = server_factory(
        settings(workers={"count": 1}, http={"body_timeout": 1, "body_min_rate": 0}),
        env={"PF_BODY_RECORD": str(record)},
    )
    with connect(address(server)) as sock:
        sock.sendall(b"POST /body HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n" + b"x" * 10)
        started = time.monotonic()
        raw = recv_until_close(sock, timeout=5)
        elapsed = time.monotonic() - started
    assert not raw or raw.startswith(b"HTTP/1.1 408 "), raw
    assert 0.8 <= elapsed < 3.5, f"dropped after {elapsed:.2f}s; body_timeout is 1s"
    entries = wait_until(lambda: records(record), 5, message="the app recorded nothing")
    assert entries[0]["error"] == "ClientTimeout", entries
    assert fetch(address(server)).status == 200


def trickle_body(
    server: Server, length: int, piece: int, interval: float, limit: float
) -> tuple[bytes, float]:
    """POST /body with a Content-Length of `length`, sending `piece` bytes every `interval`
    seconds; returns what the server answered and how long until it closed or answered."""
    with connect(address(server)) as sock:
        sock.sendall(
            b"POST /body HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: %d\r\n\r\n"
            % length
        )
        started = time.monotonic()
        sent = 0
        sock.settimeout(interval)
        while sent < length and time.monotonic() - started < limit:
            try:
                sock.sendall(b"x" * min(piece, length - sent))
            except OSError:
                break
            sent += piece
            try:
                sock.recv(1, socket.MSG_PEEK)
                break  # an answer, or the server closed
            except TimeoutError:
                continue
            except OSError:
                break
        sock.settimeout(5)
        try:
            raw = recv_until_close(sock, timeout=5)
        except AssertionError:
            raw = b"(left open)"
        return raw, time.monotonic() - started


def test_body_below_min_rate_is_dropped(server_factory: ServerFactory) -> None:
    """80 bytes/s, each piece well within body_timeout: only body_min_rate (200) drops it,
    after the body_timeout grace: 1 + 80t/200 < t once t > 1.67 s."""
    record = Path(server_factory.base_dir) / "body.jsonl"
    server = server_factory(
        settings(workers={"count": 1}, http={"body_timeout": 1, "body_min_rate": 200}),
        env={"PF_BODY_RECORD": str(record)},
    )
    raw, elapsed = trickle_body(server, 10_000, 20, 0.25, limit=6)
    assert b" 200 " not in raw, raw
    assert 1.3 <= elapsed < 4.0, f"dropped after {elapsed:.2f}s; expected about 1.7s"
    entries = wait_until(lambda: records(record), 5, message="the app recorded nothing")
    assert entries[0]["error"] == "ClientTimeout", entries
    assert fetch(address(server)).status == 200


def test_slow_body_without_min_rate_is_served(server_factory: ServerFactory) -> None:
    """Control: the same pieces with no minimum rate arrive in full over 2.5 s."""
    server = server_factory(
        settings(workers={"count": 1}, http={"body_timeout": 1, "body_min_rate": 0})
    )
    raw, _ = trickle_body(server, 200, 20, 0.25, limit=6)
    assert raw.startswith(b"HTTP/1.1 200 ") and raw.endswith(b"\r\n\r\n200"), raw


def test_a_body_past_workers_timeout_costs_its_connection_not_the_worker(
    server_factory: ServerFactory,
) -> None:
    """Defect: a body trickling within the limits kept its request past workers.timeout,
    and the master killed the worker as hung, with every connection it held. Now the
    request is cut a second before (2 s here) and only its connection closes."""
    record = Path(server_factory.base_dir) / "body.jsonl"
    server = server_factory(
        settings(workers={"count": 1, "timeout": 3}, http={"body_timeout": 2, "body_min_rate": 0}),
        env={"PF_BODY_RECORD": str(record)},
    )
    (worker,) = server.worker_pids()
    with connect(address(server)) as held:
        held.sendall(http_request("GET", "/"))
        assert read_response(held).status == 200

        raw, elapsed = trickle_body(server, 10_000, 20, 0.25, limit=8)

        assert b" 200 " not in raw, raw
        assert 1.5 <= elapsed < 3.0, f"cut after {elapsed:.2f}s; expected about 2s"
        server.wait_for_log(
            re.compile(r"closing the connection of POST /body from \S+ after 2s: waiting on "
                       r"the client would have kept the request past workers.timeout; the "
                       r"worker goes on"),
            timeout=5,
        )
        entries = wait_until(lambda: records(record), 5, message="the app recorded nothing")
        assert entries[0]["error"] == "RequestTooLong", entries
        assert server.worker_pids() == [worker]
        assert "timed out after" not in server.log()
        held.sendall(http_request("GET", "/"))  # the worker's other connections live on
        assert read_response(held).status == 200


# --- slow clients cost descriptors, not workers -------------------------------------------------


def raise_nofile(wanted: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
        if target < wanted:
            pytest.skip(f"RLIMIT_NOFILE hard limit {hard} is below {wanted}")
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))


class Tricklers:
    """`count` connections that each send one more byte of a request head every `interval`
    seconds from a background thread, until the server answers or closes (then they close,
    as a client does after a 408), or until `limit` seconds have passed."""

    def __init__(self, where: Address, count: int, interval: float, limit: float) -> None:
        self.head = b"GET /slow HTTP/1.1\r\nHost: x\r\nX-Pad: " + b"a" * 200
        self.interval = interval
        self.limit = limit
        self.selector = selectors.DefaultSelector()
        self.socks: list[socket.socket] = []
        self.first_byte: dict[int, float] = {}
        self.outcome: dict[int, tuple[str, float]] = {}  # index -> (first bytes | "closed", when)
        for _ in range(count):
            sock = connect(where, 5)
            sock.setblocking(False)
            self.selector.register(sock, selectors.EVENT_READ, len(self.socks))
            self.socks.append(sock)
        self.thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> None:
        self.thread.start()

    def _finish(self, index: int, what: str) -> None:
        sock = self.socks[index]
        self.outcome[index] = (what, time.monotonic())
        self.selector.unregister(sock)
        sock.close()

    def _run(self) -> None:
        started = time.monotonic()
        position = 0
        next_tick = started
        while len(self.outcome) < len(self.socks) and time.monotonic() - started < self.limit:
            now = time.monotonic()
            if now >= next_tick and position < len(self.head):
                byte = self.head[position : position + 1]
                for index, sock in enumerate(self.socks):
                    if index in self.outcome:
                        continue
                    try:
                        sock.send(byte)
                    except BlockingIOError:
                        continue
                    except OSError:
                        self._finish(index, "closed")
                        continue
                    self.first_byte.setdefault(index, time.monotonic())
                position += 1
                next_tick += self.interval
            for key, _ in self.selector.select(timeout=max(0.0, next_tick - time.monotonic())):
                index = key.data
                try:
                    data = self.socks[index].recv(4096)
                except BlockingIOError:
                    continue
                except OSError:
                    data = b""
                self._finish(index, data[:12].decode("latin-1") if data else "closed")

    def join(self, timeout: float) -> None:
        self.thread.join(timeout)

    def close(self) -> None:
        for index, sock in enumerate(self.socks):
            if index not in self.outcome:
                sock.close()
        self.selector.close()


@pytest.mark.slow
def test_many_slow_heads_do_not_hold_workers(server_factory: ServerFactory) -> None:
    """The slowloris case: 500 connections trickle a request head one byte every 0.5 s into
    2 workers. A normal client is still served in under a second, again and again; at
    header_timeout every trickler gets 408 (or is closed), and the server serves on."""
    count, header_timeout = 500, 5.0
    raise_nofile(4 * count)
    server = server_factory(settings(workers={"count": 2}, http={"header_timeout": header_timeout}))
    where = address(server)
    tricklers = Tricklers(where, count, interval=0.5, limit=header_timeout + 9)
    try:
        tricklers.start()
        wait_until(lambda: len(tricklers.first_byte) == count, 3, message="first bytes not sent")
        started = time.monotonic()
        latencies = []
        for attempt in range(5):  # every 0.8 s, all well before header_timeout
            time.sleep(max(0.0, started + 0.8 * attempt - time.monotonic()))  # pacing only
            before = time.monotonic()
            response = fetch(where, timeout=5)
            latencies.append(time.monotonic() - before)
            assert response.status == 200
        assert max(latencies) < 1.0, f"a normal client waited: {latencies}"
        assert not tricklers.outcome, f"closed before header_timeout: {tricklers.outcome}"

        tricklers.join(header_timeout + 9)
        assert not tricklers.thread.is_alive(), (
            f"{count - len(tricklers.outcome)} trickling connections still open"
        )
        outcomes = {what for what, _ in tricklers.outcome.values()}
        assert outcomes <= {"HTTP/1.1 408", "closed"}, outcomes
        waited = [when - tricklers.first_byte[i] for i, (_, when) in tricklers.outcome.items()]
        assert min(waited) >= header_timeout - 0.3, f"closed early: {min(waited):.2f}s"
        assert max(waited) < header_timeout + 4, f"closed late: {max(waited):.2f}s"
    finally:
        tricklers.close()
    for _ in range(3):
        before = time.monotonic()
        assert fetch(where, timeout=5).status == 200
        assert time.monotonic() - before < 1.0


@pytest.mark.parametrize("kind", ["bad-request", "head-timeout"])
def test_rejected_clients_holding_their_connection_do_not_stall_the_worker(
    server_factory: ServerFactory, kind: str
) -> None:
    server = server_factory(settings(workers={"count": 1}, http={"header_timeout": 1}))
    where = address(server)
    held = []
    try:
        for _ in range(4):
            sock = connect(where)
            sock.sendall(b"BAD\r\n\r\n" if kind == "bad-request" else b"GET / HTTP/1.1\r\n")
            held.append(sock)  # never read, never closed (until the end of the test)
        latencies = []
        deadline = time.monotonic() + 4
        while time.monotonic() < deadline:  # bounded: 4 s of sequential requests
            before = time.monotonic()
            assert fetch(where, timeout=10).status == 200
            latencies.append(time.monotonic() - before)
            time.sleep(0.05)
        assert max(latencies) < 0.5, f"slowest normal request: {max(latencies):.2f}s"
    finally:
        for sock in held:
            sock.close()


# --- trusted proxies ---------------------------------------------------------------------------


def get_environ(where: Address, headers: list[tuple[str, str]]) -> dict[str, Any]:
    return environ_of(fetch(where, "GET", "/environ", headers))


def test_x_forwarded_from_a_trusted_peer_sets_client_and_scheme(
    server_factory: ServerFactory,
) -> None:
    server = server_factory(settings(workers={"count": 1}))  # default: 127.0.0.1 is trusted
    where = address(server)
    env = get_environ(where, [("X-Forwarded-For", "203.0.113.7"), ("X-Forwarded-Proto", "https")])
    assert (env["REMOTE_ADDR"], env["REMOTE_PORT"], env["wsgi.url_scheme"]) == (
        "203.0.113.7",
        None,
        "https",
    )
    # the client's own X-Forwarded-For, with the proxy's appended entry on the right
    env = get_environ(where, [("X-Forwarded-For", "6.6.6.6, 203.0.113.7")])
    assert env["REMOTE_ADDR"] == "203.0.113.7"
    # two fields are one list (RFC 9110 5.3): the right-most entry still wins
    env = get_environ(where, [("X-Forwarded-For", "6.6.6.6"), ("X-Forwarded-For", "203.0.113.8")])
    assert env["headers"]["HTTP_X_FORWARDED_FOR"] == "6.6.6.6, 203.0.113.8"
    assert env["REMOTE_ADDR"] == "203.0.113.8"
    # the default reads X-Forwarded-*: a Forwarded header is the client's, passed through
    env = get_environ(where, [("Forwarded", 'for="[2001:db8::1]:4711";proto=https')])
    assert (env["REMOTE_ADDR"], env["wsgi.url_scheme"]) == ("127.0.0.1", "http")
    env = get_environ(where, [("X-Forwarded-Proto", "javascript")])
    assert (env["REMOTE_ADDR"], env["wsgi.url_scheme"]) == ("127.0.0.1", "http")


def test_header_names_with_underscores_are_dropped(server_factory: ServerFactory) -> None:
    """X_Forwarded_For would map to the same environ key as X-Forwarded-For."""
    server = server_factory(settings(workers={"count": 1}))
    env = get_environ(address(server), [("X_Forwarded_For", "6.6.6.6"), ("X-Plain", "1")])
    assert env["REMOTE_ADDR"] == "127.0.0.1"
    assert "HTTP_X_FORWARDED_FOR" not in env["headers"]
    assert env["headers"]["HTTP_X_PLAIN"] == "1"


def test_forwarding_headers_are_ignored_from_untrusted_peers(
    server_factory: ServerFactory,
) -> None:
    server = server_factory(settings(workers={"count": 1}, http={"forwarded_allow_ips": []}))
    env = get_environ(
        address(server),
        [
            ("X-Forwarded-For", "203.0.113.7"),
            ("X-Forwarded-Proto", "https"),
            ("Forwarded", "for=198.51.100.1;proto=https"),
        ],
    )
    assert env["REMOTE_ADDR"] == "127.0.0.1"
    assert env["REMOTE_PORT"] is not None and int(env["REMOTE_PORT"]) > 0
    assert env["wsgi.url_scheme"] == "http"
    assert env["headers"]["HTTP_X_FORWARDED_FOR"] == "203.0.113.7"  # still visible as a header


# --- PROXY protocol --------------------------------------------------------------------------

PROXY_V1 = b"PROXY TCP4 1.2.3.4 5.6.7.8 1111 2222\r\n"
PROXY_V2 = (
    V2_SIGNATURE
    + b"\x21\x11\x00\x0c"
    + socket.inet_aton("1.2.3.4")
    + socket.inet_aton("5.6.7.8")
    + struct.pack("!HH", 1111, 2222)
)
ENVIRON_REQUEST = b"GET /environ HTTP/1.1\r\nHost: x\r\n\r\n"


@pytest.fixture(scope="module")
def proxy_servers(module_factory: ServerFactory) -> dict[str, Server]:
    """One server per proxy_protocol mode, plus one with the mode on but nobody trusted."""
    servers = {
        mode: module_factory(settings(workers={"count": 1}, http={"proxy_protocol": mode}))
        for mode in ("v1", "v2", "auto")
    }
    servers["untrusted"] = module_factory(
        settings(
            workers={"count": 1}, http={"proxy_protocol": "v1", "forwarded_allow_ips": ["10.9.9.9"]}
        )
    )
    return servers


def exchange(server: Server, pieces: list[bytes], *, requests: int = 1) -> list[Response]:
    """Send `pieces` (20 ms apart) and read `requests` responses on one connection."""
    with connect(address(server)) as sock:
        for piece in pieces:
            sock.sendall(piece)
            time.sleep(0.02)
        return [read_response(sock) for _ in range(requests)]


@pytest.mark.parametrize(
    ("mode", "header"),
    [("v1", PROXY_V1), ("v2", PROXY_V2), ("auto", PROXY_V1), ("auto", PROXY_V2)],
)
def test_proxy_header_sets_client_address(
    proxy_servers: dict[str, Server], mode: str, header: bytes
) -> None:
    server = proxy_servers[mode]
    for pieces in (
        [header + ENVIRON_REQUEST],
        [header[:5], header[5:9], header[9:] + ENVIRON_REQUEST[:7], ENVIRON_REQUEST[7:]],
    ):
        # keep-alive: the second request on the connection keeps the PROXY address
        first, second = exchange(server, [*pieces, ENVIRON_REQUEST], requests=2)
        for response in (first, second):
            env = environ_of(response)
            assert (env["REMOTE_ADDR"], env["REMOTE_PORT"]) == ("1.2.3.4", "1111")


def test_auto_serves_plain_http(proxy_servers: dict[str, Server]) -> None:
    (response,) = exchange(proxy_servers["auto"], [ENVIRON_REQUEST])
    assert environ_of(response)["REMOTE_ADDR"] == "127.0.0.1"


def test_auto_serves_plain_http_after_an_empty_line(
    proxy_servers: dict[str, Server], strict_server: Server
) -> None:
    """RFC 9112 2.2: a server SHOULD ignore at least one empty line before the request line.
    With no PROXY header, auto mode must treat the request exactly as plain HTTP."""
    data = b"\r\nGET /environ HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    assert send_raw(address(strict_server), data).startswith(b"HTTP/1.1 200 ")
    assert send_raw(address(proxy_servers["auto"]), data).startswith(b"HTTP/1.1 200 ")


@pytest.mark.parametrize(
    ("mode", "data"),
    [
        ("v1", b"PROXY TCP4 1.2.3.4 5.6.7.8 1111\r\n" + ENVIRON_REQUEST),
        ("v1", b"PROXY TCP4 1.2.3.4 5.6.7.8 99999 2222\r\n" + ENVIRON_REQUEST),
        ("v1", ENVIRON_REQUEST),  # a header is required in v1 mode
        ("v1", PROXY_V2 + ENVIRON_REQUEST),
        ("v2", PROXY_V1 + ENVIRON_REQUEST),
        ("v2", PROXY_V2[:12] + b"\x21\x11\xff\xff" + ENVIRON_REQUEST),
        ("auto", b"PROXY TCP9 1.2.3.4 5.6.7.8 1 2\r\n" + ENVIRON_REQUEST),
        ("auto", b"PROXY " + b"x" * 200),
    ],
    ids=[
        "v1-missing-field",
        "v1-bad-port",
        "v1-plain-http",
        "v1-got-v2",
        "v2-got-v1",
        "v2-too-long",
        "auto-bad-family",
        "auto-v1-too-long",
    ],
)
def test_malformed_proxy_header_closes_without_http(
    proxy_servers: dict[str, Server], mode: str, data: bytes
) -> None:
    assert send_raw(address(proxy_servers[mode]), data) == b""


def test_proxy_header_from_an_untrusted_peer_is_a_bad_request(
    proxy_servers: dict[str, Server],
) -> None:
    server = proxy_servers["untrusted"]
    assert_rejected(server, PROXY_V1 + ENVIRON_REQUEST, 400)
    env = environ_of(fetch(address(server), "GET", "/environ"))  # plain HTTP is fine
    assert env["REMOTE_ADDR"] == "127.0.0.1"


# --- JSON access log ---------------------------------------------------------------------------

JSON_FIELDS = {
    "time",
    "remote",
    "method",
    "target",
    "protocol",
    "status",
    "bytes",
    "referer",
    "user_agent",
    "duration_us",
    "worker",
    "pid",
}


def test_json_access_log(server_factory: ServerFactory) -> None:
    server = server_factory(
        settings(logging={"access_log": "access.log", "access_log_format": "json"})
    )
    where = address(server)
    log_path = server.workdir / "access.log"
    agent = 'pf "quoted" \\back\\slash\ttab é ü 日本'.encode()
    referer = b'http://r.test/?a="b"\\c'
    raw = (
        b"GET /environ?q=1 HTTP/1.1\r\nHost: x\r\nUser-Agent: "
        + agent
        + b"\r\nReferer: "
        + referer
        + b"\r\n\r\n"
    )
    with connect(where) as sock:
        sock.sendall(raw)
        first = read_response(sock)
    assert first.status == 200
    second = fetch(where, "POST", "/body", [("X-Forwarded-For", "203.0.113.7")], body=b"12345")
    assert second.status == 200
    assert send_raw(where, b"BAD\r\n\r\n").startswith(b"HTTP/1.1 400 ")

    wait_until(lambda: len(log_lines(log_path)) >= 3, 5, message="fewer than 3 access log lines")
    lines = log_lines(log_path)
    assert len(lines) == 3, lines
    entries = [json.loads(line) for line in lines]
    for entry in entries:
        assert set(entry) == JSON_FIELDS, entry
        # ISO 8601, milliseconds and UTC offset: 2026-11-21T13:05:02.123+00:00
        assert re.fullmatch(
            r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{3}[+-]\d{2}:\d{2}", entry["time"]
        ), entry["time"]
        assert isinstance(entry["duration_us"], int) and entry["duration_us"] >= 0
        assert isinstance(entry["bytes"], int) and isinstance(entry["status"], int)
        assert entry["pid"] in server.worker_pids()
        assert isinstance(entry["worker"], int) and entry["worker"] >= 1
    get = next(entry for entry in entries if entry["method"] == "GET")
    post_ = next(entry for entry in entries if entry["method"] == "POST")
    bad = next(entry for entry in entries if entry["status"] == 400)
    assert get["method"] == "GET" and get["target"] == "/environ?q=1"
    assert get["protocol"] == "HTTP/1.1" and get["status"] == 200
    assert get["bytes"] == len(first.body)
    assert get["remote"] == "127.0.0.1"
    # header bytes arrive as latin-1 text (PEP 3333); the log keeps them byte for byte
    assert get["user_agent"].encode("latin-1") == agent
    assert get["referer"].encode("latin-1") == referer
    assert post_["method"] == "POST" and post_["target"] == "/body"
    assert post_["remote"] == "203.0.113.7", "remote is the resolved client"
    assert post_["bytes"] == len(second.body) and post_["user_agent"] == ""
    assert bad["status"] == 400 and bad["remote"] == "127.0.0.1"
