"""prefork.config: YAML loading, validation, error locations, paths, overrides, generated docs."""

import dataclasses
import grp
import math
import os
import pwd
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from prefork import config as config_module
from prefork.addresses import Address
from prefork.config import (
    AdminConfig,
    BindConfig,
    Config,
    ConfigError,
    HooksConfig,
    HttpConfig,
    LoggingConfig,
    SyslogConfig,
    TLSConfig,
    WorkersConfig,
    bind_address,
    field_docs,
    from_mapping,
    load,
    settings_markdown,
)

REPO = Path(__file__).resolve().parents[2]

Writer = Callable[..., str]


@pytest.fixture(params=["c", "python"])
def loader(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """Run a test with libyaml's loader and with the pure-Python one: both must agree."""
    if request.param == "c":
        if not hasattr(yaml, "CSafeLoader"):
            pytest.skip("PyYAML built without libyaml")
        monkeypatch.setattr(config_module, "_LOADER", yaml.CSafeLoader)
    else:
        monkeypatch.setattr(config_module, "_LOADER", yaml.SafeLoader)
    yield request.param


@pytest.fixture
def write(tmp_path: Path) -> Writer:
    """Write a dedented YAML file under tmp_path/etc and return its path (as a string)."""

    def _write(text: str, name: str = "etc/preforkd.yaml") -> str:
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text).lstrip("\n"))
        return str(path)

    return _write


def error_of(path: str | None, overrides: dict[str, object] | None = None) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        load(path, overrides)
    return info.value


def check_error(err: ConfigError, source: str, line: int | None, key: str, *parts: str) -> None:
    assert (err.source, err.line, err.key) == (source, line, key), str(err)
    for part in parts:
        assert part in err.message, str(err)


# --- defaults and basics --------------------------------------------------------------------


def test_defaults() -> None:
    cfg = load(None, {"app": "myapp:application"})
    assert cfg == Config(app="myapp:application")
    assert cfg.protocol == "http"
    assert cfg.bind == (BindConfig("127.0.0.1:8000"),)
    assert cfg.backlog == 2048
    assert cfg.proc_name is None
    assert cfg.preload_app is False
    assert cfg.pythonpath == ()
    assert cfg.chdir is None
    assert cfg.source == ""
    assert cfg.workers == WorkersConfig()
    assert (cfg.workers.count, cfg.workers.timeout, cfg.workers.max_connections) == (2, 30.0, 10000)
    assert cfg.http == HttpConfig()
    assert (cfg.http.keepalive_timeout, cfg.http.max_body_size) == (5.0, 0)
    assert cfg.http.server_header == "preforkd"
    assert cfg.logging == LoggingConfig()
    assert (cfg.logging.level, cfg.logging.error_log, cfg.logging.access_log) == ("info", "-", None)


def test_full_file(write: Writer, loader: str) -> None:
    path = write(
        """
        app: pkg.web:make.app
        protocol: tcp
        bind:
          - "*:8000"
          - "[::1]:0"
          - address: unix:/run/preforkd.sock
            mode: 0660
        backlog: 128
        proc_name: web
        preload_app: true
        workers:
          count: 8
          max_requests: 1000
          max_requests_jitter: 50
          timeout: 5
          timeout_grace: 0.5
        http:
          keepalive_timeout: 0
          max_body_size: 1048576
          server_header: ""
        logging:
          level: WARNING
          access_log: "-"
          access_log_format: json
        """
    )
    cfg = load(path)
    assert cfg.app == "pkg.web:make.app"
    assert cfg.protocol == "tcp"
    assert cfg.bind == (
        BindConfig("0.0.0.0:8000"),
        BindConfig("[::1]:0"),
        BindConfig("unix:/run/preforkd.sock", 0o660),
    )
    assert [bind_address(b) for b in cfg.bind] == [
        Address("tcp", "0.0.0.0", 8000),
        Address("tcp", "::1", 0),
        Address("unix", path="/run/preforkd.sock"),
    ]
    assert (cfg.backlog, cfg.proc_name, cfg.preload_app) == (128, "web", True)
    assert cfg.workers == WorkersConfig(
        count=8, max_requests=1000, max_requests_jitter=50, timeout=5.0, timeout_grace=0.5
    )
    assert isinstance(cfg.workers.timeout, float)
    assert cfg.http.keepalive_timeout == 0.0
    assert cfg.http.max_body_size == 1048576
    assert cfg.http.server_header == ""
    assert cfg.logging == LoggingConfig(level="warning", access_log="-", access_log_format="json")
    assert cfg.source == os.path.abspath(path)


def test_config_is_frozen() -> None:
    cfg = load(None, {"app": "m:app"})
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.app = "other:app"  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.workers.count = 3  # type: ignore[misc]


@pytest.mark.parametrize("text", ["", "# only a comment\n", "---\n"])
def test_empty_file_gives_defaults(write: Writer, text: str) -> None:
    path = write(text)
    assert load(path, {"app": "m:app"}) == Config(app="m:app", source=os.path.abspath(path))


def test_empty_file_without_app(write: Writer) -> None:
    path = write("")
    check_error(error_of(path), path, None, "app", "required setting is missing")


def test_no_file_without_app() -> None:
    err = error_of(None)
    assert str(err) == "command line: app: required setting is missing"


def test_null_section_means_defaults(write: Writer) -> None:
    path = write(
        """
        app: m:app
        workers:
        #  count: 4
        """
    )
    assert load(path).workers == WorkersConfig()


# --- where errors point ---------------------------------------------------------------------


def test_error_str_format() -> None:
    err = ConfigError("must be x", source="etc/x.yaml", line=12, key="workers.count")
    assert str(err) == "etc/x.yaml:12: workers.count: must be x"
    assert (err.message, err.source, err.line, err.key) == (
        "must be x",
        "etc/x.yaml",
        12,
        "workers.count",
    )
    assert str(ConfigError("cannot read", source="etc/x.yaml")) == "etc/x.yaml: cannot read"
    assert str(ConfigError("bad", source="command line", key="a.b")) == "command line: a.b: bad"
    assert str(ConfigError("bad", line=3)) == "line 3: bad"
    assert str(ConfigError("bad")) == "bad"


def test_missing_file() -> None:
    err = error_of("/nonexistent/preforkd.yaml")
    assert str(err) == (
        "/nonexistent/preforkd.yaml: cannot read: [Errno 2] No such file or directory"
    )


def test_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "x.yaml"
    path.write_bytes(b"app: m:app\nproc_name: caf\xe9\n")
    check_error(error_of(str(path)), str(path), 2, "", "not valid UTF-8")


def test_yaml_syntax_error(write: Writer, loader: str) -> None:
    path = write(
        """
        app: m:app
        bind: [127.0.0.1:80
        workers:
          count: 2
        """
    )
    err = error_of(path)
    assert err.source == path
    assert err.line is not None and err.line >= 3
    assert err.message.startswith("invalid YAML: ")


def test_yaml_syntax_error_line(write: Writer, loader: str) -> None:
    path = write("app: m:app\nworkers: a: b\n")
    check_error(error_of(path), path, 2, "", "invalid YAML")


def test_tab_indentation(write: Writer, loader: str) -> None:
    path = write("app: m:app\nworkers:\n\tcount: 2\n")
    check_error(error_of(path), path, 3, "", "invalid YAML")


def test_two_documents(write: Writer, loader: str) -> None:
    path = write("app: m:app\n---\napp: n:app\n")
    check_error(error_of(path), path, 2, "", "invalid YAML", "single document")


@pytest.mark.parametrize(
    ("text", "got"),
    [("- app: m:app\n", "a list"), ("just a string\n", "the scalar 'just a string'")],
)
def test_top_level_not_a_mapping(write: Writer, loader: str, text: str, got: str) -> None:
    path = write(text)
    check_error(error_of(path), path, 1, "", "top level must be a mapping", got)


def test_section_not_a_mapping(write: Writer, loader: str) -> None:
    path = write("app: m:app\nworkers: 4\n")
    check_error(error_of(path), path, 2, "workers", "must be a mapping of settings, got 4")


def test_unknown_top_level_key(write: Writer, loader: str) -> None:
    path = write("app: m:app\n\nworker:\n  count: 2\n")
    err = error_of(path)
    check_error(err, path, 3, "worker", "unknown key 'worker' (did you mean 'workers'?)")
    assert str(err) == f"{path}:3: worker: unknown key 'worker' (did you mean 'workers'?)"


def test_unknown_nested_key_did_you_mean(write: Writer, loader: str) -> None:
    path = write(
        """
        app: m:app
        workers:
          count: 2
          max_request: 100
        """
    )
    err = error_of(path)
    check_error(
        err,
        path,
        4,
        "workers.max_request",
        "unknown key 'max_request' (did you mean 'max_requests'?)",
    )


def test_unknown_key_without_suggestion(write: Writer) -> None:
    path = write("app: m:app\nhttp:\n  zzzzzz: 1\n")
    err = error_of(path)
    check_error(err, path, 3, "http.zzzzzz", "unknown key 'zzzzzz'")
    assert "did you mean" not in err.message


def test_internal_field_not_settable(write: Writer) -> None:
    path = write("app: m:app\nsource: /etc/other.yaml\n")
    check_error(error_of(path), path, 2, "source", "unknown key 'source'")


def test_unknown_key_in_bind_item(write: Writer, loader: str) -> None:
    path = write(
        """
        app: m:app
        bind:
          - 127.0.0.1:80
          - address: unix:/run/x.sock
            mod: 0600
        """
    )
    check_error(error_of(path), path, 5, "bind[1].mod", "unknown key 'mod' (did you mean 'mode'?)")


def test_duplicate_top_level_key(write: Writer, loader: str) -> None:
    path = write("app: m:app\nbacklog: 10\napp: n:app\n")
    check_error(error_of(path), path, 3, "app", "duplicate key 'app' (first at line 1)")


def test_duplicate_nested_key(write: Writer, loader: str) -> None:
    path = write(
        """
        app: m:app
        workers:
          count: 2
          timeout: 3
          count: 3
        """
    )
    check_error(error_of(path), path, 5, "workers.count", "duplicate key 'count' (first at line 3)")


def test_duplicate_section(write: Writer) -> None:
    path = write("app: m:app\nhttp: {}\nworkers: {}\nhttp: {}\n")
    check_error(error_of(path), path, 4, "http", "duplicate key 'http' (first at line 2)")


def test_non_string_key(write: Writer) -> None:
    path = write("app: m:app\nworkers:\n  1: 2\n")
    check_error(error_of(path), path, 3, "workers", "keys must be strings, got 1")


def test_merge_key_rejected(write: Writer, loader: str) -> None:
    path = write(
        """
        app: m:app
        base: &base {count: 2}
        workers:
          <<: *base
        """
    )
    check_error(error_of(path), path, 4, "workers", "merge keys")


def test_alias_is_fine(write: Writer) -> None:
    path = write(
        """
        app: &app m:app
        proc_name: *app
        """
    )
    assert load(path).proc_name == "m:app"


def test_recursive_alias(write: Writer, loader: str) -> None:
    path = write("app: m:app\npythonpath: &p [*p]\n")
    check_error(error_of(path), path, 2, "pythonpath[0]", "recursive")


@pytest.mark.parametrize("value", ["!!int abc", "!!float abc", "!!bool maybe", "!!timestamp x"])
def test_bad_explicitly_tagged_scalar(write: Writer, loader: str, value: str) -> None:
    path = write(f"app: m:app\nworkers:\n  count: {value}\n")
    check_error(error_of(path), path, 3, "workers.count", "invalid YAML", "is not a valid")


def test_python_tag_rejected(write: Writer, loader: str) -> None:
    path = write("app: m:app\nproc_name: !!python/name:os.system x\n")
    check_error(error_of(path), path, 2, "", "invalid YAML", "constructor")


def test_custom_tag_on_collection_rejected(write: Writer) -> None:
    path = write("app: m:app\nworkers: !thing {count: 2}\n")
    check_error(error_of(path), path, 2, "", "unsupported YAML tag '!thing'")


# --- types --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("line", "key", "message"),
    [
        ("workers:\n  count: two", "workers.count", "must be an integer from 1 to 1024, got 'two'"),
        ("workers:\n  count: true", "workers.count", "must be an integer from 1 to 1024, got True"),
        ("workers:\n  count: 2.5", "workers.count", "must be an integer from 1 to 1024, got 2.5"),
        ("workers:\n  count: '2'", "workers.count", "must be an integer from 1 to 1024, got '2'"),
        ("workers:\n  count: null", "workers.count", "must be an integer"),
        ("workers:\n  count: 0", "workers.count", "must be from 1 to 1024, got 0"),
        ("workers:\n  count: 1025", "workers.count", "must be from 1 to 1024, got 1025"),
        ("workers:\n  timeout: -1.5", "workers.timeout", "from 0 to 86400, got -1.5"),
        ("workers:\n  timeout: .inf", "workers.timeout", "got inf"),
        ("workers:\n  timeout: .nan", "workers.timeout", "got nan"),
        ("workers:\n  timeout: yes", "workers.timeout", "must be a number"),
        ("workers:\n  timeout: 30s", "workers.timeout", "must be a number from 0"),
        (
            "http:\n  max_body_size: -1",
            "http.max_body_size",
            "must be from 0 to 4611686018427387904",
        ),
        ("http:\n  server_header: 12", "http.server_header", "must be a string, got 12"),
        ('http:\n  server_header: "a\\r\\nX: y"', "http.server_header", "control characters"),
        ("preload_app: 'yes'", "preload_app", "must be true or false, got 'yes'"),
        ("preload_app: 1", "preload_app", "must be true or false, got 1"),
        ("preload_app: null", "preload_app", "must be true or false, got None"),
        ("backlog: 0", "backlog", "must be from 1 to 65535, got 0"),
        ("proc_name: [a]", "proc_name", "must be a string, got ['a']"),
        ("protocol: udp", "protocol", "must be one of http, uwsgi, tcp, got 'udp'"),
        ("logging:\n  level: verbose", "logging.level", "must be one of debug, info, warning"),
        ("logging:\n  access_log_format: xml", "logging.access_log_format", "combined, json"),
        ("pythonpath: lib", "pythonpath", "must be a list of paths, got 'lib'"),
        ("pythonpath: [lib, 3]", "pythonpath[1]", "must be a string, got 3"),
        ("chdir: ''", "chdir", "must not be empty"),
        ("logging:\n  error_log: ''", "logging.error_log", "must not be empty"),
    ],
)
def test_value_errors(write: Writer, line: str, key: str, message: str) -> None:
    path = write(f"app: m:app\n{line}\n")
    err = error_of(path)
    check_error(err, path, 2 + line.count("\n"), key, message)


@pytest.mark.parametrize(
    ("app", "message"),
    [
        ("foo:", "cannot parse"),
        (":app", "must be 'module', 'module:callable' or 'module:factory(...)'"),
        ("foo:bar:baz", "cannot parse"),
        ("a-b:app", "must be 'module', 'module:callable' or 'module:factory(...)'"),
        ("1a:app", "must be 'module', 'module:callable' or 'module:factory(...)'"),
        ("m:class", "cannot parse"),
        ("m.:app", "must be 'module', 'module:callable' or 'module:factory(...)'"),
        ("m:a.", "cannot parse"),
        ("m:make(os.getcwd())", "factory arguments must be literals"),
        ("m:make(**opts)", "factory arguments must be literals"),
        ("m:1 + 2", "expected a name"),
    ],
)
def test_app_syntax_errors(write: Writer, app: str, message: str) -> None:
    path = write(f"backlog: 10\napp: '{app}'\n")
    err = error_of(path)
    assert err.line == 2 and err.key == "app"
    assert message in err.message, err.message


@pytest.mark.parametrize(
    "app",
    [
        "m:app",
        "pkg.mod:obj.attr",
        "_x:_y",
        "wsgi:application",
        "foo",
        "pkg.mod",
        "m:create_app()",
        "m:create_app('prod', debug=False, n=3, opts={'a': [1, 2]})",
    ],
)
def test_app_syntax_ok(app: str) -> None:
    assert load(None, {"app": app}).app == app


def test_integral_float_accepted_for_int() -> None:
    assert load(None, {"app": "m:a", "workers.count": 4.0}).workers.count == 4


def test_int_accepted_for_float() -> None:
    cfg = load(None, {"app": "m:a", "http.keepalive_timeout": 2})
    assert cfg.http.keepalive_timeout == 2.0
    assert isinstance(cfg.http.keepalive_timeout, float)


def test_float_fields_reject_bool() -> None:
    err = error_of(None, {"app": "m:a", "workers.timeout": True})
    check_error(err, "command line", None, "workers.timeout", "must be a number", "got True")


def test_choices_are_case_insensitive() -> None:
    cfg = load(None, {"app": "m:a", "logging.level": "DEBUG", "protocol": "TCP"})
    assert (cfg.logging.level, cfg.protocol) == ("debug", "tcp")


def test_nullable_fields(write: Writer) -> None:
    path = write("app: m:app\nproc_name: null\nchdir: ~\nlogging:\n  access_log:\n")
    cfg = load(path)
    assert (cfg.proc_name, cfg.chdir, cfg.logging.access_log) == (None, None, None)


def test_nan_never_in_range() -> None:
    err = error_of(None, {"app": "m:a", "http.body_timeout": math.nan})
    assert err.key == "http.body_timeout"


# --- bind ---------------------------------------------------------------------------------


def test_bind_single_string(write: Writer) -> None:
    path = write("app: m:app\nbind: '[::]:8080'\n")
    assert load(path).bind == (BindConfig("[::]:8080"),)


def test_bind_bare_port_is_loopback(write: Writer) -> None:
    path = write("app: m:app\nbind: ['9000']\n")
    assert load(path).bind == (BindConfig("127.0.0.1:9000"),)


def test_bind_port_as_yaml_int_is_an_error(write: Writer) -> None:
    path = write("app: m:app\nbind: [9000]\n")
    check_error(error_of(path), path, 2, "bind[0]", "must be an address string", "got 9000")


@pytest.mark.parametrize(
    "mode", ["0660", "'0660'", "'660'", "'0o660'", "0o660", "660", "'0O660'", "!!int 660", "6_60"]
)
def test_bind_octal_modes(write: Writer, loader: str, mode: str) -> None:
    path = write(f"app: m:app\nbind:\n  - address: unix:/run/x.sock\n    mode: {mode}\n")
    assert load(path).bind == (BindConfig("unix:/run/x.sock", 0o660),)


@pytest.mark.parametrize(
    ("mode", "message"),
    [
        ("1000", "must be from 0 to 0o777, got 1000"),
        ("01000", "must be from 0 to 0o777, got 01000"),
        ("'0999'", "must be an octal file mode from 0 to 0o777, got '0999'"),
        ("0999", "must be an octal file mode from 0 to 0o777, got '0999'"),
        ("680", "not an octal mode: 680"),
        ("9", "not an octal mode: 9"),
        ("1:30", "not an octal mode: 1:30"),
        ("rw", "must be an octal file mode"),
        ("-1", "must be from 0 to 0o777"),
        ("true", "must be an octal file mode"),
        ("6.5", "must be an octal file mode"),
        ("660.0", "must be an octal file mode"),
        ("''", "must be an octal file mode"),
    ],
)
def test_bind_bad_modes(write: Writer, mode: str, message: str) -> None:
    path = write(f"app: m:app\nbind:\n  - address: unix:/run/x.sock\n    mode: {mode}\n")
    check_error(error_of(path), path, 4, "bind[0].mode", message)


@pytest.mark.parametrize(
    ("text", "umask"),
    [
        ("22", 0o22),
        ("77", 0o77),  # not 0o115, which would let others write
        ("27", 0o27),
        ("0027", 0o27),
        ("027", 0o27),
        ("0o27", 0o27),
        ("'27'", 0o27),
        ("'0027'", 0o27),
        ('"0o027"', 0o27),
        ("+22", 0o22),
        ("0", 0),
        ("777", 0o777),
        ("!!int 22", 0o22),
    ],
)
def test_umask_is_octal_however_written(write: Writer, loader: str, text: str, umask: int) -> None:
    path = write(f"app: m:app\numask: {text}\n")
    assert load(path).umask == umask


@pytest.mark.parametrize(("text", "mode"), [("400", 0o400), ("600", 0o600), ("0400", 0o400)])
def test_bind_mode_is_octal_however_written(
    write: Writer, loader: str, text: str, mode: int
) -> None:
    path = write(f"app: m:app\nbind:\n  - {{address: unix:/run/x.sock, mode: {text}}}\n")
    assert load(path).bind == (BindConfig("unix:/run/x.sock", mode),)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("28", "not an octal mode: 28"),
        ("8", "not an octal mode: 8"),
        ("1000", "must be from 0 to 0o777, got 1000"),
        ("-22", "must be from 0 to 0o777, got -22"),
        ("022.0", "must be an octal file mode"),
    ],
)
def test_umask_bad_values(write: Writer, loader: str, text: str, message: str) -> None:
    path = write(f"app: m:app\nbacklog: 10\numask: {text}\n")
    check_error(error_of(path), path, 3, "umask", message)


def test_every_octal_field_is_covered() -> None:
    """The fields read as octal are the ones the tests above exercise: a new one needs tests."""
    octal = [
        f"{cls.__name__}.{f.name}"
        for cls in (Config, BindConfig, WorkersConfig, HttpConfig, LoggingConfig, TLSConfig,
                    SyslogConfig, AdminConfig, HooksConfig)
        for f in dataclasses.fields(cls)
        if f.metadata.get("octal")
    ]
    assert octal == ["Config.umask", "BindConfig.mode"]


def test_octal_numbers_from_python_are_taken_as_they_are(tmp_path: Path) -> None:
    """Only YAML text is read as octal digits: an int given from Python is already a number."""
    assert from_mapping({"app": "m:app", "umask": 0o22}).umask == 0o22
    assert load(None, {"app": "m:app", "umask": 18}).umask == 0o22
    assert load(None, {"app": "m:app", "umask": "22"}).umask == 0o22
    err = error_of(None, {"app": "m:app", "umask": 660})
    check_error(err, "command line", None, "umask", "got 660 (write modes in octal, e.g. 0o660)")


def test_octal_docs_say_how_modes_are_read() -> None:
    rows = {key: doc for key, _, _, doc in field_docs()}
    for key in ("umask", "bind[].mode"):
        assert "always read as octal" in rows[key], key
        assert "8 or 9 is an error" in rows[key], key


def test_bind_mode_null_is_default(write: Writer) -> None:
    path = write("app: m:app\nbind:\n  - {address: unix:/run/x.sock, mode: null}\n")
    assert load(path).bind == (BindConfig("unix:/run/x.sock"),)


def test_bind_mode_on_tcp(write: Writer, loader: str) -> None:
    path = write(
        """
        app: m:app
        bind:
          - unix:/run/a.sock
          - address: 127.0.0.1:80
            mode: 0600
        """
    )
    check_error(error_of(path), path, 5, "bind[1].mode", "only to unix sockets")


def test_bind_reuse_port_on_unix(write: Writer, loader: str) -> None:
    path = write(
        """
        app: m:app
        bind:
          - address: 127.0.0.1:80
            reuse_port: true
          - address: unix:/run/a.sock
            reuse_port: true
        """
    )
    check_error(error_of(path), path, 6, "bind[1].reuse_port", "only to TCP sockets")


def test_bind_reuse_port(write: Writer) -> None:
    path = write("app: m:app\nbind:\n  - {address: 127.0.0.1:8000, reuse_port: true}\n")
    assert load(path).bind == (BindConfig("127.0.0.1:8000", reuse_port=True),)


def test_bind_invalid_address(write: Writer, loader: str) -> None:
    path = write(
        """
        app: m:app
        bind:
          - 127.0.0.1:80
          - ::1:80
        """
    )
    check_error(error_of(path), path, 4, "bind[1]", "use [::1]:80")


def test_bind_invalid_address_in_mapping(write: Writer) -> None:
    path = write("app: m:app\nbind:\n  - address: 'localhost:http'\n")
    check_error(error_of(path), path, 3, "bind[0].address", "port must be a number")


def test_bind_mapping_without_address(write: Writer) -> None:
    path = write("app: m:app\nbind:\n  - 127.0.0.1:80\n  - mode: 0600\n")
    check_error(error_of(path), path, 4, "bind[1].address", "required setting is missing")


def test_bind_empty(write: Writer) -> None:
    path = write("app: m:app\nbind: []\n")
    check_error(error_of(path), path, 2, "bind", "must not be empty")


def test_bind_null(write: Writer) -> None:
    path = write("app: m:app\nbind:\n")
    check_error(error_of(path), path, 2, "bind", "must be a list of addresses")


def test_bind_duplicates(write: Writer, loader: str) -> None:
    path = write(
        """
        app: m:app
        bind:
          - "*:80"
          - unix:/run/x.sock
          - 0.0.0.0:80
        """
    )
    check_error(
        error_of(path), path, 5, "bind[2]", "duplicate address '0.0.0.0:80' (same as bind[0])"
    )


def test_bind_duplicate_unix_after_resolution(write: Writer, tmp_path: Path) -> None:
    sock = tmp_path / "etc" / "x.sock"
    path = write(f"app: m:app\nbind:\n  - unix:x.sock\n  - unix:{sock}\n")
    check_error(error_of(path), path, 4, "bind[1]", "duplicate address")


def test_bind_port_zero_may_repeat(write: Writer) -> None:
    path = write("app: m:app\nbind: ['127.0.0.1:0', '127.0.0.1:0']\n")
    assert len(load(path).bind) == 2


# --- paths --------------------------------------------------------------------------------


def test_paths_relative_to_config_file(write: Writer, tmp_path: Path) -> None:
    path = write(
        """
        app: m:app
        pythonpath: [".", "../lib", /opt/abs]
        chdir: ..
        bind: unix:run/app.sock
        logging:
          error_log: ../log/error.log
          access_log: "-"
        """
    )
    etc = tmp_path / "etc"
    (etc / "run").mkdir()
    (tmp_path / "log").mkdir()
    cfg = load(path)
    assert cfg.pythonpath == (str(etc), str(tmp_path / "lib"), "/opt/abs")
    assert cfg.chdir == str(tmp_path)
    assert cfg.bind == (BindConfig(f"unix:{etc / 'run' / 'app.sock'}"),)
    assert cfg.logging.error_log == str(tmp_path / "log" / "error.log")
    assert cfg.logging.access_log == "-"


def test_relative_config_path_still_gives_absolute_paths(
    write: Writer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write("app: m:app\npythonpath: [src]\n")
    monkeypatch.chdir(tmp_path)
    cfg = load("etc/preforkd.yaml")
    assert cfg.pythonpath == (str(tmp_path / "etc" / "src"),)
    assert cfg.source == str(tmp_path / "etc" / "preforkd.yaml")


def test_override_paths_relative_to_cwd(
    write: Writer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write("app: m:app\npythonpath: [src]\n")
    work = tmp_path / "work"
    (work / "app").mkdir(parents=True)
    (work / "logs").mkdir()
    monkeypatch.chdir(work)
    cfg = load(
        path,
        {
            "chdir": "app",
            "bind": ["unix:s.sock", "127.0.0.1:0"],
            "logging.access_log": "logs/access.log",
            "logging.error_log": "-",
        },
    )
    assert cfg.pythonpath == (str(tmp_path / "etc" / "src"),)  # from the file: file's dir
    assert cfg.chdir == str(work / "app")
    assert cfg.bind == (BindConfig(f"unix:{work / 's.sock'}"), BindConfig("127.0.0.1:0"))
    assert cfg.logging.access_log == str(work / "logs" / "access.log")
    assert cfg.logging.error_log == "-"


def test_override_path_object(tmp_path: Path) -> None:
    assert load(None, {"app": "m:a", "chdir": tmp_path}).chdir == str(tmp_path)


# --- directories that must exist -------------------------------------------------------------


def test_chdir_must_be_an_existing_directory(write: Writer, tmp_path: Path) -> None:
    path = write("app: m:app\nchdir: /nonexistent/app\n")
    check_error(error_of(path), path, 2, "chdir", "no such directory: /nonexistent/app")
    (tmp_path / "a-file").write_text("")
    path = write("app: m:app\nbacklog: 10\nchdir: ../a-file\n")
    check_error(error_of(path), path, 3, "chdir", f"not a directory: {tmp_path / 'a-file'}")
    err = error_of(None, {"app": "m:app", "chdir": "/nonexistent/app"})
    check_error(err, "command line", None, "chdir", "no such directory")


@pytest.mark.parametrize(
    ("yaml_text", "line", "key"),
    [
        ("pidfile: /nonexistent/preforkd.pid", 2, "pidfile"),
        ("pidfile: run/preforkd.pid", 2, "pidfile"),  # relative: etc/run
        ("logging:\n  error_log: /nonexistent/error.log", 3, "logging.error_log"),
        ("logging:\n  level: info\n  access_log: ../logs/access.log", 4, "logging.access_log"),
        ("bind: unix:/nonexistent/app.sock", 2, "bind"),  # the one-item short form
        ("bind:\n  - 127.0.0.1:0\n  - unix:/nonexistent/app.sock", 4, "bind[1]"),
        ("bind:\n  - address: unix:/nonexistent/app.sock", 3, "bind[0].address"),
        ("admin:\n  socket: /nonexistent/admin.sock", 3, "admin.socket"),
    ],
)
def test_directory_of_a_created_file_must_exist(
    write: Writer, loader: str, yaml_text: str, line: int, key: str
) -> None:
    path = write(f"app: m:app\n{yaml_text}\n")
    check_error(error_of(path), path, line, key, "no such directory", "(the directory of ")


def test_files_the_server_creates_need_not_exist(write: Writer, tmp_path: Path) -> None:
    path = write(
        """
        app: m:app
        chdir: .
        pidfile: preforkd.pid
        bind: [unix:app.sock, "127.0.0.1:0"]
        admin: {socket: admin.sock}
        logging: {error_log: error.log, access_log: access.log}
        """
    )
    etc = tmp_path / "etc"
    cfg = load(path)
    assert (cfg.chdir, cfg.pidfile) == (str(etc), str(etc / "preforkd.pid"))
    assert cfg.admin.socket == str(etc / "admin.sock")
    assert (cfg.logging.error_log, cfg.logging.access_log) == (
        str(etc / "error.log"),
        str(etc / "access.log"),
    )
    assert sorted(os.listdir(etc)) == ["preforkd.yaml"]  # nothing was created by loading


def test_created_file_must_not_be_a_directory(write: Writer, tmp_path: Path) -> None:
    path = write(f"app: m:app\npidfile: {tmp_path}\n")
    check_error(error_of(path), path, 2, "pidfile", f"is a directory: {tmp_path}")


def test_directory_under_a_file(write: Writer, tmp_path: Path) -> None:
    (tmp_path / "a-file").write_text("")
    path = write(f"app: m:app\npidfile: {tmp_path / 'a-file' / 'x.pid'}\n")
    check_error(error_of(path), path, 2, "pidfile", f"not a directory: {tmp_path / 'a-file'}")


def test_pidfile_directory_from_the_command_line(write: Writer) -> None:
    path = write("app: m:app\n")
    err = error_of(path, {"pidfile": "/nonexistent/preforkd.pid"})
    check_error(err, "command line", None, "pidfile", "no such directory: /nonexistent")
    err = error_of(path, {"logging.error_log": "/nonexistent/error.log"})
    check_error(err, "command line", None, "logging.error_log", "no such directory")


def test_log_files_are_not_checked_when_syslog_replaces_them(write: Writer) -> None:
    path = write(
        """
        app: m:app
        logging:
          error_log: /nonexistent/error.log
          access_log: /nonexistent/access.log
          syslog: {enabled: true}
        """
    )
    assert load(path).logging.error_log == "/nonexistent/error.log"


# --- users and groups -----------------------------------------------------------------------


def _unused_id(exists: Callable[[int], object]) -> int:
    """A numeric id with no entry in passwd/group, as a container's arbitrary uid."""
    for candidate in range(1000650000, 1000650100):
        try:
            exists(candidate)
        except KeyError:
            return candidate
    pytest.skip("no unused id found")


@pytest.mark.parametrize("quote", ["", "'"])
def test_numeric_ids_need_not_exist(write: Writer, loader: str, quote: str) -> None:
    uid, gid = _unused_id(pwd.getpwuid), _unused_id(grp.getgrgid)
    path = write(
        f"""
        app: m:app
        user: {quote}{uid}{quote}
        group: {quote}{gid}{quote}
        bind:
          - {{address: unix:x.sock, owner: {quote}{uid}{quote}, group: {quote}{gid}{quote}}}
        """
    )
    cfg = load(path)
    assert (cfg.user, cfg.group) == (str(uid), str(gid))
    assert (cfg.bind[0].owner, cfg.bind[0].group) == (str(uid), str(gid))


def test_numeric_ids_from_the_command_line() -> None:
    uid, gid = _unused_id(pwd.getpwuid), _unused_id(grp.getgrgid)
    cfg = load(None, {"app": "m:app", "user": str(uid), "group": str(gid)})
    assert (cfg.user, cfg.group) == (str(uid), str(gid))
    assert load(None, {"app": "m:app", "user": 0}).user == "0"


@pytest.mark.parametrize(
    ("yaml_text", "line", "key", "message"),
    [
        ("user: no-such-user-pf", 2, "user", "no such user 'no-such-user-pf'"),
        ("group: no-such-group-pf", 2, "group", "no such group 'no-such-group-pf'"),
        (
            "bind:\n  - {address: unix:x.sock, owner: no-such-user-pf}",
            3,
            "bind[0].owner",
            "no such user",
        ),
        (
            "bind:\n  - {address: unix:x.sock, group: no-such-group-pf}",
            3,
            "bind[0].group",
            "no such group",
        ),
        ("user: 4294967295", 2, "user", "user id must be from 0 to 4294967294"),
        ("group: '99999999999'", 2, "group", "group id must be from 0 to 4294967294"),
        ("user: -1", 2, "user", "no such user '-1'"),
        ("user: true", 2, "user", "must be a string, got True"),
        ("group: 1.5", 2, "group", "must be a string, got 1.5"),
    ],
)
def test_user_and_group_errors(
    write: Writer, yaml_text: str, line: int, key: str, message: str
) -> None:
    path = write(f"app: m:app\n{yaml_text}\n")
    check_error(error_of(path), path, line, key, message)


def test_user_and_group_names_that_exist(write: Writer) -> None:
    user, group = pwd.getpwuid(os.getuid()).pw_name, grp.getgrgid(os.getgid()).gr_name
    path = write(f"app: m:app\nuser: {user}\ngroup: {group}\n")
    assert (load(path).user, load(path).group) == (user, group)


# --- overrides ----------------------------------------------------------------------------


def test_overrides_win_over_file(write: Writer) -> None:
    path = write(
        """
        app: m:app
        bind: ["127.0.0.1:1", "127.0.0.1:2"]
        workers:
          count: 3
          timeout: 9
        logging:
          level: info
        """
    )
    cfg = load(
        path,
        {
            "workers.count": 5,
            "bind": ["127.0.0.1:3"],
            "logging.level": "debug",
            "preload_app": True,
            "app": "other:app",
        },
    )
    assert cfg.workers.count == 5
    assert cfg.workers.timeout == 9.0  # untouched keys of the section stay
    assert cfg.bind == (BindConfig("127.0.0.1:3"),)  # a list replaces, not appends
    assert cfg.logging.level == "debug"
    assert cfg.preload_app is True
    assert cfg.app == "other:app"


def test_override_section_mapping_merges(write: Writer) -> None:
    path = write("app: m:app\nworkers:\n  count: 3\n  timeout: 9\n")
    cfg = load(path, {"workers": {"count": 7}})
    assert (cfg.workers.count, cfg.workers.timeout) == (7, 9.0)


def test_override_into_null_section(write: Writer) -> None:
    path = write("app: m:app\nworkers:\n")
    assert load(path, {"workers.count": 7}).workers.count == 7


def test_override_errors_name_command_line(write: Writer) -> None:
    path = write("app: m:app\n")
    err = error_of(path, {"workers.count": "two"})
    assert str(err) == ("command line: workers.count: must be an integer from 1 to 1024, got 'two'")
    err = error_of(path, {"workers.max_request": 1})
    check_error(err, "command line", None, "workers.max_request", "did you mean 'max_requests'?")
    err = error_of(path, {"bind": ["127.0.0.1:80", "nope"]})
    check_error(err, "command line", None, "bind[1]", "missing port")
    err = error_of(path, {"workers..count": 1})
    check_error(err, "command line", None, "workers..count", "not a valid setting name")
    err = error_of(path, {"source": "x.yaml"})
    check_error(err, "command line", None, "source", "unknown key 'source'")


def test_override_fixes_file_error(write: Writer) -> None:
    path = write("app: m:app\nworkers:\n  count: 0\n")
    assert error_of(path).line == 3
    assert load(path, {"workers.count": 2}).workers.count == 2


def test_file_errors_still_reported_with_overrides(write: Writer) -> None:
    path = write("app: m:app\nworkers:\n  count: 0\n")
    check_error(error_of(path, {"workers.timeout": 3}), path, 3, "workers.count", "from 1 to")


# --- from_mapping -------------------------------------------------------------------------


def test_from_mapping(tmp_path: Path) -> None:
    cfg = from_mapping(
        {"app": "m:app", "workers": {"count": 3}, "pythonpath": ["lib"], "bind": "unix:s"},
        base_dir=str(tmp_path),
    )
    assert cfg.workers.count == 3
    assert cfg.pythonpath == (str(tmp_path / "lib"),)
    assert cfg.bind == (BindConfig(f"unix:{tmp_path / 's'}"),)
    assert cfg.source == ""


def test_from_mapping_errors() -> None:
    with pytest.raises(ConfigError) as info:
        from_mapping({"app": "m:app", "http": {"max_body_size": -1}}, source="test")
    assert str(info.value).startswith("test: http.max_body_size: must be from 0 to")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        from_mapping(["app"], source="test")  # type: ignore[arg-type]


# --- schema and docs ----------------------------------------------------------------------


def _all_fields() -> Iterator[tuple[type, dataclasses.Field[Any]]]:
    for cls in (Config, BindConfig, WorkersConfig, HttpConfig, LoggingConfig):
        for f in dataclasses.fields(cls):
            yield cls, f


def test_every_field_is_documented() -> None:
    for cls, f in _all_fields():
        doc = f.metadata.get("doc")
        assert isinstance(doc, str) and doc and "\n" not in doc, (cls.__name__, f.name)


def test_only_app_and_bind_address_are_required() -> None:
    required = [
        f"{cls.__name__}.{f.name}"
        for cls, f in _all_fields()
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    assert required == ["Config.app", "BindConfig.address"]


def test_defaults_are_within_their_own_ranges() -> None:
    for cls, f in _all_fields():
        lo, hi = f.metadata.get("min"), f.metadata.get("max")
        if lo is not None and f.default is not None and f.default is not dataclasses.MISSING:
            assert lo <= f.default <= hi, (cls.__name__, f.name)
        if f.metadata.get("choices"):
            assert f.default in f.metadata["choices"], (cls.__name__, f.name)


def test_field_docs() -> None:
    rows = {key: (type_text, default, doc) for key, type_text, default, doc in field_docs()}
    assert "source" not in rows
    assert rows["app"][1] == "required"
    assert rows["workers.count"] == ("integer from 1 to 1024", "2", "Worker processes.")
    assert rows["workers.boot_timeout"][0] == "number more than 0 and at most 86400"
    assert rows["bind"][1] == '["127.0.0.1:8000"]'
    assert rows["bind[].mode"][0] == "octal file mode from 0 to 0o777, or null"
    assert rows["logging.level"][0] == "one of debug, info, warning, error, critical"
    assert rows["logging.access_log"][:2] == ("path, or null", "null")
    assert rows["preload_app"][:2] == ("true or false", "false")
    assert rows["user"][0] == "name or numeric id, or null"
    assert rows["bind[].owner"][0] == "name or numeric id, or null"
    documented = {key.rsplit(".", 1)[-1] for key in rows}
    for _, f in _all_fields():
        sections = ("source", "workers", "http", "logging", "syslog", "admin", "hooks", "tls",
                    "stream", "statsd")
        if f.name not in sections:
            assert f.name in documented


def test_settings_markdown_is_deterministic() -> None:
    text = settings_markdown()
    assert text == settings_markdown()
    assert text.startswith("# Settings\n")
    assert "make docs" in text
    assert text.endswith("\n")
    for key, *_ in field_docs():
        assert f"| `{key}` |" in text


def test_docs_settings_md_is_current() -> None:
    committed = (REPO / "docs" / "settings.md").read_text()
    assert committed == settings_markdown(), "docs/settings.md is stale: run make docs"


def test_uses_libyaml_when_available() -> None:
    if hasattr(yaml, "CSafeLoader"):
        assert config_module._LOADER.__name__ == "CSafeLoader"


# --- the status endpoint apart from the listeners -----------------------------------------


@pytest.mark.parametrize(
    "bind, admin",
    [
        ("127.0.0.1:9000", "127.0.0.1:9000"),
        ("0.0.0.0:9000", "127.0.0.1:9000"),
        ("localhost:9000", "'[::1]:9000'"),
        ("'9000'", "localhost:9000"),
        ("'[::1]:9000'", "'[0:0:0:0:0:0:0:1]:9000'"),
    ],
)
def test_admin_bind_taken_by_a_listener(write: Writer, bind: str, admin: str) -> None:
    path = write(f"app: m:app\nbind: [{bind}]\nadmin:\n  status_interval: 2\n  bind: {admin}\n")
    check_error(error_of(path), path, 5, "admin.bind", "needs a port of its own")


@pytest.mark.parametrize(
    "bind, admin",
    [("127.0.0.1:9000", "127.0.0.1:9001"), ("'[::]:9000'", "127.0.0.1:9000"),
     ("127.0.0.1:0", "127.0.0.1:0"), ("'[::1]:9000'", "localhost:9000"),
     ("'[::]:9000'", "localhost:9000")],
)
def test_admin_bind_beside_a_listener(write: Writer, bind: str, admin: str) -> None:
    """The status endpoint binds localhost as 127.0.0.1 only (AF_INET), beside IPv6
    listeners, which are V6ONLY."""
    path = write(f"app: m:app\nbind: [{bind}]\nadmin: {{bind: '{admin}'}}\n")
    assert load(path).admin.bind == admin


def test_admin_socket_taken_by_a_listener(write: Writer, tmp_path: Path) -> None:
    sock = tmp_path / "app.sock"
    spelled = f"{tmp_path}/./app.sock"  # the same file
    path = write(f"app: m:app\nbind: ['unix:{spelled}']\nadmin:\n  socket: {sock}\n")
    check_error(error_of(path), path, 4, "admin.socket", "is bind[0]'s socket file")


def test_default_status_socket_taken_by_a_listener(write: Writer, tmp_path: Path) -> None:
    pidfile = tmp_path / "app.pid"
    path = write(f"app: m:app\nbind: ['unix:{pidfile}.sock']\npidfile: {pidfile}\n")
    check_error(error_of(path), path, 3, "pidfile", "set admin.socket to another path")


@pytest.mark.parametrize(
    ("entry", "message"),
    [("healthz", "starting with /"), ("/a*b", "* only at its end"), ("/a b", "printable ASCII"),
     ("/caf\u00e9", "printable ASCII")],
)
def test_access_log_skip_entries_are_paths(write: Writer, entry: str, message: str) -> None:
    path = write(f"app: m:app\nlogging:\n  access_log_skip:\n    - /ok\n    - '{entry}'\n")
    check_error(error_of(path), path, 5, "logging.access_log_skip[1]", message)


def test_access_log_skip_takes_paths_and_prefixes(write: Writer) -> None:
    path = write("app: m:app\nlogging: {access_log_skip: [/healthz, '/static/*', '/*']}\n")
    assert load(path).logging.access_log_skip == ("/healthz", "/static/*", "/*")
