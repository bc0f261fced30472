"""The pidfile: refuse to start next to a live instance, replace a stale file, write
atomically, remove only our own.

Invariant: the file on disk always holds a complete pid (written to a temporary file in the
same directory, then renamed).
"""

from __future__ import annotations

import errno
import json
import os
import tempfile


def _temporary_beside(path: str) -> tuple[int, str]:
    """A fresh temporary file in `path`'s directory (O_EXCL, random name: no symlink or
    predictable name to exploit in a shared directory): its descriptor and name."""
    return tempfile.mkstemp(prefix=".preforkd-", dir=os.path.dirname(path) or ".")


def _write_aside(path: str, text: str) -> str:
    """`text` in a temporary file beside `path`, mode 0644; its name."""
    fd, tmp = _temporary_beside(path)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.chmod(tmp, 0o644)
    except BaseException:
        _unlink_quietly(tmp)
        raise
    return tmp


def _unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def write_atomically(path: str, text: str) -> None:
    """Write `text` beside `path`, then rename it over `path`."""
    tmp = _write_aside(path, text)
    try:
        os.replace(tmp, path)
    except BaseException:
        _unlink_quietly(tmp)
        raise


def create_exclusively(path: str, text: str) -> bool:
    """Write `text` to `path` only if no file is there: made aside as write_atomically does,
    then hard-linked in, which (unlike rename) refuses to replace one. False if `path`
    exists. A file system without hard links falls back to write_atomically."""
    tmp = _write_aside(path, text)
    try:
        try:
            os.link(tmp, path)
        except FileExistsError:
            return False
        except OSError as exc:
            if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP):
                raise
            os.replace(tmp, path)
        return True
    finally:
        _unlink_quietly(tmp)


class PidFileError(Exception):
    """Another live instance owns the pidfile, or it cannot be written."""


def read_pid(path: str) -> int | None:
    try:
        with open(path, encoding="ascii") as f:
            text = f.read().strip()
    except (OSError, UnicodeDecodeError):
        return None
    return int(text) if text.isdigit() else None


def is_preforkd(pid: int) -> bool:
    """Whether `pid` is alive and may be a preforkd master (not a recycled pid): a master's
    command line (is_master_command), or one that cannot be read (assume the worst). Not
    `tail -f preforkd.log`, which would otherwise block every start until the pidfile is
    removed by hand."""
    if not alive(pid):
        return False
    cmdline = read_cmdline(pid)
    if cmdline is None:
        return True  # alive and unreadable: assume the worst
    return is_master_command(cmdline)


def alive(pid: int) -> bool:
    """Whether process `pid` exists and has not exited: a zombie (exited, not yet reaped by
    its parent) counts as exited."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # alive, another user's
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return False  # gone meanwhile
    # the state follows the command name, which is in parentheses and may contain any byte
    return stat[stat.rfind(b")") + 2 :][:1] != b"Z"


def is_master_command(argv: list[str]) -> bool:
    """Whether a command line (as read_cmdline gives it) is a preforkd master's: its process
    title once it runs (`preforkd: master [...]`), or before that the command that started
    it: `preforkd ...` (the script, run by its interpreter or not) or `python -m prefork`.
    An editor or `tail -f` of a preforkd file, or a worker, is not a master."""
    if not argv:
        return False  # a zombie, or a kernel thread
    if argv[0].startswith("preforkd: "):
        return argv[0].startswith("preforkd: master ")
    if any(argv[i : i + 2] == ["-m", "prefork"] for i in range(len(argv) - 1)):
        return True
    program = argv[1:2] if os.path.basename(argv[0]).startswith("python") else argv[:1]
    return [os.path.basename(arg) for arg in program] == ["preforkd"]


def is_master(pid: int) -> bool:
    """Whether `pid` is alive and a preforkd master (is_master_command)."""
    cmdline = read_cmdline(pid) if alive(pid) else None
    return cmdline is not None and is_master_command(cmdline)


def read_cmdline(pid: int) -> list[str] | None:
    """The argument vector of process `pid` from /proc, or None if it cannot be read."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            raw = f.read()
    except OSError:
        return None
    return [os.fsdecode(arg) for arg in raw.split(b"\0")[:-1]] if raw else []


def config_argument(argv: list[str]) -> str | None:
    """The -c/--config value a preforkd command line gives, as given (a relative path is
    relative to where that process started), or None if it gives none.

    The interpreter's own options are skipped first (`python -c CODE` is not ours): the
    program's arguments follow `-m MODULE`, or the script after `python`. argparse keeps the
    last of repeated options, and so does this."""
    start = 1
    if "-m" in argv:
        start = argv.index("-m") + 2
    elif argv and os.path.basename(argv[0]).startswith("python"):
        start = 2
    found = None
    args = iter(argv[start:])
    for arg in args:
        if arg == "--":
            break
        name, equals, value = arg.partition("=")
        if name == "-c" or (name.startswith("--c") and "--config".startswith(name)):
            found = value if equals else next(args, found)  # argparse takes "--conf" too
        elif arg.startswith("-c"):
            found = arg[2:]
    return found


def running_pid(path: str) -> int | None:
    """The pid in `path` if it is a live preforkd master that may have written it (not
    written_before), else None."""
    pid = read_pid(path)
    return pid if pid is not None and is_preforkd(pid) and not written_before(path, pid) else None


def status_path(pidfile: str) -> str:
    """The file beside a pidfile where its master records its state (notify.Announcer):
    what `preforkd reload` and `upgrade` wait on, and who wrote the pidfile."""
    return f"{pidfile}.status"


def read_status(path: str) -> dict[str, object] | None:
    """A status record (status_path), or None if there is none that parses."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def process_identity(pid: int) -> str | None:
    """What tells process `pid` from every other process that had or will have its pid:
    the boot it runs in and the clock tick it started at (`BOOT_ID:TICKS`, /proc), or None
    if either cannot be read. Not a wall-clock time: a clock stepped after boot (NTP on a
    machine without a battery-backed clock) would make a master look younger than its
    pidfile."""
    try:
        with open("/proc/sys/kernel/random/boot_id", encoding="ascii") as f:
            boot = f.read().strip()
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return None
    # after the command name (in parentheses, any bytes): fields 3 onwards; 22 is starttime
    fields = stat[stat.rfind(b")") + 2 :].split()
    if not boot or len(fields) < 20 or not fields[19].isdigit():
        return None
    return f"{boot}:{fields[19].decode()}"


def written_before(pidfile: str, pid: int) -> bool:
    """Whether the pidfile's pid `pid` is proven to belong to another process than the
    master that wrote it: its status record (status_path) names `pid` with another process
    identity. A machine rebooted, or a master killed, with the pidfile left behind, and the
    pid now another preforkd master's (another service's, or a container's that gets the
    same pid at every start): that master must not be taken for this pidfile's, refusing
    a start or getting a `stop`. False when nothing proves it (no record, a record of
    another pid or from a preforkd before identities, an identity that cannot be read):
    then only the command line (is_preforkd) decides, as before."""
    record = read_status(status_path(pidfile))
    if record is None or record.get("pid") != pid:
        return False
    recorded = record.get("identity")
    if not isinstance(recorded, str):
        return False
    now = process_identity(pid)
    return now is not None and now != recorded


class PidFile:
    def __init__(self, path: str, replacing: int | None = None) -> None:
        self.path = path
        # the master a USR2 started this one to replace: its pid stays in the file until this
        # master writes its own, and is no conflict
        self.replacing = replacing
        self.written: int | None = None

    def check(self) -> None:
        """Raise PidFileError if a live instance holds the file; remove a stale one."""
        pid = read_pid(self.path)
        if pid is None:
            if os.path.exists(self.path):
                self._remove_stale("holds no pid")
            return
        if pid == self.replacing:
            return  # write() replaces it in one rename
        if pid == os.getpid() or not is_preforkd(pid):
            self._remove_stale(f"pid {pid} is not a running preforkd")  # its process is gone
        elif written_before(self.path, pid):
            self._remove_stale(f"pid {pid} is a preforkd master started after the one that "
                               "wrote it")
        else:
            raise PidFileError(f"already running as pid {pid} (pidfile {self.path})")

    def _remove_stale(self, why: str) -> None:
        """Unlink a stale pidfile; PidFileError if that is not permitted (a directory the
        user may not write to): the start failed with a traceback instead of a reason."""
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass  # removed meanwhile (another start): as good
        except OSError as exc:
            raise PidFileError(
                f"cannot remove the stale pidfile {self.path} ({why}): {exc.strerror}"
            ) from None

    def probe(self) -> None:
        """Raise PidFileError, with write()'s message, if write() could not make its
        temporary file beside the pidfile (a directory the user may not write to, a
        read-only file system): found at the start, before anything is bound and before a
        daemon detaches, not once the launcher has been told to wait for it."""
        try:
            fd, tmp = _temporary_beside(self.path)
        except OSError as exc:
            raise PidFileError(f"cannot write pidfile {self.path}: {exc.strerror}") from None
        os.close(fd)
        os.unlink(tmp)

    def write(self, pid: int) -> None:
        """Write `pid`, unless a live instance holds the file (PidFileError). Two servers
        started at once both found no pidfile at their start; the first to write wins and
        the second is refused here (create_exclusively), instead of each replacing the
        other's file and the loser's exit then removing it, leaving the winner unnamed. A
        master started by USR2 renames its file over its predecessor's in one step."""
        text = f"{pid}\n"
        try:
            if self.replacing is not None and read_pid(self.path) == self.replacing:
                write_atomically(self.path, text)
            else:
                for _ in range(3):
                    self.check()  # raises if a live one holds it; removes a stale one
                    if create_exclusively(self.path, text):
                        break
                else:
                    raise PidFileError(f"cannot write pidfile {self.path}: another process "
                                       "keeps creating it")
        except OSError as exc:
            raise PidFileError(f"cannot write pidfile {self.path}: {exc.strerror}") from None
        self.written = pid
        if written_before(self.path, pid):
            # an earlier process with this pid left its record (a container's master gets
            # the same pid at every start): until this master writes its own, the record
            # would make this pidfile look stale
            _unlink_quietly(status_path(self.path))

    def remove(self) -> None:
        if self.written is not None and read_pid(self.path) == self.written:
            try:
                os.unlink(self.path)
            except OSError:
                pass
        self.written = None
