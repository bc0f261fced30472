"""Keep-alive connections passed from a replaced worker to its successor: the channel's wire
format, and the master's part (real SEQPACKET channels and real sockets, a fake kernel)."""

from __future__ import annotations

import os
import signal
import socket
import struct
from collections.abc import Callable, Iterator

import pytest

from prefork import channel as chan
from prefork.addresses import Address
from prefork.admin import metrics_text
from prefork.channel import (
    MSG_BACK,
    MSG_CONNS,
    MSG_FRESH,
    MSG_HAND_OVER,
    MSG_RECYCLE,
    MSG_STOP,
    MSG_TAKEN,
)
from prefork.config import from_mapping
from prefork.master import Generation, WorkerHandle, WorkerState
from prefork.scoreboard import Activity
from prefork.sockets import Listener
from tests.unit.fakes import Rig


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.fixture
def listener() -> Iterator[Listener]:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    host, port = sock.getsockname()
    yield Listener(sock, Address(kind="tcp", host=host, port=port))
    sock.close()


@pytest.fixture
def clients() -> Iterator[list[socket.socket]]:
    """Socket pairs standing in for (server side, client side) of client connections."""
    made: list[socket.socket] = []
    yield made
    for sock in made:
        sock.close()


def connection(clients: list[socket.socket]) -> tuple[socket.socket, socket.socket]:
    server_side, client_side = socket.socketpair()
    client_side.settimeout(5)
    clients += [server_side, client_side]
    return server_side, client_side


def same_connection(received_fd: int, client_side: socket.socket) -> bool:
    """The descriptor that arrived reaches `client_side`: a byte written to it comes out."""
    with socket.socket(fileno=received_fd) as sock:
        sock.sendall(b"x")
    return client_side.recv(1) == b"x"


def test_the_wire_format_carries_descriptors_and_their_listeners(
    clients: list[socket.socket],
) -> None:
    master_end, worker_end = chan.pair()
    with master_end, worker_end:
        a, a_client = connection(clients)
        b, b_client = connection(clients)
        assert chan.send_conns(worker_end, [(a.fileno(), 7, 1.5), (b.fileno(), 9, 2.5)])
        assert chan.send_conns(worker_end, [])  # nothing to send: no message at all
        message = chan.receive(master_end)
        assert message is not None
        data, fds = message
        assert data.startswith(MSG_CONNS)
        pairs = chan.parse_conns(data, fds)
        assert [(listener, deadline) for _, listener, deadline in pairs] == [(7, 1.5), (9, 2.5)]
        assert same_connection(pairs[0][0], a_client)
        assert same_connection(pairs[1][0], b_client)
        assert chan.receive(master_end) is None  # one message per send, nothing left


def test_messages_are_never_merged_and_end_of_stream_is_empty() -> None:
    master_end, worker_end = chan.pair()
    with master_end:
        worker_end.sendall(MSG_STOP)
        worker_end.sendall(MSG_RECYCLE)
        worker_end.close()
        assert chan.receive(master_end) == (MSG_STOP, [])
        assert chan.receive(master_end) == (MSG_RECYCLE, [])
        assert chan.receive(master_end) == (b"", [])


def test_descriptors_without_a_listener_are_marked_for_closing() -> None:
    one = struct.pack("=qd", 7, 3.0)
    assert chan.parse_conns(MSG_CONNS + one + b"\x01", [10, 11]) == [(10, 7, 3.0), (11, -1, 0.0)]


def test_the_hand_over_message_names_the_listeners() -> None:
    assert chan.parse_hand_over(chan.hand_over_message([5, 1 << 40])) == {5, 1 << 40}
    assert chan.parse_hand_over(MSG_HAND_OVER) == set()


def test_a_listener_is_named_by_its_socket_not_its_descriptor_number(
    listener: Listener,
) -> None:
    duplicate = os.dup(listener.fd)
    try:
        assert chan.listener_id(duplicate) == chan.listener_id(listener.fd)
    finally:
        os.close(duplicate)
    with socket.socket() as other:
        assert chan.listener_id(other.fileno()) != chan.listener_id(listener.fd)


def serving(
    make_rig: Callable[..., Rig], listener: Listener, count: int
) -> tuple[Rig, list[WorkerHandle]]:
    """A rig of `count` ready workers whose generation serves `listener`."""
    rig = make_rig(count=count)
    rig.master.current.listeners = [listener]
    return rig, rig.start()


def recycled(rig: Rig, number: int) -> tuple[int, int]:
    """Worker `number` reaches max_requests and its successor boots: (old pid, successor pid)."""
    old = rig.worker(number)
    rig.say([old.pid], MSG_RECYCLE)
    (successor,) = [h for h in rig.in_state(WorkerState.BOOTING) if h.replaces == old.pid]
    rig.boot(successor.pid)
    return old.pid, successor.pid


def test_the_master_passes_connections_to_the_successor_and_keeps_no_copy(
    make_rig: Callable[..., Rig], listener: Listener, clients: list[socket.socket]
) -> None:
    rig, _ = serving(make_rig, listener, 2)
    old, successor = recycled(rig, 1)
    assert rig.kernel.received(old) == chan.hand_over_message([chan.listener_id(listener.fd)])
    # no 'last response' flag: the connections stay open to be passed on
    assert not rig.scoreboard.slot(rig.handle(old).slot).stop_requested()
    kept, kept_client = connection(clients)
    stray, stray_client = connection(clients)  # on a listener the successor does not serve
    before = open_fds()

    lid = chan.listener_id(listener.fd)
    chan.send_conns(
        rig.kernel.children[old], [(kept.fileno(), lid, 1.0), (stray.fileno(), lid + 1, 1.0)]
    )
    kept.close()  # what the old worker does once they are sent
    stray.close()
    rig.tick()

    assert rig.master.handed_over == 1
    assert rig.snapshot()["totals"]["handed_over"] == 1
    assert b"\npreforkd_connections_handed_over_total 1\n" in metrics_text(rig.snapshot())
    message = chan.receive(rig.kernel.children[successor])
    assert message is not None
    data, fds = message
    assert chan.parse_conns(data, fds)[0][1:] == (lid, 1.0)
    assert len(fds) == 1
    assert same_connection(fds[0], kept_client)
    # back to the old worker, which answers a request sent on it meanwhile, else closes it
    assert arrived_fresh(rig, old, stray_client, chan.MSG_KEPT_BACK)
    assert open_fds() == before - 2  # the master holds neither


def test_when_the_successor_just_died_another_serving_worker_takes_them(
    make_rig: Callable[..., Rig], listener: Listener, clients: list[socket.socket]
) -> None:
    rig, _ = serving(make_rig, listener, 2)
    old, successor = recycled(rig, 1)
    (other,) = [h.pid for h in rig.in_state(WorkerState.READY) if h.pid not in (old, successor)]
    rig.kernel.children[successor].close()  # it died; the master has not reaped it yet
    sock, client = connection(clients)
    lid = chan.listener_id(listener.fd)
    before = open_fds()
    rig.master.pass_on(rig.handle(old), [(os.dup(sock.fileno()), lid, 1.0)])

    assert open_fds() == before  # the master's copy is closed
    message = chan.receive(rig.kernel.children[other])
    assert message is not None
    data, fds = message
    assert [conn[1:] for conn in chan.parse_conns(data, fds)] == [(lid, 1.0)]
    assert same_connection(fds[0], client)
    assert rig.master.handed_over == 1


def test_idle_workers_come_first_and_take_turns(make_rig: Callable[..., Rig]) -> None:
    rig = make_rig(count=4)
    source, busy, *idle = rig.start()
    rig.scoreboard.slot(busy.slot).set(Activity.BUSY)
    for handle in idle:
        rig.scoreboard.slot(handle.slot).set(Activity.IDLE)
    orders = [[h.pid for h in rig.master.hand_over_targets(source)] for _ in range(4)]
    assert all(order[-1] == busy.pid for order in orders)
    firsts = [order[0] for order in orders]
    assert sorted(firsts) == sorted([h.pid for h in idle] * 2)
    assert firsts[0] != firsts[1] != firsts[2] != firsts[3]


def balance(
    rig: Rig, listener: Listener, clients: list[socket.socket], sender: int, named: int
) -> socket.socket:
    """Worker `sender` passes a new connection for worker `named`; the master ticks. The
    connection's client side."""
    sock, client = connection(clients)
    conns = [(sock.fileno(), chan.listener_id(listener.fd), 5.0)]
    assert chan.send_conns(rig.kernel.children[sender], conns, chan.balance_head(named))
    rig.tick()
    return client


def arrived_fresh(
    rig: Rig, pid: int, client: socket.socket, head: bytes = MSG_FRESH
) -> bool:
    """Worker `pid` was given the connection of `client`, as a new one (MSG_BACK: its own,
    back)."""
    message = chan.receive(rig.kernel.children[pid])
    if message is None:
        return False
    data, fds = message
    return data.startswith(head) and len(fds) == 1 and same_connection(fds[0], client)


def test_the_master_passes_a_balanced_connection_to_the_worker_named(
    make_rig: Callable[..., Rig], listener: Listener, clients: list[socket.socket]
) -> None:
    rig, (busy, idle) = serving(make_rig, listener, 2)
    sock, client = connection(clients)
    lid = chan.listener_id(listener.fd)
    before = open_fds()
    sent = chan.send_conns(
        rig.kernel.children[busy.pid], [(sock.fileno(), lid, 5.0)], chan.balance_head(idle.pid)
    )
    assert sent
    rig.tick()

    message = chan.receive(rig.kernel.children[idle.pid])
    assert message is not None
    data, fds = message
    assert data.startswith(MSG_FRESH)
    assert [conn[1:] for conn in chan.parse_conns(data, fds)] == [(lid, 5.0)]
    assert same_connection(fds[0], client)
    assert open_fds() == before  # what arrived is closed by same_connection; no master copy
    assert rig.kernel.received(busy.pid) == MSG_TAKEN  # the sender need not wait for it
    assert rig.master.balanced == 1
    assert rig.snapshot()["totals"]["balanced"] == 1
    assert b"\npreforkd_connections_balanced_total 1\n" in metrics_text(rig.snapshot())


def test_the_master_passes_a_relieved_connection_on_as_kept_and_counts_it(
    make_rig: Callable[..., Rig], listener: Listener, clients: list[socket.socket]
) -> None:
    """http.keepalive_relief: a worker inside a long request passes its served keep-alive
    connections as MSG_RELIEF; the worker named gets them as MSG_KEPT (not MSG_FRESH, which
    would make them look never served), and they count as relieved, not balanced."""
    rig, (busy, idle) = serving(make_rig, listener, 2)
    sock, client = connection(clients)
    lid = chan.listener_id(listener.fd)
    sent = chan.send_conns(
        rig.kernel.children[busy.pid],
        [(sock.fileno(), lid, 5.0)],
        chan.balance_head(idle.pid, chan.MSG_RELIEF),
    )
    assert sent
    rig.tick()
    assert arrived_fresh(rig, idle.pid, client, chan.MSG_KEPT)
    assert rig.kernel.received(busy.pid) == MSG_TAKEN
    assert (rig.master.relieved, rig.master.balanced) == (1, 0)
    assert b"\npreforkd_connections_relieved_total 1\n" in metrics_text(rig.snapshot())


@pytest.mark.parametrize("stop", ["asked-by-the-master", "on-its-own"])
def test_a_balanced_connection_the_worker_named_cannot_take_goes_to_another(
    make_rig: Callable[..., Rig], listener: Listener, clients: list[socket.socket], stop: str
) -> None:
    rig, (busy, named, other) = serving(make_rig, listener, 3)
    if stop == "asked-by-the-master":
        rig.master.ask_to_stop(rig.handle(named.pid), "test")  # a stop began meanwhile
    else:
        # a TERM sent to that worker alone: the master still counts it as ready
        rig.scoreboard.slot(named.slot).set(Activity.DRAINING)
    client = balance(rig, listener, clients, busy.pid, named.pid)
    # the stop, if the master asked for it, and nothing after it
    assert rig.kernel.received(named.pid) == (MSG_STOP if stop == "asked-by-the-master" else b"")
    assert arrived_fresh(rig, other.pid, client)
    assert rig.master.balanced == 1
    assert rig.master.hand_over_targets(busy) == [rig.handle(other.pid)]


def test_a_balanced_connection_nobody_else_serves_goes_back_to_its_sender(
    make_rig: Callable[..., Rig], listener: Listener, clients: list[socket.socket]
) -> None:
    rig, (busy,) = serving(make_rig, listener, 1)
    client = balance(rig, listener, clients, busy.pid, 4242)  # that one exited meanwhile
    assert arrived_fresh(rig, busy.pid, client, MSG_BACK)
    assert rig.master.balanced == 0


def test_a_relieved_connection_nobody_else_serves_goes_back_to_its_sender_as_served(
    make_rig: Callable[..., Rig], listener: Listener, clients: list[socket.socket]
) -> None:
    """Back as MSG_BACK, the sender would take its served keep-alive client for one never
    served: a deadline of header_timeout, not keepalive_timeout, and not handed over when
    it stops."""
    rig, (busy,) = serving(make_rig, listener, 1)
    sock, client = connection(clients)
    relieved = [(sock.fileno(), chan.listener_id(listener.fd), 5.0)]
    sent = chan.send_conns(
        rig.kernel.children[busy.pid], relieved, chan.balance_head(4242, chan.MSG_RELIEF)
    )
    assert sent
    rig.tick()
    assert arrived_fresh(rig, busy.pid, client, chan.MSG_KEPT_BACK)
    assert (rig.master.relieved, rig.master.balanced) == (0, 0)


def reloaded(
    make_rig: Callable[..., Rig], listener: Listener, count: int, new_listeners: list[Listener]
) -> tuple[Rig, list[WorkerHandle], WorkerHandle]:
    """A rig of `count` workers on `listener` reloaded to a generation serving
    `new_listeners` whose canary booted: (rig, the old workers, the new worker 1)."""
    config = from_mapping({"app": "tests.unit.fakes:app", "workers": {"count": count}})

    def reloader(current: Generation, held: list[Listener]) -> Generation:
        return Generation(2, config, new_listeners)

    rig = make_rig(count=count, reloader=reloader)
    rig.master.current.listeners = [listener]
    old = rig.start()
    rig.signal(signal.SIGHUP)
    canary = rig.worker(1, generation=2)
    rig.boot(canary.pid)
    assert rig.master.current.number == 2
    return rig, old, canary


def test_what_a_worker_replaced_by_a_reload_drains_goes_to_the_new_generation(
    make_rig: Callable[..., Rig], listener: Listener, clients: list[socket.socket]
) -> None:
    """Defect: the balancing path passed connections only within a generation, so what an
    old worker drained from the shared queue in a reload came back to it (MSG_BACK) and got
    one answer with Connection: close. The new generation serves the same socket: it takes
    them, as it would have accepted them itself."""
    rig, old, canary = reloaded(make_rig, listener, 2, [listener])
    client = balance(rig, listener, clients, old[0].pid, 0)  # pid 0: any taker
    assert arrived_fresh(rig, canary.pid, client)
    assert rig.kernel.received(old[0].pid).endswith(MSG_TAKEN)
    assert rig.master.balanced == 1


def test_what_an_old_worker_drains_from_a_socket_the_reload_dropped_goes_back_to_it(
    make_rig: Callable[..., Rig], listener: Listener, clients: list[socket.socket]
) -> None:
    other = socket.socket()
    other.bind(("127.0.0.1", 0))
    other.listen()
    workers_copy = Listener(listener.sock.dup(), listener.address)  # the master closes its own
    try:
        host, port = other.getsockname()
        rig, old, canary = reloaded(
            make_rig, listener, 1, [Listener(other, Address(kind="tcp", host=host, port=port))]
        )
        # told which sockets the new generation serves (not this one), so its worker keeps
        # what it drains from this one; the master checks too
        assert rig.kernel.received(old[0].pid) == chan.hand_over_message(
            [chan.listener_id(other.fileno())]
        )
        client = balance(rig, workers_copy, clients, old[0].pid, 0)
        assert arrived_fresh(rig, old[0].pid, client, MSG_BACK)
        assert chan.receive(rig.kernel.children[canary.pid]) is None
        assert rig.master.balanced == 0
    finally:
        other.close()
        workers_copy.sock.close()


@pytest.mark.parametrize("why", ["no-other-worker", "stopping"])
def test_a_hand_over_nobody_takes_goes_back_to_its_sender_as_served(
    make_rig: Callable[..., Rig], listener: Listener, clients: list[socket.socket], why: str
) -> None:
    """Defect: the master closed what nobody could take (no other worker serves, or the
    server is stopping: a TERM during a reload's import, which the master read the
    hand-over after), over a request its client had sent while the master had it: reset,
    never answered. Back to the sender, which waits for the answer, the request is
    answered there and the idle ones are closed as in any stop."""
    rig, workers = serving(make_rig, listener, 1 if why == "no-other-worker" else 2)
    source = workers[0]
    lid = chan.listener_id(listener.fd)  # before a stop closes it
    if why == "stopping":
        rig.signal(signal.SIGTERM)
        assert rig.kernel.received(source.pid) == MSG_STOP
    sock, client = connection(clients)
    before = open_fds()
    chan.send_conns(rig.kernel.children[source.pid], [(sock.fileno(), lid, 1.0)])
    sock.close()
    rig.tick()
    assert arrived_fresh(rig, source.pid, client, chan.MSG_KEPT_BACK)
    assert open_fds() == before - 1  # the master holds no copy
    assert rig.master.handed_over == 0


def test_a_hand_over_taken_is_answered(
    make_rig: Callable[..., Rig], listener: Listener, clients: list[socket.socket]
) -> None:
    """The worker that handed its connections over waits for the answer before it exits."""
    rig, (source, taker) = serving(make_rig, listener, 2)
    sock, client = connection(clients)
    lid = chan.listener_id(listener.fd)
    chan.send_conns(rig.kernel.children[source.pid], [(sock.fileno(), lid, 1.0)])
    sock.close()
    rig.tick()
    assert arrived_fresh(rig, taker.pid, client, MSG_CONNS)
    assert rig.kernel.received(source.pid) == MSG_TAKEN


def test_a_graceful_stop_does_not_hand_over(make_rig: Callable[..., Rig]) -> None:
    rig = make_rig(count=2)
    workers = rig.start()
    rig.signal(signal.SIGTERM)
    assert [rig.kernel.received(h.pid) for h in workers] == [MSG_STOP] * 2


def test_hand_over_can_be_turned_off() -> None:
    config = from_mapping(
        {"app": "m:app", "workers": {"count": 2}, "http": {"keepalive_handover": False}}
    )
    rig = Rig(config)
    try:
        rig.start()
        old, _ = recycled(rig, 1)
        assert rig.kernel.received(old) == MSG_STOP
        assert rig.scoreboard.slot(rig.handle(old).slot).stop_requested()
    finally:
        rig.close()


def test_a_stream_server_never_hands_over() -> None:
    config = from_mapping({"app": "m:handler", "protocol": "tcp", "workers": {"count": 2}})
    rig = Rig(config)
    try:
        rig.start()
        old, _ = recycled(rig, 2)
        assert rig.kernel.received(old) == MSG_STOP
    finally:
        rig.close()
