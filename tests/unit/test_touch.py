"""prefork.touch: which looks at touch_reload's and touch_logreopen's files find a change.

Modification times are set with os.utime, never left to the clock: two writes within one
tick of the file system's clock can carry the same time.
"""

from __future__ import annotations

import itertools
import logging
import os
import signal
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from prefork.channel import MSG_REOPEN
from prefork.config import Config, ConfigError, from_mapping, load
from prefork.master import TOUCH_CHECK_INTERVAL, Generation
from prefork.sockets import Listener
from prefork.touch import Change, TouchWatch, touch_lists
from prefork.worker import EXIT_APP_LOAD_ERROR
from tests.unit.fakes import Rig, exit_status, matching

pytestmark = pytest.mark.usefixtures("prefork_log_propagates")

NS = 1_000_000_000


def stamp(path: Path, seconds: int, content: str = "") -> None:
    """Write `content` to `path` and set its modification time to `seconds`."""
    path.write_text(content)
    os.utime(path, ns=(seconds * NS, seconds * NS))


def reload_changes(watch: TouchWatch, *paths: Path) -> list[str]:
    return [f"{c.path} {c.how}" for c in watch.changes("touch_reload", map(str, paths))]


def test_the_first_look_is_no_change(tmp_path: Path) -> None:
    path = tmp_path / "reload"
    stamp(path, 100)
    watch = TouchWatch()
    assert reload_changes(watch, path) == []
    assert reload_changes(watch, path) == []


def test_a_touch_is_one_change_however_many_touches(tmp_path: Path) -> None:
    path = tmp_path / "reload"
    stamp(path, 100)
    watch = TouchWatch()
    reload_changes(watch, path)
    for seconds in (101, 102, 103):
        os.utime(path, ns=(seconds * NS, seconds * NS))
    assert reload_changes(watch, path) == [f"{path} modified"]
    assert reload_changes(watch, path) == []


def test_an_older_time_is_a_change_too(tmp_path: Path) -> None:
    path = tmp_path / "reload"
    stamp(path, 100)
    watch = TouchWatch()
    reload_changes(watch, path)
    os.utime(path, ns=(50 * NS, 50 * NS))  # `touch -d` to the past, a checkout's time
    assert reload_changes(watch, path) == [f"{path} modified"]


def test_a_new_size_at_the_same_time_is_a_change(tmp_path: Path) -> None:
    path = tmp_path / "reload"
    stamp(path, 100, "1")
    watch = TouchWatch()
    reload_changes(watch, path)
    stamp(path, 100, "12")
    assert reload_changes(watch, path) == [f"{path} modified"]


def test_a_file_renamed_over_it_is_a_change(tmp_path: Path) -> None:
    path, new = tmp_path / "reload", tmp_path / "reload.new"
    stamp(path, 100, "same")
    watch = TouchWatch()
    reload_changes(watch, path)
    stamp(new, 100, "same")  # the same time and size: only the inode tells
    os.rename(new, path)
    assert reload_changes(watch, path) == [f"{path} replaced"]


def test_a_symlink_moved_to_another_file_is_a_change(tmp_path: Path) -> None:
    """A deploy that switches a `current` symlink to a new release directory."""
    for release in ("r1", "r2"):
        (tmp_path / release).mkdir()
        stamp(tmp_path / release / "reload", 100, "same")
    current = tmp_path / "current"
    current.symlink_to("r1")
    path = current / "reload"
    watch = TouchWatch()
    reload_changes(watch, path)
    (tmp_path / "next").symlink_to("r2")
    os.rename(tmp_path / "next", current)
    assert reload_changes(watch, path) == [f"{path} replaced"]


def test_a_missing_file_is_watched_for_its_creation(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "later" / "reload"  # not even its directory yet
    watch = TouchWatch()
    assert reload_changes(watch, path) == []
    assert [r.getMessage() for r in caplog.records if r.levelno == logging.INFO] == [
        f"touch_reload: {path} does not exist; its creation will count as a touch"
    ]
    assert reload_changes(watch, path) == []
    path.parent.mkdir()
    assert reload_changes(watch, path) == []
    stamp(path, 100)
    assert reload_changes(watch, path) == [f"{path} created"]
    assert reload_changes(watch, path) == []


def test_a_file_that_disappears_is_said_once_and_its_return_is_a_change(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "reload"
    stamp(path, 100)
    watch = TouchWatch()
    reload_changes(watch, path)
    path.unlink()
    for _ in range(3):
        assert reload_changes(watch, path) == []
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == [
        f"touch_reload: {path} does not exist now; nothing is done until it is back"
    ]
    stamp(path, 100)  # back as it was, but another file
    assert reload_changes(watch, path) == [f"{path} created"]


def test_a_file_that_cannot_be_looked_at_is_not_there(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    def denied(path: str) -> os.stat_result:
        raise PermissionError(13, "Permission denied", path)

    watch = TouchWatch(stat=denied)
    assert watch.changes("touch_logreopen", ["/x"]) == []
    assert "touch_logreopen: /x cannot be looked at: Permission denied" in caplog.text


def test_each_file_and_list_counts_apart(tmp_path: Path) -> None:
    one, two = tmp_path / "one", tmp_path / "two"
    stamp(one, 100)
    stamp(two, 100)
    watch = TouchWatch()
    lists = {"touch_logreopen": [str(two)], "touch_reload": [str(one), str(two)]}
    assert watch.look(lists) == []
    stamp(two, 101)
    assert watch.look(lists) == [
        Change("touch_logreopen", str(two), "modified"),
        Change("touch_reload", str(two), "modified"),
    ]
    stamp(one, 101)
    assert watch.look(lists) == [Change("touch_reload", str(one), "modified")]


def test_a_path_no_list_names_is_forgotten(tmp_path: Path) -> None:
    """A reload that drops a file and a later one that lists it again: that is a first
    look, not a change since a look long ago."""
    path = tmp_path / "reload"
    stamp(path, 100)
    watch = TouchWatch()
    watch.look({"touch_reload": [str(path)]})
    watch.look({"touch_reload": []})
    stamp(path, 101)
    assert watch.look({"touch_reload": [str(path)]}) == []
    stamp(path, 102)
    assert watch.look({"touch_reload": [str(path)]}) == [
        Change("touch_reload", str(path), "modified")
    ]


def test_the_settings(tmp_path: Path) -> None:
    config_file = tmp_path / "c.yaml"
    config_file.write_text(
        "app: x:y\ntouch_reload: reload.txt\ntouch_logreopen: [/var/log/rotated, logs/r]\n"
    )
    config = load(str(config_file))
    assert config.touch_reload == (str(tmp_path / "reload.txt"),)  # one bare path is a list
    assert config.touch_logreopen == ("/var/log/rotated", str(tmp_path / "logs" / "r"))
    assert touch_lists(config) == {
        "touch_logreopen": config.touch_logreopen,
        "touch_reload": config.touch_reload,
    }
    assert from_mapping({"app": "x:y"}).touch_reload == ()
    with pytest.raises(ConfigError, match=r"touch_reload\[0\]: must not be empty"):
        from_mapping({"app": "x:y", "touch_reload": [""]})
    with pytest.raises(ConfigError, match="touch_logreopen: must be a list of paths"):
        from_mapping({"app": "x:y", "touch_logreopen": 5})


# --- the master ------------------------------------------------------------------------------


def touch_config(**settings: Any) -> Config:
    return from_mapping({"app": "m:app", "workers": {"count": 2}, **settings})


class Reloads:
    """A reloader that builds generation 2, 3, ... with `config` (or raises `fails`), and
    runs `during` while it "imports"; records the generation each reload started from."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.numbers = itertools.count(2)
        self.calls: list[int] = []
        self.fails: Exception | None = None
        self.during: Callable[[], None] = lambda: None

    def __call__(self, current: Generation, held: list[Listener]) -> Generation:
        self.calls.append(current.number)
        self.during()
        if self.fails is not None:
            raise self.fails
        return Generation(next(self.numbers), self.config, [])


@pytest.fixture
def touch_rig() -> Iterator[Callable[..., tuple[Rig, Reloads]]]:
    """A started Rig whose configuration has `settings` (touch_reload, ...); a reload
    gives it the same configuration again."""
    rigs: list[Rig] = []

    def make(**settings: Any) -> tuple[Rig, Reloads]:
        config = touch_config(**settings)
        reloads = Reloads(config)
        rig = Rig(config, reloads)
        rigs.append(rig)
        rig.start()
        return rig, reloads

    yield make
    for rig in rigs:
        rig.close()


def next_check(rig: Rig) -> None:
    rig.kernel.advance(TOUCH_CHECK_INTERVAL)
    rig.tick()


def test_a_touch_reloads_as_a_hup_does(
    touch_rig: Callable[..., tuple[Rig, Reloads]], tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    path = tmp_path / "reload"
    stamp(path, 100)
    rig, reloads = touch_rig(touch_reload=[str(path)])
    next_check(rig)
    assert reloads.calls == []  # the first look was the baseline

    stamp(path, 101)
    next_check(rig)

    assert reloads.calls == [1]
    assert matching(caplog, "reloading", logging.INFO) == [
        f"touch_reload: {path} modified: reloading"
    ]
    assert rig.announce.named("reloading") == [("reloading",)]
    canary = rig.worker(1, generation=2)
    rig.boot(canary.pid)
    assert rig.master.current.number == 2
    for _ in range(3):
        next_check(rig)
    assert reloads.calls == [1]  # one touch, one reload


def test_the_files_are_looked_at_once_a_second(
    touch_rig: Callable[..., tuple[Rig, Reloads]], tmp_path: Path
) -> None:
    looked: list[str] = []

    def stat(path: str) -> os.stat_result:
        looked.append(path)
        return os.stat(path)

    path = tmp_path / "reload"
    stamp(path, 100)
    rig, _ = touch_rig(touch_reload=[str(path)])
    rig.master.touch = TouchWatch(stat)
    next_check(rig)
    assert looked == [str(path)]
    for _ in range(3):
        rig.tick()
    assert looked == [str(path)]
    assert rig.kernel.waits[-1] <= TOUCH_CHECK_INTERVAL
    next_check(rig)
    assert looked == [str(path)] * 2


def test_a_touch_before_a_hup_is_part_of_its_reload(
    touch_rig: Callable[..., tuple[Rig, Reloads]], tmp_path: Path
) -> None:
    path = tmp_path / "reload"
    stamp(path, 100)
    rig, reloads = touch_rig(touch_reload=[str(path)])
    next_check(rig)

    stamp(path, 101)  # the deploy touches, and also sends HUP
    rig.kernel.advance(TOUCH_CHECK_INTERVAL)
    rig.signal(signal.SIGHUP)
    for _ in range(3):
        next_check(rig)

    assert reloads.calls == [1]


def test_a_touch_during_a_reload_makes_one_more(
    touch_rig: Callable[..., tuple[Rig, Reloads]], tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    path = tmp_path / "reload"
    stamp(path, 100)
    rig, reloads = touch_rig(touch_reload=[str(path)])
    next_check(rig)
    reloads.during = lambda: stamp(path, 101)  # after the reload read the file

    rig.signal(signal.SIGHUP)
    reloads.during = lambda: None
    for _ in range(3):
        next_check(rig)

    assert reloads.calls == [1, 1]  # the second abandoned the first one's canary, as a HUP
    assert matching(caplog, "reloading", logging.INFO) == [
        "HUP: reloading", f"touch_reload: {path} modified: reloading"
    ]


def test_a_touch_whose_reload_fails_keeps_the_old_generation(
    touch_rig: Callable[..., tuple[Rig, Reloads]], tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    path = tmp_path / "reload"
    stamp(path, 100)
    rig, reloads = touch_rig(touch_reload=[str(path)])
    old = rig.handles()
    next_check(rig)
    reloads.fails = ValueError("bad yaml")

    stamp(path, 101)
    for _ in range(3):
        next_check(rig)

    assert reloads.calls == [1]  # not tried again until the next touch
    assert matching(caplog, "reload failed: bad yaml; still serving generation 1",
                    logging.ERROR)
    assert rig.announce.named("reloaded") == [
        ("reloaded", False, "reload failed: bad yaml; still serving generation 1")
    ]
    assert rig.live() == old and rig.kernel.kills == []

    reloads.fails = None
    stamp(path, 102)
    next_check(rig)
    assert reloads.calls == [1, 1]


def test_a_missing_file_reloads_once_created(
    touch_rig: Callable[..., tuple[Rig, Reloads]], tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    path = tmp_path / "reload"
    rig, reloads = touch_rig(touch_reload=[str(path)])
    for _ in range(2):
        next_check(rig)
    assert reloads.calls == []

    stamp(path, 100)
    for _ in range(3):
        next_check(rig)

    assert reloads.calls == [1]
    assert matching(caplog, f"touch_reload: {path} created: reloading")


def test_a_file_that_disappears_reloads_nothing(
    touch_rig: Callable[..., tuple[Rig, Reloads]], tmp_path: Path
) -> None:
    path = tmp_path / "reload"
    stamp(path, 100)
    rig, reloads = touch_rig(touch_reload=[str(path)])
    next_check(rig)
    path.unlink()
    for _ in range(3):
        next_check(rig)
    assert reloads.calls == []


def test_a_touch_reopens_the_logs_as_a_usr1_does(
    touch_rig: Callable[..., tuple[Rig, Reloads]], tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    path = tmp_path / "rotated"
    stamp(path, 100)
    rig, reloads = touch_rig(touch_logreopen=str(path))
    next_check(rig)
    assert rig.logs.reopened == 0

    stamp(path, 101)
    next_check(rig)

    assert rig.logs.reopened == 1
    assert [rig.kernel.received(h.pid) for h in rig.handles()] == [MSG_REOPEN] * 2
    assert matching(caplog, f"touch_logreopen: {path} modified: log files reopened")
    assert reloads.calls == []


def test_no_touch_counts_while_the_server_stops(
    touch_rig: Callable[..., tuple[Rig, Reloads]], tmp_path: Path
) -> None:
    path = tmp_path / "reload"
    stamp(path, 100)
    rig, reloads = touch_rig(touch_reload=[str(path)])
    next_check(rig)
    rig.signal(signal.SIGTERM)
    stamp(path, 101)
    for _ in range(3):
        next_check(rig)
    assert reloads.calls == []
    assert rig.announce.named("refused") == []


def test_the_serving_generations_list_is_watched(
    touch_rig: Callable[..., tuple[Rig, Reloads]], tmp_path: Path
) -> None:
    first, second = tmp_path / "first", tmp_path / "second"
    stamp(first, 100)
    stamp(second, 100)
    rig, reloads = touch_rig(touch_reload=[str(first)])
    next_check(rig)
    reloads.config = touch_config(touch_reload=[str(second)])
    rig.signal(signal.SIGHUP)
    stamp(second, 101)  # before its generation serves: that was the first look at it
    next_check(rig)
    assert reloads.calls == [1]
    rig.boot(rig.worker(1, generation=2).pid)
    next_check(rig)
    assert reloads.calls == [1]

    stamp(first, 101)  # no longer listed
    next_check(rig)
    assert reloads.calls == [1]
    stamp(second, 102)
    next_check(rig)
    assert reloads.calls == [1, 2]


def test_a_touch_while_a_canary_cannot_boot_starts_another(
    touch_rig: Callable[..., tuple[Rig, Reloads]], tmp_path: Path
) -> None:
    """The deploy fixes what broke the first reload and touches again."""
    path = tmp_path / "reload"
    stamp(path, 100)
    rig, reloads = touch_rig(touch_reload=[str(path)])
    next_check(rig)
    stamp(path, 101)
    next_check(rig)
    rig.exit(rig.worker(1, generation=2).pid, exit_status(EXIT_APP_LOAD_ERROR))
    for _ in range(3):
        next_check(rig)
    assert rig.master.current.number == 1 and rig.master.pending is None

    stamp(path, 102)
    next_check(rig)

    assert reloads.calls == [1, 1]
    rig.boot(rig.worker(1, generation=3).pid)
    assert rig.master.current.number == 3
