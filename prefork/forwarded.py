"""Which peers are trusted proxies, and what the client address and scheme are behind them.

Invariants: pure logic, no I/O; headers from a peer that is not trusted never change
REMOTE_ADDR or wsgi.url_scheme. A forwarding chain is read from the right (the hop nearest to
us) and trusted proxies are skipped, so a client cannot pick its own address by prepending
entries (as nginx's real_ip_recursive does). With RFC 7239 Forwarded, a trusted proxy may hide
the client behind "unknown", an obfuscated identifier or no `for` at all (section 6.3): that
element still ends the chain and its `proto` still gives the scheme, but the address stays the
one of the proxy that received the hidden client.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import MutableMapping, Sequence
from typing import Any

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
_SCHEMES = ("http", "https")
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

    def resolve(self, env: MutableMapping[str, Any]) -> None:
        """Set REMOTE_ADDR (and drop REMOTE_PORT, which belonged to the proxy) and
        wsgi.url_scheme from the header family the proxy sets: Forwarded, or X-Forwarded-For /
        X-Forwarded-Proto. The other family is ignored: the client may have sent it."""
        if self.rfc7239:
            forwarded = env.get("HTTP_FORWARDED")
            if forwarded is None:
                return
            elements = forwarded_elements(forwarded)
            chosen = self._forwarded_client(elements)
            if chosen is not None:
                index, address = chosen
                if address is not None:
                    env["REMOTE_ADDR"] = str(address)
                    env.pop("REMOTE_PORT", None)
                proto = elements[index].get("proto", "").lower()
                if proto in _SCHEMES:
                    env["wsgi.url_scheme"] = proto
            return
        chain = env.get("HTTP_X_FORWARDED_FOR")
        if chain is not None:
            chosen = self._client(chain.split(","))
            if chosen is not None:
                env["REMOTE_ADDR"] = str(chosen[1])
                env.pop("REMOTE_PORT", None)
        forwarded_proto = env.get("HTTP_X_FORWARDED_PROTO")
        if forwarded_proto is not None:
            # the right-most value: the one our (trusted) proxy set or appended
            scheme = forwarded_proto.split(",")[-1].strip().lower()
            if scheme in _SCHEMES:
                env["wsgi.url_scheme"] = scheme

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
