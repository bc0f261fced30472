"""One client connection in a worker: deadline-bounded reads and writes on its socket.

Invariants: the socket stays in blocking mode as far as Python knows, and every call passes
MSG_DONTWAIT, so the hot path is exactly one recv or send syscall and no fcntl per connection;
only when a call would block do we poll, and never past the deadline given.
"""

from __future__ import annotations

import errno
import math
import select
import socket
import termios
import time
from collections.abc import Mapping
from types import MappingProxyType

from prefork.http import Limits, Parser, RequestParser
from prefork.http.proxy import ProxyHeader
from prefork.sockets import queued_bytes, recv_now

_DONTWAIT = socket.MSG_DONTWAIT
_POLLIN = select.POLLIN | select.POLLPRI
_POLLOUT = select.POLLOUT
_ERRORS = select.POLLERR | select.POLLHUP | select.POLLNVAL
# SO_LINGER on with a timeout of 0: close() sends a reset instead of a FIN
_LINGER_RESET = b"\x01\x00\x00\x00\x00\x00\x00\x00"
# Send errors that mean the peer, or the network to it, ended the connection, besides
# ConnectionError's (EPIPE, ECONNRESET, ...) which Python already sorts out: these arrive as a
# plain OSError (ETIMEDOUT as TimeoutError). ETIMEDOUT: TCP gave up retransmitting or
# probing; the others: an ICMP error or a lost route, reported on the socket. They are a
# client going away, not a fault here. EBADF, EINVAL, ENOTSOCK and the like stay out: those
# are bugs, and must reach the log with their traceback.
_PEER_ERRNOS = frozenset(
    {
        errno.ETIMEDOUT,
        errno.EHOSTUNREACH,
        errno.EHOSTDOWN,
        errno.ENETUNREACH,
        errno.ENETDOWN,
        errno.ENETRESET,
    }
)


class ClientTimeout(OSError):
    """The client did not send or accept bytes before the deadline."""

    unsent = 0  # from a send: the bytes of it that never left (what the access log subtracts)


class ClientDisconnected(OSError):
    """The client closed the connection (or reset it) in the middle of a message."""

    unsent = 0  # as ClientTimeout's


class RequestTooLong(ClientTimeout):
    """Waiting on the client (its body, or taking the response) would have kept the request
    past workers.timeout, where the master kills a worker as hung."""


def peer_failed(exc: OSError) -> bool:
    """Whether a failed send means the client (or the network to it) is gone, rather than a
    bug here: such failures become ClientDisconnected, the rest propagate as they are."""
    return isinstance(exc, ConnectionError) or exc.errno in _PEER_ERRNOS


def _gone(exc: OSError, unsent: int) -> ClientDisconnected:
    gone = ClientDisconnected(str(exc))
    gone.unsent = unsent
    return gone


class Connection:
    """A client socket, its parser state, and when it may next be closed for idleness.

    `deadline` is the monotonic time after which an idle (parked) connection is closed;
    `head_deadline` bounds the arrival of a request head that has started.
    """

    __slots__ = (
        "sock",
        "fd",
        "peer",
        "listener",
        "parser",
        "deadline",
        "head_deadline",
        "served",
        "closed",
        "trusted",
        "proxy",
        "linger_until",
        "remote",
        "adopted",
        "wait_until",
        "resetting",
    )

    sendfile_ok = True  # a plain socket: file bodies may go out with os.sendfile
    handshaken = True  # no TLS handshake to wait for
    # the SSL_* environ keys of a TLS connection (tls.TLSConnection sets its own, once per
    # connection); a plain connection has none, and its requests never read this
    tls_environ: Mapping[str, str] = MappingProxyType({})

    def __init__(
        self,
        sock: socket.socket,
        peer: object,
        listener: object,
        limits: Limits,
        parser: Parser | None = None,
    ) -> None:
        self.sock = sock
        self.fd = sock.fileno()
        self.peer = peer
        self.listener = listener
        # HTTP's, unless another protocol's is given (protocol: uwsgi)
        self.parser: Parser = RequestParser(limits) if parser is None else parser
        self.deadline = 0.0
        self.head_deadline = 0.0
        self.served = 0
        self.closed = False
        self.trusted = False  # the peer is a trusted proxy
        self.proxy: ProxyHeader | None = None  # a PROXY header still to be read
        self.linger_until = 0.0  # closing after an error: discard input until then
        self.remote: tuple[str, str] | None = None  # REMOTE_ADDR/PORT of peer, once computed
        self.adopted = False  # passed on by a replaced worker (worker.Worker.adopt)
        # no wait on this client may last past this (monotonic): set per request, so that a
        # slow client costs its own connection before the master would kill the whole worker
        self.wait_until = math.inf
        self.resetting = False  # the close is to be a reset (reset_on_close)

    # reading ---------------------------------------------------------------------------

    def recv_now(self, size: int = 65536) -> bytes | None:
        """What the kernel already holds (b"" at end of stream), or None if nothing yet."""
        return recv_now(self.sock, size)

    def has_input(self) -> bool:
        """Bytes (or the end of the stream) wait unread in the kernel: checked before closing
        a connection as idle, since its client may have sent a request while the worker was
        busy with another one, and closing over unread bytes resets the connection."""
        poller = select.poll()
        poller.register(self.fd, _POLLIN)
        return bool(poller.poll(0))

    def has_unread_bytes(self) -> bool:
        """Bytes wait unread in the kernel (SIOCINQ; an end of stream is none): what makes
        a close send a reset, which can destroy the response still on its way. Unlike
        has_input(), a client that closed after reading its answer (wrk, curl with
        Connection: close) does not count, and its connection is closed at once."""
        return queued_bytes(self.fd, termios.FIONREAD) > 0

    def recv(self, timeout: float, size: int = 65536) -> bytes:
        """Wait up to `timeout` seconds for bytes; b"" at end of stream."""
        data = self.recv_now(size)
        if data is not None:
            return data
        deadline = time.monotonic() + timeout
        while True:
            self._wait(_POLLIN, deadline)
            data = self.recv_now(size)
            if data is not None:
                return data

    # writing ---------------------------------------------------------------------------

    def send(self, data: bytes | memoryview, timeout: float) -> None:
        """Send all of `data`, waiting at most `timeout` seconds for the client to take it."""
        try:
            sent = self.sock.send(data, _DONTWAIT)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError as exc:
            if not peer_failed(exc):
                raise
            # made by a function: an exception held in a local of this frame, which its
            # context's traceback holds, would be a cycle keeping every frame below alive,
            # and with them the request's environ and body until the collector ran
            raise _gone(exc, len(data)) from None
        if sent == len(data):
            return
        view = memoryview(data)[sent:]
        deadline = time.monotonic() + timeout
        try:
            while view:
                self._wait(_POLLOUT, deadline)
                try:
                    sent = self.sock.send(view, _DONTWAIT)
                except (BlockingIOError, InterruptedError):
                    continue
                except OSError as exc:
                    if not peer_failed(exc):
                        raise
                    raise ClientDisconnected(str(exc)) from None
                view = view[sent:]
        except (ClientDisconnected, ClientTimeout) as exc:
            exc.unsent = len(view)
            raise

    def wait_writable(self, timeout: float) -> None:
        self._wait(_POLLOUT, time.monotonic() + timeout)

    def _wait(self, events: int, deadline: float) -> None:
        cut = deadline > self.wait_until
        if cut:
            deadline = self.wait_until
        remaining = deadline - time.monotonic()
        if remaining > 0:
            poller = select.poll()
            poller.register(self.fd, events)
            ready = poller.poll(remaining * 1000.0)
        else:
            ready = []
        if not ready:
            if cut:
                raise RequestTooLong(
                    "waiting on the client would have kept the request past workers.timeout"
                )
            raise ClientTimeout("client too slow")
        if ready[0][1] & _ERRORS and not ready[0][1] & events:
            raise ClientDisconnected("connection reset")

    # closing ---------------------------------------------------------------------------

    def begin_linger(self, seconds: float) -> bool:
        """After an error response: half-close, then (in the worker's epoll, not here) read and
        discard what the client still sends until it closes or `seconds` pass, so the
        response is not destroyed by a reset (RFC 9112 section 9.6). False if the socket is
        already unusable, or to be reset (reset_on_close): a half-close is the FIN that must
        not be sent then."""
        if self.resetting:
            return False
        try:
            self.sock.shutdown(socket.SHUT_WR)
        except OSError:
            return False
        self.linger_until = time.monotonic() + seconds
        return True

    def reset_on_close(self) -> None:
        """Make the coming close a reset, not a FIN: a body delimited by the close (HTTP/1.0,
        which nginx speaks to its upstreams by default) that was cut short must not end in
        what says "complete"; a client, or nginx passing it on chunked, sees the reset as the
        error it is."""
        try:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
        except OSError:
            return  # already unusable: nothing more goes out anyway
        self.resetting = True

    def discard_input(self, limit: int = 1 << 20) -> bool:
        """Read and drop what is there; False once the client has closed (or sent too much)."""
        for _ in range(limit // 65536):
            data = self.recv_now()
            if data is None:
                return True
            if not data:
                return False
        return False

    def close(self) -> None:
        """Close the socket (a lingering close after an error is begin_linger, waited out in
        the worker's epoll)."""
        if self.closed:
            return
        self.closed = True
        self.sock.close()
