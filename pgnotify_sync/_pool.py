"""A small thread-safe pool of regular connections (catch-up reads, publish, cleanup).

psycopg2's ThreadedConnectionPool raises when exhausted; callers here wait for a
free slot instead (a semaphore in front of it). A connection that sat idle
for more than ``validate_after_s`` is checked on checkout (one round trip), so a
connection killed while idle (server restart, tunnel death) is discarded and
replaced rather than handed out; one used moments ago is handed out as is (a check
per checkout doubled the cost of short queries), and if it did die meanwhile the
query fails with a connection error and the connection is discarded.
"""

import contextlib
import logging
import threading
import time

import psycopg2
import psycopg2.extensions
import psycopg2.extras

from .errors import ConnectError
from .events import loads

log = logging.getLogger("pgnotify_sync")


class ConnectionPool:
    def __init__(self, name, connect_kwargs_fn, maxconn, statement_timeout_ms=30_000, on_discard=None,
                 validate_after_s=1.0):
        # connect_kwargs_fn() is called for every new connection: with an SSH tunnel
        # the local port can change when the tunnel is rebuilt.
        self.name = name
        self._connect_kwargs_fn = connect_kwargs_fn
        self._maxconn = maxconn
        self._slots = threading.BoundedSemaphore(maxconn)
        self._lock = threading.Lock()
        self._idle = []                 # (connection, monotonic time it was returned)
        self._validate_after_s = validate_after_s
        self._in_use = 0
        self._closed = False
        self._statement_timeout_ms = statement_timeout_ms
        self._on_discard = on_discard
        self.discarded = 0

    @property
    def in_use(self):
        return self._in_use

    def _new_connection(self):
        kwargs = dict(self._connect_kwargs_fn())
        kwargs["options"] = f"-c statement_timeout={int(self._statement_timeout_ms)}"
        try:
            conn = psycopg2.connect(**kwargs)
            # Same decoding as notification payloads (exact numerics).
            psycopg2.extras.register_default_jsonb(conn, loads=loads)
            psycopg2.extras.register_default_json(conn, loads=loads)
            return conn
        except psycopg2.Error as exc:
            raise ConnectError(f"{self.name}: cannot open a pooled connection: {_first_line(exc)}") from exc

    def _healthy(self, conn):
        if conn.closed:
            return False
        try:
            # A cheap round trip: a connection whose server or tunnel died while it sat
            # idle only shows it when used.
            with conn.cursor() as cur:
                cur.execute("SELECT 1")
            conn.rollback()
            return True
        except psycopg2.Error:
            return False

    @contextlib.contextmanager
    def connection(self, timeout_s=30.0):
        """Yield a connection in a transaction; commit on success, rollback on error.

        A connection that failed with a connection-level error is closed, not reused.
        """
        if not self._slots.acquire(timeout=timeout_s):
            raise ConnectError(f"{self.name}: no pooled connection free after {timeout_s} s")
        try:
            with self._lock:
                if self._closed:
                    raise ConnectError(f"{self.name}: pool is closed")
                self._in_use += 1
            conn = None
            try:
                conn = self._checkout()
                try:
                    yield conn
                    conn.commit()
                except BaseException:
                    if not conn.closed:
                        try:
                            conn.rollback()
                        except psycopg2.Error:
                            pass
                    raise
            finally:
                with self._lock:
                    self._in_use -= 1
                    if conn is not None:
                        reusable = (not conn.closed and not self._closed and
                                    conn.info.transaction_status == psycopg2.extensions.TRANSACTION_STATUS_IDLE)
                        if reusable:
                            self._idle.append((conn, time.monotonic()))
                if conn is not None and not reusable:
                    self._discard(conn, dead=conn.closed != 0)
        finally:
            self._slots.release()

    def _checkout(self):
        """An idle connection that still answers, or a new one."""
        while True:
            with self._lock:
                conn, returned_at = self._idle.pop() if self._idle else (None, 0.0)
            if conn is None:
                return self._new_connection()
            if time.monotonic() - returned_at < self._validate_after_s and not conn.closed:
                return conn
            if self._healthy(conn):
                return conn
            self._discard(conn)

    def _discard(self, conn, dead=True):
        if dead:
            with self._lock:
                self.discarded += 1
            if self._on_discard:
                self._on_discard()
        try:
            conn.close()
        except Exception:
            pass

    def close(self):
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, []
        for conn, _ in idle:
            try:
                conn.close()
            except Exception:
                pass


def _first_line(exc):
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]
