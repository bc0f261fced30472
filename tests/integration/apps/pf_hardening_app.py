"""WSGI app for the hardening, nginx and fuzz tests (imported by preforkd workers).

It never raises on its own account: an exception out of it can only come from wsgi.input
(a truncated, stalled or over-limit body), which the server must handle quietly. Routes:

- `/environ`: JSON of what the server resolved (REMOTE_ADDR, REMOTE_PORT, wsgi.url_scheme,
  SERVER_PROTOCOL) and every HTTP_* key.
- `/body`: reads the whole body and appends one JSON line {"expected", "got", "error"} to
  the file named by $PF_BODY_RECORD (when set) before answering with the byte count; an
  exception from wsgi.input is recorded and re-raised.
- anything else: reads (and discards) the body, answers `ok <bytes read>`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable
from typing import Any

StartResponse = Callable[..., Any]
TEXT = [("Content-Type", "text/plain")]


def _environ(environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
    data = {
        key: environ.get(key)
        for key in ("REMOTE_ADDR", "REMOTE_PORT", "wsgi.url_scheme", "SERVER_PROTOCOL")
    }
    data["headers"] = {k: v for k, v in environ.items() if k.startswith("HTTP_")}
    data["pid"] = os.getpid()
    start_response("200 OK", [("Content-Type", "application/json")])
    return [json.dumps(data).encode()]


def _record(entry: dict[str, Any]) -> None:
    path = os.environ.get("PF_BODY_RECORD")
    if path:
        with open(path, "a") as f:
            f.write(json.dumps(entry) + "\n")


def _body(environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
    length = environ.get("CONTENT_LENGTH")
    expected = int(length) if length else None
    got = 0
    try:
        stream = environ["wsgi.input"]
        while True:
            piece = stream.read(4096)
            if not piece:
                break
            got += len(piece)
    except Exception as exc:
        _record({"expected": expected, "got": got, "error": type(exc).__name__})
        raise
    _record({"expected": expected, "got": got, "error": None})
    start_response("200 OK", TEXT)
    return [str(got).encode()]


def app(environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
    path = environ["PATH_INFO"]
    if path == "/environ":
        return _environ(environ, start_response)
    if path == "/body":
        return _body(environ, start_response)
    body = environ["wsgi.input"].read()
    start_response("200 OK", TEXT)
    return [b"ok %d" % len(body)]
