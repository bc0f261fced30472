"""`static`: files served by the workers before the application (uWSGI's static-map), with
curl against a real preforkd.

Each server's directory holds public/ (the mapped directory) and, beside it, secret.txt,
which no request may ever read. The application answers every request it gets with
"app METHOD PATH_INFO" and 404, so a response says whether a file or the app answered.
"""

from __future__ import annotations

import gzip
import os
import re
import signal
import subprocess
from pathlib import Path
from typing import Any

import yaml

import harness
from harness import (
    Server,
    ServerFactory,
    address,
    connect,
    http_request,
    read_response,
    wait_until,
)

APP = """\
import os

def application(environ, start_response):
    if environ["PATH_INFO"] == "/pid":
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [str(os.getpid()).encode()]
    start_response("404 Not Found", [("Content-Type", "text/plain")])
    return [("app %s %s" % (environ["REQUEST_METHOD"], environ["PATH_INFO"])).encode("latin-1")]
"""

SECRET = b"the secret beside public/\n"
CSS = b"body { color: red }\n"
BIG = os.urandom(3 << 20)  # several sendfile calls' worth


def site(workdir: Path) -> Path:
    """public/ with a.css (and a.css.gz), big.bin, sub/, a symlink inside and two out."""
    public = workdir / "public"
    (public / "sub").mkdir(parents=True)
    (public / "a.css").write_bytes(CSS)
    (public / "a.css.gz").write_bytes(gzip.compress(CSS))
    (public / "big.bin").write_bytes(BIG)
    (public / "sub" / "b.txt").write_bytes(b"b\n")
    (workdir / "secret.txt").write_bytes(SECRET)
    (public / "link.css").symlink_to("a.css")
    (public / "out.txt").symlink_to(workdir / "secret.txt")
    (public / "outdir").symlink_to(workdir)
    return public


def start(factory: ServerFactory, tmp_path: Path, **more: Any) -> Server:
    workdir = tmp_path / "site"
    public = site(workdir)
    config = {
        "app": "app:application",
        "pythonpath": ["."],
        "bind": ["127.0.0.1:0"],
        "workers": {"count": 1},
        "logging": {"access_log": "access.log"},
        "static": [{"url": "/static/", "path": str(public), "max_age": 3600, "gzip": True}],
        **more,
    }
    return factory(config_text=yaml.safe_dump(config), app_source=APP, module="app")


def curl(server: Server, *args: str, url: str | None = None) -> tuple[int, dict[str, str], bytes]:
    """curl (its -D head on stdout, the body in a file): status, last head's headers, body."""
    tool = harness.require_tool("curl")
    body = server.workdir / "curl.body"
    body.unlink(missing_ok=True)
    target = url if url is not None else server.url + args[-1]
    done = subprocess.run(
        [tool, "-sS", "--path-as-is", "-D", "-", "-o", str(body), *args[:-1], target],
        capture_output=True, timeout=30, check=True,
    )
    head = done.stdout.decode("latin-1").split("\r\n\r\n")[-2]
    status_line, *lines = head.split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines)}
    return int(status_line.split()[1]), headers, body.read_bytes() if body.exists() else b""


def test_a_file_with_its_headers_304_206_416_and_gzip(
    server_factory: ServerFactory, tmp_path: Path
) -> None:
    server = start(server_factory, tmp_path)
    status, headers, body = curl(server, "/static/a.css")
    assert (status, body) == (200, CSS)
    assert headers["content-type"] == "text/css; charset=utf-8"
    assert headers["content-length"] == str(len(CSS))
    assert headers["cache-control"] == "max-age=3600"
    assert headers["vary"] == "Accept-Encoding"
    assert headers["accept-ranges"] == "bytes"
    assert "content-encoding" not in headers
    tag, modified = headers["etag"], headers["last-modified"]
    assert re.fullmatch(r'W/"[0-9a-f]+-[0-9a-f]+"', tag), tag
    assert modified.endswith(" GMT")

    status, head_headers, _ = curl(server, "-I", "/static/a.css")  # (-I puts the head in -o)
    assert status == 200
    assert head_headers["content-length"] == str(len(CSS)) and head_headers["etag"] == tag

    assert curl(server, "-H", f"If-None-Match: {tag}", "/static/a.css")[:1] == (304,)
    assert curl(server, "-H", f"If-Modified-Since: {modified}", "/static/a.css")[0] == 304
    assert curl(server, "-H", 'If-None-Match: W/"0-0"', "-H", f"If-Modified-Since: {modified}",
                "/static/a.css")[0] == 200  # If-None-Match decides when both are sent

    status, headers, body = curl(server, "-r", "5-9", "/static/a.css")
    assert (status, body, headers["content-range"]) == (206, CSS[5:10], f"bytes 5-9/{len(CSS)}")
    status, headers, body = curl(server, "-r", "1000-", "/static/a.css")
    assert (status, headers["content-range"]) == (416, f"bytes */{len(CSS)}")

    status, headers, body = curl(server, "-H", "Accept-Encoding: gzip", "/static/a.css")
    assert (status, headers["content-encoding"], headers["vary"]) == (200, "gzip",
                                                                      "Accept-Encoding")
    assert gzip.decompress(body) == CSS
    assert headers["content-type"] == "text/css; charset=utf-8"

    status, headers, body = curl(server, "/static/big.bin")  # os.sendfile, in several calls
    assert status == 200 and body == BIG
    status, headers, body = curl(server, "-r", "1000000-2999999", "/static/big.bin")
    assert status == 206 and body == BIG[1000000:3000000]

    status, _, body = curl(server, "/static/link.css")  # a symlink inside: followed
    assert (status, body) == (200, CSS)

    access = (server.workdir / "access.log")
    lines = wait_until(lambda: [line for line in access.read_text().splitlines()
                                if "/static/big.bin" in line], 5, message="no access lines")
    assert len(lines) == 2 and '" 200 3145728 ' in lines[0] and '" 206 2000000 ' in lines[1]


def test_keep_alive_and_pipelining_survive_file_responses(
    server_factory: ServerFactory, tmp_path: Path
) -> None:
    server = start(server_factory, tmp_path)
    with connect(address(server)) as sock:
        sock.sendall(
            http_request("GET", "/static/a.css")
            + http_request("HEAD", "/static/big.bin")
            + http_request("GET", "/static/a.css", [("Range", "bytes=0-3")])
            + http_request("GET", "/static/missing")
            + http_request("GET", "/static/sub/b.txt")
        )
        first = read_response(sock)
        head = read_response(sock, method="HEAD")
        ranged = read_response(sock)
        missing = read_response(sock)
        last = read_response(sock)
    assert (first.status, first.body) == (200, CSS)
    assert (head.status, head.body, head.header("Content-Length")) == (200, b"", str(len(BIG)))
    assert (ranged.status, ranged.body) == (206, CSS[:4])
    assert (missing.status, missing.body) == (404, b"app GET /static/missing")
    assert (last.status, last.body) == (200, b"b\n")
    assert last.header("Content-Type") == "text/plain; charset=utf-8"
    assert all(r.header("Connection") is None for r in (first, head, ranged, last))


def test_what_falls_through_to_the_application(
    server_factory: ServerFactory, tmp_path: Path
) -> None:
    server = start(server_factory, tmp_path)
    for args, expected in [
        (("/static/missing.css",), b"app GET /static/missing.css"),
        (("-X", "POST", "-d", "x=1", "/static/a.css"), b"app POST /static/a.css"),
        (("-X", "DELETE", "/static/a.css"), b"app DELETE /static/a.css"),
        (("/static/sub/",), b"app GET /static/sub/"),  # a directory: never listed
        (("/static/sub",), b"app GET /static/sub"),
        (("/static",), b"app GET /static"),
        (("/staticx/a.css",), b"app GET /staticx/a.css"),
        (("/a.css",), b"app GET /a.css"),
    ]:
        status, _, body = curl(server, *args)
        assert (status, body) == (404, expected), args


def test_traversal_never_reads_outside_the_directory(
    server_factory: ServerFactory, tmp_path: Path
) -> None:
    server = start(server_factory, tmp_path)
    targets = [
        "/static/../secret.txt",
        "/static/%2e%2e/secret.txt",
        "/static/%2E%2E/secret.txt",
        "/static/.%2e/secret.txt",
        "/static/sub/../../secret.txt",
        "/static/..%2fsecret.txt",
        "/static/..%2Fsecret.txt",
        "/static/sub%2f..%2f..%2fsecret.txt",
        "/static/%252e%252e/secret.txt",
        "/static/..%5csecret.txt",
        "/static/out.txt",  # a symlink to it
        "/static/outdir/secret.txt",  # a symlink to its directory
        "/static/%2e%2e/%2e%2e" + str(tmp_path / "site" / "secret.txt").replace("/", "%2f"),
        "/static//" + str(tmp_path / "site" / "secret.txt"),
        "/static/a.css%00",
        "/static/a.css%00.txt",
    ]
    with connect(address(server)) as sock:
        for target in targets:
            sock.sendall(http_request("GET", target))
            response = read_response(sock)
            assert SECRET not in response.body, (target, response)
            assert response.status in (400, 404), (target, response)
            assert response.body.startswith(b"app GET ") or response.status == 400, target
    for target in targets[:4]:  # and curl's own sending of them
        assert SECRET not in curl(server, target)[2], target


def test_counted_as_requests_in_metrics_and_for_max_requests(
    server_factory: ServerFactory, tmp_path: Path
) -> None:
    admin = str(tmp_path / "admin.sock")
    server = start(server_factory, tmp_path, workers={"count": 1, "max_requests": 5},
                   admin={"socket": admin})
    with connect(address(server)) as sock:
        pid = harness.ask(sock, "/pid").body
        for _ in range(2):
            sock.sendall(http_request("GET", "/static/a.css"))
            assert read_response(sock).status == 200
        sock.sendall(http_request("GET", "/static/a.css", [("Range", "bytes=99-")]))
        assert read_response(sock).status == 416

        def counted() -> str | None:
            text = harness.fetch(admin, target="/metrics").body.decode()
            return text if 'preforkd_requests_total{class="2xx"} 3' in text else None

        text = wait_until(counted, 5, message="the files were not counted")
        assert 'preforkd_requests_total{class="4xx"} 1' in text
        sock.sendall(http_request("GET", "/static/a.css"))
        assert read_response(sock).status == 200  # the 5th request
    server.wait_for_log("max_requests")
    with connect(address(server)) as sock:
        assert wait_until(lambda: harness.ask(sock, "/pid").body != pid, 10,
                          message="the worker was not replaced")


def test_a_reload_changes_the_mapping(server_factory: ServerFactory, tmp_path: Path) -> None:
    server = start(server_factory, tmp_path)
    assert curl(server, "/static/a.css")[0] == 200
    config = yaml.safe_load(server.config.read_text())
    config["static"] = [{"url": "/assets", "path": str(tmp_path / "site" / "public" / "sub")}]
    server.config.write_text(yaml.safe_dump(config))
    since = len(server.log())
    server.signal(signal.SIGHUP)
    server.wait_for_log("reloaded:", since=since)

    def moved() -> bool:
        return curl(server, "/assets/b.txt")[:3:2] == (200, b"b\n")

    wait_until(moved, 10, message="/assets/ was not served after the HUP")
    status, headers, body = curl(server, "/static/a.css")
    assert (status, body) == (404, b"app GET /static/a.css")
    status, headers, body = curl(server, "/assets/b.txt")
    assert "cache-control" not in headers and "vary" not in headers  # max_age 0, no gzip

    config["static"] = [{"url": "/assets", "path": str(tmp_path / "gone")}]
    server.config.write_text(yaml.safe_dump(config))
    since = len(server.log())
    server.signal(signal.SIGHUP)
    failed = server.wait_for_log(re.compile(r"reload failed.*"), since=since).group(0)
    assert "static[0].path" in failed and "no such directory" in failed, failed
    assert curl(server, "/assets/b.txt")[2] == b"b\n"  # the old mapping keeps serving


def test_tls_reads_the_file_instead_of_sendfile(
    server_factory: ServerFactory, tmp_path: Path
) -> None:
    cert, key = harness.self_signed_cert(tmp_path)
    server = start(server_factory, tmp_path, bind=[
        {"address": "127.0.0.1:0", "tls": {"certificate": str(cert), "key": str(key)}}
    ])
    _, host, port = server.addresses()[0]
    url = f"https://{host}:{port}"
    status, _, body = curl(server, "-k", "/static/big.bin", url=url + "/static/big.bin")
    assert status == 200 and body == BIG
    status, _, body = curl(server, "-k", "-r", "10-2000009", "/static/big.bin",
                           url=url + "/static/big.bin")
    assert status == 206 and body == BIG[10:2000010]


def test_a_directory_index_and_the_redirect_to_it(
    server_factory: ServerFactory, tmp_path: Path
) -> None:
    """`index` (uWSGI's static-index): docs/ is answered from docs/index.html, docs from a
    301 to docs/; a directory without the file, or whose file lies outside, is the app's."""
    public = tmp_path / "site" / "public"
    (public / "docs").mkdir(parents=True)
    (public / "docs" / "index.html").write_bytes(b"<p>docs</p>\n")
    (tmp_path / "site" / "index.html").write_bytes(SECRET)  # what outdir/ would show
    server = start(server_factory, tmp_path, static=[
        {"url": "/static/", "path": str(public), "max_age": 60, "index": "index.html"}
    ])

    status, headers, body = curl(server, "/static/docs/")
    assert (status, body) == (200, b"<p>docs</p>\n")
    assert headers["content-type"] == "text/html; charset=utf-8"
    assert headers["cache-control"] == "max-age=60"
    assert curl(server, "-H", f"If-None-Match: {headers['etag']}", "/static/docs/")[0] == 304

    status, headers, body = curl(server, "/static/docs")
    assert (status, headers["location"], headers["content-length"], body) == (
        301, "/static/docs/", "0", b"")
    assert curl(server, "/static/docs?v=2")[1]["location"] == "/static/docs/?v=2"
    assert curl(server, "-I", "/static/docs")[0] == 301
    status, _, body = curl(server, "-L", "/static/docs")  # a client that follows it
    assert (status, body) == (200, b"<p>docs</p>\n")

    for target in ["/static/sub/", "/static/sub", "/static/outdir/", "/static/outdir"]:
        status, _, body = curl(server, target)
        assert (status, body) == (404, f"app GET {target}".encode()), target

    with connect(address(server)) as sock:  # keep-alive goes on after a 301
        sock.sendall(http_request("GET", "/static/docs") + http_request("GET", "/static/docs/"))
        moved, page = read_response(sock), read_response(sock)
    assert (moved.status, moved.header("Location"), moved.body) == (301, "/static/docs/", b"")
    assert (page.status, page.body) == (200, b"<p>docs</p>\n")
    assert moved.header("Connection") is None

    access = server.workdir / "access.log"
    wait_until(lambda: '"GET /static/docs HTTP/1.1" 301 ' in access.read_text(), 5,
               message="no access line for the 301")
