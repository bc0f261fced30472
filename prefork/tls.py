"""TLS: the server context (built in the master from `bind[].tls`) and the worker side of a
TLS connection (non-blocking handshake, reads and writes).

Invariants: certificate and key files are read once, in the master, before privileges are
dropped; a handshake never blocks the worker loop (it waits in epoll like an incomplete request
head, under the same header_timeout); file bodies are never sent with sendfile on TLS. The SSL_*
environ keys (the client certificate's identity, protocol and cipher) are computed once per
connection, when its handshake completes, and never on a plain connection.
"""

from __future__ import annotations

import logging
import select
import ssl
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, NoReturn

from prefork.connection import ClientDisconnected, ClientTimeout, Connection, peer_failed

if TYPE_CHECKING:
    from prefork.config import TLSConfig
    from prefork.http import Limits, Parser

_VERIFY = {"none": ssl.CERT_NONE, "optional": ssl.CERT_OPTIONAL, "required": ssl.CERT_REQUIRED}
_VERSIONS = {"1.2": ssl.TLSVersion.TLSv1_2, "1.3": ssl.TLSVersion.TLSv1_3}
# getpeercert() names attributes by OpenSSL's long names; mod_ssl's DN strings (OpenSSL's
# X509_NAME_print_ex, XN_FLAG_RFC2253) use its short ones. Others stay as Python gives them
# (a long name, or the dotted OID of an attribute OpenSSL does not know).
_SHORT_NAMES = {
    "commonName": "CN",
    "countryName": "C",
    "localityName": "L",
    "stateOrProvinceName": "ST",
    "streetAddress": "street",
    "organizationName": "O",
    "organizationalUnitName": "OU",
    "domainComponent": "DC",
    "userId": "UID",
    "surname": "SN",
    "givenName": "GN",
    "jurisdictionCountryName": "jurisdictionC",
    "jurisdictionStateOrProvinceName": "jurisdictionST",
    "jurisdictionLocalityName": "jurisdictionL",
}
log = logging.getLogger("prefork")

_DN_SPECIAL = frozenset(',+"\\<>;')  # escaped with a backslash anywhere (RFC 4514 2.4)


class EncryptedKeyError(ValueError):
    """`key` is passphrase-protected: preforkd has no passphrase setting, so nothing could
    decrypt it."""


def _refuse_passphrase() -> NoReturn:
    """OpenSSL's password callback for `key`. Without one, an encrypted key makes OpenSSL
    prompt "Enter PEM pass phrase:" on the terminal and wait for an answer nobody gives
    (check, start, and a reload under a supervisor); raising fails the load at once."""
    raise EncryptedKeyError(
        "the key is encrypted (passphrase-protected), and preforkd has no passphrase "
        "setting: decrypt the key (openssl pkey -in KEY -out DECRYPTED-KEY) and keep the "
        "file readable only by the user that starts preforkd"
    )


Step = tuple[str, Callable[[ssl.SSLContext], None]]


def context_steps(tls: TLSConfig) -> list[Step]:
    """How server_context applies `tls`: one step per setting, named by the setting it
    reads. OpenSSL's errors seldom say which file or value they are about, so the
    configuration check runs these one at a time and reports a failure against its step's
    setting. Each raises OSError (ssl.SSLError included) or ValueError."""

    def verify_client(context: ssl.SSLContext) -> None:
        if tls.verify_client != "none" and not tls.ca:
            raise ValueError("verify_client needs `ca`, the CA that client certificates chain to")
        context.verify_mode = _VERIFY[tls.verify_client]

    def min_version(context: ssl.SSLContext) -> None:
        context.minimum_version = _VERSIONS[tls.min_version]

    def certificate(context: ssl.SSLContext) -> None:
        # load_cert_chain fails alike ("PEM lib") whichever of its two files is not PEM: the
        # certificate file is read on its own first, so that the key's step is the key's
        ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_verify_locations(cafile=tls.certificate)

    def key(context: ssl.SSLContext) -> None:
        context.load_cert_chain(tls.certificate, tls.key, password=_refuse_passphrase)

    def ca(context: ssl.SSLContext) -> None:
        if tls.ca:
            context.load_verify_locations(tls.ca)

    def ciphers(context: ssl.SSLContext) -> None:
        if tls.ciphers:
            context.set_ciphers(tls.ciphers)

    return [("verify_client", verify_client), ("min_version", min_version),
            ("certificate", certificate), ("key", key), ("ca", ca), ("ciphers", ciphers)]


def server_context(tls: TLSConfig) -> ssl.SSLContext:
    """Raises OSError (missing files, files that are not PEM, a key that does not match,
    a cipher list OpenSSL cannot use) or ValueError (EncryptedKeyError among them)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    for _, step in context_steps(tls):
        step(context)
    context.set_alpn_protocols(["http/1.1"])
    return context


def distinguished_name(name: Any) -> str:
    """A name from getpeercert() (its RDNs in certificate order, each a tuple of (attribute,
    value) pairs) as mod_ssl's SSL_CLIENT_S_DN: RFC 4514, most specific first
    ("CN=client,O=Example\\, Inc.,C=DE"), exactly as OpenSSL's RFC 2253 printing orders,
    names and escapes it (without escaping non-ASCII, as mod_ssl asks)."""
    return ",".join(
        "+".join(f"{_SHORT_NAMES.get(key, key)}={_escape(value)}" for key, value in reversed(rdn))
        for rdn in reversed(name)
    )


def _escape(value: str) -> str:
    out = []
    last = len(value) - 1
    for index, char in enumerate(value):
        if char in _DN_SPECIAL or (char == "#" and index == 0) or (
            char == " " and index in (0, last)
        ):
            out.append("\\" + char)
        elif char < " " or char == "\x7f":
            out.append(f"\\{ord(char):02X}")
        else:
            out.append(char)
    return "".join(out)


def _wsgi(text: str) -> str:
    """A CGI value as PEP 3333 has it: its UTF-8 bytes, one character each (as PATH_INFO,
    and as mod_wsgi and uWSGI give these keys)."""
    return text.encode("utf-8").decode("latin-1")


def client_environ(sock: ssl.SSLSocket) -> dict[str, str]:
    """The SSL_* environ keys of a connection whose handshake is complete, with mod_ssl's
    names and formats: SSL_PROTOCOL, SSL_CIPHER, SSL_CLIENT_VERIFY (SUCCESS, or NONE without
    a client certificate), and for a client certificate its subject and issuer (S_DN, I_DN),
    serial number (M_SERIAL, hex), validity (V_START, V_END, as "Jun  1 12:00:00 2026 GMT")
    and the certificate itself (CERT, PEM).

    A client certificate is only ever asked for with verify_client optional or required, and
    a handshake whose certificate fails verification fails: so a certificate here is a
    verified one, which is also the only kind getpeercert() decodes (CERT_NONE: no
    certificate is requested, and getpeercert() returns None).
    """
    cipher = sock.cipher()
    environ = {
        "SSL_PROTOCOL": sock.version() or "",
        "SSL_CIPHER": cipher[0] if cipher is not None else "",
        "SSL_CLIENT_VERIFY": "NONE",
    }
    der = sock.getpeercert(binary_form=True)
    cert: Any = sock.getpeercert()
    if der is None or not cert:
        return environ
    environ["SSL_CLIENT_VERIFY"] = "SUCCESS"
    environ["SSL_CLIENT_S_DN"] = _wsgi(distinguished_name(cert.get("subject", ())))
    environ["SSL_CLIENT_I_DN"] = _wsgi(distinguished_name(cert.get("issuer", ())))
    environ["SSL_CLIENT_M_SERIAL"] = str(cert.get("serialNumber", ""))
    environ["SSL_CLIENT_V_START"] = str(cert.get("notBefore", ""))
    environ["SSL_CLIENT_V_END"] = str(cert.get("notAfter", ""))
    environ["SSL_CLIENT_CERT"] = ssl.DER_cert_to_PEM_cert(der)
    return environ


class TLSConnection(Connection):
    """A Connection over an SSLSocket in non-blocking mode (MSG_DONTWAIT is not allowed on
    SSL sockets, so the socket itself is non-blocking)."""

    __slots__ = ("handshaken", "tls_environ")

    sendfile_ok = False

    def __init__(self, sock: ssl.SSLSocket, peer: object, listener: object,
                 limits: Limits, parser: Parser | None = None) -> None:
        super().__init__(sock, peer, listener, limits, parser)
        self.handshaken = False
        self.tls_environ = {}  # client_environ(), once handshaken

    def handshake(self) -> bool | None:
        """Advance the handshake: True done, None wait for more bytes, False failed."""
        sock: Any = self.sock
        try:
            sock.do_handshake()
            self.tls_environ = client_environ(sock)  # once: every request copies it
        except ssl.SSLWantReadError:
            return None
        except ssl.SSLWantWriteError:
            try:
                self._wait(select.POLLOUT, time.monotonic() + 1.0)
            except OSError:
                return False
            return None
        except (ssl.SSLError, OSError) as exc:
            # the tcp protocol logs the same at debug; an operator chasing a client that
            # cannot connect (no certificate, an old protocol) turns the level down to see it
            log.debug("closing %s: TLS handshake: %s", self.peer, exc)
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
        try:
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
        except (ClientDisconnected, ClientTimeout) as exc:
            exc.unsent = len(view)  # what the access log subtracts
            raise
