"""prefork.upgrade: the handover a USR2 passes to the new master, the old master's renames and
their rollback, a real fork and exec of the new master's command, and Master.upgrade against
the fake kernel."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from prefork.addresses import Address
from prefork.notify import Announcer, been_ready
from prefork.pidfile import PidFile, PidFileError
from prefork.sockets import BindSpec, Listener, bind
from prefork.upgrade import (
    ENV,
    Handover,
    PassedSocket,
    Upgrader,
    _exec,
    container_chain,
    new_master_command,
    started_in,
)
from tests.unit.fakes import Rig, exit_status, matching

pytestmark = pytest.mark.usefixtures("prefork_log_propagates")


def test_a_handover_reads_back_as_written() -> None:
    handover = Handover(
        41, True, (PassedSocket(5, "127.0.0.1:8000"), PassedSocket(6, "unix:/run/a.sock",
                                                                    (2049, 77))),
        (7,), "127.0.0.1:9100", 3, 2,
    )
    environ = {ENV: handover.encode(), "OTHER": "x"}
    assert Handover.from_environ(environ) == handover
    assert environ == {"OTHER": "x"}  # taken out: nothing forked later inherits it
    assert Handover.from_environ({}) is None


@pytest.mark.parametrize("text", ["", "[]", "{}", '{"from": "x"}', json.dumps(
    {"from": 1, "detached": False, "sockets": [[1]], "admin": [[], None], "workers": [1, 1]})])
def test_a_garbled_handover_is_refused(text: str) -> None:
    with pytest.raises(ValueError, match=f"^{ENV} is not what a preforkd master passes"):
        Handover.decode(text)


def test_the_new_master_runs_the_same_command(tmp_path: Path) -> None:
    assert new_master_command(["python3", "-m", "prefork", "-c", "a.yaml"], "x/__main__.py") == [
        sys.executable, "-m", "prefork", "-c", "a.yaml",
    ]
    # a console script runs itself: its first line names the interpreter installed now
    script = tmp_path / "preforkd"
    script.write_text("#!/new/venv/bin/python\n")
    script.chmod(0o755)
    assert new_master_command(["/old/bin/python3", str(script), "-D"], str(script)) == [
        str(script), "-D",
    ]
    # interpreter options before it: run again as it was, under this interpreter
    assert new_master_command(["python3", "-X", "dev", str(script)], str(script)) == [
        sys.executable, "-X", "dev", str(script),
    ]


def test_started_in_keeps_the_symbolic_link_the_shell_named(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "rel1").mkdir()
    (tmp_path / "current").symlink_to(tmp_path / "rel1")
    monkeypatch.chdir(tmp_path / "current")
    monkeypatch.setenv("PWD", str(tmp_path / "current"))
    assert started_in() == str(tmp_path / "current")
    monkeypatch.setenv("PWD", str(tmp_path))  # stale: another directory
    assert started_in() == os.getcwd() == str(tmp_path / "rel1")


def test_the_passed_descriptors_are_not_inherited_from_the_start() -> None:
    a, b = socket.socketpair()
    try:
        os.set_inheritable(a.fileno(), True)
        handover = Handover(1, False, (PassedSocket(a.fileno(), "127.0.0.1:1"),))
        Handover.from_environ({ENV: handover.encode()})
        assert os.get_inheritable(a.fileno()) is False
    finally:
        a.close()
        b.close()


@pytest.fixture
def unix_listener(tmp_path: Path) -> Iterator[Listener]:
    (listener,) = bind(BindSpec(Address(kind="unix", path=str(tmp_path / "s.sock"))), 16)
    yield listener
    if listener.sock.fileno() >= 0:
        listener.sock.close()


def dead_pid() -> int:
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    os.waitpid(pid, 0)
    return pid


def test_a_shared_socket_file_is_left_to_the_last_master(unix_listener: Listener) -> None:
    path = Path(unix_listener.address.path)
    unix_listener.shared_with = os.getppid()  # alive: still serving on it
    unix_listener.close()
    assert path.exists()

    (other,) = bind(BindSpec(Address(kind="unix", path=str(path.parent / "t.sock"))), 16)
    other.shared_with = dead_pid()
    other.close()
    assert not Path(other.address.path).exists()


def upgrader(tmp_path: Path, command: list[str], **more: object) -> Upgrader:
    return Upgrader(command, str(tmp_path), {"PATH": os.environ.get("PATH", "")}, False,
                    (signal.SIGUSR1,), **more)  # type: ignore[arg-type]


def test_refusals(unix_listener: Listener, tmp_path: Path) -> None:
    plain = upgrader(tmp_path, ["x"])
    assert plain.refusal([unix_listener]) is None
    assert upgrader(tmp_path, ["x"], under_systemd=True).refusal([unix_listener]).startswith(
        "under systemd the service's main process cannot hand over"
    )
    plain.pid = 12345
    assert plain.refusal([unix_listener]) == "an upgrade is under way (new master pid 12345)"
    unix_listener.inherited = True
    assert upgrader(tmp_path, ["x"]).refusal([unix_listener]).startswith(
        "the sockets belong to systemd"
    )
    gone_master = upgrader(tmp_path, ["x"], replaced=dead_pid())
    unix_listener.inherited = False
    assert gone_master.refusal([unix_listener]) is None


# What the new master's command sees, written where the test can read it.
PROBE = """
import json, os, signal, socket, sys
fds = sorted(int(fd) for fd in os.listdir("/proc/self/fd"))
data = json.loads(os.environ["PREFORKD_UPGRADE"])
sock = socket.socket(fileno=data["sockets"][0][0])
report = {
    "handover": data,
    "cwd": os.getcwd(),
    "listening": sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN),
    "name": sock.getsockname(),
    "blocked": sorted(signal.pthread_sigmask(signal.SIG_BLOCK, [])),
    "usr1": signal.getsignal(signal.SIGUSR1) == signal.SIG_IGN,
    "fds": fds,
    "env": sorted(os.environ),
}
with open(sys.argv[1], "w") as f:
    json.dump(report, f)
"""


def fake_proc(root: Path, processes: dict[int, tuple[str, int]]) -> str:
    """A /proc with `pid: (comm, ppid)` for each process."""
    for pid, (name, ppid) in processes.items():
        (root / str(pid)).mkdir()
        (root / str(pid) / "stat").write_text(f"{pid} ({name}) S {ppid} {pid} {pid} 0 -1\n")
    return str(root)


@pytest.mark.parametrize(
    ("processes", "expected"),
    [
        # docker run --init: tini is PID 1 and the parent
        ({1: ("tini", 0)}, ["tini (pid 1)"]),
        # `sh -c "preforkd ..."` as the container's command, with and without --init
        ({7: ("sh", 1), 1: ("tini", 0)}, ["sh (pid 7)", "tini (pid 1)"]),
        ({1: ("sh", 0)}, ["sh (pid 1)"]),
        # a shell on a host or in a systemd container: the chain ends in an init that stays
        ({900: ("bash", 850), 850: ("sshd", 1), 1: ("systemd", 0)}, None),
        ({40: ("bash", 1), 1: ("s6-svscan", 0)}, None),
        # the chain is cut (a process gone meanwhile): nothing is claimed
        ({7: ("sh", 5)}, None),
    ],
)
def test_a_chain_of_waiting_parents_down_to_pid_1_is_a_container(
    tmp_path: Path, processes: dict[int, tuple[str, int]], expected: list[str] | None
) -> None:
    """DEFECT. Only the direct parent was checked for tini and its kind: under `sh -c`
    (with --init or as PID 1 itself) USR2 went ahead, and the old master's exit ended the
    shell, PID 1, and the container with the new master."""
    parent = next(iter(processes))
    assert container_chain(fake_proc(tmp_path, processes), parent) == expected


def test_start_moves_the_files_aside_execs_and_puts_them_back(
    unix_listener: Listener, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PF_TEST_NOT_PASSED", "1")
    pidfile_path = tmp_path / "p.pid"
    pidfile = PidFile(str(pidfile_path))
    pidfile.write(os.getpid())
    (tmp_path / "p.pid.status").write_text("{}")
    announce = Announcer(status_path=str(tmp_path / "p.pid.status"))
    unix_listener.configured = BindSpec(unix_listener.address)
    report = tmp_path / "report.json"
    workdir = tmp_path / "started-in"
    workdir.mkdir()
    up = upgrader(workdir, [sys.executable, "-c", PROBE, str(report)], pidfile=pidfile,
                  announce=announce)
    previous = signal.signal(signal.SIGUSR1, lambda *_: None)
    try:
        pid = up.start([unix_listener], (3, 2))
    finally:
        signal.signal(signal.SIGUSR1, previous)
    _, status = os.waitpid(pid, 0)
    assert status == 0

    assert up.pid == pid and unix_listener.shared_with == pid
    # the pidfile names this master until the new one writes its own: never missing
    assert pidfile_path.read_text() == (tmp_path / "p.pid.oldbin").read_text() == (
        f"{os.getpid()}\n"
    )
    assert pidfile.path == str(tmp_path / "p.pid.oldbin")
    assert announce.status_path == str(tmp_path / "p.pid.oldbin.status")
    seen = json.loads(report.read_text())
    assert seen["handover"]["from"] == os.getpid()
    assert seen["handover"]["workers"] == [3, 2]
    fd, bound_for, inode = seen["handover"]["sockets"][0]
    assert bound_for == f"unix:{unix_listener.address.path}"
    assert inode == list(unix_listener.unix_inode or ())
    assert seen["listening"] == 1 and seen["name"] == unix_listener.address.path
    assert {0, 1, 2, fd} <= set(seen["fds"])  # stdio and the socket stay open across exec
    # nothing blocked (a release that does not unblock would keep it); USR1, whose default
    # would end the new master before its handlers exist, is ignored until then
    assert seen["blocked"] == [] and seen["usr1"] is True
    assert seen["cwd"] == str(workdir)
    # the environment given (the master's at its start), not this process's
    assert {"PATH", "PREFORKD_UPGRADE"} <= set(seen["env"])
    assert "PF_TEST_NOT_PASSED" not in seen["env"]

    assert up.ended(pid + 1) is False
    assert up.ended(pid) is True
    assert up.pid is None
    assert pidfile_path.read_text() == f"{os.getpid()}\n"
    assert not (tmp_path / "p.pid.oldbin").exists()
    assert pidfile.path == str(pidfile_path)
    assert announce.status_path == str(tmp_path / "p.pid.status")
    assert (tmp_path / "p.pid.status").read_text() == "{}"


def test_closed_stdio_is_opened_on_dev_null_for_the_new_master(tmp_path: Path) -> None:
    """A daemon's stdio may be closed: the new master must not start without fds 0-2 (its
    first sockets would take those numbers)."""
    report = tmp_path / "report.json"
    probe = ("import json, os, sys; json.dump([os.readlink(f'/proc/self/fd/{fd}') "
             "for fd in (0, 1)], open(sys.argv[1], 'w'))")
    pid = os.fork()
    if pid == 0:
        os.close(0)
        os.close(1)
        _exec([sys.executable, "-c", probe, str(report)], str(tmp_path), dict(os.environ),
              [], [], lambda: True)
    _, status = os.waitpid(pid, 0)
    assert status == 0
    assert json.loads(report.read_text()) == ["/dev/null", "/dev/null"]


def test_a_status_socket_name_too_long_once_moved_refuses_the_upgrade(
    unix_listener: Listener, tmp_path: Path
) -> None:
    class Admin:
        unix_path = "/tmp/" + "a" * 97 + ".sock"  # 107 bytes: fits; with .oldbin it does not

    up = upgrader(tmp_path, ["x"], admin=Admin(), admin_implied=False)
    assert (up.refusal([unix_listener]) or "").startswith(
        f"the status socket's name while the new master runs, {Admin.unix_path}.oldbin, "
        "would be too long"
    )


def test_a_command_that_cannot_run_exits_127(unix_listener: Listener, tmp_path: Path) -> None:
    unix_listener.configured = BindSpec(unix_listener.address)
    up = upgrader(tmp_path, [str(tmp_path / "no-such-program")])
    pid = up.start([unix_listener], (1, 1))
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 127


# --- Master.upgrade ---------------------------------------------------------------------------


class StubUpgrader:
    def __init__(self, refusal: str | None = None) -> None:
        self.pid: int | None = None
        self.why = refusal
        self.started: list[tuple[int, int]] = []
        self.taken_back: list[bool] = []
        self.ready: bool | None = None  # what new_master_ready() answers

    def new_master_ready(self) -> bool | None:
        return self.ready

    def refusal(self, listeners: list[Listener]) -> str | None:
        return self.why

    def start(self, listeners: list[Listener], workers: tuple[int, int],
              pre_exec: Callable[[], bool]) -> int:
        assert pre_exec() is True  # no pre_exec hook configured: nothing stops it
        self.started.append(workers)
        self.pid = 4242
        return 4242

    def ended(self, pid: int, take_back: bool = True) -> bool:
        if pid != self.pid:
            return False
        self.pid = None
        self.taken_back.append(take_back)
        return True


def test_usr2_without_an_upgrader_is_refused(make_rig: Callable[..., Rig]) -> None:
    rig = make_rig(count=2)
    rig.start()
    rig.signal(signal.SIGUSR2)
    assert rig.announce.named("upgrade_failed") == [
        ("upgrade_failed", "USR2 ignored: this master cannot start another")
    ]


def test_usr2_starts_a_new_master_and_its_exit_is_reported(
    make_rig: Callable[..., Rig], caplog: pytest.LogCaptureFixture
) -> None:
    rig = make_rig(count=2)
    stub = StubUpgrader()
    rig.master.upgrader = stub  # type: ignore[assignment]
    rig.start()
    rig.signal(signal.SIGTTIN)
    rig.signal(signal.SIGUSR2)
    assert stub.started == [(3, 2)]  # the pool as resized, and the configured count
    assert matching(caplog, "USR2: started a new master (pid 4242)")
    assert rig.announce.named("upgrade_failed") == []
    workers = len(rig.master.workers)

    rig.exit(4242, exit_status(3))
    assert stub.pid is None
    assert matching(caplog, "upgrade: the new master (pid 4242) exited (exit code 3); this "
                            "master")
    assert [m for _, m in rig.announce.named("upgrade_failed")] == [
        matching(caplog, "upgrade: the new master")[0]
    ]
    assert len(rig.master.workers) == workers  # its own workers are untouched


def test_usr2_while_stopping_is_refused(make_rig: Callable[..., Rig]) -> None:
    rig = make_rig(count=1)
    stub = StubUpgrader()
    rig.master.upgrader = stub  # type: ignore[assignment]
    rig.start()
    rig.signal(signal.SIGTERM, signal.SIGUSR2)
    assert stub.started == []
    assert rig.announce.named("upgrade_failed") == [
        ("upgrade_failed", "USR2 ignored: the server is stopping")
    ]
    assert rig.announce.named("refused") == []  # a reload's outcome is not touched


def test_usr2_before_ready_or_during_a_reload_is_refused(make_rig: Callable[..., Rig]) -> None:
    rig = make_rig(count=1)
    stub = StubUpgrader()
    rig.master.upgrader = stub  # type: ignore[assignment]
    rig.tick()  # the worker is booting: not ready yet
    rig.signal(signal.SIGUSR2)
    rig.boot_all()
    rig.master.reloading = True  # promoted, old workers still being replaced
    rig.signal(signal.SIGUSR2)
    assert stub.started == []
    assert [m for _, m in rig.announce.named("upgrade_failed")] == [
        "USR2 ignored: the server is not ready yet",
        "USR2 ignored: a reload is under way",
    ]


def test_a_new_master_that_exits_while_this_one_stops_leaves_the_files_as_they_are(
    make_rig: Callable[..., Rig], caplog: pytest.LogCaptureFixture
) -> None:
    rig = make_rig(count=1)
    stub = StubUpgrader()
    rig.master.upgrader = stub  # type: ignore[assignment]
    rig.start()
    rig.signal(signal.SIGUSR2)
    rig.signal(signal.SIGTERM)
    rig.exit(4242, exit_status(0))
    assert stub.taken_back == [False]
    assert matching(caplog, "while this one is stopping: nothing will serve")
    assert rig.announce.named("upgrade_failed") == []


def test_the_new_masters_readiness_is_its_status_file(tmp_path: Path) -> None:
    plain = upgrader(tmp_path, ["x"])
    assert plain.new_master_ready() is None  # no new master
    plain.pid = 4242
    plain.new_status = str(tmp_path / "p.pid.status")
    assert plain.new_master_ready() is False  # not written yet
    Path(plain.new_status).write_text(json.dumps({"pid": 999, "state": "ready"}))
    assert plain.new_master_ready() is False  # an older master's
    Path(plain.new_status).write_text(json.dumps({"pid": 4242, "state": "reloading"}))
    assert plain.new_master_ready() is True  # a preforkd that does not say been_ready
    # a HUP the new master refused while it loaded: a record, but not a ready one
    Path(plain.new_status).write_text(json.dumps(
        {"pid": 4242, "state": "done", "ok": False, "been_ready": False}))
    assert plain.new_master_ready() is False
    Path(plain.new_status).write_text(json.dumps(
        {"pid": 4242, "state": "done", "ok": True, "been_ready": True}))
    assert plain.new_master_ready() is True
    plain.new_status = None
    assert plain.new_master_ready() is None  # no pidfile: it cannot tell


def test_every_status_record_says_whether_the_master_has_been_ready(tmp_path: Path) -> None:
    path = tmp_path / "p.pid.status"
    announce = Announcer(status_path=str(path))
    announce.refused("the server is not ready yet")
    assert json.loads(path.read_text())["been_ready"] is False
    assert not been_ready(json.loads(path.read_text()), os.getpid())
    announce.ready("1 workers ready")
    assert been_ready(json.loads(path.read_text()), os.getpid())
    announce.reloading()
    assert been_ready(json.loads(path.read_text()), os.getpid())
    assert not been_ready(json.loads(path.read_text()), os.getpid() + 1)


def test_winch_waits_for_the_new_master_to_be_ready(
    make_rig: Callable[..., Rig], caplog: pytest.LogCaptureFixture
) -> None:
    rig = make_rig(count=2)
    stub = StubUpgrader()
    rig.master.upgrader = stub  # type: ignore[assignment]
    rig.start()
    rig.signal(signal.SIGUSR2)
    stub.ready = False
    rig.signal(signal.SIGWINCH)
    assert matching(caplog, "WINCH ignored: the master started by USR2 (pid 4242) is not "
                            "ready yet")
    assert rig.master.paused is None
    stub.ready = True
    rig.signal(signal.SIGWINCH)
    assert rig.master.paused == 2


def test_a_new_master_takes_the_pidfile_from_the_one_it_replaces(tmp_path: Path) -> None:
    """The old master's pid stays in the pidfile while the new master starts: a conflict
    for any other start, not for the master that replaces it."""
    # a live process whose command line is a master's (`-m prefork`)
    old = subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(60)", "-m", "prefork"]
    )
    try:
        path = str(tmp_path / "p.pid")
        Path(path).write_text(f"{old.pid}\n")
        with pytest.raises(PidFileError, match=f"already running as pid {old.pid}"):
            PidFile(path).check()
        taker = PidFile(path, replacing=old.pid)
        taker.write(os.getpid())
        assert Path(path).read_text() == f"{os.getpid()}\n"
    finally:
        old.kill()
        old.wait(10)
