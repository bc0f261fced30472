"""The PROXY protocol header (HAProxy's spec, versions 1 and 2) in front of a connection.

Invariants: no I/O; `feed()` takes bytes until the header is complete and then hands back what
follows it untouched; anything malformed is a ProtocolError (the connection is closed without
an HTTP answer, since the peer is a proxy speaking the wrong protocol).
"""

from __future__ import annotations

import ipaddress
import struct

from prefork.http.errors import ProtocolError

V1_PREFIX = b"PROXY "
V1_MAX = 107  # the spec's longest v1 line, CRLF included
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
_V2_HEAD = struct.Struct("!12sBBH")  # signature, version/command, family/protocol, length
V2_MAX_BODY = 2048  # addresses plus TLVs; real proxies send far less


class ProxyHeader:
    """Parser for one connection's PROXY header.

    `mode` is "v1", "v2" or "auto" (either version, or none at all: plain HTTP passes through).
    After `feed()` returns bytes, `done` is True and `source` is the client's (host, port) as
    the proxy saw it, or None for LOCAL/UNKNOWN connections (use the socket's peer).
    """

    __slots__ = ("mode", "buf", "done", "source")

    def __init__(self, mode: str) -> None:
        self.mode = mode
        self.buf = b""
        self.done = False
        self.source: tuple[str, int] | None = None

    def feed(self, data: bytes) -> bytes | None:
        """The bytes after the header once it is complete, else None (send more)."""
        buf = self.buf + data
        if buf[:1] == b"\r" and self.mode != "v1":
            if self.mode == "auto" and len(buf) >= 3 and buf[:3] != V2_SIGNATURE[:3]:
                self.done = True  # plain HTTP after an empty line (RFC 9112 2.2)
                return buf
            if self.mode == "auto" and len(buf) < 3:
                self.buf = buf
                return None
            return self._v2(buf)
        if buf[:1] == b"P" and self.mode != "v2":
            return self._v1(buf)
        if self.mode == "auto" and buf:
            if V2_SIGNATURE.startswith(buf[:12]) and len(buf) < 12:
                self.buf = buf
                return None
            self.done = True  # no header: the client speaks HTTP directly
            return buf
        if not buf:
            return None
        raise ProtocolError(400, "expected a PROXY protocol header")

    def _v1(self, buf: bytes) -> bytes | None:
        if not V1_PREFIX.startswith(buf[:6]) and not buf.startswith(V1_PREFIX):
            if self.mode == "auto":
                self.done = True
                return buf
            raise ProtocolError(400, "expected a PROXY protocol header")
        end = buf.find(b"\r\n")
        if end < 0:
            if len(buf) >= V1_MAX:
                raise ProtocolError(400, "PROXY v1 header too long")
            self.buf = buf
            return None
        if end + 2 > V1_MAX:
            raise ProtocolError(400, "PROXY v1 header too long")
        line, rest = buf[:end], buf[end + 2 :]
        parts = line.split(b" ")
        if len(parts) >= 2 and parts[1] == b"UNKNOWN":
            # the spec (2.1): for UNKNOWN "the receiver must ignore anything presented
            # before the CRLF", whatever it is (a proxy may add addresses it cannot name)
            self.done = True
            return rest
        if len(parts) != 6 or parts[1] not in (b"TCP4", b"TCP6"):
            raise ProtocolError(400, "malformed PROXY v1 header")
        try:
            source = ipaddress.ip_address(parts[2].decode("ascii"))
            ipaddress.ip_address(parts[3].decode("ascii"))
            port = int(parts[4])
            if (
                not parts[4].isdigit()
                or not parts[5].isdigit()
                or not 0 <= port <= 65535
                or not 0 <= int(parts[5]) <= 65535
            ):
                raise ValueError
        except (ValueError, UnicodeDecodeError):
            raise ProtocolError(400, "malformed PROXY v1 header") from None
        if source.version != (4 if parts[1] == b"TCP4" else 6):
            raise ProtocolError(400, "PROXY v1 address does not match its family")
        self.source = (str(source), port)
        self.done = True
        return rest

    def _v2(self, buf: bytes) -> bytes | None:
        if len(buf) < 16:
            if not V2_SIGNATURE.startswith(buf[:12]):
                raise ProtocolError(400, "expected a PROXY protocol header")
            self.buf = buf
            return None
        signature, ver_cmd, family, length = _V2_HEAD.unpack_from(buf)
        if signature != V2_SIGNATURE or ver_cmd >> 4 != 2:
            raise ProtocolError(400, "malformed PROXY v2 header")
        if length > V2_MAX_BODY:
            raise ProtocolError(400, "PROXY v2 header too long")
        if len(buf) < 16 + length:
            self.buf = buf
            return None
        body, rest = buf[16 : 16 + length], buf[16 + length :]
        command = ver_cmd & 0x0F
        self.done = True
        if command == 0:  # LOCAL: the proxy's own connection (health checks)
            return rest
        if command != 1:
            raise ProtocolError(400, "unknown PROXY v2 command")
        if family == 0x11 and length >= 12:  # TCP over IPv4
            src = ipaddress.IPv4Address(body[0:4])
            (port,) = struct.unpack_from("!H", body, 8)
            self.source = (str(src), port)
        elif family == 0x21 and length >= 36:  # TCP over IPv6
            src6 = ipaddress.IPv6Address(body[0:16])
            (port,) = struct.unpack_from("!H", body, 32)
            self.source = (str(src6), port)
        elif family >> 4 in (0, 3):  # UNSPEC or unix: keep the socket's peer
            pass
        else:
            raise ProtocolError(400, "malformed PROXY v2 addresses")
        return rest
