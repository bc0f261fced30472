"""The `preforkd` command line: configuration errors, `preforkd check`, and overrides.

Short-lived commands run through `run_cli` with a deadline; servers through `server_factory`.
"""

from __future__ import annotations

import os
import socket
import subprocess
import textwrap
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

from harness import DEFAULT_COMMAND, REPO_ROOT, ServerFactory, fetch, settings, write_config


def run_cli(
    args: Sequence[str], cwd: Path, timeout: float = 20
) -> subprocess.CompletedProcess[str]:
    """Run `python -m prefork ARGS` from the work tree; fail if it runs past `timeout`."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    try:
        return subprocess.run(
            [*DEFAULT_COMMAND, *args],
            cwd=cwd,
            env=env,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
            start_new_session=True,
        )
    except subprocess.TimeoutExpired as exc:
        raise AssertionError(f"preforkd {' '.join(args)} still running after {timeout}s:\n"
                             f"{exc.stdout!r}\n{exc.stderr!r}") from None


@pytest.fixture
def busy_port() -> Iterator[int]:
    """A 127.0.0.1 port this test holds open (listening), so preforkd cannot bind it."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(1)
        yield sock.getsockname()[1]


# --- configuration errors ------------------------------------------------------------------

def head(socket_path: Path) -> str:
    """The first two lines of every bad config: a valid app, and a bind we can look for."""
    return f"app: pf_testapp:app\nbind: ['unix:{socket_path}']\n"


@pytest.mark.parametrize(
    ("body", "where", "message"),
    [
        pytest.param(
            "workers:\n  count: 2\n  max_request: 3\n",
            "5: workers.max_request:",
            "unknown key 'max_request' (did you mean 'max_requests'?)",
            id="unknown-key-did-you-mean",
        ),
        pytest.param(
            "loging:\n  level: info\n",
            "3: loging:",
            "unknown key 'loging' (did you mean 'logging'?)",
            id="unknown-top-level-key",
        ),
        pytest.param(
            "workers:\n  count: two\n",
            "4: workers.count:",
            "must be an integer from 1 to 1024, got 'two'",
            id="wrong-type",
        ),
        pytest.param(
            "http:\n  keepalive_timeout: 5\n  max_request_line: 10\n",
            "5: http.max_request_line:",
            "must be from 64 to 1048576, got 10",
            id="out-of-range",
        ),
    ],
)
def test_config_error_names_file_line_and_key(
    tmp_path: Path, short_tmp: Path, body: str, where: str, message: str
) -> None:
    socket_path = short_tmp / "never.sock"
    config = tmp_path / "bad.yaml"
    config.write_text(head(socket_path) + body)
    result = run_cli(["-c", str(config)], tmp_path)
    assert result.returncode == 2, result.stderr
    assert f"preforkd: configuration error: {config}:{where} {message}" in result.stderr
    assert "listening" not in result.stderr + result.stdout
    assert not socket_path.exists(), "nothing may be bound on a configuration error"


@pytest.mark.parametrize(
    ("app", "reason"),
    [
        ("pf_testapp:app:extra", "cannot parse"),
        ("1bad:app", "must be 'module', 'module:callable' or 'module:factory(...)'"),
        ("pf_testapp:make(open('/etc/passwd'))", "factory arguments must be literals"),
    ],
)
def test_bad_app_reference_is_a_config_error(tmp_path: Path, app: str, reason: str) -> None:
    config = tmp_path / "bad.yaml"
    config.write_text(f'bind: ["127.0.0.1:0"]\napp: "{app}"\n')
    result = run_cli(["-c", str(config)], tmp_path)
    assert result.returncode == 2, result.stderr
    assert f"preforkd: configuration error: {config}:2: app: " in result.stderr
    assert reason in result.stderr
    assert "listening" not in result.stderr + result.stdout


# --- preforkd check -----------------------------------------------------------------------


def test_check_success(tmp_path: Path) -> None:
    config = write_config(tmp_path, settings())
    result = run_cli(["check", "-c", str(config)], tmp_path)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == f"configuration OK: {config}"
    assert "application OK: pf_testapp:app" in lines
    assert any(line.startswith("can bind http://127.0.0.1:") for line in lines), lines
    assert "listening" not in result.stderr


def test_check_imports_the_app_with_the_configured_env(tmp_path: Path) -> None:
    """Defect: the app was imported without `env:`, so an app that reads its settings at
    import (DJANGO_SETTINGS_MODULE) failed `check` yet served fine."""
    (tmp_path / "pf_env_app.py").write_text(
        "import os\nSETTING = os.environ['PF_CHECK_SETTING']\n"
        "def app(environ, start_response):\n    return []\n"
    )
    config = write_config(tmp_path, {"app": "pf_env_app:app", "env": {"PF_CHECK_SETTING": "x"}})
    result = run_cli(["check", "-c", str(config)], tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "application OK: pf_env_app:app" in result.stdout


def test_check_against_the_running_server_does_not_fail_on_its_addresses(
    server_factory: ServerFactory, tmp_path: Path
) -> None:
    """Defect: `check` before a reload failed with "Address already in use": it test-bound
    the addresses the running server holds."""
    pidfile = tmp_path / "check.pid"
    server = server_factory(settings(pidfile=str(pidfile)))
    result = run_cli(["check", "-c", str(server.config)], tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"not test-binding: preforkd runs as pid {server.pid}" in result.stdout


def test_check_reports_a_config_error_with_status_2(tmp_path: Path) -> None:
    config = write_config(tmp_path, settings(workers={"count": 0}))
    result = run_cli(["check", "-c", str(config)], tmp_path)
    assert result.returncode == 2
    assert "workers.count: must be from 1 to 1024, got 0" in result.stderr
    assert "configuration OK" not in result.stdout


def test_check_app_import_failure_exits_3(tmp_path: Path) -> None:
    config = write_config(tmp_path, settings(app="pf_broken_app:app"))
    result = run_cli(["check", "-c", str(config)], tmp_path)
    assert result.returncode == 3, result.stdout + result.stderr
    assert "pf_broken_app refuses to import" in result.stderr
    assert "application OK" not in result.stdout
    assert "can bind" not in result.stdout


def test_check_bind_failure_exits_1(tmp_path: Path, busy_port: int) -> None:
    config = write_config(tmp_path, settings(bind=[f"127.0.0.1:{busy_port}"]))
    result = run_cli(["check", "-c", str(config)], tmp_path)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "application OK: pf_testapp:app" in result.stdout
    assert "cannot bind" in result.stderr
    assert str(busy_port) in result.stderr


def test_run_exits_1_when_the_address_is_in_use(
    server_factory: ServerFactory, busy_port: int
) -> None:
    server = server_factory(settings(bind=[f"127.0.0.1:{busy_port}"]), wait_ready=False)
    assert server.wait_exit(15) == 1
    log = server.log()
    assert "cannot bind" in log
    assert str(busy_port) in log
    assert "listening" not in log
    assert "booted" not in log


# --- command-line overrides ---------------------------------------------------------------


def test_workers_override(server_factory: ServerFactory) -> None:
    server = server_factory(settings(workers={"count": 1}), args=["--workers", "3"])
    assert "ready: 3 workers" in server.log()
    assert len(server.worker_pids()) == 3
    assert fetch(server.addresses()[0]).status == 200


def test_bind_override_replaces_the_files_list(
    server_factory: ServerFactory, short_tmp: Path
) -> None:
    file_socket = short_tmp / "from-file.sock"
    cli_socket = short_tmp / "from-cli.sock"
    server = server_factory(
        settings(bind=[f"unix:{file_socket}"]),
        args=["--bind", f"unix:{cli_socket}", "--bind", "127.0.0.1:0"],
    )
    addresses = server.addresses()
    assert len(addresses) == 2, addresses
    assert addresses[0] == ("unix", str(cli_socket))
    assert addresses[1][:2] == ("http", "127.0.0.1")
    assert not file_socket.exists()
    for where in addresses:
        assert fetch(where).status == 200


def test_config_error_text_is_exact_for_a_nested_key(tmp_path: Path) -> None:
    config = tmp_path / "nested.yaml"
    config.write_text(textwrap.dedent("""\
        app: pf_testapp:app
        bind: ["127.0.0.1:0"]
        logging:
          level: info
          acess_log: access.log
        """))
    result = run_cli(["-c", str(config)], tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip() == (
        f"preforkd: configuration error: {config}:5: logging.acess_log: "
        "unknown key 'acess_log' (did you mean 'access_log'?)"
    )
