"""Unit tests for pgnotify_sync._position: which events count as handled (no database)."""

from pgnotify_sync._channel import ChannelState
from pgnotify_sync._position import fresh, fresh_ids, fresh_list, handled_count, move, seen
from pgnotify_sync._snapshot import Snapshot
from pgnotify_sync.events import DatabaseEvent, Operation


def ev(ident, xid):
    return DatabaseEvent("a", Operation.INSERT, "public", "t", {"n": ident}, None, ident, xid)


def channel(position=None):
    ch = ChannelState("a", "app.a")
    ch.position = Snapshot.parse(position) if position else None
    return ch


def test_seen_by_the_position_only_for_visible_transactions():
    ch = channel("100:110:105")
    assert seen(ch, 1, 99)                  # below xmin: visible
    assert seen(ch, 1, 104)                 # in range, not in progress: visible
    assert not seen(ch, 1, 105)             # in progress at the snapshot
    assert not seen(ch, 1, 110)             # at or above xmax: later
    assert not seen(channel(), 1, 5)        # no position: nothing is handled


def test_seen_by_id_by_statement_range_and_by_catch_up_cursor():
    ch = channel("100:100:")
    ch.handled = {7: 120}
    ch.xranges = {130: [(20, 29, 10)]}
    ch.partial = [(Snapshot.parse("125:125:"), 50)]
    assert seen(ch, 7, 120)
    assert seen(ch, 20, 130) and seen(ch, 29, 130) and not seen(ch, 30, 130)
    assert not seen(ch, 25, 131)            # a range is per transaction
    assert seen(ch, 50, 124)                # visible in the cursor's target, id up to its end
    assert not seen(ch, 51, 124) and not seen(ch, 40, 126)


def test_fresh_remembers_unless_told_not_to_and_passes_plain_payloads():
    ch = channel("100:100:")
    assert fresh(ch, ev(1, 150)) and ch.handled == {1: 150}
    assert not fresh(ch, ev(1, 150))        # the second time: a duplicate
    assert fresh(ch, ev(2, 150), remember=False) and 2 not in ch.handled
    plain = DatabaseEvent("a", Operation.INSERT, "public", "t", {}, None, None, None)
    assert fresh(ch, plain) and fresh(ch, plain)   # no log id: nothing to compare
    assert [e.id for e in fresh_list(ch, [ev(1, 150), ev(3, 150), ev(4, 90)])] == [3]


def test_fresh_ids_are_one_record_per_statement_or_ids_when_not_compact():
    ch = channel("100:100:")
    ids = list(range(10, 20))
    assert fresh_ids(ch, ids, 150) is True
    assert ch.handled == {} and ch.xranges == {150: [(10, 19, 10)]}
    assert handled_count(ch) == 10
    assert fresh_ids(ch, ids, 150) is False             # the same statement again: nothing remembered
    assert fresh_ids(ch, [19, 20], 150) is False        # overlapping: the caller goes one by one
    assert [e.id for e in fresh_list(ch, [ev(19, 150), ev(20, 150)])] == [20]
    durable = channel("100:100:")
    assert fresh_ids(durable, ids, 150, compact=False) is True
    assert durable.xranges == {} and sorted(durable.handled) == ids


def test_fresh_ids_extend_the_record_of_the_chunk_before():
    ch = channel("100:100:")
    assert fresh_ids(ch, [1, 2, 4], 150) and fresh_ids(ch, [6, 7], 150, after=4)
    assert ch.xranges == {150: [(1, 7, 5)]}
    assert fresh_ids(ch, [9], 150, after=5)             # not the last record's end: a record of its own
    assert ch.xranges == {150: [(1, 7, 5), (9, 9, 1)]} and handled_count(ch) == 6


def test_move_forgets_what_the_new_position_covers():
    ch = channel("100:100:")
    ch.handled = {1: 120, 2: 140}
    ch.xranges = {120: [(5, 9, 5)], 140: [(10, 12, 3)]}
    ch.partial = [(Snapshot.parse("130:130:"), 40), (Snapshot.parse("150:150:"), 60)]
    ch.catchup_target, ch.catchup_upto = Snapshot.parse("150:150:"), 60
    new = Snapshot.parse("130:145:140")      # 120 now visible, 140 still in progress
    move(ch, new)
    assert ch.position == new
    assert ch.handled == {2: 140} and ch.xranges == {140: [(10, 12, 3)]}
    assert ch.partial == [(Snapshot.parse("150:150:"), 60)]     # the one the position does not cover
    assert (ch.catchup_target, ch.catchup_upto) == (None, 0)
    assert handled_count(ch) == 4
