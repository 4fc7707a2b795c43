"""What a worker does with one batch of a channel's items (runs on the
``<name>-worker-N`` thread that holds the channel; no thread of its own).

Events are checked against the channel's position (_position.py) and delivered in
order; a statement's range (EventRange) and a reference (EventRef) are completed
from the event log first, a CatchUp reads what the channel may have missed, and
Advance / SetPosition move the position. When the log cannot be read, or on a bug,
the channel falls back: what is still queued is dropped from memory and read
again from the log later, so nothing is lost.
"""

import logging

from . import _position as position
from ._channel import Advance, CatchUp, SetPosition
from ._eventlog import CatchUpFailed
from ._fetch import read_ahead
from .events import DatabaseEvent, EventRange, EventRef

log = logging.getLogger("pgnotify_sync")


class _Batch:
    """Events of one batch on their way: *pending* (fresh, not handed over yet) and
    *delivering* (marked handled, being handed over): on a bug both are unmarked."""

    __slots__ = ("pending", "delivering")

    def __init__(self):
        self.pending = []
        self.delivering = []


class BatchRunner:
    """Runs batches for a Dispatcher: *hooks* are its DispatchHooks, *fetcher* the
    Fetcher of its reads, ``queued(ch, n)`` the first n items waiting on a channel,
    ``fall_back(ch, rest, exc, kind)`` drops what is queued and schedules a re-read."""

    def __init__(self, name, hooks, fetcher, queued, fall_back, compact_ranges):
        self.name = name
        self._hooks = hooks
        self._fetcher = fetcher
        self._queued = queued
        self._fall_back = fall_back
        # Durable consumers store handled ids one by one, cut at the event in flight
        # (_consumers.py): they keep ranges as ids.
        self._compact_ranges = compact_ranges
        self._by_type = {EventRange: self._range, EventRef: self._ref, CatchUp: self._catch_up_item,
                         Advance: self._advance, SetPosition: self._set_position}

    def run(self, ch, items):
        batch = _Batch()
        i = 0
        try:
            for i, item in enumerate(items):
                cls = type(item)
                if cls is DatabaseEvent:
                    if position.fresh(ch, item):
                        batch.pending.append(item)
                    continue
                self._flush(ch, batch)
                self._by_type[cls](ch, item, items, i, batch)
            self._flush(ch, batch)
            self._hooks.after_batch(ch)
        except CatchUpFailed as exc:
            # The log cannot be read now (server away). Everything of this channel that
            # is still queued is in the log too: drop it and re-read when we retry.
            self._fall_back(ch, items[i + 1:], exc, "catchup")
        except BaseException as exc:
            # A bug (handlers are isolated in Delivery): never let it drop events. What
            # was not delivered is forgotten as handled and re-read from the log.
            log.exception("%s: channel %r: delivery failed; re-reading from the event log", self.name, ch.name)
            _forget(ch, batch.delivering + batch.pending)
            self._fall_back(ch, items[i + 1:], exc, "internal")

    def _deliver(self, ch, batch, events):
        batch.delivering = events
        self._hooks.deliver(ch, events)
        batch.delivering = []

    def _flush(self, ch, batch):
        if batch.pending:
            events, batch.pending = batch.pending, []
            self._deliver(ch, batch, events)

    def _range(self, ch, item, items, i, batch):
        job = ch.ahead.pop(id(item), None)
        pos = ch.position
        if pos is not None and pos.visible(item.xid):
            return        # the whole transaction was handled already
        fetcher, fetch_range = self._fetcher, self._hooks.fetch_range
        read_ahead(ch, items, i + 1, lambda n: self._queued(ch, n),
                   lambda rng: fetcher.submit(fetch_range, ch, rng))
        events, more = fetcher.result(job) if job is not None else fetch_range(ch, item)
        read = 0
        while True:
            # A big statement (or one of wide rows) comes in bounded pages; the next
            # is read on a fetch thread while this one is delivered.
            read += len(events)
            after = fetcher.submit(fetch_range, ch, item, events[-1].id, len(events)) if more and events else None
            fresh = position.fresh_range(ch, events, item.xid, self._compact_ranges)
            if fresh:
                self._deliver(ch, batch, fresh)
            if after is None:
                break
            events, more = fetcher.result(after)
        if read != item.n:
            self._hooks.report("missing", f"{item.n - read} events of ids {item.first}..{item.last} "
                                          "are no longer in the event log", ch.name)

    def _ref(self, ch, item, items, i, batch):
        if item.xid is not None and position.seen(ch, item.id, item.xid):
            return
        event = self._hooks.fetch_ref(ch, item)
        if event is not None and position.fresh(ch, event):
            self._deliver(ch, batch, [event])

    def _advance(self, ch, item, items, i, batch):
        if ch.position is not None and item.snapshot.covers(ch.position):
            position.move(ch, item.snapshot)

    def _set_position(self, ch, item, items, i, batch):
        if ch.position is None:
            position.move(ch, item.snapshot)

    def _catch_up_item(self, ch, item, items, i, batch):
        self.catch_up(ch, item.reason)

    def catch_up(self, ch, reason):
        if ch.position is None:
            # Nothing to catch up from: a fresh listener starts "now".
            self._hooks.caught_up(ch, reason, 0)
            return
        snapshot, pages = self._hooks.catch_up(ch)
        # Rows come in id order and are not remembered one by one: live copies of them
        # are dropped by the new position once the catch-up ends, and if it fails
        # midway its cursor (target, upto) goes to ch.partial.
        ch.catchup_target = snapshot
        ch.catchup_upto = 0
        ch.in_catchup = True
        total = 0
        try:
            for events in pages:
                fresh = position.fresh_list(ch, events, remember=False)
                total += len(fresh)
                if fresh:
                    self._hooks.deliver(ch, fresh)
                ch.catchup_upto = events[-1].id
        except BaseException:
            # Failed midway (log unreachable, or a bug): what was delivered up to the
            # cursor is kept as handled; the rest is read again.
            if ch.catchup_upto:
                ch.partial.append((snapshot, ch.catchup_upto))
            ch.catchup_target = None
            raise
        finally:
            ch.in_catchup = False
        position.move(ch, snapshot)
        if total:
            log.info("%s: channel %r: caught up %d events from the log (%s)", self.name, ch.name, total, reason)
        self._hooks.caught_up(ch, reason, total)


def _forget(ch, events):
    """Events marked handled but not delivered (see BatchRunner.run): unmark them.
    Their statement records are dropped whole, so a row delivered before comes
    again (at least once), never one that was not."""
    xids = set()
    for event in events:
        ch.handled.pop(event.id, None)
        xids.add(event.xid)
    for xid in xids:
        ch.xranges.pop(xid, None)
