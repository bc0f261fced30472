"""Exploratory operator tests: TLS listeners, the PROXY protocol, statsd and /metrics, and
unix-socket binds, against a real preforkd.

Tests whose docstring starts with "Defect:" failed on the code as it was explored and pass
since its fix; the others (marked "# passes: coverage") pin behaviour that no other test
checked. Certificates come from `openssl` (a test CA, two server certificates it signed, a
client certificate, and a passphrase-protected copy of a key).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import ssl
import stat
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from harness import (
    REPO_ROOT,
    Address,
    Server,
    ServerFactory,
    connect,
    fetch,
    log_lines,
    recv_within,
    require_tool,
    send_raw,
    wait_until,
)

# One app for every HTTP test here: JSON of what the server put in the environ about the
# connection (/), a body of ?N bytes (/big), and a request that waits until the file named
# by its query string exists (/slow, at most 20 s).
APP = r'''
import json
import os
import sys
import time


def application(environ, start_response):
    path = environ["PATH_INFO"]
    if path == "/big":
        body = b"x" * int(environ["QUERY_STRING"])
    elif path == "/slow":
        print("app: slow request started", file=sys.stderr, flush=True)
        deadline = time.monotonic() + 20
        while not os.path.exists(environ["QUERY_STRING"]) and time.monotonic() < deadline:
            time.sleep(0.02)
        body = b"slow done"
    else:
        keys = {k: v for k, v in environ.items()
                if isinstance(v, str) and (k.startswith(("SSL_", "REMOTE_", "HTTP_X_"))
                                           or k == "HTTPS")}
        keys["scheme"] = environ["wsgi.url_scheme"]
        keys["pid"] = os.getpid()
        body = json.dumps(keys, sort_keys=True).encode()
    start_response("200 OK", [("Content-Type", "application/json"),
                              ("Content-Length", str(len(body)))])
    return [body]
'''

# protocol: tcp handlers
HANDLERS = r'''
def whoami(sock, addr):
    first = sock.recv(100)
    sock.sendall(("%s %s " % (addr[0], addr[1])).encode() + first)
'''

V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
REQUEST = b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"


# --- certificates ------------------------------------------------------------------------------


class Certs:
    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.ca = directory / "ca.pem"
        # two server certificates for localhost/127.0.0.1 the CA signed, told apart by CN
        self.first_cert, self.first_key = directory / "first.pem", directory / "first.key"
        self.second_cert, self.second_key = directory / "second.pem", directory / "second.key"
        self.client_cert, self.client_key = directory / "client.pem", directory / "client.key"
        self.encrypted_key = directory / "encrypted.key"  # first.key with a passphrase


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    openssl = require_tool("openssl")
    c = Certs(tmp_path_factory.mktemp("explore-certs"))

    def run(*args: str) -> None:
        subprocess.run([openssl, *args], cwd=c.dir, check=True, capture_output=True, timeout=60)

    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
        "-subj", "/CN=pf explore CA", "-keyout", "ca.key", "-out", "ca.pem",
        "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign")
    server_ext = "subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\n"
    for name, subject, ext in [
        ("first", "/CN=first", server_ext),
        ("second", "/CN=second", server_ext),
        ("client", "/CN=pf client", "extendedKeyUsage=clientAuth\n"),
    ]:
        (c.dir / f"{name}.ext").write_text(ext)
        run("req", "-newkey", "rsa:2048", "-nodes", "-subj", subject,
            "-keyout", f"{name}.key", "-out", f"{name}.csr")
        run("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
            "-CAcreateserial", "-days", "2", "-extfile", f"{name}.ext", "-out", f"{name}.pem")
    run("pkey", "-in", "first.key", "-aes256", "-passout", "pass:secret",
        "-out", "encrypted.key")
    return c


def tls_entry(cert: Path, key: Path, **more: Any) -> dict[str, Any]:
    return {"address": "127.0.0.1:0", "tls": {"certificate": str(cert), "key": str(key), **more}}


def client_context(certs: Certs, *, with_cert: bool = False) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(certs.ca))
    if with_cert:
        context.load_cert_chain(str(certs.client_cert), str(certs.client_key))
    return context


def listener(server: Server, scheme: str) -> Address:
    found = [a for a in server.addresses() if a[0] == scheme]
    assert found, f"no {scheme} address in the log\n{server.log_tail()}"
    return found[0]


def https_get(server: Server, context: ssl.SSLContext, target: str = "/") -> tuple[Any, ...]:
    """One GET over TLS: (status, JSON body or raw bytes, the server certificate's CN, the
    negotiated protocol version)."""
    _, host, port = listener(server, "https")
    with socket.create_connection((host, port), timeout=10) as raw, \
            context.wrap_socket(raw, server_hostname="localhost") as tls:
        tls.sendall(f"GET {target} HTTP/1.1\r\nHost: localhost\r\n"
                    "Connection: close\r\n\r\n".encode())
        cert = tls.getpeercert() or {}
        cn = dict(pair for rdn in cert.get("subject", ()) for pair in rdn).get("commonName")
        version = tls.version()
        data = b""
        while chunk := tls.recv(65536):  # Connection: close; the socket's timeout bounds it
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.1 "):
        raise EOFError(f"no HTTP response over TLS: {data!r}")
    decoded: Any = body
    with contextlib.suppress(ValueError):
        decoded = json.loads(body)
    return int(head.split(b" ")[1]), decoded, cn, version


def write_settings(server: Server, data: dict[str, Any]) -> None:
    """Rewrite the server's configuration file (for a reload)."""
    server.config.write_text(yaml.safe_dump(data, sort_keys=False))


# --- TLS ---------------------------------------------------------------------------------------


BAD_TLS = """\
app: app:application
pythonpath: ["."]
bind:
  - address: 127.0.0.1:0
    tls:
      certificate: {certificate}
      key: {key}
      ca: {ca}
      verify_client: optional
      ciphers: {ciphers}
"""


@pytest.mark.parametrize(
    ("case", "line", "key"),
    [("ciphers", 10, "ciphers"), ("ca", 8, "ca"), ("certificate", 6, "certificate")],
)
def test_an_unusable_tls_setting_is_reported_against_its_own_key(
    server_factory: ServerFactory, certs: Certs, tmp_path: Path, case: str, line: int, key: str
) -> None:
    """Defect: a TLS setting OpenSSL refuses for a reason other than a missing file is
    reported as `bind[0].tls.key: cannot load certificate ... with key ...` on the line of
    `key`, sending the operator to a key that is fine:
      - a `ciphers` string OpenSSL cannot use ("No cipher can be selected.");
      - a `ca` file holding no PEM certificate (a DER file, a key): "[X509:
        NO_CERTIFICATE_OR_CRL_FOUND]";
      - a `certificate` file that is not PEM: "[SSL] PEM lib".
    The missing-file and key-mismatch cases already name their key and line
    (test_features), and gunicorn's errors name the setting (--ciphers, --ca-certs,
    --certfile). Expected: `FILE:LINE: bind[0].tls.<that key>:` for the setting at fault.

    Responsible: config._check_tls, which maps every OSError without a filename (an
    ssl.SSLError from load_cert_chain, load_verify_locations or set_ciphers) to `key`; fix:
    run the steps of tls.server_context separately (load_cert_chain, load_verify_locations,
    set_ciphers) and report each one's error against its own key (and keep `key` for
    KEY_VALUES_MISMATCH)."""
    garbage = tmp_path / "not-pem.txt"
    garbage.write_text("this is not a PEM file\n")
    values = {"certificate": certs.first_cert, "key": certs.first_key, "ca": certs.ca,
              "ciphers": "ECDHE-RSA-AES256-GCM-SHA384"}
    values[case] = "NO-SUCH-CIPHER-SUITE" if case == "ciphers" else garbage
    text = BAD_TLS.format(**{k: json.dumps(str(v)) for k, v in values.items()})
    server = server_factory(config_text=text, app_source=APP, wait_ready=False)
    assert server.wait_exit() == 2
    log = server.log()
    assert f"{server.config}:{line}: bind[0].tls.{key}:" in log, log


def test_a_passphrase_protected_key_fails_at_once_without_prompting(
    tmp_path: Path, certs: Certs
) -> None:
    """Defect: with a passphrase-protected `key`, loading it makes OpenSSL prompt
    "Enter PEM pass phrase:" and read the answer from the terminal or stdin. preforkd has
    no passphrase setting, so nobody can answer: `preforkd check` (and a start, and a HUP
    in a foreground master) blocks as long as stdin stays open (here: a pipe nobody writes,
    as under a supervisor or `ssh host preforkd ...`), and with stdin at EOF it fails with
    the meaningless "[Errno 22] Invalid argument". Expected: fail at once with status 2 and
    a message saying the key is encrypted / needs a passphrase (nginx says "bad password
    read"; uWSGI and gunicorn never hang a reload on a tty prompt).

    Responsible: tls.server_context's `context.load_cert_chain(certificate, key)`; fix: pass
    `password=` a callable that raises (e.g. ValueError("the key is encrypted: preforkd
    cannot read passphrase-protected keys")), so OpenSSL never falls back to its prompt, and
    let config._check_tls report it against `key`."""
    config = tmp_path / "preforkd.yaml"
    (tmp_path / "app.py").write_text(APP)
    config.write_text(yaml.safe_dump({
        "app": "app:application", "pythonpath": ["."],
        "bind": [tls_entry(certs.first_cert, certs.encrypted_key)],
    }))
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    err_path = tmp_path / "check.err"
    with open(err_path, "wb") as err_file:
        # stdin: a pipe this test holds open and never writes to
        proc = subprocess.Popen(
            [sys.executable, "-m", "prefork", "check", "-c", str(config)],
            stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=err_file,
            env=env, cwd=tmp_path, start_new_session=True,
        )
    try:
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()  # our own child, by pid
            proc.wait(timeout=5)
            pytest.fail("`preforkd check` still waiting after 15 s; stderr: "
                        f"{err_path.read_text(errors='replace')!r}")
    finally:
        assert proc.stdin is not None
        with contextlib.suppress(OSError):
            proc.stdin.close()
    text = err_path.read_text(errors="replace")
    assert proc.returncode == 2, (proc.returncode, text)
    assert "pass phrase" not in text.lower(), text  # no prompt nobody can answer
    assert re.search(r"encrypted|passphrase|password", text, re.I), text
    assert "bind[0].tls.key" in text, text


def test_a_failed_tls_handshake_is_logged_at_debug(
    server_factory: ServerFactory, certs: Certs
) -> None:
    """Defect: on an HTTP `tls` listener a handshake that fails (here: verify_client
    required and a client with no certificate; equally a plain-HTTP client or a wrong CA)
    is dropped without a word in the error log, even at logging.level debug, so an operator
    whose clients' certificates are refused has nothing to go on. With protocol tcp the same
    failure is logged at debug ("closing PEER: TLS handshake: ..."), gunicorn logs "Error
    processing SSL request" / "ssl connection closed" at debug, nginx logs the handshake
    failure at info. Expected: at least a debug line naming the peer and the TLS reason.

    Responsible: worker.Worker.on_readable (`if not done: self.drop(conn)`) and
    tls.TLSConnection.handshake, which swallows the ssl.SSLError; fix: keep the exception
    and log.debug("worker %d: closing %s: TLS handshake: %s", ...) before dropping."""
    server = server_factory(
        {"app": "app:application", "workers": {"count": 1}, "logging": {"level": "debug"},
         "bind": [tls_entry(certs.first_cert, certs.first_key, ca=str(certs.ca),
                            verify_client="required")]},
        app_source=APP,
    )
    # the listener works for a client that has a certificate
    assert https_get(server, client_context(certs, with_cert=True))[0] == 200
    since = len(server.log())
    with pytest.raises((ssl.SSLError, ConnectionError, EOFError)):
        https_get(server, client_context(certs))
    server.wait_for_log(re.compile(r"(?i)handshake|certificate|ssl|tls"), 5, since=since)


def test_a_replaced_certificate_is_served_after_hup_and_a_mismatched_one_is_refused(
    server_factory: ServerFactory, certs: Certs, tmp_path: Path
) -> None:
    # passes: coverage -- certificate rotation as certbot's deploy hook does it: replace the
    # files, send HUP. A half-rotated pair (new certificate, old key) fails the reload,
    # naming the files, and the old certificate is still served.
    live = tmp_path / "live"
    live.mkdir()
    cert, key = live / "cert.pem", live / "key.pem"
    shutil.copy(certs.first_cert, cert)
    shutil.copy(certs.first_key, key)
    data = {"app": "app:application", "pythonpath": ["."], "workers": {"count": 1},
            "bind": [tls_entry(cert, key)]}
    server = server_factory(data, app_source=APP)
    context = client_context(certs)
    assert https_get(server, context)[2] == "first"

    shutil.copy(certs.second_cert, cert)
    shutil.copy(certs.second_key, key)
    since = len(server.log())
    server.signal(signal.SIGHUP)
    server.wait_for_log("reloaded: generation 2 serving", 15, since=since)
    wait_until(lambda: https_get(server, context)[2] == "second", 10,
               message="the new certificate is not served after HUP")

    shutil.copy(certs.first_cert, cert)  # the key is still the second one's
    since = len(server.log())
    server.signal(signal.SIGHUP)
    match = server.wait_for_log(re.compile(r"reload failed: .*"), 15, since=since)
    assert "bind[0].tls.key" in match.group(0) and "still serving generation 2" in match.group(0)
    assert https_get(server, context)[2] == "second"


def test_plain_http_on_a_tls_port_gets_no_plaintext_and_the_worker_serves_on(
    server_factory: ServerFactory, certs: Certs
) -> None:
    # passes: coverage -- a client speaking HTTP to the HTTPS port gets no plaintext answer
    # (no request reaches the app) and the only worker keeps serving TLS clients.
    server = server_factory(
        {"app": "app:application", "workers": {"count": 1},
         "bind": [tls_entry(certs.first_cert, certs.first_key)]},
        app_source=APP,
    )
    status, body, _, _ = https_get(server, client_context(certs))
    assert status == 200
    pid = body["pid"]
    with connect(listener(server, "https")) as sock:
        sock.sendall(REQUEST)
        received, closed = recv_within(sock, 5)
    assert closed and b"HTTP/1." not in received, received
    status, body, _, _ = https_get(server, client_context(certs))
    assert (status, body["pid"]) == (200, pid)


def test_min_version_and_ciphers_are_enforced(
    server_factory: ServerFactory, certs: Certs
) -> None:
    # passes: coverage -- min_version 1.3 refuses a TLS 1.2-only client; `ciphers` limits
    # what a TLS 1.2 client may use, and SSL_CIPHER / SSL_PROTOCOL say what was negotiated.
    only13 = server_factory(
        {"app": "app:application", "workers": {"count": 1},
         "bind": [tls_entry(certs.first_cert, certs.first_key, min_version="1.3")]},
        app_source=APP,
    )
    old_client = client_context(certs)
    old_client.maximum_version = ssl.TLSVersion.TLSv1_2
    with pytest.raises((ssl.SSLError, ConnectionError, EOFError)):
        https_get(only13, old_client)
    status, body, _, version = https_get(only13, client_context(certs))
    assert (status, version, body["SSL_PROTOCOL"]) == (200, "TLSv1.3", "TLSv1.3")

    suite = "ECDHE-RSA-AES256-GCM-SHA384"
    limited = server_factory(
        {"app": "app:application", "workers": {"count": 1},
         "bind": [tls_entry(certs.first_cert, certs.first_key, ciphers=suite)]},
        app_source=APP,
    )
    other = client_context(certs)
    other.maximum_version = ssl.TLSVersion.TLSv1_2
    other.set_ciphers("ECDHE-RSA-AES128-GCM-SHA256")
    with pytest.raises((ssl.SSLError, ConnectionError, EOFError)):
        https_get(limited, other)
    same = client_context(certs)
    same.maximum_version = ssl.TLSVersion.TLSv1_2
    same.set_ciphers(suite)
    status, body, _, version = https_get(limited, same)
    assert (status, version) == (200, "TLSv1.2")
    assert (body["SSL_CIPHER"], body["SSL_PROTOCOL"], body["HTTPS"]) == (suite, "TLSv1.2", "on")


# --- PROXY protocol ----------------------------------------------------------------------------


def v2_header(command: int, family: int, addresses: bytes, tlvs: bytes = b"") -> bytes:
    body = addresses + tlvs
    return V2_SIGNATURE + bytes([0x20 | command, family]) + struct.pack("!H", len(body)) + body


def test_proxy_v1_unknown_ignores_the_rest_of_its_line(server_factory: ServerFactory) -> None:
    """Defect: `PROXY UNKNOWN` followed by anything but exactly four more fields is taken as
    a malformed header and the connection is closed. The PROXY protocol spec (haproxy
    doc/proxy-protocol.txt, 2.1): for "UNKNOWN", "the receiver must ignore anything
    presented before the CRLF is found", and the connection is served with the socket's
    own addresses. Expected: 200, REMOTE_ADDR the proxy's (127.0.0.1).

    Responsible: http/proxy.py ProxyHeader._v1 (`len(parts) in (2, 6) and parts[1] ==
    b"UNKNOWN"`); fix: accept any number of parts when parts[1] == b"UNKNOWN"."""
    server = server_factory(
        {"app": "app:application", "workers": {"count": 1}, "http": {"proxy_protocol": "v1"}},
        app_source=APP,
    )
    where = server.addresses()[0]
    # the 6-field form is served (as the code intends) ...
    answer = send_raw(where, b"PROXY UNKNOWN ::1 ::1 1 2\r\n" + REQUEST)
    assert answer.startswith(b"HTTP/1.1 200 "), answer
    # ... and so must any other text before the CRLF
    answer = send_raw(where, b"PROXY UNKNOWN 192.0.2.1\r\n" + REQUEST)
    assert answer.startswith(b"HTTP/1.1 200 "), answer
    assert json.loads(answer.partition(b"\r\n\r\n")[2])["REMOTE_ADDR"] == "127.0.0.1"


def test_proxy_v2_client_in_environ_and_access_log_and_local_keeps_the_peer(
    server_factory: ServerFactory,
) -> None:
    # passes: coverage -- a v2 header for an IPv6 client, with TLVs (authority, unique id)
    # after the addresses: REMOTE_ADDR/REMOTE_PORT and the access log's %(h)s are the client;
    # an X-Forwarded-For the client sent is not believed (the client is not a trusted proxy);
    # a LOCAL header (the proxy's own health check) keeps the socket's peer.
    server = server_factory(
        {"app": "app:application", "workers": {"count": 1}, "http": {"proxy_protocol": "v2"},
         "logging": {"access_log": "access.log", "access_log_format": "%(h)s %(U)s %(s)s"}},
        app_source=APP,
    )
    where = server.addresses()[0]
    src = socket.inet_pton(socket.AF_INET6, "2001:db8::7")
    dst = socket.inet_pton(socket.AF_INET6, "2001:db8::1")
    tlvs = (b"\x02" + struct.pack("!H", 11) + b"example.org"  # PP2_TYPE_AUTHORITY
            + b"\x05" + struct.pack("!H", 4) + b"abcd")  # PP2_TYPE_UNIQUE_ID
    header = v2_header(1, 0x21, src + dst + struct.pack("!HH", 4242, 443), tlvs)
    request = b"GET /first HTTP/1.1\r\nHost: x\r\nX-Forwarded-For: 9.9.9.9\r\n" \
              b"Connection: close\r\n\r\n"
    answer = send_raw(where, header + request)
    assert answer.startswith(b"HTTP/1.1 200 "), answer
    env = json.loads(answer.partition(b"\r\n\r\n")[2])
    assert (env["REMOTE_ADDR"], env["REMOTE_PORT"]) == ("2001:db8::7", "4242")
    assert env["scheme"] == "http"

    local = v2_header(0, 0x00, b"")
    answer = send_raw(where, local + REQUEST.replace(b"GET /", b"GET /local"))
    assert answer.startswith(b"HTTP/1.1 200 "), answer
    assert json.loads(answer.partition(b"\r\n\r\n")[2])["REMOTE_ADDR"] == "127.0.0.1"

    access = server.workdir / "access.log"
    lines = wait_until(lambda: log_lines(access) if len(log_lines(access)) >= 2 else None, 5)
    assert lines == ["2001:db8::7 /first 200", "127.0.0.1 /local 200"], lines


def test_stream_client_closing_inside_its_proxy_header_frees_the_worker(
    server_factory: ServerFactory,
) -> None:
    """Defect: with protocol tcp (one connection per worker at a time), a client that sends
    part of a PROXY header and then closes its side (FIN) keeps the worker polling its
    socket every 5 ms until stream.handshake_timeout, serving no one: the next client waits
    the whole handshake_timeout (10 s by default). The closed socket is readable at once
    with EOF, and a client closing before any byte is already dropped at once (the
    `ConnectionResetError("the client closed before its PROXY header")` path). Expected:
    the worker gives up on the EOF and the next client is served at once.

    Responsible: stream._wait_for_more, which treats a peek of b"" (EOF) as "not more yet"
    and sleeps on; fix: raise ConnectionResetError("the client closed in its PROXY header")
    when the peek returns b"" (and wait with select/poll instead of sleeping 5 ms)."""
    handshake_timeout = 8.0
    server = server_factory(
        {"app": "app:whoami", "protocol": "tcp", "workers": {"count": 1},
         "http": {"proxy_protocol": "v1"}, "stream": {"handshake_timeout": handshake_timeout}},
        app_source=HANDLERS,
    )
    where = server.addresses()[0]
    with connect(where) as quitter:
        quitter.sendall(b"PROXY TCP4 203.0.113.9")
        quitter.shutdown(socket.SHUT_WR)
        # the worker has taken it once it closes the connection; until then it is stuck
        started = time.monotonic()
        with connect(where, timeout=handshake_timeout + 5) as client:
            client.sendall(b"PROXY TCP4 203.0.113.7 127.0.0.1 5555 7000\r\nhello")
            answer, _ = recv_within(client, handshake_timeout + 5)
        waited = time.monotonic() - started
    assert answer == b"203.0.113.7 5555 hello", answer
    assert waited < 2.0, f"the next client waited {waited:.1f}s behind a closed connection"


# --- statsd ------------------------------------------------------------------------------------


class Statsd:
    """A UDP socket standing in for a statsd daemon: every line received, counters summed."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind((host, port))
        self.port = self.sock.getsockname()[1]
        self.lines: list[str] = []

    def poll(self, timeout: float = 0.2) -> list[str]:
        self.sock.settimeout(timeout)
        with contextlib.suppress(TimeoutError):
            while True:
                self.lines += self.sock.recv(65536).decode("ascii").split("\n")
                self.sock.settimeout(0.01)
        return self.lines

    def counter(self, name: str) -> list[str]:
        """The raw values sent for counter `name`."""
        self.poll()
        return [line.split(":", 1)[1].split("|", 1)[0] for line in self.lines
                if line.startswith(name + ":") and "|c" in line]

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def statsd() -> Iterator[Statsd]:
    daemon = Statsd()
    try:
        yield daemon
    finally:
        daemon.close()


def test_statsd_counters_keep_every_digit(server_factory: ServerFactory, statsd: Statsd) -> None:
    """Defect: statsd values are formatted with `{value:g}`, six significant digits: one
    response of 1,234,567 bytes goes out as `preforkd.response_bytes:1.23457e+06|c`, which
    statsd/Telegraf/DogStatsD read as 1,234,570 -- every interval that moves more than
    999,999 bytes (or serves more than 999,999 requests) adds a rounding error to the
    running total. /metrics reports the exact figure. Expected: the exact integer
    (`response_bytes:1234567|c`), as gunicorn's statsd logger sends (`%s|c`).

    Responsible: statsd.StatsdSink.lines (`f"...:{increase:g}|c"` and the gauges'
    `{value:g}`); fix: format integers as integers (`int(v)` when v.is_integer(), else
    repr/`{v:.6f}`-style without exponent)."""
    server = server_factory(
        {"app": "app:application", "workers": {"count": 1},
         "statsd": {"address": f"127.0.0.1:{statsd.port}", "interval": 0.2}},
        app_source=APP,
    )
    size = 1234567
    response = fetch(server.addresses()[0], target=f"/big?{size}", timeout=10)
    assert (response.status, len(response.body)) == (200, size)
    values = wait_until(lambda: statsd.counter("preforkd.response_bytes"), 10,
                        message=f"no response_bytes counter; lines: {statsd.lines[-10:]}")
    assert values == [str(size)], values


def test_a_reload_resolves_the_statsd_host_name_again(
    server_factory: ServerFactory, tmp_path: Path
) -> None:
    """Defect: docs/settings.md, statsd.address: "A host name is resolved at start and at
    each reload." It is not: a HUP with the statsd settings unchanged keeps the socket
    address resolved at start, so after the statsd host moves (a container restarted with a
    new address, a DNS failover) metrics keep going to the old address until the
    configuration text changes or the server restarts; likewise a name that did not resolve
    at start is not retried by a HUP ("until a reload changes statsd.address").

    The name is resolved through a getaddrinfo shim the test loads into the server (a file
    says which address `statsd.pf-test` has), standing in for DNS. Expected: after the
    address changes and a HUP, the metrics reach the new address.

    Responsible: master.Master.send_statsd (`if sink is None or sink.config != settings`
    keeps the sink across a reload) and its `statsd_refused` check; fix: remake the sink
    (keeping `previous`) when a reload takes over, e.g. clear self.statsd_refused and mark
    the sink stale in the reload path, or compare the resolved address as well."""
    first, second = Statsd("127.0.0.1"), None
    try:
        second = Statsd("127.0.0.2", first.port)
        shim_dir = tmp_path / "shim"
        shim_dir.mkdir()
        hosts = tmp_path / "statsd-address"
        hosts.write_text("127.0.0.1")
        (shim_dir / "pf_dns_shim.py").write_text(
            "import os, socket\n"
            "_real = socket.getaddrinfo\n"
            "def getaddrinfo(host, *args, **kwargs):\n"
            "    if host == 'statsd.pf-test':\n"
            "        with open(os.environ['PF_TEST_STATSD_ADDRESS']) as f:\n"
            "            host = f.read().strip()\n"
            "    return _real(host, *args, **kwargs)\n"
            "socket.getaddrinfo = getaddrinfo\n"
        )
        command = [sys.executable, "-c",
                   "import sys, pf_dns_shim; from prefork.cli import main; "
                   "sys.exit(main(sys.argv[1:]))"]
        env = {"PYTHONPATH": os.pathsep.join([str(REPO_ROOT), str(shim_dir)]),
               "PF_TEST_STATSD_ADDRESS": str(hosts)}
        server = server_factory(
            {"app": "app:application", "workers": {"count": 1},
             "statsd": {"address": f"statsd.pf-test:{first.port}", "interval": 0.2}},
            app_source=APP, command=command, env=env,
        )
        wait_until(lambda: any(line.startswith("preforkd.workers:") for line in first.poll()),
                   10, message="no metrics at the first address")

        hosts.write_text("127.0.0.2")
        since = len(server.log())
        server.signal(signal.SIGHUP)
        server.wait_for_log("reloaded: generation 2 serving", 15, since=since)
        assert second is not None
        wait_until(lambda: any(line.startswith("preforkd.") for line in second.poll()), 5,
                   message="after the HUP the metrics still go to the old address")
    finally:
        first.close()
        if second is not None:
            second.close()


# --- /metrics ----------------------------------------------------------------------------------

_SAMPLE = re.compile(r"([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)")
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\\n]|\\[\\"n])*)"(,|$)')


def strict_exposition(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Check Prometheus text format 0.0.4 strictly (prometheus_client's parser is lenient):
    HELP and TYPE once per family, before its samples; a family's samples together; no
    sample twice (same name and labels); histogram buckets cumulative with +Inf = _count.
    Returns the samples."""
    assert text.endswith("\n"), "the exposition must end with a newline"
    types: dict[str, str] = {}
    helps: set[str] = set()
    finished: set[str] = set()
    current: str | None = None
    samples: dict[tuple[str, frozenset[tuple[str, str]]], float] = {}
    for line in text[:-1].split("\n"):
        if line.startswith("# HELP ") or line.startswith("# TYPE "):
            kind, name = line[2:6], line.split(" ")[2]
            if current is not None and name != current:
                finished.add(current)
            assert name not in finished, f"family {name} split: {line!r}"
            if kind == "HELP":
                assert name not in helps, f"HELP twice: {line!r}"
                helps.add(name)
            else:
                assert name not in types, f"TYPE twice: {line!r}"
                assert line.split(" ")[3] in ("counter", "gauge", "histogram", "summary",
                                              "untyped"), line
                types[name] = line.split(" ")[3]
            current = name
            continue
        match = _SAMPLE.fullmatch(line)
        assert match, f"not a sample line: {line!r}"
        name, labels_text, value = match.groups()
        family = name
        if current is not None and types.get(current) == "histogram" and name in (
            current + "_bucket", current + "_sum", current + "_count"
        ):
            family = current
        assert family == current, f"sample {name} outside its family (in {current}): {line!r}"
        labels: list[tuple[str, str]] = []
        rest = labels_text or ""
        while rest:
            label = _LABEL.match(rest)
            assert label, f"malformed labels in {line!r}"
            labels.append((label.group(1), label.group(2)))
            rest = rest[label.end():]
        assert len({k for k, _ in labels}) == len(labels), f"label repeated: {line!r}"
        key = (name, frozenset(labels))
        assert key not in samples, f"duplicate sample: {line!r}"
        samples[key] = float(value)
    for name, kind in types.items():
        if kind != "histogram":
            continue
        buckets = sorted(
            ((float(dict(k[1])["le"]), v) for k, v in samples.items()
             if k[0] == name + "_bucket"),
        )
        assert buckets and buckets[-1][0] == float("inf"), f"{name}: no +Inf bucket"
        counts = [v for _, v in buckets]
        assert counts == sorted(counts), f"{name}: buckets not cumulative {buckets}"
        assert buckets[-1][1] == samples[(name + "_count", frozenset())], name
    return samples


def test_metrics_stay_well_formed_while_two_generations_serve(
    server_factory: ServerFactory, short_tmp: Path, tmp_path: Path
) -> None:
    # passes: coverage -- /metrics in the middle of a reload (an old worker draining a
    # request, the new one serving) over TLS and unix listeners: valid exposition format,
    # no duplicate series (both workers are number 1), the reload counted.
    release = tmp_path / "release"
    admin = short_tmp / "admin.sock"
    server = server_factory(
        {"app": "app:application", "workers": {"count": 1},
         "bind": ["127.0.0.1:0", f"unix:{short_tmp}/web.sock"],
         "admin": {"socket": str(admin)}},
        app_source=APP,
    )
    first = strict_exposition(fetch(str(admin), target="/metrics").body.decode())
    assert first[("preforkd_generation", frozenset())] == 1
    listeners = {dict(k[1])["listener"] for k in first if k[0] == "preforkd_listen_queue_limit"}
    assert listeners == {f"unix:{short_tmp}/web.sock", server.url}, listeners

    results: list[Any] = []
    slow = threading.Thread(
        target=lambda: results.append(
            fetch(server.addresses()[0], target=f"/slow?{release}", timeout=30)
        ),
        daemon=True,
    )
    slow.start()
    try:
        server.wait_for_log("app: slow request started", 10)
        since = len(server.log())
        server.signal(signal.SIGHUP)
        server.wait_for_log("reload: generation 2 is serving", 15, since=since)
        body = fetch(str(admin), target="/metrics").body.decode()
        samples = strict_exposition(body)
        connections = [k for k in samples if k[0] == "preforkd_worker_connections"]
        assert len(connections) == 2, body  # the draining worker and its successor
        assert samples[("preforkd_generation", frozenset())] == 2
        assert samples[("preforkd_reloads_total", frozenset({("result", "ok")}))] == 1
        assert samples[("preforkd_workers", frozenset({("state", "busy")}))] == 1
    finally:
        release.write_text("go")
        slow.join(30)
    assert results and results[0].status == 200 and results[0].body == b"slow done"


# --- unix sockets ------------------------------------------------------------------------------


def test_a_failed_reload_leaves_the_unix_socket_mode_as_it_was(
    server_factory: ServerFactory, short_tmp: Path
) -> None:
    """Defect: a HUP whose new configuration changes a unix socket's `mode` (or owner/group)
    and then fails (here a hook module that cannot be imported; equally a preload_app that
    fails to import) applies the new mode anyway, while the log says "reload failed: ...;
    still serving generation 1". The socket keeps serving generation 1 with generation 2's
    permissions: tightened to 0600, the front proxy (another user in the group) loses
    access -- an outage from a reload reported as a no-op; loosened, the socket is opened
    to users the running configuration excludes. docs: a failed reload keeps "the old
    generation, its environment, its sockets and its logs" (cli.reloader docstring);
    gunicorn and uWSGI apply nothing of a reload that fails. Expected: the mode stays 0660.

    Responsible: cli.reloader -> sockets.bind_all(..., reuse=held) -> update_unix (and the
    `lst.configured = spec; lst.tls = spec.tls` mutation of kept listeners), run before the
    steps that can still fail; fix: apply update_unix/the listener changes only once the
    reload has succeeded (or undo them in reloader's except path)."""
    path = short_tmp / "web.sock"
    data = {"app": "app:application", "pythonpath": ["."], "workers": {"count": 1},
            "bind": [{"address": f"unix:{path}", "mode": "660"}]}
    server = server_factory(data, app_source=APP)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o660

    write_settings(server, {**data, "bind": [{"address": f"unix:{path}", "mode": "600"}],
                            "hooks": {"on_reload": "pf_explore_no_such_module:hook"}})
    since = len(server.log())
    server.signal(signal.SIGHUP)
    server.wait_for_log("reload failed", 15, since=since)
    assert fetch(str(path)).status == 200  # generation 1 serves on
    mode = stat.S_IMODE(os.stat(path).st_mode)
    assert mode == 0o660, f"a failed reload changed the socket's mode to {mode:o}"


def test_unix_socket_stale_file_mode_owner_and_removal(
    server_factory: ServerFactory, short_tmp: Path
) -> None:
    # passes: coverage -- a socket file left by a dead process is replaced; mode and a
    # numeric group are applied (the master runs as root here, or the group is its own);
    # the file is removed at exit; a path that is not a socket, and one too long for
    # sun_path, stop the start with a reason; a socket a live process listens on is refused.
    path = short_tmp / "web.sock"
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(path))
    stale.close()  # the file stays, nobody listens: what a SIGKILLed server leaves
    gid = 4242 if os.geteuid() == 0 else os.getegid()
    server = server_factory(
        {"app": "app:application", "workers": {"count": 1},
         "bind": [{"address": f"unix:{path}", "mode": "640", "group": gid}]},
        app_source=APP,
    )
    st = os.stat(path)
    assert (stat.S_ISSOCK(st.st_mode), stat.S_IMODE(st.st_mode), st.st_gid) == (True, 0o640, gid)
    assert fetch(str(path)).status == 200

    # a second server on the same path is refused while the first listens
    second = server_factory(
        {"app": "app:application", "bind": [f"unix:{path}"]}, app_source=APP, wait_ready=False
    )
    assert second.wait_exit() != 0
    assert "another process is listening on it" in second.log(), second.log()
    assert fetch(str(path)).status == 200  # and the first one's socket is untouched

    server.signal(signal.SIGTERM)
    assert server.wait_exit(15) == 0
    assert not path.exists()

    path.write_text("not a socket")
    third = server_factory(
        {"app": "app:application", "bind": [f"unix:{path}"]}, app_source=APP, wait_ready=False
    )
    assert third.wait_exit() != 0
    assert "the path exists and is not a socket" in third.log(), third.log()
    assert path.read_text() == "not a socket"

    long_path = short_tmp / ("x" * 120)
    fourth = server_factory(
        {"app": "app:application", "bind": [f"unix:{long_path}"]}, app_source=APP,
        wait_ready=False,
    )
    assert fourth.wait_exit() == 2
    assert "unix socket path is too long" in fourth.log(), fourth.log()


def test_a_failed_reload_does_not_change_the_scheme_of_a_tls_listener(
    server_factory: ServerFactory, certs: Certs
) -> None:
    """Defect: a HUP whose new configuration drops `tls` from a kept address and then fails
    (a hook that cannot be imported) leaves the running generation serving TLS -- but the
    kept Listener object was already rewritten (`lst.tls = spec.tls`, `lst.configured =
    spec`). Every worker forked afterwards for that same generation (a max_requests or
    max_lifetime recycle, a crash restart) builds its environ from it: requests that
    arrived over TLS get wsgi.url_scheme "http" and no HTTPS=on / SSL_* keys, so apps build
    http:// redirects and absolute URLs, and "force HTTPS" middleware redirects forever. The
    log said "reload failed ...; still serving generation 1". Expected: nothing of a failed
    reload is applied; the recycled worker reports https as its predecessor did.

    Responsible: sockets.bind_all (reuse path: `update_unix(lst, spec); lst.configured =
    spec; lst.tls = spec.tls`) called from cli.reloader before the steps that can fail;
    fix: give the new generation its own view of the kept sockets (copy the Listener, or
    keep tls/configured per generation) or restore them in reloader's except path."""
    data = {"app": "app:application", "pythonpath": ["."],
            "workers": {"count": 1, "max_requests": 3},
            "bind": [tls_entry(certs.first_cert, certs.first_key)]}
    server = server_factory(data, app_source=APP)
    context = client_context(certs)
    status, body, _, _ = https_get(server, context)
    assert (status, body["scheme"], body.get("HTTPS")) == (200, "https", "on")
    first_pid = body["pid"]

    write_settings(server, {**data, "bind": ["127.0.0.1:0"],
                            "hooks": {"on_reload": "pf_explore_no_such_module:hook"}})
    since = len(server.log())
    server.signal(signal.SIGHUP)
    server.wait_for_log("reload failed", 15, since=since)

    def recycled() -> dict[str, Any] | None:
        status, body, _, _ = https_get(server, context)  # still TLS: the old generation
        assert status == 200
        return body if body["pid"] != first_pid else None

    body = wait_until(recycled, 20, message="the worker was not recycled after max_requests",
                      ignore=(ssl.SSLError, ConnectionError, EOFError))
    assert (body["scheme"], body.get("HTTPS")) == ("https", "on"), body
    assert body.get("SSL_PROTOCOL", "").startswith("TLS"), body


def client_hello() -> bytes:
    """The bytes of a real TLS ClientHello (from an in-memory client)."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    client = context.wrap_bio(incoming, outgoing, server_side=False, server_hostname="localhost")
    with pytest.raises(ssl.SSLWantReadError):
        client.do_handshake()
    return outgoing.read()


@pytest.mark.parametrize("protocol", ["tcp", "http"])
def test_a_trickled_handshake_is_cut_at_its_deadline(
    server_factory: ServerFactory, certs: Certs, protocol: str
) -> None:
    # passes: coverage -- a slowloris ClientHello (one byte every 0.25 s, each byte resetting
    # any per-read timeout) is cut when stream.handshake_timeout (tcp) or http.header_timeout
    # (http) has passed since the connect, not when the client stops sending.
    limit = 2.0
    if protocol == "tcp":
        settings = {"app": "app:whoami", "protocol": "tcp",
                    "stream": {"handshake_timeout": limit}}
        source, scheme = HANDLERS, "tls"
    else:
        settings = {"app": "app:application", "http": {"header_timeout": limit}}
        source, scheme = APP, "https"
    server = server_factory(
        {**settings, "workers": {"count": 1},
         "bind": [tls_entry(certs.first_cert, certs.first_key)]},
        app_source=source,
    )
    hello = client_hello()
    with connect(listener(server, scheme), timeout=10) as sock:
        started = time.monotonic()
        closed_after = None
        for byte in hello[:-1]:  # never the whole ClientHello
            try:
                sock.send(bytes([byte]))
            except OSError:
                closed_after = time.monotonic() - started
                break
            _, closed = recv_within(sock, 0.25)
            if closed:
                closed_after = time.monotonic() - started
                break
            if time.monotonic() - started > limit + 6:
                break
    assert closed_after is not None, "the trickling handshake was never cut"
    assert limit - 0.3 <= closed_after <= limit + 2.0, closed_after


def test_tls_on_a_unix_socket(server_factory: ServerFactory, certs: Certs, short_tmp: Path) -> None:
    # passes: coverage -- `tls` on a unix socket (TLS between a local proxy and the app
    # server): served, https in the environ, and the certificate's client-facing name used.
    path = short_tmp / "tls.sock"
    server = server_factory(
        {"app": "app:application", "workers": {"count": 1},
         "bind": [{"address": f"unix:{path}",
                   "tls": {"certificate": str(certs.first_cert), "key": str(certs.first_key)}}]},
        app_source=APP,
    )
    assert ("unix", str(path)) in server.addresses()
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as raw:
        raw.settimeout(10)
        raw.connect(str(path))
        with client_context(certs).wrap_socket(raw, server_hostname="localhost") as tls:
            tls.sendall(REQUEST)
            data = b""
            while chunk := tls.recv(65536):
                data += chunk
    assert data.startswith(b"HTTP/1.1 200 "), data
    env = json.loads(data.partition(b"\r\n\r\n")[2])
    assert (env["scheme"], env["HTTPS"]) == ("https", "on")
    assert env["SSL_PROTOCOL"].startswith("TLSv1.")


def test_admin_socket_mode_stale_file_methods_and_removal(
    server_factory: ServerFactory, short_tmp: Path
) -> None:
    # passes: coverage -- the status socket replaces a stale file, is created 0600 whatever
    # the umask, answers HEAD without a body and other methods with 405, and is removed at
    # exit.
    admin = short_tmp / "admin.sock"
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(admin))
    stale.close()
    server = server_factory(
        {"app": "app:application", "workers": {"count": 1}, "umask": "000",
         "admin": {"socket": str(admin)}},
        app_source=APP,
    )
    assert stat.S_IMODE(os.stat(admin).st_mode) == 0o600
    get = fetch(str(admin), target="/metrics")
    assert get.status == 200
    assert (get.header("Content-Type") or "").startswith("text/plain; version=0.0.4")
    head = send_raw(str(admin), b"HEAD /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
    head_part, _, after = head.partition(b"\r\n\r\n")
    assert head_part.startswith(b"HTTP/1.1 200 ") and after == b"", head
    assert b"\r\nContent-Length: " in head_part, head  # the size of the body it left out
    post = send_raw(str(admin), b"POST /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n")
    assert post.startswith(b"HTTP/1.1 405 "), post
    assert fetch(str(admin), target="/ready").status == 200
    server.signal(signal.SIGTERM)
    assert server.wait_exit(15) == 0
    assert not admin.exists()


def test_statsd_over_a_unix_datagram_socket(
    server_factory: ServerFactory, short_tmp: Path
) -> None:
    # passes: coverage -- statsd.address unix:PATH (a local agent's datagram socket), with
    # DogStatsD tags and a prefix; a request shows up as counters.
    path = short_tmp / "statsd.sock"
    sink = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sink.bind(str(path))
    try:
        server = server_factory(
            {"app": "app:application", "workers": {"count": 1},
             "statsd": {"address": f"unix:{path}", "interval": 0.2, "prefix": "web.app",
                        "tags": ["env:test", "canary"]}},
            app_source=APP,
        )
        assert fetch(server.addresses()[0]).status == 200
        lines: list[str] = []

        def counted() -> bool:
            sink.settimeout(0.2)
            with contextlib.suppress(TimeoutError):
                lines.extend(sink.recv(65536).decode("ascii").split("\n"))
            return "web.app.requests.2xx:1|c|#env:test,canary" in lines

        wait_until(counted, 10, message=f"lines: {lines[-10:]}")
        assert all(line.startswith("web.app.") and line.endswith("|#env:test,canary")
                   for line in lines), lines
    finally:
        sink.close()
