"""preforkd as a container's main process: PID 1 of its own pid namespace, as `docker run`
without an init starts it, with real namespaces (`unshare --pid --fork --mount-proc
--kill-child`, which needs root; skipped without it).

The kernel drops every signal sent to a namespace's init that it has no handler for, from
inside the namespace or from outside it (`docker stop`'s TERM is the famous one); init adopts
every orphan in the namespace; and when init exits, every other process in it is killed.

The server runs through harness.Server with unshare as its command: Server.pid is unshare's
(the group the fixture kills at teardown; with --kill-child unshare's death kills PID 1, and
so the whole namespace), and `init_pid` finds the namespace's PID 1 (the master) as its child,
which the tests signal by its host pid, as `docker stop`/`docker kill` do, or from inside
through nsenter, as `docker exec ... kill` does.

Defects (each test failed before its fix):
- test_stop_signal_while_preloading_stops_pid1_at_once: TERM, INT or QUIT while the master
  imports a preloaded application (before its handlers existed) were dropped (TERM, QUIT) or
  ended it with a traceback (INT); docker stop waited its 10 s and killed the container.
- test_hup_while_preloading_waits_for_the_loop, test_hup_while_preloading_does_not_kill_
  a_plain_master: HUP before the handlers were installed was dropped by PID 1 (and killed
  a master that is not PID 1).
- test_stop_during_a_preloading_reload_is_not_held_by_the_import: a stop while a HUP
  re-imported a preloaded application waited for the import (the loop was blocked in it).
- test_usr2_is_refused_as_pid1: USR2 started a new master as PID 1's child, which the old
  master's exit (`preforkd upgrade`'s last step) then killed with the whole namespace.
The other tests pin behaviour no test checked: stops from inside and outside, at every
stage; signals from inside; orphans reaped and never taken for workers; exit statuses; the
pidfile across namespaces; `sh -c`; log lines at exit without a TTY.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import psutil
import pytest

from detached import preforkd_env
from harness import (
    DEFAULT_COMMAND,
    Server,
    ServerFactory,
    fetch,
    wait_until,
)

UNSHARE = ("unshare", "--pid", "--fork", "--mount-proc", "--kill-child")
IN_NAMESPACE = (*UNSHARE, *DEFAULT_COMMAND)

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("unshare") is None or shutil.which("nsenter") is None,
    reason="needs root and util-linux unshare/nsenter for pid namespaces",
)


@pytest.fixture(autouse=True, scope="module")
def pid_namespaces() -> None:
    """Skip when this machine refuses new pid namespaces (a container without
    CAP_SYS_ADMIN): the tools are there, the kernel says no, and no test here could run."""
    probe = subprocess.run([*UNSHARE, "true"], capture_output=True, text=True, timeout=30)
    if probe.returncode != 0:
        pytest.skip(f"no pid namespaces here: {probe.stderr.strip()}")

# The application. At import it writes `loading` in its directory, then sleeps as many
# seconds as its file `delay` says, else PF_LOAD_SECONDS (PF_FAIL set: raises instead).
# Requests: /orphan?s=N double-forks a process that lives N seconds (its parent exits at
# once: the grandchild is an orphan, adopted by PID 1); /popen?s=N starts `sleep N` and
# never waits for it (both answer with that pid, in the namespace); /slow?s=N writes `slow`
# in its directory, then sleeps N seconds; /print prints a line on stdout (no flush);
# anything else: the worker's pid.
APP = r'''
import os, subprocess, sys, time
from urllib.parse import parse_qs

HERE = os.path.dirname(os.path.abspath(__file__))
with open(os.path.join(HERE, "loading"), "w") as f:
    f.write(str(os.getpid()))
if os.environ.get("PF_FAIL"):
    raise RuntimeError("the application cannot start")
DELAY = os.path.join(HERE, "delay")
if os.path.exists(DELAY):
    with open(DELAY) as f:
        time.sleep(float(f.read()))
else:
    time.sleep(float(os.environ.get("PF_LOAD_SECONDS", "0")))
printed = 0


def orphan(seconds):
    r, w = os.pipe()
    child = os.fork()
    if child == 0:
        os.close(r)
        grandchild = os.fork()
        if grandchild == 0:
            os.close(w)
            time.sleep(seconds)
            os._exit(0)
        os.write(w, str(grandchild).encode())
        os._exit(0)
    os.close(w)
    pid = os.read(r, 64)
    os.close(r)
    os.waitpid(child, 0)
    return pid


def app(environ, start_response):
    global printed
    path = environ["PATH_INFO"]
    seconds = float(parse_qs(environ["QUERY_STRING"]).get("s", ["0"])[0])
    body = str(os.getpid()).encode()
    if path == "/slow":
        open(os.path.join(HERE, "slow"), "w").close()
        time.sleep(seconds)
    elif path == "/orphan":
        body = orphan(seconds)
    elif path == "/popen":
        body = str(subprocess.Popen(["sleep", str(seconds)]).pid).encode()
    elif path == "/print":
        printed += 1
        print(f"printed {os.getpid()} {printed}")
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [body]
'''


# --- helpers -----------------------------------------------------------------------------------


def start(
    server_factory: ServerFactory,
    *,
    wait_ready: bool = True,
    command: tuple[str, ...] = IN_NAMESPACE,
    env: dict[str, str] | None = None,
    **more: object,
) -> Server:
    """A server (2 workers) as PID 1 of a new pid namespace."""
    settings: dict[str, object] = {"app": "app:app", "workers": {"count": 2}, **more}
    return server_factory(
        settings, app_source=APP, command=command, env=env, wait_ready=wait_ready
    )


def init_pid(server: Server) -> int:
    """The host pid of the namespace's PID 1: unshare's one child."""

    def child() -> int | None:
        try:
            children = psutil.Process(server.pid).children()
        except psutil.NoSuchProcess:
            return None
        return children[0].pid if children else None

    return wait_until(child, 10, message="unshare started no child")


def inside(server: Server, *argv: str, timeout: float = 40) -> subprocess.CompletedProcess[str]:
    """Run `argv` inside the server's namespace (pid and mount: its /proc), as `docker
    exec` does."""
    return subprocess.run(
        ["nsenter", "-t", str(init_pid(server)), "-p", "-m", *argv],
        env=preforkd_env(), stdin=subprocess.DEVNULL, capture_output=True, text=True,
        timeout=timeout,
    )


def send(server: Server, sig: signal.Signals, sender: str) -> None:
    """`sig` to the namespace's PID 1: by its host pid ("outside", `docker stop`), or as
    `kill -SIG 1` run in the namespace ("inside", `docker exec`)."""
    if sender == "outside":
        os.kill(init_pid(server), sig)
    else:
        result = inside(server, "kill", f"-{sig.name[3:]}", "1", timeout=10)
        assert result.returncode == 0, result.stderr


def namespace_states(server: Server) -> dict[int, str]:
    """Every process of the namespace (host pid -> /proc state letter), PID 1 first."""
    try:
        top = psutil.Process(init_pid(server))
        procs = [top, *top.children(recursive=True)]
    except psutil.NoSuchProcess:
        return {}
    states: dict[int, str] = {}
    for proc in procs:
        try:
            with open(f"/proc/{proc.pid}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        states[proc.pid] = stat[stat.rfind(b")") + 2 :].split()[0].decode()
    return states


def zombies(server: Server) -> list[int]:
    return [pid for pid, state in namespace_states(server).items() if state == "Z"]


def by_nspid(server: Server) -> dict[int, int]:
    """The namespace's processes: pid inside -> host pid."""
    found = {}
    for pid in namespace_states(server):
        try:
            found[nspid(pid)] = pid
        except (OSError, AssertionError):
            continue
    return found


def workers(server: Server) -> list[int]:
    """Host pids of the master's live children whose title says they are workers."""
    found = []
    for child in psutil.Process(init_pid(server)).children():
        try:
            if child.status() != psutil.STATUS_ZOMBIE and "worker" in " ".join(child.cmdline()):
                found.append(child.pid)
        except psutil.NoSuchProcess:
            continue
    return sorted(found)


def nspid(pid: int) -> int:
    """A host pid's pid inside its (innermost) namespace, from /proc/PID/status NSpid."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("NSpid:"):
                return int(line.split()[-1])
    raise AssertionError(f"no NSpid for {pid}")


def loading(server: Server) -> None:
    """Wait until the (preloaded) application has begun to import."""
    wait_until(lambda: (server.workdir / "loading").exists(), 15,
               message="the application never began to load")


# --- defects: signals before the handlers exist ---------------------------------------------


def catches_term(pid: int) -> tuple[bool, str] | None:
    """(whether the HTTP parser's extension is loaded yet, the maps) once process `pid`
    has a handler for TERM (SigCgt in /proc/PID/status); None before."""
    try:
        with open(f"/proc/{pid}/status") as f:
            status = f.read()
        with open(f"/proc/{pid}/maps") as f:
            maps = f.read()
    except OSError:
        return None
    caught = int(next(line for line in status.splitlines()
                      if line.startswith("SigCgt:")).split()[1], 16)
    if not caught & (1 << (signal.SIGTERM - 1)):
        return None
    return "httptools" in maps, maps


def test_a_stop_while_the_modules_import_stops_pid1(server_factory: ServerFactory) -> None:
    """DEFECT (fixed). From exec until the master installed its handlers, its imports
    (YAML, the HTTP parser, TLS: ~0.3 s here, more on a loaded host) left TERM with no
    handler, and the kernel drops that for PID 1: a `docker stop` then was lost and the
    container killed 10 s later. The entry point now catches the signals before it imports
    anything else and replays them once the master's handlers are in place."""
    server = start(server_factory, wait_ready=False)
    pid1 = init_pid(server)
    loaded, maps = wait_until(lambda: catches_term(pid1), 15, interval=0.002,
                              message="PID 1 never caught TERM")
    assert not loaded, "TERM was caught only after the imports:\n" + maps[-1500:]
    os.kill(pid1, signal.SIGTERM)  # docker stop
    assert server.wait_exit(10) == 0
    assert "SIGTERM while starting: stopped before serving" in server.log()
    assert "ready:" not in server.log()


@pytest.mark.parametrize(
    ("sig", "sender"),
    [
        (signal.SIGTERM, "outside"),
        (signal.SIGTERM, "inside"),
        (signal.SIGINT, "outside"),
        (signal.SIGQUIT, "outside"),
    ],
)
def test_stop_signal_while_preloading_stops_pid1_at_once(
    server_factory: ServerFactory, sig: signal.Signals, sender: str
) -> None:
    """DEFECT (fixed). docker stop while a preloaded application imports (30 s here): the
    master had no handler yet, so PID 1 dropped TERM and QUIT (INT ended it with a
    KeyboardInterrupt traceback), and the container was killed 10 s later. Now it stops at
    once, exit status 0, nothing left in the namespace."""
    server = start(server_factory, wait_ready=False, preload_app=True,
                   env={"PF_LOAD_SECONDS": "30"})
    loading(server)
    send(server, sig, sender)
    assert server.wait_exit(8) == 0
    assert f"{sig.name} while starting: stopped before serving" in server.log()
    assert "Traceback" not in server.log()


def test_hup_while_preloading_waits_for_the_loop(server_factory: ServerFactory) -> None:
    """DEFECT (fixed). HUP while the master imports the application: PID 1 dropped it (the
    handlers did not exist yet). Now it waits in the queue and the loop reloads once the
    server serves, as SIGNALS.md says of a master USR2 started."""
    server = start(server_factory, wait_ready=False, preload_app=True,
                   env={"PF_LOAD_SECONDS": "1.5"})
    loading(server)
    send(server, signal.SIGHUP, "outside")
    server.wait_for_log("HUP: reloading", 20)
    server.wait_for_log(re.compile(r"\[INFO\] reloaded: generation 2 serving"), 20)
    assert fetch(server.addresses()[0]).status == 200


def test_hup_while_preloading_does_not_kill_a_plain_master(
    server_factory: ServerFactory,
) -> None:
    """DEFECT (fixed), not PID 1 this time: HUP (a log rotation's `kill -HUP` to the process
    group, say) while the master imported a preloaded application killed it (the signal's
    default action). Now it waits for the loop, which reloads."""
    server = start(server_factory, wait_ready=False, preload_app=True,
                   command=DEFAULT_COMMAND, env={"PF_LOAD_SECONDS": "1.5"})
    loading(server)
    server.signal(signal.SIGHUP)
    server.wait_for_log(re.compile(r"\[INFO\] reloaded: generation 2 serving"), 20)
    assert fetch(server.addresses()[0]).status == 200


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGQUIT])
def test_stop_during_a_preloading_reload_is_not_held_by_the_import(
    server_factory: ServerFactory, sig: signal.Signals
) -> None:
    """DEFECT (fixed). docker stop while a HUP re-imports a preloaded application (30 s
    here): the loop was blocked in the import, so the stop waited for it (and docker's
    SIGKILL came first). Now the reload is abandoned at once and the stop follows: exit 0."""
    server = start(server_factory, preload_app=True)
    (server.workdir / "loading").unlink()
    (server.workdir / "delay").write_text("30")
    send(server, signal.SIGHUP, "outside")
    loading(server)
    send(server, sig, "outside")
    assert server.wait_exit(8) == 0
    log = server.log()
    assert f"reload abandoned: {sig.name} arrived while it loaded" in log
    assert ("TERM: stopping gracefully" if sig == signal.SIGTERM else "stopping now") in log


def test_usr2_is_refused_as_pid1(server_factory: ServerFactory) -> None:
    """DEFECT (fixed). USR2 as PID 1 forked the new master as PID 1's child; stopping the
    old master (`preforkd upgrade` does, once the new one is ready) then ended the namespace
    and the new master with it: the container stopped. Now it is refused, and says why."""
    server = start(server_factory)
    send(server, signal.SIGUSR2, "outside")
    server.wait_for_log("USR2 ignored: this master is PID 1")
    assert len(workers(server)) == 2
    masters = [p for p in psutil.Process(init_pid(server)).children()
               if "master" in " ".join(p.cmdline())]
    assert masters == []
    assert fetch(server.addresses()[0]).status == 200
    send(server, signal.SIGTERM, "outside")
    assert server.wait_exit(10) == 0


def test_usr2_is_refused_under_tini(
    server_factory: ServerFactory, require_tool: Callable[[str], str]
) -> None:
    """DEFECT (fixed). Under tini (`docker run --init`) the master is PID 2, so the PID 1
    check let USR2 through; `preforkd upgrade` then stopped the old master, tini exited with
    its one child, and the namespace ended, the new master with it. Now it is refused, with
    the reason, and the server goes on as it was."""
    tini = require_tool("tini")
    server = start(server_factory, command=(*UNSHARE, tini, "--", *DEFAULT_COMMAND))
    shim = psutil.Process(init_pid(server))
    assert shim.name() == "tini"
    (master,) = shim.children()
    before = sorted(child.pid for child in master.children())
    os.kill(master.pid, signal.SIGUSR2)
    server.wait_for_log("USR2 ignored: this master's parent is tini (pid 1), a container's init")
    assert sorted(child.pid for child in master.children()) == before  # no new master
    assert fetch(server.addresses()[0]).status == 200
    os.kill(shim.pid, signal.SIGTERM)  # docker stop: tini passes it on
    assert server.wait_exit(10) == 0


def test_usr2_is_refused_under_a_shell_that_is_pid_1(
    server_factory: ServerFactory, require_tool: Callable[[str], str]
) -> None:
    """DEFECT (fixed). `sh -c "preforkd ..."` as a container's command (with --init: tini
    -> sh -> preforkd, the same): only a direct parent that is tini was refused, so USR2
    went ahead here; the old master's exit then ends the shell, which is PID 1, and the
    namespace with the new master. Refused now, naming the chain."""
    tini = require_tool("tini")
    shell = ("sh", "-c", '"$@"; exit $?', "sh")  # waits for preforkd: no exec of the last command
    server = start(server_factory, command=(*UNSHARE, tini, "--", *shell, *DEFAULT_COMMAND))
    (sh,) = psutil.Process(init_pid(server)).children()
    (master,) = sh.children()
    before = sorted(child.pid for child in master.children())
    os.kill(master.pid, signal.SIGUSR2)
    server.wait_for_log(re.compile(
        r"USR2 ignored: this master's ancestors, sh \(pid \d+\) <- tini \(pid 1\), end in "
        r"a container's PID 1"
    ))
    assert sorted(child.pid for child in master.children()) == before  # no new master
    assert fetch(server.addresses()[0]).status == 200
    os.kill(master.pid, signal.SIGTERM)
    assert server.wait_exit(10) == 0


# --- pinned: stops and other signals --------------------------------------------------------


@pytest.mark.parametrize("sender", ["outside", "inside"])
def test_docker_stop_while_serving_finishes_the_request_and_exits_0(
    server_factory: ServerFactory, sender: str
) -> None:
    """Pinned: TERM to PID 1 while a request is in flight: answered, then exit 0 well
    within workers.graceful_timeout, the last log line written."""
    server = start(server_factory, workers={"count": 2, "graceful_timeout": 20})
    address = server.addresses()[0]
    results: list[int] = []

    thread = threading.Thread(
        target=lambda: results.append(fetch(address, target="/slow?s=1.5", timeout=15).status)
    )
    thread.start()
    try:
        wait_until(lambda: (server.workdir / "slow").exists(), 5,
                   message="the request never reached a worker")
        began = time.monotonic()
        send(server, signal.SIGTERM, sender)
        assert server.wait_exit(15) == 0
        assert time.monotonic() - began < 10
    finally:
        thread.join(20)
    assert results == [200]
    assert server.log().rstrip().endswith("[INFO] stopped")


def test_signals_from_inside_the_namespace(server_factory: ServerFactory) -> None:
    """Pinned: `docker exec ... kill -SIG 1` for TTIN, TTOU, USR1, WINCH, HUP each does what
    SIGNALS.md says (the master is PID 1 and has handlers for all of them)."""
    server = start(server_factory)
    send(server, signal.SIGTTIN, "inside")
    server.wait_for_log("TTIN: 3 workers")
    wait_until(lambda: len(workers(server)) == 3, 10)
    send(server, signal.SIGTTOU, "inside")
    server.wait_for_log("TTOU: 2 workers")
    wait_until(lambda: len(workers(server)) == 2, 10)
    send(server, signal.SIGUSR1, "inside")
    server.wait_for_log("USR1: log files reopened")
    send(server, signal.SIGWINCH, "inside")
    server.wait_for_log("WINCH: stopping all 2 workers")
    wait_until(lambda: not workers(server), 10)
    send(server, signal.SIGHUP, "inside")
    server.wait_for_log("HUP: starting 2 workers again")
    server.wait_for_log(re.compile(r"reloaded: generation 2 serving with 2 workers"), 20)
    assert fetch(server.addresses()[0]).status == 200
    send(server, signal.SIGTERM, "inside")
    assert server.wait_exit(10) == 0


def test_term_during_a_reload_exits_0(server_factory: ServerFactory) -> None:
    """Pinned: TERM while a HUP reload's new workers boot (slowly here): exit 0, within the
    graceful timeout, no zombie left behind meanwhile."""
    server = start(server_factory, env={"PF_LOAD_SECONDS": "0"})
    (server.workdir / "loading").unlink()
    server.config.write_text(server.config.read_text() + "env: {PF_LOAD_SECONDS: '2'}\n")
    send(server, signal.SIGHUP, "outside")
    server.wait_for_log("HUP: reloading")
    loading(server)
    send(server, signal.SIGTERM, "outside")
    assert server.wait_exit(15) == 0
    assert "stopping gracefully" in server.log()


def test_term_while_workers_boot_exits_0(server_factory: ServerFactory) -> None:
    """Pinned: TERM while the workers import the application (no preload): exit 0. The
    stop waits for the import (a booting worker answers what queued meanwhile): docker
    stop's timeout must exceed the application's import time."""
    server = start(server_factory, wait_ready=False, env={"PF_LOAD_SECONDS": "1.5"})
    loading(server)
    send(server, signal.SIGTERM, "outside")
    assert server.wait_exit(15) == 0
    assert "TERM: stopping gracefully" in server.log()


# --- pinned: orphans --------------------------------------------------------------------------


def test_orphans_are_reaped_and_never_taken_for_workers(server_factory: ServerFactory) -> None:
    """Pinned: processes a worker's application double-forked, or started and never waited
    for before its worker was recycled, become PID 1's: the master reaps them as they exit
    (no zombie stays), never counts them as workers, never logs them; one still running
    at the stop delays nothing (exit 0) and dies with the namespace."""
    # every worker is recycled after one request, so all the /popen children (which their
    # worker never waits for: its zombies while it lives) end up PID 1's
    server = start(server_factory, workers={"count": 2, "max_requests": 1})
    address = server.addresses()[0]
    short = [int(fetch(address, target="/orphan?s=0.2").body) for _ in range(6)]
    popened = [int(fetch(address, target="/popen?s=0.3").body) for _ in range(4)]
    lasting = int(fetch(address, target="/orphan?s=300").body)
    # the worker recycled: what it started and never waited for is PID 1's
    server.wait_for_log("will be replaced: max_requests")

    def all_reaped() -> bool:
        return not zombies(server) and not set(by_nspid(server)) & {*short, *popened}

    wait_until(all_reaped, 10, message=f"zombies left: {zombies(server)}")
    host_lasting = by_nspid(server)[lasting]
    assert psutil.Process(host_lasting).ppid() == init_pid(server)  # adopted by the master
    # (a fork without exec keeps its worker's title: only the master knows it is none)
    wait_until(lambda: len(set(workers(server)) - {host_lasting}) == 2, 10)
    log = server.log()
    for pid in [*short, *popened, lasting]:
        assert f"(pid {pid})" not in log
    assert "unexpectedly" not in log and "failed to boot" not in log
    began = time.monotonic()
    send(server, signal.SIGTERM, "outside")
    assert server.wait_exit(10) == 0
    assert time.monotonic() - began < 5
    wait_until(lambda: not psutil.pid_exists(host_lasting) or
               psutil.Process(host_lasting).status() == psutil.STATUS_ZOMBIE, 5,
               message="an orphan outlived the namespace's PID 1")


# --- pinned: exit status, pidfile, sh -c, logs ------------------------------------------------


@pytest.mark.parametrize("preload", [False, True])
def test_an_application_that_cannot_load_exits_3(
    server_factory: ServerFactory, preload: bool
) -> None:
    """Pinned: docker inspect's ExitCode is 3 when the application cannot be imported."""
    server = start(server_factory, wait_ready=False, preload_app=preload,
                   env={"PF_FAIL": "1"})
    assert server.wait_exit(15) == 3


def test_pidfile_in_a_volume_across_namespaces(
    server_factory: ServerFactory, short_tmp: Path
) -> None:
    """Pinned: a container killed (docker kill) leaves its pidfile naming pid 1; the next
    container's master is pid 1 again and starts; `preforkd reload -p` and `preforkd stop
    -p` run in the namespace (docker exec) reach it; the stop leaves no pidfile, and ends
    `preforkd stop` itself with the namespace."""
    pidfile = short_tmp / "app.pid"
    first = start(server_factory, pidfile=str(pidfile))
    assert pidfile.read_text().strip() == "1"
    os.kill(init_pid(first), signal.SIGKILL)
    assert first.wait_exit(10) != 0  # (unshare cannot re-raise SIGKILL on itself: 1)
    assert pidfile.exists()

    second = start(server_factory, pidfile=str(pidfile))
    assert pidfile.read_text().strip() == "1"
    result = inside(second, *DEFAULT_COMMAND, "reload", "-p", str(pidfile), "--wait", "30")
    assert result.returncode == 0, result.stdout + result.stderr
    second.wait_for_log(re.compile(r"reloaded: generation 2"))
    # `stop` waits for the master's exit, which as PID 1 kills every process of the
    # namespace: `stop` too (docker exec reports 137). The stop itself was graceful.
    result = inside(second, *DEFAULT_COMMAND, "stop", "-p", str(pidfile), "--wait", "30")
    assert result.returncode == -signal.SIGKILL, result.stdout + result.stderr
    assert second.wait_exit(10) == 0
    assert "TERM: stopping gracefully" in second.log()
    assert not pidfile.exists()


def test_sh_c_exec_passes_signals_and_sh_c_without_exec_does_not(
    server_factory: ServerFactory,
) -> None:
    """Pinned (the README's container advice): `sh -c 'exec preforkd ...'` makes preforkd
    PID 1, so docker stop stops it (exit 0). Without exec, sh is PID 1: it has no TERM
    handler, so the kernel drops docker stop's TERM and preforkd never hears of it."""
    python = " ".join(DEFAULT_COMMAND)
    with_exec = start(server_factory,
                      command=(*UNSHARE, "sh", "-c", f'exec {python} "$@"', "sh"))
    assert nspid(init_pid(with_exec)) == 1
    send(with_exec, signal.SIGTERM, "outside")
    assert with_exec.wait_exit(10) == 0

    without = start(server_factory,
                    command=(*UNSHARE, "sh", "-c", f'{python} "$@"; echo "exit $?"', "sh"))
    sh = init_pid(without)
    master = psutil.Process(sh).children()[0].pid
    send(without, signal.SIGTERM, "outside")  # to sh, PID 1: dropped
    os.kill(master, signal.SIGUSR1)  # a signal the master does get, after it
    without.wait_for_log("USR1: log files reopened")
    assert "TERM" not in without.log()
    assert psutil.Process(sh).status() != psutil.STATUS_ZOMBIE
    os.kill(master, signal.SIGTERM)  # what tini or dumb-init would forward
    assert without.wait_exit(10) == 0
    assert "exit 0" in without.stdout()


def test_output_without_a_tty_is_all_there_after_the_stop(
    server_factory: ServerFactory,
) -> None:
    """Pinned: stdout and stderr are pipes (docker logs) and PYTHONUNBUFFERED is unset:
    what the application printed in its workers (block-buffered) is written when they exit,
    and the master's last line ("stopped") is there once it has exited."""
    server = start(server_factory, env={"PYTHONUNBUFFERED": ""})
    address = server.addresses()[0]
    for _ in range(10):
        assert fetch(address, target="/print").status == 200
    send(server, signal.SIGTERM, "outside")
    assert server.wait_exit(10) == 0
    printed = re.findall(r"^printed \d+ \d+$", server.stdout(), re.M)
    assert len(printed) == 10, server.stdout()
    assert server.log().rstrip().endswith("[INFO] stopped")


def test_unshare_is_what_the_tests_think(server_factory: ServerFactory) -> None:
    """The premise: the master is PID 1 of its namespace, and its workers are its children
    there."""
    server = start(server_factory)
    assert nspid(init_pid(server)) == 1
    assert sorted(nspid(pid) for pid in workers(server)) == [2, 3]
    assert sys.platform.startswith("linux")
