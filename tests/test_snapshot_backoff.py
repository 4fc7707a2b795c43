"""Unit tests for pgnotify_sync._snapshot and pgnotify_sync._backoff (no database)."""

import random

import attrs
import pytest

from pgnotify_sync._backoff import Backoff
from pgnotify_sync._snapshot import Snapshot

# -- Snapshot: parse / str ---------------------------------------------------------------


@pytest.mark.parametrize("text, expected", [
    ("10:20:12,15", Snapshot(10, 20, frozenset({12, 15}))),
    ("10:20:", Snapshot(10, 20)),
    ("5:5:", Snapshot(5, 5, frozenset())),
    ("100:105:100", Snapshot(100, 105, frozenset({100}))),
    ("9223372036854775000:9223372036854775007:9223372036854775001",
     Snapshot(9223372036854775000, 9223372036854775007, frozenset({9223372036854775001}))),
])
def test_parse(text, expected):
    snap = Snapshot.parse(text)
    assert snap == expected
    assert type(snap.xip) is frozenset
    assert str(snap) == text


def test_str_sorts_xip():
    snap = Snapshot(1, 50, frozenset({40, 3, 17}))
    assert str(snap) == "1:50:3,17,40"
    assert Snapshot.parse(str(snap)) == snap


def test_parse_str_round_trip_random():
    rng = random.Random(1234)
    for _ in range(500):
        snap = random_snapshot(rng, limit=40)
        assert Snapshot.parse(str(snap)) == snap


@pytest.mark.parametrize("text", ["", "10:20", "a:b:", "10:20:x", "1:2:3:4"])
def test_parse_garbage_raises_value_error(text):
    with pytest.raises(ValueError):
        Snapshot.parse(text)


def test_snapshot_is_frozen_and_hashable():
    snap = Snapshot.parse("10:20:12")
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        snap.xmin = 1
    assert {snap: 1}[Snapshot(10, 20, frozenset({12}))] == 1


# -- Snapshot: visible / covers ----------------------------------------------------------


def test_visible():
    snap = Snapshot.parse("10:20:12,15")
    assert snap.visible(0)
    assert snap.visible(9)
    assert snap.visible(10)       # >= xmin, < xmax, not in progress
    assert not snap.visible(12)
    assert snap.visible(13)
    assert not snap.visible(15)
    assert snap.visible(19)
    assert not snap.visible(20)   # xmax itself: not yet
    assert not snap.visible(1000)


def test_visible_empty_snapshot():
    snap = Snapshot.parse("7:7:")
    assert snap.visible(6)
    assert not snap.visible(7)


def test_covers_basic():
    a = Snapshot.parse("10:20:12,15")
    assert a.covers(a)
    later = Snapshot.parse("25:25:")
    assert later.covers(a)
    assert not a.covers(later)
    earlier = Snapshot.parse("10:15:12")
    assert a.covers(earlier)          # 15 not visible in earlier: fine to be in a.xip
    assert not earlier.covers(a)


def test_covers_equal_xmax_different_xip():
    a = Snapshot.parse("10:20:12,15")
    b = Snapshot.parse("10:20:12")
    assert b.covers(a)                # b sees 15 too, and everything a sees
    assert not a.covers(b)            # b sees 15, a does not
    c = Snapshot.parse("12:20:")
    assert c.covers(a) and c.covers(b)
    assert not a.covers(c) and not b.covers(c)
    d = Snapshot.parse("10:20:11")
    assert not d.covers(a)            # a sees 11, d does not
    assert not a.covers(d)            # d sees 12 and 15, a does not


def test_covers_xip_at_or_above_other_xmax_is_fine():
    a = Snapshot.parse("10:20:")
    b = Snapshot.parse("20:30:20,25")
    assert b.covers(a)


def random_snapshot(rng, limit=12, realistic=True):
    """A small random snapshot obeying PostgreSQL's invariants.

    Always: xmin <= xmax and xmin <= every xip < xmax. ``realistic`` adds the invariant
    that xmax - 1 (the latest completed transaction, xmax = latestCompletedXid + 1)
    is never in progress, and the usual xmin = min(xip) (or xmax when xip is empty).
    """
    xmax = rng.randrange(0, limit)
    if realistic:
        candidates = list(range(0, max(0, xmax - 1)))
        xip = frozenset(x for x in candidates if rng.random() < 0.3)
        xmin = min(xip) if xip else xmax
        if not xip and rng.random() < 0.3:
            xmin = rng.randrange(0, xmax + 1)   # xmin below the first gap: still consistent
        return Snapshot(xmin, xmax, xip)
    xmin = rng.randrange(0, xmax + 1)
    xip = frozenset(x for x in range(xmin, xmax) if rng.random() < 0.4)
    return Snapshot(xmin, xmax, xip)


def truly_covers(b, a, xids):
    return all(b.visible(x) for x in xids if a.visible(x))


def test_covers_property_exact_for_realistic_snapshots():
    rng = random.Random(20240607)
    checked = {True: 0, False: 0}
    for _ in range(5000):
        a = random_snapshot(rng)
        b = random_snapshot(rng)
        xids = range(0, max(a.xmax, b.xmax) + 2)
        expected = truly_covers(b, a, xids)
        assert b.covers(a) == expected, (str(b), str(a))
        checked[expected] += 1
    # The generator exercises both answers often enough to mean something.
    assert checked[True] > 500 and checked[False] > 500, checked


def test_covers_property_equal_xmax():
    rng = random.Random(99)
    for _ in range(3000):
        a = random_snapshot(rng)
        xip = frozenset(x for x in range(0, max(0, a.xmax - 1)) if rng.random() < 0.3)
        b = Snapshot(min(xip) if xip else a.xmax, a.xmax, xip)
        xids = range(0, a.xmax + 2)
        assert b.covers(a) == truly_covers(b, a, xids), (str(b), str(a))


def test_covers_is_never_wrongly_true():
    """Soundness on a wider class (xmax - 1 may be in progress): covers() may answer a
    conservative False, but a True must always be right: a wrong True would let the
    dispatcher skip events."""
    rng = random.Random(7)
    for _ in range(5000):
        a = random_snapshot(rng, realistic=False)
        b = random_snapshot(rng, realistic=False)
        if b.covers(a):
            assert truly_covers(b, a, range(0, max(a.xmax, b.xmax) + 2)), (str(b), str(a))


# -- Backoff ----------------------------------------------------------------------------------


def top(backoff, attempt):
    return backoff.delay_s(attempt, rand=lambda: 1.0)


def bottom(backoff, attempt):
    return backoff.delay_s(attempt, rand=lambda: 0.0)


def test_delays_double_then_cap():
    b = Backoff(0.5, 30.0)
    assert [top(b, n) for n in range(1, 9)] == [0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0]
    assert top(b, 50) == 30.0


def test_attempt_zero_or_negative_uses_first_step():
    b = Backoff(0.25, 10.0)
    assert top(b, 0) == 0.25
    assert top(b, -3) == 0.25


def test_jitter_bounds_are_half_and_full_base():
    b = Backoff(1.0, 8.0)
    for n, base in [(1, 1.0), (2, 2.0), (3, 4.0), (4, 8.0), (10, 8.0)]:
        assert bottom(b, n) == base / 2
        assert top(b, n) == base
        assert b.delay_s(n, rand=lambda: 0.5) == base * 0.75


def test_jitter_stays_within_bounds_with_real_random():
    b = Backoff(0.5, 30.0)
    for n in range(1, 12):
        base = min(30.0, 0.5 * 2 ** (n - 1))
        values = [b.delay_s(n) for _ in range(200)]
        assert all(base / 2 <= v <= base for v in values), (n, min(values), max(values))
        assert len(set(values)) > 1         # there is jitter


def test_jitter_spreads_values():
    b = Backoff(10.0, 10.0)
    rng = random.Random(5)
    values = [b.delay_s(1, rand=rng.random) for _ in range(1000)]
    assert min(values) < 5.5 and max(values) > 9.5


def test_exhausted_zero_means_never():
    b = Backoff(0.5, 30.0, 0)
    assert not any(b.exhausted(n) for n in (0, 1, 2, 100, 10 ** 9))
    assert not Backoff(0.5, 30.0).exhausted(10 ** 6)


def test_exhausted_counts_failures():
    b = Backoff(0.5, 30.0, 3)
    assert [b.exhausted(n) for n in range(0, 6)] == [False, False, False, True, True, True]
    assert Backoff(0.5, 30.0, 1).exhausted(1)


def test_backoff_is_frozen():
    b = Backoff(0.5, 30.0)
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        b.max_s = 1.0


@pytest.mark.parametrize("attempt", [1025, 5000])
def test_delay_capped_for_very_many_attempts(attempt):
    b = Backoff(0.5, 30.0, 0)
    assert not b.exhausted(attempt)
    assert 15.0 <= b.delay_s(attempt) <= 30.0
