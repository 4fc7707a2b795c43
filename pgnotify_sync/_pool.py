"""A small thread-safe pool of regular connections (catch-up reads, publish, cleanup).

psycopg2's ThreadedConnectionPool raises when exhausted; callers here wait for a
free slot instead (a semaphore in front of it). A connection that sat idle
for more than ``validate_after_s`` is checked on checkout (one round trip), so a
connection killed while idle (server restart, tunnel death) is discarded and
replaced rather than handed out; one used moments ago is handed out as is (a check
per checkout doubled the cost of short queries), and if it did die meanwhile the
query fails with a connection error and the connection is discarded.

Every checkout has a client-side deadline: on a frozen path (a paused proxy or SSH
session, whose kernel still ACKs) a query never gets an answer, TCP keepalives see
nothing and the server's statement_timeout cannot reach us. A watcher thread shuts
the socket of a connection past its deadline down, which makes the blocked libpq
call fail at once; the connection is discarded and the caller gets QueryTimeout
(and redoes the work on a fresh connection).
"""

import contextlib
import logging
import os
import socket
import threading
import time

import psycopg2
import psycopg2.extensions
import psycopg2.extras

from ._threads import join_all, spawn
from .errors import ConnectError, QueryTimeout, translated
from .events import loads

log = logging.getLogger("pgnotify_sync")

# How long connection() waits for a free pooled connection by default: fetch
# threads outnumber connections during bursts and queue here for a while.
WAIT_S = 30.0
# The client-side deadline comes this long after the server's statement_timeout,
# so the server's own error (clearer) wins whenever the server can still send it.
DEADLINE_MARGIN_S = 1.0
# The watcher looks at the deadlines this often: a query past its deadline is cut
# at most this late.
WATCH_EVERY_S = 0.2
# A connection idle for less than this is handed out without a round trip to check
# it (a burst of short reads pays no extra query); older ones are checked first.
VALIDATE_AFTER_S = 1.0


class ConnectionPool:
    def __init__(self, name, connect_kwargs_fn, maxconn, *, statement_timeout_ms, validate_after_s=VALIDATE_AFTER_S,
                 deadline_s=None):
        # connect_kwargs_fn() is called for every new connection: with an SSH tunnel
        # the local port can change when the tunnel is rebuilt.
        self.name = name
        self._connect_kwargs_fn = connect_kwargs_fn
        self._slots = threading.BoundedSemaphore(maxconn)
        self._maxconn = maxconn
        self._lock = threading.Lock()
        self._idle = []                 # (connection, monotonic time it was returned)
        self._validate_after_s = validate_after_s
        self._in_use = 0
        self._closed = False
        self._statement_timeout_ms = statement_timeout_ms
        # The client-side deadline leaves the server's statement_timeout the first word.
        self._deadline_s = deadline_s if deadline_s is not None else statement_timeout_ms / 1000.0 + DEADLINE_MARGIN_S
        self._deadlines = {}            # connection -> monotonic deadline (checked out)
        self._expired = set()           # connections whose socket the watcher shut down
        self._watcher = None
        self._wake = threading.Condition(self._lock)
        self.discarded = 0
        self.timeouts = 0

    def threads(self):
        return [self._watcher] if self._watcher is not None else []

    @property
    def in_use(self):
        return self._in_use

    def _new_connection(self):
        kwargs = dict(self._connect_kwargs_fn())
        kwargs["options"] = f"-c statement_timeout={int(self._statement_timeout_ms)}"
        with translated(ConnectError, f"{self.name}: cannot open a pooled connection"):
            conn = psycopg2.connect(**kwargs)
            # Same decoding as notification payloads (exact numerics).
            psycopg2.extras.register_default_jsonb(conn, loads=loads)
            psycopg2.extras.register_default_json(conn, loads=loads)
            return conn

    def _healthy(self, conn):
        if conn.closed:
            return False
        try:
            # One round trip (autocommit: no BEGIN, no ROLLBACK): a connection whose
            # server or tunnel died while it sat idle only shows it when used.
            conn.autocommit = True
            with conn.cursor() as cur:
                cur.execute("SELECT 1")
            conn.autocommit = False
            return True
        except psycopg2.Error:
            return False

    @contextlib.contextmanager
    def connection(self, timeout_s=WAIT_S, autocommit=False):
        """Yield a connection in a transaction; commit on success, rollback on error.
        With *autocommit* each statement is its own transaction: one round trip for a
        single read instead of three (BEGIN, the query, COMMIT).

        A connection that failed with a connection-level error is closed, not reused.
        The whole block has the pool's deadline; past it the connection is closed and
        :class:`QueryTimeout` raised.
        """
        if not self._slots.acquire(timeout=timeout_s):
            raise ConnectError(f"{self.name}: no pooled connection free after {timeout_s} s")
        try:
            with self._lock:
                if self._closed:
                    raise ConnectError(f"{self.name}: pool is closed")
                self._in_use += 1
                self._start_watcher_locked()
            conn = None
            try:
                conn = self._checkout()
                self._guard(conn)
                try:
                    if autocommit:
                        conn.autocommit = True      # client side only: no round trip
                        try:
                            yield conn
                        finally:
                            if not conn.closed:
                                conn.autocommit = False
                    else:
                        yield conn
                    conn.commit()
                except BaseException as exc:
                    if not conn.closed and conn not in self._expired:
                        try:
                            conn.rollback()
                        except psycopg2.Error:
                            pass
                    if conn in self._expired and isinstance(exc, psycopg2.Error):
                        raise QueryTimeout(f"{self.name}: no answer within {self._deadline_s:g} s "
                                           "(frozen network path?); connection closed") from exc
                    raise
            finally:
                self._checkin(conn)
        finally:
            self._slots.release()

    def _checkin(self, conn):
        """The end of a connection() block: *conn* (None if none was checked out)
        goes back to the idle list, or is discarded."""
        reusable = expired = False
        with self._lock:
            self._in_use -= 1
            if conn is None:
                return
            self._deadlines.pop(conn, None)
            expired = conn in self._expired
            self._expired.discard(conn)
            reusable = (not expired and not conn.closed and not self._closed and
                        conn.info.transaction_status == psycopg2.extensions.TRANSACTION_STATUS_IDLE)
            if reusable:
                self._idle.append((conn, time.monotonic()))
            elif conn.closed or expired:
                # Its siblings came the same way (a tunnel, a proxy): each is checked
                # before its next use, so a retry does not take one that died with it.
                self._idle = [(c, 0.0) for c, _ in self._idle]
        if not reusable:
            self._discard(conn, dead=conn.closed != 0 or expired)

    def fill(self, count):
        """Open connections until *count* (at most the pool's size) exist, idle or in
        use: a read that needs one then does not pay a connect (~10 ms of CPU for
        the handshake and authentication on both ends) on the delivery path. A
        failure is left to the next checkout, which reports it. Returns how many
        were opened."""
        opened = 0
        while True:
            with self._lock:
                if self._closed or len(self._idle) + self._in_use >= min(count, self._maxconn):
                    return opened
            try:
                conn = self._new_connection()
            except ConnectError as exc:
                log.debug("%s: could not open a spare connection: %s", self.name, exc)
                return opened
            with self._lock:
                if self._closed:
                    conn.close()
                    return opened
                self._idle.insert(0, (conn, time.monotonic()))
            opened += 1

    def _guard(self, conn):
        with self._lock:
            self._deadlines[conn] = time.monotonic() + self._deadline_s

    def _start_watcher_locked(self):
        if self._watcher is None:
            self._watcher = spawn(self._watch, f"{self.name}-deadlines")

    def _watch(self):
        with self._lock:
            while not self._closed:
                self._wake.wait(WATCH_EVERY_S)
                now = time.monotonic()
                for conn, deadline in list(self._deadlines.items()):
                    if now >= deadline and conn not in self._expired:
                        self._expired.add(conn)
                        self.timeouts += 1
                        _shut_down(conn)
                        log.warning("%s: a pooled query got no answer within %g s: connection closed",
                                    self.name, self._deadline_s)

    def _checkout(self):
        """An idle connection that still answers, or a new one."""
        while True:
            with self._lock:
                conn, returned_at = self._idle.pop() if self._idle else (None, 0.0)
            if conn is None:
                return self._new_connection()
            if time.monotonic() - returned_at < self._validate_after_s and not conn.closed:
                return conn
            self._guard(conn)
            healthy = self._healthy(conn)
            with self._lock:
                self._deadlines.pop(conn, None)
                healthy = healthy and conn not in self._expired
                self._expired.discard(conn)
            if healthy:
                return conn
            self._discard(conn)

    def _discard(self, conn, dead=True):
        if dead:
            with self._lock:
                self.discarded += 1
        try:
            conn.close()
        except Exception:
            pass

    def close(self, timeout_s=2.0):
        """Close every connection (a query blocked on a frozen path fails at once);
        returns the names of the pool's threads still running after *timeout_s*."""
        watcher = None
        with self._lock:
            self._closed = True
            self._wake.notify_all()
            idle, self._idle = self._idle, []
            # A thread still blocked on a frozen path must not outlive stop().
            for conn in self._deadlines:
                self._expired.add(conn)
                _shut_down(conn)
            watcher = self._watcher
        late = join_all([watcher], time.monotonic() + timeout_s)
        for conn, _ in idle:
            try:
                conn.close()
            except Exception:
                pass
        return late


def _shut_down(conn):
    """Make every blocked or later libpq call on *conn* fail at once (the socket is
    shut down through a duplicate of its descriptor; libpq still owns and closes it)."""
    try:
        fd = os.dup(conn.fileno())
    except (OSError, psycopg2.Error):
        return
    try:
        sock = socket.socket(fileno=fd)
    except OSError:
        os.close(fd)
        return
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    finally:
        sock.close()

