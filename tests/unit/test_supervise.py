"""The master's supervision policies against a fake kernel (no fork, no sleep, no signals):
the max_recycling hand-off, memory limits, the dynamic pool, crash-loop protection, and what
prefork.status reports about all of it.

The fakes and their conventions are in fakes.py (shared with test_master.py); scoreboard
slots are written with the worker's own Slot methods.
"""

from __future__ import annotations

import json
import logging
import signal
import socket
from collections.abc import Callable
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from prefork import status
from prefork.addresses import parse_address
from prefork.admin import status_table
from prefork.channel import MSG_HAND_OVER, MSG_RECYCLE, MSG_STOP
from prefork.config import jitter_share
from prefork.master import (
    BACKOFF_FIRST,
    YOUNG_DEATH,
    Generation,
    Stop,
    WorkerHandle,
    WorkerState,
)
from prefork.scoreboard import Activity
from prefork.sockets import Listener
from prefork.worker import EXIT_APP_LOAD_ERROR, max_requests_for
from tests.unit.fakes import Rig, exit_status, make_config, matching

MIB = 1 << 20


pytestmark = pytest.mark.usefixtures("prefork_log_propagates")


def successors(rig: Rig) -> list[WorkerHandle]:
    """Booting workers that replace a worker still there."""
    return [h for h in rig.in_state(WorkerState.BOOTING) if h.replaces is not None]


# --- max_requests and max_recycling ----------------------------------------------------------


def test_one_worker_at_a_time_is_replaced_with_max_recycling_1(
    make_rig: Callable[..., Rig], caplog: pytest.LogCaptureFixture
) -> None:
    rig = make_rig(count=4, max_recycling=1)
    old = rig.start()
    spawned = len(rig.kernel.spawned)

    rig.say([h.pid for h in old], MSG_RECYCLE)  # all four reach max_requests at once

    assert len(rig.kernel.spawned) == spawned + 1
    (successor,) = successors(rig)
    replaced = rig.handle(successor.replaces)  # type: ignore[arg-type]
    assert successor.number == replaced.number
    assert len(matching(caplog, "will be replaced: max_requests")) == 4
    # Past max_requests, the old workers keep serving: none is stopped or killed yet.
    assert all(h.state is WorkerState.READY for h in old)
    assert [rig.kernel.received(h.pid) for h in old] == [b""] * 4
    assert rig.kernel.kills == []
    for _ in range(3):
        rig.second()
    assert len(rig.kernel.spawned) == spawned + 1, "a second successor while one boots"

    rig.boot(successor.pid)

    assert rig.kernel.received(replaced.pid) == MSG_HAND_OVER
    assert replaced.state is WorkerState.STOPPING
    assert [rig.kernel.received(h.pid) for h in old if h is not replaced] == [b""] * 3
    assert rig.master.recycles == {"max_requests": 1}


def test_every_queued_worker_is_replaced_in_turn_never_two_at_once(
    make_rig: Callable[..., Rig], caplog: pytest.LogCaptureFixture
) -> None:
    rig = make_rig(count=4, max_recycling=1)
    old = rig.start()
    rig.say([h.pid for h in old], MSG_RECYCLE)

    replaced_pids = []
    for _ in range(4):
        (successor,) = successors(rig)
        rig.boot(successor.pid)
        assert len(successors(rig)) <= 1
        replaced_pids.append(successor.replaces)
        assert rig.kernel.received(successor.replaces) == MSG_HAND_OVER  # type: ignore[arg-type]
        # ready workers never drop below the pool size: the successor came first
        assert len(rig.in_state(WorkerState.READY)) == 4
        rig.exit(successor.replaces, exit_status(0))  # type: ignore[arg-type]
        assert len(successors(rig)) <= 1

    assert sorted(replaced_pids) == sorted(h.pid for h in old)  # type: ignore[type-var]
    assert successors(rig) == []
    assert len(rig.in_state(WorkerState.READY)) == 4
    assert [h.number for h in rig.handles()] == [1, 2, 3, 4]
    assert rig.master.recycles == {"max_requests": 4}
    assert len(matching(caplog, "exited (recycled: max_requests): exit code 0")) == 4


def test_max_recycling_2_replaces_two_at_once(make_rig: Callable[..., Rig]) -> None:
    rig = make_rig(count=4, max_recycling=2)
    old = rig.start()
    spawned = len(rig.kernel.spawned)

    rig.say([h.pid for h in old], MSG_RECYCLE)

    assert len(rig.kernel.spawned) == spawned + 2
    first, second = successors(rig)
    assert {first.number, second.number} == {
        rig.handle(p).number for p in (first.replaces, second.replaces)
    }  # type: ignore[arg-type]
    rig.second()
    assert len(rig.kernel.spawned) == spawned + 2

    rig.boot(first.pid)
    rig.exit(first.replaces, exit_status(0))  # type: ignore[arg-type]

    assert len(successors(rig)) == 2  # the third replacement started; still two under way
    assert len(rig.kernel.spawned) == spawned + 3


def test_a_worker_asks_to_be_replaced_only_once(
    make_rig: Callable[..., Rig], caplog: pytest.LogCaptureFixture
) -> None:
    rig = make_rig(count=2)
    worker = rig.start()[0]
    spawned = len(rig.kernel.spawned)

    rig.say([worker.pid], MSG_RECYCLE)
    rig.say([worker.pid], MSG_RECYCLE)

    assert len(rig.kernel.spawned) == spawned + 1
    assert len(matching(caplog, "will be replaced")) == 1


def test_a_successor_that_cannot_boot_leaves_the_old_worker_serving(
    make_rig: Callable[..., Rig],
) -> None:
    rig = make_rig(count=2)
    worker = rig.start()[0]
    rig.say([worker.pid], MSG_RECYCLE)
    (successor,) = successors(rig)

    rig.exit(successor.pid, exit_status(EXIT_APP_LOAD_ERROR))

    assert worker.state is WorkerState.READY
    assert rig.kernel.received(worker.pid) == b""
    assert rig.master.boot_failures == 1


def test_a_failed_successor_is_retried_after_the_boot_backoff_not_at_once(
    make_rig: Callable[..., Rig],
) -> None:
    # A successor that cannot boot must not be re-forked on the very next tick: that is a
    # fork loop bounded only by how fast workers fail. Other boot failures wait BACKOFF_FIRST.
    rig = make_rig(count=2)
    worker = rig.start()[0]
    rig.say([worker.pid], MSG_RECYCLE)
    (successor,) = successors(rig)
    spawned = len(rig.kernel.spawned)

    rig.exit(successor.pid, exit_status(EXIT_APP_LOAD_ERROR))
    rig.tick()

    assert len(rig.kernel.spawned) == spawned, "successor re-forked without any backoff"
    rig.kernel.advance(BACKOFF_FIRST)
    rig.tick()
    assert len(rig.kernel.spawned) == spawned + 1
    (retry,) = successors(rig)
    assert retry.replaces == worker.pid


# --- max_lifetime ----------------------------------------------------------------------------


def test_a_worker_past_max_lifetime_is_replaced_successor_first_and_the_jitter_spreads_them(
    make_rig: Callable[..., Rig], caplog: pytest.LogCaptureFixture
) -> None:
    rig = make_rig(count=3, max_lifetime=60, max_lifetime_jitter=30, max_recycling=3)
    first, second, third = rig.start()  # ready at 0: they retire at 60, 75 and 90
    rig.kernel.advance(59.75)
    rig.kernel.waits.clear()
    rig.tick()
    assert rig.kernel.waits[-1] == pytest.approx(0.25), "the sleep ignores the retirement"

    rig.kernel.advance(0.125)  # 59.875
    rig.tick()
    assert successors(rig) == []
    rig.kernel.advance(0.25)  # 60.125
    rig.tick()
    (successor,) = successors(rig)
    rig.kernel.waits.clear()
    rig.tick()
    assert rig.kernel.waits[-1] > 0.1, "a busy loop once the worker is to be replaced"
    assert successor.replaces == first.pid and first.state is WorkerState.READY
    assert matching(caplog, f"worker 1 (pid {first.pid}) will be replaced: max_lifetime")

    rig.kernel.advance(15)  # 75.125
    rig.tick()
    assert [h.replaces for h in successors(rig)] == [first.pid, second.pid]
    rig.boot(*(h.pid for h in successors(rig)))
    assert rig.kernel.received(first.pid) == MSG_HAND_OVER
    assert rig.master.recycles == {"max_lifetime": 2}
    rig.exit(first.pid, exit_status(0))
    assert matching(caplog, f"worker 1 (pid {first.pid}) exited (recycled: max_lifetime)")
    assert third.state is WorkerState.READY and not third.recycle

    rig.kernel.advance(14.7)  # 89.825
    rig.tick()
    assert [h.replaces for h in successors(rig)] == []
    rig.kernel.advance(0.25)  # 90.075
    rig.tick()
    assert [h.replaces for h in successors(rig)] == [third.pid]

    # a successor's lifetime counts from its own ready (75.125 + 60 for worker 1)
    new_first = rig.worker(1)
    assert new_first.ready_at - first.ready_at == pytest.approx(75.125)
    rig.kernel.advance(44.9)  # 134.975
    rig.tick()
    assert not new_first.recycle
    rig.kernel.advance(0.25)  # 135.225
    rig.tick()
    assert new_first.recycle == "max_lifetime"


def test_max_lifetime_off_by_default_and_never_for_a_stopping_server(
    make_rig: Callable[..., Rig],
) -> None:
    rig = make_rig(count=2)
    rig.start()
    rig.kernel.advance(10**6)
    rig.tick()
    assert successors(rig) == []

    rig = make_rig(count=2, max_lifetime=5)
    rig.start()
    rig.signal(signal.SIGTERM)
    rig.kernel.advance(6)
    rig.tick()
    assert successors(rig) == []


# --- memory limits ---------------------------------------------------------------------------


def test_over_max_memory_a_worker_is_replaced_successor_first(
    make_rig: Callable[..., Rig], caplog: pytest.LogCaptureFixture
) -> None:
    rig = make_rig(count=2, max_memory=100, memory_check_interval=0.5)
    leaky, other = rig.start()
    rig.kernel.uss[leaky.pid] = 150 * MIB
    rig.kernel.uss[other.pid] = 50 * MIB
    spawned = len(rig.kernel.spawned)

    rig.kernel.advance(0.5)
    rig.tick()

    assert matching(caplog, f"worker 1 (pid {leaky.pid}) uses 150.0 MiB, over max_memory (100 MiB)")
    assert matching(caplog, f"worker 1 (pid {leaky.pid}) will be replaced: memory")
    (successor,) = successors(rig)
    assert successor.replaces == leaky.pid and successor.number == 1
    assert len(rig.kernel.spawned) == spawned + 1
    assert leaky.state is WorkerState.READY  # it serves until the successor is ready
    assert rig.kernel.received(leaky.pid) == b"" and rig.kernel.kills == []
    rig.kernel.advance(0.5)
    rig.tick()
    assert len(matching(caplog, "over max_memory")) == 1, "logged again while being replaced"

    rig.boot(successor.pid)

    assert rig.kernel.received(leaky.pid) == MSG_HAND_OVER
    assert rig.kernel.received(other.pid) == b""
    assert rig.master.recycles == {"memory": 1}
    rig.exit(leaky.pid, exit_status(0))
    assert matching(caplog, f"worker 1 (pid {leaky.pid}) exited (recycled: memory): exit code 0")
    assert rig.kernel.kills == []


def test_over_max_memory_hard_a_worker_is_killed_at_once(
    make_rig: Callable[..., Rig], caplog: pytest.LogCaptureFixture
) -> None:
    rig = make_rig(count=2, max_memory=100, max_memory_hard=200, memory_check_interval=0.5)
    hog, other = rig.start()
    rig.kernel.uss[hog.pid] = 250 * MIB
    spawned = len(rig.kernel.spawned)

    rig.kernel.advance(0.5)
    rig.tick()

    assert rig.kernel.kills == [(hog.pid, signal.SIGKILL)]
    assert hog.state is WorkerState.KILLED
    assert matching(
        caplog,
        f"worker 1 (pid {hog.pid}) uses 250.0 MiB, over max_memory_hard (200 MiB); killing it",
    )
    assert not matching(caplog, "will be replaced")  # no hand-off over the hard limit
    assert rig.master.recycles == {"memory": 1}
    # its number is free again: a new worker 1 boots at once
    assert len(rig.kernel.spawned) == spawned + 1
    assert rig.worker(1).pid == rig.kernel.spawned[-1]

    rig.exit(hog.pid, signal.SIGKILL)
    assert matching(
        caplog, f"worker 1 (pid {hog.pid}) exited (memory (hard limit)): killed by SIGKILL"
    )
    assert not matching(caplog, "died unexpectedly")
    assert rig.master.recycles == {"memory": 1}  # not also counted as a crash
    assert rig.kernel.received(other.pid) == b""


def test_the_hard_limit_also_applies_to_a_worker_that_is_stopping(
    make_rig: Callable[..., Rig],
) -> None:
    # Replaced at the soft limit, the old worker still finishes what it holds (up to
    # graceful_timeout); if it keeps leaking meanwhile, the hard limit is the only guard.
    rig = make_rig(count=1, max_memory=100, max_memory_hard=200, memory_check_interval=0.5)
    (leaky,) = rig.start()
    rig.kernel.uss[leaky.pid] = 150 * MIB
    rig.kernel.advance(0.5)
    rig.tick()
    (successor,) = successors(rig)
    rig.boot(successor.pid)
    assert leaky.state is WorkerState.STOPPING

    rig.kernel.uss[leaky.pid] = 300 * MIB
    rig.kernel.advance(0.5)
    rig.tick()

    assert rig.kernel.kills == [(leaky.pid, signal.SIGKILL)]
    assert leaky.state is WorkerState.KILLED


def test_memory_recycling_shares_the_max_recycling_budget(make_rig: Callable[..., Rig]) -> None:
    rig = make_rig(count=3, max_memory=100, memory_check_interval=0.5, max_recycling=1)
    one, two, three = rig.start()
    rig.say([one.pid], MSG_RECYCLE)
    for handle in (two, three):
        rig.kernel.uss[handle.pid] = 150 * MIB

    rig.kernel.advance(0.5)
    rig.tick()

    (successor,) = successors(rig)
    assert successor.replaces == one.pid  # first come, first replaced
    assert two.recycle == three.recycle == "memory"
    rig.boot(successor.pid)
    rig.exit(one.pid, exit_status(0))
    (successor,) = successors(rig)
    assert successor.replaces == two.pid


def test_the_master_wakes_up_for_memory_checks_shorter_than_a_second(
    make_rig: Callable[..., Rig],
) -> None:
    rig = make_rig(count=1, max_memory=100, memory_check_interval=0.3)
    rig.start()
    rig.kernel.waits.clear()

    rig.tick()

    assert rig.kernel.waits[-1] <= 0.3 + 1e-9, "memory_check_interval is not honoured"


def test_memory_is_checked_on_its_interval(make_rig: Callable[..., Rig]) -> None:
    rig = make_rig(count=1, max_memory_hard=200, memory_check_interval=2)
    (worker,) = rig.start()
    rig.kernel.advance(2)
    rig.tick()
    rig.kernel.uss[worker.pid] = 300 * MIB

    for _ in range(3):
        rig.kernel.advance(0.6)
        rig.tick()
        assert rig.kernel.kills == []
    rig.kernel.advance(0.3)
    rig.tick()

    assert rig.kernel.kills == [(worker.pid, signal.SIGKILL)]


def test_without_memory_limits_no_memory_is_read(make_rig: Callable[..., Rig]) -> None:
    rig = make_rig(count=2, memory_check_interval=0.1)
    rig.start()
    for _ in range(3):
        rig.second()
    assert rig.kernel.memory_calls == []


def test_an_unreadable_memory_size_is_skipped(make_rig: Callable[..., Rig]) -> None:
    rig = make_rig(count=1, max_memory=1, max_memory_hard=2, memory_check_interval=0.1)
    (worker,) = rig.start()  # kernel.uss has no entry: memory() answers None
    rig.second()
    assert worker.pid in rig.kernel.memory_calls
    assert rig.kernel.kills == [] and successors(rig) == []


# --- the dynamic pool ------------------------------------------------------------------------


def settle(rig: Rig, count: int) -> None:
    """Boot everything, mark every worker idle and let the pool come down to `count`."""
    for _ in range(20):
        rig.boot_all()
        for handle in rig.in_state(WorkerState.STOPPING):
            rig.exit(handle.pid, exit_status(0))
        rig.mark(Activity.IDLE)
        if (
            rig.master.target == count
            and len(rig.handles()) == count
            and all(h.state is WorkerState.READY for h in rig.handles())
        ):
            rig.second()  # one check with enough idle workers resets the growth rate
            if rig.master.target == count:
                return
        rig.second()
    raise AssertionError(f"pool did not settle at {count}: {rig.handles()}")


def grow_while_busy(rig: Rig) -> list[int]:
    """Keep every worker busy, a second at a time, until the target stops moving."""
    targets = []
    while True:
        rig.boot_all()
        rig.mark(Activity.BUSY)
        rig.second()
        targets.append(rig.master.target)
        if len(targets) > 1 and targets[-1] == targets[-2]:
            return targets


def test_a_dynamic_pool_starts_with_count_workers(make_rig: Callable[..., Rig]) -> None:
    rig = make_rig(count=2, max=6, min_spare=1, max_spare=2)

    rig.tick()  # nothing has booted yet; no worker is short of idle ones

    assert rig.master.target == 2
    assert len(rig.kernel.spawned) == 2


def test_the_pool_grows_1_2_4_per_second_up_to_max(
    make_rig: Callable[..., Rig], caplog: pytest.LogCaptureFixture
) -> None:
    rig = make_rig(count=1, max=6, min_spare=1, max_spare=1)
    rig.start()
    settle(rig, 1)
    caplog.clear()

    rig.mark(Activity.BUSY)
    rig.kernel.advance(0.9)
    rig.tick()
    assert rig.master.target == 1  # checked once per second only
    rig.kernel.advance(0.2)
    rig.tick()
    assert rig.master.target == 2
    assert matching(caplog, "pool: 0 idle (min_spare 1): growing to 2 workers")
    assert [h.number for h in rig.live()] == [1, 2]  # spawned in the same tick

    rig.kernel.advance(0.5)
    rig.tick()
    assert rig.master.target == 2

    assert grow_while_busy(rig)[:3] == [4, 6, 6]  # +2, then +4 capped at max
    assert [h.number for h in rig.live()] == [1, 2, 3, 4, 5, 6]


def test_idle_and_keepalive_workers_are_spare(make_rig: Callable[..., Rig]) -> None:
    rig = make_rig(count=2, max=4, min_spare=2, max_spare=2)
    rig.start()
    settle(rig, 2)
    one, two = rig.handles()
    rig.mark(Activity.IDLE, one)
    rig.mark(Activity.KEEPALIVE, two)

    rig.second()
    assert rig.master.target == 2

    rig.mark(Activity.BUSY, two)
    rig.second()
    assert rig.master.target == 3


def test_booting_workers_count_as_spare(make_rig: Callable[..., Rig]) -> None:
    # Apache prefork counts a starting server as idle: a worker still loading the app will be
    # idle in a moment, and forking more while it boots only swamps the machine.
    rig = make_rig(count=1, max=8, min_spare=1, max_spare=1)
    rig.start()
    settle(rig, 1)
    rig.mark(Activity.BUSY)
    rig.second()
    assert rig.master.target == 2
    assert rig.worker(2).state is WorkerState.BOOTING

    rig.second()  # worker 2 is still loading the app

    assert rig.master.target == 2


def test_the_pool_shrinks_one_per_second_down_to_count(
    make_rig: Callable[..., Rig], caplog: pytest.LogCaptureFixture
) -> None:
    rig = make_rig(count=1, max=4, min_spare=1, max_spare=1)
    rig.start()
    settle(rig, 1)
    rig.mark(Activity.BUSY)
    grow_while_busy(rig)
    rig.boot_all()
    assert [h.number for h in rig.in_state(WorkerState.READY)] == [1, 2, 3, 4]
    by_number = {h.number: h for h in rig.handles()}
    caplog.clear()

    rig.mark(Activity.IDLE)
    targets = []
    for _ in range(5):
        rig.second()
        targets.append(rig.master.target)
        rig.kernel.advance(0.5)  # half a second later: no second step
        rig.tick()
        assert rig.master.target == targets[-1]

    assert targets == [3, 2, 1, 1, 1]
    assert matching(caplog, "pool: 4 idle (max_spare 1): shrinking to 3 workers")
    assert matching(caplog, "pool: 2 idle (max_spare 1): shrinking to 1 workers")
    # the highest numbers go, gracefully
    for number in (2, 3, 4):
        assert by_number[number].state is WorkerState.STOPPING
        assert rig.kernel.received(by_number[number].pid) == MSG_HAND_OVER
    assert by_number[1].state is WorkerState.READY
    assert rig.kernel.kills == []


def test_a_pool_at_count_with_too_many_idle_workers_does_not_shrink(
    make_rig: Callable[..., Rig],
) -> None:
    rig = make_rig(count=3, max=5, min_spare=1, max_spare=1)
    rig.start()
    settle(rig, 3)
    rig.mark(Activity.IDLE)
    for _ in range(3):
        rig.second()
    assert rig.master.target == 3
    assert all(h.state is WorkerState.READY for h in rig.handles())


def test_a_fixed_pool_never_resizes(make_rig: Callable[..., Rig]) -> None:
    rig = make_rig(count=2, min_spare=1, max_spare=1)  # max: 0
    rig.start()
    rig.mark(Activity.BUSY)
    for _ in range(3):
        rig.second()
    assert rig.master.target == 2
    assert len(rig.kernel.spawned) == 2


# --- crash-loop protection -------------------------------------------------------------------


def fail_boots(rig: Rig, number: int, times: int, pause: float | None = None) -> None:
    """Worker `number` fails to boot `times` times; between failures the clock moves by the
    backoff (or by `pause`) so that the master forks it again."""
    for i in range(times):
        handle = rig.worker(number)
        assert handle.state is WorkerState.BOOTING
        rig.exit(handle.pid, exit_status(EXIT_APP_LOAD_ERROR))
        if i < times - 1:
            rig.kernel.advance(pause if pause is not None else BACKOFF_FIRST * 2**i)
            rig.tick()


def retire(rig: Rig, number: int) -> None:
    """Worker `number` exits cleanly after startup; its replacement is forked."""
    rig.exit(rig.worker(number).pid, exit_status(0))
    assert rig.worker(number).state is WorkerState.BOOTING


def test_too_many_boot_failures_in_the_window_degrade_the_server(
    make_rig: Callable[..., Rig], caplog: pytest.LogCaptureFixture
) -> None:
    rig = make_rig(count=2, boot_failure_limit=3, boot_failure_window=60)
    healthy = rig.start()[0]
    retire(rig, 2)

    fail_boots(rig, 2, 2)
    assert not rig.master.degraded
    assert rig.snapshot()["master"]["state"] == "running"
    rig.kernel.advance(1.0)
    rig.tick()
    fail_boots(rig, 2, 1)

    assert rig.master.degraded
    message = "degraded: 3 workers failed to boot within 60s; the healthy workers keep serving"
    assert matching(caplog, message)
    assert ("status", message) in rig.announce.calls
    snap = rig.snapshot()
    assert snap["master"]["degraded"] is True
    assert snap["master"]["state"] == "degraded"
    assert snap["totals"]["boot_failures"] == 3
    # the master keeps going, and so does the healthy worker
    assert rig.master.stop is Stop.NONE
    assert rig.tick() is True
    assert healthy.state is WorkerState.READY
    assert rig.kernel.received(healthy.pid) == b"" and rig.kernel.kills == []
    rig.kernel.advance(BACKOFF_FIRST * 4)
    rig.tick()
    assert rig.worker(2).state is WorkerState.BOOTING  # and it keeps trying
    assert len(matching(caplog, "degraded:")) == 1


def test_boot_failures_spread_wider_than_the_window_do_not_degrade(
    make_rig: Callable[..., Rig],
) -> None:
    rig = make_rig(count=2, boot_failure_limit=3, boot_failure_window=5)
    rig.start()
    retire(rig, 2)

    fail_boots(rig, 2, 5, pause=6.0)

    assert not rig.master.degraded
    assert rig.master.boot_failures == 5


def test_a_successful_boot_ends_the_degraded_state(
    make_rig: Callable[..., Rig], caplog: pytest.LogCaptureFixture
) -> None:
    rig = make_rig(count=2, boot_failure_limit=2, boot_failure_window=60)
    rig.start()
    retire(rig, 2)
    fail_boots(rig, 2, 2)
    assert rig.master.degraded

    rig.kernel.advance(BACKOFF_FIRST * 2)
    rig.tick()
    rig.boot(rig.worker(2).pid)

    assert not rig.master.degraded
    assert matching(caplog, "recovered: workers boot again")
    snap = rig.snapshot()
    assert snap["master"]["state"] == "running"
    assert snap["master"]["degraded"] is False


def test_exit_on_degraded_stops_the_server_with_status_1(
    make_rig: Callable[..., Rig], caplog: pytest.LogCaptureFixture
) -> None:
    rig = make_rig(count=2, boot_failure_limit=3, boot_failure_window=60, exit_on_degraded=True)
    healthy = rig.start()[0]
    retire(rig, 2)

    fail_boots(rig, 2, 3)

    assert rig.master.stop is Stop.GRACEFUL
    assert rig.master.exit_code == 1
    assert rig.master.failure.startswith("degraded: 3 workers failed to boot")
    assert rig.kernel.received(healthy.pid) == MSG_STOP
    assert rig.announce.named("stopping")
    rig.kernel.advance(10)
    assert rig.tick() is True  # no respawn while stopping; waits for the healthy worker
    assert rig.live() == []
    assert rig.exit(healthy.pid, exit_status(0)) is False
    assert rig.master.exit_code == 1


def test_boot_errors_before_startup_count_toward_degraded(make_rig: Callable[..., Rig]) -> None:
    rig = make_rig(count=1, boot_failure_limit=2, boot_failure_window=60)
    rig.tick()
    rig.exit(rig.worker(1).pid, signal.SIGKILL)  # killed while booting: retried
    rig.kernel.advance(BACKOFF_FIRST)
    rig.tick()
    rig.exit(rig.worker(1).pid, signal.SIGKILL)

    assert rig.master.degraded
    assert rig.snapshot()["master"]["state"] == "degraded"


# --- totals and the snapshot -----------------------------------------------------------------


def test_totals_keep_the_counters_of_exited_workers(make_rig: Callable[..., Rig]) -> None:
    rig = make_rig(count=2)
    one, two = rig.start()
    slot_one = rig.scoreboard.slot(one.slot)
    for _ in range(3):
        slot_one.done(200, 0.01, 5)
    rig.scoreboard.slot(two.slot).done(404, 0.2, 7)

    before = rig.snapshot()["totals"]
    rig.exit(one.pid, exit_status(0))
    after = rig.snapshot()["totals"]

    for totals in (before, after):
        assert totals["requests"] == 4
        assert totals["by_class"] == {"1xx": 0, "2xx": 3, "3xx": 0, "4xx": 1, "5xx": 0}
        assert totals["bytes"] == 22
        assert totals["duration_sum"] == pytest.approx(0.23)
        assert sum(totals["buckets"]) == 4
        assert totals["buckets"][3] == 3  # le=0.01: the bound is inclusive
        assert totals["buckets"][7] == 1  # le=0.25
    # the slot went to the new worker 1 wiped: its requests are not counted twice
    new_one = rig.worker(1)
    assert new_one.slot == one.slot
    assert rig.scoreboard.read(new_one.slot).requests == 0
    rig.boot(new_one.pid)
    rig.scoreboard.slot(new_one.slot).done(500, 0.001, 1)
    totals = rig.snapshot()["totals"]
    assert totals["requests"] == 5
    assert totals["by_class"]["5xx"] == 1


def test_restarts_are_counted_after_startup_only(make_rig: Callable[..., Rig]) -> None:
    rig = make_rig(count=3)
    rig.tick()
    rig.exit(rig.worker(3).pid, signal.SIGKILL)  # before ready: startup still
    rig.kernel.advance(BACKOFF_FIRST)
    rig.tick()
    rig.boot_all()
    assert rig.master.ever_ready
    assert rig.snapshot()["totals"]["restarts"] == 0
    rig.kernel.advance(YOUNG_DEATH + 1)  # old enough that a death is not a crash loop

    rig.exit(rig.worker(1).pid, exit_status(0))
    rig.exit(rig.worker(2).pid, signal.SIGKILL)

    totals = rig.snapshot()["totals"]
    assert totals["restarts"] == 2
    assert totals["recycles"]["crash"] == 1  # a clean exit is no crash


def test_a_hung_worker_counts_as_a_timeout_recycle(make_rig: Callable[..., Rig]) -> None:
    rig = make_rig(count=1, timeout=5)
    (worker,) = rig.start()
    rig.scoreboard.slot(worker.slot).busy(b"GET", b"/hang")
    started = rig.scoreboard.read(worker.slot).started
    rig.kernel.now = max(rig.kernel.now, started) + 6

    rig.tick()

    assert rig.kernel.kills == [(worker.pid, signal.SIGABRT)]
    recycles = rig.snapshot()["totals"]["recycles"]
    assert recycles == {"max_requests": 0, "memory": 0, "timeout": 1, "reload": 0, "crash": 0}


def test_the_snapshot_describes_each_worker(make_rig: Callable[..., Rig]) -> None:
    rig = make_rig(count=3, max_memory=1000, memory_check_interval=0.5)
    one, two, three = rig.start()
    rig.kernel.uss[one.pid] = 12 * MIB
    rig.scoreboard.slot(one.slot).busy(b"POST", b"/upload?x=1")
    rig.kernel.now = max(rig.kernel.now, rig.scoreboard.read(one.slot).started)
    rig.scoreboard.slot(two.slot).set(Activity.KEEPALIVE)
    rig.scoreboard.slot(three.slot).set(Activity.IDLE)
    rig.say([three.pid], MSG_RECYCLE)  # queued, its successor booting

    snap = rig.snapshot()

    by_pid = {w["pid"]: w for w in snap["workers"]}
    assert set(by_pid) == {h.pid for h in rig.handles()}
    busy = by_pid[one.pid]
    assert busy["number"] == 1 and busy["generation"] == 1
    assert busy["lifecycle"] == "ready" and busy["activity"] == "busy"
    assert busy["current"]["method"] == "POST"
    assert busy["current"]["target"] == "/upload"  # the query string may carry secrets
    assert busy["current"]["age"] >= 0
    assert busy["uss"] == 12 * MIB
    assert by_pid[two.pid]["activity"] == "keepalive" and by_pid[two.pid]["current"] is None
    assert by_pid[two.pid]["uss"] is None
    assert by_pid[three.pid]["recycle"] == "max_requests"
    (successor,) = successors(rig)
    assert by_pid[successor.pid]["lifecycle"] == "booting"
    assert by_pid[successor.pid]["activity"] == "booting"
    assert snap["workers_by_state"] == {
        "reading": 0,
        "waiting": 0,
        "booting": 1,
        "idle": 1,
        "keepalive": 1,
        "busy": 1,
        "draining": 0,
    }
    master = snap["master"]
    assert master["target_workers"] == 3 and master["generation"] == 1
    assert master["ready"] is True and master["state"] == "running"


def test_a_stopping_worker_is_draining(make_rig: Callable[..., Rig]) -> None:
    rig = make_rig(count=2)
    rig.start()
    rig.signal(signal.SIGTTOU)
    snap = rig.snapshot()
    (stopping,) = [w for w in snap["workers"] if w["number"] == 2]
    assert stopping["lifecycle"] == "stopping" and stopping["activity"] == "draining"
    assert snap["workers_by_state"]["draining"] == 1


def test_master_states(make_rig: Callable[..., Rig]) -> None:
    config = make_config(2)
    rig = make_rig(count=2, reloader=lambda current, held: Generation(0, config, []))
    rig.tick()
    assert rig.snapshot()["master"]["state"] == "starting"
    rig.boot_all()
    assert rig.snapshot()["master"]["state"] == "running"
    rig.signal(signal.SIGHUP)
    assert rig.snapshot()["master"]["state"] == "reloading"
    rig.signal(signal.SIGTERM)
    assert rig.snapshot()["master"]["state"] == "stopping"


# --- the endpoint's routes -------------------------------------------------------------------


def test_ready_is_503_until_a_worker_serves_and_while_stopping(
    make_rig: Callable[..., Rig],
) -> None:
    rig = make_rig(count=2)
    rig.tick()
    assert status.respond(rig.master, "/ready")[0] == 503
    assert status.respond(rig.master, "/live")[0] == 200

    rig.boot(rig.worker(1).pid)
    assert status.respond(rig.master, "/ready") == (200, "text/plain", b"ready\n")

    rig.signal(signal.SIGTERM)
    assert status.respond(rig.master, "/ready") == (503, "text/plain", b"not ready\n")
    assert status.respond(rig.master, "/live")[0] == 200


def test_an_unknown_route_is_404(make_rig: Callable[..., Rig]) -> None:
    rig = make_rig(count=1)
    rig.start()
    code, _, body = status.respond(rig.master, "/nope")
    assert code == 404
    assert b"/status" in body


def test_status_route_is_the_snapshot_as_json(make_rig: Callable[..., Rig]) -> None:
    rig = make_rig(count=2)
    rig.start()
    code, content_type, body = status.respond(rig.master, "/status")
    assert (code, content_type) == (200, "application/json")
    doc = json.loads(body)
    assert doc["master"]["target_workers"] == 2
    assert [w["number"] for w in doc["workers"]] == [1, 2]


def test_resident_memory_is_named_rss_where_uss_cannot_be_read(
    make_rig: Callable[..., Rig],
) -> None:
    """Defect: where USS could not be read, /status, /metrics and the table showed the
    resident size under the USS name."""
    rig = make_rig(count=2)
    one, two = rig.start()
    rig.kernel.uss[one.pid] = 3 * MIB
    rig.kernel.uss_readable = False  # memory() now answers RSS

    worker = next(w for w in rig.snapshot()["workers"] if w["pid"] == one.pid)
    assert (worker["uss"], worker["rss"]) == (None, 3 * MIB)
    body = status.respond(rig.master, "/metrics")[2].decode()
    names = {
        sample.name: sample.value
        for family in text_string_to_metric_families(body)
        for sample in family.samples
    }
    assert names["preforkd_worker_memory_rss_bytes"] == 3 * MIB
    assert "preforkd_worker_memory_uss_bytes" not in names
    table = status_table(rig.snapshot())
    assert " RSS " in table and " USS " not in table
    assert "3.0M" in table

    rig.kernel.uss_readable = True
    worker = next(w for w in rig.snapshot()["workers"] if w["pid"] == one.pid)
    assert (worker["uss"], worker["rss"]) == (3 * MIB, None)
    assert " USS " in status_table(rig.snapshot())
    metrics = status.respond(rig.master, "/metrics")[2].decode()
    assert "preforkd_worker_memory_rss_bytes" not in metrics


def test_a_full_listen_queue_is_counted_shown_and_said(
    make_rig: Callable[..., Rig], caplog: pytest.LogCaptureFixture, tmp_path: Path
) -> None:
    """uWSGI's "listen queue full": a real TCP and a real unix listener, whose accept queues
    the test fills itself (nobody accepts here)."""
    rig = make_rig(count=1)
    rig.start()
    tcp = socket.socket()
    tcp.bind(("127.0.0.1", 0))
    tcp.listen(2)
    unix_path = str(tmp_path / "q.sock")
    unix = socket.socket(socket.AF_UNIX)
    unix.bind(unix_path)
    unix.listen(3)
    port = tcp.getsockname()[1]
    rig.master.current.listeners.extend([
        Listener(tcp, parse_address(f"127.0.0.1:{port}")),
        Listener(unix, parse_address(f"unix:{unix_path}")),
    ])
    clients: list[socket.socket] = []
    try:
        for _ in range(2):
            clients.append(socket.create_connection(("127.0.0.1", port), timeout=2))
        clients.append(socket.socket(socket.AF_UNIX))
        clients[-1].connect(unix_path)

        rig.kernel.advance(1.0)
        rig.tick()
        doc = rig.snapshot()["listeners"]
        assert doc == [
            {"url": f"http://127.0.0.1:{port}", "queued": 2, "queue_limit": 2,
             "queue_full_seen": 1},
            {"url": f"unix:{unix_path}", "queued": 1, "queue_limit": 3, "queue_full_seen": 0},
        ]
        (line,) = matching(caplog, "listen queue of", logging.WARNING)
        assert f"listen queue of http://127.0.0.1:{port} is full (2/2)" in line

        rig.kernel.advance(1.0)
        rig.tick()  # still full: counted again, but said only every 10 s
        assert rig.snapshot()["listeners"][0]["queue_full_seen"] == 2
        assert len(matching(caplog, "listen queue of", logging.WARNING)) == 1

        body = status.respond(rig.master, "/metrics")[2].decode()
        samples = {
            (sample.name, sample.labels.get("listener")): sample.value
            for family in text_string_to_metric_families(body)
            for sample in family.samples
        }
        assert samples[("preforkd_listen_queue", f"unix:{unix_path}")] == 1
        assert samples[("preforkd_listen_queue_limit", f"http://127.0.0.1:{port}")] == 2
        assert samples[("preforkd_listen_queue_full_total", f"http://127.0.0.1:{port}")] == 2
        assert f"listen queues: http://127.0.0.1:{port} 2/2, unix:{unix_path} 1/3" in (
            status_table(rig.snapshot())
        )
    finally:
        rig.master.current.listeners.clear()
        for sock in (*clients, tcp, unix):
            sock.close()


def test_metrics_route_is_valid_prometheus_text(make_rig: Callable[..., Rig]) -> None:
    rig = make_rig(count=2, max_memory=1000, memory_check_interval=0.5)
    one, two = rig.start()
    rig.kernel.uss[one.pid] = 3 * MIB
    for status_code, duration in ((200, 0.002), (200, 0.3), (404, 0.02)):
        rig.scoreboard.slot(one.slot).done(status_code, duration, 10)
    rig.kernel.advance(YOUNG_DEATH + 1)
    rig.exit(two.pid, signal.SIGKILL)

    code, content_type, body = status.respond(rig.master, "/metrics")

    assert code == 200 and content_type.startswith("text/plain; version=0.0.4")
    samples = {}
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    assert samples[("preforkd_requests_total", (("class", "2xx"),))] == 2
    assert samples[("preforkd_requests_total", (("class", "4xx"),))] == 1
    assert samples[("preforkd_request_duration_seconds_count", ())] == 3
    assert samples[("preforkd_request_duration_seconds_bucket", (("le", "0.0025"),))] == 1
    assert samples[("preforkd_request_duration_seconds_bucket", (("le", "0.025"),))] == 2
    assert samples[("preforkd_request_duration_seconds_bucket", (("le", "+Inf"),))] == 3
    assert samples[("preforkd_request_duration_seconds_sum", ())] == pytest.approx(0.322)
    assert samples[("preforkd_response_body_bytes_total", ())] == 30
    assert samples[("preforkd_worker_recycles_total", (("reason", "crash"),))] == 1
    assert samples[("preforkd_worker_restarts_total", ())] == 1
    assert samples[("preforkd_connections_handed_over_total", ())] == 0
    assert samples[("preforkd_degraded", ())] == 0
    assert samples[("preforkd_generation", ())] == 1
    uss_key = ("preforkd_worker_memory_uss_bytes", (("pid", str(one.pid)), ("worker", "1")))
    assert samples[uss_key] == 3 * MIB
    rig.scoreboard.slot(one.slot).hold(7)
    body = status.respond(rig.master, "/metrics")[2]
    held = [
        sample.value
        for family in text_string_to_metric_families(body.decode())
        for sample in family.samples
        if sample.name == "preforkd_worker_connections" and sample.labels["worker"] == "1"
    ]
    assert held == [7]
    assert samples[("preforkd_workers", (("state", "booting"),))] == 1


@pytest.mark.parametrize(
    ("workers", "shares"),
    # a fixed pool (max 0, or max = count); a dynamic pool's golden-ratio shares are in
    # test_fixes_config_tls.py
    [({"count": 3}, [0, 15, 30, 0]),
     ({"count": 1}, [0, 0]),
     ({"count": 3, "max": 3}, [0, 15, 30])],
)
def test_the_jitter_is_spread_over_every_worker_number(
    workers: dict[str, int], shares: list[float]
) -> None:
    config = make_config(**workers).workers
    assert [jitter_share(config, n, 30) for n in range(1, len(shares) + 1)] == shares
    assert [max_requests_for(make_config(max_requests=100, max_requests_jitter=30, **workers),
                             n) for n in range(1, len(shares) + 1)] == [100 + s for s in shares]


def test_the_pool_shrinks_only_by_an_idle_worker(
    make_rig: Callable[..., Rig], caplog: pytest.LogCaptureFixture
) -> None:
    """The spare-server rule retires an idle worker: while the highest-numbered one is in a
    request, the pool waits (stopping it would cut the request at graceful_timeout), however
    many others are idle."""
    rig = make_rig(count=1, max=3, min_spare=1, max_spare=1)
    rig.start()
    settle(rig, 1)
    rig.mark(Activity.BUSY)
    grow_while_busy(rig)
    rig.boot_all()
    by_number = {h.number: h for h in rig.in_state(WorkerState.READY)}
    assert sorted(by_number) == [1, 2, 3]
    rig.mark(Activity.IDLE, by_number[1], by_number[2])
    rig.mark(Activity.BUSY, by_number[3])
    caplog.clear()
    for _ in range(3):
        rig.second()
    assert rig.master.target == 3
    assert by_number[3].state is WorkerState.READY
    rig.mark(Activity.IDLE, by_number[3])
    rig.second()
    assert rig.master.target == 2
    assert by_number[3].state is WorkerState.STOPPING
    assert matching(caplog, "pool: 3 idle (max_spare 1): shrinking to 2 workers")


def test_ttin_and_ttou_keep_a_dynamic_pool_within_its_bounds(
    make_rig: Callable[..., Rig], caplog: pytest.LogCaptureFixture
) -> None:
    """In a dynamic pool TTIN and TTOU move the target between workers.count and
    workers.max, the bounds a reload's pool_size keeps it in (it undid a TTOU below count)."""
    rig = make_rig(count=2, max=3, min_spare=0, max_spare=3)
    rig.start()
    rig.signal(signal.SIGTTOU)
    assert rig.master.target == 2
    assert matching(caplog, "TTOU: a dynamic pool keeps at least workers.count (2) workers")
    rig.signal(signal.SIGTTIN)
    rig.signal(signal.SIGTTIN)
    assert rig.master.target == 3
    assert matching(caplog, "TTIN: already at the maximum of 3 workers (workers.max)")
