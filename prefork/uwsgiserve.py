"""Serve a uwsgi protocol connection (`protocol: uwsgi`, nginx's uwsgi_pass): one request,
its environ made from the packet's variables, answered through HTTP's response path.

Invariants: only a peer of http.uwsgi_allow_ips is served (its variables set REMOTE_ADDR,
the scheme and the host); the others get 403. The response is HttpProtocol's (start_response
checks, HEAD, the access log, the scoreboard, hooks, static files), framed by the close of
the connection, which ends after it. A refused or malformed packet costs its connection,
never the worker.
"""

from __future__ import annotations

import logging
import math
from typing import Any
from urllib.parse import quote

from prefork.connection import Connection
from prefork.http import ProtocolError, Request
from prefork.http.uwsgi import HTTP_ON_UWSGI, MANAGE_PATH_INFO, NO_METHOD, UwsgiRequest
from prefork.httpserve import OUTSIDE_SCRIPT_NAME, HttpProtocol, base_environ, remote_of
from prefork.sockets import Listener
from prefork.wsgi import Input, decode_path, remove_dot_segments

log = logging.getLogger("prefork")

# At most one warning this often (per worker and kind) about requests refused for what an
# operator has to fix: a peer not allowed, HTTP on this listener, nginx without uwsgi_params.
WARN_INTERVAL = 60.0
FORBIDDEN = "the peer is not in http.uwsgi_allow_ips"
# HTTPS values that mean on (nginx's $https is "on"; uWSGI also takes "1")
_HTTPS_ON = frozenset(("on", "1", "yes", "true"))
_SCHEMES = frozenset(("http", "https"))


def _under(path: str, prefix: str) -> bool:
    """Whether `path` is `prefix` or below it, on whole segments (/app covers /app/x, not
    /application)."""
    return path.startswith(prefix) and (len(path) == len(prefix) or path[len(prefix)] == "/")


class UwsgiProtocol(HttpProtocol):
    """The uwsgi side of a worker: HttpProtocol, with the environ from the packet."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.warned: dict[str, float] = {}  # when each kind of refusal was last logged

    def serve(self, conn: Connection, keep_alive: bool) -> bool:
        """Answer the connection's request (False: the connection closes after it, always);
        a peer not allowed is refused before anything reaches the application."""
        if not conn.trusted:
            raise ProtocolError(403, FORBIDDEN)
        return super().serve(conn, False)

    def environ(self, conn: Connection, request: Request) -> dict[str, Any]:
        """PEP 3333's environ from the packet's variables, as uWSGI makes it (every variable
        is a key), completed where the proxy left a required key out: SCRIPT_NAME "",
        PATH_INFO from REQUEST_URI, REMOTE_ADDR the socket's peer, the listener's
        SERVER_NAME and SERVER_PORT. wsgi.url_scheme is UWSGI_SCHEME's, else https when
        HTTPS is on (nginx's uwsgi_params sends it then). With modifier1 30 SCRIPT_NAME is
        taken off PATH_INFO (uWSGI's documented meaning of nginx's `uwsgi_modifier1 30`);
        then http.script_name is, as for HTTP."""
        assert isinstance(request, UwsgiRequest)
        listener: Listener = conn.listener  # type: ignore[assignment]
        known = self._bases.get(id(listener))
        if known is None:
            # the scheme is the client's, which the variables say, not this hop's (TLS or not)
            known = self._bases[id(listener)] = (
                base_environ(listener, "", False, self.errors), None
            )
        env = known[0].copy()
        variables = request.variables
        env.update(variables)
        if "REMOTE_ADDR" not in variables:
            remote = conn.remote
            if remote is None:
                remote = conn.remote = remote_of(conn.peer)
            env["REMOTE_ADDR"], env["REMOTE_PORT"] = remote
        scheme = variables.get("UWSGI_SCHEME", "").lower()
        if scheme not in _SCHEMES:
            scheme = "https" if variables.get("HTTPS", "").lower() in _HTTPS_ON else "http"
        env["wsgi.url_scheme"] = scheme
        env["SERVER_PROTOCOL"] = request.protocol
        env.setdefault("QUERY_STRING", "")
        path = variables.get("PATH_INFO")
        if path is None:
            path = decode_path(request.path)
        elif path.find("/.") >= 0:
            path = remove_dot_segments(path)  # as for HTTP: a mount's prefix check holds
        script_name = variables.get("SCRIPT_NAME", "").rstrip("/")
        # PATH_INFO is nginx's whole path ($document_uri) unless the configuration cut the
        # prefix off itself (modifier1 0 and a PATH_INFO not under SCRIPT_NAME); modifier1 30
        # says it is whole, and asks for SCRIPT_NAME to come off here
        prefixed = bool(script_name) and _under(path, script_name)
        managed = request.modifier1 == MANAGE_PATH_INFO
        request.full_path = path if prefixed or managed else script_name + path
        if prefixed and managed:
            path = path[len(script_name) :]
        if "REQUEST_URI" not in variables:
            query = env["QUERY_STRING"]
            target = quote(request.full_path.encode("latin-1")) + ("?" + query if query else "")
            env["REQUEST_URI"] = target
            request.target = target.encode("latin-1")
        env["RAW_URI"] = env["REQUEST_URI"]
        mount = self.script_name
        if mount:
            if prefixed and managed and script_name.endswith(mount):
                # the proxy mounted it there already (nginx's SCRIPT_NAME /app and modifier1
                # 30, uWSGI's usual mount): PATH_INFO is what lies below it, and taken off
                # again /app/x was 400 and /app/app/x was /x
                pass
            elif _under(path, mount):
                path = path[len(mount) :]
                if not script_name.endswith(mount):  # the proxy's SCRIPT_NAME names it already
                    script_name += mount            # (uWSGI's manage-script-name with mount)
            else:  # not under the mount: the application will not see it (see mounted())
                env[OUTSIDE_SCRIPT_NAME] = True
        env["SCRIPT_NAME"] = script_name
        env["PATH_INFO"] = path
        env["wsgi.input"] = Input(
            conn, request, self.body_timeout, self.body_min_rate, self.slot.reading
        )
        return env

    def static_path(self, request: Request) -> str:
        """SCRIPT_NAME and PATH_INFO as the packet meant them (nginx's $document_uri,
        decoded already), before http.script_name is taken off."""
        assert isinstance(request, UwsgiRequest)
        return request.full_path

    def explain(self, conn: Connection, error: ProtocolError, now: float) -> None:
        """Refusals an operator has to act on are warnings (one a minute per kind): nginx
        passes the status on and logs nothing of its own."""
        why = {
            FORBIDDEN: "refused with 403: that peer is not in http.uwsgi_allow_ips (a "
                       "packet's variables set REMOTE_ADDR, HTTPS and the host)",
            HTTP_ON_UWSGI: "is HTTP (nginx proxy_pass?), and this listener speaks the uwsgi "
                           "protocol (protocol: uwsgi): refused with 400; point nginx at it "
                           "with uwsgi_pass and `include uwsgi_params`, or set "
                           "`protocol: http`",
            NO_METHOD: "has no REQUEST_METHOD variable: refused with 400; does nginx "
                       "`include uwsgi_params` where it has uwsgi_pass?",
        }.get(error.reason)
        if why is None:
            log.debug("rejecting uwsgi request from %s: %s", conn.peer, error)
            return
        if now - self.warned.get(error.reason, -math.inf) < WARN_INTERVAL:
            return
        self.warned[error.reason] = now
        listener: Listener = conn.listener  # type: ignore[assignment]
        log.warning(
            "%s: a request from %s %s", listener.url("uwsgi"),
            remote_of(conn.peer)[0] or "a unix socket peer", why,
        )
