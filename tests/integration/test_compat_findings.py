"""What an application or a client that worked under gunicorn, uWSGI or nginx meets here,
against the real server: a bare WSGI status code, an empty Expect field, and a hook that
calls sys.exit(). Each of these once broke what those servers take.
"""

from __future__ import annotations

import os
import signal

import pytest

from harness import Address, ServerFactory, connect, read_response, wait_until

APP = """
import os
import sys


def app(environ, start_response):
    body = environ["wsgi.input"].read()
    if environ["PATH_INFO"] == "/bare":
        start_response("200", [("Content-Type", "text/plain")])  # no reason phrase
        return [b"bare"]
    if environ["PATH_INFO"] == "/bare-unregistered":
        start_response("299", [("Content-Type", "text/plain")])
        return [b"odd"]
    start_response("200 OK", [("Content-Type", "text/plain"), ("X-Pid", str(os.getpid()))])
    return [b"got " + body]


def exits(*args):
    sys.exit(3)


def exits_on_exit_path(worker, environ):
    if environ["PATH_INFO"] == "/exit":
        raise SystemExit("pre_request says no")
"""


def request(where: Address, raw: bytes) -> tuple[int, dict[str, str], bytes]:
    with connect(where) as sock:
        sock.sendall(raw)
        response = read_response(sock)
    return response.status, {k.lower(): v for k, v in response.headers}, response.body


def get(where: Address, path: str) -> tuple[int, dict[str, str], bytes]:
    return request(where, f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())


@pytest.fixture
def server_where(server_factory: ServerFactory) -> Address:
    server = server_factory({"app": "app:app", "workers": {"count": 1}}, app_source=APP)
    return server.addresses()[0]


@pytest.mark.parametrize(
    ("path", "line"),
    [("/bare", b"HTTP/1.1 200 OK\r\n"), ("/bare-unregistered", b"HTTP/1.1 299 \r\n")],
)
def test_a_bare_status_code_is_served_with_its_reason_phrase(
    server_where: Address, path: str, line: bytes
) -> None:
    """Defect: start_response("200", ...) got a 500 ("invalid WSGI status"); gunicorn and
    uWSGI pass it on, and apps moved from them return it. The status line gets the
    registered phrase, or an empty one (RFC 9112 4 keeps the space before it)."""
    with connect(server_where) as sock:
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
        sock.settimeout(5)
        raw = b""
        while chunk := sock.recv(65536):
            raw += chunk
    assert raw.startswith(line), raw


@pytest.mark.parametrize("expect", [b"Expect:", b"Expect: ", b"Expect: ,"])
def test_an_empty_expect_field_expects_nothing(
    server_where: Address, expect: bytes
) -> None:
    """Defect: an empty Expect field got 417; it lists no expectation (RFC 9110 5.6.1: empty
    list elements are ignored), and gunicorn and nginx serve the request. The connection
    stays open for the next one."""
    with connect(server_where) as sock:
        for _ in range(2):
            sock.sendall(
                b"PUT /f HTTP/1.1\r\nHost: x\r\n" + expect + b"\r\nContent-Length: 3\r\n\r\nabc"
            )
            response = read_response(sock)
            assert (response.status, response.body) == (200, b"got abc"), response


def test_an_unknown_expectation_is_still_refused(server_where: Address) -> None:
    """Pinned: an expectation preforkd cannot meet is a 417 (RFC 9110 10.1.1), beside
    100-continue or alone, and the connection closes (the body was never asked for)."""
    status, headers, _ = request(
        server_where,
        b"PUT /f HTTP/1.1\r\nHost: x\r\nExpect: 100-continue, x-fancy\r\n"
        b"Content-Length: 3\r\n\r\nabc",
    )
    assert (status, headers.get("connection")) == (417, "close")


def test_a_hook_that_calls_sys_exit_is_a_failing_hook(server_factory: ServerFactory) -> None:
    """Defect: a hook's SystemExit went through Hooks.call. when_ready's ended the master
    as it became ready (every worker with it); child_exit's and nworkers_changed's ended it
    later; post_request's and pre_request's ended the worker and its client's connection.
    Now it is logged as the hook's failure, as an exception is, and what that failure means
    follows: nothing for the master's hooks and post_request, a 500 for pre_request."""
    master_hooks = ("when_ready", "child_exit", "nworkers_changed")
    hooks = {name: "app:exits" for name in (*master_hooks, "post_request")}
    hooks["pre_request"] = "app:exits_on_exit_path"
    server = server_factory(
        {"app": "app:app", "workers": {"count": 1}, "hooks": hooks}, app_source=APP
    )
    server.wait_for_log("hook when_ready (app:exits) failed")
    where = server.addresses()[0]
    status, headers, body = get(where, "/")
    assert (status, body) == (200, b"got ")
    first = headers["x-pid"]
    server.wait_for_log("hook post_request (app:exits) failed")
    assert get(where, "/exit")[0] == 500
    server.wait_for_log("hook pre_request (app:exits_on_exit_path) failed")
    status, headers, _ = get(where, "/")
    assert (status, headers["x-pid"]) == (200, first), "the worker was replaced"

    server.signal(signal.SIGTTIN)
    server.wait_for_log("hook nworkers_changed (app:exits) failed")
    wait_until(lambda: len(server.worker_pids()) == 2, 10.0)
    victim = int(first)
    os.kill(victim, signal.SIGKILL)
    server.wait_for_log("hook child_exit (app:exits) failed")
    wait_until(
        lambda: len(server.worker_pids()) == 2 and victim not in server.worker_pids(), 10.0
    )
    assert get(where, "/")[0] == 200
    assert server.proc is not None and server.proc.poll() is None, "the master ended"
    assert "SystemExit: 3" in server.log()


def test_userinfo_refused_over_a_raw_socket_leaves_the_worker_serving(
    server_where: Address,
) -> None:
    """Defect (with test_http's): userinfo in an absolute-form target was dropped and the
    request served; its 400 now ends that connection only, and the worker answers the next."""
    status, headers, _ = request(
        server_where, b"GET http://a@b.example/ HTTP/1.1\r\nHost: b.example\r\n\r\n"
    )
    assert (status, headers.get("connection")) == (400, "close")
    assert get(server_where, "/")[0] == 200


@pytest.mark.parametrize("hook", ["app:exits", "app:raises"])
def test_a_failing_on_starting_hook_stops_the_start(
    server_factory: ServerFactory, hook: str
) -> None:
    """Defect: on_starting's failure was logged and the start went on (its sys.exit() ended
    the master with a traceback and no reason). It is where a pre-flight check goes; as in
    gunicorn, whose master exits on it, the start stops with status 1 and the reason,
    before anything is bound."""
    source = APP + "\n\ndef raises(server):\n    raise RuntimeError('migrations pending')\n"
    server = server_factory(
        {"app": "app:app", "workers": {"count": 1}, "hooks": {"on_starting": hook}},
        app_source=source,
        wait_ready=False,
    )
    assert server.wait_exit(15) == 1
    log = server.log()
    assert f"hook on_starting ({hook}) failed" in log
    assert "; not starting" in log
    assert "listening at" not in log and "booted" not in log
