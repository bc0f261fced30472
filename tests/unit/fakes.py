"""A fake kernel, signal source, announcer and log set for driving prefork.master one `tick()`
at a time (no fork, no sleep, no signals); shared by test_master.py and test_supervise.py.

Conventions: a worker "boots" when the test sends b"R" on the worker's end of its channel;
a worker "exits" when the test queues a waitpid status for `reap()` (exit code N is N << 8,
killed by signal S is S). `FakeKernel.memory()` answers what the test sets in `kernel.uss`.
The fake clock starts at the real time.monotonic() so that scoreboard slots stamped by
`Slot.busy()` line up with it.
"""

from __future__ import annotations

import itertools
import select
import socket
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import pytest

from prefork import status
from prefork.channel import MSG_READY
from prefork.config import Config, from_mapping
from prefork.master import Generation, Master, WorkerHandle, WorkerState
from prefork.notify import Announcer
from prefork.scoreboard import Activity, Scoreboard
from prefork.sockets import Listener


def exit_status(code: int) -> int:
    """The waitpid status of a child that called _exit(code)."""
    return code << 8


class FakeKernel:
    """The master's OS calls, recorded; the clock moves only when a test moves it."""

    def __init__(self) -> None:
        self.now = time.monotonic()
        self._pids = itertools.count(1000)
        self.spawned: list[int] = []
        self.children: dict[int, socket.socket] = {}  # pid -> the worker's end of its channel
        self.kills: list[tuple[int, int]] = []
        self.exits: deque[tuple[int, int]] = deque()
        self.uss: dict[int, int] = {}  # pid -> what memory() answers (None when absent)
        self.memory_calls: list[int] = []
        self.uss_readable = True  # False: memory() answers resident sizes (RSS)
        self.waits: list[float] = []  # the timeout of every wait(): how long the master sleeps
        self.foreground = False  # what in_terminal_foreground() answers

    # Kernel
    def monotonic(self) -> float:
        return self.now

    def spawn(self, child: Callable[[], int], child_end: socket.socket) -> int:
        pid = next(self._pids)
        child_end.setblocking(False)
        self.children[pid] = child_end  # kept open: the "worker" talks through it
        self.spawned.append(pid)
        return pid

    def kill(self, pid: int, sig: int) -> bool:
        self.kills.append((pid, sig))
        return True

    def reap(self) -> tuple[int, int] | None:
        return self.exits.popleft() if self.exits else None

    def wait(self, fds: list[int], timeout: float) -> list[int]:
        self.waits.append(timeout)
        readable, _, _ = select.select(fds, [], [], 0)
        return readable

    def memory(self, pid: int) -> int | None:
        self.memory_calls.append(pid)
        return self.uss.get(pid)

    def in_terminal_foreground(self) -> bool:
        return self.foreground

    # test controls
    def advance(self, seconds: float) -> None:
        self.now += seconds

    def received(self, pid: int) -> bytes:
        """Everything the master has sent to this worker since the last call."""
        data = b""
        while True:
            try:
                chunk = self.children[pid].recv(4096)
            except BlockingIOError:
                return data
            if not chunk:
                return data
            data += chunk

    def kills_of(self, sig: int) -> list[int]:
        return [pid for pid, s in self.kills if s == sig]

    def close(self) -> None:
        for sock in self.children.values():
            sock.close()


class FakeSignals:
    """A SignalSource whose pending signals the test sets."""

    def __init__(self) -> None:
        self._reader, self._writer = socket.socketpair()
        self.pending: list[int] = []

    def fileno(self) -> int:
        return self._reader.fileno()

    def drain(self) -> list[int]:
        got, self.pending = self.pending, []
        return got

    def close(self) -> None:
        self._reader.close()
        self._writer.close()


class RecordingAnnouncer(Announcer):
    """An Announcer that talks to no one and remembers what it was told."""

    def __init__(self, watchdog_interval: float = 0.0) -> None:
        super().__init__(watchdog_interval=watchdog_interval)
        self.calls: list[tuple[Any, ...]] = []

    def ready(self, status: str) -> None:
        self.calls.append(("ready", status))

    def status(self, status: str) -> None:
        self.calls.append(("status", status))

    def reloading(self) -> None:
        self.calls.append(("reloading",))

    def reloaded(self, ok: bool, message: str) -> None:
        self.calls.append(("reloaded", ok, message))

    def refused(self, message: str) -> None:
        self.calls.append(("refused", message))

    def upgrade_failed(self, message: str) -> None:
        self.calls.append(("upgrade_failed", message))

    def stopping(self) -> None:
        self.calls.append(("stopping",))

    def watchdog(self) -> None:
        self.calls.append(("watchdog",))

    def named(self, name: str) -> list[tuple[Any, ...]]:
        return [c for c in self.calls if c[0] == name]


class FakeLogs:
    def __init__(self) -> None:
        self.reopened = 0

    def reopen(self) -> bool:
        self.reopened += 1
        return True


def make_config(count: int = 3, **workers: Any) -> Config:
    return from_mapping({"app": "m:app", "workers": {"count": count, **workers}})


class Rig:
    """A Master wired to the fakes, plus the moves a test makes."""

    def __init__(
        self,
        config: Config,
        reloader: Callable[[Generation, list[Listener]], Generation] | None = None,
        capacity: int = 16,
        watchdog_interval: float = 0.0,
    ) -> None:
        self.kernel = FakeKernel()
        self.signals = FakeSignals()
        self.logs = FakeLogs()
        self.scoreboard = Scoreboard(capacity)
        self.announce = RecordingAnnouncer(watchdog_interval)
        self.master = Master(
            kernel=self.kernel,
            signals=self.signals,
            scoreboard=self.scoreboard,
            current=Generation(1, config, [], logs=self.logs),
            reloader=reloader,
            announce=self.announce,
        )

    def tick(self) -> bool:
        return self.master.tick()

    def signal(self, *signums: int) -> bool:
        self.signals.pending.extend(signums)
        return self.tick()

    def handles(self, generation: int | None = None) -> list[WorkerHandle]:
        return sorted(
            (
                h
                for h in self.master.workers.values()
                if generation is None or h.generation == generation
            ),
            key=lambda h: (h.generation, h.number, h.pid),
        )

    def live(self, generation: int | None = None) -> list[WorkerHandle]:
        return [
            h
            for h in self.handles(generation)
            if h.state in (WorkerState.BOOTING, WorkerState.READY)
        ]

    def in_state(self, state: WorkerState) -> list[WorkerHandle]:
        return [h for h in self.handles() if h.state is state]

    def worker(self, number: int, generation: int = 1) -> WorkerHandle:
        (handle,) = [h for h in self.live(generation) if h.number == number]
        return handle

    def handle(self, pid: int) -> WorkerHandle:
        return self.master.workers[pid]

    def boot(self, *pids: int) -> None:
        """These workers report ready; the next tick hears it."""
        for pid in pids:
            self.kernel.children[pid].send(MSG_READY)
        self.tick()

    def boot_all(self) -> None:
        self.boot(*(h.pid for h in self.in_state(WorkerState.BOOTING)))

    def say(self, pids: list[int], message: bytes) -> None:
        for pid in pids:
            self.kernel.children[pid].send(message)
        self.tick()

    def exit(self, pid: int, status: int) -> bool:
        self.kernel.exits.append((pid, status))
        return self.tick()

    def start(self) -> list[WorkerHandle]:
        """Spawn the pool and boot every worker."""
        self.tick()
        self.boot_all()
        assert all(h.state is WorkerState.READY for h in self.handles())
        return self.handles()

    def busy(self, handle: WorkerHandle, method: bytes = b"GET", target: bytes = b"/slow",
             client: bytes = b"") -> float:
        """The worker starts a request now (real clock, as the worker would); returns the
        stamped start time, with the fake clock moved up to it."""
        self.scoreboard.slot(handle.slot).busy(method, target, client=client)
        started = self.scoreboard.read(handle.slot).started
        self.kernel.now = max(self.kernel.now, started)
        return started

    def mark(self, activity: Activity, *handles: WorkerHandle) -> None:
        """Write `activity` into these workers' scoreboard slots (every live one by default)."""
        for handle in handles or tuple(self.live()):
            self.scoreboard.slot(handle.slot).set(activity)

    def second(self) -> None:
        """One pool-check interval later."""
        self.kernel.advance(1.0)
        self.tick()

    def snapshot(self) -> dict[str, Any]:
        return status.snapshot(self.master)

    def close(self) -> None:
        for handle in self.master.workers.values():
            if handle.channel is not None:
                handle.channel.close()
        self.kernel.close()
        self.signals.close()
        self.scoreboard.close()


def messages(caplog: pytest.LogCaptureFixture, level: int | None = None) -> list[str]:
    """What the "prefork" logger said during the test (at `level` only, when given)."""
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == "prefork" and (level is None or r.levelno == level)
    ]


def matching(caplog: pytest.LogCaptureFixture, text: str, level: int | None = None) -> list[str]:
    return [m for m in messages(caplog, level) if text in m]
