"""Keep-alive relief's read of the channel (Worker.take_from_channel), in process:
real workers on real channels and sockets, the relief thread's turn called directly while
the worker's slot says it is inside a long request (as test_worker_handover.py does)."""

from __future__ import annotations

import os
import select
import socket
import time

import pytest

from prefork import channel as chan
from prefork.channel import MSG_BACK, MSG_FRESH, MSG_KEPT, MSG_KEPT_BACK, MSG_RELIEF
from prefork.connection import Connection
from prefork.worker import Worker
from tests.unit.worker_rig import (
    DEADLINE,
    WorkerRig,
    conn_of,
    kept_for,
    served_connection,
)


@pytest.fixture
def rig(worker_rig: WorkerRig) -> WorkerRig:
    return worker_rig


def begin_long_request(worker: Worker, client: socket.socket) -> Connection:
    """What Worker.serve does when a parked client's next request runs long: that connection
    is the one being served (its second request), and the slot says so since a second ago."""
    conn: Connection = conn_of(worker, client)
    worker.serving = conn  # as Worker.serve sets it before it gives up the lock
    conn.served += 1  # as HttpProtocol.serve counts the request it answers
    worker.slot.busy(b"GET", b"/slow", time.monotonic() - 1.0)
    return conn


# --- defect: the relief thread closed the connection the main thread was serving


@pytest.mark.parametrize("head", [MSG_KEPT, MSG_FRESH])
def test_relief_never_evicts_the_connection_being_served(rig: WorkerRig, head: bytes) -> None:
    """At workers.max_connections, parking a connection evicts the longest-parked idle
    keep-alive one. The relief thread now parks what it takes from the channel, and the
    connection whose request is running is parked, idle (its request fully read) and served:
    it was the one evicted, closed under the main thread, and its client lost its answer."""
    worker, master_end = rig.worker(number=1, max_connections=2, keepalive_relief=0.2)
    busy = served_connection(rig, worker)
    conn = begin_long_request(worker, busy)
    kept_for(rig, master_end, head)

    worker.relieve(0.2)  # the thread's tick: no free peer, so what it took stays here

    assert not conn.closed, "the connection being served was closed by the relief thread"
    assert worker.conns.get(conn.fd) is conn
    busy.settimeout(0)
    with pytest.raises(BlockingIOError):
        busy.recv(1)  # neither closed nor reset: the client still waits for its answer


def test_an_eviction_by_the_relief_thread_keeps_the_request_on_the_scoreboard(
    rig: WorkerRig,
) -> None:
    """workers.max_connections 1, the request in progress on a connection served as it was
    accepted (never parked): the relief thread parks a relieved connection it took from the
    channel, parking at the limit evicts it, and dropping the worker's last connection set
    the slot IDLE. That erased the request's start: the master's workers.timeout no longer
    saw a request to time out, and relief stopped for it."""
    worker, master_end = rig.worker(number=1, keepalive_relief=0.2)
    busy = served_connection(rig, worker)
    conn = begin_long_request(worker, busy)
    del worker.conns[conn.fd]  # as a connection served straight from accept()
    worker.max_connections = 1
    kept_for(rig, master_end, MSG_KEPT)

    worker.relieve(0.2)

    assert not worker.conns  # the relieved one was evicted at the limit
    assert worker.slot.in_request_since() is not None, "the request left the scoreboard"
    conn.close()


# --- defect: connections that came back were passed again on every tick (ping-pong)


def test_relief_does_not_pass_again_what_came_back(rig: WorkerRig) -> None:
    """No other worker can take a busy worker's relieved connections (the server stops, or
    it is the only worker): the master sends them back. The relief thread took them from the
    channel on its next tick and passed them again, and again, every tick of a request that
    may last graceful_timeout: two channel messages, a master round and an epoll
    unregister/register per connection per tick, for nothing. What came back now waits in
    the channel for the main thread, as it did before the thread read the channel."""
    worker, master_end = rig.worker(number=1, keepalive_relief=0.2)
    busy = served_connection(rig, worker)
    parked = served_connection(rig, worker)
    worker.begin_stop()  # a stopping worker passes to whoever serves (pid 0)
    begin_long_request(worker, busy)

    assert worker.relieve(0.2) is not None
    data, fds = received(master_end)
    assert data.startswith(MSG_RELIEF)
    pid, passed = chan.parse_balance(data, fds)
    assert pid == 0
    # nobody serves: the master sends them back to their sender, still served
    assert chan.send_conns(master_end, passed, MSG_KEPT_BACK)
    for fd, _, _ in passed:
        os.close(fd)
    assert worker.unanswered == 1

    for _ in range(3):  # the next ticks
        worker.relieve(0.2)
    assert chan.receive(master_end) is None, "what came back was passed on again"
    assert worker.unanswered == 1  # the answer is still the main thread's to read

    worker.slot.done()  # the request ends: the main thread reads its channel
    worker.on_channel()
    assert worker.unanswered == 0
    assert conn_of(worker, parked).served == 1


def test_a_fresh_connection_sent_back_is_not_passed_again_either(rig: WorkerRig) -> None:
    """The same with MSG_BACK: an accepted, unread connection (a browser's preconnect) a
    stopping worker's relief passed, which came back."""
    worker, master_end = rig.worker(number=1, keepalive_relief=0.2)
    busy = served_connection(rig, worker)
    worker.begin_stop()
    begin_long_request(worker, busy)
    silent = rig.connect()
    accepted, _ = rig.listener.sock.accept()
    (lid,) = worker.listener_ids
    assert chan.send_conns(master_end, [(accepted.fileno(), lid, time.monotonic() + 5)],
                           MSG_BACK)
    accepted.close()
    worker.unanswered = 1

    worker.relieve(0.2)

    assert chan.receive(master_end) is None
    assert worker.unanswered == 1
    worker.slot.done()
    worker.on_channel()
    assert worker.unanswered == 0
    assert conn_of(worker, silent).served == 0


# --- pinned: what the thread still takes


def test_relief_takes_what_precedes_a_returned_message_and_leaves_the_rest(
    rig: WorkerRig,
) -> None:
    """Connections the master sent while the worker was free, and answers to earlier passes,
    are still taken, in order, and passed on to a free peer; a message that sent
    connections back stays in the channel for the main thread."""
    worker, master_end = rig.worker(number=1, keepalive_relief=0.2)
    rig.worker(number=2, keepalive_relief=0.2)  # free: the taker
    busy = served_connection(rig, worker)
    begin_long_request(worker, busy)
    client = kept_for(rig, master_end, MSG_KEPT)
    master_end.send(chan.MSG_TAKEN)  # the answer to an earlier pass
    silent = rig.connect()
    accepted, _ = rig.listener.sock.accept()
    (lid,) = worker.listener_ids
    assert chan.send_conns(master_end, [(accepted.fileno(), lid, time.monotonic() + 5)],
                           MSG_BACK)  # the answer to another one
    accepted.close()
    worker.unanswered = 2

    assert worker.relieve(0.2) is not None
    data, fds = received(master_end)
    assert data.startswith(MSG_RELIEF)
    pid, ((fd, _, _),) = chan.parse_balance(data, fds)
    assert pid == WorkerRig.pid_of(2)
    with socket.socket(fileno=os.dup(fd)) as sock:
        assert sock.getpeername() == client.getsockname()
    os.close(fd)
    assert chan.receive(master_end) is None  # only the relieved one went
    assert worker.unanswered == 2  # MSG_TAKEN taken (-1), this pass (+1)

    worker.slot.done()
    worker.on_channel()  # the main thread: what came back
    assert worker.unanswered == 1
    assert conn_of(worker, silent).served == 0


def received(master_end: socket.socket) -> tuple[bytes, list[int]]:
    deadline = time.monotonic() + DEADLINE
    while (message := chan.receive(master_end)) is None:
        assert time.monotonic() < deadline, "the worker sent nothing"
        select.select([master_end], [], [], 0.1)
    return message
