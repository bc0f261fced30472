"""--set KEY=VALUE (any setting, the value read as YAML) and --env NAME=VALUE on the command
line: how they become overrides, which win, and how a bad one is refused."""

from __future__ import annotations

from pathlib import Path

import pytest

from prefork.cli import overrides_from, parse, read_endpoint, with_web_concurrency
from prefork.config import ConfigError, YamlText, load


def test_set_and_env_become_overrides_under_the_named_options() -> None:
    args = parse([
        "--set", "workers.max_requests=1000",
        "--set", "http.forwarded_allow_ips=[10.0.0.0/8, unix]",
        "-s", "logging.access_log=",  # empty: null
        "--set", "workers.count=9",
        "-w", "3",  # the option named for the setting wins over --set
        "--set", "bind=[{address: 'unix:/run/app.sock', mode: 660}]",  # octal, as in a file
        "--set", "umask=027",
        "-e", "DJANGO_SETTINGS_MODULE=site.settings",
        "--env", "EMPTY=",
        "--env", "WITH_EQUALS=a=b",
        "app:application",
    ])
    overrides = overrides_from(args)
    assert overrides["workers.count"] == 3
    assert overrides["workers.max_requests"] == "1000"  # the text, read by the configuration
    assert isinstance(overrides["workers.max_requests"], YamlText)
    config = load(None, overrides)
    assert (config.workers.count, config.workers.max_requests) == (3, 1000)
    assert config.http.forwarded_allow_ips == ("10.0.0.0/8", "unix")
    assert config.logging.access_log is None
    assert config.bind[0].mode == 0o660 and config.umask == 0o027
    assert dict(config.env) == {
        "DJANGO_SETTINGS_MODULE": "site.settings", "EMPTY": "", "WITH_EQUALS": "a=b",
    }


def test_a_lone_dash_given_to_set_is_the_string_not_a_yaml_list() -> None:
    # YAML reads "-" alone as [None]: --set logging.error_log=- was refused with "must be
    # a string, got [None]", where --error-log - was taken
    argv = ["--set", "logging.error_log=-", "-s", "logging.access_log= - ", "app:application"]
    config = load(None, overrides_from(parse(argv)))
    assert (config.logging.error_log, config.logging.access_log) == ("-", "-")
    argv = ["--set", "http.forwarded_allow_ips=- 10.0.0.1", "app:application"]  # still YAML
    assert load(None, overrides_from(parse(argv))).http.forwarded_allow_ips == ("10.0.0.1",)


def test_env_on_the_command_line_adds_to_the_files_mapping(tmp_path: Path) -> None:
    path = tmp_path / "preforkd.yaml"
    path.write_text("app: app:application\nenv: {FROM_FILE: '1', BOTH: file}\n")
    config = load(str(path), overrides_from(parse(["-e", "BOTH=cli", "-e", "NEW=2"])))
    assert dict(config.env) == {"FROM_FILE": "1", "BOTH": "cli", "NEW": "2"}


def test_env_on_the_command_line_takes_the_names_the_file_takes(tmp_path: Path) -> None:
    path = tmp_path / "preforkd.yaml"
    path.write_text("app: app:application\nenv: {A-B: file, x.y: '1'}\n")
    args = parse(["-e", "A-B=cli", "-e", "1A=2", "-e", "a.b.c=3", "-e", "x.y=4"])
    config = load(str(path), overrides_from(args))
    assert dict(config.env) == {"A-B": "cli", "x.y": "4", "1A": "2", "a.b.c": "3"}


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--set", "workers.count"], "--set 'workers.count': expected KEY=VALUE"),
        (["--set", "=3"], "--set '=3': expected KEY=VALUE"),
        (["-e", "NO_VALUE"], "--env 'NO_VALUE': expected NAME=VALUE"),
        (["-e", "=1"], "--env '=1': expected NAME=VALUE"),
    ],
)
def test_a_malformed_item_exits_2_with_the_usage(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        parse(argv)
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: preforkd") and f"preforkd: error: {message}" in err


@pytest.mark.parametrize(
    ("item", "error"),
    [
        ("workers.cont=3", "workers.cont: unknown key 'cont' (did you mean 'count'?)"),
        ("http.max_body_size=-1", "http.max_body_size: must be from 0 to"),
        ("workers.count=[1,", "workers.count: invalid YAML: while parsing a flow node"),
        ("workers.count=!!int abc", "workers.count: invalid YAML: 'abc' is not a valid int"),
        ("bind=[{address: 'unix:/x', mode: 9}]", "bind[0].mode: "),
    ],
)
def test_a_bad_set_is_a_configuration_error_naming_the_command_line(
    item: str, error: str
) -> None:
    with pytest.raises(ConfigError) as raised:
        load(None, overrides_from(parse(["--set", item, "app:application"])))
    assert str(raised.value).startswith(f"command line: {error}"), str(raised.value)


def test_a_section_given_to_set_merges_key_by_key_and_the_last_set_wins(tmp_path: Path) -> None:
    path = tmp_path / "preforkd.yaml"
    path.write_text("app: app:application\nworkers: {count: 3, max_requests: 500}\n")
    config = load(str(path), overrides_from(parse(["--set", "workers={timeout: 10}"])))
    assert (config.workers.count, config.workers.max_requests) == (3, 500)
    assert config.workers.timeout == 10
    argv = ["--set", "workers.count=5", "--set", "workers={count: 6}", "--set",
            "workers.count=7"]
    assert load(str(path), overrides_from(parse(argv))).workers.count == 7
    argv = ["--set", "workers.count=5", "--set", "workers={count: 6}"]
    assert load(str(path), overrides_from(parse(argv))).workers.count == 6


def test_web_concurrency_yields_to_a_count_given_in_a_section() -> None:
    environ = {"WEB_CONCURRENCY": "7"}
    for argv, count in (
        (["--set", "workers={count: 4}"], 4),
        (["--set", "workers={timeout: 4}"], 7),
        (["--set", "workers.count=4"], 4),
    ):
        overrides = with_web_concurrency(None, overrides_from(parse(argv)), environ)
        assert load(None, {**overrides, "app": "a:b"}).workers.count == count, argv


def test_status_finds_a_pidfile_given_to_set(tmp_path: Path) -> None:
    pidfile = tmp_path / "x.pid"
    endpoint = read_endpoint(None, overrides_from(parse(["--set", f'pidfile="{pidfile}"'])))
    assert endpoint.pidfile == str(pidfile)


def test_gunicorns_flag_spellings_set_the_same_settings(tmp_path: Path) -> None:
    # a Procfile or Dockerfile moved from gunicorn: each of these was an argparse error
    argv = ["-t", "45", "--keep-alive", "2", "--access-logfile", "-", "--error-logfile",
            f"{tmp_path}/error.log", "--max-requests", "1000", "--max-requests-jitter", "50",
            "--pid", "/run/app.pid", "-n", "shop", "--chdir", str(tmp_path),
            "shop.wsgi:application"]
    config = load(None, overrides_from(parse(argv)))
    assert config.workers.timeout == 45 and config.http.keepalive_timeout == 2
    assert config.logging.access_log == "-"
    assert config.logging.error_log == f"{tmp_path}/error.log"
    assert (config.workers.max_requests, config.workers.max_requests_jitter) == (1000, 50)
    assert config.pidfile == "/run/app.pid" and config.proc_name == "shop"
    assert config.chdir == str(tmp_path) and config.app == "shop.wsgi:application"
    log_file = load(None, overrides_from(parse(["--log-file", "-", "a:b"])))
    assert log_file.logging.error_log == "-"


@pytest.mark.parametrize(
    ("argv", "command", "app"),
    [
        (["--check-config", "app:application"], "check", "app:application"),
        (["app:application", "--check-config"], "check", "app:application"),
        (["check", "--check-config"], "check", None),
        (["--print-config", "-c", "x.yaml"], "config", None),
    ],
)
def test_check_config_and_print_config_are_the_commands(
    argv: list[str], command: str, app: str | None
) -> None:
    args = parse(argv)
    assert (args.command, args.app) == (command, app)


def test_a_command_flag_beside_another_command_exits_2(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit) as exited:
        parse(["stop", "--check-config"])
    assert exited.value.code == 2
    assert "--check-config and the command 'stop' ask for different things" in (
        capsys.readouterr().err
    )
