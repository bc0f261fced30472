"""Load preforkd's YAML config (plus command-line overrides) into frozen dataclasses.

Invariants:
- A ``Config`` is immutable and fully validated: every value has its declared type and is
  within its range or choices, every relative path is already absolute (resolved against
  the config file's directory, or the working directory for overrides), and every bind
  address parses. A reload builds a new ``Config``; nothing is ever patched in place.
- The dataclass field metadata is the single source of truth for types, ranges, choices and
  docs; ``docs/settings.md`` is generated from it (``python -m prefork.config``).
- Loading reads the one config file and nothing else: no app import, no DNS, no chdir.
- Every failure is a ``ConfigError`` naming the source (file or "command line"), the line
  and the dotted key path (``workers.count``, ``bind[1].mode``).
"""

import dataclasses
import difflib
import errno
import ipaddress
import keyword
import os
import re
import stat
import types
import typing
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

import yaml

from prefork.accessformat import BUILTIN_FORMATS, compile_format
from prefork.addresses import (
    Address,
    check_unix_path,
    parse_address,
    resolve_relative,
    unix_path_length_problem,
)
from prefork.loader import parse_app_ref
from prefork.privileges import resolve_gid, resolve_user

_T = TypeVar("_T")

# libyaml is much faster; the pure-Python loader gives the same node tree.
_LOADER: type[yaml.SafeLoader] | type[yaml.CSafeLoader] = getattr(
    yaml, "CSafeLoader", yaml.SafeLoader
)

OVERRIDE_SOURCE = "command line"


class ConfigError(Exception):
    """An invalid config: ``str()`` is ``"file:line: key.path: message"``, empty parts left out."""

    def __init__(
        self, message: str, *, source: str = "", line: int | None = None, key: str = ""
    ) -> None:
        super().__init__(message)
        self.message = message
        self.source = source
        self.line = line
        self.key = key

    def __str__(self) -> str:
        where = self.source
        if self.line is not None:
            where = f"{where}:{self.line}" if where else f"line {self.line}"
        return ": ".join(part for part in (where, self.key, self.message) if part)


# --- field metadata --------------------------------------------------------------------


def _meta(
    doc: str,
    *,
    lo: float | None = None,
    hi: float | None = None,
    lo_open: bool = False,
    choices: tuple[str, ...] = (),
    path: bool = False,
    octal: bool = False,
    nonempty: bool = False,
    single: bool = False,
    check: Callable[[Any, str], Any] | None = None,
    internal: bool = False,
    mapping: bool = False,
    ident: bool = False,
) -> dict[str, Any]:
    """Metadata for one setting.

    ``lo``/``hi``: inclusive range (``lo_open``: lower bound exclusive). ``choices``: allowed
    strings, matched case-insensitively, stored lower-case. ``path``: relative values are
    resolved against the config file's directory ("-" is left alone). ``octal``: a file
    mode or mask, read as octal however it is written (see ``_convert_octal``).
    ``nonempty``/``single``: a list that must not be empty / may be given as one bare item.
    ``check``: ``(value, base_dir) -> value`` raising ``ValueError``. ``internal``: not
    settable from YAML, not documented. ``ident``: a user or group name or numeric id (a
    string); an unquoted YAML integer is taken as the id.
    """
    return {
        "doc": doc,
        "min": lo,
        "max": hi,
        "min_exclusive": lo_open,
        "choices": choices,
        "path": path,
        "octal": octal,
        "nonempty": nonempty,
        "single": single,
        "check": check,
        "internal": internal,
        "mapping": mapping,
        "ident": ident,
    }


def _check_app_ref(value: str, base_dir: str) -> str:
    parse_app_ref(value)  # ValueError with the reason
    return value


def _check_hook_ref(value: str, base_dir: str) -> str:
    module, sep, attr = value.partition(":")
    parts = [*module.split("."), *attr.split(".")]
    if not sep or not all(p.isidentifier() and not keyword.iskeyword(p) for p in parts):
        raise ValueError(f"must be 'module:function', got {value!r}")
    return value


def _check_printable(value: str, base_dir: str) -> str:
    if not (value.isascii() and value.isprintable()):
        raise ValueError(f"must be printable ASCII (no control characters), got {value!r}")
    return value


def _check_name(value: str, base_dir: str) -> str:
    if not value.isprintable():
        raise ValueError(f"must not contain control characters, got {value!r}")
    return value


# uid_t and gid_t are 32 bits; (uid_t)-1 means "no change" to setuid and chown.
MAX_ID = 2**32 - 2


def _check_id(value: str, what: str) -> bool:
    """True if ``value`` is a numeric id (then it is accepted as is, whether or not it has
    an entry in /etc/passwd or /etc/group: containers run with arbitrary ids); False if it
    is a name, to be looked up."""
    if not value.isdigit():
        return False
    if not value.isascii() or int(value) > MAX_ID:
        raise ValueError(f"{what} id must be from 0 to {MAX_ID}, got {value!r}")
    return True


def _check_user(value: str, base_dir: str) -> str:
    if _check_id(value, "user"):
        return value
    try:
        resolve_user(value)
    except KeyError:
        raise ValueError(f"no such user {value!r}") from None
    return value


def _check_group(value: str, base_dir: str) -> str:
    if _check_id(value, "group"):
        return value
    try:
        resolve_gid(value)
    except KeyError:
        raise ValueError(f"no such group {value!r}") from None
    return value


def _directory_problem(path: str) -> str | None:
    """Why ``path`` cannot be used as a directory, or None if it can."""
    try:
        mode = os.stat(path).st_mode
    except OSError as e:
        if e.errno == errno.ENOENT:
            return f"no such directory: {path}"
        return f"cannot use directory {path}: [Errno {e.errno}] {e.strerror}"
    return None if stat.S_ISDIR(mode) else f"not a directory: {path}"


def _check_directory(value: str, base_dir: str) -> str:
    """An existing directory (``chdir``)."""
    problem = _directory_problem(value)
    if problem is not None:
        raise ValueError(problem)
    return value


def _check_file_directory(value: str, base_dir: str) -> str:
    """A file the server creates or appends to (a pidfile, a log, a unix socket): the file
    need not exist yet, but the directory it goes in must, and the path must not be a
    directory itself. "-" (stdout/stderr) is not a file."""
    if value == "-":
        return value
    if os.path.isdir(value):
        raise ValueError(f"is a directory: {value}")
    problem = _directory_problem(os.path.dirname(value) or ".")
    if problem is not None:
        raise ValueError(f"{problem} (the directory of {value})")
    return value


def _check_socket_file(value: str, base_dir: str) -> str:
    """A unix socket the server binds: as a file it creates, and short enough to bind."""
    return check_unix_path(_check_file_directory(value, base_dir))


def _check_syslog_address(value: str, base_dir: str) -> str:
    if value.startswith("unix:"):
        value = value[5:]
    if value.startswith("/"):
        return value
    for scheme in ("udp://", "tcp://"):
        if value.startswith(scheme):
            address = parse_address(value[len(scheme) :])
            if address.kind != "tcp":
                break
            return value
    raise ValueError(
        f"must be a socket path (/dev/log, unix:/path), udp://HOST:PORT or tcp://HOST:PORT, "
        f"got {value!r}"
    )


def _check_proxy_entry(value: str, base_dir: str) -> str:
    if value in ("*", "unix"):
        return value
    try:
        ipaddress.ip_network(value, strict=False)
    except ValueError:
        raise ValueError(
            f"must be an IP address, a network (10.0.0.0/8), 'unix' or '*', got {value!r}"
        ) from None
    return value


def _check_address(value: str, base_dir: str) -> str:
    address = resolve_relative(parse_address(value), base_dir)
    if address.kind == "unix":  # the socket file is created by bind(), its directory is not
        _check_file_directory(address.path, base_dir)
    return str(address)


# --- schema ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TLSConfig:
    """TLS on one listening socket (`bind[].tls`). The context is built once in the master,
    before privileges are dropped; the handshake happens in the worker."""

    certificate: str = field(
        metadata=_meta("Certificate chain file (PEM), server certificate first.", path=True)
    )
    key: str = field(
        metadata=_meta(
            "Private key file (PEM) of the certificate, unencrypted: preforkd has no "
            "passphrase setting.",
            path=True,
        )
    )
    ca: str | None = field(
        default=None,
        metadata=_meta("CA certificates (PEM) that client certificates must chain to.", path=True),
    )
    verify_client: str = field(
        default="none",
        metadata=_meta(
            "Client certificates: none, optional (checked if sent), required.",
            choices=("none", "optional", "required"),
        ),
    )
    min_version: str = field(
        default="1.2", metadata=_meta("Oldest TLS version accepted.", choices=("1.2", "1.3"))
    )
    ciphers: str | None = field(
        default=None,
        metadata=_meta(
            "OpenSSL cipher list for TLS 1.2 (TLS 1.3 suites are OpenSSL's); null = the "
            "Python default.",
            check=_check_printable,
        ),
    )


@dataclass(frozen=True, slots=True)
class BindConfig:
    """One listening socket (an item of ``bind``): a bare address string or this mapping."""

    address: str = field(
        metadata=_meta(
            "Where to listen: HOST:PORT, [V6]:PORT, *:PORT, PORT (= 127.0.0.1:PORT) or unix:PATH. "
            "A host name listens on every address it resolves to (localhost: 127.0.0.1 and "
            "::1 where /etc/hosts has both).",
            check=_check_address,
        )
    )
    mode: int | None = field(
        default=None,
        metadata=_meta(
            "File mode of a unix socket, always read as octal: 660, 0660, 0o660 and '660' "
            "all mean rw-rw---- (a digit 8 or 9 is an error); null leaves it to the umask. "
            "Not allowed on TCP addresses.",
            lo=0,
            hi=0o777,
            octal=True,
        ),
    )
    owner: str | None = field(
        default=None,
        metadata=_meta(
            "Owner of a unix socket file: a user name, which must exist, or a numeric id, "
            "which need not; null = the master's user. Not allowed on TCP addresses.",
            check=_check_user,
            ident=True,
        ),
    )
    group: str | None = field(
        default=None,
        metadata=_meta(
            "Group of a unix socket file: a group name, which must exist, or a numeric id, "
            "which need not; null = the master's group. Not allowed on TCP addresses.",
            check=_check_group,
            ident=True,
        ),
    )
    tls: TLSConfig | None = field(
        default=None,
        metadata=_meta("Serve HTTPS on this socket (section `bind[].tls`); null = plain."),
    )
    reuse_port: bool = field(
        default=False,
        metadata=_meta(
            "Set SO_REUSEPORT on this TCP socket: another server of the same user that sets "
            "it too (a second preforkd, the next release of a blue-green deployment) can "
            "listen on the same address at once, and the kernel spreads new connections "
            "between them; stopping one leaves the others serving. Off, a second server "
            "fails with 'Address already in use', which is the safer default: with it on, "
            "nothing stops a stray instance from taking a share of the traffic. A reload "
            "turns it on for the sockets it keeps; turning it off takes a restart. Not "
            "allowed on unix sockets; for sockets systemd passes, the socket unit's "
            "ReusePort= decides.",
        ),
    )


@dataclass(frozen=True, slots=True)
class WorkersConfig:
    """Worker processes: how many, when they are recycled, and when they are killed."""

    count: int = field(default=2, metadata=_meta("Worker processes.", lo=1, hi=1024))
    max_requests: int = field(
        default=0,
        metadata=_meta(
            "A worker retires after serving this many requests (0 = never).", lo=0, hi=10**9
        ),
    )
    max_requests_jitter: int = field(
        default=0,
        metadata=_meta(
            "Up to this many extra requests before a worker retires, its share set by its "
            "number so that workers do not retire together: spread evenly over the numbers "
            "1..count in a fixed pool; in a dynamic pool in golden-ratio steps, which spread "
            "evenly however many of its workers are running.",
            lo=0,
            hi=10**9,
        ),
    )
    max_lifetime: float = field(
        default=0.0,
        metadata=_meta(
            "A worker retires once it has served this many seconds (0 = never), as uWSGI's "
            "max-worker-lifetime: for leaks a low request rate keeps under max_requests, or "
            "state (connections, credentials, DNS) that should be made afresh. It is "
            "replaced successor first, as for max_requests (max_recycling at a time).",
            lo=0,
            hi=10**8,
        ),
    )
    max_lifetime_jitter: float = field(
        default=0.0,
        metadata=_meta(
            "Up to this many extra seconds of max_lifetime, a worker's share set by its "
            "number so that workers do not retire together: spread evenly over the numbers "
            "1..count in a fixed pool; in a dynamic pool in golden-ratio steps, which spread "
            "evenly however many of its workers are running.",
            lo=0,
            hi=10**8,
        ),
    )
    timeout: float = field(
        default=30.0,
        metadata=_meta(
            "A worker busy in one request longer than this (seconds) is killed and replaced. "
            "A request that is only waiting on its client by then (a slow upload, a slow "
            "reader of the response) is cut a second earlier instead: its connection is "
            "closed and the worker goes on. 0 = no limit: no worker is ever killed as hung "
            "(for long-polling or streaming apps; the other timeouts still apply). A reload "
            "that changes it holds the workers it starts to the new value; the old ones finish "
            "their requests under the value they were started with.",
            lo=0,
            hi=86400,
        ),
    )
    timeout_grace: float = field(
        default=2.0,
        metadata=_meta(
            "Seconds between asking a hung worker to dump its stack and SIGKILL.", lo=0, hi=600
        ),
    )
    graceful_timeout: float = field(
        default=30.0,
        metadata=_meta(
            "On TERM (or retirement), seconds workers get to finish before SIGKILL.",
            lo=0,
            hi=86400,
        ),
    )
    boot_timeout: float = field(
        default=60.0,
        metadata=_meta(
            "A worker that has not loaded the app within this many seconds is killed.",
            lo=0,
            hi=86400,
            lo_open=True,
        ),
    )
    max_connections: int = field(
        default=10000,
        metadata=_meta(
            "Connections one worker holds at once (idle keep-alive connections included); "
            "at the limit the longest-idle keep-alive connection is closed for a new one.",
            lo=1,
            hi=100000,
        ),
    )
    max_memory: int = field(
        default=0,
        metadata=_meta(
            "Soft limit in MiB of a worker's unique memory (USS: copy-on-write pages shared "
            "with the master after preload are not counted): over it, the worker is "
            "replaced after its current request. 0 = no limit.",
            lo=0,
            hi=2**30,
        ),
    )
    max_memory_hard: int = field(
        default=0,
        metadata=_meta(
            "Hard limit in MiB of a worker's USS: over it, the worker is killed at once. "
            "0 = no limit.",
            lo=0,
            hi=2**30,
        ),
    )
    memory_check_interval: float = field(
        default=5.0,
        metadata=_meta("Seconds between memory checks of every worker.", lo=0.1, hi=3600),
    )
    max_recycling: int = field(
        default=1,
        metadata=_meta(
            "Workers being replaced at the same moment, whatever the reason (max_requests, "
            "memory, reload): the replacement boots before the old worker stops, and no more "
            "than this many replacements are under way at once.",
            lo=1,
            hi=1024,
        ),
    )
    max: int = field(
        default=0,
        metadata=_meta(
            "Dynamic pool: the most workers there may be (count is the fewest). 0 = a fixed "
            "pool of count workers.",
            lo=0,
            hi=1024,
        ),
    )
    min_spare: int = field(
        default=1,
        metadata=_meta(
            "Dynamic pool: when fewer workers than this are idle, more are started (1, 2, "
            "4, ... per second) up to max.",
            lo=0,
            hi=1024,
        ),
    )
    max_spare: int = field(
        default=4,
        metadata=_meta(
            "Dynamic pool: when more workers than this are idle, one is retired per second, "
            "down to count.",
            lo=1,
            hi=1024,
        ),
    )
    boot_failure_limit: int = field(
        default=10,
        metadata=_meta(
            "This many workers failing to boot within boot_failure_window seconds puts the "
            "server in a degraded state (the healthy workers keep serving; see status).",
            lo=1,
            hi=100000,
        ),
    )
    boot_failure_window: float = field(
        default=60.0,
        metadata=_meta("The window of boot_failure_limit, in seconds.", lo=1, hi=86400),
    )
    exit_on_degraded: bool = field(
        default=False,
        metadata=_meta(
            "Stop with exit status 1 on entering the degraded state, so that systemd's "
            "restart limits apply."
        ),
    )


@dataclass(frozen=True, slots=True)
class HttpConfig:
    """HTTP/1.1 limits and timeouts (``protocol: http``; for ``protocol: uwsgi`` too, but for
    keep-alive and the forwarding headers; the PROXY protocol and the trusted proxies apply
    to ``protocol: tcp`` too)."""

    keepalive_timeout: float = field(
        default=5.0,
        metadata=_meta(
            "Idle seconds a keep-alive connection is kept; 0 disables keep-alive.", lo=0, hi=3600
        ),
    )
    keepalive_handover: bool = field(
        default=True,
        metadata=_meta(
            "When a worker is replaced (max_requests, memory, reload, fewer workers), pass its "
            "idle keep-alive connections to the worker taking its place instead of closing "
            "them: clients keep their connection and see no reconnect. Not for TLS "
            "connections or with proxy_protocol, whose state stays in the old worker."
        ),
    )
    balance_connections: bool = field(
        default=True,
        metadata=_meta(
            "Keep the connections spread over the workers: a worker that holds at least 8 "
            "passes a connection it has just accepted (before reading from it), through the "
            "master, to the worker of its generation holding the fewest, if that one holds "
            "under 3/4 as many and is not stuck in a request (at most 32 per worker every "
            "0.1 s). Without it, a burst of connections (a load balancer filling its "
            "keep-alive pool, a benchmark starting) can land on one worker and stay there, "
            "leaving the others idle. Not for TLS listeners or with proxy_protocol."
        ),
    )
    keepalive_relief: float = field(
        default=0.25,
        metadata=_meta(
            "Seconds a worker may spend inside one request before the keep-alive "
            "connections parked on it are passed, through the master, to a free worker of "
            "its generation (the one holding the fewest): a client whose connection happens "
            "to sit on a worker busy with a slow request is answered by another one, and is "
            "not cut off if that worker is killed at workers.timeout (a worker a reload "
            "replaced passes them to the new generation). Checked by a thread in "
            "each worker that wakes every half of it (at most every 0.5 s); it costs the "
            "request path nothing else. 0: connections stay with their worker. Not for TLS "
            "connections or with proxy_protocol, whose state stays in the worker.",
            lo=0,
            hi=3600,
        ),
    )
    header_timeout: float = field(
        default=10.0,
        metadata=_meta(
            "The whole request head must arrive within this many seconds.",
            lo=0,
            hi=3600,
            lo_open=True,
        ),
    )
    body_timeout: float = field(
        default=30.0,
        metadata=_meta(
            "Longest wait (seconds) for the next piece of a request body.",
            lo=0,
            hi=3600,
            lo_open=True,
        ),
    )
    body_min_rate: int = field(
        default=500,
        metadata=_meta(
            "After the first body_timeout seconds of a request body, the client must have "
            "sent at least this many bytes per second on average, or the request is dropped "
            "(a trickling client cannot hold a worker). 0 = no minimum.",
            lo=0,
            hi=2**40,
        ),
    )
    send_timeout: float = field(
        default=30.0,
        metadata=_meta(
            "Longest wait (seconds) for the client to accept response bytes.",
            lo=0,
            hi=3600,
            lo_open=True,
        ),
    )
    max_request_line: int = field(
        default=8190,
        metadata=_meta(
            "A longer request line (method, target and version, not counting its CRLF, as "
            "gunicorn's limit_request_line) is answered with 414.",
            lo=64,
            hi=1048576,
        ),
    )
    max_header_fields: int = field(
        default=100,
        metadata=_meta("More header fields are answered with 431.", lo=1, hi=10000),
    )
    max_field_size: int = field(
        default=8190,
        metadata=_meta(
            "A longer header field (name + value) is answered with 431.", lo=64, hi=1048576
        ),
    )
    max_header_size: int = field(
        default=65536,
        metadata=_meta(
            "A bigger request head (bytes, in total) is answered with 431; so is a chunked"
            " body's trailer section that grows past it (and one read) while it arrives.",
            lo=256,
            hi=16777216,
        ),
    )
    max_body_size: int = field(
        default=0,
        metadata=_meta(
            "A bigger request body (bytes) is answered with 413 (0 = unlimited).", lo=0, hi=2**62
        ),
    )
    forwarded_allow_ips: tuple[str, ...] = field(
        default=("127.0.0.1", "::1", "unix"),
        metadata=_meta(
            "Peers trusted as proxies (protocol http and tcp): addresses, networks "
            "(10.0.0.0/8), 'unix' for unix-socket peers, '*' for all. Only from these do the "
            "headers of "
            "forwarded_header set REMOTE_ADDR, wsgi.url_scheme, the host (HTTP_HOST, "
            "SERVER_NAME, SERVER_PORT) and the prefix (SCRIPT_NAME), and only these may send "
            "a PROXY protocol header. [] trusts nobody. When neither the file nor --set "
            "gives it, the FORWARDED_ALLOW_IPS environment variable does, read as gunicorn "
            "reads it: comma-separated, unix-socket peers trusted too.",
            check=_check_proxy_entry,
        ),
    )
    uwsgi_allow_ips: tuple[str, ...] = field(
        default=("127.0.0.1", "::1", "unix"),
        metadata=_meta(
            "protocol uwsgi: the peers allowed to send uwsgi requests (gunicorn's "
            "uwsgi_allow_ips): addresses, networks (10.0.0.0/8), 'unix' for unix-socket "
            "peers, '*' for all. A packet's variables become the environ (REMOTE_ADDR, "
            "HTTPS, SERVER_NAME...), so any other peer is answered 403, and the worker logs "
            "a warning naming it (at most once a minute). [] allows nobody.",
            check=_check_proxy_entry,
        ),
    )
    defer_accept: int = field(
        default=0,
        metadata=_meta(
            "TCP_DEFER_ACCEPT seconds on HTTP and uwsgi listeners (0: off). On, the kernel "
            "hands a "
            "connection to a worker only once its request has arrived: a connection costs "
            "about 10% less CPU with Connection: close, and silent connections cost nothing. "
            "Off by default because deferred handshakes wait in the SYN queue: a burst of "
            "more new connections than the listen backlog at once falls back to syncookies "
            "and clients time out (thousands of wrk timeouts at 10,000 simultaneous "
            "connects; none with it off). Turn it on behind a proxy that opens a connection "
            "per request at a steady rate.",
            lo=0,
            hi=3600,
        ),
    )
    forwarded_header: str = field(
        default="x-forwarded",
        metadata=_meta(
            "Which headers a trusted proxy sets: x-forwarded (X-Forwarded-For, "
            "X-Forwarded-Proto, as nginx and most proxies do, and X-Forwarded-Host, "
            "X-Forwarded-Port, X-Forwarded-Prefix, and X-Forwarded-Ssl: on or "
            "X-Forwarded-Protocol: ssl for https, as werkzeug's ProxyFix and gunicorn read "
            "them) or forwarded (RFC 7239: for, proto and host). Only that family is read: "
            "the other may come from the client, passed through. The client address is the "
            "right-most one that is not a trusted proxy; of the other headers' lists, the "
            "right-most value counts (the nearest proxy's); a malformed value, or scheme "
            "headers that disagree, are ignored.",
            choices=("x-forwarded", "forwarded"),
        ),
    )

    @staticmethod
    def _check_script_name(value: str, base_dir: str) -> str:
        if value and not (
            value.startswith("/")
            and not value.endswith("/")
            and value.isprintable()
            and not any(c in value for c in "?#")
        ):
            raise ValueError(
                f'must be "" or a path that starts with "/" and does not end with "/" (no '
                f"?, # or control characters), got {value!r}"
            )
        return value

    script_name: str = field(
        default="",
        metadata=_meta(
            "The path prefix the application is mounted at, as gunicorn's SCRIPT_NAME "
            "environment variable or uWSGI's mount: every request gets it as SCRIPT_NAME, "
            "and PATH_INFO without it. It is matched on whole segments of the decoded path "
            "('/app' covers /app and /app/x, not /application). As in gunicorn, a request "
            "outside it is answered 400 without calling the application. Behind a trusted "
            "proxy that sends X-Forwarded-Prefix, that prefix comes first (SCRIPT_NAME is "
            "the proxy's prefix followed by this one). \"\" (no prefix) or a path that starts "
            "with '/' and does not end with '/'. When neither the file nor --set gives it, "
            "the SCRIPT_NAME environment variable does, as in gunicorn.",
            check=_check_script_name,
        ),
    )
    proxy_protocol: str = field(
        default="off",
        metadata=_meta(
            "PROXY protocol header in front of each connection from a trusted peer: off, "
            "v1, v2, or auto (either version, or none); not with protocol uwsgi, whose "
            "packet names the client. With protocol tcp too: the header "
            "is consumed before the handler (and before a `tls` listener's handshake, as "
            "behind a TLS-passthrough proxy), whose `addr` is then the client it names.",
            choices=("off", "v1", "v2", "auto"),
        ),
    )
    server_header: str = field(
        default="preforkd",
        metadata=_meta('Value of the Server response header ("" = none).', check=_check_printable),
    )


SYSLOG_FACILITIES = (
    "auth",
    "authpriv",
    "cron",
    "daemon",
    "ftp",
    "kern",
    "lpr",
    "mail",
    "news",
    "syslog",
    "user",
    "uucp",
    "local0",
    "local1",
    "local2",
    "local3",
    "local4",
    "local5",
    "local6",
    "local7",
)


@dataclass(frozen=True, slots=True)
class SyslogConfig:
    """Sending the logs to a syslog daemon."""

    enabled: bool = field(
        default=False,
        metadata=_meta(
            "Send the error log (and the access log, when on) to syslog instead of the files. "
            "A detached daemon, which has no standard error or output, sends each log that "
            'is "-" (or names them: /dev/stderr, /dev/stdout) to syslog even when this is '
            "false; a log file stays a file."
        ),
    )
    address: str = field(
        default="/dev/log",
        metadata=_meta(
            "The syslog socket: a path (/dev/log, unix:/path), udp://HOST:PORT or "
            "tcp://HOST:PORT. A unix socket must answer when the server starts (and when a "
            "reload changes it), or the start fails: nothing is logged to a socket no syslog "
            "daemon reads. Over TCP each process (master, every worker) has its own "
            "connection, messages are octet-counted (RFC 6587, which rsyslog and syslog-ng "
            "read), a lost connection is opened again at the next message (at most once a "
            "second), and messages sent while the host is unreachable are dropped and counted.",
            check=_check_syslog_address,
        ),
    )
    facility: str = field(
        default="user", metadata=_meta("Syslog facility.", choices=SYSLOG_FACILITIES)
    )
    ident: str = field(
        default="preforkd",
        metadata=_meta("Program name (tag) on every message.", check=_check_name),
    )


# The golden ratio's fractional part: its multiples, modulo 1, fill [0, 1) so that any run
# of them from the first is spread about evenly (Kronecker's sequence, the most even of its
# kind; a plain division spreads only a run whose length it was made for)
_GOLDEN = (5**0.5 - 1) / 2


def jitter_share(workers: WorkersConfig, number: int, jitter: float) -> float:
    """Worker `number`'s share of `jitter`, so that workers do not all retire at once.

    A fixed pool has exactly its numbers 1..count running: they share it exactly evenly
    (0 for the first, all of it for the last). A dynamic pool always runs 1..count and
    the numbers above only while it has grown: an even spread over 1..max gave the ones
    always running nearly the same share (count 2, max 20: 0 and 5% of it), so there it is
    spread in golden-ratio steps, even for however many are running."""
    if not jitter:
        return 0
    if workers.max > workers.count:
        return (number - 1) * _GOLDEN % 1.0 * jitter
    if workers.count <= 1:
        return 0
    return ((number - 1) % workers.count) * jitter / (workers.count - 1)


def _check_skip_path(value: str, base_dir: str) -> str:
    if not value.startswith("/") or "*" in value[:-1]:
        raise ValueError(f"must be a path starting with /, with * only at its end, got {value!r}")
    if any(c <= " " or c > "~" for c in value):
        raise ValueError(f"must be a path as a client sends it (printable ASCII), got {value!r}")
    if "?" in value or "#" in value:  # accepted, it would never match: say so now
        raise ValueError(
            f"{value!r} can never match: the path is compared without its query (?...) or "
            "fragment (#...); give the path alone"
        )
    return value


def _check_access_log_format(value: str, base_dir: str) -> str:
    """combined or json (any case), or a custom format that compiles."""
    if value.lower() in BUILTIN_FORMATS:
        return value.lower()
    compile_format(value)  # ValueError saying what is wrong
    return value


@dataclass(frozen=True, slots=True)
class LoggingConfig:
    """Where the error and access logs go, and how much they say."""

    level: str = field(
        default="info",
        metadata=_meta(
            "Error log level.", choices=("debug", "info", "warning", "error", "critical")
        ),
    )
    error_log: str = field(
        default="-",
        metadata=_meta(
            'Error log file; "-" = stderr (syslog in a detached daemon). Its directory must '
            "exist (unless syslog.enabled). It is also file descriptor 2 of the master and "
            "the workers, so what bypasses logging (faulthandler's stack dump of a worker "
            "killed at workers.timeout, print(file=sys.stderr), warnings, C libraries) lands "
            "in it. When the error log is syslog, each worker's file descriptor 2 is a pipe "
            "to the master, which logs each line written there as an ERROR record with the "
            "worker's pid (`worker N stderr: LINE`); the master's own stays the terminal it "
            "started from, except in a detached daemon (/dev/null), where a process of its "
            "own relays each line to syslog with the master's pid (`master stderr: LINE`).",
            path=True,
        ),
    )
    error_log_format: str = field(
        default="text",
        metadata=_meta(
            "Error log record format: `text` (`[time] [pid] [LEVEL] message`) or `json` "
            "(one JSON object per line, for log shippers: `time` in ISO 8601 with "
            "milliseconds and UTC offset, `level`, `pid`, `logger`, `message`, and "
            "`exception` with the traceback when there is one). It applies to preforkd's "
            "records, in the file, on stderr and on syslog (after the `ident[pid]:` tag); "
            "with json, each line the application writes to wsgi.errors is a record too "
            "(ERROR), as with syslog, and so are the workers' stderr lines the master logs "
            "when the error log is syslog. What is written to a file's descriptor 2 "
            "directly (faulthandler's stack dumps, print(file=sys.stderr)) stays as written.",
            choices=("text", "json"),
        ),
    )
    access_log: str | None = field(
        default=None,
        metadata=_meta(
            'Access log file; null = off, "-" = stdout (syslog in a detached daemon). Its '
            "directory must exist (unless syslog.enabled).",
            path=True,
        ),
    )
    access_log_format: str = field(
        default="combined",
        metadata=_meta(
            "Access log line format: `combined` (Apache combined plus the duration in "
            "microseconds), `json` (one JSON object per line; `time` is ISO 8601 with "
            "milliseconds and UTC offset), or a custom format with gunicorn's atoms, e.g. "
            "`'%(h)s %(l)s %(u)s %(t)s \"%(r)s\" %(s)s %(b)s \"%(f)s\" \"%(a)s\" %(D)s'`: "
            "h remote address, l `-`, u user (REMOTE_USER, else the Basic auth name), "
            "t `[time]`, r request line, m method, U path, q query string, H protocol, "
            "s status, B body bytes, b body bytes or `-`, f referer, a user agent, "
            "T/M/D seconds/milliseconds/microseconds taken, L seconds as a decimal, "
            "p `<pid>`, `%({name}i)s` request header, `%({name}o)s` the application's "
            "response header, `%({name}e)s` environ variable; `%%` is a literal %. Missing "
            "or empty values are `-` (i, o, e and u always are for the server's own error "
            "responses and for TCP connections); quotes, backslashes and control characters "
            "are escaped. An unknown atom is an error; so is a uWSGI logformat (`%(addr) "
            "%(method) %(uri)`) or an Apache LogFormat (`%h %>s %{Referer}i`, or `common`), "
            "whose message gives it in these atoms.",
            check=_check_access_log_format,
        ),
    )
    access_log_skip: tuple[str, ...] = field(
        default=(),
        metadata=_meta(
            "Request paths (HTTP) whose responses below 400 get no access-log line, such as "
            "a load balancer's health checks: an exact path (/healthz), or a prefix ending "
            "in * (/static/*). The path is compared as the client sent it, without the "
            "query (so an entry with ? or # is an error); an error response (400 and up) is "
            "always logged, and the metrics and post_request count every request.",
            check=_check_skip_path,
        ),
    )
    capture_output: bool = field(
        default=False,
        metadata=_meta(
            "Point standard output (file descriptor 1) at the error log file, in the master "
            "and every worker, as gunicorn's capture_output: what the application, a hook or "
            "a library prints lands in the error log instead of a detached daemon's "
            "/dev/null, a line at a time (sys.stdout becomes line-buffered), and it follows "
            "the error log through a reopen (USR1) and a reload. An access_log of \"-\" "
            "then goes there too. With the error log on syslog, the workers' standard output "
            "goes where their standard error does, a line per ERROR record (the master's "
            "stays as it is); with error_log \"-\" on stderr it does nothing (standard "
            "output stays as it is, as in gunicorn). Read at start: a reload that changes it "
            "says it waits for a restart."
        ),
    )
    syslog: SyslogConfig = field(
        default_factory=SyslogConfig, metadata=_meta("Syslog destination (section).")
    )


def _check_admin_bind(value: str, base_dir: str) -> str:
    address = parse_address(value)
    if address.kind != "tcp":
        raise ValueError(f"must be a loopback HOST:PORT (use admin.socket for unix), got {value!r}")
    try:
        loopback = ipaddress.ip_address(address.host).is_loopback
    except ValueError:
        loopback = address.host == "localhost"
    if not loopback:
        raise ValueError(f"must be a loopback address (127.0.0.1, [::1]), got {value!r}")
    return value


@dataclass(frozen=True, slots=True)
class AdminConfig:
    """The master's status endpoint: /status (JSON), /metrics (Prometheus), /ready, /live."""

    socket: str | None = field(
        default=None,
        metadata=_meta(
            "Unix socket of the status endpoint (mode 0600); its directory must exist. "
            "null = PIDFILE.sock when a pidfile is set, else no unix endpoint.",
            path=True,
            check=_check_socket_file,
        ),
    )
    bind: str | None = field(
        default=None,
        metadata=_meta(
            "Also serve the status endpoint on this loopback HOST:PORT; null = no TCP endpoint.",
            check=_check_admin_bind,
        ),
    )
    status_interval: float = field(
        default=5.0,
        metadata=_meta(
            "Seconds between summaries in systemd's STATUS line (under systemd).", lo=0.1, hi=3600
        ),
    )


@dataclass(frozen=True, slots=True)
class StreamConfig:
    """Stream handler connections (``protocol: tcp`` only)."""

    idle_timeout: float = field(
        default=300.0,
        metadata=_meta(
            "Seconds one blocking call on the handler's socket (recv, send, ...) may wait "
            "on the client before it raises TimeoutError in the handler; 0 = no limit. "
            "Time spent waiting on the client never counts toward workers.timeout, which "
            "bounds only the handler's own work between those calls.",
            lo=0,
            hi=86400,
        ),
    )
    handshake_timeout: float = field(
        default=10.0,
        metadata=_meta(
            "Seconds a connection has to complete its TLS handshake (a `tls` listener) and "
            "its PROXY header (http.proxy_protocol) before the handler is called; a "
            "connection that does not is closed.",
            lo=0.1,
            hi=3600,
        ),
    )
    eof_on_stop: bool = field(
        default=False,
        metadata=_meta(
            "When a worker is asked to stop gracefully (TERM, a reload, a recycle) while "
            "its handler holds a connection, shut that connection's read side: a handler "
            "waiting for the client reads end-of-file, as if the client had closed, and can "
            "end the session cleanly (what the client already sent is read first; sending "
            "still works). Off, a long session holds the worker until graceful_timeout, "
            "then it is killed. Off by default: a handler that reads one message in several "
            "recv calls would see a stop between them as a message cut short.",
        ),
    )


def _check_statsd_address(value: str, base_dir: str) -> str:
    address = parse_address(value)
    if address.kind == "unix":
        return f"unix:{resolve_relative(address, base_dir).path}"
    if address.port == 0:
        raise ValueError(f"needs a port (statsd listens on 8125), got {value!r}")
    return value


_STATSD_TAG = re.compile(r"[A-Za-z0-9_.\-/]+(:[A-Za-z0-9_.\-/:]+)?")


def _check_statsd_tag(value: str, base_dir: str) -> str:
    if not _STATSD_TAG.fullmatch(value):
        raise ValueError(f"must be NAME or NAME:VALUE (letters, digits, _.-/), got {value!r}")
    return value


def _check_statsd_prefix(value: str, base_dir: str) -> str:
    # gunicorn's statsd_prefix is written with its separator ("myapp."), which it folds
    # into one: taken here as "myapp", so that a moved setting names the same metrics
    name = value.rstrip(".") if value.strip(".") else value
    if name and not re.fullmatch(r"[A-Za-z0-9_\-]+(\.[A-Za-z0-9_\-]+)*", name):
        raise ValueError(f"must be dot-separated names (letters, digits, _-), got {value!r}")
    return name


@dataclass(frozen=True, slots=True)
class StatsdConfig:
    """Sending the metrics to a statsd (or DogStatsD, Telegraf) daemon. The master sends
    them every `interval`, from the same counters as /metrics: workers send nothing, so a
    request costs nothing more."""

    address: str | None = field(
        default=None,
        metadata=_meta(
            "HOST:PORT of the statsd daemon (UDP), or unix:PATH (a datagram socket); "
            "null = off. A host name is resolved at start and at each reload.",
            check=_check_statsd_address,
        ),
    )
    prefix: str = field(
        default="preforkd",
        metadata=_meta(
            "Prefix of every metric name (dot-separated names; \"\" = none). A trailing "
            "dot is dropped: gunicorn's \"myapp.\" is \"myapp\".",
            check=_check_statsd_prefix,
        ),
    )
    interval: float = field(
        default=10.0,
        metadata=_meta("Seconds between sends.", lo=0.1, hi=3600),
    )
    tags: tuple[str, ...] = field(
        default=(),
        metadata=_meta(
            "DogStatsD tags added to every metric (NAME or NAME:VALUE); [] = plain statsd.",
            check=_check_statsd_tag,
        ),
    )


HOOKS = (
    "on_starting",
    "when_ready",
    "pre_fork",
    "post_fork",
    "post_worker_init",
    "worker_exit",
    "worker_int",
    "worker_abort",
    "child_exit",
    "nworkers_changed",
    "on_reload",
    "pre_exec",
    "pre_request",
    "post_request",
    "on_exit",
)


def _hook(doc: str) -> Any:
    return field(default=None, metadata=_meta(doc, check=_check_hook_ref))


def _check_static_url(value: str, base_dir: str) -> str:
    """A `static[].url`: an absolute path prefix of ASCII characters, matched against the
    decoded request path, kept with one trailing "/" ("/static" and "/static/" are one)."""
    if not value.startswith("/"):
        raise ValueError(f"must be a path starting with '/', got {value!r}")
    if not value.isascii() or not value.isprintable() or any(c in value for c in "?#%"):
        raise ValueError(
            f"must be a decoded path of printable ASCII without '?', '#' or '%', got {value!r}"
        )
    segments = value.strip("/").split("/")
    if value != "/" and any(s in ("", ".", "..") for s in segments):
        raise ValueError(f"must not contain empty, '.' or '..' segments, got {value!r}")
    return value.rstrip("/") + "/"


def _check_index_name(value: str, base_dir: str) -> str:
    """A `static[].index`: one file name, no directory part; '' for none."""
    if value and (
        not value.isascii() or not value.isprintable() or "/" in value or value in (".", "..")
    ):
        raise ValueError(
            f"must be a file name of printable ASCII without '/', such as index.html, "
            f"got {value!r}"
        )
    return value


@dataclass(frozen=True, slots=True)
class StaticConfig:
    """One directory of static files (an item of ``static``), uWSGI's static-map."""

    url: str = field(
        metadata=_meta(
            "Path prefix the files are served under, such as /static/ (matched whole "
            "segments against the request path after percent-decoding and removing dot "
            "segments, before http.script_name is stripped; a trailing / is implied). The "
            "first item whose url matches and whose directory has the file answers.",
            check=_check_static_url,
        )
    )
    path: str = field(
        metadata=_meta(
            "Directory the files are read from; it must exist. /static/css/a.css is "
            "PATH/css/a.css. Only regular files inside it are served: a symlink whose "
            "target is outside it (by its real path) is not followed, and a directory is "
            "never listed. Every file in it is public, those whose names begin with a dot "
            "too (/.well-known/, and also .env or .git/ if they are put there), as under "
            "uWSGI and nginx: point it at the collected static files, not a project tree.",
            path=True,
            check=_check_directory,
        )
    )
    max_age: int = field(
        default=0,
        metadata=_meta(
            "Cache-Control: max-age=N on the files' responses (uWSGI's static-expires); "
            "0 = no Cache-Control header.",
            lo=0,
            hi=10 * 365 * 86400,
        ),
    )
    gzip: bool = field(
        default=False,
        metadata=_meta(
            "Serve FILE.gz, when it exists beside FILE, to a client whose Accept-Encoding "
            "takes gzip, with Content-Encoding: gzip (uWSGI's static-gzip); every response "
            "of this item says Vary: Accept-Encoding."
        ),
    )
    index: str = field(
        default="",
        metadata=_meta(
            "File served for a directory asked for with a trailing / (uWSGI's "
            "static-index, nginx's index), such as index.html: /static/docs/ is "
            "PATH/docs/index.html, served as any file is (inside the directory by its real "
            "path, a regular file, gzip beside it). A directory asked for without the / "
            "whose index file exists gets a 301 to the URL with it (as from nginx). '' = "
            "none: a directory, and one without its index file, goes to the application.",
            check=_check_index_name,
        ),
    )


@dataclass(frozen=True, slots=True)
class HooksConfig:
    """Server hooks: `module:function` names, called at the moments below. A hook that raises,
    or calls sys.exit(), is logged with its traceback; see each one for what else follows."""

    on_starting: str | None = _hook(
        "on_starting(server): master, once, before sockets are bound. Raising (or "
        "sys.exit()) stops the start with exit status 1, before anything is bound."
    )
    when_ready: str | None = _hook(
        "when_ready(server): master, once every initial worker serves."
    )
    pre_fork: str | None = _hook(
        "pre_fork(server, worker): master, just before a worker is forked."
    )
    post_fork: str | None = _hook(
        "post_fork(server, worker): the new worker, right after fork, before the app is "
        "loaded (reconnect databases here). Raising makes it a boot failure: the server "
        "stops if it was never ready, else the worker is retried with backoff."
    )
    post_worker_init: str | None = _hook(
        "post_worker_init(worker): the worker, after the app is loaded, before it serves. "
        "Raising makes it a boot failure (as for post_fork)."
    )
    worker_exit: str | None = _hook(
        "worker_exit(server, worker): the worker, as it leaves after serving."
    )
    worker_int: str | None = _hook(
        "worker_int(worker): the worker, on SIGINT or SIGQUIT (a fast stop: the master "
        "sends QUIT to every worker on INT or QUIT), just before it exits at once with "
        "status 0, wherever it was (worker_exit does not run then). It runs once, however "
        "many of these signals arrive; keep it short: in a fast stop the master SIGKILLs "
        "any worker still there 1 s later. Raising changes nothing: the worker exits."
    )
    worker_abort: str | None = _hook(
        "worker_abort(worker): the worker, on the SIGABRT the master sends when it is "
        "busy in one request past workers.timeout, after faulthandler has written every "
        "thread's stack to the error log. It runs only once the worker's main thread "
        "executes Python code again (time.sleep, or a wait on a socket or lock, is "
        "interrupted for it; a worker stuck inside C code never gets there), and the worker "
        "then dies of SIGABRT as it does without the hook, so the master logs and "
        "counts a timeout as always. A worker that never runs it, or whose hook is still "
        "running, is SIGKILLed workers.timeout_grace after the SIGABRT, as without it. "
        "Raising changes nothing: the worker dies all the same."
    )
    child_exit: str | None = _hook(
        "child_exit(server, worker): master, after a worker has been reaped."
    )
    nworkers_changed: str | None = _hook(
        "nworkers_changed(server, new_value, old_value): master, when the pool's size "
        "changes: TTIN, TTOU, WINCH and what brings the workers back, the dynamic pool "
        "growing or shrinking, a reload that changed workers.count (as it takes over)."
    )
    on_reload: str | None = _hook(
        "on_reload(server): master, when a HUP has produced a valid new configuration."
    )
    pre_exec: str | None = _hook(
        "pre_exec(server): the child a USR2 forks, just before it executes the new master "
        "(its environment is os.environ there). Raising stops the upgrade: the child "
        "exits and the old master serves on."
    )
    pre_request: str | None = _hook(
        "pre_request(worker, req): the worker, before the app is called. req is the "
        "request's WSGI environ as a mapping (req['PATH_INFO']; a write reaches the app) "
        "with gunicorn's Request attributes (req.method, req.path, req.headers, ...). "
        "Raising answers that request with 500."
    )
    post_request: str | None = _hook(
        "post_request(worker, environ, status): the worker, after the response was sent "
        "(status: the int code); or gunicorn's post_request(worker, req, environ, resp), "
        "told by its signature: req as pre_request's (the same object), resp with "
        "gunicorn's Response attributes (resp.status, resp.status_code, resp.headers, "
        "resp.sent)."
    )
    on_exit: str | None = _hook("on_exit(server): master, last, once every worker has exited.")


@dataclass(frozen=True, slots=True)
class Config:
    """The whole configuration. Build it with ``load()`` or ``from_mapping()``."""

    app: str = field(
        metadata=_meta(
            "The WSGI app (protocol http or uwsgi) or TCP handler (protocol tcp) as "
            "'module:callable'; "
            "checked for syntax only, imported by the workers.",
            check=_check_app_ref,
        )
    )
    protocol: str = field(
        default="http",
        metadata=_meta(
            "http: HTTP/1.1 to a WSGI app; uwsgi: uWSGI's binary protocol to a WSGI app "
            "(what nginx's uwsgi_pass sends, with `include uwsgi_params`: one request per "
            "connection, its environ from the packet's variables, from the peers of "
            "http.uwsgi_allow_ips only); tcp: raw stream handler called as handler(sock, "
            "addr) once per connection.",
            choices=("http", "uwsgi", "tcp"),
        ),
    )
    bind: tuple[BindConfig, ...] = field(
        default=(BindConfig("127.0.0.1:8000"),),
        metadata=_meta(
            "Sockets to listen on: a list of addresses or {address, mode} mappings (one bare "
            "address is a one-item list). Duplicates are an error. Sockets passed by systemd "
            "(socket activation) are served instead; each takes the `tls` of the entry for "
            "its address, matched by meaning (`*:PORT` matches any address on PORT, a name "
            "its addresses), and a `tls` entry that matches none of them stops the start. "
            "When neither the file nor the command line gives it, the PORT environment "
            "variable does, as in gunicorn (Heroku, Cloud Run, Render): `*:$PORT`.",
            nonempty=True,
            single=True,
        ),
    )
    backlog: int = field(
        default=2048,
        metadata=_meta(
            "listen() backlog of every socket (uWSGI's listen). The kernel caps it at "
            "net.core.somaxconn without a word (uWSGI refuses to start); preforkd warns "
            "when it did, at start and in `check`, naming the queue each socket got.",
            lo=1,
            hi=65535,
        ),
    )
    proc_name: str | None = field(
        default=None,
        metadata=_meta(
            "Name shown in process titles; null = the app reference.", check=_check_name
        ),
    )
    preload_app: bool = field(
        default=False,
        metadata=_meta(
            "Import the app in the master before forking (workers share its memory "
            "copy-on-write and boot at once). HUP then re-imports, in the master, the modules "
            "the app brought in, for the new generation (the serving one keeps its code if "
            "that fails); packages with compiled extension modules are kept, so a new version "
            "of those needs a restart or USR2. Without it each new worker imports the app "
            "itself, so HUP also "
            "loads new code; either way HUP re-reads the configuration and rebinds changed "
            "addresses."
        ),
    )
    pythonpath: tuple[str, ...] = field(
        default=(),
        metadata=_meta("Directories prepended to sys.path before the app is imported.", path=True),
    )
    chdir: str | None = field(
        default=None,
        metadata=_meta(
            "Directory to change into before loading the app (it must exist); null = stay.",
            path=True,
            check=_check_directory,
        ),
    )
    env: tuple[tuple[str, str], ...] = field(
        default=(),
        metadata=_meta(
            "Environment variables set in the master before the app is loaded or any worker "
            "is forked (a mapping: NAME: value).",
            mapping=True,
        ),
    )
    reload: bool = field(
        default=False,
        metadata=_meta(
            "Development mode: workers watch the app's modules and reload_extra_files "
            "(inotify, else polling) and are replaced when one changes; an app that fails to "
            "import is served as a 500 page with the traceback until it is fixed. Not for "
            "production."
        ),
    )
    reload_extra_files: tuple[str, ...] = field(
        default=(),
        metadata=_meta("More files whose change replaces the workers (reload mode).", path=True),
    )
    touch_reload: tuple[str, ...] = field(
        default=(),
        metadata=_meta(
            "Files whose change reloads the server as a HUP does (uWSGI's touch-reload), for "
            "production: the master looks at each one's modification time, size and inode "
            "(symlinks followed) once a second, and a change (`touch FILE`, a file renamed "
            "over it, a symlink moved) starts the reload, its log line naming the file. A "
            "file that does not exist is watched for its creation; one that disappears is "
            "logged once and reloads nothing. The first look, at start, reloads nothing; a "
            "touch before a reload reads the configuration is part of that reload, one after "
            "makes one more. A HUP that changes the list applies it once its generation "
            "serves. Relative paths are resolved against this file's directory.",
            path=True,
            single=True,
        ),
    )
    touch_logreopen: tuple[str, ...] = field(
        default=(),
        metadata=_meta(
            "Files whose change reopens the log files as a USR1 does (uWSGI's "
            "touch-logreopen), watched as touch_reload's are.",
            path=True,
            single=True,
        ),
    )
    hooks: HooksConfig = field(
        default_factory=HooksConfig, metadata=_meta("Server hooks (section).")
    )
    static: tuple[StaticConfig, ...] = field(
        default=(),
        metadata=_meta(
            "Static files the workers serve themselves, before the application is called "
            "(uWSGI's static-map): a list of {url, path, max_age, gzip, index} mappings. A GET or "
            "HEAD under a url whose file exists is answered from it (200, 304 on "
            "If-None-Match or If-Modified-Since, 206 or 416 on a single byte range); any "
            "other request, or a file that is missing, goes to the application. "
            "`protocol: http` and `uwsgi` (matched on SCRIPT_NAME and PATH_INFO as the "
            "packet gives them).",
        ),
    )
    daemon: bool = field(
        default=False,
        metadata=_meta(
            "Detach into the background (double fork, setsid, stdio to /dev/null). The "
            "command that started it exits 0 once the server is ready, or non-zero with the "
            "error. Ignored (with a log line) in a Type=notify unit (NOTIFY_SOCKET set), "
            "and when started by systemd (INVOCATION_ID set) unless -D (or --set "
            "daemon=true) is given on the command line, as a Type=forking unit's ExecStart "
            "does."
        ),
    )
    pidfile: str | None = field(
        default=None,
        metadata=_meta(
            "File holding the master's pid, written atomically once it runs and removed at "
            "exit; a live pid in it makes a second instance refuse to start. Its directory "
            "must exist.",
            path=True,
            check=_check_file_directory,
        ),
    )
    user: str | None = field(
        default=None,
        metadata=_meta(
            "Run the workers as this user, with its supplementary groups; the master keeps "
            "its privileges so it can bind and reload. A user name must exist; a numeric id "
            "need not (arbitrary container uids). null = no change.",
            check=_check_user,
            ident=True,
        ),
    )
    group: str | None = field(
        default=None,
        metadata=_meta(
            "Run the workers with this group: a name, which must exist, or a numeric id, "
            "which need not; null = the user's primary group.",
            check=_check_group,
            ident=True,
        ),
    )
    umask: int | None = field(
        default=None,
        metadata=_meta(
            "File mode creation mask of the master and workers, always read as octal: 27, "
            "027, 0027, 0o27 and '027' all mean 0o027 (a digit 8 or 9 is an error); "
            "null = inherited.",
            lo=0,
            hi=0o777,
            octal=True,
        ),
    )
    workers: WorkersConfig = field(
        default_factory=WorkersConfig, metadata=_meta("Worker processes (section).")
    )
    http: HttpConfig = field(
        default_factory=HttpConfig, metadata=_meta("HTTP limits and timeouts (section).")
    )
    stream: StreamConfig = field(
        default_factory=StreamConfig,
        metadata=_meta("Stream handler connections (section, protocol tcp)."),
    )
    logging: LoggingConfig = field(default_factory=LoggingConfig, metadata=_meta("Logs (section)."))
    admin: AdminConfig = field(
        default_factory=AdminConfig, metadata=_meta("Status endpoint (section).")
    )
    statsd: StatsdConfig = field(
        default_factory=StatsdConfig, metadata=_meta("Metrics to statsd (section).")
    )
    source: str = field(
        default="",
        metadata=_meta(
            "Absolute path of the config file this was loaded from; '' when none.",
            internal=True,
        ),
    )


def bind_address(b: BindConfig) -> Address:
    """The parsed address of one bind entry (already absolute for unix sockets)."""
    return parse_address(b.address)


# --- public entry points -----------------------------------------------------------------


def load(
    path: str | None, overrides: Mapping[str, object] | None = None, cwd: str | None = None
) -> Config:
    """Read ``path`` (None: no file), apply ``overrides`` on top, validate, return a Config.

    ``overrides`` maps dotted keys (``"workers.count"``) to values typed as in YAML; a
    mapping value for a section (``{"workers": {"count": 4}}``) sets its keys one by one,
    and a list value replaces the file's list. Relative override paths are resolved against
    ``cwd``, by default the current working directory (a reload passes the one the server
    was started in: a daemon's, or a preloaded app's `chdir:`, is another by then).
    """
    cwd = os.getcwd() if cwd is None else cwd
    tree = _Raw({}, _Origin(OVERRIDE_SOURCE, cwd)) if path is None else _read_yaml(path)
    if overrides:
        tree = _apply_overrides(tree, overrides, _Origin(OVERRIDE_SOURCE, cwd))
    config = _build(Config, tree, "")
    return dataclasses.replace(config, source=os.path.abspath(path) if path is not None else "")


def from_mapping(
    data: Mapping[str, object], source: str = "<mapping>", base_dir: str | None = None
) -> Config:
    """Validate an already-parsed mapping (as YAML would give it) into a Config.

    ``source`` only labels error messages (``Config.source`` stays ""); relative paths are
    resolved against ``base_dir`` (default: the current working directory).
    """
    origin = _Origin(source, os.path.abspath(base_dir) if base_dir is not None else os.getcwd())
    tree = _from_python(data, origin, "")
    if not isinstance(tree.value, dict):
        raise ConfigError(
            f"the top level must be a mapping of settings, got {_show(tree)}", source=source
        )
    return _build(Config, tree, "")


# --- raw values with provenance --------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Origin:
    source: str  # what error messages name: a file path, "command line", ...
    base_dir: str  # absolute directory that relative paths from this source are joined to


@dataclass(frozen=True, slots=True)
class _Raw:
    """A value before validation: a scalar, ``list[_Raw]`` or ``dict[str, _Raw]``."""

    value: object
    origin: _Origin
    line: int | None = None  # 1-based line of the value
    key_line: int | None = None  # 1-based line of the key that names it
    text: str | None = None  # a YAML scalar's source text (without quotes); None from Python

    def fail(self, key: str, message: str, *, at_key: bool = False) -> ConfigError:
        line = self.key_line if at_key and self.key_line is not None else self.line
        return ConfigError(message, source=self.origin.source, line=line, key=key)


def _read_yaml(path: str) -> _Raw:
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise ConfigError(f"cannot read: [Errno {e.errno}] {e.strerror}", source=path) from e
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise ConfigError(f"not valid UTF-8: {e.reason}", source=path, line=line) from e
    origin = _Origin(path, os.path.dirname(os.path.abspath(path)))
    try:
        node = yaml.compose(text, Loader=_LOADER)
    except yaml.YAMLError as e:
        raise _yaml_error(e, origin) from e
    if node is None or node.tag == "tag:yaml.org,2002:null":  # empty, comments only, "---"
        return _Raw({}, origin)
    if not isinstance(node, yaml.MappingNode):
        raise ConfigError(
            f"the top level must be a mapping of settings (key: value), got {_node_kind(node)}",
            source=path,
            line=node.start_mark.line + 1,
        )
    tree = _from_node(node, origin, yaml.constructor.SafeConstructor(), "", set())
    return dataclasses.replace(tree, line=None)  # a missing top-level key has no line


def _yaml_error(e: yaml.YAMLError, origin: _Origin) -> ConfigError:
    if isinstance(e, yaml.MarkedYAMLError):
        detail = ": ".join(p for p in (e.context, e.problem) if p)
        mark = e.problem_mark or e.context_mark
        line = mark.line + 1 if mark is not None else None
        return ConfigError(f"invalid YAML: {detail}", source=origin.source, line=line)
    return ConfigError(f"invalid YAML: {e}", source=origin.source)


_DEFAULT_TAGS: dict[type[yaml.Node], str] = {
    yaml.MappingNode: "tag:yaml.org,2002:map",
    yaml.SequenceNode: "tag:yaml.org,2002:seq",
}


def _from_node(
    node: yaml.Node,
    origin: _Origin,
    constructor: yaml.constructor.SafeConstructor,
    path: str,
    active: set[int],
    key_line: int | None = None,
) -> _Raw:
    """Turn a composed YAML node into ``_Raw`` values that remember their lines."""
    line = node.start_mark.line + 1
    if isinstance(node, yaml.ScalarNode):
        try:
            value = constructor.construct_object(node, deep=True)
        except yaml.YAMLError as e:
            raise _yaml_error(e, origin) from e
        except (ValueError, TypeError, AttributeError, LookupError):  # "!!int abc" and such
            raise ConfigError(
                f"invalid YAML: {node.value!r} is not a valid {node.tag.rpartition(':')[2]}",
                source=origin.source,
                line=line,
                key=path,
            ) from None
        return _Raw(value, origin, line, key_line, node.value)
    if node.tag != _DEFAULT_TAGS.get(type(node)):
        raise ConfigError(f"unsupported YAML tag {node.tag!r}", source=origin.source, line=line)
    if id(node) in active:  # "&a [*a]" composes to a cycle
        raise ConfigError("recursive YAML alias", source=origin.source, line=line, key=path)
    active.add(id(node))
    try:
        if isinstance(node, yaml.SequenceNode):
            items = [
                _from_node(item, origin, constructor, f"{path}[{i}]", active)
                for i, item in enumerate(node.value)
            ]
            return _Raw(items, origin, line, key_line)
        entries: dict[str, _Raw] = {}
        for key_node, value_node in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                raise ConfigError(
                    "YAML merge keys ('<<') are not supported",
                    source=origin.source,
                    line=key_node.start_mark.line + 1,
                    key=path,
                )
            key_raw = _from_node(key_node, origin, constructor, path, active)
            key = key_raw.value
            if not isinstance(key, str):
                raise key_raw.fail(path, f"keys must be strings, got {_show(key_raw)}")
            if key in entries:
                first = entries[key].key_line
                raise key_raw.fail(
                    _join(path, key), f"duplicate key {key!r} (first at line {first})"
                )
            entries[key] = _from_node(
                value_node, origin, constructor, _join(path, key), active, key_raw.line
            )
        return _Raw(entries, origin, line, key_line)
    finally:
        active.discard(id(node))


def _node_kind(node: yaml.Node) -> str:
    if isinstance(node, yaml.SequenceNode):
        return "a list"
    return f"the scalar {node.value!r}"


class YamlText(str):
    """An override given as YAML source text (`--set KEY=VALUE`): read as a value in the
    file is (a mode written 660 is octal), not as the Python value YAML would make of it."""


def _from_yaml_text(text: str, origin: _Origin, path: str) -> _Raw:
    if text.strip() == "-":
        # YAML reads a lone "-" as a list holding one null, which no setting takes; on a
        # command line it is the "-" (stdout, stderr) of the log settings, as --error-log -
        return _Raw("-", origin)
    try:
        node = yaml.compose(str(text), Loader=_LOADER)
        if node is None:  # "" or only a comment: null, as in the file
            return _Raw(None, origin)
        raw = _from_node(node, origin, yaml.constructor.SafeConstructor(), path, set())
    except yaml.YAMLError as e:
        raise ConfigError(_yaml_error(e, origin).message, source=origin.source, key=path) from e
    except ConfigError as e:  # its line is the text's, not a file's
        raise ConfigError(e.message, source=e.source, key=e.key or path) from e
    return _unlined(raw)


def _unlined(raw: _Raw) -> _Raw:
    """`raw` without line numbers: those of a command-line value would point at no file."""
    value = raw.value
    if isinstance(value, dict):
        value = {k: _unlined(v) for k, v in value.items()}
    elif isinstance(value, list):
        value = [_unlined(v) for v in value]
    return dataclasses.replace(raw, value=value, line=None, key_line=None)


def _from_python(value: object, origin: _Origin, path: str) -> _Raw:
    if isinstance(value, YamlText):
        return _from_yaml_text(value, origin, path)
    if isinstance(value, Mapping):
        entries: dict[str, _Raw] = {}
        for key, item in value.items():
            if not isinstance(key, str):
                raise ConfigError(
                    f"keys must be strings, got {key!r}", source=origin.source, key=path
                )
            entries[key] = _from_python(item, origin, _join(path, key))
        return _Raw(entries, origin)
    if isinstance(value, list | tuple):
        return _Raw([_from_python(v, origin, f"{path}[{i}]") for i, v in enumerate(value)], origin)
    return _Raw(value, origin)


def _apply_overrides(tree: _Raw, overrides: Mapping[str, object], origin: _Origin) -> _Raw:
    entries = dict(_entries(tree))
    for key, value in _flatten(overrides, ""):
        parts = key.split(".")
        if parts[0] in _MAPPINGS:  # env.A.B: the variable "A.B"
            parts = key.split(".", 1)
        if not all(parts):
            raise ConfigError("not a valid setting name", source=origin.source, key=key)
        raw = _from_python(value, origin, key)
        if isinstance(value, YamlText) and _is_section(key) and isinstance(raw.value, dict):
            # a section given as YAML text sets its keys one by one, as a mapping does
            for name, item in raw.value.items():
                _set_path(entries, [*parts, name], item, origin)
        else:
            _set_path(entries, parts, raw, origin)
    return dataclasses.replace(tree, value=entries)


# Settings whose value maps free names (environment variables) to values.
_MAPPINGS = frozenset(f.name for f in dataclasses.fields(Config) if f.metadata.get("mapping"))


def _flatten(overrides: Mapping[str, object], prefix: str) -> Iterator[tuple[str, object]]:
    for key, value in overrides.items():
        if not isinstance(key, str):
            raise ConfigError(f"keys must be strings, got {key!r}", source=OVERRIDE_SOURCE)
        dotted = _join(prefix, key)
        if isinstance(value, Mapping) and _is_section(dotted):
            yield from _flatten(value, dotted)
        else:
            yield dotted, value


def _is_section(dotted: str) -> bool:
    hints = typing.get_type_hints(Config)
    return dotted in hints and dataclasses.is_dataclass(hints[dotted])


def _entries(raw: _Raw) -> dict[str, _Raw]:
    return raw.value if isinstance(raw.value, dict) else {}


def _set_path(entries: dict[str, _Raw], parts: list[str], value: _Raw, origin: _Origin) -> None:
    head, rest = parts[0], parts[1:]
    if not rest:
        entries[head] = value
        return
    child = entries.get(head)
    if child is None or not isinstance(child.value, dict):
        child = _Raw({}, origin)  # absent, null ("workers:") or invalid in the file
    inner = dict(_entries(child))
    _set_path(inner, rest, value, origin)
    entries[head] = dataclasses.replace(child, value=inner)


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _show(raw: _Raw) -> str:
    """How a rejected value appears in a message: as the user wrote it, roughly."""
    return repr(_plain(raw.value))


def _plain(value: object) -> object:
    if isinstance(value, dict):
        return {k: _plain(v.value) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v.value) for v in value]
    return value


# --- validation --------------------------------------------------------------------------


def _settable(cls: type) -> dict[str, dataclasses.Field[Any]]:
    return {f.name: f for f in dataclasses.fields(cls) if not f.metadata.get("internal")}


def _build(cls: type[_T], raw: _Raw, path: str) -> _T:
    if raw.value is None:  # "workers:" with everything under it commented out
        entries: dict[str, _Raw] = {}
    elif isinstance(raw.value, dict):
        entries = raw.value
    elif cls is BindConfig:
        raise raw.fail(path, f"must be an address string or {{address, mode}}, got {_show(raw)}")
    else:
        subject = "must be" if path else "the top level must be"
        raise raw.fail(path, f"{subject} a mapping of settings, got {_show(raw)}")
    fields = _settable(cls)
    for key, item in entries.items():
        if key not in fields:
            message = f"unknown key {key!r}"
            close = difflib.get_close_matches(key, list(fields), n=1)
            if close:
                message += f" (did you mean {close[0]!r}?)"
            raise item.fail(_join(path, key), message, at_key=True)
    hints = typing.get_type_hints(cls)
    kwargs: dict[str, Any] = {}
    for name, f in fields.items():
        if name in entries:
            kwargs[name] = _convert(hints[name], f.metadata, entries[name], _join(path, name))
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise raw.fail(_join(path, name), "required setting is missing")
    obj = cls(**kwargs)
    _cross_check(obj, entries, path)
    return obj


def _cross_check(obj: object, entries: dict[str, _Raw], path: str) -> None:
    """Rules that involve more than one field."""
    if isinstance(obj, TLSConfig):
        _check_tls(obj, entries, path)
    if isinstance(obj, LoggingConfig) and not obj.syslog.enabled:  # else the files are unused
        for key in ("error_log", "access_log"):
            filename = getattr(obj, key)
            if filename is not None and key in entries:
                try:
                    _check_file_directory(filename, entries[key].origin.base_dir)
                except ValueError as e:
                    raise entries[key].fail(_join(path, key), str(e)) from None
    if isinstance(obj, BindConfig) and not obj.address.startswith("unix:"):
        for key in ("mode", "owner", "group"):
            if getattr(obj, key) is not None:
                raise entries[key].fail(_join(path, key), f"{key} applies only to unix sockets")
    if isinstance(obj, BindConfig) and obj.address.startswith("unix:") and obj.reuse_port:
        raise entries["reuse_port"].fail(
            _join(path, "reuse_port"), "reuse_port applies only to TCP sockets"
        )
    if isinstance(obj, WorkersConfig) and obj.max:
        if obj.max < obj.count:
            raise entries["max"].fail(
                _join(path, "max"), f"must be at least workers.count ({obj.count}), or 0"
            )
        if obj.max_spare < obj.min_spare:
            key = "max_spare" if "max_spare" in entries else "min_spare"
            raise entries[key].fail(_join(path, key), "max_spare must be at least min_spare")
    if isinstance(obj, Config) and obj.protocol == "uwsgi" and obj.http.proxy_protocol != "off":
        section = entries["http"]
        inner = section.value.get("proxy_protocol") if isinstance(section.value, dict) else None
        raise (inner or section).fail(
            "http.proxy_protocol",
            "not with protocol uwsgi: a uwsgi packet names the client itself (REMOTE_ADDR)",
        )
    if (
        isinstance(obj, Config)
        and obj.protocol == "http"
        and obj.http.proxy_protocol != "off"
        and any(b.tls is not None for b in obj.bind)
    ):
        where = entries["http"] if "http" in entries else entries["bind"]
        raise where.fail(
            "http.proxy_protocol",
            "PROXY protocol on a TLS listener is not supported (terminate TLS at the proxy, "
            "or use TCP passthrough without PROXY protocol)",
        )
    if isinstance(obj, Config) and obj.admin.socket is None and obj.pidfile is not None:
        problem = unix_path_length_problem(obj.pidfile + ".sock")
        if problem is not None:  # the status endpoint's default socket could not be bound
            raise entries["pidfile"].fail(
                "pidfile",
                f"the status socket beside it, {obj.pidfile}.sock, would be too long for a "
                f"unix socket ({problem}): set admin.socket to a shorter path",
            )
    if isinstance(obj, Config):
        _check_admin_apart(obj, entries)
    if isinstance(obj, Config) and obj.static:
        _check_static(obj, entries)
    if isinstance(obj, Config) and "bind" in entries:
        _check_unique(entries, "bind", "", "address", [
            # any number of ephemeral ports (":0") is fine
            b.address if b.address.startswith("unix:") or not b.address.endswith(":0") else None
            for b in obj.bind
        ])


def _check_static(config: Config, entries: dict[str, _Raw]) -> None:
    """`static` is for WSGI (HTTP or uwsgi), and each url appears once."""
    if config.protocol == "tcp":
        raise entries["static"].fail(
            "static", "static files are served with protocol http or uwsgi, not tcp"
        )
    _check_unique(entries, "static", ".url", "url", [entry.url for entry in config.static])


def _check_unique(
    entries: dict[str, _Raw], key: str, suffix: str, what: str, values: list[str | None]
) -> None:
    """Each of `values` (one per item of the list `key`; None: exempt) appears once: the
    second of two is the error (`key[i]` + `suffix`, as `static[1].url`), naming the first."""
    items = entries[key].value
    seen: dict[str, int] = {}
    for i, value in enumerate(values):
        if value is None:
            continue
        if value in seen:
            raw = items[i] if isinstance(items, list) else entries[key]
            raise raw.fail(
                f"{key}[{i}]{suffix}", f"duplicate {what} {value!r} (same as {key}[{seen[value]}])"
            )
        seen[value] = i


def _check_admin_apart(config: Config, entries: dict[str, _Raw]) -> None:
    """The status endpoint may not take a listener's place: found here with its line, not
    as an EADDRINUSE (or a replaced socket file) once the workers are being started."""
    admin = entries.get("admin")
    fields = admin.value if admin is not None and isinstance(admin.value, dict) else {}
    if config.admin.bind is not None:
        ours = parse_address(config.admin.bind)
        for i, b in enumerate(config.bind):
            if _overlap(ours, parse_address(b.address)):
                raw = fields.get("bind", admin)
                assert raw is not None  # a bind that is not the default was given somewhere
                raise raw.fail("admin.bind", f"{config.admin.bind!r} is bind[{i}]'s "
                               f"{b.address!r}: the status endpoint needs a port of its own")
    socket_path = config.admin.socket or (config.pidfile and config.pidfile + ".sock")
    for i, b in enumerate(config.bind):
        if socket_path and b.address.startswith("unix:") and (
            _socket_file(b.address[5:]) == _socket_file(socket_path)
        ):
            key = "admin.socket" if config.admin.socket else "pidfile"
            raw = fields.get("socket", admin) if config.admin.socket else entries.get("pidfile")
            assert raw is not None
            raise raw.fail(key, f"the status socket {socket_path} is bind[{i}]'s socket file: "
                           "set admin.socket to another path")


def _socket_file(path: str) -> str:
    """The file a unix socket at `path` will be: its directory with symbolic links resolved
    (/var/run is often /run), so two spellings of one file compare equal. Not the whole
    path: the socket files need not exist yet, and bind() never follows a link in the last
    part."""
    directory, name = os.path.split(os.path.normpath(path))
    return os.path.join(os.path.realpath(directory or "."), name)


def _overlap(admin: Address, listener: Address) -> bool:
    """Whether the status endpoint at `admin` and the listener at `listener` would take the
    same TCP port (EADDRINUSE; port 0 never does). The endpoint binds `localhost` as
    127.0.0.1; a listener's `localhost` may be either loopback address. Other host names
    are not resolved."""
    if admin.kind != "tcp" or listener.kind != "tcp" or admin.port != listener.port:
        return False
    if admin.port == 0:
        return False
    ours = ("127.0.0.1",) if admin.host == "localhost" else (admin.host,)
    theirs = ("127.0.0.1", "::1") if listener.host == "localhost" else (listener.host,)
    for x in ours:
        for y in theirs:
            try:
                ip_x, ip_y = ipaddress.ip_address(x), ipaddress.ip_address(y)
            except ValueError:  # a host name
                if x == y:
                    return True
                continue
            # IPv6 sockets are V6ONLY: a wildcard covers its own family alone
            if ip_x.version == ip_y.version and (
                ip_x == ip_y or ip_x.is_unspecified or ip_y.is_unspecified
            ):
                return True
    return False


def _check_tls(tls: TLSConfig, entries: dict[str, _Raw], path: str) -> None:
    """Build the TLS context now, one setting at a time, so that a wrong path, a file that
    is not what its setting says, a key that does not match the certificate or a cipher list
    OpenSSL cannot use stops the start (or the reload) with the line of the setting at
    fault, not a worker."""
    import ssl

    from prefork.tls import context_steps

    for key in ("certificate", "key", "ca"):
        filename = getattr(tls, key)
        if filename is not None and not os.path.isfile(filename) and key in entries:
            raise entries[key].fail(_join(path, key), f"no such file: {filename}")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)  # as tls.server_context makes it
    for setting, step in context_steps(tls):
        try:
            step(context)
        except (OSError, ValueError) as exc:
            key, what = _tls_failure(tls, setting, exc)
            key = key if key in entries else "key"  # `key` is required: always in entries
            raise entries[key].fail(_join(path, key), what) from None


# OpenSSL's reasons for refusing a certificate itself while loading it with its key (too
# weak for its security level): the certificate's fault, not the key's
_WEAK_CERTIFICATE = frozenset({"EE_KEY_TOO_SMALL", "CA_KEY_TOO_SMALL", "CA_MD_TOO_WEAK"})


def _tls_failure(tls: TLSConfig, setting: str, exc: Exception) -> tuple[str, str]:
    """The setting to blame for `exc`, raised by tls.context_steps' step for `setting`,
    and what to say."""
    import ssl

    from prefork.tls import EncryptedKeyError

    reason = str(exc)
    if isinstance(exc, ssl.SSLError) and len(exc.args) == 1:
        reason = str(exc.args[0])  # str() of a one-argument SSLError is its args tuple
    if isinstance(exc, OSError) and exc.filename:  # unreadable (permissions, a directory)
        key = next((k for k in ("certificate", "key", "ca") if getattr(tls, k) == exc.filename),
                   setting)
        return key, f"cannot read {exc.filename}: {exc}"
    if isinstance(exc, EncryptedKeyError):
        return "key", f"cannot use {tls.key}: {reason}"
    if setting == "key" and getattr(exc, "reason", None) == "KEY_VALUES_MISMATCH":
        return "key", f"{tls.key} is not the key of certificate {tls.certificate}: {reason}"
    if setting == "key" and getattr(exc, "reason", None) in _WEAK_CERTIFICATE:
        return "certificate", f"OpenSSL refuses certificate {tls.certificate} as too weak: {reason}"
    if setting == "key":
        return "key", f"cannot load key {tls.key} (PEM) for certificate {tls.certificate}: {reason}"
    if setting == "certificate":
        return "certificate", f"cannot load the certificate (PEM) in {tls.certificate}: {reason}"
    if setting == "ca":
        return "ca", f"cannot load the CA certificates (PEM) in {tls.ca}: {reason}"
    if setting == "ciphers":
        return "ciphers", f"OpenSSL cannot use the cipher list {tls.ciphers!r}: {reason}"
    return setting, f"invalid: {reason}"


def _convert(hint: Any, meta: Mapping[str, Any], raw: _Raw, path: str) -> Any:
    if hint is BindConfig and isinstance(raw.value, str):  # the short form: just the address
        address = dataclasses.fields(BindConfig)[0]
        return BindConfig(address=_convert(str, address.metadata, raw, path))
    if dataclasses.is_dataclass(hint):
        return _build(hint, raw, path)  # type: ignore[arg-type]
    if meta["mapping"]:
        return _convert_mapping(raw, path)
    if typing.get_origin(hint) is tuple:
        return _convert_tuple(typing.get_args(hint)[0], meta, raw, path)
    if typing.get_origin(hint) in (types.UnionType, typing.Union):
        if raw.value is None:
            return None
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
        if dataclasses.is_dataclass(hint):
            return _build(hint, raw, path)  # type: ignore[arg-type]
    value = _convert_scalar(hint, meta, raw, path)
    if meta["choices"]:
        value = value.lower()
        if value not in meta["choices"]:
            raise raw.fail(path, f"must be one of {', '.join(meta['choices'])}, got {_show(raw)}")
    if meta["min"] is not None and not _in_range(value, meta):
        shown = _show(raw)
        if meta["octal"] and raw.text is not None and not isinstance(raw.value, str):
            shown = raw.text  # as written (read as octal), not YAML's decimal value
        elif meta["octal"] and isinstance(raw.value, int):  # a number from Python
            shown += " (write modes in octal, e.g. 0o660)"
        raise raw.fail(path, f"must be {_range_text(meta)}, got {shown}")
    if meta["path"]:
        value = _resolve_path(value, raw, path)
    if meta["check"] is not None:
        try:
            value = meta["check"](value, raw.origin.base_dir)
        except ValueError as e:
            raise raw.fail(path, str(e)) from None
    return value


def _convert_mapping(raw: _Raw, path: str) -> tuple[tuple[str, str], ...]:
    """A mapping of names to scalar values, kept as ((name, text), ...) in file order."""
    if raw.value is None:
        return ()
    if not isinstance(raw.value, dict):
        raise raw.fail(path, f"must be a mapping of names to values, got {_show(raw)}")
    pairs = []
    for key, item in raw.value.items():
        value = item.value
        if isinstance(value, bool):
            text = "true" if value else "false"
        elif isinstance(value, int | float | str):
            text = str(value)
        else:
            raise item.fail(_join(path, key), f"must be a string or a number, got {_show(item)}")
        if "\0" in key or "=" in key or not key or "\0" in text:
            raise item.fail(_join(path, key), "not a valid environment variable")
        pairs.append((key, text))
    return tuple(pairs)


def _convert_tuple(
    item_hint: Any, meta: Mapping[str, Any], raw: _Raw, path: str
) -> tuple[Any, ...]:
    items = raw.value
    if meta["single"] and isinstance(items, str | dict):
        return (_convert(item_hint, meta, raw, path),)
    if not isinstance(items, list):
        raise raw.fail(path, f"must be a list of {_plural(item_hint, meta)}, got {_show(raw)}")
    if meta["nonempty"] and not items:
        raise raw.fail(path, "must not be empty")
    return tuple(_convert(item_hint, meta, item, f"{path}[{i}]") for i, item in enumerate(items))


def _convert_scalar(hint: Any, meta: Mapping[str, Any], raw: _Raw, path: str) -> Any:
    value = raw.value
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise raw.fail(path, f"must be true or false, got {_show(raw)}")
    if hint is int and meta["octal"]:
        return _convert_octal(meta, raw, path)
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise raw.fail(path, f"must be an integer {_range_text(meta)}, got {_show(raw)}")
    if hint is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        raise raw.fail(path, f"must be a number {_range_text(meta)}, got {_show(raw)}")
    if hint is str:
        if isinstance(value, str):
            return value
        if meta["ident"] and isinstance(value, int) and not isinstance(value, bool):
            return str(value)  # user: 1000
        if meta["path"] and isinstance(value, os.PathLike):
            return os.fsdecode(value)
        raise raw.fail(path, f"must be a string, got {_show(raw)}")
    raise TypeError(f"config field {path} has unsupported type {hint!r}")  # a schema bug


_OCTAL_DIGITS = frozenset("01234567")


def _convert_octal(meta: Mapping[str, Any], raw: _Raw, path: str) -> int:
    """A file mode or mask: octal, however it is written.

    A quoted string is read as octal digits ('660', '0660', '0o660'). An unquoted YAML
    integer with a leading 0 (0660, YAML 1.1 octal; also 0x1b0, 0b110110000) already has
    its value; one without (660, 22) is read back from its source text as octal digits,
    since 660 as a decimal mode is never what is meant, and a digit 8 or 9 (or a YAML
    1.1 sexagesimal 1:30) is an error. A number given from Python (``from_mapping``,
    overrides) has no text and is taken as it is.
    """
    value = raw.value
    if isinstance(value, int) and not isinstance(value, bool):
        if raw.text is None:
            return value
        digits = raw.text.strip().replace("_", "")
        sign = digits[0] if digits[:1] in ("+", "-") else ""
        digits = digits.removeprefix(sign)
        if digits.startswith("0"):
            return value
        if not digits or not set(digits) <= _OCTAL_DIGITS:
            raise raw.fail(
                path,
                f"not an octal mode: {raw.text} (modes are read as octal, digits 0-7 only, "
                "e.g. 0640)",
            )
        return int(sign + digits, 8)
    if isinstance(value, str):
        text = value.strip().lower().removeprefix("0o")
        if text and set(text) <= _OCTAL_DIGITS:
            return int(text, 8)
    raise raw.fail(path, f"must be an octal file mode {_range_text(meta)}, got {_show(raw)}")


def _in_range(value: float, meta: Mapping[str, Any]) -> bool:
    lo, hi = meta["min"], meta["max"]
    low_ok = value > lo if meta["min_exclusive"] else value >= lo
    return bool(low_ok and value <= hi)  # NaN fails both comparisons


def _range_text(meta: Mapping[str, Any]) -> str:
    lo, hi = meta["min"], meta["max"]
    if lo is None:
        return ""
    fmt = (lambda v: oct(v) if v else "0") if meta["octal"] else str
    if meta["min_exclusive"]:
        return f"more than {fmt(lo)} and at most {fmt(hi)}"
    return f"from {fmt(lo)} to {fmt(hi)}"


def _resolve_path(value: str, raw: _Raw, path: str) -> str:
    if not value:
        raise raw.fail(path, "must not be empty")
    if "\0" in value:
        raise raw.fail(path, "must not contain a NUL byte")
    if value == "-" or os.path.isabs(value):
        return value
    return os.path.normpath(os.path.join(raw.origin.base_dir, value))


# --- documentation -----------------------------------------------------------------------


def _plural(hint: Any, meta: Mapping[str, Any]) -> str:
    if hint is BindConfig:
        return "addresses"
    if dataclasses.is_dataclass(hint):
        return "mappings"
    return "paths" if meta["path"] else "strings"


def _type_text(hint: Any, meta: Mapping[str, Any]) -> str:
    if meta["mapping"]:
        return "mapping of names to strings"
    if typing.get_origin(hint) is tuple:
        return f"list of {_plural(typing.get_args(hint)[0], meta)}"
    nullable = typing.get_origin(hint) in (types.UnionType, typing.Union)
    if nullable:
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
    if meta["choices"]:
        text = "one of " + ", ".join(meta["choices"])
    elif meta["octal"]:
        text = f"octal file mode {_range_text(meta)}"
    elif meta["ident"]:
        text = "name or numeric id"
    elif hint is int:
        text = f"integer {_range_text(meta)}"
    elif hint is float:
        text = f"number {_range_text(meta)}"
    elif hint is bool:
        text = "true or false"
    else:
        text = "path" if meta["path"] else "string"
    return f"{text.strip()}, or null" if nullable else text.strip()


def _default_text(f: dataclasses.Field[Any]) -> str:
    if f.metadata["mapping"]:
        return "{}"
    if f.default is dataclasses.MISSING:
        return "required"
    return _yaml_text(f.default)


def _yaml_text(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value + '"'
    if isinstance(value, BindConfig):
        return _yaml_text(value.address)
    if isinstance(value, tuple):
        return "[" + ", ".join(_yaml_text(v) for v in value) + "]"
    return repr(value)


def _sections() -> list[tuple[str, str, type, str]]:
    """(title, intro, dataclass, row key prefix) in document order."""
    return [
        ("Top level", "Keys at the top of the file.", Config, ""),
        (
            "`bind` items",
            "Each item of `bind` is an address string, or a mapping with these keys.",
            BindConfig,
            "bind[].",
        ),
        (
            "`bind[].tls`",
            "TLS on a listening socket: `bind: [{address: \"0.0.0.0:443\", tls: {certificate: "
            "cert.pem, key: key.pem}}]`.",
            TLSConfig,
            "bind[].tls.",
        ),
        (
            "`static` items",
            "Each item of `static` maps a url prefix to a directory: `static: [{url: /static/, "
            "path: /app/static, max_age: 3600, gzip: true}]`. A file is answered with "
            "Content-Type (from its extension; text types with charset=utf-8), "
            "Content-Length, Last-Modified, a weak ETag (its modification time and size) "
            "and Accept-Ranges, and sent with os.sendfile (read in blocks on TLS). Access "
            "log, metrics and max_requests count it as any request; a reload applies a "
            "changed list to the new workers.",
            StaticConfig,
            "static[].",
        ),
        (
            "`hooks`",
            "Server hooks, each `module:function`. `server` has `.config`, `.pid`, "
            "`.generation`, `.workers` (a list of worker objects); `worker` has `.number`, "
            "`.pid`, `.generation`, `.config`; both have `.log`, the error log's "
            "logging.Logger (as gunicorn's `server.log` and `worker.log`). A function that "
            "cannot be called with its hook's arguments (below) is an error when the hooks "
            "are loaded (start, reload, `preforkd check`), as in gunicorn. Hooks in the "
            "master must not block.",
            HooksConfig,
            "hooks.",
        ),
        (
            "`workers`",
            "Worker processes: how many, when they are recycled and killed.",
            WorkersConfig,
            "workers.",
        ),
        ("`http`", "HTTP/1.1 limits and timeouts (`protocol: http`; with `protocol: uwsgi` "
         "too, but for keep-alive, the forwarding headers and `proxy_protocol`: the limits "
         "apply to the packet's variables, `uwsgi_allow_ips` is its own; `proxy_protocol` and "
         "`forwarded_allow_ips` apply to `protocol: tcp` too).",
         HttpConfig, "http."),
        (
            "`stream`",
            "Stream handler connections (`protocol: tcp` only).",
            StreamConfig,
            "stream.",
        ),
        ("`logging`", "The error and access logs.", LoggingConfig, "logging."),
        (
            "`logging.syslog`",
            "Sending the logs to a syslog daemon.",
            SyslogConfig,
            "logging.syslog.",
        ),
        (
            "`admin`",
            "The master's status endpoint: `/status` (JSON), `/metrics` (Prometheus text), "
            "`/ready` (200 while a worker of the serving generation is ready, else 503), "
            "`/live` (200 while the master's loop answers); `preforkd status -c FILE` reads it. "
            # every family metrics_text exports, for dashboards and alerts: the names were
            # nowhere but in the code (a test compares this list with a live /metrics)
            "The metric families of `/metrics`: `preforkd_requests_total{class}` (responses "
            "by status class, the server's own error answers included), "
            "`preforkd_request_duration_seconds` (histogram), "
            "`preforkd_response_body_bytes_total`, `preforkd_workers{state}`, "
            "`preforkd_worker_recycles_total{reason}`, `preforkd_worker_restarts_total`, "
            "`preforkd_worker_boot_failures_total`, `preforkd_connections_handed_over_total`, "
            "`preforkd_connections_balanced_total`, `preforkd_connections_relieved_total`, "
            "`preforkd_reloads_total{result}`, `preforkd_listen_queue{listener}`, "
            "`preforkd_listen_queue_limit{listener}`, `preforkd_listen_queue_full_total{listener}` "
            "(a listener whose queue the kernel does not report has none of these three), "
            "`preforkd_degraded`, `preforkd_generation`, "
            "`preforkd_worker_memory_uss_bytes{worker,pid}` "
            "(`preforkd_worker_memory_rss_bytes` for a worker whose USS cannot be read), "
            "`preforkd_worker_connections{worker,pid}`, `preforkd_start_time_seconds`.",
            AdminConfig,
            "admin.",
        ),
        (
            "`statsd`",
            "Metrics to a statsd daemon (statsd, DogStatsD, Telegraf), sent by the master every "
            "`interval`: counters (`requests`, `requests.2xx`, `response_bytes`, "
            "`workers.recycled.REASON`, `workers.restarts`, `reloads.ok`, "
            "`listen_queue.full`, ...) as their increase since the last send, gauges "
            "(`workers`, `workers.STATE`, `listen_queue`, `request.duration_avg_ms`, "
            "`degraded`, `generation`) as their value.",
            StatsdConfig,
            "statsd.",
        ),
    ]


def _rows(cls: type, prefix: str) -> list[tuple[str, str, str, str]]:
    hints = typing.get_type_hints(cls)
    return [
        (
            prefix + f.name,
            _type_text(hints[f.name], f.metadata),
            _default_text(f),
            f.metadata["doc"],
        )
        for f in _settable(cls).values()
        if not _is_section_hint(hints[f.name])
    ]


def _is_section_hint(hint: Any) -> bool:
    if typing.get_origin(hint) in (types.UnionType, typing.Union):
        return any(dataclasses.is_dataclass(a) for a in typing.get_args(hint))
    return dataclasses.is_dataclass(hint)


def field_docs() -> list[tuple[str, str, str, str]]:
    """(dotted key, type text, default text, doc) for every setting, in document order."""
    return [row for _, _, cls, prefix in _sections() for row in _rows(cls, prefix)]


def settings_markdown() -> str:
    """The text of docs/settings.md."""
    out = [
        "# Settings",
        "",
        "<!-- Generated from prefork/config.py by `make docs`; do not edit by hand. -->",
        "",
        "preforkd reads one YAML file (`preforkd -c FILE`). Every key below is optional "
        "except `app`; unknown keys are errors. Relative paths in the file are resolved "
        "against the file's directory, relative paths given on the command line against the "
        "working directory. Times are in seconds.",
        "",
    ]
    for title, intro, cls, prefix in _sections():
        out += [f"## {title}", "", intro, ""]
        out += ["| Key | Type | Default | Description |", "|---|---|---|---|"]
        for name, type_text, default, doc in _rows(cls, prefix):
            shown = default if default == "required" else f"`{default}`"
            cells = (f"`{name}`", type_text, shown, doc)
            out.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
        out.append("")
    out += [
        "## Addresses",
        "",
        "| Written | Means |",
        "|---|---|",
        "| `HOST:PORT` | TCP on an IPv4 address or host name (not resolved until bind) |",
        "| `[V6]:PORT` | TCP on an IPv6 address, e.g. `[::1]:8000`, `[::]:8000` |",
        "| `*:PORT`, `:PORT` | TCP on all IPv4 addresses (`0.0.0.0`) |",
        "| `PORT` | TCP on `127.0.0.1` only |",
        "| `unix:PATH` | a unix socket; a relative PATH is resolved like other paths |",
        "",
        "PORT 0 lets the kernel pick a free port.",
        "",
    ]
    return "\n".join(out)


if __name__ == "__main__":
    print(settings_markdown(), end="")
