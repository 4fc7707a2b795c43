"""Lets the ``postgres`` OS user run the server and reach its files when we are root.

PostgreSQL refuses to run as root, so as root every server command is run as
the ``postgres`` OS user through ``runuser`` (:func:`command`), the cluster's
directories are handed to that user (:func:`hand_over`) and their parents made
traversable.  As any other user all of this is a no-op.
"""

import os
import pwd
import stat

from ._server import ClusterError

# OS user that owns the server files when we are root.
PG_OS_USER = "postgres"


def needed():
    """True when we are root, so the server must run as the postgres OS user."""
    return os.geteuid() == 0


def command(argv):
    """*argv*, prefixed with ``runuser -u postgres --`` when we are root."""
    if needed():
        return ["runuser", "-u", PG_OS_USER, "--"] + list(argv)
    return argv


def _account():
    try:
        return pwd.getpwnam(PG_OS_USER)
    except KeyError as exc:
        raise ClusterError(
            f"running as root but there is no {PG_OS_USER!r} OS user to run PostgreSQL as "
            "(it is created by the postgresql packages)"
        ) from exc


def hand_over(paths):
    """As root: make each directory in *paths* reachable by and owned by the postgres user.

    ClusterError when that user does not exist.
    """
    if not needed():
        return
    pg = _account()
    for path in set(paths):
        allow_traversal_of_parents(path)
        os.chown(path, pg.pw_uid, pg.pw_gid)


def write_secret(path, text):
    """Write *text* to a new file only its owner can read (the postgres user, as root)."""
    # Created 0600 from the start: its directory may be readable by others.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
    if needed():
        pg = pwd.getpwnam(PG_OS_USER)
        os.chown(path, pg.pw_uid, pg.pw_gid)


def allow_traversal_of_parents(path):
    """Give "others" search (x) permission on every ancestor that lacks it.

    A root-owned 0700 parent (pytest's basetemp, mkdtemp dirs) would otherwise
    stop the postgres user from reaching its own data directory.  Only x is
    added, never r, so directory listings stay private.
    """
    parent = os.path.dirname(os.path.abspath(path))
    while True:
        mode = os.stat(parent).st_mode
        if not mode & stat.S_IXOTH:
            os.chmod(parent, stat.S_IMODE(mode) | stat.S_IXOTH)
        up = os.path.dirname(parent)
        if up == parent:
            return
        parent = up
