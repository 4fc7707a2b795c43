"""Unit tests for pgnotify_sync._fetch (reads ahead on fetch threads) and
pgnotify_sync._threads (spawn / join_all). No database."""

import threading
import time

import pytest

from helpers import wait_for
from pgnotify_sync import Config
from pgnotify_sync._channel import Advance, ChannelState
from pgnotify_sync._eventlog import CatchUpFailed
from pgnotify_sync._fetch import READ_AHEAD, Fetcher, Job, fetch_timeout_s, read_ahead
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
