"""protocol: uwsgi -- preforkd behind the real nginx with `uwsgi_pass` and `include
/etc/nginx/uwsgi_params` (over TCP and a unix socket), and the same listener fed raw packets:
the environ, a POST body, a chunked upload, a streamed and a large file_wrapper response,
HEAD, an application error; malformed packets, a peer not allowed and an HTTP request are
refused (400, 403), logged where an operator needs it, and never cost the worker.

Servers run through server_factory (stopped by pid and process group at teardown); nginx
through test_nginx's nginx_factory (stopped by pid, then its group). nginx is skipped
without the binary, and fails the test under CI=true (harness.missing). The comparison with
uWSGI itself uses the `uwsgi` on PATH or in bench's peers' virtualenv, where .ci/run builds
it; without one it is skipped, and fails under CI=true.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import socket
import ssl
import struct
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from harness import (
    Response,
    Server,
    ServerFactory,
    connect,
    fetch,
    http_request,
    kill_group,
    missing,
    read_response,
    recv_until_close,
    self_signed_cert,
    send_raw,
    wait_until,
)
from test_nginx import CLIENT_HOST, NGINX_HOST, Nginx, connect_from, nginx_factory

__all__ = ["nginx_factory"]  # a fixture, used by name

# bench/run installs the peers (gunicorn, uWSGI) here, and so does .ci/run for this test
PEER_VENV = Path("/tmp/preforkd-bench-venv")

BIG_SIZE = 6 * 1024 * 1024 + 123

APP = r'''
import json, os

# a file for wsgi.file_wrapper, one per worker (the test knows its bytes: BIG)
BIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "big-%d.bin" % os.getpid())
with open(BIG, "wb") as f:
    f.write((bytes(range(256)) * (SIZE // 256 + 1))[:SIZE])

def application(environ, start_response):
    path = environ["PATH_INFO"]
    if path.endswith("/stream"):
        start_response("200 OK", [("Content-Type", "text/plain")])
        return (b"line %d\n" % i for i in range(2000))
    if path.endswith("/file"):
        start_response("200 OK", [("Content-Type", "application/octet-stream")])
        return environ["wsgi.file_wrapper"](open(BIG, "rb"))
    if path.endswith("/unread"):
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b"body left unread"]
    if path.endswith("/fail"):
        raise RuntimeError("the application failed")
    body = environ["wsgi.input"].read()
    data = {k: v for k, v in environ.items() if isinstance(v, str)}
    data["body"] = body.decode("latin-1")
    data["pid"] = os.getpid()
    start_response("200 OK", [("Content-Type", "application/json")])
    return [json.dumps(data).encode()]
'''.replace("SIZE", str(BIG_SIZE))

BIG = hashlib.sha256((bytes(range(256)) * (BIG_SIZE // 256 + 1))[:BIG_SIZE]).hexdigest()

# what nginx's uwsgi_params sends (its order), then the client's headers
PARAMS = [
    ("QUERY_STRING", "q=%20x"), ("REQUEST_METHOD", "GET"), ("CONTENT_TYPE", ""),
    ("CONTENT_LENGTH", ""), ("REQUEST_URI", "/caf%C3%A9/env?q=%20x"),
    ("PATH_INFO", "/caf\xc3\xa9/env"), ("DOCUMENT_ROOT", "/usr/share/nginx/html"),
    ("SERVER_PROTOCOL", "HTTP/1.1"), ("REQUEST_SCHEME", "http"),
    ("REMOTE_ADDR", "203.0.113.7"), ("REMOTE_PORT", "51000"), ("SERVER_PORT", "80"),
    ("SERVER_NAME", "shop.example"), ("HTTP_HOST", "shop.example"),
    ("HTTP_USER_AGENT", "test/1"),
]
REFUSED_BY_PEER = re.compile(r"\[WARNING\] (\S+): a request from (\S+) refused with 403: "
                             r"that peer is not in http\.uwsgi_allow_ips")
HTTP_REFUSED = re.compile(r"\[WARNING\] (\S+): a request from (\S+) is HTTP \(nginx "
                          r"proxy_pass\?\), and this listener speaks the uwsgi protocol")


def packet(pairs: Sequence[tuple[str, str]] = PARAMS, body: bytes = b"",
           modifier1: int = 0) -> bytes:
    block = b""
    for name, value in pairs:
        for text in (name, value):
            raw = text.encode("latin-1")
            block += struct.pack("<H", len(raw)) + raw
    return struct.pack("<BHB", modifier1, len(block), 0) + block + body


def with_vars(**changes: str) -> list[tuple[str, str]]:
    pairs = dict(PARAMS)
    pairs.update(changes)
    return list(pairs.items())


def ask(address: Any, data: bytes, method: str = "GET") -> Response:
    """Send `data` on a new connection; the response, which must end with the connection."""
    with connect(address, timeout=10) as sock:
        sock.sendall(data)
        response = read_response(sock, method=method)
        assert recv_until_close(sock, 5) == b"", "bytes after the response"
    return response


def environ_of(response: Response) -> dict[str, Any]:
    assert response.status == 200, response
    data: dict[str, Any] = json.loads(response.body)
    return data


def uwsgi_settings(**more: Any) -> dict[str, Any]:
    return {"app": "app:application", "protocol": "uwsgi", **more}


def worker_pid(server: Server) -> int:
    pids = wait_until(lambda: server.worker_pids(), 10, message="no worker")
    assert len(pids) == 1, pids
    return pids[0]


# --- raw packets ---------------------------------------------------------------------------


def test_get_post_head_and_errors_over_raw_packets(server_factory: ServerFactory) -> None:
    server = server_factory(uwsgi_settings(workers={"count": 1},
                                           logging={"access_log": "-"}), app_source=APP)
    address = server.addresses()[0]
    assert address[0] == "uwsgi", server.log_tail()  # "listening at uwsgi://HOST:PORT"
    pid = worker_pid(server)

    env = environ_of(ask(address, packet()))
    assert (env["REQUEST_METHOD"], env["SCRIPT_NAME"], env["PATH_INFO"]) == (
        "GET", "", "/caf\xc3\xa9/env")
    assert (env["QUERY_STRING"], env["REQUEST_URI"]) == ("q=%20x", "/caf%C3%A9/env?q=%20x")
    assert (env["REMOTE_ADDR"], env["REMOTE_PORT"]) == ("203.0.113.7", "51000")
    assert (env["SERVER_NAME"], env["SERVER_PORT"], env["HTTP_HOST"]) == (
        "shop.example", "80", "shop.example")
    assert env["wsgi.url_scheme"] == "http" and "CONTENT_LENGTH" not in env

    body = b"a=1&b=" + b"x" * 100_000
    post = with_vars(REQUEST_METHOD="POST", CONTENT_LENGTH=str(len(body)),
                     CONTENT_TYPE="application/x-www-form-urlencoded")
    with connect(address, timeout=10) as sock:  # header, variables and body in pieces
        data = packet(post, body)
        for cut in (2, 30, 400, len(data) - 5000, len(data)):
            sock.sendall(data[:cut])
            data = data[cut:]
            if not data:
                break
        response = read_response(sock)
    env = environ_of(response)
    assert (env["body"].encode("latin-1"), env["CONTENT_LENGTH"]) == (body, str(len(body)))

    head = ask(address, packet(with_vars(REQUEST_METHOD="HEAD")), method="HEAD")
    assert head.status == 200 and head.body == b""

    assert ask(address, packet(with_vars(PATH_INFO="/fail"))).status == 500
    assert "the application failed" in server.log()
    # the streamed body is delimited by the close (nginx decodes no chunked uwsgi response)
    stream = ask(address, packet(with_vars(PATH_INFO="/stream")))
    assert stream.header("Transfer-Encoding") is None and stream.header("Connection") == "close"
    assert stream.body == b"".join(b"line %d\n" % i for i in range(2000))
    assert worker_pid(server) == pid
    lines = wait_until(lambda: len(server.stdout().splitlines()) >= 5 and server.stdout(), 5)
    # the access log names the client and protocol the variables give
    assert '203.0.113.7 - - [' in lines and '"GET /caf%C3%A9/env?q=%20x HTTP/1.1" 200' in lines


def test_a_large_file_wrapper_response(server_factory: ServerFactory) -> None:
    server = server_factory(uwsgi_settings(workers={"count": 1},
                                           logging={"access_log": "-"}), app_source=APP)
    response = ask(server.addresses()[0], packet(with_vars(PATH_INFO="/file")))
    assert response.status == 200
    assert response.header("Content-Length") == str(BIG_SIZE)
    assert hashlib.sha256(response.body).hexdigest() == BIG
    line = wait_until(lambda: server.stdout().strip(), 5)
    assert f'"GET /caf%C3%A9/env?q=%20x HTTP/1.1" 200 {BIG_SIZE} ' in line, line


def test_a_body_the_application_leaves_unread_does_not_reset_the_answer(
    server_factory: ServerFactory,
) -> None:
    server = server_factory(uwsgi_settings(workers={"count": 1}), app_source=APP)
    body = b"z" * 2_000_000
    post = with_vars(REQUEST_METHOD="POST", CONTENT_LENGTH=str(len(body)), PATH_INFO="/unread")
    with connect(server.addresses()[0], timeout=10) as sock:
        sock.sendall(packet(post))
        sock.sendall(body[:100_000])  # the rest is still coming when the answer goes out
        response = read_response(sock)
    assert (response.status, response.body) == (200, b"body left unread")


def tcp_state(sock: socket.socket) -> int:
    """The socket's TCP state (tcpi_state, the first byte of TCP_INFO)."""
    return sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 1)[0]


TCP_CLOSE_WAIT = 8  # the peer sent its FIN: what it sent before stays readable
TCP_CLOSE = 7  # the peer reset the connection: what it had not sent yet is gone


def test_bytes_after_the_body_do_not_reset_the_answer(server_factory: ServerFactory) -> None:
    """A client that sends more than CONTENT_LENGTH (another packet, junk): the worker answers
    the request and closes with a lingering half-close, as after a refused request. Closed
    with those bytes unread, the kernel sent a reset, and the response still in its buffers
    never reached a client that read it a moment later."""
    server = server_factory(uwsgi_settings(workers={"count": 1},
                                           logging={"access_log": "-"}), app_source=APP)
    address = server.addresses()[0]
    pid = worker_pid(server)
    post = with_vars(REQUEST_METHOD="POST", CONTENT_LENGTH="3", PATH_INFO="/stream")
    expected = b"".join(b"line %d\n" % i for i in range(2000))
    for n, extra in enumerate((b"j" * 200_000, packet(post, b"abc") * 2000)):
        with connect(address, timeout=10) as sock:
            sock.sendall(packet(post, b"abc") + extra)
            # the answer is written and the worker is done with it: read only then
            wait_until(lambda lines=n + 1: len(server.stdout().splitlines()) >= lines, 10,
                       message="no answer")
            state = wait_until(lambda s=sock: tcp_state(s) in (TCP_CLOSE_WAIT, TCP_CLOSE)
                               and tcp_state(s), 10, message="the worker kept it open")
            assert state == TCP_CLOSE_WAIT, "the worker reset the connection"
            response = read_response(sock)
        assert (response.status, response.body) == (200, expected)
    assert worker_pid(server) == pid


def test_http_requests_pipelined_after_connection_close_do_not_reset_the_answer(
    server_factory: ServerFactory,
) -> None:
    """The same close over HTTP (the worker's, shared): requests pipelined after one that
    says Connection: close are not answered, and must not cut its answer short."""
    server = server_factory({"app": "app:application", "workers": {"count": 1},
                             "logging": {"access_log": "-"}}, app_source=APP)
    address = server.addresses()[0]
    closing = http_request("POST", "/stream", [("Connection", "close")], b"abc")
    with connect(address, timeout=10) as sock:
        sock.sendall(closing + http_request("GET", "/stream") * 5000)
        wait_until(lambda: server.stdout().strip(), 10, message="no answer")
        state = wait_until(lambda: tcp_state(sock) in (TCP_CLOSE_WAIT, TCP_CLOSE)
                           and tcp_state(sock), 10, message="the worker kept it open")
        assert state == TCP_CLOSE_WAIT, "the worker reset the connection"
        response = read_response(sock)
    assert response.status == 200
    assert response.body.count(b"line ") == 2000


def test_uwsgi_s_mount_behind_modifier1_30_with_http_script_name(
    server_factory: ServerFactory,
) -> None:
    """uWSGI's usual mount moved over as FROM-UWSGI says: nginx unchanged (`uwsgi_param
    SCRIPT_NAME /app; uwsgi_modifier1 30;`), uWSGI's `mount = /app=...` with
    manage-script-name as `http.script_name: /app`. SCRIPT_NAME came off PATH_INFO, then
    the mount was looked for in what was left: every request got 400."""
    server = server_factory(uwsgi_settings(workers={"count": 1}, http={"script_name": "/app"}),
                            app_source=APP)
    address = server.addresses()[0]
    mounted = with_vars(SCRIPT_NAME="/app", PATH_INFO="/app/env", REQUEST_URI="/app/env")
    env = environ_of(ask(address, packet(mounted, modifier1=30)))
    assert (env["SCRIPT_NAME"], env["PATH_INFO"]) == ("/app", "/env")
    outside = with_vars(SCRIPT_NAME="/app", PATH_INFO="/other", REQUEST_URI="/other")
    assert ask(address, packet(outside, modifier1=30)).status == 400


def test_static_files_are_matched_on_the_packet_s_path(
    server_factory: ServerFactory, tmp_path: Path
) -> None:
    """`static` with protocol uwsgi: matched on PATH_INFO as nginx decoded it (not decoded a
    second time: %2e%2e in it is a name, not ..), HEAD included."""
    files = tmp_path / "files"
    files.mkdir()
    (files / "caf\xe9.txt").write_text("hello static\n")
    (files / "%2e%2e").write_text("a file named %2e%2e\n")
    server = server_factory(uwsgi_settings(
        workers={"count": 1}, static=[{"url": "/static/", "path": str(files)}]),
        app_source=APP)
    address = server.addresses()[0]
    utf8 = "/static/caf\xe9.txt".encode().decode("latin-1")  # as nginx's $document_uri
    got = ask(address, packet(with_vars(PATH_INFO=utf8, REQUEST_URI="/static/caf%C3%A9.txt")))
    assert (got.status, got.body) == (200, b"hello static\n")
    assert got.header("Content-Type") == "text/plain; charset=utf-8"
    head = ask(address, packet(with_vars(PATH_INFO=utf8, REQUEST_METHOD="HEAD")), "HEAD")
    assert (head.status, head.body, head.header("Content-Length")) == (200, b"", "13")
    named = ask(address, packet(with_vars(PATH_INFO="/static/%2e%2e")))
    assert named.body == b"a file named %2e%2e\n"
    # mounted by the proxy (modifier1 30): the whole path is matched
    mounted = with_vars(SCRIPT_NAME="/static", PATH_INFO=utf8)
    assert ask(address, packet(mounted, modifier1=30)).body == b"hello static\n"
    # not a file: the application's
    assert environ_of(ask(address, packet(with_vars(PATH_INFO="/static/none"))))["pid"]


def test_a_tls_listener_serves_uwsgi_over_tls(
    server_factory: ServerFactory, tmp_path: Path
) -> None:
    """nginx's `uwsgi_pass suwsgi://`: the packet over TLS. The scheme is still the one the
    variables give (the client's), not this hop's; the file goes out read, not sendfile'd."""
    cert, key = self_signed_cert(tmp_path)
    server = server_factory(uwsgi_settings(
        workers={"count": 1},
        bind=[{"address": "127.0.0.1:0", "tls": {"certificate": str(cert), "key": str(key)}}]),
        app_source=APP)
    scheme, host, port = server.addresses()[0]
    assert scheme == "suwsgi"
    context = ssl.create_default_context(cafile=str(cert))

    def over_tls(data: bytes) -> bytes:
        """The body of the answer, which the close ends."""
        with socket.create_connection((host, port), timeout=10) as raw, \
                context.wrap_socket(raw, server_hostname="localhost") as sock:
            sock.sendall(data)
            answer = b"".join(iter(lambda: sock.recv(65536), b""))
        head, _, body = answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200 OK\r\n"), head
        return body

    for pairs, expected in ((PARAMS, "http"), (with_vars(HTTPS="on"), "https")):
        env = json.loads(over_tls(packet(pairs)))
        assert env["wsgi.url_scheme"] == expected and "SSL_PROTOCOL" not in env
    big = over_tls(packet(with_vars(PATH_INFO="/file")))
    assert hashlib.sha256(big).hexdigest() == BIG


MALFORMED = [
    ("modifier1 5", packet(modifier1=5)),
    ("a name past the block", b"\x00\x04\x00\x00\x09\x00AB"),
    ("a value past the block", b"\x00\x09\x00\x00\x01\x00A\x09\x00BCDE"),
    ("a name of size 0", b"\x00\x05\x00\x00\x00\x00\x01\x00x"),
    ("no REQUEST_METHOD", packet([("PATH_INFO", "/")])),
    ("a bad CONTENT_LENGTH", packet(with_vars(CONTENT_LENGTH="12x"))),
    ("an empty packet", b"\x00\x00\x00\x00"),
    ("garbage", bytes(range(255, 0, -1))),
]


def test_malformed_packets_get_400_and_the_worker_survives(
    server_factory: ServerFactory,
) -> None:
    server = server_factory(uwsgi_settings(workers={"count": 1}, http={"max_body_size": 100}),
                            app_source=APP)
    address = server.addresses()[0]
    pid = worker_pid(server)
    for what, data in MALFORMED:
        answer = send_raw(address, data)
        assert answer.startswith(b"HTTP/1.1 400 Bad Request\r\n"), (what, answer)
    too_big = with_vars(REQUEST_METHOD="POST", CONTENT_LENGTH="101")
    assert send_raw(address, packet(too_big, b"x" * 101)).startswith(b"HTTP/1.1 413 ")
    # a packet cut short by its peer: nothing to answer, nothing lost
    with connect(address) as sock:
        sock.sendall(packet()[:10])
        sock.shutdown(socket.SHUT_WR)
        assert recv_until_close(sock) == b""
    assert worker_pid(server) == pid and server.worker_pids() == [pid]
    assert environ_of(ask(address, packet()))["pid"] == pid
    # no REQUEST_METHOD is a misconfigured nginx: said once, with the fix
    assert server.log().count("has no REQUEST_METHOD variable") == 1, server.log_tail()
    assert "include uwsgi_params" in server.log()


def test_a_packet_that_stops_arriving_gets_408(server_factory: ServerFactory) -> None:
    """http.header_timeout bounds the header and variables as it bounds an HTTP head; the
    worker serves others meanwhile."""
    server = server_factory(uwsgi_settings(workers={"count": 1},
                                           http={"header_timeout": 0.5}), app_source=APP)
    address = server.addresses()[0]
    with connect(address, timeout=10) as stalled:
        stalled.sendall(packet()[:40])
        assert environ_of(ask(address, packet()))["REQUEST_METHOD"] == "GET"
        assert recv_until_close(stalled, 5).startswith(b"HTTP/1.1 408 Request Timeout\r\n")


def test_a_peer_not_allowed_gets_403_and_the_log_says_why(
    server_factory: ServerFactory, short_tmp: Path
) -> None:
    """Over TCP from 127.0.0.1, not in uwsgi_allow_ips: 403 before the application, and one
    warning a minute naming the peer and the setting; the unix socket's peers are allowed."""
    sock = short_tmp / "u.sock"
    server = server_factory(
        uwsgi_settings(bind=["127.0.0.1:0", f"unix:{sock}"], workers={"count": 1},
                       http={"uwsgi_allow_ips": ["10.0.0.0/8", "unix"]},
                       logging={"access_log": "-"}),
        app_source=APP)
    tcp = next(a for a in server.addresses() if a[0] == "uwsgi")
    for _ in range(2):
        assert ask(tcp, packet()).status == 403
    warnings = REFUSED_BY_PEER.findall(server.log())
    assert warnings == [(f"uwsgi://127.0.0.1:{tcp[2]}", "127.0.0.1")], server.log_tail()
    assert environ_of(ask(str(sock), packet()))["REMOTE_ADDR"] == "203.0.113.7"
    lines = wait_until(lambda: len(server.stdout().splitlines()) >= 3 and server.stdout(), 5)
    assert lines.count('" 403 ') == 2, lines  # logged as refused, with the request line


def test_http_on_a_uwsgi_listener_gets_400_and_a_warning(server_factory: ServerFactory) -> None:
    server = server_factory(uwsgi_settings(workers={"count": 1}), app_source=APP)
    address = server.addresses()[0]
    for _ in range(2):
        assert fetch(address, "GET", "/").status == 400
    assert len(HTTP_REFUSED.findall(server.log())) == 1, server.log_tail()
    assert "point nginx at it with uwsgi_pass" in server.log()


def test_uwsgi_on_an_http_listener_says_to_set_protocol_uwsgi(
    server_factory: ServerFactory,
) -> None:
    server = server_factory({"app": "app:application", "workers": {"count": 1}},
                            app_source=APP)
    assert send_raw(server.addresses()[0], packet()).startswith(b"HTTP/1.1 400 ")
    match = server.wait_for_log("in uWSGI's binary protocol")
    assert "set `protocol: uwsgi`" in server.log()[match.start():].splitlines()[0]


# --- behind nginx ----------------------------------------------------------------------------


def site(upstream: str) -> str:
    return f"""
    server {{
        listen {NGINX_HOST}:{{port}};
        server_name shop.example;
        location /mounted {{
            include /etc/nginx/uwsgi_params;
            uwsgi_param SCRIPT_NAME /mounted;
            uwsgi_modifier1 30;
            uwsgi_pass {upstream};
        }}
        location /secure {{
            include /etc/nginx/uwsgi_params;
            uwsgi_param HTTPS on;
            uwsgi_pass {upstream};
        }}
        location / {{
            include /etc/nginx/uwsgi_params;
            uwsgi_pass {upstream};
        }}
    }}
"""


def through(nginx: Nginx, method: str = "GET", target: str = "/caf%C3%A9/env?q=%20x",
            headers: Sequence[tuple[str, str]] = (), body: bytes = b"") -> Response:
    with connect_from(CLIENT_HOST, nginx.port, timeout=20) as sock:
        sock.sendall(http_request(method, target, headers, body, host="shop.example"))
        return read_response(sock, method=method)


@pytest.mark.parametrize("kind", ["tcp", "unix"])
def test_nginx_uwsgi_pass_with_uwsgi_params(
    server_factory: ServerFactory, nginx_factory: Any, short_tmp: Path, kind: str
) -> None:
    bind = f"unix:{short_tmp / 'u.sock'}" if kind == "unix" else "127.0.0.1:0"
    server = server_factory(uwsgi_settings(bind=[bind], workers={"count": 2}),
                            app_source=APP)
    if kind == "unix":
        upstream = bind
    else:
        _, host, port = server.addresses()[0]
        upstream = f"{host}:{port}"
    pids = server.worker_pids()
    nginx = nginx_factory(http_conf=site(upstream))

    with connect_from(CLIENT_HOST, nginx.port) as sock:
        client_port = str(sock.getsockname()[1])
        sock.sendall(http_request("GET", "/caf%C3%A9/env?q=%20x", [("X-Multi", "1"),
                                  ("X-Multi", "2")], host="shop.example"))
        response = read_response(sock)
    env = environ_of(response)
    assert (env["REMOTE_ADDR"], env["REMOTE_PORT"]) == (CLIENT_HOST, client_port)
    assert (env["SCRIPT_NAME"], env["PATH_INFO"]) == ("", "/caf\xc3\xa9/env")  # decoded once
    assert (env["QUERY_STRING"], env["REQUEST_URI"]) == ("q=%20x", "/caf%C3%A9/env?q=%20x")
    assert (env["SERVER_NAME"], env["SERVER_PORT"]) == ("shop.example", str(nginx.port))
    assert (env["HTTP_HOST"], env["SERVER_PROTOCOL"]) == ("shop.example", "HTTP/1.1")
    assert env["HTTP_X_MULTI"] == "1, 2"
    assert env["wsgi.url_scheme"] == "http" and "HTTPS" not in env
    assert "CONTENT_LENGTH" not in env and "HTTP_CONTENT_LENGTH" not in env

    form = b"name=" + b"v" * 50_000
    env = environ_of(through(nginx, "POST", "/post", [
        ("Content-Type", "application/x-www-form-urlencoded")], form))
    assert (env["body"].encode(), env["CONTENT_LENGTH"]) == (form, str(len(form)))
    assert env["CONTENT_TYPE"] == "application/x-www-form-urlencoded"
    # a chunked upload: nginx buffers it and sends its length
    chunked = b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"
    env = environ_of(through(nginx, "POST", "/up", [("Transfer-Encoding", "chunked")],
                             chunked))
    assert (env["body"], env["CONTENT_LENGTH"]) == ("hello world", "11")

    stream = through(nginx, target="/stream")
    assert stream.status == 200
    assert stream.body == b"".join(b"line %d\n" % i for i in range(2000))
    big = through(nginx, target="/file")
    assert (big.status, hashlib.sha256(big.body).hexdigest()) == (200, BIG)
    head = through(nginx, "HEAD", "/file")
    assert (head.status, head.body, head.header("Content-Length")) == (200, b"", str(BIG_SIZE))
    assert through(nginx, target="/fail").status == 500

    env = environ_of(through(nginx, target="/mounted/a/env?x=1"))
    assert (env["SCRIPT_NAME"], env["PATH_INFO"]) == ("/mounted", "/a/env")
    env = environ_of(through(nginx, target="/secure/env"))
    assert (env["wsgi.url_scheme"], env["HTTPS"]) == ("https", "on")

    assert server.worker_pids() == pids  # no worker died or was replaced
    # nginx warns when a slow client makes it spool the 6 MiB answer to a temporary file
    # (a loaded machine): about its buffers, not about the upstream
    errors = [line for line in (nginx.prefix / "error.log").read_text().splitlines()
              if ("[error]" in line or "upstream" in line)
              and "buffered to a temporary file" not in line]
    assert errors == [], errors


def test_nginx_to_a_peer_not_allowed_shows_403_and_the_log_names_it(
    server_factory: ServerFactory, nginx_factory: Any
) -> None:
    server = server_factory(uwsgi_settings(workers={"count": 1},
                                           http={"uwsgi_allow_ips": ["192.0.2.1"]}),
                            app_source=APP)
    _, host, port = server.addresses()[0]
    nginx = nginx_factory(http_conf=site(f"{host}:{port}"))
    assert through(nginx).status == 403
    match = server.wait_for_log(REFUSED_BY_PEER)
    assert match.group(2) == "127.0.0.1"  # nginx, the peer: not the client it names


# --- the same request through uWSGI ----------------------------------------------------------


def test_the_environ_matches_uwsgi_s_for_the_same_nginx_request(
    server_factory: ServerFactory, nginx_factory: Any, short_tmp: Path
) -> None:
    """The same requests through one nginx to uWSGI 2.0 (`--socket`) and to preforkd: every
    key uWSGI gives is there with the same value, but for the documented differences (a
    repeated header joined, not its last value kept; empty CONTENT_LENGTH and CONTENT_TYPE
    left out, and the client's Content-Length and Content-Type only as CONTENT_*, as CGI has
    them; uWSGI's own keys and the objects). uWSGI is the one on PATH, or the one bench/run
    installs into its peers' virtualenv (where .ci/run builds it)."""
    uwsgi = shutil.which("uwsgi") or shutil.which("uwsgi", path=str(PEER_VENV / "bin"))
    if uwsgi is None:
        missing(f"no uwsgi on PATH or in {PEER_VENV} to compare with",
                f".ci/run should build it into {PEER_VENV}")
    (short_tmp / "app.py").write_text(APP)
    socket_path = short_tmp / "uwsgi.sock"
    with open(short_tmp / "uwsgi.log", "wb") as err:
        proc = subprocess.Popen(
            [uwsgi, "--socket", str(socket_path), "--wsgi-file", str(short_tmp / "app.py"),
             "--master", "--processes", "1", "--disable-logging", "--need-app"],
            cwd=short_tmp, stdin=subprocess.DEVNULL, stdout=err, stderr=err,
            start_new_session=True,
        )
    try:
        wait_until(socket_path.exists, 15, message="uWSGI did not start")
        server = server_factory(uwsgi_settings(bind=[f"unix:{short_tmp / 'pf.sock'}"]),
                                app_source=APP)
        # one nginx for each, the same but for the upstream
        to_uwsgi = nginx_factory(http_conf=site(f"unix:{socket_path}"))
        to_us = nginx_factory(http_conf=site(f"unix:{server.addresses()[0][1]}"))
        requests: list[tuple[str, str, list[tuple[str, str]], bytes]] = [
            ("GET", "/caf%C3%A9/env?q=%20x", [("Cookie", "a=1")], b""),
            ("POST", "/form/env", [("Content-Type", "application/x-www-form-urlencoded")],
             b"a=1&b=2"),
            ("GET", "/multi/env", [("X-Multi", "1"), ("X-Multi", "2")], b""),
            ("GET", "/secure/env", [], b""),
        ]
        for method, target, headers, body in requests:
            theirs = environ_of(through(to_uwsgi, method, target, headers, body))
            ours = environ_of(through(to_us, method, target, headers, body))
            for key in ("pid", "REMOTE_PORT", "SERVER_PORT", "DOCUMENT_ROOT"):  # per nginx
                theirs.pop(key), ours.pop(key)
            differences = {
                key: (value, ours.get(key)) for key, value in theirs.items()
                if ours.get(key) != value and not key.startswith(("uwsgi.", "wsgi."))
            }
            if "HTTP_X_MULTI" in differences:
                assert differences.pop("HTTP_X_MULTI") == ("2", "1, 2")
            for key in ("CONTENT_LENGTH", "CONTENT_TYPE"):
                if differences.get(key) == ("", None):
                    del differences[key]
                if "HTTP_" + key in differences:
                    assert differences.pop("HTTP_" + key) == (theirs[key], None)
            assert differences == {}, (target, differences)
            assert ours["wsgi.url_scheme"] == theirs["wsgi.url_scheme"]
            assert ours["SCRIPT_NAME"] == "" and "SCRIPT_NAME" not in theirs  # PEP 3333's
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGINT)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                kill_group(proc.pid)
                proc.wait(5)
