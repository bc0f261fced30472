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
    """A group's id: a numeric one as it is (it need not be in /etc/group)."""
    return int(group) if group.isdigit() else grp.getgrnam(group).gr_gid


def uid_of(user: str) -> int:
    """A user's id: a numeric one as it is (it need not be in /etc/passwd)."""
    return int(user) if user.isdigit() else pwd.getpwnam(user).pw_uid


def user_entry(user: str) -> pwd.struct_passwd | None:
    """The passwd entry of `user`; None for a numeric id that has none (containers run with
    arbitrary uids). A name must exist (the configuration checked it)."""
    try:
        return resolve_user(user)
    except KeyError:
        if user.isdigit():
            return None
        raise


def _resolve(user: str | None, group: str | None) -> tuple[pwd.struct_passwd | None, int, int]:
    """`user`'s passwd entry (if any) and the (uid, gid) of credentials()."""
    if user is None and group is None:
        return None, -1, -1
    pw = user_entry(user) if user is not None else None
    uid = -1 if user is None else (pw.pw_uid if pw is not None else int(user))
    if group is not None:
        return pw, uid, resolve_gid(group)
    return pw, uid, (pw.pw_gid if pw is not None else uid)


def credentials(user: str | None, group: str | None) -> tuple[int, int]:
    """The (uid, gid) the workers run as; -1 where they keep the master's. The group is
    `group`, else the user's primary group, else, for a numeric uid without a passwd
    entry, the same number (never the master's group, root's)."""
    _, uid, gid = _resolve(user, group)
    return uid, gid


def drop_privileges(user: str | None, group: str | None) -> None:
    """Become `user` (with its supplementary groups) and `group` (see credentials)."""
    if user is None and group is None:
        return
    pw, uid, gid = _resolve(user, group)  # a group or a user is given: gid is never -1
    if uid == os.getuid() and gid == os.getgid():
        return
    if pw is not None:
        os.initgroups(pw.pw_name, gid)
    else:
        os.setgroups([gid])
    os.setgid(gid)
    if uid != -1:
        os.setuid(uid)
    if pw is not None:
        os.environ["HOME"] = pw.pw_dir
        os.environ["USER"] = os.environ["LOGNAME"] = pw.pw_name
