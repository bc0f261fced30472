"""Server hooks for tests/integration/test_features.py, plus an app that records its calls.

Hooks run in the master and in workers, so each one appends a JSON line
{"hook": NAME, "pid": os.getpid(), "uid": os.geteuid(), ...arguments...} to the file named
by $HOOK_LOG (one O_APPEND write per line: lines from different processes never interleave).
The `failing_*` hooks raise RuntimeError("deliberate failure in NAME").
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable
from typing import Any


def _record(hook: str, **fields: Any) -> None:
    path = os.environ.get("HOOK_LOG")
    if not path:
        return
    line = json.dumps({"hook": hook, "pid": os.getpid(), "uid": os.geteuid(), **fields}) + "\n"
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line.encode())
    finally:
        os.close(fd)


def _server(server: Any) -> dict[str, Any]:
    return {
        "pid": server.pid,
        "generation": server.generation,
        "workers": sorted(w.number for w in server.workers),
        "app": server.config.app,
    }


def _worker(worker: Any) -> dict[str, Any]:
    return {
        "number": worker.number,
        "pid": worker.pid,
        "generation": worker.generation,
        "app": worker.config.app,
    }


def on_starting(server: Any) -> None:
    _record("on_starting", server=_server(server), env=os.environ.get("FEATURE_GREETING"))


def when_ready(server: Any) -> None:
    _record("when_ready", server=_server(server))


def pre_fork(server: Any, worker: Any) -> None:
    _record("pre_fork", server=_server(server), worker=_worker(worker))


def post_fork(server: Any, worker: Any) -> None:
    _record(
        "post_fork",
        server=_server(server),
        worker=_worker(worker),
        env=os.environ.get("FEATURE_GREETING"),
    )


def post_worker_init(worker: Any) -> None:
    _record("post_worker_init", worker=_worker(worker))


def worker_exit(server: Any, worker: Any) -> None:
    _record("worker_exit", server=_server(server), worker=_worker(worker))


def child_exit(server: Any, worker: Any) -> None:
    _record("child_exit", server=_server(server), worker=_worker(worker))


def on_reload(server: Any) -> None:
    _record("on_reload", server=_server(server))


def pre_request(worker: Any, environ: dict[str, Any]) -> None:
    _record("pre_request", worker=_worker(worker), path=environ["PATH_INFO"])


def post_request(worker: Any, environ: dict[str, Any], status: int) -> None:
    _record("post_request", worker=_worker(worker), path=environ["PATH_INFO"], status=status)


def on_exit(server: Any) -> None:
    _record("on_exit", server=_server(server))


def failing_post_fork(server: Any, worker: Any) -> None:
    raise RuntimeError("deliberate failure in post_fork")


def failing_post_worker_init(worker: Any) -> None:
    raise RuntimeError("deliberate failure in post_worker_init")


def failing_pre_request(worker: Any, environ: dict[str, Any]) -> None:
    raise RuntimeError("deliberate failure in pre_request")


def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    """Records {"hook": "app", "path": PATH_INFO} and answers with the worker's pid."""
    _record("app", path=environ["PATH_INFO"])
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [str(os.getpid()).encode()]
