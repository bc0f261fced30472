"""prefork.upgrade: the handover a USR2 passes to the new master, the old master's renames and
their rollback, a real fork and exec of the new master's command, and Master.upgrade against
the fake kernel."""

from __future__ import annotations

import json
import os
import signal
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from prefork.addresses import Address
from prefork.notify import Announcer
from prefork.pidfile import PidFile
from prefork.sockets import BindSpec, Listener, bind
from prefork.upgrade import ENV, Handover, PassedSocket, Upgrader, new_master_command
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


def test_the_new_master_runs_the_same_command_with_this_interpreter() -> None:
    assert new_master_command(["python3", "-m", "prefork", "-c", "a.yaml"]) == [
        sys.executable, "-m", "prefork", "-c", "a.yaml",
    ]
    assert new_master_command(["/usr/bin/python3", "/venv/bin/preforkd", "-D"]) == [
        sys.executable, "/venv/bin/preforkd", "-D",
    ]


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
                    [signal.SIGUSR1], **more)  # type: ignore[arg-type]


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
    "usr1": signal.getsignal(signal.SIGUSR1) == signal.SIG_DFL,
    "fds": fds,
    "env": sorted(os.environ),
}
with open(sys.argv[1], "w") as f:
    json.dump(report, f)
"""


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
    assert not pidfile_path.exists() and (tmp_path / "p.pid.oldbin").read_text() == (
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

    def refusal(self, listeners: list[Listener]) -> str | None:
        return self.why

    def start(self, listeners: list[Listener], workers: tuple[int, int],
              pre_exec: Callable[[], bool]) -> int:
        assert pre_exec() is True  # no pre_exec hook configured: nothing stops it
        self.started.append(workers)
        self.pid = 4242
        return 4242

    def ended(self, pid: int) -> bool:
        if pid != self.pid:
            return False
        self.pid = None
        return True


def test_usr2_without_an_upgrader_is_refused(make_rig: Callable[..., Rig]) -> None:
    rig = make_rig(count=2)
    rig.start()
    rig.signal(signal.SIGUSR2)
    assert rig.announce.named("refused") == [
        ("refused", "USR2 ignored: this master cannot start another")
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
    assert rig.announce.named("refused") == []
    workers = len(rig.master.workers)

    rig.exit(4242, exit_status(3))
    assert stub.pid is None
    assert matching(caplog, "upgrade: the new master (pid 4242) exited (exit code 3); this "
                            "master")
    assert [m for _, m in rig.announce.named("refused")] == [
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
    assert rig.announce.named("refused") == [
        ("refused", "USR2 ignored: the server is stopping")
    ]
