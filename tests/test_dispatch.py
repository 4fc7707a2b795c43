"""Unit tests for pgnotify_sync._dispatch.Dispatcher with a fake listener (no database).

The fake hooks object records every call the dispatcher makes. Tests wait for
conditions with ``wait_for`` (deadline polling) or threading.Event, never with
fixed sleeps.
"""

import collections
import random
import threading
import time

import pytest

from helpers import wait_for
from pgnotify_sync._channel import Advance, CatchUp, ChannelState, SetPosition
from pgnotify_sync._dispatch import BATCH, Dispatcher
from pgnotify_sync._eventlog import CatchUpFailed, RangeRows
from pgnotify_sync._fetch import READ_AHEAD
from pgnotify_sync._snapshot import Snapshot
from pgnotify_sync.events import DatabaseEvent, EventRange, EventRef, Operation

GATE_TIMEOUT = 10.0


def ev(channel, ident, xid, op=Operation.INSERT):
    return DatabaseEvent(channel, op, "public", "t", {"n": ident}, None, ident, xid)


def plain(channel, n, xid=None):
    """A payload from a foreign trigger: no log id."""
    return DatabaseEvent(channel, Operation.INSERT, "public", "t", {"n": n}, None, None, xid)


def snap(text):
    return Snapshot.parse(text)


def _pages(pages):
    for page in pages:
        if isinstance(page, BaseException):
            raise page
        yield list(page)


_POSITION_SLOT = ChannelState.__dict__["position"]      # the slot's descriptor


class RecordingChannel(ChannelState):
    """A ChannelState that records each position move in *positions* (every move
    the dispatcher makes assigns ``position``)."""

    def __init__(self, name, wire, positions):
        self._moves = positions
        super().__init__(name, wire)

    @property
    def position(self):
        return _POSITION_SLOT.__get__(self)

    @position.setter
    def position(self, snapshot):
        _POSITION_SLOT.__set__(self, snapshot)
        if snapshot is not None:            # None: the constructor's "no position yet"
            self._moves.append((self.name, snapshot))


class FakeHooks:
    """Stands in for the Listener. Thread-safe recording of every hook call."""

    def __init__(self):
        self.lock = threading.Lock()
        self.deliveries = []                      # (channel name, [events]) per deliver call
        self.reports = []                         # (kind, error, channel)
        self.caught_ups = []                      # (channel name, reason, count)
        self.positions = []                       # (channel name, snapshot) per move (RecordingChannel)
        self.catch_up_calls = []                  # channel names
        self.catch_up_script = collections.defaultdict(list)   # name -> [(snapshot, pages) | exception]
        self.refs = {}                            # log id -> event (or None: no longer in the log)
        self.fetched = []                         # the ids of each fetch_ids call
        self.lost = []                            # (channel name, partition) per lease_lost call
        self.redelivered = []                     # (channel name, [ids]) per redeliver call
        self.windows = []                         # [(id, xid)] answers of window(), in order (then: none)
        self.window_calls = []                    # (channel name, target) per window call
        self.ranges = {}                          # first id -> callable() returning the range's events
        self.others = {}                          # first id -> rows of another consumer's backfill (others_in_range)
        self.range_calls = []                     # first ids passed to fetch_range, in call order
        self.handler = None                       # optional callable(ch, events), run inside deliver
        self.active = collections.Counter()       # deliver calls running now, per channel
        self.max_active = collections.Counter()   # the most seen at once, per channel
        self.max_total = 0                        # the most deliver calls at once, all channels
        self.batches = []                         # channel names per after_batch call
        self.expect_internal = False              # a test that provokes "internal" reports sets it
        self.gates = []                           # Events released at teardown

    def gate(self):
        event = threading.Event()
        self.gates.append(event)
        return event

    # -- hooks ----------------------------------------------------------------------

    def deliver(self, ch, events):
        events = list(events)
        with self.lock:
            self.active[ch.name] += 1
            self.max_active[ch.name] = max(self.max_active[ch.name], self.active[ch.name])
            self.max_total = max(self.max_total, sum(self.active.values()))
        try:
            time.sleep(0)        # give other workers a chance to interleave
            if self.handler is not None:
                self.handler(ch, events)
            with self.lock:
                self.deliveries.append((ch.name, events))
        finally:
            with self.lock:
                self.active[ch.name] -= 1

    def report(self, kind, error, channel, **kwargs):
        with self.lock:
            self.reports.append((kind, error, channel))

    def caught_up(self, ch, reason, count):
        with self.lock:
            self.caught_ups.append((ch.name, reason, count))

    def catch_up(self, ch, reason):
        with self.lock:
            self.catch_up_calls.append(ch.name)
            script = self.catch_up_script[ch.name]
            step = script.pop(0) if script else (ch.position, [])
        if isinstance(step, BaseException):
            raise step
        snapshot, pages = step
        return snapshot, _pages(pages)

    def fetch_ids(self, ch, ids, mine=False):
        with self.lock:
            self.fetched.append(list(ids))
        found = []
        for ident in ids:
            result = self.refs.get(ident)
            if isinstance(result, BaseException):
                raise result
            if result is not None:
                found.append(result)
        return found

    def window(self, ch, target):
        with self.lock:
            self.window_calls.append((ch.name, target))
            return self.windows.pop(0) if self.windows else []

    def fetch_range(self, ch, rng, after=0, previous=None):
        with self.lock:
            self.range_calls.append(rng.first)
        if rng.first in self.ranges:
            return RangeRows.of(self.ranges[rng.first]()), False
        # a slice of a wide range (_fetch.slices): the rows of the range it is part of
        first = max(k for k in self.ranges if k <= rng.first)
        return RangeRows.of([e for e in self.ranges[first]() if rng.first <= e.id <= rng.last]), False

    def others_in_range(self, ch, rng):
        return self.others.get(rng.first, 0)

    def after_batch(self, ch):
        with self.lock:
            self.batches.append(ch.name)

    def lease_lost(self, lane):
        with self.lock:
            self.lost.append((lane.name, lane.partition))

    def redeliver(self, ch, events):
        with self.lock:
            self.redelivered.append((ch.name, [e.id for e in events]))

    # No __getattr__: a hook the Dispatcher calls under another name than the
    # protocol's (a rename on one side) raises AttributeError here, which the
    # dispatcher reports as an "internal" error, which the fixture fails on.

    # -- queries ----------------------------------------------------------------------

    def ids(self, name):
        with self.lock:
            return [e.id for n, events in self.deliveries if n == name for e in events]

    def events(self, name):
        with self.lock:
            return [e for n, events in self.deliveries if n == name for e in events]

    def kinds(self):
        with self.lock:
            return [kind for kind, _, _ in self.reports]


@pytest.fixture
def make_dispatcher():
    created = []

    def make(names=("a",), capacity=1000, workers=2, retry_s=0.5, start=True, compact_ranges=True):
        hooks = FakeHooks()
        channels = {name: RecordingChannel(name, "app." + name, hooks.positions) for name in names}
        dispatcher = Dispatcher("test", channels, capacity, workers, hooks, retry_s=retry_s,
                                compact_ranges=compact_ranges)
        if start:
            dispatcher.start()
        created.append((dispatcher, hooks))
        return dispatcher, channels, hooks

    yield make
    for dispatcher, hooks in created:
        for gate in hooks.gates:
            gate.set()
        if any(t.is_alive() for t in dispatcher.threads()):
            dispatcher.close(5.0)
    for dispatcher, hooks in created:
        # A worker failure (a hook missing from the fake, i.e. renamed on one side,
        # is one) fails the test that caused it, unless the test provoked it.
        if not hooks.expect_internal:
            no_internal_errors(hooks)


def idle(dispatcher, channels):
    return not any(ch.scheduled for ch in channels.values())


def wait_idle(dispatcher, channels, message="dispatcher did not become idle"):
    wait_for(lambda: idle(dispatcher, channels), message=message)


def no_internal_errors(hooks):
    assert "internal" not in hooks.kinds(), hooks.reports


# -- the fake itself ------------------------------------------------------------------------

# The DispatchHooks the Dispatcher calls; FakeHooks implements exactly these, and so
# does the hooks object the Listener builds.
HOOKS = ("after_batch", "catch_up", "caught_up", "deliver", "fetch_ids", "fetch_range", "lease_lost",
         "others_in_range", "redeliver", "report", "window")


def test_fake_hooks_are_the_protocols_hooks_and_nothing_else():
    import inspect
    import re
    from pgnotify_sync import _dispatch, _worker
    from pgnotify_sync import Config
    from pgnotify_sync.listener import Listener
    called = {name for module in (_dispatch, _worker)
              for name in re.findall(r"self\._hooks\.(\w+)", inspect.getsource(module))}
    assert called == set(HOOKS)
    protocol = {n for n in vars(_dispatch.DispatchHooks) if not n.startswith("_")}
    assert protocol == set(HOOKS)

    def positional(fn):
        return [p.name for p in inspect.signature(fn).parameters.values()
                if p.kind is p.POSITIONAL_OR_KEYWORD and p.default is p.empty]
    listener = Listener(Config(postgres_user="u", postgres_db="d", channels=("a",)), registry=False)
    real = listener._hooks.dispatch_hooks()           # what the Listener hands its Dispatcher
    assert set(vars(real)) == set(HOOKS)
    for name in HOOKS:
        expected = positional(getattr(_dispatch.DispatchHooks, name))
        assert positional(getattr(FakeHooks, name)) == expected, name
        assert ["self"] + positional(getattr(real, name)) == expected, name      # bound methods
    with pytest.raises(AttributeError, match="deliver_events"):
        FakeHooks().deliver_events         # an unknown (e.g. renamed) hook is not swallowed


# -- construction -------------------------------------------------------------------------


def test_by_wire_and_resume_level():
    channels = {"a": ChannelState("a", "app.a"), "b": ChannelState("b", "app.b")}
    d = Dispatcher("t", channels, 10, 1, FakeHooks())
    assert d.by_wire == {"app.a": channels["a"], "app.b": channels["b"]}
    assert d.resume_level == 5
    assert d.buffered == 0
    assert d.threads() == []


def test_start_creates_named_daemon_workers(make_dispatcher):
    d, chans, hooks = make_dispatcher(workers=3)
    threads = d.threads()
    # the workers, and READ_AHEAD fetch threads for each (their reads ahead)
    assert sorted(t.name for t in threads) == sorted(
        [f"test-worker-{i}" for i in range(3)] + [f"test-fetch-{i}" for i in range(3 * READ_AHEAD)])
    assert all(t.daemon and t.is_alive() for t in threads)


# -- order and concurrency ------------------------------------------------------------------


def test_per_channel_order_with_several_workers(make_dispatcher):
    names = ("a", "b", "c", "d", "e")
    d, chans, hooks = make_dispatcher(names=names, workers=4, capacity=100_000)
    per_channel = 400
    rng = random.Random(42)
    next_id = {name: 1 for name in names}
    while any(next_id[n] <= per_channel for n in names):
        name = rng.choice(names)
        start = next_id[name]
        if start > per_channel:
            continue
        count = min(rng.randint(1, 7), per_channel - start + 1)
        d.push(chans[name], [ev(name, i, 10_000 + i) for i in range(start, start + count)])
        next_id[name] = start + count

    wait_for(lambda: all(len(hooks.ids(n)) >= per_channel for n in names), message="not all delivered")
    wait_idle(d, chans)
    for name in names:
        assert hooks.ids(name) == list(range(1, per_channel + 1)), name
        assert all(e.channel == name for e in hooks.events(name))
        assert hooks.max_active[name] == 1, f"channel {name} had concurrent deliveries"
    assert d.buffered == 0
    no_internal_errors(hooks)


def test_one_event_at_a_time_per_channel_while_other_channels_run(make_dispatcher):
    d, chans, hooks = make_dispatcher(names=("a", "b"), workers=2)
    release_a = hooks.gate()
    a_blocked = threading.Event()
    b_saw_a_running = []

    def handler(ch, events):
        if ch.name == "a" and not a_blocked.is_set():
            a_blocked.set()
            assert release_a.wait(GATE_TIMEOUT)
        elif ch.name == "b":
            with hooks.lock:
                b_saw_a_running.append(hooks.active["a"])

    hooks.handler = handler
    d.push(chans["a"], [ev("a", 1, 101)])
    assert a_blocked.wait(GATE_TIMEOUT)
    d.push(chans["a"], [ev("a", 2, 102)])
    d.push(chans["a"], [ev("a", 3, 103)])
    d.push(chans["b"], [ev("b", 1, 201), ev("b", 2, 202)])

    # b is handled on the other worker while a's first delivery is still blocked ...
    wait_for(lambda: hooks.ids("b") == [1, 2], message="channel b did not run in parallel")
    assert b_saw_a_running == [1]
    # ... and a's later events wait for it: nothing of a has been delivered, one call in flight.
    assert hooks.ids("a") == []
    assert hooks.active["a"] == 1
    assert chans["a"].scheduled

    release_a.set()
    wait_for(lambda: hooks.ids("a") == [1, 2, 3], message="channel a not delivered in order")
    assert hooks.max_active["a"] == 1
    assert hooks.max_active["b"] == 1
    assert hooks.max_total == 2


def test_channels_in_parallel_need_each_other(make_dispatcher):
    """Each channel's handler waits for the other one: only parallel delivery finishes."""
    d, chans, hooks = make_dispatcher(names=("a", "b"), workers=2)
    started = {"a": threading.Event(), "b": threading.Event()}
    met = {}

    def handler(ch, events):
        started[ch.name].set()
        other = "b" if ch.name == "a" else "a"
        met[ch.name] = started[other].wait(GATE_TIMEOUT)

    hooks.handler = handler
    d.push(chans["a"], [ev("a", 1, 1)])
    d.push(chans["b"], [ev("b", 1, 2)])
    wait_for(lambda: len(met) == 2, timeout=GATE_TIMEOUT + 5)
    assert met == {"a": True, "b": True}


def test_single_worker_serves_all_channels(make_dispatcher):
    d, chans, hooks = make_dispatcher(names=("a", "b", "c"), workers=1)
    for i in range(1, 51):
        for name in chans:
            d.push(chans[name], [ev(name, i, 1000 + i)])
    wait_for(lambda: all(hooks.ids(n) == list(range(1, 51)) for n in chans))
    assert hooks.max_total == 1


def test_large_push_is_delivered_in_batches_in_order(make_dispatcher):
    d, chans, hooks = make_dispatcher(workers=2, capacity=5000)
    d.push(chans["a"], [ev("a", i, 100 + i) for i in range(1, 1001)])
    wait_for(lambda: len(hooks.ids("a")) == 1000)
    assert hooks.ids("a") == list(range(1, 1001))
    with hooks.lock:
        sizes = [len(events) for _, events in hooks.deliveries]
    assert max(sizes) <= 256
    wait_idle(d, chans)
    assert d.buffered == 0


# -- duplicates: position and handled ---------------------------------------------------------


def test_duplicates_dropped_against_position_and_handled(make_dispatcher):
    d, chans, hooks = make_dispatcher(workers=2, start=False)
    a = chans["a"]
    d.push_control(a, SetPosition(snap("100:110:105,108")))
    d.push(a, [
        ev("a", 1, 99),     # below xmin: handled before
        ev("a", 2, 105),    # in progress at the position: new
        ev("a", 3, 107),    # visible at the position: handled before
        ev("a", 4, 110),    # at xmax: new
        ev("a", 5, 108),    # in progress: new
        ev("a", 2, 105),    # same id again: duplicate
        ev("a", 4, 110),    # duplicate
        ev("a", 6, 200),    # new
        ev("a", 7, 100),    # == xmin, not in progress: visible, handled before
        plain("a", 1),      # no id, no xid: always delivered
        plain("a", 2),
    ])
    d.start()
    wait_idle(d, chans)
    assert hooks.ids("a") == [2, 4, 5, 6, None, None]
    assert [e.data["n"] for e in hooks.events("a")][-2:] == [1, 2]
    assert a.position == snap("100:110:105,108")
    assert a.handled == {2: 105, 4: 110, 5: 108, 6: 200}
    assert hooks.positions == [("a", snap("100:110:105,108"))]
    assert d.buffered == 0
    no_internal_errors(hooks)

    # An Advance that does not cover the position is ignored.
    d.push_control(a, Advance(snap("100:105:")))
    wait_idle(d, chans)
    assert a.position == snap("100:110:105,108")

    # One that covers it moves the position and forgets the ids now visible.
    d.push_control(a, Advance(snap("111:111:")))
    wait_idle(d, chans)
    assert a.position == snap("111:111:")
    assert a.handled == {6: 200}
    assert hooks.positions[-1] == ("a", snap("111:111:"))

    d.push(a, [ev("a", 2, 105), ev("a", 8, 111), ev("a", 6, 200), ev("a", 9, 112), ev("a", 8, 111)])
    wait_idle(d, chans)
    assert hooks.ids("a") == [2, 4, 5, 6, None, None, 8, 9]
    no_internal_errors(hooks)


def test_without_position_only_handled_ids_dedupe(make_dispatcher):
    d, chans, hooks = make_dispatcher(workers=1)
    a = chans["a"]
    d.push(a, [ev("a", 1, 50), ev("a", 2, 10), ev("a", 1, 50), ev("a", 3, 5)])
    wait_idle(d, chans)
    assert hooks.ids("a") == [1, 2, 3]
    assert a.position is None
    assert a.handled == {1: 50, 2: 10, 3: 5}


def test_event_without_xid_is_never_deduplicated(make_dispatcher):
    d, chans, hooks = make_dispatcher(workers=1)
    d.push_control(chans["a"], SetPosition(snap("100:100:")))
    d.push(chans["a"], [ev("a", 1, None), ev("a", 1, None)])
    wait_idle(d, chans)
    assert hooks.ids("a") == [1, 1]


def test_set_position_only_when_none(make_dispatcher):
    d, chans, hooks = make_dispatcher(workers=1)
    a = chans["a"]
    d.push_control(a, SetPosition(snap("10:10:")))
    d.push_control(a, SetPosition(snap("20:20:")))
    wait_idle(d, chans)
    assert a.position == snap("10:10:")
    assert hooks.positions == [("a", snap("10:10:"))]


def test_advance_without_position_is_ignored(make_dispatcher):
    d, chans, hooks = make_dispatcher(workers=1)
    d.push_control(chans["a"], Advance(snap("10:10:")))
    wait_idle(d, chans)
    assert chans["a"].position is None
    assert hooks.positions == []


def test_push_control_skip_overflowing(make_dispatcher):
    d, chans, hooks = make_dispatcher(workers=1, start=False)
    a = chans["a"]
    a.overflow = True
    a.retry_at = time.monotonic() + 3600
    d.push_control(a, Advance(snap("10:10:")), skip_overflowing=True)
    assert not a.items and not a.scheduled
    d.push_control(a, SetPosition(snap("10:10:")))
    assert len(a.items) == 1 and a.scheduled


def test_plain_events_with_xid_but_no_id_are_all_delivered(make_dispatcher):
    d, chans, hooks = make_dispatcher(workers=1)
    d.push(chans["a"], [plain("a", 1, xid=500), plain("a", 2, xid=501), plain("a", 3, xid=502)])
    wait_idle(d, chans)
    assert [e.data["n"] for e in hooks.events("a")] == [1, 2, 3]


# -- EventRef ----------------------------------------------------------------------------------


def test_hints_drained_together_are_read_together_unless_seen(make_dispatcher):
    d, chans, hooks = make_dispatcher(workers=1, start=False)
    a = chans["a"]
    hooks.refs = {8: ev("a", 8, 105), 9: None, 10: ev("a", 10, 300), 11: ev("a", 11, 120), 12: ev("a", 12, 130)}
    d.push_control(a, SetPosition(snap("100:110:105")))
    d.push(a, [
        EventRef("a", 7, 103),           # visible in the position: not even read
        EventRef("a", 12, 130),          # read, delivered in arrival order (before 8)
        EventRef("a", 8, 105),           # read and delivered
        EventRef("a", 8, 105),           # a repeat: read once, delivered once
        EventRef("a", 11, 120),
        EventRef("a", 9, 130),           # not in the log (forged, or trimmed): nothing delivered
        EventRef("a", 10, 301),          # the row's xid is 300: a forged hint, nothing delivered
    ])
    assert d.buffered == 7
    d.start()
    wait_idle(d, chans)
    assert hooks.ids("a") == [12, 8, 11]
    assert hooks.fetched == [[12, 8, 8, 11, 9, 10]]          # one read for the batch
    assert a.handled == {12: 130, 8: 105, 11: 120}           # never an id the log did not confirm
    assert a.unmatched_hints == 2 and hooks.kinds() == ["payload"]
    assert d.buffered == 0
    no_internal_errors(hooks)


def test_events_before_a_control_item_are_delivered_first(make_dispatcher):
    d, chans, hooks = make_dispatcher(workers=1, start=False)
    a = chans["a"]
    rng, events = _range("a", 3, 1, 30)
    hooks.ranges = {3: lambda: events}
    d.push(a, [ev("a", 1, 10), ev("a", 2, 20), rng, ev("a", 4, 40)])
    d.start()
    wait_idle(d, chans)
    with hooks.lock:
        batches = [[e.id for e in events] for _, events in hooks.deliveries]
    assert batches == [[1, 2], [3], [4]]


# -- overflow and resume --------------------------------------------------------------------------


def test_push_beyond_capacity_overflows_and_resumes_with_catch_up(make_dispatcher):
    d, chans, hooks = make_dispatcher(capacity=4, workers=1, start=False)
    a = chans["a"]
    events = [ev("a", i, 100 + i) for i in range(1, 9)]
    d.push_control(a, SetPosition(snap("100:100:")))

    d.push(a, events[:6])
    assert a.overflow
    assert a.dropped == 2
    assert d.buffered == 4
    assert [x.id for x in a.items if isinstance(x, DatabaseEvent)] == [1, 2, 3, 4]

    d.push(a, events[6:])            # still full: dropped from memory
    assert a.dropped == 4
    assert d.buffered == 4
    assert hooks.reports == []       # every dropped event has a log id: nothing lost, nothing to report

    d.retry_overflowed()             # no room yet (4 > resume level 2): stays in overflow
    assert a.overflow
    assert not any(isinstance(x, CatchUp) for x in a.items)

    hooks.catch_up_script["a"].append((snap("110:110:"), [events[:4], events[4:]]))
    d.start()
    wait_for(lambda: hooks.ids("a") == [1, 2, 3, 4])
    wait_idle(d, chans)
    assert d.buffered == 0
    assert a.overflow                # nothing resumes by itself without retry/push

    d.retry_overflowed()
    assert not a.overflow
    wait_for(lambda: hooks.caught_ups, message="catch-up did not run")
    wait_idle(d, chans)
    assert hooks.catch_up_calls == ["a"]
    assert hooks.caught_ups == [("a", "retry", 4)]
    assert hooks.ids("a") == [1, 2, 3, 4, 5, 6, 7, 8]
    assert a.position == snap("110:110:")
    assert a.handled == {}
    assert hooks.positions[-1] == ("a", snap("110:110:"))
    no_internal_errors(hooks)


def test_push_resumes_overflowed_channel_when_room_is_back(make_dispatcher):
    d, chans, hooks = make_dispatcher(capacity=4, workers=1, start=False)
    a = chans["a"]
    events = [ev("a", i, 100 + i) for i in range(1, 8)]
    d.push_control(a, SetPosition(snap("100:100:")))
    d.push(a, events[:6])
    assert a.overflow and a.dropped == 2
    d.start()
    wait_for(lambda: hooks.ids("a") == [1, 2, 3, 4])
    wait_idle(d, chans)

    # The log has 5..7 by now; event 7 also arrives live, after the resume.
    hooks.catch_up_script["a"].append((snap("120:120:"), [events[:7]]))
    d.push(a, [events[6]])
    assert not a.overflow
    wait_for(lambda: hooks.caught_ups)
    wait_idle(d, chans)
    assert hooks.caught_ups == [("a", "overflow", 3)]
    assert hooks.ids("a") == [1, 2, 3, 4, 5, 6, 7]     # 7 once: the live copy is a duplicate

    d.push(a, [ev("a", 8, 125)])              # a new transaction, after the new position
    wait_for(lambda: hooks.ids("a")[-1:] == [8])
    assert hooks.ids("a") == list(range(1, 9))
    no_internal_errors(hooks)


def test_partial_room_keeps_the_first_events(make_dispatcher):
    d, chans, hooks = make_dispatcher(capacity=5, workers=1, start=False)
    a = chans["a"]
    d.push(a, [ev("a", 1, 1), ev("a", 2, 2), ev("a", 3, 3)])
    assert not a.overflow
    d.push(a, [ev("a", 4, 4), ev("a", 5, 5), ev("a", 6, 6), ev("a", 7, 7)])
    assert a.overflow
    assert a.dropped == 2
    assert d.buffered == 5
    assert [x.id for x in a.items] == [1, 2, 3, 4, 5]


def test_capacity_is_shared_by_channels(make_dispatcher):
    d, chans, hooks = make_dispatcher(names=("a", "b"), capacity=4, workers=1, start=False)
    d.push(chans["a"], [ev("a", i, i) for i in range(1, 4)])
    d.push(chans["b"], [ev("b", 1, 1), ev("b", 2, 2)])
    assert not chans["a"].overflow
    assert chans["b"].overflow and chans["b"].dropped == 1
    assert d.buffered == 4


def test_overflow_of_events_without_log_id_is_reported(make_dispatcher):
    d, chans, hooks = make_dispatcher(capacity=2, workers=1, start=False)
    a = chans["a"]
    d.push(a, [plain("a", 1), plain("a", 2), plain("a", 3), ev("a", 4, 4), plain("a", 5)])
    assert a.dropped == 3
    assert [(kind, channel) for kind, _, channel in hooks.reports] == [("overflow", "a")]
    assert "2 events without a log id" in hooks.reports[0][1]


def test_retry_overflowed_waits_for_room_retry_time_and_idle_channel(make_dispatcher):
    d, chans, hooks = make_dispatcher(names=("a", "b"), capacity=4, workers=1, start=False)
    a, b = chans["a"], chans["b"]
    d.push(a, [ev("a", i, i) for i in range(1, 6)])       # a overflows, 4 buffered
    assert a.overflow and d.buffered == 4
    d.retry_overflowed()
    assert a.overflow                                       # buffer above the resume level

    b.overflow = True
    b.retry_at = time.monotonic() + 3600                    # e.g. after a failed catch-up
    d.start()
    wait_idle(d, chans)
    d.retry_overflowed()
    assert not a.overflow                                   # room again: resumed
    assert b.overflow                                       # its retry time has not come
    wait_idle(d, chans)
    assert hooks.caught_ups == [("a", "retry", 0)]           # no position yet: nothing to read
    assert hooks.catch_up_calls == []


def test_catch_up_all(make_dispatcher):
    d, chans, hooks = make_dispatcher(names=("a", "b", "c"), capacity=100, workers=2)
    chans["a"].overflow = True
    chans["a"].retry_at = time.monotonic() + 3600           # catch_up_all does not wait for it
    d.push_control(chans["b"], SetPosition(snap("10:10:")))
    hooks.catch_up_script["b"].append((snap("12:12:"), [[ev("b", 1, 10), ev("b", 2, 11)]]))
    wait_idle(d, chans)
    d.catch_up_all("reconnect")
    wait_for(lambda: len(hooks.caught_ups) == 3)
    assert sorted(hooks.caught_ups) == [("a", "reconnect", 0), ("b", "reconnect", 2), ("c", "reconnect", 0)]
    assert not chans["a"].overflow
    assert hooks.ids("b") == [1, 2]
    assert chans["b"].position == snap("12:12:")


def test_catch_up_without_position_does_not_read_the_log(make_dispatcher):
    d, chans, hooks = make_dispatcher(workers=1)
    d.push_control(chans["a"], CatchUp("connect"))
    wait_for(lambda: hooks.caught_ups)
    assert hooks.caught_ups == [("a", "connect", 0)]
    assert hooks.catch_up_calls == []


# -- catch-up failure -------------------------------------------------------------------------------


def test_catch_up_failed_falls_back_and_retries_later(make_dispatcher):
    d, chans, hooks = make_dispatcher(names=("a", "b"), workers=2, retry_s=3600, start=False)
    a, b = chans["a"], chans["b"]
    failure = CatchUpFailed("event log unreachable")
    hooks.catch_up_script["a"] += [failure, (snap("120:120:"), [[ev("a", i, 100 + i) for i in (1, 2, 3)]])]
    d.push_control(a, SetPosition(snap("100:100:")))
    d.push_control(a, CatchUp("connect"))
    d.push(a, [ev("a", 1, 101), ev("a", 2, 102)])           # behind the failing catch-up: dropped
    before = time.monotonic()
    d.start()

    wait_for(lambda: "catchup" in hooks.kinds(), message="no catchup report")
    wait_idle(d, chans)
    assert hooks.reports == [("catchup", failure, "a")]
    assert a.overflow
    assert a.retry_at >= before + 3600
    assert a.dropped == 2
    assert d.buffered == 0
    assert not a.items
    assert hooks.ids("a") == []
    assert hooks.caught_ups == []

    # The workers survived: other channels keep going.
    assert all(t.is_alive() for t in d.threads())
    d.push(b, [ev("b", 1, 1), ev("b", 2, 2)])
    wait_for(lambda: hooks.ids("b") == [1, 2])

    # While it waits for the retry, the channel's live events are dropped (they are in the log).
    d.push(a, [ev("a", 3, 103)])
    assert a.dropped == 3 and d.buffered == 0
    d.retry_overflowed()
    assert a.overflow and not a.items                       # retry time not reached

    a.retry_at = 0.0                                        # time passes (retry_s elapsed)
    d.retry_overflowed()
    assert not a.overflow
    wait_for(lambda: hooks.caught_ups)
    wait_idle(d, chans)
    assert hooks.caught_ups == [("a", "retry", 3)]
    assert hooks.ids("a") == [1, 2, 3]
    assert hooks.catch_up_calls == ["a", "a"]
    assert a.position == snap("120:120:")
    no_internal_errors(hooks)


def test_catch_up_failing_mid_pages_delivers_nothing_twice(make_dispatcher):
    d, chans, hooks = make_dispatcher(workers=1, retry_s=3600, start=False)
    a = chans["a"]
    events = [ev("a", i, 100 + i) for i in range(1, 7)]
    failure = CatchUpFailed("connection lost while paging")
    hooks.catch_up_script["a"] += [
        (snap("110:110:"), [events[:2], failure]),
        (snap("110:110:"), [events[:3], events[3:]]),
    ]
    d.push_control(a, SetPosition(snap("100:100:")))
    d.push_control(a, CatchUp("connect"))
    d.start()
    wait_for(lambda: "catchup" in hooks.kinds())
    wait_idle(d, chans)
    assert hooks.ids("a") == [1, 2]
    assert a.position == snap("100:100:")                  # not moved: the catch-up did not finish
    assert a.overflow

    a.retry_at = 0.0
    d.retry_overflowed()
    wait_for(lambda: hooks.caught_ups)
    wait_idle(d, chans)
    assert hooks.ids("a") == [1, 2, 3, 4, 5, 6]
    assert hooks.caught_ups == [("a", "retry", 4)]
    assert a.position == snap("110:110:")
    assert all(t.is_alive() for t in d.threads())


def test_a_failed_read_of_hints_falls_back(make_dispatcher):
    d, chans, hooks = make_dispatcher(workers=1, retry_s=3600, start=False)
    a = chans["a"]
    hooks.refs = {5: CatchUpFailed("log away")}
    d.push_control(a, SetPosition(snap("100:100:")))
    d.push(a, [ev("a", 4, 104), EventRef("a", 5, 105), ev("a", 6, 106)])
    d.start()
    wait_for(lambda: "catchup" in hooks.kinds())
    wait_idle(d, chans)
    assert hooks.ids("a") == [4]
    assert a.overflow
    assert d.buffered == 0
    assert all(t.is_alive() for t in d.threads())


# -- ranges read ahead ------------------------------------------------------------------------


def _range(channel, first, n, xid):
    """An EventRange and the events its read returns."""
    return EventRange(channel, xid, first, first + n - 1, n), [ev(channel, i, xid) for i in range(first, first + n)]


def _second_range_read_during_first_delivery(hooks, first, second):
    """Script *hooks* for two ranges ``(EventRange, events)``: delivering the first
    waits for the read of the second to start (without a read ahead it never would,
    and the wait times out). Returns the list the wait results go to."""
    (r1, e1), (r2, e2) = first, second
    second_read = threading.Event()

    def read_second():
        second_read.set()
        return e2

    hooks.ranges = {r1.first: lambda: e1, r2.first: read_second}
    overlapped = []

    def handler(ch, events):
        if events[0].id == r1.first:
            overlapped.append(second_read.wait(GATE_TIMEOUT))

    hooks.handler = handler
    return overlapped


def test_next_range_is_read_while_the_current_one_is_delivered(make_dispatcher):
    d, chans, hooks = make_dispatcher(workers=1, start=False)
    a = chans["a"]
    r1, r2 = _range("a", 1, 3, 101), _range("a", 4, 3, 102)
    overlapped = _second_range_read_during_first_delivery(hooks, r1, r2)
    d.push_control(a, SetPosition(snap("100:100:")))
    d.push(a, [r1[0], r2[0]])
    d.start()
    wait_for(lambda: len(hooks.ids("a")) == 6)
    assert overlapped == [True]
    assert hooks.ids("a") == [1, 2, 3, 4, 5, 6]
    no_internal_errors(hooks)


def test_a_hint_naming_a_backfill_row_is_forged(make_dispatcher):
    # A backfill's rows are announced by range only; the hint read leaves MINE out
    # (the hot path), so the worker refuses the row a hint names.
    d, chans, hooks = make_dispatcher(workers=1, start=False)
    a = chans["a"]
    hooks.refs = {5: ev("a", 5, 101, Operation.BACKFILL), 6: ev("a", 6, 102)}
    d.push_control(a, SetPosition(snap("100:100:")))
    d.push(a, [EventRef("a", 5, 101), EventRef("a", 6, 102)])
    d.start()
    wait_for(lambda: hooks.ids("a") == [6])
    wait_idle(d, chans)
    assert a.unmatched_hints == 1 and hooks.kinds() == ["payload"]
    assert 5 not in a.handled


def test_a_range_with_no_row_of_ours_is_reported_unless_it_is_another_consumers_backfill(make_dispatcher):
    d, chans, hooks = make_dispatcher(workers=1, start=False)
    a = chans["a"]
    forged, _ = _range("a", 1, 3, 101)
    backfill, _ = _range("a", 10, 3, 102)
    live = _range("a", 20, 2, 103)
    hooks.ranges = {forged.first: list, backfill.first: list, live[0].first: lambda: live[1]}
    hooks.others = {backfill.first: 3}
    d.push_control(a, SetPosition(snap("100:100:")))
    d.push(a, [forged, backfill, live[0]])
    d.start()
    wait_for(lambda: hooks.ids("a") == [20, 21])
    wait_idle(d, chans)
    assert a.unmatched_hints == 1 and hooks.kinds() == ["payload"]      # the forged one only
    assert hooks.range_calls == [1, 10, 20]


def test_ranges_queued_behind_the_batch_are_read_ahead_too(make_dispatcher):
    d, chans, hooks = make_dispatcher(workers=1, capacity=100_000, start=False)
    a = chans["a"]
    r1, r2 = _range("a", 1, 3, 101), _range("a", 10_001, 3, 102)
    overlapped = _second_range_read_during_first_delivery(hooks, r1, r2)
    d.push_control(a, SetPosition(snap("100:100:")))
    # The worker takes BATCH items at a time: r2 stays queued behind r1's batch.
    filler = [ev("a", 100 + k, 100) for k in range(BATCH - 2)]
    d.push(a, [r1[0]] + filler + [r2[0]])
    d.start()
    wait_for(lambda: len(hooks.ids("a")) == 6 + len(filler))
    assert overlapped == [True]
    assert hooks.ids("a") == [1, 2, 3] + [e.id for e in filler] + [10_001, 10_002, 10_003]
    assert a.ahead == {}
    no_internal_errors(hooks)


def test_ranges_read_out_of_order_are_delivered_in_order(make_dispatcher):
    d, chans, hooks = make_dispatcher(workers=1, start=False)
    a = chans["a"]
    ranges = [_range("a", 1 + 10 * k, 10, 101 + k) for k in range(6)]
    done = {first: threading.Event() for first in (1, 11, 21, 31, 41, 51)}

    def reader(k):
        rng, events = ranges[k]

        def read():
            # Each read ahead finishes only after the one behind it: completion order
            # is the reverse of the ranges' order within each read-ahead window.
            later = rng.first + 10
            if k % 2 == 1 and later in done:
                done[later].wait(GATE_TIMEOUT)
            done[rng.first].set()
            return events
        return read

    hooks.ranges = {rng.first: reader(k) for k, (rng, _) in enumerate(ranges)}
    d.push_control(a, SetPosition(snap("100:100:")))
    d.push(a, [ev("a", 0, 100)] + [rng for rng, _ in ranges])   # xid 100 is not visible in 100:100:
    d.start()
    wait_for(lambda: len(hooks.ids("a")) == 61)
    assert hooks.ids("a") == list(range(0, 61))
    no_internal_errors(hooks)


def test_read_ahead_stops_at_a_control_item(make_dispatcher):
    # An Advance between two ranges may make the second one visible (handled): it is
    # not read before the Advance is applied.
    d, chans, hooks = make_dispatcher(workers=1, start=False)
    a = chans["a"]
    r1, e1 = _range("a", 1, 3, 101)
    r2, e2 = _range("a", 4, 3, 102)
    hooks.ranges = {1: lambda: e1, 4: lambda: e2}
    d.push_control(a, SetPosition(snap("100:100:")))
    d.push(a, [r1])
    d.push_control(a, Advance(snap("103:103:")))
    d.push(a, [r2])
    d.start()
    wait_idle(d, chans)
    assert hooks.ids("a") == [1, 2, 3]
    assert hooks.range_calls == [1]
    no_internal_errors(hooks)


def test_failed_read_ahead_falls_back_after_the_ranges_before_it(make_dispatcher):
    d, chans, hooks = make_dispatcher(workers=1, retry_s=3600, start=False)
    a = chans["a"]
    r1, e1 = _range("a", 1, 3, 101)
    r2, _ = _range("a", 4, 3, 102)
    r3, e3 = _range("a", 7, 3, 103)

    def fail():
        raise CatchUpFailed("log away")

    hooks.ranges = {1: lambda: e1, 4: fail, 7: lambda: e3}
    d.push_control(a, SetPosition(snap("100:100:")))
    d.push(a, [r1, r2, r3])
    d.start()
    wait_for(lambda: "catchup" in hooks.kinds())
    wait_idle(d, chans)
    assert hooks.ids("a") == [1, 2, 3]      # nothing of r2 or after it: they come from the log later
    assert a.overflow and d.buffered == 0
    assert all(t.is_alive() for t in d.threads())


def test_range_rows_handled_before_are_not_delivered_again(make_dispatcher):
    d, chans, hooks = make_dispatcher(workers=1, start=False)
    a = chans["a"]
    r1, e1 = _range("a", 1, 5, 101)
    hooks.ranges = {1: lambda: e1}
    d.push_control(a, SetPosition(snap("100:100:")))
    d.push(a, [e1[1], e1[3], r1, r1])     # two rows came inline first; the range twice
    d.start()
    wait_idle(d, chans)
    assert hooks.ids("a") == [2, 4, 1, 3, 5]
    assert a.handled == {i: 101 for i in range(1, 6)}
    no_internal_errors(hooks)


def test_statements_are_remembered_whole_and_dedupe_a_catch_up(make_dispatcher):
    d, chans, hooks = make_dispatcher(workers=1, start=False)
    a = chans["a"]
    # Two statements of transaction 101; the first one's id span holds a row of
    # transaction 102 (ids are taken at insert time, concurrent writers interleave).
    r1, e1 = EventRange("a", 101, 1, 4, 3), [ev("a", 1, 101), ev("a", 3, 101), ev("a", 4, 101)]
    r2, e2 = _range("a", 10, 2, 101)
    hooks.ranges = {1: lambda: e1, 10: lambda: e2}
    other = ev("a", 2, 102)
    d.push_control(a, SetPosition(snap("100:100:")))
    d.push(a, [r1, r2])
    d.start()
    wait_for(lambda: len(hooks.ids("a")) == 5)
    wait_idle(d, chans)
    assert a.xranges == {101: [(1, 4, 3), (10, 11, 2)]} and a.handled == {}
    # A catch-up reads them again with a row of transaction 102: only that one is new.
    hooks.catch_up_script["a"].append((snap("103:103:"), [[e1[0], other, e1[1], e1[2], e2[0], e2[1]]]))
    d.push_control(a, CatchUp("reconnect"))
    wait_for(lambda: hooks.caught_ups)
    wait_idle(d, chans)
    assert hooks.ids("a") == [1, 3, 4, 10, 11, 2]
    assert a.position == snap("103:103:") and a.xranges == {}     # pruned by the new position
    no_internal_errors(hooks)


def test_durable_consumers_keep_statements_as_ids(make_dispatcher):
    # Their checkpoints store handled ids cut at the event in flight (ListenerHooks.save_consumer).
    hooks = FakeHooks()
    chans = {"a": ChannelState("a", "app.a")}
    d = Dispatcher("test", chans, 1000, 1, hooks, compact_ranges=False)
    r1, e1 = _range("a", 1, 3, 101)
    hooks.ranges = {1: lambda: e1}
    d.push_control(chans["a"], SetPosition(snap("100:100:")))
    d.push(chans["a"], [r1])
    d.start()
    try:
        wait_for(lambda: len(hooks.ids("a")) == 3)
        wait_idle(d, chans)
        assert chans["a"].handled == {1: 101, 2: 101, 3: 101} and chans["a"].xranges == {}
    finally:
        d.close(5.0)


def test_delivery_bug_reported_and_undelivered_events_reread_from_the_log(make_dispatcher):
    # A bug inside delivery (handlers themselves are isolated in Listener._deliver):
    # the event being delivered was marked handled; it must not be lost. It is
    # forgotten, the channel falls back, and the catch-up delivers it; the worker lives.
    d, chans, hooks = make_dispatcher(workers=1, retry_s=0.05)
    hooks.expect_internal = True
    a = chans["a"]
    d.push_control(a, SetPosition(snap("2:2:")))
    calls = []

    def handler(ch, events):
        calls.append([e.id for e in events])
        if len(calls) == 1:
            raise RuntimeError("boom")

    hooks.handler = handler
    hooks.catch_up_script["a"].append((snap("4:4:"), [[ev("a", 2, 2), ev("a", 3, 3)]]))
    d.push(a, [ev("a", 2, 2)])
    wait_for(lambda: "internal" in hooks.kinds())
    d.push(a, [ev("a", 3, 3)])          # dropped while the channel falls back: read from the log
    wait_for(lambda: d.retry_overflowed() or hooks.ids("a") == [2, 3], timeout=10)
    assert hooks.ids("a") == [2, 3]
    kind, error, channel = hooks.reports[0]
    assert (kind, channel, str(error)) == ("internal", "a", "boom")
    assert all(t.is_alive() for t in d.threads())
    assert d.buffered == 0


# -- close ----------------------------------------------------------------------------------------


def test_close_delivers_queued_events_and_ends_workers(make_dispatcher):
    d, chans, hooks = make_dispatcher(names=("a", "b"), workers=2)
    gate = hooks.gate()
    first = threading.Event()

    def handler(ch, events):
        if not first.is_set():
            first.set()
            assert gate.wait(GATE_TIMEOUT)

    hooks.handler = handler
    d.push(chans["a"], [ev("a", 1, 1)])
    assert first.wait(GATE_TIMEOUT)
    d.push(chans["a"], [ev("a", i, i) for i in range(2, 51)])
    d.push(chans["b"], [ev("b", i, i) for i in range(1, 51)])

    result = {}

    def closer():
        d.close(GATE_TIMEOUT)
        with hooks.lock:
            result["delivered"] = {n: len([1 for name, evs in hooks.deliveries if name == n for _ in evs])
                                   for n in ("a", "b")}

    t = threading.Thread(target=closer)
    t.start()
    wait_for(lambda: d._closing, message="close() did not start")
    assert t.is_alive()                # a is still blocked in its handler
    gate.set()
    t.join(GATE_TIMEOUT + 5)
    assert not t.is_alive()
    assert result["delivered"] == {"a": 50, "b": 50}
    assert hooks.ids("a") == list(range(1, 51))
    assert hooks.ids("b") == list(range(1, 51))
    assert not any(th.is_alive() for th in d.threads())


def test_close_idle_dispatcher_ends_workers(make_dispatcher):
    d, chans, hooks = make_dispatcher(workers=3)
    d.close(5.0)
    assert not any(t.is_alive() for t in d.threads())


def test_close_timeout_returns_with_events_undelivered(make_dispatcher):
    d, chans, hooks = make_dispatcher(workers=1)
    gate = hooks.gate()
    started = threading.Event()

    returned = threading.Event()

    def handler(ch, events):
        started.set()
        gate.wait(GATE_TIMEOUT)
        returned.set()

    hooks.handler = handler
    d.push(chans["a"], [ev("a", 1, 1)])
    assert started.wait(GATE_TIMEOUT)
    d.push(chans["a"], [ev("a", 2, 2)])
    d.close(0.2)
    # close() came back while the handler was still blocked: it did not wait for it
    # (a close() that ignored its timeout would return only after the gate's timeout).
    assert not returned.is_set()
    assert not gate.is_set()
    assert any(t.is_alive() for t in d.threads())
    assert hooks.ids("a") == []
    gate.set()
    wait_for(lambda: not any(t.is_alive() for t in d.threads()))


# -- the position check ------------------------------------------------------------------------


def test_an_advance_first_delivers_what_the_log_has_and_no_hint_announced(make_dispatcher):
    d, chans, hooks = make_dispatcher(workers=1, start=False)
    a = chans["a"]
    hooks.refs = {5: ev("a", 5, 105), 6: ev("a", 6, 106), 7: ev("a", 7, 107)}
    # The log holds 5, 6 and 7 of transactions visible in the new position; only 6 was hinted.
    hooks.windows = [[(5, 105), (6, 106), (7, 107)]]
    d.push_control(a, SetPosition(snap("100:100:")))
    d.push(a, [EventRef("a", 6, 106)])
    d.push_control(a, Advance(snap("110:110:")))
    d.start()
    wait_idle(d, chans)
    assert hooks.ids("a") == [6, 5, 7]                    # nothing passes the position undelivered
    assert hooks.fetched == [[6], [5, 7]]                 # rows read only for what is missing
    assert hooks.window_calls == [("a", snap("110:110:"))]
    assert a.position == snap("110:110:") and a.missed == 2
    no_internal_errors(hooks)


def test_an_advance_with_nothing_missing_reads_no_rows(make_dispatcher):
    d, chans, hooks = make_dispatcher(workers=1, start=False)
    a = chans["a"]
    hooks.refs = {6: ev("a", 6, 106)}
    hooks.windows = [[(6, 106)]]
    d.push_control(a, SetPosition(snap("100:100:")))
    d.push(a, [EventRef("a", 6, 106)])
    d.push_control(a, Advance(snap("110:110:")))
    d.start()
    wait_idle(d, chans)
    assert hooks.ids("a") == [6] and hooks.fetched == [[6]] and a.missed == 0
    assert a.position == snap("110:110:")


def test_an_advance_whose_check_cannot_read_the_log_does_not_move(make_dispatcher):
    d, chans, hooks = make_dispatcher(workers=1, retry_s=3600, start=False)
    a = chans["a"]
    hooks.windows = []

    def away(ch, target):
        raise CatchUpFailed("log away")
    hooks.window = away
    d.push_control(a, SetPosition(snap("100:100:")))
    d.push_control(a, Advance(snap("110:110:")))
    d.start()
    wait_for(lambda: "catchup" in hooks.kinds())
    wait_idle(d, chans)
    assert a.position == snap("100:100:") and a.overflow     # read again from the log later


def test_a_range_bigger_than_the_buffer_is_delivered_as_a_range_not_a_catch_up(make_dispatcher):
    """A statement of more rows than the buffer holds: an empty buffer takes it
    (it is read page by page, so it holds a page at most), and it is delivered by
    its range, not dropped to a catch-up; one behind it that does not fit overflows."""
    d, chans, hooks = make_dispatcher(capacity=16, workers=1, start=False)
    a = chans["a"]
    assert d.page_rows == 2
    big, events = _range("a", 1, 100, 101)
    d.push_control(a, SetPosition(snap("100:100:")))
    hooks.ranges = {big.first: lambda: events}
    d.push(a, [big])
    assert not a.overflow and a.dropped == 0 and d.buffered == 2      # the page it holds while read
    d.push(a, [EventRef("a", 1000 + i, 200 + i) for i in range(14)])
    assert not a.overflow and d.buffered == 16
    other, _ = _range("a", 101, 3, 102)
    d.push(a, [other])                       # the buffer is full now: does not fit
    assert a.overflow and a.dropped == 3
    d.start()
    wait_for(lambda: hooks.ids("a")[:100] == list(range(1, 101)))
    wait_idle(d, chans)
    assert d.buffered == 0 and hooks.catch_up_calls == []
    no_internal_errors(hooks)


def test_a_statement_is_delivered_in_chunks_remembered_as_one_record(make_dispatcher):
    from pgnotify_sync._worker import CHUNK
    d, chans, hooks = make_dispatcher(workers=1, start=False)
    a = chans["a"]
    rng, events = _range("a", 1, 2 * CHUNK + 200, 101)
    hooks.ranges = {1: lambda: events}
    d.push_control(a, SetPosition(snap("100:100:")))
    d.push(a, [rng])
    d.start()
    wait_for(lambda: len(hooks.ids("a")) == rng.n)
    wait_idle(d, chans)
    assert [len(batch) for _, batch in hooks.deliveries] == [CHUNK, CHUNK, 200]
    assert hooks.ids("a") == list(range(1, rng.n + 1))
    assert a.xranges == {101: [(1, rng.n, rng.n)]} and a.handled == {}
    no_internal_errors(hooks)


def run_until_caught_up(d, chans, hooks, rng, events, handler):
    """Deliver statement *rng* on channel a through *handler* (which fails once);
    the fall-back's catch-up reads *events* again, up to snapshot 102:102:."""
    hooks.handler = handler
    hooks.catch_up_script["a"].append((snap("102:102:"), [events]))
    d.push_control(chans["a"], SetPosition(snap("100:100:")))
    d.push(chans["a"], [rng])
    d.start()
    wait_for(lambda: d.retry_overflowed() or hooks.caught_ups, timeout=10)
    wait_idle(d, chans)


@pytest.mark.parametrize("compact", [True, False], ids=["listener", "durable"])
def test_a_chunk_interrupted_leaves_the_rest_of_its_statement_unhandled(make_dispatcher, compact):
    """A handler's Redo in the second chunk: the chunks after it were never marked
    handled (each is remembered just before it is delivered), so the catch-up
    delivers them. Remembered up front, a durable consumer (which keeps ids) would
    lose them."""
    from pgnotify_sync._delivery import Redo
    from pgnotify_sync._worker import CHUNK
    d, chans, hooks = make_dispatcher(workers=1, retry_s=0.05, start=False, compact_ranges=compact)
    a = chans["a"]
    rng, events = _range("a", 1, 2 * CHUNK + 200, 101)
    hooks.ranges = {1: lambda: events}
    cut = CHUNK + 100         # the second chunk's handler stops at this event

    def handler(ch, batch):
        if hooks.handler_calls == 1:
            hooks.handler_calls += 1
            with hooks.lock:    # those before the cut were handled
                hooks.deliveries.append((ch.name, batch[:cut - CHUNK - 1]))
            raise Redo(batch[cut - CHUNK - 1:])
        hooks.handler_calls += 1

    hooks.handler_calls = 0
    run_until_caught_up(d, chans, hooks, rng, events, handler)
    got = hooks.ids("a")
    # the statement's record is dropped whole (_forget): what came before the cut may
    # come again (at least once); from the cut on, every row comes exactly once
    assert set(got) == set(range(1, rng.n + 1))
    assert sorted(i for i in got if i >= cut) == list(range(cut, rng.n + 1))
    assert a.position == snap("102:102:")


def test_a_read_failing_inside_delivery_forgets_what_it_was_delivering(make_dispatcher):
    """A read of the log inside delivery (a backfill's superseded rows) fails: the
    events in hand were marked handled and never reached a handler. A durable
    consumer (which keeps ids) must not keep them as handled: the catch-up brings
    them."""
    d, chans, hooks = make_dispatcher(workers=1, retry_s=0.05, start=False, compact_ranges=False)
    a = chans["a"]
    rng, events = _range("a", 1, 20, 101)
    hooks.ranges = {1: lambda: events}
    calls = []

    def handler(ch, batch):
        calls.append(len(batch))
        if len(calls) == 1:
            raise CatchUpFailed("the superseded rows could not be read")

    run_until_caught_up(d, chans, hooks, rng, events, handler)
    assert hooks.ids("a") == list(range(1, 21))
    assert a.position == snap("102:102:")


def test_a_wide_statement_is_read_in_slices_ahead_in_id_order(make_dispatcher):
    from pgnotify_sync._fetch import SLICE_IDS
    d, chans, hooks = make_dispatcher(workers=1, start=False, capacity=8 * SLICE_IDS)
    a = chans["a"]
    assert d.page_rows == SLICE_IDS          # a slice is a page (a smaller buffer: smaller slices)
    n = 3 * SLICE_IDS + 7
    rng, events = _range("a", 1, n, 101)
    hooks.ranges = {1: lambda: events}
    d.push_control(a, SetPosition(snap("100:100:")))
    d.push(a, [rng])
    d.start()
    wait_for(lambda: len(hooks.ids("a")) == n)
    wait_idle(d, chans)
    assert hooks.ids("a") == list(range(1, n + 1))
    assert sorted(hooks.range_calls) == [1 + k * SLICE_IDS for k in range(4)]
    no_internal_errors(hooks)


def test_a_merged_range_checks_each_hint_on_its_own(make_dispatcher):
    """Three statements' hints merged by the reader: the real one is delivered; one
    naming no row of it (forged) is reported as such, one short of rows as missing."""
    d, chans, hooks = make_dispatcher(workers=1, start=False)
    a = chans["a"]
    _, events = _range("a", 1, 10, 101)
    merged = EventRange("a", 101, 1, 30, 10 + 10 + 12, parts=[(1, 10, 10), (11, 20, 10), (21, 30, 12)])
    real = events + [ev("a", i, 101) for i in range(21, 31)]       # nothing in 11..20; 10 of 12 in 21..30
    hooks.ranges = {1: lambda: real}
    d.push_control(a, SetPosition(snap("100:100:")))
    d.push(a, [merged])
    d.start()
    wait_for(lambda: len(hooks.ids("a")) == 20)
    wait_idle(d, chans)
    wait_for(lambda: len(hooks.reports) == 2)
    assert hooks.ids("a") == list(range(1, 11)) + list(range(21, 31))
    assert sorted((kind, str(error)) for kind, error, _ in hooks.reports) == [
        ("missing", "2 events of ids 21..30 are no longer in the event log"),
        ("payload", "a range of 10 events (ids 11..20) matches no committed event of this channel (forged, or "
                    "trimmed)")]
    assert a.unmatched_hints == 1


def test_a_range_counts_at_most_a_page_in_the_buffer():
    from pgnotify_sync._channel import RANGE_HELD_MAX, held, weight
    from pgnotify_sync._dispatch import page_rows_for
    from pgnotify_sync._eventlog import FAST_PAGE, RANGE_PAGE
    big = EventRange("a", 7, 1, 10 ** 6, 10 ** 6)
    assert (weight(big), held(big)) == (10 ** 6, RANGE_HELD_MAX) and RANGE_HELD_MAX == RANGE_PAGE
    assert held(big, page=25) == 25 and held(EventRange("a", 7, 1, 10, 10), page=25) == 10
    # pages are a fraction of the buffer: the page delivered and those read ahead fit in half of it
    assert [page_rows_for(c) for c in (1, 7, 200, 10_000, 10 ** 6)] == [1, 1, 25, 1250, FAST_PAGE]


@pytest.mark.parametrize("capacity", [16, 200])
def test_what_a_big_statement_holds_stays_within_the_buffer_plus_a_page(make_dispatcher, capacity):
    """A statement of many times the buffer, under a slow handler: it streams page by
    page (no catch-up), and what the dispatcher counts as held (queued items, the
    range's page, pages read ahead) never passes the buffer plus one page; the
    fetches running or done at any time never hold more rows than that."""
    d, chans, hooks = make_dispatcher(capacity=capacity, workers=1, start=False)
    a = chans["a"]
    page = d.page_rows
    n = 40 * capacity + 3
    rng, events = _range("a", 1, n, 101)
    hooks.ranges = {1: lambda: events}
    seen = []
    hooks.handler = lambda ch, batch: seen.append(d.buffered)
    d.push_control(a, SetPosition(snap("100:100:")))
    d.push(a, [rng])
    d.start()
    wait_for(lambda: len(hooks.ids("a")) == n, timeout=20)
    wait_idle(d, chans)
    assert hooks.ids("a") == list(range(1, n + 1))
    assert hooks.catch_up_calls == [] and a.dropped == 0 and not a.overflow
    assert max(seen) <= capacity + page, max(seen)
    assert max(seen) > page             # pages were read ahead (within the bound)
    assert d.buffered == 0
    no_internal_errors(hooks)
