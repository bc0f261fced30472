"""Example TCP stream handler (the classic echo service) for `protocol: tcp`; see echo.yaml.

The worker calls `handler(sock, addr)` once per accepted connection.
"""

from __future__ import annotations

import socket


def handler(sock: socket.socket, addr: object) -> None:
    """Send back everything received until the client closes its side."""
    while True:
        data = sock.recv(65536)
        if not data:
            return
        sock.sendall(data)
