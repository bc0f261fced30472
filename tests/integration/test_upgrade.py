"""USR2 and `preforkd upgrade`: a new master, started from the code installed now, takes over
the running master's sockets; requests keep being answered throughout, and a new master that
fails leaves the old one serving with its files back in place.

Daemons are launched (detached.launch_daemon) and stopped by pid at teardown (`daemons`),
the new masters included (adopted as soon as they are seen).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import psutil
import pytest
import yaml

from detached import Daemons, launch_daemon, preforkd, read_pid
from harness import (
    Address,
    ServerFactory,
    fetch,
    gone,
    parse_addresses,
    settings,
    wait_until,
)

APP_V1 = '''
import os
def app(environ, start_response):
    body = b"v1 %d" % os.getpid()
    start_response("200 OK", [("Content-Type", "text/plain"),
                              ("Content-Length", str(len(body)))])
    return [body]
'''
APP_V2 = APP_V1.replace('b"v1 %d"', 'b"v2 %d"')
APP_BROKEN = APP_V1 + '\nraise RuntimeError("this release does not import")\n'


def title(pid: int) -> str:
    return Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode()


def version_and_pid(where: object) -> tuple[str, int]:
    version, pid = fetch(where, timeout=5).body.decode().split()  # type: ignore[arg-type]
    return version, int(pid)


class Hammer:
    """Requests on new connections, one after another, until stopped: every answer is
    counted, and so is every failure (a refused or reset connection, a non-200)."""

    def __init__(self, where: list[object]) -> None:
        self.where = where
        self.answers: dict[str, int] = {}
        self.failures: list[str] = []
        self.done = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)

    def run(self) -> None:
        turn = 0
        while not self.done.is_set():
            where = self.where[turn % len(self.where)]
            turn += 1
            try:
                response = fetch(where, timeout=10)  # type: ignore[arg-type]
            except (OSError, EOFError) as exc:
                self.failures.append(f"{where}: {exc!r}")
                continue
            if response.status != 200:
                self.failures.append(f"{where}: status {response.status}")
                continue
            version = response.body.decode().split()[0]
            self.answers[version] = self.answers.get(version, 0) + 1

    def __enter__(self) -> Hammer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.done.set()
        self.thread.join(15)


@pytest.fixture
def app_dir(tmp_path: Path) -> Iterator[Path]:
    (tmp_path / "upapp.py").write_text(APP_V1)
    yield tmp_path


class Launched(NamedTuple):
    config: Path
    old: int  # the master's pid
    pidfile: Path
    error_log: Path
    tcp: Address  # its TCP address


def launch(daemons: Daemons, directory: Path, sock: Path, **more: object) -> Launched:
    config, pid = launch_daemon(
        daemons,
        directory,
        app="upapp:app",
        pythonpath=[str(directory)],
        bind=["127.0.0.1:0", f"unix:{sock}"],
        workers={"count": 2},
        preload_app=True,  # the code is in the master's memory: only a new master reloads it
        **more,
    )
    error_log = directory / "error.log"
    tcp = parse_addresses(error_log.read_text())[0]
    return Launched(config, pid, directory / "preforkd.pid", error_log, tcp)


def test_upgrade_replaces_the_master_and_no_request_fails(
    daemons: Daemons, app_dir: Path, short_tmp: Path
) -> None:
    sock = short_tmp / "up.sock"
    config, old, pidfile, error_log, tcp = launch(daemons, app_dir, sock)
    assert version_and_pid(tcp)[0] == "v1"

    (app_dir / "upapp.py").write_text(APP_V2)  # the new release, installed
    with Hammer([tcp, str(sock)]) as hammer:
        wait_until(lambda: sum(hammer.answers.values()) >= 20, 10, message="no answers")
        result = preforkd("upgrade", "-c", str(config), "--wait", "60", timeout=90)
        new = read_pid(pidfile)
        if new is not None:
            daemons.adopt(new)
        settled = sum(hammer.answers.values())
        wait_until(lambda: sum(hammer.answers.values()) >= settled + 20, 10,
                   message="no answers after the upgrade")

    assert result.returncode == 0, result.stdout + result.stderr + error_log.read_text()
    assert new is not None and new != old
    assert result.stdout.splitlines() == [
        f"preforkd: the new master (pid {new}) is ready; stopping the old one (pid {old})",
        f"preforkd: upgraded: master pid {old} -> {new}",
    ]
    assert hammer.failures == [], hammer.failures[:5]
    assert hammer.answers.get("v1", 0) > 0 and hammer.answers.get("v2", 0) > 0, hammer.answers
    assert gone(old)
    log = error_log.read_text()
    assert f"[{old}] [INFO] USR2: started a new master (pid {new})" in log
    assert f"[{new}] [INFO] upgrade: taking over the sockets of the master pid {old}" in log

    # the new master serves alone, on the same sockets, under the old names
    for where in (tcp, str(sock)):
        version, worker = version_and_pid(where)
        assert version == "v2"
        assert parent_of(worker) == new
    assert title(new).startswith("preforkd: master [")
    assert sorted(p.name for p in app_dir.iterdir() if "oldbin" in p.name) == []
    assert sock.exists()

    # the last master to go removes the socket file
    stopped = preforkd("stop", "-p", str(pidfile), "--wait", "30")
    assert stopped.returncode == 0, stopped.stderr
    assert not sock.exists()
    assert not pidfile.exists()


def usr2_by_hand(daemons: Daemons, old: int, pidfile: Path, error_log: Path) -> int:
    """USR2 to the master `old`; the new master's pid once it is ready with 2 workers."""
    os.kill(old, signal.SIGUSR2)
    new: int = wait_until(lambda: (read_pid(pidfile) or old) != old and read_pid(pidfile), 15,
                          message="no new pidfile")
    daemons.adopt(new)
    wait_until(lambda: f"[{new}] [INFO] ready: 2 workers" in error_log.read_text(), 15,
               message="the new master is not ready")
    return new


def parent_of(pid: int) -> int:
    stat = Path(f"/proc/{pid}/stat").read_bytes()
    return int(stat[stat.rfind(b")") + 2 :].split()[1])


def test_an_upgrade_whose_new_master_fails_keeps_the_old_one(
    daemons: Daemons, app_dir: Path, short_tmp: Path
) -> None:
    sock = short_tmp / "up.sock"
    config, old, pidfile, error_log, tcp = launch(daemons, app_dir, sock)

    (app_dir / "upapp.py").write_text(APP_BROKEN)
    result = preforkd("upgrade", "-c", str(config), "--wait", "60", timeout=90)

    assert result.returncode == 1, result.stdout + result.stderr
    assert result.stdout == ""
    assert result.stderr.startswith("preforkd: upgrade: the new master (pid "), result.stderr
    assert f"exited (exit code 3); this master (pid {old}) serves alone again" in result.stderr
    assert read_pid(pidfile) == old
    assert not (app_dir / "preforkd.pid.oldbin").exists()
    assert (app_dir / "preforkd.pid.sock").exists()  # the status socket has its name back
    assert title(old).startswith("preforkd: master [")
    for where in (tcp, str(sock)):
        assert version_and_pid(where)[0] == "v1"
    status = preforkd("status", "-p", str(pidfile))
    assert status.returncode == 0 and f"master pid {old}" in status.stdout, status.stderr


def test_usr2_by_hand_then_term_to_the_new_master_rolls_back(
    daemons: Daemons, app_dir: Path, short_tmp: Path
) -> None:
    """unicorn's and gunicorn's sequence: USR2, look at the new master, and stop it if it is
    no good: the old one takes its pidfile back and is the master again."""
    sock = short_tmp / "up.sock"
    _, old, pidfile, error_log, tcp = launch(daemons, app_dir, sock)
    oldbin = app_dir / "preforkd.pid.oldbin"

    new = usr2_by_hand(daemons, old, pidfile, error_log)
    assert read_pid(oldbin) == old
    assert title(old).startswith("preforkd: master (old) [")
    # the old master answers on its own status socket, found through its own pidfile
    status = preforkd("status", "-p", str(oldbin))
    assert status.returncode == 0 and f"master pid {old}" in status.stdout, status.stderr
    status = preforkd("status", "-p", str(pidfile))
    assert status.returncode == 0 and f"master pid {new}" in status.stdout, status.stderr
    # a second USR2 to the new master is refused while the old one runs
    os.kill(new, signal.SIGUSR2)
    wait_until(
        lambda: f"USR2 ignored: the master this one replaced (pid {old}) still runs"
        in error_log.read_text(), 10, message="a second upgrade was not refused",
    )

    os.kill(new, signal.SIGTERM)
    wait_until(lambda: gone(new), 30, message="the new master did not stop")
    wait_until(lambda: read_pid(pidfile) == old, 10, message="the pidfile is not back")
    wait_until(lambda: title(old).startswith("preforkd: master ["), 10,
               message="the old master still calls itself old")
    assert not oldbin.exists()
    assert f"upgrade: the new master (pid {new}) exited (exit code 0)" in error_log.read_text()
    assert sock.exists()  # the new master left the socket file to the one still serving
    for where in (tcp, str(sock)):
        assert version_and_pid(where)[0] == "v1"


def test_an_upgrade_keeps_the_status_port_and_a_resized_pool(
    daemons: Daemons, app_dir: Path, short_tmp: Path
) -> None:
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()
    config, old, pidfile, error_log, _ = launch(daemons, app_dir, short_tmp / "up.sock",
                                                admin={"bind": f"127.0.0.1:{port}"})
    os.kill(old, signal.SIGTTIN)
    wait_until(lambda: error_log.read_text().count(" booted") >= 3, 15,
               message="TTIN added no worker")

    result = preforkd("upgrade", "-c", str(config), "--wait", "60", timeout=90)
    new = read_pid(pidfile)
    if new is not None:
        daemons.adopt(new)
    assert result.returncode == 0, result.stdout + result.stderr + error_log.read_text()
    assert new != old
    status = fetch(("127.0.0.1", port), target="/status")  # type: ignore[arg-type]
    assert status.status == 200
    assert json.loads(status.body)["master"]["pid"] == new
    assert f"[{new}] [INFO] ready: 3 workers" in error_log.read_text()


@pytest.mark.parametrize("unit", ["notify", "simple"])
def test_usr2_is_refused_under_systemd(
    server_factory: ServerFactory, short_tmp: Path, unit: str
) -> None:
    """The unit's main process would exit for good: systemd ends the service, and with it
    the new master (any unit type: INVOCATION_ID is set in all of them)."""
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(short_tmp / "notify.sock"))
    env = {"INVOCATION_ID": "0123456789abcdef"}
    if unit == "notify":
        env["NOTIFY_SOCKET"] = str(short_tmp / "notify.sock")
    try:
        pidfile = short_tmp / "app.pid"
        server = server_factory(settings(pidfile=str(pidfile)), env=env)
        result = preforkd("upgrade", "-p", str(pidfile), "--wait", "20", timeout=40)
        assert result.returncode == 1, result.stdout + result.stderr
        assert result.stderr.startswith("preforkd: USR2 ignored: under systemd"), result.stderr
        assert read_pid(pidfile) == server.pid
        assert server.running()
        assert fetch(server.addresses()[0]).status == 200
    finally:
        notify.close()


HOOKS = '''
import os
def pre_exec(server):
    if os.path.exists(os.path.join(os.path.dirname(__file__), "refuse")):
        raise RuntimeError("pre_exec refuses")
    os.environ["PF_SET_BY_PRE_EXEC"] = "%d" % server.pid
'''
APP_ENV = APP_V1.replace('b"v1 %d" % os.getpid()',
                         'os.environ.get("PF_SET_BY_PRE_EXEC", "none").encode() + b" 0"')


def test_the_pre_exec_hook_runs_in_the_child_and_can_stop_the_upgrade(
    daemons: Daemons, app_dir: Path, short_tmp: Path
) -> None:
    (app_dir / "uphooks.py").write_text(HOOKS)
    (app_dir / "upapp.py").write_text(APP_ENV)
    (app_dir / "refuse").write_text("")
    config, old, pidfile, error_log, tcp = launch(
        daemons, app_dir, short_tmp / "up.sock", hooks={"pre_exec": "uphooks:pre_exec"}
    )

    refused = preforkd("upgrade", "-c", str(config), "--wait", "60", timeout=90)
    assert refused.returncode == 1, refused.stdout + refused.stderr
    assert "exited (exit code 127)" in refused.stderr
    log = error_log.read_text()
    assert "hook pre_exec (uphooks:pre_exec) failed" in log and "pre_exec refuses" in log
    assert read_pid(pidfile) == old
    assert fetch(tcp).body.split()[0] == b"none"

    (app_dir / "refuse").unlink()
    result = preforkd("upgrade", "-c", str(config), "--wait", "60", timeout=90)
    new = read_pid(pidfile)
    if new is not None:
        daemons.adopt(new)
    assert result.returncode == 0, result.stdout + result.stderr + error_log.read_text()
    # set in the child, by the old master's hook: the new master and its workers have it
    assert fetch(tcp).body.split()[0] == str(old).encode()


def test_an_upgrade_that_drops_a_unix_address_removes_its_file(
    daemons: Daemons, app_dir: Path, short_tmp: Path
) -> None:
    first, second = short_tmp / "a.sock", short_tmp / "b.sock"
    config, _, pidfile, _, _ = launch(daemons, app_dir, first)
    data = yaml.safe_load(config.read_text())
    data["bind"] = ["127.0.0.1:0", f"unix:{second}"]
    config.write_text(yaml.safe_dump(data))

    result = preforkd("upgrade", "-c", str(config), "--wait", "60", timeout=90)
    new = read_pid(pidfile)
    if new is not None:
        daemons.adopt(new)
    assert result.returncode == 0, result.stdout + result.stderr
    assert not first.exists()  # as a reload that drops it: the path goes at once
    assert version_and_pid(str(second))[0] == "v1"
    stopped = preforkd("stop", "-p", str(pidfile), "--wait", "30")
    assert stopped.returncode == 0, stopped.stderr
    assert not second.exists()


def test_winch_after_usr2_leaves_the_new_master_alone_and_its_end_brings_the_old_back(
    daemons: Daemons, app_dir: Path, short_tmp: Path
) -> None:
    """unicorn's sequence: USR2, then WINCH to the old master, so that only the new workers
    serve while the old master waits, ready to take over again if the new one is no good."""
    sock = short_tmp / "up.sock"
    _, old, pidfile, error_log, tcp = launch(daemons, app_dir, sock)
    old_workers = psutil.Process(old).children()
    (app_dir / "upapp.py").write_text(APP_V2)

    with Hammer([tcp, str(sock)]) as hammer:
        new = usr2_by_hand(daemons, old, pidfile, error_log)
        os.kill(old, signal.SIGWINCH)
        wait_until(lambda: all(gone(w.pid) for w in old_workers), 15,
                   message="the old workers still run")
        # the master logs it after asking the workers to stop: they may be gone first
        wait_until(lambda: f"WINCH: stopping all 2 workers; the master started by USR2 (pid "
                   f"{new}) serves alone" in error_log.read_text(), 15,
                   message="the old master did not log its WINCH")
        for where in (tcp, str(sock)):
            for _ in range(5):
                assert version_and_pid(where)[0] == "v2"

        # the new release turns out bad: stop it, and the old master serves again by itself
        settled = hammer.answers.get("v1", 0)
        os.kill(new, signal.SIGTERM)
        wait_until(lambda: gone(new), 30, message="the new master did not stop")
        wait_until(lambda: f"[{old}] [INFO] upgrade ended: starting 2 workers again"
                   in error_log.read_text(), 15, message="the old master did not start workers")
        wait_until(lambda: hammer.answers.get("v1", 0) >= settled + 20, 15,
                   message="the old master does not answer")

    assert hammer.failures == [], hammer.failures[:5]
    assert read_pid(pidfile) == old
    for where in (tcp, str(sock)):
        assert version_and_pid(where)[0] == "v1"


APP_SLOW_IMPORT = APP_V2 + '''
import time
with open(os.path.join(os.path.dirname(__file__), "loading"), "w") as marker:
    marker.write(str(os.getpid()))
time.sleep(2)
'''


def test_a_signal_to_the_group_while_the_new_master_loads_waits_for_it(
    daemons: Daemons, app_dir: Path, short_tmp: Path
) -> None:
    """USR1 (whose default action ends a process) sent to the whole process group, as log
    rotation scripts do, while the new master is still importing the application: it is held
    until the new master can handle it, and the upgrade goes on."""
    config, old, pidfile, error_log, tcp = launch(daemons, app_dir, short_tmp / "up.sock")
    (app_dir / "upapp.py").write_text(APP_SLOW_IMPORT)
    marker = app_dir / "loading"

    os.kill(old, signal.SIGUSR2)
    new = wait_until(lambda: marker.exists() and marker.read_text().isdigit()
                     and int(marker.read_text()), 15, message="the new master is not loading")
    daemons.adopt(new)
    assert parent_of(new) == old
    os.killpg(os.getpgid(old), signal.SIGUSR1)

    wait_until(lambda: f"[{new}] [INFO] ready: 2 workers" in error_log.read_text(), 20,
               message="the new master is not ready:\n" + error_log.read_text()[-2000:])
    wait_until(lambda: f"[{new}] [INFO] USR1: log files reopened" in error_log.read_text(), 10,
               message="the new master did not act on the USR1 held for it")
    assert "upgrade: the new master" not in error_log.read_text()  # it did not die
    assert read_pid(pidfile) == new


def test_winch_before_the_new_master_is_ready_is_refused(
    daemons: Daemons, app_dir: Path, short_tmp: Path
) -> None:
    """A WINCH sent while the master started by USR2 still loads would leave nothing
    serving: the old master refuses it and says why; once the new master is ready (its
    status file names it), WINCH stops the old workers as usual."""
    _, old, pidfile, error_log, tcp = launch(daemons, app_dir, short_tmp / "up.sock")
    old_workers = psutil.Process(old).children()
    (app_dir / "upapp.py").write_text(APP_SLOW_IMPORT)
    marker = app_dir / "loading"

    os.kill(old, signal.SIGUSR2)
    new = wait_until(lambda: marker.exists() and marker.read_text().isdigit()
                     and int(marker.read_text()), 15, message="the new master is not loading")
    daemons.adopt(new)
    os.kill(old, signal.SIGWINCH)
    wait_until(lambda: f"WINCH ignored: the master started by USR2 (pid {new}) is not ready "
               "yet" in error_log.read_text(), 10, message="the early WINCH was not refused")
    assert all(worker.is_running() for worker in old_workers)
    assert version_and_pid(tcp)[0] == "v1"

    wait_until(lambda: f"[{new}] [INFO] ready: 2 workers" in error_log.read_text(), 20,
               message="the new master is not ready")
    os.kill(old, signal.SIGWINCH)
    wait_until(lambda: all(gone(w.pid) for w in old_workers), 15,
               message="the old workers still run after a WINCH once the new master is ready")
    assert version_and_pid(tcp)[0] == "v2"


def test_the_pidfile_names_a_live_master_throughout_an_upgrade(
    daemons: Daemons, app_dir: Path, short_tmp: Path
) -> None:
    """While the new master loads, the pidfile still names the old one (and so does
    PIDFILE.oldbin); the new master then replaces it in one rename. There is no moment
    without a pidfile for `preforkd status`, `stop` or a supervisor (it was moved away at
    USR2 and written again only once the new master had loaded)."""
    _, old, pidfile, error_log, _ = launch(daemons, app_dir, short_tmp / "up.sock")
    (app_dir / "upapp.py").write_text(APP_SLOW_IMPORT)
    marker = app_dir / "loading"
    seen: set[int | None] = set()

    os.kill(old, signal.SIGUSR2)

    def loading() -> int | bool:
        seen.add(read_pid(pidfile))
        return marker.exists() and marker.read_text().isdigit() and int(marker.read_text())

    new = wait_until(loading, 15, message="the new master is not loading")
    daemons.adopt(new)
    assert read_pid(app_dir / "preforkd.pid.oldbin") == old
    # and `status` finds the old master's status socket under its .oldbin name meanwhile
    status = preforkd("status", "--json", "-p", str(pidfile))
    assert status.returncode == 0, status.stderr
    assert json.loads(status.stdout)["master"]["pid"] == old

    def ready() -> bool:
        seen.add(read_pid(pidfile))
        return f"[{new}] [INFO] ready: 2 workers" in error_log.read_text()

    wait_until(ready, 20, message="the new master is not ready")
    assert read_pid(pidfile) == new
    assert seen <= {old, new}, seen


def refuses(address: Address) -> bool:
    try:
        fetch(address, timeout=5)
    except ConnectionRefusedError:
        return True
    return False


def stop_stops_both(config: Path, named: int, other: int, role: str, tcp: Address) -> None:
    """`preforkd stop` exits 0 naming master `named` (the pidfile's) and the `role` master
    `other`; both are gone and nothing answers."""
    result = preforkd("stop", "-c", str(config), "--wait", "60", timeout=90)
    assert result.returncode == 0, result.stderr
    assert result.stdout == (
        f"preforkd: stopped (pid {named}; and the {role} master of an upgrade under way "
        f"(pid {other}))\n"
    )
    assert gone(named) and gone(other)
    assert refuses(tcp)


def test_stop_while_the_new_master_loads_stops_both_masters(
    daemons: Daemons, app_dir: Path, short_tmp: Path
) -> None:
    """Before, `preforkd stop` during an upgrade stopped the master the pidfile named (the
    old one, while the new one loads) and said so; the new master, its child, went on and
    served: the server was still up after a stop that exited 0."""
    config, old, pidfile, error_log, tcp = launch(daemons, app_dir, short_tmp / "up.sock")
    (app_dir / "upapp.py").write_text(APP_SLOW_IMPORT)
    marker = app_dir / "loading"
    os.kill(old, signal.SIGUSR2)
    new = wait_until(
        lambda: marker.exists() and marker.read_text().isdigit() and int(marker.read_text()),
        15, message="the new master is not loading",
    )
    daemons.adopt(new)
    assert read_pid(pidfile) == old  # still loading: the pidfile names the old master
    stop_stops_both(config, old, new, "new", tcp)


def test_stop_after_a_usr2_by_hand_stops_the_old_master_too(
    daemons: Daemons, app_dir: Path, short_tmp: Path
) -> None:
    """USR2, the new master ready, the old one not stopped yet: the pidfile names the new
    master. Before, `preforkd stop` stopped it alone, and the old master took its files back
    and served again."""
    config, old, pidfile, error_log, tcp = launch(daemons, app_dir, short_tmp / "up.sock")
    (app_dir / "upapp.py").write_text(APP_V2)
    new = usr2_by_hand(daemons, old, pidfile, error_log)
    stop_stops_both(config, new, old, "old", tcp)
    assert not pidfile.exists()


def test_a_touch_during_an_upgrade_is_the_new_masters_and_leaves_the_old_one_paused(
    daemons: Daemons, app_dir: Path, short_tmp: Path
) -> None:
    """Both masters of an upgrade watch the same touch_reload file. After USR2 and WINCH a
    deploy's touch made the old master reload as a HUP does: it started its stopped workers
    again (both generations serving) and loaded the new code, which a rollback to it must
    not bring. The new master reloads; the old one says it left the touch to it."""
    trigger = app_dir / "reload.txt"
    trigger.write_text("")
    rotated = app_dir / "logreopen.txt"
    rotated.write_text("")
    sock = short_tmp / "up.sock"
    _, old, pidfile, error_log, tcp = launch(
        daemons, app_dir, sock, touch_reload=[str(trigger)], touch_logreopen=[str(rotated)]
    )
    old_workers = psutil.Process(old).children()
    new = usr2_by_hand(daemons, old, pidfile, error_log)
    os.kill(old, signal.SIGWINCH)
    wait_until(lambda: all(gone(w.pid) for w in old_workers), 15,
               message="the old workers still run")

    since = len(error_log.read_text())
    (app_dir / "upapp.py").write_text(APP_V2)
    trigger.touch()
    rotated.touch()  # the old master's look that sees this one saw the touch before it
    wait_until(lambda: f"[{new}] [INFO] touch_reload: {trigger} modified: reloading"
               in error_log.read_text()[since:], 15, message="the new master did not reload")
    wait_until(lambda: f"[{old}] [INFO] touch_logreopen: {rotated} modified: log files "
               "reopened" in error_log.read_text()[since:], 15,
               message="the old master did not look at its files")
    log = error_log.read_text()[since:]
    assert f"[{old}] [INFO] touch_reload: {trigger} modified: left to the master started " \
           f"by USR2 (pid {new})" in log, log
    assert f"[{old}] [INFO] touch_reload: {trigger} modified: reloading" not in log, log
    assert [c.pid for c in psutil.Process(old).children() if c.pid != new] == [], \
        "the old master started workers again"

    # a rollback: the old master serves its own code again
    os.kill(new, signal.SIGTERM)
    wait_until(lambda: gone(new), 30, message="the new master did not stop")
    wait_until(lambda: f"[{old}] [INFO] upgrade ended: starting 2 workers again"
               in error_log.read_text(), 15, message="the old master did not start workers")
    for where in (tcp, str(sock)):
        assert version_and_pid(where)[0] == "v1"
