"""Parse and print listen addresses: ``HOST:PORT``, ``[V6]:PORT``, ``PORT``, ``unix:PATH``.

Invariants: no I/O of any kind (hostnames are checked for syntax, never resolved; unix
paths are never looked at on disk). Every rejection is a ``ValueError`` whose message says
what is wrong and, where there is one, the spelling that would have worked.
``str(parse_address(s))`` is the canonical spelling, and parsing it again gives an equal
``Address``.
"""

import ipaddress
import os
import re
from dataclasses import dataclass, replace
from typing import Literal

# Where a bare "PORT" listens: loopback, so a forgotten host never exposes a server.
DEFAULT_HOST = "127.0.0.1"
# What "*:PORT" and ":PORT" mean.
ANY_HOST = "0.0.0.0"
# sockaddr_un.sun_path is 108 bytes on Linux, one of which is the terminating NUL.
MAX_UNIX_PATH_BYTES = 107

_PORT_RE = re.compile(r"[0-9]+")
_IPV4_LIKE_RE = re.compile(r"[0-9.]+")
_LABEL_RE = re.compile(r"[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?")


@dataclass(frozen=True, slots=True)
class Address:
    """One place to listen: a TCP host and port, or a unix socket path."""

    kind: Literal["tcp", "unix"]
    host: str = ""
    port: int = 0
    path: str = ""

    def __post_init__(self) -> None:
        if self.kind not in ("tcp", "unix"):
            raise ValueError(f"address kind must be 'tcp' or 'unix', got {self.kind!r}")
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port must be from 0 to 65535, got {self.port}")

    def __str__(self) -> str:
        if self.kind == "unix":
            return f"unix:{self.path}"
        if self.is_ipv6:
            return f"[{self.host}]:{self.port}"
        return f"{self.host}:{self.port}"

    @property
    def is_ipv6(self) -> bool:
        """True for a TCP address whose host is an IPv6 literal."""
        return self.kind == "tcp" and ":" in self.host


def parse_address(text: str) -> Address:
    """Parse one address; raise ``ValueError`` with a clear reason if it is not valid."""
    text = text.strip()
    if not text:
        raise ValueError("address is empty")
    if text.startswith("unix:"):
        return Address("unix", path=check_unix_path(text[len("unix:") :]))
    if _PORT_RE.fullmatch(text):
        return Address("tcp", host=DEFAULT_HOST, port=_parse_port(text, text))
    if text.startswith("["):
        return _parse_bracketed(text)
    if "[" in text or "]" in text:
        raise ValueError(f"unbalanced brackets in address {text!r}")
    colons = text.count(":")
    if colons == 0:
        raise ValueError(f"missing port in address {text!r} (use HOST:PORT, e.g. {text}:8000)")
    if colons > 1:
        raise ValueError(_unbracketed_v6_message(text))
    host, _, port_text = text.partition(":")
    port = _parse_port(port_text, text)
    if host in ("", "*"):
        return Address("tcp", host=ANY_HOST, port=port)
    return Address("tcp", host=_check_host(host, text), port=port)


def resolve_relative(addr: Address, base_dir: str) -> Address:
    """Return ``addr`` with a relative unix socket path joined to ``base_dir``.

    TCP addresses and absolute paths come back unchanged. Raises ``ValueError`` if the
    joined path is too long for a unix socket.
    """
    if addr.kind != "unix" or os.path.isabs(addr.path):
        return addr
    joined = os.path.normpath(os.path.join(base_dir, addr.path))
    return replace(addr, path=check_unix_path(joined))


def _parse_bracketed(text: str) -> Address:
    close = text.find("]")
    if close < 0 or text.count("[") != 1 or text.count("]") != 1:
        raise ValueError(f"unbalanced brackets in address {text!r}")
    host, rest = text[1:close], text[close + 1 :]
    if not rest:
        raise ValueError(f"missing port in address {text!r} (use [{host}]:PORT)")
    if not rest.startswith(":"):
        raise ValueError(f"expected ':PORT' after ']' in address {text!r}")
    port = _parse_port(rest[1:], text)
    if ":" not in host:
        raise ValueError(f"brackets are only for IPv6 addresses, got {text!r} (use {host}:{port})")
    if not is_ipv6(host):
        raise ValueError(f"{host!r} is not a valid IPv6 address (in {text!r})")
    return Address("tcp", host=host, port=port)


def _parse_port(port_text: str, text: str) -> int:
    if not port_text:
        raise ValueError(f"missing port in address {text!r}")
    # int() would also take "+80", " 80" and "8_0"; only plain digits are a port.
    if not _PORT_RE.fullmatch(port_text):
        raise ValueError(f"port must be a number, got {port_text!r} (in {text!r})")
    port = int(port_text)
    if port > 65535:
        raise ValueError(f"port must be from 0 to 65535, got {port} (in {text!r})")
    return port


def _check_host(host: str, text: str) -> str:
    if _IPV4_LIKE_RE.fullmatch(host):
        try:
            ipaddress.IPv4Address(host)
        except ValueError:
            raise ValueError(f"{host!r} is not a valid IPv4 address (in {text!r})") from None
        return host
    name = host[:-1] if host.endswith(".") else host
    if len(name) > 253 or not all(_LABEL_RE.fullmatch(label) for label in name.split(".")):
        raise ValueError(f"{host!r} is not a valid host name or IP address (in {text!r})")
    return host


def _unbracketed_v6_message(text: str) -> str:
    host, _, port_text = text.rpartition(":")
    if _PORT_RE.fullmatch(port_text) and is_ipv6(host):
        return f"IPv6 addresses need brackets: use [{host}]:{port_text} instead of {text!r}"
    if is_ipv6(text):
        return f"missing port in IPv6 address {text!r} (use [{text}]:PORT)"
    return f"too many ':' in address {text!r} (IPv6 addresses go in brackets: [V6]:PORT)"


def is_ipv6(text: str) -> bool:
    """Whether `text` is an IPv6 address (without brackets)."""
    try:
        ipaddress.IPv6Address(text)
    except ValueError:
        return False
    return True


def unix_path_length_problem(path: str) -> str | None:
    """"N bytes, at most 107" when `path` is too long for a unix socket address, else None:
    bind() and connect() fail on it with "AF_UNIX path too long" and no errno."""
    size = len(os.fsencode(path))
    if size > MAX_UNIX_PATH_BYTES:
        return f"{size} bytes, at most {MAX_UNIX_PATH_BYTES}"
    return None


def check_unix_path(path: str) -> str:
    """`path` if it can name a unix socket, else ValueError with the reason."""
    if not path:
        raise ValueError("unix socket path is empty (use unix:PATH)")
    if "\0" in path:
        raise ValueError(f"unix socket path contains a NUL byte: {path!r}")
    problem = unix_path_length_problem(path)
    if problem is not None:
        raise ValueError(f"unix socket path is too long ({problem}): {path!r}")
    return path
