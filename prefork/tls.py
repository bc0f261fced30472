"""TLS: the server context (built in the master from `bind[].tls`) and the worker side of a
TLS connection (non-blocking handshake, reads and writes).

Invariants: certificate and key files are read once, in the master, before privileges are
dropped; a handshake never blocks the worker loop (it waits in epoll like an incomplete request
head, under the same header_timeout); file bodies are never sent with sendfile on TLS.
"""

from __future__ import annotations

import select
import ssl
import time
from typing import TYPE_CHECKING, Any

from prefork.connection import ClientDisconnected, Connection, peer_failed

if TYPE_CHECKING:
    from prefork.config import TLSConfig
    from prefork.http import Limits

_VERIFY = {"none": ssl.CERT_NONE, "optional": ssl.CERT_OPTIONAL, "required": ssl.CERT_REQUIRED}
_VERSIONS = {"1.2": ssl.TLSVersion.TLSv1_2, "1.3": ssl.TLSVersion.TLSv1_3}


def server_context(tls: TLSConfig) -> ssl.SSLContext:
    """Raises OSError (missing files, a key that does not match) or ValueError."""
    if tls.verify_client != "none" and not tls.ca:
        raise ValueError("verify_client needs `ca`, the CA that client certificates chain to")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = _VERSIONS[tls.min_version]
    context.load_cert_chain(tls.certificate, tls.key)
    if tls.ca:
        context.load_verify_locations(tls.ca)
    context.verify_mode = _VERIFY[tls.verify_client]
    if tls.ciphers:
        context.set_ciphers(tls.ciphers)
    context.set_alpn_protocols(["http/1.1"])
    return context


class TLSConnection(Connection):
    """A Connection over an SSLSocket in non-blocking mode (MSG_DONTWAIT is not allowed on
    SSL sockets, so the socket itself is non-blocking)."""

    __slots__ = ("handshaken",)

    sendfile_ok = False

    def __init__(self, sock: ssl.SSLSocket, peer: object, listener: object,
                 limits: Limits) -> None:
        super().__init__(sock, peer, listener, limits)
        self.handshaken = False

    def handshake(self) -> bool | None:
        """Advance the handshake: True done, None wait for more bytes, False failed."""
        sock: Any = self.sock
        try:
            sock.do_handshake()
        except ssl.SSLWantReadError:
            return None
        except ssl.SSLWantWriteError:
            try:
                self._wait(select.POLLOUT, time.monotonic() + 1.0)
            except OSError:
                return False
            return None
        except (ssl.SSLError, OSError):
            return False
        self.handshaken = True
        return True

    def recv_now(self, size: int = 65536) -> bytes | None:
        sock: Any = self.sock
        try:
            data: bytes = sock.recv(size)
            # records OpenSSL already decrypted are not visible to epoll: take them now
            while data and sock.pending():
                data += sock.recv(sock.pending())
            return data
        except (ssl.SSLWantReadError, ssl.SSLWantWriteError, BlockingIOError):
            return None
        except (ssl.SSLError, ConnectionError, OSError):
            return b""

    def send(self, data: bytes | memoryview, timeout: float) -> None:
        view = memoryview(data)
        deadline = time.monotonic() + timeout
        while view:
            try:
                sent = self.sock.send(view)
            except ssl.SSLWantWriteError:
                self._wait(select.POLLOUT, deadline)
                continue
            except ssl.SSLWantReadError:
                self._wait(select.POLLIN, deadline)
                continue
            except ssl.SSLError as exc:
                raise ClientDisconnected(str(exc)) from None
            except OSError as exc:
                if not peer_failed(exc):
                    raise
                raise ClientDisconnected(str(exc)) from None
            view = view[sent:]
