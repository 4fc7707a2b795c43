"""Dead letters (``pgnotify_sync.dead_letters``): events a durable consumer's handler
failed on for good, parked so delivery goes on; listed, retried and dropped from the
CLI or the Listener. No thread of its own: workers park and redeliver, the
maintenance thread looks for retries asked for.

A dead letter holds no row values: the event stays in the log while it is parked
(trim keeps it), and a retry reads it from there. A retry is asked for in the
database (``retry_requested``), so it reaches the consumer whether it runs now (its
maintenance thread looks every POLL_S) or starts later. Only the lane holding the
event's partition delivers it, and only while the request stands: a delivery
deletes the dead letter, a failure parks it again (which clears the request), an
interruption leaves it asked for.
"""

import logging

import psycopg2

from ._channel import Redeliver, lanes
from ._consumers import MINE
from .errors import PgNotifyError, first_line

log = logging.getLogger("pgnotify_sync")

# How often a running consumer looks for retries asked for (and counts its dead
# letters for the metric).
POLL_S = 2.0
# The stored error's first line is cut here (it is the handler's own text).
ERROR_MAX = 300

_PARK = """
INSERT INTO pgnotify_sync.dead_letters (consumer, channel, event_id, attempts, error_type, error)
VALUES (%(consumer)s, %(channel)s, %(id)s, %(attempts)s, %(type)s, %(error)s)
ON CONFLICT (role, consumer, channel, event_id) DO UPDATE
   SET attempts = dead_letters.attempts + excluded.attempts, error_type = excluded.error_type,
       error = excluded.error, last_failed_at = now(), retry_requested = false
"""
_REQUESTED = ("SELECT 1 FROM pgnotify_sync.dead_letters "
              "WHERE consumer = %s AND channel = %s AND event_id = %s AND retry_requested" + MINE)
_DONE = "DELETE FROM pgnotify_sync.dead_letters WHERE consumer = %s AND channel = %s AND event_id = %s" + MINE
_POLL = ("SELECT channel, count(*), coalesce(array_agg(event_id ORDER BY event_id) FILTER (WHERE retry_requested), "
         "'{}') FROM pgnotify_sync.dead_letters WHERE consumer = %s" + MINE + " GROUP BY channel")


class DeadLetters:
    """Consumer *consumer*'s dead letters, on connections of *pool*."""

    def __init__(self, pool, consumer):
        self._pool = pool
        self.consumer = consumer

    def park(self, wire, event, exc, attempts):
        """Store *event* as a dead letter (raises if the database cannot be reached:
        the caller must then not pass the event)."""
        with self._pool.connection(autocommit=True) as conn, conn.cursor() as cur:
            cur.execute(_PARK, {"consumer": self.consumer, "channel": wire, "id": event.id, "attempts": attempts,
                                "type": type(exc).__name__, "error": first_line(exc)[:ERROR_MAX]})

    def requested(self, wire, event_id):
        """True if the retry of *event_id* is still asked for (the lane holding its
        partition asks right before it delivers: its earlier attempt may have ended
        it, by delivering or parking it again)."""
        with self._pool.connection(autocommit=True) as conn, conn.cursor() as cur:
            cur.execute(_REQUESTED, (self.consumer, wire, event_id))
            return cur.fetchone() is not None

    def done(self, wire, event_id):
        with self._pool.connection(autocommit=True) as conn, conn.cursor() as cur:
            cur.execute(_DONE, (self.consumer, wire, event_id))

    def poll(self):
        """{wire: (dead letters, [ids whose retry is asked for])}."""
        with self._pool.connection(autocommit=True) as conn, conn.cursor() as cur:
            cur.execute(_POLL, (self.consumer,))
            return {wire: (n, list(ids)) for wire, n, ids in cur.fetchall()}


# -- for the CLI and the Listener (a connection of the caller's) ------------------------------


def list_dead_letters(conn, consumer=None, channel=None, mine=False):
    """The dead letters this role may see (*mine*: this role's own only; an admin
    sees every role's), as dicts (oldest failure first)."""
    with conn.cursor() as cur:
        cur.execute("SELECT consumer, channel, event_id, attempts, error_type, error, first_failed_at, "
                    "last_failed_at, retry_requested FROM pgnotify_sync.dead_letters "
                    "WHERE (%(consumer)s IS NULL OR consumer = %(consumer)s) "
                    "AND (%(channel)s IS NULL OR channel = %(channel)s)" + (MINE if mine else "") +
                    " ORDER BY first_failed_at, event_id",
                    {"consumer": consumer, "channel": channel})
        names = [d[0] for d in cur.description]
        return [dict(zip(names, row)) for row in cur.fetchall()]


def request_retry(conn, consumer, ids=None):
    """Ask consumer *consumer* (this role's) to deliver these dead letters again
    (None: all); returns how many."""
    return _change(conn, "UPDATE pgnotify_sync.dead_letters SET retry_requested = true", consumer, ids)


def drop_dead_letters(conn, consumer, ids=None):
    """Forget these dead letters (None: all); returns how many."""
    return _change(conn, "DELETE FROM pgnotify_sync.dead_letters", consumer, ids)


def _change(conn, statement, consumer, ids):
    with conn.cursor() as cur:
        cur.execute(statement + " WHERE consumer = %s AND (%s::bigint[] IS NULL OR event_id = ANY(%s::bigint[]))"
                    + MINE,
                    (consumer, ids, ids))
        n = cur.rowcount
    conn.commit()
    return n


def queue_retries(name, store, channels, push):
    """The maintenance thread's, every POLL_S: count each channel's dead letters (the
    gauge), and hand those whose retry was asked for to the lanes this member holds
    (one Redeliver a lane at a time)."""
    try:
        polled = store.poll()
    except (psycopg2.Error, PgNotifyError) as exc:
        log.warning("%s: cannot read dead letters: %s", name, first_line(exc))
        return
    for ch in list(channels.values()):
        count, retry = polled.get(ch.wire, (0, []))
        ch.dead_letters = count
        for lane in lanes(ch) if retry else ():
            if lane.active and not lane.redeliver_pending:
                lane.redeliver_pending = True
                push(lane, Redeliver(retry))
