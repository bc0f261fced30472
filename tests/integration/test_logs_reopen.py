"""USR1 after a logrotate-style rotation (rename the files, signal the master), against a
real preforkd whose workers run as another user.

The master (root) creates the new files and gives them to the workers' user before it tells
the workers to reopen them by path; the log directory is writable by root only, as
/var/log/app would be, so a worker can only reopen a file the master made for it. The app is
apps/pf_testapp.py (`/` answers with the worker's pid).
"""

from __future__ import annotations

import os
import pwd
import re
import signal
import stat
from pathlib import Path
from typing import Any

import psutil
import pytest

from harness import (
    Address,
    Server,
    ServerFactory,
    fetch,
    parse_addresses,
    settings,
    wait_until,
    write_config,
)

READY_RE = re.compile(r"\[INFO\] ready: 1 workers?")
RELOAD_DONE_RE = re.compile(
    r"\] (reloaded: generation \d+ serving with \d+ workers?|reload failed.*)"
)
# Explicit, so the mode of a file the server creates is known whatever the test's umask.
UMASK = 0o022
UMASK_SETTING = "022"  # the configuration reads modes as octal text
ACCESS_MODE = 0o666 & ~UMASK  # as open(path, "a") creates it
ERROR_MODE = 0o640


def needs_root() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to run the workers as another user")


def text(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except FileNotFoundError:
        return ""


def wait_for_text(
    server: Server,
    path: Path,
    pattern: str | re.Pattern[str],
    timeout: float = 10.0,
    *,
    since: int = 0,
) -> re.Match[str]:
    """Wait until `path` (from offset `since`) has `pattern`; fail at once if the server
    exited without writing it."""
    regex = re.compile(re.escape(pattern)) if isinstance(pattern, str) else pattern

    def found() -> re.Match[str] | None:
        exited = not server.running()  # checked before reading: no line can be missed
        match = regex.search(text(path), since)
        if match is None and exited:
            raise AssertionError(f"preforkd exited\n{server.log_tail()}\n{path}: {text(path)}")
        return match

    match = wait_until(found, timeout, message=f"{regex.pattern!r} not in {path}")
    assert match is not None  # wait_until returns only a truthy value
    return match


def root_only_dir(short_tmp: Path) -> Path:
    """A log directory like /var/log/app: root's, 0755. The workers can reach the files in it
    but not create any."""
    short_tmp.chmod(0o755)  # the short_tmp itself is 0700: the workers could reach nothing
    logs = short_tmp / "log"
    logs.mkdir()
    logs.chmod(0o755)
    assert logs.stat().st_uid == 0
    return logs


def start(
    server_factory: ServerFactory, error_log: Path, access_log: Path, **more: Any
) -> tuple[Server, Address]:
    """A one-worker server logging to files; returns once the error log says it is ready."""
    server = server_factory(
        settings(
            workers={"count": 1},
            umask=UMASK_SETTING,
            logging={"error_log": str(error_log), "access_log": str(access_log)},
            **more,
        ),
        wait_ready=False,
    )
    wait_for_text(server, error_log, READY_RE, 15)
    (where,) = parse_addresses(text(error_log))
    return server, where


def worker_uids(server: Server) -> set[int]:
    return {psutil.Process(pid).uids().effective for pid in server.worker_pids()}


def assert_owned(path: Path, user: pwd.struct_passwd, mode: int) -> None:
    st = path.stat()
    assert (st.st_uid, st.st_gid) == (user.pw_uid, user.pw_gid), f"{path} owner"
    assert stat.S_IMODE(st.st_mode) == mode, f"{path} mode {oct(st.st_mode)}"


def rotate(*paths: Path) -> list[Path]:
    """`mv X X.1` for each, as logrotate does (without copytruncate)."""
    rotated = []
    for path in paths:
        moved = path.with_name(path.name + ".1")
        path.rename(moved)
        rotated.append(moved)
    return rotated


def rotate_and_reopen(
    server: Server, where: Address, error_log: Path, access_log: Path, owner: pwd.struct_passwd
) -> tuple[Path, Path]:
    """Rotate both logs, USR1, and check the new files: the workers' owner, the usual modes,
    and the next request's line in the new access log. The rotated paths."""
    old_error, old_access = rotate(error_log, access_log)
    server.signal(signal.SIGUSR1)
    wait_for_text(server, error_log, "USR1: log files reopened", 5)
    assert_owned(error_log, owner, ERROR_MODE)
    assert_owned(access_log, owner, ACCESS_MODE)
    wait_access_line(where, access_log, "/after-usr1")
    return old_error, old_access


def wait_access_line(where: Address, access_log: Path, target: str) -> None:
    """Request `target` until its access line is in `access_log`. Repeated: the worker reopens
    when it reads the master's message, which may be just after the first request."""

    def landed() -> bool:
        assert fetch(where, "GET", target).status == 200
        return f"GET {target} HTTP/1.1" in text(access_log)

    wait_until(landed, 5, interval=0.1,
               message=f"no access line for {target} in the reopened {access_log}")


def test_workers_running_as_nobody_reopen_the_files_the_master_rotated_in(
    server_factory: ServerFactory, short_tmp: Path
) -> None:
    needs_root()
    nobody = pwd.getpwnam("nobody")
    logs = root_only_dir(short_tmp)
    error_log, access_log = logs / "error.log", logs / "access.log"
    # An access log left by an earlier run, root's, with a mode of its own: given to the
    # workers' user at start, mode kept.
    access_log.touch()
    access_log.chmod(0o600)
    server, where = start(server_factory, error_log, access_log, user="nobody")
    assert worker_uids(server) == {nobody.pw_uid}
    assert_owned(error_log, nobody, ERROR_MODE)
    assert_owned(access_log, nobody, 0o600)
    assert fetch(where, "GET", "/before-usr1").status == 200
    wait_for_text(server, access_log, "GET /before-usr1 HTTP/1.1", 5)

    old_error, old_access = rotate_and_reopen(server, where, error_log, access_log, nobody)
    assert fetch(where, "GET", "/last").status == 200
    wait_for_text(server, access_log, "GET /last HTTP/1.1", 5)
    assert "/last" not in text(old_access)
    assert "/before-usr1" in text(old_access)
    for path in (error_log, old_error):
        assert "cannot reopen" not in text(path), text(path)
        assert "cannot give" not in text(path), text(path)
    assert server.running()


def test_each_log_file_is_reopened_even_when_the_other_cannot_be(
    server_factory: ServerFactory, tmp_path: Path
) -> None:
    """The error log's directory is gone (renamed): that reopen fails, and says which file;
    the access log is reopened all the same."""
    error_dir, access_dir = tmp_path / "errors", tmp_path / "access"
    error_dir.mkdir()
    access_dir.mkdir()
    error_log, access_log = error_dir / "error.log", access_dir / "access.log"
    server, where = start(server_factory, error_log, access_log)
    assert fetch(where, "GET", "/before-usr1").status == 200
    wait_for_text(server, access_log, "GET /before-usr1 HTTP/1.1", 5)

    error_dir.rename(tmp_path / "errors.rotated")
    old_error = tmp_path / "errors.rotated" / "error.log"
    (old_access,) = rotate(access_log)
    server.signal(signal.SIGUSR1)

    wait_for_text(server, old_error, f"cannot reopen the log files: error log {error_log}: ", 5)
    wait_access_line(where, access_log, "/after-usr1")  # the worker has reopened by now
    assert fetch(where, "GET", "/last").status == 200
    wait_for_text(server, access_log, "GET /last HTTP/1.1", 5)
    assert "/last" not in text(old_access)
    assert "cannot reopen the log files: access log" not in text(old_error)
    assert not error_dir.exists()
    assert server.running()


def test_after_a_reload_to_another_user_the_new_files_are_that_users(
    server_factory: ServerFactory, short_tmp: Path
) -> None:
    """`user` changed by a reload: the files made on the next USR1 are the new user's, whose
    workers must reopen them."""
    needs_root()
    nobody, daemon = pwd.getpwnam("nobody"), pwd.getpwnam("daemon")
    logs = root_only_dir(short_tmp)
    error_log, access_log = logs / "error.log", logs / "access.log"
    server, where = start(server_factory, error_log, access_log, user="nobody")
    assert worker_uids(server) == {nobody.pw_uid}

    write_config(
        server.workdir,
        settings(
            workers={"count": 1},
            umask=UMASK_SETTING,
            logging={"error_log": str(error_log), "access_log": str(access_log)},
            user="daemon",
        ),
    )
    since = len(text(error_log))
    server.signal(signal.SIGHUP)
    outcome = wait_for_text(server, error_log, RELOAD_DONE_RE, 20, since=since).group(1)
    assert outcome.startswith("reloaded"), outcome
    wait_until(lambda: worker_uids(server) == {daemon.pw_uid}, 10,
               message="the workers do not run as daemon after the reload",
               ignore=(psutil.NoSuchProcess,))  # an old worker exiting as it is looked at

    old_error, _ = rotate_and_reopen(server, where, error_log, access_log, daemon)
    for path in (error_log, old_error):
        assert "cannot reopen" not in text(path), text(path)
