"""The worker's side of passing connections, in process: Worker.hand_over passes exactly its
idle, served, plain connections over a real SEQPACKET channel, and Worker.adopt parks what
arrives and serves the client's next request on the socket it never reopened; a worker over
its share passes a connection it just accepted (balance_connections)."""

from __future__ import annotations

import os
import select
import time

import pytest

from prefork import channel as chan
from prefork.channel import (
    MSG_BACK,
    MSG_BALANCE,
    MSG_FRESH,
    MSG_KEPT_BACK,
    MSG_RELIEF,
    MSG_STOP,
)
from prefork.scoreboard import Activity
from prefork.worker import BALANCE_ABOVE
from tests.unit.worker_rig import (
    DEADLINE,
    REQUEST,
    WorkerRig,
    closed_by_server,
    conn_of,
    kept_for,
    peer_of,
    read_response,
    receive_conns,
    served_connection,
    wait_readable,
)


@pytest.fixture
def rig(worker_rig: WorkerRig) -> WorkerRig:
    return worker_rig


def test_hand_over_passes_only_idle_served_plain_connections(rig: WorkerRig) -> None:
    worker, master_end = rig.worker()
    idle = [served_connection(rig, worker) for _ in range(3)]
    midway = served_connection(rig, worker)
    midway.sendall(b"GET / HTTP/1.1\r\n")  # a head that has begun: its answer is owed here
    wait_readable(worker, conn_of(worker, midway).fd)
    worker.on_readable(conn_of(worker, midway))
    assert not conn_of(worker, midway).parser.idle
    silent = rig.connect()  # connected, never sent anything: not a keep-alive connection
    rig.accept(worker)
    assert len(worker.conns) == 5
    deadlines = {c.peer: c.deadline for c in worker.conns.values()}
    (lid,) = worker.listener_ids

    worker.begin_stop()
    worker.hand_over({lid})

    passed = receive_conns(master_end)
    assert sorted(peer_of(fd) for fd, _, _ in passed) == sorted(c.getsockname() for c in idle)
    assert all(listener == lid for _, listener, _ in passed)
    assert {peer_of(fd): d for fd, _, d in passed} == {
        c.getsockname(): deadlines[c.getsockname()] for c in idle
    }
    # the worker kept nothing of what it passed, and everything else
    assert sorted(c.peer for c in worker.conns.values()) == sorted(
        [midway.getsockname(), silent.getsockname()]
    )
    # nor any epoll entry: the passed sockets' bytes wake only their new owner
    for client in idle:
        client.sendall(b"G")
    assert not {fd for fd, _ in worker.epoll.poll(0.3)} - set(worker.conns)
    for fd, _, _ in passed:
        os.close(fd)


def test_hand_over_keeps_everything_when_no_serving_worker_takes_the_listener(rig: WorkerRig,
) -> None:
    worker, master_end = rig.worker()
    served_connection(rig, worker)
    worker.begin_stop()
    worker.hand_over({12345})  # the serving workers listen elsewhere
    assert chan.receive(master_end) is None
    assert len(worker.conns) == 1


def test_hand_over_with_proxy_protocol_passes_nothing(rig: WorkerRig) -> None:
    worker, master_end = rig.worker(proxy_protocol="v1", forwarded_allow_ips=["127.0.0.1"])
    served_connection(rig, worker, b"PROXY TCP4 192.0.2.1 127.0.0.1 4321 80\r\n")
    (lid,) = worker.listener_ids
    worker.begin_stop()
    worker.hand_over({lid})
    assert chan.receive(master_end) is None
    assert len(worker.conns) == 1


def test_an_adopted_connection_is_served_on_the_same_socket(rig: WorkerRig) -> None:
    old, old_master_end = rig.worker(number=1)
    new, new_master_end = rig.worker(number=2)
    client = served_connection(rig, old)
    (lid,) = old.listener_ids
    old.begin_stop()
    old.hand_over({lid})
    passed = receive_conns(old_master_end)
    assert len(passed) == 1
    fd, listener, deadline = passed[0]

    # what the master does: forward, then close its own copy (the deadline moved ten
    # seconds earlier, so a clock restarted on arrival could not pass for it)
    deadline -= 10.0
    assert chan.send_conns(new_master_end, [(fd, listener, deadline)])
    os.close(fd)
    new.on_channel()

    conn = conn_of(new, client)
    assert conn.adopted and conn.served == 1 and conn.parser.idle
    assert conn.deadline == deadline  # the idle clock kept running
    client.sendall(REQUEST)
    wait_readable(new, conn.fd)
    new.on_readable(conn)
    assert read_response(client).startswith(b"HTTP/1.1 200 OK\r\n")
    assert new.slot.requests == 1 and old.slot.requests == 1


def test_adopt_shortens_a_deadline_past_its_own_keepalive_timeout(rig: WorkerRig) -> None:
    old, old_master_end = rig.worker(number=1)
    new, _ = rig.worker(number=2, keepalive_timeout=2)
    served_connection(rig, old)
    (lid,) = old.listener_ids
    old.begin_stop()
    old.hand_over({lid})
    ((fd, listener, _),) = receive_conns(old_master_end)
    later = time.monotonic() + 1000.0
    new.adopt([(fd, listener, later)])
    (conn,) = new.conns.values()
    assert conn.deadline <= time.monotonic() + 2


@pytest.mark.parametrize("why", ["unknown-listener", "not-a-socket"])
def test_adopt_closes_what_it_cannot_keep(rig: WorkerRig, why: str) -> None:
    old, old_master_end = rig.worker(number=1)
    new, _ = rig.worker(number=2)
    client = served_connection(rig, old)
    (lid,) = old.listener_ids
    old.begin_stop()
    old.hand_over({lid})
    ((fd, listener, deadline),) = receive_conns(old_master_end)
    held = len(new.conns)
    if why == "not-a-socket":
        reader, writer = os.pipe()
        os.close(writer)
        new.adopt([(reader, listener, deadline)])  # must not raise
        with pytest.raises(OSError):
            os.fstat(reader)  # and the descriptor is not leaked
        os.close(fd)
        assert len(new.conns) == held
        return
    new.adopt([(fd, listener + 1, deadline)])  # a listener this worker does not have
    assert len(new.conns) == held
    assert closed_by_server(client)


@pytest.mark.parametrize("why", ["one-short", "none-idle", "stopping"])
def test_a_hand_over_with_a_request_on_it_is_answered_by_a_full_or_stopping_worker(
    rig: WorkerRig, why: str
) -> None:
    """A worker one short of workers.max_connections (where parking keeps a full worker:
    at the cap it closes an idle one for room), at the cap with nothing idle, or stopping,
    closed a connection handed over to it: its client may have sent its next request while
    the connection travelled (a taker reads its channel only between requests), and that
    request was reset unanswered. It is kept and answered now; for room, an idle
    connection of the worker's own with nothing to read is closed instead."""
    old, old_master_end = rig.worker(number=1)
    new, _ = rig.worker(number=2, max_connections=2)
    client = served_connection(rig, old)
    (lid,) = old.listener_ids
    old.begin_stop()
    old.hand_over({lid})
    ((fd, listener, deadline),) = receive_conns(old_master_end)
    own = served_connection(rig, new)
    if why == "none-idle":
        own.sendall(b"GET / HTTP/1.1\r\n")  # a head that has begun: not idle
        wait_readable(new, conn_of(new, own).fd)
        new.on_readable(conn_of(new, own))
        new.max_connections = 1  # it holds as many as it may
    elif why == "stopping":
        new.begin_stop()
    client.sendall(REQUEST)  # while its connection travels

    new.adopt([(fd, listener, deadline)])

    conn = conn_of(new, client)
    wait_readable(new, conn.fd)
    new.on_readable(conn)
    answer = read_response(client)
    assert answer.startswith(b"HTTP/1.1 200 OK\r\n")
    if why == "one-short":
        assert closed_by_server(own)  # idle, nothing to read: closed for room
        assert len(new.conns) == 1
    elif why == "none-idle":
        # kept one over the cap for its answer, which closes it; nothing new accepted
        assert b"\r\nConnection: close\r\n" in answer and closed_by_server(client)
        assert list(new.conns.values()) == [conn_of(new, own)] and not new.accepting
        own.sendall(b"Host: t\r\n\r\n")
        wait_readable(new, conn_of(new, own).fd)
        new.on_readable(conn_of(new, own))
        assert read_response(own).startswith(b"HTTP/1.1 200 OK\r\n")


def test_a_worker_over_its_share_passes_a_new_connection_to_the_one_holding_fewest(rig: WorkerRig,
) -> None:
    busy, busy_master_end = rig.worker(number=1)
    idle, idle_master_end = rig.worker(number=2)
    for _ in range(BALANCE_ABOVE):
        served_connection(rig, busy)
    newcomer = rig.connect()
    newcomer.sendall(REQUEST)
    rig.accept(busy)

    assert len(busy.conns) == BALANCE_ABOVE  # it kept nothing of the newcomer
    deadline = time.monotonic() + DEADLINE
    while (message := chan.receive(busy_master_end)) is None:
        assert time.monotonic() < deadline, "nothing was passed"
    data, fds = message
    assert data.startswith(MSG_BALANCE)
    pid, passed = chan.parse_balance(data, fds)
    assert pid == WorkerRig.pid_of(2)
    ((fd, lid, _),) = passed
    assert peer_of(fd) == newcomer.getsockname() and lid in idle.listener_ids

    # what the master does: on to that worker as a new connection, its own copy closed
    assert chan.send_conns(idle_master_end, passed, MSG_FRESH)
    os.close(fd)
    idle.on_channel()  # the request sent before the move was never read: answered now
    assert read_response(newcomer).startswith(b"HTTP/1.1 200 OK\r\n")
    conn = conn_of(idle, newcomer)
    assert conn.adopted and conn.served == 1  # its first request, answered here
    assert idle.slot.requests == 1 and busy.slot.requests == BALANCE_ABOVE


@pytest.mark.parametrize("why", ["peer-as-busy", "turned-off", "peer-stopping"])
def test_a_worker_keeps_a_new_connection_when_it_should(rig: WorkerRig, why: str) -> None:
    http = {"balance_connections": False} if why == "turned-off" else {}
    busy, busy_master_end = rig.worker(number=1, **http)
    peer, _ = rig.worker(number=2)
    if why == "peer-as-busy":
        peer.slot.hold(BALANCE_ABOVE)  # not clearly behind
    elif why == "peer-stopping":
        peer.slot.set(Activity.DRAINING)  # a stopping worker takes nothing new
    for _ in range(BALANCE_ABOVE):
        served_connection(rig, busy)
    served_connection(rig, busy)
    assert len(busy.conns) == BALANCE_ABOVE + 1
    assert chan.receive(busy_master_end) is None


def test_passed_connections_count_until_the_peer_says_so_itself(rig: WorkerRig) -> None:
    busy, busy_master_end = rig.worker(number=1)
    rig.worker(number=2)
    for _ in range(BALANCE_ABOVE):
        served_connection(rig, busy)
    busy.look_at_peers(time.monotonic())
    busy.peers_until = float("inf")  # one look for the whole test, however slow the machine
    kept = 0
    for _ in range(12):
        client = rig.connect()
        client.sendall(REQUEST)
        before = len(busy.conns)
        rig.accept(busy)
        kept += len(busy.conns) - before
    # the peer holds nothing as far as the scoreboard says, yet it is not given all 12: what
    # was passed to it counts, so the two end up even
    passed = 0
    while (message := chan.receive(busy_master_end)) is not None:
        for fd in message[1]:
            os.close(fd)
        passed += len(message[1])
    assert passed + kept == 12
    assert abs((BALANCE_ABOVE + kept) - passed) <= 2, (kept, passed)


def test_a_new_connection_that_waited_past_its_deadline_is_still_answered(rig: WorkerRig) -> None:
    idle, idle_master_end = rig.worker(number=2)
    client = rig.connect()
    client.sendall(REQUEST)
    accepted, _ = rig.listener.sock.accept()  # as the busier worker did, long ago
    lid = next(iter(idle.listener_ids))
    assert chan.send_conns(idle_master_end, [(accepted.fileno(), lid, 0.0)], MSG_FRESH)
    accepted.close()
    deadline = time.monotonic() + DEADLINE
    while not idle.conns and idle.slot.requests == 0:
        assert time.monotonic() < deadline, "the connection never arrived"
        select.select([idle_master_end], [], [], 0.05)
        idle.on_channel()
    idle.sweep()  # the deadline is long past: a parked idle connection would go now
    assert read_response(client).startswith(b"HTTP/1.1 200 OK\r\n")


def test_a_stopping_worker_reads_what_was_passed_to_it_before_it_exits(rig: WorkerRig) -> None:
    worker, master_end = rig.worker(number=1)
    client = rig.connect()
    client.sendall(REQUEST)
    accepted, _ = rig.listener.sock.accept()
    lid = next(iter(worker.listener_ids))
    master_end.send(b"O")  # another message first: every pending one is read
    passed = [(accepted.fileno(), lid, time.monotonic() + 5)]
    assert chan.send_conns(master_end, passed, MSG_FRESH)
    accepted.close()
    worker.begin_stop()
    worker.idle_grace_until = 0.0
    worker.finished()  # about to exit: what is pending is read, and answered, first
    assert read_response(client).startswith(b"HTTP/1.1 200 OK\r\n")
    assert worker.slot.requests == 1


def test_a_stopping_worker_waits_for_the_answer_about_what_it_passed(rig: WorkerRig) -> None:
    busy, busy_master_end = rig.worker(number=1)
    rig.worker(number=2)
    for _ in range(BALANCE_ABOVE):
        served_connection(rig, busy)
    newcomer = rig.connect()
    newcomer.sendall(REQUEST)
    rig.accept(busy)
    assert busy.unanswered == 1
    message = chan.receive(busy_master_end)
    assert message is not None
    _, passed = chan.parse_balance(*message)

    busy.begin_stop()
    busy.idle_grace_until = 0.0
    busy.finished()  # closes its idle keep-alive connections
    assert not busy.conns
    assert not busy.finished()  # the passed connection may come back: not yet
    # nobody else could take it: back to the sender, which answers it and may then exit
    assert chan.send_conns(busy_master_end, passed, MSG_BACK)
    for fd, _, _ in passed:
        os.close(fd)
    while not busy.finished():
        busy.on_readable(next(iter(busy.conns.values())))
    assert read_response(newcomer).startswith(b"HTTP/1.1 200 OK\r\n")
    assert busy.unanswered == 0


def test_taken_is_an_answer_too(rig: WorkerRig) -> None:
    worker, master_end = rig.worker(number=1)
    worker.unanswered, worker.unanswered_until = 1, time.monotonic() + 60
    worker.begin_stop()
    worker.idle_grace_until = 0.0
    assert not worker.finished()
    master_end.send(chan.MSG_TAKEN)
    assert worker.finished()


def test_a_stopping_worker_waits_while_the_master_has_not_read_its_pass(
    rig: WorkerRig,
) -> None:
    """Defect: a stopping worker waited PASS_ANSWER_WAIT (1 s) for the answer about what it
    passed, whether or not the master had read it, and exited. A master blocked longer (a
    preloaded application importing on a reload) then read the pass, found no other taker
    (a stop had begun meanwhile) and sent it back to a worker that was gone: closed,
    unanswered. It now waits while its message is still in the channel, and for
    PASS_ANSWER_WAIT once the master has read it."""
    worker, master_end = rig.worker(number=1, balance_connections=True)
    client = rig.connect()
    client.sendall(REQUEST)
    deadline = time.monotonic() + DEADLINE
    while rig.listener.queued() != 1:
        assert time.monotonic() < deadline, "the connection never reached the queue"
    worker.begin_stop()
    worker.passing_to = set(worker.listener_ids)  # replaced: what it drains goes on
    worker.idle_grace_until = 0.0
    assert not worker.finished()  # drains the queue, passes the connection on
    assert worker.unanswered == 1 and not worker.conns
    worker.unanswered_until = time.monotonic() - 1  # PASS_ANSWER_WAIT is over
    assert not worker.finished(), "exited while the master had not read its pass"

    message = chan.receive(master_end)  # the master reads it at last...
    assert message is not None
    assert not worker.finished()  # ...and its answer may follow: not yet
    _, passed = chan.parse_balance(*message)
    assert chan.send_conns(master_end, passed, MSG_BACK)  # nobody else took it
    for fd, _, _ in passed:
        os.close(fd)
    while not worker.finished():
        assert time.monotonic() < deadline, "the connection sent back was not answered"
        for conn in list(worker.conns.values()):
            worker.on_readable(conn)
    assert read_response(client).startswith(b"HTTP/1.1 200 OK\r\n")


def test_the_wait_for_an_unread_pass_has_an_end(rig: WorkerRig) -> None:
    """A master that never reads (stopped, or blocked past the worker's graceful timeout,
    when it kills the worker anyway) is not waited for beyond unread_until; one that read
    the pass and never answered, PASS_ANSWER_WAIT after the read."""
    worker, master_end = rig.worker(number=1)
    worker.begin_stop()
    worker.idle_grace_until = 0.0
    now = time.monotonic()
    worker.spec.channel.send(MSG_STOP)  # stands for a pass the master has not read
    worker.passed(1, now)
    assert worker.unread_until >= now + worker.spec.config.workers.graceful_timeout
    worker.unanswered_until = now - 1
    assert not worker.finished()
    worker.unread_until = now - 1
    worker.unanswered_until = now - 1
    assert worker.finished()
    assert chan.receive(master_end) == (MSG_STOP, [])
    worker.unanswered_until = time.monotonic() - 1
    assert worker.finished()  # read, and no answer within PASS_ANSWER_WAIT


def test_a_hand_over_is_answered_before_the_worker_exits(rig: WorkerRig) -> None:
    """Defect: a worker that handed its keep-alive connections over exited at once, and
    the master, reading the hand-over late (a reload's import) and stopping by then,
    closed them, over a request a client had sent meanwhile. It now waits for the answer,
    and what comes back (MSG_KEPT_BACK) is answered."""
    worker, master_end = rig.worker(number=1)
    client = served_connection(rig, worker)
    (lid,) = worker.listener_ids
    worker.begin_stop()
    worker.hand_over({lid})
    assert worker.unanswered == 1
    worker.idle_grace_until = 0.0
    passed = receive_conns(master_end)
    client.sendall(REQUEST)  # while the master holds the connection
    assert not worker.finished(), "exited before the master answered its hand-over"
    assert chan.send_conns(master_end, passed, MSG_KEPT_BACK)  # stopping: nobody takes it
    for fd, _, _ in passed:
        os.close(fd)
    deadline = time.monotonic() + DEADLINE
    while not worker.finished():
        assert time.monotonic() < deadline, "the request on the connection was not answered"
        for conn in list(worker.conns.values()):
            worker.on_readable(conn)
    assert read_response(client).startswith(b"HTTP/1.1 200 OK\r\n")
    assert worker.unanswered == 0


def test_a_new_connection_from_another_worker_is_not_the_answer(rig: WorkerRig) -> None:
    """Defect: any MSG_FRESH lowered the count of passed connections awaiting an answer, so
    a connection another worker passed in the same instant let a stopping worker exit while
    its own was still with the master (and would be lost on its way back)."""
    worker, master_end = rig.worker(number=1)
    worker.unanswered, worker.unanswered_until = 1, time.monotonic() + 60
    worker.begin_stop()
    worker.idle_grace_until = 0.0
    client = rig.connect()
    client.sendall(REQUEST)
    accepted, _ = rig.listener.sock.accept()
    lid = next(iter(worker.listener_ids))
    assert chan.send_conns(master_end, [(accepted.fileno(), lid, time.monotonic() + 5)], MSG_FRESH)
    accepted.close()

    assert not worker.finished()  # reads and answers the newcomer, still owed its own
    assert read_response(client).startswith(b"HTTP/1.1 200 OK\r\n")
    assert worker.unanswered == 1
    master_end.send(chan.MSG_TAKEN)
    deadline = time.monotonic() + DEADLINE
    while not worker.finished():
        assert time.monotonic() < deadline, "the answer did not let it finish"
        for conn in list(worker.conns.values()):
            worker.on_readable(conn)


@pytest.mark.parametrize("replaced", [True, False], ids=["replaced", "whole-server-stop"])
def test_what_a_replaced_worker_drains_from_the_queue_goes_to_a_serving_peer(
    rig: WorkerRig, replaced: bool
) -> None:
    """A worker replaced (recycled) takes what is queued when it stops (its wake-up may have
    been the only one for those connections): they go on, unread, to a serving worker rather
    than getting one answer with Connection: close, or none if they stay silent. In a
    whole-server stop nobody serves after it: it answers them itself, as before."""
    old, old_master_end = rig.worker(number=1)
    rig.worker(number=2)
    served_connection(rig, old)  # an idle keep-alive connection: the hand-over's part
    queued = rig.connect()  # in the accept queue, silent (a preconnect)
    deadline = time.monotonic() + DEADLINE
    while rig.listener.queued() != 1:
        assert time.monotonic() < deadline, "the connection never reached the queue"
    lid = next(iter(old.listener_ids))

    old.begin_stop()
    if replaced:
        old.hand_over({lid})
        assert chan.receive(old_master_end) is not None  # the idle one, passed on (MSG_CONNS)
    old.finished()  # drains the queue

    if not replaced:
        assert queued.getsockname() in [c.peer for c in old.conns.values()]  # kept
        assert old.unanswered == 0
        return
    message = chan.receive(old_master_end)
    assert message is not None, "the drained connection was not passed on"
    data, fds = message
    assert data.startswith(MSG_BALANCE)
    pid, passed = chan.parse_balance(data, fds)
    assert pid == WorkerRig.pid_of(2)
    ((fd, passed_lid, _),) = passed
    assert peer_of(fd) == queued.getsockname() and passed_lid == lid
    os.close(fd)
    assert queued.getsockname() not in [c.peer for c in old.conns.values()]
    assert old.unanswered == 2  # it waits for the master's answers (both passes) to exit


def test_a_worker_replaced_by_a_reload_passes_what_it_drains_with_no_peer_named(
    rig: WorkerRig,
) -> None:
    """In a reload every worker of its generation stops too: there is no peer to name, so
    it names none (pid 0) and the master gives the connection to the new generation, which
    serves the same socket. Before, it kept it and answered with Connection: close."""
    old, old_master_end = rig.worker(number=1)
    queued = rig.connect()
    deadline = time.monotonic() + DEADLINE
    while rig.listener.queued() != 1:
        assert time.monotonic() < deadline, "the connection never reached the queue"
    lid = next(iter(old.listener_ids))

    old.begin_stop()
    old.hand_over({lid})
    old.finished()  # drains the queue

    message = chan.receive(old_master_end)
    assert message is not None, "the drained connection was not passed on"
    data, fds = message
    assert data.startswith(MSG_BALANCE)
    pid, passed = chan.parse_balance(data, fds)
    assert pid == 0
    ((fd, passed_lid, _),) = passed
    assert peer_of(fd) == queued.getsockname() and passed_lid == lid
    os.close(fd)
    assert old.unanswered == 1


# --- keep-alive relief: what the master sent a worker that then began a long request


def test_a_worker_in_a_long_request_passes_on_what_the_master_sent_it_meanwhile(
    rig: WorkerRig,
) -> None:
    """The master sent a relieved connection to a worker that was free then, and that
    began a long request before it read its channel (the master cannot see that race). The
    connection waited in the channel, out of reach of relief, for the whole request, and
    died with the worker at workers.timeout. Its relief thread now reads the channel's
    connection messages and passes them on with the parked ones."""
    stuck, stuck_master_end = rig.worker(number=1, keepalive_relief=0.2)
    rig.worker(number=2, keepalive_relief=0.2)  # free: the taker
    client = kept_for(rig, stuck_master_end)
    stuck.slot.busy(b"GET", b"/slow", time.monotonic() - 1.0)  # began before reading it

    assert stuck.relieve(0.2) is not None

    deadline = time.monotonic() + DEADLINE
    while (message := chan.receive(stuck_master_end)) is None:
        assert time.monotonic() < deadline, "nothing was passed on"
    data, fds = message
    assert data.startswith(MSG_RELIEF)  # served: it goes on counting as a keep-alive one
    pid, passed = chan.parse_balance(data, fds)
    assert pid == WorkerRig.pid_of(2)
    ((fd, _, _),) = passed
    assert peer_of(fd) == client.getsockname()
    os.close(fd)
    assert not stuck.conns  # nor an epoll entry: nothing of it stays here
    assert stuck.unanswered == 1


def test_relief_leaves_a_stop_and_what_follows_it_in_the_channel(rig: WorkerRig) -> None:
    """Messages are taken in order, and only those about connections: a stop (or a hand-over)
    is the main thread's, and so is everything after it."""
    stuck, stuck_master_end = rig.worker(number=1, keepalive_relief=0.2)
    rig.worker(number=2, keepalive_relief=0.2)
    stuck_master_end.send(MSG_STOP)
    kept_for(rig, stuck_master_end)
    stuck.slot.busy(b"GET", b"/slow", time.monotonic() - 1.0)

    assert stuck.relieve(0.2) is None  # nothing parked to pass on
    assert chan.receive(stuck_master_end) is None
    assert not stuck.conns
    stuck.slot.done()
    stuck.on_channel()  # the main thread, after its request: the stop first
    assert stuck.stopping
    stuck.on_channel()  # then the connection, which a stopping worker still takes
    assert len(stuck.conns) == 1


def test_relieved_connections_sent_back_still_count_as_served(rig: WorkerRig) -> None:
    """No other worker could take what a busy worker's relief passed: the master sends them
    back (MSG_KEPT_BACK). They are still keep-alive clients between requests: the idle
    deadline is keepalive_timeout's, and a stop hands them over with the others."""
    worker, master_end = rig.worker(number=1, keepalive_relief=0.2, header_timeout=2)
    client = kept_for(rig, master_end, MSG_KEPT_BACK)
    worker.unanswered = 1  # the relief pass it answers

    worker.on_channel()

    conn = conn_of(worker, client)
    assert conn.served == 1
    assert conn.deadline > time.monotonic() + 2  # keepalive_timeout (30), not the head's
    assert worker.unanswered == 0
    (lid,) = worker.listener_ids
    worker.begin_stop()
    worker.hand_over({lid})
    ((fd, _, _),) = receive_conns(master_end)
    assert peer_of(fd) == client.getsockname()
    os.close(fd)
