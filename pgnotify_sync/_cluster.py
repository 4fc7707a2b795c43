"""A throwaway local PostgreSQL cluster for tests, the ``demo`` command and benchmarks.

``TemporaryCluster`` runs ``initdb`` into a private directory, starts a server that
listens on 127.0.0.1 only (plus a Unix socket in that directory), and removes
everything again on ``cleanup()``.  Durability is switched off (``fsync=off`` and
friends) because the data is disposable and speed matters more.

PostgreSQL refuses to run as root, so when the current process is root every
server command is run as the ``postgres`` OS user through ``runuser``, and the
cluster directory (and the permissions of its parents) are adjusted so that user
can reach it.

Only the standard library and psycopg2 are used, so this module can be imported
without the rest of the package.
"""

import glob
import os
import pwd
import re
import shlex
import shutil
import socket
import stat
import subprocess
import tempfile

import psycopg2
from psycopg2 import sql

__all__ = ["ClusterError", "TemporaryCluster", "find_pg_bindir", "free_port"]

# OS user that owns the server files when we are root.
_PG_OS_USER = "postgres"

# Upper bound for any single initdb / pg_ctl call; pg_ctl's own -t is below it
# so pg_ctl reports the timeout itself (with a useful message) first.
_PG_CTL_WAIT_SECONDS = 60
_COMMAND_TIMEOUT = _PG_CTL_WAIT_SECONDS + 30

# How many ports we try when the server could not bind the one we picked.
_START_ATTEMPTS = 3

# Log phrases meaning "this port is taken" (TCP bind, or the socket lock file).
_PORT_IN_USE = re.compile(
    r"could not bind|address already in use|could not create any TCP/IP sockets"
    r"|lock file \S*\.s\.PGSQL\.\d+\.lock\S* already exists",
    re.IGNORECASE,
)

# sun_path is 108 bytes on Linux; PostgreSQL refuses longer socket paths.
_MAX_SOCKET_PATH = 107


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


def free_port():
    """Return a TCP port on 127.0.0.1 that was free a moment ago.

    Another process may grab it before the server binds it; ``start()`` retries
    with a new port in that case.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _tail(text, lines=30):
    return "\n".join(text.strip().splitlines()[-lines:])


def _format_setting(value):
    # Python booleans would otherwise become "True", which postgres does accept,
    # but "on"/"off" is what every PostgreSQL document shows.
    if value is True:
        return "on"
    if value is False:
        return "off"
    return str(value)


class TemporaryCluster:
    """A disposable PostgreSQL cluster on 127.0.0.1.

    Use as a context manager (start on enter, stop and delete on exit) or call
    ``start()`` / ``cleanup()`` yourself.  ``bindir`` overrides binary discovery.
    """

    host = "127.0.0.1"

    def __init__(
        self,
        base_dir=None,
        port=None,
        user="postgres",
        password="pgnotify-test-pw",
        settings=None,
        bindir=None,
    ):
        self._owns_base_dir = base_dir is None
        if base_dir is None:
            base_dir = tempfile.mkdtemp(prefix="pgnotify-cluster-")
        self.base_dir = os.path.abspath(str(base_dir))
        self._port_was_given = port is not None
        self.port = int(port) if port is not None else free_port()
        self.user = user
        self.password = password
        self.settings = dict(settings or {})
        self._bindir = bindir
        self._socket_dir = None  # decided on first start
        self._owns_socket_dir = False

    # -- paths -----------------------------------------------------------------

    @property
    def data_dir(self):
        return os.path.join(self.base_dir, "data")

    @property
    def log_path(self):
        """The server log file (appended to across restarts)."""
        return os.path.join(self.base_dir, "server.log")

    @property
    def bindir(self):
        if self._bindir is None:
            self._bindir = find_pg_bindir()
        return self._bindir

    # -- running commands --------------------------------------------------------

    def _as_postgres(self):
        return os.geteuid() == 0

    def _run(self, argv, what):
        """Run a server binary (as the postgres user when we are root).

        Returns the CompletedProcess; raises ClusterError if it cannot be run or
        times out.  The caller decides whether a non-zero exit is an error.
        """
        if self._as_postgres():
            argv = ["runuser", "-u", _PG_OS_USER, "--"] + argv
        try:
            # cwd=base_dir: the postgres user may not be allowed into our cwd
            # (e.g. /root), which makes initdb print warnings.
            return subprocess.run(
                argv,
                cwd=self.base_dir,
                stdin=subprocess.DEVNULL,
                capture_output=True,
                text=True,
                timeout=_COMMAND_TIMEOUT,
            )
        except FileNotFoundError as exc:
            raise ClusterError(f"{what}: cannot run {argv[0]!r}: {exc}") from exc
        except subprocess.TimeoutExpired as exc:
            output = (exc.stdout or "") + (exc.stderr or "")
            if isinstance(output, bytes):
                output = output.decode(errors="replace")
            raise ClusterError(
                f"{what} timed out after {_COMMAND_TIMEOUT}s\n{_tail(output)}\n{self._log_tail()}"
            ) from exc

    def _pg(self, name):
        path = os.path.join(self.bindir, name)
        if not os.access(path, os.X_OK):
            raise ClusterError(f"{name} not found or not executable at {path} (bindir={self.bindir})")
        return path

    def _log_tail(self, lines=30):
        try:
            with open(self.log_path, encoding="utf-8", errors="replace") as f:
                text = f.read()
        except OSError:
            return "(no server log)"
        return f"--- last lines of {self.log_path} ---\n{_tail(text, lines)}"

    # -- directory preparation -------------------------------------------------

    def _prepare_dirs(self):
        """Create base_dir and make it usable by the postgres OS user."""
        if not os.path.isdir(self.base_dir):
            os.makedirs(self.base_dir)
            self._owns_base_dir = True
        if self._socket_dir is None:
            self._socket_dir = self._choose_socket_dir()
        if not self._as_postgres():
            return
        try:
            pg = pwd.getpwnam(_PG_OS_USER)
        except KeyError as exc:
            raise ClusterError(
                f"running as root but there is no {_PG_OS_USER!r} OS user to run PostgreSQL as "
                "(it is created by the postgresql packages)"
            ) from exc
        for path in {self.base_dir, self._socket_dir}:
            _allow_traversal_of_parents(path)
            os.chown(path, pg.pw_uid, pg.pw_gid)

    def _choose_socket_dir(self):
        # Deep base dirs (pytest's, say) can exceed the Unix socket path limit;
        # then the socket goes into a short private directory instead.
        longest_name = os.path.join(self.base_dir, ".s.PGSQL.65535.lock")
        if len(longest_name.encode()) <= _MAX_SOCKET_PATH:
            return self.base_dir
        self._owns_socket_dir = True
        return tempfile.mkdtemp(prefix="pgn-sock-")

    # -- lifecycle --------------------------------------------------------------

    def _initialized(self):
        return os.path.exists(os.path.join(self.data_dir, "PG_VERSION"))

    def _initdb(self):
        pwfile = os.path.join(self.base_dir, ".pwfile")
        # Created 0600 from the start: base_dir may be readable by others.
        fd = os.open(pwfile, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(self.password + "\n")
        if self._as_postgres():
            pg = pwd.getpwnam(_PG_OS_USER)
            os.chown(pwfile, pg.pw_uid, pg.pw_gid)
        try:
            # --locale=C: always available, so initdb cannot fail on a missing
            # or mismatched locale in the caller's environment; UTF8 works with it.
            proc = self._run(
                [
                    self._pg("initdb"),
                    "-D", self.data_dir,
                    "-U", self.user,
                    "-E", "UTF8",
                    "--locale=C",
                    "--no-instructions",
                    "--auth-local=trust",
                    "--auth-host=scram-sha-256",
                    f"--pwfile={pwfile}",
                ],
                "initdb",
            )
        finally:
            os.unlink(pwfile)
        if proc.returncode != 0:
            raise ClusterError(
                f"initdb failed (exit {proc.returncode}) for {self.data_dir}\n"
                f"{_tail(proc.stdout + proc.stderr)}"
            )

    def _server_options(self):
        # synchronous_commit stays on: with it off, commits of the last ~200 ms
        # (whose notifications were already delivered) vanish in an immediate stop,
        # and with fsync=off it buys no measurable speed.
        options = {
            "listen_addresses": self.host,
            "fsync": "off",
            "full_page_writes": "off",
            "max_connections": "200",
        }
        options.update({k: _format_setting(v) for k, v in self.settings.items()})
        # pg_ctl hands -o to /bin/sh, so every word must be shell-quoted.
        words = ["-p", str(self.port), "-k", self._socket_dir]
        for key, value in options.items():
            words += ["-c", f"{key}={value}"]
        return " ".join(shlex.quote(w) for w in words)

    def _pg_ctl_start(self):
        return self._run(
            [
                self._pg("pg_ctl"),
                "-D", self.data_dir,
                "-l", self.log_path,
                "-w", "-t", str(_PG_CTL_WAIT_SECONDS),
                "-o", self._server_options(),
                "start",
            ],
            "pg_ctl start",
        )

    def start(self):
        """initdb (first time only) and start the server; return self."""
        self._prepare_dirs()
        if not self._initialized():
            self._initdb()
        if self.is_running():
            return self
        for attempt in range(1, _START_ATTEMPTS + 1):
            log_size = _file_size(self.log_path)
            proc = self._pg_ctl_start()
            if proc.returncode == 0:
                return self
            new_log = _read_from(self.log_path, log_size)
            port_taken = bool(_PORT_IN_USE.search(new_log))
            if port_taken and not self._port_was_given and attempt < _START_ATTEMPTS:
                # free_port() races with other processes; just pick another one.
                self.port = free_port()
                continue
            raise ClusterError(
                f"pg_ctl start failed (exit {proc.returncode}) on port {self.port}"
                f"{' (port in use)' if port_taken else ''}\n"
                f"{_tail(proc.stdout + proc.stderr)}\n{self._log_tail()}"
            )
        raise AssertionError("unreachable")  # the loop always returns or raises

    def is_running(self):
        if not self._initialized():
            return False
        # pg_ctl status: 0 running, 3 not running, 4 no data directory.
        proc = self._run([self._pg("pg_ctl"), "-D", self.data_dir, "status"], "pg_ctl status")
        return proc.returncode == 0

    def stop(self, mode="fast"):
        """Stop the server; stopping a stopped (or never started) cluster is fine."""
        if not self.is_running():
            return
        proc = self._run(
            [
                self._pg("pg_ctl"),
                "-D", self.data_dir,
                "-w", "-t", str(_PG_CTL_WAIT_SECONDS),
                "-m", mode,
                "stop",
            ],
            "pg_ctl stop",
        )
        # A concurrent stop may win the race; only complain if it is still up.
        if proc.returncode != 0 and self.is_running():
            raise ClusterError(
                f"pg_ctl stop -m {mode} failed (exit {proc.returncode})\n"
                f"{_tail(proc.stdout + proc.stderr)}\n{self._log_tail()}"
            )

    def restart(self, mode="fast"):
        self.stop(mode)
        return self.start()

    def cleanup(self):
        """Stop immediately and delete what we created (base_dir only if ours)."""
        if os.path.isdir(self.base_dir):
            self.stop("immediate")
        if self._owns_base_dir:
            shutil.rmtree(self.base_dir, ignore_errors=True)
        if self._owns_socket_dir and self._socket_dir:
            shutil.rmtree(self._socket_dir, ignore_errors=True)

    def __enter__(self):
        try:
            return self.start()
        except BaseException:
            # __exit__ is not called when __enter__ fails; don't leak the dir.
            self.cleanup()
            raise

    def __exit__(self, exc_type, exc, tb):
        self.cleanup()

    def __repr__(self):
        return f"<TemporaryCluster {self.host}:{self.port} base_dir={self.base_dir!r}>"

    # -- client side ------------------------------------------------------------

    def conninfo(self, dbname="postgres"):
        """Keyword arguments for ``psycopg2.connect(**d)``."""
        return {
            "host": self.host,
            "port": self.port,
            "user": self.user,
            "password": self.password,
            "dbname": dbname,
        }

    def connect(self, dbname="postgres", autocommit=True):
        conn = psycopg2.connect(**self.conninfo(dbname))
        conn.autocommit = autocommit
        return conn

    def _admin(self, fn):
        conn = self.connect("postgres", autocommit=True)
        try:
            with conn.cursor() as cur:
                return fn(cur, conn.server_version)
        finally:
            conn.close()

    def create_database(self, name):
        def create(cur, _version):
            cur.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))

        self._admin(create)

    def drop_database(self, name):
        """Drop ``name`` if it exists, disconnecting anyone still using it."""

        def drop(cur, version):
            ident = sql.Identifier(name)
            if version >= 130000:
                cur.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(ident))
            else:
                _terminate(cur, version, name, None)
                cur.execute(sql.SQL("DROP DATABASE IF EXISTS {}").format(ident))

        self._admin(drop)

    def terminate_backends(self, dbname=None, application_name=None):
        """pg_terminate_backend every other client backend matching the filters.

        Returns how many were terminated.  On PostgreSQL 14+ this waits (up to
        5 s each) until those backends have actually exited.
        """
        return self._admin(lambda cur, version: _terminate(cur, version, dbname, application_name))


def _terminate(cur, server_version, dbname, application_name):
    # The timeout form (PG 14+) makes the call return only once the backend is
    # gone, so callers observe the disconnect without polling.
    call = "pg_terminate_backend(pid, 5000)" if server_version >= 140000 else "pg_terminate_backend(pid)"
    cur.execute(
        f"""
        SELECT count(*) FILTER (WHERE {call})
        FROM pg_stat_activity
        WHERE pid <> pg_backend_pid()
          AND backend_type = 'client backend'
          AND (%(db)s::text IS NULL OR datname = %(db)s)
          AND (%(app)s::text IS NULL OR application_name = %(app)s)
        """,
        {"db": dbname, "app": application_name},
    )
    return cur.fetchone()[0]


def _allow_traversal_of_parents(path):
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


def _file_size(path):
    try:
        return os.path.getsize(path)
    except OSError:
        return 0


def _read_from(path, offset):
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            f.seek(offset)
            return f.read()
    except OSError:
        return ""
