"""WSGI apps and a TCP handler for the integration tests (imported by preforkd workers).

`app` routes on PATH_INFO; each route exercises one server feature. Function names that
tests look for in stack dumps are spelled out in the test files.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

StartResponse = Callable[..., Any]
TEXT = [("Content-Type", "text/plain")]


def _query(environ: dict[str, Any]) -> dict[str, str]:
    pairs = (item.partition("=") for item in environ.get("QUERY_STRING", "").split("&") if item)
    return {name: value for name, _, value in pairs}


def pid_app(environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
    """Answer every request with the worker's pid (list body: Content-Length is computed)."""
    start_response("200 OK", TEXT)
    return [str(os.getpid()).encode()]


def sleepy_pid_app(environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
    """Sleep `?s=SECONDS` (default 0.3), then answer with the worker's pid.

    Logs `pf_testapp: sleeping TAG` (TAG from `?tag=`) to stderr first, so a test can wait
    until the request is in the app.
    """
    query = _query(environ)
    print(f"pf_testapp: sleeping {query.get('tag', '-')}", file=sys.stderr, flush=True)
    time.sleep(float(query.get("s", "0.3")))
    return pid_app(environ, start_response)


def hang_forever_in_pf_testapp(environ: dict[str, Any], start_response: StartResponse) -> Any:
    """Stand-in for a stuck request: sleeps far past any workers.timeout a test sets."""
    print("pf_testapp: hanging", file=sys.stderr, flush=True)
    time.sleep(30)
    start_response("200 OK", TEXT)
    return [b"woke up"]


def _stream(parts: list[bytes]) -> Iterator[bytes]:
    yield from parts


def _failing_stream() -> Iterator[bytes]:
    yield b"partial,"
    raise RuntimeError("deliberate failure in the middle of a streamed body")


def app(environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
    path = environ["PATH_INFO"]
    if path == "/echo":
        length = environ.get("CONTENT_LENGTH")
        stream = environ["wsgi.input"]
        body = stream.read(int(length)) if length else stream.read()
        start_response("200 OK", TEXT)
        return [body]
    if path == "/stream":
        start_response("200 OK", TEXT)
        return _stream([b"first,", b"second,", b"third"])
    if path.startswith("/environ"):
        keys = ("PATH_INFO", "QUERY_STRING", "REMOTE_ADDR", "HTTP_X_FOO", "REQUEST_METHOD",
                "SERVER_PROTOCOL", "SCRIPT_NAME", "HTTP_HOST")
        data = {key: environ.get(key) for key in keys}
        start_response("200 OK", [("Content-Type", "application/json")])
        return [json.dumps(data).encode()]
    if path == "/stream-boom":
        start_response("200 OK", TEXT)
        return _failing_stream()
    if path == "/boom":
        raise RuntimeError("deliberate failure from pf_testapp")
    if path == "/sleep":
        return sleepy_pid_app(environ, start_response)
    if path == "/hang":
        return hang_forever_in_pf_testapp(environ, start_response)
    return pid_app(environ, start_response)


def tcp_echo(sock: socket.socket, addr: Any) -> None:
    """protocol: tcp handler: send every byte back until the client closes."""
    while True:
        data = sock.recv(65536)
        if not data:
            return
        sock.sendall(data)
