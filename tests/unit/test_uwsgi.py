"""protocol: uwsgi -- the packet parser (every input fed whole, byte by byte and in random
splits, which must agree; every malformed variant refused with its status, never another
exception), the environ UwsgiProtocol makes of the variables nginx's uwsgi_params sends, and
the configuration that turns it on."""

from __future__ import annotations

import select
import socket
import struct
import time
import types
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from prefork import config
from prefork.addresses import Address
from prefork.config import ConfigError, from_mapping
from prefork.connection import Connection
from prefork.forwarded import TrustedProxies
from prefork.hookargs import HookRequest
from prefork.http import Limits, ProtocolError
from prefork.http.uwsgi import (
    HTTP_ON_UWSGI,
    NO_METHOD,
    UwsgiParser,
    UwsgiRequest,
    parse_variables,
)
from prefork.httpserve import OUTSIDE_SCRIPT_NAME
from prefork.logs import Logs
from prefork.scoreboard import Scoreboard
from prefork.sockets import Listener
from prefork.uwsgiserve import FORBIDDEN, UwsgiProtocol
from tests.unit.splits import bytewise, split_at
from tests.unit.worker_rig import (
    WorkerRig,
    read_until_closed,
    receive_conns,
    served_connection,
)

FAST = settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# what nginx 1.22's /etc/nginx/uwsgi_params sends for `GET /caf%C3%A9/x?q=1` (HTTPS only
# when it is on), then the request's headers
NGINX_PARAMS = [
    ("QUERY_STRING", "q=1"), ("REQUEST_METHOD", "GET"), ("CONTENT_TYPE", ""),
    ("CONTENT_LENGTH", ""), ("REQUEST_URI", "/caf%C3%A9/x?q=1"),
    ("PATH_INFO", "/caf\xc3\xa9/x"), ("DOCUMENT_ROOT", "/usr/share/nginx/html"),
    ("SERVER_PROTOCOL", "HTTP/1.1"), ("REQUEST_SCHEME", "http"),
    ("REMOTE_ADDR", "203.0.113.7"), ("REMOTE_PORT", "51000"), ("SERVER_PORT", "80"),
    ("SERVER_NAME", "example.com"), ("HTTP_HOST", "example.com"),
    ("HTTP_USER_AGENT", "curl/8"), ("HTTP_ACCEPT", "*/*"),
]


def variables(pairs: Sequence[tuple[str, str] | tuple[bytes, bytes]]) -> bytes:
    """A vars block: each name and value preceded by its 16-bit little-endian size."""
    out = b""
    for name, value in pairs:
        for text in (name, value):
            raw = text if isinstance(text, bytes) else text.encode("latin-1")
            out += struct.pack("<H", len(raw)) + raw
    return out


def packet(
    pairs: Sequence[tuple[str, str] | tuple[bytes, bytes]] = NGINX_PARAMS,
    body: bytes = b"",
    modifier1: int = 0,
    modifier2: int = 0,
) -> bytes:
    block = variables(pairs)
    return struct.pack("<BHB", modifier1, len(block), modifier2) + block + body


def post(body: bytes, **more: str) -> list[tuple[str, str]]:
    pairs = dict(NGINX_PARAMS, REQUEST_METHOD="POST", CONTENT_LENGTH=str(len(body)),
                 CONTENT_TYPE="application/x-www-form-urlencoded")
    pairs.update(more)
    return list(pairs.items())


def parse(pieces: Sequence[bytes], limits: Limits | None = None) -> dict[str, Any]:
    """Feed `pieces` in order: the request (its variables, body, completeness), or the status
    of the ProtocolError. Any other exception propagates: that is a bug."""
    parser = UwsgiParser(limits or Limits())
    try:
        for piece in pieces:
            parser.feed(piece)
    except ProtocolError as exc:
        return {"error": exc.status, "reason": exc.reason}
    requests = list(parser.requests)
    assert len(requests) <= 1
    if not requests:
        return {"requests": 0, "idle": parser.idle}
    request = requests[0]
    assert isinstance(request, UwsgiRequest)
    return {
        "variables": request.variables,
        "method": request.method,
        "target": request.target,
        "path": request.path,
        "query": request.query,
        "protocol": request.protocol,
        "headers": request.headers,
        "content_length": request.content_length,
        "body": b"".join(request.body),
        "complete": request.complete,
        "idle": parser.idle,
    }


def parse_all_ways(data: bytes, limits: Limits | None = None) -> dict[str, Any]:
    whole = parse([data], limits)
    assert parse(bytewise(data), limits) == whole
    assert parse(split_at(data, [1, 3, 4, 5, len(data) // 2, len(data) - 1]), limits) == whole
    return whole


# --- the packet ------------------------------------------------------------------------


def test_nginx_request_is_read_whole_bytewise_and_split() -> None:
    got = parse_all_ways(packet())
    assert got["method"] == "GET"
    assert got["target"] == b"/caf%C3%A9/x?q=1"
    assert (got["path"], got["query"]) == (b"/caf%C3%A9/x", b"q=1")
    assert got["protocol"] == "HTTP/1.1"
    # nginx's empty CONTENT_LENGTH and CONTENT_TYPE mean none (as HTTP's environ has none)
    assert "CONTENT_LENGTH" not in got["variables"]
    assert "CONTENT_TYPE" not in got["variables"]
    assert got["variables"]["PATH_INFO"] == "/caf\xc3\xa9/x"  # bytes as latin-1 (PEP 3333)
    assert (b"USER-AGENT", b"curl/8") in got["headers"]
    assert got["content_length"] is None
    assert got["complete"] and got["idle"]


@given(cuts=st.lists(st.integers(min_value=0, max_value=400), max_size=8))
@FAST
def test_any_split_of_a_post_gives_the_same_request(cuts: list[int]) -> None:
    data = packet(post(b"a=1&b=2" * 20), b"a=1&b=2" * 20)
    assert parse(split_at(data, cuts)) == parse([data])


def test_post_body_is_read_to_content_length_and_not_further() -> None:
    body = b"name=value&x=" + b"y" * 3000
    got = parse_all_ways(packet(post(body), body + b"TRAILING GARBAGE"))
    assert got["body"] == body and got["content_length"] == len(body)
    assert got["complete"] and got["idle"]
    parser = UwsgiParser(Limits())
    parser.feed(packet(post(body), body[:10]))
    request = parser.requests[0]
    assert not request.complete and not parser.idle  # the body is still to come
    parser.feed_body(body[10:], request)
    assert request.complete and request.body_size == len(body) and parser.idle


def test_an_incomplete_header_or_block_waits_for_more() -> None:
    data = packet()
    for end in (1, 3, 4, 20, len(data) - 1):
        got = parse([data[:end]])
        assert got == {"requests": 0, "idle": False}, end


def test_modifier2_and_modifier1_30_are_taken() -> None:
    assert parse([packet(modifier2=7)])["method"] == "GET"
    parser = UwsgiParser(Limits())
    parser.feed(packet(modifier1=30))
    request = parser.requests[0]
    assert isinstance(request, UwsgiRequest) and request.modifier1 == 30


def test_large_variables_up_to_the_16_bit_size() -> None:
    big = "x" * (65535 - len(variables(NGINX_PARAMS)) - 4 - len("BIG"))
    data = packet([*NGINX_PARAMS, ("BIG", big)])
    assert struct.unpack_from("<H", data, 1)[0] == 65535
    got = parse_all_ways(data)
    assert got["variables"]["BIG"] == big


def test_repeated_headers_are_joined_and_wsgi_keys_dropped() -> None:
    got = parse([packet([*NGINX_PARAMS, ("HTTP_X_FOO", "1"), ("HTTP_X_FOO", "2"),
                         ("HTTP_COOKIE", "a=1"), ("HTTP_COOKIE", "b=2"),
                         ("wsgi.input", "x"), ("SERVER_NAME", "last.example")])])
    assert got["variables"]["HTTP_X_FOO"] == "1, 2"  # uWSGI keeps only "2"
    assert got["variables"]["HTTP_COOKIE"] == "a=1; b=2"
    assert "wsgi.input" not in got["variables"]
    assert got["variables"]["SERVER_NAME"] == "last.example"


def test_content_headers_are_only_a_fallback_for_the_variables() -> None:
    # nginx passes the client's Content-Length and Content-Type as HTTP_* too; CGI (and
    # preforkd's HTTP environ) has them only as CONTENT_*
    pairs = [*post(b"abc"), ("HTTP_CONTENT_LENGTH", "3"), ("HTTP_CONTENT_TYPE", "text/x")]
    got = parse([packet(pairs, b"abc")])
    assert got["variables"]["CONTENT_LENGTH"] == "3"
    assert got["variables"]["CONTENT_TYPE"] == "application/x-www-form-urlencoded"
    assert "HTTP_CONTENT_LENGTH" not in got["variables"]
    # without uwsgi_params' CONTENT_LENGTH, the header frames the body
    bare = [("REQUEST_METHOD", "PUT"), ("HTTP_CONTENT_LENGTH", "3")]
    got = parse([packet(bare, b"abcdef")])
    assert got["body"] == b"abc" and got["variables"]["CONTENT_LENGTH"] == "3"


def test_head_so_far_names_a_refused_request() -> None:
    parser = UwsgiParser(Limits(max_body_size=10))
    with pytest.raises(ProtocolError):
        parser.feed(packet(post(b"x" * 11)))
    head = parser.head_so_far()
    assert head is not None
    assert head[:3] == ("POST", b"/caf%C3%A9/x?q=1", "1.1")
    assert UwsgiParser(Limits()).head_so_far() is None


MALFORMED = [
    # (what, bytes, status, reason part)
    ("modifier1 5 (PSGI)", packet(modifier1=5), 400, "modifier1"),
    ("an HTTP request", b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", 400, HTTP_ON_UWSGI),
    ("an HTTP POST, 4 bytes", b"POST", 400, HTTP_ON_UWSGI),
    ("a TLS hello", b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03", 400, "modifier1"),
    ("a name's size past the block", b"\x00\x04\x00\x00" + b"\x09\x00AB", 400, "overruns"),
    ("a value's size past the block",
     b"\x00\x09\x00\x00" + b"\x01\x00A" + b"\x09\x00BCDE", 400, "overruns"),
    ("a value's size cut in half", b"\x00\x04\x00\x00" + b"\x01\x00A\x01", 400, "overruns"),
    ("one byte left over", packet()[:1] + struct.pack("<H", len(variables(NGINX_PARAMS)) + 1)
     + packet()[3:] + b"\x00", 400, "overruns"),
    ("a name of size 0", b"\x00\x05\x00\x00" + b"\x00\x00\x01\x00x", 400, "without a name"),
    ("no REQUEST_METHOD", packet([("PATH_INFO", "/")]), 400, NO_METHOD),
    ("an empty packet", b"\x00\x00\x00\x00", 400, "empty"),
    ("CONTENT_LENGTH not a number", packet(post(b"", CONTENT_LENGTH="1x")), 400, "CONTENT"),
    ("a negative CONTENT_LENGTH", packet(post(b"", CONTENT_LENGTH="-1")), 400, "CONTENT"),
]


@pytest.mark.parametrize(("data", "status", "reason"), [m[1:] for m in MALFORMED],
                         ids=[m[0] for m in MALFORMED])
def test_malformed_packets_are_refused(data: bytes, status: int, reason: str) -> None:
    got = parse_all_ways(data)
    assert got.get("error") == status, got
    assert reason in got["reason"]


def test_after_an_error_nothing_more_is_read() -> None:
    parser = UwsgiParser(Limits())
    with pytest.raises(ProtocolError):
        parser.feed(packet(modifier1=1))
    parser.feed(packet())  # a whole packet after it: not a request
    assert not parser.requests and not parser.idle  # the worker lingers, then closes


LIMITED = [
    # (what, limits, variables, status)
    ("the block over max_header_size", Limits(max_header_size=300), NGINX_PARAMS, 431),
    ("more headers than max_header_fields", Limits(max_header_fields=2), NGINX_PARAMS, 431),
    ("a header over max_field_size", Limits(max_field_size=64),
     [*NGINX_PARAMS, ("HTTP_COOKIE", "c" * 60)], 431),
    ("REQUEST_URI over max_request_line", Limits(max_request_line=64),
     [*NGINX_PARAMS, ("REQUEST_URI", "/" + "u" * 60)], 414),
    ("CONTENT_LENGTH over max_body_size", Limits(max_body_size=5), post(b"123456"), 413),
]


@pytest.mark.parametrize(("limits", "pairs", "status"), [m[1:] for m in LIMITED],
                         ids=[m[0] for m in LIMITED])
def test_limits_are_http_s(limits: Limits, pairs: list[tuple[str, str]], status: int) -> None:
    """An operator's http.* limits hold whichever protocol the request came in, with the
    statuses HTTP gives (431, 414, 413)."""
    assert parse_all_ways(packet(pairs), limits).get("error") == status
    # the same request within the limits is read
    assert "error" not in parse([packet(pairs)])


@given(data=st.binary(max_size=300))
@FAST
def test_garbage_is_refused_with_a_status_never_another_exception(data: bytes) -> None:
    parse([data])  # a ProtocolError is an answer; anything else would propagate


@given(pairs=st.lists(st.tuples(st.binary(min_size=1, max_size=20), st.binary(max_size=40)),
                      max_size=12))
@FAST
def test_any_well_formed_block_parses(pairs: list[tuple[bytes, bytes]]) -> None:
    data = packet([(b"REQUEST_METHOD", b"GET"), *pairs])
    got = parse_all_ways(data)
    # a number CONTENT_LENGTH frames a body that never came; anything else is an error or read
    assert "error" in got or got["method"] == "GET"


def reference_variables(block: bytes, limits: Limits) -> dict[str, str]:
    """parse_variables as the protocol reads: pair after pair, each size checked before it
    is used, the first fault the answer (an overrun or an empty name 400, a header over
    the limits 431), repeated headers joined, wsgi.* dropped."""
    at = 0
    variables: dict[str, str] = {}
    headers = 0

    def sized() -> str:
        nonlocal at
        if at + 2 > len(block):
            raise ProtocolError(400, "overrun")
        size = int.from_bytes(block[at : at + 2], "little")
        at += 2
        if at + size > len(block):
            raise ProtocolError(400, "overrun")
        at += size
        return block[at - size : at].decode("latin-1")

    while at < len(block):
        name, value = sized(), sized()
        if not name:
            raise ProtocolError(400, "no name")
        if name.startswith("HTTP_"):
            headers += 1
            if headers > limits.max_header_fields:
                raise ProtocolError(431, "too many")
            if len(name) - 5 + len(value) > limits.max_field_size:
                raise ProtocolError(431, "too large")
            if name in variables:
                variables[name] += ("; " if name == "HTTP_COOKIE" else ", ") + value
                continue
        elif name.startswith("wsgi."):
            continue
        variables[name] = value
    return variables


def outcome(parse_block: Any, block: bytes, limits: Limits) -> Any:
    try:
        return parse_block(block, limits)
    except ProtocolError as exc:
        return exc.status


NAMES = st.one_of(
    st.sampled_from([b"", b"HTTP_X", b"HTTP_COOKIE", b"HTTP_", b"wsgi.input", b"PATH_INFO"]),
    st.binary(max_size=8),
)


@given(
    pairs=st.lists(st.tuples(NAMES, st.binary(max_size=30)), max_size=8),
    cut=st.none() | st.integers(0, 300),
    extra=st.binary(max_size=4),
    fields=st.integers(1, 5),
    field_size=st.integers(1, 30),
    cuts=st.lists(st.integers(0, 400), max_size=4),
)
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
# a truncated header after a name of size 0, one whose size overruns the block: 400, not
# the 431 its claimed size or the header count gave when checked before the overrun
@example(pairs=[(b"", b""), (b"HTTP_COOKIE", b"")], cut=None, extra=b"", fields=1,
         field_size=1, cuts=[])
@example(pairs=[(b"HTTP_X", b"y" * 30)], cut=36, extra=b"", fields=5, field_size=10,
         cuts=[7])
def test_variables_are_read_as_the_reference_reads_them(
    pairs: list[tuple[bytes, bytes]], cut: int | None, extra: bytes, fields: int,
    field_size: int, cuts: list[int],
) -> None:
    """Random blocks, well formed or cut anywhere with bytes added: parse_variables (one
    pass, its overruns found after the loop) gives the reference's variables or its status,
    and so does the packet fed to UwsgiParser in random pieces."""
    block = variables([(b"REQUEST_METHOD", b"GET"), *pairs])
    if cut is not None:
        block = block[:cut] + extra
    limits = Limits(max_header_fields=fields, max_field_size=field_size)
    expected = outcome(reference_variables, block, limits)
    assert outcome(parse_variables, block, limits) == expected
    data = struct.pack("<BHB", 0, len(block), 0) + block
    got = parse(split_at(data, sorted(c for c in cuts if c < len(data))), limits)
    if isinstance(expected, int):
        assert got.get("error") == expected, got
    elif "error" not in got:
        # the parser's own checks (REQUEST_METHOD, CONTENT_LENGTH) may refuse it further
        body_of = {k: v for k, v in expected.items()
                   if k not in ("CONTENT_LENGTH", "CONTENT_TYPE", "HTTP_CONTENT_LENGTH",
                                "HTTP_CONTENT_TYPE")}
        assert {k: v for k, v in got["variables"].items() if k in body_of} == body_of


# --- the environ -----------------------------------------------------------------------

NGINX = ("127.0.0.1", 40000)
STRANGER = ("198.51.100.4", 40000)


@pytest.fixture
def scoreboard() -> Iterator[Scoreboard]:
    board = Scoreboard(2)
    yield board
    board.close()


class Rig:
    """A UwsgiProtocol and a connection to it on a socketpair."""

    def __init__(self, logs: Logs, scoreboard: Scoreboard, *, peer: Any = NGINX,
                 script_name: str = "", kind: str = "tcp") -> None:
        self.server, self.client = socket.socketpair()
        address = Address("unix", path="/run/u.sock") if kind == "unix" else Address(
            "tcp", "10.0.0.1", 3031)
        self.listener = types.SimpleNamespace(fd=1000, address=address, tls=False)
        self.conn = Connection(self.server, peer, self.listener, Limits(), UwsgiParser(Limits()))
        self.conn.trusted = TrustedProxies(["127.0.0.1", "::1", "unix"]).trusts(peer)
        self.protocol = UwsgiProtocol(
            None, scoreboard.slot(0), logs, 0, body_timeout=5.0, send_timeout=5.0,
            server_header="", script_name=script_name,
        )

    def environ(self, pairs: Sequence[tuple[str, str]] = NGINX_PARAMS,
                modifier1: int = 0) -> dict[str, Any]:
        self.conn.parser.feed(packet(pairs, modifier1=modifier1))
        return self.protocol.environ(self.conn, self.conn.parser.requests[0])

    def close(self) -> None:
        self.server.close()
        self.client.close()


@pytest.fixture
def rig(logs: Logs, scoreboard: Scoreboard) -> Iterator[Any]:
    made: list[Rig] = []

    def make(**options: Any) -> Rig:
        made.append(Rig(logs, scoreboard, **options))
        return made[-1]

    yield make
    for r in made:
        r.close()


def with_vars(**changes: str | None) -> list[tuple[str, str]]:
    """NGINX_PARAMS with variables replaced (None: left out) or added."""
    pairs = dict(NGINX_PARAMS)
    for key, value in changes.items():
        if value is None:
            pairs.pop(key, None)
        else:
            pairs[key] = value
    return list(pairs.items())


def test_environ_of_nginx_uwsgi_params(rig: Any) -> None:
    env = rig().environ()
    assert env["REQUEST_METHOD"] == "GET"
    assert env["SCRIPT_NAME"] == ""  # PEP 3333 requires it; uWSGI leaves it out
    assert env["PATH_INFO"] == "/caf\xc3\xa9/x"  # as nginx decoded it, not decoded twice
    assert env["QUERY_STRING"] == "q=1"
    assert env["REQUEST_URI"] == env["RAW_URI"] == "/caf%C3%A9/x?q=1"
    assert (env["SERVER_NAME"], env["SERVER_PORT"]) == ("example.com", "80")
    assert env["SERVER_PROTOCOL"] == "HTTP/1.1"
    assert (env["REMOTE_ADDR"], env["REMOTE_PORT"]) == ("203.0.113.7", "51000")
    assert env["HTTP_HOST"] == "example.com" and env["HTTP_USER_AGENT"] == "curl/8"
    assert env["DOCUMENT_ROOT"] == "/usr/share/nginx/html"  # every variable is a key
    assert env["wsgi.url_scheme"] == "http" and "HTTPS" not in env
    assert "CONTENT_LENGTH" not in env and "CONTENT_TYPE" not in env
    assert env["wsgi.version"] == (1, 0) and env["wsgi.multiprocess"] is True
    assert env["wsgi.input"].read() == b""


@pytest.mark.parametrize(
    ("changes", "scheme"),
    [
        ({"HTTPS": "on", "REQUEST_SCHEME": "https"}, "https"),
        ({"HTTPS": "1"}, "https"),
        ({"HTTPS": "off"}, "http"),
        ({"UWSGI_SCHEME": "https"}, "https"),  # uWSGI's own override
        ({"UWSGI_SCHEME": "https", "HTTPS": "off"}, "https"),
        ({"UWSGI_SCHEME": "gopher", "HTTPS": "on"}, "https"),  # not a scheme: HTTPS decides
        ({"REQUEST_SCHEME": "https"}, "http"),  # uwsgi_params sends HTTPS when it is on
    ],
)
def test_url_scheme_from_https_and_uwsgi_scheme(
    rig: Any, changes: dict[str, str], scheme: str
) -> None:
    assert rig().environ(with_vars(**changes))["wsgi.url_scheme"] == scheme


def test_missing_keys_are_completed(rig: Any) -> None:
    env = rig(peer=("10.9.8.7", 1234)).environ(with_vars(
        REMOTE_ADDR=None, REMOTE_PORT=None, SERVER_NAME=None, SERVER_PORT=None,
        PATH_INFO=None, SERVER_PROTOCOL=None, QUERY_STRING=None))
    assert (env["REMOTE_ADDR"], env["REMOTE_PORT"]) == ("10.9.8.7", "1234")  # the socket's
    assert (env["SERVER_NAME"], env["SERVER_PORT"]) == ("10.0.0.1", "3031")  # the listener's
    assert env["PATH_INFO"] == "/caf\xc3\xa9/x"  # REQUEST_URI's path, decoded
    assert env["SERVER_PROTOCOL"] == "HTTP/1.1"
    assert env["QUERY_STRING"] == ""
    env = rig().environ(with_vars(REQUEST_URI=None, QUERY_STRING="a=1"))
    assert env["REQUEST_URI"] == env["RAW_URI"] == "/caf%C3%A9/x?a=1"  # made from the rest


def test_dot_segments_leave_path_info(rig: Any) -> None:
    env = rig(script_name="/app").environ(with_vars(PATH_INFO="/app/../admin/x"))
    assert env["PATH_INFO"] == "/admin/x" and env.get(OUTSIDE_SCRIPT_NAME)


@pytest.mark.parametrize(
    ("modifier1", "script_name", "path_info", "mount", "expected", "static"),
    [
        # nginx: uwsgi_param SCRIPT_NAME /sn; uwsgi_modifier1 30; (PATH_INFO is $document_uri)
        (30, "/sn", "/sn/x", "", ("/sn", "/x"), "/sn/x"),
        (30, "/sn", "/sn", "", ("/sn", ""), "/sn"),
        (30, "/sn", "/snx", "", ("/sn", "/snx"), "/snx"),  # not under it, on whole segments
        # modifier1 0 takes them as they come (uWSGI does too)
        (0, "/sn", "/sn/x", "", ("/sn", "/sn/x"), "/sn/x"),
        # nginx cut the prefix itself (`set $path_info`): the static path puts it back
        (0, "/wiki", "/page", "", ("/wiki", "/page"), "/wiki/page"),
        # http.script_name, uWSGI's mount with manage-script-name: taken off PATH_INFO
        (0, "", "/app/x", "/app", ("/app", "/x"), "/app/x"),
        (0, "/app", "/app/x", "/app", ("/app", "/x"), "/app/x"),  # named already: not twice
        (30, "/p", "/p/app/x", "/app", ("/p/app", "/x"), "/p/app/x"),  # the proxy's, then ours
        # the proxy's SCRIPT_NAME is the mount already (uWSGI's mount behind nginx's
        # `uwsgi_modifier1 30`): not taken off twice
        (30, "/app", "/app/x", "/app", ("/app", "/x"), "/app/x"),
        (30, "/app", "/app/app/x", "/app", ("/app", "/app/x"), "/app/app/x"),
        (30, "/app", "/app", "/app", ("/app", ""), "/app"),
        (30, "/p/app", "/p/app/x", "/app", ("/p/app", "/x"), "/p/app/x"),
    ],
)
def test_script_name_and_path_info(
    rig: Any, modifier1: int, script_name: str, path_info: str, mount: str,
    expected: tuple[str, str], static: str,
) -> None:
    r = rig(script_name=mount)
    env = r.environ(with_vars(SCRIPT_NAME=script_name, PATH_INFO=path_info), modifier1)
    assert (env["SCRIPT_NAME"], env["PATH_INFO"]) == expected
    assert OUTSIDE_SCRIPT_NAME not in env
    assert r.protocol.static_path(r.conn.parser.requests[0]) == static


@pytest.mark.parametrize(
    ("modifier1", "script_name", "path_info"),
    [
        (30, "/app", "/other"),  # not under the proxy's SCRIPT_NAME, nor the mount
        (0, "/app", "/app/../other"),
        (30, "/app", "/app/../other"),
        (0, "", "/other"),
        (0, "/app", "x"),  # no slash: /appx is not under /app
        (0, "/app", "/x"),  # modifier1 0: PATH_INFO is whole, and not under the mount
    ],
)
def test_outside_the_mount_is_still_refused(
    rig: Any, modifier1: int, script_name: str, path_info: str
) -> None:
    env = rig(script_name="/app").environ(
        with_vars(SCRIPT_NAME=script_name, PATH_INFO=path_info), modifier1
    )
    assert env.get(OUTSIDE_SCRIPT_NAME), (env["SCRIPT_NAME"], env["PATH_INFO"])


def test_the_hooks_req_of_a_uwsgi_request(rig: Any) -> None:
    """gunicorn's pre_request(worker, req) reads the request as the proxy's client sent it:
    its version from SERVER_PROTOCOL (not the "1.0" of the response's framing), its uri,
    path and headers."""
    r = rig()
    env = r.environ(with_vars(SERVER_PROTOCOL="HTTP/1.1"))
    req = HookRequest(env, r.conn.parser.requests[0], r.conn)
    assert (req.method, req.uri, req.path, req.query) == (
        "GET", "/caf%C3%A9/x?q=1", "/caf%C3%A9/x", "q=1")
    assert req.version == (1, 1)
    assert ("USER-AGENT", "curl/8") in req.headers
    assert req.should_close()  # one request per connection


def test_a_peer_not_allowed_is_refused_before_the_application(rig: Any) -> None:
    r = rig(peer=STRANGER)
    r.conn.parser.feed(packet())
    with pytest.raises(ProtocolError) as caught:
        r.protocol.serve(r.conn, True)
    assert (caught.value.status, caught.value.reason) == (403, FORBIDDEN)
    assert rig(kind="unix", peer="").conn.trusted  # a unix-socket peer is allowed by default


# --- configuration ---------------------------------------------------------------------


def test_config_protocol_uwsgi_and_its_allow_list(tmp_path: Path) -> None:
    loaded = from_mapping({"app": "m:app", "protocol": "uwsgi"})
    assert loaded.protocol == "uwsgi"
    assert loaded.http.uwsgi_allow_ips == ("127.0.0.1", "::1", "unix")
    path = tmp_path / "c.yaml"
    path.write_text("app: m:app\nprotocol: uwsgi\nhttp:\n  uwsgi_allow_ips: [10.0.0.0/8, nginx]\n")
    with pytest.raises(ConfigError) as caught:
        config.load(str(path))
    assert str(caught.value).startswith(f"{path}:4: http.uwsgi_allow_ips[1]: must be an IP")
    path.write_text("app: m:app\nprotocol: uwsgi\nhttp:\n  keepalive_timeout: 3\n"
                    "  proxy_protocol: v1\n")
    with pytest.raises(ConfigError) as caught:
        config.load(str(path))
    assert str(caught.value).startswith(f"{path}:5: http.proxy_protocol: not with protocol uwsgi")


def test_listener_url_is_uwsgi_pass_s(tmp_path: Path) -> None:
    sock = socket.socket()
    try:
        listener = Listener(sock, Address("tcp", "127.0.0.1", 3031))
        assert listener.url("uwsgi") == "uwsgi://127.0.0.1:3031"
        listener.tls = True
        assert listener.url("uwsgi") == "suwsgi://127.0.0.1:3031"
    finally:
        sock.close()


# --- the worker --------------------------------------------------------------------------


def test_a_uwsgi_worker_answers_a_packet_and_closes(worker_rig: WorkerRig) -> None:
    worker, _ = worker_rig.worker(protocol="uwsgi")
    client = worker_rig.connect()
    client.sendall(packet())
    worker_rig.accept(worker)
    answer = read_until_closed(client)
    assert answer.startswith(b"HTTP/1.1 200 OK\r\n") and answer.endswith(b"\r\n\r\nok")
    assert b"Connection: close\r\n" in answer
    assert not worker.conns and worker.slot.requests == 1


def test_a_new_connection_passed_to_a_uwsgi_worker_is_read_as_uwsgi(
    worker_rig: WorkerRig,
) -> None:
    worker, _ = worker_rig.worker(protocol="uwsgi")
    client = worker_rig.connect()
    client.sendall(packet())
    sock = wait_until_accepted(worker_rig)
    (lid,) = worker.listener_ids
    worker.adopt([(sock.detach(), lid, time.monotonic() + 5)], fresh=True)
    assert read_until_closed(client).endswith(b"\r\n\r\nok")


@pytest.mark.parametrize("how", ["handed-over", "relieved"])
def test_an_http_keepalive_connection_is_not_read_as_uwsgi(
    worker_rig: WorkerRig, how: str
) -> None:
    """A reload that turns protocol http into uwsgi: the old generation's idle keep-alive
    connections (handed over, or passed by the relief thread) are closed by the new
    workers, as without a hand-over, not answered 400 as bad uwsgi packets."""
    old, old_master_end = worker_rig.worker(number=1)
    new, _ = worker_rig.worker(number=2, protocol="uwsgi")
    client = served_connection(worker_rig, old)
    (lid,) = old.listener_ids
    old.begin_stop()
    old.hand_over({lid})
    ((fd, listener, deadline),) = receive_conns(old_master_end)
    if how == "handed-over":
        new.adopt([(fd, listener, deadline)])
    else:
        new.adopt([(fd, listener, deadline)], fresh=True, served=True)
    assert not new.conns
    assert read_until_closed(client) == b""


def wait_until_accepted(rig: WorkerRig) -> socket.socket:
    deadline = time.monotonic() + 5
    while True:
        try:
            sock, _ = rig.listener.sock.accept()
            return sock
        except BlockingIOError:
            assert time.monotonic() < deadline, "nothing to accept"
            select.select([rig.listener.sock], [], [], 0.1)
