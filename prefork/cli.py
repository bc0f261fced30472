"""The `preforkd` command: run the server, or check a configuration.

Exit status: 0 success, 1 runtime failure (e.g. an address cannot be bound), 2 configuration
error (nothing was bound or forked), 3 the application could not be loaded at startup.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import traceback
from collections.abc import Callable, Sequence

from prefork import __version__
from prefork.addresses import Address
from prefork.config import Config, ConfigError, bind_address, load
from prefork.loader import AppLoadError, load_app, prepare
from prefork.logs import Logs
from prefork.master import EXIT_APP_FAILED, EXIT_RUNTIME_ERROR, Generation, Master
from prefork.scoreboard import Scoreboard
from prefork.signals import SignalQueue
from prefork.sockets import BindError, Listener, bind_all, systemd_listeners
from prefork.system import System

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
    signal.SIGCHLD,
)
# Slots for every worker of two generations at the largest allowed pool (reload overlap).
SCOREBOARD_SLOTS = 2 * 1024 + 16


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="preforkd",
        description="A preforking application server for WSGI apps and TCP stream handlers.",
    )
    p.add_argument("command", nargs="?", choices=("run", "check"), default="run",
                   help="run the server (default), or check the configuration and exit")
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
    p.add_argument("--log-level", choices=("debug", "info", "warning", "error", "critical"))
    p.add_argument("--error-log", metavar="PATH", help='"-" for stderr')
    p.add_argument("--access-log", metavar="PATH", help='"-" for stdout')
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
}


def overrides_from(args: argparse.Namespace) -> dict[str, object]:
    return {
        key: getattr(args, dest)
        for dest, key in OVERRIDES.items()
        if getattr(args, dest) is not None
    }


def config_path(args: argparse.Namespace) -> str | None:
    if args.config:
        return str(args.config)
    return DEFAULT_CONFIG if os.path.exists(DEFAULT_CONFIG) else None


def main(argv: Sequence[str] | None = None) -> int:
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
    return serve(config, lambda: load(path, overrides))


def reloader(reread: Callable[[], Config]) -> Callable[[Generation], Generation]:
    """HUP: read and validate the configuration again, keep the sockets whose addresses did
    not change, bind the new ones. Raises (and the master keeps serving) on any error."""

    def reload(current: Generation) -> Generation:
        config = reread()
        if any(listener.inherited for listener in current.listeners):
            listeners = current.listeners  # systemd owns the addresses
        else:
            listeners = bind_all(bind_specs(config), config.backlog, reuse=current.listeners)
            for listener in listeners:
                if listener not in current.listeners:
                    log.info("listening at %s", listener.url(config.protocol))
        app = None
        if config.preload_app:
            app = current.app
            if app is None:
                prepare(config.pythonpath, config.chdir)
                app = load_app(config.app)
            else:
                log.warning("preload_app: the application code is not reloaded by HUP")
        return Generation(0, config, listeners, app)

    return reload


def bind_specs(config: Config) -> list[tuple[Address, int | None]]:
    return [(bind_address(b), b.mode) for b in config.bind]


def open_listeners(config: Config) -> list[Listener]:
    listeners = systemd_listeners(os.environ)
    if listeners:
        log.info("using %d socket(s) passed by systemd", len(listeners))
        return listeners
    return bind_all(bind_specs(config), config.backlog)


def serve(config: Config, reread: Callable[[], Config]) -> int:
    logs = Logs(
        config.logging.level,
        config.logging.error_log,
        config.logging.access_log,
        config.logging.access_log_format,
    )
    log.info("preforkd %s starting (pid %d)", __version__, os.getpid())
    app = None
    if config.preload_app:
        try:
            prepare(config.pythonpath, config.chdir)
            app = load_app(config.app)
        except AppLoadError:
            log.error("cannot load the application %r:\n%s", config.app, traceback.format_exc())
            return EXIT_APP_FAILED
    try:
        listeners = open_listeners(config)
    except BindError as exc:
        log.error("%s", exc)
        return EXIT_RUNTIME_ERROR
    for listener in listeners:
        log.info("listening at %s", listener.url(config.protocol))
    scoreboard = Scoreboard(SCOREBOARD_SLOTS)
    signals = SignalQueue(catch=MASTER_SIGNALS)
    master = Master(
        kernel=System(),
        signals=signals,
        scoreboard=scoreboard,
        current=Generation(1, config, listeners, app),
        logs=logs,
        reloader=reloader(reread),
        close_in_child=list(signals.fds()),
    )
    try:
        code = master.run()
    finally:
        for listener in master.all_listeners():
            if listener.sock.fileno() >= 0:
                listener.close()
    log.info("stopped")
    return code


def check(config: Config) -> int:
    """Validate (done by now), import the app in a forked child, and test-bind every address."""
    print(f"configuration OK: {config.source or '(command line)'}")
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
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
    try:
        listeners = bind_all(bind_specs(config), config.backlog)
    except BindError as exc:
        print(f"preforkd: {exc}", file=sys.stderr)
        return EXIT_RUNTIME_ERROR
    for listener in listeners:
        print(f"can bind {listener.url(config.protocol)}")
        listener.close()
    return 0
