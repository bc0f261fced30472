"""Metrics to a statsd daemon (statsd, DogStatsD, Telegraf's statsd input), sent by the master.

Invariants: master only, from its loop, every `statsd.interval`; never a worker, so a request
costs nothing more with statsd on. The numbers are the /status snapshot's (without the
per-worker memory reads): counters go out as the increase since the last send, gauges as
their value now. Sends are non-blocking datagrams; one that fails is dropped (said once until
sending works again), never retried or queued. A host name is resolved once, when the sink is
made (at start, and after a reload that changes the statsd settings).
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Mapping
from typing import Any

from prefork.addresses import parse_address
from prefork.config import StatsdConfig

log = logging.getLogger("prefork")

PACKET_LIMIT = 1432  # fits one Ethernet frame over UDP/IPv6; statsd splits on newlines


def _number(value: float) -> str:
    """`value` as statsd reads it, exactly: a whole number (every counter, and every gauge
    but one) in all its digits, never in exponent form, which statsd daemons read rounded
    to six digits or not at all; a fraction (the mean request duration, in milliseconds)
    to three decimals, the microsecond."""
    if isinstance(value, int):  # every digit, even past a float's 53 bits
        return str(value)
    if value.is_integer():
        return str(int(value))
    return f"{value:.3f}".rstrip("0").rstrip(".")


class StatsdSink:
    """Where the metrics go; `send()` one batch of lines. Raises OSError from __init__ when
    the address cannot be resolved or the socket cannot be made."""

    def __init__(self, config: StatsdConfig) -> None:
        assert config.address is not None
        self.config = config
        self.previous: dict[str, float] = {}  # counter name -> its total at the last send
        self.failing = False
        self.dropped = 0
        address = parse_address(config.address)
        self.target: Any
        if address.kind == "unix":
            family, self.target = socket.AF_UNIX, address.path
        else:
            family, _, _, _, self.target = socket.getaddrinfo(
                address.host, address.port, type=socket.SOCK_DGRAM
            )[0]
        self.sock = socket.socket(family, socket.SOCK_DGRAM)
        self.sock.setblocking(False)
        self.suffix = "|#" + ",".join(config.tags) if config.tags else ""
        self.prefix = config.prefix + "." if config.prefix else ""

    def close(self) -> None:
        self.sock.close()

    def lines(self, snapshot: Mapping[str, Any]) -> list[str]:
        """The statsd lines for `snapshot`: counters as increases since the last call."""
        totals = snapshot["totals"]
        counters: dict[str, float] = {
            "requests": totals["requests"],
            "response_bytes": totals["bytes"],
            "workers.restarts": totals["restarts"],
            "workers.boot_failures": totals["boot_failures"],
            "connections.handed_over": totals["handed_over"],
            "connections.balanced": totals["balanced"],
            "connections.relieved": totals["relieved"],
            "listen_queue.full": sum(e["queue_full_seen"] for e in snapshot["listeners"]),
        }
        for cls, count in totals["by_class"].items():
            counters[f"requests.{cls}"] = count
        for reason, count in totals["recycles"].items():
            counters[f"workers.recycled.{reason}"] = count
        for result, count in totals["reloads"].items():
            counters[f"reloads.{result}"] = count
        gauges: dict[str, float] = {
            "workers": len(snapshot["workers"]),
            "degraded": int(snapshot["master"]["degraded"]),
            "generation": snapshot["master"]["generation"],
            "listen_queue": sum(e["queued"] or 0 for e in snapshot["listeners"]),
        }
        for state, count in snapshot["workers_by_state"].items():
            gauges[f"workers.{state}"] = count
        served = counters["requests"] - self.previous.get("requests", 0)
        if served > 0:  # the mean over the interval, from the duration histogram's sum
            spent = totals["duration_sum"] - self.previous.get("duration_sum", 0.0)
            gauges["request.duration_avg_ms"] = round(spent / served * 1000, 3)
        out = []
        for name, value in counters.items():
            increase = value - self.previous.get(name, 0)
            if increase > 0:
                out.append(f"{self.prefix}{name}:{_number(increase)}|c{self.suffix}")
        out.extend(f"{self.prefix}{name}:{_number(value)}|g{self.suffix}" for name, value in
                   gauges.items())
        self.previous = dict(counters, duration_sum=totals["duration_sum"])
        return out

    def send(self, lines: list[str]) -> None:
        """Send `lines` in as few datagrams as fit PACKET_LIMIT each."""
        packet: list[str] = []
        size = 0
        for line in lines:
            if packet and size + 1 + len(line) > PACKET_LIMIT:
                self._send("\n".join(packet))
                packet, size = [], 0
            packet.append(line)
            size += len(line) + (1 if size else 0)
        if packet:
            self._send("\n".join(packet))

    def _send(self, payload: str) -> None:
        try:
            self.sock.sendto(payload.encode("ascii"), self.target)
        except OSError as exc:
            self.dropped += 1
            if not self.failing:
                self.failing = True
                log.warning("statsd: cannot send to %s (%s); metrics are dropped until it "
                            "works", self.config.address, exc.strerror or exc)
            return
        if self.failing:
            self.failing = False
            log.info("statsd: sending to %s again (%d packets dropped meanwhile)",
                     self.config.address, self.dropped)
            self.dropped = 0
