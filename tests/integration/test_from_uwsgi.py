"""A uWSGI 2.0 operator's move to preforkd, side by side (docs/FROM-UWSGI.md).

Two kinds of tests. DEFECT tests fail on the code before the fix their docstring names:
a `backlog` above net.core.somaxconn silently capped (uWSGI refuses to start), nginx left
on `uwsgi_pass` failing every request with nothing in any error log, no REQUEST_URI in the
environ, a uWSGI `logformat` refused with a hint that leads nowhere, a uWSGI `wsgi-file`
path in `app` refused without saying the module form. PINNED tests hold behaviour the
guide promises a uWSGI user and no other test checked: TERM stops (die-on-term) and
vacuums, the harakiri equivalent, the buffer-size equivalent, need-app and strict,
chmod-socket, threads without enable-threads, a strict mount, the guide's worked
example (its YAML passes `check` and serves; its nginx block forwards the client), and its
"Keeping uwsgi_pass" (protocol: uwsgi behind the nginx block from before the move).

Servers run through server_factory, which stops them by pid (SIGTERM, then SIGKILL to the
group) at teardown whatever the test did; short commands through detached.preforkd, bounded
by a timeout; nginx through test_nginx's Nginx, stopped by pid in a `finally`.
"""

from __future__ import annotations

import json
import pwd
import re
import signal
import stat
import struct
from pathlib import Path
from typing import Any

import pytest
import yaml

from detached import preforkd
from harness import (
    ServerFactory,
    connect,
    example_site,
    fetch,
    guide_block,
    http_request,
    read_response,
    recv_within,
    send_raw,
    wait_until,
)
from test_nginx import CLIENT_HOST, NGINX_HOST, Nginx, connect_from, nginx_binary

REPO = Path(__file__).resolve().parents[2]
GUIDE = REPO / "docs" / "FROM-UWSGI.md"

APP = """
import json, os, sys, threading, time

TICKS = [0]

def _tick():
    while True:
        TICKS[0] += 1
        time.sleep(0.01)

# started at import, with no enable-threads or anything else
threading.Thread(target=_tick, daemon=True).start()

def application(environ, start_response):
    path = environ["PATH_INFO"]
    if path == "/slow":
        print("app: slow request started", file=sys.stderr, flush=True)
        time.sleep(30)
    if path.endswith("/env"):
        before = TICKS[0]
        time.sleep(0.1)
        keys = ("REQUEST_URI", "RAW_URI", "SCRIPT_NAME", "PATH_INFO", "QUERY_STRING",
                "REMOTE_ADDR", "HTTP_HOST", "wsgi.url_scheme")
        data = {key: environ.get(key) for key in keys}
        data["ticks"] = TICKS[0] - before
        data["env"] = {name: os.environ.get(name) for name in ("PF_N", "PF_F", "PF_R")}
        start_response("200 OK", [("Content-Type", "application/json")])
        return [json.dumps(data).encode()]
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [("pid=%d" % os.getpid()).encode()]
"""


def app_settings(**more: Any) -> dict[str, Any]:
    return {"app": "app:application", **more}


def environ_of(address: Any, target: str) -> dict[str, Any]:
    response = fetch(address, "GET", target)
    assert response.status == 200, response
    data: dict[str, Any] = json.loads(response.body)
    return data


def uwsgi_packet(variables: list[tuple[str, str]]) -> bytes:
    """A request in uWSGI's binary protocol, as nginx's uwsgi_pass sends it: modifier1 0, the
    size of the variables (16-bit little-endian), modifier2 0, then each name and value
    preceded by its 16-bit size."""
    body = b""
    for name, value in variables:
        for text in (name.encode(), value.encode()):
            body += struct.pack("<H", len(text)) + text
    return struct.pack("<BHB", 0, len(body), 0) + body


UWSGI_PARAMS = [  # the first of nginx's uwsgi_params, in its order
    ("QUERY_STRING", ""), ("REQUEST_METHOD", "GET"), ("CONTENT_TYPE", ""),
    ("CONTENT_LENGTH", ""), ("REQUEST_URI", "/hello"), ("PATH_INFO", "/hello"),
    ("DOCUMENT_ROOT", "/usr/share/nginx/html"), ("SERVER_PROTOCOL", "HTTP/1.1"),
    ("REQUEST_SCHEME", "http"), ("REMOTE_ADDR", "127.0.0.1"), ("REMOTE_PORT", "40000"),
    ("SERVER_PORT", "80"), ("SERVER_NAME", "localhost"), ("HTTP_HOST", "localhost"),
]
UWSGI_WARNING = re.compile(
    r"\[WARNING\] (\S+): a request from (\S+) in uWSGI's binary protocol .*got 400: "
    r"this listener speaks HTTP \(protocol: http\); set `protocol: uwsgi` to serve "
    r"uwsgi_pass, or point nginx at it with proxy_pass"
)


# --- DEFECTS ---------------------------------------------------------------------------------


def somaxconn() -> int:
    return int(Path("/proc/sys/net/core/somaxconn").read_text())


def test_a_backlog_the_kernel_caps_is_warned_about_at_start_and_by_check(
    server_factory: ServerFactory, short_tmp: Path
) -> None:
    """DEFECT. uWSGI refuses to start with `listen` above net.core.somaxconn ("Listen queue
    size is greater than the system max net.core.somaxconn (4096)"); preforkd took
    `backlog: 8192` and served with an accept queue of 4096, saying nothing: an operator
    who raised the backlog for bursts believes he has twice the queue he has. The start,
    and `check`, now warn, naming each socket's real queue."""
    cap = somaxconn()
    if cap >= 65535:
        pytest.skip("net.core.somaxconn is at least backlog's maximum: nothing is capped")
    sock = short_tmp / "app.sock"
    settings = app_settings(bind=["127.0.0.1:0", f"unix:{sock}"], backlog=cap + 1,
                            workers={"count": 1})
    server = server_factory(settings, app_source=APP)
    warning = server.wait_for_log("[WARNING] backlog is")
    line = server.log()[warning.start() :].splitlines()[0]
    url = server.url
    assert f"backlog is {cap + 1}, but the kernel caps the accept queue of " in line, line
    assert f"{url} at {cap}" in line and f"unix:{sock} at {cap}" in line, line
    assert "net.core.somaxconn" in line, line
    assert fetch(server.addresses()[0]).status == 200

    # `check` says it too (and still passes: the server runs, with the smaller queue)...
    other = short_tmp / "other"
    other.mkdir()
    (other / "app.py").write_text(APP)
    config = other / "preforkd.yaml"
    config.write_text(json.dumps(app_settings(bind=["127.0.0.1:0"], backlog=cap + 1,
                                              pythonpath=[str(other)])))
    result = preforkd("check", "-c", str(config))
    assert result.returncode == 0, result.stderr
    assert f"warning: backlog is {cap + 1}, but the kernel caps" in result.stdout, result.stdout
    # ...and says nothing of a backlog the kernel grants
    config.write_text(json.dumps(app_settings(bind=["127.0.0.1:0"], backlog=cap,
                                              pythonpath=[str(other)])))
    result = preforkd("check", "-c", str(config))
    assert result.returncode == 0, result.stderr
    assert "warning" not in result.stdout, result.stdout


def test_a_uwsgi_protocol_request_is_answered_400_and_logged_once_a_minute(
    server_factory: ServerFactory,
) -> None:
    """DEFECT. A uWSGI site moved to preforkd with nginx still on `uwsgi_pass` gets 400 for
    every request; nginx passes the 400 on and logs no error, and preforkd logged the
    rejection at debug only: nothing in any error log says why. The worker now logs a
    warning naming the listener, `protocol: uwsgi` (which serves it) and proxy_pass (at
    most once a minute: every request of such a proxy is one)."""
    server = server_factory(app_settings(workers={"count": 1}), app_source=APP)
    address = server.addresses()[0]
    for _ in range(2):
        answer = send_raw(address, uwsgi_packet(UWSGI_PARAMS))
        assert answer.startswith(b"HTTP/1.1 400 Bad Request\r\n"), answer
    # the warning is written before the answer is sent: both are in the log by now
    warnings = UWSGI_WARNING.findall(server.log())
    assert warnings == [(server.url, "127.0.0.1")], server.log_tail()
    # an ordinary bad request is not taken for one
    assert send_raw(address, b"\x00\x01\x02\x03\r\n\r\n").startswith(b"HTTP/1.1 400 ")
    assert fetch(address).status == 200
    assert len(UWSGI_WARNING.findall(server.log())) == 1, server.log_tail()


def test_nginx_left_on_uwsgi_pass_shows_in_the_preforkd_error_log(
    server_factory: ServerFactory, tmp_path: Path
) -> None:
    """DEFECT, with a real nginx: `uwsgi_pass` to preforkd (the uWSGI setup's location block
    kept as it was). The client gets preforkd's 400 through nginx, nginx's error log has
    nothing, and preforkd's now says what to change."""
    server = server_factory(app_settings(workers={"count": 1}), app_source=APP)
    _, host, port = server.addresses()[0]
    params = "\n".join(
        f"        uwsgi_param {name} ${var};"
        for name, var in (("QUERY_STRING", "query_string"), ("REQUEST_METHOD", "request_method"),
                          ("REQUEST_URI", "request_uri"), ("PATH_INFO", "document_uri"),
                          ("SERVER_PROTOCOL", "server_protocol"), ("REMOTE_ADDR", "remote_addr"),
                          ("HTTP_HOST", "host"))
    )
    nginx = Nginx(nginx_binary(), tmp_path / "nginx", http_conf=f"""
    server {{
        listen {NGINX_HOST}:{{port}};
        location / {{
{params}
            uwsgi_pass {host}:{port};
        }}
    }}
""")
    try:
        nginx.start()
        response = fetch(("http", NGINX_HOST, nginx.port), "GET", "/hello")
        assert response.status == 400, f"{response}\n{nginx.log()}"
        match = server.wait_for_log(UWSGI_WARNING)
        assert match.group(1) == server.url
    finally:
        nginx.stop()


def test_request_uri_is_the_target_as_sent(
    server_factory: ServerFactory,
) -> None:
    """DEFECT. uWSGI's environ has REQUEST_URI (its http-socket sets it; nginx's
    uwsgi_params passes it), as mod_wsgi's and CGI's do; preforkd had only gunicorn's
    RAW_URI, so an application reading environ["REQUEST_URI"] failed with KeyError after the
    move. Both now hold the target as the client sent it, a mount's prefix included."""
    server = server_factory(app_settings(http={"script_name": "/app"}), app_source=APP)
    address = server.addresses()[0]
    target = "/app/caf%C3%A9/env?a=1&b=%20x"
    environ = environ_of(address, target)
    assert environ["REQUEST_URI"] == environ["RAW_URI"] == target, environ
    path = "/café/env".encode().decode("latin-1")  # PEP 3333: bytes as latin-1
    assert (environ["SCRIPT_NAME"], environ["PATH_INFO"]) == ("/app", path), environ


def test_a_uwsgi_logformat_is_refused_with_a_translation_that_works(
    server_factory: ServerFactory, tmp_path: Path
) -> None:
    """DEFECT. uWSGI's logformat variables (`%(addr) %(method) %(uri) %(status)`) carried over
    into access_log_format were refused with "%(addr) : atoms are written %(addr)s": a hint
    that leads to another error (%(addr)s is no atom either). The error now names them and
    gives the whole format in gunicorn's atoms; pasted back, it logs what uWSGI logged."""
    uwsgi_format = (
        '%(addr) - %(user) [%(ltime)] "%(method) %(uri) %(proto)" %(status) %(size) %(msecs)ms'
    )
    config = tmp_path / "preforkd.yaml"
    (tmp_path / "app.py").write_text(APP)

    def write(fmt: str) -> None:
        config.write_text(json.dumps(app_settings(
            pythonpath=[str(tmp_path)], logging={"access_log": "-", "access_log_format": fmt})))

    write(uwsgi_format)
    result = preforkd("check", "-c", str(config))
    assert result.returncode == 2, result
    assert "are uWSGI logformat variables" in result.stderr, result.stderr
    translated = re.search(r"in those, '(.*)'\n", result.stderr)
    assert translated is not None, result.stderr
    assert translated.group(1) == (
        '%(h)s - %(u)s %(t)s "%(m)s %({REQUEST_URI}e)s %(H)s" %(s)s %(B)s %(M)sms'
    )
    # a gunicorn-style name that is uWSGI's gets the atom in its "unknown atom" error
    write("%(addr)s %(status)s")
    result = preforkd("check", "-c", str(config))
    assert result.returncode == 2
    assert "unknown atom %(addr)s (uWSGI's %(addr) is %(h)s here)" in result.stderr

    server = server_factory(app_settings(logging={
        "access_log": "-", "access_log_format": translated.group(1)}), app_source=APP)
    assert fetch(server.addresses()[0], "GET", "/hello?x=1").status == 200
    line = wait_until(lambda: server.stdout().strip(), 5, message="no access log line")
    assert re.fullmatch(
        r'127\.0\.0\.1 - - \[[^]]+\] "GET /hello\?x=1 HTTP/1\.1" 200 \d+ \d+ms', line
    ), line


def test_a_uwsgi_wsgi_file_in_app_says_the_module_form(tmp_path: Path) -> None:
    """DEFECT. uWSGI names the application by file (`wsgi-file = /srv/app/wsgi.py`); the same
    in `app` was refused as "must be 'module', 'module:callable' ..." with no word of how to
    name a file, and `app: wsgi.py` failed to import as the package `wsgi` (exit 3). Both
    errors now give the module form, which then works."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "wsgi.py").write_text(APP)
    config = tmp_path / "preforkd.yaml"
    config.write_text(json.dumps({"app": str(site / "wsgi.py"), "bind": ["127.0.0.1:0"]}))
    result = preforkd("check", "-c", str(config))
    assert result.returncode == 2, result
    assert (f"write app: 'wsgi:application' and put {str(site)!r} in pythonpath"
            in result.stderr), result.stderr

    config.write_text(json.dumps({"app": "wsgi.py", "pythonpath": [str(site)],
                                  "bind": ["127.0.0.1:0"]}))
    result = preforkd("check", "-c", str(config))
    assert result.returncode == 3, result
    assert "('wsgi.py' names a file: the module is 'wsgi')" in result.stderr, result.stderr

    config.write_text(json.dumps({"app": "wsgi:application", "pythonpath": [str(site)],
                                  "bind": ["127.0.0.1:0"]}))
    assert preforkd("check", "-c", str(config)).returncode == 0


# --- PINNED: what the guide promises ------------------------------------------------------


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGQUIT])
def test_term_stops_instead_of_reloading_and_vacuums(
    server_factory: ServerFactory, short_tmp: Path, sig: signal.Signals
) -> None:
    """PINNED. uWSGI 2.0's TERM is a brutal reload unless die-on-term; preforkd's stops (exit
    0), and QUIT too, removing what uWSGI's vacuum removes: the unix socket and the pidfile
    (and the status endpoint's files)."""
    sock, pidfile = short_tmp / "app.sock", short_tmp / "app.pid"
    server = server_factory(
        app_settings(bind=[f"unix:{sock}"], pidfile=str(pidfile)), app_source=APP
    )
    made = [sock, pidfile, Path(f"{pidfile}.sock"), Path(f"{pidfile}.status")]
    assert all(path.exists() for path in made), list(short_tmp.iterdir())
    assert fetch(str(sock)).status == 200
    server.signal(sig)
    assert server.wait_exit(15) == 0, server.log_tail()
    assert "reload" not in server.log().lower(), server.log_tail()
    assert list(short_tmp.iterdir()) == [], list(short_tmp.iterdir())


def test_the_harakiri_equivalent(server_factory: ServerFactory) -> None:
    """PINNED. workers.timeout does what harakiri + harakiri-verbose do: the client's
    connection closes with no response (as under uWSGI: "Empty reply from server"), the log
    names the request and its client (as harakiri's line does; behind a trusted proxy, the
    client it names) and holds the Python stack of the worker (the application's frame in
    it), the request gets no access-log line, and a new worker serves the next request."""
    server = server_factory(
        app_settings(workers={"count": 1, "timeout": 1, "timeout_grace": 1},
                     logging={"access_log": "-"}),
        app_source=APP,
    )
    address = server.addresses()[0]
    first = fetch(address).body
    with connect(address, timeout=15) as sock:
        sock.sendall(http_request("GET", "/slow?id=7", [("X-Forwarded-For", "203.0.113.9")]))
        received, closed = recv_within(sock, 15)
    assert (received, closed) == (b"", True), received
    log = server.log()
    assert re.search(r"\[ERROR\] worker 1 \(pid \d+\) timed out after [\d.]+s serving "
                     r"GET /slow\?id=7 from 203\.0\.113\.9; dumping its stack and killing it",
                     log), log
    assert re.search(r'File ".*app\.py", line \d+ in application', log), log
    second = fetch(address).body
    assert second != first  # another worker (pid)
    lines = wait_until(lambda: len(server.stdout().splitlines()) >= 2 and server.stdout(), 5)
    assert "/slow" not in lines, lines


def test_the_buffer_size_equivalent(server_factory: ServerFactory) -> None:
    """PINNED. uWSGI closes the connection, with no answer, on a request head over
    buffer-size; preforkd answers 431, and logs nothing at info. A big cookie, the usual
    reason to raise buffer-size, is bounded by max_field_size (8190) whatever
    max_header_size allows: both must be raised, as the guide's example does."""
    cookie = ("Cookie", "session=" + "a" * 10_000)
    server = server_factory(app_settings(http={"max_header_size": 65536}), app_source=APP)
    address = server.addresses()[0]
    assert fetch(address, headers=[cookie]).status == 431
    many = [(f"X-Filler-{i}", "b" * 4000) for i in range(20)]  # 80 KB in all
    assert fetch(address, headers=many).status == 431
    assert "431" not in server.log() and "too large" not in server.log(), server.log_tail()

    raised = server_factory(
        app_settings(http={"max_header_size": 65536, "max_field_size": 16384}), app_source=APP
    )
    assert fetch(raised.addresses()[0], headers=[cookie]).status == 200


def test_need_app_and_strict_are_always_on(
    server_factory: ServerFactory, tmp_path: Path
) -> None:
    """PINNED. An application that cannot be imported stops the start with 3 (uWSGI without
    need-app starts and answers every request with 500); a uWSGI option left in the file is
    an error naming it (uWSGI's strict), exit 2."""
    server = server_factory({"app": "no_such_module:application"}, wait_ready=False)
    assert server.wait_exit(20) == 3, server.log_tail()
    config = tmp_path / "strict.yaml"
    config.write_text("app: app:application\nharakiri: 30\n")
    result = preforkd("check", "-c", str(config))
    assert result.returncode == 2, result
    assert "harakiri" in result.stderr, result.stderr


def test_chmod_socket_and_threads_and_env(
    server_factory: ServerFactory, short_tmp: Path
) -> None:
    """PINNED. bind mode 660 (uWSGI's chmod-socket = 660) is octal however written; a thread
    the application starts at import runs in the worker without any enable-threads; env
    numbers and booleans reach the application as text ("0", "true", "1.5")."""
    sock = short_tmp / "app.sock"
    server_factory(
        app_settings(bind=[{"address": f"unix:{sock}", "mode": 660}],
                     env={"PF_N": 0, "PF_F": True, "PF_R": 1.5}),
        app_source=APP,
    )
    assert stat.S_IMODE(sock.stat().st_mode) == 0o660
    environ = environ_of(str(sock), "/env")
    assert environ["ticks"] > 0, environ
    assert environ["env"] == {"PF_N": "0", "PF_F": "true", "PF_R": "1.5"}, environ


def test_a_request_outside_the_mount_gets_400(server_factory: ServerFactory) -> None:
    """PINNED. uWSGI's mount hands a path outside every mountpoint to the default app (with
    SCRIPT_NAME ""); http.script_name answers it with 400, as gunicorn does."""
    server = server_factory(app_settings(http={"script_name": "/app"}), app_source=APP)
    address = server.addresses()[0]
    assert environ_of(address, "/app/env")["SCRIPT_NAME"] == "/app"
    assert fetch(address, "GET", "/application").status == 400
    assert fetch(address, "GET", "/other").status == 400


# --- PINNED: the guide's worked example -----------------------------------------------------


def test_the_worked_example_passes_check_and_serves(
    server_factory: ServerFactory, short_tmp: Path
) -> None:
    """PINNED. The guide's translation of the uwsgi.ini validates with `preforkd check` (exit
    0, no warning), and a server started from it makes the socket nginx needs (mode 660,
    www-data's), serves on it, and leaves nothing behind at TERM."""
    text = example_site(GUIDE, short_tmp, "myapp", APP, ["settings"])
    config = short_tmp / "preforkd.yaml"
    config.write_text(text)
    result = preforkd("check", "-c", str(config))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "warning" not in result.stdout, result.stdout

    sock, pidfile = short_tmp / "run" / "http.sock", short_tmp / "run" / "preforkd.pid"
    # the error log to stderr, so the harness sees "ready"
    server = server_factory(config_text=text, args=["--error-log", "-"])
    info = sock.stat()
    www = pwd.getpwnam("www-data")
    assert (stat.S_IMODE(info.st_mode), info.st_uid, info.st_gid) == (
        0o660, www.pw_uid, www.pw_gid)
    assert pidfile.exists()
    with connect(str(sock)) as conn:
        conn.sendall(http_request("GET", "/hello"))
        assert read_response(conn).status == 200
    server.signal(signal.SIGTERM)
    assert server.wait_exit(15) == 0, server.log_tail()
    assert not sock.exists() and not pidfile.exists()
    assert "GET /hello" in (short_tmp / "log" / "access.log").read_text()


NGINX_LOCATION = """
        proxy_pass http://myapp;
        proxy_http_version 1.1;
        proxy_set_header Connection "";
        proxy_set_header Host $host;
        proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
        proxy_set_header X-Forwarded-Proto $scheme;
"""


def test_the_worked_example_nginx_block_forwards_the_client(
    server_factory: ServerFactory, short_tmp: Path, tmp_path: Path
) -> None:
    """PINNED. The guide's proxy_pass block (the replacement for include uwsgi_params +
    uwsgi_pass) over a unix socket: the application gets the client's address, the Host the
    client sent, the scheme and REQUEST_URI, with no forwarded_allow_ips setting (a unix
    socket peer is trusted by default), on upstream keep-alive."""
    guide = guide_block(GUIDE, "nginx", "and after:")
    for line in NGINX_LOCATION.strip().splitlines():
        assert line.strip() in guide, f"the guide lost {line.strip()!r}"
    sock = short_tmp / "http.sock"
    server = server_factory(app_settings(bind=[f"unix:{sock}"]), app_source=APP)
    nginx = Nginx(nginx_binary(), tmp_path / "nginx", http_conf=f"""
    upstream myapp {{ server unix:{sock}; keepalive 16; }}
    server {{
        listen {NGINX_HOST}:{{port}};
        location / {{
{NGINX_LOCATION}
        }}
    }}
""")
    try:
        nginx.start()
        with connect_from(CLIENT_HOST, nginx.port) as client:
            for _ in range(2):
                client.sendall(http_request("GET", "/a/env?q=1", host="shop.example"))
                response = read_response(client)
                assert response.status == 200, f"{response}\n{nginx.log()}"
        environ = json.loads(response.body)
    finally:
        nginx.stop()
    assert environ["REMOTE_ADDR"] == CLIENT_HOST  # nginx's client, not nginx on the socket
    assert environ["HTTP_HOST"] == "shop.example"
    assert environ["wsgi.url_scheme"] == "http"
    assert environ["REQUEST_URI"] == "/a/env?q=1"
    assert server.running()



def test_keeping_uwsgi_pass_serves_the_before_block_unchanged(
    server_factory: ServerFactory, short_tmp: Path, tmp_path: Path
) -> None:
    """PINNED. The guide's "Keeping uwsgi_pass": its YAML lines (protocol: uwsgi, the socket
    nginx already uses) and the nginx block from before the move, as it was (but for the
    socket's directory and the absolute path of uwsgi_params): the application gets the
    client's address, the Host, REQUEST_URI and the scheme from nginx's variables."""
    fragment = yaml.safe_load(guide_block(GUIDE, "yaml", "## Keeping uwsgi_pass"))
    assert fragment["protocol"] == "uwsgi"
    (entry,) = fragment["bind"]
    sock = short_tmp / "uwsgi.sock"
    assert entry["address"] == "unix:/run/myapp/uwsgi.sock"
    entry["address"] = f"unix:{sock}"
    try:
        pwd.getpwnam(entry["owner"])
    except KeyError:  # no www-data here: the socket stays root's
        del entry["owner"], entry["group"]
    server = server_factory(app_settings(**fragment), app_source=APP)
    assert server.addresses() == [("unix", str(sock))]
    before = guide_block(GUIDE, "nginx", "nginx, before:")
    assert "include uwsgi_params;" in before and "/run/myapp/uwsgi.sock" in before
    location = before.replace("include uwsgi_params;", "include /etc/nginx/uwsgi_params;")
    nginx = Nginx(nginx_binary(), tmp_path / "nginx", http_conf=f"""
    server {{
        listen {NGINX_HOST}:{{port}};
        {location.replace("/run/myapp/uwsgi.sock", str(sock))}
    }}
""")
    try:
        nginx.start()
        with connect_from(CLIENT_HOST, nginx.port) as client:
            client.sendall(http_request("GET", "/a/env?q=1", host="shop.example"))
            response = read_response(client)
        assert response.status == 200, f"{response}\n{nginx.log()}"
        environ = json.loads(response.body)
    finally:
        nginx.stop()
    assert environ["REMOTE_ADDR"] == CLIENT_HOST
    assert environ["HTTP_HOST"] == "shop.example"
    assert environ["REQUEST_URI"] == "/a/env?q=1"
    assert (environ["SCRIPT_NAME"], environ["PATH_INFO"]) == ("", "/a/env")
    assert environ["wsgi.url_scheme"] == "http"
