"""protocol: tcp against the real server: connections that wait on their client are not
hung workers, TLS and PROXY headers in front of the handler, and connections counted and
logged like requests."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import ssl
import time
from pathlib import Path
from typing import Any

from harness import ServerFactory, connect, fetch, self_signed_cert, wait_until

HANDLERS = """
import os
import time


def echo(sock, addr):
    while True:
        data = sock.recv(65536)
        if not data:
            return
        sock.sendall(data)


def whoami(sock, addr):
    first = sock.recv(100)
    sock.sendall(("%s %s %d " % (addr[0], addr[1], os.getpid())).encode() + first)


def spin(sock, addr):
    sock.recv(100)
    time.sleep(60)  # the handler's own work, not a wait on the client
"""


def tcp_settings(handler: str, **more: Any) -> dict[str, Any]:
    return {
        "app": f"app:{handler}",
        "protocol": "tcp",
        "bind": ["127.0.0.1:0"],
        "workers": {"count": 1, "timeout": 2, "timeout_grace": 0.5},
        **more,
    }


def tcp_address(server: Any, scheme: str = "tcp") -> tuple[str, str, int]:
    found = [a for a in server.addresses() if a[0] == scheme]
    assert found, f"no {scheme}:// address in the log\n{server.log_tail()}"
    return found[0]


def recv_exactly(sock: socket.socket, size: int) -> bytes:
    data = b""
    deadline = time.monotonic() + 10
    while len(data) < size:
        assert time.monotonic() < deadline, f"got {data!r} of {size} bytes"
        chunk = sock.recv(size - len(data))
        assert chunk, f"closed after {data!r}"
        data += chunk
    return data


def test_a_client_idle_past_workers_timeout_keeps_its_connection_and_worker(
    server_factory: ServerFactory,
) -> None:
    """Defect: the whole connection counted as one busy request, so any connection open
    longer than workers.timeout (30 s by default; the shipped echo example with `nc`) had
    its worker killed as hung, with a stack dump."""
    server = server_factory(tcp_settings("echo"), app_source=HANDLERS)
    (worker,) = server.worker_pids()
    with connect(tcp_address(server), timeout=10) as sock:
        sock.sendall(b"one")
        assert recv_exactly(sock, 3) == b"one"
        idle_until = time.monotonic() + 3.5  # past timeout (2) and its grace (0.5)
        while time.monotonic() < idle_until:
            # the worker stays: checked while the client says nothing at all
            assert server.worker_pids() == [worker], server.log_tail()
            time.sleep(0.2)
        sock.sendall(b"two")
        assert recv_exactly(sock, 3) == b"two"
    assert "timed out" not in server.log()


def test_a_handler_stuck_in_its_own_work_is_still_killed_as_hung(
    server_factory: ServerFactory,
) -> None:
    server = server_factory(tcp_settings("spin"), app_source=HANDLERS)
    (worker,) = server.worker_pids()
    with connect(tcp_address(server), timeout=10) as sock:
        sock.sendall(b"go")
        server.wait_for_log(re.compile(r"timed out after \d+\.\ds serving TCP"), timeout=10)
        wait_until(lambda: worker not in server.worker_pids(), 10, message="not killed")


def test_a_client_idle_past_stream_idle_timeout_is_cut_and_logged(
    server_factory: ServerFactory,
) -> None:
    server = server_factory(
        tcp_settings("echo", stream={"idle_timeout": 1}, logging={"access_log": "-"}),
        app_source=HANDLERS,
    )
    (worker,) = server.worker_pids()
    with connect(tcp_address(server), timeout=10) as sock:
        sock.sendall(b"hello")
        assert recv_exactly(sock, 5) == b"hello"
        started = time.monotonic()
        assert sock.recv(10) == b""  # closed by the server
        assert 0.8 < time.monotonic() - started < 5
    server.wait_for_log("the client was idle past stream.idle_timeout", timeout=5)
    line = wait_until(
        lambda: re.search(r'127\.0\.0\.1 - - \[[^]]+\] "TCP 127\.0\.0\.1:\d+ TCP" 408 5 ',
                          server.stdout()),
        5,
        message=f"no access line for the connection: {server.stdout()!r}",
    )
    assert line
    assert server.worker_pids() == [worker]


def test_connections_are_counted_with_their_duration_and_bytes(
    server_factory: ServerFactory, tmp_path: Path
) -> None:
    """Defect: a connection counted as 0 requests, lasted 0 s in the histogram, held no
    connection in the scoreboard while open, and wrote no access-log line."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        admin_port = probe.getsockname()[1]
    admin = ("http", "127.0.0.1", admin_port)
    server = server_factory(
        tcp_settings(
            "echo",
            admin={"bind": f"127.0.0.1:{admin_port}"},
            logging={"access_log": "-", "access_log_format": "json"},
        ),
        app_source=HANDLERS,
    )
    with connect(tcp_address(server), timeout=10) as sock:
        sock.sendall(b"x" * 1000)
        recv_exactly(sock, 1000)
        status = json.loads(fetch(admin, target="/status").body)
        (worker,) = status["workers"]
        assert worker["connections"] == 1 and worker["activity"] == "waiting", worker
        time.sleep(0.3)  # the connection's length is what is measured
    line = wait_until(lambda: server.stdout().strip(), 5, message="no access line")
    record = json.loads(line.splitlines()[0])
    assert (record["method"], record["protocol"], record["status"], record["bytes"]) == (
        "TCP", "TCP", 200, 1000
    )
    assert record["duration_us"] >= 300_000

    def counted() -> dict[str, Any] | None:
        totals: dict[str, Any] = json.loads(fetch(admin, target="/status").body)["totals"]
        return totals if totals["requests"] == 1 else None

    totals = wait_until(counted, 5, message="the connection was not counted")
    assert totals["duration_sum"] >= 0.3, totals
    assert totals["bytes"] == 1000
    metrics = fetch(admin, target="/metrics").body.decode()
    assert 'preforkd_requests_total{class="2xx"} 1' in metrics


def test_a_tls_listener_gives_the_handler_a_tls_stream(
    server_factory: ServerFactory, tmp_path: Path
) -> None:
    """Defect: with protocol tcp a `tls` block was accepted, its certificate loaded, and the
    handler given the raw socket: the "TLS" port served plaintext, and the log said tcp://."""
    cert, key = self_signed_cert(tmp_path)
    server = server_factory(
        tcp_settings(
            "echo",
            bind=[{"address": "127.0.0.1:0", "tls": {"certificate": str(cert), "key": str(key)}}],
        ),
        app_source=HANDLERS,
    )
    _, host, port = tcp_address(server, "tls")
    context = ssl.create_default_context(cafile=str(cert))
    with socket.create_connection((host, port), timeout=10) as raw, \
            context.wrap_socket(raw, server_hostname="localhost") as tls:
        tls.sendall(b"secret")
        assert recv_exactly(tls, 6) == b"secret"
    with socket.create_connection((host, port), timeout=10) as plain:
        plain.sendall(b"plaintext secret\r\n\r\n")
        answer = b""
        with contextlib.suppress(ConnectionError):
            while chunk := plain.recv(100):  # the handshake fails: an alert, then the close
                answer += chunk
        assert b"plaintext" not in answer, "plaintext echoed on a TLS listener"


def test_a_proxy_header_names_the_client_and_leaves_its_bytes_to_the_handler(
    server_factory: ServerFactory, tmp_path: Path
) -> None:
    """Defect: with protocol tcp, http.proxy_protocol was ignored: the PROXY line reached
    the handler as data, and `addr` was the proxy's."""
    server = server_factory(
        tcp_settings("whoami", http={"proxy_protocol": "v1"}), app_source=HANDLERS
    )
    with connect(tcp_address(server), timeout=10) as sock:
        sock.sendall(b"PROXY TCP4 203.0.113.7 127.0.0.1 5555 7000\r\nhello")
        answer = sock.recv(200)
    host, port, pid, first = answer.split(b" ", 3)
    assert (host, port, first) == (b"203.0.113.7", b"5555", b"hello")
    assert int(pid) in server.worker_pids()


def test_a_proxy_header_in_front_of_tls(server_factory: ServerFactory, tmp_path: Path) -> None:
    """TLS passthrough behind HAProxy's send-proxy: the header, then the client's TLS."""
    cert, key = self_signed_cert(tmp_path)
    server = server_factory(
        tcp_settings(
            "whoami",
            http={"proxy_protocol": "v1"},
            bind=[{"address": "127.0.0.1:0", "tls": {"certificate": str(cert), "key": str(key)}}],
        ),
        app_source=HANDLERS,
    )
    _, host, port = tcp_address(server, "tls")
    context = ssl.create_default_context(cafile=str(cert))
    with socket.create_connection((host, port), timeout=10) as raw:
        raw.sendall(b"PROXY TCP6 2001:db8::5 ::1 4444 443\r\n")
        with context.wrap_socket(raw, server_hostname="localhost") as tls:
            tls.sendall(b"hi")
            answer = tls.recv(200)
    assert answer.split(b" ")[:2] == [b"2001:db8::5", b"4444"]


def test_usr2_to_a_worker_does_not_kill_it(server_factory: ServerFactory) -> None:
    """Defect: workers restored USR2's default action, so `kill -USR2 -PGID` (a gunicorn
    habit: binary upgrade) killed every worker at once while the master ignored it."""
    server = server_factory(tcp_settings("echo"), app_source=HANDLERS)
    (worker,) = server.worker_pids()
    os.kill(worker, signal.SIGUSR2)
    with connect(tcp_address(server), timeout=10) as sock:  # still served by the same one
        sock.sendall(b"ping")
        assert recv_exactly(sock, 4) == b"ping"
    assert server.worker_pids() == [worker]
    assert "killed by SIGUSR2" not in server.log()


SESSION = """
def session(sock, addr):
    while True:
        data = sock.recv(65536)
        if not data:
            sock.sendall(b"bye\\n")  # a clean end: only a handler that returns says it
            return
        sock.sendall(data)
"""


def test_eof_on_stop_ends_a_waiting_session_cleanly_at_term(
    server_factory: ServerFactory,
) -> None:
    """stream.eof_on_stop: a handler blocked in recv reads end-of-file when the server
    stops, says goodbye, and the stop takes far less than graceful_timeout (60 s)."""
    server = server_factory(
        tcp_settings("session", workers={"count": 1, "graceful_timeout": 60},
                     stream={"eof_on_stop": True}),
        app_source=SESSION,
    )
    _, host, port = tcp_address(server)
    with socket.create_connection((host, port), timeout=10) as client:
        client.sendall(b"ping")
        assert recv_exactly(client, 4) == b"ping"
        began = time.monotonic()
        server.signal(signal.SIGTERM)
        assert recv_exactly(client, 4) == b"bye\n"
        assert client.recv(10) == b"", "the connection stayed open"
        assert server.wait_exit(15) == 0
        assert time.monotonic() - began < 15
    assert "killing" not in server.log().lower()


def test_without_eof_on_stop_a_session_outlives_the_term(
    server_factory: ServerFactory,
) -> None:
    """The default: the session goes on after TERM until the client ends it."""
    server = server_factory(
        tcp_settings("session", workers={"count": 1, "graceful_timeout": 60}),
        app_source=SESSION,
    )
    _, host, port = tcp_address(server)
    with socket.create_connection((host, port), timeout=10) as client:
        client.sendall(b"ping")
        assert recv_exactly(client, 4) == b"ping"
        server.signal(signal.SIGTERM)
        server.wait_for_log("stopping gracefully")
        client.sendall(b"pong")
        assert recv_exactly(client, 4) == b"pong", "the session was cut at the stop"
        client.shutdown(socket.SHUT_WR)
        assert recv_exactly(client, 4) == b"bye\n"
    assert server.wait_exit(15) == 0


def test_eof_on_stop_at_a_reload_and_the_new_generation_serves(
    server_factory: ServerFactory,
) -> None:
    """A reload stops the old worker once its successor is ready: the session on the old
    worker ends cleanly, and a new connection is served by the new generation."""
    server = server_factory(
        tcp_settings("session", workers={"count": 1}, stream={"eof_on_stop": True}),
        app_source=SESSION,
    )
    _, host, port = tcp_address(server)
    (first,) = server.worker_pids()
    with socket.create_connection((host, port), timeout=10) as client:
        client.sendall(b"ping")
        assert recv_exactly(client, 4) == b"ping"
        server.signal(signal.SIGHUP)
        assert recv_exactly(client, 4) == b"bye\n"
        assert client.recv(10) == b""
    wait_until(lambda: first not in server.worker_pids(), 15, message="the old worker stayed")
    with socket.create_connection((host, port), timeout=10) as client:
        client.sendall(b"again")
        assert recv_exactly(client, 5) == b"again"
