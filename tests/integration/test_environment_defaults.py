"""Settings gunicorn takes from its environment, against a real preforkd: SCRIPT_NAME mounts
the application (as `SCRIPT_NAME=/app gunicorn ...` does) unless the file says otherwise, and
a bad one stops the start, named. The app is apps/pf_testapp.py (`/environ` echoes keys)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from harness import REPO_ROOT, ServerFactory, address, fetch, settings, write_config


def test_script_name_in_the_environment_mounts_the_application(
    server_factory: ServerFactory,
) -> None:
    server = server_factory(settings(bind=["127.0.0.1:0"]), env={"SCRIPT_NAME": "/app"})
    where = address(server)
    inside = fetch(where, target="/app/environ?x=1")
    assert inside.status == 200, inside
    seen = json.loads(inside.body)
    assert (seen["SCRIPT_NAME"], seen["PATH_INFO"]) == ("/app", "/environ")
    assert fetch(where, target="/environ").status == 400  # outside the mount, as gunicorn


def test_the_files_script_name_wins_over_the_environment(server_factory: ServerFactory) -> None:
    server = server_factory(
        settings(bind=["127.0.0.1:0"], http={"script_name": "/site"}),
        env={"SCRIPT_NAME": "/app"},
    )
    seen = json.loads(fetch(address(server), target="/site/environ").body)
    assert (seen["SCRIPT_NAME"], seen["PATH_INFO"]) == ("/site", "/environ")


def test_a_bad_script_name_in_the_environment_stops_the_start(tmp_path: Path) -> None:
    config = write_config(tmp_path, settings(bind=["127.0.0.1:0"]))
    done = subprocess.run(
        [sys.executable, "-m", "prefork", "-c", str(config)],
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO_ROOT), "SCRIPT_NAME": "app/"},
        capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL,
    )
    assert done.returncode == 2, done.stdout + done.stderr
    assert "configuration error: SCRIPT_NAME: must be" in done.stderr, done.stderr
