"""HTTP/1.1 conformance and request smuggling (RFC 9110, RFC 9112), against a real preforkd
with 2 workers, compared with nginx's answers.

The tests marked DEFECT failed on the code they were written against; the others pin
behaviour no other test checked (see the note above each). Every server comes from a
ServerFactory (bound to port 0, stopped at teardown by process group) and runs APP_SOURCE;
every socket wait has a timeout. Not repeated here: the rejections of test_hardening.py
(framing, CL/TE, chunk syntax, obs-fold, versions, Host count, Expect) and test_http.py.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from harness import (
    Response,
    Server,
    ServerFactory,
    address,
    ask,
    connect,
    read_response,
    recv_until_close,
    recv_within,
)

APP_SOURCE = r'''
import json


def app(environ, start_response):
    path = environ["PATH_INFO"]
    if path == "/head-gen":
        # no Content-Length: a HEAD answer must still carry no body
        start_response("200 OK", [("Content-Type", "text/plain")])
        return iter([b"hel", b"lo"])
    if path == "/204":
        start_response("204 No Content", [("Content-Length", "5")])
        return [b"hello"]
    if path == "/304":
        start_response("304 Not Modified", [("Content-Length", "5")])
        return iter([b"hello"])
    if path == "/too-long":
        start_response("200 OK", [("Content-Length", "3")])
        return iter([b"hel", b"lo"])
    body = environ["wsgi.input"].read()
    keys = ("REQUEST_METHOD", "PATH_INFO", "QUERY_STRING", "RAW_URI", "SERVER_PROTOCOL",
            "HTTP_HOST", "HTTP_X_T")
    data = {key: environ[key] for key in keys if key in environ}
    data["body"] = body.decode("latin-1")
    start_response("200 OK", [("Content-Type", "application/json")])
    return [json.dumps(data).encode()]
'''

SMUGGLED = b"GET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n"
H = b"Host: x\r\n"
TE = b"Transfer-Encoding: chunked\r\n"


@pytest.fixture(scope="module")
def server(module_factory: ServerFactory) -> Server:
    return module_factory({"app": "app:app", "workers": {"count": 2}}, app_source=APP_SOURCE)


def environ_of(response: Response) -> dict[str, Any]:
    assert response.status == 200, response
    data: dict[str, Any] = json.loads(response.body)
    return data


def answer_and_rest(server: Server, data: bytes, timeout: float = 5.0) -> tuple[Response, bytes]:
    """Send `data` then a second, valid request in the same send; the first response and
    what the server sent after it before closing (AssertionError if it kept the connection
    open for `timeout`)."""
    with connect(address(server), timeout) as sock:
        sock.sendall(data + SMUGGLED)
        response = read_response(sock)
        rest = recv_until_close(sock, timeout)
    return response, rest


def assert_rejected(server: Server, data: bytes, status: int) -> None:
    """Answered `status` with Connection: close, the connection closed, and the request
    behind it never answered."""
    response, rest = answer_and_rest(server, data)
    assert response.status == status, response
    assert (response.header("Connection") or "").lower() == "close", response.headers
    assert rest == b"", f"bytes after the rejection (a smuggled answer?): {rest!r}"


def assert_cut_off(server: Server, data: bytes, status: int) -> None:
    """`data`, a request that never ends, is answered `status` with Connection: close while
    it arrives, and the connection closed within 5 s."""
    with connect(address(server)) as sock:
        sock.sendall(data)
        received, closed = recv_within(sock, 5.0)
    assert received.startswith(b"HTTP/1.1 %d " % status), received[:200]
    assert b"Connection: close\r\n" in received
    assert closed


def served(server: Server, data: bytes) -> dict[str, Any]:
    """`data` answered by the application on a connection that stays usable."""
    with connect(address(server)) as sock:
        sock.sendall(data)
        environ = environ_of(read_response(sock))
        ask(sock, "/after")  # the connection is still in step
    return environ


# --- DEFECT: methods llhttp parses only for RTSP (or the HTTP/2 preface) ---------------------
# RFC 9110 9.1: an unknown method on a well-formed HTTP/1.x line is 501, as BREW already
# was; these got 400 because llhttp refuses them only after reading "HTTP/". nginx answers
# any method token (200 from `return`), gunicorn passes it to the application.

RTSP_METHODS = ["PLAY", "SETUP", "ANNOUNCE", "RECORD", "TEARDOWN", "GET_PARAMETER",
                "SET_PARAMETER", "DESCRIBE", "PAUSE", "REDIRECT", "FLUSH", "PRI"]


@pytest.mark.parametrize("method", RTSP_METHODS)
def test_an_rtsp_method_on_an_http_request_line_gets_501(server: Server, method: str) -> None:
    """DEFECT (failed before the fix: 400)."""
    assert_rejected(server, method.encode() + b" / HTTP/1.1\r\n" + H + b"\r\n", 501)


def test_an_rtsp_method_after_empty_lines_gets_501(server: Server) -> None:
    """DEFECT (failed before the fix: 400). RFC 9112 2.2: empty lines before a request
    are ignored, so they change nothing."""
    assert_rejected(server, b"\r\n\r\nPLAY / HTTP/1.1\r\n" + H + b"\r\n", 501)


# --- DEFECT: RTSP/ICE request lines read as HTTP ----------------------------------------------
# RFC 9112 2.3: HTTP-name is "HTTP", case-sensitive. llhttp accepts "RTSP/x.y" for OPTIONS,
# GET and POST, and "ICE/x.y" for SOURCE, reporting only the digits: preforkd served them
# as HTTP/1.0 (SERVER_PROTOCOL "HTTP/1.0"). nginx answers 400 to each.

OTHER_PROTOCOLS = {
    "get-rtsp10": b"GET / RTSP/1.0\r\n" + H + b"\r\n",
    "get-rtsp11": b"GET / RTSP/1.1\r\n" + H + b"\r\n",
    "get-rtsp20": b"GET / RTSP/2.0\r\n" + H + b"\r\n",
    "post-rtsp": b"POST / RTSP/1.0\r\n" + H + b"Content-Length: 0\r\n\r\n",
    "options-rtsp": b"OPTIONS * RTSP/1.0\r\n" + H + b"\r\n",
    "source-ice": b"SOURCE / ICE/1.0\r\n" + H + b"\r\n",
    "after-empty-lines": b"\r\n\r\nGET / RTSP/1.0\r\n" + H + b"\r\n",
    "double-spaces": b"GET  /a  RTSP/1.0\r\n" + H + b"\r\n",
}


@pytest.mark.parametrize("name", list(OTHER_PROTOCOLS))
def test_a_request_line_of_another_protocol_gets_400(server: Server, name: str) -> None:
    """DEFECT (failed before the fix, except get-rtsp20: 505, now 400)."""
    assert_rejected(server, OTHER_PROTOCOLS[name], 400)


def test_a_request_line_of_another_protocol_on_a_kept_connection_gets_400(
    server: Server,
) -> None:
    """DEFECT (failed before the fix): the check is not only for a connection's first read."""
    with connect(address(server)) as sock:
        ask(sock)
        sock.sendall(b"GET /next RTSP/1.0\r\n" + H + b"\r\n" + SMUGGLED)
        response = read_response(sock)
        rest = recv_until_close(sock)
    assert response.status == 400, response
    assert rest == b""


# --- DEFECT: an endless trailer section -------------------------------------------------------
# httptools gathers each trailer field in memory, growing it by concatenation (quadratic),
# and hands it over only when the field ends: a head is cut off at max_header_size (+ one
# read) while it arrives, a trailer field was judged (max_field_size) only once whole, and
# is not counted in max_body_size. One connection sending a trailer value that never ends
# held a worker at full CPU, its memory growing (27 MB in 4 s here), until body_min_rate's
# grace ran out (body_timeout, 30 s by default). nginx skips trailers without buffering.


def test_a_trailer_field_that_never_ends_gets_431_while_it_arrives(server: Server) -> None:
    """DEFECT (failed before the fix: no answer, the worker kept reading)."""
    data = (
        b"POST /echo HTTP/1.1\r\n" + H + TE + b"\r\n5\r\nhello\r\n0\r\nX-T: "
        + b"a" * (65536 + 65536 + 4096)
    )
    assert_cut_off(server, data, 431)


def test_a_large_chunked_body_with_a_small_trailer_is_served(server: Server) -> None:
    """Pinned (new): the trailer bound does not count chunk data, however the chunks fall
    across reads; trailer fields never reach the environ (RFC 9110 6.5.1: a Host in the
    trailer section must not replace the header's)."""
    chunks = b"".join(b"%x\r\n%s\r\n" % (size, b"z" * size) for size in (65536, 1, 70000, 3))
    data = (
        b"POST /echo HTTP/1.1\r\n" + H + TE + b"\r\n"
        + chunks + b"0\r\nHost: evil\r\nX-T: trailer\r\n\r\n"
    )
    environ = served(server, data)
    assert len(environ["body"]) == 65536 + 1 + 70000 + 3
    assert environ["HTTP_HOST"] == "x"
    assert "HTTP_X_T" not in environ


@pytest.mark.parametrize("before", [b"", b"5\r\nhello\r\n"], ids=["first", "later"])
def test_a_chunk_extension_that_never_ends_gets_400_while_it_arrives(
    server: Server, before: bytes
) -> None:
    """DEFECT (failed before the fix: no answer, the worker kept reading). llhttp skips a
    chunk-size line's extensions without keeping them, so memory stays flat, but they are
    neither head nor body: an endless one held the worker for as long as the client sent it,
    at any speed above body_min_rate and past max_body_size. It is bounded as a head is."""
    data = b"POST /echo HTTP/1.1\r\n" + H + TE + b"\r\n" + before + b"3;x=" + b"a" * 140000
    assert_cut_off(server, data, 400)
    assert served(server, b"GET /next HTTP/1.1\r\n" + H + b"\r\n")["PATH_INFO"] == "/next"


# --- DEFECT: invalid Host values --------------------------------------------------------------
# RFC 9112 3.2: "A server MUST respond with a 400 ... to any request message that contains
# more than one Host header field line or a Host header field with an invalid field value."
# Host = uri-host [ ":" port ] (RFC 9110 7.2; RFC 3986 3.2.2). preforkd checked the count
# only, so an application building URLs or picking a site from HTTP_HOST got "a/b" or
# "x:abc". nginx refuses a space, "/" and a control character, not a bad port or "@";
# gunicorn checks nothing.

INVALID_HOSTS = [b"a b", b"a/b", b"x:abc", b"u@a", b"a\\b", b"a?b", b"[::1", "b\u00fccher".encode()]


@pytest.mark.parametrize("host", INVALID_HOSTS)
def test_an_invalid_host_gets_400(server: Server, host: bytes) -> None:
    """DEFECT (failed before the fix: served with that HTTP_HOST)."""
    assert_rejected(server, b"GET / HTTP/1.1\r\nHost: " + host + b"\r\n\r\n", 400)


def test_several_host_fields_in_http10_get_400(server: Server) -> None:
    """DEFECT (failed before the fix: served): the rule is for any request message, not
    only HTTP/1.1 (which test_hardening covers)."""
    assert_rejected(server, b"GET / HTTP/1.0\r\nHost: a\r\nHost: b\r\n\r\n", 400)


@pytest.mark.parametrize(
    "host",
    ["", "example.com", "EXAMPLE.com:8080", "127.0.0.1:80", "[::1]:8080", "[fe80::1%25eth0]",
     "my_host.local", "xn--bcher-kva.example", "a.example:"],
)
def test_a_valid_host_is_served(server: Server, host: str) -> None:
    """Pinned (new): every form RFC 3986 allows, an empty value (a target URI without an
    authority, RFC 9110 7.2) and an empty port (port = *DIGIT) included."""
    data = b"GET / HTTP/1.1\r\nHost: " + host.encode() + b"\r\n\r\n"
    assert served(server, data)["HTTP_HOST"] == host


# --- DEFECT: request-target forms the method cannot take ---------------------------------------
# RFC 9112 3.2.3-3.2.4: authority-form is only for CONNECT, asterisk-form only for a
# server-wide OPTIONS; 3.2: an invalid request-line SHOULD get 400. preforkd gave GET * to
# the application (PATH_INFO "*"), and CONNECT / too (PATH_INFO ""). nginx: 400 and 405.


@pytest.mark.parametrize(
    "line",
    [b"GET * HTTP/1.1", b"POST * HTTP/1.1", b"CONNECT / HTTP/1.1", b"CONNECT example.com HTTP/1.1",
     b"CONNECT http://example.com:443/ HTTP/1.1"],
)
def test_a_target_form_the_method_cannot_take_gets_400(server: Server, line: bytes) -> None:
    """DEFECT (failed before the fix: served)."""
    assert_rejected(server, line + b"\r\n" + H + b"\r\n", 400)


def test_options_asterisk_and_connect_authority_reach_the_application(server: Server) -> None:
    """Pinned (new): the forms each method does take. CONNECT ends HTTP on its connection
    (what follows would be tunnel data), so its answer closes the connection."""
    environ = served(server, b"OPTIONS * HTTP/1.1\r\n" + H + b"\r\n")
    assert (environ["REQUEST_METHOD"], environ["PATH_INFO"]) == ("OPTIONS", "*")
    data = b"CONNECT [::1]:443 HTTP/1.1\r\nHost: [::1]:443\r\n\r\n"
    response, rest = answer_and_rest(server, data)
    assert environ_of(response)["RAW_URI"] == "[::1]:443"
    assert rest == b""


# --- pinned: request-line and version handling -----------------------------------------------


def test_empty_lines_before_a_request_are_ignored(server: Server) -> None:
    """Pinned (new, over a socket; the parser's unit test has one CRLF): RFC 9112 2.2."""
    environ = served(server, b"\r\n\r\n\n" + b"GET /p HTTP/1.1\r\n" + H + b"\r\n")
    assert environ["PATH_INFO"] == "/p"


def test_extra_spaces_between_request_line_parts_are_accepted(server: Server) -> None:
    """Pinned (new): RFC 9112 3 lets a recipient split on whitespace runs (nginx does)."""
    environ = served(server, b"GET   /a?b   HTTP/1.1\r\n" + H + b"\r\n")
    assert (environ["RAW_URI"], environ["QUERY_STRING"]) == ("/a?b", "b")


@pytest.mark.parametrize(
    "line",
    [b"GET / http/1.1", b"GET / HTTP/1.10", b"GET / HTTP/01.1", b"GET / HTTP/1.1 ",
     b"GET\t/ HTTP/1.1", b" GET / HTTP/1.1"],
)
def test_malformed_versions_and_whitespace_get_400(server: Server, line: bytes) -> None:
    """Pinned (new): HTTP-name is case-sensitive and a version is one digit each side
    (RFC 9112 2.3); nginx serves HTTP/1.10 and a trailing space, RFC-allowed leniencies."""
    assert_rejected(server, line + b"\r\n" + H + b"\r\n", 400)


# --- pinned: responses that must not desynchronise the connection ------------------------------


@pytest.mark.parametrize(
    ("method", "path", "status", "length"),
    [("HEAD", "/head-gen", 200, None), ("GET", "/204", 204, None), ("GET", "/304", 304, "5")],
)
def test_a_response_without_a_body_stays_in_step_with_the_next_request(
    server: Server, method: str, path: str, status: int, length: str | None
) -> None:
    """Pinned (new): the application's body is dropped (RFC 9110 9.3.2, 15.3.5, 15.4.5); a
    204 has no Content-Length (8.6), a 304 keeps the application's; the pipelined request
    behind is answered next, on the same connection."""
    with connect(address(server)) as sock:
        sock.sendall(f"{method} {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode() + SMUGGLED)
        response = read_response(sock, method=method)
        assert (response.status, response.header("Content-Length")) == (status, length)
        assert environ_of(read_response(sock))["PATH_INFO"] == "/smuggled"
        extra, closed = recv_within(sock, 0.2)
    assert (extra, closed) == (b"", False)


def test_a_body_longer_than_its_content_length_is_cut_and_the_connection_closed(
    server: Server,
) -> None:
    """Pinned (new; a short one is test_regressions'): never a byte past the declared
    length, which the client would read as the next response."""
    response, rest = answer_and_rest(server, b"GET /too-long HTTP/1.1\r\n" + H + b"\r\n")
    assert (response.status, response.body) == (200, b"hel")
    assert rest == b""
