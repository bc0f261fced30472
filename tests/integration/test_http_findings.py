"""HTTP/1.1 and WSGI (PEP 3333) defects found by exploratory testing, against a real preforkd.

One test per defect; each failed on the code it was written against. Every server comes
from `server_factory` (bound to port 0, stopped at teardown) and runs APP_SOURCE below;
every socket wait has a timeout.
"""

from __future__ import annotations

import re
import time
from typing import Any

from harness import (
    Server,
    ServerFactory,
    address,
    connect,
    http_request,
    read_response,
    recv_until_close,
    recv_within,
)

APP_SOURCE = r'''
import os
import sys


def app(environ, start_response):
    path = environ["PATH_INFO"]
    if path == "/echo":
        body = environ["wsgi.input"].read()
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [body]
    if path == "/ctl-header":
        # a control character (U+0001) in a header value: not a valid field value
        start_response("200 OK", [("Content-Type", "text/plain"), ("X-Ctl", "a\x01b")])
        return [b"ok"]
    if path == "/ctl-reason":
        start_response("200 O\x01K", [("Content-Type", "text/plain")])
        return [b"ok"]
    if path == "/replaced":
        # PEP 3333: with exc_info, start_response replaces the headers stored before
        start_response(
            "200 OK",
            [("Date", "Thu, 01 Jan 2015 00:00:00 GMT"), ("Server", "app"),
             ("Connection", "close")],
        )
        try:
            raise ValueError("the application changes its mind")
        except ValueError:
            start_response(
                "404 Not Found", [("Content-Type", "text/plain")], sys.exc_info()
            )
        return [b"not here"]
    if path == "/boom":
        raise RuntimeError("deliberate failure")
    if path == "/framework-upload":
        # as Flask (handle_exception) and Django (response_for_exception) do: an exception
        # in the view becomes the framework's own 500 page
        try:
            data = environ["wsgi.input"].read()
        except Exception as exc:
            start_response("500 Internal Server Error", [("Content-Type", "text/plain")])
            return [b"framework 500: " + repr(exc).encode()]
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [str(len(data)).encode()]
    if path == "/protocol":
        # no Content-Length: framed by the server as HTTP/1.1 frames it (chunked)
        start_response("200 OK", [("Content-Type", "text/plain")])
        return iter([environ["SERVER_PROTOCOL"].encode()])
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [str(os.getpid()).encode()]
'''


def start(server_factory: ServerFactory, **more: Any) -> Server:
    return server_factory({"app": "app:app", "workers": {"count": 1}, **more},
                          app_source=APP_SOURCE)


def head_and_rest(raw: bytes) -> tuple[bytes, bytes]:
    head, sep, rest = raw.partition(b"\r\n\r\n")
    assert sep, f"no complete response head in {raw[:300]!r}"
    return head, rest


# --- 1: a client's X-Forwarded-Port kills the worker ----------------------------------------


def test_a_non_ascii_digit_in_x_forwarded_port_does_not_kill_the_worker(
    server_factory: ServerFactory,
) -> None:
    """forwarded.set_port tests str.isdigit(), which is true for U+00B2 (a latin-1 byte
    0xB2 in the header), then calls int() on it: ValueError outside the request's try
    block, and the worker process exits with every connection it holds. 127.0.0.1 is a
    trusted proxy by default, and a proxy that does not set X-Forwarded-Port itself
    passes the client's on."""
    server = start(server_factory)
    before = server.worker_pids()
    assert len(before) == 1
    request = b"GET / HTTP/1.1\r\nHost: x\r\nX-Forwarded-Port: \xb2\r\n\r\n"
    with connect(address(server)) as sock:
        sock.sendall(request)
        raw, _ = recv_within(sock, 3.0)
    assert raw.startswith(b"HTTP/1.1 200 "), f"no answer, the worker died: {raw!r}"
    assert "died unexpectedly" not in server.log()
    assert server.worker_pids() == before


# --- 2: pipelined requests before a closing or upgrade request are lost --------------------


def test_pipelined_requests_before_a_closing_request_are_all_answered(
    server_factory: ServerFactory,
) -> None:
    """GET, GET, GET with "Connection: close", then more bytes, in one write: the parser
    marks the connection `upgraded` when the trailing bytes arrive, HttpProtocol.serve
    passes keep_alive=False to every queued request, so the first one is answered with
    Connection: close and the second and third are never answered (RFC 9112 9.3.2 and
    9.6: each request is answered in order; the connection closes after the response to
    the request that carried close)."""
    server = start(server_factory)
    plain = http_request("GET", "/")
    closing = http_request("GET", "/", [("Connection", "close")])
    with connect(address(server)) as sock:
        sock.sendall(plain + plain + closing + plain)
        first = read_response(sock)
        assert first.status == 200
        assert (first.header("Connection") or "").lower() != "close", (
            "the first request did not ask to close; a later one did"
        )
        second = read_response(sock)
        assert second.status == 200
        third = read_response(sock)
        assert third.status == 200
        assert (third.header("Connection") or "").lower() == "close"
        assert recv_until_close(sock) == b""


def test_a_request_pipelined_before_an_upgrade_request_keeps_the_upgrade_answered(
    server_factory: ServerFactory,
) -> None:
    """GET then a GET with Upgrade: websocket (which preforkd answers as plain HTTP): the
    first is answered with Connection: close and the second, a complete request, never."""
    server = start(server_factory)
    upgrade = http_request("GET", "/", [("Connection", "Upgrade"), ("Upgrade", "websocket")])
    with connect(address(server)) as sock:
        sock.sendall(http_request("GET", "/") + upgrade)
        assert read_response(sock).status == 200
        try:
            second = read_response(sock)
        except EOFError as exc:
            raise AssertionError(f"the upgrade request was never answered: {exc}") from None
        assert second.status == 200


# --- 3: a malformed next request turns a valid request's answer into 400 -------------------


def test_a_malformed_pipelined_request_does_not_fail_the_request_before_it(
    server_factory: ServerFactory,
) -> None:
    """The head of a POST arrives, then its body together with a malformed next request.
    wsgi.Input._fill feeds the whole read to the parser, whose ProtocolError about the
    *next* request is raised from the application's wsgi.input.read(): the valid POST is
    answered 400 and its application never completes. Sent in one write, the same bytes
    get 200 then 400 (worker.answer_queued), as they should in any packetization."""
    server = start(server_factory)
    with connect(address(server)) as sock:
        sock.sendall(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\n")
        time.sleep(0.3)  # the application is waiting in wsgi.input.read()
        sock.sendall(b"helloGET / HTTP/1.1\r\nHost: x\r\nBad Header\r\n\r\n")
        first = read_response(sock)
        assert (first.status, first.body) == (200, b"hello"), first
        second = read_response(sock)
        assert second.status == 400


# --- 4: control characters in response header values and the reason phrase ----------------


def test_a_control_character_in_a_response_header_value_is_not_sent(
    server_factory: ServerFactory,
) -> None:
    """_check_head refuses only CR, LF and NUL in values (and the status line), so
    "X-Ctl: a<U+0001>b" goes out as is. RFC 9110 5.5 allows no CTL but HTAB in a field
    value (and RFC 9112 4 none in a reason phrase); strict clients (llhttp, Node's
    parser) reject the whole response. gunicorn answers 500 for such a header."""
    server = start(server_factory)
    for target in ("/ctl-header", "/ctl-reason"):
        with connect(address(server)) as sock:
            sock.sendall(http_request("GET", target, [("Connection", "close")]))
            raw = recv_until_close(sock)
        head, _ = head_and_rest(raw)
        assert not re.search(rb"[\x00-\x08\x0a-\x1f\x7f]", head.replace(b"\r\n", b"")), (
            f"{target}: invalid field or status line sent: {head!r}"
        )


# --- 5: exc_info replacement keeps effects of the replaced headers -------------------------


def test_headers_replaced_with_exc_info_leave_no_trace(server_factory: ServerFactory) -> None:
    """The application first sets Date, Server and Connection: close, then replaces its
    response with exc_info (PEP 3333) by a 404 with only Content-Type. Response._apply
    never restores the server's Date and Server lines nor keep-alive, so the 404 goes out
    without a Date (RFC 9110 6.6.1: MUST for a 4xx from an origin with a clock) and with
    Connection: close, none of which the headers that were sent asked for."""
    server = start(server_factory)
    with connect(address(server)) as sock:
        sock.sendall(http_request("GET", "/replaced"))
        response = read_response(sock)
    assert response.status == 404
    assert response.body == b"not here"
    assert response.header("Date") is not None, response.headers
    assert response.header("Server") == "preforkd", response.headers
    assert (response.header("Connection") or "").lower() != "close", response.headers


# --- 6: error responses to HEAD carry a body ------------------------------------------------


def test_the_servers_error_response_to_head_has_no_body(server_factory: ServerFactory) -> None:
    """HEAD to an application that raises: the 500 error page is sent with its body
    (26 bytes) after the head. RFC 9110 9.3.2: a server MUST NOT send content in a
    response to HEAD; a client reads those bytes as the start of the next response.
    The same page builder (http.response.error_response) answers every rejected HEAD."""
    server = start(server_factory)
    with connect(address(server)) as sock:
        sock.sendall(http_request("HEAD", "/boom"))
        raw = recv_until_close(sock)
    head, rest = head_and_rest(raw)
    assert head.startswith(b"HTTP/1.1 500 ")
    assert rest == b"", f"content after the head of a HEAD response: {rest!r}"


# --- 7: a higher HTTP/1.x minor version is refused ------------------------------------------


def test_a_higher_http1_minor_version_is_served_as_http11(server_factory: ServerFactory) -> None:
    """RFC 9110 2.5: a recipient that gets a higher minor version of a major version it
    implements SHOULD process the message as the highest minor version it conforms to, and
    answer with that version. "GET / HTTP/1.2" got 400 (llhttp's strict version check in
    http.parser); gunicorn serves it. Served as 1.1: a chunked response, the connection kept,
    SERVER_PROTOCOL as the client sent it; another major version is still 505."""
    server = start(server_factory)
    with connect(address(server)) as sock:
        sock.sendall(b"GET / HTTP/1.2\r\nHost: x\r\n\r\n")
        response = read_response(sock)
        assert response.status == 200, response
        assert int(response.body) in server.worker_pids()
        sock.sendall(b"GET /protocol HTTP/1.3\r\nHost: x\r\n\r\n")
        response = read_response(sock)
        assert response.status == 200, response
        assert response.header("transfer-encoding") == "chunked", response
        assert response.body == b"HTTP/1.3"
    with connect(address(server)) as sock:
        sock.sendall(b"GET / HTTP/1.2\r\nHost: x\r\nConnection: close\r\n\r\n")
        raw = recv_until_close(sock)
    assert raw.startswith(b"HTTP/1.1 200 "), raw
    with connect(address(server)) as sock:
        sock.sendall(b"GET / HTTP/3.1\r\nHost: x\r\n\r\n")
        response = read_response(sock)
    assert response.status == 505, response


# --- 8: max_body_size's 413 becomes the framework's 500 for a chunked body ------------------


def test_a_chunked_body_over_max_body_size_is_answered_413_behind_a_framework(
    server_factory: ServerFactory,
) -> None:
    """http.max_body_size says a bigger body "is answered with 413". A chunked body can
    only be measured while the application reads it: Input._fill raises the parser's
    ProtocolError (a plain Exception) out of wsgi.input.read(), and run_app sends whatever
    the application answers. Every framework turns an exception in a view into its own
    500 page (and an error report), so the client gets 500, not 413, and the server's
    status is lost (respond() only answers 413 if the exception escapes the app)."""
    server = start(server_factory, http={"max_body_size": 1000})
    with connect(address(server)) as sock:
        sock.sendall(
            b"POST /framework-upload HTTP/1.1\r\nHost: x\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n"
        )
        time.sleep(0.3)  # the application is reading the body
        sock.sendall(b"800\r\n" + b"a" * 0x800 + b"\r\n0\r\n\r\n")
        response = read_response(sock)
    assert response.status == 413, response
    # a chunk size that is not hex: the framing broke, 400 whatever the application says
    with connect(address(server)) as sock:
        sock.sendall(
            b"POST /framework-upload HTTP/1.1\r\nHost: x\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n"
        )
        time.sleep(0.3)  # the application is reading the body
        sock.sendall(b"zz\r\nabc\r\n0\r\n\r\n")
        response = read_response(sock)
        assert response.status == 400, response
        assert response.header("connection") == "close"


# --- review: a queued request whose body already broke reached the application -------------


def test_a_queued_request_whose_body_broke_is_answered_by_the_server(
    server_factory: ServerFactory,
) -> None:
    """The end of one body arrives with the next request, whose chunked body is already
    malformed (or over max_body_size) in the same read: the error waited its turn, but the
    broken request stayed queued and went to the application, whose wsgi.input then waited
    for bytes that never come; the connection closed at body_timeout with no answer. The
    first request is answered, then the broken one gets its 400 (or 413) from the server."""
    cases = {
        b"zz\r\n": 400,  # not a chunk size
        b"14\r\n" + b"y" * 20 + b"\r\n": 413,  # over max_body_size
    }
    server = start(server_factory, http={"body_timeout": 5, "max_body_size": 10})
    for broken, status in cases.items():
        with connect(address(server), timeout=10) as sock:
            sock.sendall(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\n")
            time.sleep(0.3)  # the application waits in wsgi.input.read()
            sock.sendall(b"hello" b"POST /echo HTTP/1.1\r\nHost: x\r\n"
                         b"Transfer-Encoding: chunked\r\n\r\n" + broken)
            first = read_response(sock)
            assert (first.status, first.body) == (200, b"hello")
            second = read_response(sock)
        assert second.status == status, second
        assert second.header("connection") == "close"


def test_a_rejected_head_request_gets_no_body(server_factory: ServerFactory) -> None:
    """RFC 9110 9.3.2: a response to HEAD has no content, error responses included; a HEAD
    whose declared body is over max_body_size got its 413 with the error page after it."""
    server = start(server_factory, http={"max_body_size": 10})
    with connect(address(server)) as sock:
        sock.sendall(b"HEAD / HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n" + b"x" * 100)
        raw = recv_until_close(sock)
    head, rest = head_and_rest(raw)
    assert head.startswith(b"HTTP/1.1 413 "), raw
    assert rest == b"", raw
