"""prefork.master: one `tick()` at a time against a fake kernel (no fork, no sleep, no signals).

The fakes and their conventions are in fakes.py (shared with test_supervise.py); the
`make_rig` fixture is in conftest.py.
"""

from __future__ import annotations

import gc
import itertools
import logging
import math
import os
import signal
from collections.abc import Callable, Iterator

import pytest

from prefork.channel import (
    MSG_BOOT_ERROR,
    MSG_HAND_OVER,
    MSG_READY,
    MSG_RECYCLE,
    MSG_REOPEN,
    MSG_STOP,
)
from prefork.config import Config, from_mapping
from prefork.master import (
    BACKOFF_FIRST,
    BACKOFF_MAX,
    EXIT_APP_FAILED,
    FAST_STOP_GRACE,
    HEALTHY_AFTER,
    MAX_SLEEP,
    TRANSITIONS,
    YOUNG_DEATH,
    Generation,
    InvalidTransition,
    WorkerHandle,
    WorkerState,
    pool_size,
)
from prefork.sockets import Listener
from prefork.worker import EXIT_APP_LOAD_ERROR, EXIT_BOOT_ERROR
from tests.unit.fakes import Rig, exit_status, make_config, matching, messages

KILLED_BY_SIGKILL = signal.SIGKILL  # waitpid status of a child killed by SIGKILL


pytestmark = pytest.mark.usefixtures("prefork_log_propagates")


# --- startup -------------------------------------------------------------------------------


def test_first_tick_spawns_the_configured_workers(make_rig: Callable[..., Rig]) -> None:
    rig = make_rig(count=3)
    start = rig.kernel.now

    assert rig.tick() is True

    assert rig.kernel.spawned == [1000, 1001, 1002]
    handles = rig.handles()
    assert [h.number for h in handles] == [1, 2, 3]
    assert {h.generation for h in handles} == {1}
    assert all(h.state is WorkerState.BOOTING for h in handles)
    assert all(h.deadline == start + 60.0 for h in handles)  # boot_timeout default
    assert len({h.slot for h in handles}) == 3
    assert rig.kernel.kills == []


def test_workers_are_ready_only_once_they_say_so(
    make_rig: Callable[..., Rig], caplog: pytest.LogCaptureFixture
) -> None:
    rig = make_rig(count=3)
    rig.tick()
    rig.tick()
    assert all(h.state is WorkerState.BOOTING for h in rig.handles())

    rig.boot(1000)
    assert [h.state for h in rig.handles()] == [
        WorkerState.READY,
        WorkerState.BOOTING,
        WorkerState.BOOTING,
    ]
    assert rig.worker(1).deadline == math.inf
    assert matching(caplog, "ready:") == []

    rig.boot(1001, 1002)
    assert all(h.state is WorkerState.READY for h in rig.handles())
    assert matching(caplog, "ready: 3 workers", logging.INFO) == ["ready: 3 workers"]

    for _ in range(3):
        rig.tick()
    assert len(matching(caplog, "ready:")) == 1
    assert rig.kernel.spawned == [1000, 1001, 1002]  # nothing respawned
    assert rig.master.ever_ready


def test_ready_is_reported_when_ttou_completes_the_pool_during_startup(
    make_rig: Callable[..., Rig], caplog: pytest.LogCaptureFixture
) -> None:
    rig = make_rig(count=3)
    rig.tick()
    rig.boot(1000, 1001)

    rig.signal(signal.SIGTTOU)  # worker 3, still booting, is asked to stop

    assert rig.master.ever_ready
    assert matching(caplog, "ready: 2 workers")


def test_a_worker_that_booted_and_exited_within_one_tick_is_not_a_boot_failure(
    make_rig: Callable[..., Rig], caplog: pytest.LogCaptureFixture
) -> None:
    rig = make_rig(count=2, max_requests=1)
    rig.start()
    rig.exit(1001, exit_status(0))  # retired after its one request
    replacement = rig.worker(2)

    rig.kernel.children[replacement.pid].send(MSG_READY)
    rig.kernel.exits.append((replacement.pid, exit_status(0)))  # served one request and left
    rig.tick()

    assert matching(caplog, "failed to boot") == []
    assert rig.worker(2).pid == 1003  # replaced at once, no backoff


def test_a_repeated_ready_message_changes_nothing(make_rig: Callable[..., Rig]) -> None:
    rig = make_rig(count=1)
    rig.start()
    rig.boot(1000)
    assert rig.worker(1).state is WorkerState.READY
    assert rig.kernel.spawned == [1000]


# --- transitions ---------------------------------------------------------------------------

ALL_MOVES = [(a, b) for a in WorkerState for b in WorkerState]


def _handle(state: WorkerState) -> WorkerHandle:
    handle = WorkerHandle(number=1, pid=1000, slot=0, generation=1, channel=None, started=0.0)
    handle.state = state
    return handle


@pytest.mark.parametrize(
    ("start", "end"),
    [m for m in ALL_MOVES if m[1] in TRANSITIONS[m[0]]],
    ids=lambda s: s.name,
)
def test_allowed_transition(start: WorkerState, end: WorkerState) -> None:
    handle = _handle(start)
    handle.to(end, deadline=12.5, reason="because")
    assert handle.state is end
    assert handle.deadline == 12.5
    assert handle.reason == "because"


@pytest.mark.parametrize(
    ("start", "end"),
    [m for m in ALL_MOVES if m[1] not in TRANSITIONS[m[0]]],
    ids=lambda s: s.name,
)
def test_rejected_transition(start: WorkerState, end: WorkerState) -> None:
    handle = _handle(start)
    handle.deadline = 7.0
    with pytest.raises(InvalidTransition, match=f"{start.name} -> {end.name}"):
        handle.to(end, deadline=99.0, reason="nope")
    assert handle.state is start
    assert handle.deadline == 7.0
    assert handle.reason == ""


def test_transition_table_examples() -> None:
    for start, end in [
        (WorkerState.KILLED, WorkerState.READY),
        (WorkerState.STOPPING, WorkerState.READY),
        (WorkerState.READY, WorkerState.BOOTING),
        (WorkerState.ABORTING, WorkerState.STOPPING),
    ]:
        with pytest.raises(InvalidTransition):
            _handle(start).to(end)
    assert set(TRANSITIONS) == set(WorkerState)
    assert TRANSITIONS[WorkerState.KILLED] == frozenset()


def test_a_transition_without_reason_keeps_the_previous_one() -> None:
    handle = _handle(WorkerState.READY)
    handle.to(WorkerState.STOPPING, 5.0, "stopping")
    handle.to(WorkerState.KILLED)
    assert handle.reason == "stopping"
    assert handle.deadline == math.inf


# --- workers that exit ---------------------------------------------------------------------


def test_a_ready_worker_that_exits_is_respawned_with_its_number(
    make_rig: Callable[..., Rig], caplog: pytest.LogCaptureFixture
) -> None:
    rig = make_rig(count=3)
    rig.start()
    old = rig.worker(2)

    rig.exit(old.pid, exit_status(0))

    new = rig.worker(2)
    assert new.pid == 1003 and new.state is WorkerState.BOOTING
    assert new.slot == old.slot  # the freed slot is reused
    assert old.channel is None  # the master closed its end
    assert rig.kernel.spawned == [1000, 1001, 1002, 1003]
    assert matching(caplog, "worker 2 (pid 1001) exited: retired", logging.INFO)
    assert messages(caplog, logging.WARNING) == []


@pytest.mark.parametrize(
    ("status", "how"),
    [(KILLED_BY_SIGKILL, "killed by SIGKILL"), (exit_status(1), "exit code 1")],
)
def test_a_ready_worker_that_dies_is_respawned_with_a_warning(
    make_rig: Callable[..., Rig], caplog: pytest.LogCaptureFixture, status: int, how: str
) -> None:
    rig = make_rig(count=2)
    rig.start()
    rig.kernel.advance(YOUNG_DEATH + 1)  # it had been serving for a while

    rig.exit(1000, status)

    assert rig.worker(1).pid == 1002
    assert rig.worker(2).pid == 1001
    assert matching(caplog, "worker 1 (pid 1000) died unexpectedly", logging.WARNING) == [
        f"worker 1 (pid 1000) died unexpectedly: {how}"
    ]


def test_a_worker_that_dies_right_after_booting_backs_off(
    make_rig: Callable[..., Rig], caplog: pytest.LogCaptureFixture
) -> None:
    """A crash loop after readiness must not spin: a young death is paced like a boot
    failure and counts towards the degraded state."""
    rig = make_rig(count=2)
    rig.start()
    rig.kernel.advance(1.0)

    rig.exit(1000, KILLED_BY_SIGKILL)

    assert [h.number for h in rig.live()] == [2], "respawned at once"
    assert matching(caplog, "died 1.0s after booting", logging.WARNING)
    assert rig.master.boot_failures == 1
    rig.kernel.advance(BACKOFF_FIRST)
    rig.tick()
    assert sorted(h.number for h in rig.live()) == [1, 2]


def test_end_of_file_on_a_channel_closes_it_and_waits_for_the_exit(
    make_rig: Callable[..., Rig],
) -> None:
    rig = make_rig(count=2)
    rig.start()
    rig.kernel.children[1000].close()  # the worker is on its way out

    rig.tick()

    handle = rig.worker(1)
    assert handle.channel is None
    assert handle.state is WorkerState.READY  # not reaped yet: still ours
    assert rig.kernel.spawned == [1000, 1001]

    rig.exit(1000, exit_status(0))
    assert rig.worker(1).pid == 1002


# --- boot failures and backoff -------------------------------------------------------------


def _fail_boot(rig: Rig, number: int) -> WorkerHandle:
    handle = rig.worker(number)
    assert handle.state is WorkerState.BOOTING
    rig.exit(handle.pid, exit_status(EXIT_BOOT_ERROR))
    return handle


def test_a_boot_failure_backs_off_doubling_up_to_the_cap(
    make_rig: Callable[..., Rig], caplog: pytest.LogCaptureFixture
) -> None:
    rig = make_rig(count=2)
    rig.start()
    rig.exit(rig.worker(2).pid, exit_status(0))  # retired; its replacement boots

    delays = []
    for _ in range(9):
        failed = _fail_boot(rig, 2)
        delay = min(BACKOFF_MAX, BACKOFF_FIRST * 2 ** len(delays))
        delays.append(delay)
        assert [h.number for h in rig.live()] == [1]
        assert matching(caplog, f"failed to boot (exit code 3); retrying in {delay:.1f}s")

        failed_at = rig.kernel.now
        rig.kernel.now = failed_at + delay - 0.01
        rig.tick()
        assert [h.number for h in rig.live()] == [1], f"respawned before {delay}s"

        rig.kernel.now = failed_at + delay
        rig.tick()
        assert rig.worker(2).pid != failed.pid
    assert delays == [0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0, 30.0]
    assert rig.kernel.kills == []
    assert not rig.master.stop.value


def test_a_successful_boot_resets_the_backoff(make_rig: Callable[..., Rig]) -> None:
    rig = make_rig(count=2)
    rig.start()
    rig.exit(rig.worker(2).pid, exit_status(0))
    for delay in (0.5, 1.0, 2.0):
        _fail_boot(rig, 2)
        rig.kernel.advance(delay)
        rig.tick()

    rig.boot(rig.worker(2).pid)
    assert rig.worker(2).state is WorkerState.READY
    rig.kernel.advance(HEALTHY_AFTER + 1)  # serving long enough to count as healthy
    rig.tick()
    rig.exit(rig.worker(2).pid, exit_status(0))
    failed = _fail_boot(rig, 2)

    rig.kernel.advance(BACKOFF_FIRST)
    rig.tick()
    assert rig.worker(2).pid != failed.pid


def test_sleep_wakes_up_when_a_backoff_ends(make_rig: Callable[..., Rig]) -> None:
    rig = make_rig(count=2)
    rig.start()
    rig.exit(rig.worker(2).pid, exit_status(0))
    _fail_boot(rig, 2)
    rig.kernel.advance(0.2)

    rig.tick()

    assert rig.kernel.waits[-1] == pytest.approx(BACKOFF_FIRST - 0.2)


# --- the application cannot be loaded ------------------------------------------------------


def test_an_app_load_error_at_startup_stops_the_master(
    make_rig: Callable[..., Rig], caplog: pytest.LogCaptureFixture
) -> None:
    rig = make_rig(count=3)
    rig.tick()
    rig.boot(1000)  # one is up, but the pool never was
    now = rig.kernel.now

    assert rig.exit(1001, exit_status(EXIT_APP_LOAD_ERROR)) is True

    assert rig.master.exit_code == EXIT_APP_FAILED == 3
    assert sorted(rig.kernel.kills) == [(1000, signal.SIGQUIT), (1002, signal.SIGQUIT)]
    assert [(h.number, h.state, h.deadline) for h in rig.handles()] == [
        (1, WorkerState.STOPPING, now + FAST_STOP_GRACE),
        (3, WorkerState.STOPPING, now + FAST_STOP_GRACE),
    ]
    assert matching(caplog, "could not be loaded", logging.ERROR)
    assert rig.kernel.spawned == [1000, 1001, 1002]

    assert rig.exit(1000, exit_status(0)) is True
    assert rig.exit(1002, exit_status(EXIT_APP_LOAD_ERROR)) is False
    assert rig.master.exit_code == 3
    assert rig.kernel.spawned == [1000, 1001, 1002]


def test_an_app_load_error_after_startup_only_backs_off(
    make_rig: Callable[..., Rig],
) -> None:
    rig = make_rig(count=2)
    rig.start()
    rig.exit(1001, exit_status(0))

    rig.exit(rig.worker(2).pid, exit_status(EXIT_APP_LOAD_ERROR))

    assert rig.master.exit_code == 0
    assert not rig.master.stop.value
    assert rig.kernel.kills == []
    assert [h.number for h in rig.live()] == [1]
    rig.kernel.advance(BACKOFF_FIRST)
    rig.tick()
    assert [h.number for h in rig.live()] == [1, 2]


def test_a_boot_error_at_startup_stops_the_server(make_rig: Callable[..., Rig]) -> None:
    """A worker that cannot start before the server was ever ready (a failing post_fork
    hook, a user that cannot be switched to) will not start on the next try either."""
    rig = make_rig(count=2)
    rig.tick()

    rig.exit(1001, exit_status(EXIT_BOOT_ERROR))

    assert rig.master.exit_code == 1
    assert rig.master.stop.value
    assert (1000, signal.SIGQUIT) in rig.kernel.kills


def test_a_worker_killed_while_booting_at_startup_is_retried(
    make_rig: Callable[..., Rig],
) -> None:
    rig = make_rig(count=2)
    rig.tick()

    rig.exit(1001, KILLED_BY_SIGKILL)

    assert rig.master.exit_code == 0
    assert not rig.master.stop.value
    rig.kernel.advance(BACKOFF_FIRST)
    rig.tick()
    assert [h.number for h in rig.live()] == [1, 2]


# --- TERM: graceful stop -------------------------------------------------------------------


def test_term_asks_every_worker_to_finish(
    make_rig: Callable[..., Rig], caplog: pytest.LogCaptureFixture
) -> None:
    rig = make_rig(count=3, graceful_timeout=10)
    rig.start()
    now = rig.kernel.now

    assert rig.signal(signal.SIGTERM) is True

    for pid in (1000, 1001, 1002):
        assert rig.kernel.received(pid) == MSG_STOP
    assert [(h.state, h.deadline) for h in rig.handles()] == [(WorkerState.STOPPING, now + 10)] * 3
    assert rig.kernel.kills == []
    assert matching(caplog, "TERM", logging.INFO)

    assert rig.exit(1000, exit_status(0)) is True
    assert rig.exit(1001, exit_status(0)) is True
    assert rig.tick() is True
    assert rig.exit(1002, exit_status(0)) is False
    assert rig.kernel.spawned == [1000, 1001, 1002]  # nothing respawned
    assert rig.master.exit_code == 0


def test_term_kills_what_is_left_at_the_deadline(
    make_rig: Callable[..., Rig], caplog: pytest.LogCaptureFixture
) -> None:
    rig = make_rig(count=3, graceful_timeout=10)
    rig.start()
    rig.signal(signal.SIGTERM)
    deadline = rig.master.workers[1001].deadline
    rig.exit(1000, exit_status(0))

    rig.kernel.now = deadline - 0.01
    rig.tick()
    assert rig.kernel.kills == []

    rig.kernel.now = deadline
    rig.tick()
    assert sorted(rig.kernel.kills) == [(1001, signal.SIGKILL), (1002, signal.SIGKILL)]
    assert [h.state for h in rig.handles()] == [WorkerState.KILLED] * 2
    assert len(matching(caplog, "killing it", logging.WARNING)) == 2

    rig.kernel.advance(100)
    rig.tick()
    assert len(rig.kernel.kills) == 2  # SIGKILL once
    assert rig.exit(1001, KILLED_BY_SIGKILL) is True
    assert rig.exit(1002, KILLED_BY_SIGKILL) is False
    assert rig.master.exit_code == 0


def test_term_while_booting_stops_the_booting_worker_too(make_rig: Callable[..., Rig]) -> None:
    rig = make_rig(count=2)
    rig.tick()
    rig.boot(1000)

    rig.signal(signal.SIGTERM)
    assert rig.kernel.received(1001) == MSG_STOP
    rig.boot(1001)  # too late: it was told to stop

    assert [h.state for h in rig.handles()] == [WorkerState.STOPPING] * 2
    assert not rig.master.ever_ready
    # no TERM: in a graceful stop a booting worker may be the one to answer what is queued
    assert rig.kernel.kills == []


def test_term_falls_back_to_sigterm_without_a_channel(make_rig: Callable[..., Rig]) -> None:
    rig = make_rig(count=2)
    rig.start()
    rig.kernel.children[1001].close()
    rig.tick()

    rig.signal(signal.SIGTERM)

    assert rig.kernel.kills == [(1001, signal.SIGTERM)]
    assert rig.kernel.received(1000) == MSG_STOP
    assert [h.state for h in rig.handles()] == [WorkerState.STOPPING] * 2


def test_a_second_term_changes_nothing(make_rig: Callable[..., Rig]) -> None:
    rig = make_rig(count=2, graceful_timeout=10)
    rig.start()
    rig.signal(signal.SIGTERM)
    deadlines = [h.deadline for h in rig.handles()]
    rig.kernel.received(1000)

    rig.kernel.advance(1)
    rig.signal(signal.SIGTERM)

    assert [h.deadline for h in rig.handles()] == deadlines
    assert rig.kernel.received(1000) == b""


# --- INT / QUIT: fast stop -----------------------------------------------------------------


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGQUIT], ids=lambda s: s.name)
def test_fast_stop_quits_then_kills(make_rig: Callable[..., Rig], signum: int) -> None:
    rig = make_rig(count=3)
    rig.start()
    now = rig.kernel.now

    assert rig.signal(signum) is True

    assert sorted(rig.kernel.kills) == [(pid, signal.SIGQUIT) for pid in (1000, 1001, 1002)]
    assert [(h.state, h.deadline) for h in rig.handles()] == [
        (WorkerState.STOPPING, now + FAST_STOP_GRACE)
    ] * 3
    assert all(rig.kernel.received(pid) == b"" for pid in (1000, 1001, 1002))

    rig.exit(1000, exit_status(0))
    rig.kernel.now = now + FAST_STOP_GRACE - 0.01
    rig.tick()
    assert rig.kernel.kills_of(signal.SIGKILL) == []

    rig.kernel.now = now + FAST_STOP_GRACE
    rig.tick()
    assert sorted(rig.kernel.kills_of(signal.SIGKILL)) == [1001, 1002]
    assert rig.kernel.spawned == [1000, 1001, 1002]

    assert rig.exit(1001, KILLED_BY_SIGKILL) is True
    assert rig.exit(1002, KILLED_BY_SIGKILL) is False
    assert rig.master.exit_code == 0


def test_quit_after_term_shortens_the_deadline(make_rig: Callable[..., Rig]) -> None:
    rig = make_rig(count=2, graceful_timeout=30)
    rig.start()
    rig.signal(signal.SIGTERM)
    rig.kernel.advance(5)
    now = rig.kernel.now

    rig.signal(signal.SIGQUIT)

    assert sorted(rig.kernel.kills) == [(1000, signal.SIGQUIT), (1001, signal.SIGQUIT)]
    assert [h.deadline for h in rig.handles()] == [now + FAST_STOP_GRACE] * 2
    rig.kernel.advance(FAST_STOP_GRACE)
    rig.tick()
    assert sorted(rig.kernel.kills_of(signal.SIGKILL)) == [1000, 1001]


def test_a_stopped_master_ignores_ttin_ttou_and_hup(make_rig: Callable[..., Rig]) -> None:
    calls: list[Generation] = []

    def reloader(current: Generation, held: list[Listener]) -> Generation:
        calls.append(current)
        return Generation(2, current.config, [])

    rig = make_rig(count=2, reloader=reloader)
    rig.start()
    rig.signal(signal.SIGTERM)

    rig.signal(signal.SIGTTIN, signal.SIGTTOU, signal.SIGHUP)
    rig.exit(1000, exit_status(0))

    assert rig.master.target == 2
    assert calls == []
    assert rig.kernel.spawned == [1000, 1001]
    # but the HUP is answered at once: `preforkd reload` waited for the whole stop before
    assert rig.announce.named("refused") == [
        ("refused", "HUP ignored: the server is stopping")
    ]


# --- TTIN / TTOU ---------------------------------------------------------------------------


def test_ttin_adds_a_worker(make_rig: Callable[..., Rig], caplog: pytest.LogCaptureFixture) -> None:
    rig = make_rig(count=3)
    rig.start()

    rig.signal(signal.SIGTTIN)

    assert rig.master.target == 4
    assert rig.worker(4).pid == 1003
    assert rig.worker(4).state is WorkerState.BOOTING
    assert matching(caplog, "TTIN: 4 workers")


def test_ttin_stops_at_half_the_scoreboard(
    make_rig: Callable[..., Rig], caplog: pytest.LogCaptureFixture
) -> None:
    rig = make_rig(count=3, capacity=8)
    rig.start()

    rig.signal(signal.SIGTTIN, signal.SIGTTIN)

    assert rig.master.target == 4
    assert [h.number for h in rig.live()] == [1, 2, 3, 4]
    assert matching(caplog, "already at the maximum of 4 workers", logging.WARNING)


def test_ttou_retires_the_highest_numbered_worker(
    make_rig: Callable[..., Rig], caplog: pytest.LogCaptureFixture
) -> None:
    rig = make_rig(count=3, graceful_timeout=10)
    rig.start()
    now = rig.kernel.now

    rig.signal(signal.SIGTTOU)

    assert rig.master.target == 2
    assert rig.kernel.received(1002) == MSG_HAND_OVER
    assert rig.kernel.received(1000) == rig.kernel.received(1001) == b""
    third = rig.master.workers[1002]
    assert (third.state, third.deadline) == (WorkerState.STOPPING, now + 10)
    assert matching(caplog, "TTOU: 2 workers")

    rig.exit(1002, exit_status(0))
    rig.tick()
    assert [h.number for h in rig.live()] == [1, 2]
    assert rig.kernel.spawned == [1000, 1001, 1002]


def test_ttou_never_goes_below_one_worker(
    make_rig: Callable[..., Rig], caplog: pytest.LogCaptureFixture
) -> None:
    rig = make_rig(count=1)
    rig.start()

    rig.signal(signal.SIGTTOU)

    assert rig.master.target == 1
    assert rig.kernel.received(1000) == b""
    assert rig.worker(1).state is WorkerState.READY
    assert matching(caplog, "TTOU: already at the minimum of 1 worker", logging.WARNING)


@pytest.mark.parametrize(
    ("signums", "target", "numbers"),
    [
        ([signal.SIGTTIN] * 3, 6, [1, 2, 3, 4, 5, 6]),
        ([signal.SIGTTIN, signal.SIGTTOU, signal.SIGTTIN], 4, [1, 2, 3, 4]),
        ([signal.SIGTTOU, signal.SIGTTOU, signal.SIGTTIN], 2, [1, 2]),
        ([signal.SIGTTIN, signal.SIGTERM, signal.SIGTTIN], 4, []),
        ([signal.SIGCHLD, 0, signal.SIGALRM, signal.SIGTTIN], 4, [1, 2, 3, 4]),
    ],
    ids=["ttin-x3", "in-out-in", "out-out-in", "in-term-in", "ignored-then-ttin"],
)
def test_signals_act_in_arrival_order_and_none_is_lost(
    make_rig: Callable[..., Rig], signums: list[int], target: int, numbers: list[int]
) -> None:
    rig = make_rig(count=3)
    rig.start()

    rig.signal(*signums)

    assert rig.master.target == target
    assert [h.number for h in rig.live()] == numbers


# --- hung workers --------------------------------------------------------------------------


def test_a_hung_worker_is_aborted_then_killed_then_replaced(
    make_rig: Callable[..., Rig], caplog: pytest.LogCaptureFixture
) -> None:
    rig = make_rig(count=2, timeout=30, timeout_grace=2)
    rig.start()
    started = rig.busy(rig.worker(2), client=b"2001:db8::7")

    rig.kernel.now = started + 29.99
    rig.tick()
    assert rig.kernel.kills == []

    rig.kernel.now = started + 30.5
    rig.tick()
    hung = rig.master.workers[1001]
    assert rig.kernel.kills == [(1001, signal.SIGABRT)]
    assert hung.state is WorkerState.ABORTING
    assert hung.deadline == rig.kernel.now + 2
    (line,) = matching(caplog, "timed out", logging.ERROR)
    # the client, as uWSGI's harakiri line names it
    assert "worker 2 (pid 1001) timed out after 30.5s serving GET /slow from 2001:db8::7; " in line

    rig.kernel.now = hung.deadline - 0.01
    rig.tick()
    assert rig.kernel.kills == [(1001, signal.SIGABRT)]

    rig.kernel.now = hung.deadline
    rig.tick()
    assert rig.kernel.kills == [(1001, signal.SIGABRT), (1001, signal.SIGKILL)]
    assert hung.state is WorkerState.KILLED

    rig.exit(1001, KILLED_BY_SIGKILL)
    assert rig.worker(2).pid == 1002
    assert rig.worker(2).state is WorkerState.BOOTING
    assert rig.scoreboard.read(hung.slot).method == ""  # cleared for the next worker
    assert messages(caplog, logging.WARNING) == []
    assert matching(caplog, "worker 2 (pid 1001) exited (timeout): killed by SIGKILL")


def test_timeout_zero_never_kills_a_busy_worker(make_rig: Callable[..., Rig]) -> None:
    """workers.timeout: 0 turns hang detection off (long polling, streaming apps), and the
    master still sleeps its usual second rather than spinning on a zero quarter."""
    rig = make_rig(count=2, timeout=0)
    rig.start()
    started = rig.busy(rig.worker(2))
    rig.kernel.now = started + 86400
    rig.tick()
    assert rig.kernel.kills == []
    assert rig.worker(2).state is WorkerState.READY
    assert rig.kernel.waits[-1] == MAX_SLEEP


def test_a_hung_worker_is_replaced_while_it_is_being_killed(
    make_rig: Callable[..., Rig],
) -> None:
    """Capacity first: the replacement boots while the hung one dumps its stack and dies."""
    rig = make_rig(count=2, timeout=30, timeout_grace=2)
    rig.start()
    started = rig.busy(rig.worker(2))
    rig.kernel.now = started + 30.5
    rig.tick()
    assert rig.master.workers[1001].state is WorkerState.ABORTING
    assert rig.kernel.spawned == [1000, 1001, 1002]
    assert rig.master.workers[1002].number == 2
    assert rig.master.workers[1002].state is WorkerState.BOOTING

    rig.exit(1001, signal.SIGABRT)
    assert rig.kernel.spawned == [1000, 1001, 1002], "replaced twice"


def test_a_hung_worker_without_grace_is_killed_at_once(make_rig: Callable[..., Rig]) -> None:
    rig = make_rig(count=2, timeout=10, timeout_grace=0)
    rig.start()
    started = rig.busy(rig.worker(1), b"POST", b"/upload")

    rig.kernel.now = started + 10.5
    rig.tick()

    assert rig.kernel.kills == [(1000, signal.SIGKILL)]
    assert rig.master.workers[1000].state is WorkerState.KILLED
    rig.exit(1000, KILLED_BY_SIGKILL)
    assert rig.worker(1).pid == 1002


def test_an_idle_worker_never_times_out(make_rig: Callable[..., Rig]) -> None:
    rig = make_rig(count=1, timeout=10)
    rig.start()
    rig.busy(rig.worker(1))
    rig.scoreboard.slot(rig.worker(1).slot).done()

    rig.kernel.advance(1000)
    rig.tick()

    assert rig.kernel.kills == []


def test_a_stopping_worker_that_hangs_is_aborted(make_rig: Callable[..., Rig]) -> None:
    rig = make_rig(count=1, timeout=10, timeout_grace=2, graceful_timeout=60)
    rig.start()
    started = rig.busy(rig.worker(1))
    rig.signal(signal.SIGTERM)

    rig.kernel.now = started + 11
    rig.tick()

    assert rig.kernel.kills == [(1000, signal.SIGABRT)]
    assert rig.master.workers[1000].state is WorkerState.ABORTING


# --- boot timeout --------------------------------------------------------------------------


def test_a_worker_that_does_not_boot_in_time_is_killed(
    make_rig: Callable[..., Rig], caplog: pytest.LogCaptureFixture
) -> None:
    rig = make_rig(count=2, boot_timeout=20)
    rig.tick()
    rig.boot(1000)
    deadline = rig.master.workers[1001].deadline
    assert deadline == rig.master.workers[1001].started + 20

    rig.kernel.now = deadline - 0.01
    rig.tick()
    assert rig.kernel.kills == []

    rig.kernel.now = deadline
    rig.tick()
    assert rig.kernel.kills == [(1001, signal.SIGKILL)]
    assert rig.master.workers[1001].state is WorkerState.KILLED
    assert rig.master.workers[1000].state is WorkerState.READY
    assert matching(caplog, "worker 2 (pid 1001) did not boot within 20s", logging.ERROR)


# --- USR1 ----------------------------------------------------------------------------------


def test_usr1_reopens_the_logs_everywhere(
    make_rig: Callable[..., Rig], caplog: pytest.LogCaptureFixture
) -> None:
    rig = make_rig(count=3)
    rig.start()

    rig.signal(signal.SIGUSR1)

    assert rig.logs.reopened == 1
    assert [rig.kernel.received(pid) for pid in (1000, 1001, 1002)] == [MSG_REOPEN] * 3
    assert all(h.state is WorkerState.READY for h in rig.handles())
    assert matching(caplog, "USR1")


# --- reload (HUP) --------------------------------------------------------------------------


def reload_to(config: Config, numbers: Iterator[int] | None = None):
    """A reloader that builds generation 2, 3, ... with `config`; records its calls."""
    numbers = numbers if numbers is not None else itertools.count(2)
    calls: list[Generation] = []

    def reloader(current: Generation, held: list[Listener]) -> Generation:
        calls.append(current)
        return Generation(next(numbers), config, [])

    reloader.calls = calls  # type: ignore[attr-defined]
    return reloader


def test_reload_boots_a_canary_before_touching_the_old_workers(
    make_rig: Callable[..., Rig], caplog: pytest.LogCaptureFixture
) -> None:
    new_config = make_config(3, timeout=20)
    rig = make_rig(count=3, reloader=reload_to(new_config))
    old = rig.start()

    rig.signal(signal.SIGHUP)

    canary = rig.worker(1, generation=2)
    assert canary.state is WorkerState.BOOTING and canary.pid == 1003
    assert rig.master.current.number == 1
    for _ in range(3):
        rig.kernel.advance(1)
        rig.tick()
    assert rig.kernel.spawned == [1000, 1001, 1002, 1003]  # one canary, no more
    assert all(h.state is WorkerState.READY for h in old)
    assert [rig.kernel.received(h.pid) for h in old] == [b""] * 3
    assert rig.kernel.kills == []

    rig.boot(canary.pid)

    assert rig.master.current.number == 2
    assert rig.master.current.config is new_config
    assert rig.master.pending is None
    assert rig.kernel.received(1000) == MSG_HAND_OVER  # old worker 1 makes way for new worker 1
    assert rig.kernel.received(1001) == rig.kernel.received(1002) == b""
    assert old[0].state is WorkerState.STOPPING
    assert matching(caplog, "generation 2 is serving")


def test_a_second_hup_ends_the_abandoned_canary_at_once(make_rig: Callable[..., Rig]) -> None:
    """The first reload's canary is still booting (importing) when a second HUP abandons
    it: it is sent TERM besides the stop message, which it reads only once ready, so that it
    ends at once (worker_main) instead of finishing an import for nothing."""
    rig = make_rig(count=2, reloader=reload_to(make_config(2)))
    old = rig.start()
    rig.signal(signal.SIGHUP)
    first = rig.worker(1, generation=2)

    rig.signal(signal.SIGHUP)

    assert first.state is WorkerState.STOPPING and first.reason == "reload abandoned"
    assert rig.kernel.received(first.pid) == MSG_STOP
    assert rig.kernel.kills == [(first.pid, signal.SIGTERM)]
    second = rig.worker(1, generation=3)
    assert second.state is WorkerState.BOOTING
    assert [rig.kernel.received(h.pid) for h in old] == [b""] * 2  # the old ones serve on
    rig.exit(first.pid, exit_status(0))
    rig.boot(second.pid)
    assert rig.master.current.number == 3


def test_ttou_ends_a_booting_worker_at_once(make_rig: Callable[..., Rig]) -> None:
    rig = make_rig(count=3)
    rig.tick()
    rig.boot(1000, 1001)

    rig.signal(signal.SIGTTOU)  # worker 3, still booting

    assert rig.kernel.received(1002) == MSG_HAND_OVER
    assert rig.kernel.kills == [(1002, signal.SIGTERM)]
    assert rig.kernel.received(1000) == rig.kernel.received(1001) == b""


def test_a_recycle_queued_before_a_reload_starts_no_second_worker_of_its_number(
    make_rig: Callable[..., Rig],
) -> None:
    """DEFECT (the churn soak's pool stuck at 3 of 2). Worker 2's successor asked to be
    replaced (max_requests) while its predecessor still stopped (max_recycling 1), so it
    waited in the recycle queue; a reload then took over, and its roll-out started the new
    generation's worker 2. When the predecessor exited, the queue started a successor for
    the outdated worker 2 as well -- in the new generation, with number 2 again: two
    workers 2 for good, a pool one over its size that nothing shrank. A reload replaces an
    outdated worker anyway: the queue now skips it."""
    rig = make_rig(count=2, reloader=reload_to(make_config(2)))
    rig.start()
    rig.say([1001], MSG_RECYCLE)  # worker 2 reaches max_requests
    assert rig.handle(1002).replaces == 1001
    rig.boot(1002)  # worker 1001 hands over, stopping
    rig.say([1002], MSG_RECYCLE)  # queued: 1001 is still being replaced
    assert rig.kernel.spawned == [1000, 1001, 1002]

    rig.signal(signal.SIGHUP)
    rig.boot(rig.worker(1, generation=2).pid)  # generation 2 serves; its worker 2 boots
    rig.exit(1001, exit_status(0))  # meanwhile the recycled predecessor is gone
    for _ in range(3):
        rig.boot_all()
        for handle in rig.in_state(WorkerState.STOPPING):
            rig.exit(handle.pid, exit_status(0))

    assert [h.number for h in rig.live()] == [1, 2]
    assert {h.generation for h in rig.live()} == {2}


def test_reload_replaces_the_old_workers_one_at_a_time(make_rig: Callable[..., Rig]) -> None:
    rig = make_rig(count=3, reloader=reload_to(make_config(3)))
    old = rig.start()
    rig.signal(signal.SIGHUP)

    rounds = 0
    while rig.live(generation=1):
        booting = [h for h in rig.live(generation=2) if h.state is WorkerState.BOOTING]
        assert len(booting) <= 1, "more than one new worker booting during a roll"
        assert booting, "the roll stalled"
        # an old worker is retired only once its replacement serves
        assert len(rig.live(1)) + len([h for h in rig.live(2) if h.state is WorkerState.READY]) >= 3
        rig.boot(booting[0].pid)
        rounds += 1
        assert rounds <= 3

    assert [(h.number, h.state) for h in rig.live(generation=2)] == [
        (1, WorkerState.READY),
        (2, WorkerState.READY),
        (3, WorkerState.READY),
    ]
    assert [rig.kernel.received(h.pid) for h in old] == [MSG_HAND_OVER] * 3
    assert all(h.state is WorkerState.STOPPING for h in old)

    for h in old:
        rig.exit(h.pid, exit_status(0))
    assert rig.handles() == rig.live(generation=2)
    assert len(rig.kernel.spawned) == 6  # 3 old, 3 new, nothing else
    assert rig.kernel.kills == []


def test_reload_to_fewer_workers_retires_the_extra_old_ones(make_rig: Callable[..., Rig]) -> None:
    rig = make_rig(count=3, reloader=reload_to(make_config(2)))
    old = rig.start()
    rig.signal(signal.SIGHUP)
    assert rig.master.target == 3  # until the canary is ready, nothing old stops
    assert all(h.state is WorkerState.READY for h in old)

    for _ in range(2):
        (booting,) = [h for h in rig.live(2) if h.state is WorkerState.BOOTING]
        rig.boot(booting.pid)

    assert [h.number for h in rig.live(2)] == [1, 2]
    assert rig.live(1) == []
    assert all(h.state is WorkerState.STOPPING for h in old)
    assert len(rig.kernel.spawned) == 5


def test_a_reloader_that_raises_changes_nothing(
    make_rig: Callable[..., Rig], caplog: pytest.LogCaptureFixture
) -> None:
    def reloader(current: Generation, held: list[Listener]) -> Generation:
        raise ValueError("bad yaml")

    rig = make_rig(count=2, reloader=reloader)
    old = rig.start()

    rig.signal(signal.SIGHUP)
    rig.tick()

    assert matching(caplog, "reload failed: bad yaml", logging.ERROR)
    assert rig.master.pending is None and rig.master.current.number == 1
    assert rig.kernel.spawned == [1000, 1001]
    assert rig.kernel.kills == []
    assert [rig.kernel.received(h.pid) for h in old] == [b""] * 2
    assert all(h.state is WorkerState.READY for h in old)


class SendsTerm:
    """A garbage cycle whose finalizer sends this process TERM: what the collector runs
    when a stop arrives during a collection."""

    def __init__(self) -> None:
        self.me = self

    def __del__(self) -> None:
        os.kill(os.getpid(), signal.SIGTERM)


def test_a_stop_during_the_reloads_collection_abandons_it(
    make_rig: Callable[..., Rig], caplog: pytest.LogCaptureFixture
) -> None:
    """DEFECT. A reload collects garbage before it imports. A TERM arriving then was mostly
    handled inside a finalizer the collection ran, where the Stopped it raises is printed
    and dropped ("Exception ignored in"): the reload went on to import, as long as the
    first import took, and the stop waited for it. The stop signals are held over the
    collection now, and raised after it."""
    imported: list[int] = []

    def reloader(current: Generation, held: list[Listener]) -> Generation:
        imported.append(1)
        return Generation(0, make_config(2), [])

    rig = make_rig(count=2, reloader=reloader)
    rig.start()
    gc.disable()  # only the reload's own collection may run the finalizer (stops_raise set)
    try:
        SendsTerm()
        rig.signal(signal.SIGHUP)
    finally:
        gc.enable()

    assert imported == []
    assert matching(caplog, "reload abandoned: SIGTERM arrived while it loaded", logging.WARNING)
    assert rig.master.stop.name == "GRACEFUL"


def test_hup_without_a_reloader_is_ignored(make_rig: Callable[..., Rig]) -> None:
    rig = make_rig(count=2)
    rig.start()
    rig.signal(signal.SIGHUP)
    assert rig.kernel.spawned == [1000, 1001]
    assert rig.master.pending is None


def fail_a_reload(rig: Rig) -> None:
    """HUP, then the canary cannot import the app; a few ticks for the master to give up."""
    rig.signal(signal.SIGHUP)
    canary = rig.worker(1, generation=2)
    rig.exit(canary.pid, exit_status(EXIT_APP_LOAD_ERROR))
    for _ in range(3):
        rig.kernel.advance(1)
        rig.tick()


def test_a_canary_that_cannot_boot_fails_the_reload(
    make_rig: Callable[..., Rig], caplog: pytest.LogCaptureFixture
) -> None:
    rig = make_rig(count=2, reloader=reload_to(make_config(2)))
    old = rig.start()
    fail_a_reload(rig)

    assert matching(caplog, "reload failed", logging.ERROR)
    assert matching(caplog, "still serving generation 1")
    assert rig.master.current.number == 1 and rig.master.pending is None
    assert rig.master.exit_code == 0 and not rig.master.stop.value
    assert rig.handles() == old
    assert all(h.state is WorkerState.READY for h in old)
    assert [rig.kernel.received(h.pid) for h in old] == [b""] * 2
    assert rig.kernel.kills == []
    assert rig.kernel.spawned == [1000, 1001, 1002]  # no second canary


def test_the_replaced_generations_imports_are_released_once_none_can_come_back(
    make_rig: Callable[..., Rig],
) -> None:
    """What a reload's predecessors imported (a preloaded application, the hooks) is let go
    (Startup.release_imports) once no generation can put it back: at the promotion, and
    when the last pending reload is abandoned; not while a canary may still fail, nor when
    a second HUP abandons the first canary for a third generation that may fail too."""
    rig = make_rig(count=2, reloader=reload_to(make_config(2)))
    released: list[int] = []
    rig.master.release_imports = lambda: released.append(rig.master.current.number)
    rig.start()

    rig.signal(signal.SIGHUP)
    rig.signal(signal.SIGHUP)  # abandons generation 2's canary for generation 3's
    assert released == []
    rig.boot(rig.worker(1, generation=3).pid)
    assert rig.master.current.number == 3
    assert released == [3]

    rig.signal(signal.SIGHUP)
    rig.exit(rig.worker(1, generation=4).pid, exit_status(EXIT_APP_LOAD_ERROR))
    for _ in range(3):
        rig.kernel.advance(1)
        rig.tick()
    assert rig.master.current.number == 3 and rig.master.pending is None
    assert released == [3, 3]


def test_term_during_a_reload_stops_the_canary_too(make_rig: Callable[..., Rig]) -> None:
    rig = make_rig(count=2, reloader=reload_to(make_config(2)))
    rig.start()
    rig.signal(signal.SIGHUP)
    canary = rig.worker(1, generation=2)

    rig.signal(signal.SIGTERM)

    assert rig.master.pending is None
    assert [rig.kernel.received(pid) for pid in (1000, 1001, canary.pid)] == [MSG_STOP] * 3
    assert all(h.state is WorkerState.STOPPING for h in rig.handles())
    rig.boot(canary.pid)  # too late
    assert rig.master.current.number == 1
    assert rig.exit(1000, exit_status(0)) is True
    assert rig.exit(canary.pid, exit_status(0)) is True
    assert rig.exit(1001, exit_status(0)) is False
    assert rig.kernel.spawned == [1000, 1001, canary.pid]


def test_a_second_hup_during_the_canary_replaces_it(make_rig: Callable[..., Rig]) -> None:
    rig = make_rig(count=2, reloader=reload_to(make_config(2)))
    rig.start()
    rig.signal(signal.SIGHUP)
    first = rig.worker(1, generation=2)

    rig.signal(signal.SIGHUP)

    assert rig.kernel.received(first.pid) == MSG_STOP
    assert first.state is WorkerState.STOPPING
    assert rig.worker(1, generation=3).state is WorkerState.BOOTING
    assert rig.master.current.number == 1
    assert rig.live(1) and all(h.state is WorkerState.READY for h in rig.live(1))


def test_ttin_survives_a_reload_that_keeps_the_worker_count(
    make_rig: Callable[..., Rig],
) -> None:
    rig = make_rig(count=3, reloader=reload_to(make_config(3)))
    rig.start()
    rig.signal(signal.SIGTTIN)
    rig.boot(rig.worker(4).pid)

    rig.signal(signal.SIGHUP)
    assert rig.master.target == 4
    while rig.live(1):
        (booting,) = [h for h in rig.live(2) if h.state is WorkerState.BOOTING]
        rig.boot(booting.pid)

    assert [h.number for h in rig.live(2)] == [1, 2, 3, 4]


def test_a_reload_that_changes_the_worker_count_sets_the_target(
    make_rig: Callable[..., Rig],
) -> None:
    rig = make_rig(count=3, reloader=reload_to(make_config(5)))
    rig.start()
    rig.signal(signal.SIGTTIN)

    rig.signal(signal.SIGHUP)
    assert rig.master.target == 4  # the old generation keeps its workers until the canary
    rig.boot(rig.worker(1, generation=2).pid)

    assert rig.master.target == 5


@pytest.mark.parametrize("count", [1, 4], ids=["fewer", "more"])
def test_a_failed_reload_leaves_the_old_generation_its_workers(
    make_rig: Callable[..., Rig], count: int
) -> None:
    """Defect: the new count was applied at HUP, so a reload whose canary then failed had
    already stopped (or added) workers of the old generation, for good."""
    rig = make_rig(count=2, reloader=reload_to(make_config(count)))
    old = rig.start()
    fail_a_reload(rig)

    assert rig.master.pending is None and rig.master.current.number == 1
    assert rig.master.target == 2
    assert rig.live(1) == old and all(h.state is WorkerState.READY for h in old)
    assert [rig.kernel.received(h.pid) for h in old] == [b""] * 2


def test_a_reload_to_a_fixed_pool_ends_the_dynamic_growth(
    make_rig: Callable[..., Rig],
) -> None:
    rig = make_rig(count=2, reloader=reload_to(make_config(2)), max=8)
    rig.start()
    rig.master.target = 6  # grown by the spare-server rule
    rig.signal(signal.SIGHUP)
    rig.boot(rig.worker(1, generation=2).pid)

    assert rig.master.target == 2


def test_pool_size_after_a_reload() -> None:
    fixed, dynamic = make_config(2), make_config(2, max=8)
    assert pool_size(fixed, make_config(3), 5) == 3  # the count changed: the new count
    assert pool_size(fixed, fixed, 5) == 5  # TTIN/TTOU survive a reload
    assert pool_size(dynamic, fixed, 6) == 2  # no longer dynamic
    assert pool_size(dynamic, dynamic, 6) == 6
    assert pool_size(dynamic, make_config(2, max=4), 6) == 4  # within the new bounds
    assert pool_size(fixed, dynamic, 1) == 2


def test_every_reload_rolls_even_when_the_reloader_reuses_a_generation_number(
    make_rig: Callable[..., Rig],
) -> None:
    """prefork.cli.reloader returns Generation(0, ...) every time; the master is what has to
    tell generations apart, so the second HUP must roll the pool just like the first."""
    rig = make_rig(count=2, reloader=reload_to(make_config(2), itertools.repeat(0)))
    rig.start()

    for round_ in range(2):
        before = {h.pid for h in rig.live()}
        rig.signal(signal.SIGHUP)
        for _ in range(2):
            booting = [
                h for h in rig.live() if h.state is WorkerState.BOOTING and h.pid not in before
            ]
            assert len(booting) == 1, f"reload {round_ + 1}: no new worker boots"
            rig.boot(booting[0].pid)
        assert {h.pid for h in rig.live()}.isdisjoint(before), f"reload {round_ + 1}"
        for h in list(rig.handles()):
            if h.state is WorkerState.STOPPING:
                rig.exit(h.pid, exit_status(0))


def test_a_worker_that_dies_during_a_reload_is_replaced(make_rig: Callable[..., Rig]) -> None:
    rig = make_rig(count=3, reloader=reload_to(make_config(3)))
    rig.start()
    rig.kernel.advance(YOUNG_DEATH + 1)
    rig.signal(signal.SIGHUP)  # the canary boots (for up to boot_timeout)

    rig.exit(1001, KILLED_BY_SIGKILL)

    assert len(rig.live(1)) + len(rig.live(2)) == 4, "the pool shrank while the canary boots"
    assert 2 in [h.number for h in rig.live(1)]


def test_a_canary_killed_for_its_boot_timeout_fails_the_reload(
    make_rig: Callable[..., Rig], caplog: pytest.LogCaptureFixture
) -> None:
    rig = make_rig(count=2, reloader=reload_to(make_config(2, boot_timeout=5)))
    rig.start()
    rig.signal(signal.SIGHUP)
    canary = rig.worker(1, generation=2)

    rig.kernel.advance(5)
    rig.tick()
    assert rig.kernel.kills == [(canary.pid, signal.SIGKILL)]
    rig.exit(canary.pid, KILLED_BY_SIGKILL)

    assert rig.master.pending is None
    assert rig.master.current.number == 1
    assert rig.live(2) == [], "a new canary was started"
    assert matching(caplog, "reload failed", logging.ERROR)
    assert not rig.master.reloading
    assert rig.announce.named("reloaded")[-1][1] is False


def test_the_boot_timeout_log_names_the_workers_own_timeout(
    make_rig: Callable[..., Rig], caplog: pytest.LogCaptureFixture
) -> None:
    rig = make_rig(count=1, boot_timeout=60, reloader=reload_to(make_config(1, boot_timeout=5)))
    rig.start()
    rig.signal(signal.SIGHUP)
    canary = rig.worker(1, generation=2)

    rig.kernel.advance(5)
    rig.tick()

    assert rig.kernel.kills == [(canary.pid, signal.SIGKILL)]
    assert matching(caplog, f"worker 1 (pid {canary.pid}) did not boot within 5s", logging.ERROR)


# --- sleep ---------------------------------------------------------------------------------


def test_sleep_is_capped_at_max_sleep(make_rig: Callable[..., Rig]) -> None:
    rig = make_rig(count=2, timeout=30)
    rig.tick()
    assert rig.kernel.waits == [MAX_SLEEP]  # nothing else to wait for yet
    rig.start()
    assert rig.kernel.waits[-1] == MAX_SLEEP == 1.0


def test_sleep_is_capped_at_a_quarter_of_the_timeout(make_rig: Callable[..., Rig]) -> None:
    rig = make_rig(count=2, timeout=2)
    rig.start()
    rig.tick()
    assert rig.kernel.waits[-1] == 0.5


def test_sleep_ends_at_the_nearest_deadline(make_rig: Callable[..., Rig]) -> None:
    rig = make_rig(count=2, boot_timeout=0.3)
    rig.tick()
    rig.tick()
    assert rig.kernel.waits[-1] == pytest.approx(0.3)
    rig.kernel.advance(0.1)
    rig.tick()
    assert rig.kernel.waits[-1] == pytest.approx(0.2)


def test_sleep_ends_at_a_graceful_deadline(make_rig: Callable[..., Rig]) -> None:
    rig = make_rig(count=2, graceful_timeout=0.25)
    rig.start()
    rig.signal(signal.SIGTERM)
    rig.tick()
    assert rig.kernel.waits[-1] == pytest.approx(0.25)


def test_sleep_ends_at_an_abort_deadline(make_rig: Callable[..., Rig]) -> None:
    rig = make_rig(count=1, timeout=10, timeout_grace=0.4)
    rig.start()
    started = rig.busy(rig.worker(1))
    rig.kernel.now = started + 11
    rig.tick()
    rig.tick()
    assert rig.kernel.waits[-1] == pytest.approx(0.4)


def test_sleep_watches_the_signals_and_every_channel(make_rig: Callable[..., Rig]) -> None:
    rig = make_rig(count=2)
    rig.start()
    seen: list[list[int]] = []
    wait = rig.kernel.wait

    def spy(fds: list[int], timeout: float) -> list[int]:
        seen.append(list(fds))
        return wait(fds, timeout)

    rig.kernel.wait = spy  # type: ignore[method-assign]
    rig.tick()
    channels = [h.channel.fileno() for h in rig.handles() if h.channel is not None]
    assert sorted(seen[0]) == sorted([rig.signals.fileno(), *channels])


# --- scoreboard slots ----------------------------------------------------------------------


def test_slots_are_never_handed_out_twice_and_come_back(make_rig: Callable[..., Rig]) -> None:
    rig = make_rig(count=4, capacity=8)
    rig.start()
    assert sorted(h.slot for h in rig.handles()) == [0, 1, 2, 3]
    for _ in range(10):
        rig.exit(rig.worker(3).pid, exit_status(0))
        rig.boot(rig.worker(3).pid)
        slots = [h.slot for h in rig.handles()]
        assert len(set(slots)) == len(slots)
    assert len(rig.master.free_slots) == 4


def test_resizing_faster_than_workers_exit_does_not_crash_the_master(
    make_rig: Callable[..., Rig],
) -> None:
    """Workers told to stop keep their slot until they are reaped (up to graceful_timeout);
    TTOU/TTIN in quick succession must not exhaust the scoreboard and kill the master."""
    rig = make_rig(count=4, capacity=8, graceful_timeout=30)
    rig.start()

    for _ in range(3):
        rig.signal(signal.SIGTTOU, signal.SIGTTOU, signal.SIGTTOU)
        rig.signal(signal.SIGTTIN, signal.SIGTTIN, signal.SIGTTIN)
        rig.boot_all()

    slots = [h.slot for h in rig.handles()]
    assert len(set(slots)) == len(slots) <= 8


# --- what the master announces (systemd notify, daemon launcher, reload status) ---------------

IMPORT_ERROR = "No module named 'm'"


def test_ready_is_announced_once_the_pool_is_up(make_rig: Callable[..., Rig]) -> None:
    rig = make_rig(count=2)
    rig.tick()
    rig.boot(1000)
    assert rig.announce.calls == []

    rig.boot(1001)
    rig.exit(1001, exit_status(0))
    rig.boot(rig.worker(2).pid)

    assert rig.announce.calls == [("ready", "2 workers ready")]


def test_stopping_is_announced_once(make_rig: Callable[..., Rig]) -> None:
    rig = make_rig(count=2)
    rig.start()
    rig.signal(signal.SIGTERM)
    rig.signal(signal.SIGTERM)
    rig.signal(signal.SIGQUIT)
    assert rig.announce.named("stopping") == [("stopping",)]


def test_a_reload_is_announced_done_when_the_last_old_worker_is_replaced(
    make_rig: Callable[..., Rig],
) -> None:
    rig = make_rig(count=2, reloader=reload_to(make_config(2)))
    rig.start()
    rig.announce.calls.clear()

    rig.signal(signal.SIGHUP)
    assert rig.announce.calls == [("reloading",)]
    rig.boot(rig.worker(1, generation=2).pid)  # the canary: generation 2 serves
    assert rig.announce.named("reloaded") == []
    assert rig.master.reloading

    rig.boot(rig.worker(2, generation=2).pid)

    assert rig.announce.named("reloaded") == [
        ("reloaded", True, "reloaded: generation 2 serving with 2 workers")
    ]
    assert not rig.master.reloading
    rig.tick()
    assert len(rig.announce.named("reloaded")) == 1


def test_a_reloader_error_is_announced(make_rig: Callable[..., Rig]) -> None:
    def reloader(current: Generation, held: list[Listener]) -> Generation:
        raise ValueError("bad yaml")

    rig = make_rig(count=1, reloader=reloader)
    rig.start()
    rig.signal(signal.SIGHUP)
    assert rig.announce.calls[-2:] == [
        ("reloading",),
        ("reloaded", False, "reload failed: bad yaml; still serving generation 1"),
    ]
    assert not rig.master.reloading


def test_a_failed_canary_is_announced_with_its_error(
    make_rig: Callable[..., Rig], caplog: pytest.LogCaptureFixture
) -> None:
    rig = make_rig(count=2, reloader=reload_to(make_config(2)))
    rig.start()
    rig.signal(signal.SIGHUP)
    canary = rig.worker(1, generation=2)

    rig.kernel.children[canary.pid].send(MSG_BOOT_ERROR + IMPORT_ERROR.encode())
    rig.tick()
    rig.exit(canary.pid, exit_status(EXIT_APP_LOAD_ERROR))

    ((_, ok, message),) = rig.announce.named("reloaded")
    assert not ok
    assert IMPORT_ERROR in message and "still serving generation 1" in message
    assert matching(caplog, IMPORT_ERROR, logging.ERROR)
    assert not rig.master.reloading


def test_a_boot_error_sent_just_before_the_exit_is_not_lost(
    make_rig: Callable[..., Rig],
) -> None:
    rig = make_rig(count=2, reloader=reload_to(make_config(2)))
    rig.start()
    rig.signal(signal.SIGHUP)
    canary = rig.worker(1, generation=2)

    rig.kernel.children[canary.pid].send(MSG_BOOT_ERROR + IMPORT_ERROR.encode())
    rig.exit(canary.pid, exit_status(EXIT_APP_LOAD_ERROR))

    ((_, ok, message),) = rig.announce.named("reloaded")
    assert IMPORT_ERROR in message


def test_an_app_load_error_at_startup_records_why(make_rig: Callable[..., Rig]) -> None:
    rig = make_rig(count=2)
    rig.tick()
    rig.kernel.children[1000].send(MSG_BOOT_ERROR + b"Traceback...\n" + IMPORT_ERROR.encode())
    rig.tick()

    rig.exit(1000, exit_status(EXIT_APP_LOAD_ERROR))

    assert rig.master.exit_code == EXIT_APP_FAILED
    assert rig.master.failure == f"the application could not be loaded: {IMPORT_ERROR}"
    assert rig.announce.named("stopping") == [("stopping",)]
    assert rig.announce.named("ready") == []


def test_the_watchdog_is_fed_on_its_interval(make_rig: Callable[..., Rig]) -> None:
    rig = make_rig(count=1, watchdog_interval=5.0)
    rig.tick()
    assert rig.announce.named("watchdog") == [("watchdog",)]
    fed_at = rig.kernel.now

    rig.kernel.now = fed_at + 4.99
    rig.tick()
    assert len(rig.announce.named("watchdog")) == 1

    rig.kernel.now = fed_at + 5
    rig.tick()
    assert len(rig.announce.named("watchdog")) == 2


def test_sleep_wakes_up_for_the_watchdog(make_rig: Callable[..., Rig]) -> None:
    rig = make_rig(count=1, watchdog_interval=0.3)
    rig.start()
    rig.kernel.advance(0.1)
    due = rig.master.next_watchdog
    rig.tick()
    assert rig.kernel.waits[-1] == pytest.approx(due - rig.kernel.now)
    fed = len(rig.announce.named("watchdog"))
    rig.kernel.now = due
    rig.tick()
    assert len(rig.announce.named("watchdog")) == fed + 1


def test_without_a_watchdog_nothing_is_fed(make_rig: Callable[..., Rig]) -> None:
    rig = make_rig(count=1)
    rig.start()
    rig.kernel.advance(100)
    rig.tick()
    assert rig.announce.named("watchdog") == []
    assert rig.kernel.waits[-1] == MAX_SLEEP


def test_nworkers_changed_hears_every_change_of_the_pool_size(
    make_rig: Callable[..., Rig],
) -> None:
    rig = make_rig(count=2, reloader=reload_to(make_config(4)))
    heard: list[tuple[int, int, int]] = []
    rig.master.current.hooks.functions["nworkers_changed"] = (
        lambda server, new, old: heard.append((server.generation, new, old))
    )
    rig.start()
    rig.signal(signal.SIGTTIN)
    rig.signal(signal.SIGTTOU, signal.SIGTTOU)
    rig.signal(signal.SIGTTOU)  # never below one: no change, nothing heard
    rig.boot_all()
    rig.signal(signal.SIGWINCH)
    rig.signal(signal.SIGHUP)  # the pool comes back, then the reload to 4 takes over
    rig.master.pending.hooks = rig.master.current.hooks  # type: ignore[union-attr]
    rig.boot_all()
    assert heard == [(1, 3, 2), (1, 2, 3), (1, 1, 2), (1, 0, 1), (1, 1, 0), (2, 4, 1)]


@pytest.mark.parametrize(
    ("settings", "termed"),
    [({"protocol": "tcp", "stream": {"eof_on_stop": True}}, True),
     ({"protocol": "tcp"}, False),
     ({"stream": {"eof_on_stop": True}}, False)],  # http: the option is a stream handler's
)
def test_a_graceful_stop_adds_term_for_stream_handlers_with_eof_on_stop(
    settings: dict[str, object], termed: bool
) -> None:
    rig = Rig(from_mapping({"app": "m:app", "workers": {"count": 2}, **settings}))
    try:
        workers = rig.start()
        rig.signal(signal.SIGTERM)
        for handle in workers:
            assert rig.kernel.received(handle.pid) == MSG_STOP
        expected = sorted(h.pid for h in workers) if termed else []
        assert sorted(rig.kernel.kills_of(signal.SIGTERM)) == expected
    finally:
        rig.close()
