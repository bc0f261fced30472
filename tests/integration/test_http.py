"""HTTP/1.x and raw TCP served by a real preforkd: framing, keep-alive, errors, binds, logs.

Every test starts its own server (bound to port 0) from `server_factory`, which stops it.
The apps are in apps/pf_testapp.py; `/` answers with the worker's pid.
"""

from __future__ import annotations

import json
import re
import signal
import socket
import time
from pathlib import Path
from typing import Any

import pytest

from harness import (
    ServerFactory,
    address,
    connect,
    fetch,
    http_request,
    read_response,
    recv_until_close,
    send_raw,
    settings,
    wait_until,
)


def status_of(raw: bytes) -> int:
    """Status code of the first response in `raw`."""
    match = re.match(rb"HTTP/1\.[01] (\d{3}) ", raw)
    assert match, f"not an HTTP response: {raw[:200]!r}"
    return int(match.group(1))


def ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as probe:
            probe.bind(("::1", 0))
    except OSError:
        return False
    return True


# --- basics ------------------------------------------------------------------------------


def test_get_is_answered_by_a_worker(server_factory: ServerFactory) -> None:
    server = server_factory(settings())
    response = fetch(address(server), "GET", "/")
    assert response.status == 200
    assert response.header("Server") == "preforkd"
    assert response.header("Content-Length") == str(len(response.body))
    assert int(response.body) in server.worker_pids()


def test_keepalive_serves_several_requests_on_one_connection(
    server_factory: ServerFactory,
) -> None:
    server = server_factory(settings())
    with connect(address(server)) as sock:
        bodies = []
        for _ in range(4):
            sock.sendall(http_request("GET", "/"))
            response = read_response(sock)
            assert response.status == 200
            assert (response.header("Connection") or "").lower() != "close"
            bodies.append(response.body)
    assert len(set(bodies)) == 1, f"one connection, one worker: {bodies}"
    assert int(bodies[0]) in server.worker_pids()


def test_http10_closes_by_default_and_keeps_alive_on_request(
    server_factory: ServerFactory,
) -> None:
    server = server_factory(settings())
    with connect(address(server)) as sock:
        sock.sendall(http_request("GET", "/", version="HTTP/1.0"))
        assert read_response(sock).status == 200
        assert recv_until_close(sock) == b"", "HTTP/1.0 without keep-alive must close"

    with connect(address(server)) as sock:
        keepalive = [("Connection", "keep-alive")]
        for _ in range(2):
            sock.sendall(http_request("GET", "/", keepalive, version="HTTP/1.0"))
            response = read_response(sock)
            assert response.status == 200
            assert response.header("Content-Length") == str(len(response.body))


def test_idle_keepalive_connection_is_closed_after_keepalive_timeout(
    server_factory: ServerFactory,
) -> None:
    server = server_factory(settings(http={"keepalive_timeout": 0.5}))
    with connect(address(server)) as sock:
        sock.sendall(http_request("GET", "/"))
        assert read_response(sock).status == 200
        answered = time.monotonic()
        assert recv_until_close(sock, timeout=5) == b""
        idle = time.monotonic() - answered
    assert 0.3 <= idle < 4, f"closed after {idle:.2f}s idle, keepalive_timeout is 0.5s"


# --- bodies ------------------------------------------------------------------------------


def test_chunked_request_body_is_decoded_for_the_app(server_factory: ServerFactory) -> None:
    server = server_factory(settings())
    chunks = [b"hello, ", b"chunked ", b"world" * 100]
    encoded = b"".join(b"%x\r\n%s\r\n" % (len(c), c) for c in chunks) + b"0\r\n\r\n"
    request = http_request("POST", "/echo", [("Transfer-Encoding", "chunked")]) + encoded
    with connect(address(server)) as sock:
        sock.sendall(request)
        response = read_response(sock)
        assert response.status == 200
        assert response.body == b"".join(chunks)
        # The connection stays usable: the whole chunked body (and its end) was consumed.
        sock.sendall(http_request("POST", "/echo", body=b"second"))
        assert read_response(sock).body == b"second"


def test_generator_body_is_sent_chunked_on_http11(server_factory: ServerFactory) -> None:
    server = server_factory(settings())
    with connect(address(server)) as sock:
        sock.sendall(http_request("GET", "/stream"))
        response = read_response(sock)
        assert response.status == 200
        assert response.header("Transfer-Encoding") == "chunked"
        assert response.header("Content-Length") is None
        assert response.body == b"first,second,third"
        sock.sendall(http_request("GET", "/"))
        assert read_response(sock).status == 200


def test_generator_body_is_close_delimited_on_http10(server_factory: ServerFactory) -> None:
    server = server_factory(settings())
    raw = send_raw(address(server), http_request("GET", "/stream", version="HTTP/1.0"))
    head, _, body = raw.partition(b"\r\n\r\n")
    assert status_of(raw) == 200
    assert b"transfer-encoding" not in head.lower()
    assert body == b"first,second,third"


def test_pipelined_requests_are_answered_in_order(server_factory: ServerFactory) -> None:
    server = server_factory(settings())
    bodies = [b"one", b"two" * 1000, b"three"]
    with connect(address(server)) as sock:
        sock.sendall(b"".join(http_request("POST", "/echo", body=b) for b in bodies))
        answers = [read_response(sock) for _ in bodies]
    assert [a.status for a in answers] == [200, 200, 200]
    assert [a.body for a in answers] == bodies


def test_expect_100_continue(server_factory: ServerFactory) -> None:
    server = server_factory(settings())
    body = b"sent after the 100"
    head = http_request(
        "POST", "/echo", [("Expect", "100-continue"), ("Content-Length", str(len(body)))]
    )
    with connect(address(server)) as sock:
        sock.sendall(head)
        interim = read_response(sock)
        assert interim.status == 100
        sock.sendall(body)
        final = read_response(sock)
    assert final.status == 200
    assert final.body == body


def test_no_100_continue_when_the_app_does_not_read_the_body(
    server_factory: ServerFactory,
) -> None:
    server = server_factory(settings())
    head = http_request("POST", "/", [("Expect", "100-continue"), ("Content-Length", "5")])
    with connect(address(server)) as sock:
        sock.sendall(head)
        response = read_response(sock)  # the body is never sent
    assert response.status == 200, "the final answer, not 100 Continue"
    assert int(response.body) in server.worker_pids()


def test_head_has_headers_but_no_body(server_factory: ServerFactory) -> None:
    server = server_factory(settings())
    with connect(address(server)) as sock:
        for target in ("/", "/stream"):
            sock.sendall(http_request("HEAD", target))
            response = read_response(sock, method="HEAD")
            assert response.status == 200
            assert response.header("Server") == "preforkd"
        # Had a body been sent, it would be read here as the next response's status line.
        sock.sendall(http_request("GET", "/"))
        response = read_response(sock)
    assert response.status == 200
    assert int(response.body) in server.worker_pids()


# --- errors ------------------------------------------------------------------------------


def test_app_exception_gives_500_and_the_worker_keeps_serving(
    server_factory: ServerFactory,
) -> None:
    server = server_factory(settings(workers={"count": 1}))
    before = int(fetch(address(server)).body)

    with connect(address(server)) as sock:
        sock.sendall(http_request("GET", "/boom"))
        response = read_response(sock)
        assert response.status == 500
        assert (response.header("Connection") or "").lower() == "close"
        assert recv_until_close(sock) == b""

    server.wait_for_log("RuntimeError: deliberate failure from pf_testapp")
    assert "Traceback (most recent call last)" in server.log()
    after = fetch(address(server))
    assert after.status == 200
    assert int(after.body) == before, "the worker should survive an app exception"


def test_exception_mid_stream_cuts_the_chunked_response(server_factory: ServerFactory) -> None:
    """After the head is sent a 500 is impossible: the body must end without its last chunk."""
    server = server_factory(settings(workers={"count": 1}))
    with connect(address(server)) as sock:
        sock.sendall(http_request("GET", "/stream-boom"))
        with pytest.raises(EOFError, match="chunk size"):
            read_response(sock)
    server.wait_for_log("RuntimeError: deliberate failure in the middle of a streamed body")
    assert fetch(address(server)).status == 200


def test_slow_request_head_gets_408(server_factory: ServerFactory) -> None:
    server = server_factory(settings(workers={"count": 1}, http={"header_timeout": 0.5}))
    started = time.monotonic()
    raw = send_raw(address(server), b"GET / HTTP/1.1\r\nHost: x\r\n", timeout=5)
    elapsed = time.monotonic() - started
    assert status_of(raw) == 408
    assert 0.4 <= elapsed < 4, f"408 after {elapsed:.2f}s, header_timeout is 0.5s"


def test_stalled_request_body_is_dropped_after_body_timeout(
    server_factory: ServerFactory,
) -> None:
    server = server_factory(settings(workers={"count": 1}, http={"body_timeout": 0.5}))
    started = time.monotonic()
    request = http_request("POST", "/echo", [("Content-Length", "10")]) + b"abc"
    raw = send_raw(address(server), request, timeout=5)
    elapsed = time.monotonic() - started
    assert not raw.startswith(b"HTTP/1.1 200"), raw
    assert 0.4 <= elapsed < 4, f"closed after {elapsed:.2f}s, body_timeout is 0.5s"
    assert fetch(address(server)).status == 200


def rejection(where: tuple[Any, ...], data: bytes) -> int | str:
    """Status of the answer to `data`, or a description if the server kept the connection."""
    try:
        return status_of(send_raw(where, data))
    except AssertionError as exc:  # send_raw: the peer did not close
        return f"connection left open: {exc}"


MALFORMED = {
    "bad-version": b"THIS IS NOT HTTP\r\n\r\n",
    "extra-token": b"GET / HTTP/1.1 extra\r\nHost: x\r\n\r\n",
    "space-in-target": b"GET /a b HTTP/1.1\r\nHost: x\r\n\r\n",
    "tls-hello": b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03\r\n\r\n",
    "header-without-colon": b"GET / HTTP/1.1\r\nHost: x\r\nno colon here\r\n\r\n",
    "bad-content-length": b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: nine\r\n\r\n",
    "bad-chunk-size": b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
    b"zz\r\n",
}


def test_malformed_requests_get_400_and_close(server_factory: ServerFactory) -> None:
    server = server_factory(settings(workers={"count": 1}))
    results = {name: rejection(address(server), data) for name, data in MALFORMED.items()}
    assert results == dict.fromkeys(MALFORMED, 400)
    assert fetch(address(server)).status == 200, "the worker should survive bad requests"


def test_request_line_without_http1_version_is_rejected(server_factory: ServerFactory) -> None:
    """No version (HTTP/0.9 style), 0.9 or 2.0: not HTTP/1.x, so 400 (or 505) and close."""
    server = server_factory(settings(workers={"count": 1}))
    requests = {
        "no-version": b"GET /\r\n\r\n",
        "HTTP/0.9": b"GET / HTTP/0.9\r\n\r\n",
        "HTTP/2.0": b"GET / HTTP/2.0\r\nHost: x\r\n\r\n",
    }
    results = {name: rejection(address(server), data) for name, data in requests.items()}
    bad = {name: result for name, result in results.items() if result not in (400, 505)}
    assert not bad, f"answered instead of rejected: {results}"


def test_long_request_line_gets_414(server_factory: ServerFactory) -> None:
    server = server_factory(settings(workers={"count": 1}))
    raw = send_raw(address(server), http_request("GET", "/" + "a" * 9000))
    assert status_of(raw) == 414
    assert fetch(address(server), "GET", "/" + "a" * 8000).status == 200


def test_too_many_or_too_big_headers_get_431(server_factory: ServerFactory) -> None:
    server = server_factory(settings(workers={"count": 1}))
    many = [(f"X-Header-{i}", "v") for i in range(101)]
    assert status_of(send_raw(address(server), http_request("GET", "/", many))) == 431
    huge = [("X-Huge", "v" * 9000)]
    assert status_of(send_raw(address(server), http_request("GET", "/", huge))) == 431
    fine = [(f"X-Header-{i}", "v") for i in range(90)]
    assert fetch(address(server), headers=fine).status == 200


def test_missing_host_on_http11_gets_400(server_factory: ServerFactory) -> None:
    server = server_factory(settings(workers={"count": 1}))
    raw = send_raw(address(server), http_request("GET", "/", host=None))
    assert status_of(raw) == 400
    raw10 = send_raw(address(server), http_request("GET", "/", host=None, version="HTTP/1.0"))
    assert status_of(raw10) == 200, "HTTP/1.0 does not require Host"


# --- keep-alive fairness ------------------------------------------------------------------


def test_idle_keepalive_connections_do_not_starve_new_ones(
    server_factory: ServerFactory,
) -> None:
    server = server_factory(settings(workers={"count": 1}, http={"keepalive_timeout": 30}))
    idle: list[socket.socket] = []
    try:
        for _ in range(5):
            sock = connect(address(server))
            idle.append(sock)
            sock.sendall(http_request("GET", "/"))
            assert read_response(sock).status == 200
        started = time.monotonic()
        response = fetch(address(server), timeout=5)
        elapsed = time.monotonic() - started
        assert response.status == 200
        assert elapsed < 2, f"a new connection waited {elapsed:.2f}s behind idle ones"
        # The idle connections were kept, not dropped to make room.
        idle[0].sendall(http_request("GET", "/"))
        assert read_response(idle[0]).status == 200
    finally:
        for sock in idle:
            sock.close()


def test_idle_connections_at_max_connections_do_not_starve_new_ones(
    server_factory: ServerFactory,
) -> None:
    """At `workers.max_connections`, idle keep-alive connections must not block new ones."""
    server = server_factory(
        settings(workers={"count": 1, "max_connections": 2}, http={"keepalive_timeout": 30})
    )
    idle: list[socket.socket] = []
    try:
        for _ in range(2):
            sock = connect(address(server))
            idle.append(sock)
            sock.sendall(http_request("GET", "/"))
            assert read_response(sock).status == 200
        try:
            response = fetch(address(server), timeout=3)
        except TimeoutError:
            pytest.fail("a new connection got no answer within 3s behind 2 idle keep-alive ones")
    finally:
        for sock in idle:
            sock.close()
    assert response.status == 200


# --- environ -------------------------------------------------------------------------------


def test_environ_basics(server_factory: ServerFactory) -> None:
    server = server_factory(settings())
    headers = [("X-Foo", "first"), ("X-Foo", "second")]
    response = fetch(address(server), "GET", "/environ/%41b%20c?q=%41+b&x=1", headers)
    assert response.status == 200
    environ = json.loads(response.body)
    assert environ["PATH_INFO"] == "/environ/Ab c"
    assert environ["QUERY_STRING"] == "q=%41+b&x=1"
    assert environ["HTTP_X_FOO"] == "first, second"
    assert environ["REMOTE_ADDR"] == "127.0.0.1"
    assert environ["REQUEST_METHOD"] == "GET"
    assert environ["SERVER_PROTOCOL"] == "HTTP/1.1"
    assert environ["SCRIPT_NAME"] == ""


def test_an_absolute_form_target_names_the_host(server_factory: ServerFactory) -> None:
    """RFC 9112 3.2.2: with an absolute-form request-target the server ignores the Host
    field and uses the target's host information; the path and query are the target's."""
    server = server_factory(settings(workers={"count": 1}))
    with connect(address(server)) as sock:
        sock.sendall(
            b"GET http://real.example:8080/environ?x=1 HTTP/1.1\r\n"
            b"Host: spoofed.example\r\n\r\n"
        )
        response = read_response(sock)
    assert response.status == 200, response
    environ = json.loads(response.body)
    assert environ["HTTP_HOST"] == "real.example:8080"
    assert (environ["PATH_INFO"], environ["QUERY_STRING"]) == ("/environ", "x=1")


@pytest.mark.parametrize("userinfo", [b"user@", b"user:pw@", b"@"])
def test_userinfo_in_an_absolute_form_target_is_refused(
    server_factory: ServerFactory, userinfo: bytes
) -> None:
    """RFC 9110 4.2.4: no sender puts userinfo in an http(s) target, and a recipient SHOULD
    treat it as an error: it hides the real authority (http://bank.example@evil.example/).
    nginx answers 400; preforkd once dropped it and served the request."""
    server = server_factory(settings(workers={"count": 1}))
    with connect(address(server)) as sock:
        sock.sendall(
            b"GET http://" + userinfo + b"real.example:8080/environ HTTP/1.1\r\n"
            b"Host: real.example\r\n\r\n"
        )
        response = read_response(sock)
        assert response.status == 400, response
        assert response.header("connection") == "close"
        sock.settimeout(5)
        assert sock.recv(1) == b""  # and the connection is closed


# --- binds, protocols, logs ---------------------------------------------------------------


def test_several_binds_at_once_and_unix_socket_removed_at_exit(
    server_factory: ServerFactory, short_tmp: Path
) -> None:
    unix_path = short_tmp / "pf.sock"
    binds = ["127.0.0.1:0", f"unix:{unix_path}"]
    if ipv6_loopback():
        binds.insert(1, "[::1]:0")
    server = server_factory(settings(bind=binds))

    addresses = server.addresses()
    assert len(addresses) == len(binds), addresses
    assert ("unix", str(unix_path)) in addresses
    assert any(a[0] == "http" and a[1] == "127.0.0.1" for a in addresses)
    if "[::1]:0" in binds:
        assert any(a[0] == "http" and a[1] == "::1" for a in addresses)
    for where in addresses:
        response = fetch(where)
        assert response.status == 200, where
        assert int(response.body) in server.worker_pids()
    assert unix_path.exists()

    server.signal(signal.SIGTERM)
    assert server.wait_exit(10) == 0
    assert not unix_path.exists(), "the unix socket file should be removed at exit"


def test_ipv6_bind_serves(server_factory: ServerFactory) -> None:
    if not ipv6_loopback():
        pytest.skip("no IPv6 on the loopback interface")
    server = server_factory(settings(bind=["[::1]:0"]))
    assert server.url.startswith("http://[::1]:")
    response = fetch(address(server))
    assert response.status == 200


def test_tcp_protocol_echo_handler(server_factory: ServerFactory) -> None:
    server = server_factory(settings(app="pf_testapp:tcp_echo", protocol="tcp"))
    assert re.search(r"listening at tcp://127\.0\.0\.1:\d+", server.log())
    where = address(server)
    assert where[0] == "tcp"
    payload = bytes(range(256)) * 400  # binary, bigger than one read
    with connect(where) as sock:
        sock.sendall(payload)
        received = bytearray()
        wait_until(
            lambda: received.extend(sock.recv(65536)) or len(received) >= len(payload),
            timeout=5,
            message="echo incomplete",
        )
        assert bytes(received) == payload
        sock.sendall(b"again")
        assert sock.recv(100) == b"again"


def test_access_log_in_combined_format(server_factory: ServerFactory) -> None:
    server = server_factory(settings(logging={"access_log": "access.log"}))
    access_log = server.workdir / "access.log"
    headers = [("Referer", "http://example.test/from"), ("User-Agent", "pf-test-agent/1.0")]
    response = fetch(address(server), "GET", "/environ?x=1", headers)
    assert response.status == 200

    line = wait_until(
        lambda: access_log.exists() and access_log.read_text().strip(),
        timeout=5,
        message="no access log line",
    )
    pattern = (
        r'127\.0\.0\.1 - - \[\d{2}/[A-Z][a-z]{2}/\d{4}:\d{2}:\d{2}:\d{2} [+-]\d{4}\] '
        r'"GET /environ\?x=1 HTTP/1\.1" 200 (\d+) '
        r'"http://example\.test/from" "pf-test-agent/1\.0"'
        r"( \d+)?"  # preforkd appends the duration in microseconds
    )
    match = re.fullmatch(pattern, line)
    assert match, f"not a combined-format line: {line!r}"
    assert int(match.group(1)) == len(response.body)
