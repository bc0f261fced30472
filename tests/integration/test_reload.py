"""Zero-downtime reload (HUP) and graceful stop under a bounded load on 127.0.0.1.

Client threads request `/` in a loop (new connections, or keep-alive connections) while the
test reloads or stops the server; every request must get a complete 200 response. A failed
reload (bad YAML, an app that cannot be imported) must leave the old workers serving.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from harness import (
    DEFAULT_COMMAND,
    REPO_ROOT,
    Address,
    ClientThreads,
    Server,
    ServerFactory,
    connect,
    fetch,
    http_request,
    read_response,
    wait_until,
)

# `/?s=SECONDS` sleeps first, so that some requests are in the app when a signal arrives.
APP = """
import os
import time

def application(environ, start_response):
    query = environ.get("QUERY_STRING", "")
    if query.startswith("s="):
        time.sleep(float(query[2:]))
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [str(os.getpid()).encode()]
"""

BROKEN_APP = """
raise RuntimeError("pf-reload: broken on purpose")
"""

# Apps are rewritten within one second; stale .pyc files must not hide the change.
NO_PYC = {"PYTHONDONTWRITEBYTECODE": "1"}
RELOAD_DONE = re.compile(r"\] (reloaded: generation \d+ serving with \d+ workers?|reload failed.*)")


def settings(**more: Any) -> dict[str, Any]:
    return {"app": "app:application", "workers": {"count": 2}, **more}


class Load(ClientThreads):
    """Client threads doing GET requests in a loop until stopped; outcomes are recorded.

    `keepalive`: each thread reuses its connection; a reused connection that the server
    closed before sending any byte of the response is retried on a new one (RFC 9112 9.3.1
    lets clients do that) and counted in `retries`; on a new connection it is a failure.
    `until_refused`: a thread ends at its first refused connection (the server is gone).
    """

    def __init__(
        self,
        address: Address,
        *,
        threads: int = 2,
        keepalive: bool = False,
        until_refused: bool = False,
        targets: tuple[str, ...] = ("/",),
    ) -> None:
        self.address = address
        self.keepalive = keepalive
        self.until_refused = until_refused
        self.targets = targets
        super().__init__()
        self.refused: list[float] = []  # time.monotonic() of each refused connection
        self.pids: set[int] = set()
        run = self.keepalive_loop if keepalive else self.new_connection_loop
        self.threads = [
            threading.Thread(target=run, args=(targets[n % len(targets)],), daemon=True)
            for n in range(threads)
        ]

    def wait_finished(self, timeout: float) -> None:
        wait_until(
            lambda: not any(t.is_alive() for t in self.threads),
            timeout,
            message="client threads still running",
        )

    def record(self, status: int, body: bytes, target: str) -> None:
        with self.lock:
            if status == 200 and body.isdigit():
                self.ok += 1
                self.pids.add(int(body))
            else:
                self.failures.append(f"{time.monotonic():.3f} {target}: {status} {body[:80]!r}")

    def fail(self, target: str, what: str) -> None:
        with self.lock:
            self.failures.append(f"{time.monotonic():.3f} {target}: {what}")

    def refused_now(self) -> bool:
        """Record a refused connection; True if the thread should end."""
        with self.lock:
            self.refused.append(time.monotonic())
        return self.until_refused

    def new_connection_loop(self, target: str) -> None:
        while not self.stopping.is_set():
            try:
                response = fetch(self.address, target=target, timeout=10)
            except ConnectionRefusedError:
                if self.refused_now():
                    return
                self.fail(target, "connection refused")
            except Exception as exc:  # every other outcome is a failed request
                self.fail(target, repr(exc))
            else:
                self.record(response.status, response.body, target)

    def keepalive_loop(self, target: str) -> None:
        request = http_request("GET", target)
        sock: socket.socket | None = None
        reused = False
        try:
            while not self.stopping.is_set():
                if sock is None:
                    try:
                        sock = connect(self.address, timeout=10)
                    except ConnectionRefusedError:
                        if self.refused_now():
                            return
                        self.fail(target, "connection refused")
                        continue
                    reused = False
                try:
                    sock.sendall(request)
                    first = sock.recv(1, socket.MSG_PEEK)
                except (ConnectionResetError, BrokenPipeError):
                    first = b""
                except Exception as exc:
                    self.fail(target, f"waiting for the response: {exc!r}")
                    first = b""
                    reused = False
                if not first:
                    sock.close()
                    sock = None
                    if reused:
                        with self.lock:
                            self.retries += 1
                    else:
                        self.fail(target, "closed without a response on a new connection")
                    continue
                try:
                    response = read_response(sock)
                except Exception as exc:
                    self.fail(target, f"incomplete response: {exc!r}")
                    sock.close()
                    sock = None
                    continue
                self.record(response.status, response.body, target)
                reused = True
                if (response.header("Connection") or "").lower() == "close":
                    sock.close()
                    sock = None
        finally:
            if sock is not None:
                sock.close()


def wait_reload_done(server: Server, since: int, timeout: float = 20.0) -> str:
    """The outcome line of the reload whose HUP was sent after log offset `since`."""
    return server.wait_for_log(RELOAD_DONE, timeout, since=since).group(1)


def hup(server: Server, timeout: float = 20.0) -> str:
    since = len(server.log())
    server.signal(signal.SIGHUP)
    return wait_reload_done(server, since, timeout)


def replaced(server: Server, old: set[int], count: int) -> set[int]:
    """Wait until `count` workers serve and none of them is in `old`; return their pids."""

    def check() -> set[int]:
        pids = set(server.worker_pids())
        return pids if len(pids) == count and not pids & old else set()

    return wait_until(check, 15, message=f"workers {sorted(old)} were not all replaced")


def preforkd_reload(config: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("NOTIFY_SOCKET", "INVOCATION_ID")}
    env["PYTHONPATH"] = str(REPO_ROOT)
    return subprocess.run(
        [*DEFAULT_COMMAND, "reload", "-c", str(config), "--wait", "30"],
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=40,
    )


# --- tests -----------------------------------------------------------------------------------


# More clients than workers, so the accept queue is rarely empty (a worker that keeps
# draining a shared queue would never run out of work); every request spends some time in
# the app, which also bounds the rate of new connections (and of TIME_WAIT sockets).
BUSY = {"threads": 6, "targets": ("/?s=0.05", "/?s=0.05", "/?s=0.01")}
# Short enough that a worker stuck draining is killed (and requests fail) within the test.
GRACEFUL = {"graceful_timeout": 5}

@pytest.mark.parametrize(
    ("keepalive", "handover"),
    [(False, True), (True, True), (True, False)],
    ids=["new-connections", "keep-alive", "keep-alive-closed-at-reload"],
)
def test_twenty_reloads_under_load_lose_no_request(
    server_factory: ServerFactory, keepalive: bool, handover: bool
) -> None:
    server = server_factory(
        settings(workers={"count": 2, **GRACEFUL}, http={"keepalive_handover": handover}),
        app_source=APP,
        env=NO_PYC,
    )
    first = set(server.worker_pids())
    with Load(server.addresses()[0], keepalive=keepalive, **BUSY) as load:
        load.wait_for_requests(20)
        for n in range(20):
            outcome = hup(server)
            assert outcome.startswith(f"reloaded: generation {n + 2} serving with 2 "), outcome
            # every generation serves some: with keep-alive connections handed over, the
            # clients would otherwise only ever meet the generations they happen to catch
            load.wait_for_requests(4)
        load.wait_for_requests(20)  # the last generation serves too
        final = replaced(server, first, 2)
        load.wait_for_requests(20)
    assert load.failures == [], (
        f"{len(load.failures)} of {load.ok + len(load.failures)} requests failed "
        f"(retried on reused connections: {load.retries}): {load.failures[:5]}"
    )
    assert "graceful timeout; killing it" not in server.log()
    assert final & load.pids, "the load never reached the last generation"
    assert len(load.pids) > 10, "the load saw too few generations to mean anything"


def test_replaced_workers_exit_promptly_under_load(server_factory: ServerFactory) -> None:
    """An old worker must stop taking connections from the shared queue once it is replaced:
    the new generation serves that queue. Otherwise, under steady load, it never runs out
    of work and is killed (mid-request) at the end of its graceful timeout."""
    server = server_factory(settings(workers={"count": 2, **GRACEFUL}), app_source=APP, env=NO_PYC)
    old = server.worker_pids()
    with Load(server.addresses()[0], **BUSY) as load:
        load.wait_for_requests(20)
        since = len(server.log())
        sent = time.monotonic()
        server.signal(signal.SIGHUP)
        for pid in old:
            server.wait_for_log(f"(pid {pid}) exited", 10, since=since)
        elapsed = time.monotonic() - sent
        load.wait_for_requests(20)
    exits = re.findall(r"worker \d \(pid \d+\) exited.*", server.log()[since:])
    assert elapsed < 3 and load.failures == [], (
        f"old workers gone {elapsed:.1f}s after HUP ({exits}); "
        f"{len(load.failures)} failed requests: {load.failures[:5]}"
    )


def test_hup_with_broken_yaml_keeps_the_old_generation(server_factory: ServerFactory) -> None:
    server = server_factory(settings(), app_source=APP, env=NO_PYC)
    old = server.worker_pids()
    good = server.config.read_text()
    lines = good.splitlines()
    broken_line = len(lines) + 1
    with Load(server.addresses()[0]) as load:
        load.wait_for_requests(10)
        server.config.write_text(good + "logging: level: info\n")  # 'mapping values not allowed'
        outcome = hup(server)
        assert outcome.startswith("reload failed: "), outcome
        assert f"{server.config}:{broken_line}" in outcome
        assert outcome.endswith("still serving generation 1")
        load.wait_for_requests(20)
        assert server.worker_pids() == old
        assert "booted" not in server.log()[server.log().index("HUP: reloading") :]

        server.config.write_text(good)  # fixed: the next HUP works
        assert hup(server).startswith("reloaded: generation ")
        replaced(server, set(old), 2)
        load.wait_for_requests(10)
    assert load.failures == []


def test_hup_with_an_app_that_cannot_import_keeps_the_old_generation(
    server_factory: ServerFactory, tmp_path: Path
) -> None:
    pidfile = tmp_path / "reload.pid"
    server = server_factory(settings(pidfile=str(pidfile)), app_source=APP, env=NO_PYC)
    old = server.worker_pids()
    app = server.workdir / "app.py"
    with Load(server.addresses()[0]) as load:
        load.wait_for_requests(10)
        app.write_text(BROKEN_APP)
        outcome = hup(server)
        assert outcome.startswith(
            "reload failed: the new generation's first worker could not boot ("
        ), outcome
        assert "pf-reload: broken on purpose" in outcome
        assert outcome.endswith("; still serving generation 1")
        load.wait_for_requests(20)
        assert server.worker_pids() == old

        result = preforkd_reload(server.config)
        assert result.returncode == 1, result.stdout + result.stderr
        assert "could not boot" in result.stderr
        assert "pf-reload: broken on purpose" in result.stderr
        load.wait_for_requests(20)
        assert server.worker_pids() == old

        app.write_text(APP)
        result = preforkd_reload(server.config)
        assert result.returncode == 0, result.stdout + result.stderr
        assert "reloaded: generation " in result.stdout
        new = replaced(server, set(old), 2)
        load.wait_for_requests(20)
    assert load.failures == []
    assert load.pids & new


def test_term_under_load_answers_every_accepted_connection(
    server_factory: ServerFactory, tmp_path: Path
) -> None:
    """Graceful stop with clients still arriving: requests in the app and connections
    already queued are answered, later connections are refused, and the server exits as
    soon as that work is done (not at the end of the graceful timeout)."""
    pidfile = tmp_path / "term.pid"
    server = server_factory(
        settings(pidfile=str(pidfile), workers={"count": 2, **GRACEFUL}), app_source=APP
    )
    with Load(
        server.addresses()[0],
        threads=6,
        until_refused=True,
        targets=("/?s=0.05", "/?s=0.2", "/?s=0.01", "/?s=0.05", "/?s=0.05", "/?s=0.01"),
    ) as load:
        load.wait_for_requests(50)
        term_sent = time.monotonic()
        server.signal(signal.SIGTERM)
        code = server.wait_exit(20)
        elapsed = time.monotonic() - term_sent
        load.wait_finished(15)
    killed = re.findall(r".*graceful timeout; killing it", server.log())
    assert load.failures == [] and elapsed < 3 and not killed, (
        f"exit {elapsed:.1f}s after TERM; {killed}; {len(load.failures)} failed "
        f"and {load.ok} succeeded requests: {load.failures[:6]}"
    )
    assert code == 0
    assert load.refused, "no client saw the listeners close"
    assert min(load.refused) >= term_sent
    assert not pidfile.exists()
    assert "stopped" in server.log()


def test_ttin_survives_a_reload_unless_the_file_changes_the_count(
    server_factory: ServerFactory,
) -> None:
    server = server_factory(settings(), app_source=APP, env=NO_PYC)
    server.signal(signal.SIGTTIN)
    server.wait_for_log("TTIN: 3 workers")
    wait_until(lambda: len(server.worker_pids()) == 3, 10, message="TTIN added no worker")
    before = set(server.worker_pids())

    assert hup(server).startswith("reloaded: generation 2 serving with 3 workers")
    after = replaced(server, before, 3)

    server.config.write_text(server.config.read_text().replace("count: 2", "count: 4"))
    assert hup(server).startswith("reloaded: generation 3 serving with 4 workers")
    replaced(server, after, 4)


def test_a_reload_says_which_settings_wait_for_a_restart(server_factory: ServerFactory) -> None:
    """The backlog, the umask and the like are the master's open state: a reload that
    changes them serves on, and says they keep their old value until a restart. (The
    `logging` section is applied by a reload: test_reload_logging.py.)"""
    server = server_factory(settings(), app_source=APP, env=NO_PYC)
    server.config.write_text(server.config.read_text() + "backlog: 64\numask: '027'\n")
    assert hup(server).startswith("reloaded: generation 2 ")
    server.wait_for_log(
        "reload: umask, backlog changed; the running server keeps the old value "
        "until it is restarted", timeout=5,
    )
    assert hup(server).startswith("reloaded: generation 3 ")
    assert server.log().count("changed; the running server keeps") == 1  # nothing new


def test_reload_keeps_unchanged_binds_and_serves_added_ones(
    server_factory: ServerFactory, short_tmp: Path
) -> None:
    server = server_factory(settings(), app_source=APP, env=NO_PYC)
    [tcp] = server.addresses()
    with Load(tcp) as load:
        load.wait_for_requests(10)
        assert hup(server).startswith("reloaded: generation 2 ")
        assert server.addresses() == [tcp]

        added = short_tmp / "added.sock"
        server.config.write_text(
            server.config.read_text().replace("- 127.0.0.1:0", f"- 127.0.0.1:0\n- unix:{added}")
        )
        assert hup(server).startswith("reloaded: generation 3 ")
        assert server.addresses() == [tcp, ("unix", str(added))]
        current = server.worker_pids()
        assert int(fetch(str(added)).body) in current
        assert int(fetch(tcp).body) in current
        load.wait_for_requests(10)
    assert load.failures == []
