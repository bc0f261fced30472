"""worker_int / worker_abort hooks for tests/integration/test_worker_signal_hooks.py.

Each hook writes a marker file $SIGNAL_HOOK_DIR/NAME.PID holding the worker it was given as
JSON ({"number", "generation", "pid", "app"}), then prints `pf_signal_hooks: NAME in PID`
to stderr (the error log, where faulthandler's dump goes too, so their order shows). The
`failing_*` hooks then raise RuntimeError("deliberate failure in NAME"); `hanging_*` sleeps
far past any workers.timeout_grace a test sets.
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any


def _mark(name: str, worker: Any) -> None:
    info = {
        "number": worker.number,
        "generation": worker.generation,
        "pid": worker.pid,
        "app": worker.config.app,
    }
    path = os.path.join(os.environ["SIGNAL_HOOK_DIR"], f"{name}.{os.getpid()}")
    with open(path + ".tmp", "w") as f:
        json.dump(info, f)
    os.rename(path + ".tmp", path)  # a test that sees the file sees all of it
    print(f"pf_signal_hooks: {name} in {os.getpid()}", file=sys.stderr, flush=True)


def worker_int(worker: Any) -> None:
    _mark("worker_int", worker)


def failing_worker_int(worker: Any) -> None:
    _mark("failing_worker_int", worker)
    raise RuntimeError("deliberate failure in worker_int")


def worker_abort(worker: Any) -> None:
    _mark("worker_abort", worker)


def failing_worker_abort(worker: Any) -> None:
    _mark("failing_worker_abort", worker)
    raise RuntimeError("deliberate failure in worker_abort")


def hanging_worker_abort(worker: Any) -> None:
    _mark("hanging_worker_abort", worker)
    time.sleep(60)
