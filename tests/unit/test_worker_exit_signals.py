"""prefork.worker.exit_on_signals: the worker_int and worker_abort hooks, in a forked child.

Each test forks a child that installs the handlers exactly as a worker does, tells the
parent it is ready and waits in time.sleep; the parent sends it real signals and reads its
wait status and what it wrote to fd 2 (a file): faulthandler's dump, the hooks' lines (the
hooks below write to fd 2 too, so the order is visible) and the log of a failing hook.
The child always leaves through os._exit, and every wait is bounded.
"""

from __future__ import annotations

import faulthandler
import logging
import os
import resource
import select
import signal
import sys
import textwrap
import time
import traceback
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from prefork.config import HooksConfig, from_mapping
from prefork.hooks import Hooks, WorkerInfo
from prefork.signals import set_mask
from prefork.worker import exit_on_signals

HOOK_SOURCE = """
import os
import signal

def _say(what, worker):
    os.write(2, f"HOOK {what} {worker.number} {worker.generation} {worker.pid}\\n".encode())

def worker_int(worker):
    _say("worker_int", worker)

def worker_abort(worker):
    _say("worker_abort", worker)

def explode(worker):
    _say("explode", worker)
    raise ValueError("deliberate failure in a signal hook")

def leave(worker):
    _say("leave", worker)
    raise SystemExit(7)

def resignal(worker):
    # every signal that ends a worker, again, while its hook runs: none runs a hook again
    for sig in (signal.SIGINT, signal.SIGQUIT, signal.SIGABRT):
        os.kill(os.getpid(), sig)
    _say("resignal", worker)
"""

WAIT = 10.0  # seconds; every step below takes milliseconds


@pytest.fixture
def hook_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    monkeypatch.setattr(sys, "dont_write_bytecode", True)
    monkeypatch.syspath_prepend(str(tmp_path))
    name = f"pf_exit_hooks_{uuid.uuid4().hex[:12]}"
    (tmp_path / f"{name}.py").write_text(textwrap.dedent(HOOK_SOURCE))
    try:
        yield name
    finally:
        sys.modules.pop(name, None)


class Child:
    """A forked child that set up a worker's exit handlers and now sleeps in Python."""

    def __init__(self, pid: int, stderr: Path) -> None:
        self.pid = pid
        self.stderr = stderr
        self.status: int | None = None

    def kill(self, sig: int) -> None:
        os.kill(self.pid, sig)

    def wait(self, timeout: float = WAIT) -> int:
        deadline = time.monotonic() + timeout
        while self.status is None:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.status = status
                break
            if time.monotonic() >= deadline:
                raise AssertionError(f"child {self.pid} still running after {timeout:g}s:\n"
                                     f"{self.output()}")
            time.sleep(0.01)
        return self.status

    def output(self) -> str:
        return self.stderr.read_text(errors="replace")

    def reap(self) -> None:
        """Teardown: a child still there is killed (by its pid) and reaped."""
        if self.status is None:
            try:
                os.kill(self.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.status = os.waitpid(self.pid, 0)[1]


Fork = Callable[..., Child]


def stuck_in_sleep_for_the_test(ready: int) -> None:
    os.write(ready, b"r")  # from this frame, so a dump always names it
    time.sleep(60)


def _child_main(hooks: Hooks, stderr: Path, ready: int, inherited_faulthandler: bool) -> None:
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))  # dying of SIGABRT leaves no core file
    fd = os.open(stderr, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    os.dup2(fd, 2)
    os.close(fd)
    sys.stderr = open(2, "w", buffering=1, closefd=False)  # noqa: SIM115 (the child's, for good)
    logger = logging.getLogger("prefork")
    logger.handlers = [logging.StreamHandler(sys.stderr)]
    logger.propagate = False
    logger.setLevel(logging.INFO)
    if inherited_faulthandler:
        faulthandler.enable(sys.stderr)  # as a master run with PYTHONFAULTHANDLER leaves it
    else:
        faulthandler.disable()
    info = WorkerInfo(7, 3, from_mapping({"app": "app:app"}), os.getpid())
    set_mask(signal.SIG_BLOCK, (signal.SIGINT, signal.SIGQUIT, signal.SIGABRT))
    exit_on_signals(hooks, info)
    set_mask(signal.SIG_SETMASK, ())
    stuck_in_sleep_for_the_test(ready)


@pytest.fixture
def fork_worker(tmp_path: Path) -> Iterator[Fork]:
    """fork_worker(HooksConfig(...), inherited_faulthandler=...) -> a ready Child; every
    child is killed (if still there) and reaped at teardown."""
    children: list[Child] = []

    def fork(hooks: HooksConfig, *, inherited_faulthandler: bool = True) -> Child:
        loaded = Hooks(hooks)
        stderr = tmp_path / f"child{len(children)}.stderr"
        read_end, write_end = os.pipe()
        pid = os.fork()
        if pid == 0:
            code = 99  # the sleep ended: no signal arrived
            try:
                os.close(read_end)
                _child_main(loaded, stderr, write_end, inherited_faulthandler)
            except BaseException:
                traceback.print_exc()
                code = 98
            finally:
                os._exit(code)
        os.close(write_end)
        child = Child(pid, stderr)
        children.append(child)
        try:
            readable, _, _ = select.select([read_end], [], [], WAIT)
            assert readable and os.read(read_end, 1) == b"r", (
                f"child {pid} did not get ready:\n{child.output()}"
            )
        finally:
            os.close(read_end)
        return child

    try:
        yield fork
    finally:
        for child in children:
            child.reap()


def hook_lines(child: Child) -> list[str]:
    return [line for line in child.output().splitlines() if line.startswith("HOOK ")]


def exited(status: int, code: int) -> bool:
    return os.WIFEXITED(status) and os.WEXITSTATUS(status) == code


def killed_by(status: int, sig: int) -> bool:
    return os.WIFSIGNALED(status) and os.WTERMSIG(status) == sig


# --- worker_int ------------------------------------------------------------------------------


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGQUIT])
def test_int_and_quit_run_worker_int_with_the_worker_then_exit_0_at_once(
    fork_worker: Fork, hook_module: str, sig: int
) -> None:
    child = fork_worker(HooksConfig(worker_int=f"{hook_module}:worker_int"))
    child.kill(sig)
    assert exited(child.wait(), 0), child.output()
    assert hook_lines(child) == [f"HOOK worker_int 7 3 {child.pid}"]


def test_without_worker_int_int_still_exits_0_at_once(
    fork_worker: Fork, hook_module: str
) -> None:
    child = fork_worker(HooksConfig(worker_abort=f"{hook_module}:worker_abort"))
    child.kill(signal.SIGQUIT)
    assert exited(child.wait(), 0), child.output()
    assert hook_lines(child) == []


def test_a_failing_worker_int_is_logged_and_the_worker_exits_0_all_the_same(
    fork_worker: Fork, hook_module: str
) -> None:
    child = fork_worker(HooksConfig(worker_int=f"{hook_module}:explode"))
    child.kill(signal.SIGINT)
    assert exited(child.wait(), 0), child.output()
    output = child.output()
    assert hook_lines(child) == [f"HOOK explode 7 3 {child.pid}"]
    assert f"hook worker_int ({hook_module}:explode) failed" in output
    assert "ValueError: deliberate failure in a signal hook" in output


def test_a_worker_int_that_raises_system_exit_still_exits_0(
    fork_worker: Fork, hook_module: str
) -> None:
    child = fork_worker(HooksConfig(worker_int=f"{hook_module}:leave"))
    child.kill(signal.SIGQUIT)
    assert exited(child.wait(), 0), child.output()
    assert hook_lines(child) == [f"HOOK leave 7 3 {child.pid}"]


def test_signals_arriving_while_worker_int_runs_do_not_run_a_hook_again(
    fork_worker: Fork, hook_module: str
) -> None:
    child = fork_worker(HooksConfig(
        worker_int=f"{hook_module}:resignal", worker_abort=f"{hook_module}:worker_abort"
    ))
    child.kill(signal.SIGINT)
    assert exited(child.wait(), 0), child.output()
    assert hook_lines(child) == [f"HOOK resignal 7 3 {child.pid}"]


# --- worker_abort ----------------------------------------------------------------------------


def assert_stack_dump(output: str) -> int:
    """faulthandler's dump is there and names where the child was stuck (returned: the offset
    of that frame's line)."""
    assert "Fatal Python error: Aborted" in output, output
    where = output.find("in stuck_in_sleep_for_the_test")
    assert where >= 0, output
    return where


@pytest.mark.parametrize("inherited_faulthandler", [True, False])
def test_abort_dumps_every_stack_then_runs_worker_abort_then_dies_of_sigabrt(
    fork_worker: Fork, hook_module: str, inherited_faulthandler: bool
) -> None:
    child = fork_worker(
        HooksConfig(worker_abort=f"{hook_module}:worker_abort"),
        inherited_faulthandler=inherited_faulthandler,
    )
    child.kill(signal.SIGABRT)
    assert killed_by(child.wait(), signal.SIGABRT), child.output()
    output = child.output()
    stuck_frame = assert_stack_dump(output)
    assert hook_lines(child) == [f"HOOK worker_abort 7 3 {child.pid}"]
    assert output.index("HOOK worker_abort") > stuck_frame  # the stacks first
    assert output.count("Fatal Python error") == 1


@pytest.mark.parametrize("inherited_faulthandler", [True, False])
def test_without_worker_abort_abort_dumps_and_dies_as_before(
    fork_worker: Fork, hook_module: str, inherited_faulthandler: bool
) -> None:
    child = fork_worker(
        HooksConfig(worker_int=f"{hook_module}:worker_int"),
        inherited_faulthandler=inherited_faulthandler,
    )
    child.kill(signal.SIGABRT)
    assert killed_by(child.wait(), signal.SIGABRT), child.output()
    assert_stack_dump(child.output())
    assert hook_lines(child) == []


def test_a_failing_worker_abort_is_logged_and_the_worker_dies_of_sigabrt_all_the_same(
    fork_worker: Fork, hook_module: str
) -> None:
    child = fork_worker(HooksConfig(worker_abort=f"{hook_module}:explode"))
    child.kill(signal.SIGABRT)
    assert killed_by(child.wait(), signal.SIGABRT), child.output()
    output = child.output()
    assert_stack_dump(output)
    assert hook_lines(child) == [f"HOOK explode 7 3 {child.pid}"]
    assert f"hook worker_abort ({hook_module}:explode) failed" in output
    assert "ValueError: deliberate failure in a signal hook" in output


def test_signals_arriving_while_worker_abort_runs_do_not_run_a_hook_again(
    fork_worker: Fork, hook_module: str
) -> None:
    child = fork_worker(HooksConfig(
        worker_int=f"{hook_module}:worker_int", worker_abort=f"{hook_module}:resignal"
    ))
    child.kill(signal.SIGABRT)
    assert killed_by(child.wait(), signal.SIGABRT), child.output()
    assert hook_lines(child) == [f"HOOK resignal 7 3 {child.pid}"]
    assert child.output().count("Fatal Python error") == 1
