"""Import the application named by an app reference (in a worker, or in the master when
preloading).

References: `module` (then `module:application`, then `module:app`), `module:name`,
`module:obj.attr`, `module:factory()` and `module:factory(arg, key=value)` whose arguments
are Python literals — parsed with `ast`, never evaluated as code.

Invariant: the only process state this changes is sys.path (the configured `pythonpath`
entries, prepended once), the working directory (`chdir`) and sys.modules.
"""

from __future__ import annotations

import ast
import importlib
import importlib.machinery
import os
import sys
import weakref
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any, TypeVar

_T = TypeVar("_T")

DEFAULT_NAMES = ("application", "app")


class AppLoadError(Exception):
    """The application could not be imported or is not callable; the cause is chained."""


@dataclass(frozen=True, slots=True)
class AppRef:
    module: str
    attrs: tuple[str, ...] = ()  # empty: try DEFAULT_NAMES
    args: tuple[Any, ...] | None = None  # None: not a factory call
    kwargs: dict[str, Any] = field(default_factory=dict)


def _dotted(node: ast.expr) -> tuple[str, ...]:
    if isinstance(node, ast.Name):
        return (node.id,)
    if isinstance(node, ast.Attribute):
        return (*_dotted(node.value), node.attr)
    raise ValueError("expected a name or a dotted attribute")


def parse_app_ref(ref: str) -> AppRef:
    """Parse an app reference; ValueError says what is wrong with it."""
    module, sep, rest = ref.strip().partition(":")
    if not module or not all(part.isidentifier() for part in module.split(".")):
        directory, _, filename = module.rpartition("/")  # `module` may be a file's path
        stem = filename.removesuffix(".py").removesuffix(".wsgi")
        if stem != filename and stem.isidentifier():
            # a file, as uWSGI's wsgi-file (or mod_wsgi's WSGIScriptAlias) names the app:
            # say the module form, which imports the same file
            raise ValueError(
                f"must name a module, not a file: for {module!r} (uWSGI's wsgi-file) write "
                f"app: '{stem}:{rest or 'application'}' and put "
                f"{directory or '.'!r} in pythonpath"
                + (" (a .wsgi file must first be renamed .py)" if filename.endswith(".wsgi")
                   else "")
            )
        raise ValueError(
            f"must be 'module', 'module:callable' or 'module:factory(...)', got {ref!r}"
        )
    if not sep:
        return AppRef(module)
    try:
        expr = ast.parse(rest.strip(), mode="eval").body
    except SyntaxError:
        raise ValueError(f"cannot parse {rest!r} after the ':' in {ref!r}") from None
    try:
        if isinstance(expr, ast.Call):
            attrs = _dotted(expr.func)
            args = tuple(ast.literal_eval(arg) for arg in expr.args)
            kwargs = {}
            for keyword in expr.keywords:
                if keyword.arg is None:
                    raise ValueError("**kwargs is not allowed")
                kwargs[keyword.arg] = ast.literal_eval(keyword.value)
            return AppRef(module, attrs, args, kwargs)
        return AppRef(module, _dotted(expr))
    except ValueError as exc:
        raise ValueError(
            f"{ref!r}: factory arguments must be literals (numbers, strings, lists, dicts, "
            f"True/False/None): {exc}"
        ) from None


def prepare(pythonpath: Sequence[str], chdir: str | None) -> None:
    if chdir:
        os.chdir(chdir)
    for entry in reversed(pythonpath):
        if entry not in sys.path:
            sys.path.insert(0, entry)
    if "" not in sys.path and os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())


def load_app(ref: str) -> Callable[..., Any]:
    """The callable `ref` names (a factory's result for `module:factory(...)`); raises
    AppLoadError with the reason."""
    try:
        parsed = parse_app_ref(ref)
    except ValueError as exc:
        raise AppLoadError(str(exc)) from None
    try:
        obj: Any = importlib.import_module(parsed.module)
    except Exception as exc:
        hint = ""
        stem, dot, suffix = parsed.module.rpartition(".")
        if dot and suffix == "py" and isinstance(exc, ModuleNotFoundError):
            # `app: wsgi.py`, uWSGI's `wsgi-file = wsgi.py`: the module is `wsgi`
            hint = f" ({parsed.module!r} names a file: the module is {stem!r})"
        raise AppLoadError(f"cannot import {parsed.module!r}: {exc!r}{hint}") from exc
    attrs = parsed.attrs
    if not attrs:
        name = next((n for n in DEFAULT_NAMES if hasattr(obj, n)), None)
        if name is None:
            raise AppLoadError(
                f"module {parsed.module!r} has neither 'application' nor 'app'; "
                f"name the callable: '{parsed.module}:NAME'"
            )
        attrs = (name,)
    for attr in attrs:
        try:
            obj = getattr(obj, attr)
        except AttributeError:
            raise AppLoadError(
                f"{ref!r}: module {parsed.module!r} has no {'.'.join(attrs)!r}"
            ) from None
    if parsed.args is not None:
        try:
            obj = obj(*parsed.args, **parsed.kwargs)
        except Exception as exc:
            raise AppLoadError(f"{ref!r}: the factory raised {exc!r}") from exc
    if not callable(obj):
        raise AppLoadError(f"{ref!r} is not callable ({type(obj).__name__})")
    return obj  # type: ignore[no-any-return]


class FreshImports:
    """The modules a load brought in (`modules`), dropped and imported again by the next
    load (import_afresh); `put_back()` makes an earlier load's the master's again when the
    generation loaded last never serves; `release()` lets the earlier loads' modules go
    once none can be put back. Reimport and hooks.HookImports load through it."""

    def __init__(self) -> None:
        self.modules: dict[str, Any] = {}
        # every module a load brought in, until release() finds it dropped: held, as the
        # put_back() of a generation that may still be abandoned holds it anyway (weakly,
        # one whose object no other module names went with it and left its dict behind)
        self._loaded: list[tuple[str, ModuleType]] = []

    def load_afresh(self, load: Callable[[], _T]) -> _T:
        result, self.modules = import_afresh(self.modules, load)
        self._loaded += [
            (name, module) for name, module in self.modules.items()
            if isinstance(module, ModuleType)
        ]
        return result

    def release(self) -> int:
        """The modules earlier loads brought in that are no longer imported (neither in
        sys.modules nor the last load's) are garbage: called when no generation that could
        put them back is left. What the standard library registers for them would keep
        them for good (release_modules); the number of finalizers detached."""
        dropped: list[ModuleType] = []
        kept: list[tuple[str, ModuleType]] = []
        for name, module in self._loaded:
            if sys.modules.get(name) is module or self.modules.get(name) is module:
                kept.append((name, module))
            else:
                dropped.append(module)
        self._loaded = kept
        return release_modules(dropped)

    def put_back(self, modules: dict[str, Any]) -> None:
        """An earlier load's `modules` are sys.modules' again (put_back_modules)."""
        put_back_modules(self.modules, modules)
        self.modules = modules


class Reimport(FreshImports):
    """Fresh imports for a preloading master: `load()` imports the app and remembers which
    modules that brought in; the next `load()` drops those and imports again, restoring
    them if the new code fails, so the running generation's copy stays intact."""

    def load(self, ref: str) -> Callable[..., Any]:
        return self.load_afresh(lambda: load_app(ref))


def pinned_packages() -> frozenset[str]:
    """The top-level packages that hold a loaded extension module: never imported afresh.
    Many refuse a second load in one process (numpy 2: "cannot load module more than once
    per process"), and the others keep their C state whatever Python re-runs around it."""
    suffixes = tuple(importlib.machinery.EXTENSION_SUFFIXES)
    return frozenset(
        name.partition(".")[0]
        for name, module in list(sys.modules.items())
        if isinstance(path := getattr(module, "__file__", None), str) and path.endswith(suffixes)
    )


def import_afresh(
    previous: Mapping[str, Any], load: Callable[[], _T]
) -> tuple[_T, dict[str, Any]]:
    """Run `load` with the modules an earlier load brought in (`previous`) dropped from
    sys.modules, so that it imports them again from their files; its result, and the
    modules it brought in. Packages with extension modules stay (pinned_packages). If it
    raises (SystemExit included: an import that calls sys.exit() must not end the master),
    what it imported is dropped (but packages with extension modules, put_back_modules)
    and `previous` put back, so the running generation's copies stay intact."""
    pinned = pinned_packages()
    for name in previous:
        if name.partition(".")[0] not in pinned:
            sys.modules.pop(name, None)
    before = set(sys.modules)
    importlib.invalidate_caches()
    try:
        result = load()
    except BaseException:
        put_back_modules(set(sys.modules) - before, previous)
        raise
    return result, {name: sys.modules[name] for name in set(sys.modules) - before}


def release_modules(modules: Iterable[ModuleType]) -> int:
    """Detach the weakref.finalize callbacks whose code is in `modules` (modules dropped for
    good): the number detached. The registry of weakref.finalize (a module the master
    imported itself, which no reload drops) holds each callback until its object dies, and
    a callback that reaches its own object keeps it, and whatever its module reaches, alive
    for as long as the master runs. Django connects every signal receiver so (its Signal's
    _remove_receiver, for a receiver its module holds): each reload of a preloaded Django
    project kept the whole previous one, 17 MiB a HUP. Detached, such a callback never
    runs, in a master that no longer runs the code it belongs to; one the standard library
    or a module still imported defined is left as it is."""
    dicts = {id(vars(module)) for module in modules}
    registry = getattr(weakref.finalize, "_registry", None)  # CPython's, 3.4 and later
    if not dicts or not isinstance(registry, dict):
        return 0
    detached = 0
    for finalizer, info in list(registry.items()):
        function = getattr(info, "func", None)
        function = getattr(function, "__func__", function)  # a bound method's function
        if id(getattr(function, "__globals__", None)) in dicts:
            finalizer.detach()
            detached += 1
    return detached


def put_back_modules(imported: Iterable[str], previous: Mapping[str, Any]) -> None:
    """Drop the modules named `imported` from sys.modules and put `previous` back. Packages
    holding an extension module stay, even ones the dropped load brought in first: their C
    state outlives the modules, and one that refuses a second load (numpy 2) would fail
    every later reload's import of it until a restart."""
    pinned = pinned_packages()  # now: what the dropped load itself loaded counts
    for name in imported:
        if name.partition(".")[0] not in pinned:
            sys.modules.pop(name, None)
    sys.modules.update(previous)
