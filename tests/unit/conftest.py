"""Fixtures for the unit tests (the master's in test_master.py, test_supervise.py and
test_handover.py; the fakes they wire together live in fakes.py). Nothing here is autouse: a
module asks for what it needs."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from prefork.logs import Logs
from prefork.master import Generation
from prefork.sockets import Listener
from tests.unit.fakes import Rig, make_config


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
