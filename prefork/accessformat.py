"""Custom access-log formats with gunicorn's atoms (`%(h)s "%(r)s" %({x-id}i)s ...`).

Invariants: a format string is parsed only by `compile_format`, once (at config load and when
Logs is built), into a %-template and one getter per atom; a line is then one tuple of getter
calls and one `%`. Every text value is escaped (`"`, `\\`, and control characters as \\xHH),
so a line stays one line whatever a client, the application or the environ put in it; a
missing or empty value is "-". No I/O.
"""

from __future__ import annotations

import base64
import os
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

BUILTIN_FORMATS = ("combined", "json")


class AccessRecord(NamedTuple):
    """What one access-log line may say. `environ` is None where no WSGI environ exists (a
    response the server made itself, a TCP stream connection); `headers` are the
    application's response header lines as sent (`Name: value\\r\\n`...), None when the
    format does not log them or the application's head never went out."""

    remote: str
    method: str
    target: str
    protocol: str
    status: int
    size: int
    referer: str
    user_agent: str
    duration: float
    environ: Mapping[str, Any] | None = None
    headers: bytes | None = None


Getter = Callable[[AccessRecord], str]

# Everything that could end or garble a line (C0, DEL, C1 -- U+0085 is a line break to
# str.splitlines -- and the Unicode line and paragraph separators), and the quote and
# backslash that the combined format escapes too.
_SPECIAL = re.compile('["\\\\\x00-\x1f\x7f-\x9f\u2028\u2029]')
# %% or %(NAME)C; a lone % is found by the loop in compile_format
_DIRECTIVE = re.compile(r"%(?:%|\((?P<name>[^)]*)\)(?P<conv>.?))?", re.DOTALL)
_KEYED = re.compile(r"\{(?P<key>[^{}]+)\}(?P<kind>[ioe])")
# RFC 9110 token: a header name
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
KNOWN_ATOMS = "h l u t r m U q H s B b f a T M D L p {header}i {header}o {variable}e"
# uWSGI's logformat variables (written %(addr), without the s) and the atom that says the
# same here, so that a logformat carried over from uWSGI gets a translation, not a hint to
# write %(addr)s, which is no atom either; "" where preforkd logs nothing like it.
_UWSGI_VARIABLES = {
    "addr": "%(h)s", "user": "%(u)s", "ltime": "%(t)s", "ctime": "%(t)s",
    "method": "%(m)s", "uri": "%({REQUEST_URI}e)s", "proto": "%(H)s", "status": "%(s)s",
    "size": "%(B)s", "rsize": "%(B)s", "referer": "%(f)s", "uagent": "%(a)s",
    "host": "%({host}i)s", "cl": "%({content-length}i)s", "secs": "%(L)s",
    "msecs": "%(M)s", "micros": "%(D)s", "pid": "%(p)s",
    "wid": "", "core": "", "time": "", "epoch": "", "ftime": "", "tmsecs": "",
    "tmicros": "", "hsize": "", "pktsize": "", "modifier1": "", "headers": "",
    "switches": "", "vars": "", "rss": "", "vsz": "", "rssM": "", "vszM": "",
}


# %(NAME) as uWSGI writes its variables (not followed by the s of a gunicorn atom), with
# the brackets around a time (`t` has its own)
_UWSGI_DIRECTIVE = re.compile(r"(\[?)%\(([^)]*)\)(?!s)(\]?)")


def _uwsgi_atom(name: str) -> str | None:
    """The atom for uWSGI logformat variable `name` ("" if none says the same); None if
    `name` is not one. No uWSGI name is a gunicorn atom (one letter, or {key}i/o/e)."""
    if name.startswith("var.") and len(name) > 4:
        return f"%({{{name[4:]}}}e)s"
    return _UWSGI_VARIABLES.get(name)


def uwsgi_format(source: str) -> ValueError | None:
    """The error for a format written with uWSGI's logformat variables: it names them and
    gives the whole format in gunicorn's atoms, ready to paste; None for any other format."""
    used: list[str] = []
    missing: list[str] = []

    def swap(match: re.Match[str]) -> str:
        before, name, after = match.groups()
        atom = _uwsgi_atom(name)
        if atom is None:
            return match.group()
        used.append(f"%({name})")
        if not atom:
            missing.append(f"%({name})")
            return before + "-" + after
        if atom == "%(t)s" and before and after:
            return atom  # [21/Nov/2026:13:05:02 +0000], brackets included
        return before + atom + after

    translated = _UWSGI_DIRECTIVE.sub(swap, source)
    if not used:
        return None
    names = list(dict.fromkeys(used))
    what = "is a uWSGI logformat variable" if len(names) == 1 else "are uWSGI logformat variables"
    return _translated(f"{', '.join(names)} {what}", translated, missing)


def _translated(subject: str, translated: str, missing: list[str]) -> ValueError:
    """The error for a format in another server's notation (`subject` says which): the
    whole of it in atoms (`translated`), and what had none (`missing`, written - there)."""
    gaps = (f" ({', '.join(dict.fromkeys(missing))}: no atom says that, written - there)"
            if missing else "")
    return ValueError(
        f"{subject}; preforkd takes gunicorn's atoms, %(NAME)s: in those, {translated!r}{gaps}"
    )


# Apache's LogFormat directives (mod_log_config) and the atom that says the same here, so
# that a LogFormat carried over from an Apache (mod_wsgi) site gets a translation instead of
# "a lone '%'"; "" where preforkd logs nothing like it. %q has no leading "?" here.
_APACHE_DIRECTIVES = {
    "h": "%(h)s", "a": "%(h)s", "l": "%(l)s", "u": "%(u)s", "t": "%(t)s", "r": "%(r)s",
    "s": "%(s)s", "b": "%(b)s", "B": "%(B)s", "D": "%(D)s", "T": "%(T)s", "m": "%(m)s",
    "U": "%(U)s", "q": "%(q)s", "H": "%(H)s", "P": "%(p)s",
    "A": "", "p": "", "v": "", "V": "", "X": "", "I": "", "O": "", "S": "", "k": "",
    "L": "", "R": "", "f": "",
}
# Apache's %{ms}T and %{us}T (2.4.13+); its other %{...}T and %{...}t have no atom
_APACHE_TIMES = {"ms": "%(M)s", "us": "%(D)s", "s": "%(T)s"}
# %[<>][!]NNN,NNN{key}X: Apache's directive, with its optional modifiers (the first or last
# status of an internal redirect, the statuses it is logged for) and key
_APACHE_DIRECTIVE = re.compile(
    r"%(?P<mods>[<>]?!?(?:\d{3}(?:,\d{3})*)?[<>]?)(?:\{(?P<key>[^{}]*)\})?(?P<letter>[A-Za-z])"
)


def _apache_atom(key: str | None, letter: str) -> str | None:
    """The atom for Apache LogFormat directive %{key}letter ("" if none says the same);
    None if it is not one."""
    if key is not None:
        if letter in "ioe" and key:
            return f"%({{{key}}}{letter})s"
        if letter == "T":
            return _APACHE_TIMES.get(key, "")
        if letter in "atCnp^":
            return ""  # %{c}a, %{format}t, a cookie, a note, %{remote}p: nothing alike
        return None
    return _APACHE_DIRECTIVES.get(letter)


def apache_format(source: str) -> ValueError | None:
    """The error for a format written with Apache's LogFormat directives (%h %>s
    %{Referer}i, or the nickname `common`): it gives the whole format in gunicorn's atoms,
    ready to paste; None for any other format. A format with no directive of Apache's, or
    with gunicorn's %(NAME)s atoms only, is not one."""
    given = source
    if source.strip().lower() == "common":
        source = '%h %l %u %t "%r" %>s %b'
        what = "Apache's nickname for '%h %l %u %t \"%r\" %>s %b'"
    else:
        what = "written with Apache LogFormat directives"
    missing: list[str] = []
    found = False

    def swap(match: re.Match[str]) -> str:
        nonlocal found
        atom = _apache_atom(match.group("key"), match.group("letter"))
        if atom is None:
            return match.group()
        found = True
        if not atom:
            missing.append(match.group())
            return "-"
        return atom

    # what is not %(NAME)s, %% or a directive stays as written; Apache's config file writes
    # a quote inside its quoted format as \", which YAML's single quotes keep as it is
    pieces = re.split(r"(%\([^)]*\)s|%%)", source)
    translated = "".join(
        piece if index % 2 else _APACHE_DIRECTIVE.sub(swap, piece)
        for index, piece in enumerate(pieces)
    ).replace('\\"', '"')
    if not found:
        return None
    return _translated(f"{given!r} is {what}", translated, missing)


def _escape_one(match: re.Match[str]) -> str:
    char = match.group()
    if char in '"\\':
        return "\\" + char
    code = ord(char)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def escape(value: str) -> str:
    """`value` as one log field: "-" if empty, special characters escaped."""
    if not value:
        return "-"
    if _SPECIAL.search(value) is None:
        return value
    return _SPECIAL.sub(_escape_one, value)


def _text(value: object) -> str:
    """An environ value as text; anything the application stored there may be logged."""
    if type(value) is str:
        return value
    try:
        return str(value)
    except Exception:  # a broken __str__ must not take the request loop down with it
        return ""


def _user(record: AccessRecord) -> str:
    """REMOTE_USER (set by the application or a middleware), else the Basic auth user name."""
    env = record.environ
    if env is None:
        return "-"
    user = env.get("REMOTE_USER")
    if user:
        return escape(_text(user))
    auth = env.get("HTTP_AUTHORIZATION")
    if not auth or type(auth) is not str:
        return "-"
    scheme, _, credentials = auth.partition(" ")
    if scheme.lower() != "basic":
        return "-"
    try:
        decoded = base64.b64decode(credentials.strip(), validate=True)
        return escape(decoded.partition(b":")[0].decode("utf-8"))
    except ValueError:  # binascii.Error, UnicodeDecodeError, non-ASCII text
        return "-"


def _path(record: AccessRecord) -> str:
    env = record.environ
    if env is None:
        return escape(record.target.partition("?")[0])
    return escape(_text(env.get("PATH_INFO", "")))


def _query(record: AccessRecord) -> str:
    env = record.environ
    if env is None:
        return escape(record.target.partition("?")[2])
    return escape(_text(env.get("QUERY_STRING", "")))


_SIMPLE: dict[str, Getter] = {
    "h": lambda r: escape(r.remote),
    "l": lambda r: "-",
    "u": _user,
    "r": lambda r: escape(f"{r.method} {r.target} {r.protocol}"),
    "m": lambda r: escape(r.method),
    "U": _path,
    "q": _query,
    "H": lambda r: escape(r.protocol),
    "s": lambda r: str(r.status),
    "B": lambda r: str(r.size),
    "b": lambda r: str(r.size) if r.size else "-",
    "f": lambda r: escape(r.referer),
    "a": lambda r: escape(r.user_agent),
    "T": lambda r: str(int(r.duration)),
    "M": lambda r: str(int(r.duration * 1_000)),
    "D": lambda r: str(int(r.duration * 1_000_000)),
    "L": lambda r: f"{r.duration:.6f}",
    # at each line, not at compile time: the format is compiled in the master
    "p": lambda r: f"<{os.getpid()}>",
}


def _environ_getter(keys: tuple[str, ...]) -> Getter:
    """The first of `keys` present in the environ; "-" without one."""

    def get(record: AccessRecord) -> str:
        env = record.environ
        if env is None:
            return "-"
        for key in keys:
            value = env.get(key)
            if value is not None:
                return escape(_text(value))
        return "-"

    return get


def _request_header(name: str) -> Getter:
    """Request header `name` as the application saw it: its environ key (as
    wsgi.environ_key makes it), repeats joined with ", "."""
    if "_" in name:
        raise ValueError(
            f"%({{{name}}}i)s can never have a value: request headers whose name has '_' "
            "are dropped (a client could spoof a proxy's header with them)"
        )
    key = name.upper().replace("-", "_")
    if key not in ("CONTENT_TYPE", "CONTENT_LENGTH"):
        key = "HTTP_" + key
    return _environ_getter((key,))


def _environ_variable(name: str) -> Getter:
    # gunicorn matches environ keys case-insensitively; the key as written, then in upper
    # case (CGI keys) and lower case (wsgi.*) covers every key a server or framework sets
    keys = tuple(dict.fromkeys((name, name.upper(), name.lower())))
    return _environ_getter(keys)


def _response_header(name: str) -> Getter:
    wanted = name.lower().encode("latin-1")

    def get(record: AccessRecord) -> str:
        headers = record.headers
        if not headers:
            return "-"
        values = []
        for line in headers.split(b"\r\n"):
            field, _, value = line.partition(b":")
            if field.lower() == wanted:
                values.append(value.strip().decode("latin-1"))
        return escape(", ".join(values)) if values else "-"

    return get


def _keyed(name: str) -> tuple[Getter, bool] | None:
    """The getter for `{key}i`, `{key}o` or `{key}e`, and whether it reads response
    headers; None if `name` is not of that shape."""
    match = _KEYED.fullmatch(name)
    if match is None:
        return None
    key, kind = match.group("key"), match.group("kind")
    if kind == "e":
        return _environ_variable(key), False
    if not _TOKEN.fullmatch(key):
        raise ValueError(f"%({name})s: {key!r} is not a header name")
    if kind == "i":
        return _request_header(key), False
    return _response_header(key), True


class ApacheClock:
    """The time as Apache's logs give it, `21/Nov/2026:13:05:02 +0000`, formatted once a
    second: the combined format's and the `t` atom's."""

    __slots__ = ("_second", "_text")

    def __init__(self) -> None:
        self._second = -1
        self._text = ""

    def __call__(self) -> str:
        now = int(time.time())
        if now != self._second:
            self._second = now
            self._text = time.strftime("%d/%b/%Y:%H:%M:%S %z", time.localtime(now))
        return self._text


class IsoClock:
    """ISO 8601 local time with milliseconds and UTC offset, as JSON lines carry it
    (`2026-11-21T13:05:02.123+00:00`); all but the milliseconds made once a second."""

    __slots__ = ("_second", "_stamp", "_offset")

    def __init__(self) -> None:
        self._second = -1
        self._stamp = ""
        self._offset = ""

    def __call__(self, now: float | None = None) -> str:
        """The time `now` (time.time(); the present if None)."""
        if now is None:
            now = time.time()
        second = int(now)
        if second != self._second:
            self._second = second
            local = time.localtime(second)
            self._stamp = time.strftime("%Y-%m-%dT%H:%M:%S", local)
            offset = local.tm_gmtoff
            sign = "-" if offset < 0 else "+"
            hours, minutes = divmod(abs(offset) // 60, 60)
            self._offset = f"{sign}{hours:02d}:{minutes:02d}"
        return f"{self._stamp}.{int((now - second) * 1000):03d}{self._offset}"


def _stamp() -> Getter:
    """The `t` atom: `[21/Nov/2026:13:05:02 +0000]`."""
    clock = ApacheClock()
    return lambda record: f"[{clock()}]"


@dataclass(frozen=True, slots=True)
class AccessFormat:
    """A compiled custom format: `render(record)` is the line (without its newline)."""

    source: str
    template: str  # the literal text, with %s for each atom
    getters: tuple[Getter, ...]
    # whether an atom is a response header: only then does the server hand them over
    response_headers: bool

    def render(self, record: AccessRecord) -> str:
        return self.template % tuple([get(record) for get in self.getters])


def compile_format(source: str) -> AccessFormat:
    """Compile a gunicorn-style format; ValueError saying what is wrong (and where)."""
    bad = next((c for c in source if c != "\t" and not c.isprintable()), None)
    if bad is not None:
        raise ValueError(
            f"must not contain control characters (tab aside), got {bad!r} in {source!r}"
        )
    uwsgi = uwsgi_format(source)
    if uwsgi is not None:  # before any other error, which would only hint at half of it
        raise uwsgi
    apache = apache_format(source)
    if apache is not None:  # before "a lone '%'", which says nothing of the atoms to use
        raise apache
    template: list[str] = []
    getters: list[Getter] = []
    headers = False
    position = 0
    for match in _DIRECTIVE.finditer(source):
        template.append(source[position : match.start()])
        position = match.end()
        directive, name, conv = match.group(), match.group("name"), match.group("conv")
        column = match.start() + 1
        if directive == "%%":
            template.append("%%")
            continue
        if name is None:
            if source.startswith("%(", match.start()):
                raise ValueError(f"unclosed '%(' at column {column} of {source!r}")
            raise ValueError(
                f"a lone '%' at column {column} of {source!r}: write %% for a literal %, "
                "%(NAME)s for an atom"
            )
        if conv != "s":
            got = f"%({name}){conv}" if conv else f"%({name}) at the end"
            raise ValueError(f"{got}: atoms are written %({name})s (column {column})")
        getter = _stamp() if name == "t" else _SIMPLE.get(name)
        if getter is None:
            keyed = _keyed(name)
            if keyed is None:
                atom = _uwsgi_atom(name)
                alias = f" (uWSGI's %({name}) is {atom} here)" if atom else ""
                raise ValueError(
                    f"unknown atom %({name})s{alias}; the atoms are {KNOWN_ATOMS}"
                )
            getter, reads_headers = keyed
            headers = headers or reads_headers
        template.append("%s")
        getters.append(getter)
    template.append(source[position:])
    if not getters:
        raise ValueError(
            f"must be {', '.join(BUILTIN_FORMATS)}, or a format with gunicorn's %(NAME)s "
            f"atoms ({KNOWN_ATOMS}), got {source!r}"
        )
    return AccessFormat(source, "".join(template), tuple(getters), headers)
