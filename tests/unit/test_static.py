"""Static files (prefork.static): which request paths may resolve to which files, and the
pieces of the response (range, gzip, validators)."""

from __future__ import annotations

import mimetypes
import os
from pathlib import Path
from typing import Any

import pytest

from prefork import config
from prefork.static import (
    StaticFiles,
    accepts_gzip,
    byte_range,
    content_type,
    relative_part,
    resolve,
)
from prefork.wsgi import FileWrapper, decode_path


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """root/ with a file, a subdirectory, a symlink inside and two leading out; secret.txt
    and outside/ beside root/."""
    root = tmp_path / "root"
    (root / "sub").mkdir(parents=True)
    (root / "a.css").write_text("body{}\n")
    (root / "sub" / "b.txt").write_text("b\n")
    (tmp_path / "secret.txt").write_text("secret\n")
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "c.txt").write_text("c\n")
    (root / "in.css").symlink_to("a.css")
    (root / "out.txt").symlink_to(tmp_path / "secret.txt")
    (root / "outdir").symlink_to(tmp_path / "outside")
    return root


def lookup(root: Path, target: str, url: str = "/static/") -> bytes | None:
    """What a request target resolves to, through the worker's steps: decode_path, then the
    prefix, then resolve()."""
    rest = relative_part(decode_path(target.encode("latin-1")), url)
    if rest is None:
        return None
    return resolve(os.fsencode(os.path.realpath(root)), rest)


def test_a_file_under_the_prefix_resolves(tree: Path) -> None:
    assert lookup(tree, "/static/a.css") == os.fsencode(tree / "a.css")
    assert lookup(tree, "/static/sub/b.txt") == os.fsencode(tree / "sub" / "b.txt")
    assert lookup(tree, "/static//sub//b.txt") == os.fsencode(tree / "sub" / "b.txt")
    assert lookup(tree, "/static/sub/./b.txt") == os.fsencode(tree / "sub" / "b.txt")
    assert lookup(tree, "/static/%61.css") == os.fsencode(tree / "a.css")


def test_the_prefix_matches_whole_segments(tree: Path) -> None:
    assert relative_part("/staticx/a.css", "/static/") is None
    assert relative_part("/static", "/static/") == ""
    assert relative_part("/other/static/a.css", "/static/") is None
    assert lookup(tree, "/static") is None  # the directory itself: never listed
    assert lookup(tree, "/static/") is None
    assert lookup(tree, "/static/sub/") is None


@pytest.mark.parametrize(
    "target",
    [
        "/static/../secret.txt",
        "/static/%2e%2e/secret.txt",
        "/static/%2E%2E/secret.txt",
        "/static/.%2e/secret.txt",
        "/static/sub/../../secret.txt",
        "/static/..%2fsecret.txt",
        "/static/..%2Fsecret.txt",
        "/static/sub%2f..%2f..%2fsecret.txt",
        "/static/%2e%2e%2fsecret.txt",
        "/static/%252e%252e/secret.txt",
        "/static/..\\secret.txt",
        "/static/%2fetc%2fpasswd",
        "/static//etc/passwd",
        "/static/%2F%2Fetc/passwd",
    ],
)
def test_traversal_never_leaves_the_directory(tree: Path, target: str) -> None:
    found = lookup(tree, target)
    root = os.fsencode(os.path.realpath(tree)) + b"/"
    # at most a name inside that is not there (".." taken literally, "%2e%2e" decoded once)
    assert found is None or (found.startswith(root) and not os.path.exists(found))


def test_a_dot_dot_segment_that_reaches_resolve_is_refused(tree: Path) -> None:
    # decode_path removes them; resolve() refuses them all the same
    assert resolve(os.fsencode(tree), "../secret.txt") is None
    assert resolve(os.fsencode(tree), "sub/../../secret.txt") is None


def test_nul_is_refused(tree: Path) -> None:
    assert lookup(tree, "/static/a.css%00.txt") is None
    assert lookup(tree, "/static/a.css%00") is None


def test_symlinks_out_of_the_directory_are_not_followed(tree: Path) -> None:
    assert lookup(tree, "/static/out.txt") is None
    assert lookup(tree, "/static/outdir/c.txt") is None
    assert lookup(tree, "/static/in.css") == os.fsencode(tree / "a.css")  # inside: followed


def test_a_sibling_directory_sharing_the_root_name_is_outside(tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    (tmp_path / "root2").mkdir()
    (tmp_path / "root2" / "x.txt").write_text("x")
    (root / "x.txt").symlink_to(tmp_path / "root2" / "x.txt")
    assert resolve(os.fsencode(root), "x.txt") is None


def static_files(root: Path, **entry: Any) -> StaticFiles:
    made = config.from_mapping(
        {"app": "x:y", "static": [{"url": "/static/", "path": str(root), **entry}]}
    )
    return StaticFiles(made.static)


def answer(
    files: StaticFiles, target: str, method: str = "GET", sendfile_ok: bool = True, **env: str
) -> tuple[str, dict[str, str], bytes] | None:
    environ: dict[str, Any] = {"REQUEST_METHOD": method, **env}
    app = files.app_for(environ, decode_path(target.encode()), sendfile_ok)
    if app is None:
        return None
    seen: list[Any] = []

    def start_response(status: str, headers: list[tuple[str, str]]) -> Any:
        seen.append((status, dict(headers)))
        return None

    body = app(environ, start_response)
    if isinstance(body, FileWrapper):  # as Response.sendfile would: up to Content-Length
        data = body.filelike.read(int(seen[0][1]["Content-Length"]))
    else:
        data = b"".join(body)
    getattr(body, "close", lambda: None)()
    return seen[0][0], seen[0][1], data


@pytest.mark.parametrize("sendfile_ok", [True, False])
def test_a_file_response(tree: Path, sendfile_ok: bool) -> None:
    files = static_files(tree, max_age=60)
    got = answer(files, "/static/a.css", sendfile_ok=sendfile_ok)
    assert got is not None
    status, headers, body = got
    assert status == "200 OK" and body == b"body{}\n"
    assert headers["Content-Type"] == "text/css; charset=utf-8"
    assert headers["Content-Length"] == "7"
    assert headers["Cache-Control"] == "max-age=60"
    assert headers["ETag"].startswith('W/"')
    assert "Vary" not in headers
    got = answer(files, "/static/a.css", HTTP_IF_NONE_MATCH=headers["ETag"])
    assert got is not None and got[0] == "304 Not Modified" and got[2] == b""
    got = answer(files, "/static/a.css", HTTP_IF_MODIFIED_SINCE=headers["Last-Modified"])
    assert got is not None and got[0] == "304 Not Modified"
    got = answer(files, "/static/a.css", HTTP_RANGE="bytes=1-3", sendfile_ok=sendfile_ok)
    assert got is not None and got[0] == "206 Partial Content" and got[2] == b"ody"
    assert got[1]["Content-Range"] == "bytes 1-3/7"
    got = answer(files, "/static/a.css", HTTP_RANGE="bytes=9-")
    assert got is not None and got[0] == "416 Range Not Satisfiable"
    assert got[1]["Content-Range"] == "bytes */7"
    assert answer(files, "/static/missing.css") is None
    assert answer(files, "/static/sub") is None


def test_gzip_beside_the_file(tree: Path) -> None:
    (tree / "a.css.gz").write_bytes(b"GZ")
    files = static_files(tree, gzip=True)
    got = answer(files, "/static/a.css", HTTP_ACCEPT_ENCODING="br, gzip")
    assert got is not None
    assert got[2] == b"GZ" and got[1]["Content-Encoding"] == "gzip"
    assert got[1]["Content-Type"] == "text/css; charset=utf-8"
    assert got[1]["Vary"] == "Accept-Encoding"
    got = answer(files, "/static/a.css", HTTP_ACCEPT_ENCODING="gzip;q=0")
    assert got is not None and got[2] == b"body{}\n" and "Content-Encoding" not in got[1]
    assert got[1]["Vary"] == "Accept-Encoding"
    assert answer(static_files(tree), "/static/a.css", HTTP_ACCEPT_ENCODING="gzip") == answer(
        static_files(tree), "/static/a.css"
    )


def test_gzip_beside_a_symlink_out_is_not_served(tree: Path, tmp_path: Path) -> None:
    (tmp_path / "secret.txt.gz").write_bytes(b"SECRET")
    (tree / "sub" / "b.txt.gz").symlink_to(tmp_path / "secret.txt.gz")
    files = static_files(tree, gzip=True)
    got = answer(files, "/static/sub/b.txt", HTTP_ACCEPT_ENCODING="gzip")
    assert got is not None and got[2] == b"b\n" and "Content-Encoding" not in got[1]


def test_a_fifo_is_not_opened(tree: Path) -> None:
    os.mkfifo(tree / "pipe.txt")
    assert answer(static_files(tree), "/static/pipe.txt") is None  # and did not block


@pytest.mark.parametrize(
    ("header", "size", "expected"),
    [
        ("bytes=0-0", 10, (0, 0)),
        ("bytes=2-", 10, (2, 9)),
        ("bytes=-3", 10, (7, 9)),
        ("bytes=-30", 10, (0, 9)),
        ("bytes=5-100", 10, (5, 9)),
        ("bytes=10-", 10, False),
        ("bytes=-0", 10, False),
        ("bytes=0-", 0, False),
        ("bytes=3-1", 10, None),
        ("bytes=0-1,3-4", 10, None),
        ("items=0-1", 10, None),
        ("bytes=a-b", 10, None),
        ("bytes=5", 10, None),
        ("bytes=-", 10, None),
        ("bytes=١-٢", 10, None),
    ],
)
def test_byte_range(header: str, size: int, expected: object) -> None:
    assert byte_range(header, size) == expected


def test_accepts_gzip() -> None:
    assert accepts_gzip("gzip")
    assert accepts_gzip("deflate, GZIP;q=0.5")
    assert accepts_gzip("*")
    assert not accepts_gzip("")
    assert not accepts_gzip("br")
    assert not accepts_gzip("gzip;q=0")
    assert not accepts_gzip("*, gzip;q=0")


def test_content_type() -> None:
    assert content_type("a.html") == "text/html; charset=utf-8"
    assert content_type("a.png") == "image/png"
    assert content_type("a.tar.gz") == "application/gzip"
    assert content_type("noextension") == "application/octet-stream"


def test_config_checks(tmp_path: Path) -> None:
    good = config.from_mapping({"app": "x:y", "static": [{"url": "/s", "path": str(tmp_path)}]})
    assert good.static[0].url == "/s/" and good.static[0].max_age == 0
    cases = [
        ({"url": "s", "path": str(tmp_path)}, "static[0].url"),
        ({"url": "/a/../b", "path": str(tmp_path)}, "static[0].url"),
        ({"url": "/a%2e", "path": str(tmp_path)}, "static[0].url"),
        ({"url": "/s", "path": str(tmp_path / "nope")}, "static[0].path: no such directory"),
        ({"url": "/s", "path": str(tmp_path), "max_age": -1}, "static[0].max_age"),
        ({"url": "/s", "path": str(tmp_path), "expires": 1}, "unknown key 'expires'"),
        ({"path": str(tmp_path)}, "static[0].url: required"),
    ]
    for entry, message in cases:
        with pytest.raises(config.ConfigError, match=message.replace("[", r"\[").replace(
                "]", r"\]")):
            config.from_mapping({"app": "x:y", "static": [entry]})
    with pytest.raises(config.ConfigError, match=r"static\[1\].url: duplicate"):
        config.from_mapping({"app": "x:y", "static": [
            {"url": "/s", "path": str(tmp_path)}, {"url": "/s/", "path": str(tmp_path)}]})
    with pytest.raises(config.ConfigError, match="protocol http or uwsgi, not tcp"):
        config.from_mapping({"app": "x:y", "protocol": "tcp", "static": [
            {"url": "/s", "path": str(tmp_path)}]})


def test_config_errors_name_the_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("app: x:y\nstatic:\n  - url: /s\n    path: nope\n")
    with pytest.raises(config.ConfigError) as caught:
        config.load(str(path))
    assert str(caught.value).startswith(f"{path}:4: static[0].path: no such directory")


def test_types_the_application_added_are_kept(tree: Path) -> None:
    (tree / "x.preforkdtest").write_text("x")
    mimetypes.add_type("text/x-preforkd-test", ".preforkdtest")  # as a preloaded app may
    try:
        got = answer(static_files(tree), "/static/x.preforkdtest")
        assert got is not None
        assert got[1]["Content-Type"] == "text/x-preforkd-test; charset=utf-8"
    finally:
        mimetypes.init()  # the module's table as it was, for the other tests
