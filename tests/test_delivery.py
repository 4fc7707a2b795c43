"""Unit tests for pgnotify_sync._delivery.Delivery (no database).

Handlers are connected as Listener.on_event connects them (a receiver carrying
``_pgnotify_handler``) or as bare blinker receivers; channels are real
ChannelStates; *report* and *save* are recorders.
"""

import threading
import time

import pytest

from pgnotify_sync._delivery import Delivery
from pgnotify_sync._channel import ChannelState
from pgnotify_sync._observe import new_stats
from pgnotify_sync.events import DatabaseEvent, Operation
from pgnotify_sync.signals import ListenerSignals


def ev(ident, op=Operation.INSERT, table="t", channel="messages"):
    return DatabaseEvent(channel, op, "public", table, {"n": ident}, None, ident, 1000 + ident)


class Setup:
    def __init__(self, checkpoint_every=0, durable=False):
        self.signals = ListenerSignals()
        self.channels = {}
        self.stats = new_stats(self.channels)     # the listener's: totals summed over channels
        self.reports = []
        self.saves = []             # (channel name, id of the last event handled, undelivered ids then)
        self.handled = []           # ids seen by any handler, in call order
        self.delivery = Delivery("t", self.signals, self.report, checkpoint_every,
                                 save=self.save if durable else None)

    def channel(self, name, wire):
        ch = self.channels[name] = ChannelState(name, wire)
        return ch

    def report(self, kind, error, channel, **kwargs):
        self.reports.append((kind, error, channel, kwargs))

    def save(self, ch, undelivered):
        # As ConsumerStore.save: store the position, restart the count.
        self.saves.append((ch.name, self.handled[-1] if self.handled else None, sorted(undelivered)))
        ch.since_checkpoint = 0

    def on_event(self, channel, handler):
        """What Listener.on_event connects."""
        def receiver(sender, event, **_kw):
            handler(event)
        receiver._pgnotify_handler = handler
        self.signals.event.connect(receiver, sender=channel, weak=False)
        return handler

    def recorder(self, into=None):
        got = [] if into is None else into

        def handler(event):
            got.append(event.id)
            self.handled.append(event.id)
        handler.got = got
        return handler


# -- handlers get the events -----------------------------------------------------------


def test_every_handler_gets_every_event_in_order():
    s = Setup()
    ch = s.channel("messages", "messages")
    a, b = s.on_event("messages", s.recorder()), s.on_event("messages", s.recorder())
    s.delivery.deliver(ch, [ev(i) for i in range(1, 6)])
    s.delivery.deliver(ch, [ev(6)])
    assert a.got == b.got == [1, 2, 3, 4, 5, 6]
    # Per event, all handlers before the next event.
    assert s.handled == [i for i in range(1, 7) for _ in (a, b)]


def test_only_the_channels_handlers_and_catch_all_receivers_are_called():
    s = Setup()
    messages = s.channel("messages", "messages")
    mine = s.on_event("messages", s.recorder())
    other = s.on_event("orders", s.recorder())
    calls = []

    def bare(sender, **kwargs):      # a plain blinker receiver, for every channel
        calls.append((sender, kwargs["event"].id))
    s.signals.event.connect(bare, weak=False)
    s.delivery.deliver(messages, [ev(1), ev(2)])
    assert mine.got == [1, 2]
    assert other.got == []
    assert calls == [("messages", 1), ("messages", 2)]


def test_a_bare_receiver_gets_the_channel_as_sender_and_the_event():
    s = Setup()
    ch = s.channel("orders", "app.orders")
    seen = []
    s.signals.event.connect(lambda sender, event: seen.append((sender, event)), sender="orders", weak=False)
    event = ev(1, channel="orders")
    s.delivery.deliver(ch, [event])
    assert seen == [("orders", event)]


def test_counting():
    s = Setup()
    ch = s.channel("messages", "messages")
    s.on_event("messages", lambda e: None)
    events = [ev(1), ev(2), ev(3, Operation.UPDATE), ev(4), ev(5), ev(6, table="u"), ev(7, Operation.DELETE, "u")]
    s.delivery.deliver(ch, events[:4])
    s.delivery.deliver(ch, events[4:])
    assert ch.delivered == 7 and s.stats["delivered"] == 7
    # Counted per (operation, table), across runs and batches.
    assert ch.delivered_by == {(Operation.INSERT, "t"): 4, (Operation.UPDATE, "t"): 1,
                               (Operation.INSERT, "u"): 1, (Operation.DELETE, "u"): 1}
    hist = ch.handler_hist
    assert hist.count == 7 and sum(hist.counts) == 7 and hist.sum >= 0
    assert ch.last_event_at is not None


def test_plain_events_share_one_table_label():
    # A plain event's table is whatever the wire said (anyone can make one up): one
    # label for all of them, so made-up names cannot grow metric series.
    s = Setup()
    ch = s.channel("messages", "messages")
    s.on_event("messages", lambda e: None)
    plain = [DatabaseEvent("messages", Operation.INSERT, "public", f"made_up_{i}", {}, None, None, None)
             for i in range(5)]
    s.delivery.deliver(ch, [ev(1)] + plain + [ev(2), ev(3, table="t")])
    assert ch.delivered_by == {(Operation.INSERT, "t"): 3, (Operation.INSERT, "(plain)"): 5}


def test_made_up_table_names_from_the_log_add_a_bounded_number_of_series():
    """A watched table's owner may log any table name on its own channel: past
    MAX_TABLE_SERIES (operation, table) pairs a channel counts the rest as one."""
    from pgnotify_sync._delivery import MAX_TABLE_SERIES, OTHER_TABLES
    s = Setup()
    ch = s.channel("messages", "messages")
    s.on_event("messages", lambda e: None)
    s.delivery.deliver(ch, [ev(i, table=f"t{i}") for i in range(1, 1001)])
    s.delivery.deliver(ch, [ev(1001, table="t1"), ev(1002, table="t9999")])
    assert len(ch.delivered_by) == MAX_TABLE_SERIES + 1
    assert ch.delivered_by[(Operation.INSERT, OTHER_TABLES)] == 1000 - MAX_TABLE_SERIES + 1
    assert ch.delivered_by[(Operation.INSERT, "t1")] == 2 and sum(ch.delivered_by.values()) == 1002


def test_slow_handlers_land_in_later_buckets():
    s = Setup()
    ch = s.channel("messages", "messages")
    slow_for = 2 * ch.handler_hist.buckets[0]

    def handler(event):
        if event.id % 2:
            # Work that takes a while (not a wait: nothing to wait for).
            started = time.perf_counter()
            while time.perf_counter() - started < slow_for:
                pass
    s.on_event("messages", handler)
    s.delivery.deliver(ch, [ev(i) for i in range(1, 7)])
    hist = ch.handler_hist
    assert sum(hist.counts) == hist.count == 6
    assert sum(hist.counts[1:]) >= 3            # the three slow ones, past the first bound
    assert hist.sum >= 3 * slow_for


def test_no_handler_still_counts_as_delivered():
    s = Setup()
    ch = s.channel("messages", "messages")
    s.delivery.deliver(ch, [ev(1), ev(2)])
    assert ch.delivered == 2 and s.stats["delivered"] == 2


# -- a raising handler ---------------------------------------------------------------------


@pytest.mark.parametrize("handlers", [1, 2], ids=["one handler", "two handlers"])
@pytest.mark.parametrize("error", [ValueError("boom"), SystemExit(3), GeneratorExit()],
                         ids=lambda e: type(e).__name__)
def test_a_raising_handler_is_counted_reported_and_delivery_goes_on(handlers, error):
    s = Setup()
    ch = s.channel("messages", "messages")
    got = []

    def failing(event):
        got.append(event.id)
        if event.id == 2:
            raise error
    s.on_event("messages", failing)
    others = [s.on_event("messages", s.recorder()) for _ in range(handlers - 1)]
    s.delivery.deliver(ch, [ev(1), ev(2), ev(3)])
    assert got == [1, 2, 3]                                 # the next event still delivered
    for other in others:
        assert other.got == [1, 2, 3]                      # ... and the other handler too
    assert ch.handler_errors == 1 and s.stats["handler_errors"] == 1
    assert s.reports == [("handler", error, "messages", {"event_id": 2, "exc_info": True})]
    assert ch.delivered == 3


def test_keyboard_interrupt_in_the_main_thread_propagates():
    assert threading.current_thread() is threading.main_thread()
    s = Setup()
    ch = s.channel("messages", "messages")
    got = []

    def handler(event):
        got.append(event.id)
        if event.id == 2:
            raise KeyboardInterrupt
    s.on_event("messages", handler)
    with pytest.raises(KeyboardInterrupt):
        s.delivery.deliver(ch, [ev(1), ev(2), ev(3)])
    assert got == [1, 2]
    assert s.reports == [] and ch.handler_errors == 0


def test_keyboard_interrupt_in_another_thread_is_reported():
    """In our threads a KeyboardInterrupt is not Ctrl-C: user code raised it."""
    s = Setup()
    ch = s.channel("messages", "messages")
    got = []
    outcome = []

    def handler(event):
        got.append(event.id)
        if event.id == 2:
            raise KeyboardInterrupt

    def work():
        try:
            s.delivery.deliver(ch, [ev(1), ev(2), ev(3)])
            outcome.append("returned")
        except BaseException as exc:
            outcome.append(exc)
    s.on_event("messages", handler)
    t = threading.Thread(target=work, name="worker")
    t.start()
    t.join(10)
    assert not t.is_alive()
    assert outcome == ["returned"]
    assert got == [1, 2, 3]
    assert [(kind, type(error)) for kind, error, _, _ in s.reports] == [("handler", KeyboardInterrupt)]
    assert ch.handler_errors == 1


# -- checkpoints ---------------------------------------------------------------------------


def test_a_durable_consumer_checkpoints_every_n_events():
    s = Setup(checkpoint_every=3, durable=True)
    ch = s.channel("messages", "messages")
    s.on_event("messages", s.recorder())
    s.delivery.deliver(ch, [ev(i) for i in range(1, 8)])
    # After events 3 and 6; what the batch had not yet handed out is not stored as handled.
    assert s.saves == [("messages", 3, [4, 5, 6, 7]), ("messages", 6, [7])]
    assert ch.since_checkpoint == 1


def test_the_checkpoint_count_carries_across_batches_per_channel():
    s = Setup(checkpoint_every=3, durable=True)
    a, b = ChannelState("a", "a"), ChannelState("b", "b")
    s.on_event("a", s.recorder())
    s.on_event("b", s.recorder())
    s.delivery.deliver(a, [ev(1, channel="a"), ev(2, channel="a")])
    s.delivery.deliver(b, [ev(10, channel="b"), ev(11, channel="b")])
    assert s.saves == []                    # 2 + 2, but 2 per channel
    s.delivery.deliver(a, [ev(3, channel="a"), ev(4, channel="a")])
    assert s.saves == [("a", 3, [4])]
    assert (a.since_checkpoint, b.since_checkpoint) == (1, 2)


def test_a_checkpoint_counts_events_whose_handler_raised():
    s = Setup(checkpoint_every=2, durable=True)
    ch = s.channel("messages", "messages")
    rec = s.recorder()

    def handler(event):
        rec(event)
        raise ValueError("handled, badly")
    s.on_event("messages", handler)
    s.delivery.deliver(ch, [ev(1), ev(2), ev(3)])
    assert s.saves == [("messages", 2, [3])]


def test_catch_up_progress_is_kept_while_checkpointing():
    s = Setup(checkpoint_every=100, durable=True)
    ch = s.channel("messages", "messages")
    ch.in_catchup = True
    s.delivery.deliver(ch, [ev(5), ev(8), ev(9)])
    assert ch.catchup_upto == 9
    assert ch.since_checkpoint == 3 and s.saves == []


@pytest.mark.parametrize("every, durable", [(3, False), (0, True)], ids=["not durable", "checkpoint_every=0"])
def test_no_checkpoints(every, durable):
    s = Setup(checkpoint_every=every, durable=durable)
    ch = s.channel("messages", "messages")
    ch.in_catchup = True
    s.on_event("messages", s.recorder())
    s.delivery.deliver(ch, [ev(i) for i in range(1, 8)])
    assert s.saves == []
    assert ch.since_checkpoint == 0 and ch.catchup_upto == 0
