"""prefork.signals: real signals sent to this process come out of drain() in order, none lost.

Every test restores the signal handlers and the wakeup fd it found, so the rest of the run
(pytest-timeout uses SIGALRM) is unaffected.
"""

from __future__ import annotations

import os
import select
import signal
from collections.abc import Iterator

import pytest

from prefork.signals import SignalQueue, reset_inherited, set_mask

USED = (
    signal.SIGUSR1,
    signal.SIGUSR2,
    signal.SIGHUP,
    signal.SIGTTIN,
    signal.SIGTTOU,
    signal.SIGWINCH,
)


@pytest.fixture(autouse=True)
def restore_signals() -> Iterator[None]:
    handlers = {sig: signal.getsignal(sig) for sig in USED}
    wakeup_fd = signal.set_wakeup_fd(-1)
    signal.set_wakeup_fd(wakeup_fd)
    yield
    signal.set_wakeup_fd(wakeup_fd)
    for sig, handler in handlers.items():
        signal.signal(sig, handler)


@pytest.fixture
def queue() -> Iterator[SignalQueue]:
    q = SignalQueue(catch=USED)
    yield q
    try:
        q.close()
    except OSError:
        pass


def send(*signums: int) -> None:
    for signum in signums:
        os.kill(os.getpid(), signum)


def readable(q: SignalQueue, timeout: float = 1.0) -> bool:
    ready, _, _ = select.select([q.fileno()], [], [], timeout)
    return bool(ready)


def test_signals_come_out_in_arrival_order(queue: SignalQueue) -> None:
    sent = [
        signal.SIGUSR1,
        signal.SIGHUP,
        signal.SIGTTIN,
        signal.SIGUSR1,
        signal.SIGTTOU,
        signal.SIGWINCH,
        signal.SIGUSR2,
        signal.SIGTTIN,
    ]
    send(*sent)
    assert readable(queue)
    assert queue.drain() == [int(s) for s in sent]
    assert queue.drain() == []


def test_no_signal_is_lost(queue: SignalQueue) -> None:
    sent = [signal.SIGUSR1, signal.SIGUSR2, signal.SIGTTIN] * 40
    send(*sent)
    assert queue.drain() == [int(s) for s in sent]


def test_a_burst_of_a_whole_pool_of_sigchld_loses_nothing(queue: SignalQueue) -> None:
    # every worker of the largest pool (1024) exiting at once, then a HUP: all must be read
    sent = [signal.SIGUSR1, signal.SIGUSR2] * 512 + [signal.SIGHUP]
    send(*sent)
    got = queue.drain()
    assert len(got) == len(sent)
    assert got[-1] == signal.SIGHUP


def test_the_fd_is_readable_only_when_something_arrived(queue: SignalQueue) -> None:
    assert not readable(queue, 0)
    send(signal.SIGUSR2)
    assert readable(queue, 0)
    assert queue.drain() == [signal.SIGUSR2]
    assert not readable(queue, 0)


def test_drain_between_batches(queue: SignalQueue) -> None:
    send(signal.SIGHUP)
    assert queue.drain() == [signal.SIGHUP]
    send(signal.SIGTTOU, signal.SIGHUP)
    assert queue.drain() == [signal.SIGTTOU, signal.SIGHUP]


def test_wake_gives_zero(queue: SignalQueue) -> None:
    queue.wake()
    assert readable(queue, 0)
    assert queue.drain() == [0]
    send(signal.SIGUSR1)
    queue.wake()
    assert queue.drain() == [signal.SIGUSR1, 0]


def test_handlers_are_installed_and_ignored_signals_are_ignored() -> None:
    q = SignalQueue(catch=[signal.SIGUSR1], ignore=[signal.SIGUSR2, signal.SIGWINCH])
    try:
        handler = signal.getsignal(signal.SIGUSR1)
        assert callable(handler) and handler not in (signal.SIG_DFL, signal.SIG_IGN)
        assert signal.getsignal(signal.SIGUSR2) == signal.SIG_IGN
        assert signal.getsignal(signal.SIGWINCH) == signal.SIG_IGN
        send(signal.SIGUSR2, signal.SIGUSR1, signal.SIGWINCH)
        assert q.drain() == [signal.SIGUSR1]
    finally:
        q.close()


def test_fds_and_fileno(queue: SignalQueue) -> None:
    reader, writer = queue.fds()
    assert queue.fileno() == reader
    assert reader != writer
    assert signal.set_wakeup_fd(writer) == writer  # it is the wakeup fd


def test_close_detaches_the_wakeup_fd() -> None:
    q = SignalQueue(catch=[signal.SIGUSR1])
    q.close()
    assert signal.set_wakeup_fd(-1) == -1
    send(signal.SIGUSR1)  # the no-op handler is still there; nothing breaks


def test_reset_inherited_restores_the_defaults(queue: SignalQueue) -> None:
    reset_inherited([signal.SIGUSR1, signal.SIGHUP])
    assert signal.getsignal(signal.SIGUSR1) == signal.SIG_DFL
    assert signal.getsignal(signal.SIGHUP) == signal.SIG_DFL
    assert signal.getsignal(signal.SIGUSR2) not in (signal.SIG_DFL, signal.SIG_IGN)


def test_set_mask_blocks_and_returns_the_previous_mask_as_plain_ints() -> None:
    everything = signal.valid_signals() - {signal.SIGKILL, signal.SIGSTOP}  # unblockable
    before = set_mask(signal.SIG_BLOCK, everything)
    try:
        assert signal.pthread_sigmask(signal.SIG_BLOCK, []) == everything  # all blocked now
        # a real-time signal has no Signals member; it comes back as the number it is
        realtime = signal.SIGRTMIN + 1
        assert realtime in set_mask(signal.SIG_BLOCK, ())
    finally:
        previous = set_mask(signal.SIG_SETMASK, before)
    assert previous == {int(sig) for sig in everything}
    assert all(type(sig) is int for sig in previous)
    assert signal.pthread_sigmask(signal.SIG_BLOCK, []) == before
