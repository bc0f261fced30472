"""The `preforkd` command: run the server, check a configuration, reload or stop a running
one, or show its status.

Exit status, the same for `run` and `check` (so that `check` predicts how a start fails):
  0  success;
  1  runtime failure: an address or the status endpoint cannot be bound, a hook cannot be
     imported (it is imported in the master before anything is bound), a live instance holds
     the pidfile; `reload`: the reload failed, no server runs, no outcome in time; `status`:
     no server runs, or its status endpoint does not answer; `stop`: the master still runs
     at the deadline;
  2  configuration error: the file or a flag is invalid, or a setting the command needs is
     missing (`reload`, `status` and `stop` without a pidfile); nothing was bound, forked or
     signalled; `stop`: also no server runs (nothing to stop), or the pidfile names a
     process that is not a preforkd master (a stale file, its pid reused): not signalled;
  3  the application could not be imported (`run`: by the workers, or the master with
     preload_app; `check`: in a child process with the configured `env:`).
`status` and `stop` still work with a file that does not validate: they need only `pidfile`
and `admin`; `reload -p PIDFILE` with no file validates nothing (the master validates the file
it reads). A reader that closes stdout early (`preforkd status | head -1`) changes neither
what a command does nor its exit status, and prints no traceback (see main).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import os
import resource
import signal
import ssl
import sys
import time
import traceback
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import IO, Any

import yaml

from prefork import __version__, status
from prefork.admin import (
    AdminServer,
    admin_socket_path,
    fetch,
    open_admin,
    reason,
    status_table,
)
from prefork.config import (
    OVERRIDE_SOURCE,
    Config,
    ConfigError,
    LoggingConfig,
    YamlText,
    bind_address,
    load,
)
from prefork.daemon import detach, under_systemd
from prefork.early import EarlySignals
from prefork.effective import as_yaml
from prefork.hooks import HookError, HookImports, Hooks, ServerInfo
from prefork.loader import AppLoadError, Reimport, load_app, prepare
from prefork.logs import (
    DAEMON_SYSLOG_HINT,
    Logs,
    for_reload,
    reach_syslog,
    syslog_for,
    syslog_handler,
    without_console,
)
from prefork.master import EXIT_APP_FAILED, EXIT_RUNTIME_ERROR, Generation, Master
from prefork.notify import Announcer, SdNotify, been_ready
from prefork.pidfile import (
    PidFile,
    PidFileError,
    alive,
    config_argument,
    is_master,
    is_master_command,
    is_preforkd,
    read_cmdline,
    read_pid,
    read_status,
    running_pid,
    status_path,
    written_before,
)
from prefork.privileges import drop_privileges, resolve_gid, uid_of
from prefork.scoreboard import Scoreboard
from prefork.signals import STOP_SIGNALS, SignalQueue, Stopped, stops_raise
from prefork.sockets import (
    BindError,
    BindSpec,
    Listener,
    bind_all,
    capped_backlog,
    defer_accept,
    passed_socket_match,
    systemd_listeners,
)
from prefork.stderrpipe import relay_stderr, text_stream, to_devnull
from prefork.system import System
from prefork.tls import server_context
from prefork.touch import TouchWatch, touch_lists
from prefork.upgrade import (
    OLD,
    Handover,
    Upgrader,
    new_master_command,
    started_in,
    upgrade_partners,
)

log = logging.getLogger("prefork")

EXIT_CONFIG_ERROR = 2
DEFAULT_CONFIG = "/etc/preforkd.yaml"
COMMANDS = ("run", "check", "config", "reload", "status", "stop", "upgrade")
# The commands that read the configuration as a start would (WEB_CONCURRENCY included) and
# take an application on the command line.
STARTING = ("run", "check", "config")
# The worker count platforms (Heroku, Render, ...) give gunicorn (see with_web_concurrency).
WEB_CONCURRENCY = "WEB_CONCURRENCY"
# The mount prefix gunicorn takes from its environment (see with_script_name).
SCRIPT_NAME = "SCRIPT_NAME"
# The port platforms (Heroku, Cloud Run, Render, ...) give gunicorn to listen on (with_port).
PORT = "PORT"
# The proxies gunicorn trusts when nothing else says (see with_forwarded_allow_ips).
FORWARDED_ALLOW_IPS = "FORWARDED_ALLOW_IPS"
# How long `stop --force` waits for the master to die of SIGKILL (it cannot refuse).
KILL_TIMEOUT = 5.0
MASTER_SIGNALS = (
    signal.SIGHUP,
    signal.SIGTERM,
    signal.SIGINT,
    signal.SIGQUIT,
    signal.SIGTTIN,
    signal.SIGTTOU,
    signal.SIGUSR1,
    signal.SIGUSR2,
    signal.SIGWINCH,
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
        metavar="COMMAND",
        help="run the server (default); check the configuration and exit; print it as "
        "the server would run it, every setting, as YAML (config); reload the "
        "running server (HUP to the pid in the pidfile) and report the outcome; show the "
        "running server's workers (status); stop it gracefully (TERM) and wait until it "
        "has exited (stop); or replace the running master by one started from the code "
        "installed now, on the same sockets, and stop the old one once the new one is "
        "ready (upgrade: USR2, then TERM)",
    )
    p.add_argument(
        "positional_app",
        nargs="?",
        metavar="MODULE:CALLABLE",
        help="run, check, config: the app, as --app (`preforkd myproject.wsgi:application`)",
    )
    p.add_argument("-c", "--config", metavar="FILE",
                   help=f"configuration file (default: {DEFAULT_CONFIG} if it exists)")
    p.add_argument("-b", "--bind", action="append", metavar="ADDR",
                   help="address to listen on, repeatable: HOST:PORT, [V6]:PORT, unix:PATH "
                        "(replaces the file's list)")
    p.add_argument("-w", "--workers", type=int, metavar="N", help="worker processes")
    p.add_argument("--app", metavar="MODULE:CALLABLE", help="the WSGI app or TCP handler")
    p.add_argument("--protocol", choices=("http", "uwsgi", "tcp"))
    # comma-separated too, as gunicorn's --pythonpath: taken whole, "a,b" named no directory
    p.add_argument("--pythonpath", action="extend", type=comma_list, metavar="DIR",
                   help="directory prepended to sys.path, repeatable; DIR,DIR... as gunicorn "
                        "(replaces the file's list)")
    p.add_argument("--preload", action="store_true", default=None,
                   help="import the app in the master before forking")
    p.add_argument("-t", "--timeout", type=float, metavar="SECONDS", help="workers.timeout")
    p.add_argument("--graceful-timeout", type=float, metavar="SECONDS",
                   help="workers.graceful_timeout")
    p.add_argument("--max-requests", type=int, metavar="N", help="workers.max_requests")
    p.add_argument("--max-requests-jitter", type=int, metavar="N",
                   help="workers.max_requests_jitter")
    p.add_argument("--keepalive", "--keep-alive", type=float, metavar="SECONDS",
                   help="http.keepalive_timeout")
    p.add_argument("--reload", action="store_true", default=None,
                   help="development: restart workers when the code changes")
    # any case, as gunicorn (--log-level DEBUG) and the file's logging.level take it
    p.add_argument("--log-level", type=str.lower,
                   choices=("debug", "info", "warning", "error", "critical"))
    p.add_argument("--error-log", "--error-logfile", "--log-file", metavar="PATH",
                   help='"-" for stderr')
    p.add_argument("--access-log", "--access-logfile", metavar="PATH", help='"-" for stdout')
    p.add_argument("-D", "--daemon", action="store_true", default=None,
                   help="detach into the background")
    p.add_argument("--foreground", action="store_true",
                   help="stay in the foreground even if the configuration says daemon: true")
    p.add_argument("-p", "--pidfile", "--pid", metavar="PATH",
                   help="write the master's pid here (reload, status, stop, upgrade: find "
                        "it here)")
    p.add_argument("--chdir", metavar="DIR", help="change into DIR before loading the app")
    p.add_argument("-n", "--name", metavar="NAME", help="proc_name: the name in process titles")
    p.add_argument("-u", "--user", metavar="USER", help="run the workers as this user")
    p.add_argument("-g", "--group", metavar="GROUP", help="run the workers with this group")
    p.add_argument("-s", "--set", action="append", dest="settings", metavar="KEY=VALUE",
                   help="any setting, by its dotted name in docs/settings.md, the value read "
                        "as YAML, repeatable: --set http.max_body_size=10485760 --set "
                        "'http.forwarded_allow_ips=[\"10.0.0.0/8\"]' (the options above "
                        "win over it)")
    p.add_argument("-e", "--env", action="append", metavar="NAME=VALUE",
                   help="environment variable for the app, repeatable (as env: NAME: VALUE "
                        "in the file, added to its mapping)")
    p.add_argument("--wait", type=wait_seconds, default=300.0, metavar="SECONDS",
                   help="reload: how long to wait for the outcome; stop: for the master to "
                        "exit; upgrade: for both (default 300)")
    p.add_argument("--force", action="store_true",
                   help="stop: KILL the master if it still runs after --wait")
    p.add_argument("--json", action="store_true", help="status: print the JSON document")
    # gunicorn's spellings of two commands, so that a moved Procfile's check still runs
    p.add_argument("--check-config", action="store_const", const="check", dest="command_flag",
                   help="the check command, as gunicorn's --check-config")
    p.add_argument("--print-config", action="store_const", const="config", dest="command_flag",
                   help="the config command, as gunicorn's --print-config")
    p.add_argument("--version", action="version", version=f"preforkd {__version__}")
    return p


def wait_seconds(text: str) -> float:
    """--wait: a number of seconds from 0 (inf: no limit). float() alone took -1, which
    sent TERM and at once reported the master still running (exit 1) as it stopped, and
    nan, with which `reload` signalled and gave up without waiting."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not value >= 0:  # nan too
        raise argparse.ArgumentTypeError(f"must be 0 or more seconds, got {text!r}")
    return value


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
    "max_requests_jitter": "workers.max_requests_jitter",
    "keepalive": "http.keepalive_timeout",
    "log_level": "logging.level",
    "error_log": "logging.error_log",
    "access_log": "logging.access_log",
    "daemon": "daemon",
    "reload": "reload",
    "pidfile": "pidfile",
    "user": "user",
    "group": "group",
    "chdir": "chdir",
    "name": "proc_name",
}


# gunicorn's flags for what preforkd does as commands (`--check-config` is `check`).
COMMAND_FLAGS = {"check": "--check-config", "config": "--print-config"}


def comma_list(text: str) -> list[str]:
    """An option's comma-separated values, empty ones left out."""
    return [part.strip() for part in text.split(",") if part.strip()]


def overrides_from(args: argparse.Namespace) -> dict[str, object]:
    """The settings the command line gives: --set and --env first, the options named for
    one setting (-w, --timeout, ...) over them."""
    overrides: dict[str, object] = {}
    for key, value in args.settings:  # in order: a later --set wins over an earlier one
        overrides.pop(key, None)
        overrides[key] = value
    overrides.update((f"env.{name}", value) for name, value in args.env)
    overrides.update(
        (key, getattr(args, dest))
        for dest, key in OVERRIDES.items()
        if getattr(args, dest) is not None
    )
    return overrides


def split_settings(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """--set KEY=VALUE and --env NAME=VALUE into (key, value) pairs; errors exit 2 with the
    usage. A --set value is YAML text, which the configuration reads as it reads the file's
    values (`10`, `true`, `[a, b]`, a mode `660` in octal; an empty value is null), and
    whose errors are configuration errors; an --env value is a string as it stands."""
    settings: list[tuple[str, object]] = []
    for item in args.settings or ():
        key, equals, text = item.partition("=")
        if not equals or not key.strip():
            p.error(f"--set {item!r}: expected KEY=VALUE, e.g. workers.max_requests=1000")
        settings.append((key.strip(), YamlText(text)))  # read where the file's values are
    env: list[tuple[str, str]] = []
    for item in args.env or ():
        name, equals, value = item.partition("=")
        if not equals or not name:
            p.error(f"--env {item!r}: expected NAME=VALUE")
        env.append((name, value))
    args.settings, args.env = settings, env


def config_path(args: argparse.Namespace) -> str | None:
    """Absolute, so that a reload after detaching (working directory "/") finds it."""
    if args.config:
        return os.path.abspath(str(args.config))
    return DEFAULT_CONFIG if os.path.exists(DEFAULT_CONFIG) else None


def parse(argv: Sequence[str] | None) -> argparse.Namespace:
    """The command line, with `command` one of COMMANDS and a positional app (as gunicorn
    takes it: `preforkd [run] [options] MODULE:CALLABLE`) moved to `app`. Options may come
    before, between or after the words. The first word is the command if it is one, else
    the app, which must then contain a colon (so that a mistyped command is not imported as
    a module); after a command any app reference is taken. Errors exit 2 with the usage."""
    p = parser()
    args = p.parse_intermixed_args(argv)
    split_settings(p, args)
    words = [w for w in (args.command, args.positional_app) if w is not None]
    del args.positional_app
    command = args.command_flag
    del args.command_flag
    if command is not None:  # --check-config: the command "check" before the words
        if words and words[0] in COMMANDS and words[0] != command:
            p.error(f"{COMMAND_FLAGS[command]} and the command {words[0]!r} ask for "
                    "different things")
        if not words or words[0] != command:
            words.insert(0, command)
    named = bool(words) and words[0] in COMMANDS
    args.command = words.pop(0) if named else "run"
    if not words:
        return args
    if not named and ":" not in words[0]:
        p.error(f"invalid command {words[0]!r} (choose from {', '.join(COMMANDS)}); an "
                "application is given as MODULE:CALLABLE")
    if len(words) > 1:
        p.error(f"unexpected argument {words[1]!r}")
    app = words[0]
    if args.command not in STARTING:
        p.error(f"{args.command} takes no application (got {app!r})")
    if args.app is not None and args.app != app:
        p.error(f"the application is given twice: {app} and --app {args.app}")
    args.app = app
    return args


def main(argv: Sequence[str] | None = None, early: EarlySignals | None = None) -> int:
    """Run one command. Its lines go out through say(), so a reader that closes stdout
    early (`preforkd status | head -1`) neither stops it nor changes its exit status; output
    that bypasses say() (argparse's --help) ends it quietly with 1. `early`: the signals
    the entry point held while this module was imported (prefork.early)."""
    code = EXIT_RUNTIME_ERROR
    try:
        try:
            code = command(argv, early)
        finally:  # here, not at exit: --help and --version leave through SystemExit
            if early is not None:
                early.release()  # a command that did not, e.g. one refused by parse()
            if sys.stdout is not None:  # None: started without a file descriptor 1
                sys.stdout.flush()
    except BrokenPipeError:
        silence_stdout()
    return code


def say(text: str = "", end: str = "\n") -> None:
    """Print a line on stdout, which a reader may have closed (`preforkd status | head -1`):
    then stdout becomes /dev/null and the command carries on, with no traceback."""
    try:
        print(text, end=end)
    except BrokenPipeError:
        silence_stdout()


def flush_stdout() -> None:
    try:
        sys.stdout.flush()
    except BrokenPipeError:
        silence_stdout()


def silence_stdout() -> None:
    """Point fd 1 at /dev/null, so that what is still buffered (flushed at exit) goes
    nowhere instead of failing again: the note on SIGPIPE in the `signal` module's docs."""
    to_devnull(sys.stdout.fileno())


def command(argv: Sequence[str] | None, early: EarlySignals | None = None) -> int:
    inherited = open_fds()  # whatever our caller left open is not ours to keep as a daemon
    args = parse(argv)
    if early is not None and args.command != "run":
        early.release()  # only a starting master has handlers of its own for them
    path = config_path(args)
    overrides = overrides_from(args)
    if args.command == "status":
        return show_status(found_endpoint(path, overrides), args.json)
    if args.command == "stop":
        return stop_running(found_endpoint(path, overrides), args.wait, args.force)
    if args.command == "upgrade":
        return upgrade_running(found_endpoint(path, overrides), args.wait)
    if args.command == "reload" and path is None:
        # nothing to validate: the master reads its own file (and its own flags) again
        return reload_running(read_endpoint(None, overrides), None, args.wait)
    environ = dict(os.environ)  # as started: a reload reads WEB_CONCURRENCY from it again

    def settings() -> dict[str, object]:
        if args.command not in STARTING:
            return overrides  # `reload` validates the file the master reads, with its own
        given = with_script_name(path, with_web_concurrency(path, overrides, environ), environ)
        return with_forwarded_allow_ips(path, with_port(path, given, environ), environ)

    try:
        config = load(path, settings())
    except ConfigError as exc:
        print(f"preforkd: configuration error: {from_environment(exc, overrides)}",
              file=sys.stderr)
        if args.command == "reload":
            assert path is not None  # a reload without a file validates nothing (above)
            refuse_reload(path, overrides)
        return EXIT_CONFIG_ERROR
    if args.command == "check":
        return check(config, detaches(config, args.foreground, "daemon" in overrides))
    if args.command == "config":
        # as the server would run: --foreground wins over the file's daemon: true
        shown = dataclasses.replace(config, daemon=False) if args.foreground else config
        say(as_yaml(shown), end="")
        return 0
    if args.command == "reload":
        return reload_running(Endpoint.of(config), config.source or None, args.wait)
    started_in = os.getcwd()  # command-line paths mean the same on every reload
    return Startup(
        config, lambda: load(path, settings(), started_in), args.foreground, inherited,
        daemon_flag="daemon" in overrides,  # -D or --set daemon=...
        early=early,
    ).run()


def with_web_concurrency(
    path: str | None, overrides: Mapping[str, object], environ: Mapping[str, str]
) -> dict[str, object]:
    """`overrides` plus workers.count from WEB_CONCURRENCY when neither -w nor the file at
    `path` sets it (as gunicorn, whose default worker count it is). Validated by load() as
    the setting, so a bad value fails as one would in the file (from_environment names the
    variable); an empty value counts as unset."""
    text = environ.get(WEB_CONCURRENCY, "")
    if not text or setting_given(path, overrides, "workers.count"):
        return dict(overrides)
    value: object
    try:
        value = int(text)
    except ValueError:
        value = text  # refused by load(), which shows it
    return {**overrides, "workers.count": value}


def with_script_name(
    path: str | None, overrides: Mapping[str, object], environ: Mapping[str, str]
) -> dict[str, object]:
    """`overrides` plus http.script_name from the SCRIPT_NAME environment variable when
    neither --set nor the file at `path` sets it: gunicorn mounts the application there
    (`SCRIPT_NAME=/app gunicorn ...`), and a deployment moved over as it is would otherwise
    serve every URL one prefix off without a word. Validated by load() as the setting
    (from_environment names the variable); an empty value counts as unset."""
    text = environ.get(SCRIPT_NAME, "")
    if not text or setting_given(path, overrides, "http.script_name"):
        return dict(overrides)
    return {**overrides, "http.script_name": text}


def with_port(
    path: str | None, overrides: Mapping[str, object], environ: Mapping[str, str]
) -> dict[str, object]:
    """`overrides` plus bind `*:$PORT` (0.0.0.0) from the PORT environment variable when
    neither -b, --set nor the file at `path` sets `bind`: gunicorn's default bind then. The
    platforms that set PORT (Heroku, Cloud Run, Render, ...) route to that port on the
    container's address, so a deployment moved over as it is listened on 127.0.0.1:8000,
    where nothing reaches it, and failed its health check. Validated by load() as the
    setting (from_environment names the variable); an empty value counts as unset."""
    text = environ.get(PORT, "").strip()
    if not text or setting_given(path, overrides, "bind"):
        return dict(overrides)
    return {**overrides, "bind": [f"*:{text}"]}


def with_forwarded_allow_ips(
    path: str | None, overrides: Mapping[str, object], environ: Mapping[str, str]
) -> dict[str, object]:
    """`overrides` plus http.forwarded_allow_ips from the FORWARDED_ALLOW_IPS environment
    variable when neither --set nor the file at `path` sets it, read as gunicorn reads it: a
    comma-separated list ('*' for all), unix-socket peers trusted too (gunicorn always trusts
    them). Container images set it for gunicorn behind a proxy that is not on loopback;
    ignored, X-Forwarded-Proto was too, and the application built http:// URLs (redirect
    loops behind a TLS-terminating proxy). Validated by load() as the setting
    (from_environment names the variable); an empty value counts as unset."""
    entries = comma_list(environ.get(FORWARDED_ALLOW_IPS, ""))
    if not entries or setting_given(path, overrides, "http.forwarded_allow_ips"):
        return dict(overrides)
    unix = [] if "unix" in entries or "*" in entries else ["unix"]
    return {**overrides, "http.forwarded_allow_ips": [*entries, *unix]}


def setting_given(path: str | None, overrides: Mapping[str, object], key: str) -> bool:
    """Whether the command line (`overrides`) or the file at `path` sets `key`, a top-level
    name or section.name."""
    section, _, name = key.rpartition(".")
    if key in overrides or (section and name in as_mapping(overrides.get(section))):
        return True
    if path is None:
        return False
    top = yaml_mapping(path)
    return name in (as_mapping(top.get(section)) if section else top)


# The settings an environment variable gives when neither the file nor a flag does.
FROM_ENVIRONMENT = {
    "workers.count": WEB_CONCURRENCY,
    "http.script_name": SCRIPT_NAME,
    "bind": PORT,
    "http.forwarded_allow_ips": FORWARDED_ALLOW_IPS,
}


def from_environment(error: ConfigError, overrides: Mapping[str, object]) -> ConfigError:
    """`error` naming the variable when it is about a setting an environment variable gave
    (WEB_CONCURRENCY, SCRIPT_NAME, PORT, FORWARDED_ALLOW_IPS), not the command line; else
    `error` itself. An item of a list setting (bind[0]) counts as the setting."""
    key = (error.key or "").partition("[")[0]
    variable = FROM_ENVIRONMENT.get(key)
    if (
        variable is not None
        and error.source == OVERRIDE_SOURCE
        and key not in overrides
    ):
        return ConfigError(error.message, key=variable)
    return error


def found_endpoint(path: str | None, overrides: Mapping[str, object]) -> Endpoint:
    """Where the running server is, for `status` and `stop`: from the configuration if it
    validates, else from what can be read of it (degraded_endpoint warns)."""
    try:
        return Endpoint.of(load(path, overrides))
    except ConfigError as exc:
        return degraded_endpoint(path, overrides, exc)


# --- sockets ---------------------------------------------------------------------------------


def log_listening(listeners: list[Listener], config: Config) -> None:
    """The `listening at` line of each socket a start or a reload bound, and a warning if
    the kernel gave any of them a shorter accept queue than `backlog` (capped_backlog)."""
    for listener in listeners:
        log.info("listening at %s", listener.url(config.protocol))
    capped = capped_backlog(listeners, config.backlog, config.protocol)
    if capped is not None:
        log.warning("%s", capped)


def bind_specs(config: Config) -> list[BindSpec]:
    return [
        BindSpec(
            bind_address(b),
            b.mode,
            None if b.owner is None else uid_of(b.owner),
            None if b.group is None else resolve_gid(b.group),
            b.tls is not None,
            b.reuse_port,
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
            # only a TLS entry's: a plain entry may have the same address text (port 0)
            entry = None if not listener.configured.tls else next(
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


def open_listeners(config: Config, handover: Handover | None = None) -> list[Listener]:
    """The server's sockets: those systemd passed, else those of the master this one
    replaces (USR2) whose addresses the configuration still names, plus new ones bound for
    the addresses it adds."""
    listeners = systemd_listeners(os.environ)
    if listeners:
        log.info("using %d socket(s) passed by systemd", len(listeners))
    elif handover is not None:
        specs = bind_specs(config)
        passed = handover.listeners(specs)
        try:
            listeners = bind_all(specs, config.backlog, reuse=passed)
        finally:
            for listener in passed:
                if listener not in listeners:
                    # an address the configuration dropped: its file goes now, as at a reload
                    listener.shared_with = None
                    listener.close()
    else:
        listeners = bind_all(bind_specs(config), config.backlog)
    if config.protocol != "tcp":  # the client speaks first: HTTP, and nginx's uwsgi packet
        for listener in listeners:
            defer_accept(listener, config.http.defer_accept)
    return listeners


def without_handed_on(environ: Mapping[str, str]) -> dict[str, str]:
    """`environ` without what systemd gave this process alone (its sockets, its notify
    socket): the environment a master started by USR2 gets."""
    names = ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES", "NOTIFY_SOCKET", "WATCHDOG_PID",
             "WATCHDOG_USEC")
    return {name: value for name, value in environ.items() if name not in names}


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
    reread: Callable[[], Config],
    reimport: Reimport,
    inherited: dict[str, str],
    hook_imports: HookImports,
) -> Callable[[Generation, list[Listener]], Generation]:
    """HUP: read and validate the configuration again, keep the sockets whose addresses did
    not change (`held`: every socket the master has open), bind the new ones, load the hooks,
    open the new logging setup when `logging` changed (logs.for_reload: installed by the new
    workers after fork, by the master when the generation takes over) and, with
    preload_app, import the application afresh. Raises (and the master keeps serving the
    old generation, its environment, its sockets and its logs) on any error."""

    def reload(current: Generation, held: list[Listener]) -> Generation:
        config = reread()
        # puts the kept sockets' previous entries back (mode, owner, TLS flag)
        sockets_undo: list[Callable[[], None]] = []
        if any(listener.inherited for listener in current.listeners):
            listeners = current.listeners  # systemd owns the addresses
        else:
            listeners = bind_all(
                bind_specs(config), config.backlog, reuse=held, undo=sockets_undo
            )
        if config.protocol != "tcp":
            for listener in listeners:
                defer_accept(listener, config.http.defer_accept)
        undo = apply_env(config.env, current.config.env, inherited)
        logs = current.logs
        changed = [
            key for key in _differences("logging", current.config.logging, config.logging)
            if key not in FIXED_AT_START  # logging.capture_output: said below
        ]
        # the modules the master holds now: put back if this generation never serves
        hook_modules, app_modules = hook_imports.modules, reimport.modules

        def put_back() -> None:
            undo_env(undo)
            hook_imports.put_back(hook_modules)
            reimport.put_back(app_modules)
            for undo_socket in reversed(sockets_undo):
                undo_socket()

        try:
            contexts = tls_contexts(config, listeners)
            hooks = hook_imports.load(config.hooks)  # left as it was if it raises
            if changed:  # before the import, which a failure here must not have replaced
                logs = for_reload(current.logs, config.logging, (config.user, config.group))
            app = None
            if config.preload_app:
                prepare(config.pythonpath, config.chdir)
                app = reimport.load(config.app)
            elif reimport.modules:
                # preload_app turned off: the new workers import the application themselves,
                # which the master's copies (inherited through fork) would make a no-op
                reimport.put_back({})
        except BaseException as exc:
            put_back()
            for listener in listeners:
                if listener not in held:
                    listener.close()
            if logs is not current.logs:
                logs.close()
            if isinstance(exc, SystemExit):  # from an import: the master serves on
                raise AppLoadError(f"the application called sys.exit({exc.code!r}) at "
                                   "import") from exc
            raise
        log_listening([lst for lst in listeners if lst not in held], config)
        if changed:
            log.info("reload: %s changed; the new generation logs with it (%s), the master "
                     "from when that generation serves", ", ".join(changed), logs.describe())
        fixed = fixed_at_start(current.config, config)
        if fixed:
            log.warning("reload: %s changed; the running server keeps the old value until "
                        "it is restarted", ", ".join(fixed))
        generation = Generation(0, config, listeners, app, contexts, hooks, logs=logs)
        generation.environ = dict(os.environ)
        generation.env_undo = put_back  # its environment and modules, when abandoned
        return generation

    return reload


# Settings the master applies once, at start: a reload reads them, checks them, and says
# that a change waits for a restart (the pidfile and status endpoint hold open state;
# `listen()`'s backlog belongs to sockets a reload keeps). `logging` is not one: a reload
# opens the new destinations and each generation logs with its own (logs.for_reload).
FIXED_AT_START = (
    "pidfile", "daemon", "umask", "backlog", "admin.socket", "admin.bind",
    "logging.capture_output",
)


def fixed_at_start(old: Config, new: Config) -> list[str]:
    """The FIXED_AT_START settings whose value differs between `old` and `new` (a section
    by its changed keys)."""
    return [
        key
        for name in FIXED_AT_START
        for key in _differences(name, _setting(old, name), _setting(new, name))
    ]


def _setting(config: Config, dotted: str) -> Any:
    value: Any = config
    for part in dotted.split("."):
        value = getattr(value, part)
    return value


def _differences(name: str, before: Any, after: Any) -> list[str]:
    """The dotted keys under `name` whose values differ: `name` itself, or for a section,
    each changed key in it."""
    if before == after:
        return []
    if not dataclasses.is_dataclass(before) or isinstance(before, type):
        return [name]
    return [
        key
        for f in dataclasses.fields(before)
        for key in _differences(f"{name}.{f.name}", getattr(before, f.name),
                                getattr(after, f.name))
    ]


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
        early: EarlySignals | None = None,
    ) -> None:
        self.inherited_fds = inherited_fds or set()
        self.early = early
        self.config = config
        self.reread = reread
        self.started_in = started_in()
        # a unit's main process cannot hand over to another: USR2 is refused (upgrade.py)
        self.systemd_unit = under_systemd(os.environ)
        # started by a master's USR2 (None: a plain start)
        self.handover: Handover | None = None
        self.handover_error = ""
        try:
            self.handover = Handover.from_environ(os.environ)
        except ValueError as exc:
            self.handover_error = str(exc)
        # `daemon_flag`: -D (or --set daemon) on the command line, as a Type=forking unit's
        # ExecStart gives it
        self.stays = under_systemd(os.environ, daemon_flag) if config.daemon else ""
        # a new master started by USR2 is already where the old one was: detached or not
        self.detach = detaches(config, foreground, daemon_flag) and self.handover is None
        self.detached = self.detach or (self.handover is not None and self.handover.detached)
        # The terminal, kept before logging may re-point fd 2 at a file.
        self.console: IO[str] = os.fdopen(os.dup(2), "w", buffering=1)
        self.pidfile = (
            PidFile(config.pidfile, None if self.handover is None else self.handover.from_pid)
            if config.pidfile
            else None
        )
        self.logs: Logs | None = None
        self.tls: dict[int, ssl.SSLContext] = {}
        self.hooks = Hooks()
        self.hook_imports = HookImports()
        self.reimport = Reimport()
        self.inherited_env: dict[str, str] = {}
        self.signals: SignalQueue | None = None  # made early, by a master that does not detach
        self.listeners: list[Listener] = []  # once bound
        self.touch = TouchWatch()  # touch_reload's and touch_logreopen's files
        # what the master's stderr relay sends with (syslog settings, level, format); None
        # while there is none
        self.relayed: tuple[tuple[str, str, str], str, str] | None = None

    def release_imports(self) -> None:
        """The modules that the hooks and a preloaded application of replaced generations
        imported are garbage: let them go (FreshImports.release)."""
        detached = self.hook_imports.release() + self.reimport.release()
        if detached:
            log.debug("reload: %d finalizers of the replaced generations' modules detached",
                      detached)

    def fail(self, message: str, code: int = EXIT_RUNTIME_ERROR) -> int:
        if self.logs is not None:
            log.error("%s", message)
        self.tell(message)
        return code

    def tell(self, message: str) -> None:
        """Say why the start failed on the launcher's terminal, as `preforkd: REASON`: with
        the error log in a file or syslog, a foreground start that failed printed nothing
        at all. Not when the error log is that terminal (it said so already), nor once the
        terminal is closed (detached: the launcher prints what announce.failed sent it)."""
        if self.console.closed or self.log_is_console():
            return
        print(f"preforkd: {message}", file=self.console)

    def log_is_console(self) -> bool:
        """Whether the error log is the launcher's terminal: fd 2 (which Logs points at an
        error log file) is still the file the console is, and no syslog takes the log
        instead. Compared as files, so `error_log: /dev/stderr` counts as the terminal."""
        if self.logs is None or self.logs.syslog is not None:
            return False
        try:
            err, console = os.fstat(2), os.fstat(self.console.fileno())
        except (OSError, ValueError):
            return False
        return (err.st_dev, err.st_ino) == (console.st_dev, console.st_ino)

    def run(self) -> int:
        if self.detach:
            # the launcher: signals keep their defaults until the daemon it forks serves
            prepared = self.start()
        else:
            # First thing: a stop that comes while the master imports hooks or a preloaded
            # application, or binds, stops it now (signals.stops_raise); the other signals
            # (and SIGCHLD) wait in the queue for the loop. With their defaults instead,
            # HUP or USR1 to the process group would end a starting master, and as a
            # container's PID 1 every one of them (docker stop's TERM) would be dropped.
            # A master USR2 started needs this too: its exec left HUP, USR1, USR2, TTIN and
            # TTOU ignored, for the signals sent to the whole process group while it loads.
            self.signals = SignalQueue(catch=MASTER_SIGNALS)
            try:
                with stops_raise(STOP_SIGNALS):
                    prepared = self.start()
            except Stopped as exc:
                return self.stopped_starting(exc.signum)
        if isinstance(prepared, int):
            return prepared
        return self.launch(*prepared)

    def stopped_starting(self, signum: int) -> int:
        """TERM, INT or QUIT before the loop began: close what is bound (a unix socket's
        file goes) and exit 0, as a stop asked for before ready does once serving."""
        for listener in self.listeners:
            if listener.sock.fileno() >= 0:
                listener.close()
        if self.logs is not None:
            log.info("%s while starting: stopped before serving", signal.Signals(signum).name)
        return 0

    def start(self) -> tuple[list[Listener], object] | int:
        """Up to the bound sockets and the preloaded application (those, or the exit status
        of a start that failed)."""
        config = self.config
        if self.handover_error:
            return self.fail(self.handover_error)
        if self.pidfile is not None:
            try:
                self.pidfile.check()
                self.pidfile.probe()
            except PidFileError as exc:
                return self.fail(str(exc))
        if config.umask is not None:
            os.umask(config.umask)
        try:
            self.logs = self.open_logs()
        except OSError as exc:
            return self.fail(f"cannot open the logs: {exc}")
        log.info("preforkd %s starting (pid %d)", __version__, os.getpid())
        if self.early is not None:
            # what came while the modules were imported, now to this master's handlers
            # (set in run()), with the log open to say what a stop did; a daemon's
            # launcher has none: the defaults are back, and act on them
            self.early.release()
        if self.stays:
            log.info("daemon: staying in the foreground: %s", self.stays)
        if self.handover is not None:
            log.info("upgrade: taking over the sockets of the master pid %d",
                     self.handover.from_pid)
        raise_fd_limit(config.workers.max_connections)
        # the first look: a touch from now on, while hooks and a preloaded application
        # import, is a change the loop acts on once it runs
        self.touch.look(touch_lists(config))
        self.inherited_env = dict(os.environ)
        apply_env(config.env)
        prepare(config.pythonpath, None)  # hook modules (and a preloaded app) live there
        try:
            self.hooks = self.hook_imports.load(config.hooks)
        except HookError as exc:
            return self.fail(str(exc))
        if not self.hooks.call("on_starting", ServerInfo(config)):
            # a pre-flight check that fails (as in gunicorn, whose master exits on it)
            return self.fail(f"{self.hooks.failure}; not starting")
        app = None
        if config.preload_app:
            try:
                prepare(config.pythonpath, config.chdir)
                app = self.reimport.load(config.app)
            except AppLoadError as exc:
                log.error("cannot load the application:\n%s", traceback.format_exc())
                return self.fail(str(exc), EXIT_APP_FAILED)
        try:
            listeners = self.listeners = open_listeners(config, self.handover)
            self.tls = tls_contexts(config, listeners)
        except BindError as exc:
            return self.fail(str(exc))
        except (OSError, ValueError) as exc:
            return self.fail(f"TLS: {exc}")
        log_listening(listeners, config)
        return listeners, app

    def launch(self, listeners: list[Listener], app: object) -> int:
        """Detach (if asked), write the pidfile, serve."""
        config = self.config
        assert self.logs is not None
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
            self.logs.capture_stdout()  # detaching pointed fd 1 at /dev/null
            log.info("detached: master pid %d", os.getpid())
        elif self.detached:
            # a daemon's new master (USR2): its console is the old master's fd 2 (the old
            # error log, or the old stderr relay's pipe, which would outlive the old master
            # for as long as this one and its workers held it). Closed as detaching closes
            # it: the old master tells of a start that fails from here on
            self.console.close()
        if self.detached and self.logs.syslog is not None:
            self.relay_stderr(self.logs)
        announce = Announcer(
            sd,
            watchdog,
            ready_fd,
            status_path(config.pidfile) if config.pidfile else None,
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
        cfg = logging_as_run(self.config.logging, self.detached)
        takes = syslog_for(cfg, self.detached)
        check_syslog(cfg, self.detached)  # a USR2's new master too: a failure leaves the
        # old one serving
        return Logs(
            cfg.level,
            cfg.error_log,
            cfg.access_log,
            cfg.access_log_format,
            (cfg.syslog.address, cfg.syslog.facility, cfg.syslog.ident) if any(takes) else None,
            # the files are chowned to the workers' user, who must reopen them on USR1
            workers_as=(self.config.user, self.config.group),
            capture=cfg.capture_output,
            syslog_takes=takes,
            detached=self.detached,
            error_format=cfg.error_log_format,
        )

    def relay_stderr(self, logs: Logs) -> None:
        """A detached daemon's error log is syslog, and its fd 2 /dev/null: what the master
        writes there (a hook's print, a warning, C code, a fatal error) goes to syslog
        through a process of its own (stderrpipe.relay_stderr), at the level and in the
        format `logs` (the start's, or a reload's that took over) log with."""
        syslog = logs.syslog
        assert syslog is not None

        def handler() -> logging.Handler:
            made = syslog_handler(*syslog, logs.error_format)
            made.setLevel(logs.level.upper())
            return made

        try:
            relay_stderr(handler)
        except OSError as exc:
            log.warning("the master's stderr stays where it was: %s", exc)
            return
        self.relayed = (syslog, logs.level, logs.error_format)
        if logs.capture_output:
            # fd 1 follows fd 2 to the relay, as the workers' joins their pipe: detaching
            # (capture_stdout) pointed it where fd 2 was then, /dev/null
            sys.stdout.flush()
            os.dup2(2, 1)
            sys.stdout = text_stream(1, sys.stdout)

    def follow_logs(self, logs: Logs) -> None:
        """A reload's logging took over in a detached daemon's master: a relay that sends
        with other syslog settings (address, facility, tag, level, format) than the new
        ones is replaced by a new relay (the old one ends at the end of its pipe, which
        fd 2 no longer is); an error log in a file is fd 2 itself (Logs.install), and
        the relay ended already."""
        if logs.syslog is None:
            self.relayed = None
        elif self.relayed != (logs.syslog, logs.level, logs.error_format):
            self.relay_stderr(logs)

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
            passed = None if self.handover is None else self.handover.admin_sockets(
                config.admin.bind
            )
            admin_sockets, admin_inode = open_admin(admin_path, config.admin.bind, passed)
        except OSError as exc:
            announce.failed(str(exc))
            return self.fail(str(exc))
        signals = self.signals if self.signals is not None else SignalQueue(catch=MASTER_SIGNALS)
        close_in_child = list(signals.fds())  # the announcer's own fds are added per fork
        master = Master(
            kernel=System(),
            signals=signals,
            scoreboard=Scoreboard(SCOREBOARD_SLOTS),
            # its own copy of the environment: a reload applies the next generation's `env:`
            # to the master's before its canary boots, and an old worker forked meanwhile
            # (a crash, a recycle) must not inherit it, nor keep it if the reload fails
            current=Generation(
                1, self.config, listeners, app, self.tls, self.hooks, dict(os.environ),
                logs=self.logs,
            ),
            reloader=reloader(self.reread, self.reimport, self.inherited_env,
                              self.hook_imports),
            release_imports=self.release_imports,
            announce=announce,
            touch=self.touch,
            logs_installed=self.follow_logs if self.detached else None,
            close_in_child=close_in_child,
            upgrader=Upgrader(
                new_master_command(),
                self.started_in,
                without_handed_on(self.inherited_env),
                self.detached,
                MASTER_SIGNALS,
                under_systemd=bool(self.systemd_unit),  # NOTIFY_SOCKET included
                pidfile=self.pidfile,
                announce=announce,
                admin_implied=not config.admin.socket,
                admin_bind=config.admin.bind,
                replaced=None if self.handover is None else self.handover.from_pid,
            ),
        )
        handover = self.handover
        if handover is not None and handover.configured_workers == config.workers.count:
            master.target = max(1, handover.workers)  # TTIN/TTOU outlive an upgrade
        if admin_sockets:
            master.admin = AdminServer(
                admin_sockets, lambda path: status.respond(master, path), admin_path, admin_inode
            )
            assert master.upgrader is not None
            master.upgrader.admin = master.admin
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
            failure = master.failure or f"the server stopped before it was ready ({code})"
            announce.failed(failure, code)  # 3 when the application could not be loaded
            if code != 0:  # the master logged it; a stop asked for before ready is no failure
                self.tell(failure)
        log.info("stopped")
        return code


# --- other commands ----------------------------------------------------------------------------

# How check's import child ends; the parent turns these into the exit status a start would have.
CHECK_HOOKS_FAILED = 10
CHECK_APP_FAILED = 11


def detaches(config: Config, foreground: bool, daemon_flag: bool) -> bool:
    """Whether a start with this configuration and command line would detach: Startup's
    rule (daemon: true, not --foreground, not kept in the foreground by systemd), for
    `check`, which must judge the logs a start would open (a detached daemon's error_log
    "-" is syslog)."""
    return config.daemon and not foreground and not under_systemd(os.environ, daemon_flag)


def check(config: Config, detached: bool = False) -> int:
    """Validate (done by now), try the pidfile's directory, the syslog socket and the log
    files, import the hooks and the app in a forked child with the configured `env:` (as
    the master and a worker would), test-bind every address and test-open the status
    endpoint -- unless the pidfile names a running server, which holds them: checking a
    file before `preforkd reload` is the usual use. Each step is one a start takes, and
    fails with the status that start would exit with."""
    say(f"configuration OK: {config.source or '(command line)'}")
    if config.pidfile:  # a start makes sure it can write it before anything else
        try:
            PidFile(config.pidfile).probe()
        except PidFileError as exc:
            print(f"preforkd: {exc}", file=sys.stderr)
            return EXIT_RUNTIME_ERROR
    try:  # then it opens the logs
        check_syslog(config.logging, detached)
        check_log_files(config.logging, detached)
    except OSError as exc:
        print(f"preforkd: cannot open the logs: {exc}", file=sys.stderr)
        return EXIT_RUNTIME_ERROR
    flush_stdout()  # else the child's copy of the buffer prints it a second time
    pid = os.fork()
    if pid == 0:
        code = CHECK_APP_FAILED
        try:
            code = check_imports(config)
        except BaseException as exc:  # SystemExit or worse from an import: never run on
            traceback.print_exc()
            print(f"preforkd: importing the hooks or the application raised {exc!r}",
                  file=sys.stderr)
        finally:
            try:
                flush_stdout()
                sys.stderr.flush()
            finally:
                os._exit(code)
    _, wait_status = os.waitpid(pid, 0)
    code = os.waitstatus_to_exitcode(wait_status)
    if code == CHECK_HOOKS_FAILED:
        return EXIT_RUNTIME_ERROR  # as Startup.run: the hooks are imported before binding
    if code != 0:
        if code != CHECK_APP_FAILED:
            how = f"signal {-code}" if code < 0 else f"status {code}"
            print(f"preforkd: importing the application ended the check ({how})",
                  file=sys.stderr)
        return EXIT_APP_FAILED
    running = running_pid(config.pidfile) if config.pidfile else None
    if running is not None:
        say(f"not test-binding: preforkd runs as pid {running} (from {config.pidfile}) and "
            "holds the addresses; a reload keeps those that did not change")
        if Endpoint.of(config).configured():
            say(f"not test-opening the status endpoint: pid {running} holds it (a change "
                "to admin.* takes effect at the next start, not at a reload)")
        return 0
    try:
        listeners = bind_all(bind_specs(config), config.backlog)
    except BindError as exc:
        print(f"preforkd: {exc}", file=sys.stderr)
        return EXIT_RUNTIME_ERROR
    try:  # the addresses stay bound meanwhile, as when the master opens the endpoint
        for listener in listeners:
            say(f"can bind {listener.url(config.protocol)}")
        capped = capped_backlog(listeners, config.backlog, config.protocol)
        if capped is not None:  # a warning: the start goes ahead with the smaller queue
            say(f"warning: {capped}")
        return check_admin(config)
    finally:
        for listener in listeners:
            listener.close()


def logging_as_run(cfg: LoggingConfig, detached: bool) -> LoggingConfig:
    """The logging settings a start opens: a detached daemon's without the paths that name
    its launcher's terminal or pipe (logs.without_console)."""
    return without_console(cfg) if detached else cfg


def check_syslog(cfg: LoggingConfig, detached: bool) -> None:
    """OSError (its message says why and what to do) if the logs go to a unix syslog socket
    where no syslog daemon answers (logs.reach_syslog): syslog.enabled, or a detached
    daemon's error_log or access_log "-" (logs.syslog_for)."""
    if not any(syslog_for(logging_as_run(cfg, detached), detached)):
        return
    try:
        reach_syslog(cfg.syslog.address)
    except OSError as exc:
        if cfg.syslog.enabled:
            raise
        raise OSError(f"{exc}: {DAEMON_SYSLOG_HINT}") from exc


def check_log_files(cfg: LoggingConfig, detached: bool) -> None:
    """OSError, as a start's Logs raises it, if a log file the start would open cannot be
    opened for appending (a file or directory the user may not write to, an immutable
    file, a read-only file system): `check` said OK and the start failed. A file that does
    not exist is created and removed again (the start creates it, with its owner); an
    existing one is opened without changing it, and is left alone when a running server
    holds it."""
    cfg = logging_as_run(cfg, detached)
    to_syslog = syslog_for(cfg, detached)
    paths = [
        path
        for path, taken in ((cfg.error_log, to_syslog[0]), (cfg.access_log, to_syslog[1]))
        if path not in (None, "-") and not taken
    ]
    for path in paths:
        assert path is not None
        try:
            fd = os.open(path, os.O_WRONLY | os.O_APPEND)
        except FileNotFoundError:
            fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_EXCL, 0o600)
            os.close(fd)
            os.unlink(path)
        else:
            os.close(fd)


def check_imports(config: Config) -> int:
    """`check`'s child: import the hooks (after `env:` and `pythonpath`, before `chdir`, as
    Startup.run does) and the application, printing what fails. Both are tried, so one run
    names every broken import; CHECK_HOOKS_FAILED wins, as a start stops at the hooks."""
    apply_env(config.env)
    prepare(config.pythonpath, None)
    hooks_failed = False
    try:
        hooks = Hooks(config.hooks)
    except HookError as exc:
        print(f"preforkd: {exc}", file=sys.stderr)
        hooks_failed = True
    else:
        if hooks.functions:
            say(f"hooks OK: {', '.join(hooks.functions)}")
    if not config.preload_app and (config.user is not None or config.group is not None):
        # the workers import it after dropping privileges: a file only root can read would
        # pass as root and stop the start
        try:
            drop_privileges(config.user, config.group)
        except (OSError, KeyError) as exc:
            print(f"preforkd: cannot switch to user {config.user}: {exc}", file=sys.stderr)
            return CHECK_HOOKS_FAILED  # as a worker that cannot start: exit status 1
    prepare(config.pythonpath, config.chdir)
    try:
        load_app(config.app)
    except AppLoadError as exc:
        traceback.print_exc()
        print(f"preforkd: cannot load the application: {exc}", file=sys.stderr)
        return CHECK_HOOKS_FAILED if hooks_failed else CHECK_APP_FAILED
    as_user = config.user is not None and not config.preload_app
    say(f"application OK: {config.app}" + (f" (as user {config.user})" if as_user else ""))
    return CHECK_HOOKS_FAILED if hooks_failed else 0


def check_admin(config: Config) -> int:
    """Open and close the status endpoint as serve() opens it (a failure stops the start):
    a socket path too long, a directory that is not writable, a port in use or a live
    process on the socket failed the start after `check` said OK. Closed through
    AdminServer, which removes the socket file it made."""
    endpoint = Endpoint.of(config)
    if not endpoint.configured():
        return 0
    path = endpoint.socket_path
    try:
        sockets, inode = open_admin(path, endpoint.bind)
    except OSError as exc:
        print(f"preforkd: {exc}", file=sys.stderr)
        return EXIT_RUNTIME_ERROR
    AdminServer(sockets, lambda _: (404, "text/plain", b""), path, inode).close()
    say(f"can open the status endpoint at {', '.join(w for w in (path, endpoint.bind) if w)}")
    return 0


@dataclass(frozen=True)
class Endpoint:
    """Where a running server is found: its pidfile and its status endpoint. All that
    `status` needs of a configuration, so it can also come from a file that does not
    validate (see degraded_endpoint)."""

    pidfile: str | None = None
    socket: str | None = None  # admin.socket; None: PIDFILE.sock
    bind: str | None = None  # admin.bind

    @classmethod
    def of(cls, config: Config) -> Endpoint:
        return cls(config.pidfile, config.admin.socket, config.admin.bind)

    @property
    def socket_path(self) -> str | None:
        return admin_socket_path(self.socket, self.pidfile)

    def configured(self) -> bool:
        return self.socket_path is not None or self.bind is not None

    def where(self) -> str:
        """The endpoint `fetch` asks (the unix socket when there is one), for messages."""
        return self.socket_path or self.bind or "(none)"

    def set_aside(self) -> Endpoint | None:
        """While a master started by USR2 loads, the pidfile still names the old master,
        whose status socket is already under its .oldbin name (upgrade.py): that endpoint,
        when the pidfile and PIDFILE.oldbin name the same live master; else None."""
        pidfile = self.pidfile
        if pidfile is None or self.socket_path is None:
            return None
        pid = running_pid(pidfile)
        if pid is None or read_pid(pidfile + OLD) != pid:
            return None
        return Endpoint(pidfile + OLD, self.socket + OLD if self.socket else None)


def degraded_endpoint(
    path: str | None, overrides: Mapping[str, object], error: ConfigError
) -> Endpoint:
    """For `status` when the configuration does not validate: warn in one line, naming the
    error, and read only `pidfile` and `admin`. A bad edit (or `status -p PIDFILE` without
    --app) must not hide the running server. Only a file is warned about: without one the
    error is just the missing `app`, which `status` does not need."""
    if path is not None:
        first = str(error).splitlines()[0] if str(error) else type(error).__name__
        print(f"preforkd: warning: the configuration has errors, so only its pidfile and "
              f"admin settings are used: {first}", file=sys.stderr)
    return read_endpoint(path, overrides)


def as_yaml_value(text: YamlText) -> object:
    """The value of a --set given as YAML text (None where it does not parse: load() says
    why where it matters)."""
    try:
        return yaml.safe_load(str(text))
    except (yaml.YAMLError, ValueError):
        return None


def as_mapping(value: object) -> Mapping[str, object]:
    """A section override (a mapping, or --set YAML text of one) as a mapping; {} else."""
    if isinstance(value, YamlText):
        value = as_yaml_value(value)
    return value if isinstance(value, Mapping) else {}


def read_endpoint(path: str | None, overrides: Mapping[str, object]) -> Endpoint:
    """`pidfile` and `admin.socket` / `admin.bind` from the YAML file at `path` (as much of
    it as parses), then `--pidfile`. Relative paths are resolved as load() resolves them:
    from the file against its directory, from the command line against the working one."""
    top = yaml_mapping(path) if path is not None else {}
    base = os.path.dirname(os.path.abspath(path)) if path is not None else os.getcwd()
    admin = top.get("admin")
    admin = admin if isinstance(admin, dict) else {}
    pidfile = resolved(top.get("pidfile"), base)
    given = overrides.get("pidfile")
    if isinstance(given, YamlText):  # --set pidfile=...: YAML, as in the file
        given = as_yaml_value(given)
    if given is not None:
        pidfile = resolved(given, os.getcwd())
    bind = admin.get("bind")
    bind = bind if isinstance(bind, str) and bind else None
    return Endpoint(pidfile, resolved(admin.get("socket"), base), bind)


def yaml_mapping(path: str) -> dict[str, object]:
    """The top-level mapping of the YAML file at `path`, or {} if there is none. On a syntax
    error the file is read again up to the line where the broken construct starts: the
    settings above a bad edit (usually `pidfile:`) are still found."""
    try:
        with open(path, "rb") as f:
            text = f.read().decode("utf-8-sig")
    except (OSError, UnicodeDecodeError):
        return {}
    try:
        data = yaml.safe_load(text)
    except yaml.MarkedYAMLError as exc:
        marks = [m for m in (exc.context_mark, exc.problem_mark) if m is not None]
        if not marks:
            return {}
        head = "".join(text.splitlines(keepends=True)[: min(m.line for m in marks)])
        try:
            data = yaml.safe_load(head)
        except yaml.YAMLError:
            return {}
    except yaml.YAMLError:
        return {}
    return data if isinstance(data, dict) else {}


def resolved(value: object, base: str) -> str | None:
    """A path setting as load() makes it absolute; None for anything that is not a path."""
    if not isinstance(value, str) or not value or "\0" in value:
        return None
    return value if os.path.isabs(value) else os.path.normpath(os.path.join(base, value))


def show_status(endpoint: Endpoint, as_json: bool) -> int:
    """`preforkd status`: the running server's workers, from its status endpoint. When that
    does not answer, the pidfile tells a stopped server (the usual case) from one whose
    endpoint fails; both name the endpoint tried."""
    if not endpoint.configured():
        print("preforkd: status needs `pidfile` (or `admin.socket` or `admin.bind`) in the "
              "configuration, or --pidfile, to find the running server", file=sys.stderr)
        return EXIT_CONFIG_ERROR
    where = endpoint.where()
    try:
        try:
            body = fetch(endpoint.socket_path, endpoint.bind, "/status")
        except OSError:
            aside = endpoint.set_aside()
            if aside is None:
                raise
            body = fetch(aside.socket_path, None, "/status")
        table = "" if as_json else status_table(json.loads(body))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        why = reason(exc) if isinstance(exc, OSError) else f"unexpected answer: {exc!r}"
        pid = running_pid(endpoint.pidfile) if endpoint.pidfile else None
        if endpoint.pidfile and pid is None:
            print(f"preforkd: not running (no live pid in {endpoint.pidfile}); tried the "
                  f"status endpoint {where}: {why}", file=sys.stderr)
        else:
            runs = f" of preforkd (pid {pid})" if pid is not None else ""
            print(f"preforkd: cannot read the status endpoint {where}{runs}: {why}",
                  file=sys.stderr)
        return EXIT_RUNTIME_ERROR
    if as_json:
        say(body.decode(), end="")
    else:
        say(table)
    return 0


def refuse_reload(path: str, overrides: Mapping[str, object]) -> None:
    """`reload` with a configuration that does not validate (the error is printed by now):
    say that no HUP was sent and why. The master would re-read the file and refuse it the
    same way, so signalling only moves the error into its log."""
    endpoint = read_endpoint(path, overrides)
    pid = running_pid(endpoint.pidfile) if endpoint.pidfile else None
    other = other_file(pid, path, endpoint) if pid is not None else None
    if other is not None:
        why = f"{path} has errors (and the server reads {other}, the file it was started with)"
    else:
        why = f"it would read {path} again and refuse it the same way"
    serving = f"; preforkd (pid {pid}) keeps serving as it was" if pid is not None else ""
    print(f"preforkd: reload: nothing was sent to the server: {why}{serving}", file=sys.stderr)


def started_config(pid: int, endpoint: Endpoint) -> str | None:
    """The configuration file master `pid` reads again at a reload: the absolute -c of its
    command line, else the one its status endpoint reports (a relative -c was made absolute
    against the directory it started in, which /proc no longer shows once it has moved, as a
    daemon does to /); None when neither tells."""
    argv = read_cmdline(pid)
    given = config_argument(argv) if argv else None
    if given is not None and os.path.isabs(given):
        return given
    if not endpoint.configured():
        return None
    try:
        body = fetch(endpoint.socket_path, endpoint.bind, "/status", timeout=2.0)
        source = json.loads(body)["master"]["config"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return source if isinstance(source, str) and source else None


def other_file(pid: int, checked: str | None, endpoint: Endpoint) -> str | None:
    """The file master `pid` reads at a reload if it is not `checked` (compared as real
    paths; None: no file was named), else None; None too when the master's is unknown."""
    started = started_config(pid, endpoint)
    if started is None:
        return None
    if checked is not None and os.path.realpath(started) == os.path.realpath(checked):
        return None
    return started


def reload_running(endpoint: Endpoint, source: str | None, wait: float) -> int:
    """`preforkd reload`: HUP the master named by the pidfile and wait for the outcome it
    writes to PIDFILE.status. `source`: the configuration file validated by this command,
    None when none was named (`reload -p PIDFILE`: nothing validated here, the master's
    own validation is the outcome). Exit 0 when the new generation serves, 1 with the
    reason if the reload failed (the old generation keeps serving), no server runs or no
    outcome came within `wait`; 2 without a pidfile (and, from main, when the configuration
    does not validate: refuse_reload, nothing is sent)."""
    if not endpoint.pidfile:
        print("preforkd: reload needs `pidfile` in the configuration (or --pidfile) to find "
              "the running server", file=sys.stderr)
        return EXIT_CONFIG_ERROR
    pid = read_pid(endpoint.pidfile)
    if pid is None or not alive(pid):
        print(f"preforkd: not running (no live pid in {endpoint.pidfile})", file=sys.stderr)
        return EXIT_RUNTIME_ERROR
    if not is_master(pid):  # a stale pidfile whose pid another program now has
        print(f"preforkd: not running: pid {pid} (from {endpoint.pidfile}) is not a "
              "preforkd master; the pidfile is stale; nothing was sent", file=sys.stderr)
        return EXIT_RUNTIME_ERROR
    if written_before(endpoint.pidfile, pid):
        print(f"preforkd: not running: {started_later(pid, endpoint.pidfile)}; nothing was "
              "sent", file=sys.stderr)
        return EXIT_RUNTIME_ERROR
    # the file validated here is the one named on this command line; the master reads the
    # one it was started with, and applies that: checked and applied must be the same
    other = other_file(pid, source, endpoint) if source is not None else None
    if other is not None:
        print(f"preforkd: warning: this command read {source}, but the server (pid {pid}) "
              f"reads {other} again at a reload, the file it was started with: the reload "
              "applies that file, which was not checked here", file=sys.stderr)
    status_file = status_path(endpoint.pidfile)
    serial = count_of(read_status(status_file), pid, "serial")
    os.kill(pid, signal.SIGHUP)
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        status = read_status(status_file) or {}
        if count_of(status, pid, "serial") > serial and status.get("state") == "done":
            message = f"preforkd: {status.get('message', '')}"
            if status.get("ok") is True:
                say(message)
                return 0
            print(message, file=sys.stderr)
            return EXIT_RUNTIME_ERROR
        if not is_preforkd(pid):
            print(f"preforkd: the server (pid {pid}) exited during the reload", file=sys.stderr)
            return EXIT_RUNTIME_ERROR
        time.sleep(0.05)
    print(f"preforkd: no reload result within {wait:.0f}s", file=sys.stderr)
    return EXIT_RUNTIME_ERROR


def count_of(status: Mapping[str, object] | None, pid: int, key: str) -> int:
    """The count `key` (reloads: "serial", failed upgrades: "upgrades") in a PIDFILE.status
    that master `pid` wrote; 0 otherwise: a file another master left (one that died without
    cleaning up) says nothing of this one."""
    found = status or {}
    value = found.get(key, 0) if found.get("pid") == pid else 0
    return value if isinstance(value, int) else 0


def stop_running(endpoint: Endpoint, wait: float, force: bool) -> int:
    """`preforkd stop`: TERM (a graceful stop) to the master named by the pidfile -- and,
    while an upgrade is under way, to the other master of it too (upgrade_partners: either
    would serve on alone) -- then wait up to `wait` seconds for them to exit. Exit 0 once
    they have exited; 1 if one still runs then (with `force`: KILL to those masters alone,
    whose workers follow them, and 0 once they are gone); 2, nothing sent, as signal_master
    says."""
    partners: list[tuple[int, str]] = []

    def find_partners(pid: int) -> None:
        assert endpoint.pidfile is not None
        partners.extend(upgrade_partners(pid, endpoint.pidfile))

    pid, code = signal_master(endpoint, "stop", signal.SIGTERM, find_partners)
    if pid is None:
        return code
    for other, _ in partners:
        with contextlib.suppress(ProcessLookupError):
            os.kill(other, signal.SIGTERM)
    also = "".join(
        f"; and the {role} master of an upgrade under way (pid {other})"
        for other, role in partners
    )
    masters = [pid, *(other for other, _ in partners)]
    deadline = time.monotonic() + wait
    if all(exited(master, max(0.0, deadline - time.monotonic())) for master in masters):
        say(f"preforkd: stopped (pid {pid}{also})")
        return 0
    left = [master for master in masters if is_master(master)]
    named = ", ".join(str(master) for master in left)
    if not force:
        print(f"preforkd: still running (pid {named}) {wait:g}s after TERM: its workers may "
              "be finishing long requests (workers.graceful_timeout); --force kills it then",
              file=sys.stderr)
        return EXIT_RUNTIME_ERROR
    for master in left:
        with contextlib.suppress(ProcessLookupError):
            os.kill(master, signal.SIGKILL)
    if not all(exited(master, KILL_TIMEOUT) for master in left):
        print(f"preforkd: still running (pid {named}) {KILL_TIMEOUT:g}s after KILL",
              file=sys.stderr)
        return EXIT_RUNTIME_ERROR
    print(f"preforkd: killed (pid {named}): still running {wait:g}s after TERM; its workers "
          "exit when they see the master gone", file=sys.stderr)
    return 0


def signal_master(
    endpoint: Endpoint, command: str, sig: signal.Signals, before: Callable[[int], object] = id
) -> tuple[int | None, int]:
    """Send `sig` to the master named by the pidfile (calling `before(pid)` just before);
    (its pid, 0), or (None, exit status) with the reason on stderr: 2, nothing sent, without
    a pidfile, when no server runs, or when the pid is not a preforkd master's (a stale
    pidfile whose pid another program now has must not get the signal); 1 when the signal
    is not permitted."""
    if not endpoint.pidfile:
        print(f"preforkd: {command} needs `pidfile` in the configuration (or --pidfile) to "
              "find the running server", file=sys.stderr)
        return None, EXIT_CONFIG_ERROR
    pid = read_pid(endpoint.pidfile)
    if pid is None or not alive(pid):
        what = "no pid in" if pid is None else f"pid {pid} has exited, from"
        print(f"preforkd: not running ({what} {endpoint.pidfile}); nothing to {command}",
              file=sys.stderr)
        return None, EXIT_CONFIG_ERROR
    cmdline = read_cmdline(pid)
    if cmdline is None or not is_master_command(cmdline):
        runs = " ".join(arg for arg in cmdline or [] if arg)
        how = f"it runs {runs!r}" if runs else "its command line cannot be read"
        print(f"preforkd: not running: pid {pid} (from {endpoint.pidfile}) is not a preforkd "
              f"master ({how}), so the pidfile is stale; nothing was sent", file=sys.stderr)
        return None, EXIT_CONFIG_ERROR
    if written_before(endpoint.pidfile, pid):
        print(f"preforkd: not running: {started_later(pid, endpoint.pidfile)}; nothing to "
              f"{command}", file=sys.stderr)
        return None, EXIT_CONFIG_ERROR
    before(pid)
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        print(f"preforkd: not running (pid {pid} exited meanwhile)", file=sys.stderr)
        return None, EXIT_CONFIG_ERROR
    except PermissionError:
        print(f"preforkd: cannot signal preforkd (pid {pid}): not permitted (run as its "
              "user, or as root)", file=sys.stderr)
        return None, EXIT_RUNTIME_ERROR
    return pid, 0


def started_later(pid: int, pidfile: str) -> str:
    """Why master `pid` is not the one that wrote `pidfile` (pidfile.written_before)."""
    return (f"pid {pid} (from {pidfile}) is a preforkd master, but not the one that wrote "
            f"the pidfile ({status_path(pidfile)} names a process of that pid that started "
            "earlier), so the pidfile is stale")


def upgrade_running(endpoint: Endpoint, wait: float) -> int:
    """`preforkd upgrade`: USR2 to the master named by the pidfile, which starts a new master
    from the code installed now on the same sockets; once that one reports ready (its
    PIDFILE.status), TERM to the old one, and wait until it has exited. Exit 0 when the new
    master serves alone; 1 if the old master refused (why is printed), the new one exited
    (before it was ready: the old one serves on), or either step took longer than `wait`;
    2, nothing sent, as signal_master says."""
    status_file = status_path(endpoint.pidfile or "")  # signal_master refuses no pidfile
    upgrades = 0

    def note_upgrades(pid: int) -> None:
        nonlocal upgrades
        upgrades = count_of(read_status(status_file), pid, "upgrades")

    old, code = signal_master(endpoint, "upgrade", signal.SIGUSR2, note_upgrades)
    if old is None:
        return code
    assert endpoint.pidfile is not None
    deadline = time.monotonic() + wait
    while True:
        status = read_status(status_file) or {}
        new = read_pid(endpoint.pidfile)
        if count_of(status, old, "upgrades") > upgrades:
            print(f"preforkd: {status.get('message', '')}", file=sys.stderr)
            return EXIT_RUNTIME_ERROR
        if new not in (None, old) and been_ready(status, new):
            break
        if not is_master(old):
            print(f"preforkd: the server (pid {old}) exited during the upgrade",
                  file=sys.stderr)
            return EXIT_RUNTIME_ERROR
        if time.monotonic() >= deadline:
            print(f"preforkd: no new master was ready within {wait:g}s; the old one (pid "
                  f"{old}) still serves", file=sys.stderr)
            return EXIT_RUNTIME_ERROR
        time.sleep(0.05)
    assert new is not None
    say(f"preforkd: the new master (pid {new}) is ready; stopping the old one (pid {old})")
    with contextlib.suppress(ProcessLookupError):
        os.kill(old, signal.SIGTERM)
    if not exited(old, max(0.0, deadline - time.monotonic())):
        print(f"preforkd: the old master (pid {old}) still runs {wait:g}s after the upgrade "
              "began; its workers may be finishing long requests", file=sys.stderr)
        return EXIT_RUNTIME_ERROR
    if not is_master(new):
        print(f"preforkd: the new master (pid {new}) exited while the old one stopped; "
              "nothing serves now: start the server again", file=sys.stderr)
        return EXIT_RUNTIME_ERROR
    say(f"preforkd: upgraded: master pid {old} -> {new}")
    return 0


def exited(pid: int, timeout: float) -> bool:
    """Wait up to `timeout` seconds for master `pid` to exit; whether it has. A pid that is
    no longer a master (is_master: exited, reaped and reused) counts as exited."""
    deadline = time.monotonic() + timeout
    while is_master(pid):
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return False
        time.sleep(min(0.05, remaining))
    return True
