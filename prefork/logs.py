"""The error log and the access log, for the master and (inherited across fork) its workers.

Invariants: the error log is always file descriptor 2, so tracebacks printed by C code,
faulthandler stack dumps and the application's own stderr land in the same place as our
records; reopening (USR1) re-points fd 2 and the access log file without losing a line.
When the server runs as root with a `user`/`group` for its workers, every log file the master
opens is owned by that user and group, so that the workers can reopen it after a rotation.
A reload (HUP) opens its generation's setup aside (`for_reload`) and nothing changes until it
is installed: by each of that generation's workers right after fork, by the master when the
generation takes over. One process has one setup installed at a time.
"""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import logging.handlers
import os
import socket
import stat
import sys
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import IO, TYPE_CHECKING, Any

from prefork.accessformat import (
    BUILTIN_FORMATS,
    AccessFormat,
    AccessRecord,
    ApacheClock,
    IsoClock,
    compile_format,
)
from prefork.privileges import credentials

if TYPE_CHECKING:
    from prefork.config import LoggingConfig

ERROR_FORMAT = "[%(asctime)s] [%(process)d] [%(levelname)s] %(message)s"
DATE_FORMAT = "%Y-%m-%d %H:%M:%S %z"


class JsonFormatter(logging.Formatter):
    """logging.error_log_format: json -- one JSON object per record, on one line: `time`
    (ISO 8601 with milliseconds and UTC offset, as the access log's json), `level`, `pid`,
    `logger`, `message`, and `exception` (the traceback) or `stack` when the record has
    one. A syslog `prefix` (`ident[pid]: `) goes before the object."""

    def __init__(self, prefix: str = "") -> None:
        super().__init__()
        self.prefix = prefix
        self.clock = IsoClock()

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "time": self.clock(record.created),
            "level": record.levelname,
            "pid": record.process,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            entry["exception"] = record.exc_text
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        text = json.dumps(entry, ensure_ascii=True)
        return self.prefix % {"process": record.process} + text if self.prefix else text


def error_formatter(error_format: str, syslog_ident: str | None = None) -> logging.Formatter:
    """The error log's formatter: `text` or `json` (logging.error_log_format); with `syslog_ident`,
    each message tagged `ident[pid]:` as syslog daemons expect."""
    tag = "" if syslog_ident is None else syslog_ident.replace("%", "%%") + "[%(process)d]: "
    if error_format == "json":
        return JsonFormatter(tag)
    if syslog_ident is None:
        return logging.Formatter(ERROR_FORMAT, DATE_FORMAT)
    return logging.Formatter(tag + "[%(levelname)s] %(message)s")

log = logging.getLogger("prefork")
access_log = logging.getLogger("prefork.access")


def syslog_handler(
    address: str, facility: str, ident: str, error_format: str = "text"
) -> logging.Handler:
    """A SysLogHandler for `/path`, `unix:/path`, `udp://host:port` or `tcp://host:port`;
    messages are tagged `ident[pid]:` as syslog daemons expect, then text or (`error_format`
    json) a JSON object."""
    code = logging.handlers.SysLogHandler.facility_names[facility]
    handler: logging.Handler
    try:
        if address.startswith(("udp://", "tcp://")):
            host, _, port = address[6:].rpartition(":")
            target = (host.strip("[]"), int(port))
            if address.startswith("tcp"):
                handler = TcpSysLogHandler(target, code)
            else:
                handler = logging.handlers.SysLogHandler(target, code, socket.SOCK_DGRAM)
        else:
            handler = logging.handlers.SysLogHandler(address.removeprefix("unix:"), code)
    except OSError as exc:  # a host that does not resolve: say which
        if exc.filename is not None:
            raise
        raise OSError(exc.errno, exc.strerror or str(exc), f"syslog {address}") from exc
    handler.setFormatter(error_formatter(error_format, ident))
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


@dataclass(frozen=True, slots=True)
class Stderr:
    """What `error_log: "-"` means to the logging setup a reload makes: the standard error
    the server was started with (`fd`, a descriptor to duplicate), or syslog (`syslog`: a
    detached daemon, whose stderr is /dev/null, sends its error log there, as at the start).
    Neither when that is not known: the first setup pointed fd 2 at a file, and the stderr
    it replaced is gone (keeping a copy would keep a daemon's launching terminal open)."""

    fd: int | None = None
    syslog: bool = False


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
        *,
        stderr: Stderr | None = None,
        install: bool = True,
        syslog_takes: tuple[bool, bool] = (True, True),
        detached: bool = False,
        capture: bool = False,
        capture_output: bool | None = None,
        error_format: str = "text",
    ) -> None:
        """`syslog`: (address, facility, ident) to send the logs `syslog_takes` names there
        instead: (error log, access log), both unless told otherwise (syslog_for says which).
        `workers_as`: the configuration's (user, group) for the workers; the master updates
        it on USR1 (a reload may have changed them).
        `stderr`: what "-" means, for a setup a reload makes (see for_reload); None for the
        first one, whose fd 2 is the server's stderr.
        `install`: make it this process's at once (the start); else everything is opened now
        and kept aside until install(). Raises OSError, with nothing left open, if a file
        cannot be opened.
        `detached`: a daemon's setup, which has no standard output or error: what "-" means
        to the setup a reload makes next is syslog (stderr()).
        `capture`: standard output follows the error log (logging.capture_output; the
        start's value, which a reload's setup keeps).
        `capture_output`: the setting as the start read it (None: `capture`), for the pipe
        a worker's fd 1 shares with its fd 2 when the error log is syslog.
        `error_format`: the error log's records as `text` or `json`
        (logging.error_log_format)."""
        self.level = level
        self.error_format = error_format
        self.workers_as = workers_as
        self.detached = detached
        # where the error log goes to syslog (None: a file or stderr), and the access log
        self.syslog = syslog if syslog_takes[0] else None
        # only to a file: a daemon's /dev/stderr that became syslog (without_console) has
        # none, and fd 1 would be /dev/null as without it
        self.capture = capture and self.syslog is None and error_log != "-"
        # the setting itself: with the error log on syslog, the workers' fd 1 joins their fd 2
        # in the pipe the master reads (prefork.stderrpipe), as `capture` does a file's
        self.capture_output = capture if capture_output is None else capture_output
        self.access_syslog = syslog if syslog_takes[1] and access_log is not None else None
        self._error_handlers: list[logging.Handler] = []
        self._access_handlers: list[logging.Handler] = []
        # the error log while this setup is not installed; install() moves it to fd 2
        self._error_fd: int | None = None
        # this setup's own copy of the server's original stderr, for the next setup's "-"
        # (stderr()); only in one a reload made, so it never reaches a daemon's detaching
        self._stderr_fd: int | None = None
        self._given_stderr = stderr
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
        self._iso_timestamp = IsoClock()
        try:
            self._open(install)
        except BaseException:
            self.close()
            raise

    def _open(self, installing: bool) -> None:
        """Open every destination; `installing`: make each this process's as it opens."""
        if self._given_stderr is not None and self._given_stderr.fd is not None:
            self._stderr_fd = os.dup(self._given_stderr.fd)
        if self.access_syslog is not None:
            self._access_handlers = [syslog_handler(*self.access_syslog)]
        if self.syslog is not None:
            self._error_handlers = [syslog_handler(*self.syslog, self.error_format)]
            if installing:
                self.install()
            owner = self._owner() if self.access_path is not None else None
        else:
            owner = self._open_error(installing)
        if self.access_enabled and self.access_syslog is None:
            if self.access_path is None:  # "-"
                # line-buffered: one write per line, so workers sharing stdout (journald)
                # never interleave mid-line and nothing waits in a buffer at exit
                self._access_file = open(  # noqa: SIM115
                    1, "w", buffering=1, encoding="utf-8", errors="replace", closefd=False
                )
            else:
                self._access_file = self._open_access_log(self.access_path, owner)

    def _open_error(self, installing: bool) -> tuple[int, int] | None:
        """The error log to a file or stderr (not syslog); the owner its file was given."""
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(error_formatter(self.error_format))
        self._error_handlers = [handler]
        if installing:
            # The handler writes to whatever fd 2 is, so adding it before fd 2 is re-pointed
            # puts a warning about the new file's owner into that file itself.
            self.install()
        owner = self._owner()
        if self.error_path is not None:
            self._error_fd = os.open(
                self.error_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640
            )
            if not installing:
                self._give(self._error_fd, self.error_path, "error log", owner)
        elif self._stderr_fd is not None:
            self._error_fd = os.dup(self._stderr_fd)  # "-": the stderr the server started with
        if installing:
            self.install()  # fd 2 is the error log from here on
            if self.error_path is not None:
                self._give(2, self.error_path, "error log", owner)
        return owner

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
        """Point the error log at `path` (created if need be), owned by `owner`: fd 2, or,
        while this setup is not installed, the descriptor it keeps for install()."""
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
        if self._error_fd is not None:
            old, self._error_fd = self._error_fd, fd
            os.close(old)
            self._give(fd, path, "error log", owner)
            return
        try:
            sys.stderr.flush()  # what was written before the reopen goes to the old file
            os.dup2(fd, 2)
        finally:
            os.close(fd)
        self.capture_stdout()
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
        """Descriptors this setup holds, which must survive daemonizing: syslog sockets, the
        access log file, and in a setup a reload made, the error log until it is installed
        and the copy of the original stderr."""
        fds = self.worker_fds()
        if self._stderr_fd is not None:
            fds.append(self._stderr_fd)
        return fds

    def worker_fds(self) -> list[int]:
        """The descriptors of fds() that a worker logging with this setup uses: all but the
        copy of the original stderr, which only the master hands on (see unused_fds)."""
        fds = []
        for handler in (*self._error_handlers, *self._access_handlers):
            sock = getattr(handler, "socket", None)
            if sock is not None and sock.fileno() >= 0:
                fds.append(sock.fileno())
        if self._access_file is not None and self._access_file is not sys.stdout:
            fds.append(self._access_file.fileno())
        if self._error_fd is not None:
            fds.append(self._error_fd)
        return fds

    def install(self) -> None:
        """Make this setup the process's own: its handlers on the two loggers (any other
        setup's are taken off, not closed: they are that setup's to close), its level, and
        its error log on fd 2. At the start; in the master when its generation takes over
        (Master.promote); in each of its workers right after fork. Installing it again
        changes nothing."""
        for logger, mine in ((log, self._error_handlers), (access_log, self._access_handlers)):
            for other in list(logger.handlers):
                if other not in mine:
                    logger.removeHandler(other)
            for handler in mine:
                if handler not in logger.handlers:
                    logger.addHandler(handler)
            logger.propagate = False
        log.setLevel(self.level.upper())
        access_log.setLevel(logging.INFO)
        if self._error_fd is not None:
            sys.stderr.flush()  # what was written before goes to the old error log
            os.dup2(self._error_fd, 2)
            os.close(self._error_fd)
            self._error_fd = None
        self.capture_stdout()

    def capture_stdout(self) -> None:
        """With `capture`, point fd 1 where fd 2 points (the error log), and make sys.stdout
        line-buffered, so that a print() reaches the file whole and before the next line
        another process writes; what was buffered goes out first, to the old place. Again
        after every change of fd 2, and after a daemon's detaching set fd 1 to /dev/null."""
        if not self.capture:
            return
        stdout = sys.stdout
        if stdout is not None:
            try:
                stdout.flush()
            except (OSError, ValueError):
                pass
        os.dup2(2, 1)
        if isinstance(stdout, io.TextIOWrapper):
            try:
                if stdout.fileno() == 1:
                    stdout.reconfigure(line_buffering=True)
            except (OSError, ValueError):  # a stream with no descriptor of its own
                pass

    def close(self) -> None:
        """Close what this setup holds in this process: the master's copies, once no
        generation logs with it (its workers keep their own). Its handlers leave the
        loggers if they are on them."""
        for handler in (*self._error_handlers, *self._access_handlers):
            log.removeHandler(handler)
            access_log.removeHandler(handler)
            handler.close()
        self._error_handlers = []
        self._access_handlers = []
        if self._access_file is not None:
            try:
                self._access_file.close()  # "-" (fd 1) was opened with closefd=False
            except (OSError, ValueError):
                pass
            self._access_file = None
        for fd in (self._error_fd, self._stderr_fd):
            if fd is not None:
                os.close(fd)
        self._error_fd = self._stderr_fd = None

    def stderr(self) -> Stderr:
        """What "-" means to the setup a reload makes next (for_reload). Asked of the one
        the master has installed, whose fd 2 is, for the first setup, still the stderr the
        server started with unless it pointed it at its error log file."""
        if self._given_stderr is not None:  # made by a reload: hand on what it was given
            return Stderr(self._stderr_fd, self._given_stderr.syslog)
        if self.detached:  # fd 1 and 2 are /dev/null: "-" means syslog, as at the start
            return Stderr(syslog=True)
        if self.syslog is None:
            return Stderr(2 if self.error_path is None else None)
        # syslog took the error log: at a daemon's start "-" meant syslog, its fd 2 being
        # /dev/null; in the foreground fd 2 is the stderr it was started with
        return Stderr(syslog=True) if _is_devnull(2) else Stderr(2)

    def describe(self) -> str:
        """Where the logs go, for the log: `error log X, access log Y, level Z`."""
        error = f"syslog {self.syslog[0]}" if self.syslog else self.error_path or "stderr"
        if self.access_syslog is not None:
            access = f"syslog {self.access_syslog[0]}"
        else:
            access = self.access_path or ("stdout" if self.access_enabled else "off")
        captured = ", standard output to the error log" if self.capture else ""
        if self.capture_output and self.syslog is not None:
            captured = ", the workers' standard output to the error log"
        return f"error log {error}, access log {access}, level {self.level}{captured}"

    def reopen(self) -> bool:
        """USR1: point fd 2 and the access log at freshly opened files (after rotation), each
        independently: a file that cannot be opened keeps the old one in use, and the error
        names it; False then. In the master (root) the new files are created and given to
        `workers_as` before it returns, i.e. before the master tells the workers to reopen
        them."""
        error_path = self.error_path if self.syslog is None else None
        if error_path is None and (self.access_path is None or self._access_file is None):
            return True  # syslog, or stderr and stdout: nothing to reopen
        owner = self._owner()
        reopened = True
        if error_path is not None:
            try:
                self._open_error_log(error_path, owner)
            except OSError as exc:
                reopened = False
                log.error(
                    "cannot reopen the log files: error log %s: %s; still writing to the old "
                    "one", error_path, exc
                )
        if self.access_path is not None and self._access_file is not None:
            try:
                new = self._open_access_log(self.access_path, owner)
            except OSError as exc:
                reopened = False
                log.error(
                    "cannot reopen the log files: access log %s: %s; still writing to the old "
                    "one", self.access_path, exc
                )
            else:
                old, self._access_file = self._access_file, new
                try:
                    old.close()
                except (OSError, ValueError):
                    # its buffer holds lines the disk refused (ENOSPC, the usual reason to
                    # rotate): they are lost either way, and raising here killed every worker
                    # at once. The descriptor is closed even when the flush fails.
                    pass
        return reopened

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
        if out is None and self.access_syslog is None:
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


def _is_devnull(fd: int) -> bool:
    """Whether `fd` is /dev/null (or closed: nothing to write to either)."""
    try:
        st, null = os.fstat(fd), os.stat(os.devnull)
    except OSError:
        return True
    return stat.S_ISCHR(st.st_mode) and st.st_rdev == null.st_rdev


def error_log_on_syslog(logs: object) -> bool:
    """Whether the error log of `logs` is syslog, so that fd 2 of its workers is no log at
    all (the master's terminal, a daemon's /dev/null) and the master reads it through a
    pipe instead (prefork.stderrpipe). What is not a Logs (a test's fake) is not."""
    return isinstance(logs, Logs) and logs.syslog is not None


def unused_fds(mine: object, setups: Iterable[object]) -> list[int]:
    """What a worker logging with `mine` closes right after fork: the descriptors of the
    master's other logging setups in `setups` (another generation's files and sockets),
    and the copy of the original stderr `mine` keeps for the next generation. Never 0, 1
    or 2 (an access log on "-" is fd 1). What is not a Logs (a test's fake) holds none."""
    keep = set(mine.worker_fds()) if isinstance(mine, Logs) else set()
    drop = set(mine.fds()) if isinstance(mine, Logs) else set()
    for setup in setups:
        if isinstance(setup, Logs) and setup is not mine:
            drop.update(setup.fds())
    return sorted(fd for fd in drop - keep if fd > 2)


def _reach_unix_syslog(path: str) -> None:
    """Connect to the syslog socket at `path` as SysLogHandler does (datagram, else
    stream), and close again; OSError if nothing answers there. SysLogHandler itself keeps
    quiet about it and tries again at each message."""
    error: OSError | None = None
    for kind in (socket.SOCK_DGRAM, socket.SOCK_STREAM):
        with socket.socket(socket.AF_UNIX, kind) as sock:
            try:
                sock.connect(path)
            except OSError as exc:
                error = error or exc
                continue
            return
    assert error is not None
    raise error


def _error_file(logs: Logs | None) -> str | None:
    """The file `logs` points fd 2 at, if it does."""
    return None if logs is None or logs.syslog is not None else logs.error_path


def for_reload(
    previous: Logs | None,
    settings: LoggingConfig,
    workers_as: tuple[str | None, str | None],
) -> Logs:
    """The logging setup of a reload's generation, opened now (files created and given to
    `workers_as`, a new syslog socket reached) and not installed: nothing changes until its
    workers install it after fork and the master when it takes over. `previous` (the
    master's setup) says what "-" means (Logs.stderr). Raises OSError, naming what could
    not be opened, with nothing left open: the reload fails and everything stays as it was.

    A syslog unix socket must answer when its address is new (a typo would lose every
    line); the address in use is not judged again (its daemon may be restarting). TCP
    syslog connects at the first message, in each process, as at the start."""
    given = previous.stderr() if previous is not None else Stderr(2)
    if given.syslog:
        settings = without_console(settings)
    error_log = settings.error_log
    syslog = settings.syslog
    # a detached daemon (given.syslog): each log that says "-" goes to syslog, as at the start
    takes = syslog_for(settings, given.syslog)
    if error_log == "-" and not takes[0] and given.fd is None and (
        kept := _error_file(previous)
    ) is not None:
        log.warning(
            'reload: logging.error_log is "-", but the standard error the server was '
            "started with was replaced by the error log file at the start: the error log "
            "stays %s until a restart", kept
        )
        error_log = kept
    target = (syslog.address, syslog.facility, syslog.ident) if any(takes) else None
    try:
        logs = Logs(
            settings.level,
            error_log,
            settings.access_log,
            settings.access_log_format,
            target,
            workers_as,
            stderr=given,
            install=False,
            # read at start (cli.FIXED_AT_START): fd 1 of a process is not put back
            capture=previous.capture if previous is not None else settings.capture_output,
            capture_output=(
                previous.capture_output if previous is not None else settings.capture_output
            ),
            syslog_takes=takes,
            error_format=settings.error_log_format,
        )
    except OSError as exc:
        raise OSError(f"cannot open the logs: {exc}") from exc
    path = syslog.address.removeprefix("unix:")
    in_use = previous is not None and any(
        target is not None and target[0].removeprefix("unix:") == path
        for target in (previous.syslog, previous.access_syslog)
    )
    if target is not None and not in_use:
        try:
            reach_syslog(syslog.address)
        except OSError as exc:
            logs.close()
            hint = "" if syslog.enabled else f": {DAEMON_SYSLOG_HINT}"
            raise OSError(f"cannot open the logs: {exc}{hint}") from exc
    return logs


# Why a daemon without syslog.enabled needs a syslog daemon, and what to do instead.
DAEMON_SYSLOG_HINT = (
    'a daemon logs to syslog when logging.error_log is "-" (its access log too, when '
    'logging.access_log is "-" without capture_output); set it to a file, or start a syslog daemon'
)


# The names of a process's standard output and error, as a log path may give them.
STANDARD_STREAMS = frozenset(
    f"{prefix}{fd}" for prefix in ("/dev/fd/", "/proc/self/fd/") for fd in (1, 2)
) | {"/dev/stdout", "/dev/stderr"}


def without_console(settings: LoggingConfig) -> LoggingConfig:
    """A detached daemon's logging: a log path that names its standard output or error
    (/dev/stderr, /proc/self/fd/1, ...) where that is not a regular file counts as "-", and
    so goes to syslog (syslog_for). Opened as a file, it was the launcher's terminal or
    pipe, which the daemon then held open: a caller reading that pipe (`$(preforkd -D)`,
    Ansible, `| logger`) waited for the daemon to exit. A regular file (`2>>app.log`) stays."""
    error_log = "-" if _names_a_stream(settings.error_log) else settings.error_log
    access_log = "-" if _names_a_stream(settings.access_log) else settings.access_log
    if (error_log, access_log) == (settings.error_log, settings.access_log):
        return settings
    return dataclasses.replace(settings, error_log=error_log, access_log=access_log)


def _names_a_stream(path: str | None) -> bool:
    if path is None or os.path.normpath(path) not in STANDARD_STREAMS:
        return False
    try:
        return not stat.S_ISREG(os.stat(path).st_mode)
    except OSError:
        return True  # closed: as "-", nothing there to write to


def syslog_for(settings: LoggingConfig, detached: bool) -> tuple[bool, bool]:
    """Which logs go to syslog, (error log, access log): both with syslog.enabled; in a
    detached daemon, which has no standard error or output, each that says "-" (an access
    log file stays a file: the syslog the daemon's error log falls back to is not asked
    for, and took every access line while the file stayed empty); else neither."""
    if settings.syslog.enabled:
        return True, settings.access_log is not None
    if not detached:
        return False, False
    to_file = settings.error_log != "-"
    # capture_output points stdout at the error log file: "-" is written there
    return not to_file, settings.access_log == "-" and not (settings.capture_output and to_file)


def reach_syslog(address: str) -> None:
    """OSError naming `address` if it is a unix socket where no syslog daemon answers.
    SysLogHandler keeps quiet about that and tries again at every message, so a typo, or a
    host without /dev/log, would lose every line. UDP cannot be judged; TCP connects at the
    first message, in each process."""
    if address.startswith(("udp://", "tcp://")):
        return
    try:
        _reach_unix_syslog(address.removeprefix("unix:"))
    except OSError as exc:
        raise OSError(f"syslog {address}: {exc.strerror or exc}") from exc
