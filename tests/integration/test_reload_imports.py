"""What a reload imports in the master (hook modules, and what they import; with
preload_app the application): an import that calls sys.exit() fails the reload instead of
ending the master, and a reload abandoned after its import leaves the old generation's code
to the workers the old generation still forks."""

from __future__ import annotations

import os
import signal
from pathlib import Path

from harness import Server, ServerFactory, fetch, wait_until

APP = r'''
import os, sys
VERSION = b"v1"
if os.path.exists(os.environ["PF_EXIT_FLAG"]):
    sys.exit("settings missing")  # a settings module that refuses to start
def app(environ, start_response):
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [VERSION]
'''
HOOKS = "import app\ndef post_fork(server, worker):\n    pass\n"
BROKEN_HOOKS = "import app\ndef post_fork(server, worker):\n    raise RuntimeError('broken')\n"


def start(server_factory: ServerFactory, tmp_path: Path, **more: object) -> Server:
    return server_factory(
        {
            "app": "app:app",
            "workers": {"count": 1},
            "env": {"PF_EXIT_FLAG": str(tmp_path / "exit-flag")},
            "pythonpath": [str(tmp_path)],
            "hooks": {"post_fork": "myhooks:post_fork"},
            **more,
        },
        app_source=APP,
    )


def body(server: Server) -> bytes:
    return fetch(server.addresses()[0], timeout=5).body


def test_an_import_that_exits_at_a_reload_fails_the_reload(
    server_factory: ServerFactory, tmp_path: Path
) -> None:
    """The hook module imports the application, which calls sys.exit() at import once its
    settings are gone: the HUP re-imported it in the master, and the SystemExit ended the
    master and the whole server. Now the reload fails, saying why, and the server serves."""
    (tmp_path / "myhooks.py").write_text(HOOKS)
    for preload in (False, True):
        server = start(server_factory, tmp_path, preload_app=preload)
        (tmp_path / "exit-flag").write_text("")
        since = len(server.log())
        server.signal(signal.SIGHUP)
        server.wait_for_log("reload failed", since=since)
        assert "settings missing" in server.log()[since:]
        assert server.running(), f"the master exited (preload_app: {preload})"
        assert body(server) == b"v1"
        (tmp_path / "exit-flag").unlink()
        server.stop()


def test_an_abandoned_reload_leaves_the_old_code_to_the_old_generation(
    server_factory: ServerFactory, tmp_path: Path
) -> None:
    """v2 of the application comes with a hook that fails in the new worker: the reload is
    abandoned after the master imported v2 (the hook module imports the app). A worker the
    old generation starts afterwards (here after a crash) must serve v1, not the code whose
    reload failed."""
    hooks = tmp_path / "myhooks.py"
    hooks.write_text(HOOKS)
    server = start(server_factory, tmp_path)
    assert body(server) == b"v1"
    app_file = next(server.workdir.glob("app.py"))
    app_file.write_text(APP.replace('b"v1"', 'b"v2!"'))  # another size: no stale bytecode
    hooks.write_text(BROKEN_HOOKS)
    since = len(server.log())
    server.signal(signal.SIGHUP)
    server.wait_for_log("still serving generation 1", since=since, timeout=20)
    (old,) = server.worker_pids()
    os.kill(old, signal.SIGKILL)
    wait_until(lambda: len([p for p in server.worker_pids() if p != old]) == 1, 15,
               message="the crashed worker was not replaced")
    assert body(server) == b"v1"
