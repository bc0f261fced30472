"""Regression tests for defects fixed after the code review, against a real preforkd.

Each test names the defect it guards against. The apps are apps/pf_regress_app.py and
apps/pf_regress_slowimport.py (about a second to import, so a reload's canary boots slowly).
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import re
import signal
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import psutil
import yaml

import harness
from detached import Daemons, launch_daemon, preforkd, read_pid
from harness import (
    Address,
    ServerFactory,
    connect,
    fetch,
    http_request,
    parse_addresses,
    read_response,
    recv_until_close,
    recv_within,
    wait_until,
)

APP = "pf_regress_app:app"
SLOW_IMPORT_APP = "pf_regress_slowimport:app"
RELOADED_RE = re.compile(r"\[INFO\] reloaded: generation \d+ serving")
T = TypeVar("T")


def settings(app: str = APP, **more: Any) -> dict[str, Any]:
    return harness.settings(app, **more)


def rewrite(config: Path, change: Callable[[dict[str, Any]], None]) -> None:
    data = yaml.safe_load(config.read_text())
    change(data)
    config.write_text(yaml.safe_dump(data, sort_keys=False))


def stays_the_same(read: Callable[[], T], seconds: float, what: str) -> T:
    """Read a value every 0.05 s for `seconds`; fail at the first change."""
    first = read()
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        time.sleep(0.05)
        now = read()
        assert now == first, f"{what} changed: {first!r} -> {now!r}"
    return first


def serves(where: Address | str, times: int, pids: set[int]) -> None:
    """`times` requests on new connections all answered 200 by one of `pids`."""
    for _ in range(times):
        response = fetch(where)
        assert response.status == 200, response
        assert int(response.body) in pids, (response.body, pids)


def report(
    where: Address, headers: Sequence[tuple[str, str]] = (), body: bytes = b"", method: str = "GET"
) -> dict[str, Any]:
    with connect(where) as sock:
        sock.sendall(http_request(method, "/report", headers) + body)
        response = read_response(sock)
    assert response.status == 200, response
    return json.loads(response.body)  # type: ignore[no-any-return]


# --- 1: a second HUP during a reload ---------------------------------------------------------


def test_a_second_hup_during_a_reload_keeps_the_sockets_the_new_generation_reuses(
    server_factory: ServerFactory, short_tmp: Path
) -> None:
    """Defect: the second HUP abandoned the pending generation and closed the sockets it had
    bound, although the newest generation reused them; its workers failed in epoll and
    crash-looped."""
    server = server_factory(settings(SLOW_IMPORT_APP, workers={"count": 2}))
    tcp = harness.address(server)
    sock_path = short_tmp / "r.sock"
    rewrite(server.config, lambda d: d.update(bind=["127.0.0.1:0", f"unix:{sock_path}"]))

    since = len(server.log())
    server.signal(signal.SIGHUP)
    time.sleep(0.3)  # the first canary is still importing the app (about 1 s)
    server.signal(signal.SIGHUP)
    server.wait_for_log(RELOADED_RE, timeout=20, since=since)
    log = server.log()[since:]
    assert log.count("HUP: reloading") == 2, server.log_tail()

    def two_workers() -> set[int]:
        pids = set(server.worker_pids())
        return pids if len(pids) == 2 else set()

    workers = wait_until(two_workers, 10, message="the old workers did not exit")
    serves(tcp, 10, workers)
    serves(str(sock_path), 10, workers)
    stays_the_same(lambda: server.worker_pids(), 2.0, "the worker pids")
    log = server.log()[since:]
    assert "died" not in log, server.log_tail()
    assert "epoll" not in log, server.log_tail()
    assert "Traceback" not in log, server.log_tail()


# --- 2: daemon mode, then a reload that adds a socket ----------------------------------------


def answer(where: Address | str) -> int | str:
    """The status of GET / on a new connection, or what went wrong (within 3 s)."""
    try:
        return fetch(where, timeout=3).status
    except (OSError, EOFError) as exc:
        return repr(exc)


def test_a_daemon_reload_that_adds_a_unix_socket_serves_on_both(
    daemons: Daemons, tmp_path: Path, short_tmp: Path
) -> None:
    """Defect: workers closed the fd number of the daemon's (long gone) ready pipe, which by
    then belonged to the socket the reload had bound: the new workers died in a loop."""
    config, master = launch_daemon(daemons, tmp_path, workers={"count": 2})
    error_log = tmp_path / "error.log"
    (tcp,) = parse_addresses(error_log.read_text())

    sock_path = short_tmp / "d.sock"
    rewrite(config, lambda d: d.update(bind=["127.0.0.1:0", f"unix:{sock_path}"]))
    result = preforkd("reload", "-c", str(config), "--wait", "30")
    assert result.returncode == 0, result.stdout + result.stderr + error_log.read_text()
    assert "reloaded: generation 2" in result.stdout

    booted = stays_the_same(
        lambda: error_log.read_text().count(" booted"), 2.0, "the number of booted workers"
    )
    assert booted == 4, error_log.read_text()  # two at startup, two for generation 2
    log = error_log.read_text()
    assert "died" not in log and "epoll" not in log, log
    for where in (tcp, str(sock_path)):
        for _ in range(5):
            assert answer(where) == 200, f"{where}: no answer\n{error_log.read_text()}"
    assert read_pid(tmp_path / "preforkd.pid") == master


def test_the_daemon_does_not_keep_the_launchers_stdout_and_stderr_open(
    daemons: Daemons, tmp_path: Path
) -> None:
    """Defect (found while writing these tests): the daemon kept every fd open at detach
    time, the launcher's duplicate of its stderr included, so `$(preforkd --daemon)` or a
    subprocess reading the launcher's output waited until the daemon exited."""
    _, master = launch_daemon(daemons, tmp_path, workers={"count": 1})
    launcher_files = {str(tmp_path / "launcher.out"), str(tmp_path / "launcher.err")}
    held = {}
    for pid in [master, *(c.pid for c in psutil.Process(master).children())]:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            with contextlib.suppress(OSError):
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
                if target in launcher_files:
                    held[(pid, int(fd))] = target
    assert held == {}, f"(pid, fd) -> the launcher's output files: {held}"


# --- 5: a slow client and the unread-body drain ----------------------------------------------


def test_a_trickled_unread_body_does_not_pin_the_only_worker(
    server_factory: ServerFactory,
) -> None:
    """Defect: the worker drained an unread body waiting body_timeout per piece, so one byte
    every 0.5 s held the only worker for as long as the client liked."""
    server = server_factory(settings(workers={"count": 1, "timeout": 5}))
    where = harness.address(server)
    stop = threading.Event()
    slow = connect(where, timeout=10)

    def trickle() -> None:
        """One byte of the body every 0.5 s until stopped or the server closes."""
        with contextlib.suppress(OSError):
            while not stop.wait(0.5):
                slow.send(b"x")

    thread = threading.Thread(target=trickle, daemon=True)
    try:
        slow.sendall(
            b"POST /noread HTTP/1.1\r\nHost: x\r\nContent-Length: 60000\r\n\r\n"
        )
        first = read_response(slow)
        assert first.status == 200 and first.body == b"not read"
        thread.start()  # the worker is now draining the body it did not read

        started = time.monotonic()
        response = fetch(where, timeout=5)
        elapsed = time.monotonic() - started
        assert response.status == 200
        assert elapsed < 2.0, f"the second client waited {elapsed:.2f}s"

        rest, closed = recv_within(slow, 5.0)
        assert closed, "the server kept the trickling connection open"
        assert rest == b""
    finally:
        stop.set()
        if thread.is_alive():
            thread.join(5)
        slow.close()


# --- 6: a leading empty line on its own ------------------------------------------------------


def test_a_lone_leading_crlf_then_a_request_is_answered(server_factory: ServerFactory) -> None:
    """Defect: a connection whose first bytes were just CRLF was closed instead of parked."""
    server = server_factory(settings(workers={"count": 1}))
    with connect(harness.address(server)) as sock:
        sock.sendall(b"\r\n")
        time.sleep(0.2)  # the CRLF arrives (and is read) on its own
        sock.sendall(http_request("GET", "/"))
        response = read_response(sock)
    assert response.status == 200
    assert response.body.isdigit()


# --- 7: a chunked body read to EOF -----------------------------------------------------------


def test_a_chunked_body_is_readable_to_eof(server_factory: ServerFactory) -> None:
    """Defect: no wsgi.input_terminated, so a framework that reads to EOF only when told the
    input ends saw no body for a chunked request."""
    server = server_factory(settings(workers={"count": 1}))
    body = b"5\r\nhello\r\n7\r\n, world\r\n1\r\n!\r\n0\r\n\r\n"
    seen = report(
        harness.address(server), [("Transfer-Encoding", "chunked")], body, method="POST"
    )
    assert seen["input_terminated"] is True
    assert seen["CONTENT_LENGTH"] is None
    assert seen["body"] == "hello, world!"


# --- 8: a declared length the app does not fill ----------------------------------------------


def test_a_short_body_with_a_declared_length_closes_the_connection(
    server_factory: ServerFactory,
) -> None:
    """Defect: `Content-Length: 10` with no body was sent keep-alive, so the client read the
    next response's bytes as this body."""
    server = server_factory(settings(workers={"count": 1}))
    with connect(harness.address(server)) as sock:
        sock.sendall(http_request("GET", "/short") + http_request("GET", "/"))
        received = recv_until_close(sock)
    head, _, after = received.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    assert lines[0] == b"HTTP/1.1 200 OK", received
    assert b"connection: close" in [line.lower() for line in lines], received
    assert b"content-length: 10" in [line.lower() for line in lines], received
    assert after == b"", f"bytes after the head: {after!r}"
    assert received.count(b"HTTP/1.1") == 1, received


# --- 9: USR1 when the log file cannot be reopened --------------------------------------------


def test_usr1_with_the_log_directory_gone_keeps_serving(
    server_factory: ServerFactory, tmp_path: Path
) -> None:
    """Defect: USR1 could not open the error log (its directory was gone) and the exception
    took the master down."""
    logs = tmp_path / "logs"
    logs.mkdir()
    server = server_factory(
        settings(workers={"count": 1}, logging={"error_log": str(logs / "error.log")}),
        wait_ready=False,
    )
    error_log = logs / "error.log"
    wait_until(
        lambda: "ready: 1 worker" in error_log.read_text() if error_log.exists() else False,
        15,
        message=f"not ready; stderr: {server.log()}",
    )
    (where,) = parse_addresses(error_log.read_text())
    moved = tmp_path / "logs.rotated"
    logs.rename(moved)

    server.signal(signal.SIGUSR1)

    old_log = moved / "error.log"
    wait_until(
        lambda: "cannot reopen the log files" in old_log.read_text(),
        10,
        message=f"no error about the log files in {old_log}",
    )
    assert server.running(), old_log.read_text()
    for _ in range(3):
        assert fetch(where).status == 200
    assert server.running()
    assert not logs.exists()


# --- 10: X-Forwarded-* versus Forwarded ------------------------------------------------------


def test_only_the_configured_forwarding_header_family_is_believed(
    server_factory: ServerFactory,
) -> None:
    """Defect: a client could add `Forwarded` behind a proxy that sets X-Forwarded-For and
    choose its own address and scheme."""
    headers = [("X-Forwarded-For", "203.0.113.7"), ("Forwarded", "for=6.6.6.6;proto=https")]
    x_forwarded = server_factory(settings(workers={"count": 1}))
    rfc7239 = server_factory(settings(workers={"count": 1}, http={"forwarded_header": "forwarded"}))

    seen = report(harness.address(x_forwarded), headers)
    assert (seen["REMOTE_ADDR"], seen["scheme"]) == ("203.0.113.7", "http")

    seen = report(harness.address(rfc7239), headers)
    assert (seen["REMOTE_ADDR"], seen["scheme"]) == ("6.6.6.6", "https")


# --- 11: /status and query strings -----------------------------------------------------------


def test_status_shows_a_busy_workers_path_without_its_query(
    server_factory: ServerFactory, short_tmp: Path
) -> None:
    """Defect: /status showed the whole request target, tokens in the query string included."""
    admin = short_tmp / "admin.sock"
    server = server_factory(settings(workers={"count": 1}, admin={"socket": str(admin)}))
    with connect(harness.address(server), timeout=10) as sock:
        sock.sendall(http_request("GET", "/sleep?s=2&token=secret"))
        server.wait_for_log("pf_regress: sleeping", timeout=10)

        response = fetch(str(admin), target="/status")
        assert response.status == 200, response
        text = response.body.decode()
        assert "secret" not in text and "token" not in text, text
        current = [w["current"] for w in json.loads(text)["workers"] if w["current"]]
        assert current and current[0]["target"] == "/sleep", text
        assert current[0]["method"] == "GET"

        assert read_response(sock).status == 200


def test_a_reused_connection_loses_no_request_after_an_unread_upload(
    server_factory: ServerFactory,
) -> None:
    """Defect: an app that answered a 3 MB upload without reading it got a response that
    did not say Connection: close, and the server closed the connection after it; a client
    reusing the connection (http.client here, nginx's upstream keep-alive in production)
    lost its next request (RemoteDisconnected)."""
    server = server_factory(harness.settings(app="pf_testapp:app"))
    host, port = server.addresses()[0][-2:]
    client = http.client.HTTPConnection(str(host), int(port), timeout=10)
    try:
        for _ in range(3):
            client.request("POST", "/", body=b"x" * 3_000_000)
            upload = client.getresponse()
            assert upload.status == 200 and upload.getheader("Connection") == "close"
            upload.read()
            client.request("GET", "/")  # the connection was closed: http.client opens another
            answer = client.getresponse()
            assert answer.status == 200 and answer.getheader("Connection") is None
            answer.read()
    finally:
        client.close()


BIG_APP = '''
def app(environ, start_response):
    start_response("200 OK", [("Content-Type", "application/octet-stream")])
    return (b"x" * 65536 for _ in range(2000))  # 128 MiB: more than any socket buffer holds
'''


def test_a_response_cut_short_by_the_client_is_in_the_access_log(
    server_factory: ServerFactory,
) -> None:
    """Defect: a response the client stopped reading (it closed the connection) left no
    access-log line, though the metrics counted it."""
    server = server_factory(
        harness.settings(app="app:app", logging={"access_log": "-"}), app_source=BIG_APP,
    )
    with connect(server.addresses()[0], timeout=10) as sock:
        sock.sendall(http_request("GET", "/big"))
        assert sock.recv(4096).startswith(b"HTTP/1.1 200 OK")
    wait_until(lambda: '"GET /big HTTP/1.1" 200 ' in server.stdout(), 15,
               message="no access-log line for the response cut short")
