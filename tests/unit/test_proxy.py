"""ProxyHeader (PROXY protocol v1/v2) and TrustedProxies (Forwarded, X-Forwarded-*).

Every PROXY header is fed whole, one byte at a time and in random splits; all three must give
the same outcome, and the bytes after the header must come back untouched. Forwarding chains
are read right to left, so a client can never choose its own address by prepending entries.
"""

from __future__ import annotations

import ipaddress
import struct
from collections.abc import Iterable, Sequence
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from prefork.forwarded import TrustedProxies, forwarded_elements, parse_ip
from prefork.http import ProtocolError
from prefork.http.proxy import V1_MAX, V2_MAX_BODY, V2_SIGNATURE, ProxyHeader
from tests.unit.splits import bytewise, split_at

FAST = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])

HTTP = b"GET / HTTP/1.1\r\nHost: example.test\r\n\r\n"

# --- building headers ------------------------------------------------------------------------


def v1(*fields: str) -> bytes:
    return ("PROXY " + " ".join(fields) + "\r\n").encode("ascii")


def v2(body: bytes = b"", *, command: int = 1, family: int = 0x11, version: int = 2) -> bytes:
    """A v2 header: signature, version/command, family/transport, length, then `body`."""
    return (
        V2_SIGNATURE + bytes([version << 4 | command, family]) + struct.pack("!H", len(body)) + body
    )


def tcp4(src: str, dst: str, sport: int, dport: int) -> bytes:
    return (
        ipaddress.IPv4Address(src).packed
        + ipaddress.IPv4Address(dst).packed
        + struct.pack("!HH", sport, dport)
    )


def tcp6(src: str, dst: str, sport: int, dport: int) -> bytes:
    return (
        ipaddress.IPv6Address(src).packed
        + ipaddress.IPv6Address(dst).packed
        + struct.pack("!HH", sport, dport)
    )


def unix_addresses(src: bytes, dst: bytes) -> bytes:
    return src.ljust(108, b"\0") + dst.ljust(108, b"\0")


def tlv(kind: int, value: bytes) -> bytes:
    return struct.pack("!BH", kind, len(value)) + value


# --- feeding ---------------------------------------------------------------------------------

Outcome = tuple[Any, ...]


def feed(mode: str, pieces: Iterable[bytes]) -> Outcome:
    """("ok", source, rest) once the header is complete (rest = every byte after it, including
    later pieces, as the connection would hand them to HTTP), ("error",) on ProtocolError, or
    ("incomplete",) if the pieces ran out first."""
    header = ProxyHeader(mode)
    pieces = list(pieces)
    for index, piece in enumerate(pieces):
        try:
            rest = header.feed(piece)
        except ProtocolError:
            return ("error",)
        if rest is not None:
            assert header.done
            return ("ok", header.source, rest + b"".join(pieces[index + 1 :]))
        assert not header.done
    return ("incomplete",)


def all_ways(mode: str, data: bytes) -> Outcome:
    """The outcome fed whole; fed byte by byte it must be the same."""
    whole = feed(mode, [data])
    assert feed(mode, bytewise(data)) == whole, "byte-by-byte differs from whole"
    return whole


def cuts_for(data: bytes) -> st.SearchStrategy[list[int]]:
    return st.lists(st.integers(0, len(data)), max_size=8)


# --- valid headers ---------------------------------------------------------------------------

# name -> (header, modes that accept it, expected source)
VALID: dict[str, tuple[bytes, tuple[str, ...], tuple[str, int] | None]] = {
    "v1-tcp4": (
        v1("TCP4", "1.2.3.4", "5.6.7.8", "1111", "2222"),
        ("v1", "auto"),
        ("1.2.3.4", 1111),
    ),
    "v1-tcp4-port-bounds": (
        v1("TCP4", "255.255.255.255", "0.0.0.0", "65535", "0"),
        ("v1", "auto"),
        ("255.255.255.255", 65535),
    ),
    "v1-tcp6": (
        v1("TCP6", "2001:db8::1", "::1", "4711", "443"),
        ("v1", "auto"),
        ("2001:db8::1", 4711),
    ),
    "v1-unknown": (v1("UNKNOWN"), ("v1", "auto"), None),
    "v1-unknown-with-addresses": (
        v1("UNKNOWN", "ffff::1", "ffff::2", "1", "2"),
        ("v1", "auto"),
        None,
    ),
    "v2-tcp4": (v2(tcp4("1.2.3.4", "5.6.7.8", 1111, 2222)), ("v2", "auto"), ("1.2.3.4", 1111)),
    "v2-tcp4-with-tlvs": (
        v2(tcp4("10.9.8.7", "5.6.7.8", 40000, 443) + tlv(0x01, b"h2") + tlv(0x04, b"")),
        ("v2", "auto"),
        ("10.9.8.7", 40000),
    ),
    "v2-tcp6": (
        v2(tcp6("2001:db8::7", "2001:db8::1", 5555, 80), family=0x21),
        ("v2", "auto"),
        ("2001:db8::7", 5555),
    ),
    "v2-local": (v2(command=0, family=0x00), ("v2", "auto"), None),
    "v2-local-with-addresses": (
        v2(tcp4("1.2.3.4", "5.6.7.8", 1, 2), command=0),
        ("v2", "auto"),
        None,
    ),
    "v2-unspec": (v2(command=1, family=0x00), ("v2", "auto"), None),
    "v2-unix-stream": (
        v2(unix_addresses(b"/run/client.sock", b"/run/server.sock"), family=0x31),
        ("v2", "auto"),
        None,
    ),
}


@pytest.mark.parametrize("name", list(VALID))
@pytest.mark.parametrize("after", [b"", HTTP, b"\r\n\r\n\x00binary\xff" + HTTP])
def test_valid_header_whole_and_bytewise(name: str, after: bytes) -> None:
    header, modes, source = VALID[name]
    for mode in modes:
        if after:
            assert all_ways(mode, header + after) == ("ok", source, after), mode
        else:
            # the header alone: done exactly at its last byte, nothing left over
            assert feed(mode, [header]) == ("ok", source, b""), mode
            assert feed(mode, bytewise(header)) == ("ok", source, b""), mode


@pytest.mark.parametrize("name", list(VALID))
@FAST
@given(data=st.data())
def test_valid_header_random_splits(name: str, data: st.DataObject) -> None:
    header, modes, source = VALID[name]
    raw = header + HTTP
    cuts = data.draw(cuts_for(raw), label="cuts")
    for mode in modes:
        assert feed(mode, split_at(raw, cuts)) == ("ok", source, HTTP), mode


@pytest.mark.parametrize("name", list(VALID))
def test_header_of_the_other_version_is_refused(name: str) -> None:
    header, modes, _ = VALID[name]
    other = "v2" if "v1" in modes else "v1"
    assert all_ways(other, header + HTTP) == ("error",)


def test_incomplete_header_waits_for_more() -> None:
    for name, (header, modes, _) in VALID.items():
        for mode in modes:
            for end in (1, len(header) // 2, len(header) - 1):
                assert feed(mode, [header[:end]]) == ("incomplete",), (name, mode, end)


def test_empty_feeds_change_nothing() -> None:
    header, _, source = VALID["v2-tcp4"]
    pieces = [b"", header[:3], b"", header[3:], b"", HTTP]
    assert feed("v2", pieces) == ("ok", source, HTTP)


# --- auto with no header at all --------------------------------------------------------------

PLAIN = {
    "get": HTTP,
    "post": b"POST /p HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\nhi",
    "put": b"PUT /p HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n",
    "patch": b"PATCH /p HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n",
    "pri": b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
    "garbage": b"\x16\x03\x01\x00\xa5\x01",
    "one-byte": b"G",
}


@pytest.mark.parametrize("name", list(PLAIN))
def test_auto_passes_plain_http_through_untouched(name: str) -> None:
    data = PLAIN[name]
    assert all_ways("auto", data) == ("ok", None, data)


@pytest.mark.parametrize("name", list(PLAIN))
@FAST
@given(data=st.data())
def test_auto_plain_http_random_splits(name: str, data: st.DataObject) -> None:
    raw = PLAIN[name]
    assert feed("auto", split_at(raw, data.draw(cuts_for(raw)))) == ("ok", None, raw)


def test_auto_passes_a_leading_empty_line_through() -> None:
    data = b"\r\n" + HTTP
    assert all_ways("auto", data) == ("ok", None, data)


@pytest.mark.parametrize("mode", ["v1", "v2"])
@pytest.mark.parametrize("name", ["get", "post", "put", "garbage"])
def test_plain_http_is_refused_when_a_header_is_required(mode: str, name: str) -> None:
    assert all_ways(mode, PLAIN[name]) == ("error",)


# --- malformed headers -----------------------------------------------------------------------

LONG_PORT = "0" * 80 + "1111"  # a valid number, padded past the 107-byte line limit

MALFORMED_V1: dict[str, bytes] = {
    "missing-field": v1("TCP4", "1.2.3.4", "5.6.7.8", "1111"),
    "extra-field": v1("TCP4", "1.2.3.4", "5.6.7.8", "1111", "2222", "3333"),
    "unknown-family": v1("TCP5", "1.2.3.4", "5.6.7.8", "1111", "2222"),
    "lowercase-family": v1("tcp4", "1.2.3.4", "5.6.7.8", "1111", "2222"),
    "no-family": b"PROXY \r\n",
    "v6-in-tcp4": v1("TCP4", "2001:db8::1", "::1", "1111", "2222"),
    "v4-in-tcp6": v1("TCP6", "1.2.3.4", "5.6.7.8", "1111", "2222"),
    "bad-source": v1("TCP4", "1.2.3", "5.6.7.8", "1111", "2222"),
    "bad-destination": v1("TCP4", "1.2.3.4", "5.6.7.800", "1111", "2222"),
    "hostname": v1("TCP4", "localhost", "5.6.7.8", "1111", "2222"),
    "source-port-too-big": v1("TCP4", "1.2.3.4", "5.6.7.8", "65536", "2222"),
    "negative-port": v1("TCP4", "1.2.3.4", "5.6.7.8", "-1", "2222"),
    "hex-port": v1("TCP4", "1.2.3.4", "5.6.7.8", "0x10", "2222"),
    "port-with-sign": v1("TCP4", "1.2.3.4", "5.6.7.8", "+80", "2222"),
    "double-space": b"PROXY TCP4  1.2.3.4 5.6.7.8 1111 2222\r\n",
    "trailing-space": b"PROXY TCP4 1.2.3.4 5.6.7.8 1111 2222 \r\n",
    "tab-separated": b"PROXY TCP4\t1.2.3.4\t5.6.7.8\t1111\t2222\r\n",
    "lf-only": b"PROXY TCP4 1.2.3.4 5.6.7.8 1111 2222\n",
    "lowercase-proxy": b"proxy TCP4 1.2.3.4 5.6.7.8 1111 2222\r\n",
    "no-space-after-proxy": b"PROXYTCP4 1.2.3.4 5.6.7.8 1111 2222\r\n",
    "non-ascii-address": "PROXY TCP4 1.2.3.\u0664 5.6.7.8 1 2\r\n".encode(),
    "too-long-no-crlf": b"PROXY UNKNOWN " + b"x" * 200,
}

MALFORMED_V2: dict[str, bytes] = {
    "bad-signature": V2_SIGNATURE[:-1]
    + b"X"
    + b"\x21\x11\x00\x0c"
    + tcp4("1.2.3.4", "5.6.7.8", 1, 2),
    "version-1": v2(tcp4("1.2.3.4", "5.6.7.8", 1, 2), version=1),
    "version-3": v2(tcp4("1.2.3.4", "5.6.7.8", 1, 2), version=3),
    "command-2": v2(tcp4("1.2.3.4", "5.6.7.8", 1, 2), command=2),
    "command-15": v2(tcp4("1.2.3.4", "5.6.7.8", 1, 2), command=15),
    "tcp4-too-short": v2(b"\x01\x02\x03\x04", family=0x11),
    "tcp6-too-short": v2(tcp4("1.2.3.4", "5.6.7.8", 1, 2), family=0x21),
    "unknown-address-family": v2(tcp4("1.2.3.4", "5.6.7.8", 1, 2), family=0x41),
    "length-over-limit": v2(b"\0" * (V2_MAX_BODY + 1)),
}


@pytest.mark.parametrize(
    ("mode", "name"),
    [("v1", name) for name in MALFORMED_V1]
    # without the "PROXY " prefix, auto mode reads the bytes as plain HTTP
    + [("auto", name) for name, data in MALFORMED_V1.items() if data.startswith(b"PROXY ")],
)
def test_malformed_v1_is_a_protocol_error(mode: str, name: str) -> None:
    assert all_ways(mode, MALFORMED_V1[name] + HTTP) == ("error",)


@pytest.mark.parametrize("name", ["lowercase-proxy", "no-space-after-proxy"])
def test_auto_reads_a_near_miss_of_the_v1_prefix_as_plain_http(name: str) -> None:
    data = MALFORMED_V1[name] + HTTP
    assert all_ways("auto", data) == ("ok", None, data)


@pytest.mark.parametrize("name", list(MALFORMED_V2))
@pytest.mark.parametrize("mode", ["v2", "auto"])
def test_malformed_v2_is_a_protocol_error(mode: str, name: str) -> None:
    assert all_ways(mode, MALFORMED_V2[name] + HTTP) == ("error",)


@pytest.mark.parametrize("mode", ["v1", "auto"])
def test_v1_line_is_refused_once_it_passes_the_limit_without_crlf(mode: str) -> None:
    data = b"PROXY TCP4 " + b"1" * (V1_MAX + 20)
    assert feed(mode, [data[: V1_MAX - 1]]) == ("incomplete",)
    assert feed(mode, [data]) == ("error",)
    assert feed(mode, bytewise(data)) == ("error",)


def test_v2_length_over_the_limit_is_refused_before_the_body_arrives() -> None:
    head_only = v2(b"\0" * (V2_MAX_BODY + 1))[:16]
    assert feed("v2", [head_only]) == ("error",)
    assert feed("v2", [v2(b"\0" * V2_MAX_BODY)[:16]]) == ("incomplete",)


@pytest.mark.parametrize("mode", ["v1", "auto"])
def test_v1_line_over_107_bytes_is_refused_even_with_its_crlf(mode: str) -> None:
    data = v1("TCP4", "1.2.3.4", "5.6.7.8", LONG_PORT, "2222")
    assert len(data) > V1_MAX
    assert feed(mode, bytewise(data + HTTP)) == ("error",)  # what a slow sender gets
    assert feed(mode, [data + HTTP]) == ("error",)  # must not depend on the TCP segments


def test_v1_destination_port_out_of_range_is_refused() -> None:
    assert all_ways("v1", v1("TCP4", "1.2.3.4", "5.6.7.8", "1111", "99999") + HTTP) == ("error",)


@pytest.mark.parametrize(
    "data",
    list(MALFORMED_V1.values()) + list(MALFORMED_V2.values()),
    ids=list(MALFORMED_V1) + list(MALFORMED_V2),
)
@FAST
@given(cuts=st.data())
def test_malformed_random_splits(data: bytes, cuts: st.DataObject) -> None:
    mode = "v1" if data[:1] != b"\r" else "v2"
    raw = data + HTTP
    assert feed(mode, split_at(raw, cuts.draw(cuts_for(raw)))) == ("error",)


@FAST
@given(raw=st.binary(max_size=300), mode=st.sampled_from(["v1", "v2", "auto"]), data=st.data())
def test_arbitrary_bytes_never_crash_and_splits_agree_once_decided(
    raw: bytes, mode: str, data: st.DataObject
) -> None:
    """Only ProtocolError escapes; a header accepted whole is accepted the same way split."""
    whole = feed(mode, [raw])
    split = feed(mode, split_at(raw, data.draw(cuts_for(raw))))
    if whole[0] == "ok" and len(raw) <= V1_MAX:
        assert split == whole


@FAST
@given(
    src=st.ip_addresses(v=4),
    dst=st.ip_addresses(v=4),
    sport=st.integers(0, 65535),
    dport=st.integers(0, 65535),
    version=st.sampled_from(["v1", "v2"]),
    data=st.data(),
)
def test_any_tcp4_address_round_trips(
    src: ipaddress.IPv4Address,
    dst: ipaddress.IPv4Address,
    sport: int,
    dport: int,
    version: str,
    data: st.DataObject,
) -> None:
    if version == "v1":
        header = v1("TCP4", str(src), str(dst), str(sport), str(dport))
    else:
        header = v2(tcp4(str(src), str(dst), sport, dport))
    raw = header + HTTP
    cuts = data.draw(cuts_for(raw))
    for mode in (version, "auto"):
        assert feed(mode, split_at(raw, cuts)) == ("ok", (str(src), sport), HTTP)


@FAST
@given(src=st.ip_addresses(v=6), sport=st.integers(0, 65535), data=st.data())
def test_any_tcp6_address_round_trips(
    src: ipaddress.IPv6Address, sport: int, data: st.DataObject
) -> None:
    for header, mode in (
        (v1("TCP6", str(src), "::1", str(sport), "80"), "v1"),
        (v2(tcp6(str(src), "::1", sport, 80), family=0x21), "v2"),
    ):
        raw = header + HTTP
        assert feed(mode, split_at(raw, data.draw(cuts_for(raw)))) == (
            "ok",
            (str(src), sport),
            HTTP,
        )


# --- TrustedProxies.trusts -------------------------------------------------------------------

UNIX_PEERS: tuple[Any, ...] = ("", b"", None)


@pytest.mark.parametrize(
    ("entries", "peer", "trusted"),
    [
        (["127.0.0.1"], ("127.0.0.1", 40000), True),
        (["127.0.0.1"], ("127.0.0.2", 40000), False),
        (["10.0.0.0/8"], ("10.200.3.4", 1), True),
        (["10.0.0.0/8"], ("11.0.0.1", 1), False),
        (["10.1.2.3/8"], ("10.9.9.9", 1), True),  # host bits set: taken as its network
        (["192.168.1.0/24"], ("192.168.1.255", 1), True),
        (["192.168.1.0/24"], ("192.168.2.1", 1), False),
        (["::1"], ("::1", 40000, 0, 0), True),
        (["::1"], ("::2", 40000, 0, 0), False),
        (["2001:db8::/32"], ("2001:db8:ffff::9", 1, 0, 0), True),
        (["2001:db8::/32"], ("2001:db9::9", 1, 0, 0), False),
        (["127.0.0.1"], ("::ffff:127.0.0.1", 40000, 0, 0), True),  # v4-mapped on a v6 socket
        (["127.0.0.0/8"], ("::ffff:127.9.9.9", 40000, 0, 0), True),
        (["127.0.0.1"], ("::ffff:127.0.0.2", 40000, 0, 0), False),
        (["127.0.0.1"], ("::1", 40000, 0, 0), False),
        (["::1"], ("127.0.0.1", 40000), False),
        (["unix"], ("127.0.0.1", 1), False),
        (["*"], ("203.0.113.9", 1), True),
        (["*"], ("2001:db8::1", 1, 0, 0), True),
        ([], ("127.0.0.1", 1), False),
        ([], ("::1", 1, 0, 0), False),
        (["127.0.0.1"], ("not-an-address", 1), False),
    ],
)
def test_trusts_inet_peers(entries: list[str], peer: tuple[Any, ...], trusted: bool) -> None:
    proxies = TrustedProxies(entries)
    assert proxies.trusts(peer) is trusted
    assert proxies.trusts(peer) is trusted  # the cached answer is the same


@pytest.mark.parametrize(
    ("entries", "trusted"),
    [(["unix"], True), (["*"], True), (["127.0.0.1", "::1"], False), ([], False)],
)
def test_trusts_unix_peers(entries: list[str], trusted: bool) -> None:
    proxies = TrustedProxies(entries)
    for peer in UNIX_PEERS:
        assert proxies.trusts(peer) is trusted, peer


def test_default_entries_trust_loopback_and_unix_only() -> None:
    proxies = TrustedProxies(["127.0.0.1", "::1", "unix"])
    assert proxies.enabled
    assert proxies.trusts(("127.0.0.1", 1))
    assert proxies.trusts(("::1", 1, 0, 0))
    assert proxies.trusts("")
    assert not proxies.trusts(("127.0.0.2", 1))
    assert not proxies.trusts(("192.0.2.1", 1))


def test_empty_list_is_disabled() -> None:
    assert not TrustedProxies([]).enabled
    assert TrustedProxies(["unix"]).enabled
    assert TrustedProxies(["*"]).enabled


def test_invalid_entry_is_an_error() -> None:
    with pytest.raises(ValueError):
        TrustedProxies(["not-a-network"])


# --- parse_ip and Forwarded elements ---------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("192.0.2.1", "192.0.2.1"),
        (" 192.0.2.1 ", "192.0.2.1"),
        ("192.0.2.1:8080", "192.0.2.1"),
        ("2001:db8::1", "2001:db8::1"),
        ("[2001:db8::1]", "2001:db8::1"),
        ("[2001:db8::1]:4711", "2001:db8::1"),
        ('"[2001:db8::1]:4711"', "2001:db8::1"),
        ("unknown", None),
        ("_hidden", None),
        ("_SEVKISEK", None),
        ("", None),
        ("[2001:db8::1", None),
        ("192.0.2.1:80:90", None),
        ("example.com", None),
    ],
)
def test_parse_ip(text: str, expected: str | None) -> None:
    result = parse_ip(text)
    assert (None if result is None else str(result)) == expected


def test_forwarded_elements() -> None:
    value = 'for=192.0.2.60;proto=http;by=203.0.113.43, For="[2001:db8:cafe::17]:4711"'
    assert forwarded_elements(value) == [
        {"for": "192.0.2.60", "proto": "http", "by": "203.0.113.43"},
        {"for": "[2001:db8:cafe::17]:4711"},
    ]


# --- TrustedProxies.resolve ------------------------------------------------------------------

LOCAL_PROXY = ["127.0.0.1", "10.0.0.0/8"]


def resolve(headers: dict[str, str], entries: Sequence[str] = LOCAL_PROXY) -> dict[str, Any]:
    """The environ after resolve() for a request that came from the proxy 127.0.0.1:5555."""
    env: dict[str, Any] = {
        "REMOTE_ADDR": "127.0.0.1",
        "REMOTE_PORT": "5555",
        "wsgi.url_scheme": "http",
        **headers,
    }
    header = "forwarded" if "HTTP_FORWARDED" in headers else "x-forwarded"
    TrustedProxies(list(entries), header).resolve(env)
    return env


def client(env: dict[str, Any]) -> tuple[str, str | None, str]:
    return env["REMOTE_ADDR"], env.get("REMOTE_PORT"), env["wsgi.url_scheme"]


UNCHANGED = ("127.0.0.1", "5555", "http")


@pytest.mark.parametrize(
    ("xff", "expected"),
    [
        ("203.0.113.7", "203.0.113.7"),
        # the client sent "X-Forwarded-For: 6.6.6.6"; our proxy appended the real client
        ("6.6.6.6, 203.0.113.7", "203.0.113.7"),
        ("6.6.6.6,203.0.113.7", "203.0.113.7"),
        # two trusted hops (a load balancer at 10.0.0.2 in front of us) are skipped
        ("6.6.6.6, 203.0.113.7, 10.0.0.2", "203.0.113.7"),
        # every hop trusted: the left-most is the best there is
        ("10.0.0.3, 10.0.0.2", "10.0.0.3"),
        ("203.0.113.7:51234", "203.0.113.7"),
        ("[2001:db8::1]:4711", "2001:db8::1"),
        ("2001:db8::1", "2001:db8::1"),
        # an unusable entry ends what can be believed: never the spoofable part left of it
        ("6.6.6.6, unknown, 10.0.0.2", "10.0.0.2"),
        ("6.6.6.6, garbage, 10.0.0.2", "10.0.0.2"),
    ],
)
def test_x_forwarded_for_takes_the_right_most_untrusted_hop(xff: str, expected: str) -> None:
    env = resolve({"HTTP_X_FORWARDED_FOR": xff})
    assert client(env) == (expected, None, "http")


@pytest.mark.parametrize("xff", ["unknown", "_hidden", "", "6.6.6.6, unknown", "not an ip"])
def test_unusable_right_most_x_forwarded_for_changes_nothing(xff: str) -> None:
    assert client(resolve({"HTTP_X_FORWARDED_FOR": xff})) == UNCHANGED


@pytest.mark.parametrize(
    ("proto", "scheme"),
    [
        ("https", "https"),
        ("HTTPS", "https"),
        (" https ", "https"),
        ("http", "http"),
        ("ftp", "http"),
        ("javascript", "http"),
        ("https://evil", "http"),
        ("", "http"),
    ],
)
def test_x_forwarded_proto_accepts_only_http_and_https(proto: str, scheme: str) -> None:
    env = resolve({"HTTP_X_FORWARDED_PROTO": proto})
    assert client(env) == ("127.0.0.1", "5555", scheme)


def test_x_forwarded_for_and_proto_together() -> None:
    env = resolve({"HTTP_X_FORWARDED_FOR": "203.0.113.7", "HTTP_X_FORWARDED_PROTO": "https"})
    assert client(env) == ("203.0.113.7", None, "https")


@pytest.mark.parametrize(
    ("forwarded", "expected"),
    [
        ("for=192.0.2.60", ("192.0.2.60", None, "http")),
        ("for=192.0.2.60;proto=https;by=203.0.113.43", ("192.0.2.60", None, "https")),
        ('for="[2001:db8::1]:4711"', ("2001:db8::1", None, "http")),
        ('for="[2001:db8::1]:4711";proto=https', ("2001:db8::1", None, "https")),
        ('for="192.0.2.60:8080"', ("192.0.2.60", None, "http")),
        ("FOR=192.0.2.60;PROTO=HTTPS", ("192.0.2.60", None, "https")),
        # spoofed element on the left, the element our proxy added on the right
        ("for=6.6.6.6;proto=https, for=203.0.113.7;proto=http", ("203.0.113.7", None, "http")),
        # a trusted hop is skipped, and the proto comes from the chosen client's element
        ("for=203.0.113.7;proto=https, for=10.0.0.2;proto=http", ("203.0.113.7", None, "https")),
        # an obfuscated client to the left of a real one: the real, right-most one wins
        ("for=_hidden, for=198.51.100.17", ("198.51.100.17", None, "http")),
        ("for=192.0.2.60;proto=gopher", ("192.0.2.60", None, "http")),
    ],
)
def test_forwarded(forwarded: str, expected: tuple[str, str | None, str]) -> None:
    assert client(resolve({"HTTP_FORWARDED": forwarded})) == expected


@pytest.mark.parametrize(
    "forwarded",
    [
        "for=unknown",
        'for="_gazonk"',
        "for=198.51.100.17, for=unknown",
        "for=198.51.100.17, for=_hidden",
        "by=203.0.113.43",
        "garbage",
    ],
)
def test_forwarded_without_a_usable_right_most_client_changes_nothing(forwarded: str) -> None:
    """A hidden client keeps the peer's address (the scheme of a hidden client is tested in
    test_forwarded_hidden.py: a trusted proxy knows it as well as any address)."""
    assert client(resolve({"HTTP_FORWARDED": forwarded})) == UNCHANGED


def test_only_the_configured_header_family_is_read() -> None:
    """A proxy sets one family and passes the other through from the client, so reading the
    other would let the client choose its address (nginx sets X-Forwarded-*, forwards
    Forwarded untouched)."""
    headers = {
        "HTTP_FORWARDED": "for=6.6.6.6;proto=https",
        "HTTP_X_FORWARDED_FOR": "203.0.113.7",
        "HTTP_X_FORWARDED_PROTO": "http",
    }
    env = {"REMOTE_ADDR": "127.0.0.1", "REMOTE_PORT": "5555", "wsgi.url_scheme": "http",
           **headers}
    TrustedProxies(["127.0.0.1"], "x-forwarded").resolve(env)
    assert client(env) == ("203.0.113.7", None, "http")
    env = {"REMOTE_ADDR": "127.0.0.1", "REMOTE_PORT": "5555", "wsgi.url_scheme": "http",
           **headers}
    TrustedProxies(["127.0.0.1"], "forwarded").resolve(env)
    assert client(env) == ("6.6.6.6", None, "https")


def test_everyone_trusted_means_the_left_most_entry() -> None:
    env = resolve({"HTTP_X_FORWARDED_FOR": "6.6.6.6, 203.0.113.7"}, ["*"])
    assert client(env) == ("6.6.6.6", None, "http")


HOPS = [f"198.51.100.{i}" for i in range(1, 6)] + [f"10.0.0.{i}" for i in range(1, 4)]


@FAST
@given(chain=st.lists(st.sampled_from(HOPS), min_size=1, max_size=8))
def test_x_forwarded_for_chain_property(chain: list[str]) -> None:
    """The client is the right-most hop outside 10/8 (or the left-most if all are inside)."""
    env = resolve({"HTTP_X_FORWARDED_FOR": ", ".join(chain)})
    untrusted = [hop for hop in chain if not hop.startswith("10.")]
    if untrusted:
        assert env["REMOTE_ADDR"] == untrusted[-1]
    else:
        assert env["REMOTE_ADDR"] == chain[0]
    assert "REMOTE_PORT" not in env
