"""`preforkd config`: every setting as the server runs it, as YAML that loads back to the
same configuration."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml

from prefork.cli import command
from prefork.config import Config, load
from prefork.effective import as_yaml, effective


def reloaded(config: Config, tmp_path: Path) -> Config:
    printed = tmp_path / "printed.yaml"
    printed.write_text(as_yaml(config))
    return dataclasses.replace(load(str(printed)), source=config.source)


def test_the_printed_settings_load_back_to_the_same_configuration(tmp_path: Path) -> None:
    (tmp_path / "logs").mkdir()
    source = tmp_path / "preforkd.yaml"
    source.write_text(
        "app: site.wsgi:application\n"
        "bind: ['127.0.0.1:9000', {address: 'unix:run.sock', mode: 660, owner: '0'}]\n"
        "umask: 027\n"
        "pythonpath: [src]\n"
        "env: {DJANGO_SETTINGS_MODULE: site.settings, EMPTY: ''}\n"
        "workers: {count: 4, max_requests: 1000, max_requests_jitter: 50, timeout: 12.5}\n"
        "http: {forwarded_allow_ips: ['10.0.0.0/8', unix], script_name: /app,\n"
        "       proxy_protocol: 'off', server_header: ''}\n"
        "logging: {level: debug, access_log: logs/access.log,\n"
        "          access_log_format: '%(h)s \"%(r)s\" %(s)s', error_log: logs/error.log,\n"
        "          access_log_skip: [/healthz, '/static/*']}\n"
        "statsd: {address: '127.0.0.1:8125', tags: ['env:prod']}\n"
    )
    config = load(str(source), {"workers.max_memory": 512})
    assert reloaded(config, tmp_path) == config

    printed = effective(config)
    assert printed["bind"] == [
        "127.0.0.1:9000",
        {"address": f"unix:{tmp_path}/run.sock", "mode": "0660", "owner": "0", "group": None,
         "tls": None, "reuse_port": False},
    ]
    assert printed["umask"] == "027" and printed["workers"]["max_memory"] == 512
    assert printed["pythonpath"] == [str(tmp_path / "src")]  # resolved
    assert "source" not in printed  # internal fields are not settings


def test_defaults_print_every_section_and_load_back(tmp_path: Path) -> None:
    config = load(None, {"app": "app:application"})
    text = as_yaml(config)
    assert text.startswith("# preforkd: the settings as the server runs them (no file, ")
    data = yaml.safe_load(text)
    assert set(data) == {f.name for f in dataclasses.fields(Config)} - {"source"}
    assert data["workers"]["count"] == 2 and data["bind"] == ["127.0.0.1:8000"]
    assert reloaded(config, tmp_path) == config


def test_config_shows_what_foreground_and_daemon_flags_make_of_daemon(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source = tmp_path / "preforkd.yaml"
    source.write_text("app: site.wsgi:application\ndaemon: true\n")
    shown = {}
    for flags in ([], ["--foreground"]):
        assert command(["config", "-c", str(source), *flags]) == 0
        shown[" ".join(flags)] = yaml.safe_load(capsys.readouterr().out)["daemon"]
    source.write_text("app: site.wsgi:application\n")
    assert command(["config", "-c", str(source), "-D"]) == 0
    shown["-D"] = yaml.safe_load(capsys.readouterr().out)["daemon"]
    assert shown == {"": True, "--foreground": False, "-D": True}
