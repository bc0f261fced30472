"""Defect 1: the error responses the server makes itself (HttpProtocol.reject: 400, 408, 413,
414, 417, 431, ...) were missing from /metrics and /status, since reject() never counted them
in the worker's scoreboard slot, and their access-log line was always `"- - HTTP/1.1"`, even
for a request whose head had been parsed whole (a 413 by Content-Length, a 417), and for one
whose version nobody knew (now `"- - -"`).

Each rejected response is now counted once (status class, duration, body bytes) without
counting a request the application answered, the slot is left IDLE (the connection ends; never
BUSY, never KEEPALIVE), and the access line carries the parsed head, or "-" and the version the
parser read, if any."""

from __future__ import annotations

import re
import socket
import time
from collections.abc import Callable
from typing import Any

import pytest

from prefork.logs import Logs
from prefork.scoreboard import Activity
from prefork.worker import Worker
from tests.unit.worker_rig import (
    DEADLINE,
    REQUEST,
    WorkerRig,
    conn_of,
    read_until_closed,
    served_connection,
    wait_readable,
)

FOUR_XX = (0, 0, 0, 1, 0)
# combined format plus the duration: remote - - [time] "request" status size "ref" "ua" micros
ACCESS = re.compile(
    r'(?P<remote>\S+) - - \[[^\]]+\] "(?P<request>[^"]*)" (?P<status>\d{3}) (?P<size>\S+) '
    r'"(?P<referer>[^"]*)" "(?P<agent>[^"]*)" (?P<micros>\d+)'
)


@pytest.fixture
def rig(worker_rig: WorkerRig) -> WorkerRig:
    """The worker rig, its workers logging access lines to stdout (read with capfd)."""
    worker_rig.logs = Logs(access_log="-")
    return worker_rig


def access_lines(capfd: pytest.CaptureFixture[str]) -> list[re.Match[str]]:
    lines = [line for line in capfd.readouterr().out.splitlines() if line]
    matches = [ACCESS.fullmatch(line) for line in lines]
    assert all(matches), lines
    return [m for m in matches if m is not None]


def only_access_line(capfd: pytest.CaptureFixture[str]) -> re.Match[str]:
    (line,) = access_lines(capfd)
    return line


def body_length(response: bytes) -> int:
    match = re.search(rb"\r\ncontent-length: (\d+)\r\n", response, re.IGNORECASE)
    assert match, response
    return int(match.group(1))


def answer(rig: WorkerRig, worker: Worker, data: bytes) -> bytes:
    """What a new client sending `data` gets back, the worker going on until it closes (or
    lingers after answering)."""
    client = rig.connect()
    client.sendall(data)
    rig.accept(worker)
    drive(worker, client)
    return read_until_closed(client)


def drive(worker: Worker, client: socket.socket) -> None:
    """Let the worker read what `client` sent until it has answered and is closing."""
    deadline = time.monotonic() + DEADLINE
    while True:
        conns = [c for c in worker.conns.values() if c.peer == client.getsockname()]
        if not conns or conns[0].linger_until:
            return
        assert time.monotonic() < deadline, "the connection was never answered"
        wait_readable(worker, conns[0].fd)
        worker.on_readable(conns[0])


def assert_counted_once(rig: WorkerRig, worker: Worker, by_class: tuple[int, ...],
                        sent: int, requests: int = 0) -> None:
    slot = worker.spec.number - 1
    counters = rig.board.counters(slot)
    assert counters.by_class == by_class
    assert sum(counters.buckets) == sum(by_class)
    assert counters.bytes_sent == sent
    view = rig.board.read(slot)
    assert view.activity == Activity.IDLE  # the connection ended: not BUSY, not KEEPALIVE
    assert view.requests == worker.slot.requests == requests  # the application answered these


def test_a_garbage_request_line_400_is_counted_and_logged(
    rig: WorkerRig, capfd: pytest.CaptureFixture[str]
) -> None:
    """Defect 1: a 400 for a garbage request line was missing from the slot's counters and
    logged as HTTP/1.1, a version the request never stated."""
    worker, _ = rig.worker()
    capfd.readouterr()

    response = answer(rig, worker, b"GARBAGE\r\n\r\n")

    assert response.startswith(b"HTTP/1.1 400 ")
    assert_counted_once(rig, worker, FOUR_XX, body_length(response))
    line = only_access_line(capfd)
    assert (line["remote"], line["request"], line["status"]) == ("127.0.0.1", "- - -", "400")
    assert int(line["size"]) == body_length(response)
    assert (line["referer"], line["agent"]) == ("-", "-")


def test_garbage_after_a_request_does_not_take_its_version(
    rig: WorkerRig, capfd: pytest.CaptureFixture[str]
) -> None:
    """Defect 1: llhttp keeps the version of the previous request on the connection until it
    reads a new request line; the garbage after it must not be logged as HTTP/1.1. A slot
    KEEPALIVE before goes IDLE: the rejected request ends its connection."""
    worker, _ = rig.worker()
    client = served_connection(rig, worker)
    assert rig.board.read(0).activity == Activity.KEEPALIVE
    capfd.readouterr()

    client.sendall(b"xx\r\n\r\n")
    drive(worker, client)
    response = read_until_closed(client)

    assert response.startswith(b"HTTP/1.1 400 ")
    assert_counted_once(rig, worker, (0, 1, 0, 1, 0), 2 + body_length(response), requests=1)
    assert only_access_line(capfd)["request"] == "- - -"


def test_a_head_timeout_408_is_counted_and_logged(
    rig: WorkerRig, capfd: pytest.CaptureFixture[str]
) -> None:
    """Defect 1: a flood of 408s (request heads that stopped arriving) left
    preforkd_requests_total{class="4xx"} at 0."""
    worker, _ = rig.worker()
    capfd.readouterr()
    client = rig.connect()
    client.sendall(b"GET /slow HT")
    rig.accept(worker)
    conn = conn_of(worker, client)
    assert not conn.parser.idle, "the partial head was not read"

    conn.head_deadline = time.monotonic() - 1.0  # header_timeout is over
    worker.next_sweep = 0.0
    worker.sweep()
    response = read_until_closed(client)

    assert response.startswith(b"HTTP/1.1 408 ")
    assert_counted_once(rig, worker, FOUR_XX, body_length(response))
    line = only_access_line(capfd)
    assert (line["request"], line["status"]) == ("- - -", "408")


def test_a_rejected_request_of_a_stopping_worker_leaves_it_draining(rig: WorkerRig) -> None:
    """Defect 1: counting the rejection must not make a stopping worker's slot look like one
    that takes connections."""
    worker, _ = rig.worker()
    worker.slot.stopping()

    response = answer(rig, worker, b"GARBAGE\r\n\r\n")

    assert response.startswith(b"HTTP/1.1 400 ")
    assert rig.board.counters(0).by_class == FOUR_XX
    assert rig.board.read(0).activity == Activity.DRAINING


def test_a_413_by_content_length_logs_its_parsed_head(
    rig: WorkerRig, capfd: pytest.CaptureFixture[str]
) -> None:
    """Defect 1: a 413 for a declared body over http.max_body_size, refused once its whole
    head was parsed, was logged as `"- - HTTP/1.1"` and not counted."""
    worker, _ = rig.worker(max_body_size=10)
    capfd.readouterr()

    response = answer(
        rig,
        worker,
        b"POST /up?x=1 HTTP/1.1\r\nHost: t\r\nReferer: http://t/form\r\n"
        b"User-Agent: test/1.0\r\nContent-Length: 100\r\n\r\n",
    )

    assert response.startswith(b"HTTP/1.1 413 ")
    assert_counted_once(rig, worker, FOUR_XX, body_length(response))
    line = only_access_line(capfd)
    assert (line["request"], line["status"]) == ("POST /up?x=1 HTTP/1.1", "413")
    assert (line["referer"], line["agent"]) == ("http://t/form", "test/1.0")
    assert int(line["size"]) == body_length(response)


def test_a_413_by_a_chunked_body_after_a_whole_request(
    rig: WorkerRig, capfd: pytest.CaptureFixture[str]
) -> None:
    """Defect 1: a chunk over max_body_size, in the read that also held a whole request: the
    first request is answered and counted by the application path, the broken one (never
    given to the application) by reject(), each once, each with its own head in the log."""
    worker, _ = rig.worker(max_body_size=10)
    capfd.readouterr()

    response = answer(
        rig,
        worker,
        REQUEST + b"POST /chunks HTTP/1.1\r\nHost: t\r\nUser-Agent: up/2\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n40\r\n" + b"x" * 64 + b"\r\n",
    )

    first_response, _, error = response.partition(b"\r\n\r\nok")
    assert first_response.startswith(b"HTTP/1.1 200 OK\r\n"), response
    assert error.startswith(b"HTTP/1.1 413 "), response
    error_body = body_length(error)
    assert_counted_once(rig, worker, (0, 1, 0, 1, 0), 2 + error_body, requests=1)
    first, second = access_lines(capfd)
    assert (first["request"], first["status"]) == ("GET / HTTP/1.1", "200")
    assert (second["request"], second["status"]) == ("POST /chunks HTTP/1.1", "413")
    assert second["agent"] == "up/2"


def test_a_417_logs_its_parsed_head(rig: WorkerRig, capfd: pytest.CaptureFixture[str]) -> None:
    """Defect 1: an Expect other than 100-continue (417) is refused after the whole head."""
    worker, _ = rig.worker()
    capfd.readouterr()

    response = answer(rig, worker, b"PUT /x HTTP/1.1\r\nHost: t\r\nExpect: fly\r\n\r\n")

    assert response.startswith(b"HTTP/1.1 417 ")
    assert_counted_once(rig, worker, FOUR_XX, body_length(response))
    line = only_access_line(capfd)
    assert (line["request"], line["status"]) == ("PUT /x HTTP/1.1", "417")


def test_a_414_is_counted_and_claims_no_version(
    rig: WorkerRig, capfd: pytest.CaptureFixture[str]
) -> None:
    """Defect 1: a request line over max_request_line (414) is cut before its version."""
    worker, _ = rig.worker(max_request_line=64)
    capfd.readouterr()

    response = answer(rig, worker, b"GET /" + b"a" * 100 + b" HTTP/1.1\r\nHost: t\r\n\r\n")

    assert response.startswith(b"HTTP/1.1 414 ")
    assert_counted_once(rig, worker, FOUR_XX, body_length(response))
    line = only_access_line(capfd)
    assert (line["request"], line["status"]) == ("- - -", "414")


@pytest.mark.parametrize("version", ["1.0", "1.1"])
def test_a_431_is_counted_with_the_version_the_parser_read(
    rig: WorkerRig, capfd: pytest.CaptureFixture[str], version: str
) -> None:
    """Defect 1: too many header fields (431): the head is not whole, but its request line
    was read, so the line is the request's own (and its version, not always HTTP/1.1)."""
    worker, _ = rig.worker(max_header_fields=2)
    capfd.readouterr()

    response = answer(
        rig, worker, b"GET /x HTTP/%b\r\nHost: t\r\nA: 1\r\nB: 2\r\n\r\n" % version.encode()
    )

    assert response.startswith(b"HTTP/1.1 431 ")
    assert_counted_once(rig, worker, FOUR_XX, body_length(response))
    line = only_access_line(capfd)
    assert (line["request"], line["status"]) == (f"GET /x HTTP/{version}", "431")


# --- a body that breaks while the application reads it is counted once, by respond() ------

CHUNKED_HEAD = b"POST /up HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n"
BIG_CHUNK = b"40\r\n" + b"x" * 64 + b"\r\n"


def app_path(
    rig: WorkerRig, app: Callable[[socket.socket], Any]
) -> tuple[Worker, bytes]:
    """A chunked POST whose body arrives only once `app(client)` runs (so that the
    application, not the worker's read, finds it over max_body_size: 10 bytes)."""
    worker, _ = rig.worker(max_body_size=10)
    client = rig.connect()
    assert worker.protocol is not None
    worker.protocol.app = app(client)
    client.sendall(CHUNKED_HEAD)
    rig.accept(worker)
    drive(worker, client)
    return worker, read_until_closed(client)


def test_a_body_over_the_limit_after_the_response_began_is_counted_once(
    rig: WorkerRig, capfd: pytest.CaptureFixture[str]
) -> None:
    """Defect 1's fix must not count again a request whose body broke after the application
    had sent its response head: its 200 is the one answer, counted once, logged once."""
    capfd.readouterr()

    def app(client: socket.socket) -> Any:
        def answer_then_read(environ: dict[str, Any], start_response: Any) -> list[bytes]:
            write = start_response("200 OK", [("Content-Length", "2")])
            write(b"ok")
            client.sendall(BIG_CHUNK)
            environ["wsgi.input"].read()
            return []
        return answer_then_read

    worker, response = app_path(rig, app)

    assert response.startswith(b"HTTP/1.1 200 OK\r\n") and b" 413 " not in response
    assert_counted_once(rig, worker, (0, 1, 0, 0, 0), 2, requests=1)
    line = only_access_line(capfd)
    assert (line["request"], line["status"]) == ("POST /up HTTP/1.1", "200")


def test_a_body_over_the_limit_read_by_the_application_is_counted_once(
    rig: WorkerRig, capfd: pytest.CaptureFixture[str]
) -> None:
    """Defect 1's fix must not count twice a 413 that respond() answers (the application read
    the body first): one 4xx, one access line, with the error page's bytes."""
    capfd.readouterr()

    def app(client: socket.socket) -> Any:
        def read_then_answer(environ: dict[str, Any], start_response: Any) -> list[bytes]:
            client.sendall(BIG_CHUNK)
            environ["wsgi.input"].read()
            raise AssertionError("the body was over the limit")
        return read_then_answer

    worker, response = app_path(rig, app)

    assert response.startswith(b"HTTP/1.1 413 ") and response.count(b"HTTP/1.1 ") == 1
    assert_counted_once(rig, worker, FOUR_XX, body_length(response), requests=1)
    line = only_access_line(capfd)
    assert (line["request"], line["status"]) == ("POST /up HTTP/1.1", "413")
    assert int(line["size"]) == body_length(response)
