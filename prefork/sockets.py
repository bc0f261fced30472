"""Listening sockets: bind TCP (v4/v6) and unix addresses, or adopt systemd's (LISTEN_FDS).

Invariants: master only; every listener is non-blocking (workers poll and accept); a unix
socket path is removed at exit only if it is still the socket this process created; sockets
from systemd are never unlinked or re-bound.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import ipaddress
import logging
import os
import socket
import stat
import struct
from collections.abc import Callable, Iterable, MutableMapping
from dataclasses import dataclass, field
from typing import Any

from prefork.addresses import Address
from prefork.pidfile import alive

log = logging.getLogger("prefork")

SD_LISTEN_FDS_START = 3


# sock_diag (linux/sock_diag.h, linux/unix_diag.h): a unix socket's accept queue
_NETLINK_SOCK_DIAG = 4
_SOCK_DIAG_BY_FAMILY = 20
_NLM_F_REQUEST = 1
_NLMSG_ERROR = 2
_UDIAG_SHOW_RQLEN = 0x10
_UNIX_DIAG_RQLEN = 4
_TCP_LISTEN_STATE = 1 << 10  # TCP_LISTEN, which unix sockets share


def unix_listen_queue(sock: socket.socket) -> tuple[int, int] | None:
    """(waiting, limit) of a listening unix socket, from one sock_diag query by its inode
    (for a listener the kernel reports the accept queue and its limit as UNIX_DIAG_RQLEN);
    None if the kernel does not answer (sock_diag not built in, a restricted sandbox)."""
    try:
        inode = os.fstat(sock.fileno()).st_ino
        request = struct.pack(
            "=BBHIIIII", socket.AF_UNIX, 0, 0, _TCP_LISTEN_STATE, inode, _UDIAG_SHOW_RQLEN,
            0xFFFFFFFF, 0xFFFFFFFF,  # no cookie: look the socket up by its inode alone
        )
        header = struct.pack("=IHHII", 16 + len(request), _SOCK_DIAG_BY_FAMILY,
                             _NLM_F_REQUEST, 1, 0)
        with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, _NETLINK_SOCK_DIAG) as nl:
            nl.settimeout(1.0)
            nl.send(header + request)
            data = nl.recv(4096)
    except OSError:
        return None
    if len(data) < 32 or struct.unpack_from("=H", data, 4)[0] == _NLMSG_ERROR:
        return None
    end = min(len(data), struct.unpack_from("=I", data)[0])
    offset = 32  # past the netlink header and unix_diag_msg: the attributes
    while offset + 4 <= end:
        size, kind = struct.unpack_from("=HH", data, offset)
        if size < 4:
            break
        if kind == _UNIX_DIAG_RQLEN and offset + 12 <= end:
            waiting, limit = struct.unpack_from("=II", data, offset + 4)
            return waiting, limit
        offset += (size + 3) & ~3
    return None


class BindError(Exception):
    """An address could not be bound; the message names it and says why."""


@dataclass(frozen=True, slots=True)
class BindSpec:
    """One configured address; mode/owner/group apply to unix sockets only."""

    address: Address
    mode: int | None = None
    owner: int | None = None  # uid
    group: int | None = None  # gid
    tls: bool = False
    reuse_port: bool = False  # SO_REUSEPORT (TCP)


# Classic BPF (struct sock_filter: code, jt, jf, k) run on each packet a TCP listener gets,
# from its TCP header: drop a SYN without ACK (a new connection), keep everything else (the
# ACK that completes a handshake already answered, or its first data). A socket filter
# returns how many bytes to keep: 0 drops.
_REFUSE_NEW_HANDSHAKES = b"".join(
    struct.pack("HBBI", code, jt, jf, k)
    for code, jt, jf, k in (
        (0x30, 0, 0, 13),  # BPF_LD | BPF_B | BPF_ABS: A = the flags byte
        (0x45, 0, 2, 0x02),  # BPF_JMP | BPF_JSET | BPF_K: SYN? else keep
        (0x45, 1, 0, 0x10),  # ACK too (not a listener's, but not a new connection): keep
        (0x06, 0, 0, 0),  # BPF_RET | BPF_K: drop
        (0x06, 0, 0, 0xFFFFFFFF),  # keep the whole packet
    )
)
_SO_ATTACH_FILTER = getattr(socket, "SO_ATTACH_FILTER", 26)


def attach_filter(sock: socket.socket, program: bytes) -> None:
    """Attach classic BPF `program` (struct sock_filter entries) to `sock`; raises OSError."""
    import ctypes  # here, not at import: only a stopping master (and tests) need it

    code = ctypes.create_string_buffer(program, len(program))
    fprog = struct.pack("HP", len(program) // 8, ctypes.addressof(code))  # struct sock_fprog
    sock.setsockopt(socket.SOL_SOCKET, _SO_ATTACH_FILTER, fprog)


@dataclass(slots=True)
class Listener:
    sock: socket.socket
    address: Address  # as bound (port 0 replaced by the real port)
    unix_inode: tuple[int, int] | None = None  # (st_dev, st_ino) of a socket file we created
    inherited: bool = False  # handed over by systemd
    configured: BindSpec | None = None  # what was asked for (None: handed over by systemd)
    tls: bool = False  # HTTPS on this socket (the context lives in the Generation)
    # another master serving on the same socket (USR2): its file is left to the last to exit
    shared_with: int | None = None
    # the family, type and protocol of the connections accepted, as accept() passes them
    accepted_as: tuple[int, int, int] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.accepted_as = (int(self.sock.family), int(self.sock.type), self.sock.proto)

    @property
    def fd(self) -> int:
        return self.sock.fileno()

    def accept(self) -> tuple[socket.socket, Any]:
        """socket.accept() without its conversion of the family, type and protocol to enums
        for each new socket (three properties and an IntEnum lookup: 5% of a worker's CPU
        per uwsgi request). Raises as socket.accept() does."""
        fd, peer = self.sock._accept()  # type: ignore[attr-defined]
        family, kind, proto = self.accepted_as
        return socket.socket(family, kind, proto, fd), peer

    def url(self, protocol: str) -> str:
        if self.address.kind == "unix":
            return f"unix:{self.address.path}"
        if protocol == "uwsgi":  # as nginx's uwsgi_pass names it
            return f"{'suwsgi' if self.tls else 'uwsgi'}://{self.address}"
        if protocol != "http":
            return f"{'tls' if self.tls else 'tcp'}://{self.address}"
        return f"{'https' if self.tls else 'http'}://{self.address}"

    def queue(self) -> tuple[int, int] | None:
        """(connections waiting in the accept queue now, the queue's limit), or None where
        the kernel does not say. A listening TCP socket's TCP_INFO carries both (as
        tcpi_unacked and tcpi_sacked); a unix socket's come from sock_diag."""
        if self.address.kind == "unix":
            return unix_listen_queue(self.sock)
        try:
            info = self.sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 104)
        except OSError:
            return None
        if len(info) < 32:
            return None
        waiting, limit = struct.unpack_from("=II", info, 24)
        return waiting, limit

    def queued(self) -> int | None:
        """Connections waiting in the accept queue now; None where it cannot be known."""
        queue = self.queue()
        return None if queue is None else queue[0]

    def refuse_new(self) -> bool:
        """Stopping: a TCP listener that is this server's alone completes no new handshake
        from now on, so what its queue holds is all the workers drain before it closes;
        True if it was done. Without it a connection that completed after a worker's last
        drain waited in the queue for the close, which resets it: under a stream of new
        connections a few per stop, each an accepted request that got no answer (it was
        measured: 8 in 6 stops; with it none). A unix socket's file goes at the close
        instead, which stops new arrivals as well.

        The means is a socket filter (classic BPF, SO_ATTACH_FILTER) that drops a new
        client's SYN: it goes unanswered, and its retry a second later finds the port
        closed (refused: nothing was sent, so a proxy tries another upstream) or a restarted
        server. The ACK that completes a handshake answered before is kept, so that
        connection joins the queue the workers drain (on loopback, at once); a filter that
        dropped every packet left such a client with a connection the server never
        completed, reset at the close. Connections already queued were made before it and
        do not carry it. Not for
        a socket someone else keeps after this master: systemd's (the filter would stay on
        it for the next start, and its queue waits for that start anyway) or one shared with
        the other master of an upgrade."""
        if self.address.kind == "unix" or self.inherited:
            return False
        if self.shared_with is not None and alive(self.shared_with):
            return False
        try:
            attach_filter(self.sock, _REFUSE_NEW_HANDSHAKES)
        except OSError as exc:
            log.warning("stopping: new connections to %s cannot be refused before the close "
                        "(%s)", self.address, exc.strerror or exc)
            return False
        return True

    def close(self) -> None:
        """Close; remove the socket file if it is still ours."""
        if self.unix_inode is not None and not self.inherited and not (
            self.shared_with is not None and alive(self.shared_with)
        ):
            unlink_if_ours(self.address.path, self.unix_inode)
            self.unix_inode = None
        self.sock.close()


def _address_of(sock: socket.socket) -> Address:
    if sock.family == socket.AF_UNIX:
        name = sock.getsockname()
        path = name.decode() if isinstance(name, bytes) else name
        return Address(kind="unix", path=path)
    host, port = sock.getsockname()[:2]
    return Address(kind="tcp", host=host, port=port)


_INT = struct.Struct("i")  # the int an ioctl fills in
_INT_ZERO = _INT.pack(0)


def queued_bytes(fd: int, request: int) -> int:
    """A count of bytes the kernel reports for socket `fd` through ioctl `request`:
    FIONREAD (SIOCINQ) those received and not yet read, TIOCOUTQ (SIOCOUTQ) those sent and
    not yet read by the peer (on a unix socket) or acknowledged (TCP). Raises OSError."""
    return int(_INT.unpack(fcntl.ioctl(fd, request, _INT_ZERO))[0])


def recv_now(sock: socket.socket, size: int) -> bytes | None:
    """What the kernel already holds for `sock`, without waiting: None if nothing yet, b""
    at end of stream or when the connection failed (reset, unreachable)."""
    try:
        return sock.recv(size, socket.MSG_DONTWAIT)
    except (BlockingIOError, InterruptedError):
        return None
    except OSError:
        return b""


def defer_accept(listener: Listener, seconds: int) -> None:
    """Set (or, with 0, clear) TCP_DEFER_ACCEPT on a TCP listener: the kernel hands over a
    connection only once it has data, or after `seconds`. Not for protocols where the server
    speaks first (http.defer_accept explains the trade-off)."""
    if listener.address.kind == "tcp":
        try:
            listener.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_DEFER_ACCEPT, seconds)
        except OSError:
            pass


def _bind_tcp(address: Address, backlog: int, reuse_port: bool = False) -> list[Listener]:
    """Bind every address `address.host` stands for: a name such as `localhost` may resolve
    to 127.0.0.1 and ::1, and a client may try either (nginx binds all of them too). With
    port 0 the others take the port the first one got. An address this machine does not
    have (::1 with IPv6 disabled) is skipped with a warning while another one binds."""
    try:
        infos = socket.getaddrinfo(
            address.host, address.port, socket.AF_UNSPEC, socket.SOCK_STREAM, 0, socket.AI_PASSIVE
        )
    except socket.gaierror as exc:
        raise BindError(f"cannot bind {address}: {exc.strerror}") from None
    unique: list[tuple[int, tuple[Any, ...]]] = list(
        dict.fromkeys((info[0], tuple(info[4])) for info in infos)
    )
    listeners: list[Listener] = []
    skipped: list[str] = []
    try:
        for family, sockaddr in unique:
            if listeners and address.port == 0:
                sockaddr = (sockaddr[0], listeners[0].address.port, *sockaddr[2:])
            try:
                listeners.append(_bind_one(family, sockaddr, backlog, reuse_port))
            except OSError as exc:
                if len(unique) > 1 and exc.errno in (errno.EADDRNOTAVAIL, errno.EAFNOSUPPORT):
                    skipped.append(f"{sockaddr[0]} ({exc.strerror})")
                    continue
                raise BindError(f"cannot bind {address}: {exc.strerror or exc}") from None
        if not listeners:
            raise BindError(f"cannot bind {address}: {', '.join(skipped)}")
    except BindError:
        for listener in listeners:
            listener.close()
        raise
    for what in skipped:
        log.warning("bind %s: skipped %s", address, what)
    return listeners


def _bind_one(
    family: int, sockaddr: tuple[Any, ...], backlog: int, reuse_port: bool = False
) -> Listener:
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == socket.AF_INET6:
            # [::]:80 next to 0.0.0.0:80 must not collide, as in nginx's default
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        # Linux copies TCP_NODELAY to accepted sockets: no setsockopt per connection.
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.bind(sockaddr)
        sock.listen(backlog)
    except OSError:
        sock.close()
        raise
    sock.setblocking(False)
    return Listener(sock, _address_of(sock))


def unlink_if_ours(path: str, inode: tuple[int, int]) -> None:
    """Remove the socket file at `path` if it is still the one we bound (device, inode): a
    later instance may have replaced it, and its file is not ours to remove."""
    try:
        st = os.stat(path)
        if (st.st_dev, st.st_ino) == inode:
            os.unlink(path)
    except OSError:
        pass


def remove_stale_unix_socket(path: str, what: str) -> None:
    """Make way for binding `path`: remove a socket file nobody listens on (left by a process
    that died); refuse one a live process listens on, and a path that is not a socket.
    Raises BindError with `what` ("cannot bind unix:PATH") and the reason."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise BindError(f"{what}: the path exists and is not a socket")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except (ConnectionRefusedError, FileNotFoundError):
        os.unlink(path)  # nobody listens: left behind by a process that died
        return
    except OSError as exc:
        raise BindError(f"{what}: {exc.strerror}") from None
    finally:
        probe.close()
    raise BindError(f"{what}: another process is listening on it")


def _bind_unix(spec: BindSpec, backlog: int) -> Listener:
    address = spec.address
    path = address.path
    remove_stale_unix_socket(path, f"cannot bind unix:{path}")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    bound = False
    try:
        sock.bind(path)
        bound = True
        _set_mode_and_owner(path, spec)
        st = os.stat(path)
        sock.listen(backlog)
    except OSError as exc:
        sock.close()
        if bound:
            try:
                os.unlink(path)  # the file this bind created: no stale socket left behind
            except OSError:
                pass
        raise BindError(f"cannot bind unix:{path}: {exc.strerror or exc}") from None
    sock.setblocking(False)
    return Listener(sock, address, unix_inode=(st.st_dev, st.st_ino))


def reconfigure(listener: Listener, spec: BindSpec) -> Callable[[], None]:
    """Give a kept listener its entry in a new configuration: its unix file's mode and owner
    (applied in place), its configured entry and TLS flag. Returns what puts them back, for a
    reload that fails or is abandoned: the generation still serving keeps what it had."""
    configured, tls = listener.configured, listener.tls
    path = listener.address.path if listener.address.kind == "unix" else None
    before = os.stat(path) if path is not None and not listener.inherited else None
    if before is not None:
        assert path is not None
        _set_mode_and_owner(path, spec)
    reuse_port = _reuse_port(listener)
    reuse_port_changes = reuse_port is not None and reuse_port != spec.reuse_port
    if reuse_port_changes:
        # read when another socket binds the port: once on, another server may join
        listener.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, spec.reuse_port)
        if reuse_port:
            log.warning("%s: reuse_port turned off; the kernel may still let other servers "
                        "join this address until the socket is bound again (a restart)",
                        listener.address)
    listener.configured, listener.tls = spec, spec.tls

    def undo() -> None:
        listener.configured, listener.tls = configured, tls
        if reuse_port_changes:
            listener.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, bool(reuse_port))
        if before is None or path is None:
            return
        try:
            os.chmod(path, stat.S_IMODE(before.st_mode))
            os.chown(path, before.st_uid, before.st_gid)
        except OSError as exc:
            log.warning("cannot give %s its mode and owner back: %s", path, exc)

    return undo


def _reuse_port(listener: Listener) -> bool | None:
    """SO_REUSEPORT on a TCP socket we bound; None for a unix socket or one systemd passed
    (its socket unit's ReusePort= decides)."""
    if listener.address.kind != "tcp" or listener.inherited:
        return None
    return bool(listener.sock.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT))


def _reachable(listener: Listener) -> bool:
    """Whether clients still reach a kept listener where it was bound: a unix socket whose
    file was removed (by hand, by a temporary-file cleaner) or replaced is not, and its
    path is bound afresh, as a new address is. Keeping it made every HUP fail (its file's
    mode could not be read) and left the path dead until a restart."""
    if listener.address.kind != "unix" or listener.inherited or listener.unix_inode is None:
        return True
    try:
        st = os.stat(listener.address.path)
    except OSError:
        st = None
    if st is not None and (st.st_dev, st.st_ino) == listener.unix_inode:
        return True
    log.warning("unix:%s: the socket file is gone or is another's now; binding it again",
                listener.address.path)
    return False


def _set_mode_and_owner(path: str, spec: BindSpec) -> None:
    """Mode first, while the file is still ours: changing the mode of a file another user
    owns takes CAP_FOWNER, which a hardened unit does not grant (CAP_CHOWN does the rest)."""
    if spec.mode is not None:
        os.chmod(path, spec.mode)
    if spec.owner is not None or spec.group is not None:
        os.chown(path, -1 if spec.owner is None else spec.owner,
                 -1 if spec.group is None else spec.group)


def bind(spec: BindSpec, backlog: int) -> list[Listener]:
    """The sockets of one bind entry: one, or one per address a host name stands for."""
    if spec.address.kind == "unix":
        listeners = [_bind_unix(spec, backlog)]
    else:
        listeners = _bind_tcp(spec.address, backlog, spec.reuse_port)
    for listener in listeners:
        listener.configured = spec
        listener.tls = spec.tls
    return listeners


def capped_backlog(listeners: Iterable[Listener], backlog: int, protocol: str) -> str | None:
    """What to warn about when the kernel holds fewer connections in these listeners'
    accept queues than `backlog` asks: listen() silently caps it at net.core.somaxconn,
    where uWSGI refuses to start ("Listen queue size is greater than the system max
    net.core.somaxconn"), so an operator who raised the backlog should learn that it did
    not take. None when every queue is as configured (or the kernel does not say).
    Sockets systemd passed are left out: their unit's Backlog= sets their queue."""
    capped = []
    for listener in listeners:
        queue = None if listener.inherited else listener.queue()
        if queue is not None and queue[1] < backlog:
            capped.append((listener.url(protocol), queue[1]))
    if not capped:
        return None
    limits = ", ".join(f"{url} at {limit}" for url, limit in capped)
    return (
        f"backlog is {backlog}, but the kernel caps the accept queue of {limits} "
        "(net.core.somaxconn): raise net.core.somaxconn with sysctl, or lower backlog"
    )


def bind_all(
    specs: Iterable[BindSpec],
    backlog: int,
    reuse: Iterable[Listener] = (),
    undo: list[Callable[[], None]] | None = None,
) -> list[Listener]:
    """Bind every address or none: on the first failure the ones this call bound are closed.

    A listener in `reuse` whose configured address matches is taken as it is (a reload keeps
    the sockets whose addresses did not change, and with them their accept queues), given its
    new entry (reconfigure); what puts each back is appended to `undo`, and run here on a
    failure. A unix socket whose file is no longer its own is bound again (_reachable).
    """
    undone: list[Callable[[], None]] = []
    available: dict[str, list[Listener]] = {}
    for lst in reuse:
        if lst.configured is not None:
            available.setdefault(str(lst.configured.address), []).append(lst)
            if str(lst.address) != str(lst.configured.address):
                # port 0 written as the real port
                available.setdefault(str(lst.address), []).append(lst)
    listeners: list[Listener] = []
    fresh: list[Listener] = []
    try:
        for spec in specs:
            existing = [
                lst for lst in available.pop(str(spec.address), [])
                if lst not in listeners and _reachable(lst)
            ]
            if existing:
                for lst in existing:
                    undone.append(reconfigure(lst, spec))
                listeners += existing
                continue
            bound = bind(spec, backlog)
            fresh += bound
            listeners += bound
    except BaseException:
        for listener in fresh:
            listener.close()
        for put_back in reversed(undone):
            put_back()
        raise
    if undo is not None:
        undo += undone
    return listeners


def systemd_listeners(environ: MutableMapping[str, str]) -> list[Listener]:
    """Sockets passed by systemd socket activation (sd_listen_fds(3)); [] when none.

    The LISTEN_* variables are removed so that nothing forked later mistakes them for its own.
    """
    pid = environ.pop("LISTEN_PID", None)
    count = environ.pop("LISTEN_FDS", None)
    environ.pop("LISTEN_FDNAMES", None)
    if pid is None or count is None:
        return []
    try:
        if int(pid) != os.getpid():
            return []
        n = int(count)
    except ValueError:
        return []
    listeners = []
    for fd in range(SD_LISTEN_FDS_START, SD_LISTEN_FDS_START + n):
        try:
            listener = adopt_socket(fd)
        except OSError as exc:
            if exc.errno == errno.ENOTSOCK:
                raise BindError(f"systemd passed fd {fd}, which is not a socket") from None
            raise
        listener.inherited = True
        listeners.append(listener)
    return listeners


def adopt_socket(fd: int) -> Listener:
    """A listening socket this process was started with (from systemd, or from the master
    it replaces), made ours (adopt_fd) as a Listener."""
    sock = adopt_fd(fd)
    if sock.family in (socket.AF_INET, socket.AF_INET6):
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return Listener(sock, _address_of(sock))


def adopt_fd(fd: int) -> socket.socket:
    """The socket at `fd`, inherited at start, made ours: not inherited by what we fork or
    exec, non-blocking."""
    sock = socket.socket(fileno=fd)
    os.set_inheritable(fd, False)
    sock.setblocking(False)
    return sock


_WILDCARDS = (ipaddress.ip_address("0.0.0.0"), ipaddress.ip_address("::"))


def _ips(host: str, port: int) -> set[ipaddress.IPv4Address | ipaddress.IPv6Address]:
    """The addresses `host` stands for; IPv4-mapped IPv6 ones as plain IPv4 (a dual-stack
    socket reports v4 peers that way). A name that does not resolve stands for nothing."""
    try:
        found = {ipaddress.ip_address(host)}
    except ValueError:
        try:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except OSError:
            return set()
        found = {ipaddress.ip_address(str(info[4][0]).partition("%")[0]) for info in infos}
    return {
        ip.ipv4_mapped if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped else ip
        for ip in found
    }


def passed_socket_match(passed: Address, configured: Address) -> int:
    """How well a configured address names a socket systemd passed: 2 the same address, 1 the
    same port where either side listens on every address (`ListenStream=8443` is a
    dual-stack `[::]:8443`, which `*:8443` means), 0 not at all. Unix paths must be the same
    file path. Matched by meaning, not spelling: `localhost:8443` is `127.0.0.1:8443`."""
    if passed.kind != configured.kind:
        return 0
    if passed.kind == "unix":
        same = os.path.realpath(passed.path) == os.path.realpath(configured.path)
        return 2 if same else 0
    if passed.port != configured.port:
        return 0
    ours, theirs = _ips(configured.host, configured.port), _ips(passed.host, passed.port)
    if ours & theirs:
        return 2
    if any(ip in _WILDCARDS for ip in ours | theirs):
        return 1
    return 0
