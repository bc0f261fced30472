"""prefork.statsd and the master's periodic send: real datagram sockets on 127.0.0.1 and in
tmp_path receive what is sent; the master runs against the fake kernel."""

from __future__ import annotations

import logging
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from prefork.config import ConfigError, StatsdConfig, from_mapping, load
from prefork.statsd import PACKET_LIMIT, StatsdSink
from tests.unit.fakes import Rig, matching


@pytest.fixture
def receiver() -> Iterator[socket.socket]:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    sock.settimeout(2.0)
    yield sock
    sock.close()


def address_of(sock: socket.socket) -> str:
    return f"127.0.0.1:{sock.getsockname()[1]}"


def received(sock: socket.socket) -> list[str]:
    """Every datagram queued on `sock` now (the first waited for), split into lines."""
    lines = sock.recv(65536).decode().split("\n")
    sock.setblocking(False)
    try:
        while True:
            lines.extend(sock.recv(65536).decode().split("\n"))
    except BlockingIOError:
        pass
    finally:
        sock.settimeout(2.0)
    return lines


def snapshot(requests: int = 0, duration_sum: float = 0.0, **more: Any) -> dict[str, Any]:
    by_class = {"1xx": 0, "2xx": requests, "3xx": 0, "4xx": 0, "5xx": 0}
    doc: dict[str, Any] = {
        "master": {"degraded": False, "generation": 1},
        "workers": [{}, {}],
        "workers_by_state": {"idle": 1, "busy": 1},
        "listeners": [{"queued": 3, "queue_full_seen": 0}, {"queued": None,
                                                            "queue_full_seen": 0}],
        "totals": {
            "requests": requests, "by_class": by_class, "bytes": 10 * requests,
            "duration_sum": duration_sum, "restarts": 0, "boot_failures": 0,
            "handed_over": 0, "balanced": 0, "relieved": 0,
            "recycles": {"max_requests": 0, "crash": 0}, "reloads": {"ok": 0, "failed": 0},
        },
    }
    doc.update(more)
    return doc


def test_counters_go_out_as_increases_and_gauges_as_values() -> None:
    sink = StatsdSink(StatsdConfig(address="127.0.0.1:8125"))
    try:
        first = sink.lines(snapshot(requests=4, duration_sum=0.02))
        assert "preforkd.requests:4|c" in first
        assert "preforkd.requests.2xx:4|c" in first
        assert "preforkd.response_bytes:40|c" in first
        assert "preforkd.workers:2|g" in first
        assert "preforkd.workers.busy:1|g" in first
        assert "preforkd.listen_queue:3|g" in first
        assert "preforkd.request.duration_avg_ms:5|g" in first
        assert not any(line.startswith("preforkd.requests.5xx") for line in first)  # 0: not sent

        second = sink.lines(snapshot(requests=10, duration_sum=0.08))
        assert "preforkd.requests:6|c" in second
        assert "preforkd.request.duration_avg_ms:10|g" in second

        quiet = sink.lines(snapshot(requests=10, duration_sum=0.08))
        assert not any(line.endswith("|c") for line in quiet)
        assert not any("duration_avg" in line for line in quiet)  # nothing served: no mean
        assert "preforkd.workers:2|g" in quiet  # gauges every time
    finally:
        sink.close()


def test_prefix_and_dogstatsd_tags() -> None:
    sink = StatsdSink(StatsdConfig(address="127.0.0.1:8125", prefix="", tags=("env:prod", "eu")))
    try:
        lines = sink.lines(snapshot(requests=1))
        assert "requests:1|c|#env:prod,eu" in lines
        assert all(line.endswith("|#env:prod,eu") for line in lines)
    finally:
        sink.close()


def test_gunicorns_prefix_with_its_trailing_dot_names_the_same_metrics(tmp_path: Path) -> None:
    # statsd_prefix = "myapp." moved over as it stands was an error ("dot-separated names")
    path = tmp_path / "preforkd.yaml"
    path.write_text("app: m:app\nstatsd:\n  address: 127.0.0.1:8125\n  prefix: myapp.\n")
    config = load(str(path)).statsd
    assert config.prefix == "myapp"
    sink = StatsdSink(config)
    try:
        assert "myapp.requests:1|c" in sink.lines(snapshot(requests=1))
    finally:
        sink.close()


def test_lines_are_packed_into_datagrams_under_the_limit(receiver: socket.socket) -> None:
    sink = StatsdSink(StatsdConfig(address=address_of(receiver)))
    try:
        lines = [f"preforkd.metric_{i:03d}:{i}|g" for i in range(200)]
        sink.send(lines)
        datagrams = []
        receiver.setblocking(False)
        try:
            while True:
                datagrams.append(receiver.recv(65536).decode())
        except BlockingIOError:
            pass
        assert len(datagrams) > 1
        assert all(len(d) <= PACKET_LIMIT for d in datagrams)
        assert "\n".join(datagrams).split("\n") == lines  # all of them, in order
    finally:
        sink.close()


def test_a_failing_destination_is_said_once_then_its_recovery(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="prefork")
    path = tmp_path / "statsd.sock"
    sink = StatsdSink(StatsdConfig(address=f"unix:{path}"))
    try:
        for _ in range(3):
            sink.send(["preforkd.workers:2|g"])  # nobody bound: ENOENT
        (warning,) = matching(caplog, "statsd: cannot send", logging.WARNING)
        assert f"cannot send to unix:{path}" in warning
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as daemon:
            daemon.bind(str(path))
            sink.send(["preforkd.workers:2|g"])
            assert daemon.recv(100) == b"preforkd.workers:2|g"
        assert matching(caplog, "statsd: sending to unix:", logging.INFO) == [
            f"statsd: sending to unix:{path} again (3 packets dropped meanwhile)"
        ]
    finally:
        sink.close()


def rig_with_statsd(**statsd: Any) -> Rig:
    return Rig(from_mapping({"app": "m:app", "workers": {"count": 2}, "statsd": statsd}))


def test_the_master_sends_every_interval_and_keeps_counting_across_a_reload(
    receiver: socket.socket,
) -> None:
    rig = rig_with_statsd(address=address_of(receiver), interval=5)
    try:
        one, _ = rig.start()
        assert "preforkd.workers:0|g" in received(receiver)  # at the first tick: none yet

        rig.scoreboard.slot(one.slot).done(200, 0.004, 100)
        rig.kernel.advance(1.0)
        rig.tick()  # before the interval: nothing
        receiver.setblocking(False)
        with pytest.raises(BlockingIOError):
            receiver.recv(100)
        receiver.settimeout(2.0)
        rig.kernel.advance(4.0)
        rig.tick()
        lines = received(receiver)
        assert "preforkd.workers:2|g" in lines
        assert "preforkd.requests:1|c" in lines
        assert "preforkd.response_bytes:100|c" in lines

        # a reload that changes the statsd settings: a new sink, the old counts kept
        new = StatsdConfig(address=address_of(receiver), interval=5, prefix="web")
        rig.master.send_statsd(new)
        lines = received(receiver)
        assert "web.workers:2|g" in lines
        assert not any(line.startswith("web.requests") for line in lines)  # not sent twice
    finally:
        if rig.master.statsd is not None:
            rig.master.statsd.close()


def test_an_address_that_does_not_resolve_is_said_once_and_not_retried(
    caplog: pytest.LogCaptureFixture,
) -> None:
    rig = rig_with_statsd(address="statsd.invalid:8125", interval=1)
    rig.start()
    for _ in range(3):
        rig.kernel.advance(1.0)
        rig.tick()
    (line,) = matching(caplog, "statsd: cannot send to statsd.invalid:8125", logging.ERROR)
    assert line.endswith("until a reload")
    assert rig.master.statsd is None


@pytest.mark.parametrize(
    ("body", "key", "message"),
    [
        ("address: 127.0.0.1:0", "statsd.address", "needs a port"),
        ("address: statsd", "statsd.address", "missing port"),
        ("prefix: a..b", "statsd.prefix", "dot-separated names"),
        ("tags: ['env prod']", "statsd.tags[0]", "NAME or NAME:VALUE"),
        ("interval: 0", "statsd.interval", "from 0.1 to 3600"),
        ("adress: 127.0.0.1:8125", "statsd.adress", "unknown key"),
    ],
)
def test_a_bad_statsd_setting_names_the_file_line_and_key(
    tmp_path: Path, body: str, key: str, message: str
) -> None:
    path = tmp_path / "preforkd.yaml"
    path.write_text(f"app: m:app\nstatsd:\n  interval: 1\n  {body}\n")
    if body.startswith("interval"):
        path.write_text(f"app: m:app\nstatsd:\n  {body}\n")
    with pytest.raises(ConfigError) as info:
        load(str(path))
    err = info.value
    assert (err.source, err.key) == (str(path), key), str(err)
    assert err.line == (3 if body.startswith("interval") else 4)
    assert message in err.message, str(err)


def test_a_relative_unix_address_is_taken_from_the_config_files_directory(
    tmp_path: Path,
) -> None:
    path = tmp_path / "preforkd.yaml"
    path.write_text("app: m:app\nstatsd:\n  address: unix:run/statsd.sock\n")
    (tmp_path / "run").mkdir()
    assert load(str(path)).statsd.address == f"unix:{tmp_path}/run/statsd.sock"
