"""Example WSGI application (PEP 3333) served by `make run`; standard library only.

Routes: `/` greets, `/echo` returns the request body with its content type, `/env` dumps the
string-valued WSGI environ as JSON; anything else is 404.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from typing import Any

StartResponse = Callable[..., Callable[[bytes], object]]


def application(environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
    path = environ.get("PATH_INFO") or "/"
    if path == "/":
        return _respond(start_response, "200 OK", "text/plain; charset=utf-8", b"Hello, world!\n")
    if path == "/echo":
        content_type = environ.get("CONTENT_TYPE") or "application/octet-stream"
        return _respond(start_response, "200 OK", content_type, _read_body(environ))
    if path == "/env":
        strings = {key: value for key, value in environ.items() if isinstance(value, str)}
        body = json.dumps(strings, indent=2, sort_keys=True).encode("utf-8") + b"\n"
        return _respond(start_response, "200 OK", "application/json", body)
    return _respond(start_response, "404 Not Found", "text/plain; charset=utf-8", b"Not Found\n")


def _read_body(environ: dict[str, Any]) -> bytes:
    stream = environ["wsgi.input"]
    length = environ.get("CONTENT_LENGTH") or ""
    if length.isdigit():
        # PEP 3333: an application must not read past CONTENT_LENGTH.
        return bytes(stream.read(int(length)))
    if environ.get("wsgi.input_terminated"):
        # The server ends the stream itself (e.g. a chunked request body).
        return bytes(stream.read())
    return b""


def _respond(
    start_response: StartResponse, status: str, content_type: str, body: bytes
) -> list[bytes]:
    start_response(status, [("Content-Type", content_type), ("Content-Length", str(len(body)))])
    return [body]
