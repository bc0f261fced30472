"""parse_address / resolve_relative: every accepted spelling, every rejection and its hint."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from prefork.addresses import Address, parse_address, resolve_relative
from prefork.sockets import passed_socket_match


@pytest.mark.parametrize(
    ("text", "expected", "canonical"),
    [
        ("127.0.0.1:8000", Address("tcp", "127.0.0.1", 8000), "127.0.0.1:8000"),
        ("0.0.0.0:0", Address("tcp", "0.0.0.0", 0), "0.0.0.0:0"),
        ("*:8000", Address("tcp", "0.0.0.0", 8000), "0.0.0.0:8000"),
        (":8000", Address("tcp", "0.0.0.0", 8000), "0.0.0.0:8000"),
        ("8000", Address("tcp", "127.0.0.1", 8000), "127.0.0.1:8000"),
        ("0", Address("tcp", "127.0.0.1", 0), "127.0.0.1:0"),
        ("65535", Address("tcp", "127.0.0.1", 65535), "127.0.0.1:65535"),
        ("localhost:8000", Address("tcp", "localhost", 8000), "localhost:8000"),
        ("web-1.example.com:443", Address("tcp", "web-1.example.com", 443), None),
        ("example.com.:80", Address("tcp", "example.com.", 80), None),
        ("[::1]:0", Address("tcp", "::1", 0), "[::1]:0"),
        ("[::]:8000", Address("tcp", "::", 8000), "[::]:8000"),
        ("[2001:db8::1]:80", Address("tcp", "2001:db8::1", 80), None),
        ("[fe80::1%eth0]:80", Address("tcp", "fe80::1%eth0", 80), None),
        ("  127.0.0.1:80 ", Address("tcp", "127.0.0.1", 80), "127.0.0.1:80"),
        ("unix:/run/x.sock", Address("unix", path="/run/x.sock"), "unix:/run/x.sock"),
        ("unix:run/x.sock", Address("unix", path="run/x.sock"), "unix:run/x.sock"),
        ("unix:x:y.sock", Address("unix", path="x:y.sock"), None),
    ],
)
def test_valid(text: str, expected: Address, canonical: str | None) -> None:
    addr = parse_address(text)
    assert addr == expected
    assert str(addr) == (canonical if canonical is not None else text.strip())
    assert parse_address(str(addr)) == addr


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "empty"),
        ("   ", "empty"),
        ("localhost", "missing port"),
        ("127.0.0.1", "missing port"),
        ("127.0.0.1:", "missing port"),
        ("[::1]", "missing port in address '[::1]' (use [::1]:PORT)"),
        ("[::1]:", "missing port"),
        ("localhost:http", "port must be a number, got 'http'"),
        ("localhost:-1", "port must be a number"),
        ("localhost:+80", "port must be a number"),
        ("localhost:8_0", "port must be a number"),
        ("localhost: 80", "port must be a number"),
        ("localhost:65536", "port must be from 0 to 65535, got 65536"),
        ("99999", "port must be from 0 to 65535"),
        ("[::1:80", "unbalanced brackets"),
        ("::1]:80", "unbalanced brackets"),
        ("[[::1]]:80", "unbalanced brackets"),
        ("[::1]80", "expected ':PORT' after ']'"),
        ("[127.0.0.1]:80", "brackets are only for IPv6 addresses"),
        ("[::g]:80", "not a valid IPv6 address"),
        ("::1:80", "use [::1]:80"),
        ("2001:db8::1:443", "use [2001:db8::1]:443"),
        ("::1", "missing port in IPv6 address '::1' (use [::1]:PORT)"),
        ("a:b:c", "too many ':'"),
        ("256.1.1.1:80", "not a valid IPv4 address"),
        ("1.2.3:80", "not a valid IPv4 address"),
        ("bad host:80", "not a valid host name"),
        ("-bad.example:80", "not a valid host name"),
        ("a..b:80", "not a valid host name"),
        ("unix:", "unix socket path is empty"),
        ("unix:a\0b", "NUL"),
        ("unix:/" + "x" * 200, "too long"),
    ],
)
def test_invalid(text: str, message: str) -> None:
    with pytest.raises(ValueError) as info:
        parse_address(text)
    assert message in str(info.value)


def test_is_ipv6() -> None:
    assert parse_address("[::1]:80").is_ipv6
    assert not parse_address("127.0.0.1:80").is_ipv6
    assert not parse_address("unix:/a:b").is_ipv6


def test_address_rejects_bad_fields() -> None:
    with pytest.raises(ValueError):
        Address("tcp", "127.0.0.1", 70000)
    with pytest.raises(ValueError):
        Address("udp", "127.0.0.1", 80)  # type: ignore[arg-type]


def test_address_is_frozen_and_hashable() -> None:
    addr = parse_address("127.0.0.1:80")
    assert {addr, parse_address("127.0.0.1:80")} == {addr}
    with pytest.raises(AttributeError):
        addr.port = 81  # type: ignore[misc]


def test_resolve_relative() -> None:
    assert resolve_relative(parse_address("unix:run/x.sock"), "/srv/app") == Address(
        "unix", path="/srv/app/run/x.sock"
    )
    assert resolve_relative(parse_address("unix:./x.sock"), "/srv/app").path == "/srv/app/x.sock"
    absolute = parse_address("unix:/run/x.sock")
    assert resolve_relative(absolute, "/srv/app") is absolute
    tcp = parse_address("127.0.0.1:80")
    assert resolve_relative(tcp, "/srv/app") is tcp


def test_resolve_relative_too_long() -> None:
    with pytest.raises(ValueError, match="too long"):
        resolve_relative(parse_address("unix:x.sock"), "/" + "d" * 120)


@given(
    st.one_of(
        st.builds(
            lambda ip, port: Address("tcp", str(ip), port),
            st.ip_addresses(),
            st.integers(0, 65535),
        ),
        st.builds(
            lambda path: Address("unix", path=path),
            st.text(
                st.characters(codec="ascii", exclude_characters="\0"), min_size=1, max_size=100
            ).filter(lambda p: p == p.strip()),
        ),
    )
)
def test_str_round_trips(addr: Address) -> None:
    assert parse_address(str(addr)) == addr


@pytest.mark.parametrize(
    ("passed", "configured", "score"),
    [
        ("127.0.0.1:8443", "127.0.0.1:8443", 2),
        ("127.0.0.1:8443", "localhost:8443", 2),  # by meaning: the name resolves to it
        ("[::]:8443", "*:8443", 1),  # ListenStream=8443 is dual-stack [::]
        ("[::]:8443", "127.0.0.1:8443", 1),
        ("127.0.0.1:8443", "*:8443", 1),
        ("[::ffff:127.0.0.1]:8443", "127.0.0.1:8443", 2),
        ("[::]:8443", "*:8444", 0),
        ("127.0.0.1:8443", "127.0.0.2:8443", 0),
        ("unix:/run/app.sock", "unix:/run/app.sock", 2),
        ("unix:/run/app.sock", "unix:/run/other.sock", 0),
        ("unix:/run/app.sock", "127.0.0.1:8443", 0),
    ],
)
def test_a_passed_socket_is_matched_to_a_bind_entry_by_address_meaning(
    passed: str, configured: str, score: int
) -> None:
    assert passed_socket_match(parse_address(passed), parse_address(configured)) == score
