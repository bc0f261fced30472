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


# --- index (uWSGI's static-index) -------------------------------------------------------------


@pytest.fixture
def site(tree: Path, tmp_path: Path) -> Path:
    """`tree` plus index.html at the root and in docs/, and docs/bare/ without one;
    a symlink inside to docs/, and one leading to a directory outside that has an index."""
    (tree / "index.html").write_text("root index\n")
    (tree / "docs" / "bare").mkdir(parents=True)
    (tree / "docs" / "index.html").write_text("docs index\n")
    (tree / "manual").symlink_to("docs")
    (tmp_path / "outside" / "index.html").write_text("outside\n")
    return tree


def test_a_slashed_directory_serves_its_index(site: Path) -> None:
    files = static_files(site, index="index.html", max_age=60)
    for target, body in [
        ("/static/docs/", b"docs index\n"),
        ("/static/docs//", b"docs index\n"),
        ("/static/", b"root index\n"),
        ("/static/manual/", b"docs index\n"),  # a symlink inside: followed
        ("/static/sub/../docs/", b"docs index\n"),
    ]:
        got = answer(files, target)
        assert got is not None, target
        status, headers, data = got
        assert (status, data) == ("200 OK", body), target
        assert headers["Content-Type"] == "text/html; charset=utf-8"
        assert headers["Cache-Control"] == "max-age=60"
    assert answer(files, "/static/docs/", method="HEAD") == (
        "200 OK", answer(files, "/static/docs/")[1], b"")  # type: ignore[index]
    etag = answer(files, "/static/docs/")[1]["ETag"]  # type: ignore[index]
    got = answer(files, "/static/docs/", HTTP_IF_NONE_MATCH=etag)
    assert got is not None and got[0] == "304 Not Modified"


def test_an_index_outside_the_directory_or_not_a_file_is_not_served(
    site: Path, tmp_path: Path
) -> None:
    files = static_files(site, index="index.html")
    assert answer(files, "/static/outdir/") is None  # a symlink that leaves: not followed
    assert answer(files, "/static/outdir") is None  # nor redirected
    assert answer(files, "/static/docs/bare/") is None  # no index: the application's
    (site / "docs" / "bare" / "index.html").mkdir()  # a directory by that name
    assert answer(files, "/static/docs/bare/") is None
    assert answer(files, "/static/docs/bare") is None
    (site / "sub" / "index.html").symlink_to(tmp_path / "secret.txt")  # a file outside
    assert answer(files, "/static/sub/") is None
    assert answer(files, "/static/sub") is None
    os.mkfifo(site / "docs" / "bare" / "index.html" / "index.html")
    assert answer(files, "/static/docs/bare/index.html/") is None  # and did not block
    assert answer(files, "/static/a.css/") is None  # a file with a slash: not a directory


def test_a_directory_without_its_slash_is_redirected_when_it_has_an_index(site: Path) -> None:
    files = static_files(site, index="index.html")
    for target, location in [
        ("/static/docs", "/static/docs/"),
        ("/static", "/static/"),
        ("/static/manual", "/static/manual/"),
        ("/static//docs", "/static/docs/"),
        ("/static/sub/../docs", "/static/docs/"),
    ]:
        got = answer(files, target)
        assert got is not None, target
        status, headers, body = got
        assert (status, headers["Location"], body) == ("301 Moved Permanently", location, b"")
        assert headers["Content-Length"] == "0"
    got = answer(files, "/static/docs", QUERY_STRING="a=1&b=%20")
    assert got is not None and got[1]["Location"] == "/static/docs/?a=1&b=%20"
    got = answer(files, "/static/docs", method="HEAD")
    assert got is not None and got[0] == "301 Moved Permanently"
    assert answer(files, "/static/docs/bare") is None  # no index there: the application's


def test_the_redirect_location_is_the_decoded_path_encoded_again(tmp_path: Path) -> None:
    root = tmp_path / "root"
    for name in ("a b", "caf\u00e9", "q?x", "50%", "x#y"):
        (root / name).mkdir(parents=True)
        (root / name / "index.html").write_text(name)
    files = static_files(root, index="index.html")
    for target, location in [
        ("/static/a%20b", "/static/a%20b/"),
        ("/static/caf%C3%A9", "/static/caf%C3%A9/"),
        ("/static/q%3Fx", "/static/q%3Fx/"),
        ("/static/50%25", "/static/50%25/"),
        ("/static/x%23y", "/static/x%23y/"),
    ]:
        got = answer(files, target)
        assert got is not None and got[1]["Location"] == location, target
        slashed_got = answer(files, location)
        assert slashed_got is not None and slashed_got[0] == "200 OK", location


def test_the_index_is_off_by_default(site: Path) -> None:
    files = static_files(site)
    assert answer(files, "/static/docs/") is None
    assert answer(files, "/static/docs") is None
    assert answer(files, "/static/") is None
    assert answer(files, "/static/index.html") is not None  # the file itself, as any file


def test_the_index_has_its_gzip_beside_it(site: Path) -> None:
    (site / "docs" / "index.html.gz").write_bytes(b"GZ")
    files = static_files(site, index="index.html", gzip=True)
    got = answer(files, "/static/docs/", HTTP_ACCEPT_ENCODING="gzip")
    assert got is not None and got[2] == b"GZ" and got[1]["Content-Encoding"] == "gzip"
    assert got[1]["Content-Type"] == "text/html; charset=utf-8"


def test_a_later_entry_answers_when_the_first_has_no_index(tmp_path: Path) -> None:
    first, second = tmp_path / "first", tmp_path / "second"
    (first / "docs").mkdir(parents=True)
    (second / "docs").mkdir(parents=True)
    (second / "docs" / "index.html").write_text("second")
    made = config.from_mapping({"app": "x:y", "static": [
        {"url": "/s/", "path": str(first), "index": "index.html"},
        {"url": "/s/docs/", "path": str(second / "docs"), "index": "index.html"},
    ]})
    files = StaticFiles(made.static)
    got = answer(files, "/s/docs/")
    assert got is not None and got[2] == b"second"
    got = answer(files, "/s/docs")
    assert got is not None and got[1]["Location"] == "/s/docs/"  # the second's url


@pytest.mark.parametrize("bad", ["a/index.html", "/index.html", "..", ".", "in\tdex", "\u00eendex"])
def test_the_index_is_a_file_name(tmp_path: Path, bad: str) -> None:
    with pytest.raises(config.ConfigError, match=r"static\[0\].index: must be a file name"):
        config.from_mapping(
            {"app": "x:y", "static": [{"url": "/s", "path": str(tmp_path), "index": bad}]}
        )
    good = config.from_mapping(
        {"app": "x:y", "static": [{"url": "/s", "path": str(tmp_path), "index": "index.htm"}]}
    )
    assert good.static[0].index == "index.htm"
