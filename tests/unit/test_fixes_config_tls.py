"""Fixes in prefork.config and prefork.tls: TLS settings reported against their own key, an
encrypted key refused at once, the jitter of a dynamic pool, access_log_skip entries that
could never match, and the status socket found under another spelling of a listener's."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from prefork.config import ConfigError, WorkersConfig, jitter_share, load
from prefork.tls import server_context
from prefork.worker import max_requests_for
from tests.unit.fakes import make_config

REPO = Path(__file__).resolve().parents[2]


# --- TLS ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Files:
    cert: Path
    key: Path
    other_key: Path  # a key of another certificate
    encrypted_key: Path  # `key` with a passphrase
    not_pem: Path


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> Files:
    """A self-signed certificate, its key plain and encrypted, another key, a text file
    (openssl; a failure under CI=true when it is missing, a skip elsewhere, as conftest's
    cert_and_key)."""
    openssl = shutil.which("openssl")
    if openssl is None:
        reason = "required tool 'openssl' is not on PATH"
        if os.environ.get("CI") == "true":
            pytest.fail(f"{reason} (.ci/run should install it)")
        pytest.skip(reason)
    where = tmp_path_factory.mktemp("tls-files")

    def run(*args: str) -> None:
        subprocess.run([openssl, *args], cwd=where, check=True, capture_output=True, timeout=60)

    # EC keys: quick to make, and OpenSSL treats them as it does RSA ones here
    curve = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-days", "1")
    run("req", "-x509", *curve, "-subj", "/CN=localhost", "-keyout", "key.pem", "-out",
        "cert.pem")
    run("req", "-x509", *curve, "-subj", "/CN=other", "-keyout", "other.key", "-out",
        "other.pem")
    run("pkey", "-in", "key.pem", "-aes256", "-passout", "pass:secret", "-out", "encrypted.key")
    (where / "not-pem.txt").write_text("this is not a PEM file\n")
    return Files(where / "cert.pem", where / "key.pem", where / "other.key",
                 where / "encrypted.key", where / "not-pem.txt")


def tls_config(tmp_path: Path, files: Files, **changes: Any) -> str:
    """A config file whose one bind entry has every TLS setting, one per line: certificate
    on line 5, key 6, ca 7, verify_client 8, ciphers 9."""
    tls = {"certificate": str(files.cert), "key": str(files.key), "ca": str(files.cert),
           "verify_client": "optional", "ciphers": "ECDHE-ECDSA-AES256-GCM-SHA384"}
    tls.update({k: str(v) for k, v in changes.items()})
    lines = ["app: m:app", "bind:", "  - address: 127.0.0.1:0", "    tls:"]
    lines += [f"      {key}: {json.dumps(value)}" for key, value in tls.items()]
    path = tmp_path / "preforkd.yaml"
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def config_error(path: str) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        load(path)
    return info.value


def test_the_tls_settings_as_written_load(tmp_path: Path, files: Files) -> None:
    config = load(tls_config(tmp_path, files))
    assert config.bind[0].tls is not None
    server_context(config.bind[0].tls)


@pytest.mark.parametrize(
    ("setting", "line", "says"),
    [
        ("ciphers", 9, "cannot use the cipher list 'NO-SUCH-CIPHER'"),
        ("ca", 7, "CA certificates (PEM)"),
        ("certificate", 5, "the certificate (PEM)"),
        ("key", 6, "cannot load key"),
    ],
)
def test_an_unusable_tls_setting_is_reported_against_its_own_key(
    tmp_path: Path, files: Files, setting: str, line: int, says: str
) -> None:
    """Each was reported as `tls.key: cannot load certificate ... with key ...`, on the
    line of `key`, whatever OpenSSL refused: a cipher list, a `ca` or `certificate` file
    that holds no PEM certificate."""
    bad: object = "NO-SUCH-CIPHER" if setting == "ciphers" else files.not_pem
    path = tls_config(tmp_path, files, **{setting: bad})
    err = config_error(path)
    assert (err.source, err.line, err.key) == (path, line, f"bind[0].tls.{setting}"), str(err)
    assert says in err.message, str(err)
    if setting != "ciphers":
        assert str(files.not_pem) in err.message


def test_a_key_of_another_certificate_is_still_the_keys_fault(
    tmp_path: Path, files: Files
) -> None:
    path = tls_config(tmp_path, files, key=files.other_key)
    err = config_error(path)
    assert (err.line, err.key) == (6, "bind[0].tls.key"), str(err)
    assert "KEY_VALUES_MISMATCH" in err.message and str(files.cert) in err.message


def test_an_encrypted_key_fails_the_check_at_once_naming_key_and_line(
    tmp_path: Path, files: Files
) -> None:
    """OpenSSL asked for the passphrase ("Enter PEM pass phrase:") and waited for an
    answer nobody gives. In a child (no terminal, a stdin nobody writes to: a regression
    hangs the child, not the test run) the load used to wait for ever (or, at EOF, fail
    with "[Errno 22] Invalid argument"); now it refuses the key at once, naming it, and so
    does tls.server_context (start and reload)."""
    path = tls_config(tmp_path, files, key=files.encrypted_key)
    code = textwrap.dedent("""
        import sys
        from prefork.config import ConfigError, TLSConfig, load
        from prefork.tls import EncryptedKeyError, server_context
        try:
            load(sys.argv[1])
        except ConfigError as e:
            print(e.line, e.key, e.message, sep="\\n")
        try:
            server_context(TLSConfig(certificate=sys.argv[2], key=sys.argv[3]))
        except EncryptedKeyError:
            print("EncryptedKeyError")
    """)
    child = subprocess.Popen(
        [sys.executable, "-c", code, path, str(files.cert), str(files.encrypted_key)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=REPO,
        start_new_session=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    try:
        out, err = child.communicate(timeout=20)
    except subprocess.TimeoutExpired:
        child.kill()  # our own child, by its handle
        child.communicate()
        pytest.fail("loading a config with an encrypted key is waiting for a passphrase")
    line, key, message, raised, _ = out.split("\n")
    assert (line, key, raised) == ("6", "bind[0].tls.key", "EncryptedKeyError"), (out, err)
    assert "encrypted" in message and str(files.encrypted_key) in message, message
    assert "pass phrase" not in (out + err).lower()  # no prompt


# --- the jitter of a dynamic pool ---------------------------------------------------------------


def shares(workers: WorkersConfig, jitter: float, numbers: int) -> list[float]:
    return [jitter_share(workers, n, jitter) for n in range(1, numbers + 1)]


def test_the_workers_a_dynamic_pool_always_runs_get_far_apart_shares() -> None:
    """count 2, max 20, jitter 100: workers 1 and 2 got 0 and 5, and retired together."""
    first, second = shares(WorkersConfig(count=2, max=20), 100, 2)
    assert first == 0
    assert 33 <= second <= 67, second  # the two run together: about half the jitter apart
    config = make_config(2, max=20, max_requests=1000, max_requests_jitter=100)
    assert [max_requests_for(config, n) for n in (1, 2)] == [1000, 1061]


@pytest.mark.parametrize(("count", "maximum"), [(1, 4), (2, 20), (4, 64)])
def test_any_first_workers_of_a_dynamic_pool_are_spread_evenly(count: int, maximum: int) -> None:
    """However many of its workers a dynamic pool runs (numbers 1..k), their shares leave no
    gap (the last back around to the first) wider than 3/k of the jitter, nor two closer
    than 1/(3k): the golden-ratio steps, where one spread over 1..max crowded 1..count."""
    jitter = 60.0
    workers = WorkersConfig(count=count, max=maximum)
    every = shares(workers, jitter, maximum)
    assert all(0 <= s < jitter for s in every)
    for k in range(2, maximum + 1):
        ordered = sorted(every[:k])
        around = [*ordered, ordered[0] + jitter]  # the last back around to the first
        gaps = [b - a for a, b in zip(around, around[1:], strict=False)]
        assert max(gaps) <= 3 * jitter / k, (k, ordered)
        assert min(gaps) >= jitter / (3 * k), (k, ordered)


@pytest.mark.parametrize(("workers", "expected"), [
    (WorkersConfig(count=5), [0, 15, 30, 45, 60]),
    (WorkersConfig(count=3, max=3), [0, 30, 60]),  # max = count: a fixed pool
    (WorkersConfig(count=1, max=0), [0]),
])
def test_a_fixed_pool_keeps_its_exactly_even_spread(
    workers: WorkersConfig, expected: list[float]
) -> None:
    assert shares(workers, 60, len(expected)) == expected


def test_no_jitter_is_no_share_in_a_dynamic_pool() -> None:
    assert shares(WorkersConfig(count=2, max=8), 0, 8) == [0] * 8


# --- logging.access_log_skip --------------------------------------------------------------------


@pytest.mark.parametrize("entry", ["/healthz?full=1", "/status#top", "/api?*"])
def test_an_access_log_skip_entry_with_a_query_or_fragment_is_refused(
    tmp_path: Path, entry: str
) -> None:
    """It was accepted, and could never match: the path compared has no query or fragment."""
    path = tmp_path / "preforkd.yaml"
    path.write_text(f"app: m:app\nlogging:\n  access_log_skip:\n    - /ok\n    - {entry!r}\n")
    err = config_error(str(path))
    assert (err.line, err.key) == (5, "logging.access_log_skip[1]"), str(err)
    assert repr(entry) in err.message and "never match" in err.message, str(err)


def test_access_log_skip_paths_and_prefixes_still_load(tmp_path: Path) -> None:
    path = tmp_path / "preforkd.yaml"
    path.write_text("app: m:app\nlogging:\n  access_log_skip: [/healthz, /static/*, /a%3Fb]\n")
    assert load(str(path)).logging.access_log_skip == ("/healthz", "/static/*", "/a%3Fb")


# --- the status socket and a unix listener -------------------------------------------------------


@pytest.fixture
def linked() -> Iterator[tuple[Path, Path]]:
    """(a directory, a symbolic link to it), under a short path: unix socket paths are
    limited to 107 bytes."""
    with tempfile.TemporaryDirectory(prefix="pf-") as top:
        real = Path(top) / "real"
        real.mkdir()
        link = Path(top) / "link"
        link.symlink_to(real)
        yield real, link


def test_the_status_socket_is_found_at_a_listeners_path_through_a_symlink(
    tmp_path: Path, linked: tuple[Path, Path]
) -> None:
    """/var/run/x.sock and /run/x.sock (/var/run a link to /run) are one file: normpath
    took them for two, and the second bind replaced the first's socket file."""
    real, link = linked
    path = tmp_path / "preforkd.yaml"
    path.write_text(f"app: m:app\nbind:\n  - unix:{link}/web.sock\n"
                    f"admin:\n  socket: {real}/web.sock\n")
    err = config_error(str(path))
    assert (err.line, err.key) == (5, "admin.socket"), str(err)
    assert "bind[0]'s socket file" in err.message


def test_the_default_status_socket_beside_the_pidfile_is_found_through_a_symlink(
    tmp_path: Path, linked: tuple[Path, Path]
) -> None:
    real, link = linked
    path = tmp_path / "preforkd.yaml"
    path.write_text(f"app: m:app\npidfile: {link}/app.pid\nbind: [unix:{real}/app.pid.sock]\n")
    err = config_error(str(path))
    assert (err.line, err.key) == (2, "pidfile"), str(err)


def test_a_status_socket_beside_a_listener_is_its_own(
    tmp_path: Path, linked: tuple[Path, Path]
) -> None:
    real, link = linked
    path = tmp_path / "preforkd.yaml"
    path.write_text(f"app: m:app\nbind: [unix:{link}/web.sock]\nadmin:\n"
                    f"  socket: {real}/admin.sock\n")
    assert load(str(path)).admin.socket == f"{real}/admin.sock"
