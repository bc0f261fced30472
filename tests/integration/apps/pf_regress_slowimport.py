"""An app that takes about a second to import, so a reload's canary boots slowly
(tests/integration/test_regressions.py). Every request is answered with the worker's pid."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable
from typing import Any

IMPORT_SECONDS = 1.0

time.sleep(IMPORT_SECONDS)


def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [str(os.getpid()).encode()]
