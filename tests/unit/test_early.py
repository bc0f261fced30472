"""prefork.early: the signals held between the entry point and the master's handlers, with
real signals sent to this process (its dispositions restored after each test)."""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from types import FrameType

import pytest

from prefork.early import HELD, EarlySignals


@pytest.fixture(autouse=True)
def dispositions() -> Iterator[None]:
    saved = {sig: signal.getsignal(sig) for sig in HELD}
    for sig in (signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2, signal.SIGTERM):
        signal.signal(sig, signal.SIG_DFL)  # as an exec'd process has them
    try:
        yield
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)


def test_what_arrives_is_replayed_in_order_to_the_handlers_installed_since() -> None:
    early = EarlySignals.hold()
    os.kill(os.getpid(), signal.SIGUSR1)
    os.kill(os.getpid(), signal.SIGHUP)
    os.kill(os.getpid(), signal.SIGUSR1)
    assert early.received == [signal.SIGUSR1, signal.SIGHUP, signal.SIGUSR1]
    got: list[int] = []

    def handler(signum: int, frame: FrameType | None) -> None:
        got.append(signum)

    signal.signal(signal.SIGUSR1, handler)
    signal.signal(signal.SIGHUP, handler)
    early.release()
    assert got == [signal.SIGUSR1, signal.SIGHUP, signal.SIGUSR1]
    early.release()  # once
    assert len(got) == 3


def test_release_gives_back_the_dispositions_nothing_replaced() -> None:
    before_int = signal.getsignal(signal.SIGINT)
    early = EarlySignals.hold()
    assert signal.getsignal(signal.SIGTERM) == early._record
    early.release()
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
    assert signal.getsignal(signal.SIGINT) == before_int


def test_an_ignored_signal_stays_ignored() -> None:
    # a master started by USR2 inherits HUP, USR1, USR2, TTIN and TTOU ignored on purpose
    signal.signal(signal.SIGUSR2, signal.SIG_IGN)
    early = EarlySignals.hold()
    assert signal.getsignal(signal.SIGUSR2) == signal.SIG_IGN
    os.kill(os.getpid(), signal.SIGUSR2)
    assert early.received == []
    early.release()
    assert signal.getsignal(signal.SIGUSR2) == signal.SIG_IGN


def test_an_interrupt_held_for_another_command_is_a_keyboard_interrupt_after_all() -> None:
    # Ctrl-C while `preforkd status` imports: recorded, then Python's own INT handler back
    signal.signal(signal.SIGINT, signal.default_int_handler)
    early = EarlySignals.hold()
    os.kill(os.getpid(), signal.SIGINT)  # no traceback mid-import
    assert early.received == [signal.SIGINT]
    with pytest.raises(KeyboardInterrupt):
        early.release()
    assert signal.getsignal(signal.SIGINT) == signal.default_int_handler
