"""Which peers are trusted proxies, and what the client address and scheme are behind them.

Invariants: pure logic, no I/O; headers from a peer that is not trusted never change
REMOTE_ADDR, wsgi.url_scheme, the host or SCRIPT_NAME (resolve() is not called for it). A
forwarding chain is read from the right (the hop nearest to us) and trusted proxies are
skipped, so a client cannot pick its own address by prepending entries (as nginx's
real_ip_recursive does). With RFC 7239 Forwarded, a trusted proxy may hide the client behind
"unknown", an obfuscated identifier or no `for` at all (section 6.3): that element still ends
the chain and its `proto` still gives the scheme, but the address stays the one of the proxy
that received the hidden client.

Besides the address and scheme, a trusted proxy may name the host the client asked for
(X-Forwarded-Host / X-Forwarded-Port, or `host=` in the Forwarded element chosen for the
client), which sets HTTP_HOST, SERVER_NAME and SERVER_PORT, and the path prefix it stripped
(X-Forwarded-Prefix), which goes in front of SCRIPT_NAME. A value that is malformed, or scheme
headers that disagree, are ignored: the request keeps what the socket says.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import MutableMapping, Sequence
from typing import Any
from urllib.parse import unquote_to_bytes

from prefork.addresses import is_ipv6

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
_SCHEMES = ("http", "https")
# The x-forwarded headers that name the scheme, and what their values mean; gunicorn's default
# secure_scheme_headers besides X-Forwarded-Proto. Other values say nothing; two that disagree
# are all ignored.
_SCHEME_HEADERS = (
    ("HTTP_X_FORWARDED_PROTO", {"http": "http", "https": "https"}),
    ("HTTP_X_FORWARDED_SSL", {"on": "https", "off": "http"}),
    ("HTTP_X_FORWARDED_PROTOCOL", {"ssl": "https", "https": "https", "http": "http"}),
)
# The environ keys resolve() reads with `forwarded_header: x-forwarded`: a request from a
# trusted proxy that carries none of them needs no resolve() (httpserve checks them inline,
# on its hot path; a test holds the two lists together).
X_FORWARDED_KEYS = (
    "HTTP_X_FORWARDED_FOR",
    *(key for key, _ in _SCHEME_HEADERS),
    "HTTP_X_FORWARDED_HOST",
    "HTTP_X_FORWARDED_PORT",
    "HTTP_X_FORWARDED_PREFIX",
)
_DEFAULT_PORTS = {"http": "80", "https": "443"}
# host[:port] as a proxy passes it on: a name or IPv4 address, or an IPv6 literal in brackets
_HOST = re.compile(r"(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9._~-]+)(?::([0-9]{1,5}))?")
# a path prefix: absolute, no query or fragment, no whitespace or control characters
_PREFIX = re.compile(r"/[^?#\s\x00-\x1f\x7f]*")
# RFC 7239 section 6: a node that names no address ("unknown", or an obfuscated identifier),
# with an optional port (digits, or obfuscated too)
_HIDDEN_NODE = re.compile(
    r"(?:unknown|_[a-z0-9._-]+)(?::(?:[0-9]{1,5}|_[a-z0-9._-]+))?", re.IGNORECASE
)


def parse_ip(text: str) -> IPAddress | None:
    """An address from a forwarding header: bare, "[v6]", "[v6]:port", "v4:port"; else None."""
    text = text.strip().strip('"')
    if text.startswith("["):
        text = text[1 : text.find("]")] if "]" in text else ""
    elif text.count(":") == 1:
        text = text.partition(":")[0]
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None  # "unknown", obfuscated identifiers (RFC 7239 6.3), garbage


def forwarded_elements(value: str) -> list[dict[str, str]]:
    """RFC 7239 `Forwarded`: comma-separated elements of ;-separated key=value pairs."""
    elements = []
    for element in value.split(","):
        pairs = {}
        for pair in element.split(";"):
            key, sep, val = pair.partition("=")
            if sep:
                pairs[key.strip().lower()] = val.strip().strip('"')
        elements.append(pairs)
    return elements


class TrustedProxies:
    """`entries`: addresses and networks ("10.0.0.0/8", "::1"), "unix" for unix-socket peers,
    "*" for everyone."""

    def __init__(self, entries: Sequence[str], header: str = "x-forwarded") -> None:
        self.rfc7239 = header == "forwarded"
        self.everyone = "*" in entries
        self.unix = self.everyone or "unix" in entries
        self.networks = [
            ipaddress.ip_network(e, strict=False) for e in entries if e not in ("*", "unix")
        ]
        self._cache: dict[str, bool] = {}

    @property
    def enabled(self) -> bool:
        return self.everyone or self.unix or bool(self.networks)

    def trusts(self, peer: Any) -> bool:
        """Whether the socket peer (an (ip, port, ...) tuple, or a unix peer) is a proxy."""
        if not isinstance(peer, tuple) or not peer:
            return self.unix
        host = peer[0]
        known = self._cache.get(host)
        if known is None:
            address = parse_ip(host)
            known = self._trusts_ip(address) if address is not None else False
            if len(self._cache) < 4096:
                self._cache[host] = known
        return known

    def _trusts_ip(self, address: IPAddress) -> bool:
        if self.everyone:
            return True
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        return any(address in network for network in self.networks)

    @property
    def keys(self) -> tuple[str, ...]:
        """The environ keys (request headers) that resolve() reads."""
        return ("HTTP_FORWARDED",) if self.rfc7239 else X_FORWARDED_KEYS

    def resolve(self, env: MutableMapping[str, Any]) -> None:
        """Set REMOTE_ADDR (and drop REMOTE_PORT, which belonged to the proxy), wsgi.url_scheme,
        the host (HTTP_HOST, SERVER_NAME, SERVER_PORT) and the prefix (SCRIPT_NAME, PATH_INFO)
        from the header family the proxy sets: Forwarded, or X-Forwarded-*. The other family
        is ignored: the client may have sent it."""
        if self.rfc7239:
            self._resolve_rfc7239(env)
            return
        chain = env.get("HTTP_X_FORWARDED_FOR")
        if chain is not None:
            chosen = self._client(chain.split(","))
            if chosen is not None:
                env["REMOTE_ADDR"] = str(chosen[1])
                env.pop("REMOTE_PORT", None)
        scheme = x_forwarded_scheme(env)
        if scheme is not None:
            env["wsgi.url_scheme"] = scheme
        host = env.get("HTTP_X_FORWARDED_HOST")
        if host is not None:
            set_host(env, _last(host))
        port = env.get("HTTP_X_FORWARDED_PORT")
        if port is not None:
            set_port(env, _last(port))
        prefix = env.get("HTTP_X_FORWARDED_PREFIX")
        if prefix is not None:
            set_prefix(env, _last(prefix))

    def _resolve_rfc7239(self, env: MutableMapping[str, Any]) -> None:
        forwarded = env.get("HTTP_FORWARDED")
        if forwarded is None:
            return
        elements = forwarded_elements(forwarded)
        chosen = self._forwarded_client(elements)
        if chosen is None:
            return
        index, address = chosen
        if address is not None:
            env["REMOTE_ADDR"] = str(address)
            env.pop("REMOTE_PORT", None)
        element = elements[index]
        proto = element.get("proto", "").lower()
        if proto in _SCHEMES:
            env["wsgi.url_scheme"] = proto
        host = element.get("host")
        if host is not None:
            set_host(env, host)

    def _forwarded_client(
        self, elements: list[dict[str, str]]
    ) -> tuple[int, IPAddress | None] | None:
        """The Forwarded element that describes the client, chosen as _client chooses a hop,
        and the address to credit it with.

        An element whose client is hidden ("unknown", an obfuscated identifier, or no `for`:
        RFC 7239 6.3) is a hop that is not a trusted proxy, so it ends the chain like a client
        address would: its `proto` is the scheme the client used, which the trusted proxy
        that wrote the element knows as well as it knows an address. Its address, though, is
        unknown: the one of the trusted hop to its right (None: the peer's) stays. Any other
        `for` value is not one a proxy writes, and ends what can be believed before it, as in
        _client.
        """
        last: tuple[int, IPAddress] | None = None
        for index in range(len(elements) - 1, -1, -1):
            element = elements[index]
            node = element.get("for")
            address = parse_ip(node) if node is not None else None
            if address is None:
                if element and (node is None or _HIDDEN_NODE.fullmatch(node)):
                    return index, None if last is None else last[1]
                return last
            last = (index, address)
            if not self._trusts_ip(address):
                return last
        return last

    def _client(self, hops: list[str]) -> tuple[int, IPAddress] | None:
        """The right-most hop that is not a trusted proxy (or the left-most if all are)."""
        last: tuple[int, IPAddress] | None = None
        for index in range(len(hops) - 1, -1, -1):
            address = parse_ip(hops[index])
            if address is None:
                return last  # an unusable entry ends what can be believed
            last = (index, address)
            if not self._trusts_ip(address):
                return last
        return last


def _last(value: str) -> str:
    """The right-most of comma-separated values: the one our (trusted) proxy set or appended."""
    return value.rpartition(",")[2].strip()


def x_forwarded_scheme(env: MutableMapping[str, Any]) -> str | None:
    """The scheme X-Forwarded-Proto, X-Forwarded-Ssl and X-Forwarded-Protocol agree on; None if
    none of them names one, or two of them disagree (the socket's scheme stays)."""
    found = None
    for key, meanings in _SCHEME_HEADERS:
        value = env.get(key)
        if value is None:
            continue
        scheme = meanings.get(_last(value).lower())
        if scheme is None:
            continue  # a value we do not know says nothing
        if found is not None and scheme != found:
            return None
        found = scheme
    return found


def set_host(env: MutableMapping[str, Any], value: str) -> None:
    """The client asked for `value` (host[:port]): HTTP_HOST, SERVER_NAME and SERVER_PORT (the
    scheme's default port if none is given). A malformed value changes nothing."""
    match = _HOST.fullmatch(value)
    if match is None:
        return
    name, port = match.groups()
    if name.startswith("[") and not is_ipv6(name[1:-1]):
        return
    if port is None:
        port = _DEFAULT_PORTS.get(env.get("wsgi.url_scheme", "http"), "80")
    elif 0 < int(port) < 65536:
        port = str(int(port))
    else:
        return
    env["HTTP_HOST"] = value
    env["SERVER_NAME"], env["SERVER_PORT"] = name, port


def set_port(env: MutableMapping[str, Any], value: str) -> None:
    """The client connected to port `value` (of the proxy): SERVER_PORT, and the port of
    HTTP_HOST (left out if it is the scheme's default). A malformed value changes nothing."""
    if not (value.isascii() and value.isdigit() and len(value) <= 5 and 0 < int(value) < 65536):
        return
    port = str(int(value))
    env["SERVER_PORT"] = port
    match = _HOST.fullmatch(env.get("HTTP_HOST", ""))
    if match is not None:  # no Host, or one we cannot take apart: left as it is
        name = match.group(1)
        default = _DEFAULT_PORTS.get(env.get("wsgi.url_scheme", "http"))
        env["HTTP_HOST"] = name if port == default else f"{name}:{port}"


def set_prefix(env: MutableMapping[str, Any], value: str) -> None:
    """The proxy serves us under path prefix `value` (percent-encoded, as in a URL): it goes
    in front of SCRIPT_NAME, and comes off the front of PATH_INFO when PATH_INFO starts with it
    (a proxy that did not strip it); on whole segments only. "/" or "" is no prefix; a value
    that is not an absolute path changes nothing."""
    if _PREFIX.fullmatch(value) is None:
        return
    prefix = unquote_to_bytes(value.encode("latin-1")).decode("latin-1").rstrip("/")
    if not prefix:
        return
    env["SCRIPT_NAME"] = prefix + env.get("SCRIPT_NAME", "")
    path = env.get("PATH_INFO", "")
    if path.startswith(prefix) and (len(path) == len(prefix) or path[len(prefix)] == "/"):
        env["PATH_INFO"] = path[len(prefix) :]

