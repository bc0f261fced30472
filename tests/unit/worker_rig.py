"""Workers built in process as the master builds them, each on its own real channel, and
what the tests of a worker's loop do with them (tests/unit/conftest.py has the fixtures)."""

from __future__ import annotations

import os
import select
import socket
import ssl
import time
from collections.abc import Callable
from typing import Any

from prefork import channel as chan
from prefork.channel import MSG_CONNS, MSG_KEPT
from prefork.config import from_mapping
from prefork.hooks import WorkerInfo
from prefork.logs import Logs
from prefork.scoreboard import Activity, Scoreboard
from prefork.signals import SignalQueue
from prefork.sockets import Listener
from prefork.worker import Worker, WorkerSpec

REQUEST = b"GET / HTTP/1.1\r\nHost: t\r\n\r\n"
DEADLINE = 5.0


def hello(environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", "2")])
    return [b"ok"]


class WorkerRig:
    """Workers built as the master builds them, each on its own real channel."""

    def __init__(self, listener: Listener, logs: Logs, signals: SignalQueue) -> None:
        self.listener = listener
        self.logs = logs
        self.signals = signals
        self.board = Scoreboard(4)
        self.closing: list[Any] = [self.board]
        self.clients: list[socket.socket] = []
        self.workers: list[Worker] = []

    def worker(
        self,
        number: int = 1,
        max_connections: int = 100,
        tls: ssl.SSLContext | None = None,
        protocol: str = "http",
        **http: Any,
    ) -> tuple[Worker, socket.socket]:
        """A worker and the master's end of its channel."""
        config = from_mapping(
            {
                "app": "m:app",
                "protocol": protocol,
                "workers": {"count": 2, "max_connections": max_connections},
                "http": {"keepalive_timeout": 30, **http},
            }
        )
        master_end, worker_end = chan.pair()
        self.closing += [master_end, worker_end]
        spec = WorkerSpec(
            number=number,
            generation=1,
            config=config,
            listeners=[self.listener],
            channel=worker_end,
            slot=self.board.slot(number - 1),
            logs=self.logs,
            app=hello,
            tls={} if tls is None else {self.listener.fd: tls},
        )
        info = WorkerInfo(number, 1, config, os.getpid())
        worker = Worker(spec, hello, self.signals, info)
        self.workers.append(worker)
        self.closing.append(worker.epoll)
        worker.prepare()
        worker.slot.claim(self.pid_of(number), 1, number)  # as worker_main does
        worker.slot.set(Activity.IDLE)
        return worker, master_end

    @staticmethod
    def pid_of(number: int) -> int:
        """The pid a worker's slot names (all of them live in this one process)."""
        return 10_000 + number

    def connect(self) -> socket.socket:
        address = self.listener.address
        client = socket.create_connection((address.host, address.port), timeout=DEADLINE)
        self.clients.append(client)
        return client

    def accept(self, worker: Worker) -> None:
        """Take the next queued connection, as the worker does when its epoll says so."""
        deadline = time.monotonic() + DEADLINE
        while not worker.accept(self.listener):
            assert time.monotonic() < deadline, "nothing arrived to accept"
            select.select([self.listener.sock], [], [], 0.1)

    def close(self) -> None:
        for sock in self.clients:
            sock.close()
        for worker in self.workers:
            for conn in list(worker.conns.values()):
                conn.close()
        for thing in reversed(self.closing):
            thing.close()


def read_response(client: socket.socket) -> bytes:
    """One whole response to a hello request (its length is fixed)."""
    data = b""
    while not data.endswith(b"\r\n\r\nok"):
        chunk = client.recv(4096)
        assert chunk, f"closed after {data!r}"
        data += chunk
    return data


def served_connection(rig: WorkerRig, worker: Worker, prefix: bytes = b"") -> socket.socket:
    """A client that sent one request, got its answer and stays connected, idle."""
    served = worker.slot.requests
    client = rig.connect()
    client.sendall(prefix + REQUEST)
    rig.accept(worker)  # answers at once what has arrived; the rest as its loop would
    deadline = time.monotonic() + DEADLINE
    while worker.slot.requests == served:
        assert time.monotonic() < deadline, "the request was never answered"
        conn = conn_of(worker, client)
        wait_readable(worker, conn.fd)
        worker.on_readable(conn)
    assert read_response(client).startswith(b"HTTP/1.1 200 OK\r\n")
    return client


def conn_of(worker: Worker, client: socket.socket) -> Any:
    """The worker's Connection for this client."""
    (conn,) = [c for c in worker.conns.values() if c.peer == client.getsockname()]
    return conn


def wait_readable(worker: Worker, fd: int) -> None:
    deadline = time.monotonic() + DEADLINE
    while fd not in dict(worker.epoll.poll(0.1)):
        assert time.monotonic() < deadline, "the connection never became readable"


def receive_conns(master_end: socket.socket) -> list[tuple[int, int, float]]:
    deadline = time.monotonic() + DEADLINE
    while (message := chan.receive(master_end)) is None:
        assert time.monotonic() < deadline, "the worker sent nothing"
        select.select([master_end], [], [], 0.1)
    data, fds = message
    assert data.startswith(MSG_CONNS)
    return chan.parse_conns(data, fds)


def peer_of(fd: int) -> Any:
    """The remote address of a received descriptor (the descriptor stays open)."""
    with socket.socket(fileno=os.dup(fd)) as sock:
        return sock.getpeername()


def closed_by_server(client: socket.socket) -> bool:
    client.settimeout(DEADLINE)
    try:
        return client.recv(1) == b""
    except ConnectionResetError:
        return True


def read_until_closed(client: socket.socket) -> bytes:
    """Everything the server sends until it closes; a reset fails the test."""
    client.settimeout(DEADLINE)
    data = b""
    while chunk := client.recv(65536):
        data += chunk
    return data


def kept_for(rig: WorkerRig, master_end: socket.socket, head: bytes = MSG_KEPT) -> socket.socket:
    """A client whose served keep-alive connection the master has sent down `master_end`
    after `head` (a relieved one, by default): worker 3 serves it, stops and hands it over,
    and the master forwards it, keeping no copy."""
    origin, origin_master_end = rig.worker(number=3)
    client = served_connection(rig, origin)
    (lid,) = origin.listener_ids
    origin.begin_stop()  # and no longer a taker
    origin.hand_over({lid})
    passed = receive_conns(origin_master_end)
    assert chan.send_conns(master_end, passed, head)
    for fd, _, _ in passed:
        os.close(fd)
    return client
