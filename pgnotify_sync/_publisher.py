"""``listener.publish()``: application events written to the log and notified in
one transaction, retried once on a fresh connection (a unique key per event makes
that safe), and buffered in order while the database is unreachable. No thread of
its own: the maintenance thread flushes the buffer (``flush()``).
"""

import collections
import json
import logging
import threading
import time
import uuid

import psycopg2

from .errors import ConnectError, ListenerStateError, PgNotifyError, PublishBufferFull, first_line

log = logging.getLogger("pgnotify_sync")

# stop() tries to send the buffer again this often until its deadline (the
# database may come back within it).
FLUSH_RETRY_S = 0.1


class Publisher:
    """Publishes on the pool given by *get_pool()* (made on first use)."""

    def __init__(self, name, config, get_pool, stats, report, closed):
        self._name = name
        self._closed = closed               # () -> True once the listener was stopped
        self._config = config
        self._get_pool = get_pool
        self._stats = stats
        self._report = report
        self._lock = threading.Lock()       # held while the buffer is sent: keeps the order
        self._buffer = collections.deque()  # (wire channel, JSON body, key)

    def __len__(self):
        return len(self._buffer)

    def publish(self, channel, payload):
        """See :meth:`Listener.publish`."""
        config = self._config
        wire = config.checked_wire_channel(channel, setting="channel")
        try:
            body = json.dumps(payload)
        except (TypeError, ValueError) as exc:
            raise PgNotifyError(f"publish on {channel!r}: payload is not JSON-serialisable: {exc}") from None
        if self._closed():
            raise ListenerStateError(f"{self._name}: stopped; publish() needs a running listener")
        self._get_pool()
        key = str(uuid.uuid4())
        if not self._buffer:
            try:
                return self._send(wire, body, key)
            except ConnectError:
                if not config.enable_event_buffering:
                    raise
        with self._lock:
            if len(self._buffer) >= config.publish_buffer_size:
                raise PublishBufferFull(
                    f"{self._name}: database unreachable and the publish buffer is full "
                    f"({config.publish_buffer_size} events): the event on {channel!r} was not sent")
            # Behind older buffered events, to keep the order; flush() sends them.
            self._buffer.append((wire, body, key))
            log.warning("%s: database unreachable: publish on %r buffered (%d waiting)", self._name, channel,
                        len(self._buffer))
        return None

    def flush(self):
        """Send buffered publishes in order; returns how many are still waiting."""
        with self._lock:
            while self._buffer:
                wire, body, key = self._buffer[0]
                try:
                    self._send(wire, body, key)
                except ConnectError:
                    break
                self._buffer.popleft()
                self._stats.inc("publish_flushed", 1)
            return len(self._buffer)

    def flush_until(self, deadline):
        """Send the buffer until *deadline* (stop()); report what could not be sent."""
        while self.flush() and time.monotonic() < deadline:
            time.sleep(min(FLUSH_RETRY_S, max(0.0, deadline - time.monotonic())))
        with self._lock:
            lost = len(self._buffer)
            self._buffer.clear()
        if lost:
            self._stats.inc("publish_dropped", lost)
            self._report("publish", f"stop(): {lost} buffered publishes could not be sent "
                                    "(database unreachable until the timeout)", None)

    def _send(self, wire, body, key):
        pool = self._get_pool()
        for attempt in (1, 2):
            try:
                with pool.connection(timeout_s=self._config.connect_timeout_s) as conn, conn.cursor() as cur:
                    cur.execute("SELECT pgnotify_sync.publish(%s, %s::jsonb, %s::uuid)", (wire, body, key))
                    return cur.fetchone()[0]
            except (psycopg2.OperationalError, ConnectError) as exc:
                # A pooled connection that died moments ago (or a reply lost): the key
                # makes one more try on a fresh connection safe either way.
                if attempt == 1:
                    continue
                if isinstance(exc, ConnectError):
                    raise
                raise ConnectError(f"{self._name}: publish on {wire!r} failed: {first_line(exc)}") from exc
            except psycopg2.Error as exc:
                raise PgNotifyError(f"{self._name}: publish on {wire!r} failed: {first_line(exc)}") from exc
