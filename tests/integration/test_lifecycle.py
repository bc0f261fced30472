"""Process lifecycle of a real preforkd: recycling, crashes, timeouts, signals, log reopening.

Every test starts its own server (bound to port 0) from `server_factory`, which stops it.
The apps are in apps/pf_testapp.py: `/` answers with the worker's pid, `/sleep?s=S&tag=T`
logs `pf_testapp: sleeping T` to stderr and then sleeps S seconds, `/hang` sleeps 30 s.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import time
from collections.abc import Callable

from harness import (
    Server,
    ServerFactory,
    address,
    connect,
    fetch,
    gone,
    http_request,
    live_group_members,
    parse_addresses,
    read_response,
    recv_until_close,
    settings,
    wait_until,
)


def start_request(server: Server, target: str, marker: str) -> socket.socket:
    """Send GET `target` on a new connection; return it once the log shows `marker`."""
    sock = connect(address(server), timeout=10)
    sock.sendall(http_request("GET", target))
    server.wait_for_log(marker, timeout=5)
    return sock


def pids_if(server: Server, predicate: Callable[[list[int]], bool]) -> list[int] | None:
    """The server's live worker pids if they satisfy `predicate`, else None (for wait_until)."""
    pids = server.worker_pids()
    return pids if predicate(pids) else None


# --- recycling and crashes ---------------------------------------------------------------


def test_max_requests_recycles_workers_without_leaving_zombies(
    server_factory: ServerFactory,
) -> None:
    server = server_factory(settings(workers={"count": 2, "max_requests": 3}))
    first = set(server.worker_pids())
    assert len(first) == 2

    answered: set[int] = set()

    def a_successor_answers() -> bool:
        response = fetch(address(server))
        assert response.status == 200
        answered.add(int(response.body))
        return bool(answered - first)

    # A worker past max_requests keeps serving until its successor has booted, so keep
    # asking until a successor answers (every answer must be a 200 meanwhile).
    wait_until(a_successor_answers, timeout=15, interval=0.01,
               message="no successor answered")
    asked = re.findall(r"worker \d+ \(pid (\d+)\): \d+ requests served; asking to be replaced",
                       server.log())
    assert asked, server.log_tail()
    for pid in asked:
        assert int(pid) in first
    server.wait_for_log(
        re.compile(rf"worker \d+ \(pid {asked[0]}\) exited \(recycled: max_requests\)")
    )
    wait_until(
        lambda: "zombie" not in server.children().values() and len(server.worker_pids()) == 2,
        timeout=5,
        message="after recycling: 2 live workers and no zombie children",
    )


def test_recycled_worker_closes_its_idle_keepalive_connection(
    server_factory: ServerFactory,
) -> None:
    server = server_factory(settings(workers={"count": 1, "max_requests": 2}))
    (first,) = server.worker_pids()
    with connect(address(server)) as sock:
        for _ in range(2):
            sock.sendall(http_request("GET", "/"))
            assert int(read_response(sock).body) == first
        # once its successor is ready the old worker stops, closing this idle connection
        assert recv_until_close(sock, timeout=10) == b"", "the recycled worker kept it open"
    server.wait_for_log(f"(pid {first}): 2 requests served; asking to be replaced")
    server.wait_for_log(
        re.compile(rf"worker 1 \(pid {first}\) exited \(recycled: max_requests\)")
    )
    response = fetch(address(server))
    assert response.status == 200
    assert int(response.body) != first


def test_capacity_never_drops_while_a_worker_is_recycled(
    server_factory: ServerFactory,
) -> None:
    """With one worker and max_requests 2, the successor boots before the old one stops:
    a client hammering the server never waits for a worker to boot from nothing."""
    server = server_factory(settings(workers={"count": 1, "max_requests": 2}))
    (first,) = server.worker_pids()
    seen: list[int] = []
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and len(set(seen)) < 3:
        started = time.monotonic()
        response = fetch(address(server))
        assert response.status == 200
        seen.append(int(response.body))
        # a cold start (fork + import) would show as a pause; the hand-off must not
        assert time.monotonic() - started < 0.5, "a request waited for a worker to boot"
    assert len(set(seen)) >= 3, f"only {set(seen)} answered"
    assert seen[0] == first


def test_killed_worker_is_replaced(server_factory: ServerFactory) -> None:
    server = server_factory(settings(workers={"count": 2}))
    before = server.worker_pids()
    assert len(before) == 2
    victim = before[0]

    os.kill(victim, signal.SIGKILL)
    server.wait_for_log(
        # "died unexpectedly", or, this soon after it booted, "died 0.1s after booting"
        re.compile(
            rf"worker \d+ \(pid {victim}\) died "
            r"(unexpectedly: |[\d.]+s after booting \()killed by SIGKILL"
        )
    )
    after = wait_until(
        lambda: pids_if(server, lambda pids: len(pids) == 2 and victim not in pids),
        timeout=10,
        message="the killed worker was not replaced",
    )
    assert before[1] in after
    (new,) = set(after) - set(before)
    server.wait_for_log(re.compile(rf"worker \d+ \(pid {new}\) booted"))
    pids = {int(fetch(address(server)).body) for _ in range(4)}
    assert pids <= set(after)


def test_hung_request_is_timed_out_dumped_and_replaced(server_factory: ServerFactory) -> None:
    server = server_factory(settings(workers={"count": 1, "timeout": 1, "timeout_grace": 1}))
    (hung,) = server.worker_pids()

    with start_request(server, "/hang", "pf_testapp: hanging") as sock:
        server.wait_for_log(
            re.compile(
                rf"worker 1 \(pid {hung}\) timed out after [\d.]+s serving GET /hang "
                r"from 127\.0\.0\.1; "
                r"dumping its stack and killing it"
            ),
            timeout=5,
        )
        # faulthandler's dump names the function the worker was stuck in.
        server.wait_for_log(re.compile(r"(?s)most recent call first.*hang_forever_in_pf_testapp"))
        assert b"woke up" not in recv_until_close(sock, timeout=5)

    (new,) = wait_until(
        lambda: pids_if(server, lambda pids: len(pids) == 1 and hung not in pids),
        timeout=10,
        message="the hung worker was not replaced",
    )
    response = fetch(address(server))
    assert response.status == 200
    assert int(response.body) == new


# --- stopping ------------------------------------------------------------------------------


def test_term_lets_the_request_in_progress_finish(server_factory: ServerFactory) -> None:
    server = server_factory(settings(workers={"count": 1}))
    (worker,) = server.worker_pids()
    with start_request(server, "/sleep?s=2&tag=slow", "pf_testapp: sleeping slow") as sock:
        server.signal(signal.SIGTERM)
        server.wait_for_log("TERM: stopping gracefully")
        response = read_response(sock)
    assert response.status == 200
    assert int(response.body) == worker
    assert server.wait_exit(10) == 0
    assert "stopped" in server.log()


def test_term_closes_idle_keepalive_connections_promptly(server_factory: ServerFactory) -> None:
    server = server_factory(settings(workers={"count": 1}, http={"keepalive_timeout": 60}))
    with connect(address(server), timeout=10) as idle:
        idle.sendall(http_request("GET", "/"))
        assert read_response(idle).status == 200
        started = time.monotonic()
        server.signal(signal.SIGTERM)
        assert recv_until_close(idle, timeout=5) == b""
        assert server.wait_exit(5) == 0
    elapsed = time.monotonic() - started
    assert elapsed < 5, f"graceful stop took {elapsed:.1f}s with an idle keep-alive connection"


def test_response_finished_during_term_says_connection_close(
    server_factory: ServerFactory,
) -> None:
    server = server_factory(settings(workers={"count": 1}))
    with start_request(server, "/sleep?s=1&tag=busy", "pf_testapp: sleeping busy") as sock:
        server.signal(signal.SIGTERM)
        server.wait_for_log("TERM: stopping gracefully")
        response = read_response(sock)
        assert response.status == 200
        assert recv_until_close(sock) == b""
    assert server.wait_exit(5) == 0
    assert (response.header("Connection") or "").lower() == "close", response.headers


def test_term_answers_connections_queued_in_the_backlog(server_factory: ServerFactory) -> None:
    server = server_factory(settings(workers={"count": 1}))
    socks = [connect(address(server), timeout=15) for _ in range(10)]
    try:
        for n, sock in enumerate(socks):
            sock.sendall(http_request("GET", f"/sleep?s=0.2&tag=q{n}"))
        server.wait_for_log(re.compile(r"pf_testapp: sleeping q\d"))
        server.signal(signal.SIGTERM)
        statuses = []
        for sock in socks:
            try:
                statuses.append(read_response(sock).status)
            except (EOFError, OSError) as exc:
                statuses.append(repr(exc))
    finally:
        for sock in socks:
            sock.close()
    assert statuses == [200] * 10
    assert server.wait_exit(10) == 0


def test_int_stops_at_once_despite_a_busy_worker(server_factory: ServerFactory) -> None:
    server = server_factory(settings(workers={"count": 2}))
    workers = server.worker_pids()
    with start_request(server, "/sleep?s=20&tag=long", "pf_testapp: sleeping long") as sock:
        started = time.monotonic()
        server.signal(signal.SIGINT)
        status = server.wait_exit(3)
        elapsed = time.monotonic() - started
        assert b"200 OK" not in recv_until_close(sock, timeout=3)
    assert elapsed < 3
    assert status == 0
    log = server.log()
    assert "stopping now" in log
    assert "stopped" in log
    wait_until(lambda: all(gone(pid) for pid in workers), 2, message="workers outlived INT")


def test_master_killed_takes_idle_workers_with_it(server_factory: ServerFactory) -> None:
    server = server_factory(settings(workers={"count": 2}))
    workers = server.worker_pids()
    assert len(workers) == 2
    server.signal(signal.SIGKILL)
    wait_until(
        lambda: all(gone(pid) for pid in workers),
        timeout=2,
        message=f"workers {workers} outlived their master",
    )
    assert not live_group_members(server.pid)


# --- signals that resize or reopen ----------------------------------------------------------


def test_ttin_adds_and_ttou_removes_a_worker(server_factory: ServerFactory) -> None:
    server = server_factory(settings(workers={"count": 2}))
    original = server.worker_pids()

    server.signal(signal.SIGTTIN)
    server.wait_for_log("TTIN: 3 workers")
    three = wait_until(
        lambda: pids_if(server, lambda pids: len(pids) == 3),
        timeout=10,
        message="TTIN did not give 3 workers",
    )
    assert set(original) < set(three)
    server.wait_for_log(re.compile(r"worker 3 \(pid \d+\) booted"))

    since = len(server.log())
    server.signal(signal.SIGTTOU)
    server.wait_for_log("TTOU: 2 workers", since=since)
    wait_until(
        lambda: len(server.worker_pids()) == 2,
        timeout=10,
        message="TTOU did not go back to 2 workers",
    )
    assert fetch(address(server)).status == 200


def test_ttou_never_goes_below_one_worker(server_factory: ServerFactory) -> None:
    server = server_factory(settings(workers={"count": 1}))
    (only,) = server.worker_pids()
    server.signal(signal.SIGTTOU)
    # one at a time: two signals pending at once are delivered lowest number first (TTIN)
    server.wait_for_log("TTOU: already at the minimum of 1 worker")
    server.signal(signal.SIGTTIN)
    # had TTOU dropped the target to 0, TTIN would say 1
    server.wait_for_log("TTIN: 2 workers")
    assert "TTOU: 0" not in server.log()
    pids = wait_until(
        lambda: pids_if(server, lambda pids: len(pids) == 2),
        timeout=10,
        message="expected 2 workers after TTOU at 1 then TTIN",
    )
    assert only in pids


def test_usr1_reopens_a_file_error_log(server_factory: ServerFactory) -> None:
    server = server_factory(
        settings(
            workers={"count": 1},
            logging={"error_log": "error.log", "access_log": "access.log"},
        ),
        wait_ready=False,
    )
    log_path = server.workdir / "error.log"
    access_path = server.workdir / "access.log"
    wait_until(
        lambda: log_path.exists() and "ready: 1 workers" in log_path.read_text(),
        timeout=15,
        message=f"no 'ready' line in {log_path}",
    )
    (where,) = parse_addresses(log_path.read_text())
    assert fetch(where, "GET", "/before-usr1").status == 200
    wait_until(lambda: access_path.exists() and "/before-usr1" in access_path.read_text(), 5)

    rotated = log_path.with_name("error.log.1")
    log_path.rename(rotated)
    rotated_access = access_path.with_name("access.log.1")
    access_path.rename(rotated_access)
    server.signal(signal.SIGUSR1)
    wait_until(
        lambda: log_path.exists() and "USR1" in log_path.read_text(),
        timeout=5,
        message="the master did not reopen the error log at its path",
    )

    def worker_writes_to_new_file() -> bool:
        assert fetch(where, "GET", "/boom").status == 500
        return "RuntimeError: deliberate failure" in log_path.read_text()

    wait_until(worker_writes_to_new_file, timeout=5, interval=0.1,
               message="the worker did not reopen the error log")
    old = rotated.read_text()
    assert "ready: 1 workers" in old
    assert "USR1" not in old
    # The worker has reopened its logs by now: its next access line goes to the new file.
    assert fetch(where, "GET", "/after-usr1").status == 200
    wait_until(
        lambda: access_path.exists() and "/after-usr1" in access_path.read_text(),
        timeout=5,
        message="no access log line in the reopened file",
    )
    assert "/after-usr1" not in rotated_access.read_text()


# --- startup failure -------------------------------------------------------------------------


def test_app_import_error_stops_the_server_with_status_3(server_factory: ServerFactory) -> None:
    server = server_factory(settings(app="pf_broken_app:app"), wait_ready=False)
    assert server.wait_exit(20) == 3
    log = server.log()
    assert "RuntimeError: pf_broken_app refuses to import" in log
    assert "cannot load the application" in log
    assert "the application could not be loaded (see above); stopping" in log
    assert "ready:" not in log
