"""prefork.scoreboard: slot writes seen through read(), slot isolation, clear, and a real fork."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator

import pytest

from prefork.scoreboard import SLOT_SIZE, Activity, Scoreboard, SlotView


@pytest.fixture
def board() -> Iterator[Scoreboard]:
    scoreboard = Scoreboard(8)
    yield scoreboard
    scoreboard.close()


EMPTY = SlotView(Activity.EMPTY, 0.0, 0, "", "", 0, 0, 0)


def test_a_new_scoreboard_is_empty(board: Scoreboard) -> None:
    assert board.capacity == 8
    assert len(board.memory) == 8 * SLOT_SIZE
    assert [board.read(i) for i in range(8)] == [EMPTY] * 8


def test_claim_names_the_worker(board: Scoreboard) -> None:
    board.slot(3).claim(pid=4242, generation=2, number=5)
    expected = SlotView(Activity.BOOTING, 0.0, 0, "", "", 4242, 2, 5)
    assert board.read(3)._replace(last=0.0) == expected
    assert board.read(3).last > 0


def test_busy_done_set_round_trip(board: Scoreboard) -> None:
    slot = board.slot(1)
    slot.claim(100, 1, 2)

    before = time.monotonic()
    slot.busy(b"GET", b"/slow?x=1")
    after = time.monotonic()
    view = board.read(1)
    assert (view.activity, view.method, view.target) == (Activity.BUSY, "GET", "/slow?x=1")
    assert before <= view.started <= after
    assert (view.requests, view.pid, view.generation, view.number) == (0, 100, 1, 2)

    slot.done()
    view = board.read(1)
    assert (view.activity, view.started, view.requests) == (Activity.IDLE, 0.0, 1)
    assert (view.pid, view.generation, view.number) == (100, 1, 2)

    slot.busy(b"POST", b"/upload")
    view = board.read(1)
    assert (view.activity, view.method, view.target, view.requests) == (
        Activity.BUSY,
        "POST",
        "/upload",
        1,  # the count survives a new request
    )
    slot.done()
    assert board.read(1).requests == 2

    slot.set(Activity.DRAINING)
    view = board.read(1)
    assert (view.activity, view.started, view.requests) == (Activity.DRAINING, 0.0, 2)
    assert (view.pid, view.number) == (100, 2)


def test_a_new_request_replaces_the_previous_target(board: Scoreboard) -> None:
    slot = board.slot(0)
    slot.claim(1, 1, 1)
    slot.busy(b"DELETE", b"/a/very/long/previous/target")
    slot.done()
    slot.busy(b"GET", b"/")
    view = board.read(0)
    assert (view.method, view.target) == ("GET", "/")


def test_each_request_names_its_own_client(board: Scoreboard) -> None:
    slot = board.slot(3)
    slot.claim(5, 1, 4)
    longest = b"ffff:ffff:ffff:ffff:ffff:ffff:255.255.255.255"  # 45 characters
    slot.busy(b"GET", b"/a", client=longest)
    assert board.read(3).client == longest.decode()
    slot.done()
    slot.busy(b"GET", b"/b", client=b"10.0.0.1")  # shorter: nothing of the last one left
    assert (board.read(3).target, board.read(3).client) == ("/b", "10.0.0.1")
    slot.busy(b"GET", b"/c")  # a unix socket peer
    assert board.read(3).client == ""
    slot.busy(b"GET", b"/d", client=b"x" * 60)
    assert board.read(3).client == "x" * 48
    assert slot.stop_requested() is False  # the client field ends before the stop byte
    assert board.read(4) == EMPTY


def test_claim_wipes_what_the_previous_worker_left(board: Scoreboard) -> None:
    old = board.slot(2)
    old.claim(10, 1, 3)
    old.busy(b"GET", b"/old", client=b"192.0.2.1")
    board.slot(2).claim(11, 2, 3)
    assert board.read(2)._replace(last=0.0) == SlotView(Activity.BOOTING, 0.0, 0, "", "", 11, 2, 3)


def test_long_fields_are_truncated_within_the_slot(board: Scoreboard) -> None:
    slot = board.slot(4)
    slot.claim(77, 3, 9)
    slot.busy(b"M" * 40, b"/" + b"t" * 500)
    view = board.read(4)
    assert view.method == "M" * 16
    assert view.target == "/" + "t" * 191
    assert (view.pid, view.generation, view.number) == (77, 3, 9)
    assert board.read(5) == EMPTY  # nothing spilled into the next slot


def test_non_ascii_bytes_read_back_as_latin1(board: Scoreboard) -> None:
    slot = board.slot(0)
    slot.busy(b"GET", "/caf\xe9".encode("latin-1"))
    assert board.read(0).target == "/caf\xe9"


def test_slots_are_independent(board: Scoreboard) -> None:
    for i in range(board.capacity):
        board.slot(i).claim(1000 + i, 1, i + 1)
    board.slot(0).busy(b"GET", b"/first")
    board.slot(7).busy(b"PUT", b"/last")

    for i in range(board.capacity):
        view = board.read(i)
        assert (view.pid, view.number) == (1000 + i, i + 1)
    assert board.read(0).target == "/first"
    assert board.read(7).target == "/last"
    assert [board.read(i).activity for i in range(1, 7)] == [Activity.BOOTING] * 6


def test_clear_empties_one_slot(board: Scoreboard) -> None:
    for i in (2, 3, 4):
        board.slot(i).claim(i, 1, i)
        board.slot(i).busy(b"GET", b"/x")
    board.clear(3)
    assert board.read(3) == EMPTY
    assert board.read(2).pid == 2 and board.read(4).pid == 4
    assert board.read(2).activity is Activity.BUSY


@pytest.mark.parametrize("capacity", [1, 3, 16])
def test_capacity(capacity: int) -> None:
    scoreboard = Scoreboard(capacity)
    try:
        assert scoreboard.capacity == capacity
        assert len(scoreboard.memory) == capacity * SLOT_SIZE
        last = scoreboard.slot(capacity - 1)
        last.claim(9, 9, capacity)
        last.busy(b"GET", b"/end")
        assert scoreboard.read(capacity - 1).target == "/end"
    finally:
        scoreboard.close()


def test_a_forked_child_writes_and_the_parent_reads(board: Scoreboard) -> None:
    pid = os.fork()
    if pid == 0:  # the child: write our slot, leave without running any pytest code
        code = 1
        try:
            slot = board.slot(5)
            slot.claim(os.getpid(), 4, 6)
            slot.busy(b"GET", b"/from-child")
            slot.done()
            slot.busy(b"GET", b"/from-child")
            code = 0
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0

    view = board.read(5)
    assert view.activity is Activity.BUSY
    assert (view.pid, view.generation, view.number) == (pid, 4, 6)
    assert (view.method, view.target, view.requests) == ("GET", "/from-child", 1)
    assert view.started > 0
    assert board.read(4) == EMPTY


@pytest.mark.parametrize(
    ("duration", "bucket"),
    [(0.0, 0), (0.0005, 0), (0.001, 0), (0.0011, 1), (0.0025, 1), (0.003, 2), (10.0, 12),
     (10.5, 13), (1e9, 13)],
)
def test_done_counts_the_duration_in_its_bucket(
    board: Scoreboard, duration: float, bucket: int
) -> None:
    """Buckets are upper-inclusive (Prometheus' `le`), the first one included."""
    slot = board.slot(0)
    slot.done(200, duration, 5, now=123.0)
    counters = board.counters(0)
    assert counters.buckets.index(1) == bucket and sum(counters.buckets) == 1
    assert counters.by_class == (0, 1, 0, 0, 0) and counters.bytes_sent == 5
    assert board.read(0).last == 123.0


def test_a_request_left_before_any_response_is_not_in_the_histogram(board: Scoreboard) -> None:
    """The histogram's count is the sum of the status classes: a request whose client
    closed before a response (status 0) is in neither; it still counts for max_requests."""
    slot = board.slot(0)
    slot.done(0, 0.2, 0, now=1.0)
    slot.done(404, 0.2, 9, now=2.0)
    counters = board.counters(0)
    assert sum(counters.buckets) == sum(counters.by_class) == 1
    assert counters.duration_sum == pytest.approx(0.2)
    assert slot.requests == 2


def test_busy_records_the_start_it_is_given(board: Scoreboard) -> None:
    slot = board.slot(0)
    slot.busy(b"GET", b"/", now=42.5)
    view = board.read(0)
    assert view.activity is Activity.BUSY and view.started == 42.5


def test_workers_of_a_generation_see_each_others_connection_counts(board: Scoreboard) -> None:
    me, peer, elsewhere, booting = board.slot(0), board.slot(3), board.slot(5), board.slot(6)
    me.claim(101, 7, 1)
    peer.claim(102, 7, 2)
    elsewhere.claim(103, 6, 1)  # another generation
    booting.claim(104, 7, 3)  # not serving yet
    for slot in (me, peer, elsewhere):
        slot.set(Activity.IDLE)
    assert me.held_by(102, 3 * SLOT_SIZE, time.monotonic()) == 0
    peer.hold(42)
    assert me.peers() == [(102, 3 * SLOT_SIZE)]
    assert me.held_by(102, 3 * SLOT_SIZE, time.monotonic()) == 42
    peer.set(Activity.KEEPALIVE)
    assert me.peers() == [(102, 3 * SLOT_SIZE)]
    started = time.monotonic()
    peer.busy(b"GET", b"/slow", started)
    assert me.held_by(102, 3 * SLOT_SIZE, started + 0.01) == 42  # a request under way
    assert me.held_by(102, 3 * SLOT_SIZE, started + 1.0) is None  # stuck in it: not a taker
    peer.set(Activity.DRAINING)  # stopping: takes nothing new
    assert me.peers() == []
    assert me.held_by(102, 3 * SLOT_SIZE, time.monotonic()) is None
    peer.claim(105, 7, 2)  # the next worker in that slot starts from nothing
    peer.set(Activity.IDLE)
    # not the worker that was looked up
    assert me.held_by(102, 3 * SLOT_SIZE, time.monotonic()) is None
    assert me.held_by(105, 3 * SLOT_SIZE, time.monotonic()) == 0


def test_a_stopping_worker_stays_draining_across_the_requests_it_still_answers(
    board: Scoreboard,
) -> None:
    """Defect: a worker stopping on its own wrote DRAINING, and its next answered request
    wrote KEEPALIVE or IDLE over it: the master and its peers took it for a taker again."""
    me, peer = board.slot(0), board.slot(1)
    me.claim(101, 1, 1)
    peer.claim(102, 1, 2)
    peer.set(Activity.IDLE)
    assert me.peers() == [(102, SLOT_SIZE)]

    peer.stopping()
    peer.busy(b"GET", b"/last")
    assert board.read(1).activity is Activity.BUSY  # the request under way still shows
    peer.done(200, 0.001, 10, Activity.KEEPALIVE)

    assert board.read(1).activity is Activity.DRAINING
    assert me.peers() == []
    assert me.held_by(102, SLOT_SIZE, time.monotonic()) is None
    peer.done()
    assert board.read(1).activity is Activity.DRAINING
    assert board.read(1).requests == 2
