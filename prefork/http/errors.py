"""Protocol errors: each carries the HTTP status the connection should answer with.

Invariant: no I/O. The connection layer turns a ProtocolError into a response and a close.
"""

from __future__ import annotations


class ProtocolError(Exception):
    """A request that cannot be served as sent; `status` is the answer (400, 413, 414, 431, 501)."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(f"{status} {reason}")
        self.status = status
        self.reason = reason
