"""Everyday application-server features on a real preforkd: app factories, `env`,
`pythonpath`/`chdir`, `preload_app` (and what HUP reloads with it), server hooks, TLS
listeners and development auto-reload.

Apps: apps/pf_features_app.py (`report` answers with JSON about its process and request;
`make(...)` is a factory) and apps/pf_hooks.py (every hook appends a JSON line to $HOOK_LOG;
`app` records its own calls there too). Code that a test edits is written into the server's
own directory, never into apps/. Edits replace the file atomically (write, then rename), as
many editors do, and change its size, so a stale bytecode cache cannot hide them.
"""

from __future__ import annotations

import json
import os
import pwd
import re
import signal
import socket
import ssl
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

import harness
from harness import (
    APPS,
    Address,
    Response,
    Server,
    ServerFactory,
    address,
    connect,
    fetch,
    recv_until_close,
    require_tool,
    wait_until,
    write_config,
)


def settings(app: str = "pf_features_app:report", **more: Any) -> dict[str, Any]:
    return harness.settings(app, **more)


def get(server: Server, target: str = "/") -> Response:
    return fetch(address(server), target=target)


def get_json(server: Server, target: str = "/") -> dict[str, Any]:
    response = get(server, target)
    assert response.status == 200, response
    document: dict[str, Any] = json.loads(response.body)
    return document


def response_when(server: Server, status: int, body: bytes | None = None) -> Response:
    """Wait (10 s at most) until a fresh request is answered with `status` (and `body`, if
    given); workers may be restarting meanwhile."""

    def answered() -> Response | None:
        response = get(server)
        if response.status == status and body in (None, response.body):
            return response
        return None

    response = wait_until(answered, 10.0, message=f"expected {status} {body!r}",
                          ignore=(OSError, EOFError))
    assert response is not None
    return response


def rewrite(path: Path, text: str) -> None:
    """Replace `path` atomically (temporary file + rename), as an editor saving it would."""
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(text)
    os.replace(temporary, path)


def start_with_config(factory: ServerFactory, workdir: Path, config: Path) -> Server:
    """Start a server in `workdir` with a config written by the test (anywhere); the factory
    still stops it."""
    server = Server(workdir, config)
    factory.servers.append(server)
    return server.start().wait_ready()


def no_listeners(server: Server) -> bool:
    return "listening at" not in server.log()


def hup(server: Server, outcome: str) -> str:
    """Send HUP and wait for `outcome` ("reloaded:" or "reload failed"); the log since."""
    since = len(server.log())
    server.signal(signal.SIGHUP)
    server.wait_for_log(outcome, since=since)
    return server.log()[since:]


def replaced(server: Server, old: list[int]) -> None:
    wait_until(lambda: not set(old) & set(server.worker_pids()), 10.0,
               message=f"old workers {old} still running")


TEXT_APP = """\
from helper import TEXT

def app(environ, start_response):
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [TEXT.encode()]
"""


# --- app references ----------------------------------------------------------------------------


def test_factory_with_literal_arguments_is_called_and_served(
    server_factory: ServerFactory,
) -> None:
    server = server_factory(
        settings("pf_features_app:make('hi', times=3, opts={'a': [1], 'b': None})",
                 workers={"count": 1})
    )
    document = get_json(server)
    assert document["greeting"] == "hi"
    assert document["times"] == 3
    assert document["opts"] == {"a": [1], "b": None}


def test_module_only_reference_serves_the_module_app(server_factory: ServerFactory) -> None:
    source = (
        "def app(environ, start_response):\n"
        "    start_response('200 OK', [('Content-Type', 'text/plain')])\n"
        "    return [b'module-only reference']\n"
    )
    server = server_factory({"app": "pf_module_only", "workers": {"count": 1}},
                            app_source=source, module="pf_module_only")
    assert get(server).body == b"module-only reference"


def test_non_literal_factory_argument_is_a_config_error_and_nothing_is_imported(
    server_factory: ServerFactory, tmp_path: Path
) -> None:
    imports = tmp_path / "imports.log"
    server = server_factory(
        config_text=(
            f"pythonpath: [{json.dumps(str(APPS))}]\n"
            "app: \"pf_features_app:make(os.getcwd())\"\n"
            "bind: [\"127.0.0.1:0\"]\n"
        ),
        env={"FEATURE_IMPORT_LOG": str(imports)},
        wait_ready=False,
    )
    assert server.wait_exit() == 2
    log = server.log()
    assert f"{server.config}:2: app: " in log
    assert "must be literals" in log
    assert no_listeners(server)
    assert not imports.exists()


# --- env, pythonpath, chdir ----------------------------------------------------------------------


def test_env_is_visible_to_the_app_and_a_reload_applies_the_new_env(
    server_factory: ServerFactory,
) -> None:
    server = server_factory(
        settings(workers={"count": 1},
                 env={"FEATURE_GREETING": "hello", "FEATURE_NUMBER": 42, "FEATURE_PI": 3.5}),
        env={"FEATURE_INHERITED": "outer"},
    )
    assert get_json(server)["env"] == {
        "FEATURE_GREETING": "hello",
        "FEATURE_NUMBER": "42",
        "FEATURE_PI": "3.5",
        "FEATURE_INHERITED": "outer",
    }

    # HUP with a changed env: new value, removed names gone, the inherited one untouched
    write_config(server.workdir, settings(workers={"count": 1},
                                          env={"FEATURE_GREETING": "bonjour"}))
    old = server.worker_pids()
    hup(server, "reloaded:")
    replaced(server, old)
    expected = {"FEATURE_GREETING": "bonjour", "FEATURE_INHERITED": "outer"}
    assert get_json(server)["env"] == expected

    # a reload that fails after the env was applied (a hook that cannot be loaded) must put
    # the previous env back in the master: a worker forked afterwards still sees "bonjour"
    write_config(server.workdir, settings(
        workers={"count": 1},
        env={"FEATURE_GREETING": "broken", "FEATURE_EXTRA": "leaked"},
        hooks={"on_starting": "pf_no_such_hooks_module:on_starting"},
    ))
    hup(server, "reload failed")
    [serving] = server.worker_pids()
    os.kill(serving, signal.SIGKILL)
    wait_until(lambda: (pids := server.worker_pids()) and serving not in pids, 10.0)
    assert get_json(server)["env"] == expected


def test_an_old_worker_started_while_a_reload_is_pending_keeps_the_old_env(
    server_factory: ServerFactory,
) -> None:
    """Defect: the new generation's env went into the master's environment before its canary
    booted, and generation 1's workers inherited the master's environment at fork: one
    respawned meanwhile ran with the rejected env, for good once the reload failed."""
    server = server_factory(settings(workers={"count": 1}, env={"FEATURE_GREETING": "old"}))
    expected = get_json(server)["env"]
    assert expected == {"FEATURE_GREETING": "old"}
    (server.workdir / "pf_slow_broken.py").write_text(
        "import time\ntime.sleep(3)\nraise ImportError('broken on purpose')\n"
    )
    write_config(server.workdir, settings(
        "pf_slow_broken:app",
        pythonpath=[str(APPS), str(server.workdir)],
        workers={"count": 1},
        env={"FEATURE_GREETING": "rejected"},
    ))
    [serving] = server.worker_pids()
    since = len(server.log())
    server.signal(signal.SIGHUP)
    server.wait_for_log("HUP: reloading", since=since)
    os.kill(serving, signal.SIGKILL)  # while the canary still imports
    wait_until(lambda: (pids := server.worker_pids()) and serving not in pids, 10.0)
    assert get_json(server)["env"] == expected  # the respawned old worker, canary pending
    server.wait_for_log("reload failed", since=since, timeout=15)
    assert get_json(server)["env"] == expected


def test_reload_that_drops_an_env_override_restores_the_inherited_value(
    server_factory: ServerFactory,
) -> None:
    """A reload behaves like a fresh start with the new file: a variable the old file
    overrode and the new one does not mention has the value preforkd was started with."""
    server = server_factory(
        settings(workers={"count": 1}, env={"FEATURE_MODE": "from-config"}),
        env={"FEATURE_MODE": "from-parent"},
    )
    assert get_json(server)["env"] == {"FEATURE_MODE": "from-config"}
    old = server.worker_pids()
    write_config(server.workdir, settings(workers={"count": 1}, env={}))
    hup(server, "reloaded:")
    replaced(server, old)
    assert get_json(server)["env"] == {"FEATURE_MODE": "from-parent"}


def test_pythonpath_is_relative_to_the_config_file_not_the_working_directory(
    server_factory: ServerFactory, tmp_path: Path
) -> None:
    workdir = tmp_path / "pythonpath"
    confdir = workdir / "conf"
    (confdir / "code").mkdir(parents=True)
    (workdir / "code").mkdir()  # same relative name under the working directory: a decoy
    app = (
        "def app(environ, start_response):\n"
        "    start_response('200 OK', [('Content-Type', 'text/plain')])\n"
        "    return [{!r}]\n"
    )
    (confdir / "code" / "pf_pythonpath_mod.py").write_text(app.format(b"beside the config"))
    (workdir / "code" / "pf_pythonpath_mod.py").write_text(app.format(b"in the working dir"))
    config = write_config(confdir, {
        "app": "pf_pythonpath_mod:app", "pythonpath": ["code"], "workers": {"count": 1},
    })
    server = start_with_config(server_factory, workdir, config)
    assert get(server).body == b"beside the config"


@pytest.mark.parametrize("preload", [False, True], ids=["workers-import", "preload"])
def test_chdir_is_relative_to_the_config_and_applies_to_the_app(
    server_factory: ServerFactory, tmp_path: Path, preload: bool
) -> None:
    workdir = tmp_path / "chdir"
    data = workdir / "data"
    data.mkdir(parents=True)
    (data / "greeting.txt").write_text("read through a relative path")
    source = (
        "import os\n"
        "def app(environ, start_response):\n"
        "    with open('greeting.txt') as f:\n"
        "        text = os.getcwd() + '|' + f.read()\n"
        "    start_response('200 OK', [('Content-Type', 'text/plain')])\n"
        "    return [text.encode()]\n"
    )
    config = write_config(
        workdir,
        {"app": "pf_chdir_app:app", "chdir": "data", "preload_app": preload,
         "workers": {"count": 1}},
        app_source=source, module="pf_chdir_app",
    )
    # started from elsewhere: `chdir: data` is resolved against the config's directory
    server = start_with_config(server_factory, tmp_path, config)
    cwd, _, text = get(server).body.decode().partition("|")
    assert os.path.realpath(cwd) == os.path.realpath(data)
    assert text == "read through a relative path"


# --- preload_app ---------------------------------------------------------------------------------


@pytest.mark.parametrize("preload", [True, False], ids=["preload", "no-preload"])
def test_preload_imports_the_app_once_in_the_master(
    server_factory: ServerFactory, tmp_path: Path, preload: bool
) -> None:
    imports = tmp_path / "imports.log"
    server = server_factory(settings(
        preload_app=preload, workers={"count": 2},
        env={"FEATURE_IMPORT_LOG": str(imports)},
    ))
    workers = server.worker_pids()
    assert len(workers) == 2
    importers = [int(line.split()[1]) for line in imports.read_text().splitlines()]
    documents = [get_json(server) for _ in range(4)]
    if preload:
        assert importers == [server.pid]
        assert all(d["import_pid"] == server.pid and d["pid"] in workers for d in documents)
    else:
        assert sorted(importers) == workers
        assert all(d["import_pid"] == d["pid"] for d in documents)


def text_app_server(
    factory: ServerFactory, tmp_path: Path, preload: bool, name: str = "text"
) -> Server:
    """A 2-worker server for TEXT_APP (app.py imports helper.py, which says 'old code')."""
    workdir = tmp_path / name
    workdir.mkdir()
    (workdir / "helper.py").write_text("TEXT = 'old code'\n")
    config = write_config(
        workdir, {"app": "app:app", "preload_app": preload, "workers": {"count": 2}},
        app_source=TEXT_APP,
    )
    server = start_with_config(factory, workdir, config)
    assert get(server).body == b"old code"
    return server


@pytest.mark.parametrize("preload", [True, False], ids=["preload", "no-preload"])
def test_hup_loads_edited_code(
    server_factory: ServerFactory, tmp_path: Path, preload: bool
) -> None:
    server = text_app_server(server_factory, tmp_path, preload)
    old = server.worker_pids()
    rewrite(server.workdir / "helper.py", "TEXT = 'new code, loaded by HUP'\n")
    hup(server, "reloaded:")
    replaced(server, old)
    for _ in range(4):
        assert get(server).body == b"new code, loaded by HUP"


@pytest.mark.parametrize("preload", [True, False], ids=["preload", "no-preload"])
def test_hup_with_broken_code_keeps_serving_the_old_code(
    server_factory: ServerFactory, tmp_path: Path, preload: bool
) -> None:
    server = text_app_server(server_factory, tmp_path, preload)
    pids = server.worker_pids()

    rewrite(server.workdir / "helper.py", "raise RuntimeError('the new helper is broken')\n")
    assert "the new helper is broken" in hup(server, "reload failed")
    for _ in range(4):
        assert get(server).body == b"old code"
    wait_until(lambda: server.worker_pids() == pids, 5.0)

    # fixing the code and reloading again works (the failed attempt left nothing behind)
    rewrite(server.workdir / "helper.py", "TEXT = 'fixed code after a failed reload'\n")
    hup(server, "reloaded:")
    replaced(server, pids)
    for _ in range(4):
        assert get(server).body == b"fixed code after a failed reload"


# --- server hooks --------------------------------------------------------------------------------

HOOK_NAMES = (
    "on_starting", "when_ready", "pre_fork", "post_fork", "post_worker_init", "worker_exit",
    "child_exit", "on_reload", "pre_request", "post_request", "on_exit",
)
MASTER_HOOKS = {"on_starting", "when_ready", "pre_fork", "child_exit", "on_reload", "on_exit"}


def hook_events(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines()]


def hooked(log: Path, app: str = "pf_hooks:app", **hooks: str) -> dict[str, Any]:
    return settings(app, hooks=hooks,
                    env={"HOOK_LOG": str(log), "FEATURE_GREETING": "seen by hooks"})


def test_every_hook_fires_in_the_right_process_with_the_right_arguments_in_order(
    server_factory: ServerFactory, tmp_path: Path
) -> None:
    log = tmp_path / "hooks.jsonl"
    conf = hooked(log, **{name: f"pf_hooks:{name}" for name in HOOK_NAMES})
    server = server_factory({**conf, "workers": {"count": 2}})
    master = server.pid
    initial = server.worker_pids()

    assert get(server, "/first").status == 200
    wait_until(lambda: any(e["hook"] == "post_request" for e in hook_events(log)), 5.0)

    victim = initial[0]
    os.kill(victim, signal.SIGKILL)
    wait_until(lambda: len([e for e in hook_events(log) if e["hook"] == "post_worker_init"]) == 3,
               10.0)

    generation_one = server.worker_pids()
    hup(server, "reloaded:")
    replaced(server, generation_one)
    generation_two = server.worker_pids()
    server.signal(signal.SIGTERM)
    assert server.wait_exit() == 0

    events = hook_events(log)
    names = [e["hook"] for e in events]

    def where(hook: str, **match: Any) -> list[int]:
        found = []
        for i, e in enumerate(events):
            subject = e.get("worker", {})
            if e["hook"] == hook and all(
                (e.get(k) if k in ("pid", "status", "path") else subject.get(k)) == v
                for k, v in match.items()
            ):
                found.append(i)
        return found

    # once-only master hooks, first and last
    assert names[0] == "on_starting" and names[-1] == "on_exit", names
    for once in ("on_starting", "when_ready", "on_reload", "on_exit"):
        assert names.count(once) == 1, (once, names)

    # which process ran what
    for e in events:
        if e["hook"] in MASTER_HOOKS:
            assert e["pid"] == master, e
            assert e["server"]["pid"] == master, e
        else:
            assert e["pid"] != master, e
        if "worker" in e:
            assert e["worker"]["app"] == "pf_hooks:app", e
        if e["hook"] in ("post_fork", "post_worker_init", "worker_exit", "pre_request",
                         "post_request"):
            assert e["worker"]["pid"] == e["pid"], e
        if e["hook"] == "pre_fork":
            assert e["worker"]["pid"] is None, e

    # env reaches hooks in the master and in the workers
    assert events[0]["env"] == "seen by hooks"
    assert all(e["env"] == "seen by hooks" for e in events if e["hook"] == "post_fork")

    # startup: pre_fork (master) -> post_fork -> post_worker_init (worker) for 1 and 2, then
    # when_ready once both serve
    ready = names.index("when_ready")
    for number in (1, 2):
        pre, post, init = (
            min(where(hook, number=number, generation=1), default=len(events))
            for hook in ("pre_fork", "post_fork", "post_worker_init")
        )
        assert pre < post < init < ready, (number, names)
        assert events[post]["pid"] == events[init]["pid"]
    assert events[ready]["server"]["workers"] == [1, 2]
    assert sorted(events[i]["pid"] for i in where("post_worker_init") if i < ready) == initial

    # one request: pre_request -> app -> post_request(200), all in the same worker
    [pre_request] = where("pre_request", path="/first")
    [app_call] = [i for i, e in enumerate(events) if e["hook"] == "app"]
    [post_request] = where("post_request", path="/first")
    assert pre_request < app_call < post_request
    assert events[post_request]["status"] == 200
    assert len({events[i]["pid"] for i in (pre_request, app_call, post_request)}) == 1

    # a killed worker: child_exit in the master (no worker_exit: it was killed), then a
    # replacement with the same number is forked
    [killed] = [i for i in where("child_exit") if events[i]["worker"]["pid"] == victim]
    assert not [e for e in events if e["hook"] == "worker_exit" and e["pid"] == victim]
    number = events[killed]["worker"]["number"]
    assert [i for i in where("pre_fork", number=number, generation=1) if i > killed]

    # HUP: on_reload, then the new generation's workers are forked
    reload_at = names.index("on_reload")
    assert reload_at > killed
    assert where("pre_fork", generation=2) and min(where("pre_fork", generation=2)) > reload_at
    assert sorted(events[i]["pid"] for i in where("post_worker_init", generation=2)) == sorted(
        generation_two
    )

    # every worker that served and was not killed ran worker_exit in itself, and the master
    # ran child_exit for it afterwards; on_exit came after all of them
    served = {events[i]["pid"] for i in where("post_worker_init")} - {victim}
    assert {events[i]["pid"] for i in where("worker_exit")} == served
    for pid in served:
        [leave] = [i for i in where("worker_exit") if events[i]["pid"] == pid]
        [reaped] = [i for i in where("child_exit") if events[i]["worker"]["pid"] == pid]
        assert leave < reaped < len(events) - 1
    gen_two_exits = [events[i] for i in where("worker_exit", generation=2)]
    assert sorted(e["pid"] for e in gen_two_exits) == sorted(generation_two)


@pytest.mark.parametrize("hook", ["post_fork", "post_worker_init"])
def test_a_failing_boot_hook_at_startup_stops_the_server(
    server_factory: ServerFactory, tmp_path: Path, hook: str
) -> None:
    """Before the server was ever ready, a worker that cannot start will not start on the
    next try either: the master stops with the reason instead of fork-looping."""
    imports = tmp_path / "imports.log"
    conf = hooked(tmp_path / "hooks.jsonl", "pf_features_app:report",
                  **{hook: f"pf_hooks:failing_{hook}"})
    conf["env"]["FEATURE_IMPORT_LOG"] = str(imports)
    server = server_factory({**conf, "workers": {"count": 1}}, wait_ready=False)
    assert server.wait_exit(15) == 1
    log = server.log()
    assert f"hook {hook} (pf_hooks:failing_{hook}) failed" in log
    assert f"RuntimeError: deliberate failure in {hook}" in log
    assert "a worker cannot start (see above); stopping" in log
    assert "ready:" not in log
    assert log.count(f"hook {hook} (pf_hooks:failing_{hook}) failed") == 1, "it retried"
    if hook == "post_fork":  # runs before the app is loaded: the app never was
        assert not imports.exists()
    else:  # runs after the app is loaded, before serving
        assert imports.exists()


def test_post_fork_runs_in_the_worker_after_privileges_are_dropped(
    server_factory: ServerFactory, short_tmp: Path
) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to switch the workers to another user")
    short_tmp.chmod(0o755)
    log = short_tmp / "hooks.jsonl"
    log.touch(mode=0o666)
    log.chmod(0o666)
    server = server_factory({
        **hooked(log, on_starting="pf_hooks:on_starting", post_fork="pf_hooks:post_fork"),
        "user": "nobody",
        "workers": {"count": 1},
    })
    assert get(server).status == 200
    events = {e["hook"]: e for e in hook_events(log)}
    assert events["on_starting"]["uid"] == 0
    assert events["post_fork"]["uid"] == pwd.getpwnam("nobody").pw_uid
    assert events["post_fork"]["pid"] == server.worker_pids()[0]


def test_a_failing_pre_request_hook_answers_500_and_the_app_is_not_called(
    server_factory: ServerFactory, tmp_path: Path
) -> None:
    log = tmp_path / "hooks.jsonl"
    server = server_factory({
        **hooked(log, pre_request="pf_hooks:failing_pre_request",
                 post_request="pf_hooks:post_request"),
        "workers": {"count": 1},
    })
    for target in ("/one", "/two"):
        assert get(server, target).status == 500
    server.wait_for_log("hook pre_request (pf_hooks:failing_pre_request) failed")
    assert "RuntimeError: deliberate failure in pre_request" in server.log()
    wait_until(lambda: len([e for e in hook_events(log) if e["hook"] == "post_request"]) == 2,
               5.0)
    events = hook_events(log)
    assert not [e for e in events if e["hook"] == "app"]
    assert [(e["path"], e["status"]) for e in events if e["hook"] == "post_request"] == [
        ("/one", 500), ("/two", 500),
    ]


@pytest.mark.parametrize(
    "ref",
    ["pf_no_such_hooks_module:when_ready", "pf_hooks:no_such_function"],
    ids=["missing-module", "missing-function"],
)
def test_a_hook_that_cannot_be_loaded_stops_the_start(
    server_factory: ServerFactory, tmp_path: Path, ref: str
) -> None:
    log = tmp_path / "hooks.jsonl"
    server = server_factory(
        hooked(log, when_ready=ref, on_exit="pf_hooks:on_exit"), wait_ready=False
    )
    assert server.wait_exit() == 1
    assert f"hooks.when_ready: cannot load {ref!r}" in server.log()
    assert no_listeners(server)
    assert not log.exists()  # no hook ran, not even the loadable on_exit


# --- TLS -----------------------------------------------------------------------------------------


class Certs:
    """A CA, a server certificate for localhost/127.0.0.1 and a client certificate, both
    signed by it, and a key that belongs to neither."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.ca = directory / "ca.pem"
        self.server_cert = directory / "server.pem"
        self.server_key = directory / "server.key"
        self.client_cert = directory / "client.pem"
        self.client_key = directory / "client.key"
        self.other_key = directory / "other.key"


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    openssl = require_tool("openssl")
    c = Certs(tmp_path_factory.mktemp("certs"))

    def run(*args: str) -> None:
        subprocess.run([openssl, *args], cwd=c.dir, check=True, capture_output=True, timeout=60)

    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=pf test CA",
        "-keyout", "ca.key", "-out", "ca.pem",
        "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign")
    for name, cn, ext in [
        ("server", "localhost",
         "subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\n"),
        ("client", "pf test client", "extendedKeyUsage=clientAuth\n"),
    ]:
        (c.dir / f"{name}.ext").write_text(ext)
        run("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={cn}",
            "-keyout", f"{name}.key", "-out", f"{name}.csr")
        run("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
            "-CAcreateserial", "-days", "2", "-extfile", f"{name}.ext", "-out", f"{name}.pem")
    run("genrsa", "-out", "other.key", "2048")
    return c




def tls_settings(certs: Certs, **tls: Any) -> dict[str, Any]:
    return settings(
        bind=[{"address": "127.0.0.1:0",
               "tls": {"certificate": str(certs.server_cert), "key": str(certs.server_key),
                       **tls}}],
        workers={"count": 1},
    )


def https_address(server: Server) -> Address:
    found = [a for a in server.addresses() if a[0] == "https"]
    assert found, f"no https address in the log\n{server.log_tail()}"
    return found[0]


def client_context(certs: Certs, *, with_cert: bool = False) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(certs.ca))
    if with_cert:
        context.load_cert_chain(str(certs.client_cert), str(certs.client_key))
    return context


def https_get(server: Server, context: ssl.SSLContext, target: str = "/") -> tuple[int, bytes]:
    """One GET over TLS with Connection: close; (status, body). EOFError if the server
    closes without answering."""
    _, host, port = https_address(server)
    with socket.create_connection((host, port), timeout=5) as raw, \
            context.wrap_socket(raw, server_hostname="localhost") as tls:
        tls.sendall(f"GET {target} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
                    .encode())
        data = b""
        while chunk := tls.recv(65536):
            data += chunk
    if not data:
        raise EOFError("the server closed the TLS connection without answering")
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), body


def test_https_listener_serves_with_curl_and_sets_the_scheme(
    server_factory: ServerFactory, certs: Certs
) -> None:
    curl = require_tool("curl")
    server = server_factory(tls_settings(certs))
    scheme, host, port = https_address(server)
    assert (scheme, host) == ("https", "127.0.0.1")
    assert f"listening at https://127.0.0.1:{port}" in server.log()

    # plain HTTP to the TLS port gets no HTTP answer, and costs the worker nothing
    with connect(https_address(server)) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n")
        assert b"HTTP/1.1" not in recv_until_close(sock, timeout=3)

    result = subprocess.run(
        [curl, "--silent", "--show-error", "--fail", "--max-time", "10",
         "--cacert", str(certs.ca), f"https://localhost:{port}/report?x=1",
         "--resolve", f"localhost:{port}:127.0.0.1"],
        capture_output=True, timeout=30,
    )
    assert result.returncode == 0, result.stderr.decode()
    document = json.loads(result.stdout)
    assert document["scheme"] == "https"
    assert document["https"] == "on"

    # an untrusted client (no CA) fails verification: the certificate really is the one given
    result = subprocess.run(
        [curl, "--silent", "--max-time", "10", f"https://127.0.0.1:{port}/"],
        capture_output=True, timeout=30,
    )
    assert result.returncode == 60, result  # CURLE_PEER_FAILED_VERIFICATION


def test_required_client_certificate(server_factory: ServerFactory, certs: Certs) -> None:
    server = server_factory(tls_settings(certs, ca=str(certs.ca), verify_client="required"))
    with pytest.raises((ssl.SSLError, ConnectionError, EOFError)):
        https_get(server, client_context(certs))
    status, body = https_get(server, client_context(certs, with_cert=True))
    assert status == 200
    assert json.loads(body)["scheme"] == "https"



BAD_TLS = """\
app: pf_features_app:report
pythonpath: [{apps}]
bind:
  - address: 127.0.0.1:0
    tls:
      certificate: {certificate}
      key: {key}
      ca: {ca}
"""


@pytest.mark.parametrize(
    ("case", "line", "key"),
    [
        pytest.param("missing-certificate", 6, "certificate"),
        ("missing-key", 7, "key"),
        ("mismatched-key", 7, "key"),
        pytest.param("missing-ca", 8, "ca"),
    ],
)
def test_unusable_tls_files_are_a_config_error_naming_file_line_and_key(
    server_factory: ServerFactory, certs: Certs, case: str, line: int, key: str
) -> None:
    files = {"certificate": certs.server_cert, "key": certs.server_key, "ca": certs.ca}
    if case.startswith("missing-"):
        files[key] = certs.dir / f"no-such-{key}.pem"
    else:
        files["key"] = certs.other_key
    text = BAD_TLS.format(apps=json.dumps(str(APPS)),
                          **{k: json.dumps(str(v)) for k, v in files.items()})
    server = server_factory(config_text=text, wait_ready=False)
    assert server.wait_exit() == 2
    log = server.log()
    assert f"{server.config}:{line}: bind[0].tls.{key}: " in log, log
    if case.startswith("missing-"):
        assert str(files[key]) in log
    assert no_listeners(server)


def test_silent_client_on_the_tls_port_neither_blocks_others_nor_stays_forever(
    server_factory: ServerFactory, certs: Certs
) -> None:
    header_timeout = 2.0
    server = server_factory({**tls_settings(certs), "http": {"header_timeout": header_timeout}})
    silent = connect(https_address(server))  # TCP only: never sends a ClientHello
    opened = time.monotonic()
    try:
        status, _ = https_get(server, client_context(certs))  # the only worker answers it
        assert status == 200
        assert time.monotonic() - opened < header_timeout
        silent.setblocking(False)
        with pytest.raises(BlockingIOError):
            silent.recv(1)  # still open: nothing sent, not closed
        silent.settimeout(None)
        # http.defer_accept is off by default: header_timeout runs from the connect
        limit = header_timeout
        assert recv_until_close(silent, timeout=limit + 5) == b""
        elapsed = time.monotonic() - opened
        assert header_timeout - 0.1 <= elapsed <= limit + 3, elapsed
    finally:
        silent.close()
    assert https_get(server, client_context(certs))[0] == 200


# --- development auto-reload ---------------------------------------------------------------------

VERSIONED_APP = """\
def app(environ, start_response):
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [{text!r}]
"""

CHANGED = re.compile(r"worker 1 \(pid (\d+)\): (\S+) changed; restarting to load it")


def test_reload_mode_serves_changed_code_a_traceback_page_and_the_fix(
    server_factory: ServerFactory,
) -> None:
    server = server_factory(
        {"app": "app:app", "workers": {"count": 1}},
        app_source=VERSIONED_APP.format(text=b"version one"),
        args=["--reload"],
    )
    app_py = server.workdir / "app.py"
    assert get(server).body == b"version one"
    [first] = server.worker_pids()

    since = len(server.log())
    rewrite(app_py, VERSIONED_APP.format(text=b"version two, edited"))
    change = server.wait_for_log(CHANGED, since=since)
    assert (int(change.group(1)), change.group(2)) == (first, str(app_py))
    response_when(server, 200, b"version two, edited")

    # a syntax error: the worker stays up and shows the traceback on every request
    since = len(server.log())
    rewrite(app_py, "def app(environ, start_response)\n    return []\n")
    server.wait_for_log(CHANGED, since=since)
    broken = response_when(server, 500)
    assert (broken.header("Content-Type") or "").startswith("text/plain")
    text = broken.body.decode()
    assert "the application could not be loaded" in text
    assert "SyntaxError" in text
    assert str(app_py) in text
    assert get(server).status == 500  # every request, not just the first
    assert server.running() and server.worker_pids()

    # fixing the file brings the app back
    since = len(server.log())
    rewrite(app_py, VERSIONED_APP.format(text=b"version three, fixed"))
    server.wait_for_log(CHANGED, since=since)
    response_when(server, 200, b"version three, fixed")


LAZY_APP = """\
import importlib

def app(environ, start_response):
    # as Django imports the URL configuration and the views at the first request
    views = importlib.import_module("views")
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [views.TEXT]
"""


def test_reload_mode_watches_a_module_the_first_request_imported(
    server_factory: ServerFactory,
) -> None:
    """Defect: the worker watched the files of the modules imported when it booted, and
    never those imported later: editing a Django view (imported with the URL configuration
    at the first request) changed nothing until a restart. gunicorn's --reload, like
    Django's runserver, looks at sys.modules again every second."""
    server = server_factory(
        {"app": "app:app", "workers": {"count": 1}}, app_source=LAZY_APP, args=["--reload"],
        wait_ready=False,
    )
    views_py = server.workdir / "views.py"
    views_py.write_text("TEXT = b'version one'\n")
    server.wait_ready()
    assert get(server).body == b"version one"

    since = len(server.log())
    rewrite(views_py, "TEXT = b'version two, edited'\n")
    change = server.wait_for_log(CHANGED, since=since)
    assert change.group(2) == str(views_py)
    response_when(server, 200, b"version two, edited")


def test_reload_extra_files_trigger_a_restart(server_factory: ServerFactory) -> None:
    source = (
        "from pathlib import Path\n"
        "TEMPLATE = (Path(__file__).parent / 'template.txt').read_text()\n"
        "def app(environ, start_response):\n"
        "    start_response('200 OK', [('Content-Type', 'text/plain')])\n"
        "    return [TEMPLATE.encode()]\n"
    )
    server = server_factory(
        {"app": "app:app", "reload": True, "reload_extra_files": ["template.txt"],
         "workers": {"count": 1}},
        app_source=source,
        wait_ready=False,
    )
    (server.workdir / "template.txt").write_text("first template")
    server.wait_ready()
    assert get(server).body == b"first template"

    since = len(server.log())
    rewrite(server.workdir / "template.txt", "second template, longer")
    change = server.wait_for_log(CHANGED, since=since)
    assert change.group(2) == str(server.workdir / "template.txt")
    response_when(server, 200, b"second template, longer")
