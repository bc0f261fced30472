"""The WSGI adapter over a real socketpair: response framing, start_response rules, the
iterable's close(), wsgi.input, 100-continue, and the environ HttpProtocol builds."""

from __future__ import annotations

import io
import os
import socket
import sys
import tempfile
import threading
import types
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any
from wsgiref.validate import validator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from prefork.addresses import Address
from prefork.connection import ClientDisconnected, ClientTimeout, Connection
from prefork.http import Limits, ProtocolError, Request
from prefork.http.response import CONTINUE_100, chunk
from prefork.httpserve import HttpProtocol
from prefork.logs import Logs
from prefork.scoreboard import Activity, Scoreboard
from prefork.wsgi import (
    HEAD_CACHE_SIZE,
    FileWrapper,
    HeadCache,
    Input,
    Response,
    environ_key,
    error_status,
    run_app,
)

SERVER_LINE = b"Server: test\r\n"
DATE_LINE = b"Date: Tue, 14 Nov 2023 22:13:20 GMT\r\n"
TIMEOUT = 5.0


# ---------------------------------------------------------------------------------------
# a client on the other end of a socketpair


class Client:
    """`conn` is the server side (what the code under test gets); `peer` is the client."""

    def __init__(self, limits: Limits | None = None) -> None:
        self.limits = limits or Limits()
        self._open()

    def _open(self) -> None:
        self.server, self.peer = socket.socketpair()
        self.peer.settimeout(TIMEOUT)
        self.conn = Connection(
            self.server, peer=("127.0.0.1", 1234), listener=None, limits=self.limits
        )

    def request(self, raw: bytes) -> Request:
        """Feed `raw` (a head, perhaps with some body) to the server's parser; the request."""
        self.conn.parser.feed(raw)
        return self.conn.parser.requests.popleft()

    def pending(self) -> bytes:
        """Everything the server has sent so far (sends are complete when they return)."""
        out = b""
        self.peer.setblocking(False)  # with a timeout set, recv would wait for data first
        try:
            while True:
                try:
                    data = self.peer.recv(1 << 20)
                except BlockingIOError:
                    return out
                if not data:
                    return out
                out += data
        finally:
            self.peer.settimeout(TIMEOUT)

    def close(self) -> None:
        self.server.close()
        self.peer.close()

    def reconnect(self) -> None:
        """A fresh connection, after a response that closed the previous one."""
        self.close()
        self._open()


@pytest.fixture
def client() -> Iterator[Client]:
    c = Client()
    yield c
    c.close()


def make_response(
    client: Client, request: Request, heads: HeadCache | None = None
) -> Response:
    return Response(
        client.conn, request, request.keep_alive, TIMEOUT, SERVER_LINE, DATE_LINE, None, heads
    )


def serve(
    client: Client, app: Any, raw: bytes, heads: HeadCache | None = None
) -> tuple[Response, bytes]:
    """run_app for the request in `raw`; the Response and the bytes the client received.
    `heads`: the worker's cache of checked start_response arguments, if any."""
    request = client.request(raw)
    response = make_response(client, request, heads)
    environ = {
        "REQUEST_METHOD": request.method,
        "wsgi.input": Input(client.conn, request, TIMEOUT),
    }
    run_app(app, environ, response)
    return response, client.pending()


def get(version: bytes = b"1.1", method: bytes = b"GET", *fields: bytes) -> bytes:
    lines = [method + b" /x HTTP/" + version]
    if version == b"1.1":
        lines.append(b"Host: test")
    lines.extend(fields)
    return b"\r\n".join(lines) + b"\r\n\r\n"


@dataclass
class Parsed:
    status: bytes
    headers: list[tuple[bytes, bytes]]
    body: bytes
    rest: bytes  # bytes after the framed body

    def values(self, name: bytes) -> list[bytes]:
        return [v for k, v in self.headers if k.lower() == name]

    def value(self, name: bytes) -> bytes | None:
        found = self.values(name)
        assert len(found) <= 1, f"{name!r} sent {len(found)} times"
        return found[0] if found else None


def dechunk(data: bytes) -> tuple[bytes, bytes]:
    """Strictly decode a chunked body: (body, bytes after the last chunk)."""
    body = b""
    while True:
        size_line, sep, data = data.partition(b"\r\n")
        assert sep, "unterminated chunk size line"
        size = int(size_line, 16)
        assert size_line == b"%x" % size, f"non-canonical chunk size {size_line!r}"
        if size == 0:
            assert data.startswith(b"\r\n"), "missing CRLF after last chunk"
            return body, data[2:]
        assert data[size : size + 2] == b"\r\n", "chunk data not followed by CRLF"
        body += data[:size]
        data = data[size + 2 :]


def parse_response(data: bytes, no_body: bool = False) -> Parsed:
    head, sep, rest = data.partition(b"\r\n\r\n")
    assert sep, f"no end of head in {data!r}"
    status_line, *lines = head.split(b"\r\n")
    assert status_line.startswith(b"HTTP/1.1 ")
    headers = []
    for line in lines:
        name, colon, value = line.partition(b": ")
        assert colon and name and b" " not in name, line
        headers.append((name, value))
    parsed = Parsed(status_line[9:], headers, b"", rest)
    te = parsed.value(b"transfer-encoding")
    cl = parsed.value(b"content-length")
    assert te is None or cl is None, "both Content-Length and Transfer-Encoding"
    if no_body:
        return parsed
    if te is not None:
        assert te == b"chunked"
        parsed.body, parsed.rest = dechunk(rest)
    elif cl is not None:
        parsed.body, parsed.rest = rest[: int(cl)], rest[int(cl) :]
    else:
        parsed.body, parsed.rest = rest, b""  # close-delimited
    return parsed


def simple_app(
    body: Iterable[bytes],
    status: str = "200 OK",
    headers: list[tuple[str, str]] | None = None,
) -> Callable[..., Iterable[bytes]]:
    def app(environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
        start_response(status, headers if headers is not None else [("Content-Type", "text/plain")])
        return body

    return app


def gen(*items: bytes) -> Iterator[bytes]:
    yield from items


@pytest.fixture
def send_calls(monkeypatch: pytest.MonkeyPatch) -> list[bytes]:
    """Record every Connection.send (the class has __slots__, so patch the class)."""
    calls: list[bytes] = []
    original = Connection.send

    def recording(self: Connection, data: Any, timeout: float) -> None:
        calls.append(bytes(data))
        original(self, data, timeout)

    monkeypatch.setattr(Connection, "send", recording)
    return calls


# ---------------------------------------------------------------------------------------
# framing


def test_single_element_list_is_one_send_with_content_length(
    client: Client, send_calls: list[bytes]
) -> None:
    response, raw = serve(client, simple_app([b"hello"]), get())
    assert raw == (
        b"HTTP/1.1 200 OK\r\n"
        b"Content-Type: text/plain\r\n" + SERVER_LINE + DATE_LINE + b"Content-Length: 5\r\n"
        b"\r\n"
        b"hello"
    )
    assert send_calls == [raw]
    assert response.keep_alive
    assert response.bytes_sent == 5
    assert response.status_code == 200


def test_list_of_several_is_joined_into_one_send(client: Client, send_calls: list[bytes]) -> None:
    response, raw = serve(client, simple_app([b"ab", b"", b"cde"]), get())
    parsed = parse_response(raw)
    assert parsed.value(b"content-length") == b"5"
    assert parsed.body == b"abcde" and parsed.rest == b""
    assert len(send_calls) == 1
    assert response.keep_alive


def test_empty_list_is_content_length_zero(client: Client) -> None:
    response, raw = serve(client, simple_app([]), get())
    parsed = parse_response(raw)
    assert parsed.value(b"content-length") == b"0"
    assert parsed.body == b"" and parsed.rest == b""
    assert response.keep_alive


def test_tuple_body(client: Client) -> None:
    _, raw = serve(client, simple_app((b"a", b"b")), get())
    assert parse_response(raw).body == b"ab"


def test_generator_on_http11_is_chunked(client: Client) -> None:
    response, raw = serve(client, simple_app(gen(b"hello", b"", b" ", b"world")), get())
    parsed = parse_response(raw)
    assert parsed.value(b"transfer-encoding") == b"chunked"
    assert parsed.value(b"content-length") is None
    assert parsed.value(b"connection") is None
    assert parsed.body == b"hello world"
    assert parsed.rest == b""
    # an empty item must not become a zero-size chunk (that would end the body early)
    assert raw.endswith(chunk(b"world") + b"0\r\n\r\n")
    assert raw.count(b"0\r\n\r\n") == 1
    assert response.chunked and response.keep_alive
    assert response.bytes_sent == 11


def test_empty_generator_is_content_length_zero(client: Client) -> None:
    response, raw = serve(client, simple_app(gen()), get())
    parsed = parse_response(raw)
    assert parsed.value(b"content-length") == b"0"
    assert parsed.value(b"transfer-encoding") is None
    assert response.keep_alive


def test_generator_on_http10_is_close_delimited(client: Client) -> None:
    response, raw = serve(client, simple_app(gen(b"hello", b" world")), get(b"1.0"))
    parsed = parse_response(raw)
    assert parsed.value(b"transfer-encoding") is None
    assert parsed.value(b"content-length") is None
    assert parsed.value(b"connection") == b"close"
    assert parsed.body == b"hello world"
    assert not response.keep_alive


def test_generator_on_http10_keep_alive_request_still_closes(client: Client) -> None:
    response, raw = serve(
        client, simple_app(gen(b"x")), get(b"1.0", b"GET", b"Connection: keep-alive")
    )
    assert parse_response(raw).value(b"connection") == b"close"
    assert not response.keep_alive


def test_http10_keep_alive_with_known_length(client: Client) -> None:
    response, raw = serve(
        client, simple_app([b"x"]), get(b"1.0", b"GET", b"Connection: keep-alive")
    )
    parsed = parse_response(raw)
    assert parsed.value(b"connection") == b"keep-alive"
    assert parsed.value(b"content-length") == b"1"
    assert response.keep_alive


def test_http10_without_keep_alive_says_close(client: Client) -> None:
    response, raw = serve(client, simple_app([b"x"]), get(b"1.0"))
    assert parse_response(raw).value(b"connection") == b"close"
    assert not response.keep_alive


def test_http11_connection_close_request(client: Client) -> None:
    response, raw = serve(client, simple_app([b"x"]), get(b"1.1", b"GET", b"Connection: close"))
    assert parse_response(raw).value(b"connection") == b"close"
    assert not response.keep_alive


def test_generator_with_exact_content_length_is_not_chunked(client: Client) -> None:
    app = simple_app(gen(b"abc", b"de"), headers=[("Content-Length", "5")])
    response, raw = serve(client, app, get())
    parsed = parse_response(raw)
    assert parsed.value(b"transfer-encoding") is None
    assert parsed.body == b"abcde" and parsed.rest == b""
    assert response.keep_alive


def test_lazy_start_response_inside_generator(client: Client) -> None:
    def app(environ: dict[str, Any], start_response: Any) -> Iterator[bytes]:
        start_response("201 Created", [("Location", "/new")])
        yield b"made"

    response, raw = serve(client, app, get())
    parsed = parse_response(raw)
    assert parsed.status == b"201 Created"
    assert parsed.value(b"location") == b"/new"
    assert parsed.body == b"made"
    assert response.status_code == 201


@pytest.mark.parametrize(
    "body", [[b"hello"], [b"hel", b"lo"], gen(b"hel", b"lo")], ids=["list", "list2", "gen"]
)
def test_head_sends_no_body_but_get_headers(client: Client, body: Iterable[bytes]) -> None:
    for_get = Client()
    try:
        _, get_raw = serve(for_get, simple_app([b"hello"]), get())
    finally:
        for_get.close()
    response, raw = serve(client, simple_app(body), get(b"1.1", b"HEAD"))
    assert raw.endswith(b"\r\n\r\n")
    parsed = parse_response(raw, no_body=True)
    assert parsed.rest == b""
    if not isinstance(body, Iterator):
        assert raw == get_raw[: -len(b"hello")]  # same head as for GET
    else:
        # RFC 9110 9.3.2: fields known only while generating content may be left out
        assert parsed.value(b"transfer-encoding") is None
    assert response.keep_alive
    assert response.bytes_sent == 0


def test_head_keeps_app_content_length(client: Client) -> None:
    app = simple_app([], headers=[("Content-Length", "1234")])
    response, raw = serve(client, app, get(b"1.1", b"HEAD"))
    parsed = parse_response(raw, no_body=True)
    assert parsed.value(b"content-length") == b"1234"
    assert parsed.rest == b""
    assert response.keep_alive  # no body owed for HEAD


@pytest.mark.parametrize("status", ["204 No Content", "304 Not Modified"])
@pytest.mark.parametrize("kind", ["list", "gen"])
def test_no_body_statuses(client: Client, status: str, kind: str) -> None:
    body: Iterable[bytes] = [b"ignored"] if kind == "list" else gen(b"ignored", b"too")
    response, raw = serve(client, simple_app(body, status=status, headers=[]), get())
    parsed = parse_response(raw, no_body=True)
    assert parsed.status == status.encode()
    assert parsed.value(b"content-length") is None
    assert parsed.value(b"transfer-encoding") is None
    assert parsed.rest == b""
    assert not response.chunked
    assert response.keep_alive


def test_304_keeps_app_content_length(client: Client) -> None:
    app = simple_app([], status="304 Not Modified", headers=[("Content-Length", "99")])
    response, raw = serve(client, app, get())
    parsed = parse_response(raw, no_body=True)
    assert parsed.value(b"content-length") == b"99"
    assert parsed.rest == b""
    assert response.keep_alive


@pytest.mark.parametrize(
    "body",
    [[b"hello world"], [b"hel", b"lo world"], gen(b"hel", b"lo", b" world")],
    ids=["list", "list2", "gen"],
)
def test_declared_length_shorter_than_body_is_truncated(
    client: Client, body: Iterable[bytes]
) -> None:
    app = simple_app(body, headers=[("Content-Length", "4")])
    response, raw = serve(client, app, get())
    parsed = parse_response(raw)
    assert parsed.value(b"content-length") == b"4"
    assert parsed.body == b"hell"
    assert parsed.rest == b""  # never a byte past the declared length
    assert response.bytes_sent == 4
    assert not response.keep_alive


@pytest.mark.parametrize(
    "body", [[b"hello"], [b"he", b"llo"], gen(b"he", b"llo")], ids=["list", "list2", "gen"]
)
def test_declared_length_longer_than_body_closes(client: Client, body: Iterable[bytes]) -> None:
    app = simple_app(body, headers=[("Content-Length", "10")])
    response, raw = serve(client, app, get())
    parsed = parse_response(raw)
    assert parsed.value(b"content-length") == b"10"
    assert parsed.body == b"hello"  # short: the client sees the close
    assert response.bytes_sent == 5
    assert not response.keep_alive


def test_write_callable(client: Client) -> None:
    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        write = start_response("200 OK", [])
        write(b"one ")
        write(bytearray(b"two "))
        write(memoryview(b"three "))
        write(b"")
        return [b"four"]

    response, raw = serve(client, app, get())
    parsed = parse_response(raw)
    assert parsed.value(b"transfer-encoding") == b"chunked"
    assert parsed.body == b"one two three four"
    assert parsed.rest == b""
    assert response.keep_alive


def test_write_callable_then_empty_list(client: Client) -> None:
    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        start_response("200 OK", [("Content-Length", "3")])(b"abc")
        return []

    response, raw = serve(client, app, get())
    parsed = parse_response(raw)
    assert parsed.body == b"abc" and parsed.rest == b""
    assert response.keep_alive


def test_write_str_is_type_error(client: Client) -> None:
    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        start_response("200 OK", [])("text")
        return []

    with pytest.raises(TypeError):
        serve(client, app, get())
    assert client.pending() == b""


# ---------------------------------------------------------------------------------------
# start_response rules (PEP 3333)


def test_start_response_twice_without_exc_info(client: Client) -> None:
    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        start_response("200 OK", [])
        start_response("500 Internal Server Error", [])
        return [b""]

    with pytest.raises(AssertionError):
        serve(client, app, get())
    assert client.pending() == b""


def test_exc_info_before_headers_sent_replaces_status_and_headers(client: Client) -> None:
    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        start_response("200 OK", [("X-First", "1")])
        try:
            raise RuntimeError("boom")
        except RuntimeError:
            start_response("500 Internal Server Error", [("X-Second", "2")], sys.exc_info())
        return [b"failed"]

    response, raw = serve(client, app, get())
    parsed = parse_response(raw)
    assert parsed.status == b"500 Internal Server Error"
    assert parsed.value(b"x-first") is None
    assert parsed.value(b"x-second") == b"2"
    assert parsed.body == b"failed"
    assert response.status_code == 500


def test_exc_info_after_headers_sent_reraises(client: Client) -> None:
    original = RuntimeError("late failure")
    calls: list[str] = []

    def app(environ: dict[str, Any], start_response: Any) -> Iterator[bytes]:
        start_response("200 OK", [])
        yield b"partial"
        try:
            raise original
        except RuntimeError:
            calls.append("second start_response")
            start_response("500 Internal Server Error", [], sys.exc_info())
            calls.append("not reached")
        yield b"never"

    with pytest.raises(RuntimeError) as exc:
        serve(client, app, get())
    assert exc.value is original
    assert calls == ["second start_response"]
    raw = client.pending()
    parsed_head = raw.split(b"\r\n\r\n", 1)[0]
    assert parsed_head.startswith(b"HTTP/1.1 200 OK")
    assert b"never" not in raw


def test_exc_info_after_write_reraises(client: Client) -> None:
    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        start_response("200 OK", [])(b"sent")
        try:
            raise KeyError("k")
        except KeyError:
            start_response("500 Internal Server Error", [], sys.exc_info())
        return [b"never"]

    with pytest.raises(KeyError):
        serve(client, app, get())


@pytest.mark.parametrize(
    "headers",
    [
        [("X-Bad", "a\r\nInjected: yes")],
        [("X-Bad", "a\nb")],
        [("X-Bad", "a\rb")],
        [("X-Bad", "a\0b")],
        [("X Bad", "v")],
        [("X-Bad:", "v")],
        [("", "v")],
        [("X-Bad\r\n", "v")],
        [("Content-Length", "12a")],
        [("Content-Length", "-1")],
    ],
)
def test_invalid_headers_are_value_errors(client: Client, headers: list[tuple[str, str]]) -> None:
    with pytest.raises(ValueError):
        serve(client, simple_app([b"x"], headers=headers), get())
    assert client.pending() == b""


@pytest.mark.parametrize("headers", [[(b"X-Bytes", "v")], [("X-Bytes", b"v")], [("X-Int", 5)]])
def test_non_str_headers_are_type_errors(client: Client, headers: Any) -> None:
    with pytest.raises(TypeError):
        serve(client, simple_app([b"x"], headers=headers), get())
    assert client.pending() == b""


@pytest.mark.parametrize(
    "status",
    ["OK", "2000 OK", " 200", "200\t", "200OK", "200 OK\r\nX: y", "600 Nope", "099 Low", b"200 OK"],
)
def test_invalid_status(client: Client, status: Any) -> None:
    with pytest.raises(ValueError):
        serve(client, simple_app([b"x"], status=status), get())
    assert client.pending() == b""


@pytest.mark.parametrize("status", ["200 ", "299 Custom Thing", "404 Not Found", "599 x"])
def test_valid_unusual_status(client: Client, status: str) -> None:
    _, raw = serve(client, simple_app([b"x"], status=status), get())
    assert raw.startswith(b"HTTP/1.1 " + status.encode() + b"\r\n")


@pytest.mark.parametrize(
    ("status", "line"), [("200", b"200 OK"), ("404", b"404 Not Found"), ("299", b"299 ")]
)
def test_a_bare_status_code_gets_its_reason_phrase(
    client: Client, status: str, line: bytes
) -> None:
    """gunicorn and uWSGI pass a bare "200" on; an app moved from them must not get a 500."""
    _, raw = serve(client, simple_app([b"x"], status=status), get())
    assert raw.startswith(b"HTTP/1.1 " + line + b"\r\n")


CONNECT = b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n"


@pytest.mark.parametrize("body", [[b"tunnel", b" bytes"], iter([b"tunnel", b" bytes"])])
def test_a_2xx_to_connect_has_no_framing_and_closes(client: Client, body: Any) -> None:
    """RFC 9110 9.3.6: a server MUST NOT send Content-Length or Transfer-Encoding in a 2xx
    to CONNECT (they had been sent, a known length or chunking): the body goes out as the
    tunnel's bytes and the connection closes after it."""
    headers = [("Content-Length", "12"), ("X-Tunnel", "yes")]
    response, raw = serve(client, simple_app(body, headers=headers), CONNECT)
    head, _, rest = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 OK\r\n")
    assert b"X-Tunnel: yes" in head
    assert b"content-length" not in head.lower() and b"transfer-encoding" not in head.lower()
    assert rest == b"tunnel bytes"
    assert response.keep_alive is False


def test_a_refused_connect_is_framed_as_usual(client: Client) -> None:
    """Pinned: only a 2xx opens a tunnel; a 405 to CONNECT is an ordinary response."""
    _, raw = serve(client, simple_app([b"no"], status="405 Method Not Allowed"), CONNECT)
    assert b"Content-Length: 2\r\n" in raw and raw.endswith(b"\r\n\r\nno")


def test_app_must_call_start_response(client: Client) -> None:
    with pytest.raises(AssertionError):
        serve(client, lambda environ, start_response: [b"x"], get())
    client2 = Client()
    try:
        with pytest.raises(AssertionError):
            serve(client2, lambda environ, start_response: gen(b"x"), get())
    finally:
        client2.close()
    assert client.pending() == b""


# ---------------------------------------------------------------------------------------
# hop-by-hop headers belong to the server


def test_app_connection_close_is_honoured_once(client: Client) -> None:
    app = simple_app([b"bye"], headers=[("Connection", "close"), ("X-Other", "1")])
    response, raw = serve(client, app, get())
    parsed = parse_response(raw)
    assert parsed.values(b"connection") == [b"close"]
    assert parsed.value(b"x-other") == b"1"
    assert not response.keep_alive


def test_app_connection_close_on_http10_keep_alive(client: Client) -> None:
    app = simple_app([b"bye"], headers=[("connection", "Close")])
    response, raw = serve(client, app, get(b"1.0", b"GET", b"Connection: keep-alive"))
    assert parse_response(raw).values(b"connection") == [b"close"]
    assert not response.keep_alive


@pytest.mark.parametrize(
    "header",
    [
        ("Connection", "keep-alive"),
        ("Keep-Alive", "timeout=5"),
        ("Proxy-Connection", "keep-alive"),
        ("TE", "trailers"),
        ("Trailer", "X-Checksum"),
        ("Upgrade", "websocket"),
        ("Transfer-Encoding", "chunked"),
        ("transfer-encoding", "gzip"),
    ],
)
@pytest.mark.parametrize("kind", ["list", "gen"])
def test_hop_by_hop_from_app_dropped(client: Client, header: tuple[str, str], kind: str) -> None:
    body: Iterable[bytes] = [b"data"] if kind == "list" else gen(b"da", b"ta")
    response, raw = serve(client, simple_app(body, headers=[header]), get())
    parsed = parse_response(raw)
    name = header[0].lower().encode()
    if name == b"transfer-encoding":
        assert parsed.values(name) == ([] if kind == "list" else [b"chunked"])
    else:
        assert parsed.values(name) == []
    assert parsed.body == b"data" and parsed.rest == b""
    assert response.keep_alive


# ---------------------------------------------------------------------------------------
# the iterable's close() is always called


class Body:
    """An iterable response body that records close() and may fail."""

    def __init__(self, items: list[bytes], fail_after: int | None = None) -> None:
        self.items = items
        self.fail_after = fail_after
        self.closed = 0

    def __iter__(self) -> Iterator[bytes]:
        for i, item in enumerate(self.items):
            if self.fail_after is not None and i >= self.fail_after:
                raise RuntimeError("iteration failed")
            yield item

    def close(self) -> None:
        self.closed += 1


def test_close_called_after_success(client: Client) -> None:
    body = Body([b"a", b"b"])
    _, raw = serve(client, simple_app(body), get())
    assert parse_response(raw).body == b"ab"
    assert body.closed == 1


@pytest.mark.parametrize("fail_after", [0, 1])
def test_close_called_when_iteration_raises(client: Client, fail_after: int) -> None:
    body = Body([b"a", b"b"], fail_after=fail_after)
    with pytest.raises(RuntimeError, match="iteration failed"):
        serve(client, simple_app(body), get())
    assert body.closed == 1


def test_close_called_without_start_response(client: Client) -> None:
    body = Body([b"a"])
    with pytest.raises(AssertionError):
        serve(client, lambda environ, start_response: body, get())
    assert body.closed == 1


def test_close_called_when_client_is_gone(client: Client) -> None:
    body = Body([b"x" * 100_000] * 40)
    client.peer.close()
    with pytest.raises(ClientDisconnected):
        serve(client, simple_app(body), get())
    assert body.closed == 1


def test_generator_close_runs_finally(client: Client) -> None:
    cleaned: list[bool] = []

    def app(environ: dict[str, Any], start_response: Any) -> Iterator[bytes]:
        start_response("200 OK", [])
        try:
            yield b"a"
            raise ValueError("inside")
        finally:
            cleaned.append(True)

    with pytest.raises(ValueError):
        serve(client, app, get())
    assert cleaned == [True]


# ---------------------------------------------------------------------------------------
# FileWrapper and sendfile


def read_all_in_thread(sock: socket.socket) -> tuple[threading.Thread, list[bytes]]:
    out: list[bytes] = []

    def reader() -> None:
        while True:
            data = sock.recv(1 << 16)
            if not data:
                return
            out.append(data)

    thread = threading.Thread(target=reader, daemon=True)
    thread.start()
    return thread, out


@pytest.fixture
def big_file() -> Iterator[tuple[Any, bytes]]:
    data = os.urandom(1 << 20)
    with tempfile.TemporaryFile() as f:
        f.write(data)
        f.seek(0)
        yield f, data


def serve_file(client: Client, wrapper_app: Any, raw: bytes) -> tuple[Response, bytes]:
    """Serve while a thread reads: a 1 MB response does not fit in the socket buffer."""
    thread, out = read_all_in_thread(client.peer)
    request = client.request(raw)
    response = make_response(client, request)
    environ = {
        "REQUEST_METHOD": request.method,
        "wsgi.input": Input(client.conn, request, TIMEOUT),
        "wsgi.file_wrapper": FileWrapper,
    }
    run_app(wrapper_app, environ, response)
    client.server.shutdown(socket.SHUT_WR)
    thread.join(TIMEOUT)
    assert not thread.is_alive()
    return response, b"".join(out)


def file_app(
    f: Any, headers: list[tuple[str, str]] | None = None, blksize: int = 8192
) -> Callable[..., Any]:
    def app(environ: dict[str, Any], start_response: Any) -> Any:
        start_response("200 OK", headers or [("Content-Type", "application/octet-stream")])
        return environ["wsgi.file_wrapper"](f, blksize)

    return app


def test_sendfile_sends_exact_bytes(
    client: Client, big_file: tuple[Any, bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    f, data = big_file
    used: list[int] = []
    original = os.sendfile

    def spy(out_fd: int, in_fd: int, offset: int, count: int) -> int:
        sent = original(out_fd, in_fd, offset, count)
        used.append(sent)
        return sent

    monkeypatch.setattr(os, "sendfile", spy)
    response, raw = serve_file(client, file_app(f), get())
    parsed = parse_response(raw)
    assert parsed.value(b"content-length") == str(len(data)).encode()
    assert parsed.body == data and parsed.rest == b""
    assert sum(used) == len(data)  # the file went through sendfile, not the iterator
    assert response.bytes_sent == len(data)
    assert response.keep_alive
    assert f.closed  # the wrapper's close() closes the file


def test_sendfile_from_current_position(client: Client, big_file: tuple[Any, bytes]) -> None:
    f, data = big_file
    f.seek(1000)
    _, raw = serve_file(client, file_app(f), get())
    parsed = parse_response(raw)
    assert parsed.value(b"content-length") == str(len(data) - 1000).encode()
    assert parsed.body == data[1000:]


def test_sendfile_honours_app_content_length(client: Client, big_file: tuple[Any, bytes]) -> None:
    f, data = big_file
    app = file_app(f, headers=[("Content-Length", "5000")])
    response, raw = serve_file(client, app, get())
    parsed = parse_response(raw)
    assert parsed.body == data[:5000] and parsed.rest == b""
    assert response.keep_alive


def test_sendfile_shorter_file_than_declared_closes(
    client: Client, big_file: tuple[Any, bytes]
) -> None:
    f, data = big_file
    app = file_app(f, headers=[("Content-Length", str(len(data) + 10))])
    response, raw = serve_file(client, app, get())
    assert raw.endswith(data)
    assert not response.keep_alive


def test_sendfile_head_sends_no_body(client: Client, big_file: tuple[Any, bytes]) -> None:
    f, data = big_file
    response, raw = serve_file(client, file_app(f), get(b"1.1", b"HEAD"))
    parsed = parse_response(raw, no_body=True)
    assert parsed.value(b"content-length") == str(len(data)).encode()
    assert parsed.rest == b""
    assert response.keep_alive


def test_sendfile_on_http10(client: Client, big_file: tuple[Any, bytes]) -> None:
    f, data = big_file
    response, raw = serve_file(client, file_app(f), get(b"1.0"))
    parsed = parse_response(raw)
    assert parsed.body == data
    assert parsed.value(b"connection") == b"close"


def test_file_wrapper_without_fileno_is_iterated(client: Client) -> None:
    closed: list[bool] = []

    class Stream(io.BytesIO):
        def close(self) -> None:
            closed.append(True)
            super().close()

    app = file_app(Stream(b"abc" * 10), blksize=7)
    response, raw = serve_file(client, app, get())
    parsed = parse_response(raw)
    assert parsed.value(b"transfer-encoding") == b"chunked"
    assert parsed.body == b"abc" * 10
    assert closed == [True]


def test_file_wrapper_iterates_in_blocks() -> None:
    wrapper = FileWrapper(io.BytesIO(b"0123456789"), 4)
    assert list(wrapper) == [b"0123", b"4567", b"89"]
    assert wrapper.fileno() is None


def test_write_then_file_wrapper_keeps_framing(client: Client) -> None:
    with tempfile.TemporaryFile() as f:
        f.write(b"FILEDATA")
        f.seek(0)

        def app(environ: dict[str, Any], start_response: Any) -> Any:
            start_response("200 OK", [])(b"head-")
            return FileWrapper(f)

        response, raw = serve_file(client, app, get())
    parsed = parse_response(raw)
    assert parsed.body == b"head-FILEDATA"
    assert parsed.rest == b""


# ---------------------------------------------------------------------------------------
# wsgi.input


def body_request(body: bytes, framing: str, in_head: int, pieces: list[int]) -> tuple[bytes, bytes]:
    """(bytes fed with the head, bytes the client sends later) for `body` framed as asked."""
    if framing == "length":
        head = b"POST / HTTP/1.1\r\nHost: t\r\nContent-Length: %d\r\n\r\n" % len(body)
        wire = body
    else:
        head = b"POST / HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n"
        wire, rest = b"", body
        for size in pieces:
            if not rest:
                break
            wire += chunk(rest[:size])
            rest = rest[size:]
        if rest:
            wire += chunk(rest)
        wire += b"0\r\n\r\n"
    in_head = min(in_head, len(wire))
    return head + wire[:in_head], wire[in_head:]


@pytest.fixture
def recv_size(monkeypatch: pytest.MonkeyPatch) -> Callable[[int], None]:
    """Make Connection.recv return at most n bytes, so the body arrives in many pieces."""
    original = Connection.recv

    def limit(n: int) -> None:
        def recv(self: Connection, timeout: float, size: int = 65536) -> bytes:
            return original(self, timeout, min(size, n))

        monkeypatch.setattr(Connection, "recv", recv)

    return limit


BODY = b"first line\nsecond\n\nfourth line is longer than the others\nno newline at end"

OPS = [
    ("read()", lambda f: f.read()),
    ("read(-1)", lambda f: f.read(-1)),
    ("read(None)", lambda f: f.read(None)),
    ("read(5) x3 + read()", lambda f: [f.read(5), f.read(5), f.read(5), f.read()]),
    ("read(0)", lambda f: [f.read(0), f.read()]),
    ("read(1000)", lambda f: [f.read(1000), f.read(1000)]),
    ("readline() all", lambda f: [f.readline() for _ in range(7)]),
    ("readline(None)", lambda f: [f.readline(None), f.readline()]),
    ("readline(4)", lambda f: [f.readline(4) for _ in range(20)]),
    ("readline(0)", lambda f: [f.readline(0), f.readline()]),
    ("readline(11)", lambda f: [f.readline(11), f.readline(11), f.readline()]),
    ("readlines()", lambda f: f.readlines()),
    ("readlines(15)", lambda f: [f.readlines(15), f.readlines()]),
    ("readlines(0)", lambda f: f.readlines(0)),
    ("iteration", lambda f: list(f)),
    ("mixed", lambda f: [f.read(3), f.readline(), f.readline(2), f.read(4), list(f)]),
]


@pytest.mark.parametrize("framing", ["length", "chunked"])
@pytest.mark.parametrize("in_head", [0, 12, 10_000])
@pytest.mark.parametrize("op", OPS, ids=[name for name, _ in OPS])
def test_input_matches_bytesio(
    client: Client,
    recv_size: Callable[[int], None],
    framing: str,
    in_head: int,
    op: tuple[str, Callable[[Any], Any]],
) -> None:
    recv_size(7)
    first, later = body_request(BODY, framing, in_head, [5, 1, 17])
    request = client.request(first)
    client.peer.sendall(later)
    stream = Input(client.conn, request, TIMEOUT)
    oracle = io.BytesIO(BODY)
    assert op[1](stream) == op[1](oracle)
    assert stream.read() == oracle.read()
    assert stream.read() == b""
    assert request.complete


READ_OPS = st.one_of(
    st.tuples(st.just("read"), st.one_of(st.none(), st.integers(-1, 40))),
    st.tuples(st.just("readline"), st.one_of(st.none(), st.integers(-1, 40))),
    st.tuples(st.just("readlines"), st.integers(-1, 40)),
    st.tuples(st.just("iter"), st.just(None)),
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    body=st.binary(max_size=200).map(lambda b: b.replace(b"\x00", b"\n")),
    framing=st.sampled_from(["length", "chunked"]),
    in_head=st.integers(0, 250),
    pieces=st.lists(st.integers(1, 50), max_size=8),
    recv=st.integers(1, 100),
    ops=st.lists(READ_OPS, max_size=8),
)
def test_input_property(
    body: bytes,
    framing: str,
    in_head: int,
    pieces: list[int],
    recv: int,
    ops: list[tuple[str, int | None]],
) -> None:
    """Any sequence of reads gives what io.BytesIO gives, however the body is framed and cut."""
    original = Connection.recv
    client = Client()
    try:
        Connection.recv = lambda self, timeout, size=65536: original(  # type: ignore[method-assign]
            self, timeout, min(size, recv)
        )
        first, later = body_request(body, framing, in_head, pieces)
        request = client.request(first)
        client.peer.sendall(later)
        stream = Input(client.conn, request, TIMEOUT)
        oracle = io.BytesIO(body)
        for name, arg in ops:
            if name == "iter":
                assert next(iter(stream), None) == next(iter(oracle), None)
            else:
                assert getattr(stream, name)(arg) == getattr(oracle, name)(arg), (name, arg)
        assert stream.read() == oracle.read()
        assert request.complete
    finally:
        Connection.recv = original  # type: ignore[method-assign]
        client.close()


def test_input_never_reads_past_the_body(client: Client) -> None:
    request = client.request(b"POST / HTTP/1.1\r\nHost: t\r\nContent-Length: 3\r\n\r\n")
    client.peer.sendall(b"abcGET /next HTTP/1.1\r\nHost: t\r\n\r\n")
    stream = Input(client.conn, request, TIMEOUT)
    assert stream.read() == b"abc"
    assert stream.read(10) == b""
    assert stream.readline() == b""
    # the pipelined request is the parser's, intact
    (following,) = client.conn.parser.requests
    assert following.target == b"/next"


def test_input_empty_body(client: Client) -> None:
    request = client.request(get())
    stream = Input(client.conn, request, TIMEOUT)
    assert stream.read() == b""
    assert stream.readline() == b""
    assert stream.readlines() == []
    assert list(stream) == []


@pytest.mark.parametrize("framing", ["length", "chunked"])
def test_truncated_body_raises_client_disconnected(client: Client, framing: str) -> None:
    first, later = body_request(b"0123456789" * 3, framing, 5, [4])
    request = client.request(first)
    client.peer.sendall(later[: len(later) // 2])
    client.peer.close()
    stream = Input(client.conn, request, TIMEOUT)
    assert stream.read(1)  # what did arrive can be read
    with pytest.raises(ClientDisconnected):
        stream.read()
    assert not request.complete


def test_truncated_body_raises_from_readline(client: Client) -> None:
    request = client.request(b"POST / HTTP/1.1\r\nHost: t\r\nContent-Length: 20\r\n\r\nno newline")
    client.peer.shutdown(socket.SHUT_WR)
    stream = Input(client.conn, request, TIMEOUT)
    with pytest.raises(ClientDisconnected):
        stream.readline()


def test_slow_body_times_out(client: Client) -> None:
    request = client.request(b"POST / HTTP/1.1\r\nHost: t\r\nContent-Length: 20\r\n\r\n")
    stream = Input(client.conn, request, 0.05)
    with pytest.raises(ClientTimeout):
        stream.read()


def test_malformed_chunked_body_raises_protocol_error(client: Client) -> None:
    request = client.request(b"POST / HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n")
    client.peer.sendall(b"3\r\nabc\r\nzz\r\n")
    stream = Input(client.conn, request, TIMEOUT)
    with pytest.raises(ProtocolError) as exc:
        stream.read()
    assert exc.value.status == 400


def test_body_over_limit_while_streaming_is_413() -> None:
    client = Client(Limits(max_body_size=10))
    try:
        request = client.request(
            b"POST / HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n"
        )
        client.peer.sendall(chunk(b"0123456") + chunk(b"789ab") + b"0\r\n\r\n")
        stream = Input(client.conn, request, TIMEOUT)
        with pytest.raises(ProtocolError) as exc:
            stream.read()
        assert exc.value.status == 413
    finally:
        client.close()


# ---------------------------------------------------------------------------------------
# 100-continue

EXPECT = b"PUT /f HTTP/1.1\r\nHost: t\r\nExpect: 100-continue\r\nContent-Length: 5\r\n\r\n"


def test_100_continue_sent_once_on_first_read(client: Client) -> None:
    request = client.request(EXPECT)
    stream = Input(client.conn, request, TIMEOUT)
    assert stream.continue_pending
    assert client.pending() == b""  # nothing before the application reads

    def well_behaved_client() -> None:
        got = b""
        while len(got) < len(CONTINUE_100):
            got += client.peer.recv(100)
        assert got == CONTINUE_100
        client.peer.sendall(b"hel")
        client.peer.sendall(b"lo")

    thread = threading.Thread(target=well_behaved_client, daemon=True)
    thread.start()
    assert stream.read(1) == b"h"
    assert not stream.continue_pending
    assert stream.read() == b"ello"
    thread.join(TIMEOUT)
    assert stream.read() == b""
    assert client.pending() == b""  # not sent a second time


def test_100_continue_then_response(client: Client) -> None:
    client.peer.sendall(b"abcde")  # an impatient client: the body is already in flight

    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        body = environ["wsgi.input"].read()
        environ["wsgi.input"].read()
        start_response("200 OK", [])
        return [body.upper()]

    response, raw = serve(client, app, EXPECT)
    assert raw.startswith(CONTINUE_100)
    assert raw.count(b"100 Continue") == 1
    parsed = parse_response(raw[len(CONTINUE_100) :])
    assert parsed.body == b"ABCDE"
    assert response.keep_alive


def test_no_100_continue_if_body_never_read(client: Client) -> None:
    request = client.request(EXPECT)
    response = make_response(client, request)
    stream = Input(client.conn, request, TIMEOUT)
    run_app(
        simple_app([b"rejected"], status="413 Content Too Large"), {"wsgi.input": stream}, response
    )
    raw = client.pending()
    assert b"100 Continue" not in raw
    assert raw.startswith(b"HTTP/1.1 413 ")
    assert stream.continue_pending


def test_no_100_continue_when_body_already_arrived(client: Client) -> None:
    request = client.request(EXPECT + b"abcde")
    stream = Input(client.conn, request, TIMEOUT)
    assert stream.read() == b"abcde"
    assert client.pending() == b""


def test_no_100_continue_without_expectation(client: Client) -> None:
    request = client.request(b"PUT / HTTP/1.1\r\nHost: t\r\nContent-Length: 2\r\n\r\n")
    client.peer.sendall(b"ok")
    stream = Input(client.conn, request, TIMEOUT)
    assert not stream.continue_pending
    assert stream.read() == b"ok"
    assert client.pending() == b""


# ---------------------------------------------------------------------------------------
# environ


@pytest.mark.parametrize(
    ("name", "key"),
    [
        (b"Content-Type", "CONTENT_TYPE"),
        (b"content-type", "CONTENT_TYPE"),
        (b"Content-Length", "CONTENT_LENGTH"),
        (b"X-Foo", "HTTP_X_FOO"),
        (b"x-foo-bar", "HTTP_X_FOO_BAR"),
        (b"Host", "HTTP_HOST"),
        (b"Cookie", "HTTP_COOKIE"),
        (b"Content-MD5", "HTTP_CONTENT_MD5"),
        (b"X_Foo", None),
        (b"x_forwarded_for", None),
        (b"Content_Type", None),
        (b"_", None),
    ],
)
def test_environ_key(name: bytes, key: str | None) -> None:
    assert environ_key(name) == key
    assert environ_key(name) == key  # cached answer is the same


@given(name=st.from_regex(rb"[!#$%&'*+\-.^`|~0-9A-Za-z]{1,30}", fullmatch=True))
@settings(max_examples=50, deadline=None)
def test_environ_key_property(name: bytes) -> None:
    key = environ_key(name)
    assert key is not None
    assert key == key.upper()
    assert "-" not in key
    assert key.startswith("HTTP_") or key in ("CONTENT_TYPE", "CONTENT_LENGTH")


def test_error_status() -> None:
    assert error_status(ProtocolError(413, "too big")) == 413
    assert error_status(RuntimeError()) == 500


@pytest.fixture
def scoreboard() -> Iterator[Scoreboard]:
    board = Scoreboard(4)
    yield board
    board.close()


def fake_listener(address: Address, fd: int = 1000) -> Any:
    return types.SimpleNamespace(fd=fd, address=address, tls=False)


TCP = Address("tcp", "10.1.2.3", 8080)
UNIX = Address("unix", path="/run/app.sock")


def protocol(app: Any, logs: Logs, scoreboard: Scoreboard) -> HttpProtocol:
    return HttpProtocol(
        app,
        scoreboard.slot(0),
        logs,
        0,
        body_timeout=TIMEOUT,
        send_timeout=TIMEOUT,
        server_header="preforkd-test",
    )


def build_environ(
    raw: bytes,
    logs: Logs,
    scoreboard: Scoreboard,
    address: Address = TCP,
    peer: object = ("192.0.2.7", 54321),
) -> dict[str, Any]:
    client = Client()
    try:
        client.conn.listener = fake_listener(address)
        client.conn.peer = peer
        request = client.request(raw)
        return protocol(None, logs, scoreboard).environ(client.conn, request)
    finally:
        client.close()


def test_environ_basics(logs: Logs, scoreboard: Scoreboard) -> None:
    env = build_environ(
        b"POST /caf%C3%A9/a%2Fb%20c?q=%20x&y=%C3%A9 HTTP/1.1\r\n"
        b"Host: example.com:8080\r\n"
        b"Content-Type: text/plain\r\n"
        b"Content-Length: 0\r\n"
        b"X-Dup: a\r\n"
        b"x-dup: b\r\n"
        b"X-Dup: c\r\n"
        b"Cookie: a=1\r\n"
        b"Cookie: b=2\r\n"
        b"X_Forwarded_For: spoofed\r\n"
        b"X-Forwarded-For: 198.51.100.1\r\n"
        b"\r\n",
        logs,
        scoreboard,
    )
    assert env["REQUEST_METHOD"] == "POST"
    assert env["PATH_INFO"] == "/caf\xc3\xa9/a/b c"  # percent-decoded bytes as latin-1
    assert env["QUERY_STRING"] == "q=%20x&y=%C3%A9"  # raw
    assert env["RAW_URI"] == "/caf%C3%A9/a%2Fb%20c?q=%20x&y=%C3%A9"
    assert env["SCRIPT_NAME"] == ""
    assert env["SERVER_PROTOCOL"] == "HTTP/1.1"
    assert env["SERVER_NAME"] == "10.1.2.3"
    assert env["SERVER_PORT"] == "8080"
    assert env["REMOTE_ADDR"] == "192.0.2.7"
    assert env["REMOTE_PORT"] == "54321"
    assert env["CONTENT_TYPE"] == "text/plain"
    assert env["CONTENT_LENGTH"] == "0"
    assert "HTTP_CONTENT_TYPE" not in env and "HTTP_CONTENT_LENGTH" not in env
    assert env["HTTP_HOST"] == "example.com:8080"
    assert env["HTTP_X_DUP"] == "a, b, c"
    assert env["HTTP_COOKIE"] == "a=1; b=2"
    assert env["HTTP_X_FORWARDED_FOR"] == "198.51.100.1"
    assert env["SERVER_SOFTWARE"].startswith("preforkd/")


def test_environ_wsgi_keys(logs: Logs, scoreboard: Scoreboard) -> None:
    env = build_environ(get(), logs, scoreboard)
    assert env["wsgi.version"] == (1, 0)
    assert env["wsgi.url_scheme"] == "http"
    assert env["wsgi.multiprocess"] is True
    assert env["wsgi.multithread"] is False
    assert env["wsgi.run_once"] is False
    assert env["wsgi.file_wrapper"] is FileWrapper
    assert isinstance(env["wsgi.input"], Input)
    for method in ("write", "writelines", "flush"):
        assert callable(getattr(env["wsgi.errors"], method))
    # PEP 3333: CGI keys are native strings
    for key, value in env.items():
        if not key.startswith("wsgi."):
            assert type(value) is str, key


def test_environ_latin1_header_value(logs: Logs, scoreboard: Scoreboard) -> None:
    env = build_environ(get(b"1.1", b"GET", b"X-Name: caf\xe9"), logs, scoreboard)
    assert env["HTTP_X_NAME"] == "caf\xe9"


def test_environ_http10_and_no_query(logs: Logs, scoreboard: Scoreboard) -> None:
    env = build_environ(b"GET /plain HTTP/1.0\r\n\r\n", logs, scoreboard)
    assert env["SERVER_PROTOCOL"] == "HTTP/1.0"
    assert env["PATH_INFO"] == "/plain"
    assert env["QUERY_STRING"] == ""
    assert "HTTP_HOST" not in env


def test_environ_absolute_form(logs: Logs, scoreboard: Scoreboard) -> None:
    env = build_environ(
        b"GET http://example.com/a%20b?c=d HTTP/1.1\r\nHost: example.com\r\n\r\n", logs, scoreboard
    )
    assert env["PATH_INFO"] == "/a b"
    assert env["QUERY_STRING"] == "c=d"
    assert env["RAW_URI"] == "http://example.com/a%20b?c=d"


@pytest.mark.parametrize(
    ("host", "name", "port"),
    [
        (b"Host: example.com:8000", "example.com", "8000"),
        (b"Host: example.com", "example.com", "80"),
        (b"Host: [::1]:9000", "[::1]", "9000"),
    ],
)
def test_environ_unix_listener_server_name_from_host(
    logs: Logs, scoreboard: Scoreboard, host: bytes, name: str, port: str
) -> None:
    raw = b"GET / HTTP/1.1\r\n" + host + b"\r\n\r\n"
    env = build_environ(raw, logs, scoreboard, address=UNIX, peer="")
    assert (env["SERVER_NAME"], env["SERVER_PORT"]) == (name, port)
    assert env["REMOTE_ADDR"] == ""
    assert env["REMOTE_PORT"] == ""


def test_environ_unix_listener_without_host(logs: Logs, scoreboard: Scoreboard) -> None:
    """No Host and no port of its own: the scheme's default port, so that a URL rebuilt
    from the environ (PEP 3333's url reconstruction, Django's build_absolute_uri) is
    http://localhost/..., not http://localhost:0/..."""
    env = build_environ(b"GET / HTTP/1.0\r\n\r\n", logs, scoreboard, address=UNIX, peer="")
    assert (env["SERVER_NAME"], env["SERVER_PORT"]) == ("localhost", "80")


def test_environ_is_fresh_per_request(logs: Logs, scoreboard: Scoreboard) -> None:
    proto = protocol(None, logs, scoreboard)
    client = Client()
    try:
        client.conn.listener = fake_listener(TCP)
        first = proto.environ(client.conn, client.request(get(b"1.1", b"GET", b"X-A: 1")))
        first["mutated"] = True
        second = proto.environ(client.conn, client.request(get()))
    finally:
        client.close()
    assert "mutated" not in second and "HTTP_X_A" not in second
    assert first["wsgi.input"] is not second["wsgi.input"]


# ---------------------------------------------------------------------------------------
# HttpProtocol.respond / serve


def responder(
    app: Any, logs: Logs, scoreboard: Scoreboard, limits: Limits | None = None
) -> tuple[HttpProtocol, Client]:
    client = Client(limits)
    client.conn.listener = fake_listener(TCP)
    return protocol(app, logs, scoreboard), client


def test_respond_ok_keeps_alive(logs: Logs, scoreboard: Scoreboard) -> None:
    proto, client = responder(simple_app([b"hi"]), logs, scoreboard)
    try:
        keep = proto.respond(client.conn, client.request(get()), True)
        parsed = parse_response(client.pending())
    finally:
        client.close()
    assert keep
    assert parsed.status == b"200 OK"
    assert parsed.value(b"server") == b"preforkd-test"
    assert parsed.value(b"date") is not None
    assert parsed.body == b"hi"
    view = scoreboard.read(0)
    assert view.activity == Activity.KEEPALIVE and view.requests == 1
    counters = scoreboard.counters(0)
    assert counters.by_class == (0, 1, 0, 0, 0)
    assert sum(counters.buckets) == 1 and counters.bytes_sent == 2


def respond_once(app: Any, logs: Logs, scoreboard: Scoreboard) -> tuple[bool, Any]:
    """One GET answered by `app` through HttpProtocol.respond: (keep-alive, the response)."""
    proto, client = responder(app, logs, scoreboard)
    try:
        keep = proto.respond(client.conn, client.request(get()), True)
        parsed = parse_response(client.pending())
    finally:
        client.close()
    return keep, parsed


def test_respond_app_error_is_500_and_close(logs: Logs, scoreboard: Scoreboard) -> None:
    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        raise RuntimeError("app bug")

    keep, parsed = respond_once(app, logs, scoreboard)
    assert not keep
    assert parsed.status == b"500 Internal Server Error"
    assert parsed.value(b"connection") == b"close"
    assert scoreboard.read(0).activity == Activity.IDLE


def test_respond_str_body_is_500(logs: Logs, scoreboard: Scoreboard) -> None:
    proto, client = responder(simple_app(["not bytes"]), logs, scoreboard)  # type: ignore[list-item]
    try:
        keep = proto.respond(client.conn, client.request(get()), True)
        raw = client.pending()
    finally:
        client.close()
    assert not keep
    assert raw.startswith(b"HTTP/1.1 500 ")


def test_respond_body_over_limit_is_413(logs: Logs, scoreboard: Scoreboard) -> None:
    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        environ["wsgi.input"].read()
        start_response("200 OK", [])
        return [b"unreachable"]

    proto, client = responder(app, logs, scoreboard, Limits(max_body_size=4))
    try:
        client.peer.sendall(chunk(b"abc") + chunk(b"def") + b"0\r\n\r\n")
        request = client.request(
            b"POST / HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n"
        )
        keep = proto.respond(client.conn, request, True)
        parsed = parse_response(client.pending())
    finally:
        client.close()
    assert not keep
    assert parsed.status.startswith(b"413 ")


def test_respond_drains_small_unread_body(logs: Logs, scoreboard: Scoreboard) -> None:
    proto, client = responder(simple_app([b"ignored your body"]), logs, scoreboard)
    try:
        request = client.request(b"POST / HTTP/1.1\r\nHost: t\r\nContent-Length: 10\r\n\r\n")
        client.peer.sendall(b"0123456789")
        keep = proto.respond(client.conn, request, True)
    finally:
        client.close()
    assert keep
    assert request.complete
    assert client.conn.parser.idle


def test_respond_closes_when_continue_never_sent(logs: Logs, scoreboard: Scoreboard) -> None:
    proto, client = responder(simple_app([b"no thanks"]), logs, scoreboard)
    try:
        keep = proto.respond(client.conn, client.request(EXPECT), True)
        raw = client.pending()
    finally:
        client.close()
    assert not keep  # the client never sent its body: the connection cannot be reused
    assert b"100 Continue" not in raw


def test_respond_client_gone(logs: Logs, scoreboard: Scoreboard) -> None:
    proto, client = responder(simple_app([b"x" * 100_000] * 40), logs, scoreboard)
    try:
        client.peer.close()
        assert proto.respond(client.conn, client.request(get()), True) is False
    finally:
        client.close()
    assert scoreboard.read(0).activity == Activity.IDLE


def test_serve_pipelined_in_order(logs: Logs, scoreboard: Scoreboard) -> None:
    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        start_response("200 OK", [])
        return [environ["PATH_INFO"].encode()]

    proto, client = responder(app, logs, scoreboard)
    try:
        client.conn.parser.feed(
            b"GET /1 HTTP/1.1\r\nHost: t\r\n\r\n"
            b"GET /2 HTTP/1.1\r\nHost: t\r\n\r\n"
            b"GET /3 HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n"
        )
        keep = proto.serve(client.conn, True)
        raw = client.pending()
    finally:
        client.close()
    assert not keep  # the last one asked to close
    bodies = []
    while raw:
        parsed = parse_response(raw)
        bodies.append(parsed.body)
        raw = parsed.rest
    assert bodies == [b"/1", b"/2", b"/3"]
    assert client.conn.served == 3


def test_serve_worker_refusing_keep_alive(logs: Logs, scoreboard: Scoreboard) -> None:
    proto, client = responder(simple_app([b"x"]), logs, scoreboard)
    try:
        client.conn.parser.feed(get())
        keep = proto.serve(client.conn, False)
        parsed = parse_response(client.pending())
    finally:
        client.close()
    assert not keep
    assert parsed.value(b"connection") == b"close"


# ---------------------------------------------------------------------------------------
# PEP 3333 conformance of what we hand the application (wsgiref.validate)


@pytest.mark.parametrize(
    "raw",
    [
        get(),
        b"POST /form?x=1 HTTP/1.1\r\nHost: t\r\nContent-Type: text/plain\r\n"
        b"Content-Length: 12\r\n\r\nline1\nline2\n",
        b"POST /up HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"6\r\nline1\n\r\n6\r\nline2\n\r\n0\r\n\r\n",
        b"GET /old HTTP/1.0\r\n\r\n",
    ],
    ids=["get", "post-length", "post-chunked", "http10"],
)
def test_wsgiref_validator(logs: Logs, scoreboard: Scoreboard, raw: bytes) -> None:
    seen: dict[str, Any] = {}

    def app(environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
        stream = environ["wsgi.input"]
        seen["first"] = stream.readline()
        seen["rest"] = stream.read(100)
        seen["lines"] = stream.readlines()
        write = start_response("200 OK", [("Content-Type", "text/plain")])
        write(b"via write\n")
        return [b"echo:", seen["first"], seen["rest"]]

    proto, client = responder(validator(app), logs, scoreboard)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # wsgiref.validate reports problems as warnings
            keep = proto.respond(client.conn, client.request(raw), True)
        parsed = parse_response(client.pending())
    finally:
        client.close()
    assert parsed.status == b"200 OK", parsed.body  # a validator assertion would be a 500
    body = b"".join([b"line1\n", b"line2\n"]) if raw.startswith(b"POST") else b""
    assert parsed.body == b"via write\necho:" + body
    assert keep is (b"HTTP/1.0" not in raw)


def test_serve_upgrade_request_closes(logs: Logs, scoreboard: Scoreboard) -> None:
    """preforkd does not switch protocols: the app answers, then the connection closes."""
    proto, client = responder(simple_app([b"no upgrade"]), logs, scoreboard)
    try:
        client.conn.parser.feed(
            b"GET /ws HTTP/1.1\r\nHost: t\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n"
        )
        assert client.conn.parser.upgraded
        keep = proto.serve(client.conn, True)
        parsed = parse_response(client.pending())
    finally:
        client.close()
    assert not keep
    assert parsed.status == b"200 OK"
    assert parsed.value(b"connection") == b"close"
    assert parsed.value(b"upgrade") is None


def test_reading_body_followed_by_pipelined_head_within_limits() -> None:
    client = Client(Limits(max_header_size=8192))
    try:
        body = b"x" * 20_000
        request = client.request(b"POST / HTTP/1.1\r\nHost: t\r\nContent-Length: 20000\r\n\r\n")
        client.peer.sendall(body + b"GET /next HTTP/1.1\r\n")  # the rest of that head is later
        stream = Input(client.conn, request, TIMEOUT)
        assert stream.read() == body
    finally:
        client.close()


# ---------------------------------------------------------------------------------------
# the cache of checked start_response arguments (a worker's HeadCache)


HEADER_LISTS = [
    [("Content-Type", "text/plain"), ("Content-Length", "4")],
    [("Content-Type", "text/plain")],
    [("Content-Length", "4"), ("Connection", "close")],
    [("X-A", "1"), ("x-a", "2"), ("Content-Length", "2")],
    [],
]


@pytest.mark.parametrize("headers", HEADER_LISTS)
@pytest.mark.parametrize("status", ["200 OK", "204 No Content", "404 Not Found"])
@pytest.mark.parametrize("kind", ["list", "gen"])
def test_cached_head_answers_exactly_like_a_fresh_check(
    client: Client, headers: list[tuple[str, str]], status: str, kind: str
) -> None:
    """The second answer (from the cache) is byte for byte the first, and keep-alive and
    framing decisions come out the same."""
    heads: HeadCache = {}
    outcomes = []
    for _ in range(3):
        body: Iterable[bytes] = [b"data"] if kind == "list" else gen(b"da", b"ta")
        response, raw = serve(client, simple_app(body, status, list(headers)), get(), heads)
        outcomes.append((raw, response.keep_alive, response.status_code, response.bytes_sent))
        if not response.keep_alive:
            client.reconnect()
    assert outcomes[0] == outcomes[1] == outcomes[2]
    assert len(heads) == 1
    body = [b"data"] if kind == "list" else gen(b"da", b"ta")
    uncached, raw = serve(client, simple_app(body, status, list(headers)), get())
    assert (raw, uncached.keep_alive, uncached.status_code, uncached.bytes_sent) == outcomes[0]


def test_cached_connection_close_still_closes(client: Client) -> None:
    heads: HeadCache = {}
    headers = [("Content-Length", "2"), ("Connection", "close")]
    for _ in range(2):
        response, raw = serve(client, simple_app([b"ok"], headers=headers), get(), heads)
        assert not response.keep_alive
        assert parse_response(raw).value(b"connection") == b"close"


def test_cached_content_length_still_truncates(client: Client) -> None:
    heads: HeadCache = {}
    headers = [("Content-Length", "2")]
    serve(client, simple_app([b"ok"], headers=headers), get(), heads)
    response, raw = serve(client, simple_app([b"too long"], headers=headers), get(), heads)
    assert parse_response(raw).body == b"to"
    assert not response.keep_alive


def test_cached_head_keeps_head_method_bodiless(client: Client) -> None:
    heads: HeadCache = {}
    headers = [("Content-Length", "4")]
    serve(client, simple_app([b"data"], headers=headers), get(), heads)
    _, raw = serve(client, simple_app([b"data"], headers=headers), get(method=b"HEAD"), heads)
    assert raw.endswith(b"\r\n\r\n") and b"data" not in raw


@pytest.mark.parametrize(
    "headers",
    [
        [("X-Bad", "a\r\nInjected: yes")],
        [("Content-Length", "x")],
        [("X-Int", 5)],
        [("A", "1", "2")],
    ],
)
def test_invalid_heads_are_never_cached(client: Client, headers: Any) -> None:
    heads: HeadCache = {}
    for _ in range(2):
        with pytest.raises((ValueError, TypeError)):
            serve(client, simple_app([b"x"], headers=headers), get(), heads)
    assert heads == {}
    assert client.pending() == b""


def test_unhashable_header_items_are_checked_every_time(client: Client) -> None:
    """A list of lists is not PEP 3333's list of tuples, but is common; it works uncached."""
    heads: HeadCache = {}
    headers: Any = [["Content-Type", "text/plain"], ["Content-Length", "2"]]
    for _ in range(2):
        _, raw = serve(client, simple_app([b"ok"], headers=headers), get(), heads)
        assert parse_response(raw).value(b"content-type") == b"text/plain"
    assert heads == {}
    headers[0][1] = "a\nb"  # mutated in place: caught, since nothing was cached
    with pytest.raises(ValueError):
        serve(client, simple_app([b"ok"], headers=headers), get(), heads)


def test_head_cache_is_bounded(client: Client) -> None:
    heads: HeadCache = {}
    for n in range(HEAD_CACHE_SIZE * 2 + 5):
        headers = [("Content-Length", "2"), ("X-N", str(n))]
        _, raw = serve(client, simple_app([b"ok"], headers=headers), get(), heads)
        assert parse_response(raw).value(b"x-n") == str(n).encode()
        assert len(heads) <= HEAD_CACHE_SIZE


@pytest.mark.parametrize("cached_first", [False, True])
def test_headers_given_as_an_iterator_are_all_sent(client: Client, cached_first: bool) -> None:
    """An iterator can be read once: the cache key and the check must share one reading."""
    heads: HeadCache = {}
    headers = [("Content-Type", "text/plain"), ("Connection", "close")]
    if cached_first:
        serve(client, simple_app([b"ok"], headers=list(headers)), get(), heads)
        client.reconnect()

    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        start_response("200 OK", iter(headers))
        return [b"ok"]

    for _ in range(2):
        response, raw = serve(client, app, get(), heads)
        parsed = parse_response(raw)
        assert parsed.value(b"content-type") == b"text/plain"
        assert parsed.value(b"connection") == b"close" and not response.keep_alive
        client.reconnect()
    _, raw = serve(client, simple_app([b"ok"], headers=list(headers)), get(), heads)
    assert parse_response(raw).value(b"content-type") == b"text/plain"


def test_bad_headers_from_an_iterator_are_rejected(client: Client) -> None:
    heads: HeadCache = {}
    bad = [("X-Bad", "a\r\nInjected: yes")]
    for _ in range(2):
        with pytest.raises(ValueError):
            serve(client, simple_app([b"x"], headers=iter(bad)), get(), heads)  # type: ignore[arg-type]
    assert heads == {} and client.pending() == b""


class Text(str):
    """A str subclass: equal to, and hashing as, the plain string."""


@pytest.mark.parametrize("with_cache", [False, True])
def test_str_subclasses_are_accepted_whether_cached_or_not(
    client: Client, with_cache: bool
) -> None:
    heads: HeadCache | None = {} if with_cache else None
    serve(client, simple_app([b"ok"], headers=[("X-A", "1")]), get(), heads)
    app = simple_app([b"ok"], status=Text("200 OK"), headers=[(Text("X-A"), Text("1"))])
    response, raw = serve(client, app, get(), heads)
    assert response.status_code == 200 and parse_response(raw).value(b"x-a") == b"1"


@pytest.mark.parametrize("heads", [None, {}])
def test_exc_info_replacing_a_bodiless_status_sends_the_body(
    client: Client, heads: HeadCache | None
) -> None:
    """204 chosen, then an error before anything was sent: the 500 has a body, framed."""

    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        start_response("204 No Content", [])
        try:
            raise RuntimeError("late failure")
        except RuntimeError:
            start_response("500 Internal Server Error", [("Content-Length", "4")], sys.exc_info())
        return [b"oops"]

    response, raw = serve(client, app, get(), heads)
    parsed = parse_response(raw)
    assert parsed.status.startswith(b"500") and parsed.body == b"oops" and parsed.rest == b""
    assert response.keep_alive
