"""Edges of the WSGI response and the connection's sends: 100
Continue after the response began, Content-Length for HEAD, 1xx statuses from the
application, repeated Content-Length headers, sendfile's start offset, and send errors that
mean the client is gone. Each section names the defect it guards against; the helpers and
fixtures are test_wsgi.py's (a Client on a socketpair, serve, parse_response, ...)."""

from __future__ import annotations

import errno
import io
import logging
import os
import tempfile
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import pytest

from prefork.connection import ClientDisconnected, peer_failed
from prefork.http.response import CONTINUE_100
from prefork.logs import Logs
from prefork.scoreboard import Scoreboard
from prefork.wsgi import FileWrapper, HeadCache, Input, Response, run_app
from tests.unit.test_wsgi import (
    EXPECT,
    TIMEOUT,
    Client,
    big_file,
    client,
    file_app,
    gen,
    get,
    make_response,
    parse_response,
    respond_once,
    responder,
    scoreboard,
    serve,
    serve_file,
    simple_app,
)

# test_wsgi.py's fixtures: pytest finds them among this module's names. Listed, since to
# ruff an import used only as a parameter name is unused, and the parameter a redefinition.
__all__ = ["big_file", "client", "scoreboard"]


class Collected(logging.Handler):
    """Keeps every record it is given."""

    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture
def app_errors(logs: Logs) -> Iterator[list[logging.LogRecord]]:
    """What the "prefork" logger is told during the test (HttpProtocol logs application
    errors there, with their traceback). Logs() (the `logs` fixture) stops propagation, so
    the handler goes on that logger itself, after Logs() has set it up."""
    handler = Collected()
    logger = logging.getLogger("prefork")
    logger.addHandler(handler)
    try:
        yield handler.records
    finally:
        logger.removeHandler(handler)


def errors_logged(records: list[logging.LogRecord]) -> list[str]:
    return [r.getMessage() for r in records if r.levelno >= logging.ERROR]


# --- 1: 100 Continue written into a response already under way ----------------------------
# Defect: Input sent "HTTP/1.1 100 Continue" on the first read even when the application had
# already sent the head (write() or a first chunk), so it landed inside the body.


def write_then_read(environ: dict[str, Any], start_response: Any) -> list[bytes]:
    write = start_response("200 OK", [("Content-Type", "text/plain")])
    write(b"early ")
    return [environ["wsgi.input"].read()]


def yield_then_read(environ: dict[str, Any], start_response: Any) -> Iterator[bytes]:
    start_response("200 OK", [("Content-Type", "text/plain")])
    yield b"early "
    yield environ["wsgi.input"].read()


@pytest.mark.parametrize("app", [write_then_read, yield_then_read], ids=["write", "yield"])
def test_no_100_continue_once_the_response_head_was_sent(client: Client, app: Any) -> None:
    client.peer.sendall(b"abcde")  # the body, sent after the client's own wait for a 100
    response, raw = serve(client, app, EXPECT)
    assert b"100 Continue" not in raw
    parsed = parse_response(raw)
    assert parsed.status == b"200 OK"
    assert parsed.value(b"transfer-encoding") == b"chunked"
    assert parsed.body == b"early abcde" and parsed.rest == b""
    # the head went out while the client still waited for a 100: whether it would send the
    # body was unknown, so the head said the connection closes (RFC 9110 15.5)
    assert parsed.value(b"connection") == b"close" and not response.keep_alive


def test_no_100_continue_after_the_head_through_http_protocol(
    logs: Logs, scoreboard: Scoreboard
) -> None:
    """The same through HttpProtocol.respond, which builds wsgi.input and the Response."""
    proto, client = responder(write_then_read, logs, scoreboard)
    try:
        client.peer.sendall(b"abcde")
        request = client.request(EXPECT)
        keep = proto.respond(client.conn, request, True)
        raw = client.pending()
    finally:
        client.close()
    assert b"100 Continue" not in raw
    parsed = parse_response(raw)
    assert parsed.body == b"early abcde" and parsed.rest == b""
    assert parsed.value(b"connection") == b"close" and not keep and request.complete


def test_100_continue_still_sent_when_only_start_response_was_called(client: Client) -> None:
    """start_response records the head but sends nothing: the 100 still goes out first."""

    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        start_response("200 OK", [])
        return [environ["wsgi.input"].read()]

    client.peer.sendall(b"abcde")
    response, raw = serve(client, app, EXPECT)
    assert raw.startswith(CONTINUE_100) and raw.count(b"100 Continue") == 1
    assert parse_response(raw[len(CONTINUE_100) :]).body == b"abcde"
    assert response.keep_alive


def test_input_without_a_response_still_sends_100_continue(client: Client) -> None:
    """An Input nobody linked to a response (a replaced wsgi.input's inner stream) keeps the
    old behaviour."""
    request = client.request(EXPECT)
    client.peer.sendall(b"abcde")
    stream = Input(client.conn, request, TIMEOUT)
    assert stream.read() == b"abcde"
    assert client.pending() == CONTINUE_100


# --- 2: Content-Length: 0 for HEAD --------------------------------------------------------
# Defect: an application answering HEAD with an empty iterable (Werkzeug returns ()) and no
# Content-Length got "Content-Length: 0", claiming the GET body is empty (RFC 9110 8.6).


def werkzeug_like(environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
    start_response("200 OK", [("Content-Type", "text/html")])
    return () if environ["REQUEST_METHOD"] == "HEAD" else [b"<p>hello</p>"]


@pytest.mark.parametrize(
    "body",
    [lambda: (), lambda: [], lambda: [b""], lambda: [b"", b""], lambda: gen(), lambda: gen(b"")],
    ids=["tuple", "list", "one-empty", "two-empty", "gen", "gen-empty-item"],
)
def test_head_with_empty_body_sends_no_content_length(
    client: Client, body: Callable[[], Iterable[bytes]]
) -> None:
    response, raw = serve(client, simple_app(body()), get(b"1.1", b"HEAD"))
    parsed = parse_response(raw, no_body=True)
    assert parsed.status == b"200 OK"
    assert parsed.value(b"content-length") is None
    assert parsed.value(b"transfer-encoding") is None  # nothing follows, nothing is chunked
    assert parsed.value(b"connection") is None
    assert parsed.rest == b""
    assert response.keep_alive and not response.chunked
    assert response.bytes_sent == 0


def test_head_with_empty_body_on_http10_keep_alive(client: Client) -> None:
    response, raw = serve(client, simple_app(()), get(b"1.0", b"HEAD", b"Connection: keep-alive"))
    parsed = parse_response(raw, no_body=True)
    assert parsed.value(b"content-length") is None
    assert parsed.value(b"connection") == b"keep-alive"
    assert parsed.rest == b""
    assert response.keep_alive


def test_head_then_get_pipelined_stay_framed(logs: Logs, scoreboard: Scoreboard) -> None:
    """The HEAD answer claims no length, the GET answer has its own; the connection stays."""
    proto, client = responder(werkzeug_like, logs, scoreboard)
    try:
        client.conn.parser.feed(get(b"1.1", b"HEAD") + get())
        keep = proto.serve(client.conn, True)
        raw = client.pending()
    finally:
        client.close()
    assert keep
    head = parse_response(raw, no_body=True)
    assert head.status == b"200 OK"
    assert head.value(b"content-length") is None
    following = parse_response(head.rest)
    assert following.value(b"content-length") == b"12"
    assert following.body == b"<p>hello</p>" and following.rest == b""


# --- 3: a 1xx status from the application ----------------------------------------------------
# Defect: start_response("100 Continue") or ("101 ...") was sent as the final status; the
# client then waits for a final response that never comes.

INTERIM = ["100 Continue", "101 Switching Protocols", "103 Early Hints", "199 Whatever"]


@pytest.mark.parametrize("heads", [None, {}], ids=["uncached", "cached"])
@pytest.mark.parametrize("status", INTERIM)
def test_interim_status_from_the_app_is_an_error(
    client: Client, status: str, heads: HeadCache | None
) -> None:
    for _ in range(2):  # a refused head is never cached: refused again
        with pytest.raises(ValueError, match="interim"):
            serve(client, simple_app([b"x"], status=status), get(), heads)
    assert client.pending() == b""
    assert not heads


def lazy_switch(environ: dict[str, Any], start_response: Any) -> Iterator[bytes]:
    start_response("101 Switching Protocols", [("Upgrade", "websocket")])
    yield b""


@pytest.mark.parametrize("lazy", [False, True], ids=["at-call", "in-iteration"])
def test_interim_status_is_answered_with_500(
    logs: Logs, scoreboard: Scoreboard, lazy: bool
) -> None:
    app = lazy_switch if lazy else simple_app([b"x"], status="101 Switching Protocols")
    keep, parsed = respond_once(app, logs, scoreboard)
    assert not keep
    assert parsed.status == b"500 Internal Server Error"


# --- 4: repeated and conflicting Content-Length from the application -------------------------
# Defect: every Content-Length the application gave was sent while the last one framed the
# body; differing values made the message unreadable.


@pytest.mark.parametrize("heads", [None, {}], ids=["uncached", "cached"])
@pytest.mark.parametrize("kind", ["list", "gen"])
@pytest.mark.parametrize(
    "repeat",
    [("Content-Length", "5"), ("content-length", "5"), ("CONTENT-LENGTH", "05")],
    ids=["same", "lower-case", "leading-zero"],
)
def test_repeated_content_length_is_sent_once(
    client: Client, heads: HeadCache | None, kind: str, repeat: tuple[str, str]
) -> None:
    headers = [("Content-Length", "5"), ("X-A", "1"), repeat]
    for _ in range(2):  # with a cache, the second answer comes from it
        body: Iterable[bytes] = [b"hello"] if kind == "list" else gen(b"hel", b"lo")
        response, raw = serve(client, simple_app(body, headers=list(headers)), get(), heads)
        parsed = parse_response(raw)
        assert parsed.values(b"content-length") == [b"5"]
        assert parsed.value(b"x-a") == b"1"
        assert parsed.value(b"transfer-encoding") is None
        assert parsed.body == b"hello" and parsed.rest == b""
        assert response.keep_alive


@pytest.mark.parametrize("heads", [None, {}], ids=["uncached", "cached"])
@pytest.mark.parametrize("kind", ["list", "gen"])
@pytest.mark.parametrize(
    "headers",
    [
        [("Content-Length", "5"), ("Content-Length", "3")],
        [("Content-Length", "5"), ("X-A", "1"), ("content-length", "50")],
        [("Content-Length", "0"), ("Content-Length", "5"), ("Content-Length", "5")],
    ],
)
def test_conflicting_content_lengths_are_an_error(
    client: Client, heads: HeadCache | None, kind: str, headers: list[tuple[str, str]]
) -> None:
    body: Iterable[bytes] = [b"hello"] if kind == "list" else gen(b"hello")
    with pytest.raises(ValueError, match="conflicting Content-Length"):
        serve(client, simple_app(body, headers=headers), get(), heads)
    assert client.pending() == b""
    assert not heads


def test_conflicting_content_lengths_are_answered_with_500(
    logs: Logs, scoreboard: Scoreboard
) -> None:
    headers = [("Content-Length", "5"), ("Content-Length", "3")]
    keep, parsed = respond_once(simple_app([b"hello"], headers=headers), logs, scoreboard)
    assert not keep
    assert parsed.status == b"500 Internal Server Error"


# --- 5: sendfile starting at the descriptor's offset, not the file object's -----------------
# Defect: sendfile started at os.lseek(fd), which for a buffered file that was partly read
# is where its read-ahead stopped, not where the application stood: the wrong range went out.


class TrackedFile(io.BufferedReader):
    """A buffered file that notes, when closed, where it stood and what it would read next."""

    def __init__(self, path: str) -> None:
        super().__init__(io.FileIO(path, "rb"))
        self.closed_at: tuple[int, bytes] | None = None

    def close(self) -> None:
        if not self.closed:
            self.closed_at = (self.tell(), self.read(16))
        super().close()


@pytest.fixture
def file_path() -> Iterator[tuple[str, bytes]]:
    """A 1 MB file under a name, to be opened as a plain buffered file (big_file's is open
    already, read-write), and its contents."""
    data = os.urandom(1 << 20)
    with tempfile.NamedTemporaryFile() as f:
        f.write(data)
        f.flush()
        yield f.name, data


@pytest.mark.parametrize(
    ("declared", "consumed"), [(None, 10), (None, 0), ("5000", 10), (None, 70_000)]
)
def test_sendfile_starts_where_the_file_object_stands(
    client: Client, file_path: tuple[str, bytes], declared: str | None, consumed: int
) -> None:
    path, data = file_path
    f = TrackedFile(path)
    assert f.read(consumed) == data[:consumed]
    if consumed:  # what the defect relied on: the read-ahead put the descriptor further on
        assert os.lseek(f.fileno(), 0, os.SEEK_CUR) > f.tell()
    headers = None if declared is None else [("Content-Length", declared)]
    response, raw = serve_file(client, file_app(f, headers), get())
    expected = data[consumed:] if declared is None else data[consumed : consumed + 5000]
    parsed = parse_response(raw)
    assert parsed.value(b"content-length") == str(len(expected)).encode()
    assert parsed.body == expected and parsed.rest == b""
    assert response.bytes_sent == len(expected)
    assert response.keep_alive
    # left after what was sent, as iterating would have left it: reading on goes on from there
    end = consumed + len(expected)
    assert f.closed_at == (end, data[end : end + 16])


def test_sendfile_past_the_end_sends_an_empty_body(
    client: Client, file_path: tuple[str, bytes]
) -> None:
    path, data = file_path
    f = TrackedFile(path)
    f.seek(len(data) + 100)
    response, raw = serve_file(client, file_app(f), get())
    parsed = parse_response(raw)
    assert parsed.value(b"content-length") == b"0"
    assert parsed.body == b"" and parsed.rest == b""
    assert response.keep_alive


def test_sendfile_of_a_descriptor_without_tell_uses_its_offset(
    client: Client, file_path: tuple[str, bytes]
) -> None:
    """An object with only fileno() and read(), an unbuffered file's (a read of its own
    would be iterated: see test_wsgi_findings): the descriptor's offset is all there is."""
    path, data = file_path

    class Descriptor:
        def __init__(self) -> None:
            self.file = open(path, "rb", buffering=0)  # noqa: SIM115 (closed below)
            self.fd = self.file.fileno()
            self.read = self.file.read

        def fileno(self) -> int:
            return self.fd

    raw_file = Descriptor()

    def app(environ: dict[str, Any], start_response: Any) -> FileWrapper:
        start_response("200 OK", [])
        return FileWrapper(raw_file)  # type: ignore[arg-type]

    try:
        os.lseek(raw_file.fd, 1000, os.SEEK_SET)
        response, raw = serve_file(client, app, get())
        assert os.lseek(raw_file.fd, 0, os.SEEK_CUR) == len(data)  # after what was sent
    finally:
        raw_file.file.close()
    parsed = parse_response(raw)
    assert parsed.value(b"content-length") == b"%d" % (len(data) - 1000)  # sent, not iterated
    assert parsed.body == data[1000:] and parsed.rest == b""
    assert response.keep_alive


# --- 6: send errors from the network classed as application errors ------------------------
# Defect: only ConnectionError became ClientDisconnected; TimeoutError (ETIMEDOUT) and
# EHOSTUNREACH and the like escaped as application errors, logged with a traceback.

PEER_ERRORS = [
    TimeoutError(errno.ETIMEDOUT, os.strerror(errno.ETIMEDOUT)),
    OSError(errno.EHOSTUNREACH, os.strerror(errno.EHOSTUNREACH)),
    OSError(errno.ENETUNREACH, os.strerror(errno.ENETUNREACH)),
    OSError(errno.EHOSTDOWN, os.strerror(errno.EHOSTDOWN)),
    OSError(errno.ENETDOWN, os.strerror(errno.ENETDOWN)),
    ConnectionResetError(errno.ECONNRESET, os.strerror(errno.ECONNRESET)),
    BrokenPipeError(errno.EPIPE, os.strerror(errno.EPIPE)),
]
OUR_ERRORS = [
    OSError(errno.EBADF, os.strerror(errno.EBADF)),
    OSError(errno.EINVAL, os.strerror(errno.EINVAL)),
    OSError(errno.ENOTSOCK, os.strerror(errno.ENOTSOCK)),
]


def ids(errors: list[OSError]) -> list[str]:
    return [errno.errorcode[e.errno] for e in errors if e.errno is not None]


class FailingSocket:
    """Stands in for Connection.sock: takes `accept` bytes of the first send (a partial
    send, so Connection.send waits and sends again), then fails with `error`."""

    def __init__(self, error: OSError, accept: int | None = None) -> None:
        self.error = error
        self.accept = accept
        self.calls = 0

    def send(self, data: Any, flags: int = 0) -> int:
        self.calls += 1
        if self.accept is not None:
            accepted, self.accept = self.accept, None
            return accepted
        raise self.error


@pytest.mark.parametrize("partial", [False, True], ids=["first-send", "later-send"])
@pytest.mark.parametrize("error", PEER_ERRORS, ids=ids(PEER_ERRORS))
def test_send_failing_for_the_network_is_a_disconnect(
    client: Client, error: OSError, partial: bool
) -> None:
    failing = FailingSocket(error, accept=1 if partial else None)
    client.conn.sock = failing  # type: ignore[assignment]
    with pytest.raises(ClientDisconnected, match=os.strerror(error.errno or 0)):
        client.conn.send(b"response bytes", TIMEOUT)
    assert failing.calls == (2 if partial else 1)
    assert peer_failed(error)


@pytest.mark.parametrize("partial", [False, True], ids=["first-send", "later-send"])
@pytest.mark.parametrize("error", OUR_ERRORS, ids=ids(OUR_ERRORS))
def test_send_failing_for_a_local_reason_stays_an_error(
    client: Client, error: OSError, partial: bool
) -> None:
    client.conn.sock = FailingSocket(error, accept=1 if partial else None)  # type: ignore[assignment]
    with pytest.raises(OSError) as raised:
        client.conn.send(b"response bytes", TIMEOUT)
    assert raised.value is error  # itself, not a ClientDisconnected
    assert not peer_failed(error)


@pytest.mark.parametrize(
    "error", [PEER_ERRORS[0], PEER_ERRORS[1]], ids=ids([PEER_ERRORS[0], PEER_ERRORS[1]])
)
def test_respond_treats_a_network_send_error_as_a_gone_client(
    logs: Logs,
    scoreboard: Scoreboard,
    app_errors: list[logging.LogRecord],
    error: OSError,
) -> None:
    proto, client = responder(simple_app([b"hello"]), logs, scoreboard)
    try:
        client.conn.sock = FailingSocket(error)  # type: ignore[assignment]
        keep = proto.respond(client.conn, client.request(get()), True)
    finally:
        client.close()
    assert keep is False
    assert errors_logged(app_errors) == []  # no "error handling ..." with a traceback


def test_respond_still_logs_a_local_send_error(
    logs: Logs, scoreboard: Scoreboard, app_errors: list[logging.LogRecord]
) -> None:
    proto, client = responder(simple_app([b"hello"]), logs, scoreboard)
    try:
        client.conn.sock = FailingSocket(OUR_ERRORS[0])  # type: ignore[assignment]
        keep = proto.respond(client.conn, client.request(get()), True)
    finally:
        client.close()
    assert keep is False
    assert [m for m in errors_logged(app_errors) if m.startswith("error handling GET")]


def sendfile_response(client: Client) -> tuple[Response, dict[str, Any]]:
    request = client.request(get())
    environ = {
        "REQUEST_METHOD": "GET",
        "wsgi.input": Input(client.conn, request, TIMEOUT),
        "wsgi.file_wrapper": FileWrapper,
    }
    return make_response(client, request), environ


@pytest.mark.parametrize("error", PEER_ERRORS, ids=ids(PEER_ERRORS))
def test_sendfile_failing_for_the_network_is_a_disconnect(
    client: Client,
    big_file: tuple[Any, bytes],
    monkeypatch: pytest.MonkeyPatch,
    error: OSError,
) -> None:
    f, _ = big_file

    def failing(out_fd: int, in_fd: int, offset: int, count: int) -> int:
        raise error

    monkeypatch.setattr(os, "sendfile", failing)
    response, environ = sendfile_response(client)
    with pytest.raises(ClientDisconnected):
        run_app(file_app(f), environ, response)
    assert f.closed  # the wrapper's close() ran all the same


def test_sendfile_failing_for_a_local_reason_stays_an_error(
    client: Client, big_file: tuple[Any, bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    f, _ = big_file
    error = OSError(errno.EINVAL, os.strerror(errno.EINVAL))

    def failing(out_fd: int, in_fd: int, offset: int, count: int) -> int:
        raise error

    monkeypatch.setattr(os, "sendfile", failing)
    response, environ = sendfile_response(client)
    with pytest.raises(OSError) as raised:
        run_app(file_app(f), environ, response)
    assert raised.value is error


# --- 7: a response that leaves the request body unread ---------------------------------------
# Defect: an application that answered without reading a body of more than 64 KiB (a 401 or
# a 413 to an upload) got a response saying nothing of the connection, which the server then
# closed: a client reusing it (nginx's upstream keep-alive, requests' pool) lost its next
# request. The head now says Connection: close whenever the rest of the body will not be
# read: too long to drain, of unknown length (chunked), or never asked for (Expect:
# 100-continue).


def refuse_unread(environ: dict[str, Any], start_response: Any) -> list[bytes]:
    start_response("401 Unauthorized", [("Content-Type", "text/plain")])
    return [b"no"]


@pytest.mark.parametrize(
    ("head", "sent", "keeps"),
    [
        (b"POST /u HTTP/1.1\r\nHost: t\r\nContent-Length: 3000000\r\n\r\n", b"x" * 1000, False),
        (b"POST /u HTTP/1.1\r\nHost: t\r\nContent-Length: 70000\r\n\r\n", b"x" * 1000, False),
        (b"POST /u HTTP/1.1\r\nHost: t\r\nContent-Length: 60000\r\n\r\n", b"x" * 1000, True),
        (b"POST /u HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n", b"5\r\nxxxxx\r\n",
         False),
        (b"POST /u HTTP/1.1\r\nHost: t\r\nExpect: 100-continue\r\nContent-Length: 5\r\n\r\n",
         b"", False),
        (b"POST /u HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\n\r\n", b"xxxxx", True),
    ],
    ids=["3MB", "over-the-drain-limit", "drainable", "chunked", "expect-100", "whole-body"],
)
def test_a_response_that_leaves_the_body_unread_says_whether_the_connection_stays(
    logs: Logs, scoreboard: Scoreboard, head: bytes, sent: bytes, keeps: bool
) -> None:
    proto, client = responder(refuse_unread, logs, scoreboard)
    try:
        request = client.request(head + sent)
        if keeps and not request.complete:  # the rest arrives while the server drains it
            client.peer.sendall(b"x" * (60000 - len(sent)))
        keep = proto.respond(client.conn, request, True)
        parsed = parse_response(client.pending())
    finally:
        client.close()
    assert parsed.status == b"401 Unauthorized"
    assert keep is keeps
    # the head said what the server then did
    assert (parsed.value(b"connection") == b"close") is not keeps


# --- 8: Server and Date set by the application ----------------------------------------------
# Defect: the server added its own Server and Date after the application's, so the response
# had two of each (Date is a singleton field, RFC 9110 6.6.1).


@pytest.mark.parametrize("names", [("Server", "Date"), ("SERVER", "date")])
def test_the_applications_server_and_date_replace_the_servers(
    logs: Logs, scoreboard: Scoreboard, names: tuple[str, str]
) -> None:
    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        start_response("200 OK", [(names[0], "myapp/2"),
                                  (names[1], "Mon, 01 Jan 2024 00:00:00 GMT")])
        return [b"ok"]

    proto, client = responder(app, logs, scoreboard)
    try:
        for _ in range(2):  # the second time from the head cache
            assert proto.respond(client.conn, client.request(get()), True)
            parsed = parse_response(client.pending())
            assert parsed.values(b"server") == [b"myapp/2"]
            assert parsed.values(b"date") == [b"Mon, 01 Jan 2024 00:00:00 GMT"]
        # an application that sets neither gets the server's
        proto.app = simple_app([b"hi"])
        assert proto.respond(client.conn, client.request(get()), True)
        parsed = parse_response(client.pending())
        assert parsed.values(b"server") == [b"preforkd-test"] and len(parsed.values(b"date")) == 1
    finally:
        client.close()
