"""logging.capture_output: standard output follows the error log file (gunicorn's
capture_output), against a real detached daemon: what the application prints at import and
per request, and an access log on "-", land in the error log; a rotation (USR1) and a reload
that moves the error log take standard output along; without it, a daemon's stdout is
/dev/null as before. The app is inline (PRINT_APP)."""

from __future__ import annotations

import os
import signal
from pathlib import Path

from detached import Daemons, preforkd, read_pid
from harness import ServerFactory, address, fetch, parse_addresses, wait_until, write_config

PRINT_APP = """
import os
import sys

print("imported in", os.getpid())


def application(environ, start_response):
    print("printed for", environ["PATH_INFO"])
    sys.stdout.write("half a line, ")  # line-buffered: written with its end, as one line
    sys.stdout.write("then its end\\n")
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [str(os.getpid()).encode()]
"""


def text(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except FileNotFoundError:
        return ""


def start(daemons: Daemons, directory: Path, **logging: object) -> tuple[Path, int, tuple]:
    """A detached daemon running PRINT_APP with `logging` settings; its config, master pid
    and address."""
    (directory / "printapp.py").write_text(PRINT_APP)
    pidfile = directory / "preforkd.pid"
    config = write_config(directory, {
        "app": "printapp:application",
        "pythonpath": [str(directory)],
        "bind": ["127.0.0.1:0"],
        "workers": {"count": 1},
        "daemon": True,
        "pidfile": str(pidfile),
        "logging": {"error_log": str(directory / "error.log"), **logging},
    })
    daemons.watch(pidfile)
    launched = daemons.launch(config)
    assert launched.returncode == 0, launched.stdout + launched.stderr + text(
        directory / "error.log")
    master = read_pid(pidfile)
    assert master is not None
    wait_until(lambda: "ready: 1 worker" in text(directory / "error.log"), 15,
               message="the daemon is not ready")
    return config, master, parse_addresses(text(directory / "error.log"))[0]


def wait_for(path: Path, needle: str, timeout: float = 10.0) -> None:
    wait_until(lambda: needle in text(path), timeout,
               message=f"{needle!r} not in {path}: {text(path)[-2000:]}")


def test_what_a_daemon_prints_lands_in_its_error_log_and_follows_a_rotation(
    daemons: Daemons, tmp_path: Path
) -> None:
    error_log = tmp_path / "error.log"
    _, master, address = start(daemons, tmp_path, capture_output=True, access_log="-")
    wait_for(error_log, "imported in ")
    worker = fetch(address, target="/first").body.decode()
    wait_for(error_log, "printed for /first\nhalf a line, then its end\n")
    wait_for(error_log, '"GET /first HTTP/1.1" 200')  # the access log on "-" is stdout
    assert f"imported in {worker}" in text(error_log)

    error_log.rename(tmp_path / "error.log.1")
    lines_before = text(tmp_path / "error.log.1")
    os.kill(master, signal.SIGUSR1)  # the master reopens, then tells the worker to
    wait_for(error_log, "log files reopened")
    # the worker reopens when it reads the master's message, between requests: ask until
    # a request's lines land in the new file
    wait_until(
        lambda: fetch(address, target="/second") and "printed for /second" in text(error_log),
        10, interval=0.1, message="stdout did not follow the reopened error log",
    )
    assert text(tmp_path / "error.log.1").startswith(lines_before)
    assert "then its end" in lines_before


def test_a_reload_that_moves_the_error_log_moves_standard_output_with_it(
    daemons: Daemons, tmp_path: Path
) -> None:
    config, master, address = start(daemons, tmp_path, capture_output=True)
    moved = tmp_path / "moved.log"
    config.write_text(config.read_text().replace(str(tmp_path / "error.log"), str(moved)))
    result = preforkd("reload", "-c", str(config), "--wait", "30")
    assert result.returncode == 0, result.stdout + result.stderr
    fetch(address, target="/after")
    wait_for(moved, "printed for /after")
    assert "printed for /after" not in text(tmp_path / "error.log")
    assert read_pid(tmp_path / "preforkd.pid") == master


def test_capture_output_is_read_at_start_only(daemons: Daemons, tmp_path: Path) -> None:
    config, _, address = start(daemons, tmp_path, capture_output=True)
    config.write_text(config.read_text().replace("capture_output: true",
                                                 "capture_output: false"))
    result = preforkd("reload", "-c", str(config), "--wait", "30")
    assert result.returncode == 0, result.stdout + result.stderr
    wait_for(tmp_path / "error.log", "logging.capture_output changed; the running server "
             "keeps the old value until it is restarted")
    fetch(address, target="/kept")
    wait_for(tmp_path / "error.log", "printed for /kept")


def test_without_it_a_daemon_prints_nowhere(daemons: Daemons, tmp_path: Path) -> None:
    error_log = tmp_path / "error.log"
    _, _, address = start(daemons, tmp_path)
    fetch(address, target="/lost")
    wait_for(error_log, "worker 1 (pid")
    # the request's own lines would be in the file by the time the worker has answered:
    # it wrote them (line-buffered or not, a daemon's stdout is /dev/null) before returning
    assert "printed for" not in text(error_log)
    assert "imported in" not in text(error_log)


def test_capture_output_with_error_log_on_stderr_leaves_stdout_as_it_is(
    server_factory: ServerFactory,
) -> None:
    """gunicorn takes capture_output with errorlog "-" and leaves stdout alone; a config
    moved over with both was refused ("needs logging.error_log to be a file") and did not
    start. Now it starts, and what the application prints goes where it went without it."""
    server = server_factory(
        {"app": "printapp:application", "workers": {"count": 1},
         "logging": {"error_log": "-", "capture_output": True}},
        app_source=PRINT_APP, module="printapp",
    )
    assert fetch(address(server), target="/shown").status == 200
    wait_until(lambda: "printed for /shown" in server.stdout(), 10,
               message=f"not on stdout: {server.stdout()[-2000:]}")
    assert "half a line, then its end" in server.stdout()
    assert "printed for" not in server.log()
