"""Running preforkd as a service: daemon mode and its launcher, the pidfile, privilege drop,
umask, the systemd units, the sd_notify protocol and `preforkd reload`.

A detached daemon leaves the test's process group and session, so the `daemons` fixture
stops it through the pid in its pidfile (SIGTERM, then SIGKILL to the daemon's own process
group) whatever the test did. Daemons log to a file beside their configuration.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

import psutil
import pytest

from detached import Daemons, alive, preforkd, read_pid
from harness import (
    DEFAULT_COMMAND,
    PID_APP,
    REPO_ROOT,
    Server,
    ServerFactory,
    fetch,
    live_group_members,
    parse_addresses,
    wait_until,
    write_config,
)
from prefork.config import WorkersConfig

BROKEN_APP = """
raise RuntimeError("pf-service: this app refuses to import")
"""

# Creates a file at import time, so a test can read the mode the umask gave it.
UMASK_PROBE_APP = """
import os

with open(os.path.join(os.path.dirname(os.path.abspath(__file__)),
                       "probe-%d" % os.getpid()), "w") as f:
    f.write("x")

def application(environ, start_response):
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [str(os.getpid()).encode()]
"""

NOBODY = 65534  # uid of `nobody` and gid of `nogroup` on Debian
ANONYMOUS = 4242  # in neither /etc/passwd nor /etc/group


# --- helpers ---------------------------------------------------------------------------------


def ids(pid: int, name: str) -> list[int]:
    """The `Uid:` or `Gid:` line of /proc/PID/status: real, effective, saved, filesystem."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key == name:
            return [int(field) for field in value.split()]
    raise AssertionError(f"no {name} line in /proc/{pid}/status")


def children(pid: int) -> list[int]:
    try:
        return sorted(
            child.pid
            for child in psutil.Process(pid).children()
            if child.status() != psutil.STATUS_ZOMBIE
        )
    except psutil.NoSuchProcess:
        return []


def http_address(log_text: str) -> tuple[Any, ...]:
    for address in parse_addresses(log_text):
        if address[0] == "http":
            return address
    raise AssertionError(f"no http address in the log:\n{log_text}")


def daemon_config(directory: Path, app_source: str = PID_APP, **settings: Any) -> Path:
    """A daemon's config: pidfile and error log beside it (absolute after detaching)."""
    base: dict[str, Any] = {
        "app": "app:application",
        "daemon": True,
        "pidfile": str(directory / "preforkd.pid"),
        "logging": {"error_log": str(directory / "error.log")},
        "workers": {"count": 2},
    }
    base.update(settings)
    return write_config(directory, base, app_source=app_source)


def launch_ok(
    daemons: Daemons, config: Path, *args: str, env: dict[str, str] | None = None
) -> int:
    """Launch a daemon that must start; return its master's pid (from the pidfile)."""
    pidfile = config.parent / "preforkd.pid"
    daemons.watch(pidfile)
    result = daemons.launch(config, *args, env=env)
    output = result.stdout + result.stderr
    log = (config.parent / "error.log").read_text()
    assert result.returncode == 0, f"launcher failed: {output}\n{log}"
    pid = read_pid(pidfile)
    assert pid is not None, f"no pid in {pidfile} after the launcher exited 0: {output}"
    assert f"preforkd: running in the background as pid {pid}" in output
    return pid


# --- daemon mode -----------------------------------------------------------------------------


def test_daemon_detaches_reports_ready_and_serves(daemons: Daemons, tmp_path: Path) -> None:
    config = daemon_config(tmp_path)
    pid = launch_ok(daemons, config)
    log = (tmp_path / "error.log").read_text()
    # The launcher returns only once the workers serve (the ready pipe), so no waiting here.
    assert "ready: 2 workers" in log
    assert f"detached: master pid {pid}" in log

    assert alive(pid)
    master = psutil.Process(pid)
    assert master.ppid() != os.getpid(), "the daemon is still the test's child"
    assert os.getsid(pid) != os.getsid(0), "the daemon did not leave the test's session"
    assert os.readlink(f"/proc/{pid}/cwd") == "/"
    assert os.readlink(f"/proc/{pid}/fd/0") == "/dev/null"
    assert os.readlink(f"/proc/{pid}/fd/1") == "/dev/null"

    workers = children(pid)
    assert len(workers) == 2
    response = fetch(http_address(log))
    assert response.status == 200
    assert int(response.body) in workers


def descriptors_on(pid: int, path: Path) -> list[int]:
    """The fds of process `pid` open on `path` (or on it once rotated away and deleted)."""
    found = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):
            if os.readlink(f"/proc/{pid}/fd/{fd}").startswith(str(path)):
                found.append(int(fd))
    return sorted(found)


def test_a_daemon_holds_its_error_log_only_on_fd_2_and_lets_a_rotated_one_go(
    daemons: Daemons, tmp_path: Path
) -> None:
    """Defect: the daemon's stderr stream, given to python-daemon, stayed open beside fd 2
    in the master and every worker, so a log rotated and deleted after USR1 kept its disk
    space until a restart."""
    error_log = tmp_path / "error.log"
    pid = launch_ok(daemons, daemon_config(tmp_path))
    processes = [pid, *children(pid)]
    assert len(processes) == 3
    for process in processes:
        assert descriptors_on(process, error_log) == [2], process

    error_log.rename(tmp_path / "error.log.1")
    os.kill(pid, signal.SIGUSR1)
    wait_until(lambda: error_log.exists() and "USR1: log files reopened" in error_log.read_text(),
               10, message="the log was not reopened")
    (tmp_path / "error.log.1").unlink()
    for process in processes:
        wait_until(lambda p=process: descriptors_on(p, tmp_path / "error.log.1") == [], 10,
                   message=f"pid {process} still holds the rotated log")


def test_second_start_with_a_live_pidfile_refuses(daemons: Daemons, tmp_path: Path) -> None:
    config = daemon_config(tmp_path)
    pid = launch_ok(daemons, config)

    second = daemons.launch(config)
    assert second.returncode != 0
    assert f"already running as pid {pid}" in second.stdout + second.stderr
    assert read_pid(tmp_path / "preforkd.pid") == pid
    assert alive(pid)
    assert fetch(http_address((tmp_path / "error.log").read_text())).status == 200


def test_stale_pidfile_is_replaced(daemons: Daemons, tmp_path: Path) -> None:
    dead = subprocess.Popen(["true"])
    dead.wait()  # reaped: nobody has this pid now
    pidfile = tmp_path / "preforkd.pid"
    pidfile.write_text(f"{dead.pid}\n")
    # daemon and pidfile from the command line this time
    config = daemon_config(tmp_path, daemon=False, pidfile=None)

    pid = launch_ok(daemons, config, "--daemon", "--pidfile", str(pidfile))
    assert pid != dead.pid
    assert alive(pid)


def test_reload_command_reloads_a_daemon(daemons: Daemons, tmp_path: Path) -> None:
    """What systemd's ExecReload does, against a master that runs in "/"."""
    config = daemon_config(tmp_path)
    pid = launch_ok(daemons, config)
    old = set(children(pid))

    result = preforkd("reload", "-c", str(config), "--wait", "30")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "preforkd: reloaded: generation 2 serving with 2 workers" in result.stdout

    def replaced() -> set[int]:
        pids = set(children(pid))
        return pids if len(pids) == 2 and not pids & old else set()

    new = wait_until(replaced, 10, message="the daemon's workers were not replaced")
    assert int(fetch(http_address((tmp_path / "error.log").read_text())).body) in new


def test_a_daemon_reload_resolves_command_line_paths_where_it_was_started(
    daemons: Daemons, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Defect: relative paths on the command line were resolved again at every reload,
    against the daemon's working directory ("/"): `--bind unix:sockets/app.sock` became
    /sockets/app.sock, which could not be bound, and every reload failed."""
    (tmp_path / "sockets").mkdir()
    config = daemon_config(tmp_path)
    monkeypatch.chdir(tmp_path)  # the launcher's working directory: paths are relative to it
    pid = launch_ok(daemons, config, "--bind", "unix:sockets/app.sock")
    path = str(tmp_path / "sockets" / "app.sock")
    assert fetch(path).status == 200
    old = set(children(pid))

    result = preforkd("reload", "-c", str(config), "--wait", "30")

    assert result.returncode == 0, result.stdout + result.stderr
    assert not os.path.exists("/sockets/app.sock")

    def replaced() -> set[int]:
        pids = set(children(pid))
        return pids if len(pids) == 2 and not pids & old else set()

    new = wait_until(replaced, 10, message="the daemon's workers were not replaced")
    assert int(fetch(path).body) in new


def test_daemon_bind_failure_fails_the_launcher(daemons: Daemons, tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = daemon_config(tmp_path, bind=[f"127.0.0.1:{port}"])
        daemons.watch(tmp_path / "preforkd.pid")
        result = daemons.launch(config)
    assert result.returncode != 0
    assert f"cannot bind 127.0.0.1:{port}: Address already in use" in result.stderr
    assert not (tmp_path / "preforkd.pid").exists()


def test_daemon_whose_app_fails_to_import_fails_the_launcher(
    daemons: Daemons, tmp_path: Path
) -> None:
    config = daemon_config(tmp_path, app_source=BROKEN_APP)
    daemons.watch(tmp_path / "preforkd.pid")
    result = daemons.launch(config)
    output = result.stdout + result.stderr
    log = (tmp_path / "error.log").read_text()
    # 3, as for check and a foreground start (the README's exit statuses), not 1
    assert result.returncode == 3, output
    assert "preforkd: startup failed:" in output
    assert "pf-service: this app refuses to import" in output
    detached = re.search(r"detached: master pid (\d+)", log)
    assert detached, log
    daemon_pid = int(detached.group(1))
    wait_until(lambda: not alive(daemon_pid), 10, message="the failed daemon did not exit")
    assert not (tmp_path / "preforkd.pid").exists()


def test_a_daemon_failing_after_it_detached_reports_once_and_cleanly(
    daemons: Daemons, tmp_path: Path
) -> None:
    """Defect: a failure after detaching (here the status socket, opened after the detach)
    was printed to the launcher's terminal, whose descriptor the daemon had closed: the
    daemon died on EBADF with a traceback in its log. The launcher must still report it."""
    admin = tmp_path / "admin.sock"
    config = daemon_config(tmp_path, admin={"socket": str(admin)})
    daemons.watch(tmp_path / "preforkd.pid")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as live:
        live.bind(str(admin))
        live.listen()
        result = daemons.launch(config)
        output = result.stdout + result.stderr
        log = (tmp_path / "error.log").read_text()
        assert result.returncode == 1, output
        assert (
            f"preforkd: startup failed: cannot open the status socket {admin}: "
            "another process is listening on it" in output
        )
        detached = re.search(r"detached: master pid (\d+)", log)
        assert detached, log
        wait_until(lambda: not alive(int(detached.group(1))), 10, message="the daemon lives on")
        log = (tmp_path / "error.log").read_text()
        assert "Traceback" not in log, log
        assert "another process is listening on it" in log
        assert admin.exists(), "the live server's status socket was removed"
    assert not (tmp_path / "preforkd.pid").exists()


def test_daemon_term_removes_pidfile_and_unix_socket(
    daemons: Daemons, tmp_path: Path, short_tmp: Path
) -> None:
    sock_path = short_tmp / "d.sock"
    config = daemon_config(tmp_path, bind=["127.0.0.1:0", f"unix:{sock_path}"])
    pid = launch_ok(daemons, config)
    pgid = os.getpgid(pid)
    assert sock_path.exists()
    assert fetch(str(sock_path)).status == 200

    os.kill(pid, signal.SIGTERM)
    wait_until(lambda: not alive(pid), 15, message="the daemon did not exit on TERM")
    assert not (tmp_path / "preforkd.pid").exists()
    assert not sock_path.exists()
    assert "stopped" in (tmp_path / "error.log").read_text()
    wait_until(lambda: not live_group_members(pgid), 5, message="workers outlived the daemon")


@pytest.mark.parametrize("flag", [["-D"], ["--set", "daemon=true"]], ids=["-D", "--set"])
def test_an_explicit_daemon_flag_detaches_even_when_started_by_systemd(
    daemons: Daemons, tmp_path: Path, flag: list[str]
) -> None:
    """Defect: -D was ignored whenever INVOCATION_ID was set, which systemd sets for every
    unit: a Type=forking unit (ExecStart=preforkd -c ... -D) hung until its start timeout.
    `--set daemon=true` asks for it on the command line as well."""
    config = daemon_config(tmp_path, daemon=False)
    pid = launch_ok(daemons, config, *flag, env={"INVOCATION_ID": "pf-test-invocation"})
    assert alive(pid)
    assert psutil.Process(pid).ppid() != os.getpid(), "the daemon is still the test's child"


@pytest.mark.parametrize(
    ("args", "env"),
    [(["--foreground"], {}), ([], {"INVOCATION_ID": "pf-test-invocation"})],
    ids=["--foreground", "under-systemd"],
)
def test_daemon_setting_is_overridden_in_the_foreground(
    server_factory: ServerFactory, args: list[str], env: dict[str, str], tmp_path: Path
) -> None:
    pidfile = tmp_path / "fg.pid"
    server = server_factory(
        {"app": "app:application", "daemon": True, "pidfile": str(pidfile)},
        app_source=PID_APP,
        args=args,
        env=env,
    )
    assert server.running(), "the master left the foreground"
    assert read_pid(pidfile) == server.pid
    assert "detached" not in server.log()
    if env:
        assert "daemon: staying in the foreground: started by systemd" in server.log()
    assert int(fetch(server.addresses()[0]).body) in server.worker_pids()
    assert server.stop() == 0
    assert not pidfile.exists()


# --- credentials and umask -------------------------------------------------------------------


@pytest.fixture
def public_dir() -> Iterator[Path]:
    """A directory `nobody` can read (pytest's tmp_path is 0700)."""
    path = Path(tempfile.mkdtemp(prefix="pf-public-"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def privileged_config(public_dir: Path, ids: str, workers: str, socket: str) -> str:
    """A config whose workers run as another user (`ids`: its user:/group: lines), serving
    PID_APP from `public_dir` on 127.0.0.1 and on the unix socket entry `socket`."""
    (public_dir / "app.py").write_text(PID_APP)
    return (
        "app: app:application\n"
        f"pythonpath: ['{public_dir}']\n"
        f"{ids}"
        f"workers: {workers}\n"
        "bind:\n"
        "  - 127.0.0.1:0\n"
        f"  - {socket}\n"
    )


def test_workers_drop_privileges_and_unix_socket_gets_owner_and_mode(
    server_factory: ServerFactory, public_dir: Path, short_tmp: Path
) -> None:
    sock_path = short_tmp / "priv.sock"
    server = server_factory(
        config_text=privileged_config(
            public_dir, "user: nobody\ngroup: nogroup\n", "{count: 2}",
            f"{{address: 'unix:{sock_path}', mode: 0660, owner: nobody}}",
        ),
        env={"PYTHONDONTWRITEBYTECODE": "1"},
    )
    assert ids(server.pid, "Uid") == [0, 0, 0, 0]
    assert ids(server.pid, "Gid") == [0, 0, 0, 0]
    workers = server.worker_pids()
    assert len(workers) == 2
    for pid in workers:
        assert ids(pid, "Uid") == [NOBODY] * 4, f"worker {pid}"
        assert ids(pid, "Gid") == [NOBODY] * 4, f"worker {pid}"
        assert ids(pid, "Groups") == [NOBODY], f"worker {pid}: supplementary groups"

    st = sock_path.stat()
    assert st.st_uid == NOBODY
    assert st.st_gid == 0  # no `group` given: the master's
    assert st.st_mode & 0o777 == 0o660
    assert int(fetch(str(sock_path)).body) in workers
    assert int(fetch(server.addresses()[0]).body) in workers


def test_a_numeric_user_without_a_passwd_entry_runs_the_workers(
    server_factory: ServerFactory, public_dir: Path, short_tmp: Path
) -> None:
    """Containers run with arbitrary uids (OpenShift): a numeric user or socket owner need
    not be in /etc/passwd. Without a group, the workers take the same number as group,
    never the master's (root's)."""
    sock_path = short_tmp / "numeric.sock"
    server = server_factory(
        config_text=privileged_config(
            public_dir, f"user: {ANONYMOUS}\n", "{count: 1}",
            f"{{address: 'unix:{sock_path}', owner: {ANONYMOUS}, group: {ANONYMOUS}}}",
        ),
        env={"PYTHONDONTWRITEBYTECODE": "1"},
    )
    (pid,) = server.worker_pids()
    assert ids(pid, "Uid") == [ANONYMOUS] * 4
    assert ids(pid, "Gid") == [ANONYMOUS] * 4
    assert ids(pid, "Groups") == [ANONYMOUS]
    st = sock_path.stat()
    assert (st.st_uid, st.st_gid) == (ANONYMOUS, ANONYMOUS)
    assert int(fetch(server.addresses()[0]).body) == pid


def umask_of(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Umask:"):
            return int(line.split()[1], 8)
    raise AssertionError(f"no Umask line in /proc/{pid}/status")


def test_daemon_keeps_the_inherited_umask(daemons: Daemons, tmp_path: Path) -> None:
    """Without `umask` in the file the daemon keeps its launcher's mask (documented as
    "null = inherited"); a daemon with umask 0 would write a world-writable pidfile."""
    launcher_umask = 0o022
    config = daemon_config(tmp_path)
    previous = os.umask(launcher_umask)  # the launcher inherits it from this process
    try:
        master = launch_ok(daemons, config)
    finally:
        os.umask(previous)
    assert umask_of(master) == launcher_umask
    for worker in children(master):
        assert umask_of(worker) == launcher_umask
    assert (tmp_path / "preforkd.pid").stat().st_mode & 0o777 == 0o644


@pytest.mark.parametrize(
    "detached",
    [False, True],
    ids=["foreground", "daemon"],
)
def test_umask_applies_to_master_and_workers(
    server_factory: ServerFactory,
    daemons: Daemons,
    tmp_path: Path,
    short_tmp: Path,
    detached: bool,
) -> None:
    sock_path = short_tmp / "umask.sock"
    app_dir = tmp_path / "d"
    config_text = (
        "app: app:application\n"
        "umask: 0077\n"
        "workers: {count: 2}\n"
        f"bind: ['127.0.0.1:0', 'unix:{sock_path}']\n"
        "pythonpath: ['.']\n"
    )
    if detached:
        app_dir.mkdir()
        (app_dir / "app.py").write_text(UMASK_PROBE_APP)
        config = app_dir / "preforkd.yaml"
        config.write_text(
            config_text
            + f"daemon: true\npidfile: {app_dir / 'preforkd.pid'}\n"
            + f"logging: {{error_log: {app_dir / 'error.log'}}}\n"
        )
        master = launch_ok(daemons, config)
        assert (app_dir / "error.log").stat().st_mode & 0o777 == 0o600
    else:
        server = server_factory(
            config_text=config_text,
            app_source=UMASK_PROBE_APP,
            env={"PYTHONDONTWRITEBYTECODE": "1"},
        )
        app_dir, master = server.workdir, server.pid
    workers = children(master)
    assert len(workers) == 2
    for pid in workers:
        probe = app_dir / f"probe-{pid}"
        assert probe.exists(), f"worker {pid} wrote no probe file"
        assert probe.stat().st_mode & 0o777 == 0o600, f"{probe}: {probe.stat().st_mode:o}"
    # The master created the socket file: 0777 & ~0077.
    assert sock_path.stat().st_mode & 0o777 == 0o700


# --- systemd ---------------------------------------------------------------------------------


def unit_settings(text: str) -> dict[str, str]:
    settings: dict[str, str] = {}
    for line in text.splitlines():
        if "=" in line and not line.lstrip().startswith(("#", ";")):
            key, _, value = line.partition("=")
            settings[key.strip()] = value.strip()
    return settings


def test_systemd_units_verify(require_tool: Any, tmp_path: Path) -> None:
    analyze = require_tool("systemd-analyze")
    binary = shutil.which("preforkd") or str(Path(sys.executable).parent / "preforkd")
    assert os.access(binary, os.X_OK), f"no preforkd executable at {binary}"
    units = []
    for name in ("preforkd.service", "preforkd.socket"):
        text = (REPO_ROOT / "systemd" / name).read_text()
        unit = tmp_path / name
        unit.write_text(text.replace("/usr/local/bin/preforkd", binary))
        units.append(str(unit))
    result = subprocess.run(
        [analyze, "verify", *units], capture_output=True, text=True, timeout=60, cwd=tmp_path
    )
    complaints = [line for line in result.stderr.splitlines() if "preforkd" in line]
    assert result.returncode == 0, result.stderr
    assert complaints == []

    service = unit_settings((REPO_ROOT / "systemd" / "preforkd.service").read_text())
    assert service["Type"] == "notify"
    assert service["KillMode"] == "mixed"
    assert " reload " in service["ExecReload"]
    assert float(service["TimeoutStopSec"]) > WorkersConfig().graceful_timeout


def unit_capabilities(without: str = "") -> str:
    """The shipped unit's CapabilityBoundingSet as setpriv's --bounding-set argument."""
    service = unit_settings((REPO_ROOT / "systemd" / "preforkd.service").read_text())
    names = [c.lower().removeprefix("cap_") for c in service["CapabilityBoundingSet"].split()]
    return ",".join(["-all", *(f"+{name}" for name in names if name != without)])


@pytest.mark.parametrize("without", ["", "sys_ptrace"], ids=["unit", "unit-without-ptrace"])
def test_the_units_capabilities_cover_socket_owners_and_memory_limits(
    server_factory: ServerFactory, public_dir: Path, short_tmp: Path, without: str
) -> None:
    """Defect: under the unit's bounding set a unix socket with owner and mode failed to
    bind (the mode was set after the chown, which then takes CAP_FOWNER), and with workers
    of another user max_memory silently did nothing (their USS could not be read)."""
    setpriv = shutil.which("setpriv")
    assert setpriv is not None, "setpriv (util-linux) is missing"
    sock_path = short_tmp / "caps.sock"
    server = server_factory(
        config_text=privileged_config(
            public_dir, "user: nobody\ngroup: nogroup\n",
            "{count: 1, max_memory: 1, memory_check_interval: 0.2}",
            f"{{address: 'unix:{sock_path}', mode: 0660, owner: nobody}}",
        ),
        env={"PYTHONDONTWRITEBYTECODE": "1"},
        command=[setpriv, f"--bounding-set={unit_capabilities(without)}", *DEFAULT_COMMAND],
    )
    st = sock_path.stat()
    assert (st.st_uid, st.st_mode & 0o777) == (NOBODY, 0o660)
    (worker,) = server.worker_pids()
    assert int(fetch(str(sock_path)).body) == worker
    # a limit every worker is over: the first check shows the memory could be read
    server.wait_for_log(re.compile(r"uses [\d.]+ MiB, over max_memory \(1 MiB\)"), timeout=10)
    warning = "cannot read the workers' unique memory"
    assert (warning in server.log()) == bool(without)  # logged before any figure is used


class Notification(NamedTuple):
    received: float  # time.monotonic() at receipt
    pid: int  # the sender, from SCM_CREDENTIALS
    text: str

    def fields(self) -> dict[str, str]:
        return dict(line.partition("=")[::2] for line in self.text.splitlines())


class NotifySocket:
    """The systemd side of sd_notify: a datagram socket that records who sent what."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self.received: list[Notification] = []

    def receive(self, timeout: float) -> Notification:
        self.sock.settimeout(timeout)
        data, ancillary, _, _ = self.sock.recvmsg(65536, socket.CMSG_SPACE(12))
        pid = -1
        for level, kind, payload in ancillary:
            if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                pid = struct.unpack("iII", payload[:12])[0]
        note = Notification(time.monotonic(), pid, data.decode())
        self.received.append(note)
        return note

    def next_event(self, timeout: float = 15.0) -> Notification:
        """The next message that is not a watchdog keep-alive or a bare status update."""
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"no notification within {timeout:g}s: {self.received}")
            try:
                note = self.receive(remaining)
            except TimeoutError:
                continue
            if not set(note.fields()) <= {"WATCHDOG", "STATUS"}:
                return note

    def beats(self) -> list[float]:
        return [note.received for note in self.received if note.text == "WATCHDOG=1"]

    def wait_for_beats(self, count: int, timeout: float) -> None:
        """Receive until `count` more watchdog keep-alives arrived; other messages fail."""
        target = len(self.beats()) + count
        deadline = time.monotonic() + timeout
        while len(self.beats()) < target:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"{count} WATCHDOG=1 not seen within {timeout:g}s")
            with contextlib.suppress(TimeoutError):
                note = self.receive(remaining)
                assert set(note.fields()) <= {"WATCHDOG", "STATUS"}, (
                    f"unexpected notification {note.text!r}"
                )

    def close(self) -> None:
        self.sock.close()


def test_notify_protocol(server_factory: ServerFactory, short_tmp: Path) -> None:
    notify = NotifySocket(short_tmp / "notify.sock")
    try:
        server = server_factory(
            {"app": "app:application", "workers": {"count": 2}},
            app_source=PID_APP,
            env={"NOTIFY_SOCKET": str(notify.path), "WATCHDOG_USEC": "400000"},
            wait_ready=False,
        )
        ready = notify.next_event()
        # Checked at receipt: READY=1 must not come before the workers serve.
        booted = len(re.findall(r"worker \d+ \(pid \d+\) booted", server.log()))
        workers = server.worker_pids()
        assert booted >= 2, server.log()
        assert len(workers) >= 2
        assert ready.text == f"READY=1\nSTATUS=2 workers ready\nMAINPID={server.pid}"
        assert int(fetch(server.addresses()[0]).body) in workers
        notify.wait_for_beats(5, timeout=5)

        before_hup = time.clock_gettime(time.CLOCK_MONOTONIC)
        server.signal(signal.SIGHUP)
        reloading = notify.next_event()
        after = time.clock_gettime(time.CLOCK_MONOTONIC)
        fields = reloading.fields()
        assert list(fields) == ["RELOADING", "MONOTONIC_USEC", "STATUS"], reloading.text
        assert fields["RELOADING"] == "1" and fields["STATUS"] == "reloading"
        assert before_hup * 1e6 <= int(fields["MONOTONIC_USEC"]) <= after * 1e6
        reloaded = notify.next_event()
        assert reloaded.text.startswith("READY=1\nSTATUS=reloaded: generation 2 serving with 2 "), (
            reloaded.text
        )
        assert "reloaded: generation 2" in server.log()
        notify.wait_for_beats(2, timeout=5)

        server.signal(signal.SIGTERM)
        assert notify.next_event().text == "STOPPING=1\nSTATUS=stopping"
        assert server.wait_exit(15) == 0
    finally:
        notify.close()

    senders = {note.pid for note in notify.received}
    assert senders == {server.pid}, "only the master may notify (NotifyAccess=main)"
    beats = notify.beats()
    gaps = [later - earlier for earlier, later in zip(beats, beats[1:], strict=False)]
    # WATCHDOG_USEC=400000: systemd kills a service silent for 0.4 s; preforkd aims at 0.2 s.
    assert max(gaps) < 0.4, gaps


# --- preforkd reload -------------------------------------------------------------------------


def reload_server(server_factory: ServerFactory, tmp_path: Path) -> tuple[Server, Path]:
    pidfile = tmp_path / "reload.pid"
    server = server_factory(
        {"app": "app:application", "pidfile": str(pidfile), "workers": {"count": 2}},
        app_source=PID_APP,
        env={"PYTHONDONTWRITEBYTECODE": "1"},
    )
    assert read_pid(pidfile) == server.pid
    return server, pidfile


def test_reload_command_reports_success(server_factory: ServerFactory, tmp_path: Path) -> None:
    server, _ = reload_server(server_factory, tmp_path)
    old = set(server.worker_pids())

    result = preforkd("reload", "-c", str(server.config), "--wait", "30")
    assert result.returncode == 0, result.stderr
    assert "preforkd: reloaded: generation 2 serving with 2 workers" in result.stdout

    def replaced() -> set[int]:
        pids = set(server.worker_pids())
        return pids if len(pids) == 2 and not pids & old else set()

    new = wait_until(replaced, 10, message="the old workers were not replaced")
    assert int(fetch(server.addresses()[0]).body) in new


def test_reload_command_ignores_a_status_file_another_master_left(
    server_factory: ServerFactory, tmp_path: Path
) -> None:
    """Defect: a master that died without cleaning up (SIGKILL, the OOM killer) left
    PIDFILE.status at serial 5; the next master counts from 0, so `preforkd reload` waited
    for a serial above 5 and reported failure until the new master had reloaded 6 times."""
    (tmp_path / "reload.pid.status").write_text(
        json.dumps({"pid": 1, "serial": 5, "state": "done", "ok": True, "message": "old"})
    )
    server, _ = reload_server(server_factory, tmp_path)

    result = preforkd("reload", "-c", str(server.config), "--wait", "30")

    assert result.returncode == 0, result.stdout + result.stderr
    assert "reloaded: generation 2" in result.stdout


def test_reload_command_reports_failure_and_old_workers_serve(
    server_factory: ServerFactory, tmp_path: Path
) -> None:
    server, pidfile = reload_server(server_factory, tmp_path)
    address = server.addresses()[0]
    old = server.worker_pids()
    (server.workdir / "app.py").write_text(BROKEN_APP)

    result = preforkd("reload", "-c", str(server.config), "--wait", "30")
    assert result.returncode == 1, result.stdout + result.stderr
    assert "reload failed" in result.stderr
    assert "pf-service: this app refuses to import" in result.stderr
    assert server.worker_pids() == old
    assert int(fetch(address).body) in old

    # A file that does not parse: `reload` refuses before signalling anyone.
    hups = server.log().count("HUP: reloading")
    server.config.write_text(server.config.read_text() + "workers: [unclosed\n")
    result = preforkd("reload", "-c", str(server.config), "--wait", "30")
    assert result.returncode == 2, result.stdout + result.stderr
    assert server.log().count("HUP: reloading") == hups
    assert server.worker_pids() == old
    assert int(fetch(address).body) in old

    assert server.stop() == 0
    assert not pidfile.exists()
