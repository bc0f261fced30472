"""`preforkd status` and `reload` without a valid configuration, and the pieces they use: the
endpoint read from a file that does not validate, the -c of a running master's command
line, and unix socket paths too long to bind or connect to. No server runs here."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from prefork.admin import AdminServer, fetch, open_admin, reason
from prefork.cli import EXIT_CONFIG_ERROR, Endpoint, main, read_endpoint, show_status
from prefork.pidfile import config_argument

# --- the endpoint from a file that does not validate ------------------------------------------


def test_relative_paths_are_taken_from_the_files_directory(tmp_path: Path) -> None:
    """As load() resolves them: a relative `pidfile` or `admin.socket` is beside the file."""
    config = tmp_path / "conf" / "preforkd.yaml"
    config.parent.mkdir()
    config.write_text(
        "pidfile: run/app.pid\nadmin:\n  socket: admin.sock\n  bind: 127.0.0.1:18290\n"
        "workers: {count: 0}\n"  # invalid: the reason for reading the file this way
    )
    endpoint = read_endpoint(str(config), {})
    assert endpoint == Endpoint(
        str(tmp_path / "conf" / "run" / "app.pid"),
        str(tmp_path / "conf" / "admin.sock"),
        "127.0.0.1:18290",
    )
    assert endpoint.socket_path == str(tmp_path / "conf" / "admin.sock")


def test_the_settings_above_a_yaml_syntax_error_are_found(tmp_path: Path) -> None:
    """Defect: after a bad edit (here an unclosed list below `pidfile:`), `status` could not
    find the server at all. The file is read again up to the broken construct."""
    config = tmp_path / "preforkd.yaml"
    config.write_text("app: a:b\npidfile: /run/x.pid\nworkers: [unclosed\nbind: ['a']\n")
    assert read_endpoint(str(config), {}) == Endpoint("/run/x.pid")


def test_a_syntax_error_above_the_pidfile_leaves_nothing(tmp_path: Path) -> None:
    config = tmp_path / "preforkd.yaml"
    config.write_text("workers: [unclosed\npidfile: /run/x.pid\n")
    assert read_endpoint(str(config), {}) == Endpoint()


@pytest.mark.parametrize(
    "text",
    ["- a list\n", "just a scalar\n", "pidfile: 12\nadmin: [1]\n", "pidfile: ''\n", ""],
)
def test_what_is_not_a_path_is_ignored(tmp_path: Path, text: str) -> None:
    config = tmp_path / "preforkd.yaml"
    config.write_text(text)
    assert read_endpoint(str(config), {}) == Endpoint()


def test_the_command_lines_pidfile_wins_and_is_relative_to_the_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = tmp_path / "conf.yaml"
    config.write_text("pidfile: /run/file.pid\n")
    monkeypatch.chdir(tmp_path)
    assert read_endpoint(str(config), {"pidfile": "here.pid"}).pidfile == str(
        tmp_path / "here.pid"
    )
    assert read_endpoint(None, {"pidfile": "here.pid"}).pidfile == str(tmp_path / "here.pid")
    assert read_endpoint(str(tmp_path / "missing.yaml"), {}) == Endpoint()


# --- preforkd status, no server running -------------------------------------------------------


def test_status_without_any_endpoint_is_a_configuration_error(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Defect: exit 1 ("no status endpoint configured"), where `reload` exits 2 for the same
    missing setting; the message now names it."""
    assert show_status(Endpoint(), as_json=False) == EXIT_CONFIG_ERROR
    assert "status needs `pidfile` (or `admin.socket` or `admin.bind`)" in capsys.readouterr().err


def test_status_of_a_stopped_server_names_the_pidfile_and_the_socket(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Defect: "cannot read the status: [Errno 2] No such file or directory" did not say
    that the server is not running, nor which socket was tried."""
    pidfile = tmp_path / "x.pid"
    pidfile.write_text("999999999\n")  # no such process: a stale file
    assert show_status(Endpoint(str(pidfile)), as_json=False) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"preforkd: not running (no live pid in {pidfile})")
    assert f"tried the status endpoint {pidfile}.sock: No such file or directory" in err


def test_status_with_only_a_pidfile_needs_no_app(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Defect: `status -p PIDFILE` failed with "app: required setting is missing"."""
    monkeypatch.chdir(tmp_path)  # and no /etc/preforkd.yaml is assumed either way
    pidfile = tmp_path / "x.pid"
    assert main(["status", "-p", str(pidfile)]) == 1
    err = capsys.readouterr().err
    assert "required setting is missing" not in err
    assert f"not running (no live pid in {pidfile})" in err


def test_status_with_a_broken_file_warns_in_one_line_and_still_looks(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pidfile = tmp_path / "x.pid"
    config = tmp_path / "bad.yaml"
    config.write_text(f"app: a:b\npidfile: {pidfile}\nworkers: {{count: 0}}\n")
    assert main(["status", "-c", str(config)]) == 1
    first, second = capsys.readouterr().err.splitlines()
    assert first.startswith("preforkd: warning: the configuration has errors, so only its "
                            "pidfile and admin settings are used: ")
    assert f"{config}:3: workers.count: must be from 1 to 1024, got 0" in first
    assert second.startswith(f"preforkd: not running (no live pid in {pidfile})")


def test_reload_with_a_broken_file_says_nothing_was_sent(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "bad.yaml"
    config.write_text(f"app: a:b\npidfile: {tmp_path / 'x.pid'}\nworkers: [unclosed\n")
    assert main(["reload", "-c", str(config)]) == EXIT_CONFIG_ERROR
    err = capsys.readouterr().err.splitlines()
    assert err[0].startswith(f"preforkd: configuration error: {config}:")
    assert err[1] == (
        "preforkd: reload: nothing was sent to the server: it would read "
        f"{config} again and refuse it the same way"
    )


def test_reload_with_only_a_pidfile_needs_no_app(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Defect: `reload -p PIDFILE` failed with "app: required setting is missing" and sent
    nothing: with no file to validate it needs only the pid (the master validates its own)."""
    monkeypatch.chdir(tmp_path)
    pidfile = tmp_path / "x.pid"
    pidfile.write_text("999999999\n")  # no such process
    assert main(["reload", "-p", str(pidfile)]) == 1
    err = capsys.readouterr().err
    assert "configuration error" not in err
    assert err == f"preforkd: not running (no live pid in {pidfile})\n"


# --- the master's configuration file, from its command line -----------------------------------


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["/venv/bin/python", "-m", "prefork", "-c", "/etc/a.yaml"], "/etc/a.yaml"),
        (["/venv/bin/python3.11", "/venv/bin/preforkd", "--config=/b.yaml", "-D"], "/b.yaml"),
        (["preforkd", "--conf", "c.yaml"], "c.yaml"),  # argparse takes an abbreviation
        (["preforkd", "-c/d.yaml"], "/d.yaml"),
        (["preforkd", "-c=/e.yaml"], "/e.yaml"),
        (["preforkd", "-c", "/first.yaml", "-c", "/last.yaml"], "/last.yaml"),
        (["python", "-c", "import prefork.cli", "-c", "/f.yaml"], "/f.yaml"),
        (["python", "-c", "import prefork.cli"], None),  # the interpreter's -c is not ours
        (["/venv/bin/python", "-m", "prefork", "--workers", "2"], None),
        (["preforkd", "-c"], None),
        ([], None),
    ],
)
def test_config_argument(argv: list[str], expected: str | None) -> None:
    assert config_argument(argv) == expected


# --- unix socket paths that are too long ------------------------------------------------------


def long_path(tmp_path: Path) -> str:
    deep = tmp_path / ("d" * max(1, 120 - len(str(tmp_path))))
    deep.mkdir()
    return str(deep / "preforkd.pid.sock")


def test_a_status_socket_path_too_long_gives_the_reason_not_none(tmp_path: Path) -> None:
    """Defect: bind() fails on such a path with an OSError whose strerror is None, and the
    start failed with "cannot open the status socket PATH: None"."""
    path = long_path(tmp_path)
    size = len(os.fsencode(path))
    with pytest.raises(OSError) as info:
        open_admin(path, None)
    assert str(info.value) == (
        f"cannot open the status socket {path}: path too long: {size} bytes, at most 107"
    )
    assert not os.path.exists(path)
    with pytest.raises(OSError, match=rf"^path too long: {size} bytes, at most 107$"):
        fetch(path, None, "/status")


def test_a_path_of_107_bytes_still_works(tmp_path: Path) -> None:
    base = Path("/tmp") if len(str(tmp_path)) > 90 else tmp_path
    directory = base / f"pf-cli-{os.getpid()}"
    directory.mkdir()
    try:
        path = str(directory / ("s" * (107 - len(str(directory)) - 1)))
        assert len(os.fsencode(path)) == 107
        sockets, inode = open_admin(path, None)
        AdminServer(sockets, lambda target: (200, "text/plain", b""), path, inode).close()
        assert not os.path.exists(path)
    finally:
        directory.rmdir()


def test_reason_never_says_none() -> None:
    assert reason(OSError(2, "No such file or directory")) == "No such file or directory"
    assert reason(OSError("AF_UNIX path too long")) == "AF_UNIX path too long"
    assert reason(TimeoutError()) == "TimeoutError"
