"""What the master reports about itself and its workers: one snapshot dict, rendered as JSON,
Prometheus text or a table by prefork.admin.

Invariant: read-only; called from the master's loop (admin requests), so it must stay cheap:
one scoreboard read per worker and one psutil call per live worker.
"""

from __future__ import annotations

import os
import time
from typing import TYPE_CHECKING, Any

from prefork import __version__
from prefork.admin import metrics_text, status_json
from prefork.scoreboard import Activity, Counters

if TYPE_CHECKING:
    from prefork.master import Master

STATE_NAMES = {
    Activity.EMPTY: "booting",
    Activity.BOOTING: "booting",
    Activity.IDLE: "idle",
    Activity.BUSY: "busy",
    Activity.DRAINING: "draining",
    Activity.KEEPALIVE: "keepalive",
    Activity.READING: "reading",
    Activity.WAITING: "waiting",
}


def snapshot(master: Master, memory: bool = True) -> dict[str, Any]:
    """Everything the master reports; `memory=False` leaves out the per-worker memory (one
    psutil read each), for the periodic statsd send."""
    from prefork.master import LIVE, Stop, WorkerState

    now = master.kernel.monotonic()
    totals = master.retired_counters
    workers = []
    by_state = {
        name: 0
        for name in ("booting", "idle", "keepalive", "reading", "waiting", "busy", "draining")
    }
    for handle in sorted(master.workers.values(), key=lambda h: (h.number, h.generation)):
        view = master.scoreboard.read(handle.slot)
        totals = totals + master.scoreboard.counters(handle.slot)
        activity = STATE_NAMES[view.activity]
        if handle.state is WorkerState.BOOTING:
            activity = "booting"
        elif handle.state not in LIVE and activity != "busy":
            activity = "draining"
        by_state[activity] += 1
        current = None
        if view.activity in (Activity.BUSY, Activity.READING, Activity.WAITING) and view.started:
            # the path only: query strings may carry tokens, and status is widely readable
            current = {"method": view.method, "target": view.target.split("?", 1)[0],
                       "age": round(now - view.started, 3), "client": view.client or None}
        used = master.kernel.memory(handle.pid) if memory and handle.state in LIVE else None
        uss_readable = master.kernel.uss_readable  # read after memory(), which may learn it
        workers.append({
            "number": handle.number,
            "pid": handle.pid,
            "generation": handle.generation,
            "lifecycle": handle.state.value,
            "activity": activity,
            "requests": view.requests,
            "connections": view.connections,
            "current": current,
            "uss": used if uss_readable else None,
            "rss": None if uss_readable else used,  # only where USS cannot be read
            "age": round(now - handle.started, 3),
            "recycle": handle.recycle or None,
        })
    state = "running"
    if master.stop is not Stop.NONE:
        state = "stopping"
    elif master.paused is not None:
        state = "workers stopped"  # WINCH
    elif master.degraded:
        state = "degraded"
    elif master.reloading:
        state = "reloading"
    elif not master.ever_ready:
        state = "starting"
    return {
        "master": {
            "pid": os.getpid(),
            "version": __version__,
            "started": round(master.started_at, 3),
            "uptime": round(time.time() - master.started_at, 3),
            "generation": master.current.number,
            "state": state,
            "degraded": master.degraded,
            "ready": ready(master),
            "target_workers": master.target,
            "config": master.current.config.source,
        },
        "workers": workers,
        "workers_by_state": by_state,
        "listeners": listeners(master),
        "totals": totals_dict(master, totals),
    }


def listeners(master: Master) -> list[dict[str, Any]]:
    """Each listener of the serving generation and its accept queue now: connections the
    kernel holds that no worker has taken yet (null where the kernel does not say)."""
    protocol = master.current.config.protocol
    out = []
    for listener in master.current.listeners:
        url = listener.url(protocol)
        queue = listener.queue()
        out.append({
            "url": url,
            "queued": None if queue is None else queue[0],
            "queue_limit": None if queue is None else queue[1],
            "queue_full_seen": master.queue_full.get(url, 0),
        })
    return out


def totals_dict(master: Master, counters: Counters) -> dict[str, Any]:
    return {
        "requests": sum(counters.by_class),
        "by_class": {f"{i + 1}xx": n for i, n in enumerate(counters.by_class)},
        "buckets": list(counters.buckets),
        "duration_sum": round(counters.duration_sum, 6),
        "bytes": counters.bytes_sent,
        "recycles": {
            reason: master.recycles.get(reason, 0)
            for reason in ("max_requests", "memory", "timeout", "reload", "crash")
        },
        "restarts": master.restarts,
        "boot_failures": master.boot_failures,
        "handed_over": master.handed_over,
        "balanced": master.balanced,
        "relieved": master.relieved,
        "reloads": dict(master.reloads),
    }


def ready(master: Master) -> bool:
    """At least one worker of the serving generation is ready and not draining."""
    from prefork.master import Stop, WorkerState

    if master.stop is not Stop.NONE:
        return False
    return any(
        h.state is WorkerState.READY and h.generation == master.current.number
        for h in master.workers.values()
    )


def respond(master: Master, path: str) -> tuple[int, str, bytes]:
    """The admin endpoint's routes."""
    if path == "/status":
        return 200, "application/json", status_json(snapshot(master))
    if path == "/metrics":
        return 200, "text/plain; version=0.0.4; charset=utf-8", metrics_text(snapshot(master))
    if path == "/ready":
        ok = ready(master)
        return (200 if ok else 503), "text/plain", b"ready\n" if ok else b"not ready\n"
    if path == "/live":
        return 200, "text/plain", b"live\n"
    return 404, "text/plain", b"not found: try /status, /metrics, /ready, /live\n"
