"""Sans-IO HTTP/1.1 request parser on top of llhttp (httptools): bytes in, requests out.

Invariants: no socket, select or os; every rejection is a ProtocolError with the status to
answer; after an error the parser is dead (the connection must close). Pipelined requests are
queued in order; each request owns its body chunks, so a consumer reads one body at a time.
"""

from __future__ import annotations

import re
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import httptools

from prefork.http.errors import ProtocolError

# RFC 9112 section 6.1: a transfer-coding list must end in chunked for a request to be framed.
_CHUNKED = b"chunked"
# How far past max_header_size an incomplete head may grow before it is cut off: one read.
HEAD_SLACK = 65536
_OWS = b" \t"
# "GET" SP target SP "HTTP/1.1" CRLF, and the CRLF that ends the head
_LINE_OVERHEAD = 1 + 1 + 8 + 2 + 2
_FIELD_OVERHEAD = 2 + 2  # ": " and CRLF
# Heads that frame a body the way an upgrade request framed its own (see _ignore_upgrade).
# "Connection: close" makes llhttp refuse whatever follows the body, as after an upgrade.
_CHUNKED_BODY_HEAD = b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
_LENGTH_BODY_HEAD = b"POST / HTTP/1.1\r\nContent-Length: %d\r\nConnection: close\r\n\r\n"
# RFC 9112 3: method (a token, RFC 9110 5.6.2) SP request-target SP HTTP-version CRLF
_REQUEST_LINE = re.compile(rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+ [!-~]+ HTTP/1\.[0-9]\r\n")
# Methods llhttp knows only for RTSP (or as the HTTP/2 preface, PRI): on an HTTP/1.x line it
# refuses them with a plain parse error, where any other unknown method gets 501.
_NON_HTTP_METHODS = frozenset(
    {
        b"ANNOUNCE",
        b"DESCRIBE",
        b"FLUSH",
        b"GET_PARAMETER",
        b"PAUSE",
        b"PLAY",
        b"PRI",
        b"RECORD",
        b"REDIRECT",
        b"SETUP",
        b"SET_PARAMETER",
        b"TEARDOWN",
    }
)
# A request line llhttp reads as HTTP although its protocol is RTSP (OPTIONS, GET, POST) or
# ICE (SOURCE): llhttp parses them alike and keeps only the version digits.
_OTHER_PROTOCOL = re.compile(rb"[\r\n]*[!-~]+ +[!-~]+ +(?:RTSP|ICE)/")
# authority-form (RFC 9112 3.2.3): uri-host ":" port, the only target CONNECT takes
_AUTHORITY_FORM = re.compile(rb"(?:\[[!-Z^-~]+\]|[^\[\]/?#@:]+):[0-9]+")
# Host (RFC 9110 7.2): uri-host [":" port] (RFC 3986 3.2.2: IP-literal or reg-name, which
# covers IPv4 addresses), or empty for a target URI without an authority. An IP-literal's
# contents are left loose (IPv6, IPvFuture, a zone).
_HOST = re.compile(
    rb"(?:\[[0-9A-Za-z._~!$&'()*+,;=:%-]+\]|(?:[0-9A-Za-z._~!$&'()*+,;=-]|%[0-9A-Fa-f]{2})*)"
    rb"(?::[0-9]*)?"
)
# Host values already found valid: most requests carry one of a few, and a set lookup takes
# the regular expression off their path. Bounded, as ENVIRON_KEYS is.
_VALID_HOSTS: set[bytes] = set()
_VALID_HOSTS_SIZE = 256
# The authority of an absolute-form target (scheme "://" [userinfo "@"] host [":" port]).
_AUTHORITY = re.compile(rb"[^:/?#]*://([^@/?#]*@)?([^/?#]*)")
# The reason of the 400 that answers a uwsgi protocol packet (see uwsgi_packet).
UWSGI_PROTOCOL = "a uwsgi protocol packet, not HTTP"
# a CGI variable's name, as the first of a uwsgi packet's variables is (QUERY_STRING...)
_CGI_NAME = re.compile(rb"[A-Z][A-Z0-9_]*")


def uwsgi_packet(data: bytes) -> bool:
    """Whether `data` begins like a packet of uWSGI's binary protocol, which nginx sends
    with uwsgi_pass (and uWSGI's --socket expects): modifier1 0 (Python's, nginx's
    default), a 16-bit little-endian size, modifier2 0, then the first variable as a 16-bit
    size and an upper-case CGI name. No HTTP request begins with a NUL byte; this only
    tells a proxy left on uwsgi_pass from other garbage, so the log can say what to fix."""
    if len(data) < 7 or data[0] != 0 or data[3] != 0:
        return False
    size = data[4] | data[5] << 8
    name = data[6 : 6 + size]
    return 0 < size == len(name) and _CGI_NAME.fullmatch(name) is not None


@dataclass(frozen=True, slots=True)
class Limits:
    """Size limits on a request; the numbers and their statuses follow common practice
    (gunicorn's limit_request_line 4094/8190, nginx's 8 KiB header buffers)."""

    max_request_line: int = 8190  # longer target -> 414
    max_header_fields: int = 100  # more fields -> 431
    max_field_size: int = 8190  # one name + value longer -> 431
    max_header_size: int = 65536  # whole head longer -> 431
    max_body_size: int = 0  # 0 = unlimited; longer body -> 413


class Request:
    """One parsed request head plus its body as it arrives.

    `body` holds chunks not yet consumed; `complete` turns True when the message ended.
    Header names are kept as sent; `content_length` and `chunked` describe the framing.
    """

    __slots__ = (
        "method",
        "target",
        "path",
        "query",
        "version",
        "headers",
        "keep_alive",
        "content_length",
        "chunked",
        "expect_continue",
        "upgrade",
        "body",
        "body_size",
        "complete",
        "error",
        "authority",
    )

    def __init__(
        self,
        method: str,
        target: bytes,
        version: str,
        headers: list[tuple[bytes, bytes]],
        keep_alive: bool,
    ) -> None:
        self.method = method
        self.target = target
        self.version = version
        self.headers = headers
        self.keep_alive = keep_alive
        # an absolute-form target's host[:port], which replaces Host (see on_headers_complete)
        self.path, self.query, self.authority = split_target(target, method)
        self.content_length: int | None = None
        self.chunked = False
        self.expect_continue = False  # the client waits for 100 Continue (until it is asked)
        self.upgrade = False
        self.body: deque[bytes] = deque()
        self.body_size = 0
        self.complete = False
        # why the body broke while the application read it: its answer is replaced by this
        self.error: ProtocolError | None = None

    def header(self, name: bytes) -> bytes | None:
        """The first value of header `name` (lower-case bytes), or None."""
        for key, value in self.headers:
            if key.lower() == name:
                return value
        return None


class Parser(Protocol):
    """What the worker and HttpProtocol use of a connection's parser: RequestParser's, for
    HTTP, and the uwsgi protocol's (http.uwsgi.UwsgiParser)."""

    requests: deque[Request]
    upgraded: bool
    deferred: ProtocolError | None

    @property
    def idle(self) -> bool: ...

    def feed(self, data: bytes) -> None: ...

    def feed_body(self, data: bytes, request: Request) -> None: ...

    def drop_broken(self) -> None: ...

    def head_so_far(self) -> tuple[str, bytes, str, list[tuple[bytes, bytes]]] | None: ...


def _new_parser(callbacks: object) -> httptools.HttpRequestParser:
    """An llhttp request parser that reads any HTTP/1.x version: RFC 9110 2.5 has a higher
    minor version (HTTP/1.2) processed as the highest one implemented, 1.1, where llhttp's
    strict check refuses it. The leniency lets every major.minor digit pair through, so
    on_headers_complete answers the other majors itself (505, HTTP/0.9 400)."""
    parser = httptools.HttpRequestParser(callbacks)
    parser.set_dangerous_leniencies(lenient_version=True)
    return parser


class _BodyCallbacks:
    """The callbacks of a parser that reads only a body (RequestParser._ignore_upgrade); it
    has no head callbacks, so its synthetic head produces no request."""

    __slots__ = ("on_body", "on_message_complete", "on_chunk_header", "on_chunk_complete")

    def __init__(
        self,
        on_body: Callable[[bytes], None],
        on_message_complete: Callable[[], None],
        on_chunk_header: Callable[[], None],
        on_chunk_complete: Callable[[], None],
    ) -> None:
        self.on_body = on_body
        self.on_message_complete = on_message_complete
        # so a trailer section and chunk-size lines are bounded here too
        self.on_chunk_header = on_chunk_header
        self.on_chunk_complete = on_chunk_complete


def split_target(target: bytes, method: str = "") -> tuple[bytes, bytes, bytes | None]:
    """Split a request-target into raw (path, query, authority); absolute-form keeps only
    the path and query, and gives its authority (host[:port]; userinfo is a 400); the other forms
    have no authority, and authority-form (CONNECT's: host:port) neither path nor query.
    An unusable target is a 400, and so is a form the `method` cannot take (RFC 9112 3.2:
    authority-form is CONNECT's only form, asterisk-form is OPTIONS' alone; "" = any)."""
    if method == "CONNECT":
        if not _AUTHORITY_FORM.fullmatch(target):
            raise ProtocolError(400, "CONNECT needs an authority-form target (host:port)")
        return b"", b"", None
    if target[:1] != b"/":
        if target == b"*":
            if method and method != "OPTIONS":
                raise ProtocolError(400, "an asterisk-form target is for OPTIONS only")
            return target, b"", None
        try:
            url = httptools.parse_url(target)  # absolute-form (RFC 9112 3.2.2)
        except httptools.HttpParserInvalidURLError:
            raise ProtocolError(400, "invalid request target") from None
        found = _AUTHORITY.match(target)
        if found and found[1]:
            # RFC 9110 4.2.4: no sender puts userinfo in an http(s) target; a recipient
            # SHOULD treat it as an error (it hides the real authority, for phishing)
            raise ProtocolError(400, "userinfo in the request target")
        return url.path or b"/", url.query or b"", (found and found[2]) or None
    # find(), not `b"#" in target`: CPython 3.11 first tries the operand as an int, and
    # builds (then drops) a TypeError message for it on every request
    cut = target.find(b"#")
    if cut >= 0:
        target = target[:cut]
    path, _, query = target.partition(b"?")
    return path, query, None


class RequestParser:
    """Feed bytes with `feed()`; take complete heads from `requests` (FIFO).

    A request appears in `requests` as soon as its head is complete, so its body can be
    streamed to the application while later bytes arrive. `upgraded` means the client
    switched protocols (or sent CONNECT), or that bytes followed a request that closes the
    connection: nothing after that request is read as HTTP. An upgrade request with a body
    (not CONNECT) keeps its body, read per its framing: `upgraded` turns True at its head.
    """

    __slots__ = (
        "limits",
        "requests",
        "upgraded",
        "deferred",
        "_parser",
        "_url",
        "_headers",
        "_current",
        "_started",
        "_in_head",
        "_in_chunk_line",
        "_head_bytes",
        "_head_size",
        "_upgrade_body",
        "_last_done",
        "_checking_head",
        "_line_read",
        "_head_read",
    )

    def __init__(self, limits: Limits) -> None:
        self.limits = limits
        self.requests: deque[Request] = deque()
        self.upgraded = False
        # an error of the request after one whose body the application was reading: raised
        # once that request and those queued before the broken one are answered
        self.deferred: ProtocolError | None = None
        self._parser = _new_parser(self)
        self._url = b""
        self._headers: list[tuple[bytes, bytes]] = []
        self._current: Request | None = None
        self._started = False
        self._in_head = False
        self._in_chunk_line = False  # _in_head bounds a chunk-size line, not a head or trailer
        self._head_bytes = 0
        self._head_size = 0
        self._upgrade_body = False  # _parser now reads only the body of an upgrade request
        self._last_done: Request | None = None  # the request whose message ended last
        self._checking_head = False  # inside on_headers_complete: True after it raised
        # the read being fed, if no message was under way when it began: a request line
        # there begins the read (after empty lines), and on_headers_complete can find its
        # protocol name by the lengths of the method and target alone
        self._line_read: bytes | None = None
        self._head_read: bytes | None = None  # that read, for the message it began

    def head_so_far(self) -> tuple[str, bytes, str, list[tuple[bytes, bytes]]] | None:
        """After a ProtocolError, what is known of the head it rejected, for the access log:
        (method, target, version, fields so far), or None when its request line was not
        read whole (llhttp's version is the previous request's until then). A body that
        broke leaves its request current; a head refused as a whole leaves its line and
        fields here; a field refused leaves the line and the fields before it."""
        request = self._current
        if request is not None and not request.complete:
            return request.method, request.target, request.version, request.headers
        if self._checking_head or self._headers:
            parser = self._parser
            method = parser.get_method().decode("latin-1")
            return method, self._url, parser.get_http_version(), self._headers
        return None

    @property
    def idle(self) -> bool:
        """True between messages: no partial head or body has been fed."""
        return not self._started

    def feed_body(self, data: bytes, request: Request) -> None:
        """feed() while `request`'s body is being read: an error that belongs to a later
        request (this one completed in the same bytes) waits in `deferred` until this one is
        answered; an error of this body is raised, and kept in `request.error`."""
        try:
            self.feed(data)
        except ProtocolError as exc:
            if not request.complete:
                request.error = exc
                raise
            self.drop_broken()
            self.deferred = exc

    def drop_broken(self) -> None:
        """After a ProtocolError: a request whose head was queued and whose body then broke
        leaves the queue, never to reach the application (the error is its answer)."""
        requests = self.requests
        if requests and not requests[-1].complete:
            requests.pop()

    def feed(self, data: bytes) -> None:
        """Parse `data`; raises ProtocolError when the request must be rejected."""
        fresh = not self._started  # a message begins in this read, if any
        done_before = self._last_done
        self._line_read = data if fresh else None
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserCallbackError as exc:
            cause = exc.__context__
            if isinstance(cause, ProtocolError):
                raise cause from None
            raise
        except httptools.HttpParserUpgrade as exc:
            self.upgraded = True
            if not self._ignore_upgrade():
                return
            rest = data[exc.args[0] :]
        except httptools.HttpParserInvalidMethodError:
            # RFC 9110 9.1: a well-formed request line whose method llhttp does not know
            # (it parses a fixed list) names a method not implemented here. Judged when the
            # read begins with it: no message was under way (nor a failed one) and none
            # ended in this read. A line split over reads gets 400.
            if fresh and self._last_done is done_before:
                if self._unknown_method(data):
                    raise ProtocolError(501, "method not implemented") from None
                if uwsgi_packet(data):  # a 400 still, but one the worker logs as a warning
                    raise ProtocolError(400, UWSGI_PROTOCOL) from None
            raise ProtocolError(400, "invalid method") from None
        except httptools.HttpParserInvalidURLError:
            raise ProtocolError(400, "invalid request target") from None
        except httptools.HttpParserError as exc:
            if self._upgrade_body and not self._started:
                # bytes after the body of an upgrade request: not HTTP, as after any upgrade
                return
            last = self._last_done
            if last is not None and not last.keep_alive and not self._started:
                # RFC 9112 9.6: bytes after a request that closes the connection are ignored;
                # that request is still answered (llhttp calls them an error). It may have
                # left the queue already: its body can end in the read that brings them.
                self.upgraded = True
                return
            if (
                fresh
                and self._last_done is done_before
                and self._unknown_method(data, _NON_HTTP_METHODS)
            ):
                # an RTSP method (PLAY, SETUP...) on an HTTP/1.x line: unknown to HTTP as
                # any other, though llhttp refuses it only once it read the version
                raise ProtocolError(501, "method not implemented") from None
            raise ProtocolError(400, str(exc) or "malformed request") from None
        else:
            if self._in_head:
                # llhttp buffers a partial field out of our sight, so bound what a head still
                # incomplete after this feed may hold. The feed where the head began counts
                # whole (its offset is unknown), hence one read of slack; the exact limit is
                # applied to every complete head in on_headers_complete.
                self._head_bytes += len(data)
                if self._head_bytes > self.limits.max_header_size + HEAD_SLACK:
                    if self._in_chunk_line:
                        raise ProtocolError(400, "chunk extension too long")
                    if self._current is not None:  # after the last chunk (on_chunk_header)
                        raise ProtocolError(431, "trailer section too large")
                    raise ProtocolError(431, "request header too large")
            return
        # Only an upgrade request whose body is read gets here. Its body starts in `rest`; it
        # is fed outside the except clause, or an error raised while parsing it would get the
        # HttpParserUpgrade as __context__ in place of the ProtocolError that explains it.
        self.feed(rest)

    def _unknown_method(self, data: bytes, among: frozenset[bytes] | None = None) -> bool:
        """Whether the read `data` begins (after empty lines) with a whole, well-formed
        HTTP/1.x request line, whose method is one of `among` if given."""
        line = data.lstrip(b"\r\n")[: self.limits.max_request_line + 2]
        if not _REQUEST_LINE.match(line):
            return False
        return among is None or line[: line.find(b" ")] in among

    def _ignore_upgrade(self) -> bool:
        """Answer the upgrade request just parsed as plain HTTP/1.1 if it declares a body;
        True if `_parser` now reads that body.

        preforkd implements no protocol upgrade, and RFC 9110 7.8 lets a server ignore
        Upgrade, but httptools has llhttp skip the body of any upgrade request (its
        on_headers_complete returns 1 whenever llhttp's upgrade flag is set, which no API
        clears): the request would end at its head, a declared body truncated to nothing and
        left unparsed. So the body is read by a second llhttp parser given a head with the same
        framing, already checked by _check_framing: the same code, as strict, then frames it.
        Without a body nothing is lost, and CONNECT opens a tunnel whatever it declares: both
        stay upgrades as they were.
        """
        # The exception comes in the feed that ends the head (llhttp pauses right after it),
        # so the request just appended is the upgrade request
        request = self.requests[-1]
        if request.method == "CONNECT" or not (request.chunked or request.content_length):
            return False
        reader = _new_parser(
            _BodyCallbacks(
                self.on_body, self.on_message_complete, self.on_chunk_header, self.on_chunk_complete
            )
        )
        if request.chunked:
            reader.feed_data(_CHUNKED_BODY_HEAD)
        else:
            reader.feed_data(_LENGTH_BODY_HEAD % request.content_length)
        # llhttp ended the message at its head: it goes on until its body ends
        request.complete = False
        self._current = request
        self._started = True
        self._in_head = self._in_chunk_line = request.chunked  # as on_headers_complete
        self._head_bytes = 0
        self._parser = reader
        self._upgrade_body = True
        return True

    # llhttp callbacks ------------------------------------------------------------------

    def on_message_begin(self) -> None:
        self._started = True
        self._in_head = True
        self._in_chunk_line = False
        self._head_read = self._line_read  # a later message in the same read: None
        self._line_read = None
        self._head_bytes = 0
        self._head_size = _LINE_OVERHEAD
        self._url = b""
        self._headers = []

    def on_url(self, url: bytes) -> None:
        self._url += url
        # the whole line: method SP target SP HTTP/1.1 (llhttp has read the method), without
        # its CRLF, as RFC 9112 3 draws the request-line and gunicorn's limit_request_line
        # and _unknown_method count it: with the CRLF, a limit copied over from gunicorn
        # refused lines 1 and 2 bytes shorter than gunicorn does
        length = len(self._url) + len(self._parser.get_method()) + 10
        if length > self.limits.max_request_line:
            raise ProtocolError(414, "request line too long")

    def on_header(self, name: bytes, value: bytes) -> None:
        headers = self._headers
        if len(headers) >= self.limits.max_header_fields:
            raise ProtocolError(431, "too many header fields")
        size = len(name) + len(value)
        if size > self.limits.max_field_size:
            raise ProtocolError(431, "header field too large")
        self._head_size += size + _FIELD_OVERHEAD
        # RFC 9110 5.5: leading and trailing whitespace is not part of the value (llhttp
        # drops the leading part only)
        headers.append((name, value.rstrip(_OWS)))

    def on_headers_complete(self) -> None:
        self._checking_head = True  # stays True if a check below raises (head_so_far)
        parser = self._parser
        method = parser.get_method()
        if self._head_size + len(method) + len(self._url) > self.limits.max_header_size:
            raise ProtocolError(431, "request header too large")
        read = self._head_read
        if (
            read is not None
            and not read.startswith(b"HTTP/", len(method) + len(self._url) + 2)
            and _OTHER_PROTOCOL.match(read)
        ):
            # RFC 9112 2.3: the protocol name is "HTTP" (case-sensitive); llhttp also reads
            # RTSP/1.0 and ICE/1.0 lines, with a version it reports as HTTP's. The fast test
            # fails only for empty lines before the request, extra spaces or another name.
            # A request line that did not begin its read (pipelined behind a body, split
            # over reads) is not looked at: llhttp frames it as HTTP either way.
            raise ProtocolError(400, "not an HTTP request line")
        version = parser.get_http_version()
        if version != "1.1" and version[:2] != "1.":
            if version == "0.9":
                raise ProtocolError(400, "HTTP/0.9 requests are not supported")
            raise ProtocolError(505, f"HTTP/{version} is not supported")
        request = Request(
            method.decode("ascii"),
            self._url,
            version,
            self._headers,
            parser.should_keep_alive(),
        )
        self._check_framing(request)
        if request.authority is not None:
            # RFC 9112 3.2.2: an absolute-form target's host replaces the Host field (which
            # an HTTP/1.1 client must still send, as _check_framing made sure)
            request.headers = [
                field for field in request.headers if field[0].lower() != b"host"
            ]
            request.headers.append((b"Host", request.authority))
        request.upgrade = parser.should_upgrade()
        self._current = request
        self.requests.append(request)
        # a chunked body begins with a chunk-size line, bounded as a head is (on_chunk_complete)
        self._in_head = self._in_chunk_line = request.chunked
        self._head_bytes = 0
        self._url = b""
        self._headers = []
        self._checking_head = False

    def on_chunk_header(self) -> None:
        # A chunk-size line was read. Until its data comes (never, for the last chunk: its
        # trailer section follows), feed() bounds what arrives as it bounds a head: httptools
        # gathers a trailer field in memory, growing it by concatenation, until it ends.
        self._in_head = True
        self._in_chunk_line = False
        self._head_bytes = 0

    def on_chunk_complete(self) -> None:
        # A chunk's data and CRLF were read: the next chunk-size line follows. llhttp skips
        # its chunk extensions without keeping them, so they cost no memory, but they are not
        # body bytes either: unbounded, they kept a worker reading one line forever, past
        # max_body_size. feed() bounds the line as it bounds a head.
        self._in_head = self._in_chunk_line = True
        self._head_bytes = 0

    def on_body(self, body: bytes) -> None:
        self._in_head = False  # a chunk's data (see on_chunk_header)
        request = self._current
        assert request is not None
        request.body_size += len(body)
        limit = self.limits.max_body_size
        if limit and request.body_size > limit:
            raise ProtocolError(413, "request body too large")
        request.body.append(body)

    def on_message_complete(self) -> None:
        request = self._current
        if request is not None:
            request.complete = True
        self._last_done = request
        self._current = None
        self._started = False

    # framing rules (RFC 9112 sections 6-7, RFC 9110 section 8.6) ------------------------

    def _check_framing(self, request: Request) -> None:
        content_length: int | None = None
        transfer_codings: list[bytes] = []
        hosts = 0
        host = b""
        for name, value in request.headers:
            lname = name.lower()
            if lname == b"content-length":
                # llhttp already rejects non-digits, but not a repeat with the same value.
                value = value.strip()
                if not value.isdigit():
                    raise ProtocolError(400, "invalid Content-Length")
                length = int(value)
                if content_length is not None and content_length != length:
                    raise ProtocolError(400, "conflicting Content-Length values")
                content_length = length
            elif lname == b"transfer-encoding":
                transfer_codings.extend(c.strip().lower() for c in value.split(b",") if c.strip())
            elif lname == b"host":
                hosts += 1
                host = value
            elif lname == b"expect":
                # a list (RFC 9110 5.6.1): empty elements, and so an empty field, expect nothing
                expected = {e.strip().lower() for e in value.split(b",")} - {b""}
                if expected == {b"100-continue"}:
                    request.expect_continue = request.version != "1.0"
                elif expected:
                    raise ProtocolError(417, "unsupported expectation")
        if transfer_codings:
            if content_length is not None:
                raise ProtocolError(400, "both Content-Length and Transfer-Encoding")
            if request.version == "1.0":
                raise ProtocolError(400, "Transfer-Encoding in HTTP/1.0")
            if transfer_codings[-1] != _CHUNKED:
                # RFC 9112 6.3 item 4: without chunked last the length cannot be known
                raise ProtocolError(400, "Transfer-Encoding does not end in chunked")
            if len(transfer_codings) > 1:
                raise ProtocolError(501, "unsupported transfer coding")
            request.chunked = True
        if hosts != 1 and (hosts or request.version != "1.0"):
            # RFC 9112 3.2: an HTTP/1.1 request without Host, any request with several
            raise ProtocolError(400, "missing Host" if hosts == 0 else "several Host fields")
        if hosts and host not in _VALID_HOSTS:
            # RFC 9112 3.2: a Host field with an invalid value MUST be answered 400 (the
            # application would build URLs, or pick a site, from "a/b", "x:abc" or "a b")
            if not _HOST.fullmatch(host):
                raise ProtocolError(400, "invalid Host")
            if len(_VALID_HOSTS) < _VALID_HOSTS_SIZE:
                _VALID_HOSTS.add(host)
        limit = self.limits.max_body_size
        if content_length is not None and limit and content_length > limit:
            raise ProtocolError(413, "request body too large")
        request.content_length = content_length
