"""statsd: the real server sends its metrics to a datagram socket the test reads, as a statsd
daemon (or Telegraf's statsd input) would, every `statsd.interval` and once more at exit."""

from __future__ import annotations

import signal
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from harness import ServerFactory, address, fetch, settings, wait_until


@pytest.fixture
def daemon() -> Iterator[socket.socket]:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    yield sock
    sock.close()


class Collected:
    """Every statsd line received so far; counters summed, gauges at their last value."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.counters: dict[str, float] = {}
        self.gauges: dict[str, float] = {}
        self.lines: list[str] = []

    def poll(self, timeout: float = 0.2) -> None:
        self.sock.settimeout(timeout)
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            try:
                data = self.sock.recv(65536).decode("ascii")
            except TimeoutError:
                return
            for line in data.split("\n"):
                self.lines.append(line)
                name, _, rest = line.partition(":")
                value, _, kind = rest.partition("|")
                if kind.startswith("c"):
                    self.counters[name] = self.counters.get(name, 0) + float(value)
                elif kind.startswith("g"):
                    self.gauges[name] = float(value)


def test_metrics_reach_statsd_every_interval_and_at_exit(
    server_factory: ServerFactory, daemon: socket.socket, tmp_path: Path
) -> None:
    port = daemon.getsockname()[1]
    server = server_factory(settings(
        workers={"count": 2},
        statsd={"address": f"127.0.0.1:{port}", "interval": 0.3, "prefix": "web",
                "tags": ["env:test"]},
    ))
    seen = Collected(daemon)

    def both_workers_reported() -> bool:
        seen.poll()
        return seen.gauges.get("web.workers") == 2 and seen.gauges.get("web.workers.idle") == 2

    wait_until(both_workers_reported, 10, message=f"statsd lines: {seen.lines[-20:]}")
    assert all(line.endswith("|#env:test") for line in seen.lines)
    where = address(server)
    for _ in range(5):
        assert fetch(where).status == 200
    assert fetch(where, target="/boom").status == 500

    def counted() -> bool:
        seen.poll()
        return seen.counters.get("web.requests", 0) >= 6
    wait_until(counted, 5, message=f"statsd lines: {seen.lines[-20:]}")
    assert seen.counters["web.requests"] == 6  # increases: never sent twice
    assert seen.counters["web.requests.2xx"] == 5
    assert seen.counters["web.requests.5xx"] == 1
    assert "web.request.duration_avg_ms" in seen.gauges

    assert fetch(where).status == 200
    server.signal(signal.SIGTERM)
    assert server.wait_exit(15) == 0
    seen.poll(0.5)  # the send at exit carries the request of the last interval
    assert seen.counters["web.requests"] == 7
    assert "statsd: sending metrics to 127.0.0.1:" in server.log()
