"""preforkd behind a real nginx: X-Forwarded-For/Proto over TCP and unix upstreams, upstream
keep-alive, and PROXY protocol from nginx's stream module.

nginx runs in the foreground (`daemon off;`) in its own session, with its prefix, pid file,
logs and temp paths in a private directory, and is stopped by its pid (then its process
group). It listens on 127.0.0.2 (a port got by binding port 0 just before; retried if taken)
or on a unix socket, and clients connect from 127.0.0.3, so the client address nginx sees is
never the proxy's own 127.0.0.1.

Debian packages: nginx-light (or nginx) for the binary; libnginx-mod-stream for the stream
module (the PROXY protocol test).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import harness
from harness import (
    Response,
    Server,
    ServerFactory,
    fetch,
    group_members,
    http_request,
    kill_group,
    missing,
    read_response,
    require_tool,
    wait_until,
)

NGINX_HOST = "127.0.0.2"
CLIENT_HOST = "127.0.0.3"
MODULES_DIR = Path("/usr/lib/nginx/modules")  # Debian's --modules-path


def settings(**more: Any) -> dict[str, Any]:
    return harness.settings("pf_hardening_app:app", **more)


def nginx_binary() -> str:
    found = shutil.which("nginx")
    if found is None and os.access("/usr/sbin/nginx", os.X_OK):
        found = "/usr/sbin/nginx"  # root's PATH may lack /usr/sbin
    return found or require_tool("nginx")


def build_options(binary: str) -> list[str]:
    result = subprocess.run([binary, "-V"], capture_output=True, text=True, timeout=10)
    return (result.stdout + result.stderr).split()


def stream_module_line(binary: str) -> str:
    """The `load_module` line the stream module needs ("" when it is built in)."""
    options = build_options(binary)
    if "--with-stream" in options:
        return ""
    module = MODULES_DIR / "ngx_stream_module.so"
    if "--with-stream=dynamic" in options and module.exists():
        return f"load_module {module};"
    missing("nginx has no stream module (Debian package libnginx-mod-stream)")
    return ""  # not reached


def free_port(host: str) -> int:
    with socket.socket() as probe:
        probe.bind((host, 0))
        port: int = probe.getsockname()[1]
        return port


class Nginx:
    """One nginx master (and its worker) in `prefix`, with `http_conf` and `stream_conf` as
    the bodies of its http and stream blocks. `{port}` in them is replaced by a free port."""

    def __init__(
        self,
        binary: str,
        prefix: Path,
        *,
        http_conf: str = "",
        stream_conf: str = "",
        preamble: str = "",
    ) -> None:
        self.binary = binary
        self.prefix = prefix
        self.http_conf = http_conf
        self.stream_conf = stream_conf
        self.preamble = preamble
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None

    def config(self) -> str:
        p = self.prefix
        options = build_options(self.binary)
        temp_paths = [f"client_body_temp_path {p}/client_body;", f"proxy_temp_path {p}/proxy;"]
        for module in ("fastcgi", "uwsgi", "scgi"):
            if f"--without-http_{module}_module" not in options:
                temp_paths.append(f"{module}_temp_path {p}/{module};")
        user = "user root root;" if os.geteuid() == 0 else ""  # the upstream socket is 0700
        stream = f"stream {{\n{self.stream_conf}\n}}" if self.stream_conf else ""
        http = self.http_conf.replace("{port}", str(self.port))
        stream = stream.replace("{port}", str(self.port))
        return f"""
{self.preamble}
{user}
daemon off;
master_process on;
worker_processes 1;
pid {p}/nginx.pid;
error_log {p}/error.log info;
events {{ worker_connections 256; }}
http {{
    access_log {p}/access.log;
    {" ".join(temp_paths)}
{http}
}}
{stream}
"""

    def start(self, timeout: float = 10.0) -> Nginx:
        """Start nginx and wait until it accepts; retried with another port if it was taken."""
        self.prefix.mkdir(parents=True, exist_ok=True)
        for _ in range(3):
            self.port = free_port(NGINX_HOST)
            conf = self.prefix / "nginx.conf"
            conf.write_text(self.config())
            with open(self.prefix / "stderr.log", "ab") as err:
                self.proc = subprocess.Popen(
                    [
                        self.binary,
                        "-p",
                        f"{self.prefix}/",
                        "-e",
                        f"{self.prefix}/error.log",
                        "-c",
                        str(conf),
                    ],
                    stdin=subprocess.DEVNULL,
                    stdout=err,
                    stderr=err,
                    start_new_session=True,
                )
            wait_until(self._up_or_exited, timeout, message=f"nginx did not start\n{self.log()}")
            if self.proc.poll() is None:
                return self
            if "Address already in use" not in self.log():
                break
        raise AssertionError(
            f"nginx exited at start ({self.proc and self.proc.returncode})\n{self.log()}"
        )

    def _up_or_exited(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            return True
        pid_file = self.prefix / "nginx.pid"
        return pid_file.exists() and pid_file.read_text().strip() == str(self.proc.pid)

    def stop(self) -> None:
        """TERM the master (fast shutdown), then KILL whatever is left in its group."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(5)
        if self.proc.returncode is None or group_members(self.proc.pid):
            kill_group(self.proc.pid)
        self.proc.wait(5)

    def log(self) -> str:
        parts = []
        for name in ("stderr.log", "error.log"):
            path = self.prefix / name
            if path.exists():
                parts.append(f"--- nginx {name}:\n" + path.read_text(errors="replace")[-3000:])
        return "\n".join(parts)


@pytest.fixture
def nginx_factory(tmp_path: Path) -> Iterator[Any]:
    """`nginx_factory(http_conf=..., stream_conf=..., preamble=...) -> Nginx`, started."""
    binary = nginx_binary()
    started: list[Nginx] = []

    def make(**conf: str) -> Nginx:
        nginx = Nginx(binary, tmp_path / f"nginx{len(started)}", **conf)
        started.append(nginx)
        return nginx.start()

    make.binary = binary  # type: ignore[attr-defined]
    try:
        yield make
    finally:
        for nginx in started:
            nginx.stop()


def connect_from(source: str, port: int, timeout: float = 5.0) -> socket.socket:
    """A TCP connection to NGINX_HOST:port from the address `source`."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        sock.bind((source, 0))
        sock.connect((NGINX_HOST, port))
    except BaseException:
        sock.close()
        raise
    return sock


def get(
    sock: socket.socket, target: str = "/environ", headers: list[tuple[str, str]] | None = None
) -> Response:
    sock.sendall(http_request("GET", target, headers or []))
    return read_response(sock)


def environ_of(response: Response, nginx: Nginx) -> dict[str, Any]:
    assert response.status == 200, f"{response}\n{nginx.log()}"
    data: dict[str, Any] = json.loads(response.body)
    return data


def tcp_upstream(server: Server) -> str:
    scheme, host, port = server.addresses()[0]
    assert scheme == "http"
    return f"{host}:{port}"


FORWARDING = """
    proxy_set_header Host $host;
    proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
    proxy_set_header X-Forwarded-Proto https;
"""


def forwarding_site(upstream: str) -> str:
    return f"""
    upstream preforkd {{ server {upstream}; }}
    server {{
        listen {NGINX_HOST}:{{port}};
        location / {{
            proxy_pass http://preforkd;
{FORWARDING}
        }}
    }}
"""


@pytest.mark.parametrize(
    ("allow", "trusted"), [(["127.0.0.1"], True), (["127.0.0.9"], False)], ids=["trusted", "not"]
)
def test_nginx_over_tcp_forwards_the_client_address(
    server_factory: ServerFactory, nginx_factory: Any, allow: list[str], trusted: bool
) -> None:
    server = server_factory(settings(http={"forwarded_allow_ips": allow}))
    nginx = nginx_factory(http_conf=forwarding_site(tcp_upstream(server)))
    with connect_from(CLIENT_HOST, nginx.port) as sock:
        # a client that tries to choose its own address: nginx appends the real one
        env = environ_of(get(sock, headers=[("X-Forwarded-For", "6.6.6.6")]), nginx)
    assert env["headers"]["HTTP_X_FORWARDED_FOR"] == f"6.6.6.6, {CLIENT_HOST}"
    if trusted:
        assert (env["REMOTE_ADDR"], env["REMOTE_PORT"], env["wsgi.url_scheme"]) == (
            CLIENT_HOST,
            None,
            "https",
        )
    else:
        assert (env["REMOTE_ADDR"], env["wsgi.url_scheme"]) == ("127.0.0.1", "http")
        assert env["REMOTE_PORT"] is not None


@pytest.mark.parametrize(
    ("allow", "trusted"), [(["unix"], True), (["127.0.0.1"], False)], ids=["trusted", "not"]
)
def test_nginx_over_a_unix_socket_forwards_the_client_address(
    server_factory: ServerFactory,
    nginx_factory: Any,
    short_tmp: Path,
    allow: list[str],
    trusted: bool,
) -> None:
    path = short_tmp / "pf.sock"
    server = server_factory(settings(bind=[f"unix:{path}"], http={"forwarded_allow_ips": allow}))
    assert server.addresses() == [("unix", str(path))]
    nginx = nginx_factory(http_conf=forwarding_site(f"unix:{path}"))
    with connect_from(CLIENT_HOST, nginx.port) as sock:
        env = environ_of(get(sock), nginx)
    if trusted:
        assert (env["REMOTE_ADDR"], env["wsgi.url_scheme"]) == (CLIENT_HOST, "https")
    else:
        assert (env["REMOTE_ADDR"], env["wsgi.url_scheme"]) == ("", "http")


def test_nginx_upstream_keepalive_reuses_connections(
    server_factory: ServerFactory, nginx_factory: Any, short_tmp: Path
) -> None:
    """50 requests through nginx, each on a new client connection; nginx keeps up to 8
    upstream connections, so preforkd (trusting nobody, so REMOTE_PORT is nginx's own
    source port) sees far fewer connections than requests."""
    server = server_factory(settings(http={"forwarded_allow_ips": [], "keepalive_timeout": 30}))
    listen = short_tmp / "nginx.sock"
    nginx = nginx_factory(
        http_conf=f"""
    upstream preforkd {{
        server {tcp_upstream(server)};
        keepalive 8;
    }}
    server {{
        listen unix:{listen};
        location / {{
            proxy_pass http://preforkd;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }}
    }}
"""
    )
    ports = []
    for _ in range(50):
        response = fetch(str(listen), "GET", "/environ")
        env = environ_of(response, nginx)
        assert env["REMOTE_ADDR"] == "127.0.0.1"
        ports.append(env["REMOTE_PORT"])
    assert len(set(ports)) <= 8, f"{len(set(ports))} upstream connections for 50 requests"


def test_nginx_stream_proxy_protocol_gives_the_client_address(
    server_factory: ServerFactory, nginx_factory: Any
) -> None:
    preamble = stream_module_line(nginx_factory.binary)
    server = server_factory(settings(http={"proxy_protocol": "v1"}))  # 127.0.0.1 is trusted
    nginx = nginx_factory(
        preamble=preamble,
        stream_conf=f"""
    server {{
        listen {NGINX_HOST}:{{port}};
        proxy_pass {tcp_upstream(server)};
        proxy_protocol on;
    }}
""",
    )
    for _ in range(2):
        with connect_from(CLIENT_HOST, nginx.port) as sock:
            client_port = str(sock.getsockname()[1])
            for _ in range(2):  # keep-alive: the PROXY address holds for the whole connection
                env = environ_of(get(sock), nginx)
                assert (env["REMOTE_ADDR"], env["REMOTE_PORT"]) == (CLIENT_HOST, client_port)
                assert env["wsgi.url_scheme"] == "http"
