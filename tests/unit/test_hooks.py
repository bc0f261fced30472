"""prefork.hooks: resolving `hooks:` references and calling them (a raising hook is logged
and reported, never propagated)."""

from __future__ import annotations

import logging
import os
import sys
import textwrap
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from prefork.config import HOOKS, Config, ConfigError, HooksConfig, from_mapping, load
from prefork.hooks import HookError, HookImports, Hooks, ServerInfo, WorkerInfo
from prefork.signals import Stopped

HOOK_SOURCE = """
calls = []

def record(*args):
    calls.append(args)

def explode(*args):
    raise ValueError("hook exploded with %d arguments" % len(args))

class Namespace:
    @staticmethod
    def nested(server):
        calls.append(("nested", server))

NOT_CALLABLE = 42
"""


@pytest.fixture
def hook_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """The name of a fresh importable module with the functions in HOOK_SOURCE."""
    monkeypatch.setattr(sys, "dont_write_bytecode", True)
    monkeypatch.syspath_prepend(str(tmp_path))
    name = f"pf_hooks_unit_{uuid.uuid4().hex[:12]}"
    (tmp_path / f"{name}.py").write_text(textwrap.dedent(HOOK_SOURCE))
    try:
        yield name
    finally:
        sys.modules.pop(name, None)


@pytest.fixture
def config() -> Config:
    return from_mapping({"app": "app:app"})


def test_no_hooks_section_means_no_functions_and_every_call_succeeds() -> None:
    hooks = Hooks()
    for name in HOOKS:
        assert hooks.get(name) is None
        assert hooks.call(name, object()) is True
    assert Hooks(HooksConfig()).functions == {}


def test_an_unset_hook_is_true_even_when_others_are_set(hook_module: str) -> None:
    hooks = Hooks(HooksConfig(on_starting=f"{hook_module}:explode"))
    assert hooks.call("when_ready", object()) is True
    assert hooks.get("when_ready") is None


def test_configured_hooks_are_resolved_and_called_with_their_arguments(
    hook_module: str, config: Config
) -> None:
    hooks = Hooks(HooksConfig(
        pre_fork=f"{hook_module}:record",
        post_request=f"{hook_module}:record",
        on_exit=f"{hook_module}:Namespace.nested",
    ))
    module = sys.modules[hook_module]
    server = ServerInfo(config)
    worker = WorkerInfo(1, 1, config)
    assert hooks.call("pre_fork", server, worker) is True
    assert hooks.call("post_request", worker, {"PATH_INFO": "/"}, 200) is True
    assert hooks.call("on_exit", server) is True
    assert module.calls == [
        (server, worker),
        (worker, {"PATH_INFO": "/"}, 200),
        ("nested", server),
    ]
    assert hooks.get("pre_fork") is module.record


@pytest.mark.parametrize("name", HOOKS)
def test_a_missing_module_is_a_hook_error_naming_the_hook(name: str) -> None:
    ref = f"pf_no_such_module_{uuid.uuid4().hex[:8]}:function"
    with pytest.raises(HookError) as info:
        Hooks(HooksConfig(**{name: ref}))
    message = str(info.value)
    assert message.startswith(f"hooks.{name}: cannot load {ref!r}"), message
    assert "ModuleNotFoundError" in message


def test_a_missing_function_is_a_hook_error(hook_module: str) -> None:
    ref = f"{hook_module}:no_such_function"
    with pytest.raises(HookError) as info:
        Hooks(HooksConfig(when_ready=ref))
    assert str(info.value).startswith(f"hooks.when_ready: cannot load {ref!r}")
    assert "no_such_function" in str(info.value)


def test_a_missing_nested_attribute_is_a_hook_error(hook_module: str) -> None:
    with pytest.raises(HookError, match=r"^hooks\.on_exit: cannot load .*Namespace\.missing"):
        Hooks(HooksConfig(on_exit=f"{hook_module}:Namespace.missing"))


def test_a_module_that_fails_to_import_is_a_hook_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.syspath_prepend(str(tmp_path))
    name = f"pf_hooks_broken_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{name}.py").write_text("raise ImportError('hook module is broken')\n")
    try:
        with pytest.raises(HookError) as info:
            Hooks(HooksConfig(post_fork=f"{name}:post_fork"))
    finally:
        sys.modules.pop(name, None)
    assert str(info.value).startswith("hooks.post_fork: cannot load")
    assert "hook module is broken" in str(info.value)
    assert isinstance(info.value.__cause__, ImportError)


def test_a_non_callable_is_a_hook_error(hook_module: str) -> None:
    with pytest.raises(HookError) as info:
        Hooks(HooksConfig(pre_request=f"{hook_module}:NOT_CALLABLE"))
    assert str(info.value) == f"hooks.pre_request: '{hook_module}:NOT_CALLABLE' is not callable"


def test_a_raising_hook_returns_false_and_is_logged_with_its_traceback(
    hook_module: str, caplog: pytest.LogCaptureFixture
) -> None:
    hooks = Hooks(HooksConfig(pre_request=f"{hook_module}:explode"))
    with caplog.at_level(logging.ERROR, logger="prefork"):
        assert hooks.call("pre_request", object(), {}) is False
    [record] = [r for r in caplog.records if r.name == "prefork"]
    assert record.levelno == logging.ERROR
    assert record.getMessage() == f"hook pre_request ({hook_module}:explode) failed"
    assert record.exc_info is not None
    assert isinstance(record.exc_info[1], ValueError)
    assert "hook exploded with 2 arguments" in caplog.text
    assert "Traceback" in caplog.text


def test_a_raising_hook_does_not_stop_later_calls(hook_module: str) -> None:
    hooks = Hooks(HooksConfig(
        on_starting=f"{hook_module}:explode", when_ready=f"{hook_module}:record"
    ))
    assert hooks.call("on_starting", "server") is False
    assert hooks.call("when_ready", "server") is True
    assert hooks.call("on_starting", "server") is False  # still configured, still failing
    assert sys.modules[hook_module].calls == [("server",)]


@pytest.mark.parametrize(
    ("body", "failure"),
    [("sys.exit(7)", "SystemExit(7)"), ("raise KeyboardInterrupt", "KeyboardInterrupt()")],
)
def test_sys_exit_in_a_hook_is_its_failure(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, body: str, failure: str
) -> None:
    """SystemExit / KeyboardInterrupt from a hook are "a hook failed", as an exception is:
    through Hooks.call they ended the master (when_ready, child_exit) or a worker."""
    monkeypatch.syspath_prepend(str(tmp_path))
    name = f"pf_hooks_exit_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{name}.py").write_text(f"import sys\ndef leave(*a):\n    {body}\n")
    try:
        hooks = Hooks(HooksConfig(worker_exit=f"{name}:leave"))
    finally:
        sys.modules.pop(name, None)
    assert hooks.call("worker_exit", None, None) is False
    assert hooks.failure == f"hook worker_exit failed: {failure}"


def test_a_stop_while_starting_goes_through_a_hook(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """signals.Stopped (TERM while the master starts) is not the hook's failure."""
    monkeypatch.syspath_prepend(str(tmp_path))
    name = f"pf_hooks_stop_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{name}.py").write_text(
        "from prefork.signals import Stopped\ndef leave(*a):\n    raise Stopped(15)\n"
    )
    try:
        hooks = Hooks(HooksConfig(on_starting=f"{name}:leave"))
    finally:
        sys.modules.pop(name, None)
    with pytest.raises(Stopped):
        hooks.call("on_starting", None)


def test_hook_arguments_carry_the_documented_attributes(config: Config) -> None:
    server = ServerInfo(config)
    assert server.pid == os.getpid()
    assert server.generation == 1
    assert server.workers == []
    assert server.config is config
    worker = WorkerInfo(3, 2, config)
    assert (worker.number, worker.generation, worker.pid, worker.config) == (3, 2, None, config)


def test_every_documented_hook_can_be_configured() -> None:
    names = {f.name for f in HooksConfig.__dataclass_fields__.values()}
    assert names == set(HOOKS)
    assert set(HOOKS) == {
        "on_starting", "when_ready", "pre_fork", "post_fork", "post_worker_init",
        "worker_exit", "worker_int", "worker_abort", "child_exit", "nworkers_changed",
        "on_reload", "pre_exec", "pre_request", "post_request", "on_exit",
    }


def test_the_worker_signal_hooks_load_from_the_hooks_section(
    tmp_path: Path, hook_module: str
) -> None:
    path = tmp_path / "preforkd.yaml"
    path.write_text(
        f"app: app:app\nhooks:\n  worker_int: {hook_module}:record\n"
        f"  worker_abort: {hook_module}:Namespace.nested\n"
    )
    config = load(str(path))
    assert config.hooks.worker_int == f"{hook_module}:record"
    assert config.hooks.worker_abort == f"{hook_module}:Namespace.nested"
    hooks = Hooks(config.hooks)
    module = sys.modules[hook_module]
    assert hooks.get("worker_int") is module.record
    assert hooks.get("worker_abort") is module.Namespace.nested
    worker = WorkerInfo(2, 1, config, 4242)
    assert hooks.call("worker_int", worker) is True
    assert module.calls == [(worker,)]


@pytest.mark.parametrize("name", ["worker_int", "worker_abort"])
def test_a_bad_worker_signal_hook_reference_is_a_config_error(
    tmp_path: Path, name: str
) -> None:
    path = tmp_path / "preforkd.yaml"
    path.write_text(f"app: app:app\nhooks:\n  {name}: not a reference\n")
    with pytest.raises(ConfigError) as info:
        load(str(path))
    assert str(info.value).startswith(f"{path}:3: hooks.{name}: ")


def test_hook_references_are_checked_when_the_config_is_loaded(tmp_path: Path) -> None:
    path = tmp_path / "preforkd.yaml"
    path.write_text("app: app:app\nhooks:\n  on_starting: not a reference\n")
    with pytest.raises(ConfigError) as info:
        load(str(path))
    assert str(info.value).startswith(f"{path}:3: hooks.on_starting: ")


def test_hook_imports_load_fresh_modules_at_each_load_and_put_back_restores(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A reload imports the hook modules, and what they import (here the application
    module), afresh; a reload that fails later puts the previous ones back."""
    tag = uuid.uuid4().hex[:8]
    hooks_mod, app_mod = f"pfhooks_{tag}", f"pfapp_{tag}"
    monkeypatch.syspath_prepend(str(tmp_path))
    (tmp_path / f"{hooks_mod}.py").write_text(
        f"import {app_mod}\ndef post_fork(server, worker):\n    return {app_mod}.VERSION\n"
    )
    app_file = tmp_path / f"{app_mod}.py"
    app_file.write_text("VERSION = 1\n")
    config = HooksConfig(post_fork=f"{hooks_mod}:post_fork")
    imports = HookImports()
    try:
        first = imports.load(config)
        assert first.functions["post_fork"](None, None) == 1
        loaded = imports.modules
        app_file.write_text("VERSION = 22\n")  # another size: no stale bytecode
        second = imports.load(config)
        assert second.functions["post_fork"](None, None) == 22
        assert sys.modules[app_mod].VERSION == 22
        imports.put_back(loaded)
        assert sys.modules[app_mod].VERSION == 1
        assert sys.modules[hooks_mod].post_fork is first.functions["post_fork"]
        assert imports.modules is loaded
    finally:
        for name in (hooks_mod, app_mod):
            sys.modules.pop(name, None)


def test_a_hook_module_that_exits_at_import_is_a_hook_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """sys.exit() in a module a hook imports raises SystemExit: inside a reload that must
    fail the reload, not end the master; the modules stay as they were."""
    tag = uuid.uuid4().hex[:8]
    hooks_mod = f"pfhooks_{tag}"
    monkeypatch.syspath_prepend(str(tmp_path))
    source = tmp_path / f"{hooks_mod}.py"
    source.write_text("def post_fork(server, worker):\n    return 1\n")
    config = HooksConfig(post_fork=f"{hooks_mod}:post_fork")
    imports = HookImports()
    try:
        imports.load(config)
        loaded = dict(imports.modules)
        source.write_text("import sys\nsys.exit('settings missing')\n")
        with pytest.raises(HookError, match="settings missing"):
            imports.load(config)
        assert imports.modules == loaded
        assert sys.modules[hooks_mod] is loaded[hooks_mod]
    finally:
        sys.modules.pop(hooks_mod, None)
