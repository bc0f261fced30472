"""Regression tests for defects fixed after the code review: the master with a fake kernel
(spawn errors, a reload whose second new worker cannot boot) and a configuration rule
(PROXY protocol with TLS). Each test names the defect it guards against.
"""

from __future__ import annotations

import errno
import logging
import signal
import socket
import textwrap
from collections.abc import Callable
from pathlib import Path

import pytest

from prefork.channel import MSG_HAND_OVER
from prefork.config import ConfigError, load
from prefork.master import BACKOFF_FIRST, Generation, WorkerState
from prefork.sockets import Listener
from prefork.worker import EXIT_BOOT_ERROR
from tests.unit.fakes import Rig, exit_status, make_config, matching

pytestmark = pytest.mark.usefixtures("prefork_log_propagates")


class RefusingSpawn:
    """Stands in for FakeKernel.spawn: raises EAGAIN (fork's "try again") while `refusing`,
    else forwards to the fake kernel; counts every attempt."""

    def __init__(self, rig: Rig) -> None:
        self.real = rig.kernel.spawn
        self.refusing = True
        self.attempts = 0
        self.child_ends: list[socket.socket] = []

    def __call__(self, child: Callable[[], int], child_end: socket.socket) -> int:
        self.attempts += 1
        if self.refusing:
            self.child_ends.append(child_end)
            raise OSError(errno.EAGAIN, "Resource temporarily unavailable")
        return self.real(child, child_end)


# --- 3: an OS error while forking ------------------------------------------------------------


def test_a_spawn_that_fails_with_eagain_is_logged_backed_off_and_retried(
    make_rig: Callable[..., Rig],
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Defect: OSError from fork escaped tick() and took the master down."""
    rig = make_rig(count=2)
    rig.start()
    refusing = RefusingSpawn(rig)
    monkeypatch.setattr(rig.kernel, "spawn", refusing)

    assert rig.exit(1001, exit_status(0)) is True  # did not raise; the master keeps running

    assert refusing.attempts == 1
    assert matching(caplog, "cannot start worker 2", logging.ERROR), caplog.text
    assert [h.number for h in rig.live()] == [1]
    held = {h.slot for h in rig.master.workers.values()}
    assert sorted(rig.master.free_slots) == sorted(
        set(range(rig.scoreboard.capacity)) - held
    ), "the slot of the failed spawn was not given back"
    assert all(end.fileno() == -1 for end in refusing.child_ends), "channel leaked"

    failed_at = rig.kernel.now
    rig.kernel.now = failed_at + BACKOFF_FIRST - 0.01
    rig.tick()
    assert refusing.attempts == 1, "forked again before the backoff passed"

    refusing.refusing = False
    rig.kernel.now = failed_at + BACKOFF_FIRST
    rig.tick()
    assert refusing.attempts == 2
    new = rig.worker(2)
    assert new.state is WorkerState.BOOTING and new.pid == rig.kernel.spawned[-1]
    rig.boot(new.pid)
    assert rig.worker(2).state is WorkerState.READY
    assert rig.worker(1).pid == 1000
    assert rig.kernel.kills == []


def test_spawns_failing_at_startup_do_not_stop_the_master(
    make_rig: Callable[..., Rig],
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    rig = make_rig(count=2)
    refusing = RefusingSpawn(rig)
    monkeypatch.setattr(rig.kernel, "spawn", refusing)

    assert rig.tick() is True

    assert refusing.attempts == 2
    assert len(matching(caplog, "cannot start worker", logging.ERROR)) == 2
    assert rig.handles() == []
    assert len(rig.master.free_slots) == rig.scoreboard.capacity
    assert not rig.master.stop.value

    refusing.refusing = False
    rig.kernel.advance(BACKOFF_FIRST)
    rig.tick()
    rig.boot_all()
    assert [(h.number, h.state) for h in rig.handles()] == [
        (1, WorkerState.READY),
        (2, WorkerState.READY),
    ]
    assert rig.master.ever_ready


# --- 4: a reload whose second new worker cannot boot -----------------------------------------


def _reload_to_two_workers(current: Generation, held: list[Listener]) -> Generation:
    return Generation(0, make_config(2), [])


def test_a_reload_whose_second_new_worker_fails_to_boot_is_reported_failed(
    make_rig: Callable[..., Rig], caplog: pytest.LogCaptureFixture
) -> None:
    """Defect: once the canary had booted, a later new worker that could not boot left the
    reload reported as neither done nor failed (or as done)."""
    rig = make_rig(count=2, reloader=_reload_to_two_workers)
    rig.start()
    old2 = rig.worker(2)
    rig.signal(signal.SIGHUP)
    canary = rig.worker(1, generation=2)
    rig.boot(canary.pid)
    assert rig.master.current.number == 2
    second = rig.worker(2, generation=2)
    assert second.state is WorkerState.BOOTING
    assert rig.announce.named("reloaded") == []

    rig.exit(second.pid, exit_status(EXIT_BOOT_ERROR))

    reloaded = rig.announce.named("reloaded")
    assert len(reloaded) == 1, reloaded
    (_, ok, message) = reloaded[0]
    assert ok is False
    assert message.startswith("reload incomplete: "), message
    assert "worker 2" in message
    assert not rig.master.reloading
    # the old worker 2 keeps serving: not asked to stop, not signalled
    assert rig.worker(2, generation=1) is old2
    assert old2.state is WorkerState.READY
    assert rig.kernel.received(old2.pid) == b""
    assert old2.pid not in [pid for pid, _ in rig.kernel.kills]
    assert matching(caplog, "failed to boot", logging.ERROR)

    # the new worker 2 is retried after the backoff; once it serves, old 2 makes way
    rig.kernel.advance(BACKOFF_FIRST)
    rig.tick()
    retry = rig.worker(2, generation=2)
    assert retry.pid != second.pid
    rig.boot(retry.pid)
    assert rig.kernel.received(old2.pid) == MSG_HAND_OVER
    assert len(rig.announce.named("reloaded")) == 1  # no second, contradicting, outcome


# --- 12: PROXY protocol on a TLS listener ----------------------------------------------------


def test_proxy_protocol_with_a_tls_bind_is_a_config_error(
    tmp_path: Path, cert_and_key: tuple[Path, Path]
) -> None:
    """Defect: PROXY protocol on a TLS listener was accepted and then broke every handshake."""
    cert, key = cert_and_key
    path = tmp_path / "preforkd.yaml"
    path.write_text(textwrap.dedent(f"""\
        app: m:app
        bind:
          - address: 127.0.0.1:0
            tls:
              certificate: {cert}
              key: {key}
        http:
          proxy_protocol: v1
        """))

    with pytest.raises(ConfigError) as caught:
        load(str(path))

    error = caught.value
    text = str(error)
    assert error.source == str(path)
    assert error.line in (7, 8), text  # `http:` or its `proxy_protocol:` line
    assert error.key == "http.proxy_protocol"
    assert text.startswith(f"{path}:{error.line}: http.proxy_protocol: "), text
    assert "TLS" in text


def test_proxy_protocol_without_tls_and_tls_without_proxy_protocol_are_fine(
    tmp_path: Path, cert_and_key: tuple[Path, Path]
) -> None:
    cert, key = cert_and_key
    plain = tmp_path / "plain.yaml"
    plain.write_text("app: m:app\nbind: ['127.0.0.1:0']\nhttp:\n  proxy_protocol: v1\n")
    assert load(str(plain)).http.proxy_protocol == "v1"
    tls = tmp_path / "tls.yaml"
    tls.write_text(
        f"app: m:app\nbind:\n  - address: 127.0.0.1:0\n    tls:\n"
        f"      certificate: {cert}\n      key: {key}\n"
    )
    assert load(str(tls)).bind[0].tls is not None
