"""Integration-test helpers: run a real preforkd in its own process group and talk to it.

Invariants: every wait is bounded by a `time.monotonic()` deadline; a `Server` is always
torn down by killing its whole process group, so no worker outlives its test; HTTP responses
are read without consuming bytes past their end, so one socket can carry many responses.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple, NoReturn, TypeVar

import psutil
import pytest
import yaml

T = TypeVar("T")
# typing.Self is Python 3.11; the project supports 3.10 (pyproject's requires-python), and
# `make test` there failed at this import before collecting a single test.
ClientsT = TypeVar("ClientsT", bound="ClientThreads")

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_COMMAND: tuple[str, ...] = (sys.executable, "-m", "prefork")
CONFIG_NAME = "preforkd.yaml"
# The test applications (pf_*.py); `settings()` puts this directory on a server's pythonpath.
APPS = Path(__file__).resolve().parent / "apps"
# An app module (for `app_source`) that answers every request with its worker's pid.
PID_APP = """
import os

def application(environ, start_response):
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [str(os.getpid()).encode()]
"""

# "[2026-11-21 06:21:41 +0000] [1234] [INFO] listening at http://127.0.0.1:41235"
LISTENING_RE = re.compile(r"\[INFO\] listening at (\S+)")
# "[2026-11-21 06:21:41 +0000] [1234] [INFO] ready: 2 workers"
READY_RE = re.compile(r"\[INFO\] ready: (\d+) workers?")

# ("http" | "tcp", host, port) or ("unix", path); host is bare (no brackets) for IPv6.
Address = tuple[Any, ...]


# --- waiting -------------------------------------------------------------------------------


def wait_until(
    predicate: Callable[[], T],
    timeout: float,
    interval: float = 0.02,
    message: str = "",
    *,
    ignore: tuple[type[BaseException], ...] = (),
) -> T:
    """Call `predicate` until it returns something truthy, and return that.

    Exceptions listed in `ignore` count as "not yet" (e.g. ConnectionRefusedError while a
    port opens). Raises AssertionError with `message` and the last value seen on timeout.
    """
    deadline = time.monotonic() + timeout
    while True:
        try:
            last: object = predicate()
        except ignore as exc:
            last = exc
        else:
            if last:
                return last  # type: ignore[return-value]
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            prefix = message or "condition not met"
            raise AssertionError(f"{prefix} (after {timeout:g}s; last seen: {last!r})")
        time.sleep(min(interval, remaining))


# --- tools -----------------------------------------------------------------------------------


def require_tool(name: str) -> str:
    """Return the path of command `name`; skip the test without it (fail it under CI=true)."""
    path = shutil.which(name)
    if path is not None:
        return path
    missing(f"required tool {name!r} is not on PATH")


def require_module(name: str) -> None:
    """Skip the test without the Python package `name` (fail it under CI=true, where the
    project's `test` extra installs it)."""
    if importlib.util.find_spec(name) is None:
        missing(f"the Python package {name!r} is not installed",
                "pyproject.toml's test extra should install it")


def missing(reason: str, remedy: str = ".ci/run should install it") -> NoReturn:
    """What a test needs is not here: skip it, but fail it under CI=true, where `remedy`
    should have provided it."""
    if os.environ.get("CI") == "true":
        pytest.fail(f"{reason} ({remedy})")
    pytest.skip(reason)


# --- configuration ---------------------------------------------------------------------------


def write_config(
    directory: Path,
    settings: Mapping[str, Any],
    *,
    app_source: str | None = None,
    module: str = "app",
    filename: str = CONFIG_NAME,
) -> Path:
    """Write `settings` as YAML into `directory` and return the file's path.

    `app_source`, if given, is written as `<module>.py` beside the config. Defaults added
    when absent: `pythonpath: ["."]` (the config's directory) and `bind: ["127.0.0.1:0"]`.
    """
    directory.mkdir(parents=True, exist_ok=True)
    data = dict(settings)
    data.setdefault("pythonpath", ["."])
    data.setdefault("bind", ["127.0.0.1:0"])
    if app_source is not None:
        (directory / f"{module}.py").write_text(app_source)
    path = directory / filename
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def settings(app: str = "pf_testapp:app", **more: Any) -> dict[str, Any]:
    """Settings for a server running `app` from apps/ (put on its pythonpath), plus `more`."""
    return {"app": app, "pythonpath": [str(APPS)], **more}


def parse_addresses(log_text: str) -> list[Address]:
    """Addresses from `listening at` lines, in order of first appearance, without repeats."""
    found: list[Address] = []
    for match in LISTENING_RE.finditer(log_text):
        address = parse_address(match.group(1))
        if address not in found:
            found.append(address)
    return found


def parse_address(text: str) -> Address:
    """`http://h:p`, `tcp://h:p`, `http://[::1]:p` or `unix:/path` as an Address tuple."""
    if text.startswith("unix:"):
        return ("unix", text[len("unix:") :])
    scheme, sep, rest = text.partition("://")
    if not sep:
        raise ValueError(f"unrecognised address {text!r}")
    host, _, port = rest.rpartition(":")
    return (scheme, host.strip("[]"), int(port))


# --- client threads --------------------------------------------------------------------------


class ClientThreads:
    """Client threads (`threads`, made by a subclass's __init__ after this one's) that run
    until the `with` block ends; a thread counts each success in `ok` under `lock`, a reused
    connection retried in `retries`, anything else in `failures`."""

    threads: list[threading.Thread]

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.stopping = threading.Event()
        self.ok = 0
        self.retries = 0
        self.failures: list[str] = []

    def __enter__(self: ClientsT) -> ClientsT:
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stopping.set()
        for thread in self.threads:
            thread.join(20)
        assert not any(t.is_alive() for t in self.threads), "a client thread is stuck"

    def completed(self) -> int:
        with self.lock:
            return self.ok

    def wait_for_requests(self, count: int, timeout: float = 10.0) -> None:
        """Wait until `count` more requests succeeded (the server serves right now)."""
        target = self.completed() + count
        wait_until(
            lambda: self.completed() >= target,
            timeout,
            message=f"the load did not reach {target} requests; failures {self.failures[:5]}",
        )


# --- the server process ----------------------------------------------------------------------


class Server:
    """One preforkd master started in `workdir`, in its own session and process group.

    Logs go to `workdir/stdout.log` and `workdir/stderr.log`; the config path is passed as
    `-c CONFIG`, followed by `args`.
    """

    def __init__(
        self,
        workdir: Path,
        config: Path,
        args: Sequence[str] = (),
        *,
        env: Mapping[str, str] | None = None,
        command: Sequence[str] = DEFAULT_COMMAND,
        preexec_fn: Callable[[], None] | None = None,
    ) -> None:
        self.workdir = workdir
        self.preexec_fn = preexec_fn  # runs in the child after setsid(), before exec
        self.config = config
        self.args = list(args)
        self.command = list(command)
        self.extra_env = dict(env or {})
        self.stdout_path = workdir / "stdout.log"
        self.stderr_path = workdir / "stderr.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def __repr__(self) -> str:
        pid = self.proc.pid if self.proc else None
        return f"<Server pid={pid} workdir={str(self.workdir)!r}>"

    # lifecycle

    def start(self) -> Server:
        if self.proc is not None:
            raise RuntimeError(f"{self!r} already started")
        env = dict(os.environ)
        env["PYTHONUNBUFFERED"] = "1"
        # Run the work tree's package even if the venv has another copy installed.
        pythonpath = [str(REPO_ROOT), *filter(None, [env.get("PYTHONPATH")])]
        env["PYTHONPATH"] = os.pathsep.join(pythonpath)
        env.update(self.extra_env)
        argv = [*self.command, "-c", str(self.config), *self.args]
        with open(self.stdout_path, "wb") as out, open(self.stderr_path, "wb") as err:
            self.proc = subprocess.Popen(
                argv,
                cwd=self.workdir,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                start_new_session=True,
                preexec_fn=self.preexec_fn,
            )
        return self

    @property
    def pid(self) -> int:
        """The master's pid, which is also its process group id and session id."""
        if self.proc is None:
            raise RuntimeError(f"{self!r} not started")
        return self.proc.pid

    def running(self) -> bool:
        """Whether the master has not exited (without reaping it)."""
        if self.proc is None or self.proc.returncode is not None:
            return False
        try:
            status = os.waitid(os.P_PID, self.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        except ChildProcessError:
            return False
        return status is None

    def signal(self, sig: int) -> None:
        """Send `sig` to the master only."""
        os.kill(self.pid, sig)

    def wait_exit(self, timeout: float = 10.0) -> int:
        """Wait for the master to exit and return its exit status (-N for signal N)."""
        assert self.proc is not None, f"{self!r} not started"
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(
                f"preforkd did not exit within {timeout:g}s\n{self.log_tail()}"
            ) from None

    def wait_ready(self, timeout: float = 15.0, *, since: int = 0) -> Server:
        """Wait for a `ready: N workers` line; fail with the log tail if it never comes.

        After a reload, pass `since=len(log_before)` to wait for a new one.
        """
        self.wait_for_log(READY_RE, timeout, since=since)
        return self

    def stop(self, timeout: float = 10.0) -> int | None:
        """Teardown: SIGTERM the master, wait up to `timeout`, then SIGKILL the whole group.

        The group is killed even after a clean exit, since workers orphaned by a dead master
        stay in it. Returns the master's exit status (None if it was never started).
        """
        if self.proc is None:
            return None
        if self.running():
            with contextlib.suppress(ProcessLookupError):
                self.signal(signal.SIGTERM)
            deadline = time.monotonic() + timeout
            while self.running() and time.monotonic() < deadline:
                time.sleep(0.02)
        # While the master is unreaped its pid cannot be reused, so the group id is safe to
        # signal; once reaped, only signal a group that still has members.
        if self.proc.returncode is None or group_members(self.pid):
            kill_group(self.pid)
        returncode = self.proc.wait(5)
        wait_until(
            lambda: not live_group_members(self.pid),
            5.0,
            message=f"processes left in group {self.pid}",
        )
        return returncode

    # logs

    def log(self) -> str:
        """Everything the server has written to stderr (its error log) so far."""
        return _read_text(self.stderr_path)

    def stdout(self) -> str:
        """Everything the server has written to stdout (e.g. an access log on "-")."""
        return _read_text(self.stdout_path)

    def log_tail(self, lines: int = 40) -> str:
        tail = "\n".join(self.log().splitlines()[-lines:])
        state = "running" if self.running() else f"exited ({self._returncode()})"
        return f"--- preforkd {state}; last {lines} lines of {self.stderr_path}:\n{tail}"

    def wait_for_log(
        self, pattern: str | re.Pattern[str], timeout: float = 10.0, *, since: int = 0
    ) -> re.Match[str]:
        """Wait until the log (from character offset `since`) contains `pattern`.

        A str is a plain substring, a compiled pattern a regex. Fails at once, with the log
        tail, if the master exits without having written it.
        """
        regex = re.compile(re.escape(pattern)) if isinstance(pattern, str) else pattern
        deadline = time.monotonic() + timeout
        while True:
            exited = not self.running()  # checked before reading: no line can be missed
            match = regex.search(self.log(), since)
            if match:
                return match
            if exited or time.monotonic() >= deadline:
                why = "preforkd exited" if exited else f"timed out after {timeout:g}s"
                raise AssertionError(f"{why} waiting for {regex.pattern!r}\n{self.log_tail()}")
            time.sleep(0.02)

    # addresses

    def addresses(self) -> list[Address]:
        """Bound addresses from the `listening at` lines: (scheme, host, port) or ("unix", path)."""
        return parse_addresses(self.log())

    @property
    def url(self) -> str:
        """`http://host:port` of the first HTTP address."""
        for address in self.addresses():
            if address[0] == "http":
                _, host, port = address
                host = f"[{host}]" if ":" in host else host
                return f"http://{host}:{port}"
        raise AssertionError(f"no http address in the log\n{self.log_tail()}")

    # processes

    def children(self) -> dict[int, str]:
        """Direct children of the master, pid -> psutil status ("sleeping", "zombie", ...)."""
        try:
            children = psutil.Process(self.pid).children()
        except psutil.NoSuchProcess:
            return {}
        statuses: dict[int, str] = {}
        for child in children:
            try:
                statuses[child.pid] = child.status()
            except psutil.NoSuchProcess:
                continue
        return statuses

    def worker_pids(self, *, include_zombies: bool = False) -> list[int]:
        """Sorted pids of the master's children; exited-but-unreaped ones only if asked."""
        return sorted(
            pid for pid, status in self.children().items() if include_zombies or status != "zombie"
        )

    def _returncode(self) -> int | None:
        return None if self.proc is None else self.proc.poll()


def address(server: Server) -> Address:
    """The server's first listening address (AssertionError, with its log, if it has none)."""
    addresses = server.addresses()
    assert addresses, f"no listening address\n{server.log_tail()}"
    return addresses[0]


def log_lines(path: Path) -> list[str]:
    """The complete lines of a log file (a line still being written is left out)."""
    text = path.read_text() if path.exists() else ""
    return text[: text.rfind("\n") + 1].splitlines()


def _read_text(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except FileNotFoundError:
        return ""


def group_members(pgid: int) -> dict[int, str]:
    """Processes in process group `pgid`, pid -> state letter from /proc ("S", "Z", ...)."""
    members: dict[int, str] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        # Fields after the parenthesised command name: state ppid pgrp ...
        fields = stat[stat.rfind(b")") + 2 :].split()
        if len(fields) >= 3 and int(fields[2]) == pgid:
            members[int(entry)] = fields[0].decode()
    return members


def live_group_members(pgid: int) -> list[int]:
    """Members of group `pgid` that are not zombies."""
    return sorted(pid for pid, state in group_members(pgid).items() if state != "Z")


def gone(pid: int) -> bool:
    """True once `pid` has exited (an unreaped zombie counts as exited)."""
    try:
        return os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
    except ChildProcessError:
        pass  # not our child: ask /proc
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except (FileNotFoundError, ProcessLookupError):  # reaped before, or while, reading
        return True
    return stat[stat.rfind(b")") + 2 :].split()[0] == b"Z"


class Datagrams:
    """What a datagram socket (a stand-in syslog daemon) received: `received(pattern)`
    searches the messages so far and, failing that, reads at most one more (0.2 s), so it
    suits wait_until. SysLogHandler's trailing NUL is dropped."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.messages: list[str] = []

    def received(self, pattern: str) -> re.Match[str] | None:
        regex = re.compile(pattern)
        for message in self.messages:
            if match := regex.search(message):
                return match
        self.sock.settimeout(0.2)
        with contextlib.suppress(TimeoutError):
            self.messages.append(self.sock.recv(65536).decode(errors="replace").rstrip("\x00"))
        return None


def kill_group(pgid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signal.SIGKILL)


class ServerFactory:
    """Creates Servers in numbered subdirectories of `base_dir`; `stop_all()` tears them down."""

    def __init__(self, base_dir: Path) -> None:
        self.base_dir = base_dir
        self.servers: list[Server] = []

    def __call__(
        self,
        settings: Mapping[str, Any] | None = None,
        *,
        app_source: str | None = None,
        module: str = "app",
        config_text: str | None = None,
        args: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
        command: Sequence[str] = DEFAULT_COMMAND,
        wait_ready: bool = True,
        ready_timeout: float = 15.0,
        preexec_fn: Callable[[], None] | None = None,
    ) -> Server:
        """Write a config (from `settings`, or `config_text` verbatim) and start a server.

        With `wait_ready` (the default) returns once the server logged `ready:`.
        """
        workdir = self.base_dir / f"server{len(self.servers)}"
        workdir.mkdir(parents=True)
        if config_text is not None:
            if app_source is not None:
                (workdir / f"{module}.py").write_text(app_source)
            config = workdir / CONFIG_NAME
            config.write_text(config_text)
        else:
            config = write_config(workdir, settings or {}, app_source=app_source, module=module)
        server = Server(workdir, config, args, env=env, command=command, preexec_fn=preexec_fn)
        self.servers.append(server)
        server.start()
        if wait_ready:
            server.wait_ready(ready_timeout)
        return server

    def stop_all(self) -> None:
        """Stop every server, even if some stops fail; re-raise the first failure."""
        errors: list[BaseException] = []
        for server in self.servers:
            try:
                server.stop()
            except BaseException as exc:  # keep tearing down the others
                errors.append(exc)
        if errors:
            raise errors[0]


# --- raw sockets and HTTP --------------------------------------------------------------------


@contextlib.contextmanager
def logging_to_datagrams(
    server_factory: ServerFactory, directory: Path, settings: Mapping[str, Any], app_source: str
) -> Iterator[tuple[Server, Datagrams, Path]]:
    """A server of one worker (`settings`, `app_source`) on the unix socket
    DIRECTORY/http.sock, its logs on syslog at DIRECTORY/log.sock, where a datagram socket
    stands in for the daemon: yields the server, that socket's Datagrams and the HTTP
    socket's path once the ready line came through."""
    log_socket = directory / "log.sock"
    http_socket = directory / "http.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as receiver:
        receiver.bind(str(log_socket))
        server = server_factory({
            **settings,
            "bind": [f"unix:{http_socket}"],
            "workers": {"count": 1},
            "logging": {"syslog": {"enabled": True, "address": f"unix:{log_socket}"}},
        }, app_source=app_source, wait_ready=False)
        inbox = Datagrams(receiver)
        wait_until(lambda: inbox.received(r"\[INFO\] ready: 1 worker"), 15,
                   message=f"never ready: {inbox.messages}")
        yield server, inbox, http_socket


def connect(address: Address | str, timeout: float = 5.0) -> socket.socket:
    """Connect to an Address, a (host, port) pair, or a unix socket path."""
    target: str | tuple[str, int]
    if isinstance(address, str):
        family, target = socket.AF_UNIX, address
    elif address[0] == "unix":
        family, target = socket.AF_UNIX, address[1]
    else:
        host, port = address[-2], address[-1]
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        target = (host, port)
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        sock.connect(target)
    except BaseException:
        sock.close()
        raise
    return sock


def recv_until_close(sock: socket.socket, timeout: float = 5.0) -> bytes:
    """Read until the peer closes; AssertionError (with what arrived) after `timeout`."""
    received, closed = recv_within(sock, timeout)
    if not closed:
        raise AssertionError(f"peer did not close within {timeout:g}s; got {received!r}")
    return received


def recv_within(sock: socket.socket, timeout: float) -> tuple[bytes, bool]:
    """Read until the peer closes or `timeout` passes: (what arrived, whether it closed)."""
    deadline = time.monotonic() + timeout
    chunks: list[bytes] = []
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return b"".join(chunks), False
        sock.settimeout(remaining)
        try:
            data = sock.recv(65536)
        except TimeoutError:
            continue
        except ConnectionResetError:
            return b"".join(chunks), True
        if not data:
            return b"".join(chunks), True
        chunks.append(data)


def send_raw(address: Address | str, data: bytes, timeout: float = 5.0) -> bytes:
    """Connect, send `data` as is, and return every byte received until the server closes."""
    with connect(address, timeout) as sock:
        sock.sendall(data)
        return recv_until_close(sock, timeout)


def http_request(
    method: str = "GET",
    target: str = "/",
    headers: Sequence[tuple[str, str]] = (),
    body: bytes = b"",
    *,
    version: str = "HTTP/1.1",
    host: str | None = "localhost",
) -> bytes:
    """Build request bytes: a Host header unless host=None, and Content-Length for a body."""
    lines = [f"{method} {target} {version}"]
    names = {name.lower() for name, _ in headers}
    if host is not None and "host" not in names:
        lines.append(f"Host: {host}")
    lines += [f"{name}: {value}" for name, value in headers]
    if body and "content-length" not in names and "transfer-encoding" not in names:
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


class Response(NamedTuple):
    status: int
    headers: list[tuple[str, str]]
    body: bytes

    def header(self, name: str) -> str | None:
        """The first value of header `name` (case-insensitive), or None."""
        values = self.header_values(name)
        return values[0] if values else None

    def header_values(self, name: str) -> list[str]:
        lowered = name.lower()
        return [value for key, value in self.headers if key.lower() == lowered]


def read_response(sock: socket.socket, *, method: str = "GET") -> Response:
    """Read exactly one HTTP/1.x response from `sock`, leaving any later bytes unread.

    Bodies: none for HEAD, 1xx, 204 and 304; chunked (trailers discarded); Content-Length;
    otherwise until the server closes. Raises EOFError if the connection ends early.
    """
    head = _recv_through(sock, b"\r\n\r\n", "response head")
    status_line, *header_lines = head[:-4].decode("latin-1").split("\r\n")
    parts = status_line.split(" ", 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/") or not parts[1].isdigit():
        raise ValueError(f"malformed status line {status_line!r}")
    status = int(parts[1])
    headers: list[tuple[str, str]] = []
    for line in header_lines:
        name, sep, value = line.partition(":")
        if not sep:
            raise ValueError(f"malformed header line {line!r}")
        headers.append((name, value.strip(" \t")))
    response = Response(status, headers, b"")

    if method.upper() == "HEAD" or status < 200 or status in (204, 304):
        return response
    transfer_encoding = ",".join(response.header_values("Transfer-Encoding"))
    codings = [c.strip().lower() for c in transfer_encoding.split(",") if c.strip()]
    if codings and codings[-1] == "chunked":
        return response._replace(body=_read_chunked(sock))
    length = response.header("Content-Length")
    if length is not None:
        return response._replace(body=_recv_exactly(sock, int(length), "response body"))
    return response._replace(body=recv_until_close(sock, sock.gettimeout() or 5.0))


def _read_chunked(sock: socket.socket) -> bytes:
    body = bytearray()
    while True:
        size_line = _recv_through(sock, b"\r\n", "chunk size")
        size = int(size_line.split(b";", 1)[0].strip(), 16)
        if size == 0:
            # Trailer section: header lines up to an empty line.
            while _recv_through(sock, b"\r\n", "trailer") != b"\r\n":
                pass
            return bytes(body)
        body += _recv_exactly(sock, size, "chunk data")
        if _recv_exactly(sock, 2, "chunk end") != b"\r\n":
            raise ValueError("chunk data not followed by CRLF")


def _recv_exactly(sock: socket.socket, count: int, what: str) -> bytes:
    data = bytearray()
    while len(data) < count:
        chunk = sock.recv(count - len(data))
        if not chunk:
            raise EOFError(f"connection closed in {what}: got {bytes(data)!r} of {count} bytes")
        data += chunk
    return bytes(data)


def _recv_through(sock: socket.socket, terminator: bytes, what: str) -> bytes:
    """Consume bytes up to and including `terminator`, and not one byte more.

    Peeks first, so bytes after the terminator (a pipelined response) stay in the socket.
    """
    data = bytearray()
    while True:
        peeked = sock.recv(65536, socket.MSG_PEEK)
        if not peeked:
            raise EOFError(f"connection closed in {what}: got {bytes(data)!r}")
        start = max(0, len(data) - len(terminator) + 1)
        end = (data + peeked).find(terminator, start)
        if end >= 0:
            data += _recv_exactly(sock, end + len(terminator) - len(data), what)
            return bytes(data)
        data += _recv_exactly(sock, len(peeked), what)


def ask(sock: socket.socket, path: str = "/") -> Response:
    """A GET on a connection kept open (keep-alive); asserts it was answered 200."""
    sock.sendall(http_request("GET", path))
    response = read_response(sock)
    assert response.status == 200, response
    return response


def fetch(
    address: Address | str,
    method: str = "GET",
    target: str = "/",
    headers: Sequence[tuple[str, str]] = (),
    body: bytes = b"",
    timeout: float = 5.0,
) -> Response:
    """One request on a new connection; returns the response and closes the connection."""
    with connect(address, timeout) as sock:
        sock.sendall(http_request(method, target, headers, body))
        return read_response(sock, method=method)


def self_signed_cert(directory: Path) -> tuple[Path, Path]:
    """A self-signed certificate for localhost and 127.0.0.1, and its key (openssl)."""
    openssl = require_tool("openssl")
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(
        [openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
         "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1",
         "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True, timeout=60,
    )
    return cert, key


# --- the migration guides' worked examples ---------------------------------------------------


def guide_block(guide: Path, language: str, after: str) -> str:
    """The first ```LANGUAGE block of the markdown file `guide` after the text `after`."""
    text = guide.read_text()
    start = text.index(after)
    match = re.search(rf"```{language}\n(.*?)```", text[start:], re.DOTALL)
    assert match is not None, f"no {language} block after {after!r} in {guide}"
    return match.group(1)


def example_site(guide: Path, base: Path, name: str, app_source: str,
                 empty_modules: Sequence[str] = ()) -> str:
    """The guide's worked preforkd.yaml (its first yaml block after "The same in") with
    /srv/NAME, /run/NAME and /var/log/NAME moved under `base`, where a stand-in
    myproject.wsgi (`app_source`, and `empty_modules` of myproject beside it) is written,
    readable by www-data, whom the example runs its workers as (skipped without root or
    without that user)."""
    if os.geteuid() != 0:
        pytest.skip("the example runs its workers as www-data: needs root")
    try:
        pwd.getpwnam("www-data")
    except KeyError:
        pytest.skip("no www-data user")
    text = guide_block(guide, "yaml", "The same in")
    for old, new in ((f"/srv/{name}", f"{base}/srv"), (f"/run/{name}", f"{base}/run"),
                     (f"/var/log/{name}", f"{base}/log")):
        text = text.replace(old, new)
    project = base / "srv" / "current" / "myproject"
    project.mkdir(parents=True)
    (base / "run").mkdir()
    (base / "log").mkdir()
    for module in ("__init__", *empty_modules):
        (project / f"{module}.py").write_text("")
    (project / "wsgi.py").write_text(app_source)
    for path in [base, *base.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)
    return text
