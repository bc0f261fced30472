"""Static files served by the worker before the application is called (uWSGI's static-map).

Invariants: a file is served only if its real path (symlinks resolved) lies inside its
entry's real directory and it is a regular file; a directory's index file is such a file,
and a directory is redirected to its slashed URL only when that file is there; anything
else (missing, a directory, a symlink out, unreadable) is not this module's answer and goes
to the application. No I/O but on the files themselves; nothing here touches the connection.
"""

from __future__ import annotations

import email.utils
import mimetypes
import os
import stat
import urllib.parse
from collections.abc import Iterable, Iterator
from typing import IO, Any, NamedTuple

from prefork.config import StaticConfig
from prefork.wsgi import FileWrapper, StartResponse, WSGIApp

# Block size of a body read rather than sent with os.sendfile (TLS).
READ_BLOCK = 1 << 16
# Content types whose text gets "; charset=utf-8" besides text/*.
_TEXT_TYPES = frozenset(
    {"application/javascript", "application/json", "application/xml", "image/svg+xml"}
)


class Found(NamedTuple):
    """A file of an entry, opened: what a response needs to know of it."""

    file: IO[bytes]
    size: int
    mtime: float
    mtime_ns: int


def relative_part(path: str, url: str) -> str | None:
    """What follows entry prefix `url` (ending in "/") in the decoded, dot-segment-free
    request `path`, or None when `path` is not under it. The prefix matches whole segments:
    "/static" and "/static/x" are under "/static/", "/staticx" is not."""
    if path.startswith(url):
        return path[len(url) :]
    if path == url[:-1]:
        return ""
    return None


def resolve(root: bytes, rest: str) -> bytes | None:
    """The real path of file `rest` (a request path below an entry's prefix, latin-1 text
    of the decoded bytes) inside directory `root` (a real path), or None when it must not
    be served: a NUL, a ".." segment, an empty name, or a real path outside `root` (a
    symlink that leaves the directory is not followed, as uWSGI's default)."""
    name = rest.encode("latin-1")
    if not name or name.endswith(b"/") or b"\0" in name:
        return None
    parts = name.split(b"/")
    if b".." in parts:  # never after dot-segment removal; kept as a second fence
        return None
    candidate = os.path.join(root, *(p for p in parts if p and p != b"."))
    real = os.path.realpath(candidate)
    if not real.startswith(root.rstrip(b"/") + b"/"):
        return None
    return real


def open_regular(real: bytes) -> Found | None:
    """`real` opened for reading if it is a regular file, else None. O_NONBLOCK, so a FIFO
    put in the directory cannot hang the worker in open(); regular files ignore it."""
    try:
        fd = os.open(real, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOFOLLOW)
    except OSError:
        return None
    try:
        st = os.fstat(fd)
    except OSError:
        os.close(fd)
        return None
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        return None
    return Found(os.fdopen(fd, "rb"), st.st_size, st.st_mtime, st.st_mtime_ns)


def open_file(root: bytes, rest: str) -> Found | None:
    """File `rest` of directory `root` opened, if it may be served (resolve, open_regular)."""
    real = resolve(root, rest)
    return None if real is None else open_regular(real)


def slashed(url: str, rest: str) -> str:
    """The URL of directory `rest` under entry prefix `url`, with its trailing slash: the
    decoded path encoded again, without the empty segments the request may have had (a
    Location of "//host/" would send the client to another host)."""
    segments = [s for s in rest.encode("latin-1").split(b"/") if s]
    return url + "".join(urllib.parse.quote(s, safe="!$&'()*+,;=:@") + "/" for s in segments)


def moved(location: str, query: str) -> WSGIApp:
    """A 301 to `location` (the request's query string kept), with an empty body."""
    headers = [
        ("Location", f"{location}?{query}" if query else location),
        ("Content-Length", "0"),
    ]

    def respond(environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        start_response("301 Moved Permanently", headers)
        return []

    return respond


def content_type(name: str) -> str:
    """The Content-Type of file `name` by its extension; text with charset=utf-8. A name
    with a compression suffix (.gz, .bz2) is that compressed file, not its contents."""
    kind, encoding = mimetypes.guess_type(name, strict=False)
    if encoding is not None:
        return "application/gzip" if encoding == "gzip" else "application/octet-stream"
    if kind is None:
        return "application/octet-stream"
    if kind.startswith("text/") or kind in _TEXT_TYPES:
        return kind + "; charset=utf-8"
    return kind


def accepts_gzip(header: str) -> bool:
    """Accept-Encoding names gzip (or *) with a q above 0 (RFC 9110 12.5.3)."""
    star = False
    for item in header.split(","):
        coding, _, params = item.partition(";")
        coding = coding.strip().lower()
        if coding not in ("gzip", "x-gzip", "*"):
            continue
        q = 1.0
        for param in params.split(";"):
            key, _, value = param.partition("=")
            if key.strip().lower() == "q":
                try:
                    q = float(value.strip())
                except ValueError:
                    q = 0.0
        if coding == "*":
            star = q > 0
        else:
            return q > 0
    return star


def byte_range(header: str, size: int) -> tuple[int, int] | None | bool:
    """A single `Range: bytes=a-b` against a body of `size` bytes: (first, last) inclusive;
    False when unsatisfiable (416); None when the header is to be ignored (not bytes,
    malformed, or several ranges: the whole body is sent, as RFC 9110 14.2 allows)."""
    unit, _, spec = header.partition("=")
    if unit.strip().lower() != "bytes" or "," in spec:
        return None
    first_text, dash, last_text = spec.strip().partition("-")
    if not dash:
        return None
    first_text, last_text = first_text.strip(), last_text.strip()
    if not (first_text.isascii() and last_text.isascii()):
        return None
    if not first_text:  # a suffix: the last N bytes
        if not last_text.isdigit():
            return None
        count = int(last_text)
        if count == 0 or size == 0:
            return False
        return max(size - count, 0), size - 1
    if not first_text.isdigit() or (last_text and not last_text.isdigit()):
        return None
    first = int(first_text)
    if last_text and int(last_text) < first:
        return None
    last = int(last_text) if last_text else size - 1
    if first >= size:
        return False
    return first, min(last, size - 1)


def etag(found: Found) -> str:
    """A weak validator from the modification time and size (as nginx's, but weak: a file
    rewritten within a nanosecond tick to the same size would keep it)."""
    return f'W/"{found.mtime_ns:x}-{found.size:x}"'


def _etag_matches(header: str, tag: str) -> bool:
    """If-None-Match against `tag`, by weak comparison (RFC 9110 13.1.2)."""
    if header.strip() == "*":
        return True
    opaque = tag.removeprefix("W/")
    return any(item.strip().removeprefix("W/") == opaque for item in header.split(","))


def _not_modified_since(header: str, mtime: float) -> bool:
    try:
        since = email.utils.parsedate_to_datetime(header)
    except (TypeError, ValueError, IndexError):
        return False
    if since.tzinfo is None:
        return False
    return int(mtime) <= since.timestamp()


class FileRange:
    """A byte range of an open file as a body read block by block (TLS connections, which
    cannot use os.sendfile); closing it closes the file."""

    def __init__(self, file: IO[bytes], count: int) -> None:
        self.file = file
        self.left = count

    def __iter__(self) -> Iterator[bytes]:
        while self.left > 0:
            data = self.file.read(min(self.left, READ_BLOCK))
            if not data:
                return
            self.left -= len(data)
            yield data

    def close(self) -> None:
        self.file.close()


class StaticEntry(NamedTuple):
    url: str  # ends in "/"
    root: bytes  # real path of the directory
    cache_control: tuple[tuple[str, str], ...]
    gzip: bool
    index_name: str  # "" for none


class StaticFiles:
    """The `static` entries of one generation, for one worker."""

    def __init__(self, entries: Iterable[StaticConfig]) -> None:
        self.entries = tuple(
            StaticEntry(
                e.url,
                os.fsencode(os.path.realpath(e.path)),
                (("Cache-Control", f"max-age={e.max_age}"),) if e.max_age else (),
                e.gzip,
                e.index,
            )
            for e in entries
        )
        # the system's types read now, not on the first request; not mimetypes.init(),
        # which would drop the types a preloaded application added (Django, WhiteNoise)
        mimetypes.guess_type("a.css")

    def app_for(self, env: dict[str, Any], path: str, sendfile_ok: bool) -> WSGIApp | None:
        """The WSGI application answering this GET or HEAD of decoded `path` from a file,
        or None: the request is the application's."""
        for entry in self.entries:
            rest = relative_part(path, entry.url)
            if rest is None:
                continue
            if path.endswith("/"):  # a directory: its index file, if it has one
                if not entry.index_name:
                    continue
                rest += entry.index_name
            found = open_file(entry.root, rest)
            if found is not None:
                return self._responder(entry, env, rest, found, sendfile_ok)
            if entry.index_name and not path.endswith("/"):
                index = open_file(entry.root, f"{rest}/{entry.index_name}")
                if index is not None:  # a directory asked for without its slash
                    index.file.close()
                    return moved(slashed(entry.url, rest), env.get("QUERY_STRING", ""))
        return None

    def _responder(
        self, entry: StaticEntry, env: dict[str, Any], rest: str, found: Found,
        sendfile_ok: bool,
    ) -> WSGIApp:
        # the type of the name asked for, not of where a symlink inside the directory leads
        headers = [("Content-Type", content_type(rest))]
        if entry.gzip:
            headers.append(("Vary", "Accept-Encoding"))
            if accepts_gzip(env.get("HTTP_ACCEPT_ENCODING", "")):
                packed = resolve(entry.root, rest + ".gz")  # beside the name asked for
                zipped = open_regular(packed) if packed is not None else None
                if zipped is not None:
                    found.file.close()
                    found = zipped
                    headers.append(("Content-Encoding", "gzip"))
        tag = etag(found)
        headers += entry.cache_control
        headers += [
            ("Last-Modified", email.utils.formatdate(found.mtime, usegmt=True)),
            ("ETag", tag),
        ]
        status = "200 OK"
        first, count = 0, found.size
        inm = env.get("HTTP_IF_NONE_MATCH")
        ims = env.get("HTTP_IF_MODIFIED_SINCE")
        if (
            _etag_matches(inm, tag) if inm is not None
            else ims is not None and _not_modified_since(ims, found.mtime)
        ):
            status, count = "304 Not Modified", -1
        elif env["REQUEST_METHOD"] == "GET" and "HTTP_RANGE" in env:
            # with If-Range the whole file: a weak ETag never matches it (RFC 9110 13.1.5)
            wanted = None if "HTTP_IF_RANGE" in env else byte_range(env["HTTP_RANGE"], found.size)
            if wanted is False:
                status, count = "416 Range Not Satisfiable", -2
            elif isinstance(wanted, tuple):
                first, last = wanted
                count = last - first + 1
                status = "206 Partial Content"
                headers.append(("Content-Range", f"bytes {first}-{last}/{found.size}"))
        if count == -2:
            headers += [("Content-Range", f"bytes */{found.size}"), ("Content-Length", "0")]
        elif count >= 0:
            headers += [("Accept-Ranges", "bytes"), ("Content-Length", str(count))]
        file = found.file

        def respond(environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
            start_response(status, headers)
            if count <= 0 or environ["REQUEST_METHOD"] == "HEAD":
                file.close()
                return []
            if first:
                file.seek(first)
            if sendfile_ok:  # Response.sendfile stops at Content-Length
                return FileWrapper(file)
            return FileRange(file, count)

        return respond
