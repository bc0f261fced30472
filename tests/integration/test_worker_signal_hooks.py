"""The worker_int and worker_abort hooks in a real preforkd: real signals to real workers.

Hooks are in apps/pf_signal_hooks.py: each writes a marker file NAME.PID (the worker it was
given, as JSON) into the test's directory, then prints `pf_signal_hooks: NAME in PID` to the
error log. The app is apps/pf_testapp.py: `/` answers with the worker's pid,
`/sleep?s=S&tag=T` logs `pf_testapp: sleeping T` and sleeps, `/hang` sleeps 30 s in
hang_forever_in_pf_testapp. Every server is started with core dumps off (a worker killed by
SIGABRT would otherwise leave one) and stopped by server_factory's teardown.
"""

from __future__ import annotations

import json
import os
import re
import resource
import signal
import socket
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from harness import (
    Server,
    ServerFactory,
    address,
    connect,
    fetch,
    gone,
    http_request,
    recv_until_close,
    settings,
    wait_until,
)

APP = "pf_testapp:app"
HOOKS = "pf_signal_hooks"


def no_core_files() -> None:
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


def start(
    server_factory: ServerFactory, marks: Path, workers: dict[str, Any], **more: Any
) -> Server:
    marks.mkdir(exist_ok=True)
    conf = settings(APP, workers=workers, env={"SIGNAL_HOOK_DIR": str(marks)}, **more)
    return server_factory(conf, preexec_fn=no_core_files)


def marker(marks: Path, name: str, pid: int, timeout: float = 10.0) -> dict[str, Any]:
    """The worker hook `name` was given in process `pid`, once its marker file is there."""
    path = marks / f"{name}.{pid}"
    wait_until(path.exists, timeout, message=f"hook {name} did not run in worker {pid}")
    return json.loads(path.read_text())  # type: ignore[no-any-return]


def start_request(server: Server, target: str, log_marker: str) -> socket.socket:
    """Send GET `target` on a new connection; return it once the log shows `log_marker`."""
    sock = connect(address(server), timeout=10)
    sock.sendall(http_request("GET", target))
    server.wait_for_log(log_marker, timeout=10)
    return sock


def replaced(server: Server, old: int, count: int) -> int:
    """A new worker (not `old`) once `count` workers run again; the one that answers."""
    wait_until(
        lambda: (pids := server.worker_pids()) and len(pids) == count and old not in pids,
        timeout=10,
        message=f"worker {old} was not replaced",
    )
    new = int(fetch(address(server)).body)
    assert new != old
    return new


def recycles(server: Server, reason: str) -> float:
    match = re.search(r"status endpoint at (\S+)", server.log())
    assert match, f"no status endpoint in the log\n{server.log_tail()}"
    response = fetch(match.group(1), target="/metrics")
    assert response.status == 200, response
    for family in text_string_to_metric_families(response.body.decode()):
        for sample in family.samples:
            if (
                sample.name == "preforkd_worker_recycles_total"
                and sample.labels.get("reason") == reason
            ):
                return sample.value
    raise AssertionError(f"no recycles counter for reason {reason!r}")


def timed_out_line(pid: int) -> re.Pattern[str]:
    """The master's usual line for a worker it finds hung (the same with or without hooks)."""
    return re.compile(
        rf"worker 1 \(pid {pid}\) timed out after [\d.]+s serving GET /hang "
        r"from 127\.0\.0\.1; "
        r"dumping its stack and killing it"
    )


# the dump faulthandler writes from its C handler, naming where the worker was stuck
STACK_DUMP = re.compile(
    r"Fatal Python error: Aborted.*?most recent call first.*?hang_forever_in_pf_testapp",
    re.DOTALL,
)


# --- worker_int ------------------------------------------------------------------------------


def test_quit_to_a_busy_worker_runs_worker_int_and_it_exits_at_once(
    server_factory: ServerFactory, tmp_path: Path
) -> None:
    marks = tmp_path / "marks"
    server = start(server_factory, marks, {"count": 1}, hooks={"worker_int": f"{HOOKS}:worker_int"})
    (worker,) = server.worker_pids()

    with start_request(server, "/sleep?s=30&tag=busy", "pf_testapp: sleeping busy") as sock:
        os.kill(worker, signal.SIGQUIT)
        given = marker(marks, "worker_int", worker)
        # at once: the request in progress gets no answer, its connection just ends
        assert recv_until_close(sock, timeout=5) == b""
    assert given == {"number": 1, "generation": 1, "pid": worker, "app": APP}
    wait_until(lambda: gone(worker), 5, message=f"worker {worker} did not exit")
    server.wait_for_log(f"pf_signal_hooks: worker_int in {worker}")
    # exit status 0: the master sees a worker that left, not one that crashed
    server.wait_for_log(re.compile(rf"worker 1 \(pid {worker}\) exited: "))
    assert not re.search(rf"pid {worker}\) died", server.log())
    replaced(server, worker, 1)


def test_a_failing_worker_int_is_logged_and_the_worker_exits_all_the_same(
    server_factory: ServerFactory, tmp_path: Path
) -> None:
    marks = tmp_path / "marks"
    hook = f"{HOOKS}:failing_worker_int"
    server = start(server_factory, marks, {"count": 2}, hooks={"worker_int": hook})
    victim, other = server.worker_pids()

    os.kill(victim, signal.SIGINT)
    assert marker(marks, "failing_worker_int", victim)["pid"] == victim
    server.wait_for_log(f"hook worker_int ({hook}) failed")
    server.wait_for_log("RuntimeError: deliberate failure in worker_int")
    wait_until(lambda: gone(victim), 5, message=f"worker {victim} did not exit")
    server.wait_for_log(re.compile(rf"worker \d \(pid {victim}\) exited: "))
    wait_until(
        lambda: (pids := server.worker_pids()) and len(pids) == 2 and victim not in pids,
        timeout=10,
        message=f"worker {victim} was not replaced",
    )
    assert other in server.worker_pids()
    assert not (marks / f"failing_worker_int.{other}").exists()


def test_a_fast_stop_runs_worker_int_in_every_worker(
    server_factory: ServerFactory, tmp_path: Path
) -> None:
    marks = tmp_path / "marks"
    server = start(server_factory, marks, {"count": 3}, hooks={"worker_int": f"{HOOKS}:worker_int"})
    workers = server.worker_pids()
    assert len(workers) == 3

    server.signal(signal.SIGQUIT)  # the master sends QUIT to every worker
    assert server.wait_exit(10) == 0
    given = {pid: marker(marks, "worker_int", pid, timeout=1) for pid in workers}
    assert sorted(info["number"] for info in given.values()) == [1, 2, 3]
    assert all(info["pid"] == pid for pid, info in given.items())
    assert "still busy" not in server.log()  # none needed the SIGKILL


# --- worker_abort ----------------------------------------------------------------------------


@pytest.mark.parametrize("hook", ["worker_abort", "failing_worker_abort"])
def test_a_hung_worker_dumps_its_stack_runs_worker_abort_and_is_replaced(
    server_factory: ServerFactory, tmp_path: Path, short_tmp: Path, hook: str
) -> None:
    marks = tmp_path / "marks"
    server = start(
        server_factory, marks, {"count": 1, "timeout": 1, "timeout_grace": 2},
        hooks={"worker_abort": f"{HOOKS}:{hook}"},
        admin={"socket": str(short_tmp / "admin.sock")},
    )
    (hung,) = server.worker_pids()

    with start_request(server, "/hang", "pf_testapp: hanging") as sock:
        server.wait_for_log(timed_out_line(hung), timeout=5)
        given = marker(marks, hook, hung)
        assert recv_until_close(sock, timeout=5) == b""  # no answer; the connection ends
    assert given == {"number": 1, "generation": 1, "pid": hung, "app": APP}
    # the stacks first, from faulthandler, then the hook
    dump = server.wait_for_log(STACK_DUMP)
    hook_line = server.wait_for_log(f"pf_signal_hooks: {hook} in {hung}")
    assert dump.end() < hook_line.start()
    if hook.startswith("failing_"):
        server.wait_for_log(f"hook worker_abort ({HOOKS}:{hook}) failed")
        server.wait_for_log("RuntimeError: deliberate failure in worker_abort")
    # it died of its own SIGABRT, before the master's SIGKILL: logged and counted as always
    server.wait_for_log(
        re.compile(rf"worker 1 \(pid {hung}\) exited \(timeout\): killed by SIGABRT")
    )
    replaced(server, hung, 1)
    assert recycles(server, "timeout") == 1
    assert recycles(server, "crash") == 0


def test_a_worker_abort_that_does_not_return_gets_the_sigkill_after_timeout_grace(
    server_factory: ServerFactory, tmp_path: Path
) -> None:
    marks = tmp_path / "marks"
    server = start(
        server_factory, marks, {"count": 1, "timeout": 1, "timeout_grace": 2},
        hooks={"worker_abort": f"{HOOKS}:hanging_worker_abort"},
    )
    (hung,) = server.worker_pids()

    with start_request(server, "/hang", "pf_testapp: hanging") as sock:
        server.wait_for_log(timed_out_line(hung), timeout=5)
        server.wait_for_log(STACK_DUMP)
        marker(marks, "hanging_worker_abort", hung)
        assert recv_until_close(sock, timeout=10) == b""
    server.wait_for_log(
        re.compile(rf"worker 1 \(pid {hung}\) exited \(timeout\): killed by SIGKILL"),
        timeout=10,
    )
    replaced(server, hung, 1)
