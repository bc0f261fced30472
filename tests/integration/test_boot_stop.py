"""A worker asked to stop before it is ready ends at once, instead of after its import.

A worker reads its channel only once it is ready, so the stop message sent to one still
importing the application waited for the import: a reload abandoned by the next HUP left
its canary importing for nothing (20 HUPs with a 1 s import had 13 processes at once), and
a TTOU for a worker that had just been started waited as long. The master now also sends
TERM to a worker it still sees booting (not in a graceful stop of the server, where a
booting worker may be the one to answer what is queued), and until the worker reports
ready TERM ends it; once ready, TERM is the graceful stop it always was.

Defects (each test failed before the fix): both tests below.
"""

from __future__ import annotations

import re
import signal
from pathlib import Path

from harness import (
    APPS,
    ServerFactory,
    address,
    fetch,
    gone,
    wait_until,
    write_config,
)

IMPORTING = re.compile(r"pf_explore_slow: importing \(pid (\d+)\)")
SLOW = "pf_explore_slow:app"

# An application whose import takes 30 s while the file FLAG (an environment variable,
# read at import) exists: workers started before it is created boot at once.
FLAGGED_APP = """
import os
import sys
import time

if os.path.exists(os.environ["BOOT_STOP_FLAG"]):
    print(f"flagged app: importing slowly (pid {os.getpid()})", file=sys.stderr, flush=True)
    time.sleep(30)

def app(environ, start_response):
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [str(os.getpid()).encode()]
"""


def test_a_second_hup_ends_the_first_reloads_canary_while_it_imports(
    server_factory: ServerFactory,
) -> None:
    conf = {
        "app": SLOW,
        "pythonpath": [str(APPS)],
        "workers": {"count": 2},
        "env": {"EXPLORE_IMPORT_DELAY": "0"},
    }
    server = server_factory(conf, env={"PYTHONDONTWRITEBYTECODE": "1"})
    old = set(server.worker_pids())

    write_config(server.workdir, {**conf, "env": {"EXPLORE_IMPORT_DELAY": "30"}})
    since = len(server.log())
    server.signal(signal.SIGHUP)
    canary = int(server.wait_for_log(IMPORTING, 10, since=since).group(1))
    assert canary not in old

    write_config(server.workdir, conf)
    server.signal(signal.SIGHUP)
    # its import has 30 s to go: it ends at once, and nothing of it is left
    wait_until(lambda: gone(canary), 5, message=f"the abandoned canary {canary} still runs")
    server.wait_for_log(
        re.compile(rf"worker 1 \(pid {canary}\).* exited \(reload abandoned\): exit code 0"),
        5, since=since,
    )
    assert "worker 1: stopped before it was ready" in server.log()[since:]
    server.wait_for_log("reloaded: generation 3 serving with 2 workers", 15, since=since)
    assert fetch(address(server)).status == 200
    assert set(server.worker_pids()).isdisjoint(old | {canary})


def test_ttou_ends_a_worker_still_importing_the_app(
    server_factory: ServerFactory, tmp_path: Path
) -> None:
    flag = tmp_path / "slow"
    server = server_factory(
        {"app": "app:app", "workers": {"count": 1}}, app_source=FLAGGED_APP,
        env={"BOOT_STOP_FLAG": str(flag), "PYTHONDONTWRITEBYTECODE": "1"},
    )
    [first] = server.worker_pids()
    flag.touch()
    since = len(server.log())
    server.signal(signal.SIGTTIN)
    server.wait_for_log("flagged app: importing slowly", 10, since=since)
    [second] = [pid for pid in server.worker_pids() if pid != first]

    server.signal(signal.SIGTTOU)

    wait_until(lambda: gone(second), 5, message=f"the booting worker {second} still runs")
    server.wait_for_log(
        re.compile(rf"worker 2 \(pid {second}\).* exited \(fewer workers requested\): "
                   r"exit code 0"),
        5, since=since,
    )
    assert server.worker_pids() == [first]
    assert fetch(address(server)).body == str(first).encode()
