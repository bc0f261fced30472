"""Import the application named by `module:callable` (in a worker, or in the master when
preloading).

Invariant: the only process state this changes is sys.path (the configured `pythonpath`
entries, prepended once) and the working directory (`chdir`).
"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any


class AppLoadError(Exception):
    """The application could not be imported or is not callable; the cause is chained."""


def prepare(pythonpath: Sequence[str], chdir: str | None) -> None:
    if chdir:
        os.chdir(chdir)
    for entry in reversed(pythonpath):
        if entry not in sys.path:
            sys.path.insert(0, entry)
    if "" not in sys.path and os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())


def load_app(ref: str) -> Callable[..., Any]:
    """The object `module:attr.attr`; raises AppLoadError with the reason."""
    module_name, _, attr_path = ref.partition(":")
    try:
        obj: Any = importlib.import_module(module_name)
    except Exception as exc:
        raise AppLoadError(f"cannot import {module_name!r}: {exc!r}") from exc
    for attr in attr_path.split("."):
        try:
            obj = getattr(obj, attr)
        except AttributeError:
            raise AppLoadError(f"{ref!r}: module {module_name!r} has no {attr_path!r}") from None
    if not callable(obj):
        raise AppLoadError(f"{ref!r} is not callable ({type(obj).__name__})")
    return obj  # type: ignore[no-any-return]
