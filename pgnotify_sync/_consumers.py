"""A durable consumer's stored positions (``pgnotify_sync.consumers``).

One row per (consumer, channel): the position snapshot, the ids handled past it (as
ranges) and the cursors of catch-ups under way, so a restarted process resumes
where the last one stopped: at least once, never a loss. No thread of its own: the
listener's reader loads, its workers save.
"""

import json
import logging

import psycopg2

from ._eventlog import xids_of
from ._snapshot import Snapshot
from .errors import PgNotifyError, PrivilegeError, first_line

log = logging.getLogger("pgnotify_sync")


def id_ranges(ids):
    """Sorted ids as [first, last] ranges (compact: ids handled live are mostly consecutive)."""
    ranges = []
    for ident in sorted(ids):
        if ranges and ranges[-1][1] == ident - 1:
            ranges[-1][1] = ident
        else:
            ranges.append([ident, ident])
    return ranges


class ConsumerStore:
    """The positions of consumer *consumer*, on connections of *pool*."""

    def __init__(self, pool, consumer, listener_name):
        self._pool = pool
        self.consumer = consumer
        self._name = listener_name      # for log lines

    def load(self, channels, start):
        """Restore each channel's position; a new consumer starts at *start* ("now")."""
        with self._pool.connection() as conn, conn.cursor() as cur:
            cur.execute("SELECT channel, position::text, handled FROM pgnotify_sync.consumers WHERE name = %s",
                        (self.consumer,))
            stored = {row[0]: row[1:] for row in cur.fetchall()}
            for ch in channels:
                if ch.wire in stored:
                    position, state = stored[ch.wire]
                    if isinstance(state, list):         # the first format: ranges only
                        state = {"ranges": state}
                    ids = [i for first, last in state.get("ranges", ()) for i in range(first, last + 1)]
                    ch.partial = [(Snapshot.parse(t), u) for t, u in state.get("cursors", ())]
                    ch.position = Snapshot.parse(position)
                    ch.handled = xids_of(cur, ids)
                    log.info("%s: consumer %r resumes channel %r", self._name, self.consumer, ch.name)
                else:
                    ch.position = start
                    ch.handled = {}
                    cur.execute("INSERT INTO pgnotify_sync.consumers (name, channel, position) "
                                "VALUES (%s, %s, %s::pg_snapshot) ON CONFLICT DO NOTHING",
                                (self.consumer, ch.wire, str(start)))
                    if cur.rowcount == 0:
                        self._check_visible(cur, ch)
                    log.info("%s: new consumer %r starts channel %r now", self._name, self.consumer, ch.name)

    def _check_visible(self, cur, ch):
        """A stored position we did not see, and could not insert, is another role's
        (each role sees only its own): refused, else ours would never be stored."""
        cur.execute("SELECT 1 FROM pgnotify_sync.consumers WHERE name = %s AND channel = %s", (self.consumer, ch.wire))
        if cur.fetchone() is None:
            raise PrivilegeError(f"{self._name}: consumer name {self.consumer!r} on channel {ch.name!r} is kept by "
                                 "another database role: choose another consumer name for this role")

    def save(self, ch, undelivered=None):
        """Store *ch*'s position; ids in *undelivered* (of the batch in hand, not yet
        given to handlers) are not stored as handled."""
        ch.since_checkpoint = 0
        handled = ch.handled
        if undelivered:
            handled = [i for i in handled if i not in undelivered]
        state = {"ranges": id_ranges(handled)}
        cursors = [(str(t), u) for t, u in ch.partial]
        if ch.catchup_target is not None and ch.catchup_upto:
            cursors.append((str(ch.catchup_target), ch.catchup_upto))
        if cursors:
            state["cursors"] = cursors
        try:
            with self._pool.connection() as conn, conn.cursor() as cur:
                cur.execute("UPDATE pgnotify_sync.consumers SET position = %s::pg_snapshot, handled = %s::jsonb, "
                            "updated_at = now() WHERE name = %s AND channel = %s",
                            (str(ch.position), json.dumps(state), self.consumer, ch.wire))
        except (psycopg2.Error, PgNotifyError) as exc:
            # Not fatal: the next batch stores it again; a crash meanwhile means
            # duplicates after restart (at-least-once), never a loss.
            log.warning("%s: consumer %r: cannot store position of %r: %s", self._name, self.consumer, ch.name,
                        first_line(exc))

    def take_gaps(self):
        """[(wire channel, events lost)] trimmed past this consumer's positions since
        the last call (the counters are reset as they are read)."""
        with self._pool.connection() as conn, conn.cursor() as cur:
            cur.execute("UPDATE pgnotify_sync.consumers c SET lost = 0 "
                        "FROM (SELECT name, channel, lost FROM pgnotify_sync.consumers "
                        "      WHERE name = %s AND lost > 0 FOR UPDATE) old "
                        "WHERE c.name = old.name AND c.channel = old.channel RETURNING c.channel, old.lost",
                        (self.consumer,))
            return cur.fetchall()
