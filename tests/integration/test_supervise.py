"""Supervision of a real preforkd: memory limits, hung requests, the dynamic pool, the
max_recycling hand-off, crash-loop protection, and the status endpoint that reports them
(`/status`, `/metrics`, `/ready`, `/live`, `preforkd status`).

Every server gets its status endpoint on a unix socket in a short temporary directory. The
apps are in apps/pf_supervise_app.py (`/`, `/leak`, `/sleep`, `/hang`; see its docstring)
and apps/pf_supervise_crashloop.py (fails to import once a marker file exists).
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

import harness
from harness import (
    REPO_ROOT,
    Response,
    Server,
    ServerFactory,
    address,
    connect,
    fetch,
    gone,
    http_request,
    read_response,
    recv_until_close,
    wait_until,
)

APP = "pf_supervise_app:app"
MIB = 1 << 20

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def settings(admin_dir: Path, app: str = APP, **more: Any) -> dict[str, Any]:
    return harness.settings(app, admin={"socket": str(admin_dir / "admin.sock")}, **more)


def admin_socket(server: Server) -> str:
    match = re.search(r"status endpoint at (\S+)", server.log())
    assert match, f"no status endpoint in the log\n{server.log_tail()}"
    return match.group(1)


def get(server: Server, target: str) -> Response:
    return fetch(admin_socket(server), target=target)


def status(server: Server) -> dict[str, Any]:
    response = get(server, "/status")
    assert response.status == 200, response
    return json.loads(response.body)  # type: ignore[no-any-return]


def metrics(server: Server) -> Samples:
    """`/metrics` parsed by prometheus_client: (sample name, sorted labels) -> value."""
    response = get(server, "/metrics")
    assert response.status == 200, response
    samples: Samples = {}
    for family in text_string_to_metric_families(response.body.decode()):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def counter(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, tuple(sorted(labels.items())))]


def start_request(server: Server, target: str, marker: str) -> socket.socket:
    """Send GET `target` on a new connection; return it once the log shows `marker`."""
    sock = connect(address(server), timeout=15)
    sock.sendall(http_request("GET", target))
    server.wait_for_log(marker, timeout=10)
    return sock


def pid_of(response: Response) -> int:
    assert response.status == 200, response
    return int(response.body.split()[0])


class Load:
    """A background loop of GET / on fresh connections, bounded in count and time; any
    status other than 200, or any connection error, is recorded as a failure."""

    def __init__(self, server: Server, max_requests: int = 3000, max_seconds: float = 20.0,
                 pause: float = 0.0) -> None:
        self.where = address(server)
        self.max_requests = max_requests
        self.max_seconds = max_seconds
        self.pause = pause
        self.done = threading.Event()
        self.pids: list[int] = []
        self.failures: list[str] = []
        self.thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Load:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.done.set()
        self.thread.join(self.max_seconds + 10)

    def _run(self) -> None:
        deadline = time.monotonic() + self.max_seconds
        while (
            not self.done.is_set()
            and len(self.pids) + len(self.failures) < self.max_requests
            and time.monotonic() < deadline
        ):
            try:
                response = fetch(self.where, target="/", timeout=10)
            except (OSError, EOFError, ValueError) as exc:
                self.failures.append(repr(exc))
            else:
                if response.status == 200:
                    self.pids.append(int(response.body))
                else:
                    self.failures.append(f"status {response.status}: {response.body!r}")
            if self.pause:
                time.sleep(self.pause)


# --- memory limits ---------------------------------------------------------------------------


def leak_until(server: Server, limit_mib: int, pattern: str, attempts: int = 6) -> re.Match[str]:
    """Leak LEAK_MIB at a time until the worker's USS (as /status reads it) is over
    `limit_mib`, then wait for the master's next memory check to log `pattern`."""
    regex = re.compile(pattern)
    for _ in range(attempts):
        try:
            fetch(address(server), target="/leak", timeout=10)
        except (OSError, EOFError):
            pass  # the hard limit may kill the worker in the middle of a request
        uss = [w["uss"] or 0 for w in status(server)["workers"]]
        if regex.search(server.log()) or max(uss, default=0) > limit_mib * MIB:
            return server.wait_for_log(regex, timeout=3)
    raise AssertionError(f"never logged {pattern!r} after {attempts} leaks\n{server.log_tail()}")


def test_a_leaking_worker_is_replaced_at_max_memory_without_failing_a_request(
    server_factory: ServerFactory, short_tmp: Path
) -> None:
    server = server_factory(settings(
        short_tmp, workers={"count": 1, "max_memory": 40, "memory_check_interval": 0.3}
    ))
    leaky = pid_of(fetch(address(server)))
    (worker,) = wait_until(lambda: [w for w in status(server)["workers"] if w["uss"]], 5)
    assert worker["uss"] < 40 * MIB, f"the worker starts over the limit: {worker}"

    with Load(server, pause=0.01) as load:
        match = leak_until(server, 40, rf"worker 1 \(pid {leaky}\) uses ([\d.]+) MiB, "
                                   r"over max_memory \(40 MiB\)")
        assert float(match.group(1)) > 40
        server.wait_for_log(f"worker 1 (pid {leaky}) will be replaced: memory", timeout=5)
        server.wait_for_log(
            f"worker 1 (pid {leaky}) exited (recycled: memory): exit code 0", timeout=10
        )
        wait_until(lambda: gone(leaky), 5, message=f"pid {leaky} still there")
        successor = pid_of(fetch(address(server)))
        wait_until(lambda: len(load.pids) > 20 and load.pids[-1] == successor, 10)

    assert successor != leaky
    assert load.failures == []
    assert server.worker_pids() == [successor]
    totals = status(server)["totals"]
    assert totals["recycles"]["memory"] == 1
    assert counter(metrics(server), "preforkd_worker_recycles_total", reason="memory") == 1
    assert "max_memory_hard" not in server.log()


def test_a_worker_over_max_memory_hard_is_killed_at_once(
    server_factory: ServerFactory, short_tmp: Path
) -> None:
    server = server_factory(settings(
        short_tmp, workers={"count": 1, "max_memory_hard": 50, "memory_check_interval": 0.3}
    ))
    hog = pid_of(fetch(address(server)))

    match = leak_until(server, 50, rf"worker 1 \(pid {hog}\) uses ([\d.]+) MiB, "
                               r"over max_memory_hard \(50 MiB\); killing it")

    assert float(match.group(1)) > 50
    server.wait_for_log(
        re.compile(rf"worker 1 \(pid {hog}\) exited \(.*\): killed by SIGKILL"), timeout=5
    )
    wait_until(lambda: gone(hog), 5)
    successor = wait_until(lambda: pid_of(fetch(address(server))), 10, ignore=(OSError,))
    assert successor != hog
    assert "will be replaced" not in server.log()  # no hand-off over the hard limit
    assert counter(metrics(server), "preforkd_worker_recycles_total", reason="memory") == 1
    assert counter(metrics(server), "preforkd_worker_recycles_total", reason="crash") == 0


# --- hung requests ---------------------------------------------------------------------------


def test_a_hung_request_dumps_its_stack_and_the_worker_is_replaced(
    server_factory: ServerFactory, short_tmp: Path
) -> None:
    server = server_factory(settings(
        short_tmp, workers={"count": 1, "timeout": 1, "timeout_grace": 2}
    ))
    hung = pid_of(fetch(address(server)))

    with start_request(server, "/hang", "pf_supervise: hanging") as sock:
        server.wait_for_log(re.compile(
            rf"worker 1 \(pid {hung}\) timed out after [\d.]+s serving GET /hang "
            r"from 127\.0\.0\.1; "
            r"dumping its stack and killing it"
        ), timeout=5)
        # faulthandler's dump names the app's function, in the app's file
        server.wait_for_log(re.compile(
            r'File "[^"]*pf_supervise_app\.py", line \d+ in hang_here_in_pf_supervise_app'
        ), timeout=5)
        assert recv_until_close(sock, timeout=5) == b""  # no answer; the connection ends

    server.wait_for_log(re.compile(
        rf"worker 1 \(pid {hung}\) exited \(timeout\): killed by SIG(ABRT|KILL)"
    ), timeout=5)
    successor = wait_until(lambda: pid_of(fetch(address(server))), 10, ignore=(OSError,))
    assert successor != hung
    samples = metrics(server)
    assert counter(samples, "preforkd_worker_recycles_total", reason="timeout") == 1
    assert counter(samples, "preforkd_worker_recycles_total", reason="crash") == 0


def test_timeout_zero_lets_a_long_request_finish(
    server_factory: ServerFactory, short_tmp: Path
) -> None:
    """workers.timeout: 0 (no hang detection): a request far longer than the shortest
    timeout a config could otherwise give is answered, and nothing is called hung."""
    server = server_factory(settings(short_tmp, workers={"count": 1, "timeout": 0}))
    response = fetch(address(server), target="/sleep?s=2&tag=long", timeout=15)
    assert response.status == 200
    assert "timed out" not in server.log()
    assert counter(metrics(server), "preforkd_worker_recycles_total", reason="timeout") == 0


def test_a_full_listen_queue_shows_in_metrics_and_the_log(
    server_factory: ServerFactory, short_tmp: Path
) -> None:
    """The only worker is busy; connections pile up in the kernel's accept queue (backlog 2)
    until it is full: /metrics and /status show the queue, the log says it is full, and
    once the worker is free it serves what waited."""
    server = server_factory(settings(short_tmp, workers={"count": 1}, backlog=2))
    where = address(server)
    url = f"http://{where[1]}:{where[2]}"
    waiting: list[socket.socket] = []
    with start_request(server, "/sleep?s=3&tag=q", "pf_supervise: sleeping q") as busy:
        try:
            for _ in range(2):
                sock = connect(where, timeout=5)
                sock.sendall(http_request("GET", "/"))
                waiting.append(sock)

            def full() -> bool:
                samples = metrics(server)
                return counter(samples, "preforkd_listen_queue", listener=url) >= 2
            wait_until(full, 5, message="the accept queue never showed 2 waiting")
            samples = metrics(server)
            assert counter(samples, "preforkd_listen_queue_limit", listener=url) == 2
            server.wait_for_log(f"listen queue of {url} is full (2/2)", timeout=5)
            (entry,) = status(server)["listeners"]
            assert entry["queue_limit"] == 2 and entry["queue_full_seen"] >= 1

            assert read_response(busy).status == 200
            for sock in waiting:  # served once the worker is free: nothing was lost
                assert read_response(sock).status == 200
        finally:
            for sock in waiting:
                sock.close()
    wait_until(lambda: counter(metrics(server), "preforkd_listen_queue", listener=url) == 0, 5)


# --- the dynamic pool ------------------------------------------------------------------------


def test_the_pool_grows_under_load_up_to_max_and_shrinks_after(
    server_factory: ServerFactory, short_tmp: Path
) -> None:
    server = server_factory(settings(
        short_tmp, workers={"count": 1, "max": 4, "min_spare": 1, "max_spare": 1}
    ))

    def settled() -> bool:
        doc = status(server)
        return doc["master"]["target_workers"] == 1 and len(doc["workers"]) == 1

    wait_until(settled, 6, message="pool did not settle at 1 worker")
    results: list[Response | Exception] = []

    def slow(tag: str) -> None:
        try:
            results.append(fetch(address(server), target=f"/sleep?s=4&tag={tag}", timeout=20))
        except Exception as exc:
            results.append(exc)

    threads = [threading.Thread(target=slow, args=(f"r{i}",), daemon=True) for i in range(4)]
    threads[0].start()
    server.wait_for_log("pf_supervise: sleeping r0", timeout=5)
    for thread in threads[1:]:
        thread.start()  # queued until the pool grows: the only worker is busy

    seen: list[tuple[int, int]] = []  # (target_workers, busy) per poll

    def at_max() -> bool:
        doc = status(server)
        seen.append((doc["master"]["target_workers"], doc["workers_by_state"]["busy"]))
        return doc["master"]["target_workers"] == 4 and doc["workers_by_state"]["busy"] >= 3

    wait_until(at_max, 8, interval=0.05, message=f"pool never reached 4 busy workers: {seen}")
    assert max(target for target, _ in seen) == 4
    for thread in threads:
        thread.join(15)
    assert [r.status if isinstance(r, Response) else r for r in results] == [200] * 4
    assert len({int(r.body) for r in results if isinstance(r, Response)}) >= 3

    wait_until(settled, 10, interval=0.1, message="pool did not shrink back to 1 worker")
    log = server.log()
    assert "pool: 0 idle (min_spare 1): growing to 2 workers" in log
    assert "pool: 0 idle (min_spare 1): growing to 4 workers" in log
    assert "(max_spare 1): shrinking to 1 workers" in log
    assert "growing to 5" not in log


def test_a_dynamic_pool_starts_with_count_workers(
    server_factory: ServerFactory, short_tmp: Path
) -> None:
    # Nothing is busy at startup: the spare-server rule has nothing to grow for.
    server = server_factory(settings(
        short_tmp, workers={"count": 1, "max": 4, "min_spare": 1, "max_spare": 1}
    ))
    log = server.log()
    assert "ready: 1 workers" in log
    assert "growing" not in log


# --- recycling under load --------------------------------------------------------------------


def test_max_recycling_1_never_leaves_the_pool_short(
    server_factory: ServerFactory, short_tmp: Path
) -> None:
    count = 3
    server = server_factory(settings(
        short_tmp, workers={"count": count, "max_requests": 2, "max_recycling": 1}
    ))
    first = set(server.worker_pids())
    polls: list[dict[str, int]] = []
    stop = threading.Event()

    def poll() -> None:
        deadline = time.monotonic() + 15
        while not stop.is_set() and time.monotonic() < deadline:
            lifecycles = [w["lifecycle"] for w in status(server)["workers"]]
            polls.append({state: lifecycles.count(state)
                          for state in ("booting", "ready", "stopping", "aborting", "killed")})
            time.sleep(0.02)

    poller = threading.Thread(target=poll, daemon=True)
    poller.start()
    try:
        with Load(server, max_requests=5000, max_seconds=5) as load:
            load.thread.join(10)
    finally:
        stop.set()
        poller.join(10)

    assert load.failures == []
    assert len(set(load.pids) - first) >= count, "workers were not recycled"
    assert len(polls) > 20
    fewest_ready = min(p["ready"] for p in polls)
    assert fewest_ready >= count - 1, f"more than one worker missing: {fewest_ready} ready"
    assert fewest_ready == count, "successors should boot before the old workers stop"
    most_under_way = max(p["booting"] + p["stopping"] for p in polls)
    assert most_under_way <= 1, f"{most_under_way} replacements under way at once"
    assert [p for p in polls if p["aborting"] or p["killed"]] == []
    log = server.log()
    assert re.search(r"worker \d \(pid \d+\): 2 requests served; asking to be replaced", log)
    assert re.search(r"worker \d \(pid \d+\) will be replaced: max_requests", log)
    assert "killing it" not in log
    # the counters of the many exited workers are all kept
    wait_until(lambda: status(server)["totals"]["requests"] == len(load.pids), 5,
               message=f"{len(load.pids)} requests made")
    samples = metrics(server)
    assert counter(samples, "preforkd_requests_total", **{"class": "2xx"}) == len(load.pids)
    assert counter(samples, "preforkd_request_duration_seconds_count") == len(load.pids)
    recycled = counter(samples, "preforkd_worker_recycles_total", reason="max_requests")
    assert recycled >= len(set(load.pids) - first)
    assert counter(samples, "preforkd_worker_restarts_total") >= len(set(load.pids) - first)


# --- the status endpoint ---------------------------------------------------------------------


def test_metrics_count_the_requests_made(server_factory: ServerFactory, short_tmp: Path) -> None:
    server = server_factory(settings(short_tmp, workers={"count": 2}))
    started = time.time()
    responses = [fetch(address(server), target="/") for _ in range(7)]
    responses += [fetch(address(server), target="/no-such-page") for _ in range(2)]
    assert [r.status for r in responses] == [200] * 7 + [404] * 2

    # a worker counts a request just after sending its response
    wait_until(lambda: status(server)["totals"]["requests"] == 9, 5)
    samples = metrics(server)

    assert counter(samples, "preforkd_requests_total", **{"class": "2xx"}) == 7
    assert counter(samples, "preforkd_requests_total", **{"class": "4xx"}) == 2
    for cls in ("1xx", "3xx", "5xx"):
        assert counter(samples, "preforkd_requests_total", **{"class": cls}) == 0
    assert counter(samples, "preforkd_request_duration_seconds_count") == 9
    assert counter(samples, "preforkd_request_duration_seconds_bucket", le="+Inf") == 9
    buckets = sorted(
        (float(dict(labels)["le"]), value)
        for (name, labels), value in samples.items()
        if name == "preforkd_request_duration_seconds_bucket"
    )
    assert [v for _, v in buckets] == sorted(v for _, v in buckets)  # cumulative
    assert 0 < counter(samples, "preforkd_request_duration_seconds_sum") < 9
    assert counter(samples, "preforkd_response_body_bytes_total") == sum(
        len(r.body) for r in responses
    )
    pids = server.worker_pids()
    uss = {
        int(dict(labels)["pid"]): value
        for (name, labels), value in samples.items()
        if name == "preforkd_worker_memory_uss_bytes"
    }
    assert sorted(uss) == pids and all(v > 0 for v in uss.values())
    by_state = {
        dict(labels)["state"]: value
        for (name, labels), value in samples.items()
        if name == "preforkd_workers"
    }
    assert set(by_state) == {
        "booting", "idle", "keepalive", "reading", "waiting", "busy", "draining"
    }
    assert by_state["idle"] + by_state["keepalive"] == 2
    assert counter(samples, "preforkd_degraded") == 0
    assert counter(samples, "preforkd_generation") == 1
    assert counter(samples, "preforkd_worker_restarts_total") == 0
    assert counter(samples, "preforkd_worker_boot_failures_total") == 0
    assert counter(samples, "preforkd_reloads_total", result="ok") == 0
    assert started - 30 < counter(samples, "preforkd_start_time_seconds") <= started

    doc = status(server)
    assert doc["master"]["pid"] == server.pid
    assert doc["master"]["state"] == "running" and doc["master"]["ready"] is True
    assert sorted(w["pid"] for w in doc["workers"]) == pids
    assert doc["totals"]["by_class"]["2xx"] == 7
    assert sum(doc["totals"]["buckets"]) == 9


def test_status_command_shows_a_busy_worker_and_its_request(
    server_factory: ServerFactory, short_tmp: Path
) -> None:
    # no admin.socket: the endpoint defaults to PIDFILE.sock
    server = server_factory(
        harness.settings(APP, pidfile=str(short_tmp / "pf.pid"), workers={"count": 2})
    )
    assert admin_socket(server) == str(short_tmp / "pf.pid.sock")
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}

    def command(*extra: str) -> str:
        done = subprocess.run(
            [sys.executable, "-m", "prefork", "status", "-c", str(server.config), *extra],
            capture_output=True, text=True, timeout=20, env=env, cwd=server.workdir,
        )
        assert done.returncode == 0, done.stderr
        return done.stdout

    with start_request(server, "/sleep?s=4&tag=cli", "pf_supervise: sleeping cli") as sock:
        table = command()
        document = json.loads(command("--json"))
        response = read_response(sock)

    assert response.status == 200
    busy_pid = int(response.body)
    lines = table.splitlines()
    assert f"master pid {server.pid}" in lines[0]
    (header,) = [i for i, line in enumerate(lines) if line.split()[:1] == ["WORKER"]]
    assert lines[header].split() == [
        "WORKER", "PID", "GEN", "STATE", "REQS", "CONNS", "USS", "AGE", "CLIENT", "CURRENT",
        "REQUEST",
    ]
    rows = {int(line.split()[1]): line.split() for line in lines[header + 1 :] if line.strip()}
    assert sorted(rows) == server.worker_pids()
    busy = rows[busy_pid]
    assert busy[3] == "busy"
    assert busy[5] == "1"  # the connection of the request under way
    # the path only (queries may hold secrets), and who asked
    assert busy[-3:] == ["127.0.0.1", "GET", "/sleep"]
    (other,) = [row for pid, row in rows.items() if pid != busy_pid]
    assert other[3] in ("idle", "keepalive") and len(other) == 7  # no age, no request

    by_pid = {w["pid"]: w for w in document["workers"]}
    assert by_pid[busy_pid]["activity"] == "busy"
    assert by_pid[busy_pid]["current"]["method"] == "GET"
    assert by_pid[busy_pid]["current"]["target"] == "/sleep"
    assert by_pid[busy_pid]["current"]["client"] == "127.0.0.1"
    assert by_pid[busy_pid]["connections"] == 1
    assert document["workers_by_state"]["busy"] == 1
    assert document["master"]["pid"] == server.pid


def test_a_silent_status_client_does_not_hold_up_the_endpoint(
    server_factory: ServerFactory, short_tmp: Path
) -> None:
    server = server_factory(settings(short_tmp, workers={"count": 1}))
    silent = [connect(admin_socket(server), timeout=10) for _ in range(3)]
    silent[0].sendall(b"GET /sta")  # half a request line, then nothing
    try:
        began = time.monotonic()
        assert get(server, "/live").status == 200
        assert status(server)["master"]["state"] == "running"
        assert time.monotonic() - began < 1.0
        assert pid_of(fetch(address(server)))  # the master still does its work
        for sock in silent:  # dropped after the endpoint's request timeout
            assert recv_until_close(sock, timeout=5) == b""
    finally:
        for sock in silent:
            sock.close()


def test_status_command_without_an_endpoint_says_why(tmp_path: Path) -> None:
    config = tmp_path / "preforkd.yaml"
    config.write_text(f"app: {APP}\n")
    done = subprocess.run(
        [sys.executable, "-m", "prefork", "status", "-c", str(config)],
        capture_output=True, text=True, timeout=20, cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
    )
    assert done.returncode == 2  # a setting the command needs is missing, as for reload
    assert "needs `pidfile` (or `admin.socket` or `admin.bind`)" in done.stderr
    assert done.stdout == ""


def test_ready_and_live_follow_the_lifecycle(
    server_factory: ServerFactory, short_tmp: Path
) -> None:
    server = server_factory(settings(short_tmp, workers={"count": 1}))

    ready = get(server, "/ready")
    assert (ready.status, ready.body) == (200, b"ready\n")
    assert ready.header("Connection") == "close"
    assert get(server, "/live").status == 200
    assert get(server, "/nope").status == 404
    with connect(admin_socket(server)) as sock:
        sock.sendall(b"POST /status HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n")
        assert read_response(sock).status == 405
    assert os.stat(admin_socket(server)).st_mode & 0o777 == 0o600

    with start_request(server, "/sleep?s=2&tag=stop", "pf_supervise: sleeping stop") as sock:
        server.signal(signal.SIGTERM)
        wait_until(lambda: get(server, "/ready").status == 503, 5)
        assert get(server, "/ready").body == b"not ready\n"
        assert status(server)["master"]["state"] == "stopping"
        assert status(server)["master"]["ready"] is False
        assert get(server, "/live").status == 200
        assert read_response(sock).status == 200  # the request in flight still finishes

    assert server.wait_exit(10) == 0


# --- crash-loop protection -------------------------------------------------------------------


def crash_loop(
    server_factory: ServerFactory, short_tmp: Path, tmp_path: Path, **workers: Any
) -> tuple[Server, Path, int, int]:
    """A 2-worker server whose app stops importing; worker 1 is killed and cannot come back.
    Returns the server, the marker file, and the killed and surviving pids."""
    marker = tmp_path / "refuse-to-load"
    server = server_factory(
        settings(
            short_tmp,
            app="pf_supervise_crashloop:app",
            workers={"count": 2, "boot_failure_limit": 3, "boot_failure_window": 60, **workers},
        ),
        env={"PF_SUPERVISE_MARKER": str(marker)},
    )
    victim, survivor = (w["pid"] for w in sorted(status(server)["workers"],
                                                  key=lambda w: w["number"]))
    marker.touch()
    os.kill(victim, signal.SIGKILL)
    return server, marker, victim, survivor


def test_a_crash_loop_degrades_the_server_which_keeps_serving(
    server_factory: ServerFactory, short_tmp: Path, tmp_path: Path
) -> None:
    server, marker, victim, survivor = crash_loop(server_factory, short_tmp, tmp_path)

    server.wait_for_log(
        "degraded: 3 workers failed to boot within 60s; the healthy workers keep serving",
        timeout=15,
    )
    died = r"died (unexpectedly: |[\d.]+s after booting \()killed by SIGKILL"
    assert re.search(rf"worker 1 \(pid {victim}\) {died}", server.log())
    assert "refusing to load" in server.log()  # the workers' tracebacks
    doc = status(server)
    assert doc["master"]["degraded"] is True
    assert doc["master"]["state"] == "degraded"
    assert doc["master"]["ready"] is True  # the survivor serves
    assert doc["totals"]["boot_failures"] >= 3
    samples = metrics(server)
    assert counter(samples, "preforkd_degraded") == 1
    assert counter(samples, "preforkd_worker_boot_failures_total") >= 3
    assert counter(samples, "preforkd_worker_recycles_total", reason="crash") == 1
    assert server.running()
    for _ in range(3):
        assert pid_of(fetch(address(server))) == survivor

    marker.unlink()
    server.wait_for_log("recovered: workers boot again", timeout=20)
    doc = status(server)
    assert doc["master"]["degraded"] is False
    assert doc["master"]["state"] == "running"
    assert counter(metrics(server), "preforkd_degraded") == 0
    wait_until(lambda: len(server.worker_pids()) == 2, 5)


def test_exit_on_degraded_stops_the_master_with_status_1(
    server_factory: ServerFactory, short_tmp: Path, tmp_path: Path
) -> None:
    server, _, _, _ = crash_loop(server_factory, short_tmp, tmp_path, exit_on_degraded=True)

    assert server.wait_exit(20) == 1
    assert "degraded: 3 workers failed to boot within 60s" in server.log()
    assert not os.path.exists(admin_socket(server))  # cleaned up on the way out
