"""Logging to syslog: a private rsyslogd (foreground, its own config and socket, nothing
else loaded) receives preforkd's error and access logs; a UDP destination is read by the test
itself. Lines must carry the configured facility and ident and the pid of the process that
logged them (master or worker).
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import pytest

from detached import Daemons, read_pid
from harness import (
    PID_APP,
    Datagrams,
    ServerFactory,
    fetch,
    parse_address,
    parse_addresses,
    wait_until,
    write_config,
)

RSYSLOG_CONF = """\
global(workDirectory="{work}")
module(load="imuxsock" SysSock.Use="off")
input(type="imuxsock" Socket="{socket}" CreatePath="on" RateLimit.Interval="0")
{tcp}
template(name="pftest" type="string"
         string="%syslogfacility-text% %syslogseverity-text% %programname% %procid% %msg%\\n")
*.* action(type="omfile" file="{output}" template="pftest")
"""

ACCESS_RE = re.compile(r'127\.0\.0\.1 - - \[[^]]+\] "GET /(\S*) HTTP/1\.1" 200 ')
# local3 = 19; info = 6
LOCAL3_INFO = 19 * 8 + 6


class Line(NamedTuple):
    facility: str
    severity: str
    program: str
    pid: int
    message: str


TCP_INPUT = """\
module(load="imtcp")
input(type="imtcp" address="127.0.0.1" port="{port}")
"""


class Rsyslog:
    """rsyslogd in the foreground, writing every message it gets to one file; with
    `tcp_port`, it also listens on 127.0.0.1:tcp_port. `stop` and `start` restart it."""

    def __init__(self, directory: Path, rsyslogd: str, tcp_port: int | None = None) -> None:
        self.socket = directory / "log.sock"
        self.output = directory / "messages"
        self.tcp_port = tcp_port
        work = directory / "work"
        work.mkdir()
        self.conf = directory / "rsyslog.conf"
        tcp = TCP_INPUT.format(port=tcp_port) if tcp_port else ""
        self.conf.write_text(
            RSYSLOG_CONF.format(work=work, socket=self.socket, output=self.output, tcp=tcp)
        )
        self.stderr = directory / "rsyslogd.err"
        self.pidfile = directory / "rsyslogd.pid"
        self.rsyslogd = rsyslogd
        self.start()

    def start(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.socket.unlink()
        with open(self.stderr, "ab") as err:
            self.proc = subprocess.Popen(
                [self.rsyslogd, "-n", "-f", str(self.conf), "-i", str(self.pidfile)],
                stdin=subprocess.DEVNULL,
                stdout=err,
                stderr=err,
                start_new_session=True,
            )

        def up() -> bool:
            if self.proc.poll() is not None:
                return True
            if not self.socket.exists():
                return False
            if self.tcp_port is None:
                return True
            with socket.socket() as probe:
                return probe.connect_ex(("127.0.0.1", self.tcp_port)) == 0

        wait_until(up, 10, message="rsyslogd did not open its sockets")
        assert self.proc.poll() is None, f"rsyslogd exited: {self.stderr.read_text()}"

    def lines(self) -> list[Line]:
        try:
            text = self.output.read_text(errors="replace")
        except FileNotFoundError:
            return []
        lines = []
        for raw in text.splitlines():
            fields = raw.split(None, 4)
            if len(fields) == 5 and fields[3].isdigit():
                lines.append(Line(fields[0], fields[1], fields[2], int(fields[3]), fields[4]))
        return lines

    def wait_for(self, predicate: Callable[[Line], bool], what: str, timeout: float = 15) -> Line:
        def found() -> Line | None:
            return next((line for line in self.lines() if predicate(line)), None)

        return wait_until(found, timeout, message=f"no syslog line {what}; got {self.lines()}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)




def settings(address: str, **more: Any) -> dict[str, Any]:
    return {
        "app": "app:application",
        "workers": {"count": 2},
        "logging": {
            "access_log": "-",
            "syslog": {
                "enabled": True,
                "address": address,
                "facility": "local3",
                "ident": "pftest",
            },
        },
        **more,
    }


def test_syslog_over_a_unix_socket(server_factory: ServerFactory, rsyslog: Rsyslog) -> None:
    server = server_factory(
        settings(f"unix:{rsyslog.socket}"),
        app_source=PID_APP,
        env={"PYTHONDONTWRITEBYTECODE": "1"},
        wait_ready=False,
    )
    ready = rsyslog.wait_for(lambda line: "[INFO] ready: 2 workers" in line.message, "ready")
    assert ready.pid == server.pid
    listening = rsyslog.wait_for(lambda line: "listening at" in line.message, "listening")
    address = parse_addresses(listening.message)[0]

    workers = server.worker_pids()
    served = {int(fetch(address, target=f"/r{n}").body) for n in range(6)}
    assert served <= set(workers)
    for n in range(6):
        access = rsyslog.wait_for(
            lambda line, n=n: f'"GET /r{n} HTTP/1.1" 200' in line.message, f"for /r{n}"
        )
        assert access.pid in workers and access.pid != server.pid
        assert access.severity == "info"
        assert ACCESS_RE.search(access.message), access.message

    ours = [line for line in rsyslog.lines() if line.program == "pftest"]
    assert ours and all(line.facility == "local3" for line in ours), ours
    booted = [line for line in ours if re.search(r"worker \d \(pid \d+\) booted", line.message)]
    assert len(booted) == 2 and all(line.pid == server.pid for line in booted)
    # syslog replaces the files: nothing on stderr or stdout.
    assert "ready:" not in server.log()
    assert "GET /r0" not in server.stdout()

    # A worker's error (the reload canary cannot import the app) arrives with its own pid.
    (server.workdir / "app.py").write_text("raise RuntimeError('pftest: broken on purpose')\n")
    server.signal(signal.SIGHUP)
    failed = rsyslog.wait_for(lambda line: "reload failed" in line.message, "reload failed")
    assert failed.pid == server.pid and failed.severity == "err"
    load_error = rsyslog.wait_for(
        lambda line: "cannot load the application" in line.message, "with the load error"
    )
    assert load_error.severity == "err" and load_error.facility == "local3"
    assert load_error.pid not in (server.pid, *workers)
    assert "pftest: broken on purpose" in load_error.message  # the traceback, in one message


def test_syslog_over_udp(server_factory: ServerFactory) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as receiver:
        receiver.bind(("127.0.0.1", 0))
        port = receiver.getsockname()[1]
        server = server_factory(
            settings(f"udp://127.0.0.1:{port}"), app_source=PID_APP, wait_ready=False
        )
        inbox = Datagrams(receiver)
        received, messages = inbox.received, inbox.messages

        ready = wait_until(
            lambda: received(r"^<(\d+)>pftest\[(\d+)\]: \[INFO\] ready: 2 "),
            15,
            message=f"no ready message over UDP: {messages}",
        )
        assert int(ready.group(1)) == LOCAL3_INFO
        assert int(ready.group(2)) == server.pid
        listening = wait_until(lambda: received(r"listening at (\S+)"), 5)
        address = parse_address(listening.group(1))
        body = fetch(address, target="/udp").body
        access = wait_until(
            lambda: received(r'^<(\d+)>pftest\[(\d+)\]: \[INFO\] 127\.0\.0\.1 .*"GET /udp '),
            10,
            message=f"no access line over UDP: {messages}",
        )
        assert int(access.group(1)) == LOCAL3_INFO
        assert int(access.group(2)) == int(body)
        assert int(body) in server.worker_pids()


def test_detached_daemon_logs_to_syslog_by_default(
    rsyslog: Rsyslog, daemons: Daemons, tmp_path: Path
) -> None:
    """daemon: true with error_log "-" and syslog not enabled: the daemon has no terminal,
    so its error log goes to syslog (default ident and facility)."""
    pidfile = tmp_path / "preforkd.pid"
    config = write_config(
        tmp_path,
        {
            "app": "app:application",
            "daemon": True,
            "pidfile": str(pidfile),
            "workers": {"count": 2},
            "logging": {
                "error_log": "-",
                "syslog": {"enabled": False, "address": f"unix:{rsyslog.socket}"},
            },
        },
        app_source=PID_APP,
    )
    daemons.watch(pidfile)
    result = daemons.launch(config)
    assert result.returncode == 0, result.stdout + result.stderr
    pid = read_pid(pidfile)
    assert pid is not None
    ready = rsyslog.wait_for(lambda line: "[INFO] ready: 2 workers" in line.message, "ready")
    assert (ready.program, ready.pid, ready.facility) == ("preforkd", pid, "user")
    rsyslog.wait_for(lambda line: line.message.endswith(f"detached: master pid {pid}"), "detached")

    daemons.stop_all()  # the fixture would too, but the "stopped" line is checked below

    stopped = rsyslog.wait_for(lambda line: line.message.endswith("stopped"), "stopped")
    assert stopped.pid == pid


@pytest.mark.parametrize(
    ("daemon", "enabled", "hint"),
    [(True, False, 'a daemon logs to syslog when logging.error_log is "-"'),
     (False, True, "")],
    ids=["daemon-default", "syslog-enabled"],
)
def test_a_start_whose_syslog_socket_does_not_answer_fails_and_says_so(
    daemons: Daemons, short_tmp: Path, daemon: bool, enabled: bool, hint: str
) -> None:
    """Defect: with no syslog daemon at the socket (a host without /dev/log, or a typo), a
    daemon's default syslog logging started and lost every line; SysLogHandler keeps quiet
    about it. The start now fails before anything is bound, as a reload to it does."""
    missing = short_tmp / "no-syslog.sock"
    pidfile = short_tmp / "preforkd.pid"
    config = write_config(
        short_tmp,
        {
            "app": "app:application",
            "daemon": daemon,
            "pidfile": str(pidfile),
            "bind": [f"unix:{short_tmp / 'http.sock'}"],
            "logging": {"error_log": "-", "syslog": {"enabled": enabled,
                                                     "address": f"unix:{missing}"}},
        },
        app_source=PID_APP,
    )
    daemons.watch(pidfile)
    result = daemons.launch(config)
    output = result.stdout + result.stderr
    assert result.returncode == 1, output
    assert f"cannot open the logs: syslog {missing}: No such file or directory" in output
    assert hint in output
    assert read_pid(pidfile) is None
    assert not (short_tmp / "http.sock").exists(), "a socket was bound before the logs failed"


ERROR_APP = """
import os

def application(environ, start_response):
    if environ["PATH_INFO"] == "/boom":
        raise RuntimeError("pftest: boom on purpose")
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [str(os.getpid()).encode()]
"""


def test_syslog_over_tcp_frames_each_message_and_survives_a_restart(
    server_factory: ServerFactory, require_tool: Any, short_tmp: Path
) -> None:
    """Defect: over tcp:// the standard handler ended each message with a NUL, which rsyslog
    does not take as a frame end: messages ran together and a traceback was cut at its
    newlines. And a connection lost to a restarted log host was never opened again."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    daemon = Rsyslog(short_tmp, require_tool("rsyslogd"), tcp_port=port)
    try:
        server = server_factory(
            settings(f"tcp://127.0.0.1:{port}"), app_source=ERROR_APP, wait_ready=False
        )
        ready = daemon.wait_for(lambda line: "[INFO] ready: 2 workers" in line.message, "ready")
        assert (ready.pid, ready.facility, ready.severity) == (server.pid, "local3", "info")
        listening = daemon.wait_for(lambda line: "listening at" in line.message, "listening")
        address = parse_addresses(listening.message)[0]
        workers = server.worker_pids()
        for n in range(6):
            body = fetch(address, target=f"/t{n}").body
            access = daemon.wait_for(
                lambda line, n=n: f'"GET /t{n} HTTP/1.1" 200' in line.message, f"for /t{n}"
            )
            assert access.pid == int(body) and access.pid in workers
        assert fetch(address, target="/boom").status == 500
        error = daemon.wait_for(lambda line: "Traceback" in line.message, "with the traceback")
        assert "pftest: boom on purpose" in error.message, "the traceback was split"
        assert error.severity == "err" and error.pid in workers
        ours = [line for line in daemon.lines() if line.program == "pftest"]
        # each message is whole and alone: it starts with its level, and no NUL or second
        # header is inside it
        assert all(re.match(r"\[[A-Z]+\] ", line.message) for line in ours), ours
        assert not [line for line in ours if "#000" in line.message or "pftest[" in line.message]

        daemon.stop()
        fetch(address, target="/while-down")
        daemon.start()

        def delivered() -> Line | None:
            fetch(address, target="/after")
            return next(
                (line for line in daemon.lines() if '"GET /after HTTP/1.1"' in line.message), None
            )

        after = wait_until(delivered, 15, message="no access line after rsyslog restarted")
        assert after.pid in workers
        dropped = daemon.wait_for(
            lambda line: "messages were dropped while 127.0.0.1" in line.message, "of drops"
        )
        assert dropped.pid in workers and dropped.severity == "warning"
    finally:
        daemon.stop()


def test_rsyslog_fixture_sees_only_its_socket(rsyslog: Rsyslog) -> None:
    """Guard for the fixture: a message sent by hand arrives parsed as the tests expect."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.connect(str(rsyslog.socket))
        sock.send(b"<158>pfguard[4242]: hello\x00")
    line = rsyslog.wait_for(lambda line: line.program == "pfguard", "from the guard", 10)
    assert line == Line("local3", "info", "pfguard", 4242, "hello")
