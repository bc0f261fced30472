"""Serve the requests that have arrived on one HTTP connection (worker side).

Invariants: a rejected request gets its 4xx/5xx and the connection is closed, so nothing
after it is read as a request; an application error never escapes into the worker loop; the
scoreboard slot says BUSY exactly while a request is being answered.
"""

from __future__ import annotations

import logging
import math
import sys
import time
from collections.abc import Iterable
from typing import Any, NamedTuple

from prefork import __version__
from prefork.config import StaticConfig
from prefork.connection import ClientDisconnected, ClientTimeout, Connection, RequestTooLong
from prefork.forwarded import TrustedProxies
from prefork.hookargs import HookRequest, HookResponse
from prefork.hooks import HOOK_ARGUMENTS, Hooks
from prefork.http import Parser, ProtocolError, Request
from prefork.http.parser import UWSGI_PROTOCOL
from prefork.http.response import DateCache, error_response
from prefork.logs import Logs
from prefork.scoreboard import Activity, Slot
from prefork.sockets import Listener
from prefork.static import StaticFiles
from prefork.wsgi import (
    DRAIN_LIMIT,
    ENVIRON_KEYS,
    ErrorsToLog,
    FileWrapper,
    HeadCache,
    Input,
    Response,
    StartResponse,
    WSGIApp,
    decode_path,
    drainable,
    environ_key,
    run_app,
)

log = logging.getLogger("prefork")

# How long reading and discarding an unread body (at most wsgi.DRAIN_LIMIT bytes) may take
# in all before the connection is closed instead.
DRAIN_TIME = 1.0
# How long an error response waits for the client to stop sending before the close.
ERROR_LINGER = 1.0
# A request waiting on its client gives up this long (at most half of workers.timeout) before
# the master would find the worker hung: the master checks about once a second.
CLIENT_WAIT_MARGIN = 1.0
# At most one warning this often (per worker) about requests in the uwsgi protocol.
UWSGI_WARN_INTERVAL = 60.0
# SERVER_PROTOCOL: what the client sent (PEP 3333); a higher 1.x is served as 1.1
_PROTOCOLS = {"1.1": "HTTP/1.1", "1.0": "HTTP/1.0"}


def _scheme_port(env: dict[str, Any]) -> str:
    """The default port of the request's scheme, for a Host that names none."""
    return "443" if env["wsgi.url_scheme"] == "https" else "80"


# Set by environ() on a request outside http.script_name, which mounted() answers with 400.
OUTSIDE_SCRIPT_NAME = "preforkd.outside_script_name"


class ListenerExtras(NamedTuple):
    """What a request on a listener needs beyond its base environ and the plain path: any of
    these, and environ() takes the slower path (HttpProtocol.listener_keys)."""

    unix: bool  # SERVER_NAME and SERVER_PORT come from the Host header
    tls: bool  # the connection's SSL_* keys
    mount: str  # http.script_name, stripped from PATH_INFO


def base_environ(
    listener: Listener, script_name: str = "", tls: bool = False, errors: ErrorsToLog | None = None
) -> dict[str, Any]:
    """The environ keys that are the same for every request on `listener` (served with TLS
    by this worker's generation: `tls`); wsgi.errors is `errors`, or else sys.stderr (fd 2,
    the error log file)."""
    address = listener.address
    if address.kind == "unix":
        # a request that names no Host (HTTP/1.0) on a socket without a port: the scheme's
        # default port, as gunicorn gives (with 0, URLs built from the environ had ":0")
        server_name, server_port = "localhost", "443" if tls else "80"
    else:
        server_name, server_port = address.host, str(address.port)
    environ = {
        "wsgi.version": (1, 0),
        "wsgi.url_scheme": "https" if tls else "http",
        "wsgi.errors": sys.stderr if errors is None else errors,
        "wsgi.multithread": False,
        "wsgi.multiprocess": True,
        "wsgi.run_once": False,
        # wsgi.input returns b"" at the end of the body, chunked or not: frameworks may read
        # to the end without CONTENT_LENGTH (Werkzeug, Django honour this key)
        "wsgi.input_terminated": True,
        "wsgi.file_wrapper": FileWrapper,
        "SERVER_SOFTWARE": f"preforkd/{__version__}",
        "SCRIPT_NAME": script_name,
        "SERVER_NAME": server_name,
        "SERVER_PORT": server_port,
        "REMOTE_ADDR": "",
    }
    if tls:
        environ["HTTPS"] = "on"
    return environ


def mounted(app: WSGIApp) -> WSGIApp:
    """`app` behind http.script_name: a request outside it (environ() marks it) is answered
    400 without calling the application, as gunicorn does."""

    def guarded(environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        if environ.pop(OUTSIDE_SCRIPT_NAME, False):
            raise ProtocolError(400, "the request path is outside http.script_name")
        return app(environ, start_response)

    return guarded


def remote_of(peer: object) -> tuple[str, str]:
    if isinstance(peer, tuple) and len(peer) >= 2:
        return str(peer[0]), str(peer[1])
    return "", ""  # a unix socket peer has no address


class RejectedHead(NamedTuple):
    """What the access log can say about a rejected request: "-" for an unknown method or
    target, "" for an unknown version (logged as protocol "-", not as a made-up HTTP/1.1)."""

    method: str = "-"
    target: str = "-"
    version: str = ""
    referer: str = ""
    user_agent: str = ""


def _field(headers: list[tuple[bytes, bytes]], name: bytes) -> str:
    """Header `name` (lower-case) as the environ would have it: repeats joined with ", "."""
    return ", ".join(v.decode("latin-1") for k, v in headers if k.lower() == name)


def rejected_head(parser: Parser) -> RejectedHead:
    """What the access log says of a request the parser rejected (RequestParser.head_so_far):
    its method, target, version, referer and user agent as far as they were read."""
    head = parser.head_so_far()
    if head is None:
        return RejectedHead()
    method, target, version, headers = head
    return RejectedHead(
        method or "-",
        target.decode("latin-1") or "-",
        version,
        _field(headers, b"referer"),
        _field(headers, b"user-agent"),
    )


class HttpProtocol:
    """The HTTP side of a worker: everything about a request except waiting for one."""

    def __init__(
        self,
        app: WSGIApp,
        slot: Slot,
        logs: Logs,
        worker_number: int,
        *,
        body_timeout: float,
        body_min_rate: int = 0,
        send_timeout: float,
        request_timeout: float = math.inf,
        server_header: str,
        proxies: TrustedProxies | None = None,
        hooks: Hooks | None = None,
        worker_info: object = None,
        script_name: str = "",
        access_log_skip: tuple[str, ...] = (),
        tls_fds: Iterable[int] = (),
        static: Iterable[StaticConfig] = (),
    ) -> None:
        self.proxies = proxies
        # the `static` entries; None without any, so a request pays one test for them
        static = tuple(static)
        self.static = StaticFiles(static) if static else None
        # the listeners this generation serves with TLS (by fd: Listener.tls is the master's
        # latest configuration's, which a reload changes before it is known to succeed)
        self.tls_fds = frozenset(tls_fds)
        # logging.access_log_skip: exact paths, and prefixes (given with a trailing *)
        skip = [path.encode("ascii") for path in access_log_skip]
        self.skip_paths = frozenset(p for p in skip if not p.endswith(b"*"))
        self.skip_prefixes = tuple(p[:-1] for p in skip if p.endswith(b"*"))
        self.skipping = bool(skip)  # tested first: without a list, nothing per request
        self.script_name = script_name
        self.pre_request = hooks.get("pre_request") if hooks is not None else None
        self.post_request = hooks.get("post_request") if hooks is not None else None
        # gunicorn's post_request(worker, req, environ, resp), told by its signature
        self.gunicorn_post_request = (
            self.post_request is not None and hooks is not None
            and hooks.forms["post_request"] != HOOK_ARGUMENTS["post_request"]
        )
        self.hooks = hooks
        self.worker_info = worker_info
        self.app = mounted(app) if script_name else app
        self.slot = slot
        self.logs = logs
        self.worker_number = worker_number
        self.body_timeout = body_timeout
        self.body_min_rate = body_min_rate
        self.send_timeout = send_timeout
        # waits on the client end this much after the request began: before the master's
        # workers.timeout, which would kill the worker and every connection it holds
        self.client_wait = request_timeout - min(CLIENT_WAIT_MARGIN, request_timeout / 2)
        self.server_line = (
            f"Server: {server_header}\r\n".encode("latin-1") if server_header else b""
        )
        self.dates = DateCache()
        # per listener (by id: a worker's listeners live as long as it does): the environ
        # keys common to its requests, and what else they need (None: nothing, plain TCP)
        self._bases: dict[int, tuple[dict[str, Any], ListenerExtras | None]] = {}
        # the last REMOTE_ADDR written to the scoreboard, and its bytes: most requests come
        # from the address the one before came from (a proxy's, or a client's keep-alive)
        self._client: tuple[str, bytes] = ("", b"")
        self.heads: HeadCache = {}  # start_response arguments already checked
        self.uwsgi_warned = -math.inf  # when a uwsgi protocol packet was last logged
        # wsgi.errors: with the error log on syslog, fd 2 is not the error log (a daemon's is
        # /dev/null), so what the application writes there goes through the logger instead;
        # so it does with logging.error_log_format json, whose log is all records
        self.errors: ErrorsToLog | None = (
            ErrorsToLog(logging.getLogger("prefork.wsgi"))
            if logs.syslog is not None or logs.error_format == "json"
            else None
        )

    def environ(self, conn: Connection, request: Request) -> dict[str, Any]:
        listener: Listener = conn.listener  # type: ignore[assignment]
        known = self._bases.get(id(listener))
        if known is None:
            tls = listener.fd in self.tls_fds
            needs = ListenerExtras(listener.address.kind == "unix", tls, self.script_name)
            known = self._bases[id(listener)] = (
                base_environ(listener, self.script_name, tls, self.errors),
                needs if any(needs) else None,
            )
        base, extras = known
        env = base.copy()
        remote = conn.remote
        if remote is None:
            remote = conn.remote = remote_of(conn.peer)
        env["REMOTE_ADDR"], env["REMOTE_PORT"] = remote
        env["REQUEST_METHOD"] = request.method
        env["PATH_INFO"] = decode_path(request.path)
        env["QUERY_STRING"] = request.query.decode("latin-1")
        # the target as sent: gunicorn's RAW_URI, and REQUEST_URI as uWSGI (and nginx's
        # uwsgi_params), mod_wsgi and CGI name it, which applications moved from those read
        env["RAW_URI"] = env["REQUEST_URI"] = request.target.decode("latin-1")
        env["SERVER_PROTOCOL"] = _PROTOCOLS.get(request.version) or "HTTP/" + request.version
        keys = ENVIRON_KEYS
        for name, value in request.headers:
            key = keys.get(name) or environ_key(name)
            if key is None:
                continue
            text = value.decode("latin-1")
            if key in env:
                # RFC 9110 5.3: repeated fields combine with commas; cookies with "; "
                env[key] += ("; " if key == "HTTP_COOKIE" else ", ") + text
            else:
                env[key] = text
        # plain TCP without script_name (the hot path) costs one test of `extras`, and calls
        # resolve() only for a trusted proxy's request carrying what it reads (.keys)
        if extras:
            self.listener_keys(conn, env, extras)
        elif conn.trusted and self.proxies is not None and (
            "HTTP_X_FORWARDED_FOR" in env
            or "HTTP_FORWARDED" in env
            or "HTTP_X_FORWARDED_PROTO" in env
            or "HTTP_X_FORWARDED_HOST" in env
            or "HTTP_X_FORWARDED_PORT" in env
            or "HTTP_X_FORWARDED_PREFIX" in env
            or "HTTP_X_FORWARDED_SSL" in env
            or "HTTP_X_FORWARDED_PROTOCOL" in env
        ):
            self.proxies.resolve(env)
        env["wsgi.input"] = Input(
            conn, request, self.body_timeout, self.body_min_rate, self.slot.reading
        )
        return env

    def listener_keys(
        self, conn: Connection, env: dict[str, Any], extras: ListenerExtras
    ) -> None:
        """environ() for a unix or TLS listener, or with http.script_name, in this order: a
        unix socket's SERVER_NAME and SERVER_PORT from Host; the connection's SSL_* keys
        (computed at its handshake); a trusted proxy's headers; then the script_name mount,
        under the prefix the proxy stripped (X-Forwarded-Prefix)."""
        portless = None  # a unix socket's Host without a port: the scheme's port
        if extras.unix and "HTTP_HOST" in env:
            host, _, port = env["HTTP_HOST"].rpartition(":")
            if host and port.isascii() and port.isdigit():  # not "²", a digit to isdigit
                env["SERVER_NAME"], env["SERVER_PORT"] = host, port
            else:
                portless = env["SERVER_NAME"] = env["HTTP_HOST"]
                env["SERVER_PORT"] = _scheme_port(env)
        if extras.tls:
            env.update(conn.tls_environ)
        if conn.trusted and self.proxies is not None:
            self.proxies.resolve(env)
            if portless is not None and env["HTTP_HOST"] == portless:
                # the proxy named no host or port of its own: its scheme's (as gunicorn)
                env["SERVER_PORT"] = _scheme_port(env)
        mount = extras.mount
        if mount:
            path = env["PATH_INFO"]
            if path.startswith(mount) and (len(path) == len(mount) or path[len(mount)] == "/"):
                env["PATH_INFO"] = path[len(mount) :]
            else:  # not under the mount: the application will not see it (see mounted())
                env["SCRIPT_NAME"] = env["SCRIPT_NAME"][: -len(mount)]
                env[OUTSIDE_SCRIPT_NAME] = True

    def serve(self, conn: Connection, keep_alive: bool) -> bool:
        """Answer every complete request head the parser holds; False if the connection must
        close. `keep_alive` says whether the worker wants to keep connections at all."""
        parser = conn.parser
        while parser.requests:
            request = parser.requests.popleft()
            conn.served += 1
            # a request that closes or upgrades ends the queue: those before it keep it open
            if not self.respond(
                conn, request, keep_alive and (not parser.upgraded or bool(parser.requests))
            ):
                return False
        conn.wait_until = math.inf  # between requests no request deadline applies
        if parser.deferred is not None:  # found while a body was read: its turn now
            error, parser.deferred = parser.deferred, None
            raise error
        return not parser.upgraded

    def respond(self, conn: Connection, request: Request, keep_alive: bool) -> bool:
        start = time.monotonic()
        conn.wait_until = start + self.client_wait
        env = self.environ(conn, request)
        response = Response(
            conn,
            request,
            keep_alive and request.keep_alive,
            self.send_timeout,
            self.server_line,
            self.dates.line(),
            self.slot.stop_requested,
            self.heads,
        )
        client = env["REMOTE_ADDR"]
        if client != self._client[0]:
            self._client = (client, client.encode("latin-1", "replace"))
        self.slot.busy(request.method.encode("latin-1"), request.target[:192], start,
                       self._client[1])
        # the hooks' `req`, made only for a hook that takes one; post_request gets the same
        req: HookRequest | None = None
        try:
            if self.pre_request is not None and self.hooks is not None:
                req = HookRequest(env, request, conn)
                if not self.hooks.call("pre_request", self.worker_info, req):
                    raise RuntimeError("the pre_request hook failed")
            app = self.app
            if self.static is not None and request.method in ("GET", "HEAD"):
                served = self.static.app_for(env, self.static_path(request), conn.sendfile_ok)
                if served is not None:
                    app = served
                    response.heads = None  # a file's headers are its own: not cached
            run_app(app, env, response)
        except (ClientDisconnected, ClientTimeout) as exc:
            if isinstance(exc, RequestTooLong):
                log.warning(
                    "closing the connection of %s %s from %s after %.0fs: %s; the worker "
                    "goes on", request.method, request.target.decode("latin-1"),
                    env["REMOTE_ADDR"] or "(unix)", time.monotonic() - start, exc,
                )
            else:
                log.debug("client %s: %s", env["REMOTE_ADDR"] or "(unix)", exc)
            response.cut()  # a slow reader must not find a clean end later
            now = time.monotonic()
            if response.status_code:  # the application answered: the log says what went out
                self.answered(env, request, response, now - start, conn, req)
            elif self.errors is not None:
                self.errors.flush()  # as answered() does
            self.slot.done(response.status_code, now - start, response.bytes_sent, now=now)
            return False
        except ProtocolError as exc:
            # the request body broke the framing (or went over a limit) while being read
            response.keep_alive = False
            response.cut()
            if not response.head_sent:
                response.status_code = exc.status
                response.bytes_sent = self._send_error(conn, exc.status, request.method == "HEAD")
        except BaseException:
            # SystemExit (argparse or click given bad input inside a view, an app's own
            # sys.exit()), KeyboardInterrupt or asyncio.CancelledError out of the application
            # are its errors too: let through, they ended the worker with no response, and
            # every other connection it held, and the master took it for a crash (backoff,
            # degraded). The worker's own exits never pass here: its signal handlers leave
            # with os._exit.
            log.exception(
                "error handling %s %s", request.method, request.target.decode("latin-1")
            )
            response.keep_alive = False
            response.cut()
            if not response.head_sent:
                response.status_code = 500
                response.bytes_sent = self._send_error(conn, 500, request.method == "HEAD")
        now = time.monotonic()
        duration = now - start
        # before the slot says idle: a post_request hook that hangs is a hung worker, which
        # the master kills at workers.timeout (as gunicorn's, inside handle_request)
        self.answered(env, request, response, duration, conn, req)
        self.slot.done(
            response.status_code,
            duration,
            response.bytes_sent,
            Activity.KEEPALIVE if response.keep_alive else Activity.IDLE,
            now,
        )
        if (
            response.keep_alive
            and not request.complete
            and not self._drain(conn, request)  # not when the client still waits for a 100
        ):
            response.keep_alive = False
        return response.keep_alive

    def static_path(self, request: Request) -> str:
        """The path `static` urls are matched on: the request's, percent-decoded, without dot
        segments, and before http.script_name is taken off."""
        return decode_path(request.path)

    def answered(
        self,
        env: dict[str, Any],
        request: Request,
        response: Response,
        duration: float,
        conn: Connection,
        req: HookRequest | None = None,
    ) -> None:
        """The access log line and the post_request hook of a response, whole or cut short by
        the client (its bytes count what was sent); then the end of what the request wrote
        to wsgi.errors. `req`: what pre_request got, if it ran."""
        if self.logs.access_enabled and not (
            self.skipping
            and response.status_code < 400
            and (request.path in self.skip_paths or request.path.startswith(self.skip_prefixes))
        ):
            self._access(env, request, response, duration)
        if self.post_request is not None and self.hooks is not None:
            if self.gunicorn_post_request:
                self.hooks.call(
                    "post_request",
                    self.worker_info,
                    req if req is not None else HookRequest(env, request, conn),
                    env,
                    HookResponse(response),
                )
            else:
                self.hooks.call("post_request", self.worker_info, env, response.status_code)
        if self.errors is not None:
            # A last line without its newline is a record of its own when its request ends,
            # as mod_wsgi's wsgi.errors (one per request) is flushed then: kept, it began the
            # next request's line, or was lost with the worker (os._exit flushes nothing).
            self.errors.flush()

    def _drain(self, conn: Connection, request: Request) -> bool:
        """Read and discard the rest of an unread body, up to DRAIN_LIMIT bytes and for at
        most DRAIN_TIME seconds in all; otherwise the connection closes (a client trickling a
        body nobody reads must not hold the worker)."""
        if not drainable(request):
            return False
        seen = 0
        deadline = time.monotonic() + DRAIN_TIME
        try:
            while not request.complete:
                request.body.clear()
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                data = conn.recv(min(remaining, self.body_timeout))
                if not data:
                    return False
                seen += len(data)
                if seen > DRAIN_LIMIT:
                    return False
                conn.parser.feed_body(data, request)  # a later request's error waits
        except (OSError, ProtocolError):
            return False
        request.body.clear()
        return True

    def _send_error(self, conn: Connection, status: int, head: bool = False) -> int:
        """Send the error page for `status` (its head only for HEAD); the body bytes sent (0
        if the client is gone), which is what the access log and the scoreboard count."""
        data = error_response(status, self.server_line, self.dates.line(), head)
        try:
            conn.send(data, 1.0)
        except OSError:
            return 0
        return len(data) - data.index(b"\r\n\r\n") - 4

    def reject(self, conn: Connection, error: ProtocolError) -> None:
        """Answer a request that could not be parsed; the worker then closes the connection
        (after a lingering half-close).

        The answer counts as a response, in the slot's counters and the access log, or a
        flood of 408s or 413s would never show in /metrics. It is counted here only: the
        request never reached the application (the worker answers the whole requests queued
        before it, then drops it from the queue unanswered; a body that breaks while the
        application reads it is respond()'s to answer and count). For the same reason it is
        not one of the slot's `requests`, on which max_requests recycles the worker."""
        start = time.monotonic()
        self.explain(conn, error, start)
        head = rejected_head(conn.parser)
        sent = self._send_error(conn, error.status, head.method == "HEAD")
        now = time.monotonic()
        # IDLE, as after any answer that ends its connection (DRAINING if the worker stops)
        self.slot.done(error.status, now - start, sent, Activity.IDLE, now, served=False)
        if self.logs.access_enabled:
            remote, _ = remote_of(conn.peer)
            self.logs.access(
                remote,
                head.method,
                head.target,
                head.version,
                error.status,
                sent,
                head.referer,
                head.user_agent,
                now - start,
                self.worker_number,
                protocol=None if head.version else "-",
            )

    def explain(self, conn: Connection, error: ProtocolError, now: float) -> None:
        """Log why a request is refused: at debug, but for a uwsgi packet (warn_uwsgi)."""
        if error.reason == UWSGI_PROTOCOL:
            self.warn_uwsgi(conn, now)
        else:
            log.debug("rejecting request from %s: %s", conn.peer, error)

    def warn_uwsgi(self, conn: Connection, now: float) -> None:
        """Say why a proxy speaking uWSGI's binary protocol gets 400s: a uWSGI setup moved
        to preforkd with nginx still on uwsgi_pass (nginx passes the 400 on and logs no
        error of its own), which the debug line every other bad request gets would hide.
        Every request of such a proxy is one, hence at most one line a minute."""
        if now - self.uwsgi_warned < UWSGI_WARN_INTERVAL:
            return
        self.uwsgi_warned = now
        listener: Listener = conn.listener  # type: ignore[assignment]
        log.warning(
            "%s: a request from %s in uWSGI's binary protocol (nginx uwsgi_pass, or a "
            "uwsgi:// client) got 400: this listener speaks HTTP (protocol: http); set "
            "`protocol: uwsgi` to serve uwsgi_pass, or point nginx at it with proxy_pass",
            listener.url("http"), remote_of(conn.peer)[0] or "a unix socket peer",
        )

    def _access(
        self, env: dict[str, Any], request: Request, response: Response, duration: float
    ) -> None:
        logs = self.logs
        logs.access(
            env["REMOTE_ADDR"],
            request.method,
            env["RAW_URI"],
            "",  # the protocol is SERVER_PROTOCOL's: HTTP/{version} over HTTP, not for uwsgi
            response.status_code,
            response.bytes_sent,
            env.get("HTTP_REFERER", ""),
            env.get("HTTP_USER_AGENT", ""),
            duration,
            self.worker_number,
            env["SERVER_PROTOCOL"],
            environ=env,
            # Response.headers: the application's header lines as start_response encoded
            # them (hop-by-hop ones dropped, none of the server's), a reference, not a copy.
            # Only for a format that logs them, and only if they went out: not when an
            # error page replaced the application's response before its head was sent.
            response_headers=(
                response.headers if logs.access_response_headers and response.head_sent
                else None
            ),
        )
