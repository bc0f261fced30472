"""prefork.loader: app references (parsed, never evaluated), importing the app, and the
fresh re-import a preloading master does on HUP.

Every test imports modules written to its own temporary directory under a package name of
its own, and removes them from sys.modules afterwards.
"""

from __future__ import annotations

import gc
import importlib
import os
import sys
import textwrap
import uuid
import weakref
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from prefork.config import ConfigError, load
from prefork.loader import (
    AppLoadError,
    AppRef,
    Reimport,
    import_afresh,
    load_app,
    parse_app_ref,
    pinned_packages,
)

# --- parse_app_ref ---------------------------------------------------------------------------

VALID: list[tuple[str, AppRef]] = [
    ("app", AppRef("app")),
    ("pkg.sub.mod", AppRef("pkg.sub.mod")),
    ("mod:application", AppRef("mod", ("application",))),
    ("pkg.mod:app", AppRef("pkg.mod", ("app",))),
    ("mod:obj.attr", AppRef("mod", ("obj", "attr"))),
    ("mod:a.b.c", AppRef("mod", ("a", "b", "c"))),
    ("  mod:app  ", AppRef("mod", ("app",))),
    ("mod: make( 1 )", AppRef("mod", ("make",), (1,), {})),
    ("mod:make()", AppRef("mod", ("make",), (), {})),
    ("mod:ns.make()", AppRef("mod", ("ns", "make"), (), {})),
    (
        "mod:factory('x', key=3, opts={'a': [1]})",
        AppRef("mod", ("factory",), ("x",), {"key": 3, "opts": {"a": [1]}}),
    ),
    (
        "mod:f((1, 2), {'k': {'n': [None, True, False]}}, -1.5, b'raw', {3, 4}, 2+1j)",
        AppRef(
            "mod",
            ("f",),
            ((1, 2), {"k": {"n": [None, True, False]}}, -1.5, b"raw", {3, 4}, 2 + 1j),
            {},
        ),
    ),
    ("mod:f(name=\"double\", n=0x10)", AppRef("mod", ("f",), (), {"name": "double", "n": 16})),
]


@pytest.mark.parametrize(("ref", "expected"), VALID, ids=[ref for ref, _ in VALID])
def test_parse_app_ref_accepts(ref: str, expected: AppRef) -> None:
    assert parse_app_ref(ref) == expected


# (reference, a fragment of the error message)
INVALID: list[tuple[str, str]] = [
    ("", "must be 'module'"),
    (":app", "must be 'module'"),
    ("1mod:app", "must be 'module'"),
    ("my-mod:app", "must be 'module'"),
    ("pkg..mod:app", "must be 'module'"),
    ("pkg.:app", "must be 'module'"),
    ("my mod:app", "must be 'module'"),
    ("mod/x:app", "must be 'module'"),
    ("mod:", "cannot parse"),
    ("mod:app extra", "cannot parse"),
    ("mod:make(", "cannot parse"),
    ("mod:class", "cannot parse"),
    ("mod:make(os.getcwd())", "must be literals"),
    ("mod:make(x)", "must be literals"),
    ("mod:make(key=x)", "must be literals"),
    ("mod:make(__import__('os'))", "must be literals"),
    ("mod:make([open('/etc/passwd')])", "must be literals"),
    ("mod:make(().__class__)", "must be literals"),
    ("mod:make(**opts)", "**kwargs is not allowed"),
    ("mod:make(**{'a': 1})", "**kwargs is not allowed"),
    ("mod:make(*args)", "must be literals"),
    ("mod:make(*[1])", "must be literals"),
    ("mod:lambda: 1", "must be literals"),
    ("mod:make().attr", "must be literals"),
    ("mod:make()()", "must be literals"),
    ("mod:make(1)(2)", "must be literals"),
    ("mod:apps[0]", "must be literals"),
    ("mod:a + b", "must be literals"),
    ("mod:'app'", "must be literals"),
    ("mod:make(1 + 2)", "must be literals"),
    ("mod:make(f'{x}')", "must be literals"),
    ("mod:make(x := 1)", "must be literals"),
]


@pytest.mark.parametrize(("ref", "fragment"), INVALID, ids=[ref or "<empty>" for ref, _ in INVALID])
def test_parse_app_ref_rejects(ref: str, fragment: str) -> None:
    with pytest.raises(ValueError) as info:
        parse_app_ref(ref)
    assert fragment in str(info.value)
    if ref:
        assert repr(ref.strip()) in str(info.value) or repr(ref) in str(info.value)


def test_a_non_literal_factory_argument_is_a_config_error_at_the_app_key(tmp_path: Path) -> None:
    path = tmp_path / "preforkd.yaml"
    path.write_text("workers: {count: 1}\napp: \"m:make(os.getcwd())\"\n")
    with pytest.raises(ConfigError) as info:
        load(str(path))
    message = str(info.value)
    assert message.startswith(f"{path}:2: app: "), message
    assert "must be literals" in message


# --- modules in a temporary package ----------------------------------------------------------


class Package:
    """A uniquely named package in a temporary directory on sys.path."""

    def __init__(self, root: Path) -> None:
        self.name = f"pf_loader_{uuid.uuid4().hex[:12]}"
        self.dir = root / self.name
        self.dir.mkdir()
        (self.dir / "__init__.py").write_text("")

    def write(self, module: str, source: str) -> Path:
        """Write `<package>/<module>.py`; the size changes with the text, so a stale
        bytecode cache can never be mistaken for it."""
        path = self.dir / f"{module}.py"
        path.write_text(textwrap.dedent(source))
        return path

    def ref(self, module: str, rest: str = "") -> str:
        return f"{self.name}.{module}" + (f":{rest}" if rest else "")

    def loaded(self) -> dict[str, Any]:
        return {n: m for n, m in sys.modules.items() if n.split(".")[0] == self.name}


@pytest.fixture
def package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Package]:
    monkeypatch.setattr(sys, "dont_write_bytecode", True)
    monkeypatch.syspath_prepend(str(tmp_path))
    pkg = Package(tmp_path)
    try:
        yield pkg
    finally:
        for name in pkg.loaded():
            del sys.modules[name]


def call(app: Callable[..., Any], path: str = "/") -> tuple[str, bytes]:
    """Call a WSGI app once; (status, body)."""
    seen: list[str] = []

    def start_response(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> None:
        seen.append(status)

    body = b"".join(app({"PATH_INFO": path, "REQUEST_METHOD": "GET"}, start_response))
    return seen[0], body


APP = """
def {name}(environ, start_response):
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [b"{text}"]
"""


# --- load_app --------------------------------------------------------------------------------


def test_module_only_reference_prefers_application_over_app(package: Package) -> None:
    package.write("both", APP.format(name="application", text="application")
                  + APP.format(name="app", text="app"))
    assert call(load_app(package.ref("both"))) == ("200 OK", b"application")


def test_module_only_reference_falls_back_to_app(package: Package) -> None:
    package.write("only_app", APP.format(name="app", text="app"))
    assert call(load_app(package.ref("only_app"))) == ("200 OK", b"app")


def test_module_without_a_default_name_says_how_to_name_the_callable(package: Package) -> None:
    package.write("neither", APP.format(name="handler", text="h"))
    ref = package.ref("neither")
    with pytest.raises(AppLoadError) as info:
        load_app(ref)
    message = str(info.value)
    assert "neither 'application' nor 'app'" in message
    assert f"'{ref}:NAME'" in message
    assert call(load_app(f"{ref}:handler")) == ("200 OK", b"h")


def test_dotted_attribute_reference(package: Package) -> None:
    package.write(
        "holder",
        """
        class Holder:
            def __init__(self, app):
                self.app = app

        def _app(environ, start_response):
            start_response("200 OK", [])
            return [b"nested"]

        holder = Holder(_app)
        """,
    )
    assert call(load_app(package.ref("holder", "holder.app"))) == ("200 OK", b"nested")


def test_factory_receives_literal_arguments_once(package: Package) -> None:
    package.write(
        "factory",
        """
        calls = []

        def make(greeting, times=1, opts=None):
            calls.append((greeting, times, opts))
            def app(environ, start_response):
                start_response("200 OK", [])
                return [f"{greeting}*{times} {opts}".encode()]
            return app
        """,
    )
    app = load_app(package.ref("factory", "make('hi', times=3, opts={'a': [1]})"))
    assert call(app) == ("200 OK", b"hi*3 {'a': [1]}")
    assert sys.modules[package.ref("factory")].calls == [("hi", 3, {"a": [1]})]


def test_a_factory_called_without_parentheses_is_the_app_itself(package: Package) -> None:
    package.write("factory2", "def make():\n    raise AssertionError('must not be called')\n")
    assert load_app(package.ref("factory2", "make")).__name__ == "make"


def test_a_factory_that_raises_is_an_app_load_error(package: Package) -> None:
    package.write("bad_factory", "def make(x):\n    raise KeyError('no such setting: ' + x)\n")
    ref = package.ref("bad_factory", "make('db')")
    with pytest.raises(AppLoadError) as info:
        load_app(ref)
    assert "the factory raised" in str(info.value)
    assert repr(ref) in str(info.value)
    assert isinstance(info.value.__cause__, KeyError)


def test_a_factory_with_wrong_arguments_is_an_app_load_error(package: Package) -> None:
    package.write("strict_factory", "def make(a):\n    return make\n")
    with pytest.raises(AppLoadError) as info:
        load_app(package.ref("strict_factory", "make(1, 2)"))
    assert isinstance(info.value.__cause__, TypeError)


def test_missing_module(package: Package) -> None:
    ref = package.ref("does_not_exist", "app")
    with pytest.raises(AppLoadError) as info:
        load_app(ref)
    assert f"cannot import {package.ref('does_not_exist')!r}" in str(info.value)
    assert isinstance(info.value.__cause__, ModuleNotFoundError)


def test_module_that_raises_at_import(package: Package) -> None:
    package.write("explodes", "raise RuntimeError('boom at import')\n")
    with pytest.raises(AppLoadError) as info:
        load_app(package.ref("explodes"))
    assert "boom at import" in str(info.value)
    assert isinstance(info.value.__cause__, RuntimeError)


def test_module_with_a_syntax_error(package: Package) -> None:
    path = package.write("typo", "def app(environ, start_response)\n    return []\n")
    with pytest.raises(AppLoadError) as info:
        load_app(package.ref("typo"))
    cause = info.value.__cause__
    assert isinstance(cause, SyntaxError)
    assert cause.filename == str(path)


def test_missing_attribute(package: Package) -> None:
    package.write("plain", APP.format(name="app", text="x"))
    ref = package.ref("plain", "obj.nothing")
    with pytest.raises(AppLoadError) as info:
        load_app(ref)
    assert "has no 'obj.nothing'" in str(info.value)


@pytest.mark.parametrize(("source", "rest", "kind"), [
    ("app = 42\n", "app", "int"),
    ("app = None\n", "", "NoneType"),
    ("def make():\n    return 'not an app'\n", "make()", "str"),
])
def test_not_callable(package: Package, source: str, rest: str, kind: str) -> None:
    package.write("notcallable", source)
    with pytest.raises(AppLoadError) as info:
        load_app(package.ref("notcallable", rest))
    assert f"is not callable ({kind})" in str(info.value)


def test_an_invalid_reference_is_an_app_load_error_and_imports_nothing(package: Package) -> None:
    package.write("never", "raise AssertionError('imported')\n")
    with pytest.raises(AppLoadError) as info:
        load_app(package.ref("never", "make(os.getcwd())"))
    assert "must be literals" in str(info.value)
    assert not package.loaded().keys() - {package.name}


# --- Reimport --------------------------------------------------------------------------------

RELOADABLE = """
from {pkg} import helper

TEXT = helper.TEXT

def app(environ, start_response):
    start_response("200 OK", [])
    return [TEXT.encode()]
"""


def test_reimport_load_remembers_the_modules_the_app_brought_in(package: Package) -> None:
    package.write("helper", "TEXT = 'one'\n")
    package.write("web", RELOADABLE.format(pkg=package.name))
    reimport = Reimport()
    app = reimport.load(package.ref("web"))
    assert call(app) == ("200 OK", b"one")
    assert set(reimport.modules) == {package.name, package.ref("web"), package.ref("helper")}


def test_reimport_reload_picks_up_edited_code(package: Package) -> None:
    package.write("helper", "TEXT = 'one'\n")
    package.write("web", RELOADABLE.format(pkg=package.name))
    reimport = Reimport()
    old_app = reimport.load(package.ref("web"))
    old_web = sys.modules[package.ref("web")]

    package.write("helper", "TEXT = 'two, edited'\n")
    new_app = reimport.load(package.ref("web"))

    assert call(new_app) == ("200 OK", b"two, edited")
    assert sys.modules[package.ref("web")] is not old_web
    assert reimport.modules[package.ref("web")] is sys.modules[package.ref("web")]
    # the running generation's copy is untouched
    assert call(old_app) == ("200 OK", b"one")


def test_reimport_reload_keeps_modules_imported_before_the_app(package: Package) -> None:
    package.write("shared", "STATE = []\n")
    package.write("user", f"from {package.name} import shared\napp = lambda e, s: []\n")
    __import__(package.ref("shared"))
    shared = sys.modules[package.ref("shared")]
    reimport = Reimport()
    reimport.load(package.ref("user"))
    assert package.ref("shared") not in reimport.modules
    reimport.load(package.ref("user"))
    assert sys.modules[package.ref("shared")] is shared
    assert sys.modules[package.ref("user")].shared is shared


@pytest.mark.parametrize("broken", [
    "raise RuntimeError('the new code fails')\n",
    "TEXT = 'unterminated\n",
    # imports a new module before failing: that module must not stay behind
    "from {pkg} import extra\nraise RuntimeError('fails after importing extra')\n",
])
def test_reimport_failed_reload_restores_the_old_modules(package: Package, broken: str) -> None:
    package.write("helper", "TEXT = 'one'\n")
    package.write("extra", "X = 1\n")
    package.write("web", RELOADABLE.format(pkg=package.name))
    reimport = Reimport()
    old_app = reimport.load(package.ref("web"))
    before = package.loaded()
    remembered = dict(reimport.modules)

    package.write("helper", broken.format(pkg=package.name))
    with pytest.raises(AppLoadError):
        reimport.load(package.ref("web"))

    after = package.loaded()
    assert after.keys() == before.keys()
    assert all(after[name] is before[name] for name in before)
    assert reimport.modules == remembered
    assert call(old_app) == ("200 OK", b"one")

    # and once the code is fixed, the next reload works
    package.write("helper", "TEXT = 'three, fixed'\n")
    assert call(reimport.load(package.ref("web"))) == ("200 OK", b"three, fixed")


def test_reimport_sees_a_module_file_added_after_the_first_load(package: Package) -> None:
    package.write("web", APP.format(name="app", text="first"))
    reimport = Reimport()
    reimport.load(package.ref("web"))
    package.write("late", "TEXT = 'late module'\n")
    package.write(
        "web",
        f"from {package.name}.late import TEXT\n"
        "def app(environ, start_response):\n"
        "    start_response('200 OK', [])\n"
        "    return [TEXT.encode()]\n",
    )
    assert call(reimport.load(package.ref("web"))) == ("200 OK", b"late module")


def test_load_app_does_not_change_the_working_directory(package: Package) -> None:
    package.write("cwd", APP.format(name="app", text="x"))
    before = os.getcwd()
    load_app(package.ref("cwd"))
    assert os.getcwd() == before


def test_reimport_put_back_restores_an_earlier_load(package: Package) -> None:
    """A generation abandoned after its import: the earlier load's modules are back."""
    package.write("helper", "TEXT = 'one'\n")
    package.write("web", RELOADABLE.format(pkg=package.name))
    reimport = Reimport()
    reimport.load(package.ref("web"))
    earlier = reimport.modules
    package.write("helper", "TEXT = 'two, longer'\n")
    reimport.load(package.ref("web"))
    assert sys.modules[package.ref("helper")].TEXT == "two, longer"
    reimport.put_back(earlier)
    assert sys.modules[package.ref("helper")].TEXT == "one"
    assert reimport.modules is earlier


def test_a_package_with_an_extension_module_is_not_imported_afresh() -> None:
    """Many extension modules refuse a second load in one process (numpy 2), so a package
    that holds one (httptools here) keeps its modules; the others are imported again."""
    import httptools

    assert "httptools" in pinned_packages()
    previous = {n: m for n, m in sys.modules.items() if n.partition(".")[0] == "httptools"}
    result, _ = import_afresh(previous, lambda: importlib.import_module("httptools"))
    assert result is httptools
    assert all(sys.modules[name] is module for name, module in previous.items())


def test_an_import_that_exits_restores_the_modules(package: Package) -> None:
    package.write("helper", "TEXT = 'one'\n")
    package.write("web", RELOADABLE.format(pkg=package.name))
    reimport = Reimport()
    reimport.load(package.ref("web"))
    loaded = dict(reimport.modules)
    package.write("helper", "import sys\nsys.exit('no settings')\n")
    with pytest.raises(SystemExit):
        reimport.load(package.ref("web"))
    assert reimport.modules == loaded
    assert all(sys.modules[name] is module for name, module in loaded.items())


# --- release: what the standard library holds of a replaced generation -----------------------
# Defect: the master kept every generation a preloaded Django project ever had (17 MiB a HUP):
# Django connects each signal receiver with weakref.finalize(receiver, signal._remove_receiver),
# the registry of weakref.finalize (a module the master imports itself) holds that bound
# method, and through its module's globals it reaches the receiver, so neither ever dies.

SIGNALS = """
import weakref


class Signal:
    # as django.dispatch.Signal.connect does
    def __init__(self):
        self.receivers = []

    def connect(self, receiver):
        self.receivers.append(weakref.ref(receiver))
        weakref.finalize(receiver, self._remove_receiver)

    def _remove_receiver(self):
        self.receivers = [r for r in self.receivers if r() is not None]


saved = Signal()


def on_save():
    pass


saved.connect(on_save)


def app(environ, start_response):
    start_response("200 OK", [])
    return [b"signals"]
"""


def test_a_released_generation_is_collected_despite_its_finalizers(package: Package) -> None:
    package.write("signals", SIGNALS)
    reimport = Reimport()
    reimport.load(package.ref("signals"))
    first = weakref.ref(sys.modules[package.ref("signals")].on_save)
    reimport.load(package.ref("signals"))
    gc.collect()
    assert first() is not None  # its module dropped from sys.modules, held by the finalizer

    assert reimport.release() == 1
    gc.collect()
    assert first() is None
    # the current generation's finalizer stays, and still runs
    current = sys.modules[package.ref("signals")]
    assert reimport.release() == 0
    assert len(current.saved.receivers) == 1
    del current.on_save
    gc.collect()
    assert current.saved.receivers == []


def test_release_keeps_what_can_still_be_imported_and_what_the_last_load_holds(
    package: Package,
) -> None:
    package.write("signals", SIGNALS)
    reimport = Reimport()
    reimport.load(package.ref("signals"))
    held = weakref.ref(sys.modules[package.ref("signals")].on_save)
    # the last load's modules, even one the application took out of sys.modules itself
    del sys.modules[package.ref("signals")]
    assert reimport.release() == 0
    gc.collect()
    assert held() is not None
