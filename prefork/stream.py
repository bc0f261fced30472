"""protocol: tcp -- what a stream handler's connection goes through before and while the
handler has it: the TLS handshake, a PROXY header, and the socket the handler is given.

Invariants: the handler gets a blocking socket (an ssl.SSLSocket on a TLS listener) whose
every blocking call marks the worker's slot WAITING, so time spent waiting on the client is
never taken for a hung handler (only the handler's own work counts toward
`workers.timeout`), and is bounded by `stream.idle_timeout` instead (a TimeoutError in the
handler). Bytes it sends are counted for the access log and the metrics. Nothing before the
handler reads application bytes: a PROXY header is consumed exactly (peeked, then received
by its own length), so what follows it is the handler's to read.
"""

from __future__ import annotations

import select
import socket
import ssl
import time
from collections.abc import Callable
from typing import Any

from prefork.http.errors import ProtocolError
from prefork.http.proxy import V1_MAX, V2_MAX_BODY, ProxyHeader
from prefork.scoreboard import Activity, Slot

# the longest a PROXY header can be: v2's 16-byte head and its largest body, or a v1 line
_PROXY_PEEK = max(V1_MAX, 16 + V2_MAX_BODY)

_RECEIVES = ("recv", "recv_into", "recvfrom", "recvfrom_into", "recvmsg", "recvmsg_into", "read")
# sendfile: socket.sendfile waits for the client in its own selector and os.sendfile, never
# through send(); unwrapped, a slow client's download counted as the handler's work (killed
# as hung at workers.timeout) and its bytes were not counted at all
_SENDS = ("send", "sendall", "sendto", "sendmsg", "write", "sendfile")


def _waiting(name: str, base: Callable[..., Any], counts: bool) -> Callable[..., Any]:
    def call(self: Any, *args: Any, **kwargs: Any) -> Any:
        if self.pf_depth:  # inside another of these (SSLSocket.sendall calls send)
            return base(self, *args, **kwargs)
        slot: Slot = self.pf_slot
        self.pf_depth = 1
        slot.set_activity(Activity.WAITING)
        try:
            result = base(self, *args, **kwargs)
        except TimeoutError:
            # this socket's timeout (stream.idle_timeout): the client's, as a TimeoutError
            # from a backend the handler talks to is not (see timed_out)
            self.pf_timed_out = True
            raise
        finally:
            slot.set_activity(Activity.BUSY)
            self.pf_depth = 0
        if counts:
            if name == "sendall":
                data = args[0]
                self.pf_sent += data.nbytes if isinstance(data, memoryview) else len(data)
            elif isinstance(result, int):
                self.pf_sent += result
        return result

    call.__name__ = name
    call.__doc__ = base.__doc__
    return call


def _waiting_class(base: type) -> type:
    """`base` (socket.socket or ssl.SSLSocket) with its blocking calls marking the slot."""
    methods: dict[str, Any] = {}
    for name in (*_RECEIVES, *_SENDS):
        if hasattr(base, name):
            methods[name] = _waiting(name, getattr(base, name), name in _SENDS)
    return type(f"Stream{base.__name__}", (base,), methods)


StreamSocket: type[socket.socket] = _waiting_class(socket.socket)
StreamSSLSocket: type[ssl.SSLSocket] = _waiting_class(ssl.SSLSocket)


class StreamRefused(Exception):
    """The connection ends before the handler sees it (a failed handshake, a bad PROXY
    header, a client gone); the message says why."""


def open_stream(
    sock: socket.socket,
    slot: Slot,
    *,
    context: ssl.SSLContext | None,
    proxy_mode: str | None,
    handshake_timeout: float,
    idle_timeout: float,
) -> tuple[socket.socket, tuple[str, int] | None]:
    """Make the accepted `sock` the handler's: read a PROXY header first (`proxy_mode`, only
    for a trusted peer), then the TLS handshake (`context`), both within
    `handshake_timeout`. Returns the socket to give the handler (`sock` is detached) and
    the client address from the PROXY header (None: use the socket's peer). Raises
    StreamRefused; `sock` is closed then."""
    deadline = time.monotonic() + handshake_timeout
    try:
        source = _read_proxy_header(sock, proxy_mode, deadline) if proxy_mode else None
        sock.setblocking(True)
        stream = StreamSocket(sock.family, sock.type, sock.proto, fileno=sock.detach())
    except (OSError, ProtocolError) as exc:
        sock.close()
        raise StreamRefused(str(exc)) from None
    _attach(stream, slot)
    if context is not None:
        try:
            stream.settimeout(max(0.0, deadline - time.monotonic()))
            # the context's sslsocket_class is StreamSSLSocket (use_stream_sockets)
            tls = context.wrap_socket(stream, server_side=True)
        except (OSError, ValueError) as exc:
            stream.close()
            raise StreamRefused(f"TLS handshake: {exc}") from None
        _attach(tls, slot)
        stream = tls
    stream.settimeout(idle_timeout or None)
    return stream, source


def _attach(sock: socket.socket, slot: Slot) -> None:
    sock.pf_slot = slot  # type: ignore[attr-defined]
    sock.pf_sent = 0  # type: ignore[attr-defined]
    sock.pf_depth = 0  # type: ignore[attr-defined]
    sock.pf_timed_out = False  # type: ignore[attr-defined]


def sent_by(sock: socket.socket) -> int:
    """Bytes the handler sent on a socket from open_stream."""
    return int(getattr(sock, "pf_sent", 0))


def timed_out(sock: socket.socket) -> bool:
    """Whether a blocking call on a socket from open_stream waited on the client past
    stream.idle_timeout: a TimeoutError out of the handler is the idle client's (408) only
    then."""
    return bool(getattr(sock, "pf_timed_out", False))


def _read_proxy_header(
    sock: socket.socket, mode: str, deadline: float
) -> tuple[str, int] | None:
    """Consume the PROXY header and nothing after it: peek until it is whole, then receive
    exactly its length. Raises ProtocolError (malformed) or OSError (gone, too slow)."""
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError("no complete PROXY header in time")
        if not wait_readable(sock, remaining):
            continue
        peeked = sock.recv(_PROXY_PEEK, socket.MSG_PEEK | socket.MSG_DONTWAIT)
        if not peeked:
            raise ConnectionResetError("the client closed before its PROXY header")
        header = ProxyHeader(mode)
        rest = header.feed(peeked)
        if rest is not None:
            length = len(peeked) - len(rest)
            taken = b""
            while len(taken) < length:
                chunk = sock.recv(length - len(taken), socket.MSG_DONTWAIT)
                if not chunk:
                    raise ConnectionResetError("the client closed in its PROXY header")
                taken += chunk
            return header.source
        if len(peeked) >= _PROXY_PEEK:
            raise ProtocolError(400, "PROXY header too long")
        # incomplete: wait for more than what is already there
        _wait_for_more(sock, len(peeked), deadline)


def wait_readable(sock: socket.socket, timeout: float) -> bool:
    """Whether `sock` has bytes (or an end of stream) to read within `timeout` seconds; poll,
    not select, which refuses a descriptor past 1023."""
    poller = select.poll()
    poller.register(sock, select.POLLIN)
    return bool(poller.poll(max(timeout, 0.0) * 1000))


def peer_gone(sock: socket.socket) -> bool:
    """Whether the client's side of `sock` has closed or reset (poll: hang-up, error, or its
    write side shut): a ConnectionResetError from a handler is the client's only then.

    A socket the handler closed (`with sock:`) cannot be polled (registering fd -1 raised
    ValueError out of the worker: every client reset crashed it): the reset is taken as the
    client's, as it was before this check existed."""
    if sock.fileno() < 0:
        return True
    poller = select.poll()
    poller.register(sock, select.POLLHUP | select.POLLERR | select.POLLRDHUP)
    try:
        return bool(poller.poll(0))
    except OSError:
        return True


def _wait_for_more(sock: socket.socket, have: int, deadline: float) -> None:
    """Wait until more than the `have` (> 0) bytes already queued arrive, or the deadline (the
    caller checks it). Raises ConnectionResetError once the client has closed its side:
    the header can never be completed, and the worker is free for the next client.

    Level-triggered readiness would report the queued bytes at once, and a peek cannot see
    an end of stream behind them; so the wait is edge-triggered (woken by each arrival
    only) and watches EPOLLRDHUP, which says the client's FIN has arrived."""
    with select.epoll(1) as ready:
        # the first poll reports the socket's state as it is now, later ones what changes
        ready.register(sock, select.EPOLLIN | select.EPOLLRDHUP | select.EPOLLET)
        closed = False
        while True:
            peeked = sock.recv(have + 1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
            if len(peeked) > have:
                return
            if not peeked or closed:
                raise ConnectionResetError("the client closed in its PROXY header")
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            for _, events in ready.poll(remaining):
                closed = closed or bool(events & (select.EPOLLRDHUP | select.EPOLLHUP
                                                  | select.EPOLLERR))


def use_stream_sockets(context: ssl.SSLContext) -> None:
    """Have `context` (a worker's own copy, after fork) make StreamSSLSockets."""
    context.sslsocket_class = StreamSSLSocket
