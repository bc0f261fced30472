"""Detaching into the background with a ready pipe back to the launching command.

The launching process forks; it stays in the foreground reading a pipe, while its child
detaches with python-daemon (fork, setsid, fork; stdio to /dev/null; umask; working directory
"/"; listening sockets and log destinations preserved). The daemon writes `READY <pid>` once
its workers serve, or `ERROR <reason>`; the launcher exits 0 or non-zero with that reason, so
a shell or init script learns whether startup worked.
"""

from __future__ import annotations

import os
import select
import sys
import time
from collections.abc import Mapping
from typing import IO

import daemon


def under_systemd(environ: Mapping[str, str], explicit: bool = False) -> str:
    """Why `daemon: true` must be ignored here ("" when it need not): a Type=notify unit
    (NOTIFY_SOCKET) needs its main process to stay, whatever the command line says; any
    other unit (INVOCATION_ID) too, unless -D (or --set daemon=true) asked to detach
    (Type=forking)."""
    if environ.get("NOTIFY_SOCKET"):
        return "NOTIFY_SOCKET is set (a Type=notify unit)"
    if environ.get("INVOCATION_ID") and not explicit:
        return ("started by systemd (INVOCATION_ID is set); -D (or --set daemon=true) on the "
                "command line detaches")
    return ""


def detach(
    preserve: list[int], umask: int, stderr: IO[str] | None, timeout: float, console: IO[str]
) -> int:
    """Become a daemon. Returns the ready pipe's write end, in the daemon only: the launching
    process never returns from here, it exits with the daemon's startup result, which it
    prints on `console` (the terminal it was started from; closed in the daemon).
    `preserve`: the descriptors the daemon keeps (listeners, logs, and whatever hooks or a
    preloaded app opened; closing those would let their numbers be reused); everything else
    is closed."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid > 0:
        os.close(write_end)
        sys.exit(wait_for_daemon(read_end, pid, timeout, console))
    os.close(read_end)
    # The terminal is the launcher's: closed here through its file object (python-daemon
    # would close the bare descriptor, leaving an object that writes to a dead or reused
    # number); the daemon's failures reach the launcher through the pipe instead.
    console.close()
    context = daemon.DaemonContext(
        working_directory="/",
        umask=umask,
        files_preserve=[*preserve, write_end],
        signal_map={},  # preforkd installs its own handlers
        prevent_core=False,
        stderr=stderr,
        detach_process=True,
    )
    context.open()
    if stderr is not None:
        stderr.close()  # fd 2 is its copy now; this one would hold the file past rotations
    return write_end


def wait_for_daemon(read_end: int, child: int, timeout: float, console: IO[str]) -> int:
    """The launcher's side: relay the daemon's startup result."""
    deadline = time.monotonic() + timeout
    data = b""
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            print(
                f"preforkd: the daemon did not report ready within {timeout:.0f}s "
                "(see its log); it may still be starting",
                file=console,
            )
            return 1
        ready, _, _ = select.select([read_end], [], [], remaining)
        if not ready:
            continue
        chunk = os.read(read_end, 4096)
        data += chunk
        if not chunk or b"\n" in data:
            break  # one line is the whole answer; workers may hold the pipe open after it
    os.close(read_end)
    os.waitpid(child, 0)  # the intermediate process exits as soon as it has forked
    text = data.decode("utf-8", "replace").strip()
    if text.startswith("READY"):
        pid = text[5:].strip()
        print(f"preforkd: running in the background{' as pid ' + pid if pid else ''}",
              file=console)
        return 0
    if text.startswith("ERROR"):
        code, _, reason = text[5:].strip().partition(" ")  # ERROR <status> <reason>
        print(f"preforkd: startup failed: {reason}", file=console)
        return int(code) if code.isdigit() and int(code) else 1
    print("preforkd: the daemon exited during startup (see its log)", file=console)
    return 1
