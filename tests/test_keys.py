"""Row keys, partitions and the row threads of ordering="row" (no database)."""

import threading
import time
import zlib

from pgnotify_sync._keys import KeyColumns, key_hash, partition_of, row_key
from pgnotify_sync._rows import RowPool
from pgnotify_sync.events import DatabaseEvent, Operation


def event(op="INSERT", data=None, table="jobs", ident=1, schema="public"):
    return DatabaseEvent(channel="jobs", operation=Operation(op), schema=schema, table=table, data=data, id=ident)


def keys(**tables):
    return KeyColumns(lambda schema, table: tables.get(table, ()))


def test_a_rows_key_is_its_table_and_primary_key_values():
    k = keys(jobs=("id",), pairs=("a", "b"))
    assert row_key(event(data={"id": 7, "name": "x"}), k) == ("public", "jobs", "i7")
    assert row_key(event("DELETE", data={"id": 7}), k) == ("public", "jobs", "i7")      # data: the deleted row
    assert row_key(event(data={"a": "1", "b": [2, 3]}, table="pairs"), k) == ("public", "pairs", "s1", "j[2,3]")
    # values of different JSON types are different keys
    assert len({row_key(event(data={"id": v}), k) for v in (1, "1", True, None, 1.5)}) == 5


def test_keys_of_numeric_and_json_columns_hash():
    from decimal import Decimal
    k = keys(prices=("amount", "tags"))
    key = row_key(event(data={"amount": Decimal("12.50"), "tags": {"b": Decimal("1.5"), "a": 1}}, table="prices"), k)
    assert key == ("public", "prices", "d12.50", 'j{"a":1,"b":"1.5"}')
    assert 0 <= partition_of(event(data={"amount": Decimal("3.1"), "tags": []}, table="prices"), k, 4) < 4


def test_without_its_key_columns_an_event_is_keyed_by_its_table():
    k = keys(jobs=("id",))
    assert row_key(event(data={"name": "x"}), k) == ("public", "jobs")        # the key column was excluded
    assert row_key(event(data={"id": 1}, table="nokey"), k) == ("public", "nokey")   # no primary key
    assert row_key(event(data=None), k) == ("public", "jobs")


def test_a_published_event_is_keyed_by_its_id():
    assert row_key(event("PUBLISH", data={"id": 5}, ident=42), keys()) == ("", "", "i42")


def test_partitions_are_stable_and_spread():
    k = keys(jobs=("id",))
    # the same in every process (CRC-32 of a canonical text, not Python's salted hash)
    assert key_hash(("public", "jobs", "i1")) == zlib.crc32(b"public\x1fjobs\x1fi1") == 1370026947
    parts = [partition_of(event(data={"id": i}), k, 8) for i in range(800)]
    assert set(parts) == set(range(8))
    assert max(parts.count(p) for p in range(8)) < 2 * 100
    assert partition_of(event(data={"id": 3}), k, 1) == 0


def test_key_columns_are_looked_up_once_per_table():
    calls = []

    def lookup(schema, table):
        calls.append(table)
        return ["id"]
    k = KeyColumns(lookup, known={("public", "known"): ("k",)})
    assert k.of("public", "jobs") == ("id",) and k.of("public", "jobs") == ("id",)
    assert k.of("public", "known") == ("k",)
    assert calls == ["jobs"]


def test_row_threads_keep_each_rows_order_and_overlap_rows():
    pool = RowPool("t", 4, keys(jobs=("id",)))
    seen, running, most = [], [0], [0]
    lock = threading.Lock()

    def part(events):
        for e in events:
            with lock:
                running[0] += 1
                most[0] = max(most[0], running[0])
            time.sleep(0.01)
            with lock:
                running[0] -= 1
                seen.append((e.data["id"], e.data["n"]))
        return len(events)

    events = [event(data={"id": row, "n": n}) for n in range(5) for row in range(8)]
    try:
        assert sum(pool.run(events, part)) == 40
    finally:
        pool.close(time.monotonic() + 5)
    for row in range(8):
        assert [n for r, n in seen if r == row] == list(range(5))
    assert most[0] >= 2


# -- reads shared by the lanes of a channel -----------------------------------------------


class Row:
    def __init__(self, ident):
        self.id = ident


def test_lanes_share_each_row_and_wait_for_a_read_under_way():
    from pgnotify_sync._shared import SharedReads
    shared = SharedReads(wait_s=5)
    asked = []
    started, release = threading.Event(), threading.Event()

    def slow(ids):
        asked.append(list(ids))
        started.set()
        release.wait(5)
        return [Row(i) for i in ids]
    results = []
    first = threading.Thread(target=lambda: results.append(shared.ids("w", [1, 2, 3], 3, slow)))
    first.start()
    started.wait(5)
    # another lane cut its batch elsewhere: 2 and 3 come from the read under way, 4 is read
    second = threading.Thread(target=lambda: results.append(shared.ids("w", [2, 3, 4], 3, slow)))
    second.start()
    release.set()
    first.join(5)
    second.join(5)
    assert sorted(sorted(r.id for r in result) for result in results) == [[1, 2, 3], [2, 3, 4]]
    assert asked == [[1, 2, 3], [4]]
    assert sorted(r.id for r in shared.ids("w", [1, 2, 3, 4], 3, slow)) == [1, 2, 3, 4]
    assert asked == [[1, 2, 3], [4]]                # the third lane read nothing
    shared.ids("w", [2], 3, slow)                   # the other two lanes had row 2: read again
    assert asked[-1] == [2]
    assert shared.page("k", 1, lambda: "alone") == "alone"


def test_a_failed_shared_read_is_made_again_by_the_next_lane():
    from pgnotify_sync._shared import SharedReads
    shared = SharedReads(wait_s=5)

    def boom():
        raise OSError("server away")
    try:
        shared.page("k", 2, boom)
    except OSError:
        pass
    assert shared.page("k", 2, lambda: "again") == "again"


def test_a_row_that_does_not_fit_is_described_without_its_values():
    from typing import Any, List

    import attrs
    import pytest

    from pgnotify_sync.errors import RowTypeError
    from pgnotify_sync.events import typed

    @attrs.define
    class Doc:
        id: int
        tags: Any = attrs.field(default=None, validator=attrs.validators.optional(attrs.validators.instance_of(list)))
        xs: List[int] = attrs.Factory(list)

    for data, where in (({"id": "SECRET-1"}, "TypeError, expected int @ $.id"),
                        ({"id": 1, "tags": "SECRET-2"}, "TypeError @ $"),      # a validator's own text quotes it
                        ({"tags": []}, "required field missing @ $.id"),
                        ({"id": 1, "xs": [1, "SECRET-3"]}, "TypeError, expected int @ $.xs[1]")):
        with pytest.raises(RowTypeError) as info:
            typed(event(data=data), Doc)
        assert str(info.value) == f"a row of public.jobs does not fit Doc: {where}"
        assert "SECRET" not in str(info.value) and info.value.__cause__ is None
