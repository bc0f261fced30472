"""Sockets handed over by systemd: the real `systemd-socket-activate` binds, preforkd adopts.

The activator listens on a unix socket (no port to guess), waits for the first connection,
then execs preforkd with LISTEN_FDS/LISTEN_PID set; curl is the client.
"""

from __future__ import annotations

import socket
import ssl
import subprocess
import sys
from pathlib import Path
from typing import Any

from harness import connect, read_response, self_signed_cert, wait_until

APP = """
import os

def application(environ, start_response):
    body = ("%s %s" % (os.getpid(), environ["PATH_INFO"])).encode()
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [body]
"""


def _activated(server_factory: Any, require_tool: Any, sock_path: Path, **settings: Any) -> Any:
    activator = require_tool("systemd-socket-activate")
    command = (activator, "-l", str(sock_path), sys.executable, "-m", "prefork")
    server = server_factory(
        {
            "app": "app:application",
            # never bound: the activator's socket is used instead
            "bind": ["127.0.0.1:1"],
            "workers": {"count": 2},
            **settings,
        },
        app_source=APP,
        command=command,
        wait_ready=False,
    )
    wait_until(sock_path.exists, 10, message="the activator did not create its socket")
    return server


def test_socket_activation_serves_on_the_inherited_socket(
    server_factory: Any, require_tool: Any, short_tmp: Path
) -> None:
    curl = require_tool("curl")
    sock_path = short_tmp / "http.sock"
    server = _activated(server_factory, require_tool, sock_path)
    # The first connection makes the activator exec preforkd; it waits in the socket's
    # backlog until a worker accepts it.
    result = subprocess.run(
        [curl, "-sS", "--max-time", "15", "--unix-socket", str(sock_path), "http://x/first"],
        capture_output=True,
        timeout=20,
    )
    assert result.returncode == 0, result.stderr
    pid_text, path = result.stdout.decode().split()
    assert path == "/first"
    server.wait_ready(10)
    log = server.log()
    assert "using 1 socket(s) passed by systemd" in log
    assert f"listening at unix:{sock_path}" in log
    assert "127.0.0.1:1" not in log  # the configured bind was not used
    worker_pids = set(server.worker_pids())
    assert int(pid_text) in worker_pids
    # The master (exec'd in place of the activator, same pid) holds the socket.
    assert server.running()


def test_socket_activation_socket_survives_stop(
    server_factory: Any, require_tool: Any, short_tmp: Path
) -> None:
    """A socket passed by systemd belongs to systemd: preforkd must not unlink it."""
    sock_path = short_tmp / "http.sock"
    server = _activated(server_factory, require_tool, sock_path)
    with connect(str(sock_path), timeout=15) as sock:
        sock.sendall(b"GET /x HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        status, _, body = read_response(sock)
    assert status == 200 and body.endswith(b"/x")
    server.wait_ready(10)
    server.signal(15)
    assert server.wait_exit(15) == 0
    assert sock_path.exists(), "preforkd removed a socket file it did not create"


def _activated_tcp(
    server_factory: Any, require_tool: Any, bind: list[Any]
) -> tuple[Any, int]:
    """preforkd started by `systemd-socket-activate -l 127.0.0.1:PORT`, configured with
    `bind`; returns the server and PORT once the activator listens."""
    activator = require_tool("systemd-socket-activate")
    with socket.socket() as probe:  # a free port for the activator
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = (activator, "-l", f"127.0.0.1:{port}", sys.executable, "-m", "prefork")
    settings = {"app": "app:application", "bind": [
        {**b, "address": b["address"].format(port=port)} for b in bind
    ], "workers": {"count": 1}}
    server = server_factory(settings, app_source=APP, command=command, wait_ready=False)

    def listening() -> bool:
        with socket.socket() as sock:
            return sock.connect_ex(("127.0.0.1", port)) == 0 or not server.running()

    # the connect itself is what makes the activator exec preforkd
    wait_until(listening, 10, message="the activator did not listen")
    return server, port


def test_socket_activation_matches_tls_by_address_meaning_not_spelling(
    server_factory: Any, require_tool: Any, tmp_path: Path
) -> None:
    """Defect: a passed socket took the `tls` of the entry whose address text was the same:
    `*:PORT` against systemd's 127.0.0.1:PORT (or `[::]:PORT`) served plain HTTP, silently."""
    cert, key = self_signed_cert(tmp_path)
    tls = {"certificate": str(cert), "key": str(key)}
    server, port = _activated_tcp(
        server_factory, require_tool, [{"address": "*:{port}", "tls": tls}]
    )
    server.wait_ready(15)
    assert f"listening at https://127.0.0.1:{port}" in server.log()
    context = ssl.create_default_context(cafile=str(cert))
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw, \
            context.wrap_socket(raw, server_hostname="localhost") as conn:
        conn.sendall(b"GET /tls HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        data = b""
        while chunk := conn.recv(65536):
            data += chunk
    assert data.startswith(b"HTTP/1.1 200 ") and data.endswith(b"/tls"), data


def test_socket_activation_refuses_a_tls_entry_no_passed_socket_matches(
    server_factory: Any, require_tool: Any, tmp_path: Path
) -> None:
    """A `tls` entry for an address systemd did not pass would leave that service without
    its TLS port; starting plain on the passed one instead would serve it in the clear."""
    cert, key = self_signed_cert(tmp_path)
    tls = {"certificate": str(cert), "key": str(key)}
    server, port = _activated_tcp(
        server_factory, require_tool,
        [{"address": "127.0.0.1:{port}"}, {"address": "127.0.0.1:1", "tls": tls}],
    )
    assert server.wait_exit(15) != 0
    assert (
        f"bind 127.0.0.1:1 has tls, but none of the sockets systemd passed (127.0.0.1:{port})"
        in server.log()
    )
