"""touch_reload and touch_logreopen (uWSGI's touch-reload, touch-logreopen) on a real server:
the deploy touches a file, and a new generation of workers serves the new code; a reload
that fails keeps the old one; the logs reopen after a rotation.

Every test waits for the master's own log lines (bounded), never for a guessed interval: the
master looks at the files once a second.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from harness import Address, Server, ServerFactory, address, fetch, parse_addresses, wait_until

APP = """
import os

VERSION = "v1"

def application(environ, start_response):
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [f"{VERSION} {os.getpid()}".encode()]
"""

# The application is rewritten within a second of its first import: no stale .pyc.
NO_PYC = {"PYTHONDONTWRITEBYTECODE": "1"}
RELOAD_DONE = re.compile(r"\] (reloaded: generation \d+ serving with \d+ workers?|reload failed.*)")


def settings(**more: object) -> dict[str, object]:
    return {"app": "app:application", "workers": {"count": 2}, **more}


def answer(server: Server) -> tuple[str, int]:
    """The version and the pid of the worker that answered a GET /."""
    response = fetch(address(server))
    assert response.status == 200, response
    version, pid = response.body.decode().split()
    return version, int(pid)


def replaced(server: Server, old: set[int]) -> set[int]:
    """Wait until 2 workers serve and none of them is in `old`; return their pids."""

    def check() -> set[int]:
        pids = set(server.worker_pids())
        return pids if len(pids) == 2 and not pids & old else set()

    return wait_until(check, 15, message=f"workers {sorted(old)} were not all replaced")


def reload_outcome(server: Server, since: int) -> str:
    return server.wait_for_log(RELOAD_DONE, 20, since=since).group(1)


@pytest.mark.parametrize("preload", [False, True], ids=["workers-import", "preload"])
def test_a_touch_serves_the_new_code_from_new_workers(
    server_factory: ServerFactory, tmp_path: Path, preload: bool
) -> None:
    trigger = tmp_path / "deploy" / "reload.txt"
    trigger.parent.mkdir()
    trigger.write_text("")
    server = server_factory(
        settings(touch_reload=str(trigger), preload_app=preload), app_source=APP, env=NO_PYC
    )
    old = set(server.worker_pids())
    assert answer(server)[0] == "v1"
    app = server.workdir / "app.py"
    app.write_text(APP.replace('"v1"', '"v2"'))
    assert answer(server)[0] == "v1"  # a new file alone changes nothing

    since = len(server.log())
    trigger.touch()

    server.wait_for_log(f"[INFO] touch_reload: {trigger} modified: reloading", 10, since=since)
    assert reload_outcome(server, since) == "reloaded: generation 2 serving with 2 workers"
    new = replaced(server, old)
    version, pid = answer(server)
    assert version == "v2" and pid in new
    assert server.log().count("touch_reload:") == 1  # the first look, at start, was silent


def test_a_touch_whose_reload_fails_keeps_the_old_workers(
    server_factory: ServerFactory, tmp_path: Path
) -> None:
    trigger = tmp_path / "reload.txt"
    trigger.write_text("")
    server = server_factory(settings(touch_reload=[str(trigger)]), app_source=APP, env=NO_PYC)
    old = set(server.worker_pids())
    good = server.config.read_text()
    server.config.write_text(good + "logging: level: info\n")  # 'mapping values not allowed'

    since = len(server.log())
    trigger.touch()

    outcome = reload_outcome(server, since)
    assert outcome.startswith(f"reload failed: {server.config}:"), outcome
    assert outcome.endswith("still serving generation 1")
    assert f"touch_reload: {trigger} modified: reloading" in server.log()[since:]
    assert set(server.worker_pids()) == old
    assert answer(server)[1] in old

    server.config.write_text(good)  # fixed: the next touch reloads
    since = len(server.log())
    trigger.touch()
    assert reload_outcome(server, since).startswith("reloaded: generation 2")
    replaced(server, old)


def test_a_file_created_later_reloads_once(server_factory: ServerFactory, tmp_path: Path) -> None:
    trigger = tmp_path / "later" / "reload.txt"
    marker = tmp_path / "marker"
    marker.write_text("")
    server = server_factory(
        settings(touch_reload=[str(trigger)], touch_logreopen=[str(marker)]), app_source=APP
    )
    assert (
        f"[INFO] touch_reload: {trigger} does not exist; its creation will count as a touch"
        in server.log()
    )
    old = set(server.worker_pids())

    since = len(server.log())
    trigger.parent.mkdir()
    trigger.write_text("")

    server.wait_for_log(f"touch_reload: {trigger} created: reloading", 10, since=since)
    assert reload_outcome(server, since).startswith("reloaded: generation 2")
    replaced(server, old)
    # the marker's change is found by a later look, which looked at the trigger too
    marker.touch()
    server.wait_for_log(f"touch_logreopen: {marker} modified: log files reopened", 10,
                        since=since)
    assert server.log().count("reloading") == 1, server.log_tail()

    trigger.unlink()  # said once, no reload
    server.wait_for_log(f"[WARNING] touch_reload: {trigger} does not exist now", 10,
                        since=since)
    since = len(server.log())
    marker.touch()
    server.wait_for_log("log files reopened", 10, since=since)
    assert "reloading" not in server.log()[since:]
    assert server.log().count("does not exist now") == 1


def test_a_touch_reopens_the_rotated_logs(server_factory: ServerFactory, tmp_path: Path) -> None:
    marker = tmp_path / "rotate"
    marker.write_text("")
    error_log, access_log = tmp_path / "error.log", tmp_path / "access.log"
    server_factory(
        settings(
            touch_logreopen=str(marker),
            logging={"error_log": str(error_log), "access_log": str(access_log)},
        ),
        app_source=APP,
        wait_ready=False,
    )
    wait_until(lambda: error_log.exists() and "ready: 2 workers" in error_log.read_text(), 15,
               message="the server did not get ready")
    listening = address_of(error_log)
    error_log.rename(tmp_path / "error.log.1")
    access_log.rename(tmp_path / "access.log.1")

    marker.touch()

    wait_until(
        lambda: error_log.exists()
        and f"touch_logreopen: {marker} modified: log files reopened" in error_log.read_text(),
        10,
        message=f"no new error log saying it was reopened; the old one:\n"
        f"{(tmp_path / 'error.log.1').read_text()[-2000:]}",
    )

    def logged_in_the_new_file() -> bool:
        fetch(listening)
        return access_log.exists() and '"GET / HTTP/1.1" 200' in access_log.read_text()

    wait_until(logged_in_the_new_file, 10, message="no access line in the new access log")
    assert "reloading" not in (tmp_path / "error.log.1").read_text() + error_log.read_text()


def address_of(error_log: Path) -> Address:
    """The first address an error log in a file says the server listens at."""
    found = parse_addresses(error_log.read_text())
    assert found, error_log.read_text()
    return found[0]


def test_a_touch_while_the_master_imports_the_application_reloads_once_serving(
    server_factory: ServerFactory, tmp_path: Path
) -> None:
    """The first look is taken before a preloaded application is imported: a deploy that
    touches while a (re)started master imports the old code gets its reload."""
    trigger, once = tmp_path / "reload.txt", tmp_path / "touched-once"
    trigger.write_text("")
    app = APP + f"""
if not os.path.exists({str(once)!r}):  # the first import only: not the reload's again
    open({str(once)!r}, "w").close()
    os.utime({str(trigger)!r})
"""
    server = server_factory(
        settings(touch_reload=str(trigger), preload_app=True), app_source=app, env=NO_PYC
    )
    server.wait_for_log(f"touch_reload: {trigger} modified: reloading", 10)
    assert reload_outcome(server, 0) == "reloaded: generation 2 serving with 2 workers"
