"""One channel's state (queue, position, counters) and the control items queued
beside its events (data only: no thread, no I/O).

A ``ChannelState`` is written by the reader (``received``, ``parse_errors``, the
overflow flag under the dispatcher's lock) and by the one worker that holds the
channel (everything else): each field has one writer, so plain ints suffice.
"""

import collections
import time

from ._eventlog import RANGE_PAGE
from .events import DatabaseEvent, EventRange, EventRef
from .metrics import Histogram


# A range is read in pages of at most the listener's page_rows (_dispatch.py; at
# most RANGE_PAGE) and counts as one page in the buffer, however many rows it
# announces: the page it holds while it is delivered (pages read ahead of it are
# counted when they are read: _fetch.Window).
RANGE_HELD_MAX = RANGE_PAGE


def weight(item):
    """How many events an item stands for (the counters: dropped, delivered)."""
    cls = type(item)
    if cls is EventRange:
        return item.n
    return 1 if cls is DatabaseEvent or cls is EventRef else 0


def held(item, page=RANGE_HELD_MAX):
    """How many events an item holds in memory at most (the buffer accounting): a
    range counts its rows up to a *page*, so a statement bigger than the buffer is
    still delivered as a live range, page by page, not dropped to a catch-up."""
    return min(weight(item), page)


class CatchUp:
    """Control item: read from the log what this channel may have missed."""

    __slots__ = ("reason",)

    def __init__(self, reason):
        self.reason = reason


class SetPosition:
    """Control item: the channel starts at this snapshot if it has no position yet."""

    __slots__ = ("snapshot",)

    def __init__(self, snapshot):
        self.snapshot = snapshot


class Advance:
    """Control item: every transaction visible in ``snapshot`` has been received."""

    __slots__ = ("snapshot",)

    def __init__(self, snapshot):
        self.snapshot = snapshot


class Release:
    """Control item: a consumer group's lane is handed over (the group rebalances):
    everything queued before it was handled; ``done(lane)`` stores the position and
    gives the partition up, and the lane takes nothing more."""

    __slots__ = ("done",)

    def __init__(self, done):
        self.done = done


class Redeliver:
    """Control item: dead letters of this channel whose retry was asked for (ids)."""

    __slots__ = ("ids",)

    def __init__(self, ids):
        self.ids = ids


class ChannelState:
    __slots__ = ("partition", "lanes", "active", "epoch", "lease_deadline", "releasing",
                 "name", "wire", "items", "ahead", "scheduled", "overflow", "position", "handled", "xranges",
                 "partial",
                 "catchup_target", "catchup_upto", "in_catchup",
                 "retry_at", "dropped", "delivered", "received", "parse_errors", "handler_errors", "handler_retries",
                 "type_errors", "dead_letters", "redeliver_pending",
                 "delivered_by", "handler_hist", "caught_up", "lag", "gap_events", "since_checkpoint",
                 "last_event_at", "unmatched_hints", "missed", "poll_pending", "polled")

    def __init__(self, name, wire, partition=None):
        self.name = name
        self.wire = wire
        # A consumer group's member splits a channel into lanes, one per partition
        # (_group.py): each a ChannelState of its own (queue, position, worker), which
        # delivers only the events of its partition and only while it holds the
        # partition's lease. The channel's own state then only routes to its lanes
        # and keeps the reader's counters. Elsewhere lanes is empty and the channel
        # is its own single lane.
        self.partition = partition
        self.lanes = ()
        self.active = partition is None
        self.epoch = 0                  # the lease's fencing token (consumers.epoch)
        self.lease_deadline = None      # lease_clock() time the lease surely holds until
        self.releasing = None           # the done() of a queued Release
        self.items = collections.deque()
        self.ahead = {}     # id(EventRange) -> Job reading it (see _fetch.read_ahead)
        self.scheduled = False
        self.overflow = False
        self.retry_at = 0.0
        self.position = None
        self.handled = {}
        # Statements delivered whole, by transaction: xid -> [(first, last, n)]: every
        # row of that transaction with an id in first..last (n rows) was handled.
        # One entry instead of n ids (see _position.fresh_ids).
        self.xranges = {}
        # A catch-up delivers the rows between position and a target snapshot in id
        # order, so its progress is a cursor, not a set of ids: memory stays flat
        # however long the backlog.
        self.catchup_target = None  # the snapshot the running catch-up reads up to
        self.catchup_upto = 0       # ... and the id it has delivered up to
        self.in_catchup = False
        # Cursors of catch-ups that failed midway: (target, upto) = every event of a
        # transaction visible in target with an id up to upto was handled.
        self.partial = []
        self.dropped = 0
        self.delivered = 0
        # metrics (plain counters; read at scrape time)
        self.received = 0
        self.parse_errors = 0
        self.handler_errors = 0
        self.handler_retries = 0    # handler calls made again after a failure (Config.handler_max_attempts)
        self.type_errors = 0        # rows that did not fit a handler's model (on_event(..., row=Model))
        self.dead_letters = None    # a durable consumer's parked events (as last counted; _deadletters.py)
        self.redeliver_pending = False  # a Redeliver is queued (not one more every poll)
        self.delivered_by = {}          # (operation, table) -> count
        self.handler_hist = Histogram()
        self.caught_up = 0
        self.lag = None
        self.gap_events = 0
        self.since_checkpoint = 0   # events delivered since the consumer's position was stored
        self.last_event_at = None   # wall-clock time of the last delivery
        self.unmatched_hints = 0    # hints that matched no committed event of the channel (forged, trimmed)
        self.missed = 0             # events delivered by the position check: no notification came
        self.poll_pending = False   # a CatchUp("poll") is queued (_poller.py)
        self.polled = 0             # events of notify-free tables, found by polling


def lanes(ch):
    """The states that queue and deliver *ch*'s events: its lanes, or itself."""
    return ch.lanes or (ch,)


class LeaseLost(Exception):
    """A group lane's lease ran out (or was taken): it delivers nothing more."""


def lease_clock():
    """Seconds on a clock that goes on while the machine is suspended (Linux
    CLOCK_BOOTTIME; elsewhere monotonic): a member resumed after a suspend longer
    than its lease sees that its lease ran out."""
    return time.clock_gettime(BOOTTIME)


BOOTTIME = getattr(time, "CLOCK_BOOTTIME", time.CLOCK_MONOTONIC)
