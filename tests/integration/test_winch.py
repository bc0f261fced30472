"""WINCH to a real master: every worker stops, the master keeps its sockets (so a request sent
meanwhile waits in the accept queue and is answered once HUP brings workers back); and a master
in a terminal's foreground ignores the WINCH a window resize sends.

The upgrade sequence that uses WINCH (USR2, WINCH to the old master, then the new one's end)
is in test_upgrade.py.
"""

from __future__ import annotations

import fcntl
import json
import os
import pty
import signal
import struct
import termios
from collections.abc import Iterator
from pathlib import Path

import pytest

from detached import preforkd
from harness import (
    ServerFactory,
    address,
    connect,
    fetch,
    gone,
    http_request,
    read_response,
    recv_within,
    settings,
    wait_until,
)


def status_of(pidfile: Path) -> dict[str, object]:
    done = preforkd("status", "--json", "-p", str(pidfile))
    assert done.returncode == 0, done.stderr
    master: dict[str, object] = json.loads(done.stdout)["master"]
    return master


def test_winch_stops_the_workers_and_hup_answers_what_waited(
    server_factory: ServerFactory, tmp_path: Path
) -> None:
    pidfile = tmp_path / "preforkd.pid"
    server = server_factory(settings(workers={"count": 2}, pidfile=str(pidfile)))
    workers = server.worker_pids()
    assert len(workers) == 2

    server.signal(signal.SIGWINCH)
    server.wait_for_log("WINCH: stopping all 2 workers; no worker of this master serves")
    wait_until(lambda: all(gone(pid) for pid in workers), 15, message="workers still run")
    wait_until(lambda: server.worker_pids() == [], 10, message="a worker was started again")
    assert server.running()
    master = status_of(pidfile)
    assert (master["state"], master["ready"], master["target_workers"]) == (
        "workers stopped", False, 0,
    )

    # the socket is still the master's: a client gets in, and waits
    with connect(address(server), timeout=15) as waiting:
        waiting.sendall(http_request("GET", "/"))
        early, closed = recv_within(waiting, 1.0)
        assert (early, closed) == (b"", False)

        since = len(server.log())
        server.signal(signal.SIGHUP)
        server.wait_for_log("HUP: starting 2 workers again", since=since)
        response = read_response(waiting)
    assert response.status == 200
    assert int(response.body) not in workers  # a worker started by the HUP
    wait_until(lambda: len(server.worker_pids()) == 2, 15, message="the pool did not come back")
    wait_until(lambda: status_of(pidfile)["state"] == "running", 15,
               message="the status does not say running")


def test_ttin_after_winch_starts_one_worker(server_factory: ServerFactory) -> None:
    server = server_factory(settings(workers={"count": 2}))
    workers = server.worker_pids()
    server.signal(signal.SIGWINCH)
    wait_until(lambda: server.worker_pids() == [], 15, message="workers still run")
    assert all(gone(pid) for pid in workers)

    server.signal(signal.SIGTTIN)
    server.wait_for_log("TTIN: 1 workers")
    assert fetch(address(server), timeout=15).status == 200
    assert len(server.worker_pids()) == 1


@pytest.fixture
def terminal() -> Iterator[tuple[int, str]]:
    """A pseudo-terminal: (the controlling side's fd, the device path a process opens)."""
    controller, device = pty.openpty()
    path = os.ttyname(device)
    os.close(device)
    try:
        yield controller, path
    finally:
        os.close(controller)


def test_a_window_resize_does_not_stop_a_foreground_server(
    server_factory: ServerFactory, terminal: tuple[int, str]
) -> None:
    controller, path = terminal

    def take_the_terminal() -> None:
        # in the child, after setsid(): the terminal becomes the session's, and its
        # foreground process group is the master's
        fd = os.open(path, os.O_RDWR)
        fcntl.ioctl(fd, termios.TIOCSCTTY, 0)
        os.close(fd)

    server = server_factory(settings(workers={"count": 2}), preexec_fn=take_the_terminal)
    workers = server.worker_pids()

    # the window is resized: the kernel sends WINCH to the terminal's foreground group
    fcntl.ioctl(controller, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 100, 0, 0))

    server.wait_for_log("WINCH ignored: the master runs in a terminal's foreground")
    assert fetch(address(server), timeout=5).status == 200
    assert server.worker_pids() == workers
    server.stop()  # before the terminal closes (a hangup is a HUP to the group)
