"""Fixtures for the unit tests (the master's in test_master.py, test_supervise.py and
test_handover.py; the fakes they wire together live in fakes.py). Nothing here is autouse: a
module asks for what it needs."""

from __future__ import annotations

import logging
import os
import shutil
import signal
import socket
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from prefork.addresses import Address
from prefork.logs import Logs
from prefork.master import Generation
from prefork.signals import SignalQueue
from prefork.sockets import Listener
from tests.unit.fakes import Rig, make_config
from tests.unit.worker_rig import WorkerRig


@pytest.fixture
def prefork_log_propagates(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # prefork.logs.Logs sets propagate=False; caplog needs records to reach the root logger
    monkeypatch.setattr(logging.getLogger("prefork"), "propagate", True)
    caplog.set_level(logging.DEBUG, logger="prefork")


@pytest.fixture
def logs() -> Iterator[Logs]:
    """Logs() re-points the "prefork" logger; put it back for the rest of the suite."""
    logger = logging.getLogger("prefork")
    saved = (list(logger.handlers), logger.level, logger.propagate)
    try:
        yield Logs()
    finally:
        for handler in list(logger.handlers):
            logger.removeHandler(handler)
        for handler in saved[0]:
            logger.addHandler(handler)
        logger.setLevel(saved[1])
        logger.propagate = saved[2]


@pytest.fixture
def make_rig() -> Iterator[Callable[..., Rig]]:
    """Makes Rigs (count workers, the rest are `workers:` settings); closes them afterwards."""
    rigs: list[Rig] = []

    def make(
        count: int = 3,
        reloader: Callable[[Generation, list[Listener]], Generation] | None = None,
        capacity: int = 16,
        watchdog_interval: float = 0.0,
        **workers: Any,
    ) -> Rig:
        rig = Rig(make_config(count, **workers), reloader, capacity, watchdog_interval)
        rigs.append(rig)
        return rig

    yield make
    for rig in rigs:
        rig.close()


@pytest.fixture
def signals() -> Iterator[SignalQueue]:
    """The worker's signal pipe; the handlers and wakeup fd found are put back."""
    used = (signal.SIGTERM, signal.SIGUSR1)
    handlers = {sig: signal.getsignal(sig) for sig in used}
    queue = SignalQueue(catch=used)
    yield queue
    queue.close()
    for sig, handler in handlers.items():
        signal.signal(sig, handler)


@pytest.fixture
def worker_rig(logs: Logs, signals: SignalQueue) -> Iterator[WorkerRig]:
    """Workers in this process on one shared non-blocking listener (tests/unit/worker_rig.py)."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)
    sock.setblocking(False)
    host, port = sock.getsockname()
    made = WorkerRig(Listener(sock, Address(kind="tcp", host=host, port=port)), logs, signals)
    yield made
    made.close()
    sock.close()


@pytest.fixture
def cert_and_key(tmp_path: Path) -> tuple[Path, Path]:
    """A self-signed certificate for localhost and its key (openssl; a failure under CI=true
    when it is missing, a skip elsewhere)."""
    openssl = shutil.which("openssl")
    if openssl is None:
        reason = "required tool 'openssl' is not on PATH"
        if os.environ.get("CI") == "true":
            pytest.fail(f"{reason} (.ci/run should install it)")
        pytest.skip(reason)
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        [openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
         "-subj", "/CN=localhost", "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True, timeout=60,
    )
    return cert, key
