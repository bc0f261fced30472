"""Keep-alive relief: a busy worker's parked connections go to a free one (http.keepalive_relief).

A sync worker answers one request at a time. While one request runs long (a slow query, an
upload, a stuck call), the keep-alive connections parked in that worker's epoll would wait for
it, however many other workers sit idle, and die with it if the master kills it at
workers.timeout. A second thread in each HTTP worker watches for that: once the request in
progress has lasted `after` seconds, it passes those connections through the master to a free
worker of the same generation, as balance_connections passes a connection just accepted.

Invariants: the worker's main thread holds `lock` at all times except inside
HttpProtocol.serve (Worker.serve releases it there and takes it back); the thread touches the
worker's connections only while it holds the lock, so only while the main thread is inside a
request, never in its loop. Taking and giving back an uncontended lock makes no syscall, so
the per-request cost is two atomic operations. The thread starts with every signal blocked,
so that every signal still reaches the main thread (a Ctrl-C interrupts the application's
sleep as it would without the thread). It never blocks on a send, and an error in it is
logged and costs nothing else.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable

from prefork.signals import all_blocked

log = logging.getLogger("prefork")

# how often the thread looks, as a share of `after`, and within what bounds (seconds): a
# connection waits at most `after` plus one tick behind a long request
TICK_SHARE = 0.5
MIN_TICK = 0.01
MAX_TICK = 0.5


def tick_for(after: float) -> float:
    return min(MAX_TICK, max(MIN_TICK, after * TICK_SHARE))


class Relief:
    """The watching thread and the lock it shares with the worker's main thread."""

    def __init__(self, after: float, relieve: Callable[[float], str | None]) -> None:
        self.after = after
        self.tick = tick_for(after)
        self.lock = threading.Lock()
        self.lock.acquire()  # the main thread's from the start: it is in its loop
        self._relieve = relieve
        self._thread = threading.Thread(target=self._run, name="preforkd-relief", daemon=True)
        # an application that forks in a request, and whose child goes on through the
        # worker's code, must not find the lock held by a thread the child does not have
        os.register_at_fork(after_in_child=self._forked)

    def _forked(self) -> None:
        self.lock = threading.Lock()  # the child is inside the request: the lock is not its

    def start(self) -> None:
        """Start the thread with every signal blocked (it inherits the mask it is started
        with, so no signal is ever delivered to it, not even before its first bytecode)."""
        with all_blocked():
            self._thread.start()

    def _run(self) -> None:
        while True:
            time.sleep(self.tick)
            # free only while the main thread is inside a request; in its loop it waits in
            # epoll and answers its connections itself
            lock = self.lock
            if not lock.acquire(blocking=False):
                continue
            failure: Exception | None = None
            try:
                done = self._relieve(self.after)
            except Exception as exc:
                done, failure = None, exc
            finally:
                lock.release()
            # logged with the lock given back: a log handler that blocks (syslog over TCP)
            # must not hold the main thread after its request, where no timeout watches it
            if failure is not None:
                log.error("keep-alive relief failed; the connections stay where they are",
                          exc_info=failure)
            elif done:
                log.debug("%s", done)
