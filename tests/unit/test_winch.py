"""WINCH: the master stops every worker and keeps its sockets; HUP, TTIN or the end of the
master a USR2 started brings workers back (Master.stop_workers, against the fake kernel)."""

from __future__ import annotations

import itertools
import signal
from collections.abc import Callable

import pytest

from prefork.admin import status_table
from prefork.channel import MSG_STOP
from prefork.master import Generation, WorkerState
from prefork.sockets import Listener
from tests.unit.fakes import Rig, exit_status, make_config, matching
from tests.unit.test_upgrade import StubUpgrader

pytestmark = pytest.mark.usefixtures("prefork_log_propagates")


def stop_all(rig: Rig) -> None:
    """WINCH, then every worker it asked to stop exits."""
    live = rig.live()
    rig.signal(signal.SIGWINCH)
    for handle in live:
        assert handle.state is WorkerState.STOPPING
        assert rig.kernel.received(handle.pid) == MSG_STOP  # not a hand-over: nobody takes
        rig.exit(handle.pid, exit_status(0))


def test_winch_stops_every_worker_and_starts_none(
    make_rig: Callable[..., Rig], caplog: pytest.LogCaptureFixture
) -> None:
    rig = make_rig(count=3)
    rig.start()
    rig.signal(signal.SIGTTIN)
    rig.boot_all()

    stop_all(rig)
    for _ in range(3):
        rig.kernel.advance(2)
        rig.tick()

    assert rig.master.workers == {}
    assert len(rig.kernel.spawned) == 4  # nothing started since
    assert (rig.master.target, rig.master.paused) == (0, 4)
    assert rig.master.stop.name == "NONE"  # the master runs on, with its sockets
    assert matching(caplog, "WINCH: stopping all 4 workers; no worker of this master serves")
    snapshot = rig.snapshot()["master"]
    assert snapshot["state"] == "workers stopped" and snapshot["ready"] is False
    assert rig.master.summary().endswith("(workers stopped by WINCH)")
    header = status_table(rig.snapshot()).splitlines()[:2]
    assert "workers stopped" in header[0]
    assert header[1].startswith("0 workers (target 0): none since WINCH (HUP or TTIN starts "
                                "them); ")


def reloader_of(configs: list[object]) -> Callable[[Generation, list[Listener]], Generation]:
    """Generation 2, 3, ... from `configs` in turn; an exception in the list is raised."""
    numbers = itertools.count(2)

    def reloader(current: Generation, held: list[Listener]) -> Generation:
        config = configs.pop(0)
        if isinstance(config, Exception):
            raise config
        return Generation(next(numbers), config, [])  # type: ignore[arg-type]

    return reloader


def test_hup_brings_the_workers_back_even_when_the_reload_fails(
    make_rig: Callable[..., Rig], caplog: pytest.LogCaptureFixture
) -> None:
    rig = make_rig(count=2, reloader=reloader_of([ValueError("bad yaml"), make_config(2)]))
    rig.start()
    rig.signal(signal.SIGTTIN)  # a resized pool comes back resized
    rig.boot_all()
    stop_all(rig)

    rig.signal(signal.SIGHUP)  # the reload fails: the current generation's workers all the same

    assert matching(caplog, "HUP: starting 3 workers again")
    assert matching(caplog, "reload failed: bad yaml")
    assert [(h.number, h.generation) for h in rig.live()] == [(1, 1), (2, 1), (3, 1)]
    assert (rig.master.target, rig.master.paused) == (3, None)
    rig.boot_all()
    assert rig.snapshot()["master"]["state"] == "running"

    # a second HUP, after the pause, is an ordinary reload
    rig.signal(signal.SIGHUP)
    assert rig.master.pending is not None and rig.master.target == 3


def test_ttin_after_winch_starts_one_worker(make_rig: Callable[..., Rig]) -> None:
    rig = make_rig(count=2)
    rig.start()
    stop_all(rig)

    rig.signal(signal.SIGTTOU)  # nothing to take away
    assert rig.live() == []
    rig.signal(signal.SIGTTIN)

    assert [h.number for h in rig.live()] == [1]
    assert (rig.master.target, rig.master.paused) == (1, None)


def test_the_end_of_the_new_master_brings_the_workers_back(
    make_rig: Callable[..., Rig], caplog: pytest.LogCaptureFixture
) -> None:
    """unicorn's sequence: USR2, WINCH to the old master, and if the new one fails, the old
    one serves again -- here without waiting for the operator's HUP."""
    rig = make_rig(count=2)
    stub = StubUpgrader()
    rig.master.upgrader = stub  # type: ignore[assignment]
    rig.start()
    rig.signal(signal.SIGUSR2)
    stop_all(rig)
    assert matching(caplog, "the master started by USR2 (pid 4242) serves alone")

    rig.exit(4242, exit_status(1))

    assert matching(caplog, "upgrade ended: starting 2 workers again")
    assert [h.number for h in rig.live()] == [1, 2]


def test_winch_is_refused_where_it_cannot_be_meant(
    make_rig: Callable[..., Rig], caplog: pytest.LogCaptureFixture
) -> None:
    rig = make_rig(count=1, reloader=reloader_of([make_config(1)]))
    rig.tick()  # booting: not ready yet
    rig.signal(signal.SIGWINCH)
    rig.boot_all()
    rig.kernel.foreground = True  # a terminal's window was resized
    rig.signal(signal.SIGWINCH)
    rig.kernel.foreground = False
    rig.signal(signal.SIGHUP)
    rig.signal(signal.SIGWINCH)  # the reload's canary is booting
    rig.boot_all()
    rig.signal(signal.SIGWINCH)
    rig.signal(signal.SIGWINCH)

    assert [m.split(": ", 1)[1] for m in matching(caplog, "WINCH ignored")] == [
        "the server is not ready yet",
        "the master runs in a terminal's foreground, where resizing the window sends WINCH "
        "(run it detached to use WINCH)",
        "a reload is under way",
        "the workers are already stopped (HUP or TTIN starts them)",
    ]
    assert rig.master.paused == 1


def test_winch_while_stopping_changes_nothing(make_rig: Callable[..., Rig]) -> None:
    rig = make_rig(count=2)
    rig.start()
    rig.signal(signal.SIGTERM, signal.SIGWINCH)
    assert rig.master.paused is None


def test_ttin_after_winch_brings_a_dynamic_pool_back_to_its_floor(
    make_rig: Callable[..., Rig],
) -> None:
    # it started one worker, below workers.count, where TTOU then said "a dynamic pool
    # keeps at least workers.count" and nothing brought it back up
    rig = make_rig(count=3, max=6)
    rig.start()
    stop_all(rig)
    rig.signal(signal.SIGTTIN)
    assert sorted(h.number for h in rig.live()) == [1, 2, 3]
    assert (rig.master.target, rig.master.paused) == (3, None)
    rig.signal(signal.SIGTTIN)  # the pause is over: one more, as ever
    assert rig.master.target == 4


def test_no_replacement_starts_while_the_workers_are_stopped(
    make_rig: Callable[..., Rig],
) -> None:
    """A worker queued for recycling, and the dynamic pool's growth, wait for the pause to end."""
    rig = make_rig(count=1, max=4, min_spare=2)
    rig.start()
    (handle,) = rig.live()
    rig.master.recycle(handle, "max_requests")
    stop_all(rig)
    for _ in range(3):
        rig.second()
    assert rig.live() == [] and rig.master.recycle_queue == []
    assert rig.master.target == 0


def test_usr2_while_the_workers_are_stopped_hands_over_the_size_they_had(
    make_rig: Callable[..., Rig],
) -> None:
    rig = make_rig(count=2)
    stub = StubUpgrader()
    rig.master.upgrader = stub  # type: ignore[assignment]
    rig.start()
    rig.signal(signal.SIGTTIN)
    rig.boot_all()
    stop_all(rig)
    rig.signal(signal.SIGUSR2)
    assert stub.started == [(3, 2)]  # not WINCH's 0: the new master must serve
