"""The master: keeps the pool at its target size and acts on signals. It never serves.

One loop (`tick`): sleep until a signal, a worker message or the nearest deadline -> reap
every exited child -> act on the signals in arrival order -> read worker messages -> enforce
deadlines -> spawn or retire workers toward the target. Signal handlers only write a byte to
a socket (prefork.signals); every OS call goes through `Kernel` so `tick` is unit-tested.
"""

from __future__ import annotations

import enum
import gc
import logging
import math
import os
import signal
import socket
import ssl
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

import setproctitle

from prefork import channel as chan
from prefork.admin import AdminServer
from prefork.channel import (
    MSG_BACK,
    MSG_BALANCE,
    MSG_BOOT_ERROR,
    MSG_CONNS,
    MSG_FRESH,
    MSG_KEPT,
    MSG_KEPT_BACK,
    MSG_READY,
    MSG_RECYCLE,
    MSG_RELIEF,
    MSG_REOPEN,
    MSG_STOP,
    MSG_TAKEN,
)
from prefork.config import Config, StatsdConfig, WorkersConfig, jitter_share
from prefork.hooks import Hooks, ServerInfo, WorkerInfo
from prefork.logs import Logs, error_log_on_syslog, unused_fds
from prefork.notify import Announcer
from prefork.scoreboard import STUCK, Activity, Counters, Scoreboard, SlotView
from prefork.signals import STOP_SIGNALS, Stopped, blocked, stops_raise
from prefork.sockets import Listener
from prefork.statsd import StatsdSink
from prefork.status import snapshot
from prefork.stderrpipe import StderrReader, open_pipe
from prefork.system import Kernel, describe_status
from prefork.touch import TouchWatch, touch_lists
from prefork.upgrade import Upgrader
from prefork.worker import EXIT_APP_LOAD_ERROR, EXIT_BOOT_ERROR, WorkerSpec, worker_main

log = logging.getLogger("prefork")

EXIT_RUNTIME_ERROR = 1
EXIT_APP_FAILED = 3  # the application could not be loaded at startup

FAST_STOP_GRACE = 1.0  # INT/QUIT: how long workers get to exit before SIGKILL
BACKOFF_FIRST = 0.5  # a worker that died while booting waits this, doubling per failure
BACKOFF_MAX = 30.0
# A worker that dies unexpectedly this soon after booting is treated like one that failed to
# boot (backoff, degraded accounting): a crash loop after readiness must not spin either.
YOUNG_DEATH = 5.0
# A worker that has served this long clears its number's failure count.
HEALTHY_AFTER = 10.0
MAX_SLEEP = 1.0  # the scoreboard is read at least this often
QUEUE_CHECK_INTERVAL = 1.0  # how often the listen queues are looked at
QUEUE_WARN_INTERVAL = 10.0  # at most one "queue is full" line per listener this often
TOUCH_CHECK_INTERVAL = 1.0  # how often touch_reload's and touch_logreopen's files are looked at
CHANNEL_READS = 64  # messages read from one worker per tick, at most


class WorkerState(enum.Enum):
    """The master's view of a worker's life; the only moves are those in TRANSITIONS."""

    BOOTING = "booting"  # forked, app not loaded yet
    READY = "ready"  # told us it serves
    STOPPING = "stopping"  # asked to finish and exit; SIGKILL at the deadline
    ABORTING = "aborting"  # hung: SIGABRT sent for a stack dump; SIGKILL at the deadline
    KILLED = "killed"  # SIGKILL sent; waiting to reap


TRANSITIONS: dict[WorkerState, frozenset[WorkerState]] = {
    WorkerState.BOOTING: frozenset(
        {WorkerState.READY, WorkerState.STOPPING, WorkerState.ABORTING, WorkerState.KILLED}
    ),
    WorkerState.READY: frozenset({WorkerState.STOPPING, WorkerState.ABORTING, WorkerState.KILLED}),
    WorkerState.STOPPING: frozenset({WorkerState.ABORTING, WorkerState.KILLED}),
    WorkerState.ABORTING: frozenset({WorkerState.KILLED}),
    WorkerState.KILLED: frozenset(),
}
LIVE = (WorkerState.BOOTING, WorkerState.READY)


class InvalidTransition(RuntimeError):
    pass


@dataclass(eq=False, slots=True)
class WorkerHandle:
    number: int
    pid: int
    slot: int
    generation: int
    channel: socket.socket | None
    started: float
    state: WorkerState = WorkerState.BOOTING
    deadline: float = math.inf
    reason: str = ""
    boot_error: str = ""  # what the worker said when it could not load the app
    booted: bool = False  # it reported ready at least once
    recycle: str = ""  # why it is to be replaced (queued, or its replacement is booting)
    ready_at: float = 0.0  # when it reported ready
    replaces: int | None = None  # the pid of the worker this one replaces when ready
    # the configuration it was forked with (its generation's): what hooks are told of it,
    # and how it is stopped (stream.eof_on_stop); None only in tests' hand-made handles
    config: Config | None = None
    # its fd 2, read into the error log when that is syslog (prefork.stderrpipe); else None
    stderr: StderrReader | None = None

    def to(self, state: WorkerState, deadline: float = math.inf, reason: str = "") -> None:
        if state not in TRANSITIONS[self.state]:
            raise InvalidTransition(f"worker {self.number}: {self.state.name} -> {state.name}")
        self.state = state
        self.deadline = deadline
        if reason:
            self.reason = reason

    def describe(self) -> str:
        return f"worker {self.number} (pid {self.pid})"


@dataclass(slots=True)
class Generation:
    """A configuration and the listeners its workers serve, and the logging they do."""

    number: int
    config: Config
    listeners: list[Listener]
    app: Any = None  # preloaded application
    tls: dict[int, ssl.SSLContext] = field(default_factory=dict)  # listener fd -> context
    hooks: Hooks = field(default_factory=Hooks)
    environ: dict[str, str] | None = None  # what its workers get (None: the master's)
    # puts back the master's environment and imported modules if abandoned
    env_undo: Callable[[], None] | None = None
    # its logging setup (prefork.logs.Logs; Any for the tests' fakes): the reloader opens it
    # aside, its workers install it after fork, the master at promote(); the master logs as
    # the serving generation does (Master.logs). None: the serving generation's
    logs: Any = None

    def undo_env(self) -> None:
        if self.env_undo is not None:
            self.env_undo()
            self.env_undo = None


def eof_on_stop(handle: WorkerHandle) -> bool:
    """Whether a worker gets TERM besides its stop message: a stream handler holds it and
    reads no channel, and with stream.eof_on_stop in its own generation's configuration the
    TERM shuts its session's read side (not the serving generation's: a reload that turns
    the option off must still end the old workers' sessions)."""
    config = handle.config
    return config is not None and config.protocol == "tcp" and config.stream.eof_on_stop


def _in_request_for(view: SlotView, now: float) -> float:
    """How long a worker has been inside the HTTP request it is answering, by its slot
    (-1.0: between requests); what workers.timeout judges, and what routing avoids."""
    if view.activity in (Activity.BUSY, Activity.READING) and view.started > 0:
        return now - view.started
    return -1.0


def pool_size(old: Config, new: Config, target: int) -> int:
    """The number of workers once `new` replaces `old`: its count when that changed or when
    the pool is no longer dynamic, else today's number (TTIN/TTOU and the dynamic pool's
    sizing survive a reload) within the new bounds."""
    before, after = old.workers, new.workers
    if after.count != before.count or (before.max and not after.max):
        return after.count
    if after.max:
        return min(max(target, after.count), after.max)
    return target


# Signals that only wake the loop: they do not separate two HUPs (collapse_reloads).
WAKE_ONLY = (signal.SIGCHLD, 0)


def collapse_reloads(signals: list[int]) -> list[int]:
    """The signals one tick acts on: a HUP followed by another (wake-ups between them
    aside) is left out. Both HUPs were delivered before the loop read either, so the one
    reload reads the file every sender edited; each read a preloaded application again,
    with the loop blocked, only for the next to throw it away (a burst of 20 HUPs: as many
    imports in a row, and a TERM behind them waited for all). A HUP with a stop anywhere
    after it starts no reload, as a stop arriving during its import abandons one: it goes
    after the stop (one for all of them), where reload() refuses it and says so in
    PIDFILE.status, so a `preforkd reload` that sent it answers now, not once the stop
    ends."""
    kept: list[int] = []
    refused = False
    for index, signum in enumerate(signals):
        if signum == signal.SIGHUP:
            rest = [s for s in signals[index + 1 :] if s not in WAKE_ONLY]
            if any(s in STOP_SIGNALS for s in rest):
                refused = True
                continue
            if rest[:1] == [signal.SIGHUP]:
                continue
        kept.append(signum)
    if refused and signal.SIGHUP not in kept:  # a kept HUP came after every stop already
        kept.append(signal.SIGHUP)
    return kept


class SignalSource(Protocol):
    def fileno(self) -> int: ...

    def drain(self) -> list[int]: ...


class Stop(enum.Enum):
    NONE = 0
    GRACEFUL = 1
    FAST = 2


@dataclass
class Master:
    kernel: Kernel
    signals: SignalSource
    scoreboard: Scoreboard
    current: Generation
    reloader: Callable[[Generation, list[Listener]], Generation] | None = None
    # once no generation can put its predecessor's imported modules back (a promotion, the
    # last pending reload abandoned): lets those go (loader.FreshImports.release)
    release_imports: Callable[[], None] | None = None
    # the master now logs with another setup (a reload took over): a detached daemon's
    # stderr relay follows its syslog settings (Startup.follow_logs)
    logs_installed: Callable[[Logs], None] | None = None
    upgrader: Upgrader | None = None  # USR2 (None: not offered, as in unit tests)
    announce: Announcer = field(default_factory=Announcer)
    close_in_child: list[int] = field(default_factory=list)
    workers: dict[int, WorkerHandle] = field(default_factory=dict)  # by pid
    pending: Generation | None = None  # a reload whose first worker has not booted yet
    target: int = 0
    stop: Stop = Stop.NONE
    paused: int | None = None  # WINCH stopped the workers: the pool size HUP or TTIN restores
    exit_code: int = 0
    ever_ready: bool = False
    backoff_until: dict[int, float] = field(default_factory=dict)
    failures: dict[int, int] = field(default_factory=dict)
    free_slots: list[int] = field(default_factory=list)
    generations: int = 1  # the highest generation number given out
    reloading: bool = False  # a HUP is in progress (until the last old worker is replaced)
    failure: str = ""  # why the server stops on its own (reported to a daemon's launcher)
    next_watchdog: float = 0.0
    admin: AdminServer | None = None
    started_at: float = field(default_factory=time.time)
    recycle_queue: list[WorkerHandle] = field(default_factory=list)
    degraded: bool = False
    boot_failure_times: list[float] = field(default_factory=list)
    next_memory_check: float = 0.0
    next_pool_check: float = 0.0
    next_status: float = 0.0
    next_queue_check: float = 0.0
    next_statsd: float = 0.0
    statsd: StatsdSink | None = None
    statsd_refused: StatsdConfig | None = None  # settings whose sink could not be made
    # a reload took over: the sink is made again, its host name resolved afresh
    statsd_renew: bool = False
    next_touch_check: float = 0.0
    # touch_reload, touch_logreopen: the last look at their files (the first one, made at
    # start before the hooks and a preloaded application are imported, only records them)
    touch: TouchWatch = field(default_factory=TouchWatch)
    queue_full: dict[str, int] = field(default_factory=dict)  # listener -> checks found full
    queue_warned: dict[str, float] = field(default_factory=dict)  # listener -> last warning
    growth: int = 1  # dynamic pool: workers added per second while idle ones are short
    # metrics
    retired_counters: Counters = field(default_factory=Counters.zero)
    recycles: dict[str, int] = field(default_factory=dict)
    restarts: int = 0
    boot_failures: int = 0
    reloads: dict[str, int] = field(default_factory=lambda: {"ok": 0, "failed": 0})
    uss: dict[int, int] = field(default_factory=dict)  # pid -> bytes, from the last check
    handed_over: int = 0  # keep-alive connections passed from a stopping worker to another
    balanced: int = 0  # new connections passed from a busier worker to one holding fewer
    relieved: int = 0  # keep-alive connections passed from a worker in a long request
    hand_over_turn: int = 0  # spreads them when no successor is named

    def __post_init__(self) -> None:
        self.target = self.current.config.workers.count
        self.free_slots = list(range(self.scoreboard.capacity - 1, -1, -1))
        self.handlers: dict[int, Callable[[], None]] = {
            signal.SIGTERM: self.graceful_stop,
            signal.SIGINT: self.fast_stop,
            signal.SIGQUIT: self.fast_stop,
            signal.SIGHUP: self.reload,
            signal.SIGTTIN: self.more_workers,
            signal.SIGTTOU: self.fewer_workers,
            signal.SIGUSR1: self.reopen_logs,
            signal.SIGUSR2: self.upgrade,
            signal.SIGWINCH: self.stop_workers,
            signal.SIGCHLD: lambda: None,  # it woke us; reaping is every tick's first step
            0: lambda: None,  # an explicit wake-up
        }

    @property
    def logs(self) -> Any:
        """The master's logging setup: the serving generation's."""
        return self.current.logs

    # the loop ----------------------------------------------------------------------------

    def run(self) -> int:
        self.set_title()
        self.maintain()  # fork the pool now, not after the first sleep
        while self.tick():
            pass
        if self.current.config.statsd.address:
            self.send_statsd(self.current.config.statsd)  # what the last interval counted
        return self.exit_code

    def set_title(self) -> None:
        name = self.current.config.proc_name or self.current.config.app
        old = "(old) " if self.upgrader is not None and self.upgrader.pid is not None else ""
        setproctitle.setproctitle(f"preforkd: master {old}[{name}]")

    def tick(self) -> bool:
        """One pass of the loop; False once the master should exit."""
        ready_fds = self.sleep()
        self.reap()
        for signum in collapse_reloads(self.signals.drain()):
            self.handlers.get(signum, lambda: None)()
        self.read_channels(ready_fds)
        self.read_stderr(ready_fds)
        if self.admin is not None:
            self.admin.handle(set(ready_fds), self.kernel.monotonic())
        self.enforce_deadlines()
        self.supervise()
        self.maintain()
        self.keep_watchdog_fed()
        return not (self.stop is not Stop.NONE and not self.workers)

    def keep_watchdog_fed(self) -> None:
        interval = self.announce.watchdog_interval
        if interval:
            now = self.kernel.monotonic()
            if now >= self.next_watchdog:
                self.announce.watchdog()
                self.next_watchdog = now + interval

    def sleep(self) -> list[int]:
        now = self.kernel.monotonic()
        wake_at = now + min(MAX_SLEEP, self.current.config.workers.timeout / 4 or MAX_SLEEP)
        for handle in self.workers.values():
            wake_at = min(wake_at, handle.deadline)
            if handle.config is not None and handle.config.workers.timeout:
                # an older generation's shorter timeout is checked as often as its own
                wake_at = min(wake_at, now + handle.config.workers.timeout / 4)
        if self.stop is Stop.NONE:
            for when in self.backoff_until.values():
                if when > now:
                    wake_at = min(wake_at, when)
        if self.announce.watchdog_interval:
            wake_at = min(wake_at, max(self.next_watchdog, now))
        if self.current.config.statsd.address:
            wake_at = min(wake_at, max(self.next_statsd, now))
        workers = self.current.config.workers
        if self.stop is Stop.NONE:
            if workers.max_memory or workers.max_memory_hard:
                wake_at = min(wake_at, max(self.next_memory_check, now))
            if workers.max and self.ever_ready:
                wake_at = min(wake_at, max(self.next_pool_check, now))
            if self.announce.sd is not None and self.ever_ready:
                wake_at = min(wake_at, max(self.next_status, now))
            if workers.max_lifetime:
                for _, ends in self.lifetimes():
                    wake_at = min(wake_at, max(ends, now))
            if self.current.config.touch_reload or self.current.config.touch_logreopen:
                wake_at = min(wake_at, max(self.next_touch_check, now))
        fds = [self.signals.fileno()]
        fds.extend(h.channel.fileno() for h in self.workers.values() if h.channel is not None)
        fds.extend(h.stderr.fd for h in self.workers.values() if h.stderr is not None)
        if self.admin is not None:
            fds.extend(self.admin.fds())
        return self.kernel.wait(fds, wake_at - now)

    # children --------------------------------------------------------------------------

    def spawn(self, number: int, generation: Generation) -> WorkerHandle | None:
        """Fork a worker; None (logged, backed off like a boot failure) if the OS refuses."""
        slot = self.free_slots.pop()
        try:
            return self._spawn(number, generation, slot)
        except OSError as exc:
            self.free_slots.append(slot)
            log.error("cannot start worker %d: %s", number, exc)
            self.back_off(number)
            return None

    def _spawn(self, number: int, generation: Generation, slot: int) -> WorkerHandle:
        # the generation's own logging setup, which the worker installs (its error log on fd
        # 2) before anything else; the other generation's files it closes
        logs = generation.logs if generation.logs is not None else self.logs
        # with the error log on syslog, fd 2 is no log: the worker's goes to a pipe we read
        stderr = open_pipe() if error_log_on_syslog(logs) else None
        try:
            parent_end, child_end = chan.pair()
        except OSError:
            for fd in stderr or ():
                os.close(fd)
            raise
        parent_end.setblocking(False)
        spec = WorkerSpec(
            number=number,
            generation=generation.number,
            config=generation.config,
            listeners=generation.listeners,
            channel=child_end,
            slot=self.scoreboard.slot(slot),
            logs=logs,
            app=generation.app,
            tls=generation.tls,
            hooks=generation.hooks,
            server=self.server_info(),
            environ=generation.environ,
            stderr=None if stderr is None else stderr[1],
            close_fds=[
                *(() if stderr is None else stderr[:1]),
                *self.close_in_child,
                *self.announce.fds(),
                *(self.admin.fds() if self.admin is not None else []),
                parent_end.fileno(),
                *(h.channel.fileno() for h in self.workers.values() if h.channel is not None),
                *(h.stderr.fd for h in self.workers.values() if h.stderr is not None),
                *(
                    listener.fd
                    for listener in self.all_listeners()
                    if listener not in generation.listeners
                ),
                *unused_fds(logs, self.logging_setups()),
            ],
        )
        generation.hooks.call(
            "pre_fork", self.server_info(), WorkerInfo(number, generation.number, generation.config)
        )
        try:
            pid = self.kernel.spawn(lambda: worker_main(spec), child_end)
        except OSError:
            parent_end.close()
            child_end.close()
            if stderr is not None:
                os.close(stderr[0])
            raise
        finally:
            if stderr is not None:
                os.close(stderr[1])  # the worker's; ours would keep the pipe from EOF
        handle = WorkerHandle(
            number, pid, slot, generation.number, parent_end, self.kernel.monotonic(),
            config=generation.config,
            stderr=None if stderr is None else StderrReader(stderr[0]),
        )
        handle.deadline = handle.started + generation.config.workers.boot_timeout
        self.workers[pid] = handle
        if self.ever_ready:
            self.restarts += 1
        log.debug("spawned %s, generation %d", handle.describe(), generation.number)
        return handle

    def reap(self) -> None:
        while (child := self.kernel.reap()) is not None:
            pid, status = child
            handle = self.workers.pop(pid, None)
            if handle is not None:
                self.exited(handle, status)
            elif self.upgrader is not None and self.upgrader.ended(
                pid, take_back=self.stop is Stop.NONE
            ):
                self.upgrade_ended(pid, status)

    def exited(self, handle: WorkerHandle, status: int) -> None:
        if handle.channel is not None:
            self.read_channel(handle)  # what it said just before exiting (a boot error)
        if handle.channel is not None:
            handle.channel.close()
            handle.channel = None
        if handle.stderr is not None:  # what it wrote last (a stack dump), before its end
            self.log_stderr(handle, handle.stderr.drain())
            handle.stderr.close()
            handle.stderr = None
        self.retired_counters += self.scoreboard.counters(handle.slot)
        self.scoreboard.clear(handle.slot)
        self.free_slots.append(handle.slot)
        self.uss.pop(handle.pid, None)
        if handle in self.recycle_queue:
            self.recycle_queue.remove(handle)
        how = describe_status(status)
        self.current.hooks.call("child_exit", self.server_info(), self.worker_info(handle))
        if not handle.booted and (
            handle.state is WorkerState.BOOTING or handle.reason == "boot timeout"
        ):
            self.boot_failed(handle, status, how)
            old = self.workers.get(handle.replaces) if handle.replaces is not None else None
            if old is not None and old.state is WorkerState.READY and old.recycle:
                self.recycle_queue.append(old)  # its replacement failed: try again later
        elif handle.state is WorkerState.READY:
            if status == 0:
                log.info("%s exited: %s", handle.describe(), handle.reason or "retired")
            else:
                self.count_recycle("crash")
                lived = self.kernel.monotonic() - handle.ready_at
                if lived < YOUNG_DEATH:
                    delay = self.back_off(handle.number)
                    log.warning("%s died %.1fs after booting (%s); next one in %.1fs",
                                handle.describe(), lived, how, delay)
                else:
                    log.warning("%s died unexpectedly: %s", handle.describe(), how)
        else:
            log.info("%s exited (%s): %s", handle.describe(), handle.reason, how)

    def boot_failed(self, handle: WorkerHandle, status: int, how: str) -> None:
        app_error = status >> 8 == EXIT_APP_LOAD_ERROR and status & 0x7F == 0
        if handle.reason == "boot timeout":  # killed for it: the SIGKILL is not the news
            how = f"not ready within workers.boot_timeout, killed ({how})"
        error = handle.boot_error.strip().splitlines()[-1:] or [how]
        if self.pending is not None and handle.generation == self.pending.number:
            message = (
                f"reload failed: the new generation's first worker could not boot "
                f"({error[0]}); still serving generation {self.current.number}"
            )
            log.error("%s", message)
            self.abandon_pending()
            self.reload_finished(False, message)
            return
        boot_error = status >> 8 == EXIT_BOOT_ERROR and status & 0x7F == 0
        if not self.ever_ready and (app_error or boot_error) and self.stop is Stop.NONE:
            what = "the application could not be loaded" if app_error else "a worker cannot start"
            log.error("%s (see above); stopping", what)
            self.failure = f"{what}: {error[0]}"
            self.exit_code = EXIT_APP_FAILED if app_error else EXIT_RUNTIME_ERROR
            self.fast_stop()
            return
        if self.reloading and handle.generation == self.current.number:
            self.reload_finished(
                False,
                f"reload incomplete: worker {handle.number} of generation "
                f"{handle.generation} could not boot ({error[0]}); it is retried, and the old "
                f"workers it would replace keep serving",
            )
        delay = self.back_off(handle.number)
        log.error(
            "%s failed to boot (%s); retrying in %.1fs", handle.describe(), how, delay
        )

    def back_off(self, number: int) -> float:
        """A worker of `number` could not start or died young: wait before the next one
        (0.5 s doubling to 30 s) and count it towards the degraded state."""
        failures = self.failures.get(number, 0) + 1
        self.failures[number] = failures
        delay = float(min(BACKOFF_MAX, BACKOFF_FIRST * 2.0 ** (failures - 1)))
        now = self.kernel.monotonic()
        self.backoff_until[number] = now + delay
        self.boot_failures += 1
        self.note_boot_failure(now)
        return delay

    def note_boot_failure(self, now: float) -> None:
        """Crash-loop protection: too many boot failures in the window -> degraded."""
        workers = self.current.config.workers
        times = [t for t in self.boot_failure_times if now - t < workers.boot_failure_window]
        times.append(now)
        self.boot_failure_times = times
        if self.degraded or len(times) < workers.boot_failure_limit:
            return
        self.degraded = True
        message = (
            f"degraded: {len(times)} workers failed to boot within "
            f"{workers.boot_failure_window:.0f}s; the healthy workers keep serving"
        )
        log.error("%s", message)
        self.announce.status(message)
        if workers.exit_on_degraded and self.stop is Stop.NONE:
            self.failure = message
            self.exit_code = EXIT_RUNTIME_ERROR
            self.graceful_stop()

    def read_channels(self, ready_fds: list[int]) -> None:
        if len(ready_fds) <= 1 and (not ready_fds or ready_fds[0] == self.signals.fileno()):
            return
        ready = set(ready_fds)
        for handle in list(self.workers.values()):
            if handle.channel is not None and handle.channel.fileno() in ready:
                self.read_channel(handle)

    def read_stderr(self, ready_fds: list[int]) -> None:
        """What the workers whose error log is syslog wrote to fd 2 (READ_SIZE each)."""
        ready = set(ready_fds)
        for handle in list(self.workers.values()):
            if handle.stderr is not None and handle.stderr.fd in ready:
                self.log_stderr(handle, handle.stderr.read())
                if handle.stderr.ended:
                    handle.stderr.close()
                    handle.stderr = None

    def log_stderr(self, handle: WorkerHandle, lines: list[str]) -> None:
        """Each line an ERROR record of the master's error log, as if the worker had
        logged it (its pid: syslog's pid field), `worker N stderr: LINE`."""
        if not lines or not log.isEnabledFor(logging.ERROR):
            return
        for line in lines:
            record = log.makeRecord(
                log.name, logging.ERROR, __file__, 0, "worker %d stderr: %s",
                (handle.number, line), None,
            )
            record.process = handle.pid
            log.handle(record)

    def read_channel(self, handle: WorkerHandle) -> None:
        """What the worker sent since the last tick, one message at a time."""
        for _ in range(CHANNEL_READS):
            channel = handle.channel
            if channel is None:
                return
            message = chan.receive(channel)
            if message is None:
                return
            data, fds = message
            if data.startswith(MSG_CONNS):
                self.pass_on(handle, chan.parse_conns(data, fds))
                continue
            if data.startswith(MSG_BALANCE):
                self.rebalance(handle, *chan.parse_balance(data, fds))
                continue
            if data.startswith(MSG_RELIEF):
                self.rebalance(handle, *chan.parse_balance(data, fds), forward=MSG_KEPT)
                continue
            for fd in fds:  # no other message carries descriptors
                os.close(fd)
            if not data:
                channel.close()  # the worker is exiting; reap() will hear of it
                handle.channel = None
            elif data.startswith(MSG_BOOT_ERROR):
                handle.boot_error = data[1:].decode("utf-8", "replace")
            elif data == MSG_READY:
                if handle.state is WorkerState.BOOTING:
                    self.became_ready(handle)
            elif data == MSG_RECYCLE:
                self.recycle(handle, "max_requests")

    def pass_on(self, source: WorkerHandle, conns: list[tuple[int, int, float]]) -> None:
        """Idle keep-alive connections a replaced worker handed over: on to the best serving
        worker of the current generation that listens on the same socket, else the next
        one when a send fails (that worker just died, or its channel is full). The source
        waits for the answer: MSG_TAKEN, or those nobody takes (on a listener no longer
        served, every send failed, or the server is stopping) back (MSG_KEPT_BACK), where
        a request sent on one while they travelled is answered (the master read them late:
        a reload's import) and the idle ones are closed as in any stop. The master keeps
        none: its copies are closed whatever happens."""
        try:
            taken: list[tuple[int, int, float]] = []
            if self.stop is Stop.NONE:
                listening = self.listener_ids()
                passed = [conn for conn in conns if conn[1] in listening]
                targets = self.hand_over_targets(source)
                if passed and self.deliver(passed, targets, MSG_CONNS) is not None:
                    taken = passed
                    self.handed_over += len(passed)
            back = [conn for conn in conns if conn not in taken]
            if not back:
                self.tell(source, MSG_TAKEN)
            elif (
                source.state not in (WorkerState.READY, WorkerState.STOPPING)
                or self.deliver(back, [source], MSG_KEPT_BACK) is None
            ):
                log.debug("%s: no worker took %d connections", source.describe(), len(back))
        finally:
            for fd, _, _ in conns:
                os.close(fd)

    def rebalance(
        self,
        source: WorkerHandle,
        pid: int,
        conns: list[tuple[int, int, float]],
        forward: bytes = MSG_FRESH,
    ) -> None:
        """Connections a worker holding more than its share (or one replaced, draining its
        accept queue) has just accepted, for the worker `pid` of its generation (0: any);
        with `forward` MSG_KEPT, served keep-alive connections a worker inside a long
        request passes on (http.keepalive_relief), routed the same way, but a worker awaiting
        its successor takes them too, and a worker between requests comes before one inside
        any.
        Should that one no longer serve (a reload or a stop began meanwhile, or it is being
        recycled): to another serving worker of that generation. From a generation a reload
        replaced: to the current one's first, when it serves the same sockets (it would
        have accepted them itself). Else back to the source. The master's copies are closed either
        way."""
        try:
            # the one named first, then the others of its generation (same listeners and
            # settings), then the source itself, which waits for the answer about what it
            # passed whatever its state
            # A worker awaiting its successor (max_requests, memory) serves on until that one
            # is ready: a new connection would only be handed over again, but the served
            # ones a busy worker passes (MSG_KEPT) are handed over with its own, and sent
            # back instead they wait behind the very request they were moved away from.
            same = [
                h for h in self.serving_for(source, source.generation)
                if not h.recycle or forward == MSG_KEPT
            ]
            takers = sorted(same, key=lambda h: (h.pid != pid, bool(h.recycle)))
            if forward == MSG_KEPT:
                # to be answered now: not by a worker that has begun a request since it was
                # named (the one that was free is often the one that accepted next)
                now = self.kernel.monotonic()
                takers.sort(key=lambda h: self.busy_for(h, now) >= 0)
            if (
                source.generation != self.current.number
                and self.stop is Stop.NONE
                and {lid for _, lid, _ in conns} <= self.listener_ids()
            ):
                # before the rest of the outgoing generation, which would only drain again
                takers = self.hand_over_targets(source) + takers
            taker = self.deliver(conns, takers, forward)
            if taker is None and source.state in (WorkerState.READY, WorkerState.STOPPING):
                # served ones stay served: a keep-alive deadline, and handed over at a stop
                back = MSG_KEPT_BACK if forward == MSG_KEPT else MSG_BACK
                taker = self.deliver(conns, [source], back)
            if taker is None:
                log.debug("%s: no worker took %d new connections", source.describe(), len(conns))
            elif taker is not source:
                if forward == MSG_KEPT:
                    self.relieved += len(conns)
                else:
                    self.balanced += len(conns)
                self.tell(source, MSG_TAKEN)  # it may exit now without waiting
        finally:
            for fd, _, _ in conns:
                os.close(fd)

    def deliver(
        self, conns: list[tuple[int, int, float]], takers: list[WorkerHandle], head: bytes
    ) -> WorkerHandle | None:
        """Send `conns` to the first of `takers` whose channel takes them now, those stuck
        in a request last (the longest stuck last of all); who took them. The caller still
        closes its own copies."""
        if len(takers) > 1:
            # A worker inside one request for over STUCK seconds reads its channel only once
            # it is out: what it is given waits for that request, and dies with it if it is
            # killed at workers.timeout -- the very fate keepalive_relief and a hand-over
            # move connections away from. A worker named while free may have begun such a
            # request since, and a hand-over's takers (its successor, the worker of its
            # number) or those of a stopping worker's pass (pid 0) were never checked.
            now = self.kernel.monotonic()
            takers = sorted(takers, key=lambda h: max(STUCK, self.busy_for(h, now)))
        for taker in takers:
            if taker.channel is not None and chan.send_conns(taker.channel, conns, head):
                return taker
        return None

    def busy_for(self, handle: WorkerHandle, now: float) -> float:
        """How long `handle` has been inside the request it is answering (-1.0: between
        requests)."""
        return _in_request_for(self.scoreboard.read(handle.slot), now)

    def tell(self, handle: WorkerHandle, message: bytes) -> bool:
        """One message, if the worker's channel takes it now (it never blocks the master)."""
        if handle.channel is None:
            return False
        try:
            handle.channel.send(message)
        except OSError:
            return False
        return True

    def listener_ids(self) -> set[int]:
        ids = set()
        for listener in self.current.listeners:
            try:
                ids.add(chan.listener_id(listener.fd))
            except OSError:
                pass
        return ids

    def serving_for(
        self, source: WorkerHandle, generation: int | None = None
    ) -> list[WorkerHandle]:
        """The serving workers of `generation` (default: the current one), other than
        `source`."""
        number = self.current.number if generation is None else generation
        return [
            h
            for h in self.workers.values()
            if h.generation == number and h is not source and self.takes(h)
        ]

    def takes(self, handle: WorkerHandle) -> bool:
        """Whether `handle` can be given connections: it serves, and has not begun to stop on
        its own (a TERM sent to it alone, the reload-mode file watcher)."""
        return (
            handle.state is WorkerState.READY
            and handle.channel is not None
            and self.scoreboard.read(handle.slot).activity is not Activity.DRAINING
        )

    def hand_over_targets(self, source: WorkerHandle) -> list[WorkerHandle]:
        """Who takes `source`'s connections, best first: its successor; the worker of the
        same number (a reload); idle workers; the rest. Within a rank they take turns, so a
        pool that shrank spreads what it passes on."""
        ranks: list[list[WorkerHandle]] = [[], [], [], []]
        for handle in self.serving_for(source):
            if handle.replaces == source.pid:
                ranks[0].append(handle)
            elif handle.number == source.number:
                ranks[1].append(handle)
            elif not handle.recycle and self.scoreboard.read(handle.slot).activity in (
                Activity.IDLE,
                Activity.KEEPALIVE,
            ):
                ranks[2].append(handle)
            else:
                ranks[3].append(handle)
        self.hand_over_turn += 1
        ordered: list[WorkerHandle] = []
        for rank in ranks:
            if rank:
                turn = self.hand_over_turn % len(rank)
                ordered += rank[turn:] + rank[:turn]
        return ordered

    def became_ready(self, handle: WorkerHandle) -> None:
        handle.to(WorkerState.READY)
        handle.booted = True
        handle.ready_at = self.kernel.monotonic()
        self.backoff_until.pop(handle.number, None)
        log.info("%s booted", handle.describe())
        if self.degraded:
            self.degraded = False
            log.info("recovered: workers boot again")
        old = self.workers.get(handle.replaces) if handle.replaces is not None else None
        if old is not None and old.state in LIVE:
            self.count_recycle(old.recycle)
            self.ask_to_stop(old, f"recycled: {old.recycle}", replaced=True)
        if self.pending is not None and handle.generation == self.pending.number:
            self.promote()
        if handle.generation == self.current.number:
            self.retire_one_outdated(prefer=handle.number)
        self.check_ready()

    def check_ready(self) -> None:
        """The first time the whole pool serves: tell the log, systemd and a launcher."""
        if not self.ever_ready and self.stop is Stop.NONE and self.ready_count() >= self.target:
            self.ever_ready = True
            self.next_pool_check = self.kernel.monotonic() + 1.0  # spare-server rule from now on
            self.current.hooks.call("when_ready", self.server_info())
            # the status file first: whoever reads "ready" in the log and acts on it (WINCH to
            # the master that started this one by USR2) finds it written
            self.announce.ready(f"{self.ready_count()} workers ready")
            log.info("ready: %d workers", self.ready_count())

    def server_info(self, generation: Generation | None = None) -> ServerInfo:
        """The `server` argument of hooks: a snapshot, so a hook cannot change the master;
        of the serving generation, or of `generation` (on_reload: the one it prepares)."""
        about = generation or self.current
        return ServerInfo(
            about.config,
            about.number,
            [self.worker_info(h) for h in self.workers.values()],
        )

    def worker_info(self, handle: WorkerHandle) -> WorkerInfo:
        """A worker as hooks see it, with the configuration it was forked with."""
        config = handle.config if handle.config is not None else self.current.config
        return WorkerInfo(handle.number, handle.generation, config, handle.pid)

    def ready_count(self) -> int:
        return sum(
            1
            for h in self.workers.values()
            if h.state is WorkerState.READY and h.generation == self.current.number
        )

    # deadlines and the pool ------------------------------------------------------------

    def workers_settings(self, handle: WorkerHandle) -> WorkersConfig:
        """The `workers` settings `handle` was forked with. A request is judged hung by
        the timeout of the generation that admitted it (the worker cuts its own waits on the
        client by that one): the serving generation's killed an old worker's longer request
        as it finished, after a reload that lowered workers.timeout."""
        config = handle.config if handle.config is not None else self.current.config
        return config.workers

    def enforce_deadlines(self) -> None:
        now = self.kernel.monotonic()
        for handle in list(self.workers.values()):
            timeout = self.workers_settings(handle).timeout
            if now >= handle.deadline:
                self.deadline_passed(handle, now)
            elif timeout and handle.state in (WorkerState.READY, WorkerState.STOPPING):
                view = self.scoreboard.read(handle.slot)
                busy = _in_request_for(view, now)
                if busy > timeout:
                    self.hung(handle, view, busy, now)

    def deadline_passed(self, handle: WorkerHandle, now: float) -> None:
        if handle.state is WorkerState.BOOTING:
            log.error("%s did not boot within %.0fs; killing it", handle.describe(),
                      now - handle.started)
            handle.reason = "boot timeout"
        elif handle.state is WorkerState.STOPPING:
            log.warning("%s still busy at the end of its graceful timeout; killing it",
                        handle.describe())
        elif handle.state is WorkerState.KILLED:
            handle.deadline = math.inf
            return
        self.kernel.kill(handle.pid, signal.SIGKILL)
        handle.to(WorkerState.KILLED, reason=handle.reason or "killed")

    def hung(self, handle: WorkerHandle, view: SlotView, elapsed: float, now: float) -> None:
        grace = self.workers_settings(handle).timeout_grace
        # the client, as uWSGI's harakiri line names it (a TCP handler's target is its peer)
        client = f" from {view.client}" if view.client else ""
        log.error(
            "%s timed out after %.1fs serving %s %s%s; dumping its stack and killing it",
            handle.describe(), elapsed, view.method, view.target, client,
        )
        self.count_recycle("timeout")
        if grace > 0:
            self.kernel.kill(handle.pid, signal.SIGABRT)  # faulthandler prints every stack
            handle.to(WorkerState.ABORTING, now + grace, reason="timeout")
        else:
            self.kernel.kill(handle.pid, signal.SIGKILL)
            handle.to(WorkerState.KILLED, reason="timeout")

    def maintain(self) -> None:
        """Spawn toward the target; during a reload replace outdated workers one at a time."""
        if self.stop is not Stop.NONE:
            return
        now = self.kernel.monotonic()
        pending = self.pending
        if (
            pending is not None
            and self.free_slots
            and now >= self.backoff_until.get(1, 0.0)  # the canary is number 1
            and not any(h.generation == pending.number for h in self.workers.values())
        ):
            self.spawn(1, pending)  # the canary: nothing old stops until it is ready
        current = self.current.number
        mine = [h for h in self.workers.values() if h.generation == current and h.state in LIVE]
        # one killed before it booted (boot_timeout) keeps its number until it is reaped and
        # its boot failure backs the number off: not replaced in the same pass
        numbers = {h.number for h in mine} | {
            h.number for h in self.workers.values()
            if h.generation == current and h.state is WorkerState.KILLED and not h.booted
        }
        for handle in mine:
            if handle.number > self.target:
                self.ask_to_stop(handle, "fewer workers requested", replaced=True)
        outdated = self.outdated()
        booting = sum(1 for h in mine if h.state is WorkerState.BOOTING)
        at_once = self.current.config.workers.max_recycling
        for number in range(1, self.target + 1):
            if number in numbers or now < self.backoff_until.get(number, 0.0):
                continue
            if outdated and booting >= at_once:
                break  # rolling: the next one boots when one of these is ready
            if not self.free_slots:
                break  # every slot is held by a worker still exiting; next tick
            self.spawn(number, self.current)
            booting += 1
        self.start_replacements(at_once)
        if outdated and booting == 0 and all(n in numbers for n in range(1, self.target + 1)):
            for handle in outdated:
                self.count_recycle("reload")
                self.ask_to_stop(handle, "replaced by a reload", replaced=True)
            outdated = []
        self.check_ready()
        if self.reloading and pending is None and not outdated and booting == 0:
            self.reload_finished(
                True,
                f"reloaded: generation {self.current.number} serving with "
                f"{self.ready_count()} workers",
            )

    def reload_finished(self, ok: bool, message: str, under_way: bool = False) -> None:
        """A reload's outcome, to the log, the counters and whoever waits for it;
        `under_way`: an earlier reload is still rolling out, and will report its own."""
        if ok:
            log.info("%s", message)
        self.reloading = under_way
        self.reloads["ok" if ok else "failed"] += 1
        self.announce.reloaded(ok, message)

    # recycling -------------------------------------------------------------------------

    def recycle(self, handle: WorkerHandle, reason: str) -> None:
        """Queue `handle` for replacement: its successor boots first, then it stops."""
        if handle.state is WorkerState.READY and not handle.recycle:
            handle.recycle = reason
            self.recycle_queue.append(handle)
            log.info("%s will be replaced: %s", handle.describe(), reason)

    def replacing(self) -> int:
        """Replacements under way: successors booting, and recycled workers still stopping."""
        return sum(
            1
            for h in self.workers.values()
            if (h.replaces is not None and h.state is WorkerState.BOOTING)
            or (h.state is WorkerState.STOPPING and h.reason.startswith("recycled"))
        )

    def start_replacements(self, at_once: int) -> None:
        under_way = self.replacing()
        now = self.kernel.monotonic()
        waiting: list[WorkerHandle] = []
        while self.recycle_queue and under_way < at_once and self.free_slots:
            old = self.recycle_queue.pop(0)
            if self.workers.get(old.pid) is not old or old.state is not WorkerState.READY:
                continue
            if old.generation != self.current.number:
                # a reload took over since it was queued: the roll-out replaces it, and a
                # successor here would be the new generation's second worker of its number
                continue
            if now < self.backoff_until.get(old.number, 0.0):
                waiting.append(old)  # its last successor failed to boot: back off
                continue
            successor = self.spawn(old.number, self.current)
            if successor is None:
                waiting.append(old)
                continue
            successor.replaces = old.pid
            under_way += 1
        self.recycle_queue[:0] = waiting

    def count_recycle(self, reason: str) -> None:
        self.recycles[reason] = self.recycles.get(reason, 0) + 1

    # supervision -------------------------------------------------------------------------

    def supervise(self) -> None:
        """The periodic checks: memory, the dynamic pool, systemd's STATUS line, the listen
        queues; and the statsd send (which goes on while the server stops)."""
        now = self.kernel.monotonic()
        statsd = self.current.config.statsd
        if statsd.address and now >= self.next_statsd:
            self.next_statsd = now + statsd.interval
            self.send_statsd(statsd)
        if self.stop is not Stop.NONE:
            return
        if self.failures:
            for handle in self.workers.values():
                if handle.state is WorkerState.READY and now - handle.ready_at > HEALTHY_AFTER:
                    self.failures.pop(handle.number, None)  # healthy again: backoff resets
        config = self.current.config
        workers = config.workers
        if (workers.max_memory or workers.max_memory_hard) and now >= self.next_memory_check:
            self.next_memory_check = now + workers.memory_check_interval
            self.check_memory()
        if workers.max and self.ever_ready and self.paused is None and now >= self.next_pool_check:
            self.next_pool_check = now + 1.0
            self.size_pool()
        if self.announce.sd is not None and self.ever_ready and now >= self.next_status:
            self.next_status = now + config.admin.status_interval
            self.announce.status(self.summary())
        if now >= self.next_queue_check:
            self.next_queue_check = now + QUEUE_CHECK_INTERVAL
            self.check_queues(now)
        if workers.max_lifetime:
            for handle, ends in self.lifetimes():
                if now >= ends:
                    self.recycle(handle, "max_lifetime")
        if now >= self.next_touch_check:
            self.next_touch_check = now + TOUCH_CHECK_INTERVAL
            self.check_touched()

    def check_touched(self) -> None:
        """touch_logreopen, touch_reload: a file changed since the last look is a USR1, a
        HUP (one for any number of files and touches)."""
        changes = self.touch.look(touch_lists(self.current.config))
        reopen = [str(c) for c in changes if c.setting == "touch_logreopen"]
        if reopen:
            self.reopen_logs(f"touch_logreopen: {', '.join(reopen)}")
        reload = [str(c) for c in changes if c.setting == "touch_reload"]
        if not reload:
            return
        if self.upgrader is not None and self.upgrader.pid is not None:
            # the master USR2 started watches the same files and reloads itself; this one
            # would start again the workers a WINCH stopped, and load the code a rollback
            # to this master must not bring
            log.info("touch_reload: %s: left to the master started by USR2 (pid %d)",
                     ", ".join(reload), self.upgrader.pid)
            return
        self.reload(f"touch_reload: {', '.join(reload)}")

    def lifetimes(self) -> Iterator[tuple[WorkerHandle, float]]:
        """Serving workers of this generation not yet to be replaced, and when their
        max_lifetime (plus their share of the jitter) ends, counted from their ready."""
        workers = self.current.config.workers
        if self.pending is not None:
            return  # a reload replaces them all once its first worker is ready
        for handle in self.workers.values():
            if (handle.state is WorkerState.READY and not handle.recycle
                    and handle.generation == self.current.number):
                share = jitter_share(workers, handle.number, workers.max_lifetime_jitter)
                yield handle, handle.ready_at + workers.max_lifetime + share

    def send_statsd(self, settings: StatsdConfig) -> None:
        """Send the metrics to statsd; (re)make the sink when the settings changed (a
        reload), keeping what was already counted so no counter is sent twice."""
        sink = self.statsd
        if sink is None or sink.config != settings or self.statsd_renew:
            self.statsd_renew = False
            if settings == self.statsd_refused:
                return
            try:
                new = StatsdSink(settings)
            except OSError as exc:
                log.error("statsd: cannot send to %s: %s; no metrics go to statsd until a "
                          "reload", settings.address, exc)
                self.statsd_refused = settings
                return
            if sink is not None:
                new.previous = sink.previous
                sink.close()
            self.statsd = sink = new
            log.info("statsd: sending metrics to %s every %gs", settings.address,
                     settings.interval)
        sink.send(sink.lines(snapshot(self, memory=False)))

    def check_queues(self, now: float) -> None:
        """Count, and say (at most every QUEUE_WARN_INTERVAL), when a listener's accept queue
        is full: every worker is busy, and the kernel makes new clients wait (TCP retries
        the handshake) or refuses them (unix sockets) -- uWSGI's "listen queue full"."""
        protocol = self.current.config.protocol
        for listener in self.current.listeners:
            queue = listener.queue()
            if queue is None or queue[0] < queue[1]:
                continue
            url = listener.url(protocol)
            self.queue_full[url] = self.queue_full.get(url, 0) + 1
            if now - self.queue_warned.get(url, -math.inf) >= QUEUE_WARN_INTERVAL:
                self.queue_warned[url] = now
                log.warning(
                    "listen queue of %s is full (%d/%d): every worker is busy and new clients "
                    "wait or are refused; %d workers serve it (more: workers.count or max, "
                    "or look for slow requests in the status)",
                    url, queue[0], queue[1], self.ready_count(),
                )

    def check_memory(self) -> None:
        workers = self.current.config.workers
        soft, hard = workers.max_memory << 20, workers.max_memory_hard << 20
        for handle in list(self.workers.values()):
            if handle.state not in (WorkerState.READY, WorkerState.STOPPING):
                continue
            uss = self.kernel.memory(handle.pid)
            if uss is None:
                continue
            self.uss[handle.pid] = uss
            if hard and uss > hard:
                log.error("%s uses %.1f MiB, over max_memory_hard (%d MiB); killing it",
                          handle.describe(), uss / 1048576, workers.max_memory_hard)
                self.kernel.kill(handle.pid, signal.SIGKILL)
                handle.to(WorkerState.KILLED, reason="memory (hard limit)")
                self.count_recycle("memory")
            elif soft and uss > soft and not handle.recycle and handle.state is WorkerState.READY:
                log.warning("%s uses %.1f MiB, over max_memory (%d MiB)",
                            handle.describe(), uss / 1048576, workers.max_memory)
                self.recycle(handle, "memory")

    def size_pool(self) -> None:
        """Apache prefork's spare-server rule, on the scoreboard's idle count."""
        workers = self.current.config.workers
        idle = self.idle_count()
        if idle < workers.min_spare and self.target < workers.max:
            grow = min(self.growth, workers.max - self.target)
            self.resize(self.target + grow)
            self.growth = min(self.growth * 2, 32)
            log.info("pool: %d idle (min_spare %d): growing to %d workers",
                     idle, workers.min_spare, self.target)
            return
        self.growth = 1
        if (
            idle > workers.max_spare
            and self.target > workers.count
            and self.top_worker_idle()
        ):
            self.resize(self.target - 1)
            log.info("pool: %d idle (max_spare %d): shrinking to %d workers",
                     idle, workers.max_spare, self.target)

    def top_worker_idle(self) -> bool:
        """Whether the workers a shrink would stop (numbered above target - 1) are idle: the
        spare-server rule retires an idle worker, never one inside a request (which would be
        cut at graceful_timeout); while the top one is busy, the pool waits."""
        return all(
            self.scoreboard.read(h.slot).activity in (Activity.IDLE, Activity.KEEPALIVE)
            for h in self.workers.values()
            if h.generation == self.current.number
            and h.state is WorkerState.READY
            and h.number >= self.target
        )

    def resize(self, target: int) -> None:
        """The pool's size becomes `target` (maintain() forks or retires toward it); the
        nworkers_changed hook hears of a change."""
        before, self.target = self.target, target
        if target != before:
            self.current.hooks.call("nworkers_changed", self.server_info(), target, before)

    def idle_count(self) -> int:
        """Idle workers of the serving generation; one still booting counts as idle (as in
        Apache prefork): forking more while it loads would only overshoot."""
        idle = 0
        for handle in self.workers.values():
            if handle.generation != self.current.number:
                continue
            if handle.state is WorkerState.BOOTING:
                idle += 1
            elif handle.state is WorkerState.READY:
                activity = self.scoreboard.read(handle.slot).activity
                if activity in (Activity.IDLE, Activity.KEEPALIVE):
                    idle += 1
        return idle

    def summary(self) -> str:
        """One line for systemd's STATUS and `preforkd status`."""
        states: dict[str, int] = {}
        requests = self.retired_counters.by_class
        total = sum(requests)
        for handle in self.workers.values():
            view = self.scoreboard.read(handle.slot)
            states[view.activity.name.lower()] = states.get(view.activity.name.lower(), 0) + 1
            total += view.requests
        parts = ", ".join(f"{n} {s}" for s, n in sorted(states.items()))
        text = f"{len(self.workers)} workers: {parts or 'none'}; {total} requests"
        if self.paused is not None:
            text += " (workers stopped by WINCH)"
        return text + (" (degraded)" if self.degraded else "")

    def outdated(self) -> list[WorkerHandle]:
        return [
            h
            for h in self.workers.values()
            if h.generation != self.current.number
            and (self.pending is None or h.generation != self.pending.number)
            and h.state in LIVE
        ]

    def retire_one_outdated(self, prefer: int) -> None:
        outdated = sorted(self.outdated(), key=lambda h: (h.number != prefer, h.number))
        if outdated:
            self.count_recycle("reload")
            self.ask_to_stop(outdated[0], "replaced by a reload", replaced=True)

    def ask_to_stop(
        self,
        handle: WorkerHandle,
        reason: str,
        timeout: float | None = None,
        replaced: bool = False,
    ) -> None:
        """Stop a worker gracefully. `replaced`: others keep serving its listeners, so it hands
        its idle keep-alive connections over (http.keepalive_handover) instead of closing them."""
        config = self.current.config
        if timeout is None:
            timeout = config.workers.graceful_timeout
        if handle.state not in LIVE:
            return
        message = MSG_STOP
        if replaced and self.can_hand_over(handle):
            message = chan.hand_over_message(sorted(self.listener_ids()))
        else:
            # the response in progress is its last (Connection: close). Not when handing
            # over: every response until the worker reads its channel would close a
            # connection that could have been passed on
            self.scoreboard.request_stop(handle.slot)
        if (
            not self.tell(handle, message)
            or (message == MSG_STOP and eof_on_stop(handle))
            or (handle.state is WorkerState.BOOTING and self.stop is Stop.NONE)
        ):
            # a stream handler holds the worker and reads no channel: TERM reaches it
            # (stream.eof_on_stop). A booting worker reads none until it is ready, and has
            # accepted nothing: TERM ends it at once (worker_main) instead of after an
            # import that would go on for nothing (a reload abandoned, fewer workers) while
            # others serve its sockets. Not in a graceful stop: a worker booting then may be
            # the one to answer what is queued (answer_what_waited, a new address's canary).
            # Otherwise, also for one that became ready meanwhile, TERM is the same graceful
            # stop as MSG_STOP.
            self.scoreboard.request_stop(handle.slot)
            self.kernel.kill(handle.pid, signal.SIGTERM)
        handle.to(WorkerState.STOPPING, self.kernel.monotonic() + timeout, reason)

    def can_hand_over(self, handle: WorkerHandle) -> bool:
        """Whether `handle`'s idle keep-alive connections can go to a serving worker: the
        current generation keeps connections alive, reads no PROXY header, and has a worker
        ready to take them."""
        http = self.current.config.http
        return (
            http.keepalive_handover
            and http.keepalive_timeout > 0
            and http.proxy_protocol == "off"
            and self.current.config.protocol == "http"
            and bool(self.serving_for(handle))
        )

    # signals ---------------------------------------------------------------------------

    def graceful_stop(self) -> None:
        if self.stop is not Stop.NONE:
            return
        self.stop = Stop.GRACEFUL
        self.announce.stopping()
        timeout = self.current.config.workers.graceful_timeout
        log.info("TERM: stopping gracefully (up to %.0fs)", timeout)
        self.answer_what_waited()  # while the master still holds the listeners to hand on
        listeners = self.all_listeners()
        for listener in listeners:
            listener.refuse_new()  # what is queued now is what the workers answer
        self.close_listeners(listeners, force=True)
        for handle in list(self.workers.values()):
            if handle.state is WorkerState.STOPPING:
                self.scoreboard.request_stop(handle.slot)  # it may be handing over: not now
            self.ask_to_stop(handle, "stopping", timeout)
        self.pending = None

    def answer_what_waited(self) -> None:
        """TERM after WINCH: no worker holds the listeners, and closing them reset every
        connection that waited in the accept queue meanwhile (WINCH says they wait, TERM
        that what is queued is answered). Workers are started for them, which the stop
        that follows asks to stop at once: each drains the queues as any stopping worker
        does. Not when the master a USR2 started shares the sockets: its workers answer."""
        if self.paused is None or (self.upgrader is not None and self.upgrader.pid is not None):
            return
        waiting = 0
        for listener in self.current.listeners:
            queued = listener.queued()
            waiting += 1 if queued is None else queued  # unknown: one worker looks
        if not waiting:
            return
        count = min(max(self.paused, 1), waiting, len(self.free_slots))
        log.info("TERM: starting %d worker%s to answer the connections waiting since WINCH",
                 count, "" if count == 1 else "s")
        for number in range(1, count + 1):
            self.spawn(number, self.current)

    def fast_stop(self) -> None:
        if self.stop is Stop.FAST:
            return
        if self.stop is Stop.NONE:
            self.announce.stopping()
        self.stop = Stop.FAST
        log.info("stopping now")
        self.close_listeners(self.all_listeners(), force=True)
        deadline = self.kernel.monotonic() + FAST_STOP_GRACE
        for handle in self.workers.values():
            if handle.state is WorkerState.KILLED:
                continue
            self.kernel.kill(handle.pid, signal.SIGQUIT)
            if handle.state in LIVE:
                handle.to(WorkerState.STOPPING, deadline, "stopping")
            else:
                handle.deadline = min(handle.deadline, deadline)
        self.pending = None

    def more_workers(self) -> None:
        if self.stop is Stop.NONE:
            workers = self.current.config.workers
            # a dynamic pool (max set) within the bounds pool_size() keeps at a reload
            limit = workers.max or self.scoreboard.capacity // 2
            if self.target >= limit:
                log.warning("TTIN: already at the maximum of %d workers%s", self.target,
                            " (workers.max)" if limit == workers.max else "")
                return
            size = self.target + 1
            if self.paused is not None and workers.max:
                # after a WINCH a dynamic pool comes back to its floor, which TTOU and the
                # spare-server rule keep it at: one worker left it below that for good
                size = max(size, workers.count)
            self.resize(size)
            self.paused = None  # after a WINCH: the pool grows from none (or its floor)
            log.info("TTIN: %d workers", self.target)

    def fewer_workers(self) -> None:
        workers = self.current.config.workers
        floor = workers.count if workers.max else 1  # pool_size()'s bounds, as TTIN
        if self.stop is not Stop.NONE:
            return
        if self.target <= floor:
            if floor > 1:
                log.warning("TTOU: a dynamic pool keeps at least workers.count (%d) workers",
                            floor)
            else:
                log.warning("TTOU: already at the minimum of 1 worker")
            return
        self.resize(self.target - 1)
        log.info("TTOU: %d workers", self.target)

    def stop_workers(self) -> None:
        """WINCH (unicorn's, and gunicorn's when detached): every worker stops gracefully and
        none is started; the master keeps its sockets, so another master on them (after a
        USR2) serves alone. HUP or TTIN brings workers back, and so does the end of that
        other master. Refused in a terminal's foreground, where a window resize sends it."""
        if self.stop is not Stop.NONE:
            refusal: str | None = "the server is stopping"
        elif self.paused is not None:
            refusal = "the workers are already stopped (HUP or TTIN starts them)"
        elif not self.ever_ready:
            refusal = "the server is not ready yet"
        elif self.pending is not None or self.reloading:
            refusal = "a reload is under way"
        elif self.upgrader is not None and self.upgrader.new_master_ready() is False:
            refusal = (f"the master started by USR2 (pid {self.upgrader.pid}) is not ready "
                       "yet: nothing would serve (send WINCH once it is)")
        elif self.kernel.in_terminal_foreground():
            refusal = ("the master runs in a terminal's foreground, where resizing the window "
                       "sends WINCH (run it detached to use WINCH)")
        else:
            refusal = None
        if refusal is not None:
            log.warning("WINCH ignored: %s", refusal)
            return
        self.paused = self.target
        self.resize(0)
        self.recycle_queue.clear()
        for handle in list(self.workers.values()):
            self.ask_to_stop(handle, "workers stopped (WINCH)")
        others = (f"the master started by USR2 (pid {self.upgrader.pid}) serves alone"
                  if self.upgrader is not None and self.upgrader.pid is not None
                  else "no worker of this master serves its sockets")
        log.warning("WINCH: stopping all %d workers; %s until HUP or TTIN starts workers again",
                    self.paused, others)

    def resume_workers(self, why: str) -> None:
        """After a WINCH: back to the pool size it stopped."""
        if self.paused is not None:
            self.resize(self.paused)
            self.paused = None
            log.info("%s: starting %d workers again", why, self.target)

    def upgrade(self) -> None:
        """USR2: start a new master from the code installed now, on the same sockets; this
        one serves on until it is stopped (prefork/upgrade.py)."""
        upgrader = self.upgrader
        if upgrader is None:
            refusal: str | None = "this master cannot start another"
        elif self.stop is not Stop.NONE:
            refusal = "the server is stopping"
        elif not self.ever_ready:
            refusal = "the server is not ready yet"
        elif self.pending is not None or self.reloading:
            refusal = "a reload is under way"
        else:
            refusal = upgrader.refusal(self.current.listeners)
        if refusal is None:
            assert upgrader is not None
            info = self.server_info()  # this master, as the hook sees it in the child
            try:
                size = self.paused if self.paused is not None else self.target  # not WINCH's 0
                pid = upgrader.start(
                    self.current.listeners,
                    (size, self.current.config.workers.count),
                    lambda: self.current.hooks.call("pre_exec", info),
                )
            except OSError as exc:
                refusal = f"cannot start the new master: {exc}"
        if refusal is not None:
            message = f"USR2 ignored: {refusal}"
            log.warning("%s", message)
            self.announce.upgrade_failed(message)
            return
        self.set_title()
        log.info("USR2: started a new master (pid %d) on the same sockets; this one (pid %d) "
                 "serves until it is stopped", pid, os.getpid())

    def upgrade_ended(self, pid: int, status: int) -> None:
        self.set_title()
        how = describe_status(status)
        if self.stop is not Stop.NONE:
            log.error("upgrade: the new master (pid %d) exited (%s) while this one is "
                      "stopping: nothing will serve", pid, how)
            return
        message = (f"upgrade: the new master (pid {pid}) exited ({how}); this master "
                   f"(pid {os.getpid()}) serves alone again")
        log.warning("%s", message)
        self.announce.upgrade_failed(message)
        self.resume_workers("upgrade ended")  # after a WINCH, nothing else would serve

    def reopen_logs(self, cause: str = "USR1") -> None:
        # The master (root) creates the new files first, owned by the user the current
        # generation's workers run as (a reload may have changed it); then the workers reopen
        # them by path.
        self.logs.workers_as = (self.current.config.user, self.current.config.group)
        reopened = self.logs.reopen()
        pending = self.pending
        if pending is not None and pending.logs is not None and pending.logs is not self.logs:
            # a reload's own files (its canary logs there), kept aside until it takes over
            pending.logs.workers_as = (pending.config.user, pending.config.group)
            reopened = pending.logs.reopen() and reopened
        for handle in self.workers.values():
            self.tell(handle, MSG_REOPEN)
        if reopened:
            log.info("%s: log files reopened", cause)
        else:
            log.warning("%s: some log files could not be reopened (see above); the workers "
                        "were asked to reopen theirs", cause)

    def reload(self, cause: str = "HUP") -> None:
        """HUP, or a touch_reload file that changed (`cause` says which, and names it)."""
        if self.reloader is None:
            return
        if self.stop is not Stop.NONE:
            # said at once, so `preforkd reload` answers now, not when the stop ends
            message = "HUP ignored: the server is stopping"
            log.warning("%s", message)
            self.announce.refused(message)
            return
        self.resume_workers(cause)  # first, and whatever the reload's outcome
        log.info("%s: reloading", cause)
        # a touch until now is this reload's (it reads the file after it): only one from
        # now on makes another, as for a HUP that arrives during this one's import
        self.touch.changes("touch_reload", self.current.config.touch_reload)
        self.announce.reloading()
        try:
            # a preloaded application's import can take as long as the first did, with the
            # loop blocked: a stop meanwhile abandons it at once (the queue has the signal
            # for the next tick) instead of waiting for the import, and for docker's SIGKILL.
            # The reloader undoes what it did when its import raises; whatever else it left
            # half done goes with the master, which stops at the next tick.
            with stops_raise(STOP_SIGNALS):
                # What the generations this one replaced left (their configuration, hooks,
                # a preloaded application's modules: cycles, every one) is collected first,
                # so the import reuses that memory: the collector's own thresholds let
                # garbage the size of a few applications pile up. The loop waits for the
                # import anyway, and a stop meanwhile still abandons the reload: held
                # until the collection ends, since the finalizers it runs would swallow the
                # Stopped raised inside one ("Exception ignored in ...").
                with blocked(STOP_SIGNALS):
                    gc.collect()
                new = self.reloader(self.current, self.all_listeners())
        except Stopped as exc:
            message = (f"reload abandoned: {signal.Signals(exc.signum).name} arrived while it "
                       f"loaded; still serving generation {self.current.number}")
            log.warning("%s", message)
            self.reload_finished(False, message, under_way=self.reloading)
            # The stop now, not at the next tick: the HUPs that arrived with it during the
            # import come first in the queue, and would import again, with nothing left to
            # interrupt that import. The stop's own byte is in the queue too: the next
            # tick finds it and, stopping already, does nothing more.
            self.handlers[exc.signum]()
            return
        except Exception as exc:
            message = f"reload failed: {exc}; still serving generation {self.current.number}"
            if self.reloading:
                message += " (the reload under way goes on, and reports its own outcome)"
            log.error("%s", message)
            self.reload_finished(False, message, under_way=self.reloading)
            return
        self.reloading = True
        self.generations += 1
        new.number = self.generations
        new.hooks.call("on_reload", self.server_info(new))
        previous, self.pending = self.pending, new
        if previous is not None:
            # `new` was read on top of `previous`'s environment: undoing it must undo both
            new_undo, previous_undo = new.env_undo, previous.env_undo
            previous.env_undo = None
            if new_undo is not None and previous_undo is not None:

                def undo_both() -> None:
                    new_undo()
                    previous_undo()

                new.env_undo = undo_both
            self.abandon(previous)  # after `new` is pending, so the sockets it reuses stay

    def promote(self) -> None:
        """The pending generation booted a worker: it becomes current."""
        assert self.pending is not None
        old = self.current
        self.current = self.pending
        self.pending = None
        self.current.env_undo = None  # its environment is the master's for good
        if self.release_imports is not None:
            self.release_imports()  # what the replaced generations imported: garbage now
        # the pool size changes only now: until the canary is ready the old generation keeps
        # the workers it had, and a reload that fails changes nothing
        self.resize(pool_size(old.config, self.current.config, self.target))
        self.close_listeners(old.listeners)
        logs = self.current.logs
        if logs is None:
            self.current.logs = old.logs
        elif logs is not old.logs:
            # from here the master logs as its new generation does; the old setup is no
            # one's: the old workers hold their own copies of its files
            log.info("reload: the master logs as generation %d from now on (%s)",
                     self.current.number, logs.describe())
            logs.install()
            old.logs.close()
            if self.logs_installed is not None:
                self.logs_installed(logs)
        self.set_title()  # proc_name may have changed
        self.statsd_renew, self.statsd_refused = True, None  # "resolved at each reload"
        log.info("reload: generation %d is serving; replacing the workers of generation %d",
                 self.current.number, old.number)

    def abandon_pending(self) -> None:
        pending = self.pending
        self.pending = None
        if pending is not None:
            self.abandon(pending)  # its modules dropped, the current's put back
            if self.release_imports is not None:
                self.release_imports()

    def abandon(self, generation: Generation) -> None:
        """Stop a generation that never took over, close the sockets and the log files only
        it used, and give the master back the environment it had."""
        for handle in list(self.workers.values()):
            if handle.generation == generation.number and handle.state in LIVE:
                self.ask_to_stop(handle, "reload abandoned")
        generation.undo_env()
        self.close_listeners(generation.listeners)
        logs = generation.logs
        if logs is not None and all(logs is not held for held in self.logging_setups()):
            logs.close()  # never installed here: the master logs on as it did

    def logging_setups(self) -> list[Any]:
        """The logging setups the master holds: its own (the serving generation's) and the
        pending generation's, which may be the same (a reload that left `logging` alone)."""
        setups = [self.logs]
        if self.pending is not None:
            setups.append(self.pending.logs)
        return [setup for setup in setups if setup is not None]

    # listeners -------------------------------------------------------------------------

    def all_listeners(self) -> list[Listener]:
        seen: list[Listener] = list(self.current.listeners)
        if self.pending is not None:
            seen.extend(lst for lst in self.pending.listeners if lst not in seen)
        return seen

    def close_listeners(self, listeners: list[Listener], force: bool = False) -> None:
        """Close the master's copies of `listeners`, except those the serving or pending
        generation still uses (unless `force`: stopping). Workers hold their own copies, so
        one draining its queue keeps serving after this; a unix socket's path disappears at
        once, stopping new arrivals."""
        keep = [] if force else self.all_listeners()
        for listener in listeners:
            if listener.sock.fileno() >= 0 and listener not in keep:
                listener.close()
