"""The `preforkd` command line: configuration errors, `preforkd check`, and overrides.

Short-lived commands run through `run_cli` with a deadline; servers through `server_factory`.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import textwrap
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest
import yaml

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


def test_config_prints_every_setting_as_a_file_that_serves_the_same(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """gunicorn's --print-config: the file, the flags and WEB_CONCURRENCY, merged; the
    printed file, given back to preforkd, checks out the same."""
    config = write_config(tmp_path, settings(http={"max_body_size": 1000}))
    monkeypatch.setenv("WEB_CONCURRENCY", "5")
    result = run_cli(["config", "-c", str(config), "--set", "workers.max_requests=7",
                      "-e", "PF_X=1"], tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"# preforkd: the settings as the server runs them ({config}")
    printed = yaml.safe_load(result.stdout)
    assert printed["workers"]["count"] == 5 and printed["workers"]["max_requests"] == 7
    assert printed["http"]["max_body_size"] == 1000 and printed["env"] == {"PF_X": "1"}
    assert printed["app"] == "pf_testapp:app" and printed["workers"]["timeout"] == 30.0

    again = tmp_path / "printed.yaml"
    again.write_text(result.stdout)
    monkeypatch.delenv("WEB_CONCURRENCY")
    second = run_cli(["config", "-c", str(again)], tmp_path)
    assert second.returncode == 0, second.stderr
    assert yaml.safe_load(second.stdout) == printed
    assert run_cli(["check", "-c", str(again)], tmp_path).returncode == 0


def test_config_with_an_invalid_file_is_a_configuration_error(tmp_path: Path) -> None:
    config = tmp_path / "bad.yaml"
    config.write_text("app: pf_testapp:app\nworkers: {count: 0}\n")
    result = run_cli(["config", "-c", str(config)], tmp_path)
    assert (result.returncode, result.stdout) == (2, "")
    assert result.stderr == (
        f"preforkd: configuration error: {config}:2: workers.count: must be from 1 to 1024, "
        "got 0\n"
    )


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


ENV_APP = """
import os
def app(environ, start_response):
    body = os.environ.get("PF_CLI_ENV", "unset").encode()
    start_response("200 OK", [("Content-Length", str(len(body)))])
    return [body]
"""


def test_set_and_env_options_apply_and_survive_a_reload(server_factory: ServerFactory) -> None:
    server = server_factory(
        settings(app="app:app", http={"server_header": "from-file"}),
        app_source=ENV_APP,
        args=["--set", "http.server_header=from-cli", "-e", "PF_CLI_ENV=yes",
              "--set", "workers.count=3"],
    )
    assert "ready: 3 workers" in server.log()
    response = fetch(server.addresses()[0])
    assert (response.header("Server"), response.body) == ("from-cli", b"yes")

    since = len(server.log())
    server.signal(signal.SIGHUP)  # the file is read again, under the same command line
    server.wait_for_log("reloaded: generation 2 serving with 3 workers", since=since,
                        timeout=20)
    response = fetch(server.addresses()[0])
    assert (response.header("Server"), response.body) == ("from-cli", b"yes")


def test_a_bad_set_stops_the_start_naming_it(tmp_path: Path) -> None:
    config = write_config(tmp_path, settings())
    result = run_cli(["-c", str(config), "--set", "http.max_body_size=lots"], tmp_path)
    assert result.returncode == 2
    assert result.stderr.startswith(
        "preforkd: configuration error: command line: http.max_body_size: "
    ), result.stderr


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


# --- preforkd check: hooks and the status endpoint -----------------------------------------


def test_check_imports_the_hooks(tmp_path: Path) -> None:
    """Defect: `check` never imported `hooks:`, so it said OK for a file whose hook could
    not be imported, and the start then failed (exit 1, before binding). `check` now exits
    as that start would, and still imports the app, so one run names every broken import."""
    config = write_config(tmp_path, settings(hooks={"when_ready": "pf_hooks:no_such_function"}))
    result = run_cli(["check", "-c", str(config)], tmp_path)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "preforkd: hooks.when_ready: cannot load 'pf_hooks:no_such_function'" in result.stderr
    assert "application OK: pf_testapp:app" in result.stdout
    assert "can bind" not in result.stdout

    start = run_cli(["-c", str(config)], tmp_path)
    assert start.returncode == result.returncode, start.stderr


def test_check_imports_the_hooks_with_the_configured_env(tmp_path: Path) -> None:
    """Hook modules are imported in the master after `env:` is applied; `check` must import
    them the same way (a hook module reading its settings at import is not broken)."""
    (tmp_path / "pf_env_hooks.py").write_text(
        "import os\nSETTING = os.environ['PF_CHECK_HOOK_SETTING']\n"
        "def on_starting(server):\n    pass\n"
    )
    config = write_config(tmp_path, settings(
        hooks={"on_starting": "pf_env_hooks:on_starting"},
        env={"PF_CHECK_HOOK_SETTING": "x"},
        pythonpath=[str(tmp_path), *settings()["pythonpath"]],
    ))
    result = run_cli(["check", "-c", str(config)], tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "hooks OK: on_starting" in result.stdout


def test_a_broken_app_and_a_broken_hook_both_reported_status_of_the_hook(tmp_path: Path) -> None:
    config = write_config(tmp_path, settings(
        app="pf_broken_app:app", hooks={"on_exit": "pf_no_such_hooks_module:on_exit"}
    ))
    result = run_cli(["check", "-c", str(config)], tmp_path)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "hooks.on_exit: cannot load 'pf_no_such_hooks_module:on_exit'" in result.stderr
    assert "pf_broken_app refuses to import" in result.stderr


def test_check_test_opens_the_status_endpoint_and_removes_its_socket(
    tmp_path: Path, short_tmp: Path
) -> None:
    pidfile = short_tmp / "check.pid"
    config = write_config(tmp_path, settings(pidfile=str(pidfile)))
    result = run_cli(["check", "-c", str(config)], tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"can open the status endpoint at {pidfile}.sock" in result.stdout
    assert not Path(f"{pidfile}.sock").exists(), "check left the status socket behind"
    assert not pidfile.exists()


def test_check_reports_a_status_endpoint_port_in_use(tmp_path: Path, busy_port: int) -> None:
    """Defect: `check` never opened `admin.bind`, so it said OK and the start failed."""
    config = write_config(tmp_path, settings(admin={"bind": f"127.0.0.1:{busy_port}"}))
    result = run_cli(["check", "-c", str(config)], tmp_path)
    assert result.returncode == 1, result.stdout + result.stderr
    assert f"preforkd: cannot open the status endpoint 127.0.0.1:{busy_port}:" in result.stderr
    assert "can bind http://127.0.0.1:" in result.stdout  # the addresses themselves were fine


def test_a_status_socket_path_too_long_is_a_config_error(tmp_path: Path) -> None:
    """Defect: PIDFILE.sock in a deep directory (over 107 bytes) passed `check` and failed
    the start with "cannot open the status socket ...: None" (the error has no strerror).
    It is now refused at load, with the file, line and key, before anything starts."""
    deep = tmp_path / ("d" * max(1, 120 - len(str(tmp_path))))
    deep.mkdir()
    pidfile = deep / "p.pid"
    socket_path = f"{pidfile}.sock"
    size = len(os.fsencode(socket_path))
    assert size > 107
    config = write_config(tmp_path, settings(pidfile=str(pidfile)))
    line = next(
        n for n, text in enumerate(config.read_text().splitlines(), 1)
        if text.startswith("pidfile:")
    )
    reason = (
        f"{config}:{line}: pidfile: the status socket beside it, {socket_path}, would be too "
        f"long for a unix socket ({size} bytes, at most 107): set admin.socket to a shorter path"
    )
    for command in (["check", "-c", str(config)], ["-c", str(config)]):
        result = run_cli(command, tmp_path)
        assert result.returncode == 2, result.stdout + result.stderr
        assert reason in result.stderr
        assert not pidfile.exists()

    config = write_config(tmp_path, settings(admin={"socket": str(deep / "status.sock")}))
    line = next(
        n for n, text in enumerate(config.read_text().splitlines(), 1)
        if text.strip().startswith("socket:")
    )
    result = run_cli(["check", "-c", str(config)], tmp_path)
    assert result.returncode == 2, result.stdout + result.stderr
    assert f"{config}:{line}: admin.socket: unix socket path is too long (" in result.stderr


def test_check_leaves_a_running_servers_status_endpoint_alone(
    server_factory: ServerFactory, tmp_path: Path, short_tmp: Path
) -> None:
    pidfile = short_tmp / "check.pid"
    server = server_factory(settings(pidfile=str(pidfile)))
    result = run_cli(["check", "-c", str(server.config)], tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"not test-opening the status endpoint: pid {server.pid} holds it" in result.stdout
    assert fetch(f"{pidfile}.sock", target="/live").status == 200


# --- preforkd status ---------------------------------------------------------------------------


def test_status_of_a_stopped_server_says_it_is_not_running(
    tmp_path: Path, short_tmp: Path
) -> None:
    """Defect: with the server stopped, `status` said only "cannot read the status: [Errno 2]
    No such file or directory", not that the server is not running, nor where it looked."""
    pidfile = short_tmp / "stopped.pid"
    config = write_config(tmp_path, settings(pidfile=str(pidfile)))
    result = run_cli(["status", "-c", str(config)], tmp_path)
    assert result.returncode == 1, result.stdout + result.stderr
    assert f"preforkd: not running (no live pid in {pidfile})" in result.stderr
    assert f"{pidfile}.sock" in result.stderr


def test_status_and_reload_without_a_pidfile_are_configuration_errors(tmp_path: Path) -> None:
    """Defect: without a pidfile `status` exited 1 and `reload` 2 for the same missing
    setting; both are configuration errors (2) and name the setting."""
    config = write_config(tmp_path, settings())
    status = run_cli(["status", "-c", str(config)], tmp_path)
    reload = run_cli(["reload", "-c", str(config)], tmp_path)
    assert (status.returncode, reload.returncode) == (2, 2), status.stderr + reload.stderr
    assert "status needs `pidfile`" in status.stderr
    assert "reload needs `pidfile`" in reload.stderr


def test_status_with_only_a_pidfile_on_the_command_line(
    server_factory: ServerFactory, tmp_path: Path, short_tmp: Path
) -> None:
    """Defect: `status -p PIDFILE` failed with "app: required setting is missing"."""
    pidfile = short_tmp / "status.pid"
    server = server_factory(settings(pidfile=str(pidfile)))
    result = run_cli(["status", "-p", str(pidfile)], tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"master pid {server.pid}" in result.stdout
    assert result.stderr == ""

    as_json = run_cli(["status", "--json", "-p", str(pidfile)], tmp_path)
    assert as_json.returncode == 0, as_json.stderr
    assert json.loads(as_json.stdout)["master"]["pid"] == server.pid


@pytest.mark.parametrize(
    ("edit", "error"),
    [
        ("workers: [unclosed\n", "invalid YAML"),
        ("workers:\n  count: 0\n", "workers.count: must be from 1 to 1024, got 0"),
    ],
    ids=["yaml-syntax", "invalid-value"],
)
def test_status_still_works_after_a_bad_edit_and_says_the_file_has_errors(
    server_factory: ServerFactory, tmp_path: Path, short_tmp: Path, edit: str, error: str
) -> None:
    """Defect: `status` validated the whole file, so after a bad edit the operator could not
    even see the running server's status. It now warns in one line and reads only
    `pidfile` and `admin` from the file."""
    pidfile = short_tmp / "status.pid"
    server = server_factory(settings(pidfile=str(pidfile)))
    server.config.write_text(server.config.read_text() + edit)

    result = run_cli(["status", "-c", str(server.config)], tmp_path)

    assert result.returncode == 0, result.stdout + result.stderr
    assert f"master pid {server.pid}" in result.stdout
    warning = result.stderr.splitlines()
    assert len(warning) == 1, warning
    assert warning[0].startswith("preforkd: warning: the configuration has errors")
    assert str(server.config) in warning[0]
    assert error in warning[0]


# --- preforkd reload ---------------------------------------------------------------------------


def test_reload_with_an_invalid_file_says_nothing_was_sent(
    server_factory: ServerFactory, tmp_path: Path, short_tmp: Path
) -> None:
    """Defect: `reload` with a bad file printed only the configuration error, leaving the
    operator to guess whether the server was signalled; it exits 2 (not the 0 or 1 the
    README promised)."""
    pidfile = short_tmp / "reload.pid"
    server = server_factory(settings(pidfile=str(pidfile)))
    server.config.write_text(server.config.read_text() + "workers: [unclosed\n")

    result = run_cli(["reload", "-c", str(server.config), "--wait", "30"], tmp_path)

    assert result.returncode == 2, result.stdout + result.stderr
    assert "preforkd: configuration error: " in result.stderr
    assert "preforkd: reload: nothing was sent to the server" in result.stderr
    assert f"preforkd (pid {server.pid}) keeps serving as it was" in result.stderr
    assert "HUP" not in server.log()
    assert fetch(server.addresses()[0]).status == 200


def test_reload_warns_when_the_server_reads_another_file(
    server_factory: ServerFactory, tmp_path: Path, short_tmp: Path
) -> None:
    """Defect: `reload -c B` validated B and signalled a master started with `-c A`, which
    re-reads A: what was checked was not what was applied, and nothing said so."""
    pidfile = short_tmp / "reload.pid"
    server = server_factory(settings(pidfile=str(pidfile)))
    other = tmp_path / "elsewhere" / "copy.yaml"
    other.parent.mkdir()
    other.write_text(server.config.read_text())

    result = run_cli(["reload", "-c", str(other), "--wait", "30"], tmp_path)

    assert result.returncode == 0, result.stdout + result.stderr
    assert (f"preforkd: warning: this command read {other}, but the server (pid {server.pid}) "
            f"reads {server.config} again at a reload") in result.stderr
    assert "reloaded: generation 2" in result.stdout

    same = run_cli(["reload", "-c", str(server.config), "--wait", "30"], tmp_path)
    assert same.returncode == 0, same.stdout + same.stderr
    assert "warning" not in same.stderr


# --- a failed foreground start says why on the terminal -----------------------------------


@pytest.mark.parametrize(
    ("more", "code", "line"),
    [
        pytest.param(
            {"app": "pf_broken_app:app"}, 3,
            "preforkd: the application could not be loaded: cannot import 'pf_broken_app': "
            "RuntimeError('pf_broken_app refuses to import')",
            id="workers-cannot-import-the-app",
        ),
        pytest.param(
            {"app": "pf_broken_app:app", "preload_app": True}, 3,
            "preforkd: cannot import 'pf_broken_app': "
            "RuntimeError('pf_broken_app refuses to import')",
            id="preload",
        ),
        pytest.param(
            {"app": "pf_testapp:app", "hooks": {"post_fork": "pf_hooks:failing_post_fork"}}, 1,
            "preforkd: a worker cannot start: ",
            id="workers-cannot-boot",
        ),
    ],
)
def test_a_failed_start_logging_to_a_file_says_why_on_the_terminal(
    server_factory: ServerFactory, tmp_path: Path, more: dict[str, object], code: int, line: str
) -> None:
    """Defect: in the foreground with `logging.error_log: FILE`, an app the workers could
    not import (or workers that could not boot) stopped the server with exit 3 (or 1) and
    nothing at all on the terminal: the reason was only in the log file."""
    error_log = tmp_path / "error.log"
    server = server_factory(
        {**settings(logging={"error_log": str(error_log)}), **more},
        wait_ready=False,
    )
    assert server.wait_exit(30) == code
    terminal = server.log().splitlines()
    assert len(terminal) == 1, terminal
    assert terminal[0].startswith(line), terminal
    assert "[ERROR]" in error_log.read_text()  # the log file has it all, as before


def test_a_failed_start_logging_to_the_terminal_says_it_once(server_factory: ServerFactory) -> None:
    server = server_factory(settings("pf_broken_app:app"), wait_ready=False)
    assert server.wait_exit(30) == 3
    log = server.log()
    assert "the application could not be loaded" in log
    assert not [line for line in log.splitlines() if line.startswith("preforkd: ")], log
