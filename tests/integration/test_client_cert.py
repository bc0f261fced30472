"""Client certificates on a real preforkd: the SSL_* environ keys (mod_ssl's names and formats)
on a TLS listener, from curl presenting a certificate that a test CA signed.

The expected values come from `openssl x509` reading the same certificate (the subject and
issuer with -nameopt RFC2253, as mod_ssl prints them), never from preforkd's own code. The
app answers each request with the SSL_* keys of its environ, as JSON, one line per request.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest

from harness import Address, Server, ServerFactory, require_tool

ECHO_APP = """
import json

def application(environ, start_response):
    keys = {k: v for k, v in environ.items() if k.startswith("SSL_") or k == "HTTPS"}
    keys["scheme"] = environ["wsgi.url_scheme"]
    body = (json.dumps(keys, sort_keys=True) + "\\n").encode()
    start_response("200 OK", [("Content-Type", "application/json"),
                              ("Content-Length", str(len(body)))])
    return [body]
"""
CLIENT_SUBJECT = "/C=DE/O=Acme, Inc./OU=Eng/CN=pf client+UID=jd"


class Certs:
    """A CA, a server certificate for localhost/127.0.0.1 and a client certificate it signed,
    and what openssl says of the client certificate."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.ca = directory / "ca.pem"
        self.server_cert = directory / "server.pem"
        self.server_key = directory / "server.key"
        self.client_cert = directory / "client.pem"
        self.client_key = directory / "client.key"
        self.expected: dict[str, str] = {}


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    openssl = require_tool("openssl")
    c = Certs(tmp_path_factory.mktemp("client-cert"))

    def run(*args: str) -> str:
        done = subprocess.run([openssl, *args], cwd=c.dir, check=True, capture_output=True,
                              timeout=60, text=True)
        return done.stdout.strip()

    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
        "-subj", "/O=pf test/CN=pf test CA", "-keyout", "ca.key", "-out", "ca.pem",
        "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign")
    for name, subject, ext in [
        ("server", "/CN=localhost",
         "subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\n"),
        ("client", CLIENT_SUBJECT, "extendedKeyUsage=clientAuth\n"),
    ]:
        (c.dir / f"{name}.ext").write_text(ext)
        run("req", "-newkey", "rsa:2048", "-nodes", "-subj", subject, "-multivalue-rdn",
            "-keyout", f"{name}.key", "-out", f"{name}.csr")
        run("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
            "-CAcreateserial", "-days", "2", "-extfile", f"{name}.ext", "-out", f"{name}.pem")

    def field(option: str, *more: str) -> str:
        # "subject=CN=...", "serial=0A1B...", "notBefore=Nov 21 ..."
        return run("x509", "-in", "client.pem", "-noout", option, *more).partition("=")[2]

    c.expected = {
        "SSL_CLIENT_VERIFY": "SUCCESS",
        "SSL_CLIENT_S_DN": field("-subject", "-nameopt", "RFC2253"),
        "SSL_CLIENT_I_DN": run("x509", "-in", "client.pem", "-noout", "-issuer", "-nameopt",
                               "RFC2253").partition("=")[2],
        "SSL_CLIENT_M_SERIAL": field("-serial"),
        "SSL_CLIENT_V_START": field("-startdate"),
        "SSL_CLIENT_V_END": field("-enddate"),
        "SSL_CLIENT_CERT": c.client_cert.read_text(),
    }
    # the oracle itself: a DN with a multi-valued RDN and an escaped comma
    assert c.expected["SSL_CLIENT_S_DN"] == "UID=jd+CN=pf client,OU=Eng,O=Acme\\, Inc.,C=DE"
    assert c.expected["SSL_CLIENT_I_DN"] == "CN=pf test CA,O=pf test"
    return c


def start(server_factory: ServerFactory, certs: Certs, verify_client: str) -> Server:
    """One worker, a TLS listener verifying clients as asked and a plain listener with the
    same address text (port 0): the plain one once got the TLS entry's context."""
    tls = {"certificate": str(certs.server_cert), "key": str(certs.server_key),
           "ca": str(certs.ca), "verify_client": verify_client}
    return server_factory(
        {"app": "app:application", "workers": {"count": 1},
         "bind": [{"address": "127.0.0.1:0", "tls": tls}, "127.0.0.1:0"]},
        app_source=ECHO_APP,
    )


def listener(server: Server, scheme: str) -> Address:
    found = [a for a in server.addresses() if a[0] == scheme]
    assert found, f"no {scheme} address in the log\n{server.log_tail()}"
    return found[0]


def curl(
    server: Server, scheme: str, certs: Certs, *, with_cert: bool, requests: int = 1
) -> tuple[int, list[dict[str, Any]], str]:
    """`requests` GETs on one connection (curl reuses it); (exit status, answers, stderr)."""
    _, host, port = listener(server, scheme)
    args = [require_tool("curl"), "--silent", "--show-error", "--fail", "--max-time", "10",
            "--cacert", str(certs.ca), "--resolve", f"localhost:{port}:{host}"]
    if with_cert:
        args += ["--cert", str(certs.client_cert), "--key", str(certs.client_key)]
    args += [f"{scheme}://localhost:{port}/{n}" for n in range(requests)]
    done = subprocess.run(args, capture_output=True, text=True, timeout=30)
    answers = [json.loads(line) for line in done.stdout.splitlines() if line]
    return done.returncode, answers, done.stderr


def test_a_required_client_certificate_is_in_the_environ(
    server_factory: ServerFactory, certs: Certs
) -> None:
    server = start(server_factory, certs, "required")
    status, answers, err = curl(server, "https", certs, with_cert=True, requests=2)
    assert status == 0, err
    assert len(answers) == 2
    for answer in answers:  # every request on the connection, not just the first
        assert {k: answer.get(k) for k in certs.expected} == certs.expected
        assert answer["SSL_PROTOCOL"] in ("TLSv1.2", "TLSv1.3")
        assert answer["SSL_CIPHER"]
        assert (answer["HTTPS"], answer["scheme"]) == ("on", "https")
    assert answers[0] == answers[1]

    # no certificate: no handshake, so no request and no environ
    status, answers, _ = curl(server, "https", certs, with_cert=False)
    assert status != 0 and not answers

    # the plain listener of the same server has no SSL_* keys at all
    status, answers, err = curl(server, "http", certs, with_cert=False)
    assert status == 0, err
    assert answers == [{"scheme": "http"}]


def test_an_optional_client_certificate(server_factory: ServerFactory, certs: Certs) -> None:
    server = start(server_factory, certs, "optional")
    status, answers, err = curl(server, "https", certs, with_cert=False)
    assert status == 0, err
    [answer] = answers
    assert answer["SSL_CLIENT_VERIFY"] == "NONE"
    assert not any(k.startswith("SSL_CLIENT_") and k != "SSL_CLIENT_VERIFY" for k in answer)
    assert answer["SSL_PROTOCOL"] in ("TLSv1.2", "TLSv1.3") and answer["SSL_CIPHER"]

    status, answers, err = curl(server, "https", certs, with_cert=True)
    assert status == 0, err
    [answer] = answers
    assert {k: answer.get(k) for k in certs.expected} == certs.expected


def test_without_client_verification_there_is_no_client_certificate(
    server_factory: ServerFactory, certs: Certs
) -> None:
    """verify_client none asks for no certificate: one curl offers is never seen."""
    server = start(server_factory, certs, "none")
    status, answers, err = curl(server, "https", certs, with_cert=True)
    assert status == 0, err
    [answer] = answers
    assert answer["SSL_CLIENT_VERIFY"] == "NONE"
    assert "SSL_CLIENT_S_DN" not in answer and "SSL_CLIENT_CERT" not in answer
