"""A bounded mutation fuzz run against a live preforkd.

Valid requests (GET, POST with Content-Length, chunked POST, pipelined pairs, keep-alive, 100-
continue, PROXY headers) are mutated with a fixed seed and sent, each on a new connection, in
random splits. Every answer must be a well-formed, correctly framed sequence of responses, or
the connection must close without a byte; no worker may die or log a traceback; every access
log line must be JSON; and the server must still answer a normal request at the end.
"""

from __future__ import annotations

import json
import random
import re
import socket
import struct
import time
from dataclasses import dataclass
from typing import Any

import pytest

from harness import (
    APPS,
    Address,
    Server,
    ServerFactory,
    connect,
    fetch,
    log_lines,
    recv_within,
    wait_until,
)

SEED = 1234
MAX_CASES = 2500
TIME_BUDGET = 30.0  # seconds of sending; the run stops early on a slow machine
HALF_CLOSE_DEADLINE = 5.0  # after our FIN the server must finish and close by then
KEEP_OPEN_READ = 0.15  # how long a case that keeps its write side open reads answers

# --- the corpus ------------------------------------------------------------------------------

GET = (
    b"GET /a/b?c=d&e=f HTTP/1.1\r\nHost: example.test\r\nUser-Agent: fuzz/1.0\r\n"
    b"Accept: */*\r\n\r\n"
)
POST_CL = (
    b"POST /body HTTP/1.1\r\nHost: x\r\nContent-Type: text/plain\r\nContent-Length: 11\r\n\r\n"
    b"hello world"
)
POST_CHUNKED = (
    b"POST /body HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
    b"5\r\nhello\r\n6;ext=1\r\n world\r\n0\r\nX-Trailer: t\r\n\r\n"
)
KEEPALIVE_10 = b"GET /k HTTP/1.0\r\nConnection: keep-alive\r\n\r\n"
CLOSE = b"GET /c HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
EXPECT = b"POST /body HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: 3\r\n\r\nabc"
ABSOLUTE = b"GET http://example.test/abs?q=1 HTTP/1.1\r\nHost: example.test\r\n\r\n"
FORWARDED = (
    b"GET /environ HTTP/1.1\r\nHost: x\r\nX-Forwarded-For: 6.6.6.6, [2001:db8::1]:80\r\n"
    b'Forwarded: for="[::1]:5";proto=https, for=192.0.2.1\r\nX-Forwarded-Proto: https\r\n'
    b"Cookie: a=1\r\nCookie: b=2\r\n\r\n"
)
MANY_FIELDS = (
    b"GET /many HTTP/1.1\r\nHost: x\r\n"
    + b"".join(b"X-Field-%d: %d\r\n" % (i, i) for i in range(18))  # 19 with Host
    + b"\r\n"
)
NEAR_LIMIT = b"POST /body HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n" + b"z" * 1000
OVER_LIMIT = (
    b"POST /body HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
    + (b"258\r\n" + b"y" * 600 + b"\r\n") * 2
    + b"0\r\n\r\n"
)
PROXY_V1 = b"PROXY TCP4 1.2.3.4 5.6.7.8 1111 2222\r\n"
PROXY_V2 = (
    b"\r\n\r\n\x00\r\nQUIT\n\x21\x11\x00\x0c"
    + socket.inet_aton("1.2.3.4")
    + socket.inet_aton("5.6.7.8")
    + struct.pack("!HH", 1111, 2222)
)
CORPUS = [
    GET,
    POST_CL,
    POST_CHUNKED,
    GET + POST_CL,
    POST_CHUNKED + GET,
    KEEPALIVE_10 + KEEPALIVE_10,
    GET + CLOSE,
    EXPECT,
    ABSOLUTE,
    FORWARDED,
    PROXY_V1 + GET + POST_CL,
    PROXY_V2 + POST_CHUNKED,
    MANY_FIELDS,
    NEAR_LIMIT,
    OVER_LIMIT,
]

INSERTIONS = [b"\r", b"\n", b"\r\n", b"\x00", b" ", b"\t", b":", b",", b";", b"0", b"9", b"f", b"-"]


def mutate(data: bytes, rng: random.Random) -> bytes:
    """One to three mutations: flips, insertions, deletions, truncation, duplicated lines."""
    out = bytearray(data)
    for _ in range(rng.randint(1, 3)):
        kind = rng.randrange(7)
        if not out:
            out = bytearray(rng.choice(CORPUS))
        pos = rng.randrange(len(out) + 1)
        if kind == 0 and pos < len(out):  # flip a bit
            out[pos] ^= 1 << rng.randrange(8)
        elif kind == 1:  # insert a byte the parser cares about
            out[pos:pos] = rng.choice(INSERTIONS)
        elif kind == 2:  # insert a number (a length, a chunk size)
            out[pos:pos] = str(rng.choice([0, 1, 7, 65535, 2**31, 2**64, 10**30])).encode()
        elif kind == 3:  # delete a short range
            del out[pos : pos + rng.randint(1, 4)]
        elif kind == 4:  # truncate
            del out[pos:]
        elif kind == 5:  # duplicate one line of the message
            lines = bytes(out).split(b"\r\n")
            index = rng.randrange(len(lines))
            lines.insert(index, lines[index])
            out = bytearray(b"\r\n".join(lines))
        else:  # replace a byte with a random one
            if pos < len(out):
                out[pos] = rng.randrange(256)
    return bytes(out)


def splits(data: bytes, rng: random.Random) -> list[bytes]:
    cuts = sorted(rng.randrange(len(data) + 1) for _ in range(rng.randint(0, 3)))
    pieces, last = [], 0
    for cut in cuts:
        pieces.append(data[last:cut])
        last = cut
    pieces.append(data[last:])
    return [piece for piece in pieces if piece]


# --- checking what came back -----------------------------------------------------------------

STATUS_LINE = re.compile(rb"HTTP/1\.1 ([1-5][0-9][0-9]) ([\x20-\x7e]*)\r\n")
FIELD = re.compile(rb"([!#$%&'*+.^_`|~0-9A-Za-z-]+): ?([\x20-\x7e\t]*)")
# what this app (which never fails) and the server's own rejections may answer
STATUSES = {100, 200, 400, 408, 413, 414, 417, 431, 501, 505}
ERRORS = STATUSES - {100, 200}


class Malformed(Exception):
    pass


@dataclass
class Answer:
    status: int
    headers: dict[str, list[str]]


def check_stream(raw: bytes) -> list[Answer]:
    """Parse `raw` as back-to-back complete responses; Malformed if any is not well-formed,
    not framed, or cut short."""
    answers: list[Answer] = []
    pos = 0
    while pos < len(raw):
        line = STATUS_LINE.match(raw, pos)
        if not line:
            raise Malformed(f"bad status line at {pos}: {raw[pos : pos + 60]!r}")
        end = raw.find(b"\r\n\r\n", line.start())
        if end < 0:
            raise Malformed(f"incomplete head at {pos}")
        status = int(line.group(1))
        if status not in STATUSES:
            raise Malformed(f"unexpected status {status}")
        headers: dict[str, list[str]] = {}
        for field in raw[line.end() : end].split(b"\r\n"):
            if not field:
                continue
            match = FIELD.fullmatch(field)
            if not match:
                raise Malformed(f"bad header field {field!r}")
            name = match.group(1).decode().lower()
            headers.setdefault(name, []).append(match.group(2).decode("latin-1"))
        pos = end + 4
        lengths = headers.get("content-length", [])
        chunked = headers.get("transfer-encoding", []) == ["chunked"]
        if "transfer-encoding" in headers and not chunked:
            raise Malformed(f"unexpected Transfer-Encoding {headers['transfer-encoding']}")
        if lengths and chunked:
            raise Malformed("both Content-Length and Transfer-Encoding")
        if len(lengths) > 1 or (lengths and not lengths[0].isdigit()):
            raise Malformed(f"bad Content-Length {lengths}")
        if status < 200 or status in (204, 304):
            if lengths or chunked:
                raise Malformed(f"{status} with a body")
        elif chunked:
            pos = _skip_chunked(raw, pos)
        elif lengths:
            pos += int(lengths[0])
            if pos > len(raw):
                raise Malformed(f"body shorter than its Content-Length {lengths[0]}")
        else:
            raise Malformed(f"{status} without framing")  # this server always frames
        close = "close" in (value.lower() for value in headers.get("connection", []))
        if status in ERRORS and not close:
            raise Malformed(f"{status} without Connection: close")
        if close and pos != len(raw):
            raise Malformed(f"{len(raw) - pos} bytes after a Connection: close response")
        answers.append(Answer(status, headers))
    return answers


def _skip_chunked(raw: bytes, pos: int) -> int:
    while True:
        end = raw.find(b"\r\n", pos)
        if end < 0:
            raise Malformed("incomplete chunk size")
        size_text = raw[pos:end].split(b";", 1)[0]
        if not re.fullmatch(rb"[0-9a-f]+", size_text):
            raise Malformed(f"bad chunk size {size_text!r}")
        size = int(size_text, 16)
        pos = end + 2
        if size == 0:
            if raw[pos : pos + 2] != b"\r\n":
                raise Malformed("response trailers or no final CRLF")
            return pos + 2
        if raw[pos + size : pos + size + 2] != b"\r\n":
            raise Malformed("chunk not followed by CRLF")
        pos += size + 2


# --- one case --------------------------------------------------------------------------------


def run_case(
    where: Address, pieces: list[bytes], pauses: list[float], half_close: bool
) -> tuple[bytes, bool]:
    """Send the pieces; return (what came back, whether the server closed)."""
    with connect(where, 5) as sock:
        for piece, pause in zip(pieces, pauses, strict=True):
            try:
                sock.sendall(piece)
            except OSError:
                break  # the server already closed: what it said is still readable
            if pause:
                time.sleep(pause)
        if half_close:
            try:
                sock.shutdown(socket.SHUT_WR)
            except OSError:
                pass
        return recv_within(sock, HALF_CLOSE_DEADLINE if half_close else KEEP_OPEN_READ)


def fuzz_settings(**more: Any) -> dict[str, Any]:
    return {
        "app": "pf_hardening_app:app",
        "pythonpath": [str(APPS)],
        "workers": {"count": 2},
        "http": {
            "header_timeout": 2,
            "body_timeout": 2,
            "max_body_size": 1000,
            "max_header_fields": 19,
            "proxy_protocol": "auto",
        },
        "logging": {"access_log": "access.log", "access_log_format": "json"},
        **more,
    }


@pytest.mark.slow
def test_mutation_fuzz(server_factory: ServerFactory) -> None:
    server: Server = server_factory(fuzz_settings())
    where = server.addresses()[0]
    workers = server.worker_pids()
    assert len(workers) == 2
    rng = random.Random(SEED)
    failures: list[str] = []
    statuses: dict[int, int] = {}
    silent_closes = 0
    started = time.monotonic()
    cases = 0
    while cases < MAX_CASES and time.monotonic() - started < TIME_BUDGET:
        cases += 1
        original = rng.choice(CORPUS)
        data = mutate(original, rng) if rng.random() < 0.9 else original
        pieces = splits(data, rng) or [data]
        pauses = [rng.choice([0.0, 0.0, 0.0, 0.001, 0.003]) for _ in pieces]
        half_close = rng.random() < 0.95
        raw, closed = run_case(where, pieces, pauses, half_close)
        if half_close and not closed:
            failures.append(
                f"case {cases}: not closed {HALF_CLOSE_DEADLINE}s after our FIN: "
                f"sent {data!r}, got {raw[:200]!r}"
            )
            continue
        if not raw:
            silent_closes += closed
            continue
        try:
            answers = check_stream(raw)
        except Malformed as exc:
            failures.append(f"case {cases}: {exc}: sent {data!r}, got {raw[:300]!r}")
            continue
        for answer in answers:
            statuses[answer.status] = statuses.get(answer.status, 0) + 1
        if len(failures) >= 10:
            break
    elapsed = time.monotonic() - started
    summary = f"{cases} cases in {elapsed:.1f}s; statuses {statuses}; silent closes {silent_closes}"
    print(summary)
    assert not failures, summary + "\n" + "\n".join(failures)
    # the corpus and the seed are meant to reach both acceptance and rejection
    assert statuses.get(200, 0) > 50 and statuses.get(400, 0) > 50, summary

    assert fetch(where).status == 200, summary
    assert server.worker_pids() == workers, f"workers changed: {workers} -> {server.worker_pids()}"
    log = server.log()
    for sign in ("Traceback", "died unexpectedly", "unexpected error", "exited ("):
        assert sign not in log, f"{sign!r} in the server log\n{server.log_tail(60)}"

    access_log = server.workdir / "access.log"
    wait_until(lambda: log_lines(access_log), 5, message="no access log")
    lines = log_lines(access_log)
    for line in lines:
        entry = json.loads(line)  # a mutated User-Agent or target must not break the format
        assert {"remote", "status", "user_agent", "target"} <= set(entry), line
