"""A real Django project and a real Flask application served by a real preforkd, as users
moving from gunicorn run theirs: the admin's login with its CSRF token, a form POST that
redirects, sessions and several Set-Cookie headers, multipart uploads of a few MiB,
chunked request bodies, streaming, FileResponse / send_file (wsgi.file_wrapper), HEAD,
percent-encoded UTF-8 paths and query strings, absolute URLs with and without a trusted
proxy's X-Forwarded-* headers, a SCRIPT_NAME mount, 404 and 500 pages, large responses,
keep-alive across all of it; then a preloaded Django project reloaded by HUP, and Django
in development mode (--reload).

The checks are what the framework computed (its JSON reports, its redirects, its cookies),
which gunicorn sync gives alike for the same requests, but where preforkd decides
otherwise on purpose (docs/FROM-GUNICORN.md: the trusted proxy's host and prefix).

The applications: apps/pf_django_site (copied beside the server's config, where its sqlite
database is made) and apps/pf_flask_app.py. Without Django or Flask the tests are skipped,
but under CI=true they fail: pyproject.toml's test extra installs both.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import uuid
from collections.abc import Sequence
from hashlib import sha256
from pathlib import Path
from typing import Any

import psutil
import pytest

from harness import (
    APPS,
    Response,
    Server,
    ServerFactory,
    address,
    connect,
    fetch,
    http_request,
    read_response,
    require_module,
    wait_until,
)

MIB = 1 << 20
PROXY = [("X-Forwarded-For", "203.0.113.7"), ("X-Forwarded-Proto", "https"),
         ("X-Forwarded-Host", "www.example.com")]
# a percent-encoded UTF-8 path segment and query value: "café/€" and "é"
CAFE = "/caf%C3%A9/%E2%82%AC"
SETUP_DJANGO = """
import django
django.setup()
from django.core.management import call_command
from django.contrib.auth.models import User
call_command("migrate", verbosity=0)
User.objects.create_superuser("admin", "admin@example.com", "a long pass phrase")
"""


class Client:
    """One keep-alive connection to a server, with the cookies its answers set."""

    def __init__(self, server: Server) -> None:
        self.sock = connect(address(server), timeout=10)
        self.cookies: dict[str, str] = {}

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.sock.close()

    def send(self, method: str, target: str, headers: Sequence[tuple[str, str]] = (),
             body: bytes = b"") -> Response:
        sent = list(headers)
        if self.cookies:
            sent.append(("Cookie", "; ".join(f"{k}={v}" for k, v in self.cookies.items())))
        self.sock.sendall(http_request(method, target, sent, body))
        response = read_response(self.sock, method=method)
        for value in response.header_values("Set-Cookie"):
            name, _, rest = value.partition("=")
            self.cookies[name] = rest.partition(";")[0]
        assert (response.header("Connection") or "").lower() != "close", response.headers
        return response

    def post_form(self, target: str, fields: str) -> Response:
        return self.send("POST", target, [("Content-Type", "application/x-www-form-urlencoded")],
                         fields.encode())


def multipart(fields: dict[str, str], files: dict[str, tuple[str, bytes]]) -> tuple[str, bytes]:
    """(Content-Type, body) of a multipart/form-data upload."""
    boundary = uuid.uuid4().hex
    parts = [f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n'
             f"{value}\r\n".encode() for name, value in fields.items()]
    parts += [f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; '
              f'filename="{filename}"\r\nContent-Type: application/octet-stream\r\n\r\n'.encode()
              + data + b"\r\n" for name, (filename, data) in files.items()]
    parts.append(f"--{boundary}--\r\n".encode())
    return f"multipart/form-data; boundary={boundary}", b"".join(parts)


def chunked(body: bytes, size: int = 65536) -> bytes:
    pieces = [body[i:i + size] for i in range(0, len(body), size)]
    return b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in pieces) + b"0\r\n\r\n"


def token(response: Response, name: str) -> str:
    match = re.search(rf'name="{name}" value="([^"]+)"'.encode(), response.body)
    assert match is not None, response.body[:500]
    return match.group(1).decode()


def hup(server: Server, generation: int) -> None:
    since = len(server.log())
    server.signal(signal.SIGHUP)
    server.wait_for_log(f"reloaded: generation {generation} serving", 30, since=since)


@pytest.fixture(scope="module")
def blob() -> bytes:
    return os.urandom(3 * MIB)


@pytest.fixture(scope="module")
def django_site(tmp_path_factory: pytest.TempPathFactory, blob: bytes) -> Path:
    """A directory holding a copy of the project, its migrated database with the user
    admin, and blob.bin (what /file/ sends)."""
    require_module("django")
    base = tmp_path_factory.mktemp("django")
    shutil.copytree(APPS / "pf_django_site", base / "pf_django_site",
                    ignore=shutil.ignore_patterns("__pycache__"))
    (base / "blob.bin").write_bytes(blob)
    env = {**os.environ, "DJANGO_SETTINGS_MODULE": "pf_django_site.settings",
           "PYTHONPATH": str(base)}
    subprocess.run([sys.executable, "-c", SETUP_DJANGO], cwd=base, env=env, check=True,
                   capture_output=True, timeout=60)
    return base


def django_settings(site: Path, **more: Any) -> dict[str, Any]:
    return {"app": "pf_django_site.wsgi:application", "pythonpath": [str(site)], **more}


@pytest.fixture(scope="module")
def django(module_factory: ServerFactory, django_site: Path) -> Server:
    """The project mounted at /site (http.script_name), as gunicorn's SCRIPT_NAME mounts it."""
    return module_factory(django_settings(
        django_site, workers={"count": 2}, http={"script_name": "/site"},
    ))


@pytest.fixture(scope="module")
def flask(module_factory: ServerFactory, tmp_path_factory: pytest.TempPathFactory,
          blob: bytes) -> Server:
    require_module("flask")
    path = tmp_path_factory.mktemp("flask") / "blob.bin"
    path.write_bytes(blob)
    return module_factory({"app": "pf_flask_app:app", "pythonpath": [str(APPS)],
                           "workers": {"count": 2}, "env": {"PF_BLOB": str(path)}})


def host_of(server: Server) -> str:
    _, host, port = address(server)
    return f"{host}:{port}"


def report(response: Response) -> dict[str, Any]:
    assert response.status == 200, response
    document: dict[str, Any] = json.loads(response.body)
    return document


# --- Django --------------------------------------------------------------------------------


def test_django_admin_login_with_its_csrf_token_and_session(django: Server) -> None:
    with Client(django) as client:
        anonymous = client.send("GET", "/site/admin/")
        assert anonymous.status == 302
        assert anonymous.header("Location") == "/site/admin/login/?next=/site/admin/"

        page = client.send("GET", "/site/admin/login/?next=/site/admin/")
        assert page.status == 200 and "csrftoken" in client.cookies
        assert b'action="/site/admin/login/?next=/site/admin/"' in page.body
        csrf = token(page, "csrfmiddlewaretoken")

        refused = client.post_form("/site/admin/login/", "username=admin&password=x")
        assert refused.status == 403  # no CSRF token

        wrong = client.post_form(
            "/site/admin/login/", f"csrfmiddlewaretoken={csrf}&username=admin&password=x")
        assert wrong.status == 200 and b"errornote" in wrong.body

        login = client.post_form(
            "/site/admin/login/?next=/site/admin/",
            f"csrfmiddlewaretoken={csrf}&username=admin&password=a+long+pass+phrase"
            "&next=/site/admin/",
        )
        assert login.status == 302 and login.header("Location") == "/site/admin/"
        assert {"sessionid", "csrftoken"} <= {
            v.partition("=")[0] for v in login.header_values("Set-Cookie")}

        index = client.send("GET", "/site/admin/")
        assert index.status == 200 and b"Site administration" in index.body


def test_django_form_post_redirect_session_messages_and_cookies(django: Server) -> None:
    with Client(django) as client:
        csrf = token(client.send("GET", "/site/form/"), "csrfmiddlewaretoken")
        posted = client.post_form("/site/form/", f"csrfmiddlewaretoken={csrf}&name=J%C3%BCrgen")
        assert posted.status == 302 and posted.header("Location") == "/site/form/done/"
        assert {"sessionid", "messages"} <= {
            v.partition("=")[0] for v in posted.header_values("Set-Cookie")}
        done = report(client.send("GET", "/site/form/done/"))
        assert done == {"name": "Jürgen", "messages": ["saved Jürgen"]}

        cookies = client.send("GET", "/site/cookies/")
        assert [v.partition("=")[0] for v in cookies.header_values("Set-Cookie")] == [
            "a", "b", "sessionid"]
        assert "HttpOnly" in cookies.header_values("Set-Cookie")[1]


def test_django_sees_the_request_as_sent_and_behind_a_trusted_proxy(django: Server) -> None:
    host = host_of(django)
    port = host.rpartition(":")[2]
    with Client(django) as client:
        seen = report(client.send("GET", "/site/seen/?a=1&b=%C3%A9&b=2"))
        assert seen["meta"] == {
            "REMOTE_ADDR": "127.0.0.1", "SERVER_NAME": "127.0.0.1", "SERVER_PORT": port,
            "SCRIPT_NAME": "/site", "PATH_INFO": "/seen/", "QUERY_STRING": "a=1&b=%C3%A9&b=2",
            "HTTP_HOST": "localhost", "wsgi.url_scheme": "http", "SERVER_PROTOCOL": "HTTP/1.1",
        }
        assert seen["absolute"] == "http://localhost/site/seen/?a=1&b=%C3%A9&b=2"
        assert seen["GET"] == {"a": ["1"], "b": ["é", "2"]}
        assert (seen["path"], seen["path_info"]) == ("/site/seen/", "/seen/")
        assert seen["reverse"] == "/site/form/done/"

        cafe = report(client.send("GET", f"/site{CAFE}/?q=%E2%82%AC"))
        assert (cafe["word"], cafe["path"]) == ("€", "/site/café/€/")
        assert cafe["absolute"] == f"http://localhost/site{CAFE}/?q=%E2%82%AC"

        proxied = report(client.send("GET", "/site/seen/?x=1", PROXY))
        assert proxied["absolute"] == "https://www.example.com/site/seen/?x=1"
        assert proxied["secure"] is True
        assert proxied["meta"]["REMOTE_ADDR"] == "203.0.113.7"
        assert proxied["host"] == "www.example.com"

        assert client.send("GET", "/site/nope/").status == 404
        failed = client.send("GET", "/site/boom/")  # Django's page, and the worker goes on
        assert failed.status == 500 and b"Server Error (500)" in failed.body
        assert client.send("HEAD", "/site/seen/").body == b""
    # outside the mount: the server's 400, as gunicorn's
    assert fetch(address(django), target="/seen/").status == 400


def test_django_upload_stream_file_and_large_responses(django: Server, blob: bytes) -> None:
    with Client(django) as client:
        content_type, body = multipart({"title": "héllo"}, {"f": ("blob.bin", blob)})
        uploaded = report(client.send("POST", "/site/upload/", [("Content-Type", content_type)],
                                      body))
        assert uploaded == {"files": {"f": ["blob.bin", len(blob), sha256(blob).hexdigest()]},
                            "fields": {"title": "héllo"}}

        streamed = client.send("GET", "/site/stream/")
        assert streamed.header("Transfer-Encoding") == "chunked"
        assert streamed.body == b"".join(b"line %d\n" % i for i in range(5))

        sent = client.send("GET", "/site/file/")
        assert sent.status == 200 and sent.body == blob
        assert sent.header("Content-Disposition") == 'attachment; filename="blob.bin"'
        head = client.send("HEAD", "/site/file/")
        assert head.body == b"" and head.header("Content-Length") == str(len(blob))

        large = client.send("GET", "/site/large/")
        assert large.body == b"0123456789abcdef" * (1 << 18)


def test_a_preloaded_django_project_reloaded_by_hup_does_not_pile_up(
    server_factory: ServerFactory, django_site: Path
) -> None:
    """Defect: each HUP of a preloaded Django project kept the previous copy of it in the
    master, 17 MiB a reload (weakref.finalize held its signal receivers: loader.release_
    modules). Three reloads now leave the master's memory where it was."""
    server = server_factory(django_settings(django_site, preload_app=True,
                                            workers={"count": 1}))
    master = psutil.Process(server.pid)
    hup(server, 2)
    hup(server, 3)
    before = master.memory_info().rss
    for generation in (4, 5, 6):
        hup(server, generation)
    grown = master.memory_info().rss - before
    assert grown < 12 * MIB, f"the master grew {grown / MIB:.1f} MiB in three reloads"
    assert fetch(address(server), target="/seen/").status == 200


def test_django_in_reload_mode_restarts_for_an_edited_view(
    server_factory: ServerFactory, django_site: Path, tmp_path: Path
) -> None:
    """Defect: Django imports the URL configuration and the views at the first request,
    after the worker listed the files it watches, so saving a view changed nothing."""
    site = tmp_path / "site"
    shutil.copytree(django_site / "pf_django_site", site / "pf_django_site",
                    ignore=shutil.ignore_patterns("__pycache__", "*.sqlite3"))
    server = server_factory(django_settings(site, workers={"count": 1}), args=["--reload"])
    assert fetch(address(server), target="/hello/").body == b"hello, version one"
    views = site / "pf_django_site" / "views.py"
    edited = views.with_name(".views.py.tmp")
    edited.write_text(views.read_text().replace("version one", "version two, edited"))
    os.replace(edited, views)  # as an editor saves it
    server.wait_for_log(f"{views} changed; restarting to load it")
    wait_until(lambda: fetch(address(server), target="/hello/").body == b"hello, version two, "
               b"edited", 10, message="the edited view is not served",
               ignore=(ConnectionError, EOFError))


# --- Flask ---------------------------------------------------------------------------------


def test_flask_login_form_with_a_session_csrf_token(flask: Server) -> None:
    with Client(flask) as client:
        page = client.send("GET", "/login")
        assert "session" in client.cookies
        refused = client.post_form("/login", "csrf=forged&user=mallory")
        assert refused.status == 400
        logged_in = client.post_form("/login", f"csrf={token(page, 'csrf')}&user=J%C3%BCrgen")
        assert logged_in.status == 302 and logged_in.header("Location") == "/whoami"
        assert report(client.send("GET", "/whoami")) == {"user": "Jürgen"}

        cookies = client.send("GET", "/cookies")
        assert [v.partition("=")[0] for v in cookies.header_values("Set-Cookie")] == [
            "a", "b", "session"]


def test_flask_urls_with_and_without_a_trusted_proxy(flask: Server) -> None:
    host = host_of(flask)
    with Client(flask) as client:
        seen = report(client.send("GET", "/seen?a=1&b=%C3%A9", [("Host", host)]))
        assert seen["url"] == f"http://{host}/seen?a=1&b=é"  # an IRI, as Werkzeug gives it
        assert seen["external"] == f"http://{host}/seen?q=%C3%A9"
        assert seen["args"] == {"a": ["1"], "b": ["é"]}
        assert (seen["remote"], seen["root"]) == ("127.0.0.1", "")
        assert seen["server"] == ["127.0.0.1", host.rpartition(":")[2]]

        cafe = report(client.send("GET", f"{CAFE}?q=%E2%82%AC"))
        assert (cafe["word"], cafe["path"]) == ("€", "/café/€")

        proxied = report(client.send("GET", "/seen", [*PROXY, ("X-Forwarded-Prefix", "/app")]))
        assert proxied["external"] == "https://www.example.com/app/seen?q=%C3%A9"
        assert (proxied["remote"], proxied["root"]) == ("203.0.113.7", "/app")

        assert client.send("GET", "/nope").status == 404
        failed = client.send("GET", "/boom")
        assert failed.status == 500 and b"Internal Server Error" in failed.body


def test_flask_uploads_chunked_bodies_streams_and_files(flask: Server, blob: bytes) -> None:
    digest = sha256(blob).hexdigest()
    with Client(flask) as client:
        content_type, body = multipart({"title": "héllo"}, {"f": ("blob.bin", blob)})
        uploaded = report(client.send("POST", "/upload", [("Content-Type", content_type)], body))
        assert uploaded == {"files": {"f": ["blob.bin", len(blob), digest]},
                            "fields": {"title": "héllo"}}
        uploaded = report(client.send(
            "POST", "/upload", [("Content-Type", content_type), ("Transfer-Encoding", "chunked")],
            chunked(body)))
        assert uploaded["files"] == {"f": ["blob.bin", len(blob), digest]}
        echoed = report(client.send("POST", "/echo", [("Transfer-Encoding", "chunked")],
                                    chunked(blob[:300000], 70000)))
        assert echoed == {"length": 300000, "sha256": sha256(blob[:300000]).hexdigest()}

        streamed = client.send("GET", "/stream")
        assert streamed.header("Transfer-Encoding") == "chunked"
        assert streamed.body == b"".join(b"line %d of /stream\n" % i for i in range(5))

        sent = client.send("GET", "/file")
        assert sent.body == blob and sent.header("Content-Length") == str(len(blob))
        head = client.send("HEAD", "/file")
        assert head.body == b"" and head.header("Content-Length") == str(len(blob))
        ranged = client.send("GET", "/file", [("Range", "bytes=100-199")])
        assert ranged.status == 206 and ranged.body == blob[100:200]

        large = client.send("GET", "/large")
        assert large.body == b"0123456789abcdef" * (1 << 18)
