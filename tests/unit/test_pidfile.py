"""The pidfile when two starts race: both find no file at their start, the first to write
wins, and the second is refused without touching the winner's file."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from prefork.pidfile import PidFile, PidFileError, create_exclusively, read_pid


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
