"""A gunicorn (sync worker) deployment moved to preforkd, side by side: what such a user
relies on, against a real preforkd.

DEFECT tests fail on the code they were written against, because of the defect their
docstring names: gunicorn hooks that log through `server.log` / `worker.log`; a hook whose
arguments do not fit found only when it runs; PORT and FORWARDED_ALLOW_IPS from the
environment ignored; `--pythonpath DIR,DIR` and `--log-level DEBUG` as gunicorn takes them;
`http.max_request_line` counting the CRLF. PINNED tests hold behaviour no test checked yet,
where preforkd deliberately differs from gunicorn (docs/FROM-GUNICORN.md says so), and the
guide's worked example, which must pass `preforkd check` and serve.

Servers run through server_factory, which stops them by pid (SIGTERM, then SIGKILL to the
group) at teardown whatever the test did; short commands through detached.preforkd, bounded
by a timeout.
"""

from __future__ import annotations

import grp
import json
import os
import pwd
import re
import socket
from pathlib import Path
from typing import Any

from detached import preforkd
from harness import (
    REPO_ROOT,
    Server,
    ServerFactory,
    address,
    connect,
    fetch,
    read_response,
    send_raw,
    wait_until,
    write_config,
)

# Answers with the environ keys the tests compare (app:application).
ENVIRON_APP = """
import json

KEYS = ("REMOTE_ADDR", "SCRIPT_NAME", "PATH_INFO", "HTTP_HOST", "wsgi.url_scheme",
        "HTTP_X_FORWARDED_FOR", "HTTP_SCRIPT_NAME", "REQUEST_METHOD")


def application(environ, start_response):
    body = json.dumps({key: environ.get(key) for key in KEYS}).encode()
    start_response("200 OK", [("Content-Type", "application/json"),
                              ("Content-Length", str(len(body)))])
    return [body]
"""
APP = "app:application"

# Hooks as gunicorn's documentation and example configuration write them.
GUNICORN_HOOKS = """
def on_starting(server):
    server.log.info("HOOK on_starting")


def when_ready(server):
    server.log.info("HOOK when_ready")


def pre_fork(server, worker):
    server.log.info("HOOK pre_fork")


def post_fork(server, worker):
    server.log.info("HOOK post_fork pid=%s", worker.pid)


def post_worker_init(worker):
    worker.log.info("HOOK post_worker_init pid=%s", worker.pid)


def pre_request(worker, environ):
    worker.log.info("HOOK pre_request %s", environ["PATH_INFO"])


def worker_exit(server, worker):
    server.log.info("HOOK worker_exit pid=%s", worker.pid)


def child_exit(server, worker):
    server.log.info("HOOK child_exit pid=%s", worker.pid)


def on_exit(server):
    server.log.info("HOOK on_exit")
"""
HOOK_FAILED = re.compile(r"hook \w+ \(\S+\) failed")
HOOK_NAMES = ("on_starting", "when_ready", "pre_fork", "post_fork", "post_worker_init",
              "pre_request", "worker_exit", "child_exit", "on_exit")


def environ_of(response_body: bytes) -> dict[str, Any]:
    seen: dict[str, Any] = json.loads(response_body)
    return seen


def free_port() -> int:
    """A TCP port nothing listens on right now (the kernel's pick, released at once)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def request_line_of(length: int) -> bytes:
    """`GET /aaa... HTTP/1.1`, exactly `length` bytes without its CRLF."""
    line = b"GET /" + b"a" * (length - 14) + b" HTTP/1.1"
    assert len(line) == length
    return line


# --- DEFECT: gunicorn hooks ------------------------------------------------------------------


def test_gunicorn_hooks_log_through_server_log_and_worker_log(
    server_factory: ServerFactory, tmp_path: Path
) -> None:
    """DEFECT: the hook arguments had no `.log`, which gunicorn's have and its documented
    hooks use (`server.log.info(...)`): every such hook failed with an AttributeError, and a
    post_fork failing is a boot failure, so the server stopped before it ever served."""
    lib = tmp_path / "lib"
    lib.mkdir()
    (lib / "ghooks.py").write_text(GUNICORN_HOOKS)
    server = server_factory(
        {"app": APP, "pythonpath": [".", str(lib)], "workers": {"count": 1},
         "hooks": {name: f"ghooks:{name}" for name in HOOK_NAMES}},
        app_source=ENVIRON_APP,
    )
    assert fetch(address(server), target="/hello").status == 200
    server.wait_for_log("HOOK pre_request /hello")
    assert server.stop() == 0
    log = server.log()
    for name in HOOK_NAMES:
        assert f"HOOK {name}" in log, f"{name} did not log\n{server.log_tail()}"
    worker_pid = re.search(r"HOOK post_fork pid=(\d+)", log)
    assert worker_pid is not None
    # worker.log writes as the worker: its own pid on the line, as gunicorn's does
    assert f"[{worker_pid.group(1)}] [INFO] HOOK post_worker_init" in log
    assert not HOOK_FAILED.search(log), log


def test_a_hook_that_cannot_take_preforkds_arguments_stops_check_and_start(
    tmp_path: Path,
) -> None:
    """DEFECT: a hook's arguments were not checked when it was loaded (gunicorn checks
    their number): a post_request taking none of the forms preforkd calls it with passed
    `check` and the start, then failed with a TypeError after every request (a
    worker_abort only on the day a worker timed out). Now it stops both, saying the forms
    preforkd calls it with; a hook taking *args still fits."""
    (tmp_path / "ghooks.py").write_text(
        "def post_request(worker, req, environ, resp, extra):\n    pass\n\n\n"
        "def any_post_request(*args):\n    pass\n"
    )
    (tmp_path / "app.py").write_text(ENVIRON_APP)
    misfit = write_config(
        tmp_path, {"app": APP, "hooks": {"post_request": "ghooks:post_request"}},
        filename="misfit.yaml",
    )
    checked = preforkd("check", "-c", str(misfit))
    assert checked.returncode == 1, checked.stdout + checked.stderr
    assert ("hooks.post_request: 'ghooks:post_request' cannot be called as "
            "post_request(worker, environ, status) or "
            "post_request(worker, req, environ, resp)") in checked.stderr, checked.stderr
    started = preforkd("-c", str(misfit), "--bind", "127.0.0.1:0")
    assert started.returncode == 1, started.stdout + started.stderr
    assert "listening at" not in started.stderr  # stopped before binding
    fits = write_config(
        tmp_path, {"app": APP, "hooks": {"post_request": "ghooks:any_post_request"}},
        filename="fits.yaml",
    )
    checked = preforkd("check", "-c", str(fits))
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "hooks OK: post_request" in checked.stdout


# gunicorn's request hooks as its users write them: pre_request is gunicorn's
# examples/example_config.py's (at info, to be seen in the log), post_request a typical one.
GUNICORN_REQUEST_HOOKS = """
import time


def pre_request(worker, req):
    worker.log.info("%s %s" % (req.method, req.path))
    req.hook_started = time.monotonic()


def post_request(worker, req, environ, resp):
    worker.log.info(
        "GHOOK post %s %s?%s -> %s (%s) sent=%s headers=%s remote=%s ua=%s took=%s",
        req.method, req.path, req.query, resp.status, resp.status_code, resp.sent,
        dict(resp.headers).get("Content-Type"), environ["REMOTE_ADDR"],
        dict(req.headers).get("USER-AGENT"), time.monotonic() >= req.hook_started,
    )
"""


def test_gunicorns_example_pre_request_alone_is_answered_200(
    server_factory: ServerFactory, tmp_path: Path
) -> None:
    """DEFECT: pre_request got the WSGI environ where gunicorn passes its Request object;
    the arity is the same, so it loaded, and gunicorn's example hook raised AttributeError
    ('dict' object has no attribute 'method') at every request: every request was
    answered 500."""
    lib = tmp_path / "lib"
    lib.mkdir()
    (lib / "ghooks.py").write_text(GUNICORN_REQUEST_HOOKS)
    server = server_factory(
        {"app": APP, "pythonpath": [".", str(lib)], "workers": {"count": 1},
         "hooks": {"pre_request": "ghooks:pre_request"}},
        app_source=ENVIRON_APP,
    )
    response = fetch(address(server), target="/only?pre=1")
    assert response.status == 200, (response.status, server.log_tail())
    assert environ_of(response.body)["PATH_INFO"] == "/only"
    server.wait_for_log("[INFO] GET /only\n")
    assert not HOOK_FAILED.search(server.log()), server.log_tail()


def test_gunicorns_own_request_hooks_run_unchanged(
    server_factory: ServerFactory, tmp_path: Path
) -> None:
    """DEFECT: pre_request got the WSGI environ where gunicorn passes its Request object;
    the arity is the same, so it loaded, and gunicorn's example hook
    (`worker.log.debug("%s %s" % (req.method, req.path))`) raised AttributeError on the
    dict at every request: every request was answered 500. gunicorn's 4-argument
    post_request(worker, req, environ, resp) was refused at the start. Both now run as
    they are: `req` has gunicorn's attributes, post_request gets the same `req` (what
    pre_request set on it is there) and a `resp` with what went out."""
    lib = tmp_path / "lib"
    lib.mkdir()
    (lib / "ghooks.py").write_text(GUNICORN_REQUEST_HOOKS)
    server = server_factory(
        {"app": APP, "pythonpath": [".", str(lib)], "workers": {"count": 1},
         "hooks": {"pre_request": "ghooks:pre_request",
                   "post_request": "ghooks:post_request"}},
        app_source=ENVIRON_APP,
    )
    sent = {}
    for target in ("/hello?x=1", "/a%20b"):
        response = fetch(address(server), target=target, headers=[("User-Agent", "probe/1")])
        assert response.status == 200, (response.status, server.log_tail())
        sent[target] = len(response.body)
    server.wait_for_log("[INFO] GET /hello\n")
    server.wait_for_log(
        f"GHOOK post GET /hello?x=1 -> 200 OK (200) sent={sent['/hello?x=1']} "
        "headers=application/json remote=127.0.0.1 ua=probe/1 took=True"
    )
    server.wait_for_log("[INFO] GET /a%20b\n")  # the path as sent, as gunicorn's req.path
    server.wait_for_log(f"GHOOK post GET /a%20b? -> 200 OK (200) sent={sent['/a%20b']} ")
    assert not HOOK_FAILED.search(server.log()), server.log_tail()


# --- DEFECT: gunicorn's environment variables ---------------------------------------------


def test_port_in_the_environment_is_where_it_listens_unless_the_file_says(
    server_factory: ServerFactory, tmp_path: Path
) -> None:
    """DEFECT: PORT was ignored. gunicorn binds 0.0.0.0:$PORT when nothing else names an
    address, which is how Heroku, Cloud Run and Render reach it; preforkd listened on
    127.0.0.1:8000, where the platform's router and health check never arrive. A bind in
    the file still wins, and a bad PORT is a configuration error naming it."""
    port = free_port()
    server = server_factory(
        config_text=f"app: {APP}\npythonpath: [.]\nworkers: {{count: 1}}\n",
        app_source=ENVIRON_APP,
        env={"PORT": str(port)},
    )
    assert server.addresses() == [("http", "0.0.0.0", port)]
    assert fetch(("http", "127.0.0.1", port)).status == 200

    from_file = server_factory(
        {"app": APP, "bind": ["127.0.0.1:0"], "workers": {"count": 1}},
        app_source=ENVIRON_APP,
        env={"PORT": str(free_port())},
    )
    assert address(from_file)[1] == "127.0.0.1"

    config = tmp_path / "no-bind.yaml"
    config.write_text(f"app: {APP}\n")  # no bind: PORT gives it
    done = preforkd("check", "-c", str(config), env={"PORT": "http"})
    assert done.returncode == 2, done.stdout + done.stderr
    assert "configuration error: PORT: port must be a number" in done.stderr, done.stderr


def test_forwarded_allow_ips_in_the_environment_decides_whom_to_trust(
    server_factory: ServerFactory, short_tmp: Path
) -> None:
    """DEFECT: FORWARDED_ALLOW_IPS was ignored. Container images set it for gunicorn behind
    a proxy that is not on loopback; preforkd kept trusting loopback only, so the proxy's
    X-Forwarded-Proto was dropped and the application built http:// URLs behind a TLS
    proxy. Read as gunicorn reads it: comma-separated, unix-socket peers trusted too. Here
    it names another host, so a loopback peer is no longer trusted and a unix one is."""
    sock_path = short_tmp / "app.sock"
    server = server_factory(
        {"app": APP, "bind": ["127.0.0.1:0", f"unix:{sock_path}"], "workers": {"count": 1}},
        app_source=ENVIRON_APP,
        env={"FORWARDED_ALLOW_IPS": "192.0.2.1, 198.51.100.0/24"},
    )
    forwarded = [("X-Forwarded-For", "203.0.113.9"), ("X-Forwarded-Proto", "https")]
    tcp = environ_of(fetch(address(server), headers=forwarded).body)
    assert (tcp["REMOTE_ADDR"], tcp["wsgi.url_scheme"]) == ("127.0.0.1", "http")
    unix = environ_of(fetch(str(sock_path), headers=forwarded).body)
    assert (unix["REMOTE_ADDR"], unix["wsgi.url_scheme"]) == ("203.0.113.9", "https")
    shown = preforkd("config", "-c", str(server.config),
                     env={"FORWARDED_ALLOW_IPS": "192.0.2.1, 198.51.100.0/24"})
    assert "- 192.0.2.1\n  - 198.51.100.0/24\n  - unix\n" in shown.stdout, shown.stdout


# --- DEFECT: gunicorn's command line --------------------------------------------------------


def test_pythonpath_flag_takes_gunicorns_comma_separated_list(tmp_path: Path) -> None:
    """DEFECT: `--pythonpath /a,/b` (gunicorn's form) was one directory named "/a,/b", so
    the application was not found (exit 3). Now it is both directories, in order."""
    first, second = tmp_path / "first", tmp_path / "second"
    first.mkdir()
    second.mkdir()
    (second / "gapp.py").write_text(ENVIRON_APP)
    config = write_config(tmp_path, {"app": "gapp:application"})
    done = preforkd("check", "-c", str(config), "--pythonpath", f"{first},{second}")
    assert done.returncode == 0, done.stdout + done.stderr
    shown = preforkd("config", "-c", str(config), "--pythonpath", f"{first},{second}")
    assert f"pythonpath:\n- {first}\n- {second}\n" in shown.stdout, shown.stdout


def test_log_level_flag_takes_gunicorns_upper_case(tmp_path: Path) -> None:
    """DEFECT: `--log-level DEBUG` (gunicorn lower-cases it; the file's logging.level
    takes any case) was refused by the argument parser with exit 2."""
    config = write_config(tmp_path, {"app": APP}, app_source=ENVIRON_APP)
    shown = preforkd("config", "-c", str(config), "--log-level", "DEBUG")
    assert shown.returncode == 0, shown.stderr
    assert "\n  level: debug\n" in shown.stdout, shown.stdout


# --- DEFECT: limits counted as gunicorn counts them ----------------------------------------


def test_max_request_line_counts_the_line_without_its_crlf_as_gunicorn(
    server_factory: ServerFactory,
) -> None:
    """DEFECT: http.max_request_line counted the CRLF, so gunicorn's limit_request_line =
    4094 copied over refused request lines of 4093 and 4094 bytes that gunicorn serves (and
    that RFC 9112's request-line, without its CRLF, is). PINNED alongside: max_field_size
    counts a field's name and value (gunicorn also counts ': ' and the CRLF)."""
    server = server_factory(
        {"app": APP, "workers": {"count": 1},
         "http": {"max_request_line": 4094, "max_field_size": 8190}},
        app_source=ENVIRON_APP,
    )
    where = address(server)

    def status(head: bytes) -> int:
        with connect(where) as sock:
            sock.sendall(head + b"\r\nHost: a\r\nConnection: close\r\n\r\n")
            return read_response(sock).status

    assert status(request_line_of(4093)) == 200
    assert status(request_line_of(4094)) == 200
    assert status(request_line_of(4095)) == 414
    field = b"X-A: " + b"a" * (8190 - 3)  # name + value: 8190
    assert status(b"GET / HTTP/1.1\r\n" + field) == 200
    assert status(b"GET / HTTP/1.1\r\n" + field + b"a") == 431


# --- PINNED: where preforkd deliberately differs ------------------------------------------


def test_a_script_name_header_is_ignored_and_x_forwarded_prefix_mounts_instead(
    server_factory: ServerFactory,
) -> None:
    """PINNED: gunicorn takes a SCRIPT_NAME request header from a trusted proxy
    (forwarder_headers); preforkd drops every header name with '_' (a client could spoof
    it), and a proxy sends X-Forwarded-Prefix instead, with or without the prefix still in
    the path. The guide gives the nginx line."""
    server = server_factory({"app": APP, "workers": {"count": 1}}, app_source=ENVIRON_APP)
    where = address(server)
    header = environ_of(fetch(where, target="/app/x", headers=[("SCRIPT_NAME", "/app")]).body)
    assert (header["SCRIPT_NAME"], header["PATH_INFO"], header["HTTP_SCRIPT_NAME"]) == (
        "", "/app/x", None)
    for target in ("/app/x", "/x"):
        seen = environ_of(fetch(where, target=target,
                                headers=[("X-Forwarded-Prefix", "/app")]).body)
        assert (seen["SCRIPT_NAME"], seen["PATH_INFO"]) == ("/app", "/x"), target


def test_a_trusted_proxy_sets_remote_addr_and_keeps_the_forwarded_headers(
    server_factory: ServerFactory,
) -> None:
    """PINNED: from a trusted proxy, gunicorn sets only wsgi.url_scheme; preforkd also sets
    REMOTE_ADDR (the right-most address that is not a trusted proxy) and the host, and
    keeps the X-Forwarded-* keys for Django or ProxyFix to read as before."""
    server = server_factory({"app": APP, "workers": {"count": 1}}, app_source=ENVIRON_APP)
    seen = environ_of(fetch(address(server), headers=[
        ("X-Forwarded-For", "203.0.113.7, 10.0.0.2"), ("X-Forwarded-Proto", "https"),
        ("X-Forwarded-Host", "example.com")]).body)
    assert seen["REMOTE_ADDR"] == "10.0.0.2"
    assert seen["HTTP_X_FORWARDED_FOR"] == "203.0.113.7, 10.0.0.2"
    assert (seen["wsgi.url_scheme"], seen["HTTP_HOST"]) == ("https", "example.com")


def test_requests_gunicorn_serves_that_preforkd_refuses(server_factory: ServerFactory) -> None:
    """PINNED: an HTTP/1.1 request without Host is 400 (RFC 9112 3.2; gunicorn serves it),
    a method llhttp does not know is 501 (gunicorn serves FOO), a lower-case one 501
    (gunicorn: 400), HTTP/2.0 505 (gunicorn: 400). The guide lists them."""
    server = server_factory({"app": APP, "workers": {"count": 1}}, app_source=ENVIRON_APP)
    where = address(server)

    def status(request: bytes) -> int:
        return int(send_raw(where, request).split(b" ", 2)[1])

    assert status(b"GET / HTTP/1.1\r\nConnection: close\r\n\r\n") == 400
    assert status(b"FOO / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n") == 501
    assert status(b"get / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n") == 501
    assert status(b"GET / HTTP/2.0\r\nHost: a\r\nConnection: close\r\n\r\n") == 505
    assert status(b"PURGE / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n") == 200


# --- PINNED: the guide's worked example ----------------------------------------------------

GUIDE = REPO_ROOT / "docs" / "FROM-GUNICORN.md"
WSGI_MODULE = """
def application(environ, start_response):
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [b"hello from myproject"]
"""


def guide_blocks(language: str) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```$", GUIDE.read_text(), re.S | re.M)


def test_the_worked_example_of_from_gunicorn_md_checks_and_serves(
    server_factory: ServerFactory, short_tmp: Path
) -> None:
    """PINNED: the guide's preforkd.yaml and hooks module, as written (but for the TCP
    address, made 127.0.0.1:0, and the user and group, made the test's own), pass
    `preforkd check` and serve: the hooks log, the access log has gunicorn's format."""
    (yaml_text,) = guide_blocks("yaml")
    hooks_source = next(b for b in guide_blocks("python")
                        if "def post_request(" in b and "wsgi_app" not in b)
    me = pwd.getpwuid(os.getuid()).pw_name
    group = grp.getgrgid(os.getgid()).gr_name
    assert "0.0.0.0:8000" in yaml_text and "user: myapp\n" in yaml_text
    yaml_text = (yaml_text.replace("0.0.0.0:8000", "127.0.0.1:0")
                 .replace("user: myapp\n", f"user: {me}\n")
                 .replace("group: myapp\n", f"group: {group}\n"))
    package = short_tmp / "src" / "myproject"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "wsgi.py").write_text(WSGI_MODULE)
    (package / "preforkd_hooks.py").write_text(hooks_source)
    (short_tmp / "run").mkdir()
    config = short_tmp / "preforkd.yaml"
    config.write_text(yaml_text)

    checked = preforkd("check", "-c", str(config))
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert ("hooks OK: post_fork, worker_abort, child_exit, pre_request, post_request"
            in checked.stdout), checked.stdout
    shown = preforkd("config", "-c", str(config))
    # YAML reads 027 as the integer 23; preforkd takes the digits as written, as octal
    assert "\numask: '027'\n" in shown.stdout and "mode: '0660'\n" in shown.stdout, shown.stdout

    server = Server(short_tmp, config)
    server_factory.servers.append(server)  # stopped at teardown with the others
    server.start().wait_ready()
    tcp = next(a for a in server.addresses() if a[0] == "http")
    response = fetch(tcp, target="/page", headers=[("Referer", "http://r/")])
    assert (response.status, response.body) == (200, b"hello from myproject")
    assert fetch(str(short_tmp / "run" / "preforkd.sock")).status == 200
    server.wait_for_log("worker spawned (pid")
    wait_until(lambda: '"GET /page HTTP/1.1" 200 20 "http://r/"' in server.stdout(), 5.0,
               message=f"no access-log line\n{server.stdout()}")
    assert server.stop() == 0
    assert re.search(r"worker \d+ exited", server.log()), server.log_tail()
    assert not HOOK_FAILED.search(server.log()), server.log_tail()
