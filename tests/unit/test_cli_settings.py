"""--set KEY=VALUE (any setting, the value read as YAML) and --env NAME=VALUE on the command
line: how they become overrides, which win, and how a bad one is refused."""

from __future__ import annotations

from pathlib import Path

import pytest

from prefork.cli import overrides_from, parse
from prefork.config import ConfigError, load


def test_set_and_env_become_overrides_under_the_named_options() -> None:
    args = parse([
        "--set", "workers.max_requests=1000",
        "--set", "http.forwarded_allow_ips=[10.0.0.0/8, unix]",
        "-s", "logging.access_log=",  # empty: null
        "--set", "workers.count=9",
        "-w", "3",  # the option named for the setting wins over --set
        "-e", "DJANGO_SETTINGS_MODULE=site.settings",
        "--env", "EMPTY=",
        "--env", "WITH_EQUALS=a=b",
        "app:application",
    ])
    overrides = overrides_from(args)
    assert overrides == {
        "workers.max_requests": 1000,
        "http.forwarded_allow_ips": ["10.0.0.0/8", "unix"],
        "logging.access_log": None,
        "workers.count": 3,
        "env.DJANGO_SETTINGS_MODULE": "site.settings",
        "env.EMPTY": "",
        "env.WITH_EQUALS": "a=b",
        "app": "app:application",
    }
    config = load(None, overrides)
    assert (config.workers.count, config.workers.max_requests) == (3, 1000)
    assert config.http.forwarded_allow_ips == ("10.0.0.0/8", "unix")
    assert dict(config.env)["WITH_EQUALS"] == "a=b" and dict(config.env)["EMPTY"] == ""


def test_env_on_the_command_line_adds_to_the_files_mapping(tmp_path: Path) -> None:
    path = tmp_path / "preforkd.yaml"
    path.write_text("app: app:application\nenv: {FROM_FILE: '1', BOTH: file}\n")
    config = load(str(path), overrides_from(parse(["-e", "BOTH=cli", "-e", "NEW=2"])))
    assert dict(config.env) == {"FROM_FILE": "1", "BOTH": "cli", "NEW": "2"}


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--set", "workers.count"], "--set 'workers.count': expected KEY=VALUE"),
        (["--set", "=3"], "--set '=3': expected KEY=VALUE"),
        (["--set", "workers.count=[1,"], "--set 'workers.count=[1,': the value is not YAML"),
        (["-e", "NO_VALUE"], "--env 'NO_VALUE': expected NAME=VALUE"),
        (["-e", "A.B=1"], "--env 'A.B=1': expected NAME=VALUE"),
        (["-e", "1A=1"], "--env '1A=1': expected NAME=VALUE"),
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


def test_a_set_that_names_no_setting_is_a_configuration_error_naming_it() -> None:
    with pytest.raises(ConfigError) as error:
        load(None, overrides_from(parse(["--set", "workers.cont=3", "app:application"])))
    assert str(error.value) == (
        "command line: workers.cont: unknown key 'cont' (did you mean 'count'?)"
    )
    with pytest.raises(ConfigError) as error:
        load(None, overrides_from(parse(["--set", "http.max_body_size=-1", "app:application"])))
    assert str(error.value).startswith("command line: http.max_body_size: must be")
