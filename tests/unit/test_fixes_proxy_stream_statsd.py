"""Fixes in the PROXY header parser (UNKNOWN with anything after it), the stream worker's
wait for a PROXY header (a client that closes inside it), and the statsd lines (every digit
of a value)."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from prefork.config import StatsdConfig
from prefork.http import ProtocolError
from prefork.http.proxy import ProxyHeader
from prefork.scoreboard import Scoreboard
from prefork.statsd import StatsdSink
from prefork.stream import StreamRefused, open_stream

HTTP = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"


# --- PROXY v1 UNKNOWN ---------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["v1", "auto"])
@pytest.mark.parametrize(
    "line",
    [
        b"PROXY UNKNOWN 192.0.2.1\r\n",  # what the spec allows: anything before the CRLF
        b"PROXY UNKNOWN ffff::1 ffff::2 1\r\n",
        b"PROXY UNKNOWN a b c d e f g h\r\n",
        b"PROXY UNKNOWN \r\n",
        b"PROXY UNKNOWN\r\n",  # as before
        b"PROXY UNKNOWN ::1 ::1 1 2\r\n",  # as before
    ],
)
def test_proxy_v1_unknown_ignores_the_rest_of_its_line(mode: str, line: bytes) -> None:
    """Only exactly 2 or 6 fields were accepted; the PROXY protocol (2.1) says that for
    UNKNOWN "the receiver must ignore anything presented before the CRLF"."""
    whole = ProxyHeader(mode)
    assert whole.feed(line + HTTP) == HTTP
    assert (whole.done, whole.source) == (True, None)  # the socket's own peer is used
    bytewise = ProxyHeader(mode)
    fed = [bytewise.feed(bytes([byte])) for byte in line]
    assert fed == [None] * (len(line) - 1) + [b""]  # complete at its LF, nothing after it


@pytest.mark.parametrize(
    "line",
    [b"PROXY UNKNOWNX 192.0.2.1\r\n", b"PROXY TCP4 192.0.2.1\r\n",
     b"PROXY UNKNOWN " + b"x" * 100 + b"\r\n"],  # UNKNOWN's line is still at most 107 bytes
)
def test_other_v1_lines_are_still_refused(line: bytes) -> None:
    with pytest.raises(ProtocolError):
        ProxyHeader("v1").feed(line + HTTP)


# --- a stream client closing inside its PROXY header --------------------------------------------


class CountingSocket(socket.socket):
    """Counts the peeks open_stream makes while it waits for the rest of a header."""

    peeks = 0

    def recv(self, size: int, flags: int = 0) -> bytes:
        if flags & socket.MSG_PEEK:
            self.peeks += 1
        return super().recv(size, flags)


@pytest.fixture
def pair() -> Iterator[tuple[CountingSocket, socket.socket]]:
    """(accepted server side, client) of one loopback TCP connection."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        client = socket.create_connection(listener.getsockname())
        accepted, _ = listener.accept()
    server = CountingSocket(fileno=accepted.detach())
    client.settimeout(5)
    yield server, client
    server.close()
    client.close()


@pytest.fixture
def board() -> Iterator[Scoreboard]:
    scoreboard = Scoreboard(1)
    yield scoreboard
    scoreboard.close()


def open_v1(server: socket.socket, board: Scoreboard, handshake: float) -> Any:
    return open_stream(server, board.slot(0), context=None, proxy_mode="v1",
                       handshake_timeout=handshake, idle_timeout=5)


def later(delay: float, action: Any) -> threading.Thread:
    def run() -> None:
        time.sleep(delay)
        action()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def test_a_client_closing_inside_its_proxy_header_is_refused_at_once(
    board: Scoreboard, pair: tuple[CountingSocket, socket.socket]
) -> None:
    """The worker polled the closed socket every 5 ms until handshake_timeout (10 s by
    default), serving no one: its FIN behind the queued bytes went unseen."""
    server, client = pair
    client.sendall(b"PROXY TCP4 203.0.113.9")
    sender = later(0.1, lambda: client.shutdown(socket.SHUT_WR))
    started = time.monotonic()
    with pytest.raises(StreamRefused, match="closed in its PROXY header"):
        open_v1(server, board, handshake=8)
    assert time.monotonic() - started < 2
    assert server.fileno() == -1  # closed
    sender.join()


def test_the_rest_of_a_header_and_the_clients_close_together_is_a_whole_header(
    board: Scoreboard, pair: tuple[CountingSocket, socket.socket]
) -> None:
    server, client = pair
    client.sendall(b"PROXY TCP4 203.0.113.9 10.0.0.1 4000 ")

    def rest() -> None:
        client.sendall(b"25\r\nbye")
        client.shutdown(socket.SHUT_WR)

    sender = later(0.1, rest)
    stream, source = open_v1(server, board, handshake=5)
    sender.join()
    assert source == ("203.0.113.9", 4000)
    assert stream.recv(10) == b"bye"
    assert stream.recv(10) == b""
    stream.close()


def test_waiting_for_the_rest_of_a_header_does_not_spin(
    board: Scoreboard, pair: tuple[CountingSocket, socket.socket]
) -> None:
    """The wait looked at the socket every 5 ms (some 60 peeks in 0.3 s); now it sleeps in
    the kernel until bytes (or the client's close) arrive."""
    server, client = pair
    client.sendall(b"PROXY TCP4 203.0.113.9 10.0.0.1 4000 ")
    sender = later(0.3, lambda: client.sendall(b"25\r\n"))
    _, source = open_v1(server, board, handshake=5)
    sender.join()
    assert source == ("203.0.113.9", 4000)
    assert server.peeks <= 6, server.peeks


def test_a_half_sent_header_still_times_out_at_the_handshake_deadline(
    board: Scoreboard, pair: tuple[CountingSocket, socket.socket]
) -> None:
    server, client = pair
    client.sendall(b"PROXY TCP4 203.0.113.9")
    started = time.monotonic()
    with pytest.raises(StreamRefused, match="no complete PROXY header in time"):
        open_v1(server, board, handshake=0.4)
    assert 0.35 <= time.monotonic() - started < 2


# --- statsd values -------------------------------------------------------------------------------


def snapshot(requests: int, response_bytes: int, duration_sum: float,
             queued: int = 0) -> dict[str, Any]:
    return {
        "master": {"degraded": False, "generation": 1},
        "workers": [{}],
        "workers_by_state": {"idle": 1},
        "listeners": [{"queued": queued, "queue_full_seen": 0}],
        "totals": {
            "requests": requests, "bytes": response_bytes, "duration_sum": duration_sum,
            "by_class": {"2xx": requests}, "restarts": 0, "boot_failures": 0,
            "handed_over": 0, "balanced": 0, "relieved": 0, "recycles": {}, "reloads": {},
        },
    }


@pytest.fixture
def sink() -> Iterator[StatsdSink]:
    made = StatsdSink(StatsdConfig(address="127.0.0.1:8125"))
    yield made
    made.close()


def values(lines: list[str]) -> dict[str, str]:
    """name -> the value as sent."""
    return {line.split(":", 1)[0]: line.split(":", 1)[1].split("|", 1)[0] for line in lines}


def test_statsd_counters_and_gauges_keep_every_digit(sink: StatsdSink) -> None:
    """`{value:g}` kept six digits: 1,234,567 bytes went out as 1.23457e+06."""
    sent = values(sink.lines(snapshot(1234567, 1234567, 1234.567, queued=98765432)))
    assert sent["preforkd.response_bytes"] == "1234567"
    assert sent["preforkd.requests"] == "1234567"
    assert sent["preforkd.requests.2xx"] == "1234567"
    assert sent["preforkd.listen_queue"] == "98765432"
    assert sent["preforkd.request.duration_avg_ms"] == "1"  # a whole number: no decimals
    later_sent = values(sink.lines(snapshot(1234567 + 10**12, 1234567 + 10**15, 1234.567)))
    assert later_sent["preforkd.response_bytes"] == str(10**15)  # past a float's 53 bits too


@pytest.mark.parametrize(
    ("spent", "served", "expected"),
    [(1.2345678, 1000, "1.235"),  # milliseconds: to the microsecond
     (0.000012, 3, "0.004"),  # small: no exponent
     (1234.5, 1, "1234500"),  # large: no exponent (was 1.2345e+06)
     (0.0000003, 1, "0")],  # below a microsecond
)
def test_the_mean_duration_goes_out_in_milliseconds_without_exponent(
    sink: StatsdSink, spent: float, served: int, expected: str
) -> None:
    sent = values(sink.lines(snapshot(served, 0, spent)))
    assert sent["preforkd.request.duration_avg_ms"] == expected
    assert "e" not in expected
