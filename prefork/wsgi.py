"""PEP 3333 for one request on one connection: environ, start_response, wsgi.input, and the
response framing.

Invariants: headers are sent at most once and only with (or before) the first body byte; the
application's iterable is always closed; a response is either complete and correctly framed or
the connection is marked to close; exc_info is re-raised only after headers were sent.
"""

from __future__ import annotations

import inspect
import io
import logging
import os
import re
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from types import TracebackType
from typing import IO, Any
from urllib.parse import unquote_to_bytes

from prefork.connection import ClientDisconnected, ClientTimeout, Connection, peer_failed
from prefork.http import ProtocolError, Request
from prefork.http.response import CONTINUE_100, CRLF, HOP_BY_HOP, LAST_CHUNK, chunk, reason_phrase

# Unread body bytes the server reads and discards after a response to keep the connection
# (prefork.httpserve drains them); more, and the response says Connection: close.
DRAIN_LIMIT = 1 << 16

ExcInfo = tuple[type[BaseException], BaseException, TracebackType | None]
StartResponse = Callable[..., Callable[[bytes], None]]
WSGIApp = Callable[[dict[str, Any], StartResponse], Iterable[bytes]]

_NO_BODY_STATUS = (b"204", b"304")  # 1xx never gets this far: _STATUS_RE refuses it
# A final status only: after an application's 1xx (100, 101, 103) the client would wait for a
# final response that never comes, and preforkd switches no protocols. Interim responses
# are the server's business (100 Continue, from Input).
# no control character but HTAB in a field value (RFC 9110 5.5) or a reason (RFC 9112 4)
_STATUS_RE = re.compile(r"[2-5][0-9][0-9] [^\x00-\x08\x0a-\x1f\x7f]*\Z")
_CODE_ONLY = re.compile(r"[2-5][0-9][0-9]\Z")
_BAD_VALUE = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+\Z")

# Header name -> environ key, cached: the same few dozen names arrive on every request.
ENVIRON_KEYS: dict[bytes, str | None] = {}


def environ_key(name: bytes) -> str | None:
    """CGI key for a request header; None for names with '_' (dropped: with '-' and '_' both
    mapping to the same key, a client could spoof a header a proxy set, e.g. X-Forwarded-For).
    """
    key = ENVIRON_KEYS.get(name)
    if key is None and name not in ENVIRON_KEYS:
        if name.find(b"_") >= 0:
            key = None
        else:
            upper = name.decode("latin-1").upper().replace("-", "_")
            key = upper if upper in ("CONTENT_TYPE", "CONTENT_LENGTH") else "HTTP_" + upper
        if len(ENVIRON_KEYS) < 1024:
            ENVIRON_KEYS[name] = key
    return key


def decode_path(raw: bytes) -> str:
    """PATH_INFO per PEP 3333: percent-decoded bytes, as latin-1, without dot segments."""
    # find, not `in`: see split_target
    text = raw.decode("latin-1") if raw.find(b"%") < 0 else unquote_to_bytes(raw).decode("latin-1")
    if text.find("/.") < 0:
        return text
    return remove_dot_segments(text)


def remove_dot_segments(path: str) -> str:
    """`path` with its "." and ".." segments resolved (RFC 3986 5.2.4; a ".." at the root
    goes no higher), as Apache resolves them before mod_wsgi sees PATH_INFO, and nginx before it
    matches a location. Left in, "/app/../admin" reached an application mounted at /app
    (http.script_name) as PATH_INFO "/../admin", and "/public/%2e%2e/admin" went past a
    middleware's PATH_INFO.startswith("/admin") check, or out of a directory an application
    serves files from: nginx's proxy_pass passes the target on as the client sent it.
    Decoded first (%2e%2e is ".." too, as in Apache); REQUEST_URI and RAW_URI keep the
    target as sent."""
    if not path.startswith("/"):
        return path  # "*", or a CONNECT's authority: not a path of segments
    segments = path.split("/")
    kept: list[str] = []
    for segment in segments[1:]:
        if segment == "..":
            if kept:
                kept.pop()
        elif segment != ".":
            kept.append(segment)
    if segments[-1] in (".", ".."):
        kept.append("")  # "/a/b/.." is the directory "/a/", trailing slash included
    return "/" + "/".join(kept)


class FileWrapper:
    """wsgi.file_wrapper: an iterator over a file's read() in blocks; the worker sends a plain
    file with os.sendfile instead (see sendfile_fd).

    It is its own iterator, as wsgiref's and gunicorn's are: middleware that slices the body
    (Werkzeug's range responses) iterates iter(wrapper) and closes that, which must close the
    file. seekable(), seek() and tell() are Werkzeug's FileWrapper's, which such middleware
    uses to start at a range's first byte instead of reading up to it."""

    def __init__(self, filelike: IO[bytes], blksize: int = 65536) -> None:
        self.filelike = filelike
        self.blksize = blksize
        if hasattr(filelike, "close"):
            self.close = filelike.close

    def __iter__(self) -> FileWrapper:
        return self

    def __next__(self) -> bytes:
        data = self.filelike.read(self.blksize)
        if data:
            return data
        raise StopIteration

    def seekable(self) -> bool:
        seekable: Callable[[], bool] | None = getattr(self.filelike, "seekable", None)
        if seekable is not None:
            return seekable()
        return hasattr(self.filelike, "seek")

    def seek(self, *args: int) -> None:
        if hasattr(self.filelike, "seek"):
            self.filelike.seek(*args)

    def tell(self) -> int | None:
        if hasattr(self.filelike, "tell"):
            return self.filelike.tell()
        return None

    def fileno(self) -> int | None:
        try:
            return self.filelike.fileno()
        except (AttributeError, OSError, ValueError):
            return None


# The read() of the files io.open makes: what they return is the descriptor's bytes as they
# are (a text file's too, before decoding: they are what gunicorn sends for it).
_PLAIN_READS = frozenset(
    {io.FileIO.read, io.BufferedReader.read, io.BufferedRandom.read, io.TextIOWrapper.read}
)


def sendfile_fd(wrapper: FileWrapper) -> int | None:
    """The descriptor whose bytes, from the file's position on, are the body `wrapper` would
    produce, or None: the body is then the wrapper's iteration.

    PEP 3333 has the file's read() define the body, and fileno() alone does not say that
    read() returns the descriptor's bytes: gzip.GzipFile, bz2 and lzma files, and codecs'
    readers have a descriptor (their compressed or encoded file's) and transform what is
    read from it. So the read() must be the one of a file io.open made, on the object itself
    or handed out by a wrapper (tempfile's NamedTemporaryFile, via functools.wraps; Django's
    File, a property). Checked before fileno(), which a SpooledTemporaryFile answers by
    moving its contents to disk."""
    filelike = wrapper.filelike
    read = getattr(filelike, "read", None)
    if read is None:
        return None
    try:
        read = inspect.unwrap(read)
    except ValueError:  # a cycle of __wrapped__
        return None
    owner = getattr(read, "__self__", None)
    if owner is None or getattr(type(owner), "read", None) not in _PLAIN_READS:
        return None
    fd = wrapper.fileno()
    try:
        return fd if fd is not None and owner.fileno() == fd else None  # the same file
    except (OSError, ValueError):
        return None


class ErrorsToLog(io.TextIOBase):
    """wsgi.errors when the error log goes to syslog, or is JSON: each line written becomes a
    record of the error log (at ERROR, as mod_wsgi's land in Apache's error log as
    [wsgi:error]).

    Otherwise wsgi.errors is sys.stderr, whose fd 2 is the error log file; with syslog, fd 2
    is the terminal the server started from, or a detached daemon's /dev/null, and what the
    application wrote to wsgi.errors was lost. A line is kept until its newline, a flush()
    (the worker's at the end of each request, too), or LINE_LIMIT characters. Threads of
    the application may share it, as they share sys.stderr: a lock keeps each one's pieces
    of a line from being lost or taken into another's line, as far as a whole write goes."""

    LINE_LIMIT = 1 << 16

    def __init__(self, logger: logging.Logger) -> None:
        super().__init__()
        self._log = logger
        self._partial = ""
        self._lock = threading.Lock()

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        if not isinstance(text, str):
            raise TypeError(f"write() argument must be str, not {type(text).__name__}")
        with self._lock:
            data = self._partial + text
            *lines, self._partial = data.split("\n")
            if len(self._partial) >= self.LINE_LIMIT:
                lines.append(self._partial)
                self._partial = ""
        for line in lines:
            self._log.error("%s", line)
        return len(text)

    def flush(self) -> None:
        with self._lock:
            line, self._partial = self._partial, ""
        if line:
            self._log.error("%s", line)


class Input:
    """wsgi.input: streams the request body from the connection; never reads past it.

    Reads wait at most `timeout` for each piece; a client that goes away before the body is
    complete raises ClientDisconnected, so a truncated body never looks complete.
    """

    # The response to this request, for a client that expects 100 Continue (run_app links
    # it): a class attribute, so that the other requests pay nothing for it.
    _response: Response | None = None

    def __init__(
        self,
        conn: Connection,
        request: Request,
        timeout: float,
        min_rate: int = 0,
        waiting: Callable[[bool], None] | None = None,
    ) -> None:
        self._conn = conn
        self._waiting = waiting  # told when the app starts and stops waiting on the client
        self._request = request
        self._timeout = timeout
        self._min_rate = min_rate
        self._started = 0.0  # when the body was first waited for
        self._buf = bytearray()

    def _fill(self) -> bool:
        """Move the next body chunk into the buffer; False at the end of the body."""
        request = self._request
        while not request.body:
            if request.complete:
                return False
            if request.expect_continue:
                request.expect_continue = False  # the body is asked for: it may be drained
                # Once the final response's head is out, a 100 would land inside its body;
                # the client, which has its answer, stops waiting for one anyway.
                response = self._response
                if response is None or not response.head_sent:
                    self._conn.send(CONTINUE_100, self._timeout)
            limit = self._wait_limit()
            data = self._conn.recv_now()
            if data is None:
                if self._waiting is not None:
                    self._waiting(True)
                try:
                    data = self._conn.recv(limit)
                finally:
                    if self._waiting is not None:
                        self._waiting(False)
            if not data:
                raise ClientDisconnected("client closed the connection before the body ended")
            self._conn.parser.feed_body(data, request)
        self._buf += request.body.popleft()
        return True

    def _wait_limit(self) -> float:
        """How long the next piece may take: body_timeout, and no longer than keeps the
        average rate since the first wait at or above the minimum (after a body_timeout
        grace period)."""
        if not self._min_rate:
            return self._timeout
        now = time.monotonic()
        if not self._started:
            self._started = now
        allowed_until = self._started + self._timeout + self._request.body_size / self._min_rate
        limit = min(self._timeout, allowed_until - now)
        if limit <= 0:
            raise ClientTimeout("request body arrives slower than http.body_min_rate")
        return limit

    @property
    def continue_pending(self) -> bool:
        """The client still waits for 100 Continue: its body was never asked for."""
        return self._request.expect_continue

    def answered_by(self, response: Response) -> None:
        """The response to this request: no 100 Continue once its head has been sent."""
        self._response = response

    def read(self, size: int | None = -1) -> bytes:
        if size is None or size < 0:
            while self._fill():
                pass
            data = bytes(self._buf)
            self._buf.clear()
            return data
        while len(self._buf) < size and self._fill():
            pass
        data = bytes(self._buf[:size])
        del self._buf[:size]
        return data

    def readline(self, size: int | None = -1) -> bytes:
        limit = -1 if size is None else size
        start = 0
        while True:
            end = self._buf.find(b"\n", start)
            if end >= 0:
                end += 1
                break
            if 0 <= limit <= len(self._buf):
                end = limit
                break
            start = len(self._buf)
            if not self._fill():
                end = len(self._buf)
                break
        if 0 <= limit < end:
            end = limit
        data = bytes(self._buf[:end])
        del self._buf[:end]
        return data

    def readlines(self, hint: int = -1) -> list[bytes]:
        lines: list[bytes] = []
        total = 0
        while True:
            line = self.readline()
            if not line:
                return lines
            lines.append(line)
            total += len(line)
            if 0 < hint <= total:
                return lines

    def __iter__(self) -> Iterator[bytes]:
        while True:
            line = self.readline()
            if not line:
                return
            yield line


# What start_response makes of a status and header list: status line bytes, status code, the
# header lines, Content-Length (None if not given), and whether the app asked to close.
# status, its code, the header lines, Content-Length, Connection: close asked for, and which
# of the server's own fields the application set itself (OWN_SERVER | OWN_DATE)
CheckedHead = tuple[bytes, int, bytes, int | None, bool, int]
OWN_SERVER = 1
OWN_DATE = 2
HeadCache = dict[tuple[str, tuple[tuple[str, str], ...]], CheckedHead]
# Entries a worker keeps of start_response arguments already checked and encoded: most
# applications answer with a few distinct status and header lists, so checking each once
# takes the regular expressions off the per-request path. Cleared when full.
HEAD_CACHE_SIZE = 256


def _check_head(status: str, headers: Iterable[tuple[str, str]]) -> CheckedHead:
    """Validate start_response's arguments (PEP 3333) and encode them."""
    # isinstance, not type() is: a str subclass equals (and hashes as) the plain string a
    # cached head was made from, so the cached and the fresh check must agree on it
    if isinstance(status, str) and _CODE_ONLY.match(status):
        # PEP 3333 asks for "200 OK", but gunicorn and uWSGI send a bare "200" on, and apps
        # moved from them do return it: it gets its registered phrase (RFC 9112 4 lets a
        # reason be empty, never the space before it: "HTTP/1.1 200" is malformed).
        status = f"{status} {reason_phrase(int(status))}"
    if not isinstance(status, str) or not _STATUS_RE.match(status):
        if isinstance(status, str) and status[:1] == "1":
            raise ValueError(f"WSGI status {status!r} is interim, not a final status")
        raise ValueError(f"invalid WSGI status {status!r}")
    lines: list[str] = []
    content_length = None
    closes = False
    own = 0
    # RFC 9110 8.6: no Content-Length in a 204 (Django's CommonMiddleware sets one on every
    # response); the application's is checked, then left out, as gunicorn does. A 304 keeps
    # its: it may give the length of the representation (and a HEAD's, the GET's).
    no_content = status.startswith("204")
    for name, value in headers:
        if not isinstance(name, str) or not isinstance(value, str):
            raise TypeError(f"header {name!r}: {value!r} is not a pair of str")
        if not _TOKEN.match(name) or _BAD_VALUE.search(value):
            raise ValueError(f"invalid response header {name!r}: {value!r}")
        lname = name.lower()
        if lname in HOP_BY_HOP:
            if lname == "connection" and "close" in value.lower():
                closes = True
            continue  # framing and connection management belong to the server
        if lname == "content-length":
            if not (value.isascii() and value.isdigit()):
                raise ValueError(f"invalid Content-Length {value!r}")
            length = int(value)
            if content_length is not None:
                # one value frames the body; the client must see only that one (RFC 9110
                # 8.6: a recipient may reject differing values, or the message, outright)
                if length != content_length:
                    raise ValueError(f"conflicting Content-Length {content_length} and {value!r}")
                continue  # a repeat of the same value: sent once
            content_length = length
            if no_content:
                continue
        elif lname == "server":
            own |= OWN_SERVER  # the application's replaces the server's (one field line)
        elif lname == "date":
            own |= OWN_DATE  # a singleton field (RFC 9110 6.6.1): the application's stands
        lines.append(f"{name}: {value}\r\n")
    return (
        status.encode("latin-1"),
        int(status[:3]),
        "".join(lines).encode("latin-1"),
        None if no_content else content_length,
        closes,
        own,
    )


class Response:
    """The state of one response: what start_response recorded and what has been sent."""

    __slots__ = (
        "conn",
        "request",
        "send_timeout",
        "server_line",
        "date_line",
        "status",
        "status_code",
        "headers",
        "content_length",
        "keep_alive",
        "head_sent",
        "chunked",
        "bytes_sent",
        "no_body",
        "complete",  # finish() ended the body: what fails after (a close()) cut nothing
        "must_close",
        "heads",
        "_before",  # set only by a head that changed them: the keep_alive, server and date
        # lines given, which a replacing start_response (exc_info) starts from again
    )

    def __init__(
        self,
        conn: Connection,
        request: Request,
        keep_alive: bool,
        send_timeout: float,
        server_line: bytes,
        date_line: bytes,
        must_close: Callable[[], bool] | None = None,
        heads: HeadCache | None = None,
    ) -> None:
        self.conn = conn
        self.must_close = must_close
        self.heads = heads
        self.request = request
        self.keep_alive = keep_alive
        self.send_timeout = send_timeout
        self.server_line = server_line
        self.date_line = date_line
        self.status = b""
        self.status_code = 0
        self.headers = b""
        self.content_length: int | None = None
        self.head_sent = False
        self.chunked = False
        self.bytes_sent = 0
        self.no_body = request.method == "HEAD"
        self.complete = False

    def start_response(
        self,
        status: str,
        headers: list[tuple[str, str]],
        exc_info: ExcInfo | None = None,
    ) -> Callable[[bytes], None]:
        if exc_info is not None:
            try:
                if self.head_sent:
                    raise exc_info[1].with_traceback(exc_info[2])
            finally:
                exc_info = None  # break the traceback cycle (PEP 3333)
            before = getattr(self, "_before", None)
            if before is not None:  # the replaced head's Connection, Server, Date are gone
                self.keep_alive, self.server_line, self.date_line = before
                del self._before
        elif self.status:
            raise AssertionError("start_response() called twice without exc_info")
        heads = self.heads
        if heads is None:
            self._apply(_check_head(status, headers))
            return self.write
        items = tuple(headers)  # once: an iterator can be read only once
        key: tuple[str, tuple[tuple[str, str], ...]] | None = (status, items)
        try:
            checked = heads.get(key)  # type: ignore[arg-type]
        except TypeError:  # unhashable header items: checked the long way
            key = checked = None
        if checked is not None:
            self._apply(checked)
            return self.write
        checked = _check_head(status, items)
        if key is not None and heads is not None:
            if len(heads) >= HEAD_CACHE_SIZE:
                heads.clear()
            heads[key] = checked
        self._apply(checked)
        return self.write

    def _apply(self, checked: CheckedHead) -> None:
        self.status, self.status_code, self.headers, self.content_length, closes, own = checked
        if closes or own:
            self._before = (self.keep_alive, self.server_line, self.date_line)
            if closes:
                self.keep_alive = False
            if own & OWN_SERVER:
                self.server_line = b""
            if own & OWN_DATE:
                self.date_line = b""
        # decided again on a second call (exc_info): a 500 replacing a 204 has a body
        self.no_body = self.request.method == "HEAD" or self.status.startswith(_NO_BODY_STATUS)

    def head(self, known_length: int | None) -> bytes:
        """The status line and headers; decides the framing. `known_length` is the total body
        size when the server knows it (a list body) and the application gave none."""
        if self.request.error is not None:
            # The body broke (over max_body_size, bad chunking) while the application read
            # it. Frameworks turn the exception into their own 500 page; the client gets the
            # server's status instead (respond() answers a ProtocolError before any head).
            raise self.request.error
        if self.request.method == "CONNECT" and self.status[:1] == b"2":
            return self._tunnel_head()
        framing = b""
        length = self.content_length
        if length is None and not self.status.startswith(_NO_BODY_STATUS):
            # Here no_body means HEAD. An empty body given for HEAD tells nothing of the GET
            # body (Werkzeug answers HEAD with ()), and Content-Length: 0 would say that is
            # empty (RFC 9110 8.6), so none is sent (9.3.2 allows that); a non-empty one is
            # the GET body, which the server strips.
            if known_length is not None and (known_length or not self.no_body):
                length = known_length
                framing = b"Content-Length: %d\r\n" % known_length
            elif self.no_body:
                pass  # HEAD without a known length: no body follows, nothing to frame
            elif self.request.version != "1.0":
                self.chunked = True
                framing = b"Transfer-Encoding: chunked\r\n"
            else:
                self.keep_alive = False  # close-delimited body
        if self.content_length is None and length is not None:
            self.content_length = length
        if self.keep_alive and self.must_close is not None and self.must_close():
            self.keep_alive = False  # the worker was asked to stop while this request ran
        if self.keep_alive and not self.request.complete and not drainable(self.request):
            # the rest of the body will not be read: say the connection closes, or the
            # client's next request on it would be lost (RFC 9110 15.5: a final status sent
            # before the content is read says whether the connection stays)
            self.keep_alive = False
        if self.keep_alive:
            if self.request.version == "1.0":
                framing += b"Connection: keep-alive\r\n"
        else:
            framing += b"Connection: close\r\n"
        return (
            b"HTTP/1.1 "
            + self.status
            + CRLF
            + self.headers
            + self.server_line
            + self.date_line
            + framing
            + CRLF
        )

    def _tunnel_head(self) -> bytes:
        """A 2xx to CONNECT opens a tunnel: no Content-Length or Transfer-Encoding (RFC 9110
        9.3.6: a server MUST NOT send them), the body goes out as the tunnel's bytes, and the
        connection closes after it (a WSGI application has no tunnel to keep open)."""
        self.content_length = None
        self.keep_alive = False
        headers = b"".join(
            line + CRLF
            for line in self.headers.split(CRLF)
            if line and not line.lower().startswith(b"content-length:")
        )
        head = b"HTTP/1.1 " + self.status + CRLF + headers
        return head + self.server_line + self.date_line + CRLF

    def write(self, data: bytes) -> None:
        """Send body bytes (the legacy write() callable and the iterable both end here)."""
        if not self.status:
            raise AssertionError("write() before start_response()")
        if type(data) is not bytes:
            data = _as_bytes(data)
        out = b"" if self.head_sent else self.head(None)
        self.head_sent = True
        body = 0
        if data and not self.no_body:
            length = self.content_length
            if length is not None and self.bytes_sent + len(data) > length:
                data = data[: length - self.bytes_sent]  # never send past the declared length
                self.keep_alive = False
            body = len(data)
            self.bytes_sent += body
            out += chunk(data) if self.chunked else data
        if out:
            try:
                self.conn.send(out, self.send_timeout)
            except (ClientDisconnected, ClientTimeout) as exc:
                # bytes_sent counts what left: not the body bytes still unsent (a chunk
                # ends in 2 bytes of framing)
                after = 2 if self.chunked else 0
                self.bytes_sent -= min(max(exc.unsent - after, 0), body)
                raise

    def send_whole(self, body: bytes) -> None:
        """The whole response in one send: head plus a body the server holds entirely."""
        if type(body) is not bytes:
            body = _as_bytes(body)
        if (
            self.content_length is not None
            and not self.no_body
            and len(body) < self.content_length
        ):
            self.keep_alive = False  # fewer bytes than declared: the framing is lost
        out = self.head(len(body))
        if not self.no_body:
            length = self.content_length
            if length is not None and len(body) > length:
                body = body[:length]
                self.keep_alive = False
            self.bytes_sent = len(body)
            out += body
        self.head_sent = True
        try:
            self.conn.send(out, self.send_timeout)
        except (ClientDisconnected, ClientTimeout) as exc:
            # bytes_sent counts what left (the body is last in `out`), as write()'s does
            self.bytes_sent -= min(exc.unsent, self.bytes_sent)
            raise

    def sendfile(self, wrapper: FileWrapper, fd: int) -> bool:
        """Send a file body with os.sendfile; False when the file cannot be used that way.

        The body starts where the file object stands (its tell(), not the descriptor's
        offset: a buffered file read ahead of what the application consumed), and the file
        object is left after what was sent, as iterating would have left it."""
        filelike = wrapper.filelike
        # without tell() (an object with only fileno() and read()), the descriptor's offset
        tell: Callable[[], int] | None = getattr(filelike, "tell", None)
        try:
            offset = tell() if tell is not None else os.lseek(fd, 0, os.SEEK_CUR)
            size = os.fstat(fd).st_size
        except (OSError, ValueError):  # ValueError: tell() on a closed file
            return False
        if not size:
            # nothing to send, or a file whose size says nothing of what read() returns
            # (/proc's are 0 bytes long): reading it is as quick, and right either way
            return False
        size = max(size - offset, 0)
        length = self.content_length
        count = size if length is None else min(size, length - self.bytes_sent)
        if not self.head_sent:
            self.conn.send(self.head(count if length is None else None), self.send_timeout)
            self.head_sent = True
        if self.no_body:
            return True
        sock_fd = self.conn.fd
        start = self.bytes_sent
        self.conn.sock.setblocking(False)  # so a client that stops reading hits send_timeout
        try:
            self._sendfile(sock_fd, fd, offset, count)
        finally:
            self.conn.sock.setblocking(True)
            # os.sendfile with an offset moves neither the descriptor nor the file object
            _seek(filelike, fd, offset + self.bytes_sent - start)
        return True

    def _sendfile(self, sock_fd: int, fd: int, offset: int, count: int) -> None:
        while count > 0:
            try:
                sent = os.sendfile(sock_fd, fd, offset, min(count, 1 << 30))
            except BlockingIOError:
                sent = -1
            except OSError as exc:
                if not peer_failed(exc):
                    raise
                raise ClientDisconnected(str(exc)) from None
            if sent == 0:
                break  # the file shrank
            if sent < 0:
                self.conn.wait_writable(self.send_timeout)
                continue
            offset += sent
            count -= sent
            self.bytes_sent += sent

    def cut(self) -> None:
        """The response ends here, early (an error, a client too slow): when the connection's
        close alone frames its body (no length, no chunking to tell the client it is short),
        make that close a reset, since a FIN would pass the body off as complete."""
        if (
            self.head_sent
            and not self.complete
            and not self.no_body
            and not self.chunked
            and self.content_length is None
        ):
            self.conn.reset_on_close()

    def finish(self) -> None:
        """End the body: the last chunk, or note that a declared length was not reached."""
        if not self.head_sent:
            self.send_whole(b"")
        elif self.chunked:
            self.conn.send(LAST_CHUNK, self.send_timeout)
        elif (
            self.content_length is not None
            and not self.no_body
            and self.bytes_sent < self.content_length
        ):
            self.keep_alive = False  # the client will see a short body; the framing is lost
        self.complete = True


def _seek(filelike: IO[bytes], fd: int, position: int) -> None:
    """Put a file object (through seek(), so a buffered one drops its stale read-ahead) or
    else its descriptor at `position`; a file that will not move is left as it is, since
    the body it held has been sent already."""
    seek: Callable[[int], object] | None = getattr(filelike, "seek", None)
    try:
        if seek is not None:
            seek(position)
        else:
            os.lseek(fd, position, os.SEEK_SET)
    except (OSError, ValueError):
        pass


def _as_bytes(data: object) -> bytes:
    """bytearray and memoryview are tolerated; anything else (a str, most often) is the
    application's error, reported before a byte of the response is sent."""
    if isinstance(data, bytearray | memoryview):
        return bytes(data)
    raise TypeError(f"a WSGI body must be bytes, not {type(data).__name__}")


def drainable(request: Request) -> bool:
    """Whether the server can read and discard the rest of `request`'s body once it has
    answered, and so keep the connection: a declared length with at most DRAIN_LIMIT bytes
    still to come, from a client not waiting for a 100 Continue (it may never send them)."""
    return (
        request.content_length is not None
        and request.content_length - request.body_size <= DRAIN_LIMIT
        and not request.expect_continue
    )


def run_app(app: WSGIApp, environ: dict[str, Any], response: Response) -> None:
    """Call the application and send its response; the iterable is always closed."""
    if response.request.expect_continue:
        # the application may start its response and only then read the body: the Input,
        # which owes the 100 Continue, must then know the head has gone (see Input._fill)
        body = environ.get("wsgi.input")
        if type(body) is Input:
            body.answered_by(response)
    result = app(environ, response.start_response)
    try:
        if type(result) is list or type(result) is tuple:
            if not response.status:
                raise AssertionError("application returned without calling start_response()")
            if len(result) == 1 and not response.head_sent:
                response.send_whole(result[0])
            elif not response.head_sent and response.content_length is None:
                response.send_whole(b"".join(result))
            else:
                for data in result:
                    response.write(data)
        elif (
            type(result) is FileWrapper
            and not response.head_sent  # write() already chose the framing
            and response.conn.sendfile_ok
            and (fd := sendfile_fd(result)) is not None
        ):
            if not response.status:
                raise AssertionError("application returned without calling start_response()")
            if not response.sendfile(result, fd):
                for data in result:
                    response.write(data)
        else:
            for data in result:
                if data or response.head_sent:
                    response.write(data)
                elif not response.status:
                    raise AssertionError("application yielded before calling start_response()")
            if not response.status:
                raise AssertionError("application returned without calling start_response()")
        response.finish()
    finally:
        close = getattr(result, "close", None)
        if close is not None:
            close()


def error_status(exc: BaseException) -> int:
    """The status for an exception that escaped the application before headers were sent."""
    if isinstance(exc, ProtocolError):
        return exc.status
    return 500

