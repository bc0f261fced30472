"""The error log and the access log, for the master and (inherited across fork) its workers.

Invariants: the error log is always file descriptor 2, so tracebacks printed by C code,
faulthandler stack dumps and the application's own stderr land in the same place as our
records; reopening (USR1) re-points fd 2 and the access log file without losing a line.
"""

from __future__ import annotations

import json
import logging
import logging.handlers
import os
import socket
import sys
import time
from typing import IO, Any

ERROR_FORMAT = "[%(asctime)s] [%(process)d] [%(levelname)s] %(message)s"
DATE_FORMAT = "%Y-%m-%d %H:%M:%S %z"

log = logging.getLogger("prefork")
access_log = logging.getLogger("prefork.access")


def syslog_handler(address: str, facility: str, ident: str) -> logging.Handler:
    """A SysLogHandler for `/path`, `unix:/path`, `udp://host:port` or `tcp://host:port`;
    messages are tagged `ident[pid]:` as syslog daemons expect."""
    target: Any
    socktype: socket.SocketKind | None = None
    if address.startswith(("udp://", "tcp://")):
        host, _, port = address[6:].rpartition(":")
        target = (host.strip("[]"), int(port))
        socktype = socket.SOCK_DGRAM if address.startswith("udp") else socket.SOCK_STREAM
    else:
        target = address.removeprefix("unix:")
    handler = logging.handlers.SysLogHandler(
        target,
        logging.handlers.SysLogHandler.facility_names[facility],
        socktype,
    )
    handler.setFormatter(logging.Formatter(f"{ident}[%(process)d]: [%(levelname)s] %(message)s"))
    return handler


class Logs:
    """Owns the log destinations. `access_enabled` is checked before any access work."""

    def __init__(
        self,
        level: str = "info",
        error_log: str = "-",
        access_log: str | None = None,
        access_format: str = "combined",
        syslog: tuple[str, str, str] | None = None,
    ) -> None:
        """`syslog`: (address, facility, ident) to send both logs there instead."""
        self.level = level
        self.syslog = syslog
        self._syslog_handlers: list[logging.Handler] = []
        self.error_path = None if error_log == "-" else error_log
        self.access_path = None if access_log in (None, "-") else access_log
        self.access_enabled = access_log is not None
        self.access_json = access_format == "json"
        self._access_file: IO[str] | None = None
        self._second = -1
        self._stamp = ""
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
        if self.error_path is not None:
            fd = os.open(self.error_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
            os.dup2(fd, 2)
            os.close(fd)
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(ERROR_FORMAT, DATE_FORMAT))
        log.addHandler(handler)
        if self.access_enabled:
            if self.access_path is None:  # "-"
                # line-buffered: one write per line, so workers sharing stdout (journald)
                # never interleave mid-line and nothing waits in a buffer at exit
                self._access_file = open(  # noqa: SIM115
                    1, "w", buffering=1, encoding="utf-8", errors="replace", closefd=False
                )
            else:
                self._access_file = open(  # noqa: SIM115 - lives as long as the process
                    self.access_path, "a", buffering=1, encoding="utf-8", errors="replace"
                )

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
        """USR1: point fd 2 and the access log at freshly opened files (after rotation). If
        a file cannot be opened, the old one stays in use and the error is logged."""
        try:
            self._reopen()
        except OSError as exc:
            log.error("cannot reopen the log files: %s; still writing to the old ones", exc)

    def _reopen(self) -> None:
        if self.syslog is not None:
            return
        if self.error_path is not None:
            sys.stderr.flush()
            fd = os.open(self.error_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
            os.dup2(fd, 2)
            os.close(fd)
        if self.access_path is not None and self._access_file is not None:
            old = self._access_file
            self._access_file = open(  # noqa: SIM115
                self.access_path, "a", buffering=1, encoding="utf-8", errors="replace"
            )
            old.close()

    def _timestamp(self) -> str:
        now = int(time.time())
        if now != self._second:
            self._second = now
            self._stamp = time.strftime("%d/%b/%Y:%H:%M:%S %z", time.localtime(now))
        return self._stamp

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
    ) -> None:
        """One access-log line: Apache combined plus the duration in microseconds, or JSON."""
        out = self._access_file
        if out is None and not self.syslog:
            return
        micros = int(duration * 1_000_000)
        if self.access_json:
            line = json.dumps(
                {
                    "time": self._timestamp(),
                    "remote": remote,
                    "method": method,
                    "target": target,
                    "protocol": f"HTTP/{version}",
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
        else:
            request_line = f"{method} {target} HTTP/{version}".replace('"', '\\"')
            line = (
                f'{remote or "-"} - - [{self._timestamp()}] "{request_line}" {status} '
                f'{size or "-"} "{_quote(referer)}" "{_quote(user_agent)}" {micros}'
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
