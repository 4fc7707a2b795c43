"""Unit tests for pgnotify_sync._fetch (reads ahead on fetch threads) and
pgnotify_sync._threads (spawn / join_all). No database."""

import threading
import time

import pytest

from helpers import wait_for
from pgnotify_sync import Config
from pgnotify_sync._channel import Advance, ChannelState
from pgnotify_sync._eventlog import CatchUpFailed
from pgnotify_sync._eventlog import RangeRows
from pgnotify_sync._fetch import (MAX_SLICES, READ_AHEAD, SLICE_IDS, SLICES_AHEAD, Fetcher, Window,
                                  fetch_timeout_s, first_slice, read_ahead, read_pages, read_slices, slices)
from pgnotify_sync._snapshot import Snapshot
from pgnotify_sync._threads import join_all, spawn
from pgnotify_sync.events import DatabaseEvent, EventRange, Operation


@pytest.fixture
def fetcher():
    made = []

    def make(count=2, timeout_s=5.0):
        f = Fetcher("t", count, timeout_s)
        made.append(f)
        return f

    yield make
    for f in made:
        f.stop()
        assert join_all(f.threads(), time.monotonic() + 5) == []


def test_threads_are_named_daemons_and_end_on_stop(fetcher):
    f = fetcher(count=3)
    assert sorted(t.name for t in f.threads()) == ["t-fetch-0", "t-fetch-1", "t-fetch-2"]
    assert all(t.daemon and t.is_alive() for t in f.threads())
    f.stop()
    assert join_all(f.threads(), time.monotonic() + 5) == []


def test_a_job_runs_on_a_fetch_thread_and_hands_over_its_value(fetcher):
    f = fetcher()
    job = f.submit(lambda a, b: (threading.current_thread().name, a + b), 1, 2)
    assert job.done.wait(5)     # not asked for yet: a fetch thread runs it
    name, value = f.result(job)
    assert value == 3 and name.startswith("t-fetch-")


def test_a_jobs_exception_is_raised_by_result(fetcher):
    f = fetcher()

    def fail():
        raise CatchUpFailed("server away")

    with pytest.raises(CatchUpFailed, match="server away"):
        f.result(f.submit(fail))


def test_a_job_nobody_started_is_run_by_the_caller_at_once(fetcher):
    f = fetcher(count=1)
    release = threading.Event()
    blocker = f.submit(release.wait, 10)      # the only fetch thread is busy
    wait_for(lambda: blocker._claim.locked(), message="the blocker did not start")
    queued = f.submit(lambda: threading.current_thread().name)
    t0 = time.monotonic()
    assert f.result(queued) == threading.current_thread().name    # not queued behind the blocker
    assert time.monotonic() - t0 < 5
    release.set()
    assert f.result(blocker) is True


def test_a_job_runs_once_even_when_the_thread_reaches_it_later(fetcher):
    f = fetcher(count=1)
    release = threading.Event()
    f.submit(release.wait, 10)
    calls = []
    job = f.submit(calls.append, "x")
    f.result(job)                   # run by this thread
    release.set()
    done = f.submit(lambda: None)
    f.result(done)                  # the fetch thread has passed the claimed job by now
    assert calls == ["x"]


def test_a_read_running_past_the_timeout_fails_as_catchup_failed(fetcher):
    f = fetcher(count=1, timeout_s=0.2)
    release = threading.Event()
    job = f.submit(release.wait, 30)
    wait_for(lambda: job._claim.locked(), message="the job did not start")
    t0 = time.monotonic()
    with pytest.raises(CatchUpFailed, match="did not finish within 0.2 s"):
        f.result(job)
    assert 0.15 < time.monotonic() - t0 < 5
    release.set()


def test_fetch_timeout_covers_every_deadline_of_one_read():
    cfg = Config(postgres_user="u", postgres_db="d", connect_timeout_s=7, query_timeout_s=11)
    from pgnotify_sync._pool import DEADLINE_MARGIN_S, WAIT_S
    assert fetch_timeout_s(cfg) > WAIT_S + 7 + 11 + DEADLINE_MARGIN_S


# -- the read-ahead policy ---------------------------------------------------------------


def rng(first, xid=100, n=10):
    return EventRange("a", xid, first, first + n - 1, n)


def ev(ident, xid=100):
    return DatabaseEvent("a", Operation.INSERT, "public", "t", {}, None, ident, xid)


def run_read_ahead(ch, items, start, queued=()):
    asked = []
    read_ahead(ch, items, start, lambda n: list(queued)[:n], lambda r: asked.append(r.first) or object())
    return asked


def test_read_ahead_reads_at_most_READ_AHEAD_ranges():
    ch = ChannelState("a", "a")
    items = [rng(i * 100) for i in range(READ_AHEAD + 3)]
    assert run_read_ahead(ch, items, 0) == [i * 100 for i in range(READ_AHEAD)]
    assert len(ch.ahead) == READ_AHEAD
    assert run_read_ahead(ch, items, 0) == []          # all slots taken


def test_read_ahead_goes_on_into_the_queue_but_stops_at_a_control_item():
    ch = ChannelState("a", "a")
    queued = [rng(300), Advance(Snapshot.parse("200:200:")), rng(400)]
    assert run_read_ahead(ch, [rng(100), ev(150), rng(200)], 1, queued) == [200, 300]


def test_read_ahead_skips_ranges_of_handled_transactions():
    ch = ChannelState("a", "a")
    ch.position = Snapshot.parse("150:150:")           # xid 100 is visible: handled
    assert run_read_ahead(ch, [rng(1, xid=100), rng(2, xid=160)], 0) == [2]


# -- threads ------------------------------------------------------------------------------


def test_slices_cover_a_range_in_id_order_and_are_bounded_in_number():
    narrow = EventRange("a", 7, 1, SLICE_IDS, SLICE_IDS)
    assert list(slices(narrow)) == [narrow] and first_slice(narrow) is narrow
    wide = EventRange("a", 7, 5, 5 + 2 * SLICE_IDS, 2 * SLICE_IDS + 1)
    parts = list(slices(wide))
    assert [(p.first, p.last) for p in parts] == [(5, 4 + SLICE_IDS), (5 + SLICE_IDS, 4 + 2 * SLICE_IDS),
                                                  (5 + 2 * SLICE_IDS, 5 + 2 * SLICE_IDS)]
    assert all(p.xid == 7 and p.channel == "a" for p in parts) and first_slice(wide) == parts[0]
    widest = EventRange("a", 7, 1, 1 << 27, 1 << 21)       # events.MAX_RANGE_SPAN
    parts = slices(widest)
    assert sum(1 for _ in parts) <= MAX_SLICES
    assert first_slice(widest) == next(slices(widest))


def test_read_slices_keeps_slices_ahead_and_pages_each_slice_in_order():
    """The first slice's Job is the read ahead's; SLICES_AHEAD more are asked for
    before the first is delivered; a slice cut short is read on after its last id
    before the next slice comes."""
    rng = EventRange("a", 7, 1, 5 * SLICE_IDS, 5 * SLICE_IDS)
    asked = []

    class Done:
        def __init__(self, value):
            self.value = value

    def submit(part, after, previous):
        asked.append((part.first, after))
        ids = list(range(max(part.first, after + 1), part.last + 1))
        if part.first == 1 + SLICE_IDS and after == 0:      # the second slice comes in two pages
            return Done((RangeRows.of([ev(i) for i in ids[:10]]), True))
        return Done((RangeRows.of([ev(i) for i in ids]), False))

    first = Done((RangeRows.of([ev(i) for i in range(1, SLICE_IDS + 1)]), False))
    pages = read_slices(rng, first, submit, lambda job: job.value)
    page = next(pages)
    assert page.ids == list(range(1, SLICE_IDS + 1))
    assert asked == [(1 + k * SLICE_IDS, 0) for k in range(1, SLICES_AHEAD + 1)]
    got = page.ids + [i for page in pages for i in page.ids]
    assert got == list(range(1, 5 * SLICE_IDS + 1))
    assert (1 + SLICE_IDS, 10 + SLICE_IDS) in asked        # read on after the cut page's last id


def test_read_slices_stops_slicing_a_sparse_range():
    """A forged range of the widest span with rows only at its two ends: after the
    first empty slice no more slices are asked for; the rest is one part, paged."""
    rng = EventRange("a", 100, 1, 1 << 27, 1 << 21)
    width = next(slices(rng)).last
    asked = []

    class Done:
        def __init__(self, value):
            self.value = value

    def submit(part, after, previous):
        asked.append((part.first, part.last, after))
        ids = [i for i in (1, 2, rng.last) if max(part.first, after + 1) <= i <= part.last]
        return Done((RangeRows.of([ev(i) for i in ids]), False))

    got = [i for page in read_slices(rng, None, submit, lambda job: job.value) for i in page.ids]
    assert got == [1, 2, rng.last]
    # the first slice (rows), the second (empty), the SLICES_AHEAD under way then, the rest
    assert len(asked) == 2 + SLICES_AHEAD + 1, asked               # not 1000 slices
    assert asked[-1] == ((2 + SLICES_AHEAD) * width + 1, rng.last, 0)


class Budget:
    """The dispatcher's reserve/unreserve, on a buffer of *room* events."""

    def __init__(self, room):
        self.room = room
        self.held = 0
        self.most = 0

    def reserve(self, n, whole=False, force=False):
        if self.held + n > self.room and not force:
            return False
        self.held += n
        self.most = max(self.most, self.held)
        return True

    def unreserve(self, n):
        self.held -= n
        assert self.held >= 0


@pytest.mark.parametrize("room", [0, 10, 25, 1000])
def test_read_slices_reads_ahead_only_what_the_buffer_has_room_for(room):
    """Pages beyond the range's own are read ahead only while reserved from the
    buffer; with no room at all each page is read when it is needed, one at a time.
    Every page comes, in order, and every reservation is given back."""
    rng = EventRange("a", 7, 1, 100, 100)
    budget = Budget(room)
    window = Window(budget, 10)
    under_way = []          # Jobs asked for and not yet taken by the reader

    class Job:
        def __init__(self, value):
            self.value = value
            under_way.append(self)

    def submit(part, after, previous):
        ids = list(range(max(part.first, after + 1), min(part.last, max(part.first, after + 1) + 4) + 1))
        return Job((RangeRows.of([ev(i) for i in ids]), ids[-1] < part.last))

    def result(job):
        under_way.remove(job)
        return job.value

    most = 0
    got = []
    for page in read_slices(rng, None, submit, result, window, width=10):
        most = max(most, 1 + len(under_way))      # pages held now: this one, and those under way
        got += page.ids
    assert got == list(range(1, 101))
    assert budget.held == 0 and window.held == 0
    assert most <= 1 + room // 10 + 1
    if room == 0:
        assert most == 1      # the page delivered only: each next one is read when needed
    if room >= 1000:
        assert most > 2       # read ahead when there is room


def test_a_window_gives_back_what_it_reserved():
    budget = Budget(20)
    window = Window(budget, 10)
    assert window.take() and budget.held == 0                  # the first is the item's own
    assert window.take() and window.take() and budget.held == 20
    assert not window.take() and window.held == 3              # no room: read later
    assert window.take(force=True) and window.held == 4 and budget.held == 30    # needed now: counted anyway
    window.give()
    window.give()
    assert budget.held == 10 and window.reserved == 1
    window.close()
    assert budget.held == 0 and window.held == 0
    # a catch-up's pages: its first is counted too (no item counts it)
    catch_up = Window(budget, 10, whole=True, own=False)
    assert catch_up.take(force=True) and budget.held == 10
    catch_up.give()
    assert budget.held == 0


def test_read_pages_reads_ahead_only_with_room():
    budget = Budget(0)
    reads = []

    def read(after, previous=None):
        reads.append(after)
        ids = list(range(after + 1, min(after + 3, 10) + 1))
        return [ev(i) for i in ids], ids[-1] < 10

    submitted = []
    held = []
    pages = read_pages(read, lambda fn, *a: submitted.append(a), None, lambda events: held.append(budget.held),
                       Window(budget, 3, whole=True, own=False))
    assert [e.id for page in pages for e in page] == list(range(1, 11))
    assert submitted == [] and reads == [0, 3, 6, 9] and budget.held == 0
    assert held == [3, 3, 3, 3]         # the page in flight, counted


def test_join_all_names_threads_that_would_not_stop():
    release = threading.Event()
    slow = spawn(release.wait, "slow-one", 30)
    quick = spawn(lambda: None, "quick-one")
    try:
        t0 = time.monotonic()
        assert join_all([slow, None, quick, threading.current_thread()], time.monotonic() + 0.2) == ["slow-one"]
        assert time.monotonic() - t0 < 5
        assert slow.daemon and quick.daemon
    finally:
        release.set()
    assert join_all([slow], time.monotonic() + 5) == []
