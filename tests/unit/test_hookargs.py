"""prefork.hookargs: the `req` and `resp` the per-request hooks get, as preforkd's own hooks
read them (a mapping over the environ) and as gunicorn's do (its Request and Response
attributes); and HttpProtocol calling pre_request and both forms of post_request with them.

Requests go through a real HttpProtocol on a socketpair; the hooks are functions of a
module written to tmp_path and loaded by Hooks, as the server loads them.
"""

from __future__ import annotations

import socket
import sys
import textwrap
import types
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import pytest

from prefork.addresses import Address
from prefork.config import HooksConfig, from_mapping
from prefork.connection import Connection
from prefork.hookargs import HookRequest, HookResponse
from prefork.hooks import HookError, Hooks, WorkerInfo
from prefork.http import Limits, Request
from prefork.httpserve import HttpProtocol
from prefork.logs import Logs
from prefork.scoreboard import Scoreboard

PEER = ("192.0.2.7", 50123)
HEAD = (
    b"GET /a%20b/c?x=1&y=%41 HTTP/1.1\r\nHost: example.com\r\nAccept: text/plain\r\n"
    b"X-Token: one\r\nx-token: two\r\nX_Under: dropped\r\n\r\n"
)

HOOK_SOURCE = """
calls = []

def preforkd_pre_request(worker, environ):
    calls.append(("pre", environ["PATH_INFO"], environ.get("HTTP_HOST")))
    environ["HTTP_X_FROM_HOOK"] = "yes"

def gunicorn_pre_request(worker, req):
    worker.log.debug("%s %s" % (req.method, req.path))  # gunicorn's example_config.py
    calls.append(("pre", req.method, req.path, req.query, req.version, req.uri))
    req.started = "kept"

def preforkd_post_request(worker, environ, status):
    calls.append(("post", environ["PATH_INFO"], status))

def gunicorn_post_request(worker, req, environ, resp):
    calls.append(("post", req.method, req.path, getattr(req, "started", None),
                  environ["PATH_INFO"], resp.status, resp.status_code, resp.headers,
                  resp.sent, resp.response_length))

def any_post_request(*args):
    calls.append(("post", len(args)))

def misfit(worker):
    pass
"""


@pytest.fixture
def hook_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """A fresh importable module with the functions in HOOK_SOURCE."""
    monkeypatch.setattr(sys, "dont_write_bytecode", True)
    monkeypatch.syspath_prepend(str(tmp_path))
    name = f"pf_hookargs_unit_{uuid.uuid4().hex[:12]}"
    (tmp_path / f"{name}.py").write_text(textwrap.dedent(HOOK_SOURCE))
    try:
        yield types.SimpleNamespace(name=name, calls=lambda: sys.modules[name].calls)
    finally:
        sys.modules.pop(name, None)


@pytest.fixture
def scoreboard() -> Iterator[Scoreboard]:
    board = Scoreboard(2)
    yield board
    board.close()


def app(environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
    assert type(environ) is dict  # PEP 3333: a hook being configured changes nothing here
    body = environ.get("HTTP_X_FROM_HOOK", "no").encode()
    start_response("201 Created", [("Content-Type", "text/plain"),
                                   ("Content-Length", str(len(body))), ("Connection", "close")])
    return [body]


class Rig:
    """An HttpProtocol with `hooks`, and a connection to it on a socketpair."""

    def __init__(self, logs: Logs, scoreboard: Scoreboard, hooks: Hooks | None) -> None:
        self.server, self.client = socket.socketpair()
        self.client.settimeout(5.0)
        listener = types.SimpleNamespace(fd=1000, address=Address("tcp", "10.1.2.3", 8080),
                                         tls=False)
        self.conn = Connection(self.server, PEER, listener, Limits())
        self.worker = WorkerInfo(1, 1, from_mapping({"app": "app:app"}))
        self.protocol = HttpProtocol(
            app, scoreboard.slot(0), logs, 0, body_timeout=5.0, send_timeout=5.0,
            server_header="", hooks=hooks, worker_info=self.worker,
        )

    def request(self, head: bytes = HEAD) -> Request:
        self.conn.parser.feed(head)
        request: Request = self.conn.parser.requests.popleft()
        self.conn.served += 1
        return request

    def serve(self, head: bytes = HEAD) -> bytes:
        self.conn.parser.feed(head)
        self.protocol.serve(self.conn, True)
        data = b""
        while b"\r\n\r\n" not in data:
            data += self.client.recv(65536)
        return data

    def close(self) -> None:
        self.server.close()
        self.client.close()


@pytest.fixture
def rig(logs: Logs, scoreboard: Scoreboard) -> Iterator[Any]:
    made: list[Rig] = []

    def make(hooks: Hooks | None = None) -> Rig:
        made.append(Rig(logs, scoreboard, hooks))
        return made[-1]

    yield make
    for r in made:
        r.close()


def test_the_request_view_is_the_environ_as_a_mapping_and_writes_reach_it(rig: Any) -> None:
    r = rig()
    request = r.request()
    env = r.protocol.environ(r.conn, request)
    req = HookRequest(env, request, r.conn)
    assert req["PATH_INFO"] == "/a b/c" and req.get("HTTP_HOST") == "example.com"
    assert req.get("HTTP_MISSING") is None and "QUERY_STRING" in req and "nope" not in req
    assert dict(req) == env and req == env and len(req) == len(env)
    assert set(req.keys()) == set(env) and req.copy() == env and type(req.copy()) is dict
    req["HTTP_X_ADDED"] = "1"
    req.update({"HTTP_X_MORE": "2"})
    assert req.setdefault("HTTP_X_ADDED", "other") == "1"
    del req["HTTP_ACCEPT"]
    assert req.pop("HTTP_X_MORE") == "2"
    assert env["HTTP_X_ADDED"] == "1" and "HTTP_ACCEPT" not in env and "HTTP_X_MORE" not in env
    with pytest.raises(KeyError):
        req["HTTP_MISSING"]


def test_the_request_view_has_gunicorns_request_attributes(rig: Any) -> None:
    """Names and types of gunicorn's http.message.Request: str parts of the target as sent
    (not percent-decoded), the version as a tuple, headers as (UPPER-NAME, value)."""
    r = rig()
    request = r.request()
    env = r.protocol.environ(r.conn, request)
    req = HookRequest(env, request, r.conn)
    assert (req.method, req.uri, req.path, req.query, req.fragment) == (
        "GET", "/a%20b/c?x=1&y=%41", "/a%20b/c", "x=1&y=%41", ""
    )
    assert req.version == (1, 1)
    assert req.headers == [("HOST", "example.com"), ("ACCEPT", "text/plain"),
                           ("X-TOKEN", "one"), ("X-TOKEN", "two")]
    assert req.headers is req.headers  # made once, when first read
    assert (req.scheme, req.peer_addr, req.remote_addr, req.req_number) == (
        "http", PEER, PEER, 1
    )
    assert req.should_close() is False
    req.started = 12.5  # type: ignore[attr-defined]  # a hook's own, as on gunicorn's object
    assert req.started == 12.5  # type: ignore[attr-defined]

    request = r.request(b"POST /p#frag HTTP/1.0\r\n\r\n")
    req = HookRequest(r.protocol.environ(r.conn, request), request, r.conn)
    assert (req.path, req.query, req.version, req.req_number) == ("/p", "", (1, 0), 2)
    assert req.should_close() is True


def test_the_response_view_says_what_went_out(rig: Any, hook_module: Any) -> None:
    hooks = Hooks(HooksConfig(post_request=f"{hook_module.name}:gunicorn_post_request"))
    r = rig(hooks)
    answer = r.serve()
    assert answer.startswith(b"HTTP/1.1 201 Created\r\n")
    [call] = hook_module.calls()
    assert call == (
        "post", "GET", "/a%20b/c", None, "/a b/c", "201 Created", 201,
        [("Content-Type", "text/plain"), ("Content-Length", "2")], 2, 2,
    )


def test_an_error_page_is_the_response_a_hook_sees() -> None:
    response = types.SimpleNamespace(status=b"200 OK", status_code=500, bytes_sent=26,
                                     content_length=None, head_sent=False, chunked=False,
                                     headers=b"Content-Type: text/plain\r\n")
    resp = HookResponse(response)  # type: ignore[arg-type]
    assert (resp.status, resp.status_code, resp.headers, resp.sent) == (
        "500 Internal Server Error", 500, [], 26
    )


@pytest.mark.parametrize(
    ("pre", "post", "expected"),
    [
        # preforkd's forms: the environ (through the view) and the status as an int
        ("preforkd_pre_request", "preforkd_post_request",
         [("pre", "/a b/c", "example.com"), ("post", "/a b/c", 201)]),
        # gunicorn's: the same req object in both hooks, so what pre_request set is there
        ("gunicorn_pre_request", "gunicorn_post_request",
         [("pre", "GET", "/a%20b/c", "x=1&y=%41", (1, 1), "/a%20b/c?x=1&y=%41"),
          ("post", "GET", "/a%20b/c", "kept", "/a b/c", "201 Created", 201,
           [("Content-Type", "text/plain"), ("Content-Length", "2")], 2, 2)]),
        # a hook taking *args fits preforkd's form, as before
        ("preforkd_pre_request", "any_post_request",
         [("pre", "/a b/c", "example.com"), ("post", 3)]),
    ],
)
def test_each_form_of_the_request_hooks_is_called_with_its_arguments(
    rig: Any, hook_module: Any, pre: str, post: str, expected: list[Any]
) -> None:
    hooks = Hooks(HooksConfig(pre_request=f"{hook_module.name}:{pre}",
                              post_request=f"{hook_module.name}:{post}"))
    r = rig(hooks)
    answer = r.serve()
    assert answer.startswith(b"HTTP/1.1 201 Created\r\n"), answer
    assert hook_module.calls() == expected
    if pre == "preforkd_pre_request":
        assert answer.endswith(b"\r\n\r\nyes")  # the hook's write reached the application


def test_a_post_request_that_fits_neither_form_is_refused_naming_both(hook_module: Any) -> None:
    with pytest.raises(HookError) as info:
        Hooks(HooksConfig(post_request=f"{hook_module.name}:misfit"))
    assert ("cannot be called as post_request(worker, environ, status) or "
            "post_request(worker, req, environ, resp)") in str(info.value)
    hooks = Hooks(HooksConfig(post_request=f"{hook_module.name}:gunicorn_post_request",
                              pre_request=f"{hook_module.name}:gunicorn_pre_request"))
    assert hooks.forms == {"post_request": ("worker", "req", "environ", "resp"),
                           "pre_request": ("worker", "req")}
