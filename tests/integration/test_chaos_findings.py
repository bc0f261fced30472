"""Nothing is lost under disruption: real load on loopback and unix sockets while the operator
and the kernel do disruptive things (reloads every second, recycling, TTIN/TTOU bursts,
killed and hung workers, WINCH, TERM during a burst, stream sessions, descriptor
exhaustion, a full disk).

Each DEFECT test failed on the code it was written against and passes with its fix; the
others pin behaviour no test checked before. Loads are a few client threads for a few
seconds (CI has 2 CPUs): `Load` records every request that did not get a complete 200.
"""

from __future__ import annotations

import os
import re
import resource
import signal
import socket
import threading
import time
from pathlib import Path
from typing import Any

from harness import (
    Address,
    ClientThreads,
    Server,
    ServerFactory,
    address,
    connect,
    fetch,
    gone,
    http_request,
    read_response,
    recv_until_close,
    settings,
    wait_until,
)

# Apps are rewritten between reloads within a second: no stale .pyc may hide the change.
NO_PYC = {"PYTHONDONTWRITEBYTECODE": "1"}

# `/?s=SECONDS` sleeps (so signals find requests in the app), `/?grow=KIB` keeps that much
# memory for good (max_memory), a body is read; the answer is "VERSION:PID".
APP = """
import os
import sys
import time
from urllib.parse import parse_qs

KEPT = []
VERSION = "v1"

def application(environ, start_response):
    query = parse_qs(environ.get("QUERY_STRING", ""))
    if "tell" in query:
        print("app: busy", os.getpid(), query["tell"][0], file=sys.stderr, flush=True)
    if "s" in query:
        time.sleep(float(query["s"][0]))
    if "grow" in query:
        KEPT.append(b"x" * (int(query["grow"][0]) * 1024))
    environ["wsgi.input"].read()
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [(VERSION + ":" + str(os.getpid())).encode()]
"""


def busy_pid(server: Server, tag: str) -> int:
    """The pid of the worker that took the request sent with `tell=TAG`, once it is in the
    application."""
    found = server.wait_for_log(re.compile(rf"app: busy (\d+) {tag}\b"), 5)
    return int(found.group(1))


class Load(ClientThreads):
    """Client threads sending GET `target` in a loop until the block ends, each in one of
    three ways: `close` (a new connection per request, `Connection: close`), `keepalive`
    (one connection reused), `pipeline` (PIPELINE requests sent at once on a reused
    connection). Every request must get a complete 200 whose body is "VERSION:PID".

    A reused connection the server closed before any byte of the next response is retried
    on a new one (RFC 9112 9.3.1 lets a client do that) and counted in `retries`; anything
    else is a failure: a refused or reset connection, an empty or cut reply, another status,
    a pipelined batch cut short. With `until_refused` a refused connection (the server
    closed its listeners) ends the thread instead."""

    PIPELINE = 3

    def __init__(
        self,
        where: Address,
        modes: tuple[str, ...],
        target: str = "/",
        *,
        until_refused: bool = False,
    ) -> None:
        self.where = where
        self.until_refused = until_refused  # a refused connect ends the thread: server gone
        self.target = target
        super().__init__()
        self.no_new = threading.Event()  # set: a thread ends when its connection does
        self.bodies: list[bytes] = []
        self.threads = [
            threading.Thread(target=self.run, args=(mode,), daemon=True) for mode in modes
        ]

    def fail(self, what: str) -> None:
        with self.lock:
            self.failures.append(f"{time.monotonic():.3f} {self.where[0]} {what}")

    def run(self, mode: str) -> None:
        batch = self.PIPELINE if mode == "pipeline" else 1
        headers = [("Connection", "close")] if mode == "close" else []
        request = http_request("GET", self.target, headers) * batch
        sock: socket.socket | None = None
        reused = False
        try:
            while not self.stopping.is_set():
                if sock is None:
                    if self.no_new.is_set():
                        return
                    try:
                        sock = connect(self.where, timeout=10)
                    except (ConnectionRefusedError, FileNotFoundError):
                        if self.until_refused:
                            return
                        self.fail("connect: refused")
                        time.sleep(0.05)
                        continue
                    except OSError as exc:
                        self.fail(f"connect: {exc!r}")
                        time.sleep(0.05)
                        continue
                    reused = False
                sock = self.exchange(sock, request, batch, reused)
                reused = sock is not None
        finally:
            if sock is not None:
                sock.close()

    def exchange(
        self, sock: socket.socket, request: bytes, batch: int, reused: bool
    ) -> socket.socket | None:
        """One round; the connection if it may be used again, else None (closed)."""
        try:
            sock.sendall(request)
            for n in range(batch):
                try:
                    first = sock.recv(1, socket.MSG_PEEK)
                except (ConnectionResetError, BrokenPipeError):
                    first = b""
                if not first:
                    if reused and n == 0:
                        with self.lock:
                            self.retries += 1
                    else:
                        self.fail(f"closed without a response ({n} of {batch} answered)")
                    sock.close()
                    return None
                response = read_response(sock)
                if response.status != 200 or b":" not in response.body:
                    self.fail(f"{response.status} {response.body[:80]!r}")
                else:
                    with self.lock:
                        self.ok += 1
                        self.bodies.append(response.body)
                if (response.header("Connection") or "").lower() == "close":
                    if n != batch - 1:
                        self.fail(f"Connection: close after {n + 1} of {batch} pipelined")
                    sock.close()
                    return None
        except Exception as exc:  # every other outcome is a failed request
            self.fail(repr(exc))
            sock.close()
            return None
        return sock

    def verdict(self) -> str:
        return (f"{len(self.failures)} failed, {self.ok} answered, {self.retries} retried "
                f"on a reused connection: {self.failures[:6]}")


def app_server(server_factory: ServerFactory, short_tmp: Path, **more: Any) -> Server:
    """A server running APP on loopback TCP and a unix socket."""
    more.setdefault("bind", ["127.0.0.1:0", f"unix:{short_tmp / 'app.sock'}"])
    return server_factory(
        {"app": "app:application", **more}, app_source=APP, env=NO_PYC
    )


def hup(server: Server) -> str:
    """Send HUP and return the outcome line of that reload."""
    since = len(server.log())
    server.signal(signal.SIGHUP)
    return server.wait_for_log(
        re.compile(r"\] (reloaded: generation \d+ serving with \d+ workers?|reload failed.*)"),
        20, since=since,
    ).group(1)


def lowest_free_fd(pid: int) -> int:
    """The lowest descriptor number process `pid` does not use: a soft RLIMIT_NOFILE equal
    to it leaves the process no descriptor to open (the kernel hands out the lowest free
    number, and refuses one at or above the limit)."""
    used = {int(name) for name in os.listdir(f"/proc/{pid}/fd")}
    number = 0
    while number in used:
        number += 1
    return number


def starve_descriptors(pid: int) -> tuple[int, int]:
    """Lower `pid`'s soft descriptor limit so it can open none; the limits to put back."""
    before = resource.prlimit(pid, resource.RLIMIT_NOFILE)
    resource.prlimit(pid, resource.RLIMIT_NOFILE, (lowest_free_fd(pid), before[1]))
    return before


# --- DEFECT: a worker out of descriptors sat on a queued connection ------------------------


def test_a_worker_out_of_descriptors_leaves_no_connection_waiting(
    server_factory: ServerFactory,
) -> None:
    """DEFECT. A worker whose accept() fails with EMFILE (an application leaking files, a
    ulimit below the connections it holds) slept 0.1 s and tried again, ten error lines a
    second, "leaving the connection to a worker that has room"; but with EPOLLEXCLUSIVE no
    other worker is woken for a connection already queued, so the client waited until some
    later client arrived (here: until its own timeout). Now the starved worker takes the
    queued connection with a reserve descriptor and serves it, and stops accepting (so new
    connections wake the other worker) until it can open its reserve again. Each worker is
    starved in turn: whichever the kernel wakes first, every request is answered at once."""
    server = server_factory(settings(workers={"count": 2}))
    where = address(server)
    for victim in server.worker_pids():
        limits = starve_descriptors(victim)
        try:
            for n in range(5):
                started = time.monotonic()
                response = fetch(where, target=f"/?n={n}", timeout=4)
                assert response.status == 200
                assert time.monotonic() - started < 2, "the request waited in the queue"
        finally:
            resource.prlimit(victim, resource.RLIMIT_NOFILE, limits)
    log = server.log()
    assert log.count("Too many open files") <= 4, "the starved worker flooded the log"
    # the starved workers serve again once they have descriptors
    assert set(server.worker_pids()) >= {int(fetch(where).body) for _ in range(4)}


# --- DEFECT: USR1 on a full disk killed every worker at once ---------------------------------


def descriptors_to(pid: int, target: str) -> set[int]:
    """The descriptors of process `pid` open on `target` (a path, as /proc shows it)."""
    found = set()
    for name in os.listdir(f"/proc/{pid}/fd"):
        try:
            if os.readlink(f"/proc/{pid}/fd/{name}") == target:
                found.add(int(name))
        except FileNotFoundError:
            continue  # closed while listed
    return found


def test_usr1_with_the_disk_full_keeps_every_worker_serving(
    server_factory: ServerFactory,
) -> None:
    """DEFECT. With the disk full, access-log lines the kernel refuses (ENOSPC) stay in the
    file's buffer (the failed write itself is ignored, as it should be). Log rotation then
    sends USR1, which is exactly when a full disk gets rotated; each worker opened the new
    file and closed the old one, whose close flushed that buffer, raised, and killed the
    worker: every worker died at once, dropping the keep-alive connections they held. The
    close now fails quietly, as Logs.close already did. /dev/full is that disk."""
    server = server_factory(settings(workers={"count": 1}, logging={"access_log": "/dev/full"}))
    where = address(server)
    (worker,) = server.worker_pids()
    assert fetch(where).status == 200  # a line the disk refuses, left in the buffer
    before = descriptors_to(worker, "/dev/full")
    assert before, "the worker has no access log open"
    server.signal(signal.SIGUSR1)
    wait_until(
        lambda: gone(worker) or descriptors_to(worker, "/dev/full") != before,
        5,
        message="the worker did not reopen its access log",
    )
    assert not gone(worker), f"USR1 killed the worker\n{server.log_tail()}"
    response = fetch(where)
    assert response.status == 200
    assert int(response.body) == worker
    assert "Traceback" not in server.log()


# --- DEFECT: a reload that lowered workers.timeout killed the old generation's requests -----

SLEEPY_APP = """
import os
import sys
import time

def application(environ, start_response):
    query = environ.get("QUERY_STRING", "")
    if query.startswith("s="):
        print("sleepy: in the app", file=sys.stderr, flush=True)
        time.sleep(float(query[2:]))
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [str(os.getpid()).encode()]
"""


def test_a_reload_that_lowers_the_timeout_lets_old_requests_finish(
    server_factory: ServerFactory,
) -> None:
    """DEFECT. A request is judged hung by the workers.timeout of the generation that
    admitted it: the worker already cut its own client waits by that value, but the master
    applied the serving generation's to every worker, so a HUP that lowered the timeout
    from 10 s to 1 s killed (SIGABRT, empty reply) the 3 s request the old worker was
    finishing before it stopped. The new generation has the new timeout."""
    server = server_factory(
        {"app": "app:application", "workers": {"count": 1, "timeout": 10}},
        app_source=SLEEPY_APP,
        env={"PYTHONDONTWRITEBYTECODE": "1"},
    )
    where = address(server)
    (old,) = server.worker_pids()
    with connect(where, timeout=15) as sock:
        sock.sendall(http_request("GET", "/?s=3"))
        server.wait_for_log("sleepy: in the app")
        server.config.write_text(server.config.read_text().replace("timeout: 10", "timeout: 1"))
        since = len(server.log())
        server.signal(signal.SIGHUP)
        server.wait_for_log("reloaded: generation 2", 10, since=since)
        response = read_response(sock)
    assert response.status == 200, server.log_tail()
    assert int(response.body) == old
    assert "timed out" not in server.log()
    # the new generation is held to the new timeout (once the old worker, which may take
    # one more request before it reads its stop message, is gone)
    wait_until(lambda: gone(old), 10, message="the old worker did not exit")
    with connect(where, timeout=15) as sock:
        sock.sendall(http_request("GET", "/?s=5"))
        server.wait_for_log(re.compile(r"timed out after [\d.]+s serving GET /\?s=5"), 5)
        assert recv_until_close(sock, 5) == b""


# --- DEFECT: TERM after WINCH reset the connections that waited in the accept queue ---------


def test_term_after_winch_answers_the_connections_that_waited(
    server_factory: ServerFactory, short_tmp: Path
) -> None:
    """DEFECT. WINCH stops every worker and promises that a request arriving meanwhile waits
    in the accept queue; TERM promises to answer what is queued. Together, TERM closed the
    listeners with nobody holding them: every waiting connection was reset, and the log said
    only "stopped". Now TERM after WINCH starts workers, already stopping, that drain the
    queues (TCP and unix) as any stopping worker does; the server still exits promptly."""
    sock_path = short_tmp / "w.sock"
    server = server_factory(
        settings(workers={"count": 2}, bind=["127.0.0.1:0", f"unix:{sock_path}"])
    )
    tcp, unix = server.addresses()
    workers = server.worker_pids()
    server.signal(signal.SIGWINCH)
    wait_until(lambda: all(gone(pid) for pid in workers), 10, message="WINCH left workers")
    waiting = [connect(where, timeout=15) for where in (tcp, unix, tcp, unix, tcp)]
    try:
        for n, sock in enumerate(waiting):
            sock.sendall(http_request("GET", f"/?n={n}"))
        started = time.monotonic()
        server.signal(signal.SIGTERM)
        statuses: list[object] = []
        for sock in waiting:
            try:
                statuses.append(read_response(sock).status)
            except (EOFError, OSError) as exc:
                statuses.append(repr(exc))
    finally:
        for sock in waiting:
            sock.close()
    assert statuses == [200] * len(waiting), server.log_tail()
    assert server.wait_exit(15) == 0
    assert time.monotonic() - started < 10
    assert not sock_path.exists()


# --- pinned: loads under operator signals and recycling ----------------------------------

MIXED = ("close", "keepalive", "keepalive", "pipeline")


def test_hup_every_second_changing_count_and_code_under_load_on_tcp_and_unix(
    server_factory: ServerFactory, short_tmp: Path
) -> None:
    """PINNED. Reloads about once a second, alternately unchanged, with a new workers.count
    and with new application code, while keep-alive, pipelining and Connection: close
    clients hammer a TCP and a unix listener: no request fails, and the last code serves."""
    server = app_server(server_factory, short_tmp, workers={"count": 2, "graceful_timeout": 5})
    tcp, unix = server.addresses()
    app = server.workdir / "app.py"
    text = server.config.read_text()
    with Load(tcp, MIXED, "/?s=0.005") as on_tcp, Load(unix, MIXED, "/?s=0.005") as on_unix:
        on_tcp.wait_for_requests(10)
        on_unix.wait_for_requests(10)
        for n, change in enumerate(["count", "code", "none", "count", "code", "none"]):
            if change == "count":
                server.config.write_text(text.replace("count: 2", f"count: {1 + n % 3}"))
            elif change == "code":
                app.write_text(APP.replace('VERSION = "v1"', f'VERSION = "v{n + 2}"'))
            assert hup(server).startswith("reloaded: "), server.log_tail()
            on_tcp.wait_for_requests(5)
            on_unix.wait_for_requests(5)
        final = set(server.worker_pids())
        on_tcp.wait_for_requests(20)
        on_unix.wait_for_requests(20)
    assert on_tcp.failures == [], on_tcp.verdict()
    assert on_unix.failures == [], on_unix.verdict()
    last = {b for b in on_tcp.bodies[-10:] + on_unix.bodies[-10:]}
    assert {body.split(b":")[0] for body in last} == {b"v6"}, last
    assert {int(body.split(b":")[1]) for body in last} <= final
    assert "killing it" not in server.log()


def test_max_requests_5_with_jitter_under_keepalive_and_pipelined_load(
    server_factory: ServerFactory, short_tmp: Path
) -> None:
    """PINNED. Workers recycled every 5 to 8 requests, two at a time, while clients keep
    connections alive and pipeline: every request is answered, the connections move to the
    successors (hand-over), and worker after worker comes and goes (each serves past its
    limit until its successor has booted)."""
    server = app_server(
        server_factory, short_tmp,
        workers={"count": 2, "max_requests": 5, "max_requests_jitter": 3, "max_recycling": 2},
    )
    tcp, unix = server.addresses()
    def served_by() -> set[bytes]:
        return {body.split(b":")[1] for body in on_tcp.bodies + on_unix.bodies}

    with Load(tcp, MIXED) as on_tcp, Load(unix, MIXED) as on_unix:
        on_tcp.wait_for_requests(150, 20)
        on_unix.wait_for_requests(150, 20)
        # workers come and go at the pace of their successors' boots, not of the requests
        # (300 requests took as little as 0.3 s): the load goes on until enough have
        wait_until(
            lambda: len(served_by()) >= 6
            and server.log().count("exited (recycled: max_requests)") >= 4,
            20, message="fewer than 6 workers served, or fewer than 4 were recycled",
        )
    assert on_tcp.failures == [], on_tcp.verdict()
    assert on_unix.failures == [], on_unix.verdict()
    pids = served_by()
    assert len(pids) >= 6, f"only {len(pids)} workers served"
    # a worker that served has asked to be replaced; its exit is logged once its successor
    # is ready and it has finished, which may be a moment after the load stopped
    wait_until(lambda: server.log().count("exited (recycled: max_requests)") >= 4, 15,
               message="fewer than 4 recycled workers exited")


def test_ttin_ttou_bursts_under_load_lose_nothing(
    server_factory: ServerFactory, short_tmp: Path
) -> None:
    """PINNED. Bursts of TTIN then TTOU (the kernel may merge repeated signals, so only the
    direction is checked) while mixed clients keep the workers busy."""
    server = app_server(server_factory, short_tmp, workers={"count": 2, "graceful_timeout": 5})
    tcp, unix = server.addresses()
    with Load(tcp, MIXED, "/?s=0.005") as on_tcp, Load(unix, MIXED, "/?s=0.005") as on_unix:
        on_tcp.wait_for_requests(10)
        for _ in range(2):
            since = len(server.log())
            for _ in range(4):
                server.signal(signal.SIGTTIN)
            # the burst may arrive as one signal, after a TTOU burst that left one worker
            grown = int(server.wait_for_log(
                re.compile(r"TTIN: (\d+) workers"), 5, since=since).group(1))
            wait_until(lambda n=grown: len(server.worker_pids()) >= n, 10,
                       message="TTIN added none")
            on_tcp.wait_for_requests(10)
            on_unix.wait_for_requests(10)
            for _ in range(4):
                server.signal(signal.SIGTTOU)
            on_tcp.wait_for_requests(10)
            on_unix.wait_for_requests(10)
        server.wait_for_log(re.compile(r"TTOU: \d+ workers"), 5)
        on_tcp.wait_for_requests(10)
    assert on_tcp.failures == [], on_tcp.verdict()
    assert on_unix.failures == [], on_unix.verdict()


def test_max_memory_replaces_a_growing_app_under_load_without_a_failed_request(
    server_factory: ServerFactory, short_tmp: Path
) -> None:
    """PINNED. An application that keeps 256 KiB per request is replaced (successor first)
    each time a worker's USS passes max_memory, checked every 0.2 s, under keep-alive and
    pipelined load: no request fails and several workers were recycled for memory."""
    server = app_server(
        server_factory, short_tmp,
        workers={"count": 2, "max_memory": 40, "memory_check_interval": 0.2},
    )
    tcp, _ = server.addresses()
    with Load(tcp, MIXED, "/?grow=256") as load:
        wait_until(lambda: server.log().count("exited (recycled: memory") >= 3, 20,
                   message="no worker was recycled for memory")
        load.wait_for_requests(20)
    assert load.failures == [], load.verdict()


def test_a_killed_worker_costs_only_its_own_request(
    server_factory: ServerFactory, short_tmp: Path
) -> None:
    """PINNED. SIGKILL of a worker in the middle of a request loses that request only: the
    other worker's request in progress completes, the load (on new connections, which the
    kernel keeps queued for the surviving worker) sees no failure, and the dead worker is
    replaced."""
    server = app_server(server_factory, short_tmp, workers={"count": 2})
    tcp, _ = server.addresses()
    with connect(tcp, timeout=15) as one:
        one.sendall(http_request("GET", "/?s=2&tell=one"))
        survivor = busy_pid(server, "one")
        # connected only now: the busy worker cannot have taken (and parked) it
        with connect(tcp, timeout=15) as two:
            two.sendall(http_request("GET", "/?s=2&tell=two"))
            victim = busy_pid(server, "two")
            assert victim != survivor
            with Load(tcp, ("close", "close")) as load:
                os.kill(victim, signal.SIGKILL)
                assert recv_until_close(two, 5) == b"", "the killed worker answered"
                response = read_response(one)
                assert response.status == 200
                assert int(response.body.split(b":")[1]) == survivor
                wait_until(
                    lambda: len(server.worker_pids()) == 2
                    and victim not in server.worker_pids(),
                    10, message="the killed worker was not replaced",
                )
                load.wait_for_requests(20)
    assert load.failures == [], load.verdict()


def test_a_hung_request_is_killed_while_the_others_flow(
    server_factory: ServerFactory, short_tmp: Path
) -> None:
    """PINNED. A request stuck past workers.timeout is dumped and killed (its client gets
    no response) while new-connection clients on TCP and unix keep being served by the
    other workers, during and after the kill. The clients start once the stuck request is
    in the application: a connection the worker had accepted before its request arrived
    waits parked in that worker and dies with it (see the report), which is not what this
    pins."""
    server = app_server(server_factory, short_tmp,
                        workers={"count": 3, "timeout": 1, "timeout_grace": 0.5})
    tcp, unix = server.addresses()
    with connect(tcp, timeout=15) as stuck:
        stuck.sendall(http_request("GET", "/?s=30&tell=stuck"))
        hung = busy_pid(server, "stuck")
        with Load(tcp, ("close", "close")) as on_tcp, Load(unix, ("close",)) as on_unix:
            on_tcp.wait_for_requests(10)
            server.wait_for_log(re.compile(rf"\(pid {hung}\) timed out after"), 5)
            assert recv_until_close(stuck, 5) == b""
            wait_until(lambda: gone(hung) and len(server.worker_pids()) == 3, 10,
                       message="the hung worker was not replaced")
            on_tcp.wait_for_requests(20)
            on_unix.wait_for_requests(10)
    assert on_tcp.failures == [], on_tcp.verdict()
    assert on_unix.failures == [], on_unix.verdict()


def test_term_during_a_keepalive_burst_on_tcp_and_unix_answers_every_request(
    server_factory: ServerFactory, short_tmp: Path
) -> None:
    """PINNED. TERM while keep-alive and Connection: close clients hammer both listeners:
    every request sent on a connection made before the TERM is answered (a keep-alive
    client sees Connection: close, or its idle connection closed before it sent anything),
    the unix socket file is gone and the server exits well before the graceful timeout.
    The clients make no new connection once TERM is sent: one made after the last worker
    emptied the queue, just before it closed the listener, is reset by the kernel (see the
    report; test_reload's TERM test pins what clients that reconnect until refused see)."""
    server = app_server(server_factory, short_tmp, workers={"count": 2, "graceful_timeout": 10})
    tcp, unix = server.addresses()
    modes = ("close", "keepalive", "keepalive")
    with Load(tcp, modes, "/?s=0.01") as on_tcp, Load(unix, modes, "/?s=0.01") as on_unix:
        on_tcp.wait_for_requests(30)
        on_unix.wait_for_requests(30)
        on_tcp.no_new.set()
        on_unix.no_new.set()
        started = time.monotonic()
        server.signal(signal.SIGTERM)
        assert server.wait_exit(15) == 0
        elapsed = time.monotonic() - started
        wait_until(lambda: not any(t.is_alive() for t in on_tcp.threads + on_unix.threads),
                   10, message="clients still running after the server exited")
    assert on_tcp.failures == [], on_tcp.verdict()
    assert on_unix.failures == [], on_unix.verdict()
    assert elapsed < 5, f"the stop took {elapsed:.1f}s"
    assert not (short_tmp / "app.sock").exists()


ECHO = """
def echo(sock, addr):
    while True:
        data = sock.recv(65536)
        if not data:
            return
        sock.sendall(data)
"""


def test_stream_sessions_survive_reloads_and_term(
    server_factory: ServerFactory, short_tmp: Path
) -> None:
    """PINNED. protocol: tcp (an echo handler) on TCP and unix: sessions of three exchanges
    each, back to back, while the server reloads twice and then stops (TERM). Without
    stream.eof_on_stop no session is cut: each old worker finishes its session first, at a
    reload and at the stop."""
    sock_path = short_tmp / "echo.sock"
    server = server_factory(
        {"app": "app:echo", "protocol": "tcp", "workers": {"count": 2, "graceful_timeout": 10},
         "bind": ["127.0.0.1:0", f"unix:{sock_path}"]},
        app_source=ECHO,
    )
    lock = threading.Lock()
    done: list[int] = [0]
    failures: list[str] = []
    no_new = threading.Event()  # set just before TERM (see the TERM test above)

    def sessions(where: Address) -> None:
        n = 0
        while not no_new.is_set():
            try:
                sock = connect(where, timeout=10)
            except (ConnectionRefusedError, FileNotFoundError):
                return  # the server stopped
            try:
                with sock:
                    for exchange in range(3):
                        message = f"session {n} exchange {exchange}\n".encode()
                        sock.sendall(message)
                        echoed = b""
                        while len(echoed) < len(message):
                            chunk = sock.recv(65536)
                            assert chunk, f"closed after {echoed!r}"
                            echoed += chunk
                        assert echoed == message, echoed
                    sock.shutdown(socket.SHUT_WR)
                    assert sock.recv(10) == b""
                with lock:
                    done[0] += 1
            except Exception as exc:  # a cut session
                with lock:
                    failures.append(f"{where[0]} session {n}: {exc!r}")
            n += 1

    threads = [threading.Thread(target=sessions, args=(where,), daemon=True)
               for where in server.addresses() for _ in range(2)]
    for thread in threads:
        thread.start()

    def more_sessions(count: int) -> None:
        target = done[0] + count
        wait_until(lambda: done[0] >= target, 10, message=f"sessions stalled: {failures}")

    more_sessions(20)
    for _ in range(2):
        assert hup(server).startswith("reloaded: "), server.log_tail()
        more_sessions(20)
    no_new.set()
    server.signal(signal.SIGTERM)
    assert server.wait_exit(15) == 0
    for thread in threads:
        thread.join(10)
    assert not any(t.is_alive() for t in threads)
    assert failures == [], failures[:5]
