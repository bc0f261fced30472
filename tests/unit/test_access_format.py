"""prefork.accessformat: gunicorn-style access-log formats, compiled at config load and when
Logs is built, rendered per line; and how Logs and the HTTP side feed them (environ, and the
response headers only for a format that logs one)."""

from __future__ import annotations

import base64
import json
import os
import re
import textwrap
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from prefork import accessformat
from prefork.accessformat import AccessRecord, compile_format, escape
from prefork.config import ConfigError, load
from prefork.logs import Logs
from tests.unit.worker_rig import WorkerRig, served_connection

ENVIRON: dict[str, Any] = {
    "REMOTE_ADDR": "192.0.2.7",
    "REQUEST_METHOD": "GET",
    "PATH_INFO": "/a b/ü",  # percent-decoded, as the worker puts it
    "QUERY_STRING": "x=1&y=2",
    "SERVER_PROTOCOL": "HTTP/1.1",
    "HTTP_X_REQUEST_ID": "req-42",
    "CONTENT_TYPE": "application/json",
    "HTTP_AUTHORIZATION": "Basic " + base64.b64encode(b"alice:secret").decode(),
    "wsgi.url_scheme": "https",
    "wsgi.version": (1, 0),
}
HEADERS = b"Content-Type: text/html\r\nSet-Cookie: a=1\r\nX-Trace: t-9\r\nset-cookie: b=2\r\n"


def record(**changes: Any) -> AccessRecord:
    base = AccessRecord(
        remote="192.0.2.7",
        method="GET",
        target="/a%20b/%C3%BC?x=1&y=2",
        protocol="HTTP/1.1",
        status=201,
        size=1234,
        referer="http://ref.test/",
        user_agent="agent/1.0",
        duration=2.0456789,
        environ=ENVIRON,
        headers=HEADERS,
    )
    return base._replace(**changes)


def render(fmt: str, **changes: Any) -> str:
    return compile_format(fmt).render(record(**changes))


# --- every atom -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("atom", "expected"),
    [
        ("h", "192.0.2.7"),
        ("l", "-"),
        ("u", "alice"),
        ("r", "GET /a%20b/%C3%BC?x=1&y=2 HTTP/1.1"),
        ("m", "GET"),
        ("U", "/a b/ü"),
        ("q", "x=1&y=2"),
        ("H", "HTTP/1.1"),
        ("s", "201"),
        ("B", "1234"),
        ("b", "1234"),
        ("f", "http://ref.test/"),
        ("a", "agent/1.0"),
        ("T", "2"),
        ("M", "2045"),
        ("D", "2045678"),
        ("L", "2.045679"),
        ("p", f"<{os.getpid()}>"),
        ("{x-request-id}i", "req-42"),
        ("{X-Request-ID}i", "req-42"),  # header names in any case
        ("{content-type}i", "application/json"),  # CONTENT_TYPE has no HTTP_ prefix
        ("{x-missing}i", "-"),
        ("{x-trace}o", "t-9"),
        ("{CONTENT-TYPE}o", "text/html"),
        ("{set-cookie}o", "a=1, b=2"),  # repeats joined, whatever their case
        ("{x-missing}o", "-"),
        ("{wsgi.url_scheme}e", "https"),
        ("{WSGI.URL_SCHEME}e", "https"),
        ("{remote_addr}e", "192.0.2.7"),  # CGI keys matched case-insensitively, as gunicorn
        ("{wsgi.version}e", "(1, 0)"),
        ("{NO_SUCH_VAR}e", "-"),
    ],
)
def test_every_atom(atom: str, expected: str) -> None:
    assert render(f"<%({atom})s>") == f"<{expected}>"


def test_t_is_the_apache_time_in_brackets() -> None:
    before = time.time()
    text = render("%(t)s")
    after = time.time()
    stamps = {
        time.strftime("[%d/%b/%Y:%H:%M:%S %z]", time.localtime(int(t))) for t in (before, after)
    }
    assert text in stamps
    assert re.fullmatch(r"\[\d{2}/[A-Z][a-z]{2}/\d{4}:\d{2}:\d{2}:\d{2} [+-]\d{4}\]", text)


def test_the_gunicorn_default_format() -> None:
    fmt = '%(h)s %(l)s %(u)s %(t)s "%(r)s" %(s)s %(b)s "%(f)s" "%(a)s"'
    line = render(fmt)
    assert re.fullmatch(
        r'192\.0\.2\.7 - alice \[[^\]]+\] "GET /a%20b/%C3%BC\?x=1&y=2 HTTP/1\.1" 201 1234 '
        r'"http://ref\.test/" "agent/1\.0"',
        line,
    ), line


def test_literal_text_and_percent() -> None:
    assert render("100%% %(s)s\tdone %(m)s%%") == "100% 201\tdone GET%"


def test_b_and_B_for_an_empty_body() -> None:
    assert render("%(b)s %(B)s", size=0) == "- 0"


def test_empty_or_missing_values_are_a_dash() -> None:
    env = {"PATH_INFO": "", "QUERY_STRING": "", "HTTP_X_EMPTY": ""}
    line = render(
        "%(h)s|%(f)s|%(a)s|%(U)s|%(q)s|%(u)s|%({x-empty}i)s|%({x}o)s",
        remote="", referer="", user_agent="", environ=env, headers=b"X: \r\n",
    )
    assert line == "-|-|-|-|-|-|-|-"


def test_without_an_environ() -> None:
    """A response the server made itself or a TCP connection: no environ, no headers; the
    atoms from the request line still work, U and q from the target."""
    line = render(
        "%(h)s %(u)s %(m)s %(U)s %(q)s %(H)s %(r)s %(s)s %({x-request-id}i)s "
        "%({wsgi.url_scheme}e)s %({content-type}o)s",
        environ=None,
        headers=None,
        method="POST",
        target="/up?big=1",
        status=413,
    )
    assert line == "192.0.2.7 - POST /up big=1 HTTP/1.1 POST /up?big=1 HTTP/1.1 413 - - -"
    assert render("%(U)s %(q)s %(r)s", environ=None, method="-", target="-", protocol="-") == (
        "- - - - -"
    )


# --- the user -----------------------------------------------------------------------------------


def basic(credentials: bytes) -> dict[str, Any]:
    return {"HTTP_AUTHORIZATION": "Basic " + base64.b64encode(credentials).decode()}


@pytest.mark.parametrize(
    ("environ", "expected"),
    [
        ({"REMOTE_USER": "bob", **basic(b"alice:pw")}, "bob"),  # set by the app wins
        (basic(b"alice:pw:with:colons"), "alice"),
        (basic("jürgen:pw".encode()), "jürgen"),
        (basic(b"nocolon"), "nocolon"),
        (basic(b'ev"il\\:pw'), 'ev\\"il\\\\'),
        ({"HTTP_AUTHORIZATION": "basic " + base64.b64encode(b"lower:pw").decode()}, "lower"),
        ({"HTTP_AUTHORIZATION": "Basic !!!not-base64"}, "-"),
        ({"HTTP_AUTHORIZATION": "Basic " + base64.b64encode(b"\xff\xfe:pw").decode()}, "-"),
        ({"HTTP_AUTHORIZATION": "Basic ünïcode"}, "-"),
        ({"HTTP_AUTHORIZATION": "Bearer abc.def"}, "-"),
        ({"HTTP_AUTHORIZATION": "Basic"}, "-"),
        ({}, "-"),
    ],
)
def test_user(environ: dict[str, Any], expected: str) -> None:
    assert render("%(u)s", environ=environ) == expected


# --- escaping -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("plain", "plain"),
        ("", "-"),
        ('say "hi"', 'say \\"hi\\"'),
        ("back\\slash", "back\\\\slash"),
        ("a\nb\r\nc", "a\\x0ab\\x0d\\x0ac"),
        ("nul\x00esc\x1bdel\x7f", "nul\\x00esc\\x1bdel\\x7f"),
        ("tab\there", "tab\\x09here"),
        ("nel\x85c1\x9f", "nel\\x85c1\\x9f"),  # C1 controls: U+0085 splits lines too
        ("ls\u2028ps\u2029", "ls\\u2028ps\\u2029"),
        ("ümlaut 日本", "ümlaut 日本"),  # printable text is left alone
    ],
)
def test_escape(value: str, expected: str) -> None:
    assert escape(value) == expected


def test_every_text_atom_is_escaped() -> None:
    nasty = 'x"y\\z\n\x85'
    escaped = 'x\\"y\\\\z\\x0a\\x85'
    env = {
        "PATH_INFO": nasty,
        "QUERY_STRING": nasty,
        "HTTP_X_A": nasty,
        "REMOTE_USER": nasty,
        "MY_VAR": nasty,
    }
    atoms = ["h", "m", "H", "f", "a", "U", "q", "u", "{x-a}i", "{x-b}o", "{my_var}e"]
    fmt = "|".join(f"%({atom})s" for atom in atoms)
    line = render(
        fmt, remote=nasty, method=nasty, protocol=nasty, referer=nasty, user_agent=nasty,
        environ=env, headers=b"X-B: " + nasty.encode("latin-1") + b"\r\n",
    )
    assert line == "|".join([escaped] * len(atoms))
    assert render("%(r)s", method=nasty, target="/t", protocol="P") == escaped + " /t P"
    assert len(line.splitlines()) == 1


def test_an_environ_value_whose_str_fails_is_a_dash() -> None:
    class Broken:
        def __str__(self) -> str:
            raise RuntimeError("no")

    assert render("%({odd}e)s", environ={"odd": Broken()}) == "-"


# --- compiling ------------------------------------------------------------------------------


def test_compiled_once_into_a_template_and_getters(monkeypatch: pytest.MonkeyPatch) -> None:
    compiled = compile_format('%(h)s "%(r)s" 100%% %({x-trace}o)s')
    assert compiled.template == '%s "%s" 100%% %s'
    assert len(compiled.getters) == 3
    assert compiled.response_headers is True

    def no_parsing(*args: object) -> None:
        raise AssertionError("the format was parsed again for a line")

    monkeypatch.setattr(accessformat, "compile_format", no_parsing)
    monkeypatch.setattr(accessformat, "_DIRECTIVE", None)
    assert compiled.render(record()) == '192.0.2.7 "GET /a%20b/%C3%BC?x=1&y=2 HTTP/1.1" 100% t-9'


@pytest.mark.parametrize(
    ("fmt", "wants"),
    [
        ("%(h)s %({x}i)s %({x}e)s", False),
        ("%(h)s %({x}o)s", True),
    ],
)
def test_response_headers_are_wanted_only_for_o_atoms(fmt: str, wants: bool) -> None:
    assert compile_format(fmt).response_headers is wants


@pytest.mark.parametrize(
    ("fmt", "parts"),
    [
        ("%(x)s", ("unknown atom %(x)s", "the atoms are h l u t")),
        ("%(host)s", ("unknown atom %(host)s",)),
        ("%({x}z)s", ("unknown atom %({x}z)s",)),
        ("%({}i)s", ("unknown atom %({}i)s",)),
        ("%(h)s %", ("lone '%' at column 7", "%% for a literal %")),
        ("50% %(h)s", ("lone '%' at column 3",)),
        ("%(h", ("unclosed '%(' at column 1",)),
        ("%(h)s %(r", ("unclosed '%(' at column 7",)),
        ("%(D)d", ("%(D)d", "atoms are written %(D)s")),
        ("%(h)", ("%(h) at the end",)),
        ("%({bad name}i)s", ("'bad name' is not a header name",)),
        ("%({x:y}o)s", ("'x:y' is not a header name",)),
        ("%({x_forwarded_for}i)s", ("can never have a value", "'_'")),
        ("%(h)s\n%(s)s", ("control characters", "'\\n'")),
        ("xml", ("must be combined, json, or a format with gunicorn's %(NAME)s atoms",)),
        ("", ("must be combined, json",)),
    ],
)
def test_malformed_formats(fmt: str, parts: tuple[str, ...]) -> None:
    with pytest.raises(ValueError) as info:
        compile_format(fmt)
    for part in parts:
        assert part in str(info.value), str(info.value)


# --- at config load -------------------------------------------------------------------------


def write_config(tmp_path: Path, fmt: str) -> str:
    path = tmp_path / "etc" / "preforkd.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    text = f"""
        app: m:app
        logging:
          level: info
          access_log_format: {fmt}
        """
    path.write_text(textwrap.dedent(text).lstrip("\n"))
    return str(path)


@pytest.mark.parametrize(
    ("fmt", "message"),
    [
        ("'%(h)s %(zz)s'", "unknown atom %(zz)s"),
        ("'%(h)s \"%(r)'", "%(r) at the end"),
        ("'%(h)s 5%'", "lone '%'"),
        ("xml", "must be combined, json, or a format"),
        ("'%({a_b}i)s'", "can never have a value"),
    ],
)
def test_a_bad_format_is_a_config_error_with_file_line_and_key(
    tmp_path: Path, fmt: str, message: str
) -> None:
    path = write_config(tmp_path, fmt)
    with pytest.raises(ConfigError) as info:
        load(path)
    err = info.value
    assert (err.source, err.line, err.key) == (path, 4, "logging.access_log_format"), str(err)
    assert message in err.message, str(err)
    assert str(err).startswith(f"{path}:4: logging.access_log_format: ")


def test_a_bad_format_on_the_command_line() -> None:
    with pytest.raises(ConfigError) as info:
        load(None, {"app": "m:app", "logging.access_log_format": "%(nope)s"})
    err = info.value
    assert (err.source, err.line, err.key) == (
        "command line", None, "logging.access_log_format"
    ), str(err)
    assert "unknown atom %(nope)s" in err.message


@pytest.mark.parametrize(
    ("fmt", "stored"),
    [
        ("combined", "combined"),
        ("JSON", "json"),
        ("Combined", "combined"),
        ("'%(h)s %({X-Id}i)s \"%(r)s\"'", '%(h)s %({X-Id}i)s "%(r)s"'),  # kept as written
    ],
)
def test_good_formats_load(tmp_path: Path, fmt: str, stored: str) -> None:
    assert load(write_config(tmp_path, fmt)).logging.access_log_format == stored


# --- through Logs ---------------------------------------------------------------------------


def access_line(logs: Logs, path: Path, **kwargs: Any) -> str:
    logs.access(
        "192.0.2.7", "GET", "/p?q=1", "1.1", 200, 5, "", "ua", 0.25, 3, **kwargs
    )
    return path.read_text().splitlines()[-1]


@pytest.fixture
def restore_loggers(logs: Logs) -> Logs:
    """The conftest `logs` fixture: each test here builds its own Logs, and the "prefork"
    logger is put back afterwards."""
    return logs


def test_logs_renders_a_custom_format(restore_loggers: Logs, tmp_path: Path) -> None:
    path = tmp_path / "access.log"
    fmt = '%(h)s "%(r)s" %(s)s %(b)s %(D)s %({x-id}i)s %({x-trace}o)s %(p)s'
    logs = Logs(access_log=str(path), access_format=fmt)
    assert logs.access_response_headers is True
    line = access_line(
        logs, path, environ={"HTTP_X_ID": "abc"}, response_headers=b"X-Trace: t1\r\n"
    )
    assert line == f'192.0.2.7 "GET /p?q=1 HTTP/1.1" 200 5 250000 abc t1 <{os.getpid()}>'
    # a stream connection or a rejected request: no environ, no headers
    line = access_line(logs, path)
    assert line == f'192.0.2.7 "GET /p?q=1 HTTP/1.1" 200 5 250000 - - <{os.getpid()}>'


@pytest.mark.parametrize("fmt", ["combined", "json", "%(h)s %({x}i)s"])
def test_logs_wants_no_response_headers_without_an_o_atom(
    restore_loggers: Logs, tmp_path: Path, fmt: str
) -> None:
    logs = Logs(access_log=str(tmp_path / "access.log"), access_format=fmt)
    assert logs.access_response_headers is False
    assert (logs.access_custom is None) is (fmt in ("combined", "json"))


def test_combined_is_unchanged(restore_loggers: Logs, tmp_path: Path) -> None:
    path = tmp_path / "access.log"
    logs = Logs(access_log=str(path))
    line = access_line(logs, path, environ={"HTTP_X_ID": "abc"}, response_headers=b"X: y\r\n")
    assert re.fullmatch(
        r'192\.0\.2\.7 - - \[\d{2}/[A-Z][a-z]{2}/\d{4}:\d{2}:\d{2}:\d{2} [+-]\d{4}\] '
        r'"GET /p\?q=1 HTTP/1\.1" 200 5 "-" "ua" 250000',
        line,
    ), line


def test_json_time_is_iso_8601_with_milliseconds_and_offset(
    restore_loggers: Logs, tmp_path: Path
) -> None:
    path = tmp_path / "access.log"
    logs = Logs(access_log=str(path), access_format="json")
    before = time.time()
    entry = json.loads(access_line(logs, path))
    after = time.time()
    stamp = entry["time"]
    assert re.fullmatch(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{3}[+-]\d{2}:\d{2}", stamp), stamp
    parsed = datetime.fromisoformat(stamp).timestamp()
    assert before - 0.001 <= parsed <= after
    assert stamp[-6:] == datetime.fromtimestamp(before).astimezone().isoformat()[-6:]


# --- the HTTP side hands over the response headers only when wanted ------------------------------


class RecordingLogs(Logs):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.calls: list[dict[str, Any]] = []

    def access(self, *args: Any, **kwargs: Any) -> None:
        self.calls.append(kwargs)
        super().access(*args, **kwargs)


@pytest.mark.parametrize(
    ("fmt", "expected_headers"),
    [
        ("combined", None),
        ("%(h)s %({host}i)s", None),
        ("%(h)s %({content-type}o)s", b"Content-Type: text/plain\r\nContent-Length: 2\r\n"),
    ],
)
def test_response_headers_reach_the_log_only_for_a_format_that_logs_them(
    worker_rig: WorkerRig, tmp_path: Path, fmt: str, expected_headers: bytes | None
) -> None:
    path = tmp_path / "access.log"
    worker_rig.logs = logs = RecordingLogs(access_log=str(path), access_format=fmt)
    worker, _ = worker_rig.worker()
    served_connection(worker_rig, worker)
    (call,) = logs.calls
    assert call["response_headers"] == expected_headers
    assert call["environ"]["PATH_INFO"] == "/"
    line = path.read_text().splitlines()[-1]
    if fmt.endswith("{host}i)s"):
        assert line == "127.0.0.1 t"
    elif "{content-type}o" in fmt:
        assert line == "127.0.0.1 text/plain"
