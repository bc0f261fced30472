"""App, TCP handler and server hooks for tests/integration/test_explore_lifecycle.py.

Hooks append one JSON line per call to the file named by $EXPLORE_HOOK_LOG (one O_APPEND
write per line), with the arguments reduced to plain data. `failing_*` hooks raise
RuntimeError("deliberate failure in NAME") after recording their call.

Routes of `app`: `/` answers the worker's pid; `/sleep?s=S&tag=T` logs
`pf_explore: sleeping T (pid P)` to stderr, sleeps S seconds, answers the pid; `/number`
answers the worker number read from the process title; `/env?name=N` answers $N;
`/nsleep?long=N&l=L&s=S` sleeps L seconds in worker number N and S in any other (logging
`pf_explore: worker N sleeping L`), then answers `NUMBER PID`.
"""

from __future__ import annotations

import json
import os
import re
import socket
import sys
import time
from collections.abc import Callable, Iterable
from typing import Any

import setproctitle

TEXT = [("Content-Type", "text/plain")]


def _record(hook: str, **fields: Any) -> None:
    path = os.environ.get("EXPLORE_HOOK_LOG")
    if not path:
        return
    line = json.dumps({"hook": hook, "pid": os.getpid(), **fields}) + "\n"
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
    try:
        os.write(fd, line.encode())
    finally:
        os.close(fd)


def _config(config: Any) -> dict[str, Any]:
    return {
        "app": config.app,
        "proc_name": config.proc_name,
        "count": config.workers.count,
    }


def _server(server: Any) -> dict[str, Any]:
    return {
        "pid": server.pid,
        "generation": server.generation,
        "config": _config(server.config),
        "workers": sorted(
            [w.number, w.generation, w.pid, _config(w.config)] for w in server.workers
        ),
    }


def _worker(worker: Any) -> dict[str, Any]:
    return {
        "number": worker.number,
        "pid": worker.pid,
        "generation": worker.generation,
        "config": _config(worker.config),
    }


def on_starting(server: Any) -> None:
    _record("on_starting", server=_server(server))


def when_ready(server: Any) -> None:
    _record("when_ready", server=_server(server))


def pre_fork(server: Any, worker: Any) -> None:
    _record("pre_fork", server=_server(server), worker=_worker(worker))


def post_fork(server: Any, worker: Any) -> None:
    _record("post_fork", worker=_worker(worker))


def post_worker_init(worker: Any) -> None:
    _record("post_worker_init", worker=_worker(worker))


def worker_exit(server: Any, worker: Any) -> None:
    _record("worker_exit", worker=_worker(worker))


def child_exit(server: Any, worker: Any) -> None:
    _record("child_exit", server=_server(server), worker=_worker(worker))


def nworkers_changed(server: Any, new_value: int, old_value: int) -> None:
    _record("nworkers_changed", server=_server(server), new=new_value, old=old_value)


def on_reload(server: Any) -> None:
    _record("on_reload", server=_server(server))


def on_exit(server: Any) -> None:
    _record("on_exit", server=_server(server))


def pre_request(worker: Any, environ: dict[str, Any]) -> None:
    _record("pre_request", worker=_worker(worker), path=environ.get("PATH_INFO"))


def post_request(worker: Any, environ: dict[str, Any], status: int) -> None:
    _record("post_request", worker=_worker(worker), path=environ.get("PATH_INFO"),
            status=status)


def _failing(name: str, recorder: Callable[..., None]) -> Callable[..., None]:
    def hook(*args: Any) -> None:
        recorder(*args)
        raise RuntimeError(f"deliberate failure in {name}")

    hook.__name__ = hook.__qualname__ = f"failing_{name}"
    return hook


failing_when_ready = _failing("when_ready", when_ready)
failing_nworkers_changed = _failing("nworkers_changed", nworkers_changed)
failing_child_exit = _failing("child_exit", child_exit)
failing_pre_fork = _failing("pre_fork", pre_fork)
failing_on_reload = _failing("on_reload", on_reload)
failing_worker_exit = _failing("worker_exit", worker_exit)
failing_post_request = _failing("post_request", post_request)


def _query(environ: dict[str, Any]) -> dict[str, str]:
    pairs = (item.partition("=") for item in environ.get("QUERY_STRING", "").split("&") if item)
    return {name: value for name, _, value in pairs}


def worker_number() -> int:
    match = re.search(r"worker \[(\d+)\]", setproctitle.getproctitle())
    return int(match.group(1)) if match else 0


def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    path = environ["PATH_INFO"]
    body = str(os.getpid())
    if path == "/sleep":
        query = _query(environ)
        print(f"pf_explore: sleeping {query.get('tag', '-')} (pid {os.getpid()})",
              file=sys.stderr, flush=True)
        time.sleep(float(query.get("s", "1")))
    elif path == "/number":
        body = str(worker_number())
    elif path == "/env":
        body = os.environ.get(_query(environ)["name"], "-")
    elif path == "/nsleep":
        # sleeps `l` seconds in worker number `long`, `s` seconds in any other
        query = _query(environ)
        number = worker_number()
        seconds = float(query["l"] if number == int(query["long"]) else query["s"])
        print(f"pf_explore: worker {number} sleeping {seconds:g}", file=sys.stderr, flush=True)
        time.sleep(seconds)
        body = f"{number} {os.getpid()}"
    start_response("200 OK", TEXT)
    return [body.encode()]


def tcp_echo(sock: socket.socket, addr: Any) -> None:
    """Echo every byte back until the client closes; prints a line when it starts."""
    print(f"pf_explore: session (pid {os.getpid()})", file=sys.stderr, flush=True)
    while True:
        data = sock.recv(65536)
        if not data:
            return
        sock.sendall(data)


def tcp_echo_slow_bye(sock: socket.socket, addr: Any) -> None:
    """Echo until the client closes (or the read side is shut), then take 1.5 s to finish,
    as a handler that flushes its state would."""
    tcp_echo(sock, addr)
    print(f"pf_explore: session ending (pid {os.getpid()})", file=sys.stderr, flush=True)
    time.sleep(1.5)


def hanging_post_request(worker: Any, environ: dict[str, Any], status: int) -> None:
    """post_request that blocks (a metrics push to a host that does not answer) after
    `/hang-after`; records its call first."""
    post_request(worker, environ, status)
    if environ.get("PATH_INFO") == "/hang-after":
        print(f"pf_explore: post_request hanging (pid {os.getpid()})", file=sys.stderr,
              flush=True)
        time.sleep(20)


def stubborn_app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    """An app that ignores TERM and ABRT (as some C extensions or badly behaved libraries
    leave a process), then `/stuck` blocks for 30 s; anything else answers the pid."""
    import signal

    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGABRT, signal.SIG_IGN)
    if environ["PATH_INFO"] == "/stuck":
        print(f"pf_explore: stuck (pid {os.getpid()})", file=sys.stderr, flush=True)
        time.sleep(30)
    start_response("200 OK", TEXT)
    return [str(os.getpid()).encode()]
