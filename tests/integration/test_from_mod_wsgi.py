"""An Apache httpd + mod_wsgi (daemon mode) operator's move to preforkd, side by side
(docs/FROM-MOD-WSGI.md).

Two kinds of tests. DEFECT tests fail on the code before the fix their docstring names: an
Apache LogFormat carried into access_log_format refused with "a lone '%'" and no way on,
wsgi.errors lost when the error log goes to syslog (mod_wsgi's always reaches Apache's
error log), and dot segments left in PATH_INFO (Apache resolves them, so a mount at /shop
was left by /shop/../admin and a prefix check passed by %2e%2e). PINNED tests hold what the
guide promises a mod_wsgi user and no other test checked: WSGIScriptAlias's SCRIPT_NAME /
PATH_INFO split and the environ beside it, WSGIPassAuthorization and WSGIChunkedRequest as
always on, Apache's core limits and the statuses that differ, Apache's graceful signals sent
out of habit (USR1 reloads nothing, WINCH stops nothing, no request lost), and the guide's
worked example (its YAML passes `check` and serves; its nginx block mounts under /shop).

The Apache side was observed with Apache 2.4.71 and mod_wsgi 4.9.4 on loopback; what it
answered is quoted in the docstrings (CI installs no Apache). Servers run through
server_factory, which stops them by pid (SIGTERM, then SIGKILL to the group) at teardown
whatever the test did; short commands through detached.preforkd, bounded by a timeout;
nginx through test_nginx's Nginx, stopped by pid in a `finally`.
"""

from __future__ import annotations

import json
import re
import signal
import threading
from functools import partial
from pathlib import Path
from typing import Any

import yaml

from detached import preforkd
from harness import (
    Address,
    ServerFactory,
    connect,
    example_site,
    fetch,
    guide_block,
    http_request,
    logging_to_datagrams,
    read_response,
    recv_within,
    wait_until,
)
from test_nginx import CLIENT_HOST, NGINX_HOST, Nginx, connect_from, nginx_binary

REPO = Path(__file__).resolve().parents[2]
GUIDE = REPO / "docs" / "FROM-MOD-WSGI.md"

APP = """
import json, os, sys, time

def application(environ, start_response):
    path = environ["PATH_INFO"]
    if path == "/slow":
        print("app: slow request started", file=sys.stderr, flush=True)
        time.sleep(float(environ["QUERY_STRING"] or "1"))
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [str(os.getpid()).encode()]
    if path == "/read":
        body = environ["wsgi.input"]
        first = body.read()
        data = {"first": first.decode("latin-1"), "again": body.read().decode(),
                "more": body.read(100).decode()}
        start_response("200 OK", [("Content-Type", "application/json")])
        return [json.dumps(data).encode()]
    if path == "/errors":
        errors = environ["wsgi.errors"]
        errors.write("app: wsgi.errors line one\\n")
        errors.writelines(["app: wsgi.errors line two\\n", "app: partial "])
        errors.write("line, then flush")
        errors.flush()
        start_response("204 No Content", [])
        return []
    if path == "/print":
        print("app: printed to stdout")
        start_response("204 No Content", [])
        return []
    keep = {k: v for k, v in environ.items() if isinstance(v, (str, bool))}
    keep["pid"] = os.getpid()
    start_response("200 OK", [("Content-Type", "application/json")])
    return [json.dumps(keep).encode()]
"""


def app_settings(**more: Any) -> dict[str, Any]:
    return {"app": "app:application", **more}


def environ_of(address: Address | str, target: str, **kwargs: Any) -> dict[str, Any]:
    response = fetch(address, "GET", target, **kwargs)
    assert response.status == 200, response
    data: dict[str, Any] = json.loads(response.body)
    return data


# --- DEFECTS ---------------------------------------------------------------------------------

# Apache's combined format, as Debian's apache2.conf defines it and as a site's LogFormat
# line carries it over (YAML's single quotes keep the \" of Apache's config file as it is)
APACHE_COMBINED = r'%h %l %u %t \"%r\" %>s %b \"%{Referer}i\" \"%{User-agent}i\"'
ATOMS_COMBINED = '%(h)s %(l)s %(u)s %(t)s "%(r)s" %(s)s %(b)s "%({Referer}i)s" "%({User-agent}i)s"'
# what Apache 2.4.71 wrote for such a request with that format
APACHE_LINE = ('127.0.0.1 - - [22/Nov/2026:05:26:25 +0000] "GET /mount/x?q=1 HTTP/1.1" 200 1717 '
               '"http://ref.example/" "agent/1.0"')
COMBINED_RE = re.compile(
    r'(\S+) (-) (-) \[\d\d/\w{3}/\d{4}:\d\d:\d\d:\d\d [+-]\d{4}\] "(GET \S+ HTTP/1\.1)" '
    r'(\d{3}) (\d+) "([^"]*)" "([^"]*)"'
)


def test_an_apache_logformat_is_refused_with_a_translation_that_works(
    server_factory: ServerFactory, tmp_path: Path
) -> None:
    """DEFECT. Apache's LogFormat (`%h %l %u %t \\"%r\\" %>s %b ...`), or its nickname
    `common`, carried into logging.access_log_format was refused with "a lone '%' at column
    1 ...: write %% for a literal %, %(NAME)s for an atom" (and "must be combined, json, or
    ...") -- which atom stands for %>s or %{Referer}i, it did not say. The error now gives
    the whole format in atoms; pasted back, it logs the line Apache logged, field for field."""
    config = tmp_path / "preforkd.yaml"
    (tmp_path / "app.py").write_text(APP)

    def check(fmt: str) -> str:
        config.write_text(yaml.safe_dump(app_settings(
            pythonpath=[str(tmp_path)], logging={"access_log": "-", "access_log_format": fmt})))
        result = preforkd("check", "-c", str(config))
        assert result.returncode == 2, result
        translated = re.search(r"in those, '(.*)'", result.stderr)
        assert translated is not None, result.stderr
        return translated.group(1)

    assert check(APACHE_COMBINED) == ATOMS_COMBINED
    assert check("common") == '%(h)s %(l)s %(u)s %(t)s "%(r)s" %(s)s %(b)s'
    # Apache's durations have atoms; what preforkd cannot log is named and written "-"
    config_error = preforkd("check", "-c", str(config)).stderr
    assert "Apache's nickname for" in config_error, config_error
    assert check("%a %>s %D %{ms}T %v %{X-Request-Id}o") == (
        "%(h)s %(s)s %(D)s %(M)s - %({X-Request-Id}o)s")
    assert "(%v: no atom says that, written - there)" in preforkd(
        "check", "-c", str(config)).stderr

    server = server_factory(app_settings(logging={
        "access_log": "-", "access_log_format": ATOMS_COMBINED}), app_source=APP)
    response = fetch(server.addresses()[0], "GET", "/mount/x?q=1",
                     headers=[("Referer", "http://ref.example/"), ("User-Agent", "agent/1.0")])
    assert response.status == 200
    line = wait_until(lambda: server.stdout().strip(), 5, message="no access log line")
    ours, apaches = COMBINED_RE.fullmatch(line), COMBINED_RE.fullmatch(APACHE_LINE)
    assert ours is not None and apaches is not None, line
    assert ours.groups()[:5] == apaches.groups()[:5]  # address, -, -, request line, status
    assert ours.group(6) == str(len(response.body))  # the body's size, no duration after it
    assert ours.groups()[6:] == apaches.groups()[6:]  # referer, user agent


def test_wsgi_errors_reaches_an_error_log_on_syslog(
    server_factory: ServerFactory, short_tmp: Path
) -> None:
    """DEFECT. mod_wsgi writes what an application sends to wsgi.errors into Apache's
    error log (`[wsgi:error] ... app: ...`). preforkd's wsgi.errors was sys.stderr, fd 2,
    which is the error log only when that is a file: with the error log on syslog it was
    the terminal the server started from (here stderr.log) and, in a detached daemon,
    /dev/null, so every line was lost. Each line (a partial one at flush()) is now an
    ERROR record of the error log, in syslog."""
    with logging_to_datagrams(server_factory, short_tmp, app_settings(), APP) as (
        server, inbox, http_socket
    ):
        with connect(str(http_socket)) as sock:
            sock.sendall(http_request("GET", "/errors"))
            assert read_response(sock).status == 204
        for line in ("app: wsgi.errors line one", "app: wsgi.errors line two",
                     "app: partial line, then flush"):
            pattern = rf"^<11>preforkd\[\d+\]: \[ERROR\] {re.escape(line)}$"  # user.err
            wait_until(partial(inbox.received, pattern), 5,
                       message=f"{line!r} did not reach syslog: {inbox.messages}")
    assert "wsgi.errors" not in server.log()  # not on the terminal instead


def test_dot_segments_are_resolved_before_the_mount_and_the_application(
    server_factory: ServerFactory,
) -> None:
    """DEFECT. Apache resolves `.` and `..` (also written %2e%2e) before mod_wsgi splits the
    path, so a mod_wsgi application never saw them: `/mount/a/../b` got PATH_INFO `/b`, and
    `/mount/../other` was not the application's (404). preforkd passed them on: PATH_INFO
    `/a/../b`, and `/shop/../admin` reached the application mounted at /shop as
    `/../admin`; `/shop/public/%2e%2e/admin/env` went past a middleware's
    PATH_INFO.startswith("/admin") check. nginx's proxy_pass sends the target on as the
    client wrote it. PATH_INFO now has its dot segments resolved; REQUEST_URI stays as sent."""
    server = server_factory(app_settings(http={"script_name": "/shop"}), app_source=APP)
    address = server.addresses()[0]
    for target, path in (
        ("/shop/a/../env", "/env"),
        ("/shop/a/%2e%2E/env", "/env"),
        ("/shop/./env/.", "/env/"),
        ("/shop/public/%2e%2e/admin/env", "/admin/env"),
        ("/shop/../shop/env", "/env"),
        ("/shop/.well-known/a..b", "/.well-known/a..b"),  # no dot segment in there
    ):
        environ = environ_of(address, target)
        assert (environ["SCRIPT_NAME"], environ["PATH_INFO"]) == ("/shop", path), target
        assert environ["REQUEST_URI"] == target
    for outside in ("/shop/../admin", "/shop/%2e%2e/admin", "/shop/x/../../admin"):
        assert fetch(address, "GET", outside).status == 400, outside


# --- PINNED: what the guide promises ------------------------------------------------------


def test_the_script_alias_split_and_the_environ(server_factory: ServerFactory) -> None:
    """PINNED. `WSGIScriptAlias /shop` and http.script_name split alike (Apache 2.4.71 +
    mod_wsgi 4.9.4 gave the same SCRIPT_NAME, PATH_INFO, QUERY_STRING and REQUEST_URI for
    these targets); outside the mount preforkd answers 400 (Apache 404). Different, as the
    guide says: SERVER_NAME and SERVER_PORT are the listener's (Apache's come from Host),
    and there are no mod_wsgi.* keys."""
    server = server_factory(app_settings(http={"script_name": "/shop"}), app_source=APP)
    address = server.addresses()[0]
    _, host, port = address
    for target, path, query in (("/shop", "", ""), ("/shop/", "/", ""),
                                ("/shop/a%20b/c?x=1&y=%20", "/a b/c", "x=1&y=%20")):
        environ = environ_of(address, target)
        assert (environ["SCRIPT_NAME"], environ["PATH_INFO"], environ["QUERY_STRING"],
                environ["REQUEST_URI"]) == ("/shop", path, query, target)
    for outside in ("/shopping", "/", "/static/x.css"):
        assert fetch(address, "GET", outside).status == 400, outside

    with connect(address) as sock:
        sock.sendall(http_request("GET", "/shop/env", host="shop.example:8080"))
        environ = json.loads(read_response(sock).body)
        local_port = sock.getsockname()[1]
    assert environ["HTTP_HOST"] == "shop.example:8080"
    assert (environ["SERVER_NAME"], environ["SERVER_PORT"]) == (host, str(port))
    assert (environ["REMOTE_ADDR"], environ["REMOTE_PORT"]) == ("127.0.0.1", str(local_port))
    assert (environ["wsgi.multithread"], environ["wsgi.multiprocess"]) == (False, True)
    assert environ["wsgi.url_scheme"] == "http" and "HTTPS" not in environ
    assert not [key for key in environ if key.startswith(("mod_wsgi.", "apache."))]


def test_authorization_and_chunked_bodies_always_reach_the_application(
    server_factory: ServerFactory,
) -> None:
    """PINNED. WSGIPassAuthorization and WSGIChunkedRequest are off by default in mod_wsgi
    (Authorization withheld; a chunked body answered 411 Length Required); preforkd always
    passes both. wsgi.input gives b"" at the end of the body and never reads past
    CONTENT_LENGTH (the bytes after it are the next request), as mod_wsgi's."""
    server = server_factory(app_settings(), app_source=APP)
    address = server.addresses()[0]
    environ = environ_of(address, "/env", headers=[("Authorization", "Basic Ym9iOnB3")])
    assert environ["HTTP_AUTHORIZATION"] == "Basic Ym9iOnB3"
    assert environ["wsgi.input_terminated"] is True

    chunked = http_request("POST", "/read", [("Transfer-Encoding", "chunked")],
                           b"5\r\nhello\r\n3\r\nabc\r\n0\r\n\r\n")
    sized = http_request("POST", "/read", [("Content-Length", "5")], b"hello")
    with connect(address) as sock:
        sock.sendall(chunked + sized + http_request("GET", "/env"))
        first, second, third = (read_response(sock) for _ in range(3))
    assert json.loads(first.body) == {"first": "helloabc", "again": "", "more": ""}
    assert json.loads(second.body) == {"first": "hello", "again": "", "more": ""}
    assert json.loads(third.body)["REQUEST_METHOD"] == "GET"  # not eaten as a body


def test_apaches_core_limits_and_the_statuses_that_differ(
    server_factory: ServerFactory,
) -> None:
    """PINNED. LimitRequestFields 100 and LimitRequestFieldSize 8190 are preforkd's defaults
    too, but over them preforkd answers 431 where Apache answers 400; LimitRequestLine's
    414 and LimitRequestBody's 413 are the same, the 413 without calling the application."""
    server = server_factory(app_settings(http={"max_body_size": 100}), app_source=APP)
    address = server.addresses()[0]
    fields = [(f"X-H{i}", "1") for i in range(99)]  # + Host: 100 fields
    assert fetch(address, "GET", "/env", fields).status == 200
    assert fetch(address, "GET", "/env", [*fields, ("X-One-More", "1")]).status == 431
    assert fetch(address, "GET", "/env", [("X-Long", "a" * (8190 - 6))]).status == 200
    assert fetch(address, "GET", "/env", [("X-Long", "a" * (8191 - 6))]).status == 431
    line = "GET /" + "a" * (8190 - len("GET / HTTP/1.1")) + " HTTP/1.1"
    assert len(line) == 8190
    assert fetch(address, "GET", line[4:-9]).status == 200
    assert fetch(address, "GET", line[4:-9] + "a").status == 414
    assert fetch(address, "POST", "/read", body=b"x" * 100).status == 200
    assert fetch(address, "POST", "/read", body=b"x" * 101).status == 413
    chunked = fetch(address, "POST", "/read", [("Transfer-Encoding", "chunked")],
                    b"65\r\n" + b"x" * 101 + b"\r\n0\r\n\r\n")
    assert chunked.status == 413


def slow_request(address: Address, seconds: float) -> tuple[threading.Thread, list[Any]]:
    """GET /slow?SECONDS in a thread; the list gets the response (or the exception)."""
    outcome: list[Any] = []

    def run() -> None:
        try:
            outcome.append(fetch(address, "GET", f"/slow?{seconds}", timeout=seconds + 20))
        except Exception as exc:  # reported by the test's assertion
            outcome.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, outcome


def test_usr1_out_of_apache_habit_reopens_logs_and_reloads_nothing(
    server_factory: ServerFactory,
) -> None:
    """PINNED. `apachectl -k graceful` is USR1: Apache re-reads its configuration and
    replaces its children. preforkd's USR1 reopens the logs and nothing else: the request
    in progress ends normally on the worker it started on, the workers stay, and an edited
    file is not applied until HUP."""
    server = server_factory(app_settings(workers={"count": 2}, http={"server_header": "one"}),
                            app_source=APP)
    address = server.addresses()[0]
    workers = server.worker_pids()
    thread, outcome = slow_request(address, 1.5)
    server.wait_for_log("app: slow request started")
    text = server.config.read_text().replace("server_header: one", "server_header: two")
    server.config.write_text(text)
    since = len(server.log())
    server.signal(signal.SIGUSR1)
    server.wait_for_log("USR1: log files reopened", since=since)
    thread.join(25)
    assert len(outcome) == 1 and getattr(outcome[0], "status", None) == 200, outcome
    assert int(outcome[0].body) in workers
    assert server.worker_pids() == workers
    assert fetch(address, "GET", "/env").header("Server") == "one"

    server.signal(signal.SIGHUP)
    wait_until(lambda: fetch(address, "GET", "/env").header("Server") == "two", 20,
               message="HUP did not apply the file")


def test_winch_out_of_apache_habit_stops_nothing_and_loses_nothing(
    server_factory: ServerFactory,
) -> None:
    """PINNED. `apachectl -k graceful-stop` is WINCH: Apache finishes its requests and
    exits. preforkd's WINCH stops the workers and keeps the master: the request in progress
    is answered, the master does not exit, a connection made meanwhile waits in the accept
    queue unanswered -- and a TERM then answers it and exits 0."""
    server = server_factory(app_settings(workers={"count": 1}), app_source=APP)
    address = server.addresses()[0]
    thread, outcome = slow_request(address, 1.0)
    server.wait_for_log("app: slow request started")
    since = len(server.log())
    server.signal(signal.SIGWINCH)
    server.wait_for_log("WINCH: stopping all 1 workers", since=since)
    thread.join(25)
    assert len(outcome) == 1 and getattr(outcome[0], "status", None) == 200, outcome
    wait_until(lambda: not server.worker_pids(), 10, message="the worker did not stop")
    with connect(address, timeout=20) as waiting:
        waiting.sendall(http_request("GET", "/env"))
        received, closed = recv_within(waiting, 0.5)
        assert (received, closed) == (b"", False)  # queued, not refused
        assert server.running()
        server.signal(signal.SIGTERM)
        response = read_response(waiting)
    assert response.status == 200
    assert server.wait_exit(20) == 0


# --- PINNED: the guide's worked example -----------------------------------------------------


def test_the_worked_example_passes_check_and_serves(
    server_factory: ServerFactory, short_tmp: Path
) -> None:
    """PINNED. The guide's translation of the vhost validates with `preforkd check` (exit 0,
    no warning); a server started from it serves under /shop on the socket nginx needs,
    sends print() to the error log file (as mod_wsgi's WSGIRestrictStdout Off), logs
    requests in Apache's combined layout, and leaves nothing behind at TERM."""
    text = example_site(GUIDE, short_tmp, "shop", APP)
    config = short_tmp / "preforkd.yaml"
    config.write_text(text)
    result = preforkd("check", "-c", str(config))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "warning" not in result.stdout, result.stdout

    sock, pidfile = short_tmp / "run" / "http.sock", short_tmp / "run" / "preforkd.pid"
    error_log, access_log = short_tmp / "log" / "error.log", short_tmp / "log" / "access.log"
    server = server_factory(config_text=text, wait_ready=False)
    wait_until(lambda: error_log.exists() and "ready: 4 workers" in error_log.read_text(), 30,
               message=f"not ready: {server.log_tail()}")
    environ = environ_of(str(sock), "/shop/a/env")
    assert (environ["SCRIPT_NAME"], environ["PATH_INFO"]) == ("/shop", "/a/env")
    assert fetch(str(sock), "GET", "/shop/print").status == 204
    wait_until(lambda: "app: printed to stdout" in error_log.read_text(), 5,
               message="print() did not reach the error log")
    server.signal(signal.SIGTERM)
    assert server.wait_exit(20) == 0, error_log.read_text()[-2000:]
    assert not sock.exists() and not pidfile.exists()
    lines = access_log.read_text().splitlines()
    assert any(COMBINED_RE.fullmatch(line) for line in lines), lines


def test_the_worked_example_nginx_block_mounts_under_shop(
    server_factory: ServerFactory, short_tmp: Path, tmp_path: Path
) -> None:
    """PINNED. The guide's nginx `location /shop` block in front of http.script_name
    /shop: the application gets SCRIPT_NAME /shop and the rest in PATH_INFO, as under
    WSGIScriptAlias /shop, the client's address and Host; a target with a dot segment,
    which nginx passes on as the client wrote it, reaches it resolved (this part failed
    before the dot-segment fix: PATH_INFO was /static/../env)."""
    guide = guide_block(GUIDE, "nginx", "nginx in front")
    location = re.search(r"location /shop \{\n(.*?)\n    \}", guide, re.DOTALL)
    assert location is not None, guide
    block = location.group(1).replace("http://shop", "http://shop_app")
    sock = short_tmp / "http.sock"
    server_factory(app_settings(bind=[f"unix:{sock}"], http={"script_name": "/shop"}),
                   app_source=APP)
    nginx = Nginx(nginx_binary(), tmp_path / "nginx", http_conf=f"""
    upstream shop_app {{ server unix:{sock}; keepalive 16; }}
    server {{
        listen {NGINX_HOST}:{{port}};
        location /shop {{
{block}
        }}
    }}
""")
    try:
        nginx.start()
        answers = []
        with connect_from(CLIENT_HOST, nginx.port) as client:
            for target in ("/shop/env?q=1", "/shop/static/../env"):
                client.sendall(http_request("GET", target, host="shop.example"))
                response = read_response(client)
                assert response.status == 200, f"{response}\n{nginx.log()}"
                answers.append(json.loads(response.body))
    finally:
        nginx.stop()
    first, dotted = answers
    assert (first["SCRIPT_NAME"], first["PATH_INFO"], first["QUERY_STRING"]) == (
        "/shop", "/env", "q=1")
    assert first["REMOTE_ADDR"] == CLIENT_HOST
    assert first["HTTP_HOST"] == "shop.example"
    assert (dotted["SCRIPT_NAME"], dotted["PATH_INFO"]) == ("/shop", "/env")
