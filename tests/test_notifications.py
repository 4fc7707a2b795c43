"""Unit tests for pgnotify_sync._notifications.Router (no database).

The dispatcher is a fake with the two things Router uses (``by_wire``, ``push``);
channels are real ChannelStates and the health check is a real HealthCheck (pure
state: Router only asks it whether a notification is its marker).
"""

import json

import pytest
from psycopg2.extensions import Notify

from pgnotify_sync._channel import ChannelState
from pgnotify_sync._observe import new_stats
from pgnotify_sync._healthcheck import HealthCheck
from pgnotify_sync._notifications import Router
from pgnotify_sync.errors import PayloadError
from pgnotify_sync.events import DatabaseEvent, EventRange, EventRef, Operation

HC_CHANNEL = "pgnotify_sync.hc.4242"


class FakeDispatcher:
    def __init__(self, channels, timeline):
        self.by_wire = {ch.wire: ch for ch in channels}
        self.timeline = timeline

    def push(self, ch, events):
        self.timeline.append(("push", ch.name, list(events)))


class Setup:
    def __init__(self):
        self.timeline = []
        self.reports = []
        self.messages = ChannelState("messages", "app.messages")     # logical name, wire name
        self.orders = ChannelState("orders", "app.orders")
        self.dispatcher = FakeDispatcher([self.messages, self.orders], self.timeline)
        self.stats = new_stats({"messages": self.messages, "orders": self.orders})   # totals over channels
        self.router = Router("t", self.dispatcher, self.report)
        self.hc = HealthCheck(HC_CHANNEL, 0.0)
        self.hc.token = "7"
        self.hc.pending = True          # a round trip is running

    def report(self, kind, error, channel, **kwargs):
        self.reports.append((kind, error, channel))

    def marker_seen(self, hc):
        assert hc is self.hc and hc.marker_seen is True
        self.timeline.append(("marker",))

    def route(self, batch):
        return self.router.route(batch, self.hc, self.marker_seen)

    def pushed(self):
        return [(entry[1], [e.id for e in entry[2]]) for entry in self.timeline if entry[0] == "push"]


@pytest.fixture
def s():
    return Setup()


def row(wire, ident, **extra):
    """A row's hint, as our triggers send it."""
    body = {"id": ident, "xid": 100 + ident}
    body.update(extra)
    return Notify(1, wire, json.dumps(body))


def rng(wire, first, last, n, xid=900):
    return Notify(1, wire, json.dumps({"xid": xid, "first": first, "last": last, "n": n}))


def test_events_go_to_their_channel_by_wire_name_in_order(s):
    batch = [row("app.messages", 1), row("app.orders", 2), row("app.messages", 3), row("app.messages", 4),
             row("app.orders", 5)]
    assert s.route(batch) == 5
    # One push per channel and batch, each in arrival order.
    assert sorted(s.pushed()) == [("messages", [1, 3, 4]), ("orders", [2, 5])]
    (_, _, events), = [e for e in s.timeline if e[1] == "messages"]
    assert events[0] == EventRef("messages", 1, 101)
    assert {e.channel for e in events} == {"messages"}          # the logical name, not the wire's
    assert s.reports == []


def test_counting(s):
    s.route([row("app.messages", 1), row("app.orders", 2), row("app.messages", 3)])
    s.route([row("app.messages", 4)])
    assert s.messages.received == 3 and s.orders.received == 1
    assert s.stats["received"] == 4
    assert s.router.decode_hist.count == 2           # one observation per batch with events
    assert s.router.decode_hist.sum >= 0


def test_unknown_channels_are_ignored(s):
    batch = [Notify(1, "messages", "{}"),            # the logical name is not a wire name
             Notify(1, "somebody.else", row("x", 9).payload),
             row("app.messages", 1)]
    assert s.route(batch) == 1
    assert s.pushed() == [("messages", [1])]
    assert s.reports == [] and s.stats["parse_errors"] == 0
    assert s.stats["received"] == 1


def test_a_batch_of_nothing_known_pushes_nothing(s):
    assert s.route([Notify(1, "other", "x")]) == 0
    assert s.route([]) == 0
    assert s.timeline == [] and s.stats["received"] == 0
    assert s.router.decode_hist.count == 0


def test_an_event_range_counts_its_rows(s):
    assert s.route([rng("app.orders", 10, 19, 10), row("app.orders", 20)]) == 11
    assert s.orders.received == 11 and s.stats["received"] == 11
    ((name, events),) = [(e[1], e[2]) for e in s.timeline]
    assert name == "orders"
    assert events[0] == EventRange("orders", 900, 10, 19, 10) and events[1].id == 20


def test_consecutive_statements_of_one_transaction_are_one_range(s):
    """Ranges of one xid whose ids follow each other are merged (one read, in
    slices), each hint kept as a part; a gap, another xid or a row between ends it."""
    batch = [rng("app.orders", 10, 19, 10), rng("app.orders", 20, 24, 5), rng("app.orders", 25, 40, 16),
             rng("app.orders", 42, 50, 9),                     # a gap of one id
             rng("app.orders", 51, 60, 10, xid=901),           # another transaction
             row("app.orders", 61), rng("app.orders", 62, 70, 9, xid=901)]
    assert s.route(batch) == 10 + 5 + 16 + 9 + 10 + 1 + 9
    ((_, _, events),) = s.timeline
    assert events[0] == EventRange("orders", 900, 10, 40, 31)
    assert events[0].parts == [(10, 19, 10), (20, 24, 5), (25, 40, 16)]
    assert events[1:3] == [EventRange("orders", 900, 42, 50, 9), EventRange("orders", 901, 51, 60, 10)]
    assert events[1].parts is None and events[3].id == 61 and events[4].first == 62


def test_an_event_ref_is_pushed_for_the_worker_to_complete(s):
    s.route([Notify(1, "app.messages", json.dumps({"id": 5, "xid": 77, "ref": True}))])
    assert s.timeline == [("push", "messages", [EventRef("messages", 5, 77)])]
    assert s.messages.received == 1


def test_a_bad_payload_is_counted_reported_and_the_batch_goes_on(s):
    batch = [row("app.messages", 1), Notify(1, "app.messages", "not json {"), Notify(1, "app.orders", "[1, 2]"),
             row("app.messages", 2)]
    assert s.route(batch) == 4                     # a notification received, even if unusable
    assert s.pushed() == [("messages", [1, 2])]
    assert s.messages.parse_errors == 1 and s.orders.parse_errors == 1
    assert s.stats["parse_errors"] == 2
    assert [(kind, channel) for kind, _, channel in s.reports] == [("payload", "messages"), ("payload", "orders")]
    assert all(isinstance(error, PayloadError) for _, error, _ in s.reports)
    assert "not json" not in str(s.reports[0][1])      # the payload itself is never in the message


def test_the_marker_comes_after_what_arrived_before_it(s):
    batch = [row("app.messages", 1), row("app.orders", 2), Notify(1, HC_CHANNEL, "7"), row("app.messages", 3)]
    assert s.route(batch) == 3
    kinds = [(e[0], e[1] if e[0] == "push" else None) for e in s.timeline]
    before = kinds[:kinds.index(("marker", None))]
    after = kinds[kinds.index(("marker", None)) + 1:]
    assert sorted(before) == [("push", "messages"), ("push", "orders")]
    assert after == [("push", "messages")]
    assert s.pushed()[-1] == ("messages", [3])
    assert s.hc.marker_seen is True


def test_a_stale_marker_is_ignored(s):
    """A marker of an earlier round trip (another token) or on another channel."""
    batch = [row("app.messages", 1), Notify(1, HC_CHANNEL, "6"), Notify(1, "pgnotify_sync.hc.1", "7"),
             row("app.messages", 2)]
    assert s.route(batch) == 2
    assert s.timeline == [("push", "messages", s.timeline[0][2])]
    assert s.pushed() == [("messages", [1, 2])]
    assert s.hc.marker_seen is False
    assert s.reports == []


def test_plain_events_are_refused_unless_accepted(s):
    plain = Notify(1, "app.messages", json.dumps({"operation": "INSERT", "schema": "public", "table": "t",
                                                  "data": {"n": 1}}))
    s.route([plain, row("app.messages", 2)])
    assert s.pushed() == [("messages", [2])]
    assert [kind for kind, _, _ in s.reports] == ["payload"] and s.messages.parse_errors == 1
    trusting = Router("t", s.dispatcher, s.report, accept_plain=True)
    trusting.route([plain], s.hc, s.marker_seen)
    (_, _, events), = [e for e in s.timeline if e[0] == "push"][1:]
    assert events == [DatabaseEvent("messages", Operation.INSERT, "public", "t", {"n": 1}, None, None, None)]
