"""Defect 2: with `http.forwarded_header: forwarded`, a trusted proxy's RFC 7239 element that
hides its client (`for=_hidden`, `for=unknown`, no `for` at all: section 6.3) left
wsgi.url_scheme "http" whatever its `proto=` said, because the scheme was taken only from an
element whose `for` was an address. The scheme now comes from the element the trusted chain
chooses; the address stays the proxy's when the client is hidden, and the trust rules (the
right-most hop that is not a trusted proxy, nothing left of what cannot be believed, nothing
at all from a peer that is not trusted) are unchanged."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import pytest

from prefork.forwarded import TrustedProxies
from tests.unit.worker_rig import DEADLINE, WorkerRig, conn_of, hello, read_response, wait_readable

PROXIES = ["127.0.0.1", "10.0.0.0/8"]
PEER = ("127.0.0.1", "5555")


def resolve(forwarded: str, entries: Sequence[str] = PROXIES) -> tuple[str, str | None, str]:
    """(REMOTE_ADDR, REMOTE_PORT, wsgi.url_scheme) after resolve() for a request from the
    trusted proxy 127.0.0.1:5555 carrying `Forwarded: <forwarded>`."""
    env: dict[str, Any] = {
        "REMOTE_ADDR": PEER[0],
        "REMOTE_PORT": PEER[1],
        "wsgi.url_scheme": "http",
        "HTTP_FORWARDED": forwarded,
    }
    TrustedProxies(list(entries), "forwarded").resolve(env)
    return env["REMOTE_ADDR"], env.get("REMOTE_PORT"), env["wsgi.url_scheme"]


@pytest.mark.parametrize(
    "forwarded",
    [
        "for=_hidden;proto=https",
        "for=unknown;proto=https",
        "for=UNKNOWN;proto=HTTPS",
        'for="_gazonk";proto=https',
        'for="_hidden:_port";proto=https',
        'for="unknown:4711";proto=https',
        "proto=https",
        "by=203.0.113.43;proto=https",
        # a hidden hop is not a trusted proxy: nothing left of it is believed
        "for=203.0.113.7;proto=http, for=_hidden;proto=https",
        "for=6.6.6.6, proto=https",
    ],
)
def test_a_hidden_client_still_gets_its_scheme(forwarded: str) -> None:
    """Defect 2: the proxy's proto=https was dropped because its element's `for` was not an
    address; the scheme is now https, and the address and port stay the proxy's."""
    assert resolve(forwarded) == (PEER[0], PEER[1], "https")


def test_a_hidden_client_behind_a_trusted_hop_is_credited_to_that_hop() -> None:
    """Defect 2: the trusted load balancer 10.0.0.2 received the hidden client over https;
    the scheme came from the load balancer's own (internal, http) element. The address is
    the load balancer's, as for any chain an unusable entry ends."""
    forwarded = "for=_hidden;proto=https, for=10.0.0.2;proto=http"
    assert resolve(forwarded) == ("10.0.0.2", None, "https")


@pytest.mark.parametrize(
    ("forwarded", "expected"),
    [
        # the right-most untrusted hop is an address: its element, as before
        ("for=_hidden;proto=https, for=203.0.113.7;proto=http", ("203.0.113.7", None, "http")),
        ("for=_hidden;proto=http, for=203.0.113.7;proto=https", ("203.0.113.7", None, "https")),
        # a client writing https left of the hidden hop our proxy wrote does not get it
        ("for=203.0.113.7;proto=https, for=_hidden;proto=http", (*PEER, "http")),
        ("for=6.6.6.6;proto=https, for=unknown", (*PEER, "http")),
        # only http and https are schemes
        ("for=_hidden;proto=gopher", (*PEER, "http")),
        ("for=_hidden", (*PEER, "http")),
        # a `for` that is neither an address nor a hidden node is not a proxy's: nothing
        # from it, nor from the left of it, as with an unusable X-Forwarded-For entry
        ("for=example.com;proto=https", (*PEER, "http")),
        ('for="";proto=https', (*PEER, "http")),
        ("for=_;proto=https", (*PEER, "http")),
        ("for=_a b;proto=https", (*PEER, "http")),
        ("for=_hidden;proto=https, for=garbage;proto=https", (*PEER, "http")),
        ("garbage", (*PEER, "http")),
        ("for=example.com;proto=https, for=10.0.0.2;proto=http", ("10.0.0.2", None, "http")),
    ],
)
def test_the_trust_rules_still_hold(forwarded: str, expected: tuple[str, str | None, str]) -> None:
    """Defect 2's fix must not let a client choose its scheme or address."""
    assert resolve(forwarded) == expected


# --- through a worker: only a trusted peer's header is read ------------------------------


def environ_for(rig: WorkerRig, forwarded: bytes, allow: list[str]) -> dict[str, Any]:
    """The environ the application gets for a request from 127.0.0.1 carrying `forwarded`,
    with forwarded_allow_ips `allow` and forwarded_header: forwarded."""
    worker, _ = rig.worker(forwarded_header="forwarded", forwarded_allow_ips=allow)
    seen: list[dict[str, Any]] = []

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
        seen.append(dict(environ))
        return hello(environ, start_response)

    assert worker.protocol is not None
    worker.protocol.app = app
    client = rig.connect()
    client.sendall(b"GET / HTTP/1.1\r\nHost: t\r\nForwarded: " + forwarded + b"\r\n\r\n")
    rig.accept(worker)
    deadline = time.monotonic() + DEADLINE
    while not seen:
        assert time.monotonic() < deadline, "the request was never answered"
        conn = conn_of(worker, client)
        wait_readable(worker, conn.fd)
        worker.on_readable(conn)
    assert read_response(client).startswith(b"HTTP/1.1 200 OK\r\n")
    return seen[0]


def test_a_trusted_proxy_hiding_its_client_sets_the_scheme(worker_rig: WorkerRig) -> None:
    """Defect 2, end to end: behind a trusted proxy that hides the client, the application
    saw http for an https request."""
    env = environ_for(worker_rig, b"for=_hidden;proto=https", ["127.0.0.1"])
    assert env["wsgi.url_scheme"] == "https"
    assert env["REMOTE_ADDR"] == "127.0.0.1" and env["REMOTE_PORT"].isdigit()


@pytest.mark.parametrize(
    "forwarded",
    [b"for=_hidden;proto=https", b"for=unknown;proto=https", b"proto=https",
     b"for=203.0.113.7;proto=https"],
)
def test_an_untrusted_peer_changes_nothing(worker_rig: WorkerRig, forwarded: bytes) -> None:
    """Defect 2's fix reads a hidden client's proto only from a trusted proxy: a peer that is
    not one (127.0.0.1 outside forwarded_allow_ips) still changes neither scheme nor address."""
    env = environ_for(worker_rig, forwarded, ["10.0.0.0/8"])
    assert env["wsgi.url_scheme"] == "http"
    assert env["REMOTE_ADDR"] == "127.0.0.1" and env["REMOTE_PORT"].isdigit()
    assert env["HTTP_FORWARDED"] == forwarded.decode()  # passed on, not acted on
