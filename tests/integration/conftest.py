"""Fixtures for integration tests; the helpers themselves are in harness.py and detached.py."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable, Generator, Iterator
from pathlib import Path

import pytest

from detached import Daemons
from harness import Server, ServerFactory, require_tool
from test_syslog import Rsyslog

# Servers started by the running test, so a failure report can show their logs.
SERVERS_KEY = pytest.StashKey[list[Server]]()


@pytest.fixture
def server_factory(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[ServerFactory]:
    """`server_factory(settings, app_source=..., args=...) -> Server`, started and ready.

    Every server it made is stopped at teardown (SIGTERM, then SIGKILL to its process
    group), whatever the test did.
    """
    factory = ServerFactory(tmp_path)
    request.node.stash[SERVERS_KEY] = factory.servers
    try:
        yield factory
    finally:
        factory.stop_all()


@pytest.fixture(scope="module")
def module_factory(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerFactory]:
    """A server_factory shared by the tests of one module (parametrized cases against one
    server); every server it made is stopped after the module."""
    factory = ServerFactory(tmp_path_factory.mktemp(request.module.__name__))
    try:
        yield factory
    finally:
        factory.stop_all()


@pytest.fixture(name="require_tool")
def require_tool_fixture() -> Callable[[str], str]:
    """harness.require_tool as a fixture: skip (or fail under CI=true) without a command."""
    return require_tool


@pytest.fixture
def daemons() -> Iterator[Daemons]:
    """Detached daemons the test launches or adopts; all are stopped at teardown."""
    tracker = Daemons()
    try:
        yield tracker
    finally:
        tracker.stop_all()


@pytest.fixture
def rsyslog(require_tool: Callable[[str], str], short_tmp: Path) -> Iterator[Rsyslog]:
    """A private rsyslogd for the test, stopped after it."""
    daemon = Rsyslog(short_tmp, require_tool("rsyslogd"))
    try:
        yield daemon
    finally:
        daemon.stop()


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    """A directory with a short path, for unix sockets (sun_path holds only 107 bytes)."""
    path = Path(tempfile.mkdtemp(prefix="pf-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """Attach the stderr tail of every server the test started to its failure report."""
    report = yield
    if report.failed and report.when in ("setup", "call"):
        for server in item.stash.get(SERVERS_KEY, []):
            report.sections.append((f"preforkd {server.workdir.name}", server.log_tail()))
    return report
