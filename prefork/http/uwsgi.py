"""Sans-IO parser of uWSGI's binary protocol (what nginx's `uwsgi_pass` sends): one request
per connection, its CGI variables, then its body of CONTENT_LENGTH bytes.

The packet: a 4-byte header (modifier1 u8, datasize u16 little-endian, modifier2 u8), then
datasize bytes of variables, each a (u16 LE size, name, u16 LE size, value) pair, then the
body. The answer is a plain HTTP response, and the connection closes after it: nginx keeps
no uwsgi connection alive.

Invariants: no socket, select or os; every rejection is a ProtocolError with the status to
answer; after an error the parser is dead. It has RequestParser's interface (http.parser.
Parser), so the worker and HttpProtocol drive it as they drive HTTP; bytes after the one
request's body are ignored, never read as a request.
"""

from __future__ import annotations

import re
from collections import deque

from prefork.http.errors import ProtocolError
from prefork.http.parser import Limits, Request, split_target

HEADER_SIZE = 4
# modifier1 0: a WSGI request; 30: the same, with SCRIPT_NAME to be removed from PATH_INFO
# (nginx's `uwsgi_modifier1 30`, the usual way to mount an application under a prefix)
WSGI_REQUEST = 0
MANAGE_PATH_INFO = 30
MODIFIERS = frozenset((WSGI_REQUEST, MANAGE_PATH_INFO))
# The reason of the 400 that answers an HTTP request on a uwsgi listener (see looks_like_http).
HTTP_ON_UWSGI = "an HTTP request, not a uwsgi packet"
# The reason of the 400 that answers a packet without REQUEST_METHOD: nginx sends one only
# with `include uwsgi_params` (or a uwsgi_param of its own).
NO_METHOD = "no REQUEST_METHOD variable"
# an HTTP method (a token; upper-case in practice), then a space or the end of what came
_HTTP_START = re.compile(rb"[A-Z]+(?: |\Z)")
# CONTENT_LENGTH or CONTENT_TYPE not given: nginx's uwsgi_params sends both, empty for none
_NOT_GIVEN = ("", None)


def looks_like_http(data: bytes) -> bool:
    """Whether `data`, refused as a uwsgi packet, begins like an HTTP request: a proxy or a
    client speaking HTTP to a uwsgi listener (nginx's proxy_pass), which the log can name."""
    return _HTTP_START.match(data[:16]) is not None


def _header_name(key: str) -> bytes:
    """HTTP_USER_AGENT -> b"USER-AGENT": a header as gunicorn's uwsgi requests list it (for
    the hooks' req.headers; nginx turned '-' into '_', so that is as near as it gets)."""
    return key[5:].replace("_", "-").encode("latin-1")


class UwsgiRequest(Request):
    """A request read from a uwsgi packet. `variables` are its CGI variables (names and values
    decoded as latin-1, as PEP 3333 has environ strings): the environ's own keys, HTTP_* the
    headers (a repeated one joined as HTTP joins them), CONTENT_LENGTH and CONTENT_TYPE only
    when not empty. `modifier1` is the packet's (0, or 30: SCRIPT_NAME comes off PATH_INFO).

    `version` is "1.0" whatever SERVER_PROTOCOL says: it is the framing of the response, which
    the connection's close ends (nginx reads a uwsgi response to the close and decodes no
    chunked body). `protocol` is the request's own (SERVER_PROTOCOL), for the environ and the
    access log; `target` is REQUEST_URI, `path` and `query` its parts."""

    __slots__ = ("variables", "modifier1", "protocol", "full_path", "_headers")

    def __init__(self, variables: dict[str, str], modifier1: int) -> None:
        # Request.__init__ is not called: its target checks are HTTP's, and REQUEST_URI is
        # what nginx received, which it has judged already (an absolute-form one included)
        self.variables = variables
        self.modifier1 = modifier1
        self.method = variables.get("REQUEST_METHOD", "")
        self.protocol = variables.get("SERVER_PROTOCOL") or "HTTP/1.1"
        target = variables.get("REQUEST_URI", "").encode("latin-1")
        self.target = target
        try:
            self.path, _, _ = split_target(target)
        except ProtocolError:
            self.path = target.partition(b"?")[0]
        self.query = variables.get("QUERY_STRING", "").encode("latin-1")
        self.authority = None
        self.version = "1.0"
        self._headers: list[tuple[bytes, bytes]] | None = None  # made when first asked for
        self.keep_alive = False
        self.content_length: int | None = None
        self.chunked = False
        self.expect_continue = False  # nginx answered the client's 100-continue itself
        self.upgrade = False
        self.body = deque()
        self.body_size = 0
        self.complete = False
        self.error = None
        # the path static files are matched on (SCRIPT_NAME and PATH_INFO as the proxy
        # meant them, before http.script_name): set when the environ is made
        self.full_path = ""


    @property
    def headers(self) -> list[tuple[bytes, bytes]]:
        """The HTTP_* variables as header lines: only the hooks' req.headers and the access
        log of a refused request read them, so they are made then, not for every request."""
        if self._headers is None:
            self._headers = [
                (_header_name(key), value.encode("latin-1"))
                for key, value in self.variables.items()
                if key[:5] == "HTTP_"
            ]
        return self._headers

    @headers.setter
    def headers(self, value: list[tuple[bytes, bytes]]) -> None:
        self._headers = value


def parse_variables(block: bytes, limits: Limits) -> dict[str, str]:
    """The variables of a packet's block, as the environ takes them.

    A size that overruns the block, an empty name, or bytes left over that cannot be a pair
    are a 400 (uWSGI skips such a request too); a header (HTTP_*) over http.max_field_size,
    more of them than http.max_header_fields, a REQUEST_URI longer than max_request_line
    allows are refused as the same request over HTTP would be (431, 414).

    One pass, the sizes read from the bytes and the names and values sliced from the block
    decoded once (latin-1 maps byte to character, so the offsets are the same): every
    request goes through this loop, some twenty variables from nginx."""
    text = block.decode("latin-1")
    end = len(block)
    at = 0
    variables: dict[str, str] = {}
    headers = 0
    max_fields = limits.max_header_fields
    max_field = limits.max_field_size + 5  # the name counts without its HTTP_
    # Sizes are unsigned, so an overrun leaves `at` past the end (the slices are only
    # short), or reads a size past it (IndexError): both are caught after the loop.
    try:
        while at < end:
            name_at = at + 2
            value_size_at = name_at + (block[at] | block[at + 1] << 8)
            value_at = value_size_at + 2
            at = value_at + (block[value_size_at] | block[value_size_at + 1] << 8)
            key = text[name_at:value_size_at]
            value = text[value_at:at]
            if key[:5] == "HTTP_":
                headers += 1
                if headers > max_fields or at - name_at - 2 > max_field:
                    if at > end or "" in variables:
                        break  # malformed before it is too large: the 400 below
                    raise ProtocolError(
                        431,
                        "too many header fields" if headers > max_fields
                        else "header field too large",
                    )
                if key in variables:
                    # RFC 9110 5.3, as for HTTP: repeated fields combine (cookies with "; ");
                    # uWSGI keeps only the last
                    variables[key] += ("; " if key == "HTTP_COOKIE" else ", ") + value
                    continue
            elif key[:5] == "wsgi.":
                continue  # the server's keys, never a proxy's
            variables[key] = value
    except IndexError:
        at = end + 1
    if "" in variables:
        raise ProtocolError(400, "a uwsgi variable without a name")
    if at != end:
        raise ProtocolError(400, "a uwsgi variable's size overruns the packet")
    return variables


class UwsgiParser:
    """Feed bytes with `feed()`; the request appears in `requests` once its variables are
    whole, and its body arrives in `request.body` as it is fed (RequestParser's contract)."""

    __slots__ = (
        "limits",
        "requests",
        "upgraded",
        "deferred",
        "_buffer",
        "_request",
        "_remaining",
        "_started",
        "_done",
    )

    def __init__(self, limits: Limits) -> None:
        self.limits = limits
        self.requests: deque[Request] = deque()
        self.upgraded = False  # never: no bytes after the request are read as one
        self.deferred: ProtocolError | None = None  # never: one request, nothing after it
        self._buffer = b""  # the header and variables until they are whole
        self._request: UwsgiRequest | None = None  # once its variables are read
        self._remaining = 0  # body bytes still to come
        self._started = False
        self._done = False  # the request and its body were read: the rest is ignored

    @property
    def idle(self) -> bool:
        """True before the packet's first byte, and once its body is whole."""
        return not self._started

    def head_so_far(self) -> tuple[str, bytes, str, list[tuple[bytes, bytes]]] | None:
        """For the access log of a refused request: (method, target, version, headers) of
        the request whose variables were read, or None before that."""
        request = self._request
        if request is None:
            return None
        version = request.protocol.partition("/")[2]
        return request.method or "-", request.target, version, request.headers

    def drop_broken(self) -> None:
        """After a ProtocolError: the request leaves the queue, if its body broke."""
        if self.requests and not self.requests[-1].complete:
            self.requests.pop()

    def feed_body(self, data: bytes, request: Request) -> None:
        """feed() while the application reads `request`'s body; an error is kept in
        `request.error` (its answer replaces the application's)."""
        try:
            self.feed(data)
        except ProtocolError as exc:
            request.error = exc
            raise

    def feed(self, data: bytes) -> None:
        """Parse `data`; raises ProtocolError when the request must be refused."""
        if self._done or not data:
            return
        self._started = True
        request = self._request
        if request is None:
            buffer = self._buffer + data
            try:
                end = self._head_end(buffer)
                if end is None:
                    self._buffer = buffer
                    return
                request = self._request_of(buffer[HEADER_SIZE:end], buffer[0])
            except ProtocolError:
                self._done = True  # dead: nothing more is read as this request
                raise
            self._buffer = b""
            data = buffer[end:]
            self.requests.append(request)
            if not self._remaining:
                self._end(request)
                return
            if not data:
                return
        take = data[: self._remaining]
        self._remaining -= len(take)
        request.body_size += len(take)
        request.body.append(take)
        if not self._remaining:
            self._end(request)

    def _head_end(self, buffer: bytes) -> int | None:
        """Where the variables of the packet that `buffer` begins with end (None: they are
        not whole yet); its 4-byte header is checked as soon as it is whole."""
        if len(buffer) < HEADER_SIZE:
            return None
        modifier1 = buffer[0]
        if modifier1 not in MODIFIERS:
            if looks_like_http(buffer):
                raise ProtocolError(400, HTTP_ON_UWSGI)
            raise ProtocolError(400, f"uwsgi packet type (modifier1) {modifier1} is not a "
                                     "WSGI request (0 or 30)")
        size = buffer[1] | buffer[2] << 8
        if size > self.limits.max_header_size:
            raise ProtocolError(431, "uwsgi variables too large")
        end = HEADER_SIZE + size
        return end if len(buffer) >= end else None

    def _request_of(self, block: bytes, modifier1: int) -> UwsgiRequest:
        variables = parse_variables(block, self.limits)
        # the body's length: the variable nginx sets (a chunked upload arrives de-chunked,
        # with its length); only its header, when a proxy names no CONTENT_* of its own
        for key in ("CONTENT_LENGTH", "CONTENT_TYPE"):
            header = variables.pop("HTTP_" + key, None)
            if variables.get(key) in _NOT_GIVEN:
                variables.pop(key, None)
                if header:
                    variables[key] = header
        request = UwsgiRequest(variables, modifier1)
        self._request = request  # for head_so_far, whatever is refused below
        if not request.method:
            raise ProtocolError(400, NO_METHOD if block else "an empty uwsgi packet")
        # as HTTP counts a request line (without its CRLF): method SP target SP HTTP/1.1
        if len(request.method) + len(request.target) + 10 > self.limits.max_request_line:
            raise ProtocolError(414, "request line too long")
        length = variables.get("CONTENT_LENGTH")
        if length is not None:
            if not (length.isascii() and length.isdigit()):
                raise ProtocolError(400, "invalid CONTENT_LENGTH")
            request.content_length = int(length)
            limit = self.limits.max_body_size
            if limit and request.content_length > limit:
                raise ProtocolError(413, "request body too large")
            self._remaining = request.content_length
        return request

    def _end(self, request: UwsgiRequest) -> None:
        request.complete = True
        self._done = True
        self._started = False
