"""Server hooks: user functions named in `hooks:` and called at fixed moments.

Invariants: hook modules are imported in the master when the configuration is loaded (a
missing function is a startup or reload error, not a surprise later); workers inherit them
through fork. A hook that raises (or calls sys.exit()) is logged with its traceback and
reported to the caller, which decides what that means (boot failure, 500, nothing).
"""

from __future__ import annotations

import importlib
import inspect
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from prefork.config import HOOKS, Config, HooksConfig
from prefork.loader import FreshImports

log = logging.getLogger("prefork")

# The arguments preforkd calls each hook with, checked against its signature when it is
# loaded: a hook that cannot take them is an error at start or reload, as gunicorn checks a
# hook's arity, not a TypeError logged at every request, or only on the day a worker times
# out (worker_abort). pre_request's `req` is a hookargs.HookRequest: the environ as a
# mapping, and gunicorn's Request attributes.
HOOK_ARGUMENTS: dict[str, tuple[str, ...]] = {
    "on_starting": ("server",),
    "when_ready": ("server",),
    "pre_fork": ("server", "worker"),
    "post_fork": ("server", "worker"),
    "post_worker_init": ("worker",),
    "worker_exit": ("server", "worker"),
    "worker_int": ("worker",),
    "worker_abort": ("worker",),
    "child_exit": ("server", "worker"),
    "nworkers_changed": ("server", "new_value", "old_value"),
    "on_reload": ("server",),
    "pre_exec": ("server",),
    "pre_request": ("worker", "req"),
    "post_request": ("worker", "environ", "status"),
    "on_exit": ("server",),
}
# Another form a hook may take, chosen by its signature when it is loaded (the first form
# that fits wins, HOOK_ARGUMENTS' first): gunicorn's post_request, whose `req` is a
# HookRequest and `resp` a HookResponse.
HOOK_ALTERNATIVES: dict[str, tuple[str, ...]] = {
    "post_request": ("worker", "req", "environ", "resp"),
}


class HookError(Exception):
    """A hook could not be imported."""


@dataclass
class WorkerInfo:
    """The `worker` argument of hooks."""

    number: int
    generation: int
    config: Config
    pid: int | None = None  # None in pre_fork (not forked yet)
    # The error log, as gunicorn's worker.log (and server.log): hooks written for gunicorn
    # log with worker.log.info(...), and without it they failed with an AttributeError (in
    # post_fork, a boot failure that stopped the server).
    log: logging.Logger = field(default=log, repr=False, compare=False)


@dataclass
class ServerInfo:
    """The `server` argument of hooks."""

    config: Config
    generation: int = 1
    workers: list[WorkerInfo] = field(default_factory=list)
    pid: int = field(default_factory=os.getpid)
    log: logging.Logger = field(default=log, repr=False, compare=False)


class Hooks:
    def __init__(self, config: HooksConfig | None = None) -> None:
        self.functions: dict[str, Callable[..., Any]] = {}
        # the arguments each loaded hook takes: HOOK_ARGUMENTS' or HOOK_ALTERNATIVES'
        self.forms: dict[str, tuple[str, ...]] = {}
        self.failure = ""  # what the last hook that raised said: "hook NAME failed: ..."
        if config is None:
            return
        for name in HOOKS:
            ref = getattr(config, name)
            if ref is not None:
                self.functions[name], self.forms[name] = _resolve(name, ref)

    def get(self, name: str) -> Callable[..., Any] | None:
        return self.functions.get(name)

    def call(self, name: str, *args: Any) -> bool:
        """Run hook `name` if configured; False if it raised (logged, and kept in
        `failure`)."""
        function = self.functions.get(name)
        if function is None:
            return True
        try:
            function(*args)
        except (Exception, SystemExit, KeyboardInterrupt) as exc:
            # a sys.exit() in a hook is its failure, as an exception is: in the master it
            # would end the whole server, in a worker the requests it holds. Not every
            # BaseException: signals.Stopped (a stop while the master starts) goes through.
            log.exception("hook %s (%s) failed", name, _describe(function))
            self.failure = f"hook {name} failed: {exc!r}"
            return False
        return True


class HookImports(FreshImports):
    """Fresh hook modules at each reload: `load()` imports the hooks and remembers the
    modules that brought in (the hook modules, and whatever they import: often the
    application itself), dropping the previous load's first; `put_back()` restores an
    earlier load's when the reload fails or its generation is abandoned. Without it a
    reload kept the master's cached copies, and workers forked from it served the old code
    even without preload_app."""

    def load(self, config: HooksConfig) -> Hooks:
        """The hooks, imported afresh; a load that raises leaves everything as it was."""
        return self.load_afresh(lambda: Hooks(config))


def _resolve(name: str, ref: str) -> tuple[Callable[..., Any], tuple[str, ...]]:
    """The function `ref` names, and the arguments it is to be called with."""
    module_name, _, attr = ref.partition(":")
    try:
        obj: Any = importlib.import_module(module_name)
        for part in attr.split("."):
            obj = getattr(obj, part)
    except (Exception, SystemExit) as exc:  # an import that exits must not end the master
        raise HookError(f"hooks.{name}: cannot load {ref!r}: {exc!r}") from exc
    if not callable(obj):
        raise HookError(f"hooks.{name}: {ref!r} is not callable")
    return obj, _arguments_of(name, ref, obj)


def _arguments_of(name: str, ref: str, function: Callable[..., Any]) -> tuple[str, ...]:
    """The arguments hook `name` is to be called with: the first of its forms `function`
    can take; HookError if it can take none."""
    forms = [HOOK_ARGUMENTS[name]]
    if name in HOOK_ALTERNATIVES:
        forms.append(HOOK_ALTERNATIVES[name])
    try:
        signature = inspect.signature(function)
    except (TypeError, ValueError):  # no signature to read (some builtins): judged when called
        return forms[0]
    errors = []
    for arguments in forms:
        try:
            signature.bind(*arguments)
        except TypeError as exc:
            errors.append(str(exc))
        else:
            return arguments
    called_as = " or ".join(f"{name}({', '.join(arguments)})" for arguments in forms)
    raise HookError(f"hooks.{name}: {ref!r} cannot be called as {called_as}: {errors[0]}")


def _describe(function: Callable[..., Any]) -> str:
    return f"{getattr(function, '__module__', '?')}:{getattr(function, '__qualname__', '?')}"
