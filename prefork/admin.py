"""The master's status endpoint: /status (JSON), /metrics (Prometheus text), /ready, /live.

Invariants: master only, inside its loop, never blocking it: sockets are non-blocking, a
request must arrive whole within REQUEST_TIMEOUT, answers are small and sent at once; the unix
socket is created with mode 0600. Rendering is pure: it turns a snapshot dict into bytes.
"""

from __future__ import annotations

import json
import logging
import os
import socket
from collections.abc import Callable, Mapping
from typing import Any

from prefork.addresses import parse_address, unix_path_length_problem
from prefork.scoreboard import DURATION_BUCKETS
from prefork.sockets import BindError, recv_now, remove_stale_unix_socket, unlink_if_ours

log = logging.getLogger("prefork")

REQUEST_TIMEOUT = 2.0
MAX_REQUEST = 8192
Responder = Callable[[str], tuple[int, str, bytes]]
_REASONS = {200: "OK", 404: "Not Found", 405: "Method Not Allowed", 503: "Service Unavailable"}


class AdminServer:
    def __init__(self, listeners: list[socket.socket], respond: Responder,
                 unix_path: str | None = None,
                 unix_inode: tuple[int, int] | None = None) -> None:
        self.listeners = {sock.fileno(): sock for sock in listeners}
        self.respond = respond
        self.unix_path = unix_path
        self.unix_inode = unix_inode  # the socket file bound, removed at close if still ours
        self.conns: dict[int, tuple[socket.socket, bytes, float]] = {}

    def fds(self) -> list[int]:
        return [*self.listeners, *self.conns]

    def tcp_sockets(self) -> list[socket.socket]:
        """The listening sockets of admin.bind (what a USR2 passes to the new master)."""
        return [sock for sock in self.listeners.values() if sock.family != socket.AF_UNIX]

    def close_tcp(self) -> None:
        for sock in self.tcp_sockets():
            del self.listeners[sock.fileno()]
            sock.close()

    def add(self, sockets: list[socket.socket]) -> None:
        self.listeners.update((sock.fileno(), sock) for sock in sockets)

    def handle(self, ready: set[int], now: float) -> None:
        for fd in ready:
            listener = self.listeners.get(fd)
            if listener is not None:
                self._accept(listener, now)
            elif fd in self.conns:
                self._read(fd)
        for fd, (sock, _, deadline) in list(self.conns.items()):
            if now >= deadline:
                del self.conns[fd]
                sock.close()

    def _accept(self, listener: socket.socket, now: float) -> None:
        for _ in range(16):
            try:
                sock, _ = listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                log.warning("status endpoint: accept: %s", exc)
                return
            sock.setblocking(False)
            self.conns[sock.fileno()] = (sock, b"", now + REQUEST_TIMEOUT)

    def _read(self, fd: int) -> None:
        sock, data, deadline = self.conns[fd]
        chunk = recv_now(sock, 4096)
        if chunk is None:
            return
        data += chunk
        if chunk and b"\r\n\r\n" not in data and b"\n\n" not in data and len(data) < MAX_REQUEST:
            self.conns[fd] = (sock, data, deadline)
            return
        del self.conns[fd]
        if chunk:
            self._answer(sock, data)
        sock.close()

    def _answer(self, sock: socket.socket, data: bytes) -> None:
        method, _, rest = data.partition(b" ")
        target = rest.split(b" ", 1)[0].decode("latin-1", "replace")
        if method not in (b"GET", b"HEAD"):
            status, ctype, body = 405, "text/plain", b"only GET and HEAD\n"
        else:
            try:
                status, ctype, body = self.respond(target.split("?", 1)[0])
            except Exception:
                log.exception("status endpoint failed for %s", target)
                status, ctype, body = 503, "text/plain", b"error\n"
        head = (
            f"HTTP/1.1 {status} {_REASONS.get(status, 'Error')}\r\n"
            f"Content-Type: {ctype}\r\nContent-Length: {len(body)}\r\n"
            "Cache-Control: no-store\r\nConnection: close\r\n\r\n"
        ).encode("latin-1")
        payload = head if method == b"HEAD" else head + body
        try:
            # non-blocking: a few KiB fit the socket's buffer at once; a client that lets
            # them pile up unread gets what fitted, and the master's loop never waits for it
            sent = sock.send(payload)
        except OSError:
            return
        if sent < len(payload):
            log.warning("status endpoint: the client read nothing; sent %d of %d bytes of %s",
                        sent, len(payload), target)

    def close(self) -> None:
        for sock, _, _ in self.conns.values():
            sock.close()
        self.conns.clear()
        for sock in self.listeners.values():
            sock.close()
        if self.unix_path is not None and self.unix_inode is not None:
            unlink_if_ours(self.unix_path, self.unix_inode)
            self.unix_inode = None


def admin_socket_path(socket_path: str | None, pidfile: str | None) -> str | None:
    if socket_path:
        return socket_path
    return f"{pidfile}.sock" if pidfile else None


def unix_path_problem(path: str) -> str | None:
    """Why `path` cannot name a unix socket, or None. Checked before bind() and connect(),
    whose own error ("AF_UNIX path too long") has no errno, so its strerror is None: the
    default PIDFILE.sock in a deep directory failed at start with "...: None"."""
    problem = unix_path_length_problem(path)
    return None if problem is None else f"path too long: {problem}"


def reason(exc: OSError) -> str:
    """The text of an OSError for a message: its strerror when it has one (without the
    "[Errno N]" prefix), else the whole message, never "None"."""
    return exc.strerror or str(exc) or type(exc).__name__


def open_admin(
    path: str | None, bind: str | None, passed: list[socket.socket] | None = None
) -> tuple[list[socket.socket], tuple[int, int] | None]:
    """Bind the endpoint's sockets (raises OSError with the reason). Returns them and the
    unix socket file's (device, inode), for removing it at close only if it is still ours.
    A socket file another live process listens on is refused, not replaced. `passed`: the
    TCP sockets of `bind` the master this one replaces (USR2) listened on, taken instead."""
    sockets = []
    inode = None
    if path is not None:
        what = f"cannot open the status socket {path}"
        problem = unix_path_problem(path)
        if problem is not None:
            raise OSError(f"{what}: {problem}")
        try:
            remove_stale_unix_socket(path, what)
        except BindError as exc:
            raise OSError(str(exc)) from None
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            old = os.umask(0o177)
            try:
                sock.bind(path)
            finally:
                os.umask(old)
            st = os.stat(path)
            inode = (st.st_dev, st.st_ino)
            sock.listen(16)
        except OSError as exc:
            sock.close()
            if inode is not None:
                unlink_if_ours(path, inode)
            raise OSError(f"{what}: {reason(exc)}") from None
        sock.setblocking(False)
        sockets.append(sock)
    if passed:
        sockets.extend(passed)
    elif bind is not None:
        address = parse_address(bind)
        family = socket.AF_INET6 if address.is_ipv6 else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((address.host, address.port))
            sock.listen(16)
        except OSError as exc:
            sock.close()
            for opened in sockets:
                opened.close()
            if inode is not None and path is not None:
                unlink_if_ours(path, inode)
            raise OSError(f"cannot open the status endpoint {bind}: {reason(exc)}") from None
        sock.setblocking(False)
        sockets.append(sock)
    return sockets, inode


def fetch(path: str | None, bind: str | None, target: str, timeout: float = 5.0) -> bytes:
    """A client for `preforkd status`: GET `target`, return the body (raises OSError)."""
    if path is not None:
        problem = unix_path_problem(path)
        if problem is not None:
            raise OSError(problem)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        where: Any = path
    elif bind is not None:
        address = parse_address(bind)
        sock = socket.socket(
            socket.AF_INET6 if address.is_ipv6 else socket.AF_INET, socket.SOCK_STREAM
        )
        where = (address.host, address.port)
    else:
        raise OSError("no status endpoint configured (set pidfile, admin.socket or admin.bind)")
    with sock:
        sock.settimeout(timeout)
        sock.connect(where)
        sock.sendall(f"GET {target} HTTP/1.1\r\nHost: preforkd\r\n\r\n".encode())
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.1 200"):
        status_line = head.split(b"\r\n", 1)[0].decode("latin-1")
        raise OSError(f"the status endpoint answered {status_line!r}")
    return body


# --- rendering -------------------------------------------------------------------------------


def status_json(snapshot: Mapping[str, Any]) -> bytes:
    return json.dumps(snapshot, indent=2, sort_keys=True).encode() + b"\n"


def _line(name: str, value: float, labels: Mapping[str, str] | None = None) -> str:
    if labels:
        inner = ",".join(f'{k}="{_escape(v)}"' for k, v in labels.items())
        return f"{name}{{{inner}}} {value}"
    return f"{name} {value}"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def metrics_text(snapshot: Mapping[str, Any]) -> bytes:
    """Prometheus text exposition format 0.0.4 from a status snapshot."""
    totals = snapshot["totals"]
    out: list[str] = []

    def family(name: str, kind: str, help_text: str) -> None:
        out.append(f"# HELP {name} {help_text}")
        out.append(f"# TYPE {name} {kind}")

    family("preforkd_requests_total", "counter", "Responses sent, by status class.")
    for cls, count in totals["by_class"].items():
        out.append(_line("preforkd_requests_total", count, {"class": cls}))
    family("preforkd_request_duration_seconds", "histogram",
           "Time to answer a request, over the responses of preforkd_requests_total.")
    cumulative = 0
    for bound, count in zip([*DURATION_BUCKETS, "+Inf"], totals["buckets"], strict=True):
        cumulative += count
        out.append(
            _line("preforkd_request_duration_seconds_bucket", cumulative, {"le": str(bound)})
        )
    out.append(_line("preforkd_request_duration_seconds_sum", totals["duration_sum"]))
    out.append(_line("preforkd_request_duration_seconds_count", cumulative))
    family("preforkd_response_body_bytes_total", "counter", "Response body bytes sent.")
    out.append(_line("preforkd_response_body_bytes_total", totals["bytes"]))
    family("preforkd_workers", "gauge", "Worker processes by what they are doing.")
    for state, count in snapshot["workers_by_state"].items():
        out.append(_line("preforkd_workers", count, {"state": state}))
    family("preforkd_worker_recycles_total", "counter", "Workers replaced, by reason.")
    for reason, count in totals["recycles"].items():
        out.append(_line("preforkd_worker_recycles_total", count, {"reason": reason}))
    family("preforkd_worker_restarts_total", "counter", "Workers started after startup.")
    out.append(_line("preforkd_worker_restarts_total", totals["restarts"]))
    family("preforkd_worker_boot_failures_total", "counter", "Workers that failed to boot.")
    out.append(_line("preforkd_worker_boot_failures_total", totals["boot_failures"]))
    family(
        "preforkd_connections_handed_over_total",
        "counter",
        "Idle keep-alive connections passed from a replaced worker to a serving one.",
    )
    out.append(_line("preforkd_connections_handed_over_total", totals["handed_over"]))
    family(
        "preforkd_connections_balanced_total",
        "counter",
        "New connections passed from a worker holding more than its share to one holding fewer.",
    )
    out.append(_line("preforkd_connections_balanced_total", totals["balanced"]))
    family(
        "preforkd_connections_relieved_total",
        "counter",
        "Keep-alive connections passed from a worker inside a long request to a free one.",
    )
    out.append(_line("preforkd_connections_relieved_total", totals["relieved"]))
    family("preforkd_reloads_total", "counter", "Reloads (HUP), by result.")
    for result, count in totals["reloads"].items():
        out.append(_line("preforkd_reloads_total", count, {"result": result}))
    master = snapshot["master"]
    listeners = snapshot.get("listeners", [])
    for name, key, kind, doc in (
        ("preforkd_listen_queue", "queued", "gauge",
         "Connections waiting in a listener's accept queue for a worker to take them."),
        ("preforkd_listen_queue_limit", "queue_limit", "gauge",
         "The most connections a listener's accept queue holds (the listen backlog)."),
        ("preforkd_listen_queue_full_total", "queue_full_seen", "counter",
         "Checks (one a second) that found a listener's accept queue full."),
    ):
        family(name, kind, doc)
        for entry in listeners:
            if entry[key] is not None:
                out.append(_line(name, entry[key], {"listener": entry["url"]}))
    family("preforkd_degraded", "gauge", "1 while too many workers fail to boot.")
    out.append(_line("preforkd_degraded", int(master["degraded"])))
    family("preforkd_generation", "gauge", "The configuration generation being served.")
    out.append(_line("preforkd_generation", master["generation"]))
    for kind, doc in (("uss", "Unique memory of each worker."),
                      ("rss", "Resident memory of each worker, where USS cannot be read.")):
        name = f"preforkd_worker_memory_{kind}_bytes"
        measured = [w for w in snapshot["workers"] if w.get(kind) is not None]
        if kind == "uss" or measured:
            family(name, "gauge", doc)
        for worker in measured:
            out.append(
                _line(name, worker[kind],
                      {"worker": str(worker["number"]), "pid": str(worker["pid"])})
            )
    family(
        "preforkd_worker_connections",
        "gauge",
        "Connections each worker holds, idle keep-alive ones included.",
    )
    for worker in snapshot["workers"]:
        out.append(
            _line("preforkd_worker_connections", worker["connections"],
                  {"worker": str(worker["number"]), "pid": str(worker["pid"])})
        )
    family("preforkd_start_time_seconds", "gauge", "Start time of the master (unix time).")
    out.append(_line("preforkd_start_time_seconds", master["started"]))
    return ("\n".join(out) + "\n").encode()


def status_table(snapshot: Mapping[str, Any]) -> str:
    """The `preforkd status` table, like Apache's server-status."""
    master = snapshot["master"]
    totals = snapshot["totals"]
    # RSS where USS cannot be read (a worker of another user, without CAP_SYS_PTRACE)
    memory_kind = "RSS" if any(w.get("rss") is not None for w in snapshot["workers"]) else "USS"
    lines = [
        f"preforkd {master['version']}  master pid {master['pid']}  generation "
        f"{master['generation']}  {master['state']}  up {_duration(master['uptime'])}",
        f"{len(snapshot['workers'])} workers (target {master['target_workers']}): "
        + _by_state(snapshot)
        + f"; {totals['requests']} requests",
        "",
        f"{'WORKER':>6} {'PID':>7} {'GEN':>3} {'STATE':<9} {'REQS':>8} {'CONNS':>6} "
        f"{memory_kind:>9}  {'AGE':>7}  {'CLIENT':<15}  CURRENT REQUEST",
    ]
    queues = [
        f"{entry['url']} {entry['queued']}/{entry['queue_limit']}"
        for entry in snapshot.get("listeners", [])
        if entry["queued"] is not None
    ]
    if queues:
        lines[2:2] = [f"listen queues: {', '.join(queues)}"]
    for w in snapshot["workers"]:
        current = w.get("current")
        request = f"{current['method']} {current['target']}" if current else ""
        age = _duration(current["age"]) if current else ""
        client = (current.get("client") or "") if current else ""
        memory = w.get("uss") if w.get("uss") is not None else w.get("rss")
        shown = f"{memory / 1048576:.1f}M" if memory is not None else "-"
        lines.append(
            f"{w['number']:>6} {w['pid']:>7} {w['generation']:>3} {w['activity']:<9} "
            f"{w['requests']:>8} {w['connections']:>6} {shown:>9}  {age:>7}  {client:<15}  "
            f"{request}"
        )
    return "\n".join(lines)


def _by_state(snapshot: Mapping[str, Any]) -> str:
    """How many workers are in each state; what an empty pool means (WINCH, or a stop)."""
    counts = ", ".join(f"{n} {s}" for s, n in snapshot["workers_by_state"].items() if n)
    if counts:
        return counts
    if snapshot["master"]["state"] == "workers stopped":
        return "none since WINCH (HUP or TTIN starts them)"
    return "none"


def _duration(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f}s"
    if seconds < 3600:
        return f"{seconds / 60:.1f}m"
    return f"{seconds / 3600:.1f}h"

