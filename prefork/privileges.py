"""Dropping root in a worker: supplementary groups, group, then user — in that order, since
after setuid the process may no longer change its groups.

Invariant: called in a forked worker before the application is imported; the master keeps
its credentials so that it can bind privileged ports and reload.
"""

from __future__ import annotations

import grp
import os
import pwd


def resolve_user(user: str) -> pwd.struct_passwd:
    return pwd.getpwuid(int(user)) if user.isdigit() else pwd.getpwnam(user)


def resolve_gid(group: str) -> int:
    return grp.getgrgid(int(group)).gr_gid if group.isdigit() else grp.getgrnam(group).gr_gid


def drop_privileges(user: str | None, group: str | None) -> None:
    """Become `user` (with its supplementary groups) and `group` (default: the user's)."""
    if user is None and group is None:
        return
    pw = resolve_user(user) if user is not None else None
    gid = resolve_gid(group) if group is not None else (pw.pw_gid if pw else os.getgid())
    if pw is not None and (pw.pw_uid, gid) == (os.getuid(), os.getgid()):
        return
    if pw is not None:
        os.initgroups(pw.pw_name, gid)
    else:
        os.setgroups([gid])
    os.setgid(gid)
    if pw is not None:
        os.setuid(pw.pw_uid)
        os.environ["HOME"] = pw.pw_dir
        os.environ["USER"] = os.environ["LOGNAME"] = pw.pw_name
