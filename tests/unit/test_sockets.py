"""Binding TCP addresses: every address a host name stands for (real sockets on loopback;
only name resolution is replaced, since /etc/hosts here maps localhost to 127.0.0.1 alone);
and what a reload does to a kept unix socket."""

from __future__ import annotations

import fcntl
import os
import select
import socket
import stat
import tempfile
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from prefork.addresses import Address, parse_address
from prefork.sockets import BindError, BindSpec, Listener, attach_filter, bind_all

V4 = (socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.1", 0))
V6 = (socket.AF_INET6, socket.SOCK_STREAM, 6, "", ("::1", 0, 0, 0))
ELSEWHERE = (socket.AF_INET, socket.SOCK_STREAM, 6, "", ("192.0.2.1", 0))  # TEST-NET-1


@pytest.fixture
def resolves_to(monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """Make host names resolve to the given getaddrinfo entries (port filled in)."""
    real = socket.getaddrinfo

    def use(*entries: tuple[Any, ...]) -> None:
        def fake(host: str, port: int, *args: Any, **kwargs: Any) -> list[Any]:
            if host != "pf-two.test":
                return real(host, port, *args, **kwargs)
            return [(*e[:4], (e[4][0], port, *e[4][2:])) for e in entries]

        monkeypatch.setattr(socket, "getaddrinfo", fake)

    yield use


@pytest.fixture
def opened() -> Iterator[list[Listener]]:
    made: list[Listener] = []
    yield made
    for listener in made:
        listener.close()


def spec(text: str) -> BindSpec:
    return BindSpec(parse_address(text), None, None, None, False)


def free_port() -> int:
    with socket.socket(socket.AF_INET6) as probe:  # free on ::1; checked for 127.0.0.1 below
        probe.bind(("::1", 0))
        return int(probe.getsockname()[1])


def connects(host: str, port: int) -> bool:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family) as sock:
        return sock.connect_ex((host, port)) == 0


def test_a_name_with_two_addresses_listens_on_both(
    resolves_to: Any, opened: list[Listener]
) -> None:
    """Defect: only the first address getaddrinfo returned was bound, so a client that
    tried the other one (::1 for localhost, first in most resolvers) was refused."""
    resolves_to(V4, V6)
    port = free_port()
    opened += bind_all([spec(f"pf-two.test:{port}")], 16)
    assert sorted(str(lst.address) for lst in opened) == sorted(
        [f"127.0.0.1:{port}", f"[::1]:{port}"]
    )
    assert all(lst.configured is not None for lst in opened)
    assert connects("127.0.0.1", port) and connects("::1", port)


def test_port_0_gives_every_address_of_a_name_the_same_port(
    resolves_to: Any, opened: list[Listener]
) -> None:
    resolves_to(V4, V6)
    opened += bind_all([spec("pf-two.test:0")], 16)
    ports = {lst.address.port for lst in opened}
    assert len(opened) == 2 and len(ports) == 1 and 0 not in ports


def test_an_address_this_machine_lacks_is_skipped_with_a_warning(
    resolves_to: Any, opened: list[Listener], caplog: pytest.LogCaptureFixture,
    prefork_log_propagates: None,
) -> None:
    resolves_to(ELSEWHERE, V4)
    port = free_port()
    opened += bind_all([spec(f"pf-two.test:{port}")], 16)
    assert [str(lst.address) for lst in opened] == [f"127.0.0.1:{port}"]
    assert "skipped 192.0.2.1 (Cannot assign requested address)" in caplog.text


def test_a_name_none_of_whose_addresses_binds_is_an_error(
    resolves_to: Any, opened: list[Listener]
) -> None:
    resolves_to(ELSEWHERE)
    with pytest.raises(BindError, match="cannot bind pf-two.test:80"):
        bind_all([spec("pf-two.test:80")], 16)


def test_an_address_in_use_fails_the_entry_and_closes_what_it_bound(
    resolves_to: Any, opened: list[Listener]
) -> None:
    resolves_to(V4, V6)
    port = free_port()
    with socket.socket(socket.AF_INET6) as taken:
        taken.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        taken.bind(("::1", port))
        taken.listen()
        with pytest.raises(BindError, match="Address already in use"):
            bind_all([spec(f"pf-two.test:{port}")], 16)
    assert not connects("127.0.0.1", port), "the v4 socket bound before the failure was kept"


def test_a_reload_keeps_every_socket_of_the_entry(
    resolves_to: Any, opened: list[Listener]
) -> None:
    resolves_to(V4, V6)
    port = free_port()
    first = bind_all([spec(f"pf-two.test:{port}")], 16)
    opened += first
    again = bind_all([spec(f"pf-two.test:{port}")], 16, reuse=first)
    assert again == first  # the same sockets, not a second bind (which would fail: in use)


def test_a_kept_unix_socket_takes_its_new_entry_and_can_be_put_back() -> None:
    """A reload gives a kept socket its new mode and TLS flag at once (its new workers need
    them); a reload that fails or is abandoned puts the old ones back."""
    with tempfile.TemporaryDirectory(dir="/tmp") as directory:
        address = Address(kind="unix", path=os.path.join(directory, "s.sock"))
        (listener,) = bind_all([BindSpec(address, mode=0o660)], 16)
        try:
            first = listener.configured
            undo: list[Callable[[], None]] = []
            again = bind_all([BindSpec(address, mode=0o600, tls=True)], 16, reuse=[listener],
                             undo=undo)
            assert again == [listener]
            assert stat.S_IMODE(os.stat(address.path).st_mode) == 0o600
            assert (listener.tls, listener.configured is first) == (True, False)
            for put_back in reversed(undo):
                put_back()
            assert stat.S_IMODE(os.stat(address.path).st_mode) == 0o660
            assert (listener.tls, listener.configured is first) == (False, True)
        finally:
            listener.close()


def test_a_failed_bind_puts_the_kept_sockets_back() -> None:
    with tempfile.TemporaryDirectory(dir="/tmp") as directory:
        address = Address(kind="unix", path=os.path.join(directory, "s.sock"))
        (listener,) = bind_all([BindSpec(address, mode=0o660)], 16)
        try:
            taken = Address(kind="unix", path=os.path.join(directory, "no-such-dir", "t.sock"))
            with pytest.raises(BindError):
                bind_all([BindSpec(address, mode=0o600), BindSpec(taken)], 16, reuse=[listener])
            assert stat.S_IMODE(os.stat(address.path).st_mode) == 0o660
        finally:
            listener.close()


def reuse_port(text: str, on: bool = True) -> BindSpec:
    return BindSpec(parse_address(text), reuse_port=on)


def test_reuse_port_lets_two_servers_listen_on_one_address(opened: list[Listener]) -> None:
    port = free_port()
    first = bind_all([reuse_port(f"127.0.0.1:{port}")], 16)
    opened += first
    second = bind_all([reuse_port(f"127.0.0.1:{port}")], 16)  # a second server's
    opened += second
    assert first[0].address.port == second[0].address.port == port
    with pytest.raises(BindError, match="Address already in use"):
        bind_all([spec(f"127.0.0.1:{port}")], 16)  # one that does not ask for it


def test_without_reuse_port_a_second_server_is_refused(opened: list[Listener]) -> None:
    port = free_port()
    opened += bind_all([spec(f"127.0.0.1:{port}")], 16)
    with pytest.raises(BindError, match="Address already in use"):
        bind_all([reuse_port(f"127.0.0.1:{port}")], 16)


def test_a_reload_turns_reuse_port_on_a_kept_socket_and_can_put_it_back(
    opened: list[Listener],
) -> None:
    """The socket is kept (its queue with it); the option, read when another socket binds,
    lets the next server join once the reload has set it, and a failed reload clears it
    (the kernel's record of the port, already shared, is not undone)."""
    port = free_port()
    (listener,) = bind_all([spec(f"127.0.0.1:{port}")], 16)
    opened.append(listener)
    undo: list[Callable[[], None]] = []
    assert bind_all([reuse_port(f"127.0.0.1:{port}")], 16, reuse=[listener], undo=undo) == [
        listener
    ]
    opened += bind_all([reuse_port(f"127.0.0.1:{port}")], 16)  # joins
    for put_back in reversed(undo):
        put_back()
    assert not listener.sock.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT)
    assert listener.configured is not None and not listener.configured.reuse_port


# --- a stopping listener refuses new connections (Listener.refuse_new) -------------------


def _handshake_completes(port: int, timeout: float = 0.5) -> bool:
    with socket.socket() as sock:
        sock.settimeout(timeout)
        try:
            sock.connect(("127.0.0.1", port))
        except TimeoutError:
            return False  # the SYN was dropped
        return True


def test_refuse_new_keeps_the_queue_and_completes_no_new_handshake(
    opened: list[Listener],
) -> None:
    """What is queued before is still accepted, with its bytes; a connection after gets no
    handshake (its SYN is dropped), so nothing more can wait in the queue to be reset by
    the close. Real sockets on loopback."""
    [listener] = bind_all([spec("127.0.0.1:0")], 16)
    opened.append(listener)
    port = listener.address.port
    assert port is not None
    queued = socket.create_connection(("127.0.0.1", port), timeout=5)
    with queued:
        queued.sendall(b"request")
        assert listener.refuse_new() is True
        assert not _handshake_completes(port)
        listener.sock.settimeout(5)
        accepted, _ = listener.sock.accept()
        with accepted:
            accepted.settimeout(5)
            assert accepted.recv(16) == b"request"
            accepted.sendall(b"answer")  # an accepted connection carries no filter
            assert queued.recv(16) == b"answer"
    assert listener.queued() == 0
    listener.close()
    assert not connects("127.0.0.1", port)  # and once closed, a client is refused


_DROP_ALL = bytes([0x06, 0, 0, 0, 0, 0, 0, 0])  # BPF_RET | BPF_K with k 0: drop
_SO_DETACH_FILTER = getattr(socket, "SO_DETACH_FILTER", 27)


def _half_open(port: int) -> bool:
    """A handshake to `port` on 127.0.0.1 answered and not completed (SYN_RECV)."""
    with open("/proc/net/tcp") as table:
        rows = [line.split() for line in table.readlines()[1:]]
    return any(row[1].endswith(f":{port:04X}") and row[3] == "03" for row in rows)


def test_refuse_new_completes_a_handshake_answered_before_it(opened: list[Listener]) -> None:
    """A client whose SYN was answered before the filter, and whose ACK comes after: the
    connection is completed and queued, for the workers' drain, where a filter dropping
    every packet left it half-made (the client believed it connected, and the close reset
    it). The client's own filter loses the first SYN-ACK; once it is lifted, the server's
    retransmission (after a second) brings the ACK under the listener's filter."""
    [listener] = bind_all([spec("127.0.0.1:0")], 16)
    opened.append(listener)
    port = listener.address.port
    assert port is not None
    with socket.socket() as client:
        attach_filter(client, _DROP_ALL)  # the server's SYN-ACK is lost on the way
        client.setblocking(False)
        assert client.connect_ex(("127.0.0.1", port)) in (0, 115)  # EINPROGRESS
        deadline = time.monotonic() + 5
        while not _half_open(port):
            assert time.monotonic() < deadline, "no handshake under way"
            time.sleep(0.01)
        assert listener.refuse_new() is True
        client.setsockopt(socket.SOL_SOCKET, _SO_DETACH_FILTER, 0)
        listener.sock.settimeout(5)
        accepted, _ = listener.sock.accept()
        with accepted:
            client.setblocking(True)
            client.sendall(b"request")
            accepted.settimeout(5)
            assert accepted.recv(16) == b"request"


@pytest.mark.parametrize("owner", ["systemd", "another master", "unix"])
def test_refuse_new_leaves_a_socket_someone_else_keeps(
    opened: list[Listener], owner: str, tmp_path: Any
) -> None:
    """systemd's socket outlives this master (a filter would stay on it for the next
    start); one shared with the other master of an upgrade serves on; a unix socket's file
    is removed at the close instead."""
    if owner == "unix":
        [listener] = bind_all([spec(f"unix:{tmp_path}/s.sock")], 16)
    else:
        [listener] = bind_all([spec("127.0.0.1:0")], 16)
        if owner == "systemd":
            listener.inherited = True
        else:
            listener.shared_with = os.getpid()  # alive
    opened.append(listener)
    assert listener.refuse_new() is False
    if owner != "unix":
        assert listener.address.port is not None
        assert _handshake_completes(listener.address.port)


def _accepted_as(sock: socket.socket) -> tuple[Any, ...]:
    """What an application can see of an accepted socket: its family, type and protocol
    (as the enums socket.accept() gives), timeout, blocking mode in the kernel, and class."""
    nonblocking = bool(fcntl.fcntl(sock.fileno(), fcntl.F_GETFL) & os.O_NONBLOCK)
    return (repr(sock.family), repr(sock.type), sock.proto, sock.gettimeout(), nonblocking,
            sock.get_inheritable(), type(sock))


@pytest.mark.parametrize("kind", ["tcp4", "tcp6", "unix"])
@pytest.mark.parametrize("adopted", [False, True], ids=["bound", "systemd"])
@pytest.mark.parametrize("default_timeout", [None, 5.0], ids=["no-default", "default-5s"])
def test_listener_accept_gives_what_socket_accept_gives(
    kind: str, adopted: bool, default_timeout: float | None, tmp_path: Any
) -> None:
    """Listener.accept (socket.accept without the enum conversions) against socket.accept on
    the same listener: TCP v4 and v6, unix, a socket adopted from its descriptor as systemd's
    are (its protocol read from SO_PROTOCOL: 6, not 0), and an application that called
    socket.setdefaulttimeout() at import (the new socket takes that timeout either way)."""
    if kind == "unix":
        sock = socket.socket(socket.AF_UNIX)
        sock.bind(str(tmp_path / "s.sock"))
    elif kind == "tcp6":
        if not socket.has_ipv6:
            pytest.skip("no IPv6")
        sock = socket.socket(socket.AF_INET6)
        sock.bind(("::1", 0))
    else:
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
    sock.listen()
    sock.setblocking(False)
    if adopted:
        inherited = socket.socket(fileno=os.dup(sock.fileno()))
        sock.close()
        sock = inherited
    listener = Listener(sock, Address("tcp", "127.0.0.1", 0))
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(default_timeout)
    try:
        seen = []
        for accept in (sock.accept, listener.accept):
            with socket.socket(sock.family) as client:
                client.settimeout(5)
                client.connect(sock.getsockname())
                assert select.select([sock], [], [], 5)[0], "no connection to accept"
                new, _peer = accept()
                with new:
                    seen.append(_accepted_as(new))
    finally:
        socket.setdefaulttimeout(previous)
        sock.close()
    assert seen[0] == seen[1]
    if adopted and kind != "unix":
        assert seen[1][2] == socket.IPPROTO_TCP
