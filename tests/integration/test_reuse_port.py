"""bind[].reuse_port: two servers on one address (SO_REUSEPORT), as a blue-green deployment
runs them; without it the second is refused, and a reload can turn it on."""

from __future__ import annotations

import re
import signal
import socket
from typing import Any

import psutil

from harness import ServerFactory, fetch, settings, wait_until, write_config

RELOADED = re.compile(r"reloaded: generation 2 serving")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def on(port: int, reuse_port: bool, **more: Any) -> dict[str, Any]:
    return settings(
        bind=[{"address": f"127.0.0.1:{port}", "reuse_port": reuse_port}],
        workers={"count": 1},
        **more,
    )


def master_of(port: int) -> int:
    """The master whose worker answers a new connection to `port`."""
    worker = int(fetch(("http", "127.0.0.1", port)).body)
    return psutil.Process(worker).ppid()


def test_two_servers_share_an_address_and_one_can_leave(server_factory: ServerFactory) -> None:
    port = free_port()
    blue = server_factory(on(port, True))
    green = server_factory(on(port, True))  # would fail to bind without the option
    seen: set[int] = set()
    wait_until(lambda: seen.add(master_of(port)) or seen == {blue.pid, green.pid}, timeout=20,
               message="the kernel never gave a connection to both servers")
    blue.signal(signal.SIGTERM)
    assert blue.wait_exit(20) == 0
    assert {master_of(port) for _ in range(20)} == {green.pid}  # nothing refused or reset


def test_without_reuse_port_a_second_server_is_refused_and_a_reload_can_allow_it(
    server_factory: ServerFactory,
) -> None:
    port = free_port()
    first = server_factory(on(port, False))
    refused = server_factory(on(port, True), wait_ready=False)
    assert refused.wait_exit(20) != 0
    assert re.search(rf"cannot bind 127\.0\.0\.1:{port}: Address already in use", refused.log())

    write_config(first.workdir, on(port, True))
    before = len(first.log())
    first.signal(signal.SIGHUP)
    first.wait_for_log(RELOADED, 20, since=before)
    second = server_factory(on(port, True))
    seen: set[int] = set()
    wait_until(lambda: seen.add(master_of(port)) or seen == {first.pid, second.pid}, timeout=20,
               message="the kernel never gave a connection to both servers")
