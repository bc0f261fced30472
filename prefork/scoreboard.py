"""The scoreboard: one fixed-size slot per worker in anonymous shared memory.

Invariants: created by the master before any fork; a worker writes only its own slot, with
`struct.pack_into` and a `memoryview` of counters (no lock, no syscall per request); the master
reads, and writes only the last byte of a slot (the stop request). A read retries until two
consecutive copies agree, so a half-written slot is never acted on.

Layout of a slot (512 bytes):
    0   state u8, pad, request start f64 (monotonic), requests u64, last report f64 (monotonic)
    32  method 16s, target 192s
    240 pid i32, generation u32, number u32
    252 connections held u32 (written when the number changes, read by the other workers)
    256 counters, u64 each: responses by status class 1xx..5xx, duration histogram buckets
        (non-cumulative, bounds in DURATION_BUCKETS, the last is +Inf), duration sum in
        microseconds, body bytes sent
    424 client 48s: the current request's REMOTE_ADDR (a trusted proxy's client, if any)
    511 stop request (written by the master)
"""

from __future__ import annotations

import bisect
import enum
import mmap
import struct
import time
from collections.abc import Iterator
from typing import NamedTuple

SLOT_SIZE = 512
_HEAD = struct.Struct("<B7xdQd")
_REQUEST = struct.Struct("<16s192s")
_IDENT = struct.Struct("<iII")
_STATE_STARTED = struct.Struct("<B7xd")
_REQUEST_OFFSET = 32
_IDENT_OFFSET = _REQUEST_OFFSET + _REQUEST.size
_HELD = struct.Struct("<I")
_HELD_OFFSET = _IDENT_OFFSET + _IDENT.size
_COUNTERS_OFFSET = 256
# Request duration histogram bounds in seconds (Prometheus' defaults plus 1 and 2.5 ms, since a
# prefork server answers most requests faster than the default first bucket).
DURATION_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_FIRST_BOUND = DURATION_BUCKETS[0]
_CLASSES = 5
_BUCKETS_AT = _CLASSES
_SUM_AT = _BUCKETS_AT + len(DURATION_BUCKETS) + 1
_BYTES_AT = _SUM_AT + 1
COUNTERS = _BYTES_AT + 1
_COUNTERS = struct.Struct(f"<{COUNTERS}Q")
# the current request's client (REMOTE_ADDR: an IPv6 address is 45 characters at most)
_CLIENT = struct.Struct("<48s")
_CLIENT_OFFSET = _COUNTERS_OFFSET + _COUNTERS.size
# The one byte the master writes: "finish this request with Connection: close and stop".
_STOP_OFFSET = SLOT_SIZE - 1
assert _HEAD.size <= _REQUEST_OFFSET
assert _HELD_OFFSET + _HELD.size <= _COUNTERS_OFFSET
assert _CLIENT_OFFSET + _CLIENT.size <= _STOP_OFFSET


class Activity(enum.IntEnum):
    """What a worker is doing, as it reports it (not the master's view of its lifecycle)."""

    EMPTY = 0
    BOOTING = 1
    IDLE = 2  # waiting, holding no connection
    BUSY = 3  # answering a request
    DRAINING = 4  # stopping: finishing what it holds
    KEEPALIVE = 5  # waiting, holding idle keep-alive connections
    READING = 6  # inside a request, waiting for its body from the client
    WAITING = 7  # protocol tcp: the handler is blocked on its client (not hung)


_SERVING = frozenset(
    (Activity.IDLE, Activity.BUSY, Activity.KEEPALIVE, Activity.READING, Activity.WAITING)
)
_IN_REQUEST = frozenset((Activity.BUSY, Activity.READING, Activity.WAITING))
STUCK = 0.05  # seconds in one request after which a worker is not given new connections


class SlotView(NamedTuple):
    activity: Activity
    started: float
    requests: int
    method: str
    target: str
    pid: int
    generation: int
    number: int
    last: float = 0.0  # monotonic time of the worker's last report
    connections: int = 0  # connections the worker holds (parked keep-alive ones included)
    client: str = ""  # the current request's REMOTE_ADDR ("" from a unix socket peer)


class Counters(NamedTuple):
    """Totals of one slot (or summed over slots)."""

    by_class: tuple[int, ...]  # 1xx..5xx
    buckets: tuple[int, ...]  # non-cumulative, one per DURATION_BUCKETS bound, then +Inf
    duration_sum: float  # seconds
    bytes_sent: int

    @classmethod
    def zero(cls) -> Counters:
        return cls((0,) * _CLASSES, (0,) * (len(DURATION_BUCKETS) + 1), 0.0, 0)

    def __add__(self, other: object) -> Counters:
        if not isinstance(other, Counters):
            return NotImplemented
        return Counters(
            tuple(a + b for a, b in zip(self.by_class, other.by_class, strict=True)),
            tuple(a + b for a, b in zip(self.buckets, other.buckets, strict=True)),
            self.duration_sum + other.duration_sum,
            self.bytes_sent + other.bytes_sent,
        )


class Scoreboard:
    """`capacity` slots; index i belongs to at most one live worker at a time."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.memory = mmap.mmap(-1, capacity * SLOT_SIZE)

    def slot(self, index: int) -> Slot:
        return Slot(self.memory, index * SLOT_SIZE)

    def _raw(self, index: int) -> bytes:
        offset = index * SLOT_SIZE
        raw = self.memory[offset : offset + SLOT_SIZE]
        for _ in range(3):
            again = self.memory[offset : offset + SLOT_SIZE]
            if again == raw:
                break
            raw = again
        return raw

    def read(self, index: int) -> SlotView:
        raw = self._raw(index)
        state, started, requests, last = _HEAD.unpack_from(raw, 0)
        method, target = _REQUEST.unpack_from(raw, _REQUEST_OFFSET)
        pid, generation, number = _IDENT.unpack_from(raw, _IDENT_OFFSET)
        (connections,) = _HELD.unpack_from(raw, _HELD_OFFSET)
        (client,) = _CLIENT.unpack_from(raw, _CLIENT_OFFSET)
        return SlotView(
            Activity(state),
            started,
            requests,
            method.rstrip(b"\0").decode("latin-1"),
            target.rstrip(b"\0").decode("latin-1"),
            pid,
            generation,
            number,
            last,
            connections,
            client.rstrip(b"\0").decode("latin-1"),
        )

    def counters(self, index: int) -> Counters:
        values = _COUNTERS.unpack_from(self._raw(index), _COUNTERS_OFFSET)
        return Counters(
            values[:_CLASSES],
            values[_BUCKETS_AT:_SUM_AT],
            values[_SUM_AT] / 1e6,
            values[_BYTES_AT],
        )

    def request_stop(self, index: int) -> None:
        """Tell a busy worker, without a syscall, that its current response is its last."""
        self.memory[index * SLOT_SIZE + _STOP_OFFSET] = 1

    def clear(self, index: int) -> None:
        offset = index * SLOT_SIZE
        self.memory[offset : offset + SLOT_SIZE] = bytes(SLOT_SIZE)

    def close(self) -> None:
        try:
            self.memory.close()
        except BufferError:
            pass  # a Slot in this process still holds its counters view


class Slot:
    """A worker's writer for its own slot. Methods are on the per-request path: keep them cheap."""

    __slots__ = ("_memory", "_offset", "_counters", "_held", "_stopping", "requests")

    def __init__(self, memory: mmap.mmap, offset: int) -> None:
        self._memory = memory
        self._offset = offset
        start = offset + _COUNTERS_OFFSET
        self._counters: memoryview | None = memoryview(memory)[
            start : start + _COUNTERS.size
        ].cast("Q")
        held = offset + _HELD_OFFSET
        self._held = memoryview(memory)[held : held + _HELD.size].cast("I")
        self._stopping = False
        self.requests = 0

    def hold(self, connections: int) -> None:
        """The number of connections this worker holds now."""
        self._held[0] = connections

    def peers(self) -> list[tuple[int, int]]:
        """(pid, slot offset) of every other worker of this slot's generation that is
        serving; a scan of the whole board (~0.2 ms), so callers keep the answer a while."""
        generation = self._generation()
        return [
            (pid, offset)
            for pid, gen, offset in self._serving()
            if gen == generation and offset != self._offset
        ]

    def outdated(self) -> bool:
        """Whether a worker of a later generation serves: a reload replaced this slot's (a
        scan of the whole board, as peers())."""
        generation = self._generation()
        return any(gen > generation for _, gen, _ in self._serving())

    def _generation(self) -> int:
        _, generation, _ = _IDENT.unpack_from(self._memory, self._offset + _IDENT_OFFSET)
        return int(generation)

    def _serving(self) -> Iterator[tuple[int, int, int]]:
        """(pid, generation, slot offset) of every worker on the board that is serving."""
        memory = self._memory
        for offset in range(0, len(memory), SLOT_SIZE):
            if memory[offset] in _SERVING:
                pid, gen, _ = _IDENT.unpack_from(memory, offset + _IDENT_OFFSET)
                if pid:
                    yield pid, gen, offset

    def held_by(self, pid: int, offset: int, now: float) -> int | None:
        """The connections worker `pid`, in the slot at `offset`, last said it holds; None
        when it cannot take one now: that slot no longer holds it serving (it stops, or
        another worker took the slot), or it has been inside one request for over
        STUCK seconds (a slow app or upload: nothing new would be answered meanwhile)."""
        memory = self._memory
        state, started = _STATE_STARTED.unpack_from(memory, offset)
        if state not in _SERVING:
            return None
        if state in _IN_REQUEST and now - started > STUCK:
            return None
        if _IDENT.unpack_from(memory, offset + _IDENT_OFFSET)[0] != pid:
            return None
        return int(_HELD.unpack_from(memory, offset + _HELD_OFFSET)[0])

    def in_request_since(self) -> float | None:
        """When (monotonic) the request this worker is inside began; None between requests.
        Read from another thread of the worker (keep-alive relief): the state and its start
        are written by one pack_into, which, like this unpack_from, holds the GIL."""
        state, started = _STATE_STARTED.unpack_from(self._memory, self._offset)
        return started if state in _IN_REQUEST and started else None

    def claim(self, pid: int, generation: int, number: int) -> None:
        self._memory[self._offset : self._offset + SLOT_SIZE] = bytes(SLOT_SIZE)
        _IDENT.pack_into(self._memory, self._offset + _IDENT_OFFSET, pid, generation, number)
        _HEAD.pack_into(self._memory, self._offset, Activity.BOOTING, 0.0, 0, time.monotonic())

    def busy(
        self, method: bytes, target: bytes, now: float | None = None, client: bytes = b""
    ) -> None:
        """A request from `client` began (at `now`, monotonic, if the caller has read the
        clock); the target and client are written before the state so the master never
        pairs BUSY with a previous request's."""
        memory = self._memory
        offset = self._offset
        _REQUEST.pack_into(memory, offset + _REQUEST_OFFSET, method, target)
        _CLIENT.pack_into(memory, offset + _CLIENT_OFFSET, client)
        _STATE_STARTED.pack_into(
            memory, offset, Activity.BUSY, time.monotonic() if now is None else now
        )

    def done(self, status: int = 0, duration: float = 0.0, sent: int = 0,
             activity: Activity = Activity.IDLE, now: float | None = None,
             served: bool = True) -> None:
        """A request ended (at `now`, monotonic, if the caller has read the clock): back to
        `activity` (DRAINING once the worker began stopping), and its status, duration and
        size counted; `served` False for one the application never saw (rejected by the
        server), which is not one of the `requests` max_requests recycles on."""
        if served:
            self.requests += 1
        if self._stopping:
            activity = Activity.DRAINING
        counters = self._counters
        # status 0: the client left before any response; the metrics count responses, so
        # that the duration histogram's count is the sum of the status classes
        if counters is not None and 100 <= status < 600:
            counters[status // 100 - 1] += 1
            # most requests fall in the first bucket: skip the search for them
            if duration <= _FIRST_BOUND:
                counters[_BUCKETS_AT] += 1
            else:
                counters[_BUCKETS_AT + bisect.bisect_left(DURATION_BUCKETS, duration)] += 1
            counters[_SUM_AT] += int(duration * 1_000_000)
            if sent:
                counters[_BYTES_AT] += sent
        _HEAD.pack_into(
            self._memory,
            self._offset,
            activity,
            0.0,
            self.requests,
            time.monotonic() if now is None else now,
        )

    def reading(self, waiting: bool) -> None:
        """In a request, waiting for the client's body (or back to busy): one byte written."""
        self._memory[self._offset] = Activity.READING if waiting else Activity.BUSY

    def set_activity(self, activity: Activity) -> None:
        """Within a request, what it is doing now (the started time stays): one byte."""
        self._memory[self._offset] = activity

    def stopping(self) -> None:
        """The worker began stopping: the slot says DRAINING from now on, between requests
        too, so the master and the other workers never count it as one that takes
        connections."""
        self._stopping = True
        self.set(Activity.DRAINING)

    def stop_requested(self) -> bool:
        return self._memory[self._offset + _STOP_OFFSET] != 0

    def set(self, activity: Activity) -> None:
        _HEAD.pack_into(
            self._memory, self._offset, activity, 0.0, self.requests, time.monotonic()
        )
