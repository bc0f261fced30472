"""The master's operating-system calls behind one small interface, so tests can replace it.

Invariants: `spawn` blocks every signal around fork(), so the child never runs a handler it
inherited; the child unblocks once its own handlers are in place. A child always leaves
through os._exit, whatever its function returns or raises. Every object the master holds at
fork() is frozen in the child (gc.freeze): the child's collector never walks them, so it
neither spends time on them nor copies the pages they live on.
"""

from __future__ import annotations

import gc
import logging
import os
import select
import signal
import socket
import sys
import time
import traceback
from collections.abc import Callable
from typing import Protocol

import psutil

from prefork.signals import ALL_SIGNALS, set_mask

log = logging.getLogger("prefork")


class Kernel(Protocol):
    def monotonic(self) -> float: ...

    def spawn(self, child: Callable[[], int], child_end: socket.socket) -> int: ...

    def kill(self, pid: int, sig: int) -> bool: ...

    def reap(self) -> tuple[int, int] | None: ...

    def wait(self, fds: list[int], timeout: float) -> list[int]: ...

    def memory(self, pid: int) -> int | None: ...

    def in_terminal_foreground(self) -> bool: ...

    # what memory() answers: unique memory, or resident memory where USS cannot be read
    uss_readable: bool


class System:
    """The real thing."""

    def __init__(self) -> None:
        self.uss_readable = True  # until a worker's smaps turn out to be closed to us

    def monotonic(self) -> float:
        return time.monotonic()

    def spawn(self, child: Callable[[], int], child_end: socket.socket) -> int:
        """fork(); the child runs `child()` and exits with its result. The parent's copy of
        `child_end` (the worker's side of its channel) is closed."""
        old_mask = set_mask(signal.SIG_BLOCK, ALL_SIGNALS)
        # The child freezes what it inherits (gc.freeze: into the permanent generation), so
        # its collections skip the master's objects: a full collection in a fresh worker
        # would otherwise touch every page of the inherited heap (copy-on-write faults) for
        # nothing. Frozen in the child, not around fork() in the master: gc.unfreeze() puts
        # everything back in the oldest generation without counting it as pending there, so
        # a master that forks more often than its young generations fill never collected
        # again, and every reload's cycles stayed (a preloaded app's modules: MiBs a HUP).
        # No collection in between: after fork(), the at-fork hooks allocate.
        collecting = gc.isenabled()
        gc.disable()
        try:
            pid = os.fork()
        except BaseException:
            if collecting:
                gc.enable()
            set_mask(signal.SIG_SETMASK, old_mask)
            raise
        if pid == 0:
            gc.freeze()  # touches only the list heads: no page is copied for it
            if collecting:
                gc.enable()
            code = 1
            try:
                code = child()
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else 1
            except BaseException:
                traceback.print_exc()
            finally:
                try:
                    sys.stdout.flush()
                    sys.stderr.flush()
                finally:
                    os._exit(code)
        if collecting:
            gc.enable()
        set_mask(signal.SIG_SETMASK, old_mask)
        child_end.close()
        return pid

    def kill(self, pid: int, sig: int) -> bool:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return False
        return True

    def reap(self) -> tuple[int, int] | None:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return None
        if pid == 0:
            return None
        return pid, status

    def wait(self, fds: list[int], timeout: float) -> list[int]:
        poller = select.poll()
        for fd in fds:
            poller.register(fd, select.POLLIN)
        try:
            return [fd for fd, _ in poller.poll(max(0.0, timeout) * 1000.0)]
        except InterruptedError:
            return []

    def memory(self, pid: int) -> int | None:
        """Unique set size of `pid` in bytes (pages no other process shares), or None. Where
        USS cannot be read (a worker of another user, without CAP_SYS_PTRACE: its smaps are
        closed to us), its resident size instead, which counts shared pages too: the memory
        limits err on the side of recycling rather than never acting (said once, in the
        log)."""
        try:
            process = psutil.Process(pid)
            if self.uss_readable:
                try:
                    return int(process.memory_full_info().uss)
                except psutil.AccessDenied:
                    self.uss_readable = False
                    log.warning(
                        "cannot read the workers' unique memory (USS: needs CAP_SYS_PTRACE to "
                        "read another user's /proc/PID/smaps); workers.max_memory and "
                        "max_memory_hard are checked against their resident size (RSS) instead"
                    )
            return int(process.memory_info().rss)
        except (psutil.Error, OSError):
            return None


    def in_terminal_foreground(self) -> bool:
        """Whether this process is in the foreground process group of its controlling
        terminal (where the terminal sends it WINCH on a resize, INT on ^C)."""
        try:
            fd = os.open("/dev/tty", os.O_RDONLY | os.O_NOCTTY)
        except OSError:
            return False  # no controlling terminal: detached, or under a service manager
        try:
            return os.tcgetpgrp(fd) == os.getpgrp()
        except OSError:
            return False
        finally:
            os.close(fd)


def describe_status(status: int) -> str:
    """'exit code 4' or 'killed by SIGKILL' for a waitpid status."""
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        try:
            name = signal.Signals(sig).name
        except ValueError:
            name = str(sig)
        return f"killed by {name}"
    return f"exit code {os.waitstatus_to_exitcode(status)}"
