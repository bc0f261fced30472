"""Response bytes: status lines, the cached Date header, chunk framing and error pages.

Invariant: no I/O; reading the wall clock for the Date header is the only outside input.
"""

from __future__ import annotations

import time
from email.utils import formatdate
from http import HTTPStatus

CRLF = b"\r\n"
LAST_CHUNK = b"0\r\n\r\n"
CONTINUE_100 = b"HTTP/1.1 100 Continue\r\n\r\n"

# RFC 9110 section 7.6.1: connection-specific fields an application must not set; the server
# owns framing and connection management.
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    }
)

_REASONS = {s.value: s.phrase for s in HTTPStatus}


def status_line(status: int) -> str:
    """'404 Not Found' for 404."""
    return f"{status} {_REASONS.get(status, 'Unknown')}"


def reason_phrase(status: int) -> str:
    """The registered reason phrase of a status code; empty for an unregistered one."""
    return _REASONS.get(status, "")


class DateCache:
    """The Date header line, formatted at most once per second (RFC 9110 section 6.6.1)."""

    __slots__ = ("_second", "_line")

    def __init__(self) -> None:
        self._second = -1
        self._line = b""

    def line(self) -> bytes:
        now = time.time()
        second = int(now)
        if second != self._second:
            self._second = second
            self._line = b"Date: " + formatdate(now, usegmt=True).encode("ascii") + CRLF
        return self._line


def chunk(data: bytes) -> bytes:
    """One chunk of a chunked body (RFC 9112 section 7.1)."""
    return b"%x\r\n%b\r\n" % (len(data), data)


def error_response(
    status: int, server_line: bytes, date_line: bytes, head: bool = False
) -> bytes:
    """A complete close-delimited error response with a short plain-text body; without it
    when answering HEAD (`head`: RFC 9110 9.3.2), whose Content-Length is the GET's."""
    reason = status_line(status)
    body = reason.encode("ascii") + b"\n"
    return (
        b"HTTP/1.1 "
        + reason.encode("ascii")
        + CRLF
        + server_line
        + date_line
        + b"Content-Type: text/plain; charset=utf-8\r\n"
        + b"Content-Length: %d\r\n" % len(body)
        + b"Connection: close\r\n\r\n"
        + (b"" if head else body)
    )
