"""USR2: replace the running master by a new one started from the code installed now (a new
preforkd, a new Python, a new virtualenv), with no listening socket closed and no
connection refused in between.

The old master forks a child that executes the command line it was started with; the
listening sockets (and the status endpoint's TCP socket) stay open across exec and are named
in PREFORKD_UPGRADE. The new master adopts them instead of binding, starts its own workers
and serves beside the old generation on the same accept queues. The operator (or `preforkd
upgrade`) then stops the old master gracefully; if the new master exits before that, the old
one takes its files back and keeps serving alone.

Invariants: the old master renames its pidfile, status file and status socket to `.oldbin`
names before the new master starts, so the new one finds none of them taken; a unix socket
file both masters serve on is removed only by the last of them to exit (`Listener.shared_with`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import socket
import sys
from collections.abc import Callable, Iterable, Mapping, MutableMapping, Sequence
from dataclasses import dataclass, field
from typing import NoReturn

import psutil

from prefork.addresses import unix_path_length_problem
from prefork.admin import AdminServer, open_admin
from prefork.notify import Announcer, been_ready
from prefork.pidfile import (
    PidFile,
    is_master,
    read_pid,
    read_status,
    status_path,
    write_atomically,
)
from prefork.signals import all_blocked, set_mask
from prefork.sockets import BindError, BindSpec, Listener, adopt_fd, adopt_socket

log = logging.getLogger("prefork")

ENV = "PREFORKD_UPGRADE"
OLD = ".oldbin"


@dataclass(frozen=True)
class PassedSocket:
    fd: int
    bind: str  # the configured address it was bound for, as `str(Address)`
    unix_inode: tuple[int, int] | None = None  # the socket file's (device, inode)


@dataclass(frozen=True)
class Handover:
    """What the old master tells the new one through PREFORKD_UPGRADE."""

    from_pid: int
    detached: bool  # the old master was a daemon: so is the new one (no terminal, syslog)
    sockets: tuple[PassedSocket, ...] = ()
    admin_fds: tuple[int, ...] = ()  # the status endpoint's TCP sockets (admin.bind)
    admin_bind: str | None = None  # the admin.bind they were bound for
    workers: int = 0  # the old master's pool size (TTIN/TTOU survive an upgrade)
    configured_workers: int = 0  # workers.count in the old master's configuration

    def encode(self) -> str:
        return json.dumps({
            "from": self.from_pid,
            "detached": self.detached,
            "sockets": [[s.fd, s.bind, s.unix_inode] for s in self.sockets],
            "admin": [list(self.admin_fds), self.admin_bind],
            "workers": [self.workers, self.configured_workers],
        })

    @classmethod
    def decode(cls, text: str) -> Handover:
        """Raises ValueError on anything but what encode() writes."""
        try:
            data = json.loads(text)
            sockets = tuple(
                PassedSocket(int(fd), str(bind), None if inode is None else
                             (int(inode[0]), int(inode[1])))
                for fd, bind, inode in data["sockets"]
            )
            workers, configured = data["workers"]
            admin_fds, admin_bind = data["admin"]
            return cls(int(data["from"]), bool(data["detached"]), sockets,
                       tuple(int(fd) for fd in admin_fds),
                       None if admin_bind is None else str(admin_bind),
                       int(workers), int(configured))
        except (TypeError, KeyError, ValueError, IndexError) as exc:
            raise ValueError(f"{ENV} is not what a preforkd master passes: {exc}") from None

    @classmethod
    def from_environ(cls, environ: MutableMapping[str, str]) -> Handover | None:
        """The handover this process was started with (removed from `environ`, so that
        nothing forked later takes it for its own), or None for a plain start."""
        text = environ.pop(ENV, None)
        if text is None:
            return None
        handover = cls.decode(text)
        for fd in (*(s.fd for s in handover.sockets), *handover.admin_fds):
            # at once: nothing a hook or a preloaded app starts may inherit them
            with contextlib.suppress(OSError):
                os.set_inheritable(fd, False)
        return handover

    def listeners(self, specs: Iterable[BindSpec]) -> list[Listener]:
        """The passed listening sockets, shared with the old master until it exits; each
        takes the bind entry of `specs` it was bound for (`configured`, as bind_all reuses
        sockets at a reload), or none if the new configuration dropped that address."""
        by_address = {str(spec.address): spec for spec in specs}
        adopted = []
        try:
            for passed in self.sockets:
                try:
                    listener = adopt_socket(passed.fd)
                except OSError as exc:
                    raise BindError(f"upgrade: the socket for {passed.bind} (fd {passed.fd}) "
                                    f"was not passed on: {exc.strerror or exc}") from None
                listener.unix_inode = passed.unix_inode
                listener.shared_with = self.from_pid
                listener.configured = by_address.get(passed.bind)
                adopted.append(listener)
        except BindError:
            for listener in adopted:
                listener.close()
            raise
        return adopted

    def admin_sockets(self, bind: str | None) -> list[socket.socket]:
        """The status endpoint's TCP sockets, if the new configuration's admin.bind is the
        one they were bound for; else they are closed and [] (admin.bind binds anew)."""
        sockets = [adopt_fd(fd) for fd in self.admin_fds]
        if bind != self.admin_bind:
            for sock in sockets:
                sock.close()
            return []
        return sockets


# The inits containers run their one process under (by name: comm, in /proc/PID/stat): each
# forwards signals to its child and exits with it, whatever else runs (tini is docker run
# --init's docker-init; catatonit is podman's --init).
INIT_SHIMS = frozenset({"tini", "tini-static", "docker-init", "dumb-init", "catatonit"})


# Shells a container's command runs under (`sh -c "preforkd ..."`): each waits for its
# child and exits with it.
WAITING_SHELLS = frozenset({"sh", "bash", "dash", "ash", "zsh", "busybox"})


def container_chain(proc: str = "/proc", parent: int | None = None) -> list[str] | None:
    """This process's ancestors, as "tini (pid 1)", when the exit of this master ends them
    all down to PID 1 of its pid namespace, and so the namespace (a container) with its
    every process: each is one of INIT_SHIMS or WAITING_SHELLS, and the chain reaches PID 1
    (`docker run --init` = tini -> preforkd; `sh -c` as the container's command, with or
    without --init). None otherwise: an init that outlives its children (systemd, s6, a
    supervisor) or a login shell's ancestors (sshd) are somewhere in the chain."""
    chain: list[str] = []
    pid = os.getppid() if parent is None else parent
    for _ in range(64):
        if pid <= 0:
            return None
        try:
            with open(f"{proc}/{pid}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            return None
        # "PID (COMM) STATE PPID ...": the name (comm) between the first "(" and the last ")"
        end = stat.rfind(b")")
        name = stat[stat.find(b"(") + 1 : end].decode("utf-8", "replace")
        if name not in INIT_SHIMS and name not in WAITING_SHELLS:
            return None
        chain.append(f"{name} (pid {pid})")
        if pid == 1:
            return chain
        pid = int(stat[end + 2 :].split()[1])  # the ppid field
    return None


def upgrade_partners(pid: int, pidfile: str) -> list[tuple[int, str]]:
    """The other master of an upgrade under way beside master `pid`, as (pid, "new"/"old"):
    the new master `pid` started (its child: it serves on when only its parent stops, which
    is how an upgrade ends), and the old master that started `pid` (its parent, named by
    PIDFILE.oldbin: it takes its files back and serves again when only the new one stops).
    A stop of the server must stop both. Empty when no upgrade is under way."""
    try:
        process = psutil.Process(pid)
        children = process.children()
        parent = process.ppid()
    except psutil.Error:
        return []
    found = [(child.pid, "new") for child in children if is_master(child.pid)]
    if parent > 1 and read_pid(pidfile + OLD) == parent and is_master(parent):
        found.append((parent, "old"))
    return found


def new_master_command(
    orig_argv: Sequence[str] | None = None, script: str | None = None
) -> list[str]:
    """The command line that started this process. A console script (`preforkd ...`, the
    interpreter's first argument) is executed itself, so that its first line picks the
    interpreter installed now (a new virtualenv, a new Python); anything else (`python -m
    prefork ...`, interpreter options) runs again under this interpreter. Whatever is
    installed at those paths now is what the new master runs."""
    argv = list(sys.orig_argv if orig_argv is None else orig_argv)
    script = sys.argv[0] if script is None else script
    if len(argv) > 1 and argv[1] == script and os.access(script, os.X_OK):
        return [script, *argv[2:]]
    return [sys.executable, *argv[1:]]


def started_in() -> str:
    """The working directory as the shell named it: $PWD when it is the same directory as
    getcwd() (which resolves symbolic links), so that a new master started in `current/`
    after a deploy moved that link runs in the new release (as gunicorn's util.getcwd)."""
    cwd = os.getcwd()
    pwd = os.environ.get("PWD")
    try:
        if pwd and os.path.samefile(pwd, cwd):
            return pwd
    except OSError:
        pass
    return cwd


@dataclass
class Upgrader:
    """The old master's side of USR2: start the new master, and take everything back if it
    exits while this master still runs."""

    command: list[str]
    cwd: str  # where the master was started: its command line's relative paths mean that
    environ: Mapping[str, str]  # the environment the master was started with
    detached: bool
    caught: tuple[int, ...]  # the master's signals: reset for the new master (see _exec)
    under_systemd: bool = False
    pidfile: PidFile | None = None
    announce: Announcer | None = None
    admin: AdminServer | None = None
    admin_implied: bool = True  # the status socket is PIDFILE.sock, not admin.socket
    admin_bind: str | None = None
    replaced: int | None = None  # the master this one replaced (started by USR2)
    pid: int | None = None  # the new master, while it has not exited
    moved: list[tuple[str, str]] = field(default_factory=list)  # (from, to), for a rollback
    new_status: str | None = None  # the status file the new master writes once it is ready

    def refusal(self, listeners: list[Listener]) -> str | None:
        """Why an upgrade cannot start now, or None."""
        if self.pid is not None:
            return f"an upgrade is under way (new master pid {self.pid})"
        if self.under_systemd:
            return ("under systemd the service's main process cannot hand over to another: "
                    "`systemctl restart` (with socket activation no connection is refused "
                    "meanwhile), or HUP to reload the application")
        if os.getpid() == 1:
            # a container's main process (PID 1 of its pid namespace): when it exits, the
            # kernel kills every other process in the namespace, the new master with it
            return ("this master is PID 1 (a container's main process): its exit would end "
                    "the new master too; restart the container instead, or HUP to reload "
                    "the application")
        chain = container_chain()
        if chain is not None:
            # tini (docker run --init), dumb-init, catatonit, a `sh -c` command: each exits
            # as soon as its one child does, and PID 1 takes the namespace down with it
            what = (f"this master's parent is {chain[0]}, a container's init" if len(chain) == 1
                    else f"this master's ancestors, {' <- '.join(chain)}, end in a container's "
                    "PID 1 and each")
            return (f"{what} that exits when this master does, ending the new master too; "
                    "restart the container instead, or HUP to reload the application")
        if self.replaced is not None and is_master(self.replaced):
            return f"the master this one replaced (pid {self.replaced}) still runs; stop it first"
        if any(listener.inherited for listener in listeners):
            return ("the sockets belong to systemd: restart the service instead (with socket "
                    "activation no connection is refused meanwhile)")
        moved = self.old_admin_path()
        if moved is not None and unix_path_length_problem(moved):
            return (f"the status socket's name while the new master runs, {moved}, would be "
                    "too long for a unix socket: set a shorter admin.socket")
        return None

    def old_admin_path(self) -> str | None:
        """Where the status socket goes while the new master runs: PIDFILE.oldbin.sock,
        where `preforkd status -p PIDFILE.oldbin` finds it, or ADMIN.SOCKET.oldbin."""
        admin = self.admin
        if admin is None or admin.unix_path is None:
            return None
        if self.admin_implied and self.pidfile is not None:
            return f"{self.pidfile.path}{OLD}.sock"
        return admin.unix_path + OLD

    def start(
        self,
        listeners: list[Listener],
        workers: tuple[int, int],
        pre_exec: Callable[[], bool] = lambda: True,
    ) -> int:
        """Move this master's files aside, fork and exec the new master; its pid. Raises
        OSError (files put back) if it cannot be started. `pre_exec()` runs in the child
        before exec, with os.environ the new master's; False stops it there."""
        self.moved = []
        admin_target = self.old_admin_path()  # named before the pidfile's name changes
        try:
            if self.pidfile is not None:
                path = self.pidfile.path
                self._copy_aside(path, path + OLD)
                self._move(status_path(path), status_path(path + OLD))
                self.new_status = status_path(path)
            self._move_admin_socket(admin_target)
        except OSError:
            self.put_back()
            raise
        admin_tcp = self.admin.tcp_sockets() if self.admin is not None else []
        handover = Handover(
            os.getpid(),
            self.detached,
            tuple(
                PassedSocket(lst.fd, str(lst.configured.address), lst.unix_inode)
                for lst in listeners
                if lst.configured is not None
            ),
            tuple(sock.fileno() for sock in admin_tcp),
            self.admin_bind,
            *workers,
        )
        environ = dict(self.environ)
        environ[ENV] = handover.encode()
        fds = [lst.fd for lst in listeners] + [sock.fileno() for sock in admin_tcp]
        try:
            with all_blocked():  # the child unblocks them once its handlers are set
                pid = os.fork()
                if pid == 0:
                    _exec(self.command, self.cwd, environ, fds, self.caught, pre_exec)
        except OSError:
            self.put_back()
            raise
        self.pid = pid
        for listener in listeners:
            listener.shared_with = pid
        if self.admin is not None:
            self.admin.close_tcp()  # the new master's now: one port, one master
        return pid

    def new_master_ready(self) -> bool | None:
        """Whether the new master has been ready (it writes its status file, beside the
        pidfile it took over, when its whole pool first serves); None when this master cannot
        tell (no pidfile: no status file either) or no new master runs."""
        if self.pid is None or self.new_status is None:
            return None
        status = read_status(self.new_status)
        return status is not None and been_ready(status, self.pid)

    def _move_admin_socket(self, target: str | None) -> None:
        if target is not None and self.admin is not None and self.admin.unix_path is not None:
            self._move(self.admin.unix_path, target)

    def _copy_aside(self, source: str, target: str) -> None:
        """This master's pid goes under `target` too, and `source` keeps naming it until the
        new master writes its own there (atomically): no moment without a pidfile for
        `preforkd status`, `stop` or a supervisor to read. A rollback renames `target` back
        over whatever the new master left."""
        write_atomically(target, f"{os.getpid()}\n")
        self.moved.append((source, target))
        self._renamed(source, target)

    def _move(self, source: str, target: str) -> None:
        """Rename `source` (which may not exist yet: the name changes all the same)."""
        try:
            os.replace(source, target)
        except FileNotFoundError:
            pass
        self.moved.append((source, target))
        self._renamed(source, target)

    def _renamed(self, source: str, target: str) -> None:
        """Whatever this master keeps open or writes under `source` goes by `target` now."""
        if self.pidfile is not None and self.pidfile.path == source:
            self.pidfile.path = target
        if self.announce is not None and self.announce.status_path == source:
            self.announce.status_path = target
        if self.admin is not None and self.admin.unix_path == source:
            self.admin.unix_path = target

    def put_back(self) -> None:
        """The new master is gone: this master's files take their names again (a name the
        new master left behind, dead, is replaced)."""
        for source, target in reversed(self.moved):
            try:
                os.replace(target, source)
            except FileNotFoundError:
                pass
            except OSError as exc:
                log.warning("upgrade: cannot move %s back to %s: %s", target, source, exc)
                continue
            self._renamed(target, source)
        self.moved = []
        if self.admin is not None and self.admin_bind is not None and not self.admin.tcp_sockets():
            try:
                sockets, _ = open_admin(None, self.admin_bind)
            except OSError as exc:
                log.warning("upgrade: %s", exc)
            else:
                self.admin.add(sockets)

    def ended(self, pid: int, take_back: bool = True) -> bool:
        """Whether `pid` was the new master; if so, this master is the only one again, and
        takes its file names back (`take_back`; not when it is stopping: its files go with
        it under the names they have)."""
        if pid != self.pid:
            return False
        self.pid = None
        if take_back:
            self.put_back()
        else:
            self.moved = []
        return True


# Ignored from the exec until the new master's handlers exist (see _exec).
HELD = frozenset({signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2, signal.SIGTTIN, signal.SIGTTOU})


def _exec(command: list[str], cwd: str, environ: dict[str, str], fds: list[int],
          caught: tuple[int, ...], pre_exec: Callable[[], bool]) -> NoReturn:
    """In the forked child: the new master starts as a fresh process would, with an empty
    signal mask and only the passed sockets beyond stdio. Of the master's signals (`caught`),
    those an operator sends to the whole process group and whose default would end or
    suspend the process (HUP, USR1, USR2, TTIN, TTOU) are ignored until the new master
    installs its handlers, which it does first thing (Startup.run); the others (TERM, INT,
    QUIT) keep their defaults, so a stop still stops it. Ignored, not blocked: a blocked
    mask would outlive the exec of a release that does not unblock it (a rollback to an
    older one), and be inherited by whatever it starts."""
    try:
        signal.set_wakeup_fd(-1)
        for signum in caught:
            signal.signal(signum, signal.SIG_IGN if signum in HELD else signal.SIG_DFL)
        os.environ.clear()
        os.environ.update(environ)
        if not pre_exec():
            os._exit(127)
        environ = dict(os.environ)  # as the hook left it
        for fd in (0, 1, 2):  # a daemon's stdio may be close-on-exec (python-daemon's are)
            try:
                os.set_inheritable(fd, True)
            except OSError:
                null = os.open(os.devnull, os.O_RDWR)
                if null != fd:
                    os.dup2(null, fd)
                    os.close(null)
                else:
                    os.set_inheritable(fd, True)  # os.open made it close-on-exec
        for fd in fds:
            os.set_inheritable(fd, True)
        os.chdir(cwd)
        set_mask(signal.SIG_SETMASK, ())
        os.execve(command[0], command, environ)
    except BaseException as exc:  # noqa: BLE001 - reported, and the child leaves below
        try:
            os.write(2, f"preforkd: upgrade: cannot start {command[0]}: {exc}\n".encode())
        except OSError:
            pass
    finally:
        os._exit(127)
