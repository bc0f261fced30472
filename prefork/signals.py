"""Signals as bytes in a pipe: handlers only record and wake, the loop acts.

CPython's C-level handler writes the signal number to the wakeup fd once per delivery, before
any Python code runs, so reading that pipe yields every signal in arrival order (standard
signals that arrive while one of the same kind is still pending are merged by the kernel, as
always). The Python-level handlers installed here do nothing at all: no logging, no waitpid,
no allocation.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import signal
from collections.abc import Callable, Iterable, Iterator
from types import FrameType

# signal.pthread_sigmask turns the previous mask it returns into Signals members, paying for a
# ValueError per real-time signal (65 us for a full mask, twice per fork); the C function
# underneath returns plain ints.
_pthread_sigmask: Callable[[int, Iterable[int]], set[int]] = importlib.import_module(
    "_signal"
).pthread_sigmask


ALL_SIGNALS = frozenset(signal.valid_signals())  # computed once: it costs ~70 us a call
# What stops a master while it imports (stops_raise): at start, and a reload's import.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT)


def set_mask(how: int, mask: Iterable[int]) -> set[int]:
    """pthread_sigmask(); returns the previous mask as signal numbers."""
    return _pthread_sigmask(how, mask)


@contextlib.contextmanager
def blocked(signals: Iterable[int]) -> Iterator[None]:
    """`signals` blocked in this thread for the block, then the mask as it was: one that
    arrives meanwhile is delivered as the block ends."""
    previous = set_mask(signal.SIG_BLOCK, signals)
    try:
        yield
    finally:
        set_mask(signal.SIG_SETMASK, previous)


def all_blocked() -> contextlib.AbstractContextManager[None]:
    """Every signal blocked in this thread for the block, then the mask as it was: what a
    thread or a forked child starts with (it inherits the mask)."""
    return blocked(ALL_SIGNALS)


def _record(signum: int, frame: FrameType | None) -> None:
    """Nothing to do: the wakeup fd already holds the signal number."""


class SignalQueue:
    """Owns the wakeup pipe; `fileno()` goes into the loop's poll set."""

    def __init__(self, catch: Iterable[signal.Signals], ignore: Iterable[signal.Signals] = ()):
        # A pipe, not a socketpair: a unix stream socket charges each 1-byte write hundreds
        # of bytes of buffer, a pipe holds 64 KiB of signal numbers before one is dropped.
        self._reader, self._writer = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        signal.set_wakeup_fd(self._writer, warn_on_full_buffer=True)
        catch = list(catch)
        for sig in catch:
            signal.signal(sig, _record)
            signal.siginterrupt(sig, False)
        for sig in ignore:
            signal.signal(sig, signal.SIG_IGN)
        # delivered from now on, whatever mask this process was started with
        set_mask(signal.SIG_UNBLOCK, catch)

    def fileno(self) -> int:
        return self._reader

    def fds(self) -> tuple[int, int]:
        return self._reader, self._writer

    def drain(self) -> list[int]:
        """Every signal number recorded since the last call, oldest first."""
        received: list[int] = []
        while True:
            try:
                data = os.read(self._reader, 4096)
            except (BlockingIOError, InterruptedError):
                return received
            if not data:
                return received
            received.extend(data)

    def wake(self) -> None:
        """Make the loop's next poll return at once (used by code outside handlers)."""
        try:
            os.write(self._writer, b"\0")
        except (BlockingIOError, InterruptedError):
            pass

    def close(self) -> None:
        """Detach from the signal machinery (a forked child calls this first)."""
        signal.set_wakeup_fd(-1)
        os.close(self._reader)
        os.close(self._writer)


class Stopped(BaseException):
    """A stop signal (TERM, INT, QUIT) arrived while the master was starting, or importing
    a reload's application; see stops_raise. A BaseException, so the application's or a
    hook's `except Exception` does not swallow it while it imports."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def _stop(signum: int, frame: FrameType | None) -> None:
    raise Stopped(signum)


@contextlib.contextmanager
def stops_raise(stops: Iterable[int]) -> Iterator[None]:
    """For the block, `stops` raise Stopped in the main thread instead of waiting in the
    queue for a loop that has not begun (or is blocked in a reload's import): a master
    importing a slow application (preload_app) or binding is stopped at once, as it would be
    by the signals' defaults. Those defaults are no use to a container's PID 1: the kernel
    drops every signal init has no handler for, so `docker stop`'s TERM would be lost and
    the container killed 10 s later. Afterwards the handlers are the queue's again. The
    wakeup fd recorded the stop all the same, so a loop that catches Stopped finds it in
    the queue at its next tick."""
    previous = {sig: signal.signal(sig, _stop) for sig in stops}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
            signal.siginterrupt(sig, False)  # as SignalQueue set it: signal() undid that


def reset_inherited(signals: Iterable[signal.Signals]) -> None:
    """Back to the defaults for `signals` (a forked child does not keep its parent's plan)."""
    for sig in signals:
        signal.signal(sig, signal.SIG_DFL)
