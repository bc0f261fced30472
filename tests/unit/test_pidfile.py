"""The pidfile when two starts race (both find no file at their start, the first to write
wins, and the second is refused without touching the winner's file), and when its pid is
proven to be another process's than the master that wrote it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from prefork.pidfile import (
    PidFile,
    PidFileError,
    create_exclusively,
    process_identity,
    read_pid,
    running_pid,
    status_path,
    written_before,
)


@pytest.fixture
def master_like() -> Iterator[int]:
    """A live process whose command line reads as a preforkd master's (`-m prefork`)."""
    proc = subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(60)", "-m", "prefork"]
    )
    try:
        yield proc.pid
    finally:
        proc.kill()
        proc.wait(10)


def test_the_second_of_two_racing_starts_is_refused_and_leaves_the_file(
    tmp_path: Path, master_like: int
) -> None:
    path = str(tmp_path / "p.pid")
    first, second = PidFile(path), PidFile(path)
    real_check = second.check
    checks: list[None] = []

    def check_made_before_the_first_wrote() -> None:
        """The second's check inside write() finds no file (the first had not written
        yet when it ran); any check after that is the real one."""
        checks.append(None)
        if len(checks) > 1:
            real_check()

    second.check = check_made_before_the_first_wrote  # type: ignore[method-assign]
    first.write(master_like)
    with pytest.raises(PidFileError, match=rf"already running as pid {master_like} "):
        second.write(master_like + 1)
    second.remove()  # the loser's exit
    assert read_pid(path) == master_like


def test_a_stale_file_is_replaced_and_a_live_predecessor_is_renamed_over(
    tmp_path: Path, master_like: int
) -> None:
    path = tmp_path / "p.pid"
    path.write_text("999999999\n")  # no such process
    pidfile = PidFile(str(path))
    pidfile.write(1234)
    assert read_pid(str(path)) == 1234
    path.write_text(f"{master_like}\n")
    PidFile(str(path), replacing=master_like).write(4321)  # USR2's new master
    assert read_pid(str(path)) == 4321


def test_create_exclusively_never_replaces(tmp_path: Path) -> None:
    path = str(tmp_path / "f")
    assert create_exclusively(path, "1\n")
    assert not create_exclusively(path, "2\n")
    assert Path(path).read_text() == "1\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f"]  # no temporary file left


def record(pidfile: Path, **fields: object) -> None:
    Path(status_path(str(pidfile))).write_text(json.dumps(fields))


def test_only_a_record_of_the_same_pid_with_another_identity_proves_a_pidfile_stale(
    tmp_path: Path, master_like: int
) -> None:
    pidfile = tmp_path / "p.pid"
    pidfile.write_text(f"{master_like}\n")
    now = process_identity(master_like)
    assert now is not None and now != process_identity(os.getpid())
    boot, ticks = now.split(":")
    assert boot == Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    assert running_pid(str(pidfile)) == master_like  # no record: the command line decides
    unproven = [{"pid": master_like + 1, "identity": "x:1"},  # another pid's record
                {"pid": master_like},  # a record from before identities
                {"pid": master_like, "identity": now}]  # its own
    for fields in unproven:
        record(pidfile, **fields)
        assert not written_before(str(pidfile), master_like), fields
        assert running_pid(str(pidfile)) == master_like
    for earlier in (f"{boot}:{int(ticks) - 1}", f"{uuid.uuid4()}:{ticks}"):
        record(pidfile, pid=master_like, identity=earlier)
        assert written_before(str(pidfile), master_like)
        assert running_pid(str(pidfile)) is None
        PidFile(str(pidfile)).write(4321)  # the start replaces it
        assert read_pid(str(pidfile)) == 4321
        pidfile.write_text(f"{master_like}\n")
    assert process_identity(999999999) is None  # no such process: nothing is proven
    record(pidfile, pid=999999999, identity="x:1")
    assert not written_before(str(pidfile), 999999999)


def test_a_master_that_gets_the_pid_of_an_earlier_record_removes_that_record(
    tmp_path: Path,
) -> None:
    """A container's master has the same pid at every start: the record its killed
    predecessor left would make the new pidfile look stale until the first one of its own."""
    pidfile = tmp_path / "p.pid"
    record(pidfile, pid=os.getpid(), identity="another-boot:1")
    PidFile(str(pidfile)).write(os.getpid())
    assert not Path(status_path(str(pidfile))).exists()
    assert read_pid(str(pidfile)) == os.getpid()
    record(pidfile, pid=os.getpid(), identity=process_identity(os.getpid()))
    PidFile(str(pidfile)).write(os.getpid())  # its own record stays
    assert Path(status_path(str(pidfile))).exists()
