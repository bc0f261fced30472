"""What real frameworks and their middleware do to a server (Flask/Werkzeug, Django), found by
running them under preforkd beside gunicorn, and reproduced here with plain WSGI only.

One test per defect; each failed on the code it was written against. The app is
apps/pf_wsgi_findings.py (its docstring lists the routes), served by one worker, so that a
later request can ask what an earlier one left behind in it.
"""

from __future__ import annotations

import json
import socket
import struct
import time
from typing import Any

from harness import (
    Server,
    ServerFactory,
    address,
    connect,
    fetch,
    http_request,
    read_response,
    settings,
)

FILE_SIZE = 4 << 20
BLOCK = 8192


def start(server_factory: ServerFactory) -> Server:
    return server_factory(settings("pf_wsgi_findings:app", workers={"count": 1}))


def ask(server: Server, target: str) -> Any:
    response = fetch(address(server), "GET", target)
    assert response.status == 200, response
    return json.loads(response.body)


# --- 1: wsgi.file_wrapper over a file whose read() is not its descriptor's bytes -----------


def test_a_decompressing_file_in_file_wrapper_is_sent_as_it_reads(
    server_factory: ServerFactory,
) -> None:
    """A gzip.GzipFile (bz2 and lzma files, codecs' readers alike) has the fileno() of the
    compressed file under it, and the worker sent that descriptor with os.sendfile: the
    client got the compressed bytes under the length of the compressed file, where PEP 3333
    has the file's read() make the body. (gunicorn sends them too, and breaks its framing.)
    """
    server = start(server_factory)
    response = fetch(address(server), "GET", "/gzip")
    assert response.status == 200
    assert response.body == b"hello from inside a gzip file\n" * 200


def test_a_file_that_names_no_size_in_file_wrapper_is_sent_whole(
    server_factory: ServerFactory,
) -> None:
    """/proc/self/status has a size of 0 bytes, yet reads as text: sendfile was given the
    size and sent "Content-Length: 0" and nothing (gunicorn: an empty chunked body)."""
    server = start(server_factory)
    response = fetch(address(server), "GET", "/proc")
    assert response.status == 200
    assert response.body.startswith(b"Name:\t"), response.body[:100]
    assert b"\nPid:\t" in response.body


def test_a_named_temporary_file_in_file_wrapper_still_goes_out_with_sendfile(
    server_factory: ServerFactory,
) -> None:
    """Not a defect: what the fix above must keep. tempfile's NamedTemporaryFile (and
    Django's File) hand out the read() of a plain file: such a body still goes out with
    os.sendfile, which gives it a Content-Length where iterating it would have chunked it."""
    server = start(server_factory)
    response = fetch(address(server), "GET", "/named")
    assert response.status == 200
    assert response.body == b"named temporary file\n" * 300
    assert response.header("Content-Length") == str(len(response.body))
    assert response.header("Transfer-Encoding") is None


# --- 2: middleware that iterates iter(file_wrapper) -----------------------------------------


def range_request(server: Server, first: int, last: int) -> dict[str, Any]:
    """GET /range for bytes first..last; what the file noted."""
    response = fetch(address(server), "GET", f"/range?{first}-{last}")
    assert response.status == 206
    assert response.body == (bytes(range(256)) * (FILE_SIZE // 256))[first : last + 1]
    (note,) = ask(server, "/files")
    return note  # type: ignore[no-any-return]


def test_range_middleware_closing_iter_of_a_file_wrapper_closes_the_file(
    server_factory: ServerFactory,
) -> None:
    """Flask's send_file answers a Range request with Werkzeug's _RangeWrapper, which takes
    iter(body) and, at the end, closes that iterator. preforkd's FileWrapper.__iter__ was a
    generator function (wsgiref's and gunicorn's return the wrapper itself): the middleware
    closed a generator, never the file, which stayed open until it was freed (a
    ResourceWarning). Django's FileResponse hangs its request_finished signal, and so the
    closing of its database connections, on that close."""
    server = start(server_factory)
    note = range_request(server, 1000, 1999)
    assert note["closed_by"] == "close", note


def test_range_middleware_can_seek_a_file_wrapper(server_factory: ServerFactory) -> None:
    """_RangeWrapper seeks to the first byte when iter(body) is seekable(), as Werkzeug's own
    FileWrapper is; preforkd's was not, so for the last hundred bytes of a file the
    middleware read the whole file through Python (as under gunicorn)."""
    server = start(server_factory)
    note = range_request(server, FILE_SIZE - 100, FILE_SIZE - 1)
    assert note["read"] <= 100 + BLOCK, f"read {note['read']} bytes for 100"


# --- 3: 204 with Content-Length -------------------------------------------------------------


def test_a_204_goes_out_without_content_length(server_factory: ServerFactory) -> None:
    """RFC 9110 8.6: a server MUST NOT send Content-Length in a 204. Django's
    CommonMiddleware sets "Content-Length: 0" on every response, so every DRF DELETE sent
    one; gunicorn drops it, preforkd passed it on. The connection stays usable."""
    server = start(server_factory)
    with connect(address(server)) as sock:
        sock.sendall(http_request("GET", "/no-content") + http_request("GET", "/files"))
        response = read_response(sock)
        assert response.status == 204
        assert response.header("Content-Length") is None, response.headers
        assert response.header("Transfer-Encoding") is None
        assert response.header("Content-Type") == "text/html; charset=utf-8"
        assert read_response(sock).status == 200  # the next one is framed as the next one


# --- 4: a response cut short by its client keeps the request alive -------------------------


def test_a_response_its_client_abandoned_is_freed_at_once(server_factory: ServerFactory) -> None:
    """When the first send of a piece failed (the client gone), Connection.send kept the
    ClientDisconnected it raised in a local: its context's traceback holds that frame, a
    cycle that kept every frame under it alive, and with them the application's iterable,
    the environ and the body read so far, until the cyclic collector ran. A generator that
    middleware did not close (as here) ran its finally only then; gunicorn freed it at
    once. The app turns the collector off, so only reference counting frees anything."""
    server = start(server_factory)
    with connect(address(server)) as sock:
        sock.sendall(http_request("GET", "/stream"))
        assert sock.recv(1024).startswith(b"HTTP/1.1 200 ")
        # a reset: the worker's next send (between two pieces, its buffer empty) fails
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    # /freed waits behind /stream for the one worker
    deadline = time.monotonic() + 5.0
    while True:
        freed = ask(server, "/freed")
        assert freed, "the /stream request never reached the app"
        if freed[0] or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert freed == [True], "the abandoned response's generator is still alive"
