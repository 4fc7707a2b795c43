"""What a worker does with one batch of a channel's items (runs on the
``<name>-worker-N`` thread that holds the channel; no thread of its own).

Notifications are hints (the wire is untrusted): a row's EventRef and a
statement's EventRange are completed from the event log, channel and xid checked,
and only what the log holds is delivered, in order, checked against the channel's
position (_position.py). Hints drained together are read together (one query). A
CatchUp reads what the channel may have missed; an Advance first reads what the
log has that no hint announced (a lost or suppressed notification), then moves the
position; SetPosition starts it. When the log cannot be read, or on a bug,
the channel falls back: what is still queued is dropped from memory and read
again from the log later, so nothing is lost.
"""

import bisect
import logging

from . import _position as position
from ._channel import Advance, CatchUp, LeaseLost, Redeliver, Release, SetPosition
from ._eventlog import CatchUpFailed
from ._delivery import Interrupted
from ._fetch import SLICE_IDS, Window, first_slice, read_ahead, read_slices
from .events import DatabaseEvent, EventRange, EventRef, Operation

BACKFILL = Operation.BACKFILL
# A statement's rows are built into events and delivered this many at a time.
# 500: under the cyclic collector's young-generation threshold (700), so a chunk
# handed to handlers and dropped is never traversed; a chunk of 10,000 measured
# a third slower per event. (ordering="row" takes whole pages: its row threads
# wait for each other at the end of each part they are given.)
CHUNK = 500

log = logging.getLogger("pgnotify_sync")


class _Batch:
    """Events of one batch on their way: *pending* (hints and plain events not read
    and handed over yet) and *delivering* (marked handled, being handed over): on a
    bug what is delivering is unmarked."""

    __slots__ = ("pending", "delivering")

    def __init__(self):
        self.pending = []
        self.delivering = []


class BatchRunner:
    """Runs batches for a Dispatcher: *hooks* are its DispatchHooks, *fetcher* the
    Fetcher of its reads, ``queued(ch, n)`` the first n items waiting on a channel,
    ``fall_back(ch, rest, exc, kind)`` drops what is queued and schedules a re-read.
    A statement is read in pages of *page_rows*; pages read ahead of it are counted
    in *budget*'s buffer (``reserve``, ``unreserve``; None: not counted)."""

    def __init__(self, name, hooks, fetcher, queued, fall_back, compact_ranges, lost=None, halt=None, chunk=CHUNK,
                 budget=None, page_rows=SLICE_IDS):
        self.name = name
        self._budget = budget
        self._page_rows = page_rows
        self._chunk = chunk     # events built and delivered at a time from a statement's page
        self._hooks = hooks
        self._fetcher = fetcher
        self._queued = queued
        self._fall_back = fall_back
        # Durable consumers store handled ids one by one, cut at the event in flight
        # (_consumers.py): they keep ranges as ids.
        self._compact_ranges = compact_ranges
        self._lost = lost       # lost(ch): a group lane's lease ran out (_group.py)
        self._halt = halt       # halt(ch): the channel takes nothing more (stopping)
        self._by_type = {EventRange: self._range, CatchUp: self._catch_up_item,
                         Advance: self._advance, SetPosition: self._set_position, Release: self._release,
                         Redeliver: self._redeliver}

    def run(self, ch, items):
        if not ch.active:
            return          # a group lane given up: its partition is another member's now
        batch = _Batch()
        i = 0
        try:
            for i, item in enumerate(items):
                cls = type(item)
                if cls is EventRef or cls is DatabaseEvent:
                    if batch.pending and type(batch.pending[-1]) is not cls:
                        # Plain events (accept_plain_payloads) and hints in separate reads:
                        # plain ones cannot be re-read if a read of hints fails.
                        self._flush(ch, batch)
                    batch.pending.append(item)
                    continue
                self._flush(ch, batch)
                self._by_type[cls](ch, item, items, i, batch)
                if not ch.active:
                    return      # handed over (Release): the rest is the next owner's
            self._flush(ch, batch)
            self._hooks.after_batch(ch)
        except Interrupted as exc:
            # stop() came during a handler's retry backoff, or an event that failed
            # for good could not be parked (Redo): what was not handled is forgotten as
            # handled (a durable consumer gets it again). On stop the channel delivers
            # nothing more (a later event first would break its order); on Redo it
            # reads from the log again later.
            _forget(ch, exc.events)
            if exc.halt:
                self._halt(ch)
            else:
                self._fall_back(ch, items[i + 1:], exc, "catchup")
        except LeaseLost:
            # Nothing more is handed to handlers; the next owner resumes from the
            # stored position (what was delivered since comes again: at least once).
            self._lost(ch)
        except CatchUpFailed as exc:
            # The log cannot be read now (server away). Everything of this channel that
            # is still queued is in the log too: drop it and re-read when we retry.
            # A read inside delivery (the superseded rows of a backfill) fails with
            # events marked handled and not delivered: they are forgotten first.
            _forget(ch, batch.delivering)
            self._fall_back(ch, items[i + 1:], exc, "catchup")
        except BaseException as exc:
            # A bug (handlers are isolated in Delivery): never let it drop events. What
            # was not delivered is forgotten as handled and re-read from the log.
            log.exception("%s: channel %r: delivery failed; re-reading from the event log", self.name, ch.name)
            _forget(ch, batch.delivering)
            self._fall_back(ch, items[i + 1:], exc, "internal")

    def _deliver(self, ch, batch, events):
        batch.delivering = events
        self._hooks.deliver(ch, events)
        batch.delivering = []

    def _flush(self, ch, batch):
        """Read the pending hints from the log (one query) and deliver, in arrival
        order, the events found: a hint whose id is not a committed row of this
        channel with that xid (forged, or trimmed) delivers nothing."""
        items = batch.pending
        if not items:
            return
        batch.pending = []
        seen = position.seen
        ids = [r.id for r in items if type(r) is EventRef and not seen(ch, r.id, r.xid)]
        found = {e.id: e for e in self._hooks.fetch_ids(ch, ids)} if ids else {}
        events = []
        unmatched = 0
        for item in items:
            if type(item) is EventRef:
                event = found.get(item.id)
                if event is None or event.xid != item.xid or event.operation is BACKFILL:
                    # (a backfill's rows are announced by range only: a hint naming one is forged)
                    unmatched += event is not None or not seen(ch, item.id, item.xid)
                    continue
            else:
                event = item      # a plain event (accept_plain_payloads)
            if position.fresh(ch, event):
                events.append(event)
        if events:
            self._deliver(ch, batch, events)
        if unmatched:
            ch.unmatched_hints += unmatched
            self._hooks.report("payload", f"{unmatched} hints match no committed event of this channel in the "
                                          "event log (forged, or trimmed): nothing delivered for them", ch.name)

    def _range(self, ch, item, items, i, batch):
        job = ch.ahead.pop(id(item), None)
        pos = ch.position
        if pos is not None and pos.visible(item.xid):
            return        # the whole transaction was handled already
        fetcher, fetch_range = self._fetcher, self._hooks.fetch_range
        submit = fetcher.submit
        page = self._page_rows
        read_ahead(ch, items, i + 1, lambda n: self._queued(ch, n),
                   lambda rng: submit(fetch_range, ch, first_slice(rng, page), 0, None))
        # A big statement (or one of wide rows) comes in bounded pages, read ahead on
        # fetch threads while the one before is delivered (_fetch.read_slices).
        pages = read_slices(item, job, lambda *args: submit(fetch_range, ch, *args), fetcher.result,
                            Window(self._budget, page), page)
        try:
            self._deliver_pages(ch, item, batch, pages)
        finally:
            pages.close()       # its pages read ahead no longer count in the buffer, whatever happened

    def _deliver_pages(self, ch, item, batch, pages):
        """Deliver statement *item*'s *pages* (RangeRows), then check what was read."""
        fresh_ids, xid, compact, after = position.fresh_ids, item.xid, self._compact_ranges, None
        chunk_rows = self._chunk
        read = 0
        found = None if item.parts is None else [0] * len(item.parts)     # rows read per merged hint
        for rows in pages:
            ids = rows.ids
            read += len(ids)
            if found is not None:
                for k, (first, last, _) in enumerate(item.parts):
                    found[k] += bisect.bisect_right(ids, last) - bisect.bisect_left(ids, first)
            # Built, checked and delivered a chunk at a time, each chunk as a page of
            # its own (remembered as handled just before it is delivered): it dies
            # young (RangeRows).
            # (A BACKFILL page goes whole: its superseded rows are one query a page.)
            step = chunk_rows if rows.operation is not BACKFILL else len(ids) or 1
            for lo in range(0, len(ids), step):
                events = rows.events(lo, lo + step)     # built before it is marked handled
                chunk = ids[lo:lo + step]
                if fresh_ids(ch, chunk, xid, compact, after):
                    self._deliver(ch, batch, events)
                    after = chunk[-1]
                else:
                    fresh = position.fresh_list(ch, events)     # some were handled already
                    if fresh:
                        self._deliver(ch, batch, fresh)
                    after = None
        if item.parts is None:
            self._check_range(ch, item, read)
        else:
            # hints of consecutive statements merged by the reader: each on its own
            for (first, last, n), got in zip(item.parts, found):
                self._check_range(ch, EventRange(item.channel, xid, first, last, n), got)

    def _check_range(self, ch, rng, read):
        """Report a hinted range whose rows were not all read: none (forged, unless
        another consumer's backfill chunk), or fewer than it said (trimmed)."""
        if read == 0:
            if self._hooks.others_in_range(ch, rng):
                return      # another consumer's backfill chunk
            ch.unmatched_hints += 1
            self._hooks.report("payload", f"a range of {rng.n} events (ids {rng.first}..{rng.last}) matches no "
                                          "committed event of this channel (forged, or trimmed)", ch.name)
        elif read != rng.n:
            self._hooks.report("missing", f"{rng.n - read} events of ids {rng.first}..{rng.last} "
                                          "are no longer in the event log", ch.name)

    def _advance(self, ch, item, items, i, batch):
        if ch.position is not None and item.snapshot.covers(ch.position):
            self._missed(ch, item.snapshot, batch)
            position.move(ch, item.snapshot)

    def _missed(self, ch, target, batch):
        """Before the position moves to *target*: deliver what the log holds of
        transactions visible in *target* (and not in the position) that was not
        handled: events whose notification never came (lost, suppressed with
        ``pgnotify_sync.notify = off``, never sent). One query for ids; rows only for
        what is missing."""
        ids = [ident for ident, xid in self._hooks.window(ch, target) if not position.seen(ch, ident, xid)]
        if not ids:
            return
        events = [e for e in self._hooks.fetch_ids(ch, ids, mine=True) if position.fresh(ch, e)]
        if events:
            ch.missed += len(events)
            log.info("%s: channel %r: %d events in the log had no notification; delivered", self.name, ch.name,
                     len(events), extra={"event": "missed", "channel": ch.name, "details": {"count": len(events)}})
            self._deliver(ch, batch, events)

    def _release(self, ch, item, items, i, batch):
        item.done(ch)

    def _redeliver(self, ch, item, items, i, batch):
        self._hooks.redeliver(ch, self._hooks.fetch_ids(ch, item.ids, mine=True))

    def _set_position(self, ch, item, items, i, batch):
        if ch.position is None:
            position.move(ch, item.snapshot)

    def _catch_up_item(self, ch, item, items, i, batch):
        self.catch_up(ch, item.reason)

    def catch_up(self, ch, reason):
        if reason == "poll":
            ch.poll_pending = False     # commits from now on get the next poll's catch-up
        if ch.position is None:
            # Nothing to catch up from: a fresh listener starts "now".
            self._hooks.caught_up(ch, reason, 0)
            return
        snapshot, pages = self._hooks.catch_up(ch, reason)
        try:
            self._deliver_catch_up(ch, reason, snapshot, pages)
        finally:
            pages.close()       # its page read ahead no longer counts in the buffer

    def _deliver_catch_up(self, ch, reason, snapshot, pages):
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
