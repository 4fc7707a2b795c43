"""A durable consumer's stored positions (``pgnotify_sync.consumers``).

One row per (consumer, channel, partition): the position snapshot, the ids handled
past it (as ranges) and the cursors of catch-ups under way, so the next holder of
the partition resumes where the last one stopped: at least once, never a loss. No
thread of its own: the group (_group.py) restores, the workers save.
"""

import json
import logging

import psycopg2

from ._eventlog import xids_of
from ._snapshot import Snapshot
from .errors import PgNotifyError, first_line

log = logging.getLogger("pgnotify_sync")


# Rows of the consumers' tables are each role's own, keyed by it (sql/install.sql):
# every query names the role it acts as (current_user: a login role that switched
# with SET ROLE acts as that role), so a role that bypasses row-level security (the
# installer, a superuser) never takes another role's row of the same name for its own.
ME = "to_regrole(quote_ident(current_user))"
MINE = " AND role = " + ME

# A checkpoint is stored only by the partition's owner, under the epoch it took it
# with, while its lease runs (fencing: a member that was frozen past its lease, or
# lost it to another, cannot move the position any more). Each is one statement in
# autocommit: one round trip, and no transaction left open holding the row's lock
# if the member freezes right after (it would keep the others from taking it).
_SAVE_SQL = """
UPDATE pgnotify_sync.consumers
   SET position = %(position)s::pg_snapshot, handled = %(handled)s::jsonb, updated_at = now()
 WHERE name = %(name)s AND channel = %(channel)s AND partition = %(partition)s
   AND owner = %(member)s AND epoch = %(epoch)s AND lease_until > clock_timestamp()""" + MINE
_RELEASE_SQL = """
UPDATE pgnotify_sync.consumers
   SET position = %(position)s::pg_snapshot, handled = %(handled)s::jsonb, updated_at = now(),
       owner = NULL, lease_until = NULL
 WHERE name = %(name)s AND channel = %(channel)s AND partition = %(partition)s
   AND owner = %(member)s AND epoch = %(epoch)s AND lease_until > clock_timestamp()""" + MINE


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
        self.member = None              # this group member's id (_group.py)
        self.fenced = None              # fenced(lane): a checkpoint was refused

    def restore(self, cur, lane, position, state):
        """Set *lane* to a stored position (text) and handled state (jsonb), read on
        *cur* (its handled ids' xids are read there)."""
        if isinstance(state, list):         # the first format: ranges only
            state = {"ranges": state}
        ids = [i for first, last in state.get("ranges", ()) for i in range(first, last + 1)]
        lane.partial = [(Snapshot.parse(t), u) for t, u in state.get("cursors", ())]
        lane.position = Snapshot.parse(position)
        lane.handled = xids_of(cur, ids)
        lane.xranges = {}
        lane.catchup_target = None
        lane.catchup_upto = 0
        lane.since_checkpoint = 0

    @staticmethod
    def state(ch, undelivered=None):
        """*ch*'s handled state as stored (jsonb text); ids in *undelivered* (of the
        batch in hand, not yet given to handlers) are not stored as handled."""
        handled = ch.handled
        if undelivered:
            handled = [i for i in handled if i not in undelivered]
        state = {"ranges": id_ranges(handled)}
        cursors = [(str(t), u) for t, u in ch.partial]
        if ch.catchup_target is not None and ch.catchup_upto:
            cursors.append((str(ch.catchup_target), ch.catchup_upto))
        if cursors:
            state["cursors"] = cursors
        return json.dumps(state)

    def save(self, lane, undelivered=None, release=False):
        """Store *lane*'s position, under its lease: refused (False, and the lane
        is reported as fenced) once another member took the partition or the lease
        ran out. *release*: and give the partition up (a hand-over)."""
        lane.since_checkpoint = 0
        try:
            with self._pool.connection(autocommit=True) as conn, conn.cursor() as cur:
                cur.execute(_RELEASE_SQL if release else _SAVE_SQL,
                            {"position": str(lane.position), "handled": self.state(lane, undelivered),
                             "name": self.consumer, "channel": lane.wire, "partition": lane.partition or 0,
                             "member": self.member, "epoch": lane.epoch})
                stored = cur.rowcount == 1
        except (psycopg2.Error, PgNotifyError) as exc:
            # Not fatal: the next batch stores it again; a crash meanwhile means
            # duplicates after restart (at-least-once), never a loss.
            log.warning("%s: consumer %r: cannot store position of %r: %s", self._name, self.consumer, lane.name,
                        first_line(exc))
            return False
        if not stored and self.fenced is not None:
            self.fenced(lane)
        return stored

    def take_gaps(self):
        """[(wire channel, events lost)] trimmed past this consumer's positions since
        the last call (the counters are reset as they are read)."""
        with self._pool.connection() as conn, conn.cursor() as cur:
            cur.execute("UPDATE pgnotify_sync.consumers c SET lost = 0 "
                        "FROM (SELECT role, name, channel, partition, lost FROM pgnotify_sync.consumers "
                        "      WHERE name = %s AND lost > 0" + MINE + " FOR UPDATE) old "
                        "WHERE c.role = old.role AND c.name = old.name AND c.channel = old.channel "
                        "AND c.partition = old.partition RETURNING c.channel, old.lost",
                        (self.consumer,))
            return cur.fetchall()
