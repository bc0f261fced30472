"""RequestParser and requests carrying Upgrade: preforkd implements no upgrade, so a request
that declares a body is read as plain HTTP/1.1 (RFC 9110 7.8 lets a server ignore Upgrade)
and never reaches the app with its body cut off; nothing after it is read as HTTP, as after
any upgrade request. Upgrades without a body, and CONNECT, stay as they were."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pytest

from prefork.http import Limits, ProtocolError, RequestParser
from tests.unit.splits import bytewise, split_at
from tests.unit.test_http_parser import CHUNKED_BODY, HOST, head, parse_all_ways, summary

UPGRADE = (b"Connection: Upgrade", b"Upgrade: h2c")
NEXT = head(b"GET /next HTTP/1.1", HOST)  # a pipelined request after the upgrade request

LENGTH_HEAD = head(b"POST /up HTTP/1.1", HOST, *UPGRADE, b"Content-Length: 5")
CHUNKED_HEAD = head(b"POST /up HTTP/1.1", HOST, *UPGRADE, b"Transfer-Encoding: chunked")
LENGTH = LENGTH_HEAD + b"hello"
CHUNKED = CHUNKED_HEAD + CHUNKED_BODY  # body: b"hello world", with extensions and trailers
NO_BODY = head(b"GET /ws HTTP/1.1", HOST, b"Connection: Upgrade", b"Upgrade: websocket")


def feed(pieces: Sequence[bytes], limits: Limits | None = None) -> dict[str, Any]:
    """Feed `pieces` as the server does: the worker stops reading once an upgrade request was
    parsed and has ended (the connection then closes), but wsgi.input goes on feeding until
    the body of the request it reads is complete. The outcome, or the error status."""
    parser = RequestParser(limits or Limits())
    try:
        for piece in pieces:
            if parser.upgraded and parser.idle:
                break
            parser.feed(piece)
    except ProtocolError as exc:
        return {"error": exc.status}
    return {
        "requests": [summary(r) for r in parser.requests],
        "upgraded": parser.upgraded,
        "idle": parser.idle,
    }


def every_split(data: bytes) -> list[list[bytes]]:
    """`data` fed one byte at a time, and cut at every offset and every pair of offsets."""
    ways = [bytewise(data)]
    for first in range(len(data) + 1):
        ways.extend(split_at(data, (first, second)) for second in range(first, len(data) + 1))
    return ways


def only_request(outcome: dict[str, Any]) -> dict[str, Any]:
    assert "error" not in outcome, outcome
    assert outcome["upgraded"] is True
    assert outcome["idle"] is True
    requests: list[dict[str, Any]] = outcome["requests"]
    (request,) = requests
    return request


# ---------------------------------------------------------------------------------------
# a declared body is read per its framing


def test_content_length_body_with_upgrade_is_read() -> None:
    request = only_request(feed([LENGTH]))
    assert request["upgrade"] is True
    assert request["content_length"] == 5
    assert request["body"] == b"hello"
    assert request["body_size"] == 5
    assert request["complete"] is True


def test_chunked_body_with_upgrade_is_read() -> None:
    request = only_request(feed([CHUNKED]))
    assert request["upgrade"] is True
    assert request["chunked"] is True
    assert request["body"] == b"hello world"
    assert request["complete"] is True


@pytest.mark.parametrize(
    "first, body, expected",
    [(LENGTH_HEAD, b"hello", b"hello"), (CHUNKED_HEAD, CHUNKED_BODY, b"hello world")],
    ids=["content-length", "chunked"],
)
def test_upgrade_request_waits_for_its_body(first: bytes, body: bytes, expected: bytes) -> None:
    parser = RequestParser(Limits())
    parser.feed(first)
    (request,) = parser.requests
    # published at its head like any request, but not complete: the app must wait for the
    # body; `upgraded` already says the connection closes after the answer
    # (tuples: asserts on the attributes would narrow them for mypy across the next feed)
    assert (request.complete, parser.idle, parser.upgraded) == (False, False, True)
    parser.feed(body)
    assert (request.complete, parser.idle) == (True, True)
    assert b"".join(request.body) == expected


@pytest.mark.parametrize(
    "data, body", [(LENGTH, b"hello"), (CHUNKED, b"hello world")], ids=["content-length", "chunked"]
)
def test_every_split_point_gives_the_same_request(data: bytes, body: bytes) -> None:
    whole = feed([data])
    assert only_request(whole)["body"] == body
    for pieces in every_split(data):
        assert feed(pieces) == whole, pieces


@pytest.mark.parametrize(
    "data, limits, status",
    [
        (CHUNKED_HEAD + b"zz\r\nhello\r\n0\r\n\r\n", None, 400),
        (CHUNKED_HEAD + b"5\r\nhello!!\r\n0\r\n\r\n", None, 400),
        (CHUNKED_HEAD + CHUNKED_BODY, Limits(max_body_size=10), 413),
    ],
    ids=["bad-chunk-size", "chunk-overrun", "body-too-large"],
)
def test_upgrade_body_framing_errors_are_rejected(
    data: bytes, limits: Limits | None, status: int
) -> None:
    # the body is checked as strictly as any other (a ProtocolError, not an httptools error)
    assert feed([data], limits) == {"error": status}
    for pieces in every_split(data):
        assert feed(pieces, limits) == {"error": status}, pieces


# ---------------------------------------------------------------------------------------
# what follows an upgrade request is not HTTP


@pytest.mark.parametrize(
    "first, body",
    [(LENGTH, b"hello"), (CHUNKED, b"hello world"), (NO_BODY, b"")],
    ids=["content-length", "chunked", "no-body"],
)
def test_pipelined_request_after_upgrade_is_not_parsed(first: bytes, body: bytes) -> None:
    data = first + NEXT
    whole = feed([data])
    request = only_request(whole)  # only the upgrade request: NEXT is never parsed
    assert request["body"] == body
    assert request["complete"] is True
    for pieces in every_split(data):
        assert feed(pieces) == whole, pieces


@pytest.mark.parametrize("data", [LENGTH, CHUNKED], ids=["content-length", "chunked"])
def test_bytes_fed_after_upgrade_body_are_ignored(data: bytes) -> None:
    parser = RequestParser(Limits())
    parser.feed(data + b"\x00\x00\x00\x04PRI * HTTP/2.0")
    parser.feed(NEXT)
    parser.feed(b"garbage")
    (request,) = parser.requests
    assert request.complete
    assert parser.upgraded
    assert parser.idle


# ---------------------------------------------------------------------------------------
# unchanged: upgrades without a body, CONNECT


@pytest.mark.parametrize(
    "data",
    [
        NO_BODY + b"\x81\x05not-http",
        head(b"POST /up HTTP/1.1", HOST, *UPGRADE, b"Content-Length: 0") + b"PRI * HTTP/2.0",
    ],
    ids=["no-framing", "content-length-0"],
)
def test_upgrade_without_body_is_unchanged(data: bytes) -> None:
    request = only_request(parse_all_ways(data))
    assert request["upgrade"] is True
    assert request["body"] == b""
    assert request["complete"] is True
    whole = feed([data])
    for pieces in every_split(data):
        assert feed(pieces) == whole, pieces


def test_connect_with_content_length_is_unchanged() -> None:
    # CONNECT opens a tunnel: what follows its head is tunnel data, never a body
    data = head(b"CONNECT example.com:443 HTTP/1.1", b"Host: example.com:443", b"Content-Length: 5")
    request = only_request(parse_all_ways(data + b"hello"))
    assert request["method"] == "CONNECT"
    assert request["content_length"] == 5
    assert request["body"] == b""
    assert request["complete"] is True
