"""Files whose change makes the master reload or reopen its logs (uWSGI's touch-reload and
touch-logreopen). Master only: the loop calls `TouchWatch.changes` at its own pace; no
thread, no inotify, nothing read but each file's status.

Invariants: the first look at a path only records it (nothing happens at start, nor for a
path a reload added to a list); what happened between two looks is one change however many
touches it was; a file that disappears is said once and is no change, its return is one.
"""

from __future__ import annotations

import errno
import logging
import os
from collections.abc import Callable, Iterable, Mapping
from typing import NamedTuple

from prefork.config import Config

log = logging.getLogger("prefork")


class Seen(NamedTuple):
    """What a look found of a file that exists: a touch changes the modification time, a
    file renamed over it (or a symlink moved to another one) the inode, an edit in the same
    clock tick the size."""

    mtime_ns: int
    size: int
    inode: int


class Change(NamedTuple):
    setting: str  # touch_reload, touch_logreopen
    path: str
    how: str  # modified, replaced, created

    def __str__(self) -> str:
        return f"{self.path} {self.how}"


def touch_lists(config: Config) -> dict[str, tuple[str, ...]]:
    """The files watched, by setting: touch_logreopen's first, so that a look finding
    both changed reopens the logs before the reload opens its own."""
    return {"touch_logreopen": config.touch_logreopen, "touch_reload": config.touch_reload}


def what_is_at(path: str, stat: Callable[[str], os.stat_result]) -> Seen | str:
    """The file at `path` (symlinks followed), or why there is none."""
    try:
        st = stat(path)
    except OSError as exc:
        if exc.errno in (errno.ENOENT, errno.ENOTDIR):
            return "does not exist"
        return f"cannot be looked at: {exc.strerror or exc}"
    return Seen(st.st_mtime_ns, st.st_size, st.st_ino)


class TouchWatch:
    """The last look at each watched (setting, path)."""

    def __init__(self, stat: Callable[[str], os.stat_result] = os.stat) -> None:
        self.stat = stat
        self.seen: dict[tuple[str, str], Seen | str] = {}

    def changes(self, setting: str, paths: Iterable[str]) -> list[Change]:
        """The files among `paths` (the list of `setting`) that changed since the last look,
        in the list's order. A path not looked at before is recorded, never reported."""
        found: list[Change] = []
        for path in paths:
            key = (setting, path)
            now = what_is_at(path, self.stat)
            before = self.seen.get(key)
            self.seen[key] = now
            if now == before:
                continue
            if before is None:
                if isinstance(now, str):
                    log.info("%s: %s %s; its creation will count as a touch", setting, path,
                             now)
            elif isinstance(now, str):
                log.warning("%s: %s %s now; nothing is done until it is back", setting, path,
                            now)
            elif isinstance(before, str):
                found.append(Change(setting, path, "created"))
            elif before.inode != now.inode:
                found.append(Change(setting, path, "replaced"))
            else:
                found.append(Change(setting, path, "modified"))
        return found

    def look(self, lists: Mapping[str, Iterable[str]]) -> list[Change]:
        """The changes in every list (setting -> paths), after forgetting what no list
        names any more."""
        self.keep((setting, path) for setting, paths in lists.items() for path in paths)
        return [c for setting, paths in lists.items() for c in self.changes(setting, paths)]

    def keep(self, watched: Iterable[tuple[str, str]]) -> None:
        """Forget the paths no longer listed (a reload changed the lists): listed again
        later, each starts from a first look."""
        listed = set(watched)
        for key in [key for key in self.seen if key not in listed]:
            del self.seen[key]
