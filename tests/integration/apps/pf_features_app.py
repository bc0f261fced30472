"""Apps for tests/integration/test_features.py (imported by preforkd, in a worker or, with
preload_app, in the master).

At import the module notes its pid in IMPORT_PID and, if $FEATURE_IMPORT_LOG names a file,
appends "import PID" to it, so a test can tell which process imported it and how often.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable
from typing import Any

StartResponse = Callable[..., Any]

IMPORT_PID = os.getpid()

_import_log = os.environ.get("FEATURE_IMPORT_LOG")
if _import_log:
    with open(_import_log, "a", encoding="utf-8") as _f:
        _f.write(f"import {IMPORT_PID}\n")


def _json(start_response: StartResponse, document: dict[str, Any]) -> Iterable[bytes]:
    start_response("200 OK", [("Content-Type", "application/json")])
    return [json.dumps(document, sort_keys=True).encode()]


def report(environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
    """What a test wants to know about the process and the request, as JSON."""
    return _json(
        start_response,
        {
            "pid": os.getpid(),
            "import_pid": IMPORT_PID,
            "cwd": os.getcwd(),
            "env": {k: v for k, v in os.environ.items() if k.startswith("FEATURE_")},
            "scheme": environ["wsgi.url_scheme"],
            "https": environ.get("HTTPS"),
        },
    )


def make(greeting: str, times: int = 1, opts: Any = None) -> Callable[..., Iterable[bytes]]:
    """An app factory: `pf_features_app:make('hi', times=2, opts={...})`."""

    def app(environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        return _json(
            start_response,
            {"greeting": greeting, "times": times, "opts": opts, "pid": os.getpid()},
        )

    return app
