"""`preforkd stop`, the positional app, `reload -p` with no file, WEB_CONCURRENCY and a stdout
whose reader leaves early, against real servers.

Short-lived commands run through detached.preforkd (bounded); servers through server_factory,
which stops them by pid (SIGTERM, then SIGKILL to the group) whatever the test did.
"""

from __future__ import annotations

import json
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from detached import preforkd, preforkd_env
from harness import (
    APPS,
    DEFAULT_COMMAND,
    READY_RE,
    Server,
    ServerFactory,
    connect,
    fetch,
    gone,
    http_request,
    read_response,
    settings,
    wait_until,
    write_config,
)
from prefork.pidfile import process_identity, read_pid, status_path

# --- preforkd stop ------------------------------------------------------------------------------


def pidfile_server(server_factory: ServerFactory, short_tmp: Path, **more: object) -> Server:
    return server_factory(settings(pidfile=str(short_tmp / "app.pid"), **more))


def test_stop_with_the_config_file_waits_until_the_master_has_exited(
    server_factory: ServerFactory, short_tmp: Path
) -> None:
    """A request in flight when stop is run: stop returns only once the master has exited,
    which is after that request was answered (a graceful stop)."""
    server = pidfile_server(server_factory, short_tmp)
    with connect(server.addresses()[0], timeout=15) as sock:
        sock.sendall(http_request(target="/sleep?s=1.5&tag=inflight"))
        server.wait_for_log("pf_testapp: sleeping inflight")

        result = preforkd("stop", "-c", str(server.config), "--wait", "30")

        assert gone(server.pid), "stop returned while the master still ran"
        assert result.returncode == 0, result.stdout + result.stderr
        assert result.stdout == f"preforkd: stopped (pid {server.pid})\n"
        assert result.stderr == ""
        assert read_response(sock).status == 200  # the request in flight was finished
    assert server.wait_exit(5) == 0
    assert not (short_tmp / "app.pid").exists()


def test_stop_with_only_the_pidfile(
    server_factory: ServerFactory, short_tmp: Path, tmp_path: Path
) -> None:
    server = pidfile_server(server_factory, short_tmp)
    result = subprocess.run(  # from a directory with no configuration, and no app given
        [*DEFAULT_COMMAND, "stop", "-p", str(short_tmp / "app.pid"), "--wait", "30"],
        cwd=tmp_path, env=preforkd_env(), stdin=subprocess.DEVNULL, capture_output=True,
        text=True, timeout=40,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"stopped (pid {server.pid})" in result.stdout
    assert server.wait_exit(5) == 0


def test_stop_with_a_file_that_no_longer_validates(
    server_factory: ServerFactory, short_tmp: Path
) -> None:
    server = pidfile_server(server_factory, short_tmp)
    server.config.write_text(server.config.read_text() + "workers: [unclosed\n")
    result = preforkd("stop", "-c", str(server.config), "--wait", "30")
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stderr.startswith("preforkd: warning: the configuration has errors")
    assert server.wait_exit(5) == 0


def test_stop_that_outlives_its_deadline_says_so_and_leaves_the_server(
    server_factory: ServerFactory, short_tmp: Path
) -> None:
    server = pidfile_server(server_factory, short_tmp, workers={"graceful_timeout": 60})
    with connect(server.addresses()[0], timeout=15) as sock:
        sock.sendall(http_request(target="/sleep?s=10&tag=long"))
        server.wait_for_log("pf_testapp: sleeping long")

        result = preforkd("stop", "-p", str(short_tmp / "app.pid"), "--wait", "0.5")

        assert result.returncode == 1, result.stdout + result.stderr
        assert f"preforkd: still running (pid {server.pid}) 0.5s after TERM" in result.stderr
        assert server.running(), "no KILL without --force"

        forced = preforkd("stop", "-p", str(short_tmp / "app.pid"), "--wait", "0.5", "--force")

        assert forced.returncode == 0, forced.stdout + forced.stderr
        assert f"preforkd: killed (pid {server.pid})" in forced.stderr
        assert server.wait_exit(5) == -9


def test_stop_of_a_stopped_server_says_it_is_not_running(short_tmp: Path) -> None:
    result = preforkd("stop", "-p", str(short_tmp / "app.pid"))
    assert result.returncode == 2, result.stdout + result.stderr
    assert result.stderr == (
        f"preforkd: not running (no pid in {short_tmp / 'app.pid'}); nothing to stop\n"
    )


@pytest.fixture(params=["sleep", "tail"])
def other_program(
    request: pytest.FixtureRequest, tmp_path: Path
) -> Iterator[subprocess.Popen[bytes]]:
    """A live process that is not preforkd, whose pid a stale pidfile could name: `sleep`,
    or a `tail -f` of a preforkd log (which names preforkd on its command line)."""
    log = tmp_path / "preforkd.log"
    log.write_text("")
    argv = ["sleep", "60"] if request.param == "sleep" else ["tail", "-f", str(log)]
    process = subprocess.Popen(argv, stdout=subprocess.DEVNULL)
    try:
        yield process
    finally:
        process.kill()
        process.wait(5)


def test_stop_of_a_stale_pidfile_does_not_signal_the_program_that_has_its_pid(
    other_program: subprocess.Popen[bytes], short_tmp: Path
) -> None:
    pidfile = short_tmp / "app.pid"
    pidfile.write_text(f"{other_program.pid}\n")  # Popen returns once it has exec'd

    result = preforkd("stop", "-p", str(pidfile), "--wait", "2")

    assert result.returncode == 2, result.stdout + result.stderr
    assert (f"preforkd: not running: pid {other_program.pid} (from {pidfile}) is not a "
            "preforkd master") in result.stderr
    assert "the pidfile is stale; nothing was sent" in result.stderr
    assert other_program.poll() is None, "the other program was signalled"


def test_reload_of_a_stale_pidfile_does_not_signal_the_program_that_has_its_pid(
    other_program: subprocess.Popen[bytes], short_tmp: Path
) -> None:
    """As for stop: a `tail -f` of a preforkd log names preforkd on its command line, and
    would have had a HUP (which ends tail) before reload asked for a master's title."""
    pidfile = short_tmp / "app.pid"
    pidfile.write_text(f"{other_program.pid}\n")

    result = preforkd("reload", "-p", str(pidfile), "--wait", "2")

    assert result.returncode == 1, result.stdout + result.stderr
    assert (f"preforkd: not running: pid {other_program.pid} (from {pidfile}) is not a "
            "preforkd master; the pidfile is stale; nothing was sent") in result.stderr
    assert other_program.poll() is None, "the other program was signalled"


def earlier_identity(pid: int, how: str) -> str:
    """A process identity (pidfile.process_identity) of `pid` that is not the live
    process's: the same pid in an earlier boot, or one that started before it."""
    identity = process_identity(pid)
    assert identity is not None
    boot, ticks = identity.split(":")
    if how == "earlier boot":
        return f"{uuid.uuid4()}:{ticks}"
    return f"{boot}:{int(ticks) - 1}"


def stale_pidfile_naming(pid: int, pidfile: Path, how: str) -> None:
    """A pidfile (and its status record) left by a master of pid `pid` that is gone: killed,
    or the machine rebooted, before it could remove them."""
    pidfile.write_text(f"{pid}\n")
    status = {"pid": pid, "serial": 0, "state": "ready", "been_ready": True,
              "identity": earlier_identity(pid, how)}
    Path(status_path(str(pidfile))).write_text(json.dumps(status))


@pytest.mark.parametrize("how", ["earlier boot", "earlier start"])
def test_stop_of_a_stale_pidfile_whose_pid_another_master_now_has_sends_nothing(
    server_factory: ServerFactory, short_tmp: Path, tmp_path: Path, how: str
) -> None:
    """Defect: a pidfile left behind (a reboot, a killed master) whose pid is now another
    preforkd master's (another service's; in a container, the same pid at every start):
    `stop` took that master for the pidfile's and stopped it. Its status record says which
    process wrote it, and that one started earlier."""
    other = pidfile_server(server_factory, short_tmp)
    stale = tmp_path / "gone.pid"
    stale_pidfile_naming(other.pid, stale, how)

    stopped = preforkd("stop", "-p", str(stale), "--wait", "5")
    reloaded = preforkd("reload", "-p", str(stale), "--wait", "5")

    assert stopped.returncode == 2, stopped.stdout + stopped.stderr
    assert reloaded.returncode == 1, reloaded.stdout + reloaded.stderr
    why = (f"preforkd: not running: pid {other.pid} (from {stale}) is a preforkd master, but "
           f"not the one that wrote the pidfile ({stale}.status names a process of that pid "
           "that started earlier), so the pidfile is stale; nothing ")
    assert stopped.stderr == why + "to stop\n"
    assert reloaded.stderr == why + "was sent\n"
    assert other.running()
    assert fetch(other.addresses()[0]).status == 200
    assert "reload" not in other.log().lower()


def test_a_start_replaces_a_stale_pidfile_whose_pid_another_master_now_has(
    server_factory: ServerFactory, short_tmp: Path
) -> None:
    """Defect: the same pidfile at a start was refused with "already running as pid N",
    N being the other service's master; the start now replaces it."""
    other = pidfile_server(server_factory, short_tmp)
    stale = short_tmp / "gone.pid"
    stale_pidfile_naming(other.pid, stale, "earlier start")

    server = server_factory(settings(pidfile=str(stale)))

    assert read_pid(str(stale)) == server.pid
    assert other.running()
    # its own record names it rightly: `stop` finds it
    assert json.loads(Path(f"{stale}.status").read_text())["identity"] == process_identity(
        server.pid
    )
    result = preforkd("stop", "-p", str(stale), "--wait", "30")
    assert result.returncode == 0, result.stdout + result.stderr
    assert server.wait_exit(5) == 0
    assert other.running()


# --- the positional app ----------------------------------------------------------------------


@pytest.mark.parametrize("words", [["pf_testapp:app"], ["run", "pf_testapp:app"]])
def test_the_app_as_a_positional_argument_serves(
    server_factory: ServerFactory, words: list[str]
) -> None:
    server = server_factory({"pythonpath": [str(APPS)]}, args=words)  # no `app:` in the file
    response = fetch(server.addresses()[0], target="/environ")
    assert response.status == 200
    assert b'"PATH_INFO": "/environ"' in response.body


def test_a_positional_app_and_another_app_flag_are_refused(tmp_path: Path) -> None:
    result = preforkd("pf_testapp:app", "--app", "pf_testapp:pid_app", "-b", "127.0.0.1:0")
    assert result.returncode == 2
    assert "the application is given twice: pf_testapp:app and --app pf_testapp:pid_app" in (
        result.stderr
    )
    assert "listening" not in result.stderr


# --- a stdout whose reader leaves early ------------------------------------------------------

# The reader closes the pipe (and says so in MARKER) before the command starts: every write
# then fails with EPIPE, deterministically. `head -1` in the other test may read everything.
CLOSED_READER = """
marker=$1; shift
{
  i=0
  while [ ! -e "$marker" ] && [ $i -lt 1000 ]; do sleep 0.01; i=$((i + 1)); done
  "$@"
  echo "exit status $?" >&2
} | { exec 0<&-; : > "$marker"; }
"""


def shell(script: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["sh", "-c", script, "sh", *args], env=preforkd_env(), stdin=subprocess.DEVNULL,
        capture_output=True, text=True, timeout=60,
    )


def test_status_piped_into_head_prints_its_first_line_and_no_traceback(
    server_factory: ServerFactory, short_tmp: Path
) -> None:
    server = pidfile_server(server_factory, short_tmp)
    result = shell('"$@" | head -1', *DEFAULT_COMMAND, "status", "-p", str(short_tmp / "app.pid"))
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("preforkd ") and f"master pid {server.pid}" in result.stdout
    assert result.stdout.count("\n") == 1
    assert result.stderr == ""


@pytest.mark.parametrize(
    "command",
    [["status"], ["status", "--json"], ["reload", "--wait", "30"], ["stop", "--wait", "30"]],
    ids=["status", "status-json", "reload", "stop"],
)
def test_a_reader_that_left_ends_the_command_quietly_with_its_own_status(
    server_factory: ServerFactory, short_tmp: Path, tmp_path: Path, command: list[str]
) -> None:
    """Defect: `preforkd status | head -1` could end in a BrokenPipeError traceback. Now
    nothing reaches stderr, and the exit status is the command's outcome: a stop still
    stops, and says so in its status."""
    server = pidfile_server(server_factory, short_tmp)
    marker = tmp_path / "reader-closed"
    result = shell(CLOSED_READER, str(marker), *DEFAULT_COMMAND, *command, "-p",
                   str(short_tmp / "app.pid"))
    assert marker.exists(), "the reader never closed the pipe"
    assert result.stderr == "exit status 0\n", result.stderr
    if command[0] == "stop":
        assert server.wait_exit(5) == 0


# --- reload -p with no configuration file ------------------------------------------------------


def test_reload_with_only_the_pidfile_reloads(
    server_factory: ServerFactory, short_tmp: Path, tmp_path: Path
) -> None:
    server = pidfile_server(server_factory, short_tmp)
    result = subprocess.run(
        [*DEFAULT_COMMAND, "reload", "-p", str(short_tmp / "app.pid"), "--wait", "30"],
        cwd=tmp_path, env=preforkd_env(), stdin=subprocess.DEVNULL, capture_output=True,
        text=True, timeout=40,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "preforkd: reloaded: generation 2" in result.stdout
    assert result.stderr == ""
    server.wait_for_log("generation 2")


def test_reload_with_only_the_pidfile_reports_the_masters_refusal(
    server_factory: ServerFactory, short_tmp: Path
) -> None:
    """Nothing is validated here: the master reads its file, refuses it and keeps serving,
    and the command reports that outcome."""
    server = pidfile_server(server_factory, short_tmp)
    server.config.write_text(server.config.read_text() + "workers: {count: 0}\n")
    result = preforkd("reload", "-p", str(short_tmp / "app.pid"), "--wait", "30")
    assert result.returncode == 1, result.stdout + result.stderr
    assert "workers.count: must be from 1 to 1024, got 0" in result.stderr
    assert fetch(server.addresses()[0]).status == 200


# --- WEB_CONCURRENCY ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("workers", "args", "expected"),
    [
        (None, [], 3),  # nothing else sets the count: WEB_CONCURRENCY does
        (1, [], 1),  # the file wins
        (None, ["-w", "2"], 2),  # the flag wins
    ],
    ids=["environment", "file", "flag"],
)
def test_web_concurrency_is_the_worker_count_unless_the_file_or_w_sets_it(
    server_factory: ServerFactory, workers: int | None, args: list[str], expected: int
) -> None:
    more = {} if workers is None else {"workers": {"count": workers}}
    server = server_factory(settings(**more), args=args, env={"WEB_CONCURRENCY": "3"})
    match = READY_RE.search(server.log())
    assert match is not None and int(match.group(1)) == expected, server.log_tail()
    wait_until(lambda: len(server.worker_pids()) == expected, 10.0,
               message=f"{expected} workers")


def test_a_bad_web_concurrency_is_a_configuration_error(tmp_path: Path) -> None:
    config = write_config(tmp_path, settings())
    result = preforkd("-c", str(config), env={"WEB_CONCURRENCY": "lots"})
    assert result.returncode == 2, result.stdout + result.stderr
    assert result.stderr == ("preforkd: configuration error: WEB_CONCURRENCY: must be an "
                             "integer from 1 to 1024, got 'lots'\n")

