"""The HTTP/1.1 protocol layer: bytes in, requests out; responses as bytes. Never does I/O."""

from prefork.http.errors import ProtocolError
from prefork.http.parser import Limits, Parser, Request, RequestParser

__all__ = ["Limits", "Parser", "ProtocolError", "Request", "RequestParser"]
