"""The `req` and `resp` arguments of the per-request hooks: what a gunicorn hook reads from
its Request and Response, over what preforkd already holds for the request.

Invariants: built only when a pre_request or post_request hook is configured (a server
without them builds neither); nothing is copied up front, and the header lists are made
the first time a hook reads them. The environ stays the plain dict the application gets
(PEP 3333): HookRequest is a view of it, and its writes go to that dict.
"""

from __future__ import annotations

from collections.abc import Iterator, MutableMapping
from typing import Any

from prefork.connection import Connection
from prefork.http import Request
from prefork.http.response import status_line
from prefork.wsgi import Response


class HookRequest(MutableMapping[str, Any]):
    """pre_request's `req` (and gunicorn's post_request's): a mutable mapping over the
    request's WSGI environ, as preforkd documents (`req["PATH_INFO"]`, and a write is what
    the application then finds), with the attributes of gunicorn's http.message.Request
    (`req.method`, `req.path`, `req.headers`, ...), so hooks written for either run as they
    are. Attributes a hook sets on it (`req.started = time.time()`) stay for the same
    request's post_request, as on gunicorn's object."""

    # __dict__: gunicorn's Request is a plain object, on which hooks keep their own values
    __slots__ = ("_env", "_request", "_peer", "_number", "_headers", "__dict__")

    def __init__(self, env: dict[str, Any], request: Request, conn: Connection) -> None:
        self._env = env
        self._request = request
        self._peer = conn.peer
        self._number = conn.served
        self._headers: list[tuple[str, str]] | None = None

    # --- the mapping: the environ itself ---------------------------------------------------

    def __getitem__(self, key: str) -> Any:
        return self._env[key]

    def __setitem__(self, key: str, value: Any) -> None:
        self._env[key] = value

    def __delitem__(self, key: str) -> None:
        del self._env[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._env)

    def __len__(self) -> int:
        return len(self._env)

    def __contains__(self, key: object) -> bool:
        return key in self._env  # the dict's own test, not Mapping's try/except

    def get(self, key: str, default: Any = None) -> Any:
        return self._env.get(key, default)

    def copy(self) -> dict[str, Any]:
        """A plain dict copy of the environ, as `environ.copy()` gave when hooks got it."""
        return self._env.copy()

    def __repr__(self) -> str:
        return f"<HookRequest {self.method} {self.uri}>"

    # --- gunicorn's Request ----------------------------------------------------------------

    @property
    def method(self) -> str:
        return self._request.method

    @property
    def uri(self) -> str:
        """The request-target as sent (gunicorn's `uri`; the environ's RAW_URI)."""
        return self._request.target.decode("latin-1")

    @property
    def path(self) -> str:
        """The target's path, not percent-decoded (PATH_INFO is decoded)."""
        return self._request.path.decode("latin-1")

    @property
    def query(self) -> str:
        return self._request.query.decode("latin-1")

    @property
    def fragment(self) -> str:
        """What followed a `#` in the target (clients do not send one: "")."""
        return self._request.target.partition(b"#")[2].decode("latin-1")

    @property
    def version(self) -> tuple[int, int]:
        """(1, 1) for HTTP/1.1: the version the client sent (SERVER_PROTOCOL: with
        protocol uwsgi, the one the proxy says its client sent)."""
        _, _, number = str(self._env.get("SERVER_PROTOCOL", "")).partition("/")
        major, _, minor = number.partition(".")
        try:
            return int(major), int(minor or 0)
        except ValueError:  # a SERVER_PROTOCOL the application rewrote
            return 1, 0

    @property
    def headers(self) -> list[tuple[str, str]]:
        """The request's header fields, (NAME, value) with the name in upper case, in the
        order sent, as gunicorn gives them; names containing `_` are left out, as gunicorn
        (header_map = drop) and preforkd's environ do. A copy: changing it changes nothing
        the application sees (write the environ's HTTP_* keys for that)."""
        if self._headers is None:
            self._headers = [
                (name.decode("latin-1").upper(), value.decode("latin-1"))
                for name, value in self._request.headers
                if b"_" not in name
            ]
        return self._headers

    @property
    def scheme(self) -> str:
        """"http" or "https", as the environ's wsgi.url_scheme (a trusted proxy's
        X-Forwarded-Proto counted, as gunicorn's secure_scheme_headers)."""
        scheme: str = self._env["wsgi.url_scheme"]
        return scheme

    @property
    def peer_addr(self) -> Any:
        """The connection's peer as accept() gave it ((host, port) over TCP), or the
        PROXY protocol header's source."""
        return self._peer

    @property
    def remote_addr(self) -> Any:
        """As peer_addr (gunicorn's differs from it only under the PROXY protocol, where
        preforkd's peer_addr is already the header's source)."""
        return self._peer

    @property
    def req_number(self) -> int:
        """1 for the first request on its connection, 2 for the next (keep-alive)."""
        return self._number

    def should_close(self) -> bool:
        """True if the client asked for the connection to close after this request."""
        return not self._request.keep_alive


class HookResponse:
    """The `resp` of gunicorn's post_request(worker, req, environ, resp): what went out for
    the request, named as on gunicorn's http.wsgi.Response."""

    __slots__ = ("status", "status_code", "sent", "response_length", "headers_sent",
                 "chunked", "_lines", "_headers", "__dict__")

    def __init__(self, response: Response) -> None:
        code = response.status_code
        # the application's status line, or the server's when an error page replaced it
        self.status: str | None = (
            response.status.decode("latin-1") if response.status and response.head_sent
            else status_line(code) if code else None
        )
        self.status_code: int | None = code or None
        self.sent: int = response.bytes_sent  # body bytes sent, as gunicorn's `sent`
        self.response_length: int | None = response.content_length  # the app's Content-Length
        self.headers_sent: bool = response.head_sent
        self.chunked: bool = response.chunked
        # the application's header lines as they went out, if they did (not an error page's)
        self._lines = response.headers if response.head_sent else b""
        self._headers: list[tuple[str, str]] | None = None

    @property
    def headers(self) -> list[tuple[str, str]]:
        """The application's response headers as sent, (Name, value) as it gave them, but
        for the hop-by-hop ones the server handles (Connection, Transfer-Encoding, ...);
        [] when the server answered with an error page instead."""
        if self._headers is None:
            self._headers = []
            for line in self._lines.decode("latin-1").split("\r\n"):
                if line:
                    name, _, value = line.partition(": ")
                    self._headers.append((name, value))
        return self._headers

    def __repr__(self) -> str:
        return f"<HookResponse {self.status}>"
