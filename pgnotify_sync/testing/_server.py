"""Finds and runs the PostgreSQL server binaries (initdb, pg_ctl) with deadlines and readable errors.

``find_pg_bindir`` locates the binaries, ``run`` runs one of them (the caller
prefixes ``runuser`` as root, see _postgres_user.py) and turns "cannot run" and
"timed out" into :class:`ClusterError` with the tail of the output and of the
server log; the log helpers read what a start added.
"""

import glob
import os
import re
import shutil
import socket
import subprocess

# Upper bound for any single initdb / pg_ctl call; pg_ctl's own -t is below it
# so pg_ctl reports the timeout itself (with a useful message) first.
PG_CTL_WAIT_SECONDS = 60
COMMAND_TIMEOUT = PG_CTL_WAIT_SECONDS + 30


class ClusterError(RuntimeError):
    """The temporary cluster could not be created, started or stopped."""


def _has_server_binaries(bindir):
    return all(os.access(os.path.join(bindir, name), os.X_OK) for name in ("initdb", "pg_ctl"))


def _version_key(bindir):
    # /usr/lib/postgresql/15/bin -> (15,); compare numerically so 9.6 < 10 < 15.
    version = os.path.basename(os.path.dirname(bindir))
    return tuple(int(part) for part in re.findall(r"\d+", version))


def find_pg_bindir():
    """Return the directory holding ``initdb`` and ``pg_ctl``.

    ``pg_config --bindir`` wins when it points at the server binaries; on Debian
    it often does not (libpq-dev alone ships pg_config), so we then fall back to
    the newest ``/usr/lib/postgresql/*/bin``.
    """
    pg_config = shutil.which("pg_config")
    if pg_config:
        try:
            out = subprocess.run(
                [pg_config, "--bindir"], capture_output=True, text=True, timeout=30, check=True
            ).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            out = ""
        if out and _has_server_binaries(out):
            return out
    candidates = [d for d in glob.glob("/usr/lib/postgresql/*/bin") if _has_server_binaries(d)]
    if candidates:
        return max(candidates, key=_version_key)
    raise ClusterError(
        "PostgreSQL server binaries (initdb, pg_ctl) not found: neither `pg_config --bindir` "
        "nor /usr/lib/postgresql/*/bin has them. Install them, e.g. `apt-get install postgresql`, "
        "or run scripts/bootstrap.sh."
    )


def binary(bindir, name):
    """The path of server binary *name* in *bindir*; ClusterError if it is not executable."""
    path = os.path.join(bindir, name)
    if not os.access(path, os.X_OK):
        raise ClusterError(f"{name} not found or not executable at {path} (bindir={bindir})")
    return path


def free_port():
    """Return a TCP port on 127.0.0.1 that was free a moment ago.

    Another process may grab it before the server binds it; ``start()`` retries
    with a new port in that case.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run(argv, cwd, what, log_path):
    """Run a server binary (*argv* already prefixed with runuser when we are root).

    Returns the CompletedProcess; raises ClusterError if it cannot be run or
    times out (with the tail of the server log at *log_path*).  The caller
    decides whether a non-zero exit is an error.
    """
    try:
        # cwd (the cluster's base_dir): the postgres user may not be allowed into
        # our cwd (e.g. /root), which makes initdb print warnings.
        return subprocess.run(
            argv,
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=COMMAND_TIMEOUT,
        )
    except FileNotFoundError as exc:
        raise ClusterError(f"{what}: cannot run {argv[0]!r}: {exc}") from exc
    except subprocess.TimeoutExpired as exc:
        output = (exc.stdout or "") + (exc.stderr or "")
        if isinstance(output, bytes):
            output = output.decode(errors="replace")
        raise ClusterError(
            f"{what} timed out after {COMMAND_TIMEOUT}s\n{tail(output)}\n{log_tail(log_path)}"
        ) from exc


def tail(text, lines=30):
    """The last *lines* lines of *text*."""
    return "\n".join(text.strip().splitlines()[-lines:])


def log_tail(log_path, lines=30):
    """The last lines of the server log, headed by its path (for error messages)."""
    try:
        with open(log_path, encoding="utf-8", errors="replace") as f:
            text = f.read()
    except OSError:
        return "(no server log)"
    return f"--- last lines of {log_path} ---\n{tail(text, lines)}"


def file_size(path):
    """The size of *path*, 0 if it does not exist (yet)."""
    try:
        return os.path.getsize(path)
    except OSError:
        return 0


def read_from(path, offset):
    """What *path* holds from *offset* on ("" if unreadable): the log lines of one start."""
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            f.seek(offset)
            return f.read()
    except OSError:
        return ""
