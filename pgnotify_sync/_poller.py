"""The poller of notify-free channels; runs on its own thread, ``<name>-poller``.

A table watched with ``notify=False`` writes the event log and sends nothing, so
a listener polls for its rows. Every ``poll_interval_s`` one query on a pooled
connection takes a snapshot and names the channels of this listener with a
notify-free table that have log rows visible in it and not in the previous poll's
snapshot. Each such channel gets a ``CatchUp("poll")``: its worker reads what
became visible since the channel's position, delivers it and moves the position
(the checked position move: what is delivered was read from the log). Nothing else
is read while nothing happens. A listener without such a channel only looks
whether it has one every QUIET_RECHECK_S (a table may be watched later).

What the poll finds is only a trigger: the catch-up reads from the channel's own
position, so a missed or failed poll delays events, never loses them (and the
health check's position moves still come every health-check interval).
"""

import logging

from ._channel import CatchUp, lanes
from ._snapshot import Snapshot
from ._threads import spawn
from .errors import first_line

log = logging.getLogger("pgnotify_sync")

QUIET_RECHECK_S = 30.0
# How often a poller that may not poll yet (not listening) looks again.
NOT_READY_WAIT_S = 0.25

# The snapshot, this listener's notify-free channels, and those of them with rows
# visible now that the previous snapshot did not see (the xid index bounds the scan
# to rows since that snapshot's xmin).
POLL_SQL = """
WITH s AS (SELECT pg_current_snapshot() AS now), q AS (SELECT pgnotify_sync.quiet_channels(%(wires)s) AS wires)
SELECT s.now::text, q.wires,
       CASE WHEN %(prev)s::text IS NULL THEN q.wires
            ELSE ARRAY(SELECT DISTINCT l.channel FROM pgnotify_sync.event_log l
                        WHERE l.channel = ANY (q.wires)
                          AND l.xid >= %(prev_xmin)s::text::xid8
                          AND pg_visible_in_snapshot(l.xid, s.now)
                          AND NOT pg_visible_in_snapshot(l.xid, %(prev)s::text::pg_snapshot)) END
  FROM s, q
"""


class Poller:
    """Polls for the notify-free channels of *channels* (logical name ->
    ChannelState) through *run_query* (``run_query(sql, params) -> row``) and asks
    for their catch-ups with ``push(ch, item)``, while ``ready()`` (listening, our
    schema there); stops when *stop_event* is set."""

    def __init__(self, name, interval_s, channels, run_query, push, stop_event, ready):
        self.name = name
        self.interval_s = interval_s
        self._channels = channels
        self._run_query = run_query
        self._push = push
        self._stop = stop_event
        self._ready = ready
        self.thread = None
        self.quiet = ()         # wire names of the notify-free channels, as last seen
        self._failing = False

    def start(self):
        self.thread = spawn(self._run, f"{self.name}-poller")
        return self.thread

    def _run(self):
        previous = None
        while not self._stop.is_set():
            if not self._ready():
                previous = None     # after a reconnect the catch-ups have read everything
                self._stop.wait(min(self.interval_s, NOT_READY_WAIT_S))
                continue
            try:
                previous = self.poll_once(previous)
            except Exception as exc:        # database down, pool closed: try again next interval
                if not self._failing:
                    log.warning("%s: polling notify-free channels failed: %s (retrying every %g s)", self.name,
                                first_line(exc), self.interval_s)
                self._failing = True
            self._stop.wait(self.interval_s if self.quiet else QUIET_RECHECK_S)

    def poll_once(self, previous):
        """One poll after the snapshot *previous* (None: the first); returns the
        snapshot to poll after next."""
        by_wire = {ch.wire: ch for ch in list(self._channels.values())}
        row = self._run_query(POLL_SQL, {"wires": list(by_wire), "prev": None if previous is None else str(previous),
                                         "prev_xmin": None if previous is None else str(previous.xmin)})
        now, quiet, changed = row
        self._failing = False
        self.quiet = tuple(quiet)
        for wire in changed:
            ch = by_wire.get(wire)
            for lane in lanes(ch) if ch is not None else ():
                if lane.active and not lane.poll_pending:
                    lane.poll_pending = True      # cleared when its worker starts the catch-up
                    self._push(lane, CatchUp("poll"))
        return Snapshot.parse(now)
