"""The error log and the access log, for the master and (inherited across fork) its workers.

Invariants: the error log is always file descriptor 2, so tracebacks printed by C code,
faulthandler stack dumps and the application's own stderr land in the same place as our
records; reopening (USR1) re-points fd 2 and the access log file without losing a line.
When the server runs as root with a `user`/`group` for its workers, every log file the master
opens is owned by that user and group, so that the workers can reopen it after a rotation.
"""

from __future__ import annotations

import json
import logging
import logging.handlers
import os
import socket
import stat
import sys
import time
from collections.abc import Mapping
from typing import IO, Any

from prefork.accessformat import (
    BUILTIN_FORMATS,
    AccessFormat,
    AccessRecord,
    ApacheClock,
    compile_format,
)
from prefork.privileges import credentials

ERROR_FORMAT = "[%(asctime)s] [%(process)d] [%(levelname)s] %(message)s"
DATE_FORMAT = "%Y-%m-%d %H:%M:%S %z"

log = logging.getLogger("prefork")
access_log = logging.getLogger("prefork.access")


def syslog_handler(address: str, facility: str, ident: str) -> logging.Handler:
    """A SysLogHandler for `/path`, `unix:/path`, `udp://host:port` or `tcp://host:port`;
    messages are tagged `ident[pid]:` as syslog daemons expect."""
    code = logging.handlers.SysLogHandler.facility_names[facility]
    handler: logging.Handler
    if address.startswith(("udp://", "tcp://")):
        host, _, port = address[6:].rpartition(":")
        target = (host.strip("[]"), int(port))
        if address.startswith("tcp"):
            handler = TcpSysLogHandler(target, code)
        else:
            handler = logging.handlers.SysLogHandler(target, code, socket.SOCK_DGRAM)
    else:
        handler = logging.handlers.SysLogHandler(address.removeprefix("unix:"), code)
    handler.setFormatter(logging.Formatter(f"{ident}[%(process)d]: [%(levelname)s] %(message)s"))
    return handler


class TcpSysLogHandler(logging.Handler):
    """Syslog over TCP as rsyslog and syslog-ng read it: RFC 6587 octet counting (`LEN SP
    MSG`), so a message with newlines (a traceback) stays one message. The standard
    handler ends each message with a NUL, which those servers do not take as a frame
    end: messages ran together until a newline split them somewhere else.

    Each process has its own connection (opened at its first message, so workers never
    share the master's stream and interleave frames). A lost connection is opened again
    at the next message, at most once per RETRY seconds; connecting and each send wait at
    most TIMEOUT seconds, so the master's loop cannot stall on the log host. Messages
    are dropped, and counted, while it is unreachable; the count is reported in the first
    message through after it answers again."""

    TIMEOUT = 1.0
    RETRY = 1.0

    def __init__(self, address: tuple[str, int], facility: int) -> None:
        super().__init__()
        self.address = address
        self.facility = facility
        self.socket: socket.socket | None = None  # Logs.fds() keeps it across detaching
        self._owner = 0  # the pid whose connection `self.socket` is
        self._next_try = 0.0
        self.dropped = 0

    def _connect(self) -> bool:
        now = time.monotonic()
        if now < self._next_try:
            return False
        self._next_try = now + self.RETRY
        try:
            self.socket = socket.create_connection(self.address, timeout=self.TIMEOUT)
        except OSError:
            return False
        self._owner = os.getpid()
        return True

    def _drop_socket(self) -> None:
        if self.socket is not None:
            self.socket.close()  # in a child, its copy of another process's connection
            self.socket = None

    def _usable(self) -> bool:
        """Whether this process holds a connection the log host has not closed: a server
        restarted since the last message sent FIN, and a message written into that
        connection would be lost without an error (the reset comes only after it)."""
        if self._owner != os.getpid():
            self._drop_socket()
        if self.socket is None:
            return False
        try:
            if self.socket.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b"":
                self._drop_socket()
                return False
        except BlockingIOError:
            pass  # open, nothing to read: the normal case
        except OSError:
            self._drop_socket()
            return False
        return True

    def _frame(self, record: logging.LogRecord) -> bytes:
        names = logging.handlers.SysLogHandler
        severity = names.priority_names[names.priority_map.get(record.levelname, "warning")]
        message = f"<{self.facility << 3 | severity}>{self.format(record)}".encode()
        return b"%d %s" % (len(message), message)

    def emit(self, record: logging.LogRecord) -> None:
        try:
            frame = self._frame(record)
            if not (self._usable() or self._connect()):
                self.dropped += 1
                return
            if self.dropped:
                note = logging.makeLogRecord({
                    "name": record.name, "levelno": logging.WARNING, "levelname": "WARNING",
                    "msg": "syslog: %d messages were dropped while %s:%d was unreachable",
                    "args": (self.dropped, *self.address),
                })
                frame = self._frame(note) + frame
            assert self.socket is not None
            try:
                self.socket.sendall(frame)
            except OSError:
                self._drop_socket()
                self.dropped += 1
                return
            self.dropped = 0
        except Exception:
            self.handleError(record)

    def close(self) -> None:
        self.acquire()
        try:
            self._drop_socket()
        finally:
            self.release()
        super().close()


class Logs:
    """Owns the log destinations. `access_enabled` is checked before any access work.

    Rotation (USR1): the master reopens first, as root: it creates the new files and chowns
    them to `workers_as`; only then does it tell the workers (MSG_REOPEN), which reopen the
    same paths as the unprivileged user and so find files they may write to. Passing them
    the master's new descriptors instead was considered and not done: a worker can also be
    signalled directly (USR1 to the process group, `systemctl kill`) and must then open by
    path anyway, and the channel's reopen message would need descriptor bookkeeping in every
    worker; chowning (as gunicorn does) keeps one way of reopening for both.
    """

    def __init__(
        self,
        level: str = "info",
        error_log: str = "-",
        access_log: str | None = None,
        access_format: str = "combined",
        syslog: tuple[str, str, str] | None = None,
        workers_as: tuple[str | None, str | None] = (None, None),
    ) -> None:
        """`syslog`: (address, facility, ident) to send both logs there instead.
        `workers_as`: the configuration's (user, group) for the workers; the master updates
        it on USR1 (a reload may have changed them)."""
        self.level = level
        self.workers_as = workers_as
        self.syslog = syslog
        self._syslog_handlers: list[logging.Handler] = []
        self.error_path = None if error_log == "-" else error_log
        self.access_path = None if access_log in (None, "-") else access_log
        self.access_enabled = access_log is not None
        self.access_json = access_format == "json"
        # a custom format (prefork.accessformat), compiled once here: None for the built-in ones
        self.access_custom: AccessFormat | None = (
            None if access_format in BUILTIN_FORMATS else compile_format(access_format)
        )
        # whether access() wants the application's response headers: only a format that
        # logs one, so that no other pays for handing them over
        self.access_response_headers = (
            self.access_custom is not None and self.access_custom.response_headers
        )
        self._access_file: IO[str] | None = None
        self._timestamp = ApacheClock()
        self._iso_second = -1
        self._iso_stamp = ""
        self._iso_offset = ""
        self.open()

    def open(self) -> None:
        for logger in (log, access_log):
            for old in list(logger.handlers):
                logger.removeHandler(old)
                old.close()
            logger.propagate = False
        log.setLevel(self.level.upper())
        access_log.setLevel(logging.INFO)
        if self.syslog is not None:
            handler = syslog_handler(*self.syslog)
            log.addHandler(handler)
            self._syslog_handlers = [handler]
            if self.access_enabled:
                access_handler = syslog_handler(*self.syslog)
                access_log.addHandler(access_handler)
                self._syslog_handlers.append(access_handler)
            return
        # The handler writes to whatever fd 2 is, so adding it before fd 2 is re-pointed puts
        # a warning about the new file's owner into that file itself.
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(ERROR_FORMAT, DATE_FORMAT))
        log.addHandler(handler)
        owner = self._owner()
        if self.error_path is not None:
            self._open_error_log(self.error_path, owner)
        if self.access_enabled:
            if self.access_path is None:  # "-"
                # line-buffered: one write per line, so workers sharing stdout (journald)
                # never interleave mid-line and nothing waits in a buffer at exit
                self._access_file = open(  # noqa: SIM115
                    1, "w", buffering=1, encoding="utf-8", errors="replace", closefd=False
                )
            else:
                self._access_file = self._open_access_log(self.access_path, owner)

    def _owner(self) -> tuple[int, int] | None:
        """The (uid, gid) the log files must have for the workers to reopen them: those of
        `workers_as`, chosen as privileges.credentials chooses them for the workers (-1: unchanged).
        None when no other owner is needed (no user or group, or not root: then the workers
        run as this process does) or a name no longer resolves (logged)."""
        user, group = self.workers_as
        if (user is None and group is None) or os.geteuid() != 0:
            return None
        try:
            return credentials(user, group)
        except KeyError as exc:
            log.warning(
                "cannot give the log files to the workers' user %s, group %s: %s; "
                "the workers cannot reopen them after a rotation", user, group, exc
            )
            return None

    def _give(self, fd: int, path: str, what: str, owner: tuple[int, int] | None) -> None:
        """Chown the open file `fd` (at `path`) to `owner`, keeping its mode. fchown on the
        descriptor, not the path: it is the file we opened, even if the path changed since.
        A failure is logged, not raised: the process keeps logging, only a later reopen by
        the workers is at risk, and the line says which file."""
        if owner is None:
            return
        uid, gid = owner
        try:
            st = os.fstat(fd)
            # /dev/null, a terminal or a pipe (error_log: /dev/stderr) is not ours to give away
            if not stat.S_ISREG(st.st_mode):
                return
            if uid in (-1, st.st_uid) and gid in (-1, st.st_gid):
                return
            os.fchown(fd, uid, gid)
        except OSError as exc:
            log.warning(
                "cannot give the %s %s to the workers' user (uid %d, gid %d): %s; "
                "the workers cannot reopen it after a rotation", what, path, uid, gid, exc
            )

    def _open_error_log(self, path: str, owner: tuple[int, int] | None) -> None:
        """Point fd 2 at `path` (created if need be), owned by `owner`."""
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
        try:
            sys.stderr.flush()  # what was written before the reopen goes to the old file
            os.dup2(fd, 2)
        finally:
            os.close(fd)
        self._give(2, path, "error log", owner)

    def _open_access_log(self, path: str, owner: tuple[int, int] | None) -> IO[str]:
        """`path` (created if need be, mode 0666 less the umask as open(path, "a") gives it),
        owned by `owner`, line-buffered."""
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
        try:
            self._give(fd, path, "access log", owner)
            return open(fd, "a", buffering=1, encoding="utf-8", errors="replace")
        except BaseException:
            os.close(fd)
            raise

    def fds(self) -> list[int]:
        """Descriptors that must survive daemonizing (syslog sockets, the access log file)."""
        fds = []
        for handler in self._syslog_handlers:
            sock = getattr(handler, "socket", None)
            if sock is not None:
                fds.append(sock.fileno())
        if self._access_file is not None and self._access_file is not sys.stdout:
            fds.append(self._access_file.fileno())
        return fds

    def reopen(self) -> None:
        """USR1: point fd 2 and the access log at freshly opened files (after rotation), each
        independently: a file that cannot be opened keeps the old one in use, and the error
        names it. In the master (root) the new files are created and given to `workers_as`
        before it returns, i.e. before the master tells the workers to reopen them."""
        if self.syslog is not None:
            return
        owner = self._owner()
        if self.error_path is not None:
            try:
                self._open_error_log(self.error_path, owner)
            except OSError as exc:
                log.error(
                    "cannot reopen the log files: error log %s: %s; still writing to the old "
                    "one", self.error_path, exc
                )
        if self.access_path is not None and self._access_file is not None:
            try:
                new = self._open_access_log(self.access_path, owner)
            except OSError as exc:
                log.error(
                    "cannot reopen the log files: access log %s: %s; still writing to the old "
                    "one", self.access_path, exc
                )
            else:
                old, self._access_file = self._access_file, new
                old.close()

    def _iso_timestamp(self) -> str:
        """ISO 8601 local time with milliseconds and UTC offset, as JSON lines carry it
        (2026-11-21T13:05:02.123+00:00); all but the milliseconds made once a second."""
        now = time.time()
        second = int(now)
        if second != self._iso_second:
            self._iso_second = second
            local = time.localtime(second)
            self._iso_stamp = time.strftime("%Y-%m-%dT%H:%M:%S", local)
            offset = local.tm_gmtoff
            sign = "-" if offset < 0 else "+"
            hours, minutes = divmod(abs(offset) // 60, 60)
            self._iso_offset = f"{sign}{hours:02d}:{minutes:02d}"
        return f"{self._iso_stamp}.{int((now - second) * 1000):03d}{self._iso_offset}"

    def access(
        self,
        remote: str,
        method: str,
        target: str,
        version: str,
        status: int,
        size: int,
        referer: str,
        user_agent: str,
        duration: float,
        worker: int,
        protocol: str | None = None,
        *,
        environ: Mapping[str, Any] | None = None,
        response_headers: bytes | None = None,
    ) -> None:
        """One access-log line: Apache combined plus the duration in microseconds, JSON, or
        the custom format. `protocol` replaces `HTTP/{version}` (TCP or TLS for a stream
        connection). `environ` (the request's, if it has one) and `response_headers` (the
        application's header lines, given only when `access_response_headers` asks for
        them) are read by a custom format only."""
        protocol = protocol or f"HTTP/{version}"
        out = self._access_file
        if out is None and not self.syslog:
            return
        micros = int(duration * 1_000_000)
        if self.access_json:
            line = json.dumps(
                {
                    "time": self._iso_timestamp(),
                    "remote": remote,
                    "method": method,
                    "target": target,
                    "protocol": protocol,
                    "status": status,
                    "bytes": size,
                    "referer": referer,
                    "user_agent": user_agent,
                    "duration_us": micros,
                    "worker": worker,
                    "pid": os.getpid(),
                },
                ensure_ascii=True,
            )
        elif self.access_custom is None:
            request_line = f"{method} {target} {protocol}".replace('"', '\\"')
            line = (
                f'{remote or "-"} - - [{self._timestamp()}] "{request_line}" {status} '
                f'{size or "-"} "{_quote(referer)}" "{_quote(user_agent)}" {micros}'
            )
        else:
            line = self.access_custom.render(
                AccessRecord(
                    remote, method, target, protocol, status, size, referer, user_agent,
                    duration, environ, response_headers,
                )
            )
        if out is None:
            access_log.info("%s", line)
            return
        try:
            out.write(line + "\n")
        except (OSError, ValueError):
            pass


def _quote(value: str) -> str:
    if not value:
        return "-"
    return value.replace("\\", "\\\\").replace('"', '\\"')
