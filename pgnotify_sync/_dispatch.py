"""The dispatcher: bounded per-channel queues and the worker pool.

Each channel is a small actor: a deque of items and a "scheduled" flag. A channel
with work is put on the ready queue once; a worker takes it, handles a batch of its
items in order, and puts it back if more arrived. So one channel's handlers run one
event at a time, in arrival (commit) order, while different channels run in
parallel on a fixed pool of threads.

The reader thread never blocks here (a blocked reader stalls the server's
notification queue for the whole cluster). When the events waiting in memory reach
``capacity`` the channel goes into *overflow*: further events of that channel are
dropped from memory (they are in the event log) and when there is room again a
catch-up re-reads them from the log. Memory stays bounded, nothing is lost.

Position per channel (see _snapshot.py): every event of a transaction visible in
``position`` has been handled; ``handled`` holds the ids of handled events of
transactions that are not. An event is delivered iff it is in neither: this drops
the duplicates that catch-up reads and live notifications produce.
"""

import collections
import itertools
import logging
import queue
import threading
import time
import typing

from . import _position as position
from ._eventlog import CatchUpFailed
from .events import DatabaseEvent, EventRange, EventRef
from .metrics import Histogram

log = logging.getLogger("pgnotify_sync")

BATCH = 256
# Ranges read ahead per worker while it delivers. Measured on a 200,000-row burst
# (1000-row statements): 2 gave 1.7x the events/s of no read-ahead, 4 another 1.2x
# direct and 1.3x through SSH tunnels, where each read waits longer for its answer.
READ_AHEAD = 4


def weight(item):
    """How many events an item stands for in the buffer accounting."""
    cls = type(item)
    if cls is EventRange:
        return item.n
    return 1 if cls is DatabaseEvent or cls is EventRef else 0


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


class ChannelState:
    __slots__ = ("name", "wire", "items", "ahead", "scheduled", "overflow", "position", "handled", "xranges",
                 "partial",
                 "catchup_target", "catchup_upto", "in_catchup",
                 "retry_at", "dropped", "delivered", "received", "parse_errors", "handler_errors",
                 "delivered_by", "handler_hist", "caught_up", "lag", "gap_events", "since_checkpoint",
                 "last_event_at")

    def __init__(self, name, wire):
        self.name = name
        self.wire = wire
        self.items = collections.deque()
        self.ahead = {}     # id(EventRange) -> Job reading it (see Dispatcher._read_ahead)
        self.scheduled = False
        self.overflow = False
        self.retry_at = 0.0
        self.position = None
        self.handled = {}
        # Statements delivered whole, by transaction: xid -> [(first, last, n)]: every
        # row of that transaction with an id in first..last (n rows) was handled.
        # One entry instead of n ids (see Dispatcher._fresh_range).
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
        self.delivered_by = {}          # (operation, table) -> count
        self.handler_hist = Histogram()
        self.caught_up = 0
        self.lag = None
        self.gap_events = 0
        self.since_checkpoint = 0   # events delivered since the consumer's position was stored
        self.last_event_at = None   # wall-clock time of the last delivery


class Job:
    """A read running on a fetch thread (see Dispatcher.submit)."""

    __slots__ = ("fn", "args", "done", "value", "error")

    def __init__(self, fn, args):
        self.fn = fn
        self.args = args
        self.done = threading.Event()
        self.value = None
        self.error = None

    def run(self):
        try:
            self.value = self.fn(*self.args)
        except BaseException as exc:   # handed to the worker that waits for it
            self.error = exc
        finally:
            self.fn = self.args = None
            self.done.set()

    def result(self):
        self.done.wait()
        if self.error is not None:
            raise self.error
        return self.value


class DispatchHooks(typing.Protocol):
    """What the dispatcher calls, on its worker and fetch threads (the listener's
    delivery, event-log reads and reports)."""

    def deliver(self, ch, events) -> None:
        """Hand *events* (fresh, in order) to the channel's handlers."""

    def catch_up(self, ch) -> tuple:
        """(target snapshot, iterator of event pages) from ch.position up to now."""

    def fetch_ref(self, ch, ref):
        """The event an EventRef points at, or None if it is gone from the log."""

    def fetch_range(self, ch, rng, after=0, previous=None) -> tuple:
        """(a page of the range's events above id *after*, whether more follow)."""

    def report(self, kind, error, channel) -> None:
        """A background failure (the ``error`` signal); never called under our lock."""

    def caught_up(self, ch, reason, count) -> None:
        """A catch-up of *count* events ended."""

    def after_batch(self, ch) -> None:
        """A batch was handled (a durable consumer stores its position)."""


class Dispatcher:
    """Owns the channel queues and the worker threads.

    *hooks* provides what it cannot do itself: the :class:`DispatchHooks`.

    Reads overlap delivery: while a worker hands one statement's rows (an
    EventRange) to the handlers, fetch threads already read the channel's next
    READ_AHEAD ranges from the log (and a catch-up its next page, see ``submit``), so
    the server builds pages while this process parses and delivers (``python -m bench
    --only delivery`` measures it). Only timing changes: every
    event still goes through the same duplicate check, in order, on the channel's
    worker.
    """

    def __init__(self, name, channels, capacity, workers, hooks, retry_s=0.5, fetchers=None,
                 compact_ranges=True):
        self.name = name
        self.channels = channels               # logical name -> ChannelState
        self.by_wire = {ch.wire: ch for ch in channels.values()}
        self.capacity = capacity
        self.resume_level = capacity // 2
        self._nworkers = workers
        # Reads ahead wait for a free fetch thread (and a pooled connection) if all are busy.
        self._nfetchers = fetchers if fetchers is not None else workers * READ_AHEAD
        self._hooks = hooks
        # Durable consumers store handled ids one by one, cut at the event in flight
        # (listener._save_consumer): they keep ranges as ids.
        self._compact_ranges = compact_ranges
        self._retry_s = retry_s
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self._ready = queue.SimpleQueue()
        self.buffered = 0
        self._threads = []
        self._fetch_threads = []
        self._jobs = queue.SimpleQueue()
        self._closing = False
        # Reports made under the lock, sent once it is released: the error signal's
        # receivers are user code and may call stop() (which takes the lock).
        self._reports = []

    # -- lifecycle ---------------------------------------------------------

    def start(self):
        for i in range(self._nworkers):
            t = threading.Thread(target=self._work, name=f"{self.name}-worker-{i}", daemon=True)
            t.start()
            self._threads.append(t)
        for i in range(self._nfetchers):
            t = threading.Thread(target=self._fetch, name=f"{self.name}-fetch-{i}", daemon=True)
            t.start()
            self._fetch_threads.append(t)

    def submit(self, fn, *args):
        """Run ``fn(*args)`` on a fetch thread; ``.result()`` of the returned Job
        waits for it and returns its value or raises its exception."""
        job = Job(fn, args)
        self._jobs.put(job)
        return job

    def _fetch(self):
        while True:
            job = self._jobs.get()
            if job is None:
                return
            job.run()

    def close(self, timeout_s):
        """Deliver what is queued (until *timeout_s*), then end the workers."""
        deadline = time.monotonic() + timeout_s
        me = threading.current_thread()
        from_worker = me in self._threads
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
        for _ in self._fetch_threads:
            self._jobs.put(None)
        for t in self._threads + self._fetch_threads:
            if t is me:
                continue
            t.join(max(0.0, deadline - time.monotonic()))
            if t.is_alive():
                log.warning("%s: thread %s did not stop in time", self.name, t.name)

    def _busy_locked(self):
        return any(ch.scheduled for ch in self.channels.values())

    def threads(self):
        return self._threads + self._fetch_threads

    # -- called by the reader thread ----------------------------------------

    def push(self, ch, events):
        """Queue *events* (decoded, in arrival order) for channel *ch*. Never blocks."""
        total = sum(map(weight, events))        # an EventRange counts its rows
        try:
            with self._lock:
                self._push_locked(ch, events, total)
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
            if self.buffered <= self.resume_level and time.monotonic() >= ch.retry_at:
                self._resume_locked(ch, "overflow")
            else:
                self._drop_locked(ch, events)
                return
        room = self.capacity - self.buffered
        if total > room:
            # Keep the prefix that fits; the rest is in the log.
            kept, used = 0, 0
            for item in events:
                w = weight(item)
                if used + w > room:
                    break
                used += w
                kept += 1
            self._drop_locked(ch, events[kept:])
            events, total = events[:kept], used
            ch.overflow = True
            ch.retry_at = 0.0
        if events:
            ch.items.extend(events)
            self.buffered += total
            self._schedule_locked(ch)

    def push_control(self, ch, item, skip_overflowing=False):
        with self._lock:
            if skip_overflowing and ch.overflow:
                return
            ch.items.append(item)
            self._schedule_locked(ch)

    def catch_up_all(self, reason):
        """After a (re)connect: every channel reads what it may have missed."""
        with self._lock:
            for ch in self.channels.values():
                if ch.overflow:
                    self._resume_locked(ch, reason)
                else:
                    ch.items.append(CatchUp(reason))
                    self._schedule_locked(ch)

    def retry_overflowed(self):
        """Called periodically: resume channels whose catch-up failed or overflowed."""
        now = time.monotonic()
        with self._lock:
            for ch in self.channels.values():
                if ch.overflow and not ch.scheduled and now >= ch.retry_at and self.buffered <= self.resume_level:
                    self._resume_locked(ch, "retry")

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
            n += weight(item)
        # Still counted in ``buffered`` until the worker is done with them (_run): what
        # a worker holds (and reads ahead for) is memory too.
        return items, n

    def _run(self, ch):
        with self._lock:
            items, held = self._take_locked(ch)
        try:
            self._run_items(ch, items)
        finally:
            with self._lock:
                self.buffered -= held

    def _run_items(self, ch, items):
        pending = []   # consecutive events, delivered as one batch
        delivering = None
        i = 0
        try:
            for i, item in enumerate(items):
                cls = type(item)
                if cls is DatabaseEvent:
                    if position.fresh(ch, item):
                        pending.append(item)
                    continue
                if pending:
                    delivering, pending = pending, []
                    self._hooks.deliver(ch, delivering)
                    delivering = None
                if cls is EventRange:
                    job = ch.ahead.pop(id(item), None)
                    pos = ch.position
                    if pos is not None and pos.visible(item.xid):
                        continue        # the whole transaction was handled already
                    self._read_ahead(ch, items, i + 1)
                    events, more = job.result() if job is not None else self._hooks.fetch_range(ch, item)
                    read = 0
                    while True:
                        # A big statement (or one of wide rows) comes in bounded pages;
                        # the next is read on a fetch thread while this one is delivered.
                        read += len(events)
                        after = self.submit(self._hooks.fetch_range, ch, item, events[-1].id, len(events)) \
                            if more and events else None
                        delivering = position.fresh_range(ch, events, item.xid, self._compact_ranges)
                        if delivering:
                            self._hooks.deliver(ch, delivering)
                        delivering = None
                        if after is None:
                            break
                        events, more = after.result()
                    if read != item.n:
                        self._hooks.report("missing", f"{item.n - read} events of ids {item.first}..{item.last} "
                                                       "are no longer in the event log", ch.name)
                elif cls is EventRef:
                    if item.xid is not None and position.seen(ch, item.id, item.xid):
                        continue
                    event = self._hooks.fetch_ref(ch, item)
                    if event is not None and position.fresh(ch, event):
                        delivering = [event]
                        self._hooks.deliver(ch, delivering)
                        delivering = None
                elif cls is CatchUp:
                    self._catch_up(ch, item.reason)
                elif cls is Advance:
                    if ch.position is not None and item.snapshot.covers(ch.position):
                        position.move(ch, item.snapshot)
                elif cls is SetPosition:
                    if ch.position is None:
                        position.move(ch, item.snapshot)
            if pending:
                delivering, pending = pending, []
                self._hooks.deliver(ch, delivering)
                delivering = None
            self._hooks.after_batch(ch)
        except CatchUpFailed as exc:
            # The log cannot be read now (server away). Everything of this channel that
            # is still queued is in the log too: drop it and re-read when we retry.
            self._fall_back(ch, items[i + 1:], exc)
        except BaseException as exc:
            # A bug (handlers are isolated in _deliver): never let it drop events. What
            # was not delivered is forgotten as handled and re-read from the log.
            log.exception("%s: channel %r: delivery failed; re-reading from the event log", self.name, ch.name)
            self._forget(ch, (delivering or []) + pending)
            self._fall_back(ch, items[i + 1:], exc, kind="internal")

    def _read_ahead(self, ch, items, start):
        """Have the next READ_AHEAD ranges of the channel read on fetch threads: the
        rest of this batch (*items* from *start*), then what is queued behind it, up
        to the first control item (it may move the position first). ``ch.ahead`` maps
        each such EventRange (by identity) to its Job; only the channel's worker
        touches it."""
        ahead = ch.ahead
        wanted = READ_AHEAD - len(ahead)
        if wanted <= 0:
            return
        pos = ch.position
        for source in (items, None):
            if source is None:
                with self._lock:
                    source = list(itertools.islice(ch.items, 0, 4 * READ_AHEAD))
                start = 0
            for j in range(start, len(source)):
                item = source[j]
                cls = type(item)
                if cls is EventRange:
                    if pos is not None and pos.visible(item.xid):
                        continue
                    key = id(item)
                    if key not in ahead:
                        ahead[key] = self.submit(self._hooks.fetch_range, ch, item)
                        wanted -= 1
                        if not wanted:
                            return
                elif cls is not DatabaseEvent:
                    return

    def _forget(self, ch, events):
        """Events marked handled but not delivered (see _run_items): unmark them. Their
        statement records are dropped whole, so a row delivered before comes again
        (at least once), never one that was not."""
        xids = set()
        for event in events:
            ch.handled.pop(event.id, None)
            xids.add(event.xid)
        for xid in xids:
            ch.xranges.pop(xid, None)

    def _fall_back(self, ch, rest, exc, kind="catchup"):
        ch.ahead.clear()     # their items are dropped: they come from the log later
        with self._lock:
            queued = sum(map(weight, ch.items))
            self.buffered -= queued
            ch.items.clear()
            ch.overflow = True
            ch.retry_at = time.monotonic() + self._retry_s
            ch.dropped += sum(map(weight, rest)) + queued
        if kind == "catchup":
            log.warning("%s: channel %r: cannot read the event log (%s); retrying", self.name, ch.name, exc)
        self._hooks.report(kind, exc, ch.name)

    def _catch_up(self, ch, reason):
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
