"""The reader: the listener connection and its thread, ``<name>-reader``.

It connects (with the retry policy), LISTENs, takes the start snapshot, then waits
with poll() on the socket and a wake-up pipe, drains notifications in order,
decodes them and hands them to the dispatcher without ever blocking (a blocked
reader would stall the server's notification queue for the whole cluster). It
also runs the health check: a snapshot and a NOTIFY to itself; when the marker
comes back every transaction of that snapshot has been received, so positions
advance, and the round trip proves the whole path is alive. A lost connection is
reconnected with backoff; what was missed meanwhile is caught up from the log.

What it needs of its listener is the :class:`ReaderHost` protocol.
"""

import errno
import logging
import os
import select
import threading
import time
import typing

import psycopg2
import psycopg2.extensions
from psycopg2 import sql

from ._backoff import Backoff
from ._channel import Advance, SetPosition
from ._healthcheck import HealthCheck, Lost, channel_name
from ._lifecycle import ConnectionState
from ._notifications import Router
from ._snapshot import Snapshot
from ._threads import spawn
from .errors import (ConnectError, PgNotifyError, PrivilegeError, SchemaError, first_line, retry_can_fix,
                     translated)
from .metrics import Histogram

log = logging.getLogger("pgnotify_sync")

# The start snapshot, whether our schema is there and usable (no grant: 'no usage';
# an install older than the grants: 'old'), the backend's start time and our role.
_START_SQL = ("SELECT pg_current_snapshot()::text, "
              "CASE WHEN to_regnamespace('pgnotify_sync') IS NULL THEN 'absent' "
              "     WHEN NOT has_schema_privilege('pgnotify_sync', 'USAGE') THEN 'no usage' "
              "     WHEN to_regclass('pgnotify_sync.event_log') IS NULL THEN 'absent' "
              "     WHEN to_regprocedure('pgnotify_sync.unreadable_channels(text[])') IS NULL THEN 'old' "
              "     ELSE 'ok' END, "
              "(SELECT backend_start::text FROM pg_stat_activity WHERE pid = pg_backend_pid()), current_user::text")

def _check_privileges(name, host, role, no_usage, unreadable):
    """A PrivilegeError naming the missing grant: *role* may not use our schema at
    all (*no_usage*), or may not read the channels *unreadable* (wire names)."""
    if no_usage:
        missing = [ch.wire for ch in host.channels.values()]
        what = f"has no grant on pgnotify_sync in database {host.config.postgres_db!r}"
    elif unreadable:
        missing = list(unreadable)
        by_wire = {ch.wire: channel for channel, ch in host.channels.items()}
        what = f"may not read channel(s) {', '.join(repr(by_wire.get(w, w)) for w in missing)} of the event log"
    else:
        return
    raise PrivilegeError(f"{name}: role {role!r} {what}: grant it with pgnotify_sync.grant_listener(conn, {role!r}, "
                         f"{missing!r}) or 'pgnotify-sync grant-listener {role} "
                         + " ".join(f"--channel {w}" for w in missing) + "'")


# Send the marker round trip (which lets positions advance and handled-id sets
# shrink) at least every this many events, not only every health-check interval.
ADVANCE_EVERY = 20_000
# A durable consumer stores its handled ids with every checkpoint: keep them few.
CONSUMER_ADVANCE_EVERY = 1_000


class ReaderHost(typing.Protocol):
    """What the reader uses of its listener."""

    name: str
    config: typing.Any              # Config
    channels: dict                  # logical name -> ChannelState
    consumer: typing.Optional[str]
    stats: typing.Any               # Counters
    dispatcher: typing.Any          # Dispatcher

    def set_state(self, state) -> None: ...
    def emit(self, signal_name, **kwargs) -> None: ...
    def report(self, kind, error, channel, event_id=None, exc_info=False, what=None) -> None: ...
    def load_consumer(self, start) -> None: ...
    def listener_connect_kwargs(self, fresh) -> dict: ...
    def expect_catchup(self) -> None: ...


class _Stopped(Exception):
    """stop() was called while the reader was waiting."""


class WakePipe:
    """The reader's wake-up pipe: ``wake()`` (any thread) interrupts its poll; the
    waits below raise _Stopped once *stop_event* is set."""

    def __init__(self, stop_event):
        self._stop = stop_event
        self.fd, self._w = os.pipe()
        os.set_blocking(self.fd, False)
        os.set_blocking(self._w, False)

    def wake(self):
        fd = self._w
        if fd is not None:
            try:
                os.write(fd, b"x")
            except OSError as exc:
                if exc.errno not in (errno.EAGAIN, errno.EBADF):
                    raise

    def drain(self):
        try:
            while os.read(self.fd, 4096):
                pass
        except (BlockingIOError, OSError):
            pass

    def close(self):
        for fd in (self.fd, self._w):
            if fd is not None:
                try:
                    os.close(fd)
                except OSError:
                    pass
        self.fd = self._w = None

    def wait(self, conn, deadline, what):
        """Drive async connection *conn* until its current operation completes:
        ConnectError on an error or past *deadline*, _Stopped on stop()."""
        wake = self.fd
        while True:
            with translated(ConnectError, what):
                state = conn.poll()
            if state == psycopg2.extensions.POLL_OK:
                return
            left = deadline - time.monotonic()
            if left <= 0:
                raise ConnectError(f"{what}: no answer within the deadline")
            poller = select.poll()
            poller.register(wake, select.POLLIN)
            poller.register(conn.fileno(), select.POLLOUT if state == psycopg2.extensions.POLL_WRITE
                            else select.POLLIN)
            for fd, _ in poller.poll(left * 1000):
                if fd == wake:
                    self.drain()
                    if self._stop.is_set():
                        raise _Stopped()


class Reader:
    """The listener connection of *host*, read on a thread started by :meth:`start`
    (again after FAILED); ends when *stop_event* is set."""

    def __init__(self, host, stop_event):
        self._host = host
        self._name = host.name
        self._stop = stop_event
        cfg = host.config
        self.ready = threading.Event()      # set once LISTENing (or failed): start() waits on it
        self.start_error = None
        self.thread = None
        self.had_session = False
        self.installed = None               # is the schema (event log) there? known after connecting
        self.health_channel = None          # the session's marker channel (random; tests forge on it)
        self._router = Router(self._name, host.dispatcher, host.report, cfg.accept_plain_payloads)
        self.decode_hist = self._router.decode_hist
        self.rtt_hist = Histogram()
        self._backoff = Backoff(cfg.reconnect_delay_ms / 1000.0, cfg.reconnect_delay_max_ms / 1000.0,
                                cfg.max_reconnect_attempts)
        self._stale_backends = []   # (pid, backend_start) of sessions lost (see _end_stale_backends)
        self._tunnel_stale = False
        self._since_advance = 0
        self._advance_every = CONSUMER_ADVANCE_EVERY if host.consumer else ADVANCE_EVERY
        self._wake = WakePipe(stop_event)

    def start(self):
        self.ready.clear()
        self.start_error = None
        self.thread = spawn(self._run, f"{self._name}-reader")

    def is_alive(self):
        return self.thread is not None and self.thread.is_alive()

    def wake(self):
        """Wake the reader from its poll (stop())."""
        self._wake.wake()

    def close(self):
        """Close the wake-up pipe, once the thread has ended."""
        if not self.is_alive():
            self._wake.close()

    def _run(self):
        """Connect, read until the connection is lost, reconnect with backoff; repeat."""
        first = not self.had_session
        failures = 0     # failed attempts since the last good session
        try:
            while not self._stop.is_set():
                try:
                    conn, hc = self._open_session(first)
                except _Stopped:
                    return
                except (PgNotifyError, psycopg2.Error) as exc:
                    failures += 1
                    if not self._wait_to_retry(exc, first, failures):
                        return
                    continue
                if not first:
                    self._host.stats.inc("reconnects", 1)
                first = False
                self.had_session = True
                failures = 0
                if not self._session(conn, hc):
                    return          # stopped
        except Exception as exc:  # a bug: never die silently
            log.exception("%s: reader thread failed", self._name)
            self._fail(PgNotifyError(f"{self._name}: reader failed: {exc!r}"))
        finally:
            self.ready.set()

    def _wait_to_retry(self, exc, first, failures):
        """After failed connect attempt number *failures*: wait out the backoff and
        return True, or False when the listener failed (or was stopped meanwhile)."""
        error = exc if isinstance(exc, PgNotifyError) else ConnectError(first_line(exc))
        if not retry_can_fix(exc, first_session=first):
            # Retrying cannot fix a wrong password or a missing database.
            self._fail(error)     # logs it, once
            return False
        self._host.stats.inc("reconnect_attempts", 1)
        if self._backoff.exhausted(failures):
            self._fail(ConnectError(f"{self._name}: gave up after {failures} attempts: {error}"))
            return False
        delay = self._backoff.delay_s(failures)
        log.warning("%s: connect attempt %d failed (%s); retrying in %.2f s", self._name, failures, error, delay,
                    extra={"event": "reconnecting",
                           "details": {"error": str(error), "attempt": failures + 1, "delay": round(delay * 1000)}})
        self._host.set_state(ConnectionState.CONNECTING if first else ConnectionState.RECONNECTING)
        self._host.emit("reconnecting", attempt=failures + 1, delay_s=delay, error=error)
        return not self._stop.wait(delay)

    def _session(self, conn, hc):
        """Read *conn* until it is lost (True: reconnect) or the listener stops (False)."""
        error = None
        try:
            self._read_loop(conn, hc)
        except Lost as exc:
            error = exc
            self._tunnel_stale = True
            # Behind a frozen path the old backend lives on, LISTENing, and holds
            # the cluster's notification queue tail: the next session ends it.
            if hc.backend is not None:
                self._stale_backends.append(hc.backend)
            log.warning("%s: connection lost: %s", self._name, exc,
                        extra={"event": "disconnected", "details": {"error": str(exc)}})
        finally:
            try:
                conn.close()
            except Exception:
                pass
        self._host.stats.set("connected_since", None)
        if error is None:
            return False
        self._host.set_state(ConnectionState.RECONNECTING)
        self._host.emit("disconnected", error=error)
        # The first attempt goes at once: a killed backend is usually back immediately.
        self._host.emit("reconnecting", attempt=1, delay_s=0.0, error=error)
        return True

    def _fail(self, error):
        self._host.set_state(ConnectionState.FAILED)
        self.start_error = error if isinstance(error, PgNotifyError) else ConnectError(str(error))
        self.ready.set()
        self._host.report("connect", error, None)
        self._host.emit("failed", error=error)

    def _open_session(self, first):
        """Connect, LISTEN on every channel, take the start snapshot."""
        cfg = self._host.config
        deadline = time.monotonic() + cfg.connect_timeout_s
        # The target (and its TLS settings: which CA) in every connect error.
        what = f"cannot connect to {cfg.describe_target()}"
        with translated(ConnectError, what):
            # After a lost session a tunnel is rebuilt even if it looks alive: a
            # frozen SSH session keeps its transport "active".
            fresh, self._tunnel_stale = self._tunnel_stale, False
            conn = psycopg2.connect(async_=True, **self._host.listener_connect_kwargs(fresh))
        try:
            self._wake.wait(conn, deadline, what)
            pid = conn.info.backend_pid
            hc = HealthCheck(channel_name(), time.monotonic() + cfg.health_check_interval_s, pid)
            self.health_channel = hc.channel
            wires = [ch.wire for ch in self._host.channels.values()] + [hc.channel]
            statement = sql.SQL("; ").join(sql.SQL("LISTEN {}").format(sql.Identifier(w)) for w in wires)
            cur = conn.cursor()
            cur.execute(statement)
            self._wake.wait(conn, deadline, "LISTEN")
            # Every transaction not visible in this snapshot commits after our LISTEN,
            # so its notification reaches us.
            cur.execute(_START_SQL)
            self._wake.wait(conn, deadline, "snapshot")
            text, schema, backend_start, role = cur.fetchone()
            start = Snapshot.parse(text)
            hc.backend = (pid, backend_start)
            if self._stale_backends:
                self._end_stale_backends(conn, cur, deadline)
            unreadable = ()
            if schema == "ok":
                cur.execute("SELECT pgnotify_sync.unreadable_channels(%s::text[])", (wires[:-1],))
                self._wake.wait(conn, deadline, "grants")
                unreadable = cur.fetchone()[0]
            cur.close()
            _check_privileges(self._name, self._host, role, schema == "no usage", unreadable)
            self._check_installed(schema != "absent")
            if first and self._host.consumer:
                self._host.load_consumer(start)
        except BaseException:
            conn.close()
            raise
        self._listening(first, start)
        return conn, hc

    def _check_installed(self, installed):
        """Without our schema only plain payloads can be read: refused for a durable
        consumer (it needs the log), warned once otherwise."""
        if not installed:
            cfg = self._host.config
            if self._host.consumer:
                raise SchemaError(f"{self._name}: pgnotify_sync is not installed in database "
                                  f"{cfg.postgres_db!r} (a durable consumer needs its event log): "
                                  "run install() or 'pgnotify-sync install'")
            if self.installed is not False:
                log.warning("%s: pgnotify_sync is not installed in database %r: no event log, so only plain "
                            "payloads (if accept_plain_payloads) and no catch-up (run install() or "
                            "'pgnotify-sync install')", self._name, cfg.postgres_db)
        self.installed = installed

    def _listening(self, first, start):
        """The session is up: a fresh listener starts at *start*; any other catches up."""
        host = self._host
        host.stats.set("connected_since", time.time())
        log.info("%s: listening on %s (%s)", self._name, ", ".join(repr(c) for c in host.channels),
                 host.config.describe_target(),
                 extra={"event": "listening", "details": {"channels": list(host.channels)}})
        host.set_state(ConnectionState.LISTENING)
        if first and not host.consumer:
            for ch in host.channels.values():
                host.dispatcher.push_control(ch, SetPosition(start))
            self.ready.set()
            host.emit("connected")
        else:
            host.expect_catchup()
            self.ready.set()
            host.dispatcher.catch_up_all("reconnect" if not first else "resume")

    def _end_stale_backends(self, conn, cur, deadline):
        """End the backends of earlier sessions that may still live behind a dead or
        frozen path (matched by pid *and* start time: a pid can be reused)."""
        pids = [p for p, _ in self._stale_backends]
        starts = [t for _, t in self._stale_backends]
        try:
            cur.execute("SELECT a.pid, pg_terminate_backend(a.pid) FROM pg_stat_activity a "
                        "JOIN unnest(%s::int[], %s::timestamptz[]) s(pid, started) "
                        "ON a.pid = s.pid AND a.backend_start = s.started WHERE a.pid <> pg_backend_pid()",
                        (pids, starts))
            self._wake.wait(conn, deadline, "ending the previous session")
            ended = cur.fetchall()
        except (ConnectError, psycopg2.Error) as exc:
            if conn.closed:
                raise
            # e.g. a role without the right to signal it: the session goes on.
            log.warning("%s: cannot end the previous session's backend (pids %s): %s", self._name, pids,
                        first_line(exc))
            return
        self._stale_backends.clear()
        for backend_pid, done in ended:
            if done:
                self._host.stats.inc("stale_backends_ended")
                log.info("%s: ended the previous session's backend %d (it held the notification queue)",
                         self._name, backend_pid, extra={"event": "stale_backend", "details": {"pid": backend_pid}})

    def _read_loop(self, conn, hc):
        cfg = self._host.config
        fd = conn.fileno()
        poller = select.poll()
        poller.register(self._wake.fd, select.POLLIN)
        poller.register(fd, select.POLLIN)
        writing = False
        notifies = conn.notifies
        POLL_OK = psycopg2.extensions.POLL_OK
        POLL_WRITE = psycopg2.extensions.POLL_WRITE
        last_rx = 0.0       # when notifications last came in
        while True:
            now = time.monotonic()
            if not hc.pending and self._since_advance >= self._advance_every:
                hc.next_at = now    # bound the handled-id sets under load
            left = (hc.deadline if hc.pending else hc.next_at) - now
            if left <= 0 and hc.pending and now - last_rx < cfg.health_check_timeout_s:
                # The marker is queued behind a backlog we are still reading: the path
                # is alive, so wait on. Only a path silent for a whole timeout is dead.
                hc.deadline = last_rx + cfg.health_check_timeout_s
                left = hc.deadline - now
            if left <= 0:
                if hc.pending:
                    self._host.stats.inc("health_check_failures", 1)
                    raise Lost(f"health check got no answer within {cfg.health_check_timeout_s} s")
                self._send_health_check(conn, hc)
                writing = True
                poller.modify(fd, select.POLLIN | select.POLLOUT)
                continue
            for rfd, _ in poller.poll(left * 1000):
                if rfd == self._wake.fd:
                    self._wake.drain()
                    if self._stop.is_set():
                        return
            with translated(Lost):
                state = conn.poll()
            want_write = state == POLL_WRITE
            if want_write != writing:
                writing = want_write
                poller.modify(fd, select.POLLIN | (select.POLLOUT if writing else 0))
            if notifies:
                last_rx = time.monotonic()
                batch = notifies[:]
                del notifies[:]
                self._handle_notifies(batch, hc)
            if hc.cursor is not None and state == POLL_OK:
                hc.take_snapshot()
                self._health_check_done(hc)

    def _send_health_check(self, conn, hc):
        self._since_advance = 0
        hc.send(conn, self._host.config.health_check_timeout_s)

    def _health_check_done(self, hc):
        rtt = hc.finish(self._host.config.health_check_interval_s)
        if rtt is None:
            return
        self._host.stats.inc("health_checks", 1)
        self._host.stats.set("last_health_rtt_s", rtt)
        self.rtt_hist.observe(rtt)
        advance = Advance(hc.snapshot)
        for ch in self._host.channels.values():
            self._host.dispatcher.push_control(ch, advance, skip_overflowing=True)

    def _handle_notifies(self, batch, hc):
        self._since_advance += self._router.route(batch, hc, self._health_check_done)
