"""A WSGI app that cannot be imported while the file named by $PF_SUPERVISE_MARKER exists:
workers boot until a test creates the file, and every later boot fails (a crash loop)."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from typing import Any

_marker = os.environ.get("PF_SUPERVISE_MARKER", "")
if _marker and os.path.exists(_marker):
    raise RuntimeError(f"pf_supervise_crashloop: {_marker} exists; refusing to load")


def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [str(os.getpid()).encode()]
