"""The scoreboard: one fixed-size slot per worker in anonymous shared memory.

Invariants: created by the master before any fork; a worker writes only its own slot, with
`struct.pack_into` (no lock, no syscall per request); the master reads, and writes only the
last byte of a slot (the stop request). A read retries until two consecutive copies agree, so
a half-written slot is never acted on.
"""

from __future__ import annotations

import enum
import mmap
import struct
import time
from typing import NamedTuple

SLOT_SIZE = 256
# state, request start (monotonic s), requests served | method, target | pid, generation, number
_HEAD = struct.Struct("<B7xdQ")
_REQUEST = struct.Struct("<16s192s")
_IDENT = struct.Struct("<iII")
_REQUEST_OFFSET = _HEAD.size
_IDENT_OFFSET = _REQUEST_OFFSET + _REQUEST.size
_STATE_STARTED = struct.Struct("<B7xd")
# The one byte the master writes: "finish this request with Connection: close and stop".
_STOP_OFFSET = SLOT_SIZE - 1
assert _IDENT_OFFSET + _IDENT.size <= _STOP_OFFSET


class Activity(enum.IntEnum):
    """What a worker is doing, as it reports it (not the master's view of its lifecycle)."""

    EMPTY = 0
    BOOTING = 1
    IDLE = 2
    BUSY = 3
    DRAINING = 4


class SlotView(NamedTuple):
    activity: Activity
    started: float
    requests: int
    method: str
    target: str
    pid: int
    generation: int
    number: int


class Scoreboard:
    """`capacity` slots; index i belongs to at most one live worker at a time."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.memory = mmap.mmap(-1, capacity * SLOT_SIZE)

    def slot(self, index: int) -> Slot:
        return Slot(self.memory, index * SLOT_SIZE)

    def read(self, index: int) -> SlotView:
        offset = index * SLOT_SIZE
        raw = self.memory[offset : offset + SLOT_SIZE]
        for _ in range(3):
            again = self.memory[offset : offset + SLOT_SIZE]
            if again == raw:
                break
            raw = again
        state, started, requests = _HEAD.unpack_from(raw, 0)
        method, target = _REQUEST.unpack_from(raw, _REQUEST_OFFSET)
        pid, generation, number = _IDENT.unpack_from(raw, _IDENT_OFFSET)
        return SlotView(
            Activity(state),
            started,
            requests,
            method.rstrip(b"\0").decode("latin-1"),
            target.rstrip(b"\0").decode("latin-1"),
            pid,
            generation,
            number,
        )

    def request_stop(self, index: int) -> None:
        """Tell a busy worker, without a syscall, that its current response is its last."""
        self.memory[index * SLOT_SIZE + _STOP_OFFSET] = 1

    def clear(self, index: int) -> None:
        offset = index * SLOT_SIZE
        self.memory[offset : offset + SLOT_SIZE] = bytes(SLOT_SIZE)

    def close(self) -> None:
        self.memory.close()


class Slot:
    """A worker's writer for its own slot. Methods are on the per-request path: keep them cheap."""

    __slots__ = ("_memory", "_offset", "requests")

    def __init__(self, memory: mmap.mmap, offset: int) -> None:
        self._memory = memory
        self._offset = offset
        self.requests = 0

    def claim(self, pid: int, generation: int, number: int) -> None:
        self._memory[self._offset : self._offset + SLOT_SIZE] = bytes(SLOT_SIZE)
        _IDENT.pack_into(self._memory, self._offset + _IDENT_OFFSET, pid, generation, number)
        _HEAD.pack_into(self._memory, self._offset, Activity.BOOTING, 0.0, 0)

    def busy(self, method: bytes, target: bytes) -> None:
        """A request began; the target is written before the state so the master never pairs
        BUSY with a previous request's target."""
        _REQUEST.pack_into(self._memory, self._offset + _REQUEST_OFFSET, method, target)
        _STATE_STARTED.pack_into(self._memory, self._offset, Activity.BUSY, time.monotonic())

    def done(self) -> None:
        self.requests += 1
        _HEAD.pack_into(self._memory, self._offset, Activity.IDLE, 0.0, self.requests)

    def stop_requested(self) -> bool:
        return self._memory[self._offset + _STOP_OFFSET] != 0

    def set(self, activity: Activity) -> None:
        _HEAD.pack_into(self._memory, self._offset, activity, 0.0, self.requests)
