"""Consumer groups: listeners of one consumer name, in any process on any host,
share the work, each partition handled by one live member at a time (owns the
thread ``<name>-group``). PostgreSQL is the only coordinator.

- **Partitions.** Each channel's events are split into ``consumer_partitions``
  partitions by row key (_keys.py). Each (channel, partition) has its own stored
  position (a ``consumers`` row) and, in this process, its own lane (a ChannelState
  with its own queue and worker turn, see _channel.py).
- **Leases.** A member holds a partition by ``owner``, ``epoch`` and ``lease_until``
  in its row, renewed every tick (a third of ``consumer_lease_s``, at most every
  TICK_MAX_S). Times are the database's (``clock_timestamp()``): members' clocks
  never matter. Locally the member counts its lease from *before* the renewal was
  sent, minus LEASE_MARGIN, so it always ends here before it ends in the database:
  a member that cannot renew (frozen, cut off) stops delivering before anyone else
  may take the partition. Every change of owner raises the epoch, and a checkpoint
  is stored only under the owner's epoch while its lease runs (fencing).
- **Members** renew a heartbeat in ``consumer_members``; one silent for a lease is
  removed by the others. The partitions are dealt round-robin over the live members
  sorted by id (every member computes the same deal from the same rows). A member
  gives up what the deal gives another at a clean point (a Release item: everything
  before it handled, the position stored with the release), and takes what the deal
  gives it once it is free or its lease ran out: resumed from the stored position.
  A graceful ``stop()`` hands everything over the same way: no repeat at all.
"""

import logging
import os
import socket
import threading
import time
import uuid

import psycopg2

from ._channel import ChannelState, lease_clock
from ._consumers import ME, MINE
from ._keys import KeyColumns, group_key_columns
from ._threads import join_all, spawn
from .errors import ConfigError, PgNotifyError, PrivilegeError, first_line

log = logging.getLogger("pgnotify_sync")

# The share of a lease a member does not count on: its lease ends here that much
# before it ends in the database (clock rates differ by far less).
LEASE_MARGIN = 0.2
# Ticks (renewals, and a look at who joined or left) at least this often: a
# hand-over waits for the next owner's tick.
TICK_MAX_S = 1.0

_JOIN_GROUP = "INSERT INTO pgnotify_sync.consumer_groups (name, partitions) VALUES (%s, %s) ON CONFLICT DO NOTHING"
_GROUP = "SELECT partitions FROM pgnotify_sync.consumer_groups WHERE name = %s" + MINE
# A channel's partitions the group does not have yet start at the start snapshot,
# or at partition 0's position if it exists (a consumer of an earlier version, with
# one partition: it handled every event of the channel up to there).
_ADD_PARTITIONS = """
INSERT INTO pgnotify_sync.consumers (name, channel, partition, position, handled)
SELECT %(name)s, %(channel)s, p, coalesce(z.position, %(start)s::pg_snapshot), coalesce(z.handled, '[]')
  FROM generate_series(0, %(partitions)s - 1) p
  LEFT JOIN pgnotify_sync.consumers z ON z.name = %(name)s AND z.channel = %(channel)s AND z.partition = 0
        AND z.role = """ + ME + """
ON CONFLICT DO NOTHING
"""
_COUNT_PARTITIONS = ("SELECT channel, count(*) FROM pgnotify_sync.consumers WHERE name = %s AND channel = ANY(%s) "
                     "AND partition < %s" + MINE + " GROUP BY channel")
_JOIN = ("INSERT INTO pgnotify_sync.consumer_members (name, member, host, pid, channels, lease_s) "
         "VALUES (%s, %s, %s, %s, %s, %s) ON CONFLICT (role, name, member) DO UPDATE SET heartbeat_at = clock_timestamp()")
# A tick is statements in autocommit (a member frozen in the middle of one holds no
# lock), and never waits for another member's locks: what is locked now (a
# checkpoint being written) is skipped until the next tick.
_HEARTBEAT = ("UPDATE pgnotify_sync.consumer_members SET heartbeat_at = clock_timestamp() "
              "WHERE name = %(name)s AND member = %(member)s" + MINE)
_EXPIRE = """
DELETE FROM pgnotify_sync.consumer_members m USING (
    SELECT ctid FROM pgnotify_sync.consumer_members WHERE name = %(name)s""" + MINE + """
       AND heartbeat_at < clock_timestamp() - make_interval(secs => lease_s) FOR UPDATE SKIP LOCKED) silent
 WHERE m.ctid = silent.ctid
"""
# The live members (a silent one locked by a frozen statement is not deleted yet).
_MEMBERS = ("SELECT member, channels FROM pgnotify_sync.consumer_members WHERE name = %s" + MINE +
            " AND heartbeat_at >= clock_timestamp() - make_interval(secs => lease_s) ORDER BY member")
_RENEW = """
UPDATE pgnotify_sync.consumers SET lease_until = clock_timestamp() + make_interval(secs => %(lease)s)
 WHERE name = %(name)s AND owner = %(member)s AND lease_until > clock_timestamp()
   AND channel || '/' || partition = ANY(%(held)s)""" + MINE + """
RETURNING channel, partition, epoch
"""
# Rows still in our name that we do not hold here (a hand-over whose save failed, a
# lease given up here before it ran out there): free for the others now, at their
# last checkpoint, instead of blocking them until the lease runs out.
_UNCLAIM = """
UPDATE pgnotify_sync.consumers SET owner = NULL, lease_until = NULL
 WHERE name = %(name)s AND owner = %(member)s AND NOT channel || '/' || partition = ANY(%(held)s)""" + MINE
_SLOTS = ("SELECT channel, partition, owner, coalesce(lease_until > clock_timestamp(), false) "
          "FROM pgnotify_sync.consumers WHERE name = %s AND channel = ANY(%s) AND partition < %s" + MINE)
_ACQUIRE = """
UPDATE pgnotify_sync.consumers c
   SET owner = %(member)s, epoch = c.epoch + 1, lease_until = clock_timestamp() + make_interval(secs => %(lease)s)
  FROM (SELECT ctid FROM pgnotify_sync.consumers
         WHERE name = %(name)s AND channel = %(channel)s AND partition = %(partition)s""" + MINE + """
           AND (owner IS NULL OR owner = %(member)s OR lease_until IS NULL OR lease_until <= clock_timestamp())
           FOR UPDATE SKIP LOCKED) free
 WHERE c.ctid = free.ctid
RETURNING c.position::text, c.handled, c.epoch
"""
_LEAVE = "DELETE FROM pgnotify_sync.consumer_members WHERE name = %s AND member = %s" + MINE
_KEYS = "SELECT schema_name, table_name, columns FROM pgnotify_sync.consumer_keys WHERE name = %s" + MINE


def deal(members, partitions, me):
    """The (wire, partition) slots *me* should hold: every slot of every channel of
    the *members* ([(id, channels)], sorted by id) dealt in turn over the members
    that listen on its channel. Every member computes it from the same rows, so
    every slot goes to exactly one member."""
    mine = set()
    turn = 0
    for wire in sorted(set().union(*(channels for _, channels in members))):
        eligible = [m for m, channels in members if wire in channels]
        for p in range(partitions):
            if eligible[turn % len(eligible)] == me:
                mine.add((wire, p))
            turn += 1
    return mine


class Group:
    """Member of consumer group *consumer* for listener *name*: *channels* (logical
    name -> ChannelState, with lanes), the ConsumerStore *store* on *pool*, and
    ``dispatcher()`` (the Dispatcher, once built)."""

    def __init__(self, name, consumer, config, channels, pool, store, dispatcher):
        self.name = name
        self.consumer = consumer
        self.partitions = config.consumer_partitions
        self.lease_s = config.consumer_lease_s
        self.tick_s = min(self.lease_s / 3, TICK_MAX_S)
        self.member = f"{socket.gethostname()[:40]}-{os.getpid()}-{uuid.uuid4().hex[:12]}"
        self._channels = channels
        self._pool = pool
        self._store = store
        store.member = self.member
        store.fenced = lambda lane: self.lost(lane, "its checkpoint was refused: another member holds it now")
        self._dispatcher = dispatcher
        self._lock = threading.RLock()
        self._lanes = {(lane.wire, lane.partition): lane for ch in channels.values() for lane in ch.lanes}
        self.owned = {}             # (wire, partition) -> lane, held and active
        self.members = ()           # member ids, as last seen
        self.rebalances = 0
        self.renewed_at = None      # time.time() of the last renewal
        self.keys = KeyColumns(self.key_columns)     # the rows' keys, as the group fixed them
        self.thread = None
        self._stop = threading.Event()
        self._failing = False
        self.joined = False

    @classmethod
    def member(cls, name, consumer, config, channels, connections, dispatcher):
        """The listener's Group: each of its *channels* split into lanes, one per partition."""
        for ch in channels.values():
            ch.lanes = tuple(ChannelState(ch.name, ch.wire, partition=p) for p in range(config.consumer_partitions))
        return cls(name, consumer, config, channels, connections.pool, connections.consumer_store, dispatcher)

    # -- keys ---------------------------------------------------------------------

    def key_columns(self, schema, table):
        """A table's key columns for this group: the first member to meet the table
        fixes them (from its primary key), every member uses what is stored."""
        with self._pool.connection() as conn, conn.cursor() as cur:
            return group_key_columns(cur, self.consumer, schema, table)

    # -- joining, ticks, leaving ----------------------------------------------------

    def join(self, start):
        """First session (the reader's thread): the group's partition count agreed,
        this channel's partitions made (at *start* if new), this member listed, and a
        first deal taken, so a lone member holds everything when start() returns."""
        wires = [ch.wire for ch in self._channels.values()]
        with self._lock:
            with self._pool.connection() as conn, conn.cursor() as cur:
                cur.execute(_JOIN_GROUP, (self.consumer, self.partitions))
                cur.execute(_GROUP, (self.consumer,))
                row = cur.fetchone()
                if row is None:
                    raise self._not_ours()
                if row[0] != self.partitions:
                    raise ConfigError(
                        f"consumer_partitions: consumer group {self.consumer!r} has {row[0]} partitions and this "
                        f"listener has {self.partitions}: every member of a group must use the same count "
                        f"(PG_NOTIFY_CONSUMER_PARTITIONS={row[0]})")
                for wire in wires:
                    cur.execute(_ADD_PARTITIONS, {"name": self.consumer, "channel": wire, "start": str(start),
                                                  "partitions": self.partitions})
                cur.execute(_COUNT_PARTITIONS, (self.consumer, wires, self.partitions))
                counts = dict(cur.fetchall())
                if any(counts.get(w) != self.partitions for w in wires):
                    raise self._not_ours()      # rows we cannot see: another role's
                cur.execute(_JOIN, (self.consumer, self.member, socket.gethostname(), os.getpid(), wires,
                                    self.lease_s))
                cur.execute(_KEYS, (self.consumer,))
                self.keys.update({(s, t): tuple(c) for s, t, c in cur.fetchall()})
            self.joined = True
            log.info("%s: joined consumer group %r as %s (%d partitions per channel)", self.name, self.consumer,
                     self.member, self.partitions, extra={"event": "group_joined",
                                                          "details": {"member": self.member}})
            self._tick(first=True)

    def _not_ours(self):
        return PrivilegeError(f"{self.name}: consumer name {self.consumer!r} is kept by another database role: "
                              "choose another consumer name for this role")

    def start(self):
        """Tick on ``<name>-group`` until :meth:`stop_ticking` (it goes on while the
        listener connection is down: the member is alive and catches up later)."""
        self.thread = spawn(self._run, f"{self.name}-group")
        return self

    def stop_ticking(self, deadline):
        """End the ticks (stop(): after the dispatcher drained, before :meth:`leave`,
        so the leases held while the last events were handled)."""
        self._stop.set()
        return join_all([self.thread], deadline)

    def _run(self):
        while not self._stop.wait(self.tick_s):
            if not self.joined:
                continue
            try:
                with self._lock:
                    self._tick()
                if self._failing:
                    self._failing = False
                    log.info("%s: consumer group %r: leases renewed again", self.name, self.consumer)
            except (psycopg2.Error, PgNotifyError) as exc:
                if not self._failing:
                    self._failing = True
                    log.warning("%s: consumer group %r: cannot renew leases: %s (retrying every %g s; partitions "
                                "are given up as their leases run out)", self.name, self.consumer,
                                first_line(exc), self.tick_s)
                self.expire()

    def expire(self):
        """Stop every lane whose lease ran out here (it could not be renewed)."""
        now = lease_clock()
        for lane in list(self.owned.values()):
            if now >= lane.lease_deadline:
                self.lost(lane, "its lease ran out before it could be renewed")

    def _tick(self, first=False):
        sent = lease_clock()
        acquired = []
        params = {"name": self.consumer, "member": self.member, "lease": self.lease_s}
        wires = [ch.wire for ch in self._channels.values()]
        with self._pool.connection(autocommit=True) as conn, conn.cursor() as cur:
            cur.execute(_HEARTBEAT, params)
            if cur.rowcount == 0:       # removed as silent (we were frozen): back again
                cur.execute(_JOIN, (self.consumer, self.member, socket.gethostname(), os.getpid(), wires,
                                    self.lease_s))
            cur.execute(_EXPIRE, params)
            cur.execute(_MEMBERS, (self.consumer,))
            members = [(m, set(c)) for m, c in cur.fetchall()]
            params["held"] = [f"{w}/{p}" for w, p in list(self.owned)]
            cur.execute(_RENEW, params)
            renewed = {(w, p): e for w, p, e in cur.fetchall()}
            cur.execute(_UNCLAIM, params)
            cur.execute(_SLOTS, (self.consumer, wires, self.partitions))
            slots = {(w, p): (owner, live) for w, p, owner, live in cur.fetchall()}
            mine = deal(members, self.partitions, self.member)
            for key, (owner, live) in sorted(slots.items()):
                lane = self._lanes.get(key)
                if lane is None or key not in mine or key in self.owned or lane.scheduled:
                    continue
                if owner is None or not live or owner == self.member:
                    cur.execute(_ACQUIRE, dict(params, channel=key[0], partition=key[1]))
                    row = cur.fetchone()
                    if row is not None:
                        self._store.restore(cur, lane, row[0], row[1])
                        acquired.append((lane, row[2]))
        self.renewed_at = time.time()
        deadline = sent + self.lease_s * (1 - LEASE_MARGIN)
        ids = tuple(m for m, _ in members)
        if not first and ids != self.members:
            self.rebalances += 1
            log.info("%s: consumer group %r: %d members now; rebalancing", self.name, self.consumer, len(ids),
                     extra={"event": "rebalance", "details": {"members": len(ids)}})
        self.members = ids
        for key, lane in list(self.owned.items()):
            if renewed.get(key) != lane.epoch:
                self.lost(lane, "another member holds it now")
            elif key not in mine:
                lane.lease_deadline = deadline
                self._dispatcher().release(lane, self._handed_over)
            else:
                lane.lease_deadline = deadline
        for lane, epoch in acquired:
            lane.epoch = epoch
            lane.lease_deadline = deadline
            if self._dispatcher().activate(lane, None if first else "acquire"):
                self.owned[(lane.wire, lane.partition)] = lane
                log.info("%s: consumer group %r: took partition %d of %r", self.name, self.consumer,
                         lane.partition, lane.name, extra={"event": "partition_taken", "channel": lane.name,
                                                           "details": {"partition": lane.partition}})

    def _handed_over(self, lane):
        """A Release reached the lane's worker: store the position with the release."""
        self._store.save(lane, release=True)
        self._drop(lane)
        log.info("%s: consumer group %r: handed partition %d of %r over", self.name, self.consumer,
                 lane.partition, lane.name, extra={"event": "partition_released", "channel": lane.name,
                                                   "details": {"partition": lane.partition}})

    def lost(self, lane, why):
        """*lane* stops at once (fencing): *why* it is no longer ours."""
        if self._drop(lane):
            log.warning("%s: consumer group %r: partition %d of %r given up: %s", self.name, self.consumer,
                        lane.partition, lane.name, why, extra={"event": "partition_lost", "channel": lane.name,
                                                               "details": {"partition": lane.partition}})

    def _drop(self, lane):
        self._dispatcher().deactivate(lane)
        with self._lock:
            return self.owned.pop((lane.wire, lane.partition), None) is not None

    def leave(self):
        """After the dispatcher drained (stop()): every held partition handed over
        at its final position, and this member gone from the group."""
        if not self.joined:
            return
        for lane in list(self.owned.values()):
            if lane.scheduled:
                # stop() timed out with its worker inside a batch whose events are
                # marked handled but not all delivered: its position must not be
                # stored. The lease runs out; the next owner repeats since the last
                # checkpoint.
                self.lost(lane, "stop() timed out while it was being handled")
                continue
            self._store.save(lane, release=True)
            self._drop(lane)
        try:
            with self._pool.connection() as conn, conn.cursor() as cur:
                cur.execute(_LEAVE, (self.consumer, self.member))
        except (psycopg2.Error, PgNotifyError) as exc:
            log.warning("%s: consumer group %r: cannot leave (the others notice within %g s): %s", self.name,
                        self.consumer, self.lease_s, first_line(exc))

    def status(self):
        """health()'s ``consumer`` part."""
        renewed = self.renewed_at
        return {"name": self.consumer, "member": self.member, "partitions": self.partitions,
                "members": len(self.members),
                "owned": sorted(f"{lane.name}/{lane.partition}" for lane in list(self.owned.values())),
                "lease_age_s": None if renewed is None else round(time.time() - renewed, 3),
                "rebalances": self.rebalances}
