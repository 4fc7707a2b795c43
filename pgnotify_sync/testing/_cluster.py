"""The throwaway cluster: ``TemporaryCluster`` creates, starts, stops and deletes one server.

``TemporaryCluster`` runs ``initdb`` into a private directory, starts a server that
listens on 127.0.0.1 only (plus a Unix socket in that directory), and removes
everything again on ``cleanup()``.  Durability is switched off (``fsync=off`` and
friends) because the data is disposable and speed matters more.

Running the binaries is _server.py's job, the root / ``postgres`` OS user file
handling _postgres_user.py's, the superuser's SQL _admin.py's.  These four modules
use only the standard library and psycopg2, nothing else of pgnotify_sync.
"""

import os
import secrets
import re
import shlex
import shutil
import tempfile

import psycopg2

from . import _admin, _postgres_user, _server
from ._server import ClusterError, find_pg_bindir, free_port

__all__ = ["ClusterError", "TemporaryCluster"]

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
    ``start()`` / ``cleanup()`` yourself.  ``bindir`` overrides binary discovery;
    ``password`` is random per cluster unless given. ``settings`` are extra server settings (``{"work_mem": "8MB"}``).

    Server: ``start()``, ``stop(mode)``, ``restart(mode)``, ``is_running()``,
    ``cleanup()``; ``host``, ``port``, ``user``, ``password``, ``base_dir``,
    ``data_dir``, ``log_path``.  Client side: ``conninfo(dbname)``,
    ``connect(dbname)``, ``create_database``, ``drop_database``,
    ``terminate_backends(dbname, application_name)``.
    """

    host = "127.0.0.1"

    def __init__(
        self,
        base_dir=None,
        port=None,
        user="postgres",
        password=None,
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
        # A random password per cluster (unless given): another local user, or a
        # test that leaks a connection string, learns nothing that opens the next one.
        self.password = password if password is not None else secrets.token_urlsafe(18)
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

    def _run(self, argv, what):
        """Run a server binary (as the postgres user when we are root), in base_dir.

        Every server command goes through here (tests/_nopostgres.py wraps it).
        Returns the CompletedProcess; raises ClusterError if it cannot be run or
        times out.  The caller decides whether a non-zero exit is an error.
        """
        return _server.run(_postgres_user.command(argv), self.base_dir, what, self.log_path)

    def _pg(self, name):
        return _server.binary(self.bindir, name)

    def _log_tail(self):
        return _server.log_tail(self.log_path)

    # -- directory preparation -------------------------------------------------

    def _prepare_dirs(self):
        """Create base_dir and make it usable by the postgres OS user."""
        if not os.path.isdir(self.base_dir):
            os.makedirs(self.base_dir)
            self._owns_base_dir = True
        if self._socket_dir is None:
            self._socket_dir = self._choose_socket_dir()
        _postgres_user.hand_over([self.base_dir, self._socket_dir])

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
        _postgres_user.write_secret(pwfile, self.password + "\n")
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
                f"{_server.tail(proc.stdout + proc.stderr)}"
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
                "-w", "-t", str(_server.PG_CTL_WAIT_SECONDS),
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
            log_size = _server.file_size(self.log_path)
            proc = self._pg_ctl_start()
            if proc.returncode == 0:
                return self
            new_log = _server.read_from(self.log_path, log_size)
            port_taken = bool(_PORT_IN_USE.search(new_log))
            if port_taken and not self._port_was_given and attempt < _START_ATTEMPTS:
                # free_port() races with other processes; just pick another one.
                self.port = free_port()
                continue
            raise ClusterError(
                f"pg_ctl start failed (exit {proc.returncode}) on port {self.port}"
                f"{' (port in use)' if port_taken else ''}\n"
                f"{_server.tail(proc.stdout + proc.stderr)}\n{self._log_tail()}"
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
                "-w", "-t", str(_server.PG_CTL_WAIT_SECONDS),
                "-m", mode,
                "stop",
            ],
            "pg_ctl stop",
        )
        # A concurrent stop may win the race; only complain if it is still up.
        if proc.returncode != 0 and self.is_running():
            raise ClusterError(
                f"pg_ctl stop -m {mode} failed (exit {proc.returncode})\n"
                f"{_server.tail(proc.stdout + proc.stderr)}\n{self._log_tail()}"
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

    def _as_superuser(self, fn):
        conn = self.connect("postgres", autocommit=True)
        try:
            with conn.cursor() as cur:
                return fn(cur, conn.server_version)
        finally:
            conn.close()

    def create_database(self, name):
        self._as_superuser(lambda cur, _version: _admin.create_database(cur, name))

    def drop_database(self, name):
        """Drop ``name`` if it exists, disconnecting anyone still using it."""
        self._as_superuser(lambda cur, version: _admin.drop_database(cur, version, name))

    def terminate_backends(self, dbname=None, application_name=None):
        """pg_terminate_backend every other client backend matching the filters.

        Returns how many were terminated.  On PostgreSQL 14+ this waits (up to
        5 s each) until those backends have actually exited.
        """
        return self._as_superuser(
            lambda cur, version: _admin.terminate_backends(cur, version, dbname, application_name))
