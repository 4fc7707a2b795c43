"""The dispatcher: bounded per-channel queues and the worker pool (owns the threads
``<name>-worker-N``, and through its Fetcher ``<name>-fetch-N``).

Each channel is a small actor: a deque of items and a "scheduled" flag. A channel
with work is put on the ready queue once; a worker takes it, handles a batch of its
items in order (_worker.py), and puts it back if more arrived. So one channel's
handlers run one event at a time, in arrival (commit) order, while different
channels run in parallel on a fixed pool of threads.

The reader thread never blocks here (a blocked reader stalls the server's
notification queue for the whole cluster). When the events waiting in memory reach
``capacity`` the channel goes into *overflow*: further events of that channel are
dropped from memory (they are in the event log) and when there is room again a
catch-up re-reads them from the log. Memory stays bounded, nothing is lost.

What is held in memory counts in ``buffered`` (health()'s ``queue_size``): a queued
event or hint 1, a statement's range the page it holds while it is read
(``page_rows``: a fraction of the buffer), and every page read ahead of delivery
beyond that (reserved while held, only when there is room: _fetch.Window). So a
listener holds at most ``capacity`` events, plus one page in flight per channel (a
catch-up's, or one read when it was needed and there was no room), however big
its statements are.
"""

import functools
import itertools
import logging
import queue
import threading
import time
import typing

from ._channel import CatchUp, Release, held, lanes, weight
from ._eventlog import CATCHUP_PAGE, FAST_PAGE
from ._fetch import READ_AHEAD, SLICES_AHEAD, Fetcher
from ._threads import join_all, spawn
from ._worker import CHUNK, BatchRunner
from .events import DatabaseEvent

log = logging.getLogger("pgnotify_sync")

# Items a worker takes from a channel at once: the unit of a durable consumer's
# "after every batch" checkpoint, and the longest another channel waits for a
# worker when all are busy. 256 keeps both small and the per-batch cost
# (a lock round, a checkpoint) below 1% of the events' own.
BATCH = 256

# A channel whose read of the log failed tries again after this long (not at once:
# the server is likely away, and every try logs a warning).
RETRY_S = 0.5

# A page of the log read for a statement (or a catch-up) holds at most
# capacity // PAGES_PER_BUFFER rows (and FAST_PAGE). Pages read ahead take at most
# half the buffer (the other half stays for what the reader queues meanwhile, and a
# channel that overflowed can resume while a big statement streams): the page
# delivered and SLICES_AHEAD read ahead fit in that half. (The default buffer of
# 80,000: pages of 10,000 rows; a buffer of 10,000: pages of 1,250.)
PAGES_PER_BUFFER = 2 * (SLICES_AHEAD + 1)


def page_rows_for(capacity):
    """Rows a page of a statement may hold in a listener whose buffer holds *capacity*."""
    return max(1, min(FAST_PAGE, capacity // PAGES_PER_BUFFER))


def catchup_rows_for(capacity):
    """Rows a catch-up page may hold: at most the buffer (the one page in flight a
    channel may hold beyond it), and CATCHUP_PAGE. Not a fraction of it like a
    statement's: a catch-up page costs a scan of the window it reads from, so small
    pages far behind cost much more per event (a 200-event buffer with pages of 25
    caught up 400 events/s behind a 1,000,000-event burst, with pages of 200 some
    thousands), and only one is read ahead, when the buffer has room for it."""
    return max(1, min(CATCHUP_PAGE, capacity))

class DispatchHooks(typing.Protocol):
    """What the dispatcher calls, on its worker and fetch threads (the listener's
    delivery, event-log reads and reports)."""

    def deliver(self, ch, events) -> None:
        """Hand *events* (fresh, in order) to the channel's handlers."""

    def catch_up(self, ch, reason) -> tuple:
        """(target snapshot, generator of event pages) from ch.position up to now
        (*reason* ``"poll"``: a notify-free channel's poll found rows); the worker
        closes the generator when it is done with it."""

    def fetch_ids(self, ch, ids, mine=False):
        """The committed events of the channel among log *ids* (any order; channel
        checked, xids are the log's); *mine*: without other consumers' BACKFILL rows
        (ids that did not come from a hint)."""

    def window(self, ch, target):
        """(id, xid) of the channel's events of transactions visible in snapshot
        *target* and not in ch.position (the position check)."""

    def fetch_range(self, ch, rng, after=0, previous=None) -> tuple:
        """(a page of the range's rows above id *after* as RangeRows, whether more
        follow)."""

    def others_in_range(self, ch, rng) -> int:
        """How many rows of a range that gave none are another consumer's BACKFILL
        rows (not this listener's: no forgery, nothing to report)."""

    def report(self, kind, error, channel) -> None:
        """A background failure (the ``error`` signal); never called under our lock."""

    def caught_up(self, ch, reason, count) -> None:
        """A catch-up of *count* events ended."""

    def after_batch(self, ch) -> None:
        """A batch was handled (a durable consumer stores its position)."""

    def lease_lost(self, lane) -> None:
        """A group lane stopped: its lease ran out or was taken (fencing)."""

    def redeliver(self, ch, events) -> None:
        """Hand dead letters whose retry was asked for to the handlers again."""


class Dispatcher:
    """Owns the channel queues and the worker threads.

    *hooks* provides what it cannot do itself: the :class:`DispatchHooks`. Reads of
    the log overlap delivery on *fetchers* fetch threads (_fetch.py), each waited
    for at most *fetch_timeout_s*.
    """

    def __init__(self, name, channels, capacity, workers, hooks, retry_s=RETRY_S, fetchers=None,
                 compact_ranges=True, fetch_timeout_s=60.0, whole_pages=False):
        self.name = name
        self.page_rows = page_rows_for(capacity)
        self.catchup_rows = catchup_rows_for(capacity)
        self._held = functools.partial(held, page=self.page_rows)
        # a statement's page delivered whole (ordering="row"), else CHUNK events at a time
        self._chunk = self.page_rows if whole_pages else CHUNK
        self.channels = channels               # logical name -> ChannelState
        self.by_wire = {ch.wire: ch for ch in channels.values()}
        self.capacity = capacity
        self.resume_level = capacity // 2
        # A group member's lanes of one channel each queue the same items (the same
        # objects): *buffered* counts them once per lane, so the bounds are scaled by
        # the most lanes a channel holds here now (at least 1).
        self._scale = 1
        self._nworkers = workers
        # Reads ahead wait for a free fetch thread (and a pooled connection) if all are busy.
        self._nfetchers = fetchers if fetchers is not None else workers * READ_AHEAD
        self._fetch_timeout_s = fetch_timeout_s
        self._hooks = hooks
        self._compact_ranges = compact_ranges
        self._retry_s = retry_s
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self._ready = queue.SimpleQueue()
        self.buffered = 0
        self._threads = []
        self._fetcher = None
        self._runner = None
        self._closing = False
        # Reports made under the lock, sent once it is released: the error signal's
        # receivers are user code and may call stop() (which takes the lock).
        self._reports = []

    # -- lifecycle ---------------------------------------------------------

    def start(self):
        self._fetcher = Fetcher(self.name, self._nfetchers, self._fetch_timeout_s)
        self._runner = BatchRunner(self.name, self._hooks, self._fetcher, self._queued, self._fall_back,
                                   self._compact_ranges, lost=self._lease_lost, halt=self._halt, chunk=self._chunk,
                                   budget=self, page_rows=self.page_rows)
        self._threads = [spawn(self._work, f"{self.name}-worker-{i}") for i in range(self._nworkers)]

    def submit(self, fn, *args):
        """Run ``fn(*args)`` on a fetch thread; returns its Job (see :meth:`result`)."""
        return self._fetcher.submit(fn, *args)

    def result(self, job):
        """The value of a submitted Job (its exception raised; CatchUpFailed if it
        does not finish in time)."""
        return self._fetcher.result(job)

    def close(self, timeout_s):
        """Deliver what is queued (until *timeout_s*), then end the workers and the
        fetch threads; returns the names of those that did not end in time."""
        deadline = time.monotonic() + timeout_s
        from_worker = threading.current_thread() in self._threads
        with self._lock:
            self._closing = True
            if not from_worker:
                while self._busy_locked():
                    left = deadline - time.monotonic()
                    if left <= 0:
                        log.warning("%s: stop timed out with %d events undelivered", self.name, self.buffered)
                        break
                    self._idle.wait(left)
        for _ in self._threads:
            self._ready.put(None)
        if self._fetcher is not None:
            self._fetcher.stop()
        return join_all(self.threads(), deadline)

    def _busy_locked(self):
        return any(lane.scheduled for ch in self.channels.values() for lane in lanes(ch))

    def threads(self):
        return self._threads + (self._fetcher.threads() if self._fetcher is not None else [])

    # -- the buffer's room, for pages read ahead (_fetch.Window) -------------------

    def reserve(self, n, whole=False, force=False):
        """Count *n* events more as held, if the buffer stays half empty with them
        (see PAGES_PER_BUFFER), or with *whole* within it (a catch-up's one page
        ahead); with *force* whatever the room (a page needed now)."""
        limit = self.capacity if whole else max(self.resume_level, self.page_rows)
        with self._lock:
            if not force and self.buffered + n > limit * self._scale:
                return False
            self.buffered += n
            return True

    def unreserve(self, n):
        """*n* events reserved are no longer held."""
        with self._lock:
            self.buffered -= n

    # -- called by the reader thread ----------------------------------------

    def push(self, ch, events):
        """Queue *events* (decoded, in arrival order) for channel *ch*. Never blocks."""
        total = sum(map(self._held, events))        # an EventRange counts its rows, up to a page
        try:
            with self._lock:
                for lane in lanes(ch):
                    if lane.active:     # a group lane not held: another member's work
                        self._push_locked(lane, events, total)
        finally:
            if self._reports:
                self._send_reports()

    def _send_reports(self):
        with self._lock:
            reports, self._reports = self._reports, []
        for args in reports:
            self._hooks.report(*args)

    def _push_locked(self, ch, events, total):
        if ch.overflow:
            if self.buffered <= self.resume_level * self._scale and time.monotonic() >= ch.retry_at:
                self._resume_locked(ch, "overflow")
            else:
                self._drop_locked(ch, events)
                return
        room = self.capacity * self._scale - self.buffered
        if total > room:
            # Keep the prefix that fits; the rest is in the log. An empty buffer takes
            # one item whatever its size (a range of more rows than the buffer holds
            # is read page by page: over capacity by one page at most).
            kept, used = 0, 0
            held_ = self._held
            for item in events:
                w = held_(item)
                if used + w > room and (kept or self.buffered):
                    break
                used += w
                kept += 1
            if kept < len(events):
                self._drop_locked(ch, events[kept:])
                ch.overflow = True
                ch.retry_at = 0.0
            events, total = events[:kept], used
        if events:
            ch.items.extend(events)
            self.buffered += total
            self._schedule_locked(ch)

    def push_control(self, ch, item, skip_overflowing=False):
        with self._lock:
            for lane in lanes(ch):
                if lane.active and not (skip_overflowing and lane.overflow):
                    lane.items.append(item)
                    self._schedule_locked(lane)

    def catch_up_all(self, reason):
        """After a (re)connect: every channel reads what it may have missed."""
        with self._lock:
            for lane in self._active_lanes_locked():
                if lane.overflow:
                    self._resume_locked(lane, reason)
                else:
                    lane.items.append(CatchUp(reason))
                    self._schedule_locked(lane)

    def retry_overflowed(self):
        """Called periodically: resume channels whose catch-up failed or overflowed."""
        now = time.monotonic()
        with self._lock:
            for ch in self._active_lanes_locked():
                if (ch.overflow and not ch.scheduled and now >= ch.retry_at
                        and self.buffered <= self.resume_level * self._scale):
                    self._resume_locked(ch, "retry")

    def _active_lanes_locked(self):
        return [lane for ch in self.channels.values() for lane in lanes(ch) if lane.active]

    # -- consumer-group lanes (_group.py) -------------------------------------

    def activate(self, lane, reason=None):
        """*lane*'s partition is held: it takes events from now on, after a catch-up
        (*reason*) from its stored position. False if its worker still has it (a
        release or a lost lease is being finished): try again later."""
        with self._lock:
            if lane.scheduled or lane.active:
                return False
            lane.overflow = False
            lane.ahead.clear()      # reads ahead of items dropped when it was given up (it is idle now)
            lane.active = True
            lane.releasing = None
            self._rescale_locked()
            if reason is not None:
                lane.items.append(CatchUp(reason))
                self._schedule_locked(lane)
            return True

    def deactivate(self, lane):
        """*lane*'s lease is gone: it takes nothing more, and what it holds is
        dropped (the next owner reads it from the log)."""
        with self._lock:
            lane.active = False
            self._rescale_locked()
            self._drop_queued_locked(lane)
            lane.overflow = False
            lane.poll_pending = False
        # a worker running it now stops at its next event (Delivery checks the lease)

    def _halt(self, ch):
        """stop() interrupted a handler's retry on *ch*: it takes and delivers nothing
        more (what it had is in the log)."""
        with self._lock:
            self._drop_queued_locked(ch)
            ch.overflow = True          # pushes are dropped; nothing resumes it any more
            ch.retry_at = float("inf")

    def _lease_lost(self, lane):
        self.deactivate(lane)
        self._hooks.lease_lost(lane)

    def release(self, lane, done):
        """Hand *lane* over once the batch its worker holds is handled: its worker
        calls ``done(lane)`` (store and release), then it takes nothing more. What
        is queued is not handled here (the position does not cover it): the next
        owner reads it from the log, so a hand-over waits one batch, not a backlog."""
        with self._lock:
            if not lane.active or lane.releasing:
                return
            lane.releasing = done
            self._drop_queued_locked(lane)
            lane.items.append(Release(done))
            self._schedule_locked(lane)

    def _rescale_locked(self):
        self._scale = max([1] + [sum(1 for lane in ch.lanes if lane.active) for ch in self.channels.values()])

    def _drop_queued_locked(self, lane):
        self.buffered -= sum(map(self._held, lane.items))
        lane.items.clear()
        lane.redeliver_pending = False      # a dropped Redeliver comes again at the next poll

    def _drop_locked(self, ch, events):
        dropped = sum(map(weight, events))
        if dropped <= 0:
            return
        plain = sum(1 for e in events if type(e) is DatabaseEvent and e.id is None)
        if not ch.overflow:
            log.warning("%s: event buffer full (%d): channel %r falls back to the event log",
                        self.name, self.capacity, ch.name,
                        extra={"event": "overflow", "channel": ch.name, "details": {"capacity": self.capacity}})
        ch.dropped += dropped
        if plain:
            # Payloads without a log id (a foreign trigger) cannot be re-read.
            self._reports.append(("overflow", f"{plain} events without a log id dropped: buffer full", ch.name))

    def _resume_locked(self, ch, reason):
        # Order matters: the reader accepts this channel's events again *before* the
        # catch-up takes its snapshot, so every transaction the catch-up does not see
        # is delivered live (README: the outbox gap).
        ch.overflow = False
        ch.items.append(CatchUp(reason))
        self._schedule_locked(ch)

    def _schedule_locked(self, ch):
        if not ch.scheduled:
            ch.scheduled = True
            self._ready.put(ch)

    # -- workers --------------------------------------------------------------

    def _work(self):
        while True:
            ch = self._ready.get()
            if ch is None:
                return
            try:
                self._run(ch)
            except BaseException as exc:  # a bug (_run falls back itself); keep the worker alive
                log.exception("%s: worker failed on channel %r", self.name, ch.name)
                try:
                    self._hooks.report("internal", exc, ch.name)
                except BaseException:
                    log.exception("%s: reporting a worker failure failed", self.name)
            with self._lock:
                if ch.items:
                    self._ready.put(ch)
                else:
                    ch.scheduled = False
                    self._idle.notify_all()

    def _take_locked(self, ch):
        items = []
        n = 0
        popleft = ch.items.popleft
        count = 0
        while ch.items and count < BATCH:
            item = popleft()
            items.append(item)
            count += 1
            n += self._held(item)
        # Still counted in ``buffered`` until the worker is done with them (_run): what
        # a worker holds (and reads ahead for) is memory too.
        return items, n

    def _run(self, ch):
        with self._lock:
            items, holding = self._take_locked(ch)
        try:
            self._runner.run(ch, items)
        finally:
            with self._lock:
                self.buffered -= holding

    def _queued(self, ch, n):
        """The first *n* items waiting on *ch* (for the read-ahead)."""
        with self._lock:
            return list(itertools.islice(ch.items, 0, n))

    def _fall_back(self, ch, rest, exc, kind):
        """The log could not be read (*kind* "catchup") or a bug ("internal"): drop
        what is queued on *ch* (*rest*: what its worker still held) and re-read it
        all from the log after RETRY_S."""
        ch.ahead.clear()     # their items are dropped: they come from the log later
        with self._lock:
            self.buffered -= sum(map(self._held, ch.items))
            queued = sum(map(weight, ch.items))
            ch.items.clear()
            ch.redeliver_pending = False
            ch.overflow = True
            ch.retry_at = time.monotonic() + self._retry_s
            ch.dropped += sum(map(weight, rest)) + queued
            if ch.releasing:
                # the hand-over still happens, at the position handled so far
                ch.items.append(Release(ch.releasing))
                self._schedule_locked(ch)
        if kind == "catchup":
            log.warning("%s: channel %r: cannot read the event log (%s); retrying", self.name, ch.name, exc)
        self._hooks.report(kind, exc, ch.name)
