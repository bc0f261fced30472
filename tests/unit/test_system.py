"""System.spawn with a real fork(): what the child inherits, what the parent keeps."""

from __future__ import annotations

import gc
import os
import signal
import socket
import time

from prefork.system import System


def _spawn_and_report() -> tuple[int, bytes]:
    """Fork through System.spawn; the child writes what `child` returns as text, then the
    parent reads it (deadline 10 s) and reaps the child."""
    parent_end, child_end = socket.socketpair()
    parent_end.settimeout(10)

    def child() -> int:
        blocked = signal.pthread_sigmask(signal.SIG_BLOCK, [])
        line = f"{gc.get_freeze_count()} {int(signal.SIGTERM in blocked)}"
        child_end.sendall(line.encode())
        child_end.close()
        return 7

    pid = System().spawn(child, child_end)
    try:
        data = parent_end.recv(100)
    finally:
        parent_end.close()
        deadline = time.monotonic() + 10
        while True:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                break
            if time.monotonic() > deadline:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                raise AssertionError("the child did not exit")
            time.sleep(0.01)
    return os.waitstatus_to_exitcode(status), data


def test_the_child_inherits_a_frozen_heap_and_the_parent_does_not_keep_it_frozen() -> None:
    assert gc.get_freeze_count() == 0
    code, data = _spawn_and_report()
    frozen, blocked = (int(x) for x in data.split())
    assert code == 7
    assert frozen > 1000  # everything this test process held at fork()
    assert blocked == 1  # signals stay blocked until the child's own handlers are in place
    assert gc.get_freeze_count() == 0  # the parent's cycles are still collected
    assert signal.SIGTERM not in signal.pthread_sigmask(signal.SIG_BLOCK, [])
