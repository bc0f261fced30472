"""Development mode (`reload: true`): notice source changes, and serve import errors.

Invariants: worker side only; the watcher is a file descriptor in the worker's epoll (inotify
through libc, no threads) or, where inotify is missing, an mtime poll at most once a second;
a change makes the worker stop gracefully, and the master starts a fresh one that imports the
new code.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import struct
import sys
import sysconfig
import time
import traceback
from collections.abc import Callable, Iterable
from typing import Any

IN_MODIFY = 0x002
IN_ATTRIB = 0x004
IN_CLOSE_WRITE = 0x008
IN_MOVED_TO = 0x080
IN_CREATE = 0x100
IN_DELETE = 0x200
IN_NONBLOCK = os.O_NONBLOCK
IN_CLOEXEC = os.O_CLOEXEC
_EVENT = struct.Struct("iIII")  # wd, mask, cookie, name length
_WATCH_MASK = IN_CLOSE_WRITE | IN_MOVED_TO | IN_CREATE | IN_DELETE | IN_ATTRIB | IN_MODIFY
POLL_INTERVAL = 1.0


def module_files(extra: Iterable[str] = ()) -> set[str]:
    """Source files of the imported modules outside the standard library, plus `extra`."""
    skip = {sysconfig.get_paths()[k] for k in ("stdlib", "platstdlib")}
    files = set()
    for module in list(sys.modules.values()):
        path = getattr(module, "__file__", None)
        if not path:
            continue
        path = os.path.abspath(path)
        if path.endswith((".pyc", ".pyo")):
            path = path[:-1]
        if any(path.startswith(root + os.sep) for root in skip):
            continue
        files.add(path)
    files.update(os.path.abspath(p) for p in extra)
    return files


class Watcher:
    """Tells when one of `files`, or of the modules imported later (watch_new_imports),
    changed."""

    def __init__(self, files: set[str]) -> None:
        self.files: set[str] = set()
        self.fd: int | None = None
        self._dirs: dict[int, str] = {}
        self._watched: set[str] = set()  # directories with an inotify watch
        self._mtimes: dict[str, float] = {}
        self._next_poll = 0.0
        self._libc: Any = None
        self._module_count = len(sys.modules)
        libc_name = ctypes.util.find_library("c")
        try:
            libc = ctypes.CDLL(libc_name, use_errno=True)
            fd = libc.inotify_init1(IN_NONBLOCK | IN_CLOEXEC)
            if fd < 0:
                raise OSError(ctypes.get_errno(), "inotify_init1")
            self.fd, self._libc = fd, libc
        except (OSError, AttributeError):
            self.fd = None  # no inotify here: poll the mtimes instead
        self.add(files)

    def add(self, files: set[str]) -> None:
        """Watch `files` too (their directories, with inotify)."""
        for path in files - self.files:
            self.files.add(path)
            self._mtimes[path] = _mtime(path)
        if self.fd is None:
            return
        for directory in sorted({os.path.dirname(p) for p in files} - self._watched):
            self._watched.add(directory)
            wd = self._libc.inotify_add_watch(self.fd, directory.encode(), _WATCH_MASK)
            if wd >= 0:
                self._dirs[wd] = directory

    def watch_new_imports(self) -> None:
        """Watch the modules imported since the last look, as gunicorn's and Django's own
        reloaders do: a framework imports much of the application only when the first
        request comes (Django its URL configuration, the views, the admin modules), and
        those files went unwatched, so saving a view changed nothing until a restart. One
        len() while no module is imported."""
        count = len(sys.modules)
        if count != self._module_count:
            self._module_count = count
            self.add(module_files())  # add() skips what it watches already

    def changed(self) -> str | None:
        """The first changed file, or None. With inotify, call when `fd` is readable."""
        if self.fd is not None:
            return self._read_events()
        now = time.monotonic()
        if now < self._next_poll:
            return None
        self._next_poll = now + POLL_INTERVAL
        for path, before in self._mtimes.items():
            if _mtime(path) != before:
                return path
        return None

    def _read_events(self) -> str | None:
        assert self.fd is not None
        found = None
        while True:
            try:
                data = os.read(self.fd, 65536)
            except OSError as exc:
                if exc.errno in (errno.EAGAIN, errno.EINTR):
                    return found
                raise
            offset = 0
            while offset + _EVENT.size <= len(data):
                wd, _, _, length = _EVENT.unpack_from(data, offset)
                name = data[offset + _EVENT.size : offset + _EVENT.size + length]
                offset += _EVENT.size + length
                path = os.path.join(self._dirs.get(wd, ""), name.rstrip(b"\0").decode())
                if found is None and path in self.files:
                    found = path

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def _mtime(path: str) -> float:
    try:
        return os.stat(path).st_mtime
    except OSError:
        return -1.0


def error_app(
    exc: BaseException, stream: bool = False
) -> tuple[Callable[..., Any], set[str]]:
    """A WSGI app answering 500 with the traceback of `exc` (an import failure), and the
    files it involves (so fixing the file is noticed even though it never imported). With
    `stream` (protocol tcp), a handler that sends the same text and closes."""
    text = "".join(traceback.format_exception(exc))
    files = {frame.filename for frame in traceback.extract_tb(exc.__traceback__)}
    cause: BaseException | None = exc
    while cause is not None:
        filename = getattr(cause, "filename", None)
        if isinstance(filename, str):
            files.add(filename)
        files.update(f.filename for f in traceback.extract_tb(cause.__traceback__))
        cause = cause.__cause__ or cause.__context__
    body = (
        "preforkd (reload mode): the application could not be loaded.\n"
        "Fix the code and save: the workers restart on their own.\n\n" + text
    ).encode("utf-8", "replace")

    def handler(sock: Any, addr: Any) -> None:
        sock.sendall(body)

    if stream:
        return handler, _files(files)

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
        start_response(
            "500 Internal Server Error",
            [("Content-Type", "text/plain; charset=utf-8"), ("Content-Length", str(len(body)))],
        )
        return [body]

    return app, _files(files)


def _files(files: set[str]) -> set[str]:
    return {os.path.abspath(f) for f in files if f and not f.startswith("<")}
