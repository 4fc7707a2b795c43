"""Tests of pgnotify_sync._eventlog: page_rows (no database), and EventLog, xids_of and
log_status against the real cluster (a ConnectionPool built as Listener._require_pool
builds it)."""

import psycopg2
import pytest

from pgnotify_sync import install, watch_table
from pgnotify_sync import _eventlog
from pgnotify_sync._eventlog import CatchUpFailed, EventLog, log_status, page_rows, xids_of
from pgnotify_sync._snapshot import Snapshot
from pgnotify_sync.config import wire_channel_name
from pgnotify_sync.errors import ConnectError
from pgnotify_sync.events import DatabaseEvent, EventRange, Operation

from pgutil import execute, snapshot


# -- page_rows (no database) ---------------------------------------------------------------


@pytest.mark.parametrize("most, previous, expected", [
    (5000, None, 5000),         # the first page: as many as allowed
    (5000, 0, 64),              # after an empty or tiny page: at least 64
    (5000, 1, 64),
    (5000, 32, 64),
    (5000, 33, 66),             # else twice what the last page got ...
    (5000, 1000, 2000),
    (5000, 2500, 5000),
    (5000, 4000, 5000),         # ... never more than most
    (5000, 5000, 5000),
    (10, 1, 10),                # most bounds the 64 floor too
    (10, None, 10),
])
def test_page_rows(most, previous, expected):
    assert page_rows(most, previous) == expected


def test_page_rows_grows_geometrically_to_most():
    sizes, previous = [], 1
    while True:
        previous = page_rows(20_000, previous)
        sizes.append(previous)
        if previous == 20_000:
            break
    assert sizes == [64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 20_000]


# -- fixtures -------------------------------------------------------------------------------


@pytest.fixture
def log(pool):
    return EventLog(pool, 5.0)


@pytest.fixture
def tdb(db):
    install(db)
    with db.cursor() as cur:
        cur.execute("CREATE TABLE t (id int PRIMARY KEY, v text)")
        cur.execute("CREATE TABLE t2 (id int PRIMARY KEY, w text)")
    watch_table(db, "public.t", channel="t")
    watch_table(db, "public.t2", channel="t")
    return db


def logged(db, where="TRUE", args=None, channel="t"):
    """Events as the log holds them (the expected values), in id order."""
    rows = execute(db, "SELECT id, xid::text::bigint, operation, schema_name, table_name, data, old "
                       "FROM pgnotify_sync.event_log WHERE " + where + " ORDER BY id", args)
    return [DatabaseEvent(channel, Operation(op), schema, table, data, old, ident, xid)
            for ident, xid, op, schema, table, data, old in rows]


def ids(events):
    return [e.id for e in events]


def statement_range(db, xid, channel="t"):
    first, last, n = execute(db, "SELECT min(id), max(id), count(*) FROM pgnotify_sync.event_log "
                                 "WHERE xid::text::bigint = %s AND channel = %s", (xid, channel))[0]
    return EventRange(channel, xid, first, last, n)


def insert_rows(db, n, start=1, width=10):
    """One statement of *n* rows into t; returns its transaction id."""
    execute(db, "INSERT INTO t SELECT g, repeat('x', %s) FROM generate_series(%s, %s) g", (width, start, start + n - 1))
    return execute(db, "SELECT max(xid::text::bigint) FROM pgnotify_sync.event_log")[0][0]


def range_page(log, channel, wire, rng, after=0, previous=None):
    """One page of a range as events (what the worker builds from RangeRows)."""
    rows, more = log.range_rows(channel, wire, rng, after, previous)
    return rows.events(), more


MAX_PAGES = 200     # a read that never ends fails instead of hanging


def read_all_ranges(log, rng):
    """Every page of a range, reading on after each page's last id as the listener does."""
    pages, after, previous = [], 0, None
    while True:
        events, more = range_page(log, "t", "t", rng, after=after, previous=previous)
        pages.append((events, more))
        if not more:
            return pages
        assert len(pages) < MAX_PAGES, "range_page never said the range was done"
        after, previous = events[-1].id, len(events)


# -- range_page ---------------------------------------------------------------------------


def test_range_page_is_exactly_the_statements_rows(tdb, dsn, log):
    """Rows of another transaction and of another channel inside the id range are left out."""
    other = psycopg2.connect(**dsn)
    other.autocommit = True
    try:
        with tdb:   # one transaction on tdb
            execute(tdb, "INSERT INTO t VALUES (1, 'a'), (2, 'b')")
            xid = execute(tdb, "SELECT pg_current_xact_id()::text::bigint")[0][0]
            execute(other, "INSERT INTO t VALUES (100, 'other transaction')")
            execute(tdb, "UPDATE t SET v = 'B' WHERE id = 2")
            execute(tdb, "INSERT INTO pgnotify_sync.event_log (channel, operation, schema_name, table_name, data) "
                         "VALUES ('elsewhere', 'PUBLISH', '', '', '{\"k\": 1}')")
            execute(tdb, "DELETE FROM t WHERE id = 1")
    finally:
        other.close()
    rng = statement_range(tdb, xid)
    in_range = execute(tdb, "SELECT count(*) FROM pgnotify_sync.event_log WHERE id BETWEEN %s AND %s",
                       (rng.first, rng.last))[0][0]
    assert in_range == rng.n + 2            # the other transaction's row and the other channel's are inside

    events, more = range_page(log, "t", "t", rng)
    assert more is False
    assert events == logged(tdb, "xid::text::bigint = %s AND channel = 't'", (xid,))
    assert [(e.operation, e.schema, e.table, e.data, e.old) for e in events] == [
        (Operation.INSERT, "public", "t", {"id": 1, "v": "a"}, None),
        (Operation.INSERT, "public", "t", {"id": 2, "v": "b"}, None),
        (Operation.UPDATE, "public", "t", {"id": 2, "v": "B"}, {"id": 2, "v": "b"}),
        (Operation.DELETE, "public", "t", {"id": 1, "v": "a"}, None),
    ]
    assert all(e.xid == xid and e.channel == "t" for e in events)
    assert ids(events) == sorted(ids(events)) and ids(events)[0] == rng.first and ids(events)[-1] == rng.last


def test_range_page_of_one_statement_is_one_aggregate_and_of_two_tables_grouped(tdb, log, monkeypatch):
    """A statement's rows share operation and table: read without GROUP BY (the
    grouped read is not used). A range over two tables' statements of one
    transaction (only a forged hint names one) is read again grouped, each row with
    its own table."""
    xid = insert_rows(tdb, 20)
    grouped = []
    real_read = EventLog._read
    monkeypatch.setattr(EventLog, "_read", lambda self, *a: grouped.append(a[1]) or real_read(self, *a))
    events, more = range_page(log, "t", "t", statement_range(tdb, xid))
    assert events == logged(tdb) and more is False and grouped == []
    with tdb:
        execute(tdb, "INSERT INTO t SELECT g, 'a' FROM generate_series(100, 104) g")
        execute(tdb, "INSERT INTO t2 SELECT g, 'b' FROM generate_series(1, 5) g")
        xid2 = execute(tdb, "SELECT pg_current_xact_id()::text::bigint")[0][0]
    events, more = range_page(log, "t", "t", statement_range(tdb, xid2))
    assert grouped == [_eventlog._RANGE_SQL_GROUPED] and more is False
    assert events == logged(tdb, "xid::text::bigint = %s", (xid2,))
    assert [e.table for e in events] == ["t"] * 5 + ["t2"] * 5


def test_range_rows_build_events_by_chunk(tdb, log):
    xid = insert_rows(tdb, 10)
    rows, more = log.range_rows("t", "t", statement_range(tdb, xid))
    assert len(rows) == 10 and more is False
    assert rows.events(0, 4) + rows.events(4, 10) == rows.events() == logged(tdb)
    assert rows.events(8, 99) == logged(tdb)[8:]


def test_range_page_channel_is_the_logical_name(tdb, log):
    xid = insert_rows(tdb, 3)
    events, _ = range_page(log, "logical", "t", statement_range(tdb, xid))
    assert len(events) == 3 and {e.channel for e in events} == {"logical"}
    assert range_page(log, "t", "not-the-wire", statement_range(tdb, xid)) == ([], False)


def test_range_page_after(tdb, log):
    xid = insert_rows(tdb, 10)
    rng = statement_range(tdb, xid)
    events, more = range_page(log, "t", "t", rng, after=rng.first + 6)
    assert ids(events) == list(range(rng.first + 7, rng.last + 1)) and more is False
    assert range_page(log, "t", "t", rng, after=rng.last) == ([], False)


def test_range_page_previous_bounds_the_page(tdb, log, monkeypatch):
    monkeypatch.setattr(_eventlog, "RANGE_PAGE", 1000)
    xid = insert_rows(tdb, 100)
    rng = statement_range(tdb, xid)
    events, more = range_page(log, "t", "t", rng)
    assert len(events) == 100 and more is False
    events, more = range_page(log, "t", "t", rng, previous=10)          # 64 rows
    assert ids(events) == list(range(rng.first, rng.first + 64)) and more is True
    events, more = range_page(log, "t", "t", rng, previous=40)          # 80 rows
    assert ids(events) == list(range(rng.first, rng.first + 80)) and more is True


def test_range_page_row_limit_pages(tdb, log, monkeypatch):
    monkeypatch.setattr(_eventlog, "RANGE_PAGE", 10)
    xid = insert_rows(tdb, 45)
    rng = statement_range(tdb, xid)
    pages = read_all_ranges(log, rng)
    assert [len(events) for events, _ in pages] == [10, 10, 10, 10, 5]
    assert [more for _, more in pages] == [True, True, True, True, False]
    assert [e for events, _ in pages for e in events] == logged(tdb)


def test_range_page_byte_bound_cuts_pages(tdb, log, monkeypatch):
    # rows of ~1 kB: a 3000-byte page ends with the row that reaches 3000 bytes
    monkeypatch.setattr(_eventlog, "PAGE_BYTES", 3000)
    xid = insert_rows(tdb, 30, width=1000)
    rng = statement_range(tdb, xid)
    first, more = range_page(log, "t", "t", rng)
    assert more is True
    assert len(first) == 3, [len(str(e.data)) for e in first]
    pages = read_all_ranges(log, rng)
    assert all(more for _, more in pages[:-1]) and pages[-1][1] is False
    assert all(1 <= len(events) <= 3 for events, _ in pages[:-1])
    everything = [e for events, _ in pages for e in events]
    assert everything == logged(tdb)                  # every row once, in id order
    assert len(everything) == 30


def statement_with_a_wide_row(db, monkeypatch, page_bytes, wide, rows=10):
    """PAGE_BYTES set to *page_bytes*; one statement of *rows* rows into t, row
    *wide* (1-based) one byte wider than the fast read takes (2 * PAGE_BYTES over
    the ids); returns its range."""
    monkeypatch.setattr(_eventlog, "PAGE_BYTES", page_bytes)
    with db:
        execute(db, "INSERT INTO t SELECT g, CASE WHEN g = %s THEN repeat('w', %s) ELSE 'n' END "
                    "FROM generate_series(1, %s) g", (wide, 2 * page_bytes // rows + 1, rows))
        xid = execute(db, "SELECT pg_current_xact_id()::text::bigint")[0][0]
    return statement_range(db, xid)


def test_range_page_fast_read_ends_before_a_wide_row(tdb, log, monkeypatch):
    """The first page leaves the byte bound's window out: it holds rows of at most
    2 * PAGE_BYTES over the ids it may hold (206 here) and ends before the first
    wider one, which comes with the 200 rows after it in one byte-bounded page."""
    rng = statement_with_a_wide_row(tdb, monkeypatch, 100_000, wide=6, rows=206)
    first, more = log.range_rows("t", "t", rng)
    assert first.ids == list(range(rng.first, rng.first + 5)) and more is True
    assert first.previous == _eventlog.WIDE
    # read on by bytes, a whole page (not the doubling of a page cut by bytes)
    rest, more = log.range_rows("t", "t", rng, after=first.ids[-1], previous=first.previous)
    assert rest.ids == list(range(rng.first + 5, rng.last + 1)) and more is False
    assert first.events() + rest.events() == logged(tdb)
    pages = read_all_ranges(log, rng)
    assert [e for events, _ in pages for e in events] == logged(tdb)


def test_range_page_whose_first_row_is_wide_reads_by_bytes_at_once(tdb, log, monkeypatch):
    rng = statement_with_a_wide_row(tdb, monkeypatch, 100_000, wide=1)
    events, more = range_page(log, "t", "t", rng)
    assert events == logged(tdb) and more is False


def test_range_page_a_row_wider_than_the_bound_still_comes(tdb, log, monkeypatch):
    monkeypatch.setattr(_eventlog, "PAGE_BYTES", 1)
    xid = insert_rows(tdb, 12)
    rng = statement_range(tdb, xid)
    pages = read_all_ranges(log, rng)
    assert [len(events) for events, _ in pages[:-1]] == [1] * 12      # one row a page, at least one
    assert all(more for _, more in pages[:-1])
    assert pages[-1] == ([], False)       # the last row reached the bound too: one empty page ends it
    assert [e for events, _ in pages for e in events] == logged(tdb)


# -- catchup_page --------------------------------------------------------------------------


def test_catchup_page_is_what_the_target_sees_and_the_position_does_not(tdb, dsn, log):
    execute(tdb, "INSERT INTO t VALUES (1, 'before')")
    position = snapshot(tdb)
    execute(tdb, "INSERT INTO t VALUES (2, 'a1'), (3, 'a2')")                         # committed
    open_tx = psycopg2.connect(**dsn)
    try:
        execute(open_tx, "INSERT INTO t VALUES (4, 'in progress')")                  # not committed yet
        open_xid = execute(open_tx, "SELECT pg_current_xact_id()::text::bigint")[0][0]
        execute(tdb, "INSERT INTO t2 VALUES (1, 'c')")                               # another table, same channel
        execute(tdb, "UPDATE t SET v = 'A1' WHERE id = 2")
        execute(tdb, "INSERT INTO t VALUES (5, 'd')")
        target = snapshot(tdb)
        assert open_xid in target.xip                                             # in progress in the target
        events, more = log.catchup_page("t", "t", position, target, after=0)
        expected = logged(tdb, "(data->>'v' IS DISTINCT FROM 'before' AND data->>'v' <> 'in progress') "
                               "OR table_name = 't2'")
        assert more is False
        assert events == expected
        assert len(events) == 5
        assert ids(events) == sorted(ids(events))          # groups (per table and operation) merged by id
        assert [(e.table, e.operation) for e in events] == [
            ("t", Operation.INSERT), ("t", Operation.INSERT), ("t2", Operation.INSERT),
            ("t", Operation.UPDATE), ("t", Operation.INSERT)]
        open_tx.commit()
    finally:
        open_tx.close()
    later = snapshot(tdb)
    events, more = log.catchup_page("t", "t", target, later, after=0)
    assert [e.data for e in events] == [{"id": 4, "v": "in progress"}] and more is False
    # nothing between a snapshot and itself
    assert log.catchup_page("t", "t", later, later, after=0) == ([], False)


def test_catchup_page_after_and_pages(tdb, log, monkeypatch):
    position = snapshot(tdb)
    for i in range(1, 8):
        execute(tdb, "INSERT INTO t VALUES (%s, 'r')", (i,))
        execute(tdb, "INSERT INTO t2 VALUES (%s, 'r')", (i,))
    target = snapshot(tdb)
    expected = logged(tdb)
    assert len(expected) == 14

    events, more = log.catchup_page("t", "t", position, target, after=expected[9].id)
    assert events == expected[10:] and more is False

    monkeypatch.setattr(_eventlog, "CATCHUP_PAGE", 5)
    got, after, previous, pages = [], 0, None, 0
    while True:
        events, more = log.catchup_page("t", "t", position, target, after=after, previous=previous)
        pages += 1
        got.extend(events)
        if not more:
            break
        assert pages < MAX_PAGES, "catchup_page never said the catch-up was done"
        after, previous = events[-1].id, len(events)
    assert got == expected
    assert pages == 3


def test_catchup_page_byte_bound(tdb, log, monkeypatch):
    monkeypatch.setattr(_eventlog, "PAGE_BYTES", 1)
    position = snapshot(tdb)
    execute(tdb, "INSERT INTO t VALUES (1, 'a'), (2, 'b')")
    target = snapshot(tdb)
    events, more = log.catchup_page("t", "t", position, target, after=0)
    assert len(events) == 1 and more is True
    events2, more = log.catchup_page("t", "t", position, target, after=events[0].id, previous=1)
    assert len(events2) == 1 and events + events2 == logged(tdb)


# -- event / replay / pending / trim_batch / snapshot -----------------------------------------


def test_events_by_id_of_their_channel_only(tdb, log):
    execute(tdb, "INSERT INTO t VALUES (1, 'a')")
    execute(tdb, "UPDATE t SET v = 'b'")
    insert, update = logged(tdb)
    assert log.events_by_id("t", "t", [update.id, insert.id]) == [insert, update]      # id order
    assert log.events_by_id("logical", "t", [insert.id]) == [
        DatabaseEvent("logical", Operation.INSERT, "public", "t", {"id": 1, "v": "a"}, None, insert.id, insert.xid)]
    assert log.events_by_id("t", "other_channel", [insert.id, update.id]) == []       # another channel's: none
    execute(tdb, "DELETE FROM pgnotify_sync.event_log WHERE id = %s", (update.id,))
    assert log.events_by_id("t", "t", [update.id, 10 ** 12]) == []
    assert log.events_by_id("t", "t", []) == []


def test_events_by_id_reads_in_bounded_chunks(tdb, log, monkeypatch):
    import pgnotify_sync._eventlog as eventlog
    monkeypatch.setattr(eventlog, "HINT_READ", 2)           # 5 ids: three queries of at most 2 rows
    for i in range(5):
        execute(tdb, "INSERT INTO t VALUES (%s, 'x')", (i,))
    rows = logged(tdb)
    assert log.events_by_id("t", "t", [e.id for e in rows]) == rows


def test_window_is_what_became_visible(tdb, log):
    before = snapshot(tdb)
    execute(tdb, "INSERT INTO t VALUES (1, 'a')")
    execute(tdb, "INSERT INTO t VALUES (2, 'b')")
    after = snapshot(tdb)
    first, second = logged(tdb)
    assert sorted(log.window("t", before, after)) == [(first.id, first.xid), (second.id, second.xid)]
    assert log.window("t", after, after) == []
    assert log.window("other_channel", before, after) == []


def test_replay_maps_wire_names_and_pages(tdb, log, monkeypatch):
    monkeypatch.setattr(_eventlog, "REPLAY_PAGE", 3)
    execute(tdb, "CREATE TABLE u (id int PRIMARY KEY)")
    execute(tdb, "CREATE TABLE w (id int PRIMARY KEY)")
    watch_table(tdb, "public.u", channel="u", channel_prefix="app")
    watch_table(tdb, "public.w", channel="w", channel_prefix="app")
    wire_u, wire_w = wire_channel_name("u", "app"), wire_channel_name("w", "app")
    assert wire_u != "u"
    for i in range(1, 5):
        execute(tdb, "INSERT INTO t VALUES (%s, 'x')", (i,))
        execute(tdb, "INSERT INTO u VALUES (%s)", (i,))
        execute(tdb, "INSERT INTO w VALUES (%s)", (i,))       # a channel not asked for
    expected = [DatabaseEvent("T" if row[0] == "t" else "U", Operation(row[3]), row[4], row[5], row[6], row[7],
                              row[1], row[2])
                for row in execute(tdb, "SELECT channel, id, xid::text::bigint, operation, schema_name, table_name, "
                                        "data, old FROM pgnotify_sync.event_log WHERE channel IN ('t', %s) "
                                        "ORDER BY id", (wire_u,))]
    assert len(expected) == 8
    events = log.replay({"t": "T", wire_u: "U"}, 0)
    assert events == expected                 # 8 rows: past REPLAY_PAGE, the last page not full
    assert events[1].channel == "U" and events[1].data == {"id": 1}
    assert log.replay({"t": "T", wire_u: "U"}, expected[2].id) == expected[3:]
    assert log.replay({"t": "T", wire_u: "U"}, expected[-1].id) == []
    # a page exactly full: one more query finds the end
    assert log.replay({"t": "T", wire_u: "U"}, expected[1].id) == expected[2:]
    assert [e.channel for e in log.replay({wire_w: "W"}, 0)] == ["W"] * 4
    # Pages come one at a time (each read when asked for), at most REPLAY_PAGE events.
    pages = log.replay_pages({"t": "T", wire_u: "U"}, 0)
    assert next(pages) == expected[:3]
    assert [len(p) for p in pages] == [3, 2]
    # The size of a replay, counted up to a bound, and the newest id of those channels.
    assert log.replay_size(["t", wire_u], 0, 100) == (8, expected[-1].id)
    assert log.replay_size(["t", wire_u], 0, 5) == (5, expected[-1].id)
    assert log.replay_size(["t", wire_u], expected[-1].id, 5) == (0, expected[-1].id)


def test_pending_counts_what_the_position_does_not_see(tdb, dsn, log):
    execute(tdb, "INSERT INTO t VALUES (1, 'long ago')")
    open_tx = psycopg2.connect(**dsn)
    try:
        execute(open_tx, "INSERT INTO t VALUES (10, 'in progress')")
        execute(tdb, "INSERT INTO t VALUES (2, 'seen')")        # above the position's xmin, visible in it
        position = snapshot(tdb)
        assert position.xip and max(e.xid for e in logged(tdb)) >= position.xmin
        assert log.pending("t", position) == 0                  # 'seen' is visible; 'in progress' not logged yet
        open_tx.commit()
    finally:
        open_tx.close()
    assert log.pending("t", position) == 1                      # committed now, not visible in the position
    execute(tdb, "INSERT INTO t VALUES (3, 'a'), (4, 'b'), (5, 'c')")
    execute(tdb, "INSERT INTO t2 VALUES (1, 'd')")
    execute(tdb, "INSERT INTO pgnotify_sync.event_log (channel, operation, schema_name, table_name) "
                 "VALUES ('elsewhere', 'PUBLISH', '', '')")
    assert log.pending("t", position) == 5
    assert log.pending("elsewhere", position) == 1
    assert log.pending("t", snapshot(tdb)) == 0


def test_trim_batch(tdb, log, monkeypatch):
    for i in range(1, 6):
        execute(tdb, "INSERT INTO t VALUES (%s, 'x')", (i,))
    assert log.trim_batch(3600, 3600, 0) == (0, None)           # nothing old enough
    assert execute(tdb, "SELECT count(*) FROM pgnotify_sync.event_log")[0][0] == 5
    monkeypatch.setattr(_eventlog, "TRIM_BATCH", 2)
    all_ids = ids(logged(tdb))
    batches, after = [], 0
    while after is not None:
        deleted, after = log.trim_batch(0, 0, after)
        batches.append((deleted, after))
        assert len(batches) < MAX_PAGES, "trim_batch never reached the end"
    assert batches == [(2, all_ids[1]), (2, all_ids[3]), (1, None)]
    assert execute(tdb, "SELECT count(*) FROM pgnotify_sync.event_log")[0][0] == 0


def test_snapshot_is_the_servers(tdb, log):
    before = snapshot(tdb)
    execute(tdb, "INSERT INTO t VALUES (1, 'x')")
    snap = log.snapshot()
    assert isinstance(snap, Snapshot)
    assert snap.covers(before) and snap.xmax > before.xmax
    assert all(snap.visible(e.xid) for e in logged(tdb))


# -- xids_of / log_status ---------------------------------------------------------------------


class NoQueries:
    def execute(self, *args):
        raise AssertionError(f"no query expected, got {args!r}")


def test_xids_of_no_ids_asks_nothing():
    assert xids_of(NoQueries(), []) == {}
    assert xids_of(NoQueries(), ()) == {}


def test_xids_of(tdb):
    execute(tdb, "INSERT INTO t VALUES (1, 'a')")
    execute(tdb, "INSERT INTO t VALUES (2, 'b'), (3, 'c')")
    a, b, c = logged(tdb)
    execute(tdb, "DELETE FROM pgnotify_sync.event_log WHERE id = %s", (b.id,))
    with tdb.cursor() as cur:
        assert xids_of(cur, [a.id, b.id, c.id, 10 ** 12]) == {a.id: a.xid, c.id: c.xid}
        assert xids_of(cur, [c.id]) == {c.id: c.xid}
    assert a.xid != c.xid


def test_log_status(tdb, dsn):
    with tdb.cursor() as cur:
        summary, consumers = log_status(cur)
    assert summary["rows"] == 0 and summary["first_id"] is None and summary["last_id"] is None
    assert summary["oldest"] is None and summary["newest"] is None and summary["bytes"] > 0
    assert consumers == []

    open_tx = psycopg2.connect(**dsn)
    try:
        execute(open_tx, "INSERT INTO t VALUES (10, 'in progress')")
        execute(tdb, "INSERT INTO t VALUES (0, 'seen')")    # above the position's xmin, visible in it
        position = snapshot(tdb)
        open_tx.commit()
    finally:
        open_tx.close()
    execute(tdb, "INSERT INTO pgnotify_sync.consumers (name, channel, position) VALUES "
                 "('indexer', 't', %s::pg_snapshot), ('archiver', 'elsewhere', %s::pg_snapshot)",
                 (str(position), str(position)))
    execute(tdb, "INSERT INTO t VALUES (1, 'a'), (2, 'b')")
    rows = logged(tdb)
    execute(tdb, "UPDATE pgnotify_sync.consumers SET position = pg_current_snapshot() WHERE name = 'archiver'")
    with tdb.cursor() as cur:
        summary, consumers = log_status(cur)
    assert summary["rows"] == 4
    assert (summary["first_id"], summary["last_id"]) == (rows[0].id, rows[-1].id)
    assert summary["oldest"] <= summary["newest"]
    assert [(c["name"], c["channel"], c["lag_upper_bound"]) for c in consumers] == [
        ("archiver", "elsewhere", 0), ("indexer", "t", 3)]
    assert all(c["updated_at"] is not None for c in consumers)


# -- failures ---------------------------------------------------------------------------------


def test_reads_on_a_closed_pool_raise_catchupfailed(tdb, pool, log):
    xid = insert_rows(tdb, 2)
    rng = statement_range(tdb, xid)
    position = target = snapshot(tdb)
    pool.close()
    reads = [lambda: range_page(log, "t", "t", rng), lambda: log.catchup_page("t", "t", position, target, 0),
             lambda: log.events_by_id("t", "t", [rng.first]), lambda: log.window("t", position, target),
             log.snapshot]
    for read in reads:
        with pytest.raises(CatchUpFailed, match="pool is closed") as info:
            read()
        assert isinstance(info.value.__cause__, ConnectError)


def test_a_failing_query_raises_catchupfailed_with_its_first_line(db, log):
    # no schema installed: the server's error (multi-line) becomes one line
    rng = EventRange("t", 1, 1, 10, 10)
    with pytest.raises(CatchUpFailed) as info:
        range_page(log, "t", "t", rng)
    assert "event_log" in str(info.value) and "does not exist" in str(info.value)
    assert "\n" not in str(info.value)
    assert isinstance(info.value.__cause__, psycopg2.Error)
