"""prefork.stderrpipe: a worker's stderr bytes into the lines the master logs. Each input is
fed whole, byte by byte, and in random splits; the lines must be the same."""

from __future__ import annotations

import fcntl
import logging
import os
import random
import sys
import time
from pathlib import Path

import pytest

from prefork.stderrpipe import (
    LINE_MAX,
    Lines,
    StderrReader,
    open_pipe,
    relay_stderr,
    text_stream,
)
from tests.unit.splits import bytewise, split_at

DUMP = (
    b"Fatal Python error: Aborted\n\n"
    b"Current thread 0x00007f (most recent call first):\n"
    b'  File "/srv/app.py", line 7 in hang_here\r\n'
    b'  File "/srv/app.py", line 12 in application\n'
    b"\n"
    b"caf\xc3\xa9 and \xff\xfe not UTF-8\n"
    b"no newline at the end"
)
EXPECTED = [
    "Fatal Python error: Aborted",
    "Current thread 0x00007f (most recent call first):",
    '  File "/srv/app.py", line 7 in hang_here',
    '  File "/srv/app.py", line 12 in application',
    "café and \ufffd\ufffd not UTF-8",
    "no newline at the end",
]


def lines_of(feeds: list[bytes]) -> list[str]:
    splitter = Lines()
    out: list[str] = []
    for feed in feeds:
        out.extend(splitter.feed(feed))
    return out + splitter.finish()


def test_whole_bytewise_and_in_random_splits() -> None:
    assert lines_of([DUMP]) == EXPECTED
    assert lines_of(bytewise(DUMP)) == EXPECTED
    rng = random.Random(7)
    for _ in range(200):
        cuts = [rng.randrange(len(DUMP) + 1) for _ in range(rng.randrange(1, 8))]
        assert lines_of(split_at(DUMP, cuts)) == EXPECTED, cuts


def test_a_partial_line_waits_for_its_newline() -> None:
    splitter = Lines()
    assert splitter.feed(b"half a ") == []
    assert splitter.feed(b"line\nand") == ["half a line"]
    assert splitter.finish() == ["and"]
    assert splitter.finish() == []


@pytest.mark.parametrize("feeds", [1, 3, 1000])
def test_a_line_longer_than_line_max_is_cut_into_records_at_character_boundaries(
    feeds: int,
) -> None:
    """Longer than a pipe buffer: the master must not wait for its end, nor hold it all;
    no cut falls inside a UTF-8 character (which would give U+FFFD on both sides)."""
    line = ("é" * (3 * LINE_MAX)).encode() + b"!\n"
    size = -(-len(line) // feeds)
    pieces = [line[i:i + size] for i in range(0, len(line), size)]
    out = lines_of(pieces)
    assert "".join(out) == "é" * (3 * LINE_MAX) + "!"
    assert all(len(text.encode()) <= LINE_MAX for text in out)
    assert "\ufffd" not in "".join(out)
    assert len(out) == 7  # 6 * LINE_MAX bytes of "é" in six records, then "!"


def test_the_reader_drains_to_end_of_file_with_the_last_partial_line() -> None:
    read_end, write_end = open_pipe()
    reader = StderrReader(read_end)
    try:
        assert reader.read() == []  # nothing yet: no wait
        os.write(write_end, b"one\ntwo\nthree")
        assert reader.read() == ["one", "two"]
        os.write(write_end, b" and more")
        os.close(write_end)
        write_end = -1
        assert reader.drain() == ["three and more"]
    finally:
        reader.close()
        if write_end >= 0:
            os.close(write_end)


def test_end_of_file_while_reading_ends_the_reader_with_the_last_line() -> None:
    """DEFECT (review). A worker that closed its fd 2, or put /dev/null there, left the read
    end at end of file: read() returned nothing and the master kept the end in its poll
    set, readable, so its loop woke at every pass until that worker exited. The reader
    now says it has ended, with what was left of a line, and the master drops it."""
    read_end, write_end = open_pipe()
    reader = StderrReader(read_end)
    try:
        os.write(write_end, b"one\ntwo")
        assert reader.read() == ["one"] and not reader.ended
        os.close(write_end)
        assert reader.read() == ["two"]
        assert reader.ended
    finally:
        reader.close()


def test_the_pipe_holds_a_mebibyte_where_the_system_allows_it() -> None:
    """What a worker may write while the master's loop is blocked before it waits."""
    read_end, write_end = open_pipe()
    try:
        with open("/proc/sys/fs/pipe-max-size") as limit:
            allowed = int(limit.read())
        size = fcntl.fcntl(write_end, fcntl.F_GETPIPE_SZ)
        if allowed >= 1 << 20 or os.geteuid() == 0:
            assert size == 1 << 20
        assert os.get_blocking(write_end)  # a full pipe waits; it never raises in the app
        assert not os.get_blocking(read_end)
    finally:
        os.close(read_end)
        os.close(write_end)


def test_a_write_to_the_pipe_of_a_master_gone_goes_to_dev_null_without_an_error() -> None:
    """The worker's sys.stderr on its pipe: once the read end is closed (the master died),
    a print raised BrokenPipeError in the application, and its client got a 500. The
    stream now points the descriptor at /dev/null and takes the line."""
    read_end, write_end = open_pipe()
    stream = text_stream(write_end, None)
    try:
        print("while the master reads", file=stream)
        assert os.read(read_end, 100) == b"while the master reads\n"
        os.close(read_end)
        print("after the master's end", file=stream)  # must not raise
        print("and after that", file=stream)
        stream.flush()
        assert os.path.samestat(os.fstat(write_end), os.stat(os.devnull))
    finally:
        stream.close()  # not the descriptor: closefd=False
        os.close(write_end)


def test_the_relay_logs_each_line_of_the_stderr_it_took_over_and_ends_with_its_writer(
    tmp_path: Path,
) -> None:
    """A detached daemon's master points fd 2 at a relay (its own process), which logs
    each line with the master's pid, the last one without its newline too, once the
    master is gone. Here a forked child is the master, and the relay's handler a file."""
    relayed = tmp_path / "relayed"

    def handler() -> logging.Handler:
        made = logging.FileHandler(relayed)
        made.setFormatter(logging.Formatter("%(process)d %(levelname)s %(message)s"))
        return made

    child = os.fork()
    if child == 0:
        code = 1
        try:
            relay_stderr(handler)
            print("printed", file=sys.stderr)
            os.write(2, b"written\nlast words")
            code = 0
        finally:
            os._exit(code)
    _, status = os.waitpid(child, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    expected = [f"{child} ERROR master stderr: {text}"
                for text in ("printed", "written", "last words")]
    deadline = time.monotonic() + 10
    while not relayed.exists() or relayed.read_text().splitlines() != expected:
        assert time.monotonic() < deadline, relayed.read_text() if relayed.exists() else None
        time.sleep(0.02)
