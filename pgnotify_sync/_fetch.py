"""Reads of the event log ahead of delivery, on threads ``<name>-fetch-N``.

While a worker hands one statement's rows to the handlers, fetch threads already
read the channel's next READ_AHEAD ranges (and a catch-up its next page), so the
server builds pages while this process parses and delivers (``python -m bench
--only delivery`` measures it). Only timing changes: every event still goes
through the same duplicate check, in order, on the channel's worker.

A worker that needs a read nobody has started yet runs it itself (no waiting in
the queue behind other channels' reads), and it waits for a running read at most
``timeout_s`` (the read's own deadlines, plus a margin): past that the read is
abandoned as failed (:class:`CatchUpFailed`), the channel falls back to the log
and its result, if it ever comes, is dropped.
"""

import collections
import itertools
import queue
import threading

from ._eventlog import CatchUpFailed
from ._pool import DEADLINE_MARGIN_S, WAIT_S
from ._threads import spawn
from .events import DatabaseEvent, EventRange

# Ranges read ahead per worker while it delivers. Measured on a 200,000-row burst
# (1000-row statements): 2 gave 1.7x the events/s of no read-ahead, 4 another 1.2x
# direct and 1.3x through SSH tunnels, where each read waits longer for its answer.
READ_AHEAD = 4

# A statement wider than a slice (SLICE_IDS ids, or the listener's page: see
# Dispatcher.page_rows) is read as slices, the next SLICES_AHEAD of them at once on
# fetch threads while one is delivered: the server builds slice k+1 while this
# process parses slice k (pages of one slice follow one another: each starts after
# the last id of the page before it). Measured on one 100,000-row statement, COMMIT
# to the last handler call: 0.47-0.56 s read as pages one after another, 0.29-0.39 s
# as slices (3 runs each). In memory: the page delivered, the next page of its slice
# and SLICES_AHEAD slices' first pages, each page beyond the first only while the
# event buffer has room for it (Window). A statement spans at most MAX_SLICES slices
# (wider ones: wider slices, paged), and a sparse one stops being sliced at its
# first empty slice (read_slices).
SLICE_IDS = 10_000
SLICES_AHEAD = 3
MAX_SLICES = 1000

# Beyond its own deadlines, a read is given this long (a loaded machine, a slow
# tunnel) before the worker gives up on it.
MARGIN_S = 5.0


def fetch_timeout_s(config):
    """The longest one read of the log can take: waiting for a pooled connection
    (the pool's WAIT_S), a new connection (``connect_timeout_s``), the query under
    the pool's deadline (``query_timeout_s`` and its margin), plus MARGIN_S."""
    return WAIT_S + config.connect_timeout_s + config.query_timeout_s + DEADLINE_MARGIN_S + MARGIN_S


class Job:
    """``fn(*args)`` run once: by a fetch thread, or by the worker that needs it first."""

    __slots__ = ("fn", "args", "done", "value", "error", "_claim")

    def __init__(self, fn, args):
        self.fn = fn
        self.args = args
        self.done = threading.Event()
        self.value = None
        self.error = None
        self._claim = threading.Lock()

    def run(self):
        """Run it unless someone already does (returns at once then)."""
        if not self._claim.acquire(blocking=False):
            return
        try:
            self.value = self.fn(*self.args)
        except BaseException as exc:   # handed to the worker that waits for it
            self.error = exc
        finally:
            self.fn = self.args = None
            self.done.set()

    def result(self, timeout_s):
        """Its value (or its exception); CatchUpFailed if it runs longer than *timeout_s*."""
        self.run()      # not started yet: the caller runs it
        if not self.done.wait(timeout_s):
            raise CatchUpFailed(f"a read of the event log did not finish within {timeout_s:g} s")
        if self.error is not None:
            raise self.error
        return self.value


class Fetcher:
    """*count* fetch threads taking Jobs in submission order."""

    def __init__(self, name, count, timeout_s):
        self.timeout_s = timeout_s
        self._jobs = queue.SimpleQueue()
        self._threads = [spawn(self._run, f"{name}-fetch-{i}") for i in range(count)]

    def submit(self, fn, *args):
        """Run ``fn(*args)`` on a fetch thread; ``.result()`` of the returned Job
        waits for it and returns its value or raises its exception."""
        job = Job(fn, args)
        self._jobs.put(job)
        return job

    def result(self, job):
        return job.result(self.timeout_s)

    def _run(self):
        while True:
            job = self._jobs.get()
            if job is None:
                return
            job.run()

    def stop(self):
        """Ask the threads to end once the reads queued before this one are done."""
        for _ in self._threads:
            self._jobs.put(None)

    def threads(self):
        return list(self._threads)


def read_ahead(ch, items, start, queued, read):
    """Have the next READ_AHEAD ranges of channel *ch* read by ``read(range)`` (which
    submits a Job): the rest of this batch (*items* from *start*), then
    ``queued(n)`` (the first n items waiting behind it), up to the first control
    item (it may move the position first). ``ch.ahead`` maps each such EventRange
    (by identity) to its Job; only the channel's worker touches it."""
    ahead = ch.ahead
    wanted = READ_AHEAD - len(ahead)
    if wanted <= 0:
        return
    pos = ch.position
    for source in (itertools.islice(items, start, None), None):
        if source is None:
            source = queued(4 * READ_AHEAD)
        for item in source:
            cls = type(item)
            if cls is EventRange:
                if pos is not None and pos.visible(item.xid):
                    continue
                key = id(item)
                if key not in ahead:
                    ahead[key] = read(item)
                    wanted -= 1
                    if not wanted:
                        return
            elif cls is not DatabaseEvent:
                return


class Window:
    """The pages one read of the log holds (in flight on a fetch thread, or being
    delivered), counted in the dispatcher's event buffer (*budget*: ``reserve(n,
    whole, force)`` and ``unreserve(n)``; None: unbounded) at *page* events each.

    With *own*, the first page is counted already, with its item (a queued range
    counts a page). Every other page is counted while it is held: read ahead only if
    the buffer has room for it, else read when it is needed (``take(force=True)``,
    counted even beyond the buffer: one page at a time, the one in flight). So what
    a channel holds stays within the buffer plus one page, and the buffer's count
    says what is held."""

    __slots__ = ("_budget", "_page", "_whole", "_own", "held", "reserved")

    def __init__(self, budget, page, whole=False, own=True):
        self._budget = budget
        self._page = page
        self._whole = whole     # may fill the whole buffer (a catch-up's one page ahead), not half of it
        self._own = 1 if own else 0
        self.held = 0
        self.reserved = 0

    def take(self, force=False):
        """A page more may be held: True if it may (counted), False if the buffer has
        no room for it (read it later)."""
        if self.held >= self._own + self.reserved and self._budget is not None:
            if not self._budget.reserve(self._page, self._whole, force):
                return False
            self.reserved += 1
        self.held += 1
        return True

    def give(self):
        """A page is no longer held (delivered, or dropped)."""
        self.held -= 1
        surplus = self.reserved - max(0, self.held - self._own)
        if surplus > 0:
            self.reserved -= surplus
            self._budget.unreserve(surplus * self._page)

    def close(self):
        """Every page is given back (the read ended or failed; a read still running
        on a fetch thread is dropped when it ends)."""
        if self.reserved:
            self._budget.unreserve(self.reserved * self._page)
        self.held = self.reserved = 0


def first_slice(rng, width=SLICE_IDS):
    """The first slice of statement *rng* (all of it when it is narrow): what a read
    ahead reads, and so the first of :func:`slices`."""
    width = _slice_width(rng, width)
    return rng if rng.last - rng.first < width else EventRange(rng.channel, rng.xid, rng.first,
                                                                 rng.first + width - 1, rng.n)


def _slice_width(rng, width):
    return max(width, -(-(rng.last - rng.first + 1) // MAX_SLICES))


def slices(rng, width=SLICE_IDS):
    """The slices of *rng*, in id order, made as they are asked for."""
    width = _slice_width(rng, width)
    if rng.last - rng.first < width:
        yield rng
        return
    for lo in range(rng.first, rng.last + 1, width):
        yield EventRange(rng.channel, rng.xid, lo, min(lo + width - 1, rng.last), rng.n)


def read_slices(rng, first, submit, result, window=None, width=SLICE_IDS):
    """Every page (RangeRows) of statement *rng*, in id order: its slices of *width*
    ids read up to SLICES_AHEAD ahead of the one delivered (``submit(part, after,
    previous)`` returns a Job, ``result(job)`` its page), the pages of one slice one
    after another. *first* is the Job of the first slice (a read ahead's) or None.
    *window* (a Window) says how many pages may be held at once: a page it has no
    room for is read when it is needed, not ahead.

    A slice without a row means a sparse range (a real statement's ids are dense;
    a forged hint may span 2**27 ids): no more slices are asked for, and what lies
    after those under way is read as one part, page after page, as an unsliced
    range is. So a range costs at most SLICES_AHEAD + 1 queries more than its
    pages, however wide."""
    window = window if window is not None else Window(None, 0)

    def ask(part, after=0, previous=None, force=False):
        return submit(part, after, previous) if window.take(force) else None

    parts = slices(rng, width)
    jobs = collections.deque()      # (slice, its first page's Job, or None: not read yet)
    try:
        for part in parts:
            if first is not None and not jobs:
                window.take(force=True)         # the read ahead's page: the range's own
                jobs.append((part, first))
            else:
                jobs.append((part, ask(part, force=not jobs)))
            if len(jobs) == SLICES_AHEAD:
                break
        sparse = False
        while jobs:
            part, job = jobs.popleft()
            if job is None:
                job = ask(part, force=True)     # not read ahead (no room): needed now, before any ahead
            following = None if sparse else next(parts, None)
            if following is not None:
                jobs.append((following, ask(following)))
            rows, more = result(job)
            if not rows.ids and not more and not sparse:
                sparse = True
                last = jobs[-1][0].last if jobs else part.last
                if last < rng.last:
                    rest = EventRange(rng.channel, rng.xid, last + 1, rng.last, rng.n)
                    jobs.append((rest, ask(rest)))
            while True:
                going_on = bool(more and rows.ids)
                last_id, previous = (rows.ids[-1], rows.previous) if going_on else (None, None)
                after = ask(part, last_id, previous) if going_on else None
                yield rows
                rows = None
                window.give()
                if not going_on:
                    break
                if after is None:
                    after = ask(part, last_id, previous, force=True)    # no room ahead: needed now
                rows, more = result(after)
    finally:
        window.close()


def read_pages(read, submit, result, on_page, window=None):
    """The pages ``read(after, previous)`` returns, one after another (a catch-up):
    the next page is read on a fetch thread (``submit``) while this one is
    delivered, if *window* (a Window) has room for it; ``on_page(events)`` counts
    each."""
    window = window if window is not None else Window(None, 0)
    try:
        window.take(force=True)
        events, more = read(0)
        while events:
            on_page(events)
            after, previous = events[-1].id, len(events)
            ahead = submit(read, after, previous) if more and window.take() else None
            yield events
            events = None
            window.give()
            if not more:
                return
            if ahead is None:
                window.take(force=True)
                events, more = read(after, previous)
            else:
                events, more = result(ahead)
    finally:
        window.close()
