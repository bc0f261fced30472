"""WSGI app for tests/integration/test_supervise.py (imported by preforkd workers).

Routes: `/` answers the worker's pid; `/leak` keeps LEAK_MIB more MiB in a module-level list
(written, so the pages count in the worker's USS) and answers `PID MIB_HELD`; `/sleep?s=S&tag=T`
logs `pf_supervise: sleeping T` to stderr, sleeps S seconds and answers the pid; `/hang` logs
`pf_supervise: hanging` and blocks in `hang_here_in_pf_supervise_app` (the name a stack dump
must show); anything else is 404.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable, Iterable
from typing import Any

LEAK_MIB = 20
TEXT = [("Content-Type", "text/plain")]

_held: list[bytes] = []  # the leak: grows by LEAK_MIB per /leak, never shrinks


def _query(environ: dict[str, Any]) -> dict[str, str]:
    pairs = (item.partition("=") for item in environ.get("QUERY_STRING", "").split("&") if item)
    return {name: value for name, _, value in pairs}


def hang_here_in_pf_supervise_app() -> None:
    print("pf_supervise: hanging", file=sys.stderr, flush=True)
    time.sleep(60)


def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    path = environ["PATH_INFO"]
    body = str(os.getpid())
    if path == "/leak":
        _held.append(b"\x01" * (LEAK_MIB << 20))  # a one-byte repeat is a memset: every page
        body = f"{body} {LEAK_MIB * len(_held)}"
    elif path == "/sleep":
        query = _query(environ)
        print(f"pf_supervise: sleeping {query.get('tag', '-')}", file=sys.stderr, flush=True)
        time.sleep(float(query.get("s", "1")))
    elif path == "/hang":
        hang_here_in_pf_supervise_app()
    elif path != "/":
        start_response("404 Not Found", TEXT)
        return [b"no such route\n"]
    start_response("200 OK", TEXT)
    return [body.encode()]
