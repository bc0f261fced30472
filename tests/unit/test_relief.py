"""The keep-alive relief thread (prefork/relief.py): when it runs its work, what it blocks,
what it logs. A real thread and a real lock; the work is a recording function."""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from collections.abc import Iterator

import pytest

from prefork.relief import MAX_TICK, MIN_TICK, Relief, tick_for


def wait_for(predicate: object, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():  # type: ignore[operator]
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


class Recorder:
    def __init__(self, result: str | None = None, fail: bool = False) -> None:
        self.calls: list[tuple[float, bool]] = []
        self.result = result
        self.fail = fail
        self.relief: Relief | None = None

    def __call__(self, after: float) -> str | None:
        assert self.relief is not None
        # the thread holds the lock while it works: the main thread cannot take it
        self.calls.append((after, self.relief.lock.locked()))
        if self.fail:
            raise RuntimeError("deliberate failure in relieve")
        return self.result


@pytest.fixture
def recorder() -> Iterator[Recorder]:
    recorder = Recorder()
    yield recorder


def started(recorder: Recorder, after: float = 0.02) -> Relief:
    relief = Relief(after, recorder)
    recorder.relief = relief
    relief.start()
    return relief


def test_the_tick_is_half_the_setting_within_bounds() -> None:
    assert tick_for(0.25) == 0.125
    assert tick_for(0.001) == MIN_TICK
    assert tick_for(60) == MAX_TICK


def test_it_works_only_while_the_main_thread_has_given_up_the_lock(
    recorder: Recorder,
) -> None:
    relief = started(recorder)
    time.sleep(0.2)  # the main thread "in its loop": several ticks pass, none may work
    assert recorder.calls == []
    relief.lock.release()  # "inside a request"
    wait_for(lambda: len(recorder.calls) >= 2)
    relief.lock.acquire()  # back in the loop: waits for the thread's turn to end
    seen = len(recorder.calls)
    time.sleep(0.2)
    assert len(recorder.calls) == seen
    assert all(after == 0.02 and held for after, held in recorder.calls)


def test_the_thread_has_every_signal_blocked(recorder: Recorder) -> None:
    """So every process-directed signal goes to the main thread, which a signal must
    interrupt in a blocking call of the application."""
    relief = started(recorder)
    native = relief._thread.native_id
    assert native is not None
    with open(f"/proc/{os.getpid()}/task/{native}/status") as f:
        status = f.read()
    blocked = int(next(line for line in status.splitlines()
                       if line.startswith("SigBlk:")).split()[1], 16)
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGQUIT, signal.SIGHUP, signal.SIGCHLD):
        assert blocked & (1 << (sig - 1)), f"{sig.name} reaches the relief thread"
    # and the main thread's mask is as it was
    assert signal.SIGINT not in signal.pthread_sigmask(signal.SIG_BLOCK, [])


def test_a_failure_is_logged_after_the_lock_is_given_back() -> None:
    recorder = Recorder(fail=True)
    relief = started(recorder)
    logged: list[tuple[str, bool]] = []

    class Probe(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            # the lock is free again: the main thread, back from its request, is not held
            free = relief.lock.acquire(blocking=False)
            if free:
                relief.lock.release()
            logged.append((self.format(record), free))

    logger = logging.getLogger("prefork")
    probe = Probe(logging.ERROR)
    logger.addHandler(probe)
    level = logger.level
    logger.setLevel(logging.DEBUG)
    try:
        relief.lock.release()
        wait_for(lambda: len(logged) >= 1)
        relief.lock.acquire()
    finally:
        logger.removeHandler(probe)
        logger.setLevel(level)
    text, free = logged[0]
    assert "keep-alive relief failed" in text
    assert "deliberate failure in relieve" in text  # with its traceback
    assert free
    assert relief._thread.is_alive()  # a failure costs nothing else


def test_a_forked_child_gets_a_lock_of_its_own(recorder: Recorder) -> None:
    relief = started(recorder, after=60)
    relief.lock.release()
    relief.lock.acquire()  # as if the thread held it at the moment of the fork
    pid = os.fork()
    if pid == 0:
        os._exit(0 if relief.lock.acquire(timeout=1) else 1)
    _, status = os.waitpid(pid, 0)
    relief.lock.release()
    assert os.waitstatus_to_exitcode(status) == 0


def test_threads_are_daemons(recorder: Recorder) -> None:
    """A worker leaves through os._exit; nothing must wait for the thread."""
    relief = started(recorder)
    assert relief._thread.daemon
    assert relief._thread in threading.enumerate()
