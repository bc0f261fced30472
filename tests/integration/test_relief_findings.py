"""Keep-alive relief (http.keepalive_relief) under review and chaos: what broke, and what
holds.

A real preforkd with raw keep-alive client sockets. `/` on pf_testapp answers with the
serving worker's pid, `/sleep?s=N&tag=T` does so after N seconds (logging `sleeping T`
first), `/hang` sleeps past any workers.timeout set here. Tests marked DEFECT failed before
the fix they name; tests marked PINNED hold behaviour no other test checked.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import signal
import socket
import ssl
import threading
import time
from pathlib import Path
from typing import BinaryIO

from harness import (
    APPS,
    ClientThreads,
    Server,
    ServerFactory,
    address,
    ask,
    connect,
    gone,
    http_request,
    read_response,
    self_signed_cert,
    settings,
    wait_until,
)
from test_relief import on_one_worker, sockets, start_slow

__all__ = ["sockets"]  # the fixture, shared with test_relief


def test_a_moved_request_does_not_die_with_the_taker_stuck_on_another_moved_one(
    server_factory: ServerFactory, sockets: list[socket.socket]
) -> None:
    """DEFECT. Two parked connections send requests while their worker is busy: one that
    hangs, one quick. Relief moves both to the other worker in one message, which took
    them one at a time, each answered before the next was even parked: the quick request
    waited behind the hanging one, out of reach of the taker's own relief, and died with
    the taker when the master killed it at workers.timeout (the client got a reset)."""
    server = server_factory(
        settings(
            workers={"count": 2, "timeout": 3, "timeout_grace": 0.5},
            http={"keepalive_relief": 0.5, "keepalive_timeout": 30},
        )
    )
    busy, (slow, hanging, quick) = on_one_worker(server, sockets, 3)
    start_slow(server, slow, "/sleep?s=1.5&tag=first", "first")
    hanging.sendall(http_request("GET", "/hang"))
    quick.sendall(http_request("GET", "/"))
    asked = time.monotonic()
    response = read_response(quick)
    assert response.status == 200
    assert time.monotonic() - asked < 3  # before the taker stuck in /hang is killed
    assert int(read_response(slow).body) == busy


# --- DEFECT 2: at workers.max_connections, the eviction closed a connection whose request
# --- had arrived while the worker was busy


def test_the_eviction_at_max_connections_spares_a_request_that_arrived_while_busy(
    server_factory: ServerFactory, sockets: list[socket.socket]
) -> None:
    """DEFECT. One worker, max_connections 3, holding `waiting` and `slow`. While `slow`
    sleeps, a new client connects and then `waiting` sends its request. Once free, the
    worker accepted the newcomer, reached the cap, and evicted the longest-parked
    keep-alive connection without looking: `waiting`, over its unread request (a reset).
    The sweep and a stopping worker look first (commit 79523f5); eviction did not."""
    server = server_factory(
        settings(workers={"count": 1, "max_connections": 3},
                 http={"keepalive_timeout": 30})
    )
    pid, (waiting, slow) = on_one_worker(server, sockets, 2)
    start_slow(server, slow, "/sleep?s=1&tag=evict", "evict")
    newcomer = connect(address(server), timeout=10)
    sockets.append(newcomer)
    waiting.sendall(http_request("GET", "/"))
    assert int(read_response(slow).body) == pid
    assert int(read_response(waiting).body) == pid
    assert int(ask(newcomer).body) == pid


# --- DEFECT 3: a worker waiting for its successor (max_requests) was free, was named, and
# --- was refused: the connections went back to the busy worker


SLOW_BOOT = """
import time

def slow_boot(worker):
    time.sleep(2)  # an application that takes a while to get ready (a successor boots)
"""


def not_on(
    server: Server, made: list[socket.socket], pid: int
) -> tuple[socket.socket, int] | None:
    """A new keep-alive connection and the worker that served it, if that is not `pid`."""
    sock = connect(address(server), timeout=20)
    made.append(sock)
    served = int(ask(sock).body)
    return (sock, served) if served != pid else None


def test_a_worker_awaiting_its_successor_takes_relieved_connections(
    server_factory: ServerFactory, sockets: list[socket.socket]
) -> None:
    """DEFECT. max_requests: worker B asked to be replaced and serves on while its
    successor boots. A keep-alive client parked on A, busy in a long request, sends a
    request: A's relief names B, the only free worker, but the master kept recycling
    workers out of its takers (right for balancing: a new connection would only be handed
    over again) and sent the connections back to A, where the request waited for the
    whole long request. B would hand them over with its other keep-alive connections."""
    server = server_factory(
        settings(
            pythonpath=[str(APPS), "."],
            workers={"count": 2, "max_requests": 12},
            http={"keepalive_relief": 0.2, "keepalive_timeout": 30},
            hooks={"post_worker_init": "relief_hooks:slow_boot"},
        ),
        app_source=SLOW_BOOT,
        module="relief_hooks",
    )
    busy, (slow, waiting) = on_one_worker(server, sockets, 2)
    # A new connection per try: asking again on one that `busy` accepted would drive
    # `busy` itself to max_requests, and its successor would inherit every connection.
    found = wait_until(lambda: not_on(server, sockets, busy), timeout=10)
    assert found is not None  # wait_until returns only a truthy value
    other, free = found
    asking = re.compile(rf"\(pid {free}\): \d+ requests served; asking to be replaced")
    wait_until(lambda: ask(other) and asking.search(server.log()), timeout=10)
    server.wait_for_log(re.compile(rf"\(pid {free}\) will be replaced"))
    start_slow(server, slow, "/sleep?s=3&tag=recycling", "recycling")
    asked = time.monotonic()
    waiting.sendall(http_request("GET", "/"))
    response = read_response(waiting)
    waited = time.monotonic() - asked
    assert int(response.body) != busy, f"answered by the busy worker after {waited:.1f} s"
    assert waited < 2
    assert int(read_response(slow).body) == busy


# --- DEFECT 4: a worker a reload replaced looked for a free worker of its own generation
# --- only, and found none: its keep-alive clients died with it


def test_a_worker_stuck_across_a_reload_passes_its_clients_to_the_new_generation(
    server_factory: ServerFactory, sockets: list[socket.socket]
) -> None:
    """DEFECT. One worker, stuck in a request; HUP brings up the new generation, whose
    worker is free. The old one's relief looked for a free worker of its own generation
    only, found none (there is none left once a reload replaced them), and kept its
    keep-alive clients: a request sent on one waited for the stuck one and died with it
    at workers.timeout."""
    server = server_factory(
        settings(
            workers={"count": 1, "timeout": 4, "timeout_grace": 0.5},
            http={"keepalive_relief": 0.2, "keepalive_timeout": 30},
        )
    )
    old, (stuck, parked) = on_one_worker(server, sockets, 2)
    start_slow(server, stuck, "/hang", "hang")
    before = len(server.log())
    server.signal(signal.SIGHUP)
    server.wait_for_log(re.compile(r"worker 1 \(pid \d+\) booted"), since=before)
    asked = time.monotonic()
    parked.sendall(http_request("GET", "/"))
    response = read_response(parked)
    assert int(response.body) != old
    assert time.monotonic() - asked < 2.5  # not after the stuck worker is killed


# --- DEFECT 5: the master gave connections to a worker stuck in a request


def test_a_hand_over_skips_the_successor_stuck_in_a_request(
    server_factory: ServerFactory, sockets: list[socket.socket]
) -> None:
    """DEFECT. The master passes connections on (a hand-over, relief, balancing) to the
    first taker whose channel accepts them, and a worker stuck in a request accepts them
    as readily: they then wait in its channel, out of reach of its relief, and die with it
    at workers.timeout. Here a reload replaces a worker busy in a long request; once free,
    it hands its keep-alive connection over to the new worker of its number first, which
    is stuck in /hang, though the other new worker is free: the client's next request was
    reset when the stuck one was killed. (Relief is off, so that the hand-over, not the
    relief thread, moves the connection; under load with relief on, K messages went to
    stuck workers the same way.)"""
    server = server_factory(
        settings(
            workers={"count": 2, "timeout": 6, "timeout_grace": 0.5},
            http={"keepalive_relief": 0, "keepalive_timeout": 30},
        )
    )
    old, (slow, parked) = on_one_worker(server, sockets, 2)
    number = server.wait_for_log(re.compile(rf"worker (\d+) \(pid {old}\) booted")).group(1)
    start_slow(server, slow, "/sleep?s=4&tag=replaced", "replaced")
    before = len(server.log())
    server.signal(signal.SIGHUP)
    booted = re.compile(r"worker (\d+) \(pid (\d+)\) booted")
    wait_until(lambda: len(booted.findall(server.log(), before)) >= 2, timeout=10)
    same_number = next(int(pid) for n, pid in booted.findall(server.log(), before) if n == number)

    def on_same_number() -> socket.socket | None:
        sock = connect(address(server), timeout=20)
        sockets.append(sock)
        return sock if int(ask(sock).body) == same_number else None

    hanging = wait_until(on_same_number, timeout=10)
    assert hanging is not None
    hanging.sendall(http_request("GET", "/hang"))
    server.wait_for_log("pf_testapp: hanging", since=before)
    assert int(read_response(slow).body) == old  # now it hands `parked` over
    server.wait_for_log(re.compile(rf"\(pid {old}\) exited"), since=before)
    asked = time.monotonic()
    response = ask(parked)
    assert int(response.body) not in (old, same_number)
    assert time.monotonic() - asked < 2


# --- PINNED: what relief must keep doing (or leave alone)


def test_quit_ends_a_worker_sleeping_in_a_request_at_once(
    server_factory: ServerFactory, sockets: list[socket.socket]
) -> None:
    """PINNED. The relief thread is started with every signal blocked, so QUIT still reaches
    the main thread and interrupts the application's sleep: the worker exits 0 from its
    handler at once, not 20 s later (nor is it killed by the master)."""
    server = server_factory(
        settings(workers={"count": 2}, http={"keepalive_relief": 0.1}, logging={"level": "debug"})
    )
    busy, (slow, _) = on_one_worker(server, sockets, 2)
    start_slow(server, slow, "/sleep?s=20&tag=quit", "quit")
    # the thread has run: it passed the other connection on
    server.wait_for_log(re.compile(r"worker \d+: .* into a request; passed keep-alive"))
    sent = time.monotonic()
    os.kill(busy, signal.SIGQUIT)
    wait_until(lambda: gone(busy), timeout=5)
    assert time.monotonic() - sent < 2
    server.wait_for_log(re.compile(rf"\(pid {busy}\) exited: retired"))  # status 0


def test_relief_moves_clients_on_a_unix_socket(
    server_factory: ServerFactory, sockets: list[socket.socket], short_tmp: Path
) -> None:
    """PINNED. A connection on a unix listener (no peer address) moves as a TCP one does."""
    path = short_tmp / "pf.sock"
    server = server_factory(
        settings(bind=[f"unix:{path}"], workers={"count": 2}, http={"keepalive_relief": 0.2})
    )
    busy, (slow, waiting) = on_one_worker(server, sockets, 2)
    start_slow(server, slow, "/sleep?s=4&tag=unix", "unix")
    asked = time.monotonic()
    response = ask(waiting)
    assert int(response.body) != busy
    assert time.monotonic() - asked < 2
    assert int(ask(waiting).body) == int(response.body)  # it stays with its new worker
    assert int(read_response(slow).body) == busy


def tls_answer(tls: ssl.SSLSocket, reader: BinaryIO) -> int:
    """The pid in the next response on a TLS connection (read through a buffered reader:
    the harness's reader peeks, which an SSLSocket cannot)."""
    status = reader.readline()
    assert status.startswith(b"HTTP/1.1 200"), status
    length = 0
    while (line := reader.readline()) not in (b"\r\n", b""):
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    return int(reader.read(length))


def test_tls_clients_stay_with_their_busy_worker(
    server_factory: ServerFactory, tmp_path: Path
) -> None:
    """PINNED. A TLS session lives in the worker that made the handshake: relief leaves the
    connection there, and its request is answered, late, by that worker, on the same
    connection."""
    cert, key = self_signed_cert(tmp_path)
    server = server_factory(
        settings(
            bind=[{"address": "127.0.0.1:0", "tls": {"certificate": str(cert), "key": str(key)}}],
            workers={"count": 2},
            http={"keepalive_relief": 0.1},
            logging={"level": "debug"},
        )
    )
    context = ssl.create_default_context(cafile=str(cert))
    _, host, port = address(server)
    with contextlib.ExitStack() as made:
        held: dict[int, list[tuple[ssl.SSLSocket, BinaryIO]]] = {}
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and not any(len(v) == 2 for v in held.values()):
            tls = made.enter_context(context.wrap_socket(
                socket.create_connection((host, port), timeout=20), server_hostname="localhost"
            ))
            buffered: BinaryIO = made.enter_context(tls.makefile("rb"))
            tls.sendall(http_request("GET", "/"))
            held.setdefault(tls_answer(tls, buffered), []).append((tls, buffered))
        busy, ((slow, slow_reader), (waiting, reader)) = next(
            (pid, pair) for pid, pair in held.items() if len(pair) == 2
        )
        start_slow(server, slow, "/sleep?s=1.5&tag=tls", "tls")
        asked = time.monotonic()
        waiting.sendall(http_request("GET", "/"))
        assert tls_answer(waiting, reader) == busy
        assert time.monotonic() - asked > 1  # it waited for its worker
        assert tls_answer(slow, slow_reader) == busy
        assert "passed keep-alive connections" not in server.log()


def test_a_moved_idle_connection_keeps_its_keepalive_deadline(
    server_factory: ServerFactory, sockets: list[socket.socket]
) -> None:
    """PINNED. Moving does not restart the keep-alive clock, nor cut it to the (shorter)
    header_timeout of a connection never served: the taker closes the idle connection
    when keepalive_timeout after its last answer is up (give or take the 1 s sweep)."""
    server = server_factory(
        settings(
            workers={"count": 2},
            http={"keepalive_relief": 0.2, "keepalive_timeout": 2.5, "header_timeout": 0.5},
            logging={"level": "debug"},
        )
    )
    busy, (idle, slow) = on_one_worker(server, sockets, 2)
    last_answer = time.monotonic()  # idle's answer came before slow's
    start_slow(server, slow, "/sleep?s=5&tag=deadline", "deadline")
    server.wait_for_log(re.compile(r"into a request; passed keep-alive connections to \d+"))
    idle.settimeout(10)
    assert idle.recv(1) == b""  # closed, without a reset
    lived = time.monotonic() - last_answer
    assert 2.3 < lived < 4.0, f"closed {lived:.1f} s after its last answer"


def test_pipelined_requests_on_a_moved_connection_are_answered_in_order(
    server_factory: ServerFactory, sockets: list[socket.socket]
) -> None:
    """PINNED. Three requests sent at once on a connection parked on a busy worker: they
    move with it, unread, and the taker answers all three, in order."""
    server = server_factory(settings(workers={"count": 2}, http={"keepalive_relief": 0.2}))
    busy, (slow, waiting) = on_one_worker(server, sockets, 2)
    start_slow(server, slow, "/sleep?s=4&tag=pipelined", "pipelined")
    waiting.sendall(b"".join(http_request("GET", f"/environ?n={n}") for n in range(3)))
    for n in range(3):
        response = read_response(waiting)
        assert response.status == 200
        assert json.loads(response.body)["QUERY_STRING"] == f"n={n}"
    assert int(ask(waiting).body) != busy


class KeepAliveLoad(ClientThreads):
    """Keep-alive clients, bounded in time: each sends one to three requests at once (a
    few of them slow), reads every answer, and starts a new connection only after an
    answer saying Connection: close. An end of stream or a reset on a connection holding
    a request without its answer is a lost request."""

    def __init__(self, server: Server, clients: int) -> None:
        super().__init__()
        self.addr = address(server)
        self.sent = self.answered = self.closed_first = 0
        self.lost: list[str] = []
        self.phase = "start"  # what the test did last, for the report of a lost request
        self.threads = [
            threading.Thread(target=self.client, args=(n,), daemon=True) for n in range(clients)
        ]

    def client(self, n: int) -> None:
        rnd = random.Random(n)
        sock: socket.socket | None = None
        try:
            while not self.stopping.is_set():
                if sock is None:
                    sock = connect(self.addr, timeout=20)
                paths = [
                    f"/sleep?s={rnd.choice((0.3, 0.6))}&tag=load" if rnd.random() < 0.1 else "/"
                    for _ in range(rnd.choice((1, 1, 2, 3)))
                ]
                sock.sendall(b"".join(http_request("GET", path) for path in paths))
                with self.lock:
                    self.sent += len(paths)
                for i, path in enumerate(paths):
                    try:
                        response = read_response(sock)
                    except (OSError, EOFError) as exc:
                        with self.lock:
                            self.lost.append(
                                f"client {n}: {path} ({i + 1} of {paths}) in {self.phase}: {exc!r}"
                            )
                        sock.close()
                        sock = None
                        break
                    with self.lock:
                        self.answered += 1
                    if (response.header("Connection") or "").lower() == "close":
                        with self.lock:
                            self.closed_first += len(paths) - i - 1  # never answered: fair
                        sock.close()
                        sock = None
                        break
                if rnd.random() < 0.3:
                    time.sleep(rnd.random() * 0.2)  # a client thinking between requests
        finally:
            if sock is not None:
                sock.close()

    def wait_for(self, answered: int, timeout: float) -> None:
        wait_until(lambda: self.answered >= answered, timeout,
                   message=f"only {self.answered} answers; lost {self.lost[:3]}")


def test_no_request_is_lost_under_load_through_reloads_resizes_and_recycles(
    server_factory: ServerFactory,
) -> None:
    """PINNED. Twelve keep-alive clients (some pipelining, some slow requests, so relief
    moves connections all the time) on three workers that recycle every ~40 requests
    (their connections handed over), while HUP, TTIN and TTOU arrive: every request sent on
    a kept connection is answered."""
    server = server_factory(
        settings(
            workers={"count": 3, "max_requests": 40},
            http={"keepalive_relief": 0.25, "keepalive_timeout": 30},
        )
    )
    with KeepAliveLoad(server, 12) as load:
        for sig in (signal.SIGHUP, signal.SIGTTIN, signal.SIGTTOU, signal.SIGHUP):
            load.wait_for(load.answered + 60, timeout=15)
            load.phase = signal.Signals(sig).name
            server.signal(sig)
        load.wait_for(load.answered + 60, timeout=15)
    assert not load.lost, f"{len(load.lost)} lost of {load.sent}: {load.lost[:5]}"
    assert load.answered + load.closed_first == load.sent
    assert "relief failed" not in server.log()
