"""Tests of pgnotify_sync._consumers: id_ranges (no database) and ConsumerStore against the
real cluster (a ConnectionPool built as Listener._require_pool builds it), its positions
taken by joining the consumer group (_group.py) as its only member."""

import logging

import pytest

from pgnotify_sync import install, watch_table
import types

from pgnotify_sync._consumers import ConsumerStore, id_ranges
from pgnotify_sync._channel import ChannelState
from pgnotify_sync._group import Group
from pgnotify_sync._snapshot import Snapshot
from pgnotify_sync.config import wire_channel_name

from pgutil import execute, snapshot


WIRE_U = wire_channel_name("u", "app")     # channel u on the wire (prefix "app")

# -- id_ranges (no database) ----------------------------------------------------------------


@pytest.mark.parametrize("ids, expected", [
    ([], []),
    ([5], [[5, 5]]),
    ([1, 2, 3], [[1, 3]]),
    ([3, 1, 2, 7, 8, 10], [[1, 3], [7, 8], [10, 10]]),
    ({10: 900, 12: 900, 11: 901, 20: 902}, [[10, 12], [20, 20]]),     # a handled dict: its ids
    ({4, 6, 8}, [[4, 4], [6, 6], [8, 8]]),
    ((100, 99, 101, 1), [[1, 1], [99, 101]]),
])
def test_id_ranges(ids, expected):
    assert id_ranges(ids) == expected


def test_id_ranges_expand_back_to_the_ids():
    ids = {1, 2, 3, 5, 8, 9, 10, 11, 40}
    ranges = id_ranges(ids)
    assert ranges == [[1, 3], [5, 5], [8, 11], [40, 40]]
    assert {i for first, last in ranges for i in range(first, last + 1)} == ids


# -- fixtures -------------------------------------------------------------------------------


@pytest.fixture
def tdb(db):
    install(db)
    with db.cursor() as cur:
        cur.execute("CREATE TABLE t (id int PRIMARY KEY)")
        cur.execute("CREATE TABLE u (id int PRIMARY KEY)")
    watch_table(db, "public.t", channel="t")
    watch_table(db, "public.u", channel="u", channel_prefix="app")
    return db


def stored(db, name):
    return {channel: (Snapshot.parse(position), handled, lost)
            for channel, position, handled, lost in execute(
                db, "SELECT channel, position::text, handled, lost FROM pgnotify_sync.consumers WHERE name = %s",
                (name,))}


MEMBER = "member-1"


class JustActivate:
    """The Dispatcher's part a Group calls (no workers here: lanes are only state)."""

    def activate(self, lane, reason=None):
        lane.active = True
        return True

    def deactivate(self, lane):
        lane.active = False


def store_of(pool, consumer, listener="L"):
    """A ConsumerStore saving as member MEMBER (every store of a test is that member)."""
    store = ConsumerStore(pool, consumer, listener)
    store.member = MEMBER
    return store


def load(pool, store, channels, start):
    """Join *store*'s consumer group (one partition) as MEMBER with *channels* as
    its lanes: each takes the stored position (a new group starts at *start*)."""
    parents = {}
    for ch in channels:
        ch.partition, ch.active = 0, False
        parent = ChannelState(ch.name, ch.wire)
        parent.lanes = (ch,)
        parents[ch.name] = parent
    cfg = types.SimpleNamespace(consumer_partitions=1, consumer_lease_s=30.0)
    group = Group(store._name, store.consumer, cfg, parents, pool, store, JustActivate)
    group.member = store.member = MEMBER
    group.join(start)
    assert all(ch.active for ch in channels)
    return store


def log_xids(db):
    return dict(execute(db, "SELECT id, xid::text::bigint FROM pgnotify_sync.event_log ORDER BY id"))


# -- load ---------------------------------------------------------------------------------


def test_load_of_a_new_consumer_starts_at_start_and_inserts_its_rows(tdb, pool):
    start = snapshot(tdb)
    t, u = ChannelState("t", "t"), ChannelState("u", WIRE_U)
    t.handled = {1: 1}                                  # whatever was there is replaced
    load(pool, store_of(pool, "indexer", "L"), [t, u], start)
    assert (t.position, t.handled) == (start, {})
    assert (u.position, u.handled) == (start, {})
    assert stored(tdb, "indexer") == {"t": (start, [], 0), WIRE_U: (start, [], 0)}
    assert stored(tdb, "someone-else") == {}


def test_load_of_a_known_consumer_ignores_start(tdb, pool):
    first = snapshot(tdb)
    load(pool, store_of(pool, "indexer", "L"), [ChannelState("t", "t")], first)
    execute(tdb, "INSERT INTO t VALUES (1)")
    later = snapshot(tdb)
    assert later != first
    ch = ChannelState("t", "t")
    load(pool, store_of(pool, "indexer", "L"), [ch], later)
    assert ch.position == first
    assert stored(tdb, "indexer")["t"][0] == first       # not overwritten


def test_load_of_a_second_consumer_is_separate(tdb, pool):
    first = snapshot(tdb)
    load(pool, store_of(pool, "a", "L"), [ChannelState("t", "t")], first)
    execute(tdb, "INSERT INTO t VALUES (1)")
    later = snapshot(tdb)
    ch = ChannelState("t", "t")
    load(pool, store_of(pool, "b", "L"), [ch], later)
    assert ch.position == later
    assert stored(tdb, "a")["t"][0] == first and stored(tdb, "b")["t"][0] == later


# -- save / load --------------------------------------------------------------------------


def test_save_then_load_restores_position_handled_and_cursors(tdb, pool):
    start = snapshot(tdb)
    store = store_of(pool, "indexer", "L")
    ch = ChannelState("t", "t")
    load(pool, store, [ch], start)

    execute(tdb, "INSERT INTO t VALUES (1), (2), (3)")
    execute(tdb, "INSERT INTO t VALUES (4)")
    execute(tdb, "INSERT INTO t VALUES (5)")
    xids = log_xids(tdb)
    one, two, three, four, five = sorted(xids)
    position = snapshot(tdb)
    cursor_a = Snapshot(start.xmin, start.xmax + 1)
    cursor_b = Snapshot(start.xmin, start.xmax + 2, frozenset({start.xmax}))
    ch.position = position
    # xids deliberately wrong here: after load they come from the log
    ch.handled = {one: 0, two: 0, three: 0, five: 0}
    ch.partial = [(cursor_a, one)]
    ch.catchup_target, ch.catchup_upto = cursor_b, three
    ch.since_checkpoint = 17
    store.save(ch)
    assert ch.since_checkpoint == 0

    position_db, handled_db, _ = stored(tdb, "indexer")["t"]
    assert position_db == position
    assert handled_db == {"ranges": [[one, three], [five, five]],
                          "cursors": [[str(cursor_a), one], [str(cursor_b), three]]}

    again = ChannelState("t", "t")
    load(pool, store_of(pool, "indexer", "L2"), [again], snapshot(tdb))
    assert again.position == position
    assert again.handled == {one: xids[one], two: xids[two], three: xids[three], five: xids[five]}
    assert again.partial == [(cursor_a, one), (cursor_b, three)]
    assert four not in again.handled


def test_handled_ids_no_longer_in_the_log_are_not_restored(tdb, pool):
    store = store_of(pool, "indexer", "L")
    ch = ChannelState("t", "t")
    load(pool, store, [ch], snapshot(tdb))
    execute(tdb, "INSERT INTO t VALUES (1), (2)")
    xids = log_xids(tdb)
    one, two = sorted(xids)
    ch.handled = dict(xids)
    store.save(ch)
    execute(tdb, "DELETE FROM pgnotify_sync.event_log WHERE id = %s", (one,))
    again = ChannelState("t", "t")
    load(pool, store_of(pool, "indexer", "L"), [again], snapshot(tdb))
    assert again.handled == {two: xids[two]}


def test_undelivered_ids_are_not_stored(tdb, pool):
    store = store_of(pool, "indexer", "L")
    ch = ChannelState("t", "t")
    load(pool, store, [ch], snapshot(tdb))
    execute(tdb, "INSERT INTO t VALUES (1), (2), (3), (4)")
    xids = log_xids(tdb)
    one, two, three, four = sorted(xids)
    ch.handled = dict(xids)
    store.save(ch, undelivered={two, four})
    assert stored(tdb, "indexer")["t"][1] == {"ranges": [[one, one], [three, three]]}
    assert ch.handled == xids                          # the channel's own state is left alone
    again = ChannelState("t", "t")
    load(pool, store_of(pool, "indexer", "L"), [again], snapshot(tdb))
    assert again.handled == {one: xids[one], three: xids[three]}


def test_save_without_cursors_stores_ranges_only(tdb, pool):
    store = store_of(pool, "indexer", "L")
    ch = ChannelState("t", "t")
    load(pool, store, [ch], snapshot(tdb))
    ch.catchup_target, ch.catchup_upto = snapshot(tdb), 0      # a catch-up that delivered nothing yet
    store.save(ch)
    assert stored(tdb, "indexer")["t"][1] == {"ranges": []}
    again = ChannelState("t", "t")
    load(pool, store_of(pool, "indexer", "L"), [again], snapshot(tdb))
    assert again.partial == [] and again.handled == {}


def test_save_updates_only_its_consumer_and_channel(tdb, pool):
    start = snapshot(tdb)
    t, u = ChannelState("t", "t"), ChannelState("u", WIRE_U)
    load(pool, store_of(pool, "indexer", "L"), [t, u], start)
    load(pool, store_of(pool, "other", "L"), [ChannelState("t", "t")], start)
    execute(tdb, "INSERT INTO t VALUES (1)")
    t.position = snapshot(tdb)
    store_of(pool, "indexer", "L").save(t)
    assert stored(tdb, "indexer")["t"][0] == t.position
    assert stored(tdb, "indexer")[WIRE_U][0] == start
    assert stored(tdb, "other")["t"][0] == start


def test_load_reads_the_first_format_ranges_only(tdb, pool):
    start = snapshot(tdb)
    load(pool, store_of(pool, "indexer", "L"), [ChannelState("t", "t")], start)
    execute(tdb, "INSERT INTO t VALUES (1), (2), (3)")
    xids = log_xids(tdb)
    one, two, three = sorted(xids)
    execute(tdb, "UPDATE pgnotify_sync.consumers SET handled = %s::jsonb WHERE name = 'indexer'",
            (f"[[{one}, {two}]]",))
    ch = ChannelState("t", "t")
    load(pool, store_of(pool, "indexer", "L"), [ch], start)
    assert ch.handled == {one: xids[one], two: xids[two]}
    assert ch.partial == []


def test_save_on_a_closed_pool_logs_and_does_not_raise(tdb, pool, caplog):
    caplog.set_level(logging.WARNING, logger="pgnotify_sync")
    store = store_of(pool, "indexer", "orders")
    ch = ChannelState("t", "t")
    start = snapshot(tdb)
    load(pool, store, [ch], start)
    pool.close()
    ch.position = Snapshot(start.xmin, start.xmax + 5)
    store.save(ch)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(m.startswith("orders: consumer 'indexer': cannot store position of 't': ") and "closed" in m
               for m in warnings), warnings
    assert stored(tdb, "indexer")["t"][0] == start


# -- take_gaps ------------------------------------------------------------------------------


def test_take_gaps_returns_and_resets_lost(tdb, pool):
    start = snapshot(tdb)
    store = store_of(pool, "indexer", "L")
    load(pool, store, [ChannelState("t", "t"), ChannelState("u", WIRE_U)], start)
    load(pool, store_of(pool, "other", "L"), [ChannelState("t", "t")], start)
    assert store.take_gaps() == []

    execute(tdb, "INSERT INTO t VALUES (1), (2), (3)")
    execute(tdb, "INSERT INTO u VALUES (1)")
    # retention past both bounds: the rows go, every consumer that had not handled them lost them
    assert execute(tdb, "SELECT pgnotify_sync.trim_event_log(0, 0)")[0][0] == 4
    assert {ch: lost for ch, (_, _, lost) in stored(tdb, "indexer").items()} == {"t": 3, WIRE_U: 1}

    assert sorted(store.take_gaps()) == [(WIRE_U, 1), ("t", 3)]
    assert {ch: lost for ch, (_, _, lost) in stored(tdb, "indexer").items()} == {"t": 0, WIRE_U: 0}
    assert store.take_gaps() == []
    assert stored(tdb, "other")["t"][2] == 3                 # another consumer's counters are its own
    assert store_of(pool, "other", "L").take_gaps() == [("t", 3)]
