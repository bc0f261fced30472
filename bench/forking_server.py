"""Baseline designs for the concurrency sweep: fork-per-connection and iterative.

usage: python forking_server.py PORT [--iterative] [--backlog N]

fork (default): the parent accept()s, forks one child per connection and goes
    back to accept(); the child reads one HTTP request, answers it with the
    hello-world response and `Connection: close`, closes and exits.  The parent
    reaps its children with waitpid() from a SIGCHLD handler, so their CPU time
    is added to its own (cutime/cstime) and the benchmark can count it.
--iterative: one process answers one connection at a time, in the accept loop.

This is deliberately the textbook design (Stevens, UNP chapter 30), with no
HTTP parsing beyond finding the end of the request head: it is the row the
preforked servers are compared with, not a server to use.  SIGTERM stops it.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket

BODY = b"Hello, world!\n"
RESPONSE = (
    b"HTTP/1.1 200 OK\r\n"
    b"Content-Type: text/plain\r\n"
    b"Content-Length: " + str(len(BODY)).encode() + b"\r\n"
    b"Connection: close\r\n"
    b"\r\n" + BODY
)
HEAD_LIMIT = 65536


def answer(conn: socket.socket) -> None:
    """Read one request head (up to the blank line), send the response, close."""
    buf = b""
    try:
        while b"\r\n\r\n" not in buf and len(buf) < HEAD_LIMIT:
            chunk = conn.recv(65536)
            if not chunk:
                return
            buf += chunk
        conn.sendall(RESPONSE)
    except OSError:
        pass
    finally:
        conn.close()


def reap(signum: int, frame: object) -> None:
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def serve_forking(lsock: socket.socket) -> None:
    signal.signal(signal.SIGCHLD, reap)
    while True:
        conn, _ = lsock.accept()  # PEP 475: retried after the SIGCHLD handler runs
        while True:
            try:
                pid = os.fork()
                break
            except BlockingIOError:  # EAGAIN: too many processes; reap and retry
                reap(signal.SIGCHLD, None)
        if pid == 0:
            try:
                signal.signal(signal.SIGCHLD, signal.SIG_DFL)
                signal.signal(signal.SIGTERM, signal.SIG_DFL)
                lsock.close()
                answer(conn)
            finally:
                os._exit(0)
        conn.close()


def serve_iterative(lsock: socket.socket) -> None:
    while True:
        conn, _ = lsock.accept()
        answer(conn)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("port", type=int)
    ap.add_argument("--iterative", action="store_true", help="answer in the accept loop, no fork")
    ap.add_argument("--backlog", type=int, default=2048, help="listen() backlog (default 2048)")
    ap.add_argument("--host", default="127.0.0.1")
    args = ap.parse_args()

    lsock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    lsock.bind((args.host, args.port))
    lsock.listen(args.backlog)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    if args.iterative:
        serve_iterative(lsock)
    else:
        serve_forking(lsock)


if __name__ == "__main__":
    main()
