"""Detached preforkd daemons for integration tests: run the launcher (`python -m prefork`) to
completion, find the masters it leaves behind, and stop them.

A detached daemon leaves the test's process group and session, so `Daemons` stops it through
the pid in its pidfile (SIGTERM, then SIGKILL to the daemon's own process group); the
`daemons` fixture in conftest.py does that whatever the test did.
"""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
from pathlib import Path
from typing import Any

import psutil

from harness import (
    DEFAULT_COMMAND,
    REPO_ROOT,
    kill_group,
    live_group_members,
    settings,
    wait_until,
    write_config,
)

# Variables that make preforkd believe it runs under systemd (and so never detach).
SYSTEMD_VARIABLES = (
    "NOTIFY_SOCKET",
    "INVOCATION_ID",
    "WATCHDOG_USEC",
    "WATCHDOG_PID",
    "LISTEN_FDS",
    "LISTEN_PID",
    "LISTEN_FDNAMES",
)
LAUNCH_TIMEOUT = 30.0


def preforkd_env(**extra: str) -> dict[str, str]:
    """The environment for a `python -m prefork` command: the work tree's package, no pyc
    files (app modules are rewritten within one second), and no systemd variables."""
    env = {k: v for k, v in os.environ.items() if k not in SYSTEMD_VARIABLES}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    env.update(extra)
    return env


def preforkd(
    *args: str, timeout: float = LAUNCH_TIMEOUT, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run `python -m prefork ARGS` to completion (a daemon's launcher, `reload`, ...), with
    `env` added to its environment."""
    try:
        return subprocess.run(
            [*DEFAULT_COMMAND, *args],
            env=preforkd_env(**(env or {})),
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired as exc:
        raise AssertionError(
            f"`preforkd {' '.join(args)}` did not exit within {timeout:g}s; "
            f"stdout={exc.stdout!r} stderr={exc.stderr!r}"
        ) from None


def read_pid(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except FileNotFoundError:
        return None
    return int(text) if text.isdigit() else None


def alive(process: int | psutil.Process) -> bool:
    """Running and not a zombie (a detached daemon is reaped by init, not by us)."""
    try:
        if isinstance(process, int):
            process = psutil.Process(process)
        return bool(process.is_running() and process.status() != psutil.STATUS_ZOMBIE)
    except psutil.NoSuchProcess:
        return False


class Daemons:
    """Detached masters a test started. `stop_all` (the fixture's teardown) stops each one
    found in a watched pidfile or adopted by pid: SIGTERM, then SIGKILL to its group."""

    def __init__(self) -> None:
        self.pidfiles: list[Path] = []
        self.processes: dict[int, tuple[psutil.Process, int]] = {}  # pid -> (process, pgid)

    def watch(self, pidfile: Path) -> None:
        self.pidfiles.append(pidfile)

    def adopt(self, pid: int) -> None:
        """Remember a daemon master; psutil's identity check (pid + start time) makes a later
        signal safe even if the pid was reused."""
        if pid in self.processes:
            return
        try:
            process = psutil.Process(pid)
            if b"prefork" not in Path(f"/proc/{pid}/cmdline").read_bytes():
                return
            self.processes[pid] = (process, os.getpgid(pid))
        except (psutil.NoSuchProcess, OSError):
            return

    def launch(
        self, config: Path, *args: str, env: dict[str, str] | None = None
    ) -> subprocess.CompletedProcess[str]:
        """Run the launcher; adopt whatever master the pidfiles (or, if the launcher gave
        up early, the `detached:` line of the error log beside `config`) name afterwards."""
        try:
            return preforkd("-c", str(config), *args, env=env)
        finally:
            for pidfile in self.pidfiles:
                pid = read_pid(pidfile)
                if pid is not None:
                    self.adopt(pid)
            error_log = config.parent / "error.log"
            if error_log.exists():
                for found in re.finditer(r"detached: master pid (\d+)", error_log.read_text()):
                    self.adopt(int(found.group(1)))

    def stop_all(self) -> None:
        for pidfile in self.pidfiles:
            pid = read_pid(pidfile)
            if pid is not None:
                self.adopt(pid)
        errors: list[AssertionError] = []
        for process, pgid in self.processes.values():
            with contextlib.suppress(psutil.NoSuchProcess):
                process.terminate()  # refused if the pid now belongs to someone else
            try:
                # Exited counts as a zombie too: init reaps detached processes when it likes.
                wait_until(
                    lambda p=process: not alive(p),
                    10,
                    message=f"daemon {process.pid} ignored SIGTERM",
                )
            except AssertionError as exc:
                errors.append(exc)
            if live_group_members(pgid):
                kill_group(pgid)
            wait_until(
                lambda g=pgid: not live_group_members(g),
                5,
                message=f"daemon process group {pgid} left processes behind",
            )
        if errors:
            raise errors[0]


def launch_daemon(daemons: Daemons, directory: Path, **more: Any) -> tuple[Path, int]:
    """Start a detached daemon (pidfile and error log in `directory`); return its config and
    master pid. The launcher's stdout and stderr are files, not pipes, so that waiting for it
    does not depend on who else holds them open (see test_the_daemon_does_not_keep_...)."""
    pidfile = directory / "preforkd.pid"
    config = write_config(
        directory,
        settings(
            daemon=True,
            pidfile=str(pidfile),
            logging={"error_log": str(directory / "error.log")},
            **more,
        ),
    )
    daemons.watch(pidfile)  # the fixture stops it by this pid (TERM, then KILL its group)
    out, err = directory / "launcher.out", directory / "launcher.err"
    with out.open("wb") as stdout, err.open("wb") as stderr:
        launcher = subprocess.run(
            [*DEFAULT_COMMAND, "-c", str(config)],
            env=preforkd_env(),
            stdin=subprocess.DEVNULL,
            stdout=stdout,
            stderr=stderr,
            timeout=LAUNCH_TIMEOUT,
        )
    output = out.read_text() + err.read_text()
    assert launcher.returncode == 0, output + (directory / "error.log").read_text()
    master = read_pid(pidfile)
    assert master is not None, output
    return config, master
