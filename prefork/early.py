"""Signals that arrive before the master's handlers exist.

Importing preforkd's modules (the YAML, HTTP and TLS libraries among them) takes a few
tenths of a second before a handler can be installed. Meanwhile a signal had its default
action: a TERM killed the process (status 143, nothing logged), an INT printed a traceback,
and as a container's PID 1, where the kernel drops every signal without a handler, a `docker
stop` sent then was lost and the container killed 10 s later. The entry point holds them
first thing (this module imports only `signal`), and the command releases them once it knows
what they mean: a starting master replays them into its own handlers (a stop stops it
before serving, exit 0; a HUP waits for its loop), any other command or a daemon's launcher
gets their previous disposition back and then receives them as before.
"""

from __future__ import annotations

import signal

# The annotations' names are for the type checker only: `typing` alone takes ~2.5 ms to
# import, half of this module's time, and nothing is held until it has been imported.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from types import FrameType
    from typing import Any

HELD = (
    signal.SIGTERM,
    signal.SIGINT,
    signal.SIGQUIT,
    signal.SIGHUP,
    signal.SIGUSR1,
    signal.SIGUSR2,
    signal.SIGTTIN,
    signal.SIGTTOU,
    signal.SIGWINCH,
)


class EarlySignals:
    """Records HELD signals, in order, until release(). A signal that is ignored stays
    ignored: a master started by USR2 inherits HUP, USR1, USR2, TTIN and TTOU ignored on
    purpose (see upgrade._exec)."""

    def __init__(self) -> None:
        self.received: list[int] = []
        self.previous: dict[int, Any] = {}  # a handler, SIG_DFL or default_int_handler
        self.released = False

    @classmethod
    def hold(cls) -> EarlySignals:
        held = cls()
        for sig in HELD:
            current = signal.getsignal(sig)
            if current in (signal.SIG_DFL, signal.default_int_handler):
                held.previous[sig] = current
                signal.signal(sig, held._record)
        return held

    def _record(self, signum: int, frame: FrameType | None) -> None:
        self.received.append(signum)

    def release(self) -> None:
        """Give back the dispositions this replaced (those nothing has replaced since), then
        raise what arrived, in order, to whatever handles each signal now. Once."""
        if self.released:
            return
        self.released = True
        for sig, previous in self.previous.items():
            if signal.getsignal(sig) == self._record:
                signal.signal(sig, previous)
        for sig in self.received:
            signal.raise_signal(sig)


def ignore_until_exit() -> None:
    """Once the command is done: ignore what HELD names for the rest of the process's life.
    Before it tears the modules down the interpreter puts SIG_DFL back for every signal with
    a Python handler, and that teardown takes a while for a large heap (a preloaded
    application's): a TERM meanwhile (a second stop, systemd's after `preforkd stop`) killed
    a master that had finished its graceful stop, status 143 instead of 0, and TTIN or TTOU
    suspended it. An ignored signal is left as it is."""
    for sig in HELD:
        signal.signal(sig, signal.SIG_IGN)

