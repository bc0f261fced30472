"""The app for tests/integration/test_regressions.py (imported by preforkd workers).

Routes on PATH_INFO: `/report` reads the body to EOF and answers with what the request
looked like as JSON; `/noread` answers without touching the body; `/short` declares ten
bytes of body and sends none; `/sleep?s=SECONDS` logs `pf_regress: sleeping` to stderr and
sleeps; anything else answers with the worker's pid.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable, Iterable
from typing import Any

StartResponse = Callable[..., Any]
TEXT = [("Content-Type", "text/plain")]


def _pid(start_response: StartResponse) -> Iterable[bytes]:
    start_response("200 OK", TEXT)
    return [str(os.getpid()).encode()]


def report(environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
    """Like a framework that reads wsgi.input to EOF when it is told the input ends."""
    body = environ["wsgi.input"].read()
    document = {
        "REMOTE_ADDR": environ.get("REMOTE_ADDR"),
        "scheme": environ["wsgi.url_scheme"],
        "input_terminated": environ.get("wsgi.input_terminated"),
        "CONTENT_LENGTH": environ.get("CONTENT_LENGTH"),
        "body": body.decode("latin-1"),
    }
    start_response("200 OK", [("Content-Type", "application/json")])
    return [json.dumps(document).encode()]


def app(environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
    path = environ["PATH_INFO"]
    if path == "/report":
        return report(environ, start_response)
    if path == "/noread":
        start_response("200 OK", TEXT)
        return [b"not read"]
    if path == "/short":
        start_response("200 OK", [*TEXT, ("Content-Length", "10")])
        return []
    if path == "/sleep":
        query = dict(
            item.partition("=")[::2] for item in environ["QUERY_STRING"].split("&") if item
        )
        print("pf_regress: sleeping", file=sys.stderr, flush=True)
        time.sleep(float(query.get("s", "1")))
    return _pid(start_response)
