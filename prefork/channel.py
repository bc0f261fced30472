"""The channel between the master and one worker.

Invariants: a SOCK_SEQPACKET socketpair, so every send is one message and a read never
splits or merges two; file descriptors (SCM_RIGHTS) travel inside the message that describes
them and arrive close-on-exec. Reads never wait. The master's end is non-blocking; a send it
cannot make at once is reported, never waited for.
"""

from __future__ import annotations

import array
import os
import socket
import struct

# master -> worker (one byte each, except those that carry connections)
MSG_STOP = b"S"  # finish what you hold, answer what is queued, exit
# as MSG_STOP, but first pass idle keep-alive connections to the master: "H" + the ids
# (listener_id) of the listeners whose connections the serving workers can take
MSG_HAND_OVER = b"H"
MSG_REOPEN = b"O"  # reopen log files
# worker -> master
MSG_READY = b"R"  # app loaded, serving
MSG_BOOT_ERROR = b"E"  # "E" + why the app could not be loaded, then exit
MSG_RECYCLE = b"Q"  # max_requests reached, please replace me
# "B" + a worker's pid + MSG_CONNS's body: connections just accepted, not read from, for that
# less loaded worker; the master passes them on as MSG_FRESH, or back to the sender as
# MSG_BACK when no other worker can take them (the sender tells its own apart: it waits for
# them, or for MSG_TAKEN, before it may exit)
MSG_BALANCE = b"B"
MSG_FRESH = b"F"
MSG_BACK = b"N"
MSG_TAKEN = b"T"  # master -> worker: another worker took what your last MSG_BALANCE carried
# as MSG_BALANCE and MSG_FRESH, for keep-alive connections that have been served (their
# client is between requests): "V" + pid + MSG_CONNS's body from a worker inside a long
# request (http.keepalive_relief), passed on as "K" (answered as MSG_BALANCE is), or back
# to the sender as "M" (its own, still served ones, as MSG_BACK is for MSG_BALANCE)
MSG_RELIEF = b"V"
MSG_KEPT = b"K"
MSG_KEPT_BACK = b"M"
# both ways: "C" + for each connection its listener's id and the monotonic time at which it
# is closed if still idle (CLOCK_MONOTONIC is one clock for every process); the descriptors
# are attached in the same order
MSG_CONNS = b"C"
_CONN = struct.Struct("=qd")
_ID = struct.Struct("=q")
_PID = struct.Struct("=i")

MAX_FDS = 250  # per message; Linux refuses more than SCM_MAX_FD (253)
MAX_PENDING = 64  # messages a stopping worker reads before it exits
MAX_MESSAGE = 65536
MAX_BOOT_ERROR = 8192  # a boot error's text is cut to this, to fit any socket buffer
_FDS_SPACE = socket.CMSG_SPACE(MAX_FDS * array.array("i").itemsize)


def pair() -> tuple[socket.socket, socket.socket]:
    return socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)


def receive(sock: socket.socket) -> tuple[bytes, list[int]] | None:
    """The next message and the descriptors it carries, without waiting: None if there is
    none yet, (b"", []) at end of stream (the other side closed) or on an error."""
    fds = array.array("i")
    try:
        # not socket.recv_fds: before Python 3.12 it ignores its flags argument
        data, ancillary, _flags, _addr = sock.recvmsg(
            MAX_MESSAGE, _FDS_SPACE, socket.MSG_DONTWAIT | socket.MSG_CMSG_CLOEXEC
        )
    except (BlockingIOError, InterruptedError):
        return None
    except OSError:
        return b"", []
    for level, kind, payload in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(payload[: len(payload) - len(payload) % fds.itemsize])
    return data, list(fds)


def listener_id(fd: int) -> int:
    """What names a listening socket in every process: its inode (a descriptor number can
    name another socket in another generation)."""
    return os.fstat(fd).st_ino


def hand_over_message(ids: list[int]) -> bytes:
    return MSG_HAND_OVER + b"".join(_ID.pack(i) for i in ids)


def parse_hand_over(data: bytes) -> set[int]:
    body = data[1:]
    return {i for (i,) in _ID.iter_unpack(body[: len(body) - len(body) % _ID.size])}


def send_conns(
    sock: socket.socket,
    conns: list[tuple[int, int, float]],
    head: bytes = MSG_CONNS,
    wait: bool = True,
) -> bool:
    """Send (connection fd, listener id, deadline) triples, at most MAX_FDS, after `head`
    (MSG_CONNS, MSG_FRESH, MSG_BACK, or a balance_head); without `wait`, never block on a full
    channel. False if the message could not be sent (the caller still owns, and closes,
    every descriptor)."""
    if not conns:
        return True
    body = b"".join(_CONN.pack(listener, deadline) for _, listener, deadline in conns)
    fds = array.array("i", [fd for fd, _, _ in conns])
    try:
        # not socket.send_fds: before Python 3.12 it ignores its flags argument
        sock.sendmsg(
            [head + body],
            [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fds)],
            0 if wait else socket.MSG_DONTWAIT,
        )
    except OSError:
        return False
    return True


def balance_head(pid: int, head: bytes = MSG_BALANCE) -> bytes:
    """MSG_BALANCE (or MSG_RELIEF) for worker `pid`."""
    return head + _PID.pack(pid)


def parse_balance(data: bytes, fds: list[int]) -> tuple[int, list[tuple[int, int, float]]]:
    """The target pid and the connections of a MSG_BALANCE or MSG_RELIEF message."""
    if len(data) < 1 + _PID.size:
        return 0, parse_conns(b"", fds)
    (pid,) = _PID.unpack_from(data, 1)
    return pid, parse_conns(data[_PID.size :], fds)


def parse_conns(data: bytes, fds: list[int]) -> list[tuple[int, int, float]]:
    """The (connection fd, listener id, deadline) triples of a MSG_CONNS, MSG_FRESH, MSG_KEPT
    or MSG_BACK message; descriptors that came without a description (a malformed message)
    get listener id -1, so the caller closes them."""
    body = data[1:]
    described = list(_CONN.iter_unpack(body[: len(body) - len(body) % _CONN.size]))
    return [
        (fd, *described[i]) if i < len(described) else (fd, -1, 0.0) for i, fd in enumerate(fds)
    ]
