"""Custom access-log formats (gunicorn's atoms) on a real preforkd: the format is written in
the YAML file as a user would write it, and the lines the workers write are checked field by
field, for an application's response, an error page that replaced one, a request the server
rejected itself and a TCP stream connection; a bad format stops the start with file:line:key.

Fields are separated by "|" so that a test can split a line without parsing it.
"""

from __future__ import annotations

import base64
import re
import socket
from pathlib import Path

from harness import (
    Server,
    ServerFactory,
    address,
    connect,
    fetch,
    log_lines,
    read_response,
    send_raw,
    wait_until,
)

APP = '''
def application(environ, start_response):
    if environ["PATH_INFO"] == "/boom":
        start_response("200 OK", [("X-Trace", "never-sent")])
        raise RuntimeError("boom before the head went out")
    environ["APP_NOTE"] = 'set "by" the app'
    start_response("201 Created", [
        ("Content-Type", "text/plain"),
        ("X-Trace", "t-" + environ.get("HTTP_X_REQUEST_ID", "none")),
        ("Set-Cookie", "a=1"),
        ("Set-Cookie", "b=2"),
    ])
    return [b"hello"]


def echo(sock, addr):
    while data := sock.recv(65536):
        sock.sendall(data)
'''

ATOMS = [
    *("h", "l", "u", "t", "r", "m", "U", "q", "H", "s", "B", "b", "f", "a"),
    *("T", "M", "D", "L", "p"),
    *("{x-request-id}i", "{host}i", "{x-trace}o", "{set-cookie}o", "{content-type}o"),
    *("{app_note}e", "{wsgi.url_scheme}e"),
]
FORMAT = "|".join(f"%({atom})s" for atom in ATOMS)
LINE_WAIT = 5.0


def config_text(app: str, fmt: str, protocol: str = "http") -> str:
    """The YAML a user would write; the format single-quoted, as YAML wants a leading %."""
    quoted = fmt.replace("'", "''")
    return (
        f"app: app:{app}\n"
        f"protocol: {protocol}\n"
        "pythonpath: [.]\n"
        "bind: [127.0.0.1:0]\n"
        "workers:\n"
        "  count: 1\n"
        "logging:\n"
        "  access_log: access.log\n"
        f"  access_log_format: '{quoted}'\n"
    )


def start(server_factory: ServerFactory, app: str = "application", fmt: str = FORMAT,
          protocol: str = "http") -> Server:
    return server_factory(config_text=config_text(app, fmt, protocol), app_source=APP)


def wait_for_lines(server: Server, count: int) -> list[dict[str, str]]:
    """The first `count` access lines, split into their atoms (waits, bounded, for them)."""
    path = server.workdir / "access.log"
    wait_until(lambda: len(log_lines(path)) >= count, LINE_WAIT,
               message=f"fewer than {count} access lines")
    lines = log_lines(path)
    assert len(lines) == count, lines
    entries = []
    for line in lines:
        values = line.split("|")
        assert len(values) == len(ATOMS), line
        entries.append(dict(zip(ATOMS, values, strict=True)))
    return entries


def assert_times(entry: dict[str, str]) -> None:
    assert re.fullmatch(r"\[\d{2}/[A-Z][a-z]{2}/\d{4}:\d{2}:\d{2}:\d{2} [+-]\d{4}\]", entry["t"])
    assert re.fullmatch(r"\d+\.\d{6}", entry["L"]), entry
    micros = int(entry["D"])
    assert int(entry["M"]) == micros // 1000
    assert int(entry["T"]) == micros // 1_000_000
    assert abs(round(float(entry["L"]) * 1_000_000) - micros) <= 1  # float: 253.00000000000003


def test_every_atom_of_an_application_response(server_factory: ServerFactory) -> None:
    server = start(server_factory)
    agent = b'pf "agent" \\ \x85'  # a quote, a backslash and obs-text U+0085 (a line break
    # to str.splitlines) must all stay inside their field
    auth = base64.b64encode(b"alice:secret")
    request = (
        b"GET /some%20path%0Aend?x=1&y=2 HTTP/1.1\r\nHost: example.test\r\n"
        b"X-Request-ID: r-1\r\nReferer: http://ref.test/\r\nUser-Agent: " + agent + b"\r\n"
        b"Authorization: Basic " + auth + b"\r\n\r\n"
    )
    with connect(address(server)) as sock:
        sock.sendall(request)
        response = read_response(sock)
    assert response.status == 201 and response.body == b"hello"

    (entry,) = wait_for_lines(server, 1)
    (worker,) = server.worker_pids()
    assert entry == entry | {
        "h": "127.0.0.1",
        "l": "-",
        "u": "alice",
        "r": "GET /some%20path%0Aend?x=1&y=2 HTTP/1.1",
        "m": "GET",
        "U": "/some path\\x0aend",  # PATH_INFO is decoded: the newline is escaped
        "q": "x=1&y=2",
        "H": "HTTP/1.1",
        "s": "201",
        "B": "5",
        "b": "5",
        "f": "http://ref.test/",
        "a": 'pf \\"agent\\" \\\\ \\x85',
        "p": f"<{worker}>",
        "{x-request-id}i": "r-1",
        "{host}i": "example.test",
        "{x-trace}o": "t-r-1",
        "{set-cookie}o": "a=1, b=2",
        "{content-type}o": "text/plain",
        "{app_note}e": 'set \\"by\\" the app',  # the environ as the application left it
        "{wsgi.url_scheme}e": "http",
    }, entry
    assert_times(entry)


def test_an_error_page_does_not_log_the_replaced_headers(server_factory: ServerFactory) -> None:
    server = start(server_factory)
    response = fetch(address(server), "GET", "/boom", [("X-Request-ID", "r-2")])
    assert response.status == 500

    (entry,) = wait_for_lines(server, 1)
    assert (entry["s"], entry["r"], entry["{x-request-id}i"]) == (
        "500", "GET /boom HTTP/1.1", "r-2"
    )
    assert int(entry["B"]) == len(response.body) > 0
    # the application's head never went out: its X-Trace is not what the client got
    assert entry["{x-trace}o"] == entry["{content-type}o"] == "-"
    assert (entry["f"], entry["a"], entry["u"], entry["{app_note}e"]) == ("-", "-", "-", "-")


def test_rejected_requests_have_no_environ_but_their_line(server_factory: ServerFactory) -> None:
    """Responses the server makes itself: what the parser read is logged, the atoms that
    need the environ (or the application's headers) are "-"."""
    server = start(server_factory)
    refused = send_raw(
        address(server),
        b"PUT /x?y=1 HTTP/1.1\r\nHost: t\r\nX-Request-ID: r-3\r\nReferer: http://ref.test/\r\n"
        b"Expect: fly\r\n\r\n",
    )
    assert refused.startswith(b"HTTP/1.1 417 ")
    garbage = send_raw(address(server), b"GARBAGE\r\n\r\n")
    assert garbage.startswith(b"HTTP/1.1 400 ")

    whole_head, no_head = wait_for_lines(server, 2)
    (worker,) = server.worker_pids()
    assert whole_head == whole_head | {
        "h": "127.0.0.1",
        "r": "PUT /x?y=1 HTTP/1.1",
        "m": "PUT",
        "U": "/x",
        "q": "y=1",
        "H": "HTTP/1.1",
        "s": "417",
        "B": str(len(refused.split(b"\r\n\r\n", 1)[1])),
        "f": "http://ref.test/",
        "a": "-",
        "p": f"<{worker}>",
    }, whole_head
    assert no_head == no_head | {
        "h": "127.0.0.1",
        "r": "- - -",
        "m": "-",
        "U": "-",
        "q": "-",
        "H": "-",
        "s": "400",
        "B": str(len(garbage.split(b"\r\n\r\n", 1)[1])),
    }, no_head
    for entry in (whole_head, no_head):
        assert int(entry["B"]) > 0
        for atom in ("u", "{x-request-id}i", "{host}i", "{x-trace}o", "{set-cookie}o",
                     "{content-type}o", "{app_note}e", "{wsgi.url_scheme}e"):
            assert entry[atom] == "-", (atom, entry)
        assert_times(entry)


def test_a_tcp_stream_connection(server_factory: ServerFactory) -> None:
    server = start(server_factory, app="echo", protocol="tcp")
    (tcp,) = [a for a in server.addresses() if a[0] == "tcp"]
    with connect(tcp) as sock:
        sock.sendall(b"12345")
        received = b""
        while len(received) < 5:
            chunk = sock.recv(5 - len(received))
            assert chunk, received
            received += chunk
        sock.shutdown(socket.SHUT_WR)
        assert sock.recv(1) == b""  # the handler returned and the server closed

    (entry,) = wait_for_lines(server, 1)
    listener = f"127.0.0.1:{tcp[2]}"
    assert entry == entry | {
        "h": "127.0.0.1",
        "r": f"TCP {listener} TCP",
        "m": "TCP",
        "H": "TCP",
        "s": "200",
        "B": "5",
        "b": "5",
        "u": "-",
        "{x-request-id}i": "-",
        "{x-trace}o": "-",
        "{wsgi.url_scheme}e": "-",
    }, entry
    assert_times(entry)


def test_a_bad_format_stops_the_start_naming_file_line_and_key(
    server_factory: ServerFactory,
) -> None:
    text = config_text("application", '%(h)s "%(r)s" %(nope)s')
    server = server_factory(config_text=text, app_source=APP, wait_ready=False)
    assert server.wait_exit() != 0
    config = Path(server.config)
    line = text.splitlines().index(
        next(x for x in text.splitlines() if x.startswith("  access_log_format:"))
    ) + 1
    expected = f"{config}:{line}: logging.access_log_format: unknown atom %(nope)s"
    assert expected in server.log(), server.log_tail()
    assert not (server.workdir / "access.log").exists()


SKIP_APP = '''
def application(environ, start_response):
    status = environ["QUERY_STRING"] or "200"
    start_response(status + " Whatever", [("Content-Type", "text/plain")])
    return [environ["PATH_INFO"].encode()]
'''


def test_access_log_skip_leaves_out_successful_health_checks_only(
    server_factory: ServerFactory,
) -> None:
    """logging.access_log_skip: exact paths and prefixes; an error response is logged."""
    server = server_factory(
        config_text=(
            "app: app:application\npythonpath: [.]\nbind: [127.0.0.1:0]\n"
            "workers: {count: 1}\n"
            "logging:\n  access_log: access.log\n  access_log_format: '%(U)s %(q)s %(s)s'\n"
            "  access_log_skip: [/healthz, /static/*]\n"
        ),
        app_source=SKIP_APP,
    )
    targets = ["/healthz", "/healthz?304", "/static/app.css", "/static/", "/healthz?503",
               "/healthzz", "/static", "/static/x?404", "/"]
    for target in targets:
        response = fetch(address(server), target=target)
        expected = int(target.partition("?")[2] or 200)
        assert response.status == expected
    logged = ["/healthz 503 503", "/healthzz - 200", "/static - 200", "/static/x 404 404",
              "/ - 200"]
    path = server.workdir / "access.log"
    wait_until(lambda: len(log_lines(path)) >= len(logged), LINE_WAIT,
               message="fewer access lines than expected")
    assert log_lines(path) == logged
