"""RequestParser, Limits and the response helpers: h11-style, every input is fed whole, then one
byte at a time, then in random splits, and all three must agree."""

from __future__ import annotations

import re
import time
from collections.abc import Sequence
from email.utils import parsedate_to_datetime
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from prefork.http import Limits, ProtocolError, Request, RequestParser
from prefork.http import response as http_response
from prefork.http.parser import split_target
from prefork.http.response import (
    CONTINUE_100,
    LAST_CHUNK,
    DateCache,
    chunk,
    error_response,
    status_line,
)
from tests.unit.splits import bytewise, split_at

# Every status a ProtocolError may carry (errors.py, plus 408 raised by the worker).
ERROR_STATUSES = {400, 408, 413, 414, 417, 431, 501, 505}

FAST = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# ---------------------------------------------------------------------------------------
# feeding helpers


def summary(request: Request) -> dict[str, Any]:
    """What a request means, independent of how its body was cut into chunks."""
    return {
        "method": request.method,
        "target": request.target,
        "path": request.path,
        "query": request.query,
        "version": request.version,
        "headers": list(request.headers),
        "keep_alive": request.keep_alive,
        "content_length": request.content_length,
        "chunked": request.chunked,
        "expect_continue": request.expect_continue,
        "upgrade": request.upgrade,
        "body": b"".join(request.body),
        "body_size": request.body_size,
        "complete": request.complete,
    }


def parse(pieces: Sequence[bytes], limits: Limits | None = None) -> dict[str, Any]:
    """Feed `pieces` in order. The outcome: parsed requests, or the error status.

    Feeding stops once the parser reports an upgrade: nothing after that is HTTP.
    Any exception other than ProtocolError propagates (that is always a bug).
    """
    parser = RequestParser(limits or Limits())
    try:
        for piece in pieces:
            parser.feed(piece)
            if parser.upgraded:
                break
    except ProtocolError as exc:
        assert isinstance(exc.status, int)
        return {"error": exc.status}
    return {
        "requests": [summary(r) for r in parser.requests],
        "upgraded": parser.upgraded,
        "idle": parser.idle,
    }


def parse_all_ways(data: bytes, limits: Limits | None = None) -> dict[str, Any]:
    """Parse whole and one byte at a time; both must agree. Returns the outcome."""
    whole = parse([data], limits)
    assert parse(bytewise(data), limits) == whole, "one byte at a time differs from whole"
    return whole


def check_random_splits(data: bytes, cuts: list[int], limits: Limits | None = None) -> None:
    assert parse(split_at(data, cuts), limits) == parse([data], limits)


def cuts_for(data: bytes) -> st.SearchStrategy[list[int]]:
    return st.lists(st.integers(0, len(data)), max_size=12)


def head(first: bytes, *fields: bytes) -> bytes:
    return first + b"\r\n" + b"".join(f + b"\r\n" for f in fields) + b"\r\n"


# ---------------------------------------------------------------------------------------
# valid requests: explicit expectations, then split equivalence

HOST = b"Host: example.com"

CHUNKED_BODY = (
    b"5;name=value\r\nhello\r\n"
    b"1;flag\r\n \r\n"
    b'5;q="quoted ; ext"\r\nworld\r\n'
    b"0\r\nTrailer-One: a\r\nTrailer-Two: b\r\n\r\n"
)

PIPELINE = (
    head(b"POST /one HTTP/1.1", HOST, b"Content-Length: 3")
    + b"abc"
    + head(b"GET /two?x HTTP/1.1", HOST)
    + head(b"POST /three HTTP/1.1", HOST, b"Transfer-Encoding: chunked")
    + b"2\r\nxy\r\n0\r\n\r\n"
    + head(b"HEAD /four HTTP/1.1", HOST, b"Connection: close")
)

# name -> (input, [expected subset of each request's summary], parser.upgraded)
VALID: dict[str, tuple[bytes, list[dict[str, Any]], bool]] = {
    "get_with_headers": (
        head(b"GET /path/to?a=1&b=2 HTTP/1.1", HOST, b"User-Agent: t/1", b"X-Empty:"),
        [
            {
                "method": "GET",
                "target": b"/path/to?a=1&b=2",
                "path": b"/path/to",
                "query": b"a=1&b=2",
                "version": "1.1",
                "headers": [(b"Host", b"example.com"), (b"User-Agent", b"t/1"), (b"X-Empty", b"")],
                "keep_alive": True,
                "content_length": None,
                "chunked": False,
                "body": b"",
                "complete": True,
            }
        ],
        False,
    ),
    "leading_ows_trimmed_and_obs_text_kept": (
        head(b"GET / HTTP/1.1", HOST, b"X-A:  \t padded", b"X-B: caf\xe9\tx"),
        [{"headers": [(b"Host", b"example.com"), (b"X-A", b"padded"), (b"X-B", b"caf\xe9\tx")]}],
        False,
    ),
    "post_content_length": (
        head(b"POST /submit HTTP/1.1", HOST, b"Content-Length: 11") + b"hello world",
        [
            {
                "method": "POST",
                "content_length": 11,
                "chunked": False,
                "body": b"hello world",
                "body_size": 11,
                "complete": True,
            }
        ],
        False,
    ),
    "content_length_zero": (
        head(b"POST / HTTP/1.1", HOST, b"Content-Length: 0"),
        [{"content_length": 0, "body": b"", "complete": True}],
        False,
    ),
    "content_length_ows": (
        head(b"POST / HTTP/1.1", HOST, b"Content-Length:   4  ") + b"abcd",
        [{"content_length": 4, "body": b"abcd"}],
        False,
    ),
    "chunked_with_extensions_and_trailers": (
        head(b"POST /up HTTP/1.1", HOST, b"Transfer-Encoding: chunked") + CHUNKED_BODY,
        [
            {
                "chunked": True,
                "content_length": None,
                "body": b"hello world",
                "body_size": 11,
                "complete": True,
                # trailers are not merged into the head's fields
                "headers": [(b"Host", b"example.com"), (b"Transfer-Encoding", b"chunked")],
            }
        ],
        False,
    ),
    "chunked_coding_case_insensitive": (
        head(b"POST / HTTP/1.1", HOST, b"Transfer-Encoding: Chunked") + b"1\r\nz\r\n0\r\n\r\n",
        [{"chunked": True, "body": b"z"}],
        False,
    ),
    "chunked_hex_sizes": (
        head(b"POST / HTTP/1.1", HOST, b"Transfer-Encoding: chunked")
        + b"A\r\n0123456789\r\n1f\r\n"
        + b"x" * 31
        + b"\r\n0\r\n\r\n",
        [{"body": b"0123456789" + b"x" * 31, "body_size": 41}],
        False,
    ),
    "pipelined": (
        PIPELINE,
        [
            {"method": "POST", "path": b"/one", "body": b"abc", "complete": True},
            {"method": "GET", "path": b"/two", "query": b"x", "body": b"", "complete": True},
            {"method": "POST", "path": b"/three", "chunked": True, "body": b"xy"},
            {"method": "HEAD", "path": b"/four", "keep_alive": False, "complete": True},
        ],
        False,
    ),
    "leading_empty_lines_ignored": (
        b"\r\n\r\n" + head(b"GET / HTTP/1.1", HOST),
        [{"method": "GET", "path": b"/"}],
        False,
    ),
    "http10_closes_by_default_and_needs_no_host": (
        head(b"GET / HTTP/1.0"),
        [{"version": "1.0", "keep_alive": False, "headers": []}],
        False,
    ),
    "http10_keep_alive": (
        head(b"GET / HTTP/1.0", b"Connection: keep-alive"),
        [{"version": "1.0", "keep_alive": True}],
        False,
    ),
    "http10_with_host_and_body": (
        head(b"POST / HTTP/1.0", HOST, b"Content-Length: 2") + b"hi",
        [{"version": "1.0", "keep_alive": False, "body": b"hi"}],
        False,
    ),
    "http11_connection_close": (
        head(b"GET / HTTP/1.1", HOST, b"Connection: close"),
        [{"version": "1.1", "keep_alive": False}],
        False,
    ),
    "http11_connection_token_list": (
        head(b"GET / HTTP/1.1", HOST, b"Connection: foo, Close"),
        [{"keep_alive": False}],
        False,
    ),
    "absolute_form": (
        head(b"GET http://example.com/a?b HTTP/1.1", HOST),
        [{"target": b"http://example.com/a?b", "path": b"/a", "query": b"b"}],
        False,
    ),
    "absolute_form_without_path": (
        head(b"GET http://example.com:8080 HTTP/1.1", HOST),
        [{"path": b"/", "query": b""}],
        False,
    ),
    "asterisk_form": (
        head(b"OPTIONS * HTTP/1.1", HOST),
        [{"method": "OPTIONS", "target": b"*", "path": b"*", "query": b""}],
        False,
    ),
    "query_split_on_first_question_mark": (
        head(b"GET /p%20q?x=1?y=2&z HTTP/1.1", HOST),
        [{"path": b"/p%20q", "query": b"x=1?y=2&z"}],
        False,
    ),
    "empty_query": (
        head(b"GET /p? HTTP/1.1", HOST),
        [{"path": b"/p", "query": b""}],
        False,
    ),
    "expect_100_continue": (
        head(b"PUT /f HTTP/1.1", HOST, b"Expect: 100-Continue", b"Content-Length: 3") + b"abc",
        [{"expect_continue": True, "body": b"abc"}],
        False,
    ),
    # RFC 9110 10.1.1: a 100-continue expectation in an HTTP/1.0 request MUST be ignored.
    "expect_100_continue_ignored_in_http10": (
        head(b"PUT /f HTTP/1.0", b"Expect: 100-continue", b"Content-Length: 3") + b"abc",
        [{"expect_continue": False, "body": b"abc"}],
        False,
    ),
    # an Expect list's empty elements expect nothing; so does an empty field (gunicorn and
    # nginx ignore it; a 417 for it refused requests those servers took)
    "expect_empty_field_is_no_expectation": (
        head(b"PUT /f HTTP/1.1", HOST, b"Expect:", b"Content-Length: 3") + b"abc",
        [{"expect_continue": False, "body": b"abc"}],
        False,
    ),
    "expect_list_with_empty_elements": (
        head(b"PUT /f HTTP/1.1", HOST, b"Expect: , 100-continue,", b"Content-Length: 3") + b"abc",
        [{"expect_continue": True, "body": b"abc"}],
        False,
    ),
    "upgrade": (
        head(b"GET /ws HTTP/1.1", HOST, b"Connection: Upgrade", b"Upgrade: websocket")
        + b"\x81\x05not-http",
        [{"path": b"/ws", "upgrade": True, "complete": True}],
        True,
    ),
    "upgrade_header_without_connection_upgrade_is_ignored": (
        head(b"GET / HTTP/1.1", HOST, b"Upgrade: websocket"),
        [{"upgrade": False}],
        False,
    ),
}


@pytest.mark.parametrize("name", list(VALID))
def test_valid_request(name: str) -> None:
    data, expected, upgraded = VALID[name]
    outcome = parse_all_ways(data)
    assert "error" not in outcome, outcome
    assert outcome["upgraded"] is upgraded
    assert outcome["idle"] is True
    assert len(outcome["requests"]) == len(expected)
    for got, want in zip(outcome["requests"], expected, strict=True):
        assert {key: got[key] for key in want} == want


@pytest.mark.parametrize("name", list(VALID))
@FAST
@given(data=st.data())
def test_valid_request_random_splits(name: str, data: st.DataObject) -> None:
    raw = VALID[name][0]
    check_random_splits(raw, data.draw(cuts_for(raw), label="cuts"))


def test_trailing_ows_trimmed() -> None:
    outcome = parse_all_ways(head(b"GET / HTTP/1.1", HOST, b"X-A: padded \t "))
    assert outcome["requests"][0]["headers"][1] == (b"X-A", b"padded")


def test_head_is_published_before_the_body_arrives() -> None:
    parser = RequestParser(Limits())
    parser.feed(head(b"POST / HTTP/1.1", HOST, b"Content-Length: 6"))
    assert not parser.idle
    (request,) = parser.requests
    assert request.content_length == 6
    assert not request.complete
    parser.feed(b"abc")
    assert list(request.body) == [b"abc"] and not request.complete
    request.body.popleft()  # a consumer takes chunks as they come
    parser.feed(b"def")
    assert list(request.body) == [b"def"]
    assert request.complete and request.body_size == 6
    assert parser.idle


@pytest.mark.parametrize("taken", [False, True], ids=["queued", "taken-by-the-app"])
def test_bytes_after_a_closing_request_are_ignored_even_once_it_left_the_queue(
    taken: bool,
) -> None:
    """Defect: the bytes after a Connection: close request were ignored only while it was
    still queued; once the application had taken it and was reading its body, the read that
    ended the body and carried them raised a 400 into wsgi.input."""
    parser = RequestParser(Limits())
    parser.feed(head(b"POST / HTTP/1.1", HOST, b"Connection: close", b"Content-Length: 5"))
    (request,) = parser.requests
    if taken:
        parser.requests.popleft()  # as the worker does before the application reads the body
    parser.feed(b"hello" + head(b"GET /next HTTP/1.1", HOST))
    assert request.complete and list(request.body) == [b"hello"]
    assert parser.upgraded  # nothing after it is read as HTTP
    assert len(parser.requests) == (0 if taken else 1)


def test_idle_only_between_messages() -> None:
    parser = RequestParser(Limits())
    assert parser.idle
    parser.feed(b"G")
    assert not parser.idle
    parser.feed(b"ET / HTTP/1.1\r\nHost: a\r\n\r\n")
    assert parser.idle
    parser.feed(b"GET /2 HTTP/1.1\r\n")
    assert not parser.idle
    assert [r.target for r in parser.requests] == [b"/"]


def test_pipelined_bodies_stay_with_their_request() -> None:
    parser = RequestParser(Limits())
    parser.feed(PIPELINE)
    first, second, third, fourth = parser.requests
    assert b"".join(first.body) == b"abc"
    assert not second.body and second.body_size == 0
    assert b"".join(third.body) == b"xy"
    assert not fourth.body


def test_header_lookup_is_case_insensitive_and_returns_first() -> None:
    parser = RequestParser(Limits())
    parser.feed(head(b"GET / HTTP/1.1", HOST, b"X-Dup: one", b"x-dup: two"))
    request = parser.requests[0]
    assert request.header(b"x-dup") == b"one"
    assert request.header(b"host") == b"example.com"
    assert request.header(b"missing") is None


@pytest.mark.parametrize(
    ("target", "path", "query"),
    [
        (b"/", b"/", b""),
        (b"/a/b", b"/a/b", b""),
        (b"/a?", b"/a", b""),
        (b"/a?b=c&d", b"/a", b"b=c&d"),
        (b"/a?b?c", b"/a", b"b?c"),
        (b"/a#frag", b"/a", b""),
        (b"/a?b#frag?x", b"/a", b"b"),
        (b"*", b"*", b""),
        (b"http://h/x?y", b"/x", b"y"),
        (b"https://h:443", b"/", b""),
    ],
)
def test_split_target(target: bytes, path: bytes, query: bytes) -> None:
    assert split_target(target)[:2] == (path, query)


@pytest.mark.parametrize(
    ("target", "authority"),
    [
        (b"/a?b", None),
        (b"*", None),
        (b"http://h/x?y", b"h"),
        (b"https://h:443", b"h:443"),
        (b"http://[::1]:80?q", b"[::1]:80"),
        (b"HTTP://Example.COM/#f", b"Example.COM"),
    ],
)
def test_split_target_authority(target: bytes, authority: bytes | None) -> None:
    assert split_target(target)[2] == authority


@pytest.mark.parametrize("target", [b"http://user:pw@example.com:8080/a", b"http://@a/", b"x://u@h"])
def test_split_target_refuses_userinfo(target: bytes) -> None:
    """RFC 9110 4.2.4: userinfo in a target is treated as an error, as nginx does."""
    with pytest.raises(ProtocolError) as caught:
        split_target(target)
    assert caught.value.status == 400


def test_absolute_form_host_replaces_the_host_field() -> None:
    """RFC 9112 3.2.2: the target's host information is used, the Host field ignored; an
    HTTP/1.1 request still needs one, and HTTP/1.0 gets one from the target."""
    outcome = parse_all_ways(head(b"GET http://a.example:81/p?q HTTP/1.1", b"Host: b.example"))
    request = outcome["requests"][0]
    assert (request["path"], request["query"]) == (b"/p", b"q")
    assert request["headers"] == [(b"Host", b"a.example:81")]
    outcome = parse_all_ways(head(b"GET http://a.example/ HTTP/1.0", b"X: 1"))
    assert outcome["requests"][0]["headers"] == [(b"X", b"1"), (b"Host", b"a.example")]
    assert parse_all_ways(head(b"GET http://a.example/ HTTP/1.1"))["error"] == 400


def test_upgrade_stops_http_parsing() -> None:
    parser = RequestParser(Limits())
    parser.feed(head(b"GET / HTTP/1.1", HOST, b"Connection: upgrade", b"Upgrade: h2c") + b"GARBAGE")
    assert parser.upgraded
    assert [r.upgrade for r in parser.requests] == [True]


def test_connect_sets_upgraded() -> None:
    data = head(b"CONNECT example.com:443 HTTP/1.1", b"Host: example.com:443") + b"tunnel"
    outcome = parse_all_ways(data)
    assert outcome["upgraded"] is True
    (request,) = outcome["requests"]
    assert request["method"] == "CONNECT"
    assert request["target"] == b"example.com:443"


@pytest.mark.parametrize(
    "target", [b"http://", b"http://[::1", b"http://example.com:99999/", b"http://a:b@"]
)
def test_unparseable_absolute_form_is_400(target: bytes) -> None:
    outcome = parse_all_ways(head(b"GET " + target + b" HTTP/1.1", HOST))
    assert outcome == {"error": 400}


def test_parser_stays_dead_after_an_error() -> None:
    parser = RequestParser(Limits())
    with pytest.raises(ProtocolError):
        parser.feed(b"G(T / HTTP/1.1\r\n")
    with pytest.raises(ProtocolError) as again:
        parser.feed(head(b"GET / HTTP/1.1", HOST))
    assert again.value.status == 400
    assert not parser.requests


# RFC 9110 9.1: a method is case-sensitive, and an unrecognized one gets 501
NOT_IMPLEMENTED = {
    "unknown": head(b"BREW /pot HTTP/1.1", HOST),
    "lowercase": head(b"get / HTTP/1.1", HOST),
    "after_empty_lines": b"\r\n\r\n" + head(b"FOO / HTTP/1.1", HOST),
    "extending_a_known_one": head(b"GETX / HTTP/1.1", HOST),
    "http10": head(b"BREW / HTTP/1.0"),
}


@pytest.mark.parametrize("name", list(NOT_IMPLEMENTED))
def test_a_well_formed_request_line_with_an_unknown_method_is_501(name: str) -> None:
    assert parse([NOT_IMPLEMENTED[name]]) == {"error": 501}


@pytest.mark.parametrize("name", list(NOT_IMPLEMENTED))
@FAST
@given(data=st.data())
def test_an_unknown_method_is_refused_however_it_is_split(
    name: str, data: st.DataObject
) -> None:
    """501 when the request line is all in the read where llhttp refuses it; split (one
    byte at a time, a client typing), 400: what it refused is not all there to judge."""
    raw = NOT_IMPLEMENTED[name]
    outcome = parse(split_at(raw, data.draw(cuts_for(raw), label="cuts")))
    assert outcome in ({"error": 501}, {"error": 400})
    assert parse(bytewise(raw)) == {"error": 400}


def test_an_unknown_method_after_a_request_in_the_same_read_is_400() -> None:
    """Where the refused method begins in a read that ended a request first is unknown."""
    parser = RequestParser(Limits())
    with pytest.raises(ProtocolError) as refused:
        parser.feed(head(b"GET / HTTP/1.1", HOST) + head(b"BREW / HTTP/1.1", HOST))
    assert refused.value.status == 400
    assert [request.method for request in parser.requests] == ["GET"]
    alone = RequestParser(Limits())
    alone.feed(head(b"GET / HTTP/1.1", HOST))
    with pytest.raises(ProtocolError) as refused:
        alone.feed(head(b"BREW / HTTP/1.1", HOST))
    assert refused.value.status == 501


def test_protocol_error_carries_status_and_reason() -> None:
    exc = ProtocolError(431, "too big")
    assert exc.status == 431
    assert exc.reason == "too big"
    assert str(exc) == "431 too big"


# ---------------------------------------------------------------------------------------
# rejections: (input, status, limits)

SMALL = Limits(
    max_request_line=32,
    max_header_fields=4,
    max_field_size=40,
    max_header_size=120,
    max_body_size=10,
)

TE = b"Transfer-Encoding: chunked"

REJECT: dict[str, tuple[bytes, int, Limits | None]] = {
    # request line
    "invalid_method_char": (head(b"G(T / HTTP/1.1", HOST), 400, None),
    "method_not_a_token": (head(b"G@T / HTTP/1.1", HOST), 400, None),
    "method_then_tab": (head(b"BREW\t/ HTTP/1.1", HOST), 400, None),
    "response_line_as_request": (b"HTTP/1.1 200 OK\r\n\r\n", 400, None),
    "unknown_method_without_version": (b"THIS IS NOT HTTP\r\n\r\n", 400, None),
    "proxy_header_as_request": (
        b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r\n" + head(b"GET / HTTP/1.1", HOST), 400, None
    ),
    "unknown_method_bare_lf": (b"BREW / HTTP/1.1\nHost: a\n\n", 400, None),
    "bad_version_protocol": (head(b"GET / HTXP/1.1", HOST), 400, None),
    "bad_version_suffix": (head(b"GET / HTTP/1.1x", HOST), 400, None),
    "bad_version_digits": (head(b"GET / HTTP/a.b", HOST), 400, None),
    "bad_version_no_minor": (head(b"GET / HTTP/1", HOST), 400, None),
    "bare_lf_line_endings": (b"GET / HTTP/1.1\nHost: a\n\n", 400, None),
    "space_in_target": (head(b"GET /a b HTTP/1.1", HOST), 400, None),
    "nul_in_target": (head(b"GET /a\x00b HTTP/1.1", HOST), 400, None),
    "ctl_in_target": (head(b"GET /a\x01b HTTP/1.1", HOST), 400, None),
    "del_in_target": (head(b"GET /a\x7fb HTTP/1.1", HOST), 400, None),
    "tab_in_target": (head(b"GET /a\tb HTTP/1.1", HOST), 400, None),
    "bare_cr_in_target": (head(b"GET /a\rb HTTP/1.1", HOST), 400, None),
    "target_not_a_path": (head(b"GET foo HTTP/1.1", HOST), 400, None),
    "target_only_query": (head(b"GET ?x HTTP/1.1", HOST), 400, None),
    # header fields
    "nul_in_value": (head(b"GET / HTTP/1.1", HOST, b"X: a\x00b"), 400, None),
    "ctl_in_value": (head(b"GET / HTTP/1.1", HOST, b"X: a\x01b"), 400, None),
    "bare_cr_in_value": (head(b"GET / HTTP/1.1", HOST, b"X: a\rb"), 400, None),
    "bare_lf_after_field": (b"GET / HTTP/1.1\r\nHost: a\nX: y\r\n\r\n", 400, None),
    "nul_in_name": (head(b"GET / HTTP/1.1", HOST, b"X\x00: b"), 400, None),
    "space_before_colon": (head(b"GET / HTTP/1.1", HOST, b"X-Foo : bar"), 400, None),
    "tab_before_colon": (head(b"GET / HTTP/1.1", HOST, b"X-Foo\t: bar"), 400, None),
    "empty_name": (head(b"GET / HTTP/1.1", HOST, b": bar"), 400, None),
    "no_colon": (head(b"GET / HTTP/1.1", HOST, b"NoColon"), 400, None),
    "obs_fold_space": (head(b"GET / HTTP/1.1", HOST, b"X: a", b" folded"), 400, None),
    "obs_fold_tab": (head(b"GET / HTTP/1.1", HOST, b"X: a", b"\tfolded"), 400, None),
    "whitespace_before_first_field": (head(b"GET / HTTP/1.1", b" Host: a"), 400, None),
    # framing (RFC 9112 section 6)
    "content_length_and_transfer_encoding": (
        head(b"POST / HTTP/1.1", HOST, b"Content-Length: 5", TE) + b"0\r\n\r\n",
        400,
        None,
    ),
    "transfer_encoding_and_content_length": (
        head(b"POST / HTTP/1.1", HOST, TE, b"Content-Length: 5") + b"0\r\n\r\n",
        400,
        None,
    ),
    "two_different_content_lengths": (
        head(b"POST / HTTP/1.1", HOST, b"Content-Length: 3", b"Content-Length: 4") + b"abcd",
        400,
        None,
    ),
    # RFC 9110 8.6 lets a recipient either reject identical repeats or fold them; llhttp
    # rejects before RequestParser._check_framing can fold them, so the outcome is 400.
    "same_content_length_repeated": (
        head(b"POST / HTTP/1.1", HOST, b"Content-Length: 3", b"Content-Length: 3") + b"abc",
        400,
        None,
    ),
    "content_length_list": (
        head(b"POST / HTTP/1.1", HOST, b"Content-Length: 3, 3") + b"abc",
        400,
        None,
    ),
    "content_length_plus": (head(b"POST / HTTP/1.1", HOST, b"Content-Length: +5"), 400, None),
    "content_length_minus": (head(b"POST / HTTP/1.1", HOST, b"Content-Length: -1"), 400, None),
    "content_length_hex": (head(b"POST / HTTP/1.1", HOST, b"Content-Length: 0x10"), 400, None),
    "content_length_trailing_junk": (
        head(b"POST / HTTP/1.1", HOST, b"Content-Length:  5a"),
        400,
        None,
    ),
    "content_length_empty": (head(b"POST / HTTP/1.1", HOST, b"Content-Length:"), 400, None),
    "content_length_non_ascii_digit": (
        head(b"POST / HTTP/1.1", HOST, "Content-Length: \u0665".encode()),
        400,
        None,
    ),
    "content_length_overflow": (
        head(b"POST / HTTP/1.1", HOST, b"Content-Length: 99999999999999999999999"),
        400,
        None,
    ),
    "transfer_encoding_in_http10": (
        head(b"POST / HTTP/1.0", TE) + b"0\r\n\r\n",
        400,
        None,
    ),
    "transfer_encoding_empty": (
        head(b"POST / HTTP/1.1", HOST, b"Transfer-Encoding:"),
        400,
        None,
    ),
    # RFC 9112 6.3 item 4: chunked present but not final -> MUST 400.
    "chunked_not_last": (
        head(b"POST / HTTP/1.1", HOST, b"Transfer-Encoding: chunked, gzip"),
        400,
        None,
    ),
    "chunked_twice": (
        head(b"POST / HTTP/1.1", HOST, b"Transfer-Encoding: chunked, chunked"),
        400,
        None,
    ),
    "chunked_twice_in_two_fields": (
        head(b"POST / HTTP/1.1", HOST, TE, TE) + b"0\r\n\r\n",
        400,
        None,
    ),
    # RFC 9112 6.1: a transfer coding the server does not understand -> 501.
    "unsupported_coding_before_chunked": (
        head(b"POST / HTTP/1.1", HOST, b"Transfer-Encoding: gzip, chunked") + b"0\r\n\r\n",
        501,
        None,
    ),
    "unsupported_coding_in_own_field": (
        head(b"POST / HTTP/1.1", HOST, b"Transfer-Encoding: gzip", TE) + b"0\r\n\r\n",
        501,
        None,
    ),
    "chunk_size_not_hex": (
        head(b"POST / HTTP/1.1", HOST, TE) + b"zz\r\nabc\r\n0\r\n\r\n",
        400,
        None,
    ),
    "chunk_size_with_space": (
        head(b"POST / HTTP/1.1", HOST, TE) + b"3 \r\nabc\r\n0\r\n\r\n",
        400,
        None,
    ),
    "chunk_size_overflow": (
        head(b"POST / HTTP/1.1", HOST, TE) + b"ffffffffffffffffff\r\nabc\r\n0\r\n\r\n",
        400,
        None,
    ),
    "chunk_data_longer_than_declared": (
        head(b"POST / HTTP/1.1", HOST, TE) + b"3\r\nabcdef\r\n0\r\n\r\n",
        400,
        None,
    ),
    "chunk_data_without_crlf": (
        head(b"POST / HTTP/1.1", HOST, TE) + b"3\r\nabcXY0\r\n\r\n",
        400,
        None,
    ),
    "content_length_in_trailer": (
        head(b"POST / HTTP/1.1", HOST, TE) + b"0\r\nContent-Length: 5\r\n\r\n",
        400,
        None,
    ),
    # Host (RFC 9112 3.2)
    "missing_host_http11": (head(b"GET / HTTP/1.1"), 400, None),
    "two_hosts": (head(b"GET / HTTP/1.1", b"Host: a", b"Host: b"), 400, None),
    "two_identical_hosts": (head(b"GET / HTTP/1.1", b"Host: a", b"Host: a"), 400, None),
    # expectations (RFC 9110 10.1.1)
    "unknown_expectation": (
        head(b"POST / HTTP/1.1", HOST, b"Expect: something-else"),
        417,
        None,
    ),
    "unknown_expectation_beside_100_continue": (
        head(b"POST / HTTP/1.1", HOST, b"Expect: 100-continue, something-else"),
        417,
        None,
    ),
    # a rejected request after a good one still rejects the connection
    "bad_request_after_good_one": (
        head(b"GET / HTTP/1.1", HOST) + head(b"G(T / HTTP/1.1", HOST),
        400,
        None,
    ),
    # limits
    "request_line_too_long": (head(b"GET /" + b"a" * 32 + b" HTTP/1.1", HOST), 414, SMALL),
    "too_many_fields": (
        head(b"GET / HTTP/1.1", HOST, b"A: 1", b"B: 2", b"C: 3", b"D: 4"),
        431,
        SMALL,
    ),
    "field_too_large_value": (
        head(b"GET / HTTP/1.1", HOST, b"X: " + b"v" * 40),
        431,
        SMALL,
    ),
    "field_too_large_name": (
        head(b"GET / HTTP/1.1", HOST, b"X" * 41 + b": v"),
        431,
        SMALL,
    ),
    "body_declared_too_large": (
        head(b"POST / HTTP/1.1", HOST, b"Content-Length: 11") + b"x" * 11,
        413,
        SMALL,
    ),
    "chunked_body_too_large": (
        head(b"POST / HTTP/1.1", HOST, TE) + b"6\r\nabcdef\r\n5\r\nghijk\r\n0\r\n\r\n",
        413,
        SMALL,
    ),
}


@pytest.mark.parametrize("name", list(REJECT))
def test_rejected(name: str) -> None:
    data, status, limits = REJECT[name]
    assert status in ERROR_STATUSES
    assert parse_all_ways(data, limits) == {"error": status}


@pytest.mark.parametrize("name", list(REJECT))
@FAST
@given(data=st.data())
def test_rejected_random_splits(name: str, data: st.DataObject) -> None:
    raw, _, limits = REJECT[name]
    check_random_splits(raw, data.draw(cuts_for(raw), label="cuts"), limits)


@pytest.mark.parametrize(
    ("data", "limits"),
    [
        # a request line of exactly 32: "GET" SP target(17) SP "HTTP/1.1" CRLF
        (head(b"GET /" + b"a" * 16 + b" HTTP/1.1", HOST), SMALL),
        (head(b"GET / HTTP/1.1", HOST, b"A: 1", b"B: 2", b"C: 3"), SMALL),  # 4 fields
        (head(b"GET / HTTP/1.1", HOST, b"X: " + b"v" * 39), SMALL),  # name + value == 40
        (head(b"POST / HTTP/1.1", HOST, b"Content-Length: 10") + b"x" * 10, SMALL),
        (head(b"POST / HTTP/1.1", HOST, TE) + b"a\r\n0123456789\r\n0\r\n\r\n", SMALL),
        (head(b"GET / HTTP/1.0"), None),  # no Host needed in HTTP/1.0
        (head(b"POST / HTTP/1.1", HOST, b"Content-Length: 99") + b"x" * 99, Limits()),
    ],
)
def test_limits_are_inclusive(data: bytes, limits: Limits | None) -> None:
    outcome = parse_all_ways(data, limits)
    assert "error" not in outcome
    assert outcome["requests"][0]["complete"]


def test_unlimited_body_by_default() -> None:
    assert Limits().max_body_size == 0
    body = b"x" * 200_000
    parser = RequestParser(Limits())
    parser.feed(head(b"POST / HTTP/1.1", HOST, b"Content-Length: 200000") + body)
    assert parser.requests[0].body_size == 200_000


def test_declared_body_too_large_is_rejected_before_the_body() -> None:
    parser = RequestParser(SMALL)
    with pytest.raises(ProtocolError) as exc:
        parser.feed(head(b"POST / HTTP/1.1", HOST, b"Content-Length: 1000000"))
    assert exc.value.status == 413
    assert not parser.requests  # never handed to the application


# RFC 9112 6.3 item 4: "If a Transfer-Encoding header field is present in a request and the
# chunked transfer coding is not the final encoding, ... the server MUST respond with the 400
# (Bad Request) status code and then close the connection." llhttp already answers 400 for
# "chunked, gzip"; a lone unknown coding should get the same answer.
@pytest.mark.parametrize("coding", [b"gzip", b"identity", b"xchunked"])
def test_final_coding_not_chunked_is_400(coding: bytes) -> None:
    data = head(b"POST / HTTP/1.1", HOST, b"Transfer-Encoding: " + coding)
    assert parse_all_ways(data) == {"error": 400}


# ---------------------------------------------------------------------------------------
# max_header_size: the same head must get the same answer however it is cut into reads.

HEAD_LIMIT = Limits(max_header_size=120)
BIG_HEAD = head(b"GET / HTTP/1.1", HOST, b"X-A: " + b"a" * 60, b"X-B: " + b"b" * 60)
assert len(BIG_HEAD) > 120


def test_head_too_large_one_byte_at_a_time() -> None:
    assert parse(bytewise(BIG_HEAD), HEAD_LIMIT) == {"error": 431}


def test_head_too_large_fed_whole() -> None:
    assert parse([BIG_HEAD], HEAD_LIMIT) == {"error": 431}


def test_head_too_large_in_reads_of_limit_size() -> None:
    pieces = [BIG_HEAD[:120], BIG_HEAD[120:]]
    assert parse(pieces, HEAD_LIMIT) == {"error": 431}


def test_small_head_after_large_body_in_same_feed() -> None:
    first = head(b"POST / HTTP/1.1", HOST, b"Content-Length: 500")
    pieces = [first, b"x" * 500 + b"GET / HTTP/1.1\r\n", b"Host: a\r\n\r\n"]
    outcome = parse(pieces, HEAD_LIMIT)
    assert "error" not in outcome
    assert [r["method"] for r in outcome["requests"]] == ["POST", "GET"]


# ---------------------------------------------------------------------------------------
# HTTP versions (RFC 9110 2.5, 15.6.6)


def test_http2_request_line_is_rejected() -> None:
    outcome = parse_all_ways(head(b"GET / HTTP/2.0", HOST))
    assert outcome.get("error") in (400, 505)


def test_higher_minor_version_is_read_as_http11() -> None:
    """RFC 9110 2.5: a higher minor version of HTTP/1 is processed as 1.1 (Host required,
    chunked allowed, persistent by default); the version stays what the client sent."""
    outcome = parse_all_ways(head(b"GET / HTTP/1.2", HOST))
    assert [(r["version"], r["keep_alive"]) for r in outcome["requests"]] == [("1.2", True)]
    chunked = head(b"POST / HTTP/1.9", HOST, b"Transfer-Encoding: chunked") + CHUNKED_BODY
    assert parse_all_ways(chunked)["requests"][0]["body"] == b"hello world"
    assert parse_all_ways(head(b"GET / HTTP/1.2"))["error"] == 400  # no Host, as in 1.1


def test_other_major_versions_are_505() -> None:
    for version in (b"HTTP/3.1", b"HTTP/9.9", b"HTTP/0.1"):
        assert parse_all_ways(head(b"GET / " + version, HOST))["error"] == 505, version


# ---------------------------------------------------------------------------------------
# fuzzing: any bytes in any split give requests or a ProtocolError with an error status


def _feed_checked(pieces: Sequence[bytes], limits: Limits) -> dict[str, Any]:
    """`parse()`, but asserting the fuzz contract: any exception is a ProtocolError with an
    error status."""
    outcome = parse(pieces, limits)
    if "error" in outcome:
        assert outcome["error"] in ERROR_STATUSES, outcome
    else:
        for request in outcome["requests"]:
            assert request["method"] and request["version"]
            assert request["body_size"] == len(request["body"])
    return outcome


SEEDS = [VALID[name][0] for name in VALID] + [REJECT[name][0] for name in REJECT]
FUZZ_LIMITS = st.sampled_from([Limits(), SMALL])


@st.composite
def mutated_request(draw: st.DrawFn) -> bytes:
    """A known request with a few byte-level edits: inserts, deletes, replacements."""
    data = bytearray(draw(st.sampled_from(SEEDS)))
    interesting = st.sampled_from(
        [
            b"\r",
            b"\n",
            b"\r\n",
            b" ",
            b"\t",
            b":",
            b"\x00",
            b"\x7f",
            b"\xff",
            b",",
            b";",
            b"0",
            b"f",
            b"/",
            b"?",
            b"%",
            b"chunked",
            b"Content-Length: 1\r\n",
            b"\r\n\r\n",
        ]
    )
    for _ in range(draw(st.integers(1, 4))):
        where = draw(st.integers(0, len(data)))
        kind = draw(st.sampled_from(["insert", "delete", "replace"]))
        piece = draw(st.one_of(interesting, st.binary(min_size=1, max_size=3)))
        if kind == "insert":
            data[where:where] = piece
        elif kind == "delete":
            data[where : where + draw(st.integers(1, 8))] = b""
        else:
            data[where : where + len(piece)] = piece
    return bytes(data)


FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FUZZ
@given(raw=st.binary(max_size=300), limits=FUZZ_LIMITS, data=st.data())
def test_fuzz_binary(raw: bytes, limits: Limits, data: st.DataObject) -> None:
    _feed_checked([raw], limits)
    _feed_checked(split_at(raw, data.draw(cuts_for(raw))), limits)


@FUZZ
@given(raw=st.binary(max_size=200), limits=FUZZ_LIMITS)
def test_fuzz_binary_after_valid_prefix(raw: bytes, limits: Limits) -> None:
    """Garbage in the head, after the head, and inside a chunked body."""
    prefixes = [
        b"GET /",
        head(b"GET / HTTP/1.1", HOST),
        head(b"POST / HTTP/1.1", HOST, TE),
        head(b"POST / HTTP/1.1", HOST, b"Content-Length: 5"),
    ]
    for prefix in prefixes:
        _feed_checked([prefix + raw], limits)


@FUZZ
@given(raw=mutated_request(), limits=FUZZ_LIMITS, data=st.data())
def test_fuzz_mutated_requests(raw: bytes, limits: Limits, data: st.DataObject) -> None:
    whole = _feed_checked([raw], limits)
    split = _feed_checked(split_at(raw, data.draw(cuts_for(raw))), limits)
    one_by_one = _feed_checked(bytewise(raw), limits)
    if limits.max_header_size >= len(raw):
        # With the head limit out of reach (see the max_header_size bugs above) acceptance and
        # the parsed requests must not depend on the cuts. Which status a request that is
        # both malformed and over a limit gets may (400 whole, 414 byte by byte).
        assert ("error" in whole) == ("error" in split) == ("error" in one_by_one)
        if "error" not in whole:
            assert whole == split == one_by_one


# ---------------------------------------------------------------------------------------
# response helpers


@pytest.mark.parametrize(
    ("status", "line"),
    [
        (200, "200 OK"),
        (204, "204 No Content"),
        (404, "404 Not Found"),
        (431, "431 Request Header Fields Too Large"),
        (501, "501 Not Implemented"),
        (599, "599 Unknown"),
    ],
)
def test_status_line(status: int, line: str) -> None:
    assert status_line(status) == line


IMF_FIXDATE = re.compile(
    rb"Date: (Mon|Tue|Wed|Thu|Fri|Sat|Sun), \d\d "
    rb"(Jan|Feb|Mar|Apr|May|Jun|Jul|Aug|Sep|Oct|Nov|Dec) \d{4} \d\d:\d\d:\d\d GMT\r\n\Z"
)


def test_date_line_is_imf_fixdate() -> None:
    line = DateCache().line()
    assert IMF_FIXDATE.match(line), line
    stamp = parsedate_to_datetime(line[6:-2].decode()).timestamp()
    assert abs(stamp - time.time()) < 2


def test_date_cache_reformats_once_per_second(monkeypatch: pytest.MonkeyPatch) -> None:
    now = [1_700_000_000.1]
    monkeypatch.setattr(http_response.time, "time", lambda: now[0])
    cache = DateCache()
    first = cache.line()
    assert first == b"Date: Tue, 14 Nov 2023 22:13:20 GMT\r\n"
    now[0] = 1_700_000_000.9
    assert cache.line() is first  # same second: the cached object, not reformatted
    now[0] = 1_700_000_001.0
    second = cache.line()
    assert second == b"Date: Tue, 14 Nov 2023 22:13:21 GMT\r\n"
    assert IMF_FIXDATE.match(second)


@pytest.mark.parametrize("size", [1, 9, 10, 15, 16, 255, 256, 4096, 65537])
def test_chunk_framing(size: int) -> None:
    data = bytes(range(256)) * (size // 256) + bytes(range(size % 256))
    framed = chunk(data)
    assert framed == f"{size:x}".encode() + b"\r\n" + data + b"\r\n"
    # and a parser reads it back
    parser = RequestParser(Limits())
    parser.feed(head(b"POST / HTTP/1.1", HOST, TE) + framed + LAST_CHUNK)
    assert b"".join(parser.requests[0].body) == data


def test_constants() -> None:
    assert LAST_CHUNK == b"0\r\n\r\n"
    assert CONTINUE_100 == b"HTTP/1.1 100 Continue\r\n\r\n"


@pytest.mark.parametrize("status", sorted(ERROR_STATUSES | {500, 503, 505}))
def test_error_response_is_well_formed(status: int) -> None:
    server = b"Server: preforkd\r\n"
    date = b"Date: Tue, 14 Nov 2023 22:13:20 GMT\r\n"
    raw = error_response(status, server, date)
    head_bytes, sep, body = raw.partition(b"\r\n\r\n")
    assert sep
    lines = head_bytes.split(b"\r\n")
    assert lines[0] == b"HTTP/1.1 " + status_line(status).encode()
    fields = [line.split(b": ", 1) for line in lines[1:]]
    assert all(len(f) == 2 for f in fields)
    names = [f[0].lower() for f in fields]
    assert len(names) == len(set(names))
    values = {f[0].lower(): f[1] for f in fields}
    assert values[b"content-length"] == str(len(body)).encode()
    assert values[b"connection"] == b"close"
    assert values[b"server"] == b"preforkd"
    assert values[b"date"] == date[6:-2]
    assert values[b"content-type"].startswith(b"text/plain")
    assert body == status_line(status).encode() + b"\n"


def test_error_response_without_server_header() -> None:
    raw = error_response(400, b"", b"")
    assert b"Server:" not in raw
    assert raw.startswith(b"HTTP/1.1 400 Bad Request\r\nContent-Type:")


# --- chunk-size lines are bounded (their extensions are neither head nor body) ------------

CHUNKED_POST = head(b"POST / HTTP/1.1", HOST, b"Transfer-Encoding: chunked")
UPGRADE_POST = head(
    b"POST / HTTP/1.1", HOST, b"Connection: Upgrade", b"Upgrade: h2c", b"Transfer-Encoding: chunked"
)


@pytest.mark.parametrize("start", [CHUNKED_POST, CHUNKED_POST + b"5\r\nhello\r\n", UPGRADE_POST])
def test_an_endless_chunk_extension_is_a_400(start: bytes) -> None:
    """llhttp skips chunk extensions without keeping them, and they are not body bytes: an
    endless one held a worker reading a single line for as long as the client sent it, past
    max_body_size (1.3 GB went through a 100-byte limit). It is bounded as a head is."""
    parser = RequestParser(Limits(max_body_size=100))
    parser.feed(start + b"3;name=")
    with pytest.raises(ProtocolError) as caught:
        for _ in range(100):
            parser.feed(b"v" * 65536)
    assert (caught.value.status, caught.value.reason) == (400, "chunk extension too long")


def test_many_chunks_with_extensions_in_full_reads_are_served() -> None:
    """Pinned: the bound is per line, not per body; 64 KiB reads of small chunks with
    extensions, split anywhere, never add up to it."""
    one = b"4;a=b;c=\"d e\"\r\nabcd\r\n"
    body = one * 20000
    parser = RequestParser(Limits())
    data = CHUNKED_POST + body + b"0;last=1\r\nX-T: y\r\n\r\n"
    for at in range(0, len(data), 65536):
        parser.feed(data[at : at + 65536])
    [request] = parser.requests
    assert request.complete and request.body_size == 4 * 20000


def test_a_long_but_bounded_chunk_extension_is_served() -> None:
    parser = RequestParser(Limits())
    parser.feed(CHUNKED_POST + b"3;x=" + b"v" * 60000)
    parser.feed(b"v" * 60000 + b"\r\nabc\r\n0\r\n\r\n")
    [request] = parser.requests
    assert request.complete and b"".join(request.body) == b"abc"
