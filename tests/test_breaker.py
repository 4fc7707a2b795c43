"""Unit tests for pgnotify_sync._breaker (the state machine, no database) and for
Delivery with a handler that keeps failing (DB-free: see test_delivery.py)."""

import functools

import pytest

from pgnotify_sync._backoff import Backoff
from pgnotify_sync._breaker import Admit, Breaker, Breakers, State, receiver_name
from pgnotify_sync._delivery import Delivery
from pgnotify_sync.errors import HandlerSuspended, RowTypeError

from test_delivery import Setup, ev


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


# -- the state machine ------------------------------------------------------------------------

def test_closed_retries_then_suspect_calls_once_then_open_rejects():
    clock = Clock()
    b = Breaker("h", threshold=3, reset_s=10, clock=clock)
    assert b.clean and b.admit() is Admit.RETRY
    assert b.failed() is False and b.state is State.SUSPECT and not b.clean
    assert b.admit() is Admit.ONCE
    assert b.failed() is False
    assert b.failed() is True and b.state is State.OPEN and b.opened == 1
    assert [b.admit() for _ in range(3)] == [Admit.REJECT] * 3 and b.rejected == 3


def test_a_success_while_suspect_closes_and_forgets_the_failures():
    b = Breaker("h", threshold=3, reset_s=10, clock=Clock())
    b.failed()
    b.failed()
    assert b.succeeded() is True and b.clean and b.failures == 0 and b.state is State.CLOSED
    b.failed()
    b.failed()
    assert b.state is State.SUSPECT        # two in a row again, not four


def test_one_trial_after_the_reset_time_and_others_rejected_meanwhile():
    clock = Clock()
    b = Breaker("h", threshold=1, reset_s=10, clock=clock)
    assert b.failed() is True
    clock.now += 9.9
    assert b.admit() is Admit.REJECT
    clock.now += 0.1
    assert b.admit() is Admit.TRIAL and b.state is State.TRIAL
    assert b.admit() is Admit.REJECT                    # one trial at a time
    assert b.failed(admit=Admit.TRIAL) is True and b.state is State.OPEN and b.opened == 2   # for 10 s more
    clock.now += 5
    assert b.admit() is Admit.REJECT
    clock.now += 5
    assert b.admit() is Admit.TRIAL
    assert b.succeeded() is True and b.state is State.CLOSED and b.opened_at is None


def test_an_abandoned_trial_is_due_again_at_once():
    clock = Clock()
    b = Breaker("h", threshold=1, reset_s=10, clock=clock)
    b.failed()
    clock.now += 10
    assert b.admit() is Admit.TRIAL
    b.abandon(Admit.TRIAL)
    assert b.state is State.OPEN and b.admit() is Admit.TRIAL


def test_only_the_trials_own_call_decides_a_trial():
    """Calls admitted before the trial began (on other row threads) that end during
    it neither open the breaker again nor end the trial."""
    clock = Clock()
    b = Breaker("h", threshold=1, reset_s=10, clock=clock)
    b.failed()
    clock.now += 10
    assert b.admit() is Admit.TRIAL
    assert b.failed(1, Admit.RETRY) is False and b.state is State.TRIAL and b.opened == 1
    b.abandon(Admit.ONCE)
    assert b.state is State.TRIAL
    assert b.failed(2, Admit.TRIAL) is True and b.state is State.OPEN and b.opened == 2
    assert b.failed(3, Admit.ONCE) is False and b.opened == 2       # open: nothing to open


def test_a_dead_letters_retry_calls_a_suspended_handler_once():
    b = Breaker("h", threshold=1, reset_s=10, clock=Clock())
    b.failed()
    assert b.admit() is Admit.REJECT and b.admit(asked=True) is Admit.ONCE and b.rejected == 1


def test_the_same_event_failing_again_counts_once():
    """An event that could not be parked is read again from the log and fails again:
    a run of failures is one of different events."""
    b = Breaker("h", threshold=2, reset_s=10, clock=Clock())
    for _ in range(5):
        assert b.failed(7) is False
    assert b.failures == 1 and b.state is State.SUSPECT
    assert b.failed(8) is True


def test_threshold_zero_never_opens():
    b = Breaker("h", threshold=0, reset_s=10, clock=Clock())
    for _ in range(100):
        assert b.failed() is False
    assert b.state is State.SUSPECT and b.admit() is Admit.ONCE


def test_a_success_of_a_clean_breaker_takes_no_lock():
    b = Breaker("h", threshold=3, reset_s=10)
    b._lock = None          # would raise if taken
    assert b.succeeded() is False


# -- names and the registry -------------------------------------------------------------------

def index_event(event):
    pass


class Indexer:
    def handle(self, event):
        pass


def test_receiver_names_are_module_and_qualified_name_and_unique_per_channel():
    def receiver(sender, event):
        pass
    receiver.__wrapped__ = index_event          # as Listener.on_event connects a handler
    first, second = (lambda s, event: None), (lambda s, event: None)
    indexer = Indexer()
    breakers = Breakers(3, 10)
    got = breakers.of("c", [receiver, first, second, indexer.handle])
    assert [b.name for b in got] == ["test_breaker.index_event", "test_breaker.test_receiver_names_are_module_"
                                     "and_qualified_name_and_unique_per_channel.<locals>.<lambda>",
                                     "test_breaker.test_receiver_names_are_module_and_qualified_name_and_unique_"
                                     "per_channel.<locals>.<lambda>#2", "test_breaker.Indexer.handle"]
    assert receiver_name(functools.partial(index_event)) == "functools.partial"
    # the same receivers (a bound method is a new object each time): the same breakers
    assert breakers.of("c", [receiver, first, second, indexer.handle]) == got
    # one disconnected: the others keep theirs, its breaker is forgotten
    got[0].failed()
    again = breakers.of("c", [receiver, second])
    assert again == [got[0], got[2]] and [c for c, _ in breakers.items()] == ["c", "c"]
    assert breakers.not_closed() == {"c": {"test_breaker.index_event": {
        "state": "suspect", "failures": 1, "opened_at": None, "rejected": 0}}}


def test_a_receiver_whose_attributes_raise_gets_a_breaker_named_by_its_type():
    """A receiver is user code: its attribute lookups run outside our lock, and one
    that raises (not AttributeError) names the breaker by the receiver's type."""
    class Odd:
        def __call__(self, sender, event):
            pass

        def __getattr__(self, name):
            raise RuntimeError(f"no {name}")
    odd = Odd()
    (breaker,) = Breakers(3, 10).of("c", [odd])
    assert breaker.name == "test_breaker.test_a_receiver_whose_attributes_raise_gets_a_breaker_named_by_its_type." \
                          "<locals>.Odd"


# -- Delivery with a handler that keeps failing -----------------------------------------------

def delivery(s, threshold=3, reset_s=10.0, attempts=5, clock=None):
    s.delivery = Delivery("t", s.signals, s.report, 0, backoff=Backoff(0.0001, 0.0001, attempts),
                          breakers=Breakers(threshold, reset_s, clock or Clock()))
    return s.delivery


@pytest.mark.parametrize("handlers", [1, 2], ids=["alone", "beside another"])
def test_a_handler_that_always_raises_is_suspended_and_the_others_get_everything(handlers):
    s = Setup()
    clock = Clock()
    delivery(s, clock=clock)
    ch = s.channel("messages", "messages")
    calls = []

    def broken(event):
        calls.append(event.id)
        raise KeyError("new column")
    s.on_event("messages", broken)
    other = s.on_event("messages", s.recorder()) if handlers == 2 else None
    s.delivery.deliver(ch, [ev(i) for i in range(1, 11)])
    assert calls == [1] * 5 + [2, 3]              # 5 attempts, then once each, then suspended
    if other is not None:
        assert other.got == list(range(1, 11))
    assert ch.handler_errors == 10 and ch.handler_retries == 4
    kinds = [(kind, type(error)) for kind, error, _c, _kw in s.reports]
    assert kinds == [("handler", KeyError)] * 3 + [("handler", HandlerSuspended)] * 7
    import logging
    assert all(kw.get("level") == logging.DEBUG for *_, kw in s.reports[3:])    # the opening was logged once
    assert "3 events failed in a row" in str(s.reports[3][1])
    # after the reset time one event tries it; it works again: closed
    clock.now += 10
    s.signals.event.disconnect(s.signals.event.receivers_for("messages").__next__(), sender="messages")
    calls.clear()
    fixed = s.on_event("messages", s.recorder())
    # a new receiver has a breaker of its own (a clean one)
    s.delivery.deliver(ch, [ev(11)])
    assert fixed.got == [11]


def switchable(s):
    """A handler of channel messages that raises while ``broken[0]``, else records
    the event's id in ``handled``."""
    broken, handled = [True], []

    def handler(event):
        if broken[0]:
            raise ConnectionError("away")
        handled.append(event.id)
    s.on_event("messages", handler)
    return broken, handled


def test_a_trial_that_succeeds_closes_the_breaker():
    s = Setup()
    clock = Clock()
    delivery(s, threshold=2, clock=clock)
    ch = s.channel("messages", "messages")
    broken, handled = switchable(s)
    s.delivery.deliver(ch, [ev(1), ev(2), ev(3)])
    assert [type(e) for _k, e, _c, _kw in s.reports] == [ConnectionError, ConnectionError, HandlerSuspended]
    broken[0] = False
    s.delivery.deliver(ch, [ev(4)])               # not due yet: fails at once
    assert handled == [] and type(s.reports[-1][1]) is HandlerSuspended
    clock.now += 10
    s.delivery.deliver(ch, [ev(5), ev(6)])        # 5 is the trial: it works, 6 follows
    assert handled == [5, 6]
    assert s.delivery._breakers.not_closed() == {}


def test_a_failure_that_passes_is_still_retried():
    s = Setup()
    delivery(s)
    ch = s.channel("messages", "messages")
    calls = []

    def flaky(event):
        calls.append(event.id)
        if calls.count(event.id) < 3:
            raise ConnectionError("blip")
    s.on_event("messages", flaky)
    s.delivery.deliver(ch, [ev(1), ev(2)])
    assert calls == [1, 1, 1, 2, 2, 2] and s.reports == [] and ch.handler_errors == 0


def test_rows_that_do_not_fit_do_not_suspend_the_handler():
    s = Setup()
    delivery(s, threshold=1)
    ch = s.channel("messages", "messages")

    def typed(event):
        raise RowTypeError("does not fit Job")
    s.on_event("messages", typed)
    s.delivery.deliver(ch, [ev(1), ev(2), ev(3)])
    assert [k for k, *_ in s.reports] == ["type"] * 3 and s.delivery._breakers.not_closed() == {}


def test_redelivered_dead_letters_reach_a_suspended_handler_and_close_it():
    s = Setup()
    delivery(s, threshold=1)
    ch = s.channel("messages", "messages")
    broken, handled = switchable(s)
    s.delivery.deliver(ch, [ev(1), ev(2)])
    assert [type(e) for _k, e, _c, _kw in s.reports] == [ConnectionError, HandlerSuspended]
    broken[0] = False
    done = []
    s.delivery.redeliver(ch, [ev(1), ev(2)], lambda ch, e: True, lambda ch, e: done.append(e.id))
    assert handled == [1, 2] and done == [1, 2] and s.delivery._breakers.not_closed() == {}


def test_a_durable_consumer_parks_the_events_failed_while_suspended():
    s = Setup()
    parked = []
    s.delivery = Delivery("t", s.signals, s.report, 0, backoff=None, park=lambda ch, e, exc, n: parked.append(
        (e.id, type(exc).__name__, n)), breakers=Breakers(2, 10, Clock()))
    ch = s.channel("messages", "messages")

    def broken(event):
        raise ValueError("bad")
    s.on_event("messages", broken)
    s.delivery.deliver(ch, [ev(1), ev(2), ev(3), ev(4)])
    assert parked == [(1, "ValueError", 1), (2, "ValueError", 1), (3, "HandlerSuspended", 0),
                      (4, "HandlerSuspended", 0)]
