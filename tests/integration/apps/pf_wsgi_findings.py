"""The app for tests/integration/test_wsgi_findings.py (imported by preforkd workers): what
Flask (Werkzeug), Django and their middleware do to a server, as plain WSGI.

Routes on PATH_INFO:
  /gzip             wsgi.file_wrapper over a gzip.GzipFile of GZIP_TEXT, no Content-Length
  /proc             wsgi.file_wrapper over /proc/self/status (its size says 0 bytes)
  /named            wsgi.file_wrapper over a tempfile.NamedTemporaryFile of NAMED_TEXT
  /range?START-END  a FILE_SIZE-byte file in wsgi.file_wrapper, behind RangeMiddleware
  /files            what the files of /range noted (CountingFile), as JSON
  /no-content       204 with Content-Length: 0, as Django's CommonMiddleware sends it
  /stream           a slow body, behind a middleware whose iterable forgets to close the
                    generator it wraps (so the generator ends when it is freed)
  /freed            JSON: whether /stream's generator of the last request was freed
The module turns the cyclic garbage collector off in the worker, so "freed" means freed by
reference counting, the moment nothing holds it.
"""

from __future__ import annotations

import gc
import gzip
import io
import json
import os
import tempfile
import time
import weakref
from collections.abc import Callable, Iterable, Iterator
from typing import Any

gc.disable()

StartResponse = Callable[..., Any]
GZIP_TEXT = b"hello from inside a gzip file\n" * 200
NAMED_TEXT = b"named temporary file\n" * 300
FILE_SIZE = 4 << 20
BLOCK = 8192  # the block size Werkzeug gives wsgi.file_wrapper

_files: list[dict[str, Any]] = []
_streams: list[weakref.ref[Any]] = []


def _reply(start_response: StartResponse, document: object) -> Iterable[bytes]:
    body = json.dumps(document).encode()
    start_response("200 OK", [("Content-Type", "application/json")])
    return [body]


class CountingFile(io.BufferedReader):
    """A buffered file that notes in `_files` how many bytes were read from it, and who
    closed it: "close", a call of close() (what Django hangs its request_finished signal on:
    FileResponse's file gets the response's close), or "finalizer", nobody, until the file
    was freed."""

    _finalizing = False

    def __init__(self, path: str) -> None:
        super().__init__(io.FileIO(path, "rb"))
        self.note: dict[str, Any] = {"read": 0, "closed_by": None}
        _files.append(self.note)

    def read(self, size: int | None = -1) -> bytes:
        data = super().read(size)
        self.note["read"] += len(data)
        return data

    def close(self) -> None:
        if not self.closed:
            self.note["closed_by"] = "finalizer" if self._finalizing else "close"
        super().close()

    def __del__(self) -> None:
        self._finalizing = True
        super().__del__()


class RangeMiddleware:
    """Werkzeug's _RangeWrapper (what Flask's send_file answers a Range request with): it
    iterates iter(body), seeks to the first byte if the iterator is seekable() and reads up
    to it otherwise, and its close() closes the iterator it took, not the body."""

    def __init__(self, body: Iterable[bytes], start: int, length: int) -> None:
        self.iterable: Any = iter(body)
        self.start = start
        self.length = length
        self.seekable = hasattr(self.iterable, "seekable") and self.iterable.seekable()

    def __iter__(self) -> Iterator[bytes]:
        position = 0
        if self.seekable:
            self.iterable.seek(self.start)
            position = self.iterable.tell()
        sent = 0
        for block in self.iterable:
            begin = max(self.start - position, 0)
            position += len(block)
            piece = block[begin : begin + self.length - sent]
            if piece:
                sent += len(piece)
                yield piece
            if sent >= self.length:
                return

    def close(self) -> None:
        if hasattr(self.iterable, "close"):
            self.iterable.close()


class ForgetfulIterable:
    """Middleware whose iterable closes itself but not the generator inside it: that one is
    finalized when the last reference to it goes."""

    def __init__(self, inner: Iterator[bytes]) -> None:
        self.inner = inner

    def __iter__(self) -> Iterator[bytes]:
        return self.inner

    def close(self) -> None:
        pass


def _big_file() -> str:
    path = os.path.join(tempfile.gettempdir(), f"pf_wsgi_findings_{os.getpid()}.bin")
    if not os.path.exists(path) or os.path.getsize(path) != FILE_SIZE:
        with open(path, "wb") as f:
            f.write(bytes(range(256)) * (FILE_SIZE // 256))
    return path


def app(environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
    path = environ["PATH_INFO"]
    wrapper: Callable[..., Iterable[bytes]] = environ["wsgi.file_wrapper"]
    if path == "/gzip":
        raw = io.BytesIO()
        with gzip.GzipFile(fileobj=raw, mode="wb") as z:
            z.write(GZIP_TEXT)
        stored = tempfile.TemporaryFile()  # noqa: SIM115 (freed with the GzipFile)
        stored.write(raw.getvalue())
        stored.seek(0)
        start_response("200 OK", [("Content-Type", "text/plain")])
        return wrapper(gzip.GzipFile(fileobj=stored, mode="rb"), BLOCK)
    if path == "/proc":
        start_response("200 OK", [("Content-Type", "text/plain")])
        return wrapper(open("/proc/self/status", "rb"), BLOCK)  # noqa: SIM115
    if path == "/named":
        named = tempfile.NamedTemporaryFile()  # noqa: SIM115 (closed by the server)
        named.write(NAMED_TEXT)
        named.seek(0)
        start_response("200 OK", [("Content-Type", "text/plain")])
        return wrapper(named, BLOCK)
    if path == "/range":
        start, _, end = environ["QUERY_STRING"].partition("-")
        first, last = int(start), int(end)
        body = wrapper(CountingFile(_big_file()), BLOCK)
        start_response(
            "206 Partial Content",
            [
                ("Content-Type", "application/octet-stream"),
                ("Content-Length", str(last - first + 1)),
                ("Content-Range", f"bytes {first}-{last}/{FILE_SIZE}"),
            ],
        )
        return RangeMiddleware(body, first, last - first + 1)
    if path == "/files":
        return _reply(start_response, _files)
    if path == "/no-content":
        start_response(
            "204 No Content",
            [("Content-Type", "text/html; charset=utf-8"), ("Content-Length", "0")],
        )
        return [b""]
    if path == "/stream":

        def generate() -> Iterator[bytes]:
            for _ in range(500):  # ten seconds at most; the client leaves at once
                yield b"x" * 1024
                time.sleep(0.02)

        inner = generate()
        _streams.append(weakref.ref(inner))
        start_response("200 OK", [("Content-Type", "application/octet-stream")])
        return ForgetfulIterable(inner)
    if path == "/freed":
        return _reply(start_response, [ref() is None for ref in _streams])
    start_response("404 Not Found", [("Content-Type", "text/plain")])
    return [b"not found"]
