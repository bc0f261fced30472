"""The `preforkd` command: run the server, check a configuration, or reload a running one.

Exit status: 0 success, 1 runtime failure (an address cannot be bound, a live instance holds
the pidfile, a reload failed), 2 configuration error (nothing was bound or forked), 3 the
application could not be loaded at startup.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import signal
import ssl
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from typing import IO

from prefork import __version__, status
from prefork.admin import AdminServer, admin_socket_path, fetch, open_admin, status_table
from prefork.config import Config, ConfigError, bind_address, load
from prefork.daemon import detach, under_systemd
from prefork.hooks import HookError, Hooks, ServerInfo
from prefork.loader import AppLoadError, Reimport, load_app, prepare
from prefork.logs import Logs
from prefork.master import EXIT_APP_FAILED, EXIT_RUNTIME_ERROR, Generation, Master
from prefork.notify import Announcer, SdNotify, read_status
from prefork.pidfile import PidFile, PidFileError, is_preforkd, running_pid
from prefork.privileges import resolve_gid, uid_of
from prefork.scoreboard import Scoreboard
from prefork.signals import SignalQueue
from prefork.sockets import (
    BindError,
    BindSpec,
    Listener,
    bind_all,
    defer_accept,
    passed_socket_match,
    systemd_listeners,
)
from prefork.system import System
from prefork.tls import server_context

log = logging.getLogger("prefork")

EXIT_CONFIG_ERROR = 2
DEFAULT_CONFIG = "/etc/preforkd.yaml"
MASTER_SIGNALS = (
    signal.SIGHUP,
    signal.SIGTERM,
    signal.SIGINT,
    signal.SIGQUIT,
    signal.SIGTTIN,
    signal.SIGTTOU,
    signal.SIGUSR1,
    signal.SIGUSR2,  # caught only to say it does nothing: its default action kills
    signal.SIGCHLD,
)
# Slots for every worker of two generations at the largest allowed pool (reload overlap).
SCOREBOARD_SLOTS = 2 * 1024 + 16


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="preforkd",
        description="A preforking application server for WSGI apps and TCP stream handlers.",
    )
    p.add_argument(
        "command",
        nargs="?",
        choices=("run", "check", "reload", "status"),
        default="run",
        help="run the server (default); check the configuration and exit; reload the "
        "running server (HUP to the pid in the pidfile) and report the outcome; or show the "
        "running server's workers",
    )
    p.add_argument("-c", "--config", metavar="FILE",
                   help=f"configuration file (default: {DEFAULT_CONFIG} if it exists)")
    p.add_argument("-b", "--bind", action="append", metavar="ADDR",
                   help="address to listen on, repeatable: HOST:PORT, [V6]:PORT, unix:PATH "
                        "(replaces the file's list)")
    p.add_argument("-w", "--workers", type=int, metavar="N", help="worker processes")
    p.add_argument("--app", metavar="MODULE:CALLABLE", help="the WSGI app or TCP handler")
    p.add_argument("--protocol", choices=("http", "tcp"))
    p.add_argument("--pythonpath", action="append", metavar="DIR",
                   help="directory prepended to sys.path, repeatable")
    p.add_argument("--preload", action="store_true", default=None,
                   help="import the app in the master before forking")
    p.add_argument("--timeout", type=float, metavar="SECONDS", help="workers.timeout")
    p.add_argument("--graceful-timeout", type=float, metavar="SECONDS",
                   help="workers.graceful_timeout")
    p.add_argument("--max-requests", type=int, metavar="N", help="workers.max_requests")
    p.add_argument("--keepalive", type=float, metavar="SECONDS", help="http.keepalive_timeout")
    p.add_argument("--reload", action="store_true", default=None,
                   help="development: restart workers when the code changes")
    p.add_argument("--log-level", choices=("debug", "info", "warning", "error", "critical"))
    p.add_argument("--error-log", metavar="PATH", help='"-" for stderr')
    p.add_argument("--access-log", metavar="PATH", help='"-" for stdout')
    p.add_argument("-D", "--daemon", action="store_true", default=None,
                   help="detach into the background")
    p.add_argument("--foreground", action="store_true",
                   help="stay in the foreground even if the configuration says daemon: true")
    p.add_argument("-p", "--pidfile", metavar="PATH", help="write the master's pid here")
    p.add_argument("-u", "--user", metavar="USER", help="run the workers as this user")
    p.add_argument("-g", "--group", metavar="GROUP", help="run the workers with this group")
    p.add_argument("--wait", type=float, default=300.0, metavar="SECONDS",
                   help="reload: how long to wait for the outcome (default 300)")
    p.add_argument("--json", action="store_true", help="status: print the JSON document")
    p.add_argument("--version", action="version", version=f"preforkd {__version__}")
    return p


OVERRIDES = {
    "bind": "bind",
    "workers": "workers.count",
    "app": "app",
    "protocol": "protocol",
    "pythonpath": "pythonpath",
    "preload": "preload_app",
    "timeout": "workers.timeout",
    "graceful_timeout": "workers.graceful_timeout",
    "max_requests": "workers.max_requests",
    "keepalive": "http.keepalive_timeout",
    "log_level": "logging.level",
    "error_log": "logging.error_log",
    "access_log": "logging.access_log",
    "daemon": "daemon",
    "reload": "reload",
    "pidfile": "pidfile",
    "user": "user",
    "group": "group",
}


def overrides_from(args: argparse.Namespace) -> dict[str, object]:
    return {
        key: getattr(args, dest)
        for dest, key in OVERRIDES.items()
        if getattr(args, dest) is not None
    }


def config_path(args: argparse.Namespace) -> str | None:
    """Absolute, so that a reload after detaching (working directory "/") finds it."""
    if args.config:
        return os.path.abspath(str(args.config))
    return DEFAULT_CONFIG if os.path.exists(DEFAULT_CONFIG) else None


def main(argv: Sequence[str] | None = None) -> int:
    inherited = open_fds()  # whatever our caller left open is not ours to keep as a daemon
    args = parser().parse_args(argv)
    path = config_path(args)
    overrides = overrides_from(args)
    try:
        config = load(path, overrides)
    except ConfigError as exc:
        print(f"preforkd: configuration error: {exc}", file=sys.stderr)
        return EXIT_CONFIG_ERROR
    if args.command == "check":
        return check(config)
    if args.command == "reload":
        return reload_running(config, args.wait)
    if args.command == "status":
        return show_status(config, args.json)
    started_in = os.getcwd()  # command-line paths mean the same on every reload
    return Startup(
        config, lambda: load(path, overrides, started_in), args.foreground, inherited,
        daemon_flag=bool(args.daemon),
    ).run()


# --- sockets ---------------------------------------------------------------------------------


def bind_specs(config: Config) -> list[BindSpec]:
    return [
        BindSpec(
            bind_address(b),
            b.mode,
            None if b.owner is None else uid_of(b.owner),
            None if b.group is None else resolve_gid(b.group),
            b.tls is not None,
        )
        for b in config.bind
    ]


def tls_contexts(config: Config, listeners: list[Listener]) -> dict[int, ssl.SSLContext]:
    """The TLS context of each listener whose bind entry has `tls`. A socket systemd passed
    takes the `tls` of the entry naming its address (`passed_socket_match`; the best match);
    a `tls` entry that names none of them is an error (ValueError), not plain HTTP."""
    wanted = [(b, bind_address(b)) for b in config.bind if b.tls is not None]
    contexts = {}
    used: set[int] = set()
    for listener in listeners:
        if listener.configured is not None:  # bound by us: its own entry, port 0 included
            entry = next(
                (i for i, (_, a) in enumerate(wanted) if a == listener.configured.address),
                None,
            )
        else:
            scores = [passed_socket_match(listener.address, a) for _, a in wanted]
            best = max(scores, default=0)
            entry = scores.index(best) if best else None
        if entry is not None:
            tls = wanted[entry][0].tls
            assert tls is not None
            listener.tls = True
            contexts[listener.fd] = server_context(tls)
            used.add(entry)
    unmatched = [str(a) for i, (_, a) in enumerate(wanted) if i not in used]
    if unmatched:
        passed = ", ".join(str(listener.address) for listener in listeners)
        raise ValueError(
            f"bind {', '.join(unmatched)} has tls, but none of the sockets systemd passed "
            f"({passed}) is at that address; name them alike, or drop tls from the entry"
        )
    return contexts


def open_listeners(config: Config) -> list[Listener]:
    listeners = systemd_listeners(os.environ)
    if listeners:
        log.info("using %d socket(s) passed by systemd", len(listeners))
    else:
        listeners = bind_all(bind_specs(config), config.backlog)
    if config.protocol == "http":
        for listener in listeners:
            defer_accept(listener, config.http.defer_accept)
    return listeners


def open_fds() -> set[int]:
    """This process's open file descriptors above stdio."""
    return {int(fd) for fd in os.listdir("/proc/self/fd") if int(fd) > 2}


def raise_fd_limit(per_worker: int) -> None:
    """Lift the soft RLIMIT_NOFILE to the hard limit (as nginx's worker_rlimit_nofile), so a
    worker can hold workers.max_connections sockets; say so when even that is too low."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = hard if hard != resource.RLIM_INFINITY else max(soft, per_worker + 256)
    if wanted > soft:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
            soft = wanted
        except (ValueError, OSError):
            pass
    if soft < per_worker + 64:
        log.warning(
            "the file descriptor limit (%d) is below workers.max_connections (%d); "
            "raise LimitNOFILE / ulimit -n", soft, per_worker
        )


def apply_env(
    env: tuple[tuple[str, str], ...],
    previous: tuple[tuple[str, str], ...] = (),
    inherited: dict[str, str] | None = None,
) -> dict[str, str | None]:
    """Set `env` in this process; a name only `previous` set goes back to what the process
    inherited (`inherited`, the environment at startup), as after a fresh start. Returns
    what to put back to undo it."""
    undo: dict[str, str | None] = {}
    for name, _ in previous:
        undo[name] = os.environ.pop(name, None)
        if inherited is not None and name in inherited:
            os.environ[name] = inherited[name]
    for name, value in env:
        undo.setdefault(name, os.environ.get(name))
        os.environ[name] = value
    return undo


def undo_env(undo: dict[str, str | None]) -> None:
    for name, value in undo.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


def reloader(
    reread: Callable[[], Config], reimport: Reimport, inherited: dict[str, str]
) -> Callable[[Generation, list[Listener]], Generation]:
    """HUP: read and validate the configuration again, keep the sockets whose addresses did
    not change (`held`: every socket the master has open), bind the new ones, load the hooks
    and, with preload_app, import the application afresh. Raises (and the master keeps
    serving the old generation, its environment and its sockets) on any error."""

    def reload(current: Generation, held: list[Listener]) -> Generation:
        config = reread()
        if any(listener.inherited for listener in current.listeners):
            listeners = current.listeners  # systemd owns the addresses
        else:
            listeners = bind_all(bind_specs(config), config.backlog, reuse=held)
        if config.protocol == "http":
            for listener in listeners:
                defer_accept(listener, config.http.defer_accept)
        undo = apply_env(config.env, current.config.env, inherited)
        try:
            contexts = tls_contexts(config, listeners)
            hooks = Hooks(config.hooks)
            app = None
            if config.preload_app:
                prepare(config.pythonpath, config.chdir)
                app = reimport.reload(config.app) if reimport.modules else reimport.load(
                    config.app
                )
        except Exception:
            undo_env(undo)
            for listener in listeners:
                if listener not in held:
                    listener.close()
            raise
        for listener in listeners:
            if listener not in held:
                log.info("listening at %s", listener.url(config.protocol))
        generation = Generation(0, config, listeners, app, contexts, hooks)
        generation.environ = dict(os.environ)
        generation.env_undo = lambda: undo_env(undo)
        return generation

    return reload


# --- running ---------------------------------------------------------------------------------


class Startup:
    """Everything between a valid configuration and the master's loop, in order: pidfile
    check, logs, preload, bind, detach, pidfile, master. A failure before the server is
    ready reaches the terminal (and a daemon's launcher) with its reason."""

    def __init__(
        self,
        config: Config,
        reread: Callable[[], Config],
        foreground: bool,
        inherited_fds: set[int] | None = None,
        daemon_flag: bool = False,
    ) -> None:
        self.inherited_fds = inherited_fds or set()
        self.config = config
        self.reread = reread
        # `daemon_flag`: -D on the command line, which a Type=forking unit's ExecStart gives
        self.stays = under_systemd(os.environ, daemon_flag) if config.daemon else ""
        self.detach = config.daemon and not foreground and not self.stays
        # The terminal, kept before logging may re-point fd 2 at a file.
        self.console: IO[str] = os.fdopen(os.dup(2), "w", buffering=1)
        self.pidfile = PidFile(config.pidfile) if config.pidfile else None
        self.logs: Logs | None = None
        self.tls: dict[int, ssl.SSLContext] = {}
        self.hooks = Hooks()
        self.reimport = Reimport()
        self.inherited_env: dict[str, str] = {}

    def fail(self, message: str, code: int = EXIT_RUNTIME_ERROR) -> int:
        if self.logs is not None:
            log.error("%s", message)
        if self.console.closed:
            pass  # detached: the launcher prints what announce.failed sent it
        elif self.logs is None or self.logs.syslog or self.logs.error_path:
            print(f"preforkd: {message}", file=self.console)
        return code

    def run(self) -> int:
        config = self.config
        if self.pidfile is not None:
            try:
                self.pidfile.check()
            except PidFileError as exc:
                return self.fail(str(exc))
        if config.umask is not None:
            os.umask(config.umask)
        try:
            self.logs = self.open_logs()
        except OSError as exc:
            return self.fail(f"cannot open the logs: {exc}")
        log.info("preforkd %s starting (pid %d)", __version__, os.getpid())
        if self.stays:
            log.info("daemon: staying in the foreground: %s", self.stays)
        raise_fd_limit(config.workers.max_connections)
        self.inherited_env = dict(os.environ)
        apply_env(config.env)
        prepare(config.pythonpath, None)  # hook modules (and a preloaded app) live there
        try:
            self.hooks = Hooks(config.hooks)
        except HookError as exc:
            return self.fail(str(exc))
        self.hooks.call("on_starting", ServerInfo(config))
        app = None
        if config.preload_app:
            try:
                prepare(config.pythonpath, config.chdir)
                app = self.reimport.load(config.app)
            except AppLoadError as exc:
                log.error("cannot load the application:\n%s", traceback.format_exc())
                return self.fail(str(exc), EXIT_APP_FAILED)
        try:
            listeners = open_listeners(config)
            self.tls = tls_contexts(config, listeners)
        except BindError as exc:
            return self.fail(str(exc))
        except (OSError, ValueError) as exc:
            return self.fail(f"TLS: {exc}")
        for listener in listeners:
            log.info("listening at %s", listener.url(config.protocol))
        sd, watchdog = SdNotify.from_environ(os.environ)
        ready_fd = None
        if self.detach:
            preserve = [lst.fd for lst in listeners] + self.logs.fds()
            if sd is not None:
                preserve += sd.fds()
            mask = os.umask(0)
            os.umask(mask)  # read without changing it: the daemon keeps this umask
            keep = (open_fds() - self.inherited_fds) | set(preserve)
            keep.discard(self.console.fileno())  # the launcher's terminal stays the launcher's
            ready_fd = detach(
                sorted(keep),
                mask,
                self.error_stream(),
                config.workers.boot_timeout + 15,
                self.console,
            )
            log.info("detached: master pid %d", os.getpid())
        announce = Announcer(
            sd,
            watchdog,
            ready_fd,
            f"{config.pidfile}.status" if config.pidfile else None,
        )
        try:
            if self.pidfile is not None:
                self.pidfile.write(os.getpid())
            return self.serve(listeners, app, announce)
        except PidFileError as exc:
            announce.failed(str(exc))
            return self.fail(str(exc))
        finally:
            if self.pidfile is not None:
                self.pidfile.remove()
            announce.close()

    def open_logs(self) -> Logs:
        cfg = self.config.logging
        use_syslog = cfg.syslog.enabled or (self.detach and cfg.error_log == "-")
        return Logs(
            cfg.level,
            cfg.error_log,
            cfg.access_log,
            cfg.access_log_format,
            (cfg.syslog.address, cfg.syslog.facility, cfg.syslog.ident) if use_syslog else None,
            # the files are chowned to the workers' user, who must reopen them on USR1
            workers_as=(self.config.user, self.config.group),
        )

    def error_stream(self) -> IO[str] | None:
        """The daemon's stderr: the error log file, or None (/dev/null) with syslog or '-'."""
        assert self.logs is not None
        if self.logs.syslog is None and self.logs.error_path is not None:
            return open(self.logs.error_path, "a", encoding="utf-8")  # noqa: SIM115
        return None

    def serve(self, listeners: list[Listener], app: object, announce: Announcer) -> int:
        config = self.config
        admin_path = admin_socket_path(config.admin.socket, config.pidfile)
        try:
            admin_sockets, admin_inode = open_admin(admin_path, config.admin.bind)
        except OSError as exc:
            announce.failed(str(exc))
            return self.fail(str(exc))
        signals = SignalQueue(catch=MASTER_SIGNALS)
        close_in_child = list(signals.fds())  # the announcer's own fds are added per fork
        master = Master(
            kernel=System(),
            signals=signals,
            scoreboard=Scoreboard(SCOREBOARD_SLOTS),
            # its own copy of the environment: a reload applies the next generation's `env:`
            # to the master's before its canary boots, and an old worker forked meanwhile
            # (a crash, a recycle) must not inherit it, nor keep it if the reload fails
            current=Generation(
                1, self.config, listeners, app, self.tls, self.hooks, dict(os.environ)
            ),
            logs=self.logs,
            reloader=reloader(self.reread, self.reimport, self.inherited_env),
            announce=announce,
            close_in_child=close_in_child,
        )
        if admin_sockets:
            master.admin = AdminServer(
                admin_sockets, lambda path: status.respond(master, path), admin_path, admin_inode
            )
            where = [admin_path] if admin_path else []
            where += [config.admin.bind] if config.admin.bind else []
            log.info("status endpoint at %s", ", ".join(str(w) for w in where))
        try:
            code = master.run()
        finally:
            master.current.hooks.call("on_exit", master.server_info())
            if master.admin is not None:
                master.admin.close()
            for listener in master.all_listeners():
                if listener.sock.fileno() >= 0:
                    listener.close()
        if not master.ever_ready:
            announce.failed(master.failure or f"the server stopped before it was ready ({code})")
        log.info("stopped")
        return code


# --- other commands ----------------------------------------------------------------------------


def check(config: Config) -> int:
    """Validate (done by now), import the app in a forked child with the configured `env:`
    (as a worker would), and test-bind every address -- unless the pidfile names a running
    server, which holds them: checking a file before `preforkd reload` is the usual use."""
    print(f"configuration OK: {config.source or '(command line)'}")
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            apply_env(config.env)
            prepare(config.pythonpath, config.chdir)
            load_app(config.app)
            code = 0
        except AppLoadError as exc:
            traceback.print_exc()
            print(f"preforkd: cannot load the application: {exc}", file=sys.stderr)
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        return EXIT_APP_FAILED
    print(f"application OK: {config.app}")
    running = running_pid(config.pidfile) if config.pidfile else None
    if running is not None:
        print(f"not test-binding: preforkd runs as pid {running} (from {config.pidfile}) and "
              "holds the addresses; a reload keeps those that did not change")
        return 0
    try:
        listeners = bind_all(bind_specs(config), config.backlog)
    except BindError as exc:
        print(f"preforkd: {exc}", file=sys.stderr)
        return EXIT_RUNTIME_ERROR
    for listener in listeners:
        print(f"can bind {listener.url(config.protocol)}")
        listener.close()
    return 0


def show_status(config: Config, as_json: bool) -> int:
    """`preforkd status`: the running server's workers, from its status endpoint."""
    path = admin_socket_path(config.admin.socket, config.pidfile)
    try:
        body = fetch(path, config.admin.bind, "/status")
    except OSError as exc:
        print(f"preforkd: cannot read the status: {exc}", file=sys.stderr)
        return EXIT_RUNTIME_ERROR
    if as_json:
        sys.stdout.write(body.decode())
    else:
        print(status_table(json.loads(body)))
    return 0


def reload_running(config: Config, wait: float) -> int:
    """`preforkd reload`: HUP the master named by the pidfile and wait for the outcome it
    writes to PIDFILE.status. Exit 0 when the new generation serves, 1 with the reason if
    the reload failed (the old generation keeps serving)."""
    if not config.pidfile:
        print("preforkd: reload needs `pidfile` in the configuration (or --pidfile) to find "
              "the running server", file=sys.stderr)
        return EXIT_CONFIG_ERROR
    pid = running_pid(config.pidfile)
    if pid is None:
        print(f"preforkd: not running (no live pid in {config.pidfile})", file=sys.stderr)
        return EXIT_RUNTIME_ERROR
    status_path = f"{config.pidfile}.status"
    before = read_status(status_path) or {}
    # a file another master left (one that died without cleaning up) says nothing of this one
    serial = before.get("serial", 0) if before.get("pid") == pid else 0
    os.kill(pid, signal.SIGHUP)
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        status = read_status(status_path)
        if (
            status is not None
            and status.get("pid") == pid
            and isinstance(status.get("serial"), int)
            and status["serial"] > serial  # type: ignore[operator]
            and status.get("state") == "done"
        ):
            ok = status.get("ok") is True
            print(f"preforkd: {status.get('message', '')}", file=sys.stdout if ok else sys.stderr)
            return 0 if ok else EXIT_RUNTIME_ERROR
        if not is_preforkd(pid):
            print(f"preforkd: the server (pid {pid}) exited during the reload", file=sys.stderr)
            return EXIT_RUNTIME_ERROR
        time.sleep(0.05)
    print(f"preforkd: no reload result within {wait:.0f}s", file=sys.stderr)
    return EXIT_RUNTIME_ERROR
