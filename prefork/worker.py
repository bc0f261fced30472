"""A worker process: wait for a connection with something to say, answer it, repeat.

Invariants: one request at a time; the worker waits in one epoll over the shared listeners
(EPOLLEXCLUSIVE, so one worker wakes per new connection), its parked keep-alive connections,
the channel from the master and its signal socket, so an idle keep-alive client never holds
a worker. Messages from the master are read only between requests; end-of-file on the channel
means the master is gone and the worker stops. The process leaves through os._exit (done by
the master's spawn, or at once on INT/QUIT), or dies of the master's SIGABRT.
"""

from __future__ import annotations

import contextlib
import errno
import faulthandler
import logging
import math
import os
import select
import signal
import socket
import ssl
import sys
import termios
import time
from dataclasses import dataclass, field
from types import FrameType
from typing import Any

import setproctitle

from prefork import channel as chan
from prefork.channel import (
    MAX_BOOT_ERROR,
    MAX_FDS,
    MSG_BACK,
    MSG_BOOT_ERROR,
    MSG_CONNS,
    MSG_FRESH,
    MSG_HAND_OVER,
    MSG_KEPT,
    MSG_KEPT_BACK,
    MSG_READY,
    MSG_RECYCLE,
    MSG_RELIEF,
    MSG_REOPEN,
    MSG_STOP,
    MSG_TAKEN,
)
from prefork.config import Config, jitter_share
from prefork.connection import Connection
from prefork.devreload import Watcher, error_app, module_files
from prefork.forwarded import TrustedProxies
from prefork.hooks import Hooks, ServerInfo, WorkerInfo
from prefork.http import Limits, ProtocolError
from prefork.http.proxy import ProxyHeader
from prefork.http.uwsgi import UwsgiParser
from prefork.httpserve import ERROR_LINGER, HttpProtocol, remote_of
from prefork.loader import load_app, prepare
from prefork.logs import Logs
from prefork.privileges import drop_privileges
from prefork.relief import Relief
from prefork.scoreboard import Activity, Slot
from prefork.signals import SignalQueue, Stopped, set_mask, stops_raise
from prefork.sockets import Listener, queued_bytes
from prefork.stderrpipe import text_stream, to_devnull
from prefork.stream import (
    StreamRefused,
    open_stream,
    peer_gone,
    sent_by,
    timed_out,
    use_stream_sockets,
    wait_readable,
)
from prefork.tls import TLSConnection
from prefork.uwsgiserve import UwsgiProtocol

log = logging.getLogger("prefork")

EXIT_OK = 0
EXIT_BOOT_ERROR = 3  # failed before it could serve (not the app's fault)
EXIT_APP_LOAD_ERROR = 4  # the application could not be imported

_EPOLLIN = select.EPOLLIN
# stream.eof_on_stop: how long a session that begins as the worker stops may take to send
# its first bytes before its read side is shut
LATE_SESSION_WAIT = 1.0
_LISTEN_EVENTS = select.EPOLLIN | select.EPOLLEXCLUSIVE
# the first byte of the master's messages about connections that the relief thread takes
# (Worker.take_from_channel). Not MSG_BACK / MSG_KEPT_BACK: what no other worker could take
# comes back, and taken by the thread it would be passed again on every tick, a ping-pong
# with the master for the whole request (a stopping server, a single worker).
_RELIEF_TAKES = frozenset((MSG_CONNS, MSG_FRESH, MSG_KEPT, MSG_TAKEN))  # one byte each
SWEEP_INTERVAL = 1.0
# When a worker stops, its idle keep-alive connections stay open this long: a request the
# client is sending at that moment is answered (with Connection: close) instead of racing
# the close. Clients that send nothing are closed after it.
STOP_IDLE_GRACE = 0.5
# A connection accepted but silent when the stop began gets this much more to send its request.
SILENT_GRACE = 1.0
# A worker already holding this many connections takes up to ACCEPT_BATCH new ones per
# wake-up (parked, served in the next round with the others): with thousands of busy
# keep-alive connections, one accept per epoll round would leave newcomers queued for
# seconds. A worker holding few takes one and serves it at once, so idle workers share.
ACCEPT_BATCH_ABOVE = 64
ACCEPT_BATCH = 32
# http.balance_connections: a worker holding at least BALANCE_ABOVE connections passes a new
# one on when another worker of its generation holds clearly fewer (its count in the
# scoreboard plus what was passed to it since the board was last scanned for the generation's
# workers, PEERS_INTERVAL ago at most: a worker that joins is found that soon).
BALANCE_ABOVE = 8
PEERS_INTERVAL = 0.1
# At most this many passed per PEERS_INTERVAL: each costs the master a hop, and a worker that
# keeps a few too many is better than a master (and channels) flooded under a connection storm.
BALANCE_BURST = 32
# How long a stopping worker waits for the master's answer about connections it passed (the
# master sends them back when no other worker can take them), counted from when the master
# read the last of its messages: until then (a master blocked in a reload's import) it
# waits for that read, up to its workers.graceful_timeout after the pass
PASS_ANSWER_WAIT = 1.0
# accept() errors that mean this worker (or the machine) is short of descriptors or kernel
# memory, not that the connection failed: the worker stops accepting for ACCEPT_PAUSE, and
# longer while it cannot get its reserve descriptor back (Worker.short_of_resources)
_SHORT_OF_RESOURCES = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
_OUT_OF_DESCRIPTORS = frozenset({errno.EMFILE, errno.ENFILE})
ACCEPT_PAUSE = 1.0
# a worker that keeps running short says so at most this often
SHORT_LOG_INTERVAL = 60.0


@dataclass(slots=True)
class WorkerSpec:
    """Everything a worker is given by the master at fork time."""

    number: int
    generation: int
    config: Config
    listeners: list[Listener]
    channel: socket.socket
    slot: Slot
    logs: Logs
    app: Any = None  # preloaded application, or None to import it after fork
    close_fds: list[int] = field(default_factory=list)
    tls: dict[int, ssl.SSLContext] = field(default_factory=dict)  # listener fd -> context
    hooks: Hooks = field(default_factory=Hooks)
    server: ServerInfo | None = None  # the master, as hooks see it
    environ: dict[str, str] | None = None  # the generation's environment (None: inherited)
    # the write end of the pipe the master reads into a syslog error log, for fd 2 (and fd 1
    # with capture_output); None: fd 2 is the error log itself (a file, the terminal)
    stderr: int | None = None


def boot_error(spec: WorkerSpec, why: str, code: int) -> int:
    """Tell the master why this worker cannot boot (its log and a reload's outcome say it);
    the exit code to leave with."""
    with contextlib.suppress(OSError):
        spec.channel.sendall(MSG_BOOT_ERROR + why.encode("utf-8", "replace")[-MAX_BOOT_ERROR:])
    return code


def max_requests_for(config: Config, number: int) -> int:
    """max_requests plus this worker's share of the jitter, spread evenly by worker number so
    that workers do not all retire at the same moment."""
    w = config.workers
    if not w.max_requests:
        return 0
    return w.max_requests + int(jitter_share(w, number, w.max_requests_jitter))


def exit_on_signals(hooks: Hooks, info: WorkerInfo) -> None:
    """Install the handlers that end a worker at once, with their hooks; call it while
    signals are blocked (as after fork).

    INT/QUIT: worker_int, then os._exit(0). ABRT (the master's, for a worker stuck past
    workers.timeout): faulthandler writes every thread's stack to fd 2 from its C handler,
    wherever the worker is stuck; with worker_abort set, the hook then runs and the worker
    dies of SIGABRT as it does without the hook, so the master sees the same status. Only
    the first of these signals to reach Python code runs a hook; the Python handlers of the
    later ones return at once and leave it to finish, so a Ctrl-C that reaches both the
    master and its workers (the terminal's INT, then the master's QUIT) runs worker_int once.
    """
    leaving = False

    def fast_stop(signum: int, frame: FrameType | None) -> None:
        nonlocal leaving
        if leaving:
            return
        leaving = True
        try:
            hooks.call("worker_int", info)
            _flush_std()
        finally:
            os._exit(EXIT_OK)

    def abort(signum: int, frame: FrameType | None) -> None:
        nonlocal leaving
        if leaving:
            return
        leaving = True
        try:
            hooks.call("worker_abort", info)
            _flush_std()
        finally:
            signal.signal(signal.SIGABRT, signal.SIG_DFL)
            os.abort()  # never returns; the status says SIGABRT, as it would without the hook

    signal.signal(signal.SIGINT, fast_stop)
    signal.signal(signal.SIGQUIT, fast_stop)
    if hooks.get("worker_abort") is not None:
        # faulthandler keeps the handler it replaces and, after its dump, puts it back and
        # raises the signal again: Python's handler then records it and `abort` runs in the
        # main thread at its next bytecode. faulthandler.register() refuses SIGABRT (it is
        # one of enable()'s signals). A faulthandler already enabled (PYTHONFAULTHANDLER in
        # the master, inherited through fork) is turned off first: enable() would not
        # replace the handler it saved then, and signal.signal() would remove its dump.
        faulthandler.disable()
        signal.signal(signal.SIGABRT, abort)
    faulthandler.enable(all_threads=True)


def _flush_std() -> None:
    """What a hook printed is written before os._exit / abort, which skip Python's flush."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError, AttributeError):
            pass


def to_master(fd: int, capture: bool) -> None:
    """Point fd 2 (and with `capture`, fd 1: logging.capture_output) at the pipe `fd` that
    the master reads into the error log on syslog (prefork.stderrpipe), and sys.stderr
    (sys.stdout) at it through a line-buffered stream that a master gone does not make
    raise (stderrpipe.WriteEnd)."""
    _flush_std()
    os.dup2(fd, 2)
    sys.stderr = text_stream(2, sys.stderr)
    if capture:
        os.dup2(fd, 1)
        sys.stdout = text_stream(1, sys.stdout)
    os.close(fd)


def quiet_stderr() -> None:
    """The master is gone, and with it the read end of the pipe that is fd 2 (and fd 1 with
    capture_output): /dev/null instead, so that a write there from now on (the stack dump of
    faulthandler, C code, os.write) fails no more (SIGPIPE is ignored, as Python sets it,
    so it kills nothing)."""
    _flush_std()
    if os.path.sameopenfile(1, 2):
        to_devnull(1)
    to_devnull(2)


def worker_main(spec: WorkerSpec) -> int:
    """The child's side of fork(): set up, load the app, report ready, serve."""
    for fd in spec.close_fds:
        try:
            os.close(fd)
        except OSError:
            pass
    # the generation's logging setup, before anything is logged: its error log on fd 2 (a
    # reload's canary and replacements get the new one while the master still has the old),
    # its level and its access log
    spec.logs.install()
    if spec.stderr is not None:
        to_master(spec.stderr, capture=spec.logs.capture_output)
    info = WorkerInfo(spec.number, spec.generation, spec.config, os.getpid())
    signals = SignalQueue(
        catch=(signal.SIGTERM, signal.SIGUSR1),
        # USR2 too: it is the master's (an upgrade), and a USR2 to the whole process group
        # (a gunicorn habit) must not take every worker down at once
        ignore=(signal.SIGHUP, signal.SIGTTIN, signal.SIGTTOU, signal.SIGWINCH, signal.SIGUSR2),
    )
    # INT/QUIT exit at once; SIGABRT from the master dumps every stack (faulthandler)
    exit_on_signals(spec.hooks, info)
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    # Until it reports ready the worker has accepted nothing, so a stop then (a reload
    # abandoned while its canary imports, TTOU, the master stopping) ends it at once instead
    # of after its import: TERM raises Stopped. From MSG_READY on, TERM waits in the queue
    # for the loop's graceful stop; one that arrives at the switch is handled either way.
    try:
        with stops_raise((signal.SIGTERM,)):
            # the master blocked every signal around fork(); our own handlers are in place
            # now (a TERM sent meanwhile is delivered here)
            set_mask(signal.SIG_SETMASK, ())
            booted = boot(spec, signals, info)
    except Stopped:
        log.info("worker %d: stopped before it was ready", spec.number)
        return EXIT_OK
    if isinstance(booted, int):
        return booted
    worker = booted
    try:
        spec.channel.sendall(MSG_READY)
    except OSError:
        return EXIT_OK  # the master is already gone
    try:
        return worker.run()
    finally:
        spec.hooks.call("worker_exit", spec.server, info)


def boot(spec: WorkerSpec, signals: SignalQueue, info: WorkerInfo) -> Worker | int:
    """The worker's set-up up to ready: its process, hooks, application and event loop; the
    Worker, or the exit status of a worker that cannot serve."""
    config = spec.config
    if spec.environ is not None:
        os.environ.clear()
        os.environ.update(spec.environ)
    name = config.proc_name or config.app
    setproctitle.setproctitle(f"preforkd: worker [{spec.number}] {name}")
    spec.slot.claim(os.getpid(), spec.generation, spec.number)
    try:
        drop_privileges(config.user, config.group)
    except (OSError, KeyError) as exc:
        log.error("worker %d: cannot switch to user %s: %s", spec.number, config.user, exc)
        return boot_error(spec, f"cannot switch to user {config.user}: {exc}", EXIT_BOOT_ERROR)
    if not spec.hooks.call("post_fork", spec.server, info):
        return boot_error(spec, spec.hooks.failure, EXIT_BOOT_ERROR)
    app = spec.app
    broken: set[str] = set()
    if app is None:
        try:
            prepare(config.pythonpath, config.chdir)
            app = load_app(config.app)
        except (Exception, SystemExit) as exc:  # an app that exits at import is not loaded
            log.exception("worker %d: cannot load the application %r", spec.number, config.app)
            if config.reload and isinstance(exc, Exception):
                # serve the traceback until the code is fixed
                app, broken = error_app(exc, stream=config.protocol == "tcp")
            else:
                why = (f"the application called sys.exit({exc.code!r}) at import"
                       if isinstance(exc, SystemExit) else str(exc))
                return boot_error(spec, why, EXIT_APP_LOAD_ERROR)
    if not spec.hooks.call("post_worker_init", info):
        return boot_error(spec, spec.hooks.failure, EXIT_BOOT_ERROR)
    worker = Worker(spec, app, signals, info)
    if config.reload:
        worker.watcher = Watcher(module_files([*config.reload_extra_files, *broken]))
    try:
        worker.prepare()  # a worker that cannot wait for connections is not ready
    except OSError:
        log.exception("worker %d: cannot set up its event loop", spec.number)
        return EXIT_BOOT_ERROR
    return worker


class Worker:
    def __init__(
        self, spec: WorkerSpec, app: Any, signals: SignalQueue, info: WorkerInfo
    ) -> None:
        config = spec.config
        self.spec = spec
        self.app = app
        self.signals = signals
        self.slot = spec.slot
        self.epoll = select.epoll()
        self.conns: dict[int, Connection] = {}
        self.listeners = {listener.fd: listener for listener in spec.listeners}
        # by listener_id, for connections passed between workers, and back (keyed by the
        # Listener object, whose fd is gone once a stop closes the listeners themselves)
        self.listener_ids = {chan.listener_id(lst.fd): lst for lst in spec.listeners}
        self.id_of_listener = {id(lst): lid for lid, lst in self.listener_ids.items()}
        self.channel_fd = spec.channel.fileno()
        self.signal_fd = signals.fileno()
        self.accepting = False
        # short of descriptors (or kernel memory): not accepting until then (monotonic; 0.0:
        # not paused), and the descriptor kept free to take a connection out of the queue
        # when accept() finds none left (libuv's EMFILE trick)
        self.accept_paused_until = 0.0
        self.reserve: int | None = None
        self.next_short_log = 0.0
        self.stopping = False  # graceful stop: answer what is held and queued, then exit
        self.drained = False  # the accept queues were emptied once after the stop began
        self.idle_grace_until = 0.0
        # drained, protocol tcp
        self.pending_streams: list[tuple[socket.socket, Any, Listener]] = []
        self.max_requests = max_requests_for(config, spec.number)
        self.asked_to_recycle = False
        self.max_connections = config.workers.max_connections
        http = config.http
        self.keepalive_timeout = http.keepalive_timeout
        self.header_timeout = http.header_timeout
        self.limits = Limits(
            http.max_request_line,
            http.max_header_fields,
            http.max_field_size,
            http.max_header_size,
            http.max_body_size,
        )
        # one read never exceeds the head limit, so the parser's head accounting is exact
        # up to one read (see RequestParser.feed)
        self.read_size = min(65536, http.max_header_size)
        self.next_sweep = 0.0
        # the peers whose word on the client counts: trusted proxies, or with protocol uwsgi
        # the peers allowed at all (a packet's variables name the client)
        self.uwsgi = config.protocol == "uwsgi"
        self.proxies = TrustedProxies(
            http.uwsgi_allow_ips if self.uwsgi else http.forwarded_allow_ips,
            http.forwarded_header,
        )
        self.proxy_protocol = http.proxy_protocol
        self.balance = (
            http.balance_connections and config.protocol == "http" and self.proxy_protocol == "off"
        )
        # pid -> (connections it holds, as last seen plus what was passed to it since, its
        # slot offset): the generation's other workers, looked up again at peers_until
        self.loads: dict[int, tuple[int, int]] = {}
        self.lightest: tuple[int, int, int] | None = None  # (pid, load, offset)
        self.peers_until = 0.0
        self.passes_left = 0
        # passed to the master and not yet answered (MSG_TAKEN, or sent back): a stopping
        # worker waits for the answer (awaits_answer), PASS_ANSWER_WAIT after the master
        # read its messages (unanswered_until), and for that read until unread_until
        self.unanswered = 0
        self.unanswered_until = 0.0
        self.unread_until = 0.0
        # ids of the listeners the serving workers take: set when this worker is replaced
        self.passing_to: set[int] = set()
        self.protocol: HttpProtocol | None = None
        if config.protocol == "tcp":
            for context in spec.tls.values():  # this process's copies, since the fork
                use_stream_sockets(context)
        if config.protocol != "tcp":
            self.protocol = (UwsgiProtocol if self.uwsgi else HttpProtocol)(
                app,
                self.slot,
                spec.logs,
                spec.number,
                body_timeout=http.body_timeout,
                body_min_rate=http.body_min_rate,
                send_timeout=http.send_timeout,
                request_timeout=config.workers.timeout or math.inf,  # 0: no limit
                server_header=http.server_header,
                script_name=http.script_name,
                access_log_skip=config.logging.access_log_skip,
                tls_fds=spec.tls,
                static=config.static,
                proxies=self.proxies,
                hooks=spec.hooks,
                worker_info=info,
            )
        self.watcher: Watcher | None = None  # reload mode
        # http.keepalive_relief: the thread, and the connection being served while the main
        # thread has given up the lock (the one connection the thread must not pass, evict,
        # nor mark the worker idle around; None outside that request)
        self.relief: Relief | None = None
        self.serving: Connection | None = None
        if (
            self.protocol is not None
            and http.keepalive_relief > 0
            and self.keepalive_timeout > 0
            and self.proxy_protocol == "off"
        ):
            self.relief = Relief(http.keepalive_relief, self.relieve)

    # the loop ----------------------------------------------------------------------------

    def prepare(self) -> None:
        """Everything the loop waits on, registered; raises OSError if that fails."""
        self.epoll.register(self.channel_fd, _EPOLLIN)
        self.epoll.register(self.signal_fd, _EPOLLIN)
        if self.watcher is not None and self.watcher.fd is not None:
            self.epoll.register(self.watcher.fd, _EPOLLIN)
        self.reserve = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
        self.start_accepting()
        if self.relief is not None:
            self.relief.start()

    def run(self) -> int:
        self.slot.set(Activity.IDLE)
        watcher = self.watcher
        poll = self.epoll.poll
        conns = self.conns
        listeners = self.listeners
        while True:
            timeout = SWEEP_INTERVAL if conns or watcher else -1.0
            if self.stopping:
                timeout = STOP_IDLE_GRACE / 2
            elif self.accept_paused_until:
                pause = max(0.0, self.accept_paused_until - time.monotonic())
                timeout = pause if timeout < 0 else min(timeout, pause)
            try:
                events = poll(timeout)
            except InterruptedError:
                continue
            for fd, _ in events:
                conn = conns.get(fd)
                if conn is not None:
                    self.on_readable(conn)
                elif fd in listeners:
                    listener = listeners[fd]
                    if self.accept(listener) and len(conns) >= ACCEPT_BATCH_ABOVE:
                        for _ in range(ACCEPT_BATCH - 1):
                            if not self.accepting or not self.accept(listener, serve=False):
                                break
                elif fd == self.channel_fd:
                    self.on_channel()
                elif fd == self.signal_fd:
                    self.on_signals()
            if conns:
                self.sweep()
            if self.accept_paused_until and time.monotonic() >= self.accept_paused_until:
                self.resume_accepting()
            if watcher is not None and not self.stopping:
                self.check_sources(watcher)
            if self.stopping and self.finished():
                return EXIT_OK

    def start_accepting(self) -> None:
        if not self.accepting:
            for fd in self.listeners:
                self.epoll.register(fd, _LISTEN_EVENTS)
            self.accepting = True

    def stop_accepting(self) -> None:
        if self.accepting:
            for fd in self.listeners:
                self.epoll.unregister(fd)
            self.accepting = False

    # connections -----------------------------------------------------------------------

    def accept(self, listener: Listener, serve: bool = True) -> bool:
        """Take one connection; with `serve`, answer what it already sent at once, else only
        park it (a stopping worker empties the queue first and serves afterwards)."""
        try:
            sock, peer = listener.accept()
        except (BlockingIOError, InterruptedError):
            return False  # another worker took it
        except OSError as exc:
            if exc.errno not in _SHORT_OF_RESOURCES:
                # the client went away, or the network did: this connection is lost, not us
                log.debug("worker %d: accept: %s", self.spec.number, exc)
                return True
            taken = self.short_of_resources(listener, exc)
            if taken is None:
                return False
            sock, peer = taken
        if self.protocol is None:
            if serve:
                self.serve_stream(sock, peer, listener)
            else:
                self.pending_streams.append((sock, peer, listener))
            return True
        if (
            self.balance
            and listener.fd not in self.spec.tls
            and (
                (len(self.conns) >= BALANCE_ABOVE and not self.stopping)
                # replaced: what it drains from the shared queue goes to a serving peer
                or (self.stopping and self.id_of_listener.get(id(listener)) in self.passing_to)
            )
            and self.pass_to_peer(sock, listener, anyone=self.stopping)
        ):
            return True
        if len(self.conns) >= self.max_connections:
            self.evict_idle()
        context = self.spec.tls.get(listener.fd)
        parser = self.new_parser()
        conn: Connection
        if context is not None:
            sock.setblocking(False)
            try:
                tls_sock = context.wrap_socket(
                    sock, server_side=True, do_handshake_on_connect=False
                )
            except OSError as exc:
                # a client that reset before we took it: wrap_socket finds the socket not
                # connected and probes it with a recv, which raises (ssl.SSLError included)
                log.debug("worker %d: closing %s before TLS: %s", self.spec.number, peer, exc)
                sock.close()
                return True
            conn = TLSConnection(tls_sock, peer, listener, self.limits, parser)
        else:
            conn = Connection(sock, peer, listener, self.limits, parser)
        conn.deadline = time.monotonic() + self.header_timeout
        if self.proxies.enabled and self.proxies.trusts(peer):
            conn.trusted = True
            if self.proxy_protocol != "off":
                conn.proxy = ProxyHeader(self.proxy_protocol)
        if serve:
            self.take(conn)
        else:
            self.park(conn)
        return True

    def new_parser(self) -> UwsgiParser | None:
        """The parser of a connection this worker takes: the uwsgi protocol's, or None for
        HTTP's (Connection's default)."""
        return UwsgiParser(self.limits) if self.uwsgi else None

    def short_of_resources(
        self, listener: Listener, exc: OSError
    ) -> tuple[socket.socket, Any] | None:
        """accept() failed for want of a descriptor (EMFILE: an application leaking files, a
        ulimit below the connections held; ENFILE) or of kernel memory. Sleeping and trying
        again left the connection queued: with EPOLLEXCLUSIVE no other worker is woken for
        a connection already there, only for the next arrival. So this worker stops
        accepting (new arrivals wake workers with room) and, out of descriptors, gives up
        its reserve one to take the queued connection anyway and serve it (not passed on:
        the worker receiving it may be short too, and the kernel would drop it in the
        channel); it accepts again once it has its reserve back (resume_accepting)."""
        now = time.monotonic()
        if now >= self.next_short_log:
            self.next_short_log = now + SHORT_LOG_INTERVAL
            log.error("worker %d (pid %d): accept: %s; leaving new connections to the other "
                      "workers until it has room", self.spec.number, os.getpid(),
                      exc.strerror or exc)
        self.stop_accepting()
        self.accept_paused_until = now + ACCEPT_PAUSE
        if self.reserve is None or exc.errno not in _OUT_OF_DESCRIPTORS:
            return None
        os.close(self.reserve)
        self.reserve = None
        try:
            return listener.accept()
        except OSError:
            return None  # another worker took it, or the descriptor went elsewhere

    def resume_accepting(self) -> None:
        """The pause after running short is over: accept again once the reserve descriptor
        can be had back (until then this worker serves what it holds, the others the
        listeners)."""
        if self.reserve is None:
            try:
                self.reserve = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
            except OSError:
                self.accept_paused_until = time.monotonic() + ACCEPT_PAUSE
                return
        self.accept_paused_until = 0.0
        if not self.stopping:
            self.accept_if_room()

    def accept_if_room(self) -> None:
        """Accept again once below workers.max_connections (unless short of descriptors:
        resume_accepting decides then)."""
        if (
            not self.accepting
            and not self.accept_paused_until
            and len(self.conns) < self.max_connections
        ):
            self.start_accepting()

    def take(self, conn: Connection) -> None:
        """A connection new to this worker: what it already sent is answered at once (it
        counts as held meanwhile), else it is parked until it sends."""
        self.slot.hold(len(self.conns) + 1)
        if not self.on_readable(conn) and not conn.closed:
            self.park(conn)

    def reject(self, conn: Connection, error: ProtocolError) -> None:
        """Answer with the error, then linger (half-closed, parked) so the client reads it;
        nothing it sends afterwards is parsed."""
        assert self.protocol is not None
        self.protocol.reject(conn, error)
        if conn.begin_linger(ERROR_LINGER):
            self.park(conn)
        else:
            self.drop(conn)

    def on_readable(self, conn: Connection) -> bool:
        """Read what arrived and answer every complete request; False if nothing was there."""
        if conn.linger_until:
            if not conn.discard_input():
                self.drop(conn)
            return True
        if not conn.handshaken:
            done = conn.handshake()  # type: ignore[attr-defined]
            if done is None:
                return False  # parked until the client sends more (header_timeout applies)
            if not done:
                self.drop(conn)
                return True
        data = conn.recv_now(self.read_size)
        if data is None:
            return False
        if not data:
            self.drop(conn)
            return True
        if conn.proxy is not None:
            try:
                data = self.read_proxy_header(conn, data)
            except ProtocolError as exc:
                log.debug("closing %s: %s", conn.peer, exc.reason)
                self.drop(conn)  # a proxy speaking the wrong protocol gets no HTTP answer
                return True
            if not data:
                if conn.head_deadline == 0.0:
                    conn.head_deadline = time.monotonic() + self.header_timeout
                if conn.fd not in self.conns:
                    self.park(conn)
                return True
        parser = conn.parser
        was_idle = parser.idle
        try:
            parser.feed(data)
        except ProtocolError as exc:
            if self.answer_queued(conn):
                self.reject(conn, exc)
            return True
        except Exception:
            # a parser bug must cost one connection, never the worker
            log.exception("worker %d: unexpected error parsing a request", self.spec.number)
            self.reject(conn, ProtocolError(400, "malformed request"))
            return True
        if parser.requests:
            self.serve(conn)
        elif was_idle and not parser.idle:
            conn.head_deadline = time.monotonic() + self.header_timeout
            self.park(conn)
        elif conn.fd not in self.conns:
            self.park(conn)  # e.g. only the empty line allowed before a request (RFC 9112 2.2)
        return True

    def answer_queued(self, conn: Connection) -> bool:
        """A request broke the framing after whole ones that arrived in the same read: those
        are answered first, in order, so the error answers the request it belongs to; False
        if the connection closed meanwhile (nothing is owed on it then)."""
        conn.parser.drop_broken()
        if not conn.parser.requests:
            return True
        assert self.protocol is not None
        try:
            if self.protocol.serve(conn, True):
                return True
        except ProtocolError:
            return True  # the error the caller answers broke the framing first
        self.close_after_answer(conn)
        return False

    def read_proxy_header(self, conn: Connection, data: bytes) -> bytes:
        """Feed the PROXY header; what follows it (b"" until it is complete)."""
        assert conn.proxy is not None
        rest = conn.proxy.feed(data)
        if rest is None:
            return b""
        if conn.proxy.source is not None:
            conn.peer = conn.proxy.source
            conn.remote = None
            conn.trusted = self.proxies.trusts(conn.peer)  # now judged on the real client
        conn.proxy = None
        return rest

    def serve(self, conn: Connection) -> None:
        protocol = self.protocol
        assert protocol is not None
        keep_alive = (
            self.keepalive_timeout > 0
            and not self.stopping
            and len(self.conns) <= self.max_connections
        )
        relief = self.relief
        try:
            if relief is None:
                keep = protocol.serve(conn, keep_alive)
            else:
                # the relief thread may pass the other parked connections meanwhile
                self.serving = conn
                relief.lock.release()
                try:
                    keep = protocol.serve(conn, keep_alive)
                finally:
                    relief.lock.acquire()
                    # out of the request: evict_idle and drop treat it as any other again
                    self.serving = None
        except ProtocolError as exc:  # a request after a body the application read
            keep = None
            self.reject(conn, exc)
        if self.max_requests and self.slot.requests >= self.max_requests:
            self.ask_to_be_replaced()
        if keep is None:
            return
        if not keep:
            self.close_after_answer(conn)
            return
        now = time.monotonic()
        if conn.parser.idle:
            conn.deadline = now + self.keepalive_timeout
        else:
            conn.head_deadline = now + self.header_timeout
        self.park(conn)

    def close_after_answer(self, conn: Connection) -> None:
        """Close a connection whose last answer said so. When the client was still sending
        (a body the application did not read, a body that broke a limit), a lingering
        half-close first, as after a rejected head: closing with unread bytes would send a
        reset that can destroy the response before the client reads it. So too when the
        request was read whole but bytes after it wait unread (a uwsgi client sending more
        than CONTENT_LENGTH, an HTTP request pipelined after a Connection: close one)."""
        if (
            conn.closed
            or (conn.parser.idle and not conn.has_unread_bytes())
            or not conn.begin_linger(ERROR_LINGER)
        ):
            self.drop(conn)
        else:
            self.park(conn)

    def park(self, conn: Connection) -> None:
        """Wait for this connection's next bytes in the worker's epoll, not in a recv."""
        if conn.fd not in self.conns:
            self.conns[conn.fd] = conn
            self.slot.hold(len(self.conns))
            self.epoll.register(conn.fd, _EPOLLIN)
            if len(self.conns) >= self.max_connections and not self.evict_idle():
                self.stop_accepting()  # every one is mid-request: let other workers accept

    def evict_idle(self) -> bool:
        """At the connection cap, close the longest-parked idle keep-alive connection (HTTP
        lets a server close an idle connection at any time) so a new client is not refused.
        Not one whose client has sent its next request (unread while this worker was busy):
        closing over unread bytes resets the connection, and the request is lost. Nor the
        one being served: the relief thread parks what it takes from the channel while the
        main thread is inside a request, and that connection, its request read whole, looks
        idle and served."""
        serving = self.serving
        for conn in self.conns.values():
            if conn is serving:
                continue
            if conn.parser.idle and conn.served and not conn.has_input():
                self.drop(conn)
                return True
        return False

    def drop(self, conn: Connection) -> None:
        self.slot.hold(len(self.conns) - (conn.fd in self.conns))
        if self.conns.pop(conn.fd, None) is not None:
            self.accept_if_room()
            # its last keep-alive client is gone. Not by the relief thread inside a request
            # (an eviction as it parks what it took from the channel): IDLE would erase the
            # request's start, which the master's workers.timeout watches
            if not self.conns and not self.stopping and self.serving is None:
                self.slot.set(Activity.IDLE)
        if conn.adopted:
            # another process may still hold the open file for a moment (it is closed there
            # right after the hand-over), and the epoll entry lives as long as the file
            try:
                self.epoll.unregister(conn.fd)
            except OSError:
                pass
        conn.close()  # closing the fd also removes it from the epoll set

    def sweep(self) -> None:
        """Close parked connections past their deadline: idle ones silently, a request head
        that stopped arriving with 408."""
        now = time.monotonic()
        if now < self.next_sweep:
            return
        self.next_sweep = now + SWEEP_INTERVAL
        for conn in list(self.conns.values()):
            if conn.linger_until:
                if now >= conn.linger_until:
                    self.drop(conn)
            elif conn.parser.idle:
                if now >= conn.deadline and not conn.has_input():
                    self.drop(conn)  # (with input, the next round answers it or sees EOF)
            elif now >= conn.head_deadline:
                self.reject(conn, ProtocolError(408, "request head timed out"))

    def serve_stream(self, sock: socket.socket, peer: Any, listener: Listener) -> None:
        """protocol: tcp -- hand the connection to the handler, then close it. It counts as
        one request: 200 when the handler returns (or lets the client's reset or broken pipe
        escape), 408 when it let a TimeoutError (the client idle past stream.idle_timeout)
        escape, 500 when it raised anything else, 400 when it never reached the handler
        (handshake, PROXY header)."""
        started = time.monotonic()
        slot = self.slot
        slot.busy(b"TCP", _peer_text(peer).encode("latin-1", "replace")[:192], started)
        slot.hold(1)
        slot.set_activity(Activity.WAITING)  # a handshake or PROXY header waits on the client
        stream: socket.socket | None = None
        status = 200
        addr = peer
        try:
            trusted = self.proxies.enabled and self.proxies.trusts(peer)
            proxy = self.proxy_protocol if trusted and self.proxy_protocol != "off" else None
            stream, source = open_stream(
                sock,
                slot,
                context=self.spec.tls.get(listener.fd),
                proxy_mode=proxy,
                handshake_timeout=self.spec.config.stream.handshake_timeout,
                idle_timeout=self.spec.config.stream.idle_timeout,
            )
            addr = source or peer
            slot.set_activity(Activity.BUSY)
            if self.spec.config.stream.eof_on_stop:
                self.serve_until_stop(stream, addr)
            else:
                self.app(stream, addr)
        except StreamRefused as exc:
            status = 400
            log.debug("worker %d: closing %s: %s", self.spec.number, _peer_text(peer), exc)
        except TimeoutError:
            if stream is not None and timed_out(stream):
                status = 408
                log.info("stream handler for %s: the client was idle past stream.idle_timeout",
                         _peer_text(addr))
            else:
                # not the client's socket: a backend the handler talks to (its own timeout),
                # which is the handler's failure, not an idle client
                status = 500
                log.exception("stream handler failed for %s", _peer_text(addr))
        except (ConnectionResetError, BrokenPipeError) as exc:
            if stream is None or not peer_gone(stream):
                # not from the client's connection (a backend the handler talks to)
                status = 500
                log.exception("stream handler failed for %s", _peer_text(addr))
            else:
                # the client's doing, as nginx's stream module counts it (200): not a server
                # error
                log.info("stream handler for %s: the client closed the connection (%s)",
                         _peer_text(addr), exc.strerror or exc)
        except BaseException:
            # SystemExit, KeyboardInterrupt, asyncio.CancelledError too: the handler's errors,
            # which must not end the worker (see HttpProtocol.respond)
            status = 500
            log.exception("stream handler failed for %s", _peer_text(addr))
        finally:
            sent = 0
            if stream is not None:
                sent = sent_by(stream)
                try:
                    stream.close()
                except OSError:
                    pass
            now = time.monotonic()
            slot.hold(0)
            slot.done(status, now - started, sent, now=now)
        if self.spec.logs.access_enabled:
            self.spec.logs.access(
                remote_of(addr)[0],
                "TCP",
                str(listener.address),
                "",
                status,
                sent,
                "",
                "",
                now - started,
                self.spec.number,
                protocol="TLS" if listener.fd in self.spec.tls else "TCP",
            )
        if self.max_requests and self.slot.requests >= self.max_requests:
            self.ask_to_be_replaced()

    def serve_until_stop(self, stream: socket.socket, addr: Any) -> None:
        """stream.eof_on_stop: the handler runs with a SIGTERM handler (the master sends
        TERM with its stop message to a tcp worker) that shuts the read side, so a handler
        blocked in recv wakes to end-of-file. The wakeup fd still tells the loop, which stops
        the worker once the handler returns. A stop asked for before (the scoreboard's stop
        byte, or a connection the stopping worker took from its queue) is honoured at once.

        The handler is installed without SA_RESTART (signal.signal's way), which this relies
        on: a recv the kernel restarted by itself would never return to run it. SignalQueue's
        SA_RESTART is put back afterwards, for C code in later handlers."""

        def shut_reads(signum: int = 0, frame: object = None) -> None:
            with contextlib.suppress(OSError):  # the client may have reset it already
                # socket.socket's own: SSLSocket.shutdown would drop TLS from the socket
                socket.socket.shutdown(stream, socket.SHUT_RD)

        previous = signal.signal(signal.SIGTERM, shut_reads)
        try:
            if self.stopping or self.slot.stop_requested():
                # a session that begins as the worker stops (taken from its queue): what the
                # client sends first is still read, as a request queued at a stop is
                # answered; end-of-file follows it
                with contextlib.suppress(OSError):
                    wait_readable(stream, LATE_SESSION_WAIT)
                shut_reads()
            self.app(stream, addr)
        finally:
            signal.signal(signal.SIGTERM, previous)
            signal.siginterrupt(signal.SIGTERM, False)

    def check_sources(self, watcher: Watcher) -> None:
        watcher.watch_new_imports()  # a request may have imported more of the application
        changed = watcher.changed()
        if changed is not None:
            log.info("worker %d (pid %d): %s changed; restarting to load it",
                     self.spec.number, os.getpid(), changed)
            watcher.close()
            self.begin_stop()

    # stopping --------------------------------------------------------------------------

    def ask_to_be_replaced(self) -> None:
        """max_requests reached: the master starts a successor (at most workers.max_recycling
        at a time) and tells this worker to stop once it is ready; until then it serves."""
        if self.asked_to_recycle:
            return
        self.asked_to_recycle = True
        log.info(
            "worker %d (pid %d): %d requests served; asking to be replaced",
            self.spec.number,
            os.getpid(),
            self.slot.requests,
        )
        try:
            self.spec.channel.sendall(MSG_RECYCLE)
        except OSError:
            self.begin_stop()  # no master to replace us

    def begin_stop(self) -> None:
        if not self.stopping:
            self.stopping = True
            self.idle_grace_until = time.monotonic() + STOP_IDLE_GRACE
            self.slot.stopping()

    def finished(self) -> bool:
        """While stopping: close idle keep-alive connections; done once nothing is held and,
        for a graceful stop, nothing is left in the listeners' accept queues."""
        now = time.monotonic()
        if now >= self.idle_grace_until:
            for conn in list(self.conns.values()):
                if conn.parser.idle and not conn.linger_until and conn.has_input():
                    continue  # a request sent while this worker was busy: answered next
                if conn.parser.idle and (conn.served or conn.linger_until):
                    self.drop(conn)  # between requests; a fresh one still gets its answer
                elif conn.parser.idle and now >= self.idle_grace_until + SILENT_GRACE:
                    # accepted but silent: a client that connected just before the stop
                    # gets SILENT_GRACE to send its request (with http.defer_accept on, the
                    # kernel hands over a silent connection only once it gave up on it)
                    self.drop(conn)
        if not self.drained:
            # what was queued when the stop began is answered; later arrivals are not
            # waited for, or a client that keeps reconnecting would hold the stop open
            self.drained = True
            self.drain_backlog()
            self.stop_accepting()
            for listener in self.listeners.values():
                listener.sock.close()  # our copy only; the master owns paths and its own copy
            self.listeners.clear()
            for sock, peer, listener in self.pending_streams:
                self.serve_stream(sock, peer, listener)
            self.pending_streams.clear()
        for _ in range(chan.MAX_PENDING):
            # a connection passed at the last moment is answered, not dropped unread
            if self.conns or self.channel_fd not in dict(self.epoll.poll(0)):
                break
            self.on_channel()
        if self.awaits_answer(now):
            return False  # what it passed may yet come back to it
        return not self.conns

    def passed(self, messages: int, now: float) -> None:
        """`messages` carrying connections went to the master: each is answered (taken, or
        sent back), and this worker, stopping, waits for the answers before it exits."""
        self.unanswered += messages
        self.unanswered_until = now + PASS_ANSWER_WAIT
        self.unread_until = now + max(PASS_ANSWER_WAIT, self.spec.config.workers.graceful_timeout)

    def awaits_answer(self, now: float) -> bool:
        """Whether connections passed to the master may still come back. The master answers
        a pass as it reads it; while it has not read it (its loop blocked in a reload's
        import), the wait goes on for as long as the master lives, to unread_until at most
        (the master kills a stopping worker at its graceful timeout anyway): gone before the
        master read them, connections no other worker could take were closed unanswered."""
        if not self.unanswered:
            return False
        if now < self.unread_until and self.master_unread():
            self.unanswered_until = now + PASS_ANSWER_WAIT  # counted from the read
            return True
        return now < self.unanswered_until

    def master_unread(self) -> bool:
        """Whether the master has yet to read something this worker sent on its channel:
        the bytes the kernel still holds for it (SIOCOUTQ; all of them are dropped when the
        master's end closes, so a master gone reads as one that has read everything)."""
        try:
            return queued_bytes(self.channel_fd, termios.TIOCOUTQ) > 0
        except OSError:
            return False

    def drain_backlog(self) -> bool:
        """Accept what is queued on every listener now -- not what keeps arriving, or a busy
        server would never finish stopping; True if anything was taken."""
        took = False
        for listener in list(self.listeners.values()):
            queued = listener.queued()
            limit = self.spec.config.backlog if queued is None else queued
            for _ in range(limit):
                if not self.accept(listener, serve=False):
                    break
                took = True
        return took

    def on_channel(self) -> None:
        message = chan.receive(self.spec.channel)
        if message is None:
            return
        data, fds = message
        if self.on_connections(data, fds):
            return
        for fd in fds:  # no other message carries descriptors
            os.close(fd)
        if not data:
            # the master died: nobody will replace us or watch our deadlines
            self.epoll.unregister(self.channel_fd)
            if self.spec.stderr is not None:
                quiet_stderr()  # nobody reads our stderr either
            self.begin_stop()
        elif data.startswith(MSG_HAND_OVER):
            self.begin_stop()
            self.hand_over(chan.parse_hand_over(data))
        elif data == MSG_STOP:
            self.begin_stop()
        elif data == MSG_REOPEN:
            self.spec.logs.reopen()

    def on_connections(self, data: bytes, fds: list[int], read: bool = True) -> bool:
        """A message that carries connections (or answers a pass): take them; False for
        any other. Not `read`: park the fresh ones without reading them yet (the relief
        thread, which never serves)."""
        if data.startswith(MSG_CONNS):
            self.adopt(chan.parse_conns(data, fds))
        elif data.startswith((MSG_FRESH, MSG_KEPT, MSG_BACK, MSG_KEPT_BACK)):
            conns = chan.parse_conns(data, fds)
            if data.startswith((MSG_BACK, MSG_KEPT_BACK)):  # ours, no other worker took them
                self.unanswered = max(0, self.unanswered - 1)  # one answer per message
            served = data.startswith((MSG_KEPT, MSG_KEPT_BACK))
            self.adopt(conns, fresh=True, served=served, read=read)
        elif data == MSG_TAKEN:
            self.unanswered = max(0, self.unanswered - 1)
        else:
            return False
        return True

    def take_from_channel(self) -> None:
        """The relief thread's read of the channel, inside a long request: the connections
        the master sent while this worker was free, before it began the request (a race
        the master cannot see), would wait in the channel for that request to end, out of
        reach of relief, and die with this worker at workers.timeout. Parked here, they
        are passed on with the others. Only messages about connections are taken, in
        order, up to the first of any other kind: stops and hand-overs stay for the main
        thread, and so do connections sent back (MSG_BACK, MSG_KEPT_BACK: no other worker
        could take them, and passed again they would only come back again)."""
        channel = self.spec.channel
        while True:
            try:
                # the kind alone: a peek leaves the message, and its descriptors, queued
                kind = channel.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
            except OSError:
                return  # none waiting (or the master gone: the main thread sees to that)
            if kind not in _RELIEF_TAKES:
                return
            message = chan.receive(channel)
            if message is None:
                return
            self.on_connections(*message, read=False)

    # keep-alive connections passed between workers -------------------------------------

    def hand_over(self, takers: set[int]) -> None:
        """Stopping to be replaced: pass every idle keep-alive connection on a listener in
        `takers` (ids the serving workers listen on) to the master, which passes it to one of
        them, so the client keeps its connection (no reconnect, no request raced against a
        close). The rest are closed as in any stop, after STOP_IDLE_GRACE."""
        self.passing_to = takers  # and the backlog it drains goes to them too (accept)
        if self.protocol is None or self.proxy_protocol != "off":
            return  # a PROXY header's client address would not travel with the socket
        ids = self.id_of_listener
        ready: list[tuple[Connection, int]] = [
            (conn, ids[id(conn.listener)])
            for conn in self.conns.values()
            if ids.get(id(conn.listener)) in takers and conn.served and _between_requests(conn)
        ]
        passed = self.send_away(ready, MSG_CONNS)  # those not sent are closed as in any stop
        if passed:
            # answered as any pass: taken, or back (a stop began meanwhile, no taker), where
            # a request a client sent on one since is answered, not lost in a close
            self.passed(-(-passed // MAX_FDS), time.monotonic())
            log.debug("worker %d: passed %d keep-alive connections on", self.spec.number, passed)

    def send_away(self, conns: list[tuple[Connection, int]], head: bytes, wait: bool = True) -> int:
        """Pass (connection, listener id) pairs to the master after `head`, MAX_FDS per
        message; how many went. A batch that cannot be sent (`wait` False: the channel is
        full) stays here, as do those after it."""
        passed = 0
        for start in range(0, len(conns), MAX_FDS):
            batch = conns[start : start + MAX_FDS]
            for conn, _ in batch:
                # the epoll entry belongs to the open file, which lives on in the master and
                # the next worker: remove it here before anyone else can act on the socket
                self.epoll.unregister(conn.fd)
            if not chan.send_conns(
                self.spec.channel,
                [(conn.fd, lid, conn.deadline) for conn, lid in batch],
                head,
                wait,
            ):
                for conn, _ in batch:
                    self.epoll.register(conn.fd, _EPOLLIN)
                break
            for conn, _ in batch:
                del self.conns[conn.fd]
                conn.close()  # this process's descriptor only
            passed += len(batch)
        self.slot.hold(len(self.conns))
        return passed

    def relieve(self, after: float) -> str | None:
        """The relief thread's turn (http.keepalive_relief), while the main thread is inside
        a request and has given up the lock: once that request has lasted `after` seconds,
        pass every connection parked here between requests (and any accepted and not yet
        read from) to the free worker of this generation holding the fewest -- when this one
        stops, or a reload replaced its generation, to whichever worker the master finds
        serving. Their clients are answered there instead of waiting behind the request,
        and survive if it is killed at workers.timeout. A connection with part of a request
        read, a TLS one, and the one being served stay."""
        started = self.slot.in_request_since()
        now = time.monotonic()
        if started is None or now - started < after:
            return None
        self.take_from_channel()
        ids = self.id_of_listener
        ready = [
            (conn, ids[id(conn.listener)])
            for conn in self.conns.values()
            if conn is not self.serving and id(conn.listener) in ids and _between_requests(conn)
        ]
        if not ready:
            return None
        pid = self.free_peer(now)
        if pid is None:
            # a worker a reload replaced may have no free peer left in its generation, and
            # the master asks it to stop through the channel this thread does not read: a
            # later generation serving says so, and the master passes them to that one
            if not self.stopping and not self.slot.outdated():
                return None  # every other worker is busy too: look again next tick
            pid = 0
        messages = 0
        for served in (True, False):
            group = [(conn, lid) for conn, lid in ready if bool(conn.served) is served]
            head = chan.balance_head(pid, MSG_RELIEF if served else chan.MSG_BALANCE)
            passed = self.send_away(group, head, wait=False)
            messages += -(-passed // MAX_FDS)
            if passed < len(group):
                break
        if not messages:
            return None
        self.passed(messages, now)  # each is answered: taken, or back to us
        if not self.stopping:
            self.accept_if_room()
        return (f"worker {self.spec.number}: {now - started:.1f} s into a request; passed "
                f"keep-alive connections to {pid or 'the master'}")

    def free_peer(self, now: float) -> int | None:
        """The worker of this generation holding the fewest connections among those that can
        take one now; None if there is none."""
        lightest = _lightest(self.peer_loads(now))
        return None if lightest is None else lightest[0]

    def adopt(
        self,
        conns: list[tuple[int, int, float]],
        fresh: bool = False,
        served: bool = False,
        read: bool = True,
    ) -> None:
        """Park keep-alive connections another worker passed on, as if served here; one that
        cannot be kept (no such listener here) is closed and its client reconnects, as it
        would have without the hand-over. At max_connections the longest-parked idle
        connection with nothing to read is closed for room, else this one is kept over the
        cap (park stops accepting): a client may have sent its next request on it while it
        travelled, and closing it unread would lose that request. A stopping worker keeps
        it too, and answers such a request before it closes the idle ones (finished).
        `fresh` ones were just accepted by a busier worker (balance_connections) and never
        read from: they are taken as accept() takes a connection (read at once, after all
        those of the message are parked); `served` ones too, from a worker inside a long
        request (keepalive_relief): their clients are between requests, and one may have
        sent its next request already."""
        now = time.monotonic()
        taken: list[Connection] = []
        for fd, lid, deadline in conns:
            listener = self.listener_ids.get(lid)
            try:
                sock = socket.socket(fileno=fd)
            except OSError:
                os.close(fd)
                continue
            if (
                listener is None
                or self.protocol is None
                or listener.fd in self.spec.tls
                # a served connection is HTTP's: a uwsgi one ends with its response (it
                # comes from a worker of before a reload that changed the protocol)
                or (self.uwsgi and (served or not fresh))
            ):
                sock.close()
                continue
            if len(self.conns) >= self.max_connections:
                self.evict_idle()
            try:
                peer = sock.getpeername()
            except OSError:
                sock.close()  # the client is already gone
                continue
            conn = Connection(sock, peer, listener, self.limits, self.new_parser())
            conn.adopted = True
            conn.trusted = self.proxies.enabled and self.proxies.trusts(peer)
            # the clock keeps running: moving between workers does not extend it
            if fresh:
                conn.served = int(served)
                idle = self.keepalive_timeout if served else self.header_timeout
                conn.deadline = min(deadline, now + idle)
                self.park(conn)
                taken.append(conn)
            else:
                conn.served = 1
                conn.deadline = min(deadline, now + self.keepalive_timeout)
                self.park(conn)
        # Every one is parked before any is answered: a request already waiting on one is
        # answered now, however late, but one that runs long must not hold the others of
        # the message outside this worker's connections, where its relief thread cannot
        # pass them on and they die with it at workers.timeout. Not `read` (the relief
        # thread), the loop reads them once the request in progress ends, if they are
        # still here: epoll reports a request that is waiting.
        for conn in taken if read else ():
            if self.conns.get(conn.fd) is conn:  # not passed on meanwhile (keepalive_relief)
                self.on_readable(conn)

    def pass_to_peer(
        self, sock: socket.socket, listener: Listener, anyone: bool = False
    ) -> bool:
        """Holding more than its share (or, `anyone`, stopping to be replaced): send a
        connection just accepted (nothing read from it yet) to the master for the worker
        holding the fewest; False to keep it here."""
        now = time.monotonic()
        if now >= self.peers_until:
            self.look_at_peers(now)
        if self.passes_left <= 0:
            return False
        if self.lightest is None:
            if not anyone:
                return False
            # none of its generation can take one (they stop too: a reload): pid 0 lets the
            # master choose, among the workers now serving this listener
            pid, load, offset = 0, 0, 0
        else:
            pid, load, offset = self.lightest
            held = len(self.conns)
            if not anyone and load >= held - max(1, held // 4):
                return False  # only to a worker clearly behind
            if self.slot.held_by(pid, offset, now) is None:
                del self.loads[pid]  # it stops, or it is stuck in a request: not a taker
                self.lightest = _lightest(self.loads)
                return False
        lid = self.id_of_listener.get(id(listener))
        if lid is None or not chan.send_conns(
            self.spec.channel,
            [(sock.fileno(), lid, now + self.header_timeout)],
            chan.balance_head(pid),
            wait=False,  # a master that is busy (a reload) is not waited for: keep it here
        ):
            return False
        sock.close()
        self.passed(1, now)
        self.passes_left -= 1
        if pid:
            self.loads[pid] = (load + 1, offset)
            self.lightest = _lightest(self.loads)
        return True

    def look_at_peers(self, now: float) -> None:
        """The other workers of this generation that can take a connection now, and how
        many each holds: a scan of the scoreboard, PEERS_INTERVAL apart at most. What was
        passed before is in the counts by then (a taker is waiting in its loop)."""
        self.peers_until = now + PEERS_INTERVAL
        self.passes_left = BALANCE_BURST
        self.loads = self.peer_loads(now)
        self.lightest = _lightest(self.loads)

    def peer_loads(self, now: float) -> dict[int, tuple[int, int]]:
        """pid -> (connections held, slot offset) of the other workers of this generation
        that can take a connection now: not stopping, not stuck in a request."""
        slot = self.slot
        loads: dict[int, tuple[int, int]] = {}
        for pid, offset in slot.peers():
            held = slot.held_by(pid, offset, now)
            if held is not None:
                loads[pid] = (held, offset)
        return loads

    def on_signals(self) -> None:
        for signum in self.signals.drain():
            if signum == signal.SIGTERM:
                self.begin_stop()
            elif signum == signal.SIGUSR1:
                self.spec.logs.reopen()


def _between_requests(conn: Connection) -> bool:
    """Nothing of a request read and nothing owed: the socket alone carries the client's
    state, so another process can take it on. Never TLS: its session lives in this one."""
    return (
        type(conn) is Connection
        and conn.parser.idle
        and not conn.parser.requests
        and not conn.linger_until
    )


def _lightest(loads: dict[int, tuple[int, int]]) -> tuple[int, int, int] | None:
    if not loads:
        return None
    pid = min(loads, key=lambda p: loads[p][0])
    return pid, *loads[pid]


def _peer_text(peer: Any) -> str:
    if isinstance(peer, tuple) and len(peer) >= 2:
        return f"{peer[0]}:{peer[1]}"
    return str(peer) or "unix"
