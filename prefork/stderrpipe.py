"""A worker's standard error as error-log records, when the error log is syslog.

With the error log on syslog, fd 2 of the master is the terminal it started from (a
detached daemon's /dev/null), so what bypasses `logging` (faulthandler's stack dump at
workers.timeout, print(file=sys.stderr), warnings, C libraries, a fatal error) was lost.
Each worker then gets a pipe of its own as fd 2; the master reads it in its loop (the read
end is in its poll set) and logs each line as an ERROR record carrying the worker's pid
(Master.read_stderr). One pipe per worker, not one for the server: faulthandler writes a
line in many pieces, and two workers' dumps would interleave mid-line in a shared pipe, nor
could a line be told apart by worker.

The write end stays blocking: O_NONBLOCK would make sys.stderr raise BlockingIOError in the
application on a full pipe (and lose the rest of the line). A worker blocks only while the
master is not reading (its loop blocked in a preloaded reload's import, a hook), and the
pipe holds PIPE_SIZE meanwhile; once the master is gone the read end is closed and a write
fails (EPIPE; SIGPIPE is ignored, as Python sets it) instead of blocking. The worker's
sys.stderr (and sys.stdout sharing the pipe) then points its descriptor at /dev/null and
counts the write as done (`WriteEnd`): a print in the request an orphaned worker finishes
is not the application's BrokenPipeError.

A detached daemon's master has no stderr of its own either (/dev/null), and it cannot read
a pipe of its own: a full one would block it for good, and what a dying master writes last
(a fatal error) would never be read. Its fd 2 is a pipe to a process of its own
(`relay_stderr`), which sends each line to syslog as the master's, with a handler of its
own (one that fails writes to the relay's /dev/null: a failing syslog handler's complaint
cannot come back as a record), and exits at end of file: when the master, and whatever it
started that still holds its stderr, are gone.

Invariants: `Lines` does no I/O; `StderrReader` is the master's only, `WriteEnd` a worker's
and the master's; the relay leaves through os._exit.
"""

from __future__ import annotations

import fcntl
import gc
import io
import logging
import os
import signal
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, TextIO

import setproctitle

from prefork.signals import ALL_SIGNALS, set_mask

if TYPE_CHECKING:
    from _typeshed import ReadableBuffer

PIPE_SIZE = 1 << 20  # /proc/sys/fs/pipe-max-size's default: what an unprivileged user may set
READ_SIZE = 65536  # per pipe per tick: a worker that floods its stderr cannot hold the loop
# A longer line is cut into records of this many bytes: rsyslog's default maxMessageSize is
# 8 KiB (it truncates above), and a unix datagram must fit its socket's buffer.
LINE_MAX = 8000


def open_pipe() -> tuple[int, int]:
    """(read end, write end): both close-on-exec (the write end loses it when dup2'ed onto
    fd 2, so the worker's own children write there too), the read end non-blocking, the
    buffer PIPE_SIZE where the system allows it (else the default 64 KiB)."""
    read_end, write_end = os.pipe2(os.O_CLOEXEC)
    os.set_blocking(read_end, False)
    try:
        fcntl.fcntl(write_end, fcntl.F_SETPIPE_SZ, PIPE_SIZE)
    except OSError:  # above pipe-max-size, or the user's pipe-user-pages-soft is used up
        pass
    return read_end, write_end


def _cut(data: bytes, limit: int) -> int:
    """Where to cut `data` (longer than `limit`) at most `limit` bytes in: before a UTF-8
    character that would straddle the cut, so that neither piece decodes to a U+FFFD."""
    for cut in range(limit, max(limit - 3, 1) - 1, -1):
        if data[cut] & 0xC0 != 0x80:  # not a continuation byte: a character starts here
            return cut
    return limit  # not UTF-8 anyway


class Lines:
    """Bytes in, lines out: a line is kept until its newline arrives (or LINE_MAX bytes of
    it, which go out as a record of their own), the rest at end of file (finish). Bytes that
    are not UTF-8 are decoded with U+FFFD; a trailing CR goes, and so do empty lines
    (faulthandler separates threads with one)."""

    def __init__(self) -> None:
        self._partial = b""

    def feed(self, data: bytes) -> list[str]:
        pieces = (self._partial + data).split(b"\n")
        rest = pieces.pop()
        while len(rest) > LINE_MAX:
            cut = _cut(rest, LINE_MAX)
            pieces.append(rest[:cut])
            rest = rest[cut:]
        self._partial = rest
        return _decoded(pieces)

    def finish(self) -> list[str]:
        """The last line, which had no newline."""
        rest, self._partial = self._partial, b""
        return _decoded([rest])


def _decoded(pieces: list[bytes]) -> list[str]:
    lines: list[str] = []
    for piece in pieces:
        while len(piece) > LINE_MAX:
            cut = _cut(piece, LINE_MAX)
            lines.append(piece[:cut].decode("utf-8", "replace"))
            piece = piece[cut:]
        text = piece.rstrip(b"\r").decode("utf-8", "replace")
        if text.strip():
            lines.append(text)
    return lines


class StderrReader:
    """The master's end of one worker's stderr pipe."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.lines = Lines()
        # end of file while the worker lives on: it closed fd 2 or put something else there
        # (a library's dup2 of /dev/null). The master then stops polling this end, which
        # would otherwise be readable, and wake its loop, at every pass until the worker exits.
        self.ended = False

    def read(self) -> list[str]:
        """What one read brings (READ_SIZE at most): its complete lines; at end of file the
        last line, without its newline, and `ended`."""
        try:
            data = os.read(self.fd, READ_SIZE)
        except (BlockingIOError, InterruptedError):
            return []
        if not data:
            self.ended = True
            return self.lines.finish()
        return self.lines.feed(data)

    def drain(self) -> list[str]:
        """Everything left, the last line without its newline too: the worker has exited.
        Ends at what is there now, and after a full pipe's worth at most (a process the
        worker started may still hold the write end, even write on: it gets EPIPE once this
        end is closed)."""
        lines: list[str] = []
        for _ in range(PIPE_SIZE // READ_SIZE + 1):
            try:
                data = os.read(self.fd, READ_SIZE)
            except InterruptedError:
                continue
            except BlockingIOError:
                break
            if not data:
                break
            lines.extend(self.lines.feed(data))
        return lines + self.lines.finish()

    def close(self) -> None:
        os.close(self.fd)


def to_devnull(fd: int) -> None:
    """Point `fd` at /dev/null: nobody reads the pipe it was any more."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, fd)
    finally:
        os.close(devnull)


class WriteEnd(io.FileIO):
    """A worker's fd 2 (or 1) as its sys.stderr (sys.stdout) writes it: the pipe's write
    end. A write that fails with EPIPE (the master is gone, and the read end with it; the
    worker sees that only between requests) points the descriptor at /dev/null and counts
    as done, as every later one does there: the application's print must not fail the
    request the orphaned worker is finishing (a 500 for a log line). A daemon master's
    sys.stderr too, on its relay's pipe (the relay killed: a hook's print goes on)."""

    def write(self, data: ReadableBuffer, /) -> int:
        try:
            return super().write(data)
        except BrokenPipeError:
            to_devnull(self.fileno())
            return memoryview(data).nbytes


def text_stream(fd: int, like: TextIO | None) -> io.TextIOWrapper:
    """A line-buffered text stream on the pipe `fd` (not closing it), encoding as `like`
    (the stream it replaces) did."""
    return io.TextIOWrapper(
        io.BufferedWriter(WriteEnd(fd, "w", closefd=False)),
        encoding=getattr(like, "encoding", None) or "utf-8",
        errors=getattr(like, "errors", None) or "backslashreplace",
        line_buffering=True,
    )


# Signals that reach the relay with its master's process group (kill -TERM -PGID, systemd's
# KillMode=control-group, a terminal's HUP and WINCH): it reads on until the master is gone,
# so that what the master writes while it stops still arrives.
RELAY_IGNORES = (
    signal.SIGHUP, signal.SIGINT, signal.SIGQUIT, signal.SIGTERM, signal.SIGUSR1,
    signal.SIGUSR2, signal.SIGTTIN, signal.SIGTTOU, signal.SIGWINCH,
)


def relay_stderr(make_handler: Callable[[], logging.Handler]) -> None:
    """Point this process's fd 2 (and sys.stderr) at a pipe that a process of its own reads
    into `make_handler()` (made there), each line an ERROR record with this process's pid,
    `master stderr: LINE`. The relay is a grandchild (not one of the master's children,
    which are its workers), blocks every signal from fork until its own dispositions are
    set (the master's handlers would write to the master's signal pipe), and keeps only
    the pipe's read end. Raises OSError (fd 2 unchanged) if the pipe or the fork fails."""
    master = os.getpid()
    read_end, write_end = open_pipe()
    try:
        old_mask = set_mask(signal.SIG_BLOCK, ALL_SIGNALS)
        try:
            child = os.fork()
            if child == 0:
                code = 1
                try:
                    code = _relay(read_end, master, make_handler) if os.fork() == 0 else 0
                finally:
                    os._exit(code)
        finally:
            set_mask(signal.SIG_SETMASK, old_mask)
        _, status = os.waitpid(child, 0)  # the intermediate process, gone at once
        if status:
            raise OSError(f"the relay's fork failed (status {status})")
        sys.stderr.flush()
        os.dup2(write_end, 2)
    finally:
        os.close(read_end)
        os.close(write_end)
    sys.stderr = text_stream(2, sys.stderr)


def _relay(read_end: int, master: int, make_handler: Callable[[], logging.Handler]) -> int:
    """The relay's life: until end of file, each line of the master's stderr to syslog."""
    gc.freeze()  # the master's heap is not this process's to walk (see System.spawn)
    signal.set_wakeup_fd(-1)
    for signum in ALL_SIGNALS:
        if callable(signal.getsignal(signum)):
            signal.signal(signum, signal.SIG_DFL)
    for signum in RELAY_IGNORES:
        signal.signal(signum, signal.SIG_IGN)
    for fd in (0, 1, 2):  # a failing handler complains to /dev/null, not to its own input
        to_devnull(fd)
    os.closerange(3, read_end)  # listeners, the daemon's ready pipe, the master's logs...
    os.closerange(read_end + 1, os.sysconf("SC_OPEN_MAX"))
    set_mask(signal.SIG_SETMASK, ())
    setproctitle.setproctitle(f"preforkd: stderr relay (master {master})")
    os.set_blocking(read_end, True)
    handler = make_handler()
    lines = Lines()
    while True:
        data = os.read(read_end, READ_SIZE)
        for line in lines.feed(data) if data else lines.finish():
            record = logging.LogRecord(
                "prefork", logging.ERROR, __file__, 0, "master stderr: %s", (line,), None
            )
            record.process = master
            if record.levelno >= handler.level:  # logging.level: critical drops them
                handler.handle(record)
        if not data:
            handler.close()
            return 0
