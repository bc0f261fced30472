"""What the documentation says, checked against a real server: README.md, docs/settings.md,
docs/SIGNALS.md, docs/DESIGN.md, and the files a reader copies (etc/, systemd/).

Defects (each test failed before its fix):
- systemd/preforkd.service restricted the socket families to AF_UNIX, AF_INET and AF_INET6,
  so the master's sock_diag query (AF_NETLINK) failed and a unix listener's accept queue,
  which DESIGN.md says is watched, was missing from /status, /metrics and `preforkd status`.
- No document named the metrics /metrics exports (docs/settings.md's `admin` section now
  lists every family).
Pins (behaviour no test checked yet): the README's annotated example configuration passes
`check`; etc/echo.yaml passes `check` and echoes; the signals SIGNALS.md says a worker
ignores leave it serving, and TERM to a worker gets it replaced; TTOU at the floor of a
fixed pool changes nothing and says so.
"""

from __future__ import annotations

import ctypes
import getpass
import grp
import json
import os
import platform
import re
import signal
import socket
import struct
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from detached import preforkd
from harness import (
    PID_APP,
    REPO_ROOT,
    Server,
    ServerFactory,
    address,
    connect,
    fetch,
    self_signed_cert,
    settings,
    wait_until,
)

UNIT = REPO_ROOT / "systemd" / "preforkd.service"
DOCS = [REPO_ROOT / "README.md", *(REPO_ROOT / "docs" / name for name in
                                   ("settings.md", "SIGNALS.md", "DESIGN.md"))]
# Exported only for a worker whose USS cannot be read (another user's, no CAP_SYS_PTRACE):
# documented, and absent from a server whose workers the test can read.
CONDITIONAL_METRICS = {"preforkd_worker_memory_rss_bytes"}
# One worker answering with its pid (harness.PID_APP, written as app.py).
PID_SETTINGS = {"app": "app:application", "workers": {"count": 1}}


# --- a socket-family filter as systemd's RestrictAddressFamilies= makes it ------------------

# (AUDIT_ARCH_*, the socket(2) system call's number) of the machines the filter is built for
_SECCOMP_ARCHES = {"x86_64": (0xC000003E, 41), "aarch64": (0xC00000B7, 198)}
_PR_SET_NO_NEW_PRIVS = 38
_PR_SET_SECCOMP = 22
_SECCOMP_MODE_FILTER = 2
_BPF_LD_W_ABS = 0x20
_BPF_JEQ_K = 0x15
_BPF_RET_K = 0x06
_RET_ALLOW = 0x7FFF0000
_RET_EAFNOSUPPORT = 0x00050000 | 97  # SECCOMP_RET_ERRNO | EAFNOSUPPORT, as systemd answers


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


def unit_families() -> list[int]:
    """The address families RestrictAddressFamilies= of the shipped unit allows."""
    families: list[int] = []
    for line in UNIT.read_text().splitlines():
        key, sep, value = line.partition("=")
        if sep and key.strip() == "RestrictAddressFamilies":
            assert not value.strip().startswith("~"), "a deny list: the filter below allows"
            families += [int(getattr(socket, name)) for name in value.split()]
    assert families, f"no RestrictAddressFamilies= in {UNIT}"
    return families


def family_filter(families: list[int]) -> Callable[[], None]:
    """A preexec_fn that installs the seccomp filter systemd installs for
    RestrictAddressFamilies=: socket(2) with another family fails with EAFNOSUPPORT (sockets
    made otherwise, socketpair and inherited ones, are not affected, as under systemd)."""
    machine = platform.machine()
    if machine not in _SECCOMP_ARCHES:
        pytest.skip(f"no seccomp filter for {machine}")
    arch, socket_call = _SECCOMP_ARCHES[machine]
    count = len(families)
    program = [
        (_BPF_LD_W_ABS, 0, 0, 4),  # seccomp_data.arch
        (_BPF_JEQ_K, 0, count + 4, arch),  # another ABI: allow
        (_BPF_LD_W_ABS, 0, 0, 0),  # seccomp_data.nr
        (_BPF_JEQ_K, 0, count + 2, socket_call),  # not socket(2): allow
        (_BPF_LD_W_ABS, 0, 0, 16),  # the low word of args[0], the family
        *((_BPF_JEQ_K, count - i, 0, family) for i, family in enumerate(families)),
        (_BPF_RET_K, 0, 0, _RET_EAFNOSUPPORT),
        (_BPF_RET_K, 0, 0, _RET_ALLOW),
    ]
    code = ctypes.create_string_buffer(b"".join(struct.pack("=HBBI", *op) for op in program))
    fprog = _SockFprog(len(program), ctypes.addressof(code))
    libc = ctypes.CDLL(None, use_errno=True)

    def install() -> None:  # in the child, before exec: the filter outlives exec and fork
        keep = (code, fprog)  # the program must live as long as this closure
        if libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 or libc.prctl(
            _PR_SET_SECCOMP, _SECCOMP_MODE_FILTER, ctypes.byref(keep[1]), 0, 0
        ) != 0:
            os._exit(97)

    return install


def test_the_shipped_unit_lets_the_master_watch_a_unix_listen_queue(
    server_factory: ServerFactory, short_tmp: Path
) -> None:
    """Defect: DESIGN.md says the master reads every listener's accept queue (TCP_INFO; for
    a unix socket a sock_diag query), and /status, /metrics and `preforkd status` show it.
    Under systemd/preforkd.service, RestrictAddressFamilies= left out AF_NETLINK, which
    sock_diag needs: a unix listener's queue was unknown (null), its full-queue warning and
    `preforkd_listen_queue*` samples never came, and nothing said why. The server runs here
    under the same filter systemd makes from the unit's line."""
    install = family_filter(unit_families())
    probe = subprocess.run(  # the filter is in force: a family the unit does not list fails
        [sys.executable, "-c", "import socket; socket.socket(socket.AF_PACKET, socket.SOCK_RAW)"],
        preexec_fn=install, capture_output=True, text=True, timeout=30,
    )
    if probe.returncode == 97:
        pytest.skip("seccomp filters cannot be installed here")
    assert "Address family not supported" in probe.stderr, probe.stderr
    unix_path = short_tmp / "app.sock"
    admin_path = short_tmp / "admin.sock"
    server = server_factory(
        settings(bind=["127.0.0.1:0", f"unix:{unix_path}"], admin={"socket": str(admin_path)},
                 workers={"count": 1}),
        preexec_fn=install,
    )
    response = fetch(str(admin_path), target="/status")
    assert response.status == 200, response
    listeners = {entry["url"]: entry for entry in json.loads(response.body)["listeners"]}
    unix = listeners[f"unix:{unix_path}"]
    assert unix["queue_limit"] == 2048 and unix["queued"] == 0, (unix, server.log_tail())
    text = fetch(str(admin_path), target="/metrics").body.decode()
    assert f'preforkd_listen_queue_limit{{listener="unix:{unix_path}"}} 2048' in text


# --- the metrics the documents name ---------------------------------------------------------


def test_every_exported_metric_is_documented_and_every_documented_one_exported(
    server_factory: ServerFactory, short_tmp: Path
) -> None:
    """Defect (docs): no document listed the metric families /metrics exports (DESIGN.md
    named five in passing), so a dashboard had to be built from a scrape. docs/settings.md's
    `admin` section lists them now; here every family a live server exports after a request
    is in it, and every `preforkd_*` name in README.md and docs/ is exported."""
    admin_path = short_tmp / "admin.sock"
    server = server_factory(settings(admin={"socket": str(admin_path)}, workers={"count": 1}))
    assert fetch(address(server), target="/").status == 200
    text = fetch(str(admin_path), target="/metrics").body.decode()
    exported = set(re.findall(r"^# TYPE (\S+) ", text, re.MULTILINE))
    assert "preforkd_requests_total" in exported, text
    reference = (REPO_ROOT / "docs" / "settings.md").read_text()
    named = set(re.findall(r"\bpreforkd_[a-z_]*[a-z]", reference))
    assert exported - named == set(), "exported but not in docs/settings.md"
    mentioned = {
        name
        for path in DOCS
        for name in re.findall(r"\bpreforkd_[a-z_]*[a-z]", path.read_text())
        if not name.startswith("preforkd_hooks")  # a module name in an example
    }
    assert mentioned - exported - CONDITIONAL_METRICS == set(), "documented, never exported"


# --- the example files a reader copies --------------------------------------------------------


def readme_example(directory: Path) -> Path:
    """The README's annotated configuration, as it stands but for what this machine lacks:
    its user, group and /run/app directory are the test's, its ports the kernel's choice,
    and myproject (the app, its settings module and the post_fork hook) a stub."""
    text = (REPO_ROOT / "README.md").read_text()
    block = re.search(r"```yaml\n(.*?)```", text, re.DOTALL)
    assert block, "no ```yaml block in README.md"
    example = block.group(1)
    group = grp.getgrgid(os.getgid()).gr_name
    run = directory / "run"
    run.mkdir()
    for old, new in (
        ("user: app ", f"user: {getpass.getuser()} "),
        ("group: www-data", f"group: {group}"),
        ("/run/app/", f"{run}/"),
        (":8000", ":0"),
        (":8443", ":0"),
    ):
        assert old in example, f"the README's example no longer has {old!r}"
        example = example.replace(old, new)
    package = directory / "myproject"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "wsgi.py").write_text(PID_APP)
    (package / "settings.py").write_text("")
    (package / "hooks.py").write_text("def reconnect_db(server, worker):\n    pass\n")
    (directory / "static").mkdir()  # static[0].path, which must exist
    self_signed_cert(directory)  # cert.pem and key.pem, beside the file as the example has
    path = directory / "preforkd.yaml"
    path.write_text(example)
    return path


def test_the_readme_example_configuration_passes_check(short_tmp: Path) -> None:
    """Pin: the README's annotated example (every key it shows, as written) validates, and
    `check` imports its hook and app and binds its three addresses, TLS included."""
    config = readme_example(short_tmp)
    done = preforkd("check", "-c", str(config))
    assert done.returncode == 0, done.stderr
    assert "hooks OK: post_fork" in done.stdout, done.stdout
    assert "application OK: myproject.wsgi:application" in done.stdout, done.stdout
    assert len(re.findall(r"^can bind ", done.stdout, re.MULTILINE)) == 3, done.stdout


def test_the_echo_example_passes_check_and_echoes(server_factory: ServerFactory) -> None:
    """Pin: etc/echo.yaml (the README's TCP example) passes `check` and, started as its
    comment says (`preforkd -c etc/echo.yaml`, here on a port of the kernel's choice),
    sends back what a client sends."""
    example = REPO_ROOT / "etc" / "echo.yaml"
    done = preforkd("check", "-c", str(example), "--bind", "127.0.0.1:0")
    assert done.returncode == 0, done.stderr
    assert "application OK: echo:handler" in done.stdout, done.stdout
    text = example.read_text().replace('["."]', f'["{example.parent}"]')  # written elsewhere
    server = server_factory(config_text=text, args=["--bind", "127.0.0.1:0"])
    with connect(address(server)) as sock:
        sock.sendall(b"ping\n")
        received = b""
        while not received.endswith(b"\n"):
            chunk = sock.recv(64)
            assert chunk, f"closed after {received!r}"
            received += chunk
    assert received == b"ping\n"


# --- the signals tables ---------------------------------------------------------------------


def worker_pid(server: Server) -> int:
    body = fetch(address(server), target="/").body
    return int(body)


def test_the_signals_a_worker_ignores_leave_it_serving(server_factory: ServerFactory) -> None:
    """Pin (SIGNALS.md, Worker): HUP, TTIN, TTOU, WINCH and USR2 sent to a worker itself are
    ignored: the same process answers after them, and the master logs no worker exit."""
    server = server_factory(PID_SETTINGS, app_source=PID_APP)
    pid = worker_pid(server)
    mark = len(server.log())
    for sig in (signal.SIGHUP, signal.SIGTTIN, signal.SIGTTOU, signal.SIGWINCH, signal.SIGUSR2):
        os.kill(pid, sig)
    assert worker_pid(server) == pid
    assert server.worker_pids() == [pid]
    assert "exited" not in server.log()[mark:]


def test_term_to_a_worker_ends_it_with_status_0_and_the_master_replaces_it(
    server_factory: ServerFactory,
) -> None:
    """Pin (SIGNALS.md, Worker, TERM): the worker finishes, exits 0, and the master (not
    stopping) starts another in its place, not counted as a crash."""
    server = server_factory(PID_SETTINGS, app_source=PID_APP)
    pid = worker_pid(server)
    mark = len(server.log())
    os.kill(pid, signal.SIGTERM)
    server.wait_for_log(f"worker 1 (pid {pid}) exited", since=mark)
    server.wait_for_log(re.compile(r"worker 1 \(pid \d+\) booted"), since=mark)
    wait_until(lambda: worker_pid(server) != pid, 10, ignore=(OSError,))
    log = server.log()[mark:]
    assert "crash" not in log and "signal" not in log, log
    assert server.running()


def test_ttou_at_the_floor_of_a_fixed_pool_changes_nothing_and_says_so(
    server_factory: ServerFactory,
) -> None:
    """Pin (SIGNALS.md, Master, TTOU): never below 1; one at that floor is logged as a
    warning and changes nothing."""
    server = server_factory(PID_SETTINGS, app_source=PID_APP)
    pid = worker_pid(server)
    server.signal(signal.SIGTTOU)
    server.wait_for_log("[WARNING] TTOU: already at the minimum of 1 worker")
    assert worker_pid(server) == pid
    assert server.worker_pids() == [pid]
