"""Unit tests for pgnotify_sync._maintenance: Every tasks on the Maintenance thread (no database).

The schedule itself is checked deterministically through ``run_due(now)`` with a
controlled clock; the thread tests only wait (with deadlines) for runs to happen.
"""

import logging
import threading
import time

import pytest

from pgnotify_sync import _maintenance
from pgnotify_sync._maintenance import RECHECK_S, Every, Maintenance

from helpers import wait_for


class Counter:
    """An action that counts its runs and records when they happened."""

    def __init__(self, error=None):
        self.times = []
        self.error = error
        self._lock = threading.Lock()

    def __call__(self):
        with self._lock:
            self.times.append(time.monotonic())
        if self.error is not None:
            raise self.error

    @property
    def count(self):
        with self._lock:
            return len(self.times)


@pytest.fixture
def running():
    """Start Maintenance threads; every one is stopped (and joined) at teardown."""
    started = []

    def start(tasks, name="t-maintenance"):
        stop = threading.Event()
        m = Maintenance(name, stop, tasks)
        m.start()
        started.append((stop, m))
        return m, stop

    yield start
    for stop, m in started:
        stop.set()
        m.thread.join(5)
        assert not m.thread.is_alive(), f"{m.thread.name} did not stop"


# -- Every ---------------------------------------------------------------------------


@pytest.mark.parametrize("interval", [0, -1, -0.5])
def test_interval_not_positive_refused_naming_the_task(interval):
    with pytest.raises(ValueError, match=r"'trim-log'.*interval_s"):
        Every("trim-log", interval, lambda: None)


def test_first_run_after_one_interval_by_default():
    before = time.monotonic()
    task = Every("a", 30.0, lambda: None)
    after = time.monotonic()
    assert before + 30.0 <= task.next_at <= after + 30.0


def test_first_s_sets_the_first_run():
    before = time.monotonic()
    task = Every("a", 30.0, lambda: None, first_s=0.5)
    after = time.monotonic()
    assert before + 0.5 <= task.next_at <= after + 0.5
    # first_s=0 is "at once", not "the default"
    now_task = Every("b", 30.0, lambda: None, first_s=0)
    assert now_task.next_at <= time.monotonic()


def test_repr_names_the_task():
    assert repr(Every("health", 2.5, lambda: None)) == "<Every health 2.5 s>"


# -- run_due: the schedule with a controlled clock -------------------------------------


def tasks_at(*specs):
    """Every objects with next_at set by hand: specs are (name, interval, next_at, when)."""
    out = []
    for name, interval, next_at, when in specs:
        task = Every(name, interval, Counter(), when=when)
        task.next_at = next_at
        out.append(task)
    return out


def test_run_due_runs_what_is_due_and_returns_the_next_time():
    a, b = tasks_at(("a", 10.0, 100.0, None), ("b", 3.0, 105.0, None))
    m = Maintenance("m-maintenance", threading.Event(), [a, b])

    assert m.run_due(99.0) == 100.0                     # nothing due yet
    assert (a.action.count, b.action.count) == (0, 0)
    assert (a.next_at, b.next_at) == (100.0, 105.0)

    assert m.run_due(100.0) == 105.0                    # a is due exactly now
    assert (a.action.count, b.action.count) == (1, 0)
    assert a.next_at == 110.0                           # advanced by its interval

    assert m.run_due(106.0) == 109.0                    # b late: next from now, not from 105
    assert (a.action.count, b.action.count) == (1, 1)
    assert b.next_at == 109.0

    assert m.run_due(200.0) == 203.0                    # both long overdue: one run each
    assert (a.action.count, b.action.count) == (2, 2)
    assert (a.next_at, b.next_at) == (210.0, 203.0)


def test_run_due_without_tasks_rechecks():
    m = Maintenance("m-maintenance", threading.Event(), [])
    assert m.run_due(50.0) == 50.0 + RECHECK_S


def test_run_due_when_false_skips_and_rechecks_soon():
    ready = []
    gated, = tasks_at(("gated", 60.0, 100.0, lambda: bool(ready)))
    m = Maintenance("m-maintenance", threading.Event(), [gated])

    assert m.run_due(100.0) == pytest.approx(100.0 + RECHECK_S)
    assert gated.action.count == 0
    assert gated.next_at == pytest.approx(100.0 + RECHECK_S)    # not a whole interval later

    now = gated.next_at
    assert m.run_due(now) == pytest.approx(now + RECHECK_S)     # still false: still waiting
    assert gated.action.count == 0

    ready.append(True)
    now = gated.next_at
    assert m.run_due(now) == pytest.approx(now + 60.0)          # holds: runs, then its interval
    assert gated.action.count == 1


def test_run_due_when_false_rechecks_within_a_short_interval():
    gated, = tasks_at(("gated", RECHECK_S / 5, 100.0, lambda: False))
    m = Maintenance("m-maintenance", threading.Event(), [gated])
    assert m.run_due(100.0) == pytest.approx(100.0 + RECHECK_S / 5)


def test_run_due_when_is_not_asked_before_the_task_is_due():
    asked = []
    gated, = tasks_at(("gated", 5.0, 100.0, lambda: asked.append(1) or True))
    m = Maintenance("m-maintenance", threading.Event(), [gated])
    m.run_due(99.0)
    assert asked == []
    m.run_due(100.0)
    assert asked == [1] and gated.action.count == 1


def test_run_due_a_raising_task_is_logged_and_the_others_still_run(caplog):
    caplog.set_level(logging.WARNING, logger="pgnotify_sync")
    boom = Every("boom", 5.0, Counter(RuntimeError("database away\nDETAIL: the details")))
    fine = Every("fine", 7.0, Counter())
    boom.next_at = fine.next_at = 100.0
    m = Maintenance("m-maintenance", threading.Event(), [boom, fine])

    assert m.run_due(100.0) == 105.0
    assert (boom.action.count, fine.action.count) == (1, 1)
    assert (boom.next_at, fine.next_at) == (105.0, 107.0)   # the failed one is rescheduled too
    warnings = [r for r in caplog.records if r.name == "pgnotify_sync" and r.levelno == logging.WARNING]
    assert [r.getMessage() for r in warnings] == ["m-maintenance: boom: database away"]

    assert m.run_due(105.0) == 107.0                        # and it runs again at its time
    assert boom.action.count == 2


def test_run_due_a_raising_condition_is_logged_rechecked_and_the_others_still_run(caplog):
    caplog.set_level(logging.WARNING, logger="pgnotify_sync")

    def broken_condition():
        raise RuntimeError("state unknown")
    gated = Every("gated", 30.0, Counter(), when=broken_condition)
    fine = Every("fine", 7.0, Counter())
    gated.next_at = fine.next_at = 100.0
    m = Maintenance("m-maintenance", threading.Event(), [gated, fine])

    assert m.run_due(100.0) == 100.0 + RECHECK_S             # looked at again soon, not in 30 s
    assert (gated.action.count, fine.action.count) == (0, 1)
    warnings = [r.getMessage() for r in caplog.records if r.name == "pgnotify_sync"]
    assert warnings == ["m-maintenance: gated: state unknown"]


def test_a_raising_condition_does_not_end_the_thread(running):
    calls = Counter(RuntimeError("state unknown"))
    fine = Counter()
    m, _ = running([Every("gated", 0.01, Counter(), when=calls), Every("fine", 0.01, fine)])
    wait_for(lambda: calls.count >= 3 and fine.count >= 3, timeout=10, message="tasks stopped running")
    assert m.thread.is_alive()


# -- the thread --------------------------------------------------------------------------


def test_thread_is_named_and_a_daemon():
    stop = threading.Event()
    m = Maintenance("orders-maintenance", stop, [])
    assert m.thread is None             # started by start(), through _threads.spawn
    thread = m.start()
    try:
        assert thread is m.thread
        assert m.thread.name == "orders-maintenance"
        assert m.thread.daemon
    finally:
        stop.set()
        thread.join(5)
    assert not thread.is_alive()


def test_tasks_run_at_their_interval(running):
    fast, slow = Counter(), Counter()
    running([Every("fast", 0.02, fast), Every("slow", 0.05, slow)])
    wait_for(lambda: fast.count >= 6 and slow.count >= 3, message="tasks did not run repeatedly")
    # never sooner than the interval (a lower bound only: no speed is asserted)
    for counter, interval in ((fast, 0.02), (slow, 0.05)):
        times = counter.times[:]
        gaps = [b - a for a, b in zip(times, times[1:])]
        assert min(gaps) >= interval * 0.9, (interval, gaps)


def test_first_s_zero_runs_at_once_and_default_waits_an_interval(running):
    now_task, later = Counter(), Counter()
    tick = Counter()
    running([Every("now", 60.0, now_task, first_s=0), Every("later", 60.0, later), Every("tick", 0.02, tick)])
    wait_for(lambda: now_task.count == 1 and tick.count >= 5, message="first_s=0 task did not run")
    assert later.count == 0
    assert now_task.count == 1


def test_when_false_never_runs_and_runs_soon_once_it_holds(running, monkeypatch):
    monkeypatch.setattr(_maintenance, "RECHECK_S", 0.02)
    ready = threading.Event()
    gated, tick = Counter(), Counter()
    # A long interval: "soon" must come from the recheck, not from the interval.
    running([Every("gated", 30.0, gated, first_s=0, when=ready.is_set), Every("tick", 0.02, tick)])
    wait_for(lambda: tick.count >= 10, message="the other task did not run")
    assert gated.count == 0
    ready.set()
    wait_for(lambda: gated.count == 1, timeout=5.0, message="gated task did not run once when() held")
    assert gated.count == 1


def test_a_raising_task_is_logged_and_keeps_running_with_the_others(running, caplog):
    caplog.set_level(logging.WARNING, logger="pgnotify_sync")
    boom = Counter(ValueError("trim timed out\nCONTEXT: somewhere"))
    fine = Counter()
    m, _ = running([Every("boom", 0.02, boom), Every("fine", 0.02, fine)], name="jobs-maintenance")
    wait_for(lambda: boom.count >= 3 and fine.count >= 3, message="tasks stopped after a failure")
    assert m.thread.is_alive()
    messages = [r.getMessage() for r in list(caplog.records)
                if r.name == "pgnotify_sync" and r.levelno == logging.WARNING]
    assert len(messages) >= 3
    assert set(messages) == {"jobs-maintenance: boom: trim timed out"}


def test_setting_stop_ends_the_thread(running):
    tick = Counter()
    m, stop = running([Every("tick", 0.02, tick), Every("idle", 60.0, Counter())])
    wait_for(lambda: tick.count >= 2)
    stop.set()
    m.thread.join(5)
    assert not m.thread.is_alive()


def test_stop_ends_a_thread_sleeping_until_a_far_task(running):
    far = Counter()
    m, stop = running([Every("far", 3600.0, far)])
    wait_for(lambda: m.thread.is_alive())
    stop.set()
    m.thread.join(5)
    assert not m.thread.is_alive()
    assert far.count == 0


def test_stop_set_before_start_runs_nothing():
    stop = threading.Event()
    stop.set()
    task = Counter()
    m = Maintenance("x-maintenance", stop, [Every("now", 0.02, task, first_s=0)])
    m.start()
    m.thread.join(5)
    assert not m.thread.is_alive()
    assert task.count == 0
