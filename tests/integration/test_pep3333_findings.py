"""PEP 3333 and stream-handler semantics as a Django or Flask user meets them, over real
sockets to a real preforkd.

Each test marked "Defect" failed on the code it was written against; the others pin
behaviour no test checked yet. The WSGI app and the stream handlers are APP and HANDLERS
below (written beside each server's config).
"""

from __future__ import annotations

import json
import os
import re
import socket
import time
from pathlib import Path
from typing import Any

import pytest

from harness import (
    Address,
    Server,
    ServerFactory,
    address,
    connect,
    http_request,
    read_response,
    recv_until_close,
    recv_within,
    wait_until,
)
from test_nginx import NGINX_HOST, connect_from, nginx_factory

__all__ = ["nginx_factory"]  # a fixture, used by name

APP = r'''
import argparse
import asyncio
import json
import os
import sys

NOTES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "notes.log")


def note(text):
    with open(NOTES, "a") as f:
        f.write(text + "\n")


class Noted:
    """An iterable that notes each close() (and each chunk it gives) in NOTES."""

    def __init__(self, name, chunks, fail=None):
        self.name, self.chunks, self.fail = name, chunks, fail

    def __iter__(self):
        for chunk in self.chunks:
            yield chunk
        if self.fail is not None:
            raise self.fail

    def close(self):
        note("close " + self.name)


def parse_args(query):
    # a command-line parser reused in a view: bad input makes it call sys.exit(2)
    parser = argparse.ArgumentParser(prog="report")
    parser.add_argument("--days", type=int, required=True)
    return parser.parse_args(query.split("&") if query else [])


def application(environ, start_response):
    path = environ["PATH_INFO"]
    query = environ["QUERY_STRING"]
    if path == "/pid":
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [str(os.getpid()).encode()]
    if path == "/report":
        args = parse_args(query)
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b"days=%d" % args.days]
    if path == "/cancelled":
        raise asyncio.CancelledError()
    if path == "/interrupted":
        raise KeyboardInterrupt()
    if path == "/cancelled-midway":
        start_response("200 OK", [("Content-Type", "text/plain")])
        return Noted("cancelled-midway", [b"first part"], asyncio.CancelledError())
    if path == "/exit-in-close":
        start_response("200 OK", [("Content-Type", "text/plain")])

        class ExitsOnClose(Noted):
            def close(self):
                super().close()
                sys.exit(0)

        return ExitsOnClose("exit-in-close", [b"whole body"])
    if path == "/failing-with-length":
        start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", "100")])
        return Noted("failing-with-length", [b"x" * 10, b"y" * 10], RuntimeError("midway"))
    if path == "/failing-streamed":
        start_response("200 OK", [("Content-Type", "text/plain")])
        return Noted("failing-streamed", [b"first part"], RuntimeError("midway"))
    if path == "/slow":
        start_response("200 OK", [("Content-Type", "application/octet-stream")])
        return Noted("slow", [b"z" * 65536] * 2000)
    if path == "/input":
        body = environ["wsgi.input"]
        mode, _, size = query.partition("=")
        parts = []
        if mode == "read":
            while True:
                part = body.read(int(size))
                parts.append(part)
                if not part:
                    break
        elif mode == "readline":
            while True:
                part = body.readline(int(size))
                parts.append(part)
                if not part:
                    break
        elif mode == "iter":
            parts = list(body)
        elif mode == "readlines":
            parts = body.readlines(int(size))
            parts.append(body.read())
        start_response("200 OK", [("Content-Type", "application/json")])
        return [json.dumps([p.decode("latin-1") for p in parts]).encode()]
    if path == "/errors":
        errors = environ["wsgi.errors"]
        errors.write("wsgi.errors write\n")
        errors.writelines(["wsgi.errors line 1\n", "wsgi.errors line 2\n"])
        errors.flush()
        start_response("204 No Content", [])
        return []
    if path.startswith("/environ"):
        keep = {k: v for k, v in environ.items() if isinstance(v, (str, bool, tuple))}
        start_response("200 OK", [("Content-Type", "application/json")])
        return [json.dumps(keep).encode()]
    start_response("404 Not Found", [("Content-Type", "text/plain")])
    return [b"not found"]
'''

HANDLERS = r'''
import os
import socket
import sys

BIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "big.bin")


def handler(sock, addr):
    command = sock.recv(100).strip()
    if command == b"pid":
        sock.sendall(str(os.getpid()).encode())
    elif command == b"exit":
        sock.sendall(b"leaving")
        sys.exit(1)
    elif command == b"backend":
        # a backend that accepts and never answers, asked with its own 0.3 s timeout
        with socket.create_server(("127.0.0.1", 0)) as backend:
            with socket.create_connection(backend.getsockname(), timeout=0.3) as upstream:
                upstream.recv(10)
    elif command == b"sendfile":
        with open(BIG, "rb") as f:
            sock.sendfile(f)
    elif command == b"addr":
        sock.sendall(repr(addr).encode())
'''

BIG_SIZE = 16 << 20  # far more than the socket buffers hold


# --- helpers ---------------------------------------------------------------------------------


def wsgi_server(server_factory: ServerFactory, **more: Any) -> Server:
    """One worker: a later request can tell whether the worker that failed is still there."""
    settings: dict[str, Any] = {"app": "app:application", "workers": {"count": 1}, **more}
    return server_factory(settings, app_source=APP)


def tcp_server(server_factory: ServerFactory, **more: Any) -> Server:
    settings: dict[str, Any] = {
        "app": "app:handler",
        "protocol": "tcp",
        "workers": {"count": 1, "timeout": 2, "timeout_grace": 0.5},
        "logging": {"access_log": "-"},
        **more,
    }
    return server_factory(settings, app_source=HANDLERS)


def get(where: Address | str, target: str) -> bytes:
    """GET on a new connection: every byte that arrived until the server closed."""
    with connect(where, timeout=10) as sock:
        sock.sendall(http_request("GET", target, [("Connection", "close")]))
        return recv_until_close(sock, 10)


def status_of(raw: bytes) -> int | None:
    match = re.match(rb"HTTP/1\.1 (\d{3}) ", raw)
    return int(match.group(1)) if match else None


def pid_on(sock: socket.socket) -> int:
    """The worker's pid, asked on a kept-alive connection."""
    sock.sendall(http_request("GET", "/pid"))
    response = read_response(sock)
    assert response.status == 200, response
    return int(response.body)


def notes(server: Server) -> list[str]:
    path = server.workdir / "notes.log"
    return path.read_text().splitlines() if path.exists() else []


def tcp_exchange(server: Server, command: bytes, timeout: float = 10.0) -> bytes:
    where = [a for a in server.addresses() if a[0] == "tcp"][0]
    with connect(where, timeout=timeout) as sock:
        sock.sendall(command + b"\n")
        return recv_until_close(sock, timeout)


def access_line(server: Server, pattern: str) -> re.Match[str]:
    return wait_until(
        lambda: re.search(pattern, server.stdout(), re.MULTILINE),
        5,
        message=f"no access line like {pattern!r}: {server.stdout()!r}",
    )


# --- defect 1: a BaseException out of the application ended the worker --------------------


@pytest.mark.parametrize(
    ("target", "exception"),
    [
        ("/report?--days=soon", "SystemExit: 2"),  # argparse's error() exits
        ("/cancelled", "CancelledError"),
        ("/interrupted", "KeyboardInterrupt"),
    ],
)
def test_a_base_exception_from_the_application_is_a_500_and_the_worker_lives(
    server_factory: ServerFactory, target: str, exception: str
) -> None:
    """Defect: SystemExit (argparse or click given bad input inside a view), KeyboardInterrupt
    and asyncio.CancelledError are BaseExceptions, which Django's and Flask's handlers let
    through, and the worker caught only Exception: the worker died. The client got no
    response at all, every other connection the worker held was cut, no traceback was
    logged for SystemExit, and the master counted a crash ("died 0.1s after booting ...
    next one in 0.5s", then 1, 2, 4 s... and at boot_failure_limit the degraded state): any
    client could empty the pool by repeating one request. gunicorn's sync worker dies the
    same way (and sys.exit(3) halts the whole server, 3 being its boot-error code)."""
    server = wsgi_server(server_factory)
    where = address(server)
    with connect(where, timeout=10) as kept:
        worker = pid_on(kept)  # a keep-alive client of the same worker
        raw = get(where, target)
        assert status_of(raw) == 500, raw
        assert raw.endswith(b"500 Internal Server Error\n")
        assert pid_on(kept) == worker  # its other client is still served, by the same process
    server.wait_for_log(exception)  # with its traceback, as any application error
    assert server.worker_pids() == [worker]
    assert "died" not in server.log()


def test_a_base_exception_after_the_head_cuts_the_response_and_the_worker_lives(
    server_factory: ServerFactory,
) -> None:
    """Defect (as above, once the head is out): the worker died mid-response. Now the
    response is cut as for any exception, chunked without its last chunk so the client
    cannot take it for complete, the iterable is closed once, and the worker goes on."""
    server = wsgi_server(server_factory)
    where = address(server)
    (worker,) = server.worker_pids()
    raw = get(where, "/cancelled-midway")
    assert status_of(raw) == 200, raw
    assert b"Transfer-Encoding: chunked\r\n" in raw
    assert raw.endswith(b"\r\n\r\na\r\nfirst part\r\n"), raw  # no terminating 0-chunk
    wait_until(lambda: notes(server) == ["close cancelled-midway"], 5,
               message=f"close() not called once: {notes(server)}")
    server.wait_for_log("CancelledError")
    raw = get(where, "/pid")
    assert raw.endswith(str(worker).encode()), raw
    assert "died" not in server.log()


def test_sys_exit_in_an_iterables_close_leaves_the_complete_response_and_the_worker(
    server_factory: ServerFactory,
) -> None:
    """Defect (close() is the application's code too): SystemExit from close() ended the
    worker after a complete response; now it is logged, the connection closes, and the
    worker serves on."""
    server = wsgi_server(server_factory)
    where = address(server)
    (worker,) = server.worker_pids()
    raw = get(where, "/exit-in-close")
    assert status_of(raw) == 200 and raw.endswith(b"\r\n\r\na\r\nwhole body\r\n0\r\n\r\n"), raw
    server.wait_for_log("SystemExit: 0")
    assert notes(server) == ["close exit-in-close"]
    raw = get(where, "/pid")
    assert raw.endswith(str(worker).encode()), raw
    assert "retired" not in server.log() and "died" not in server.log()


def test_sys_exit_in_a_stream_handler_is_a_500_and_the_worker_lives(
    server_factory: ServerFactory,
) -> None:
    """Defect: the same for protocol: tcp, whose handler was guarded by `except Exception`
    only: the worker died, with no traceback, and the master counted a crash."""
    server = tcp_server(server_factory)
    (worker,) = server.worker_pids()
    assert tcp_exchange(server, b"exit") == b"leaving"
    server.wait_for_log("SystemExit: 1")
    access_line(server, r'"TCP 127\.0\.0\.1:\d+ TCP" 500 7 ')
    assert tcp_exchange(server, b"pid") == str(worker).encode()
    assert "died" not in server.log()


# --- defect 2: a backend's TimeoutError in a stream handler was taken for an idle client ---


def test_a_backend_timeout_in_a_stream_handler_is_the_handlers_failure(
    server_factory: ServerFactory,
) -> None:
    """Defect: any TimeoutError out of a handler was logged as "the client was idle past
    stream.idle_timeout" (here after 0.3 s, with idle_timeout at 300 s) and counted 408,
    without a traceback: the operator looked for a slow client while a backend was down.
    Now it is the handler's failure: 500 and the traceback. (An idle client still gets 408:
    tests/integration/test_stream.py.)"""
    server = tcp_server(server_factory)
    assert tcp_exchange(server, b"backend") == b""
    server.wait_for_log("stream handler failed for 127.0.0.1")
    server.wait_for_log("TimeoutError")
    access_line(server, r'"TCP 127\.0\.0\.1:\d+ TCP" 500 - ')
    assert "idle past stream.idle_timeout" not in server.log()


# --- defect 3: socket.sendfile in a stream handler ------------------------------------------


def test_socket_sendfile_to_a_slow_client_is_waiting_not_a_hung_worker(
    server_factory: ServerFactory,
) -> None:
    """Defect: socket.sendfile waits on the client inside os.sendfile and its own selector,
    never through the socket's send(), so the slot said BUSY all along: a client reading a
    big file slowly had its worker killed as hung at workers.timeout (here 2 s) and the
    download cut; and the bytes it sent were never counted (the access log said "-")."""
    server = tcp_server(server_factory)
    with open(server.workdir / "big.bin", "wb") as f:
        f.truncate(BIG_SIZE)
    (worker,) = server.worker_pids()
    where = [a for a in server.addresses() if a[0] == "tcp"][0]
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # the server blocks soon
        sock.settimeout(10)
        sock.connect((where[1], where[2]))
        sock.sendall(b"sendfile\n")
        assert sock.recv(4096)
        paused_until = time.monotonic() + 3.5  # past workers.timeout (2) and its grace (0.5)
        while time.monotonic() < paused_until:  # the client takes nothing meanwhile
            assert server.worker_pids() == [worker], server.log_tail()
            time.sleep(0.2)
        received, closed = recv_within(sock, 20)
    assert closed and len(received) > BIG_SIZE - 100_000, len(received)
    access_line(server, rf'"TCP 127\.0\.0\.1:\d+ TCP" 200 {BIG_SIZE} ')
    assert "timed out" not in server.log()
    assert server.worker_pids() == [worker]


# --- defect 4: a close-delimited body cut short ended in a clean FIN -----------------------


def read_to_end(sock: socket.socket, timeout: float = 10.0) -> tuple[bytes, str]:
    """Everything the server sends, and how the stream ended: "eof" (a FIN) or "reset"."""
    sock.settimeout(timeout)
    data = b""
    while True:
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            return data, "reset"
        if not chunk:
            return data, "eof"
        data += chunk


def test_a_close_delimited_body_cut_by_an_error_ends_in_a_reset(
    server_factory: ServerFactory,
) -> None:
    """Defect: for an HTTP/1.0 request a body without Content-Length is delimited by the
    close alone. When the application failed midway, the worker closed with a FIN, which
    says exactly "the body is complete": the client took the first part for the whole
    response. Now the close is a reset, as the client's only sign that the body is short.
    (gunicorn shuts the socket down cleanly here too.) A complete one still ends in a FIN."""
    server = wsgi_server(server_factory)
    with connect(address(server), timeout=10) as sock:
        sock.sendall(http_request("GET", "/failing-streamed", version="HTTP/1.0"))
        data, end = read_to_end(sock)
    assert data.startswith(b"HTTP/1.1 200 OK\r\n") and b"Content-Length" not in data, data
    assert data.endswith(b"\r\n\r\nfirst part"), data
    assert end == "reset"
    server.wait_for_log("RuntimeError: midway")
    with connect(address(server), timeout=10) as sock:
        sock.sendall(http_request("GET", "/cancelled-midway", version="HTTP/1.0"))
        assert read_to_end(sock)[1] == "reset"  # a BaseException too
    with connect(address(server), timeout=10) as sock:
        sock.sendall(http_request("GET", "/exit-in-close", version="HTTP/1.0"))
        data, end = read_to_end(sock)
    assert data.endswith(b"\r\n\r\nwhole body") and end == "eof"  # complete: a clean end


def test_behind_nginx_defaults_a_body_cut_by_an_error_is_not_passed_on_as_complete(
    server_factory: ServerFactory, nginx_factory: Any
) -> None:
    """Defect, as users meet it: nginx speaks HTTP/1.0 to its upstreams by default
    (proxy_http_version 1.0), so every streamed response comes to it close-delimited. After
    the clean FIN it ended the response to the browser normally, with the last chunk: a
    response cut by an application error arrived as a complete, valid 200 (curl exits 0).
    Now nginx sees the reset, logs the upstream error and cuts its own response (no last
    chunk)."""
    server = wsgi_server(server_factory)
    _, host, port = address(server)
    proxy = nginx_factory(
        http_conf=f"""
    server {{
        listen {NGINX_HOST}:{{port}};
        location / {{ proxy_pass http://{host}:{port}; }}
    }}
""",
    )
    with connect_from("127.0.0.3", proxy.port, timeout=10) as sock:
        sock.sendall(http_request("GET", "/failing-streamed"))
        data, _ = read_to_end(sock)
    assert data.startswith(b"HTTP/1.1 200 OK\r\n"), f"{data!r}\n{proxy.log()}"
    assert b"Transfer-Encoding: chunked\r\n" in data
    assert not data.endswith(b"\r\n0\r\n\r\n"), f"nginx ended it as complete: {data!r}"


# --- pinned behaviour (not defects) ---------------------------------------------------------


def test_a_failure_after_the_head_leaves_a_short_body_under_its_content_length(
    server_factory: ServerFactory,
) -> None:
    """Pinned: with the application's Content-Length, a failure midway closes the connection
    before that length is reached, so the client sees a truncated response, never a valid
    shorter one; close() is called once."""
    server = wsgi_server(server_factory)
    with connect(address(server), timeout=10) as sock:
        sock.sendall(http_request("GET", "/failing-with-length"))
        raw = recv_until_close(sock, 10)
    head, _, body = raw.partition(b"\r\n\r\n")
    assert b"Content-Length: 100\r\n" in head
    assert body == b"x" * 10 + b"y" * 10  # what the application gave, then the close
    wait_until(lambda: notes(server) == ["close failing-with-length"], 5,
               message=f"close() not called once: {notes(server)}")


def test_close_is_called_once_when_the_client_goes_away_midway(
    server_factory: ServerFactory,
) -> None:
    """Pinned: a client that leaves in the middle of a long body gets the iterable closed,
    once, and the worker goes on."""
    server = wsgi_server(server_factory)
    (worker,) = server.worker_pids()
    with connect(address(server), timeout=10) as sock:
        sock.sendall(http_request("GET", "/slow"))
        assert sock.recv(65536).startswith(b"HTTP/1.1 200 OK\r\n")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    wait_until(lambda: notes(server) == ["close slow"], 10,
               message=f"close() not called once: {notes(server)}")
    raw = get(address(server), "/pid")
    assert raw.endswith(str(worker).encode())


CHUNKED_BODY = (
    b"3\r\nlin\r\n"
    b"5\r\ne1\nli\r\n"
    b"10\r\nne2 longer\n\nlast\r\n"
    b"0\r\n\r\n"
)


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        ("read=4", ["line", "1\nli", "ne2 ", "long", "er\n\n", "last", ""]),
        ("readline=3", ["lin", "e1\n", "lin", "e2 ", "lon", "ger", "\n", "\n", "las", "t", ""]),
        ("iter=", ["line1\n", "line2 longer\n", "\n", "last"]),
        ("readlines=7", ["line1\n", "line2 longer\n", "\nlast"]),
    ],
)
def test_wsgi_input_over_a_chunked_body_reads_across_chunk_boundaries(
    server_factory: ServerFactory, query: str, expected: list[str]
) -> None:
    """Pinned: read(n), readline(n), iteration and readlines(hint) of wsgi.input over a
    chunked body whose lines and reads straddle its chunks, as over a plain bytes stream;
    the end is b"" (wsgi.input_terminated)."""
    server = wsgi_server(server_factory)
    with connect(address(server), timeout=10) as sock:
        sock.sendall(
            http_request(
                "POST", f"/input?{query}", [("Transfer-Encoding", "chunked")], CHUNKED_BODY
            )
        )
        response = read_response(sock)
    assert response.status == 200, response
    assert json.loads(response.body) == expected


def test_wsgi_errors_goes_to_the_error_log(server_factory: ServerFactory) -> None:
    """Pinned: write, writelines and flush on wsgi.errors land in the error log, whole and
    in order."""
    server = wsgi_server(server_factory)
    with connect(address(server), timeout=10) as sock:
        sock.sendall(http_request("GET", "/errors"))
        assert read_response(sock).status == 204
    server.wait_for_log("wsgi.errors write\nwsgi.errors line 1\nwsgi.errors line 2\n")


def test_environ_paths_headers_and_unix_peers(
    server_factory: ServerFactory, short_tmp: Path
) -> None:
    """Pinned: PATH_INFO percent-decoded (%2F included) and read as latin-1, QUERY_STRING
    and RAW_URI as sent; a header with "_" dropped while its "-" twin is kept (no spoofing
    of a proxy's header), repeats joined with ", " (cookies with "; "), CONTENT_TYPE and
    CONTENT_LENGTH without HTTP_; on a unix socket REMOTE_ADDR is empty and SERVER_NAME and
    SERVER_PORT come from Host."""
    sock_path = short_tmp / "s.sock"
    server = wsgi_server(server_factory, bind=["127.0.0.1:0", f"unix:{sock_path}"])
    tcp = [a for a in server.addresses() if a[0] == "http"][0]
    headers = [
        ("X-Real-IP", "10.0.0.1"),
        ("X-Real_IP", "6.6.6.6"),
        ("Accept", "text/html"),
        ("Accept", "*/*"),
        ("Cookie", "a=1"),
        ("Cookie", "b=2"),
        ("Content-Type", "text/plain"),
        ("Connection", "close"),
    ]
    target = "/environ/a%2Fb/caf%C3%A9?q=%2F&x=%C3%A9+y"
    with connect(tcp, timeout=10) as sock:
        sock.sendall(http_request("POST", target, headers, b"hi"))
        env = json.loads(read_response(sock).body)
    assert env["PATH_INFO"] == "/environ/a/b/caf\u00c3\u00a9"  # UTF-8 bytes as latin-1
    assert env["QUERY_STRING"] == "q=%2F&x=%C3%A9+y"
    assert env["RAW_URI"] == target
    assert env["SCRIPT_NAME"] == ""
    assert env["HTTP_X_REAL_IP"] == "10.0.0.1"
    assert env["HTTP_ACCEPT"] == "text/html, */*"
    assert env["HTTP_COOKIE"] == "a=1; b=2"
    assert (env["CONTENT_TYPE"], env["CONTENT_LENGTH"]) == ("text/plain", "2")
    assert "HTTP_CONTENT_TYPE" not in env and "HTTP_CONTENT_LENGTH" not in env
    assert env["REMOTE_ADDR"] == "127.0.0.1" and env["REMOTE_PORT"].isdigit()
    assert (env["wsgi.multithread"], env["wsgi.multiprocess"], env["wsgi.run_once"]) == (
        False, True, False
    )
    assert env["wsgi.input_terminated"] is True
    with connect(str(sock_path), timeout=10) as sock:
        sock.sendall(http_request("GET", "/environ", [("Connection", "close")],
                                  host="example.com:8080"))
        env = json.loads(read_response(sock).body)
    assert (env["REMOTE_ADDR"], env["SERVER_NAME"], env["SERVER_PORT"]) == (
        "", "example.com", "8080"
    )


def test_a_stream_handler_on_a_unix_socket_gets_an_empty_address(
    server_factory: ServerFactory, short_tmp: Path
) -> None:
    """Pinned: on a unix socket the handler's addr is what accept() gives there (""), and
    the connection is logged with "-" for its address."""
    sock_path = short_tmp / "t.sock"
    server = tcp_server(server_factory, bind=[f"unix:{sock_path}"])
    with connect(str(sock_path), timeout=10) as sock:
        sock.sendall(b"addr\n")
        assert recv_until_close(sock, 10) == b"''"
    access_line(server, r'^- - - \[[^]]+\] "TCP unix:\S+ TCP" 200 2 ')
    assert os.path.exists(sock_path)
