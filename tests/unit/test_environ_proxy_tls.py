"""The environ a trusted proxy may shape (X-Forwarded-Host/-Port/-Prefix/-Ssl/-Protocol, RFC
7239 `host=`), http.script_name, and the SSL_* keys of a TLS connection.

Requests go through HttpProtocol.environ() on a socketpair, on each kind of listener: a plain
TCP one (the hot path, which tests the forwarding headers inline) and the unix and TLS ones
(HttpProtocol.listener_keys), which must agree. A peer that is not trusted changes nothing.
"""

from __future__ import annotations

import socket
import ssl
import types
from collections.abc import Iterator
from typing import Any

import pytest

from prefork.addresses import Address
from prefork.config import ConfigError, from_mapping
from prefork.connection import Connection
from prefork.forwarded import X_FORWARDED_KEYS, TrustedProxies
from prefork.http import Limits, Request
from prefork.httpserve import OUTSIDE_SCRIPT_NAME, HttpProtocol
from prefork.logs import Logs
from prefork.scoreboard import Scoreboard
from prefork.tls import TLSConnection, client_environ, distinguished_name

PROXY = ("127.0.0.1", 5555)  # a trusted proxy
STRANGER = ("203.0.113.9", 4444)  # a client, not trusted
TCP = Address("tcp", "10.1.2.3", 8080)
UNIX = Address("unix", path="/run/app.sock")
KINDS = ("tcp", "unix", "tls")
TLS_KEYS = {"SSL_PROTOCOL": "TLSv1.3", "SSL_CIPHER": "TLS_AES_256_GCM_SHA384",
            "SSL_CLIENT_VERIFY": "NONE"}


@pytest.fixture
def scoreboard() -> Iterator[Scoreboard]:
    board = Scoreboard(2)
    yield board
    board.close()


class Rig:
    """An HttpProtocol and a connection to it on a socketpair, on a listener of `kind`."""

    def __init__(
        self,
        logs: Logs,
        scoreboard: Scoreboard,
        *,
        kind: str = "tcp",
        peer: Any = PROXY,
        header: str = "x-forwarded",
        script_name: str = "",
        app: Any = None,
    ) -> None:
        self.server, self.client = socket.socketpair()
        self.client.settimeout(5.0)
        address = UNIX if kind.startswith("unix") else TCP
        listener = types.SimpleNamespace(fd=1000, address=address, tls=kind.endswith("tls"))
        self.conn: Connection
        if listener.tls:
            conn = TLSConnection(self.server, peer, listener, Limits())  # type: ignore[arg-type]
            conn.tls_environ = dict(TLS_KEYS)
            self.conn = conn
        else:
            self.conn = Connection(self.server, peer, listener, Limits())
        proxies = TrustedProxies(["127.0.0.1", "unix"], header)
        self.conn.trusted = proxies.trusts(peer)
        self.protocol = HttpProtocol(
            app, scoreboard.slot(0), logs, 0, body_timeout=5.0, send_timeout=5.0,
            server_header="", proxies=proxies, script_name=script_name,
            tls_fds=[listener.fd] if listener.tls else [],
        )

    def request(self, target: str = "/x", headers: dict[str, str] | None = None) -> Request:
        fields = {"Host": "backend:8080", **(headers or {})}
        head = f"GET {target} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in fields.items())
        self.conn.parser.feed(head.encode("latin-1") + b"\r\n")
        return self.conn.parser.requests.popleft()

    def environ(self, target: str = "/x", **headers: str) -> dict[str, Any]:
        return self.protocol.environ(self.conn, self.request(target, _fields(headers)))

    def close(self) -> None:
        self.server.close()
        self.client.close()


def _fields(headers: dict[str, str]) -> dict[str, str]:
    """x_forwarded_host="a" -> {"X-Forwarded-Host": "a"}."""
    return {"-".join(p.capitalize() for p in k.split("_")): v for k, v in headers.items()}


@pytest.fixture
def rig(logs: Logs, scoreboard: Scoreboard) -> Iterator[Any]:
    """rig(**Rig options) -> Rig; all are closed afterwards."""
    made: list[Rig] = []

    def make(**options: Any) -> Rig:
        made.append(Rig(logs, scoreboard, **options))
        return made[-1]

    yield make
    for r in made:
        r.close()


def where(env: dict[str, Any]) -> tuple[str, str, str, str]:
    return env["wsgi.url_scheme"], env.get("HTTP_HOST", ""), env["SERVER_NAME"], env["SERVER_PORT"]


# --- X-Forwarded-Host, -Port, -Ssl, -Protocol ---------------------------------------------


def changed(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in after.items() if before.get(k) != v and k != "wsgi.input"}


HOST = ("HTTP_HOST", "SERVER_NAME", "SERVER_PORT")


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        # ProxyFix: the host the client asked for; its port, else the scheme's default
        ({"x_forwarded_host": "example.com"}, {HOST: ("example.com", "example.com", "80")}),
        ({"x_forwarded_host": "example.com", "x_forwarded_proto": "https"},
         {HOST: ("example.com", "example.com", "443"), "wsgi.url_scheme": "https"}),
        ({"x_forwarded_host": "example.com:8000"},
         {HOST: ("example.com:8000", "example.com", "8000")}),
        ({"x_forwarded_host": "[2001:db8::1]:8443"},
         {HOST: ("[2001:db8::1]:8443", "[2001:db8::1]", "8443")}),
        # a list: the right-most value, the one our proxy set
        ({"x_forwarded_host": "evil.test, example.com"},
         {HOST: ("example.com", "example.com", "80")}),
        # X-Forwarded-Port rewrites the port of the Host, left out when it is the default
        ({"x_forwarded_port": "8443"}, {("HTTP_HOST", "SERVER_PORT"): ("backend:8443", "8443")}),
        ({"x_forwarded_host": "example.com", "x_forwarded_port": "443",
          "x_forwarded_proto": "https"},
         {HOST: ("example.com", "example.com", "443"), "wsgi.url_scheme": "https"}),
        ({"x_forwarded_host": "example.com:1", "x_forwarded_port": "8443"},
         {HOST: ("example.com:8443", "example.com", "8443")}),
        # gunicorn's secure_scheme_headers, alone or agreeing
        ({"x_forwarded_ssl": "on"}, {"wsgi.url_scheme": "https"}),
        ({"x_forwarded_ssl": "ON"}, {"wsgi.url_scheme": "https"}),
        ({"x_forwarded_protocol": "ssl"}, {"wsgi.url_scheme": "https"}),
        ({"x_forwarded_ssl": "on", "x_forwarded_proto": "https", "x_forwarded_protocol": "ssl"},
         {"wsgi.url_scheme": "https"}),
        ({"x_forwarded_ssl": "off"}, {"wsgi.url_scheme": "http"}),
    ],
)
def test_a_trusted_proxy_sets_host_port_and_scheme(
    rig: Any, kind: str, headers: dict[str, str], expected: dict[Any, Any]
) -> None:
    want: dict[str, Any] = {}
    for keys, values in expected.items():
        want.update(zip(keys, values, strict=True) if isinstance(keys, tuple) else [(keys, values)])
    plain = rig(kind=kind).environ()
    if want.get("SERVER_PORT") == "80" and plain["wsgi.url_scheme"] == "https":
        want["SERVER_PORT"] = "443"  # a TLS listener's scheme, which no header here changes
    env = rig(kind=kind).environ(**headers)
    assert {k: env[k] for k in want} == want
    # and nothing else changed, but for the headers themselves
    assert {k for k in changed(plain, env) if not k.startswith("HTTP_X_")} <= set(want)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize(
    "headers",
    [
        # scheme headers that disagree: none is believed
        {"x_forwarded_proto": "https", "x_forwarded_ssl": "off"},
        {"x_forwarded_proto": "http", "x_forwarded_protocol": "ssl"},
        # values that name no scheme say nothing
        {"x_forwarded_ssl": "yes"},
        {"x_forwarded_protocol": "tls"},
        # malformed hosts and ports
        {"x_forwarded_host": "exa mple.com"},
        {"x_forwarded_host": "example.com:99999"},
        {"x_forwarded_host": "example.com:0"},
        {"x_forwarded_host": "example.com:http"},
        {"x_forwarded_host": "a/b"},
        {"x_forwarded_host": "[not-v6]"},
        {"x_forwarded_host": ""},
        {"x_forwarded_port": "65536"},
        {"x_forwarded_port": "0"},
        {"x_forwarded_port": "-1"},
        {"x_forwarded_port": "https"},
        {"x_forwarded_port": ""},
        # malformed prefixes
        {"x_forwarded_prefix": "app"},
        {"x_forwarded_prefix": "/app?x=1"},
        {"x_forwarded_prefix": "/"},
        {"x_forwarded_prefix": ""},
    ],
)
def test_conflicting_or_malformed_values_change_nothing(
    rig: Any, kind: str, headers: dict[str, str]
) -> None:
    plain = rig(kind=kind).environ("/app/x")
    env = rig(kind=kind).environ("/app/x", **headers)
    assert where(env) == where(plain)
    assert (env["SCRIPT_NAME"], env["PATH_INFO"]) == ("", "/app/x")


@pytest.mark.parametrize("kind", KINDS)
def test_a_client_that_is_not_a_trusted_proxy_changes_nothing(rig: Any, kind: str) -> None:
    headers = {
        "x_forwarded_for": "6.6.6.6",
        "x_forwarded_host": "evil.test:81",
        "x_forwarded_port": "81",
        "x_forwarded_proto": "https",
        "x_forwarded_ssl": "on",
        "x_forwarded_protocol": "ssl",
        "x_forwarded_prefix": "/evil",
        "forwarded": "for=6.6.6.6;proto=https;host=evil.test",
    }
    for header in ("x-forwarded", "forwarded"):
        plain = rig(kind=kind, peer=STRANGER, header=header).environ("/evil/x")
        env = rig(kind=kind, peer=STRANGER, header=header).environ("/evil/x", **headers)
        assert where(env) == where(plain)
        assert env["REMOTE_ADDR"] == STRANGER[0]
        assert (env["SCRIPT_NAME"], env["PATH_INFO"]) == ("", "/evil/x")


# --- X-Forwarded-Prefix ---------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize(
    ("target", "prefix", "expected"),
    [
        # the proxy stripped its prefix (Traefik's StripPrefix, nginx `proxy_pass .../;`)
        ("/x", "/public", ("/public", "/x")),
        # ... or did not: it comes off PATH_INFO
        ("/public/x", "/public", ("/public", "/x")),
        ("/public", "/public", ("/public", "")),
        ("/public/x", "/public/", ("/public", "/x")),
        # whole segments only
        ("/publication", "/public", ("/public", "/publication")),
        # percent-encoded, like the path
        ("/caf%C3%A9/x", "/caf%C3%A9", ("/caf\xc3\xa9", "/x")),
        ("/x", "/evil, /public", ("/public", "/x")),
    ],
)
def test_x_forwarded_prefix_sets_script_name(
    rig: Any, kind: str, target: str, prefix: str, expected: tuple[str, str]
) -> None:
    env = rig(kind=kind).environ(target, x_forwarded_prefix=prefix)
    assert (env["SCRIPT_NAME"], env["PATH_INFO"]) == expected


def test_x_forwarded_prefix_is_not_read_with_rfc7239(rig: Any) -> None:
    env = rig(header="forwarded").environ("/public/x", x_forwarded_prefix="/public",
                                          forwarded="for=192.0.2.1")
    assert (env["SCRIPT_NAME"], env["PATH_INFO"]) == ("", "/public/x")
    assert env["REMOTE_ADDR"] == "192.0.2.1"


# --- RFC 7239 host= -----------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize(
    ("forwarded", "expected"),
    [
        ("for=192.0.2.1;host=example.com;proto=https",
         ("https", "example.com", "example.com", "443")),
        ('for=192.0.2.1;host="example.com:8000"', ("http", "example.com:8000", "example.com",
                                                    "8000")),
        # the host of the element chosen for the client, not the spoofed one on its left
        ("for=6.6.6.6;host=evil.test, for=192.0.2.1;host=example.com",
         ("http", "example.com", "example.com", "80")),
        ("for=_hidden;host=example.com;proto=https",
         ("https", "example.com", "example.com", "443")),
    ],
)
def test_forwarded_host(rig: Any, kind: str, forwarded: str, expected: tuple[str, ...]) -> None:
    env = rig(kind=kind, header="forwarded").environ(forwarded=forwarded)
    if kind == "tls" and "proto=" not in forwarded:
        expected = ("https", *expected[1:3], "443" if ":" not in expected[1] else expected[3])
    assert where(env) == expected


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("host", ["exa mple", "example.com:99999", "a/b", "[::1"])
def test_malformed_forwarded_host_changes_nothing(rig: Any, kind: str, host: str) -> None:
    plain = rig(kind=kind, header="forwarded").environ()
    env = rig(kind=kind, header="forwarded").environ(forwarded=f'for=192.0.2.1;host="{host}"')
    assert where(env) == where(plain)
    assert env["REMOTE_ADDR"] == "192.0.2.1"


def test_only_the_configured_family_sets_the_host(rig: Any) -> None:
    both = {"forwarded": "for=192.0.2.1;host=rfc.test", "x_forwarded_host": "x.test"}
    assert rig(header="x-forwarded").environ(**both)["HTTP_HOST"] == "x.test"
    assert rig(header="forwarded").environ(**both)["HTTP_HOST"] == "rfc.test"


# --- the hot path ---------------------------------------------------------------------------


class Recording(TrustedProxies):
    def __init__(self, entries: list[str], header: str) -> None:
        super().__init__(entries, header)
        self.calls = 0

    def resolve(self, env: Any) -> None:
        self.calls += 1
        super().resolve(env)


@pytest.mark.parametrize("header", ["x-forwarded", "forwarded"])
def test_the_plain_path_resolves_for_every_key_resolve_reads(rig: Any, header: str) -> None:
    """The plain TCP path tests the forwarding keys inline: it must know each one that
    resolve() reads, or that header would be ignored on plain listeners only."""
    keys = TrustedProxies([], header).keys
    assert keys == (X_FORWARDED_KEYS if header == "x-forwarded" else ("HTTP_FORWARDED",))
    for key in keys:
        r = rig(header=header)
        recording = Recording(["127.0.0.1"], header)
        r.protocol.proxies = recording
        name = key.removeprefix("HTTP_").lower()
        r.environ(**{name: "x"})
        assert recording.calls == 1, key
    r = rig(header=header)
    recording = Recording(["127.0.0.1"], header)
    r.protocol.proxies = recording
    r.environ(x_other="1")
    assert recording.calls == 0


def test_a_plain_tcp_listener_never_takes_the_slow_path(
    rig: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No TLS, no unix socket, no script_name: no per-request work for any of them."""

    def slow(*args: Any) -> None:
        raise AssertionError("listener_keys called on a plain TCP listener")

    r = rig()
    monkeypatch.setattr(r.protocol, "listener_keys", slow)
    env = r.environ(x_forwarded_host="example.com")
    assert env["HTTP_HOST"] == "example.com"  # resolved on the plain path
    assert env["SCRIPT_NAME"] == ""
    assert not any(key.startswith("SSL_") for key in env)
    assert "HTTPS" not in env


# --- SSL_* keys -----------------------------------------------------------------------------


def test_a_tls_connection_s_keys_are_in_every_request(rig: Any) -> None:
    r = rig(kind="tls", peer=STRANGER)
    for target in ("/1", "/2"):
        env = r.environ(target)
        assert {k: env[k] for k in TLS_KEYS} == TLS_KEYS
        assert env["HTTPS"] == "on" and env["wsgi.url_scheme"] == "https"


def test_tls_keys_are_not_recomputed_per_request(
    rig: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """They are the connection's (computed once, at its handshake): a request only copies
    them, and what it changes in its environ does not leak into the next request."""
    r = rig(kind="tls")
    monkeypatch.setattr("prefork.tls.client_environ", lambda sock: pytest.fail("recomputed"))
    first = r.environ()
    first["SSL_CIPHER"] = "changed"
    assert r.environ()["SSL_CIPHER"] == TLS_KEYS["SSL_CIPHER"]


class FakeSSLSocket:
    """What client_environ reads of an SSLSocket after its handshake."""

    def __init__(self, der: bytes | None, decoded: dict[str, Any] | None) -> None:
        self.der = der
        self.decoded = decoded

    def version(self) -> str:
        return "TLSv1.3"

    def cipher(self) -> tuple[str, str, int]:
        return ("TLS_AES_128_GCM_SHA256", "TLSv1.3", 128)

    def getpeercert(self, binary_form: bool = False) -> Any:
        return self.der if binary_form else self.decoded


DECODED = {
    "subject": ((("countryName", "DE"),), (("organizationName", "Acme, Inc."),),
                (("organizationalUnitName", "Eng"), ("organizationalUnitName", "Ops")),
                (("commonName", 'client "one"'),)),
    "issuer": ((("commonName", "pf test CA"),),),
    "serialNumber": "2F1EEDAC68F8DA8AA2CDDC1685889B4EC9B63C7A",
    "notBefore": "Nov 21 14:21:11 2026 GMT",
    "notAfter": "Nov 23 14:21:11 2026 GMT",
    "version": 3,
}


def test_client_environ_with_a_verified_certificate() -> None:
    der = b"0\x03\x02\x01\x00"
    env = client_environ(FakeSSLSocket(der, DECODED))  # type: ignore[arg-type]
    assert env == {
        "SSL_PROTOCOL": "TLSv1.3",
        "SSL_CIPHER": "TLS_AES_128_GCM_SHA256",
        "SSL_CLIENT_VERIFY": "SUCCESS",
        # as `openssl x509 -nameopt RFC2253` (and mod_ssl) print it
        "SSL_CLIENT_S_DN": 'CN=client \\"one\\",OU=Ops+OU=Eng,O=Acme\\, Inc.,C=DE',
        "SSL_CLIENT_I_DN": "CN=pf test CA",
        "SSL_CLIENT_M_SERIAL": "2F1EEDAC68F8DA8AA2CDDC1685889B4EC9B63C7A",
        "SSL_CLIENT_V_START": "Nov 21 14:21:11 2026 GMT",
        "SSL_CLIENT_V_END": "Nov 23 14:21:11 2026 GMT",
        "SSL_CLIENT_CERT": ssl.DER_cert_to_PEM_cert(der),
    }


@pytest.mark.parametrize("decoded", [None, {}])
def test_client_environ_without_a_certificate(decoded: dict[str, Any] | None) -> None:
    """No certificate (verify_client none: none is asked for; optional: none was sent)."""
    env = client_environ(FakeSSLSocket(None, decoded))  # type: ignore[arg-type]
    assert env == {"SSL_PROTOCOL": "TLSv1.3", "SSL_CIPHER": "TLS_AES_128_GCM_SHA256",
                   "SSL_CLIENT_VERIFY": "NONE"}


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ((), ""),
        (((("commonName", "a"),),), "CN=a"),
        (((("domainComponent", "org"),), (("domainComponent", "example"),),
          (("userId", "jd"),)), "UID=jd,DC=example,DC=org"),
        (((("commonName", " lead#and trail "),),), "CN=\\ lead#and trail\\ "),
        (((("commonName", "#x"),),), "CN=\\#x"),
        (((("commonName", "a;b<c>d+e\\f"),),), "CN=a\\;b\\<c\\>d\\+e\\\\f"),
        (((("commonName", "tab\there"),),), "CN=tab\\09here"),
        (((("emailAddress", "a@b.test"),), (("1.2.3.4", "x"),)), "1.2.3.4=x,emailAddress=a@b.test"),
        (((("commonName", "Jürgen"),),), "CN=Jürgen"),
    ],
)
def test_distinguished_name(name: Any, expected: str) -> None:
    assert distinguished_name(name) == expected


def test_a_non_ascii_dn_is_its_utf8_bytes_as_pep_3333_has_it() -> None:
    decoded = {**DECODED, "subject": ((("commonName", "Jürgen"),),)}
    env = client_environ(FakeSSLSocket(b"0\x00", decoded))  # type: ignore[arg-type]
    assert env["SSL_CLIENT_S_DN"] == "CN=J\xc3\xbcrgen"
    assert env["SSL_CLIENT_S_DN"].encode("latin-1").decode("utf-8") == "CN=Jürgen"


# --- http.script_name -----------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize(
    ("target", "expected"),
    [
        ("/app/x", ("/app", "/x")),
        ("/app/", ("/app", "/")),
        ("/app", ("/app", "")),
        ("/app/x%2Fy", ("/app", "/x/y")),
        ("/%61pp/x", ("/app", "/x")),  # the decoded path is compared
    ],
)
def test_script_name_is_stripped_from_path_info(
    rig: Any, kind: str, target: str, expected: tuple[str, str]
) -> None:
    env = rig(kind=kind, peer=STRANGER, script_name="/app").environ(target)
    assert (env["SCRIPT_NAME"], env["PATH_INFO"]) == expected
    assert OUTSIDE_SCRIPT_NAME not in env


@pytest.mark.parametrize("target", ["/", "/other", "/application", "/ap", "/APP/x"])
def test_a_request_outside_script_name_is_marked(rig: Any, target: str) -> None:
    env = rig(peer=STRANGER, script_name="/app").environ(target)
    assert env[OUTSIDE_SCRIPT_NAME] is True
    assert (env["SCRIPT_NAME"], env["PATH_INFO"]) == ("", target)


@pytest.mark.parametrize(
    ("target", "headers", "expected"),
    [
        # the proxy's prefix comes first, ours under it; stripped by the proxy or not
        ("/app/x", {"x_forwarded_prefix": "/public"}, ("/public/app", "/x")),
        ("/public/app/x", {"x_forwarded_prefix": "/public"}, ("/public/app", "/x")),
        ("/app/x", {}, ("/app", "/x")),
    ],
)
def test_script_name_under_a_proxy_prefix(
    rig: Any, target: str, headers: dict[str, str], expected: tuple[str, str]
) -> None:
    env = rig(script_name="/app").environ(target, **headers)
    assert (env["SCRIPT_NAME"], env["PATH_INFO"]) == expected


def test_a_client_cannot_move_script_name(rig: Any) -> None:
    env = rig(peer=STRANGER, script_name="/app").environ("/app/x", x_forwarded_prefix="/evil")
    assert (env["SCRIPT_NAME"], env["PATH_INFO"]) == ("/app", "/x")


def respond(r: Rig, target: str) -> tuple[bool, bytes]:
    keep = r.protocol.respond(r.conn, r.request(target), True)
    r.client.setblocking(False)
    try:
        return keep, r.client.recv(65536)
    finally:
        r.client.settimeout(5.0)


def test_outside_script_name_is_answered_400_without_the_app(rig: Any) -> None:
    seen: list[tuple[str, str]] = []

    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        assert OUTSIDE_SCRIPT_NAME not in environ
        seen.append((environ["SCRIPT_NAME"], environ["PATH_INFO"]))
        start_response("200 OK", [("Content-Length", "2")])
        return [b"ok"]

    r = rig(peer=STRANGER, script_name="/app", app=app)
    keep, data = respond(r, "/app/x")
    assert keep and data.startswith(b"HTTP/1.1 200 ")
    assert seen == [("/app", "/x")]
    keep, data = respond(r, "/application")
    assert data.startswith(b"HTTP/1.1 400 ")
    assert not keep  # as gunicorn: the connection closes after the error
    assert seen == [("/app", "/x")]


def test_without_script_name_every_path_reaches_the_app(rig: Any) -> None:
    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        start_response("200 OK", [("Content-Length", "2")])
        return [b"ok"]

    r = rig(peer=STRANGER, app=app)
    assert r.protocol.app is app  # not wrapped: nothing to pay per request
    keep, data = respond(r, "/anything")
    assert keep and data.startswith(b"HTTP/1.1 200 ")


@pytest.mark.parametrize("value", ["", "/app", "/a/b", "/caf\xe9", "/a b"])
def test_script_name_config_accepts(value: str) -> None:
    cfg = from_mapping({"app": "m:app", "http": {"script_name": value}})
    assert cfg.http.script_name == value


@pytest.mark.parametrize("value", ["app", "/", "/app/", "/app?x", "/app#x", "/a\nb", "//"])
def test_script_name_config_refuses(value: str) -> None:
    with pytest.raises(ConfigError, match="http.script_name"):
        from_mapping({"app": "m:app", "http": {"script_name": value}})


def test_script_name_defaults_to_none() -> None:
    assert from_mapping({"app": "m:app"}).http.script_name == ""


# --- a unix socket's SERVER_PORT ------------------------------------------------------------
# Defect: a unix listener took SERVER_PORT from Host and, when Host named no port, always
# said 80, even for https (a TLS unix listener, or a trusted proxy's X-Forwarded-Proto:
# https, nginx -> unix socket's usual setup); gunicorn says 443 there.


@pytest.mark.parametrize(
    ("kind", "headers", "expected"),
    [
        ("unix", {}, ("http", "example.com", "example.com", "80")),
        ("unix", {"x_forwarded_proto": "https"}, ("https", "example.com", "example.com", "443")),
        ("unix-tls", {}, ("https", "example.com", "example.com", "443")),
        ("unix-tls", {"x_forwarded_proto": "http"}, ("http", "example.com", "example.com", "80")),
        # a port the proxy names stands
        ("unix", {"x_forwarded_proto": "https", "x_forwarded_port": "80"},
         ("https", "example.com:80", "example.com", "80")),
        ("unix", {"x_forwarded_proto": "https", "x_forwarded_host": "example.com:8443"},
         ("https", "example.com:8443", "example.com", "8443")),
        ("unix", {"host": "example.com:8080", "x_forwarded_proto": "https"},
         ("https", "example.com:8080", "example.com", "8080")),
    ],
)
def test_a_unix_sockets_port_is_the_schemes_when_host_names_none(
    rig: Any, kind: str, headers: dict[str, str], expected: tuple[str, ...]
) -> None:
    env = rig(kind=kind).environ(**{"host": "example.com", **headers})
    assert where(env) == expected
