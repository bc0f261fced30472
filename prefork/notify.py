"""Telling the outside world how the server is doing: systemd's notify socket, the daemon
launcher's ready pipe, and the reload-status file `preforkd reload` waits on.

Invariants: master only; every message is best effort (a supervisor that went away never
stops the server); NOTIFY_SOCKET and WATCHDOG_* are removed from the environment so workers
never speak for the master.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from collections.abc import Mapping, MutableMapping

from prefork.pidfile import process_identity, write_atomically

log = logging.getLogger("prefork")


class SdNotify:
    """sd_notify(3): newline-separated KEY=VALUE datagrams to $NOTIFY_SOCKET."""

    def __init__(self, address: str) -> None:
        self.address = "\0" + address[1:] if address.startswith("@") else address
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)

    @classmethod
    def from_environ(cls, environ: MutableMapping[str, str]) -> tuple[SdNotify | None, float]:
        """The notifier (None outside systemd) and the watchdog interval in seconds (0 = off)."""
        address = environ.pop("NOTIFY_SOCKET", "")
        usec = environ.pop("WATCHDOG_USEC", "")
        watchdog_pid = environ.pop("WATCHDOG_PID", "")
        interval = 0.0
        if usec.isdigit() and (not watchdog_pid or watchdog_pid == str(os.getpid())):
            interval = int(usec) / 1e6 / 2  # half the timeout, as sd_watchdog_enabled advises
        if not address or address[0] not in "/@":
            return None, 0.0
        return cls(address), interval

    def send(self, **fields: str | int) -> None:
        message = "\n".join(f"{key}={value}" for key, value in fields.items()).encode()
        try:
            self.sock.sendto(message, self.address)
        except OSError as exc:
            log.debug("sd_notify failed: %s", exc)

    def fds(self) -> list[int]:
        return [self.sock.fileno()]


def monotonic_usec() -> int:
    return int(time.clock_gettime(time.CLOCK_MONOTONIC) * 1_000_000)


class Announcer:
    """What the master reports at each turn of its life, to whoever listens."""

    def __init__(
        self,
        sd: SdNotify | None = None,
        watchdog_interval: float = 0.0,
        ready_fd: int | None = None,
        status_path: str | None = None,
    ) -> None:
        self.sd = sd
        self.watchdog_interval = watchdog_interval
        self.ready_fd = ready_fd
        self.status_path = status_path
        self.reloads = 0
        self.upgrades = 0
        # whether ready() was called: every status record says it (been_ready below)
        self.been_ready = False
        # which process wrote the records, and so the pidfile (pidfile.written_before)
        self.identity = process_identity(os.getpid())

    def fds(self) -> list[int]:
        """What a worker must not inherit: the master's notify socket and the ready pipe."""
        fds = [] if self.sd is None else self.sd.fds()
        if self.ready_fd is not None:
            fds.append(self.ready_fd)
        return fds

    def ready(self, status: str) -> None:
        if self.sd is not None:
            self.sd.send(READY=1, STATUS=status, MAINPID=os.getpid())
        self._tell_launcher(b"READY %d\n" % os.getpid())
        self.been_ready = True
        # what `preforkd upgrade` waits for from the new master
        self._write_status({"pid": os.getpid(), "serial": self.reloads, "state": "ready"})

    def failed(self, reason: str, code: int = 1) -> None:
        """Startup did not reach ready: the launcher exits with status `code` (non-zero)
        and `reason`."""
        self._tell_launcher(b"ERROR %d " % (code or 1) + reason.encode("utf-8", "replace")
                            + b"\n")

    def status(self, status: str) -> None:
        if self.sd is not None:
            self.sd.send(STATUS=status)

    def reloading(self) -> None:
        self.reloads += 1
        if self.sd is not None:
            self.sd.send(RELOADING=1, MONOTONIC_USEC=monotonic_usec(), STATUS="reloading")
        self._write_status({"pid": os.getpid(), "serial": self.reloads, "state": "reloading"})

    def reloaded(self, ok: bool, message: str) -> None:
        """The end of a reload, successful or not; systemd expects READY=1 either way."""
        if self.sd is not None:
            self.sd.send(READY=1, STATUS=message)
        self._write_status(
            {"pid": os.getpid(), "serial": self.reloads, "state": "done", "ok": ok,
             "message": message}
        )

    def refused(self, message: str) -> None:
        """A HUP that starts no reload (the server is stopping): the status file answers
        `preforkd reload`; systemd hears nothing (it is stopping the service)."""
        self.reloads += 1
        self._write_status(
            {"pid": os.getpid(), "serial": self.reloads, "state": "done", "ok": False,
             "message": message}
        )

    def upgrade_failed(self, message: str) -> None:
        """A USR2 that started no new master, or a new master that exited: what `preforkd
        upgrade` waits for. Counted apart from reloads (`upgrades`), so that neither command
        takes the other's outcome for its own."""
        self.upgrades += 1
        self._write_status(
            {"pid": os.getpid(), "serial": self.reloads, "upgrades": self.upgrades,
             "state": "upgrade failed", "message": message}
        )

    def stopping(self) -> None:
        if self.sd is not None:
            self.sd.send(STOPPING=1, STATUS="stopping")

    def watchdog(self) -> None:
        if self.sd is not None:
            self.sd.send(WATCHDOG=1)

    def close(self) -> None:
        if self.status_path is not None:
            try:
                os.unlink(self.status_path)
            except OSError:
                pass

    def _tell_launcher(self, message: bytes) -> None:
        fd = self.ready_fd
        if fd is None:
            return
        self.ready_fd = None
        try:
            os.write(fd, message)
        except OSError:
            pass
        finally:
            os.close(fd)

    def _write_status(self, data: dict[str, object]) -> None:
        path = self.status_path
        if path is None:
            return
        data["been_ready"] = self.been_ready
        if self.identity is not None:
            data["identity"] = self.identity
        try:
            write_atomically(path, json.dumps(data))
        except OSError as exc:
            log.warning("cannot write the reload status file %s: %s", path, exc)


def been_ready(status: Mapping[str, object], pid: int) -> bool:
    """Whether the status record `status` says that master `pid` has been ready (what WINCH
    and `preforkd upgrade` wait for from a master a USR2 started). Not merely that it wrote
    one: a HUP it refused while loading writes one too. A record without `been_ready` (from
    a preforkd before it) counts when its state comes at or after a ready."""
    if status.get("pid") != pid:
        return False
    flag = status.get("been_ready")
    if isinstance(flag, bool):
        return flag
    return status.get("state") in ("ready", "reloading", "done")
