"""Capture edge cases, end to end through a Listener against the real server.

- a partitioned table watched at its parent (sql/install.sql capture_partition_row):
  writes naming the parent or a partition, a partition created after watch_table,
  rows moved between partitions, a savepoint rolled back;
- json content jsonb refuses (the \\u0000 escape; in a LATIN1 database any \\u escape
  above 007F) in tables with excluded columns (pgnotify_sync.without_columns).

The oracle is the event log: delivered ids must be exactly the logged ids.
"""

import uuid

import psycopg2
import pytest

from pgnotify_sync import Listener, install, watch_table

from helpers import wait_for
from pgutil import Collector, config_for, logged_ids


def _assert_exactly_the_logged_events(got, pg_cluster, dbname, channel, timeout=10):
    expected = logged_ids(pg_cluster, dbname, channel)
    wait_for(lambda: len(got) >= len(expected), timeout=timeout,
             message=f"delivered {len(got)} of {len(expected)} logged events")
    ids = got.ids()
    assert len(ids) == len(set(ids)), "an event was delivered twice"
    assert sorted(ids) == expected
    return expected


def _wait_for_marker(got, key, value, timeout=10):
    """Wait for the event whose data[key] == value (a marker write made last)."""
    wait_for(lambda: any(e.data and e.data.get(key) == value for e in list(got.events)), timeout=timeout,
             message=f"no event with {key}={value!r}")


# -- partitioned parent ---------------------------------------------------------------


class Mirror:
    """A handler keeping a dict copy of ``parts`` keyed by id, from its events alone."""

    def __init__(self):
        self.rows = {}
        self.events = Collector()
        self.problems = []      # a handler's exception would only be logged: kept for the test

    def __call__(self, event):
        self.events(event)
        if event.operation == "INSERT":
            self.rows[event.data["id"]] = _row(event.data)
        elif event.operation == "UPDATE":
            self.rows.pop(event.old["id"], None)
            self.rows[event.data["id"]] = _row(event.data)
        elif event.operation == "DELETE":
            if self.rows.pop(event.data["id"], None) != _row(event.data):
                self.problems.append(f"DELETE of a row the mirror does not hold as deleted: {event.data}")


def _row(data):
    return (data["id"], data["k"], data["v"], data["note"])


def _table_rows(db):
    with db.cursor() as cur:
        cur.execute("SELECT id, k, v, note FROM parts")
        return {r[0]: tuple(r) for r in cur.fetchall()}


def test_partitioned_parent_mirror_with_writes_naming_partitions_and_moved_rows(db, make_listener, pg_cluster,
                                                                                dbname, dsn):
    install(db)
    with db.cursor() as cur:
        cur.execute("CREATE TABLE parts (id int, k int NOT NULL, v int NOT NULL DEFAULT 0, note text, "
                    "PRIMARY KEY (id, k)) PARTITION BY RANGE (k)")
        cur.execute("CREATE TABLE parts_a PARTITION OF parts FOR VALUES FROM (0) TO (100)")
        cur.execute("CREATE TABLE parts_b PARTITION OF parts FOR VALUES FROM (100) TO (200)")
    assert watch_table(db, "public.parts", channel="parts") == "row"
    with db.cursor() as cur:
        # A future partition: the parent's row trigger is cloned to it.
        cur.execute("CREATE TABLE parts_c PARTITION OF parts FOR VALUES FROM (200) TO (300)")

    mirror = Mirror()
    listener = make_listener(channels=("parts",), name="parts")
    listener.on_event("parts", mirror)
    listener.start()

    with db.cursor() as cur:
        # Multi-row INSERTs naming the parent, landing in both partitions; one of >8 rows.
        cur.execute("INSERT INTO parts (id, k, note) VALUES (1, 10, 'one'), (2, 20, 'two'), "
                    "(3, 150, 'three'), (4, 160, 'four')")
        cur.execute("INSERT INTO parts (id, k, v, note) SELECT g, g * 7 % 200, g, 'bulk' "
                    "FROM generate_series(100, 119) g")
        # Single-row INSERTs naming a partition directly.
        cur.execute("INSERT INTO parts_a (id, k, note) VALUES (5, 50, 'five')")
        cur.execute("INSERT INTO parts_b (id, k, note) VALUES (6, 199, 'six')")
        # One row in the partition created after watch_table, named directly and via the parent.
        cur.execute("INSERT INTO parts_c (id, k, note) VALUES (7, 250, 'seven')")
        cur.execute("INSERT INTO parts (id, k, note) VALUES (8, 299, 'eight')")
        # UPDATEs naming a partition (rows stay where they are).
        cur.execute("UPDATE parts_a SET v = v + 1, note = 'a-updated' WHERE id IN (1, 5)")
        cur.execute("UPDATE parts_b SET v = v + 10 WHERE id = 3")
        cur.execute("UPDATE parts_c SET note = 'c-updated' WHERE id = 7")
        # An UPDATE naming the parent that moves no row.
        cur.execute("UPDATE parts SET v = v + 100 WHERE id = 4")
        # UPDATEs moving rows between partitions: a -> b, b -> c (the new partition).
        cur.execute("UPDATE parts SET k = k + 100 WHERE id IN (1, 2)")
        cur.execute("UPDATE parts SET k = k + 100, v = v + 1 WHERE id = 3")
        cur.execute("UPDATE parts SET k = k + 100 WHERE id BETWEEN 100 AND 119 AND k < 100")
        # DELETEs naming a partition.
        cur.execute("DELETE FROM parts_b WHERE id = 4")
        cur.execute("DELETE FROM parts_b WHERE id IN (100, 101, 102)")
        cur.execute("INSERT INTO parts_a (id, k) VALUES (11, 11)")
        cur.execute("DELETE FROM parts_a WHERE id = 11")

    # A savepoint rolled back: only the INSERT before it is committed.
    tx = psycopg2.connect(**dsn)
    try:
        with tx.cursor() as cur:
            cur.execute("INSERT INTO parts (id, k, note) VALUES (9, 90, 'kept')")
            cur.execute("SAVEPOINT s")
            cur.execute("UPDATE parts SET k = k + 100, note = 'rolled back' WHERE id = 9")   # a move
            cur.execute("UPDATE parts_b SET note = 'rolled back' WHERE id = 6")
            cur.execute("INSERT INTO parts_c (id, k, note) VALUES (10, 210, 'rolled back')")
            cur.execute("DELETE FROM parts_c WHERE id = 7")
            cur.execute("ROLLBACK TO SAVEPOINT s")
            cur.execute("UPDATE parts_a SET v = v + 5 WHERE id = 9")
        tx.commit()
    finally:
        tx.close()

    with db.cursor() as cur:
        cur.execute("INSERT INTO parts (id, k, note) VALUES (999, 1, 'END')")
    _wait_for_marker(mirror.events, "note", "END")

    _assert_exactly_the_logged_events(mirror.events, pg_cluster, dbname, "parts")
    events = list(mirror.events.events)
    assert all(e.table == "parts" and e.schema == "public" for e in events), \
        {(e.schema, e.table) for e in events}
    assert all(e.data.get("note") != "rolled back" for e in events)
    assert mirror.problems == []
    assert mirror.rows == _table_rows(db)
    assert mirror.rows[9] == (9, 90, 5, "kept") and mirror.rows[7] == (7, 250, 0, "c-updated")

    def ops(row_id):
        return [(e.operation.value, e.data["k"]) for e in events if e.data["id"] == row_id]

    # Moved rows: DELETE of the old row, then INSERT of the new one, in that order.
    assert ops(1) == [("INSERT", 10), ("UPDATE", 10), ("DELETE", 10), ("INSERT", 110)]
    assert ops(2) == [("INSERT", 20), ("DELETE", 20), ("INSERT", 120)]
    assert ops(3) == [("INSERT", 150), ("UPDATE", 150), ("DELETE", 150), ("INSERT", 250)]
    moved = [e for e in events if e.data["id"] == 3]
    assert moved[-1].data["v"] == 11 and moved[-2].data["v"] == 10
    assert [e.id for e in events] == sorted(e.id for e in events), "one writer at a time: log-id order"
    assert ops(4) == [("INSERT", 160), ("UPDATE", 160), ("DELETE", 160)]


# -- json that jsonb refuses, with excluded columns ---------------------------------

NUL_DOC = '{"a": "x\\u0000y", "b": [1, "\\u0000"]}'


def _assert_nul_doc(doc):
    assert doc["a"] == "x\x00y"
    assert doc["b"] == [1, "\x00"]


@pytest.mark.parametrize("mode", ["statement", "row"])
def test_nul_escape_in_json_column_with_excluded_columns(db, make_listener, pg_cluster, dbname, mode):
    install(db)
    with db.cursor() as cur:
        cur.execute("CREATE TABLE j (id serial PRIMARY KEY, doc json, secret text)")
    assert watch_table(db, "public.j", channel="j", exclude_columns=("secret",), mode=mode) == mode
    got = Collector()
    listener = make_listener(channels=("j",), name=f"nul-{mode}")
    listener.on_event("j", got)
    listener.start()

    with db.cursor() as cur:
        cur.execute("INSERT INTO j (doc, secret) VALUES (%s, 'TOPSECRET')", (NUL_DOC,))
        cur.execute("INSERT INTO j (doc, secret) SELECT %s, 'TOPSECRET' FROM generate_series(1, 20)", (NUL_DOC,))
        cur.execute("INSERT INTO j (doc, secret) SELECT %s, 'TOPSECRET' FROM generate_series(1, 3)", (NUL_DOC,))
        cur.execute("UPDATE j SET secret = 'OTHERSECRET' WHERE id IN (1, 2, 24)")    # excluded only: no event
        cur.execute("UPDATE j SET doc = %s WHERE id = 3", (NUL_DOC.replace("x", "z"),))
        cur.execute("DELETE FROM j WHERE id = 1")
        cur.execute("DELETE FROM j WHERE id BETWEEN 5 AND 16")       # 12 rows: a range in statement mode
        cur.execute("DELETE FROM j WHERE id IN (17, 18)")
        cur.execute("INSERT INTO j (doc, secret) VALUES ('{\"end\": true}', 'TOPSECRET')")
    _wait_for_marker(got, "id", 25)

    expected = _assert_exactly_the_logged_events(got, pg_cluster, dbname, "j")
    assert len(expected) == 1 + 20 + 3 + 1 + 1 + 12 + 2 + 1
    events = list(got.events)
    counts = {op: sum(e.operation == op for e in events) for op in ("INSERT", "UPDATE", "DELETE")}
    assert counts == {"INSERT": 25, "UPDATE": 1, "DELETE": 15}
    for event in events:
        assert "secret" not in event.data
        assert event.old is None or "secret" not in event.old
        if event.data["id"] == 25:
            assert event.data["doc"] == {"end": True}
        elif event.operation == "UPDATE" and event.data["id"] == 3:
            assert event.data["doc"]["a"] == "z\x00y" and event.old["doc"]["a"] == "x\x00y"
        else:
            _assert_nul_doc(event.data["doc"])
            if event.old is not None:
                _assert_nul_doc(event.old["doc"])
    with db.cursor() as cur:
        cur.execute("SELECT count(*) FROM j")
        assert cur.fetchone()[0] == 25 - 15


# -- a database that is not UTF8 --------------------------------------------------------

ENC_DOC = '{"e": "\\u20ac", "n": "\\u0000"}'


def test_any_database_encoding_with_excluded_columns(pg_cluster, admin_db):
    name = f"t_latin1_{uuid.uuid4().hex[:10]}"
    with admin_db.cursor() as cur:
        cur.execute(f'CREATE DATABASE "{name}" ENCODING \'LATIN1\' LC_COLLATE \'C\' LC_CTYPE \'C\' '
                    'TEMPLATE template0')
    listener = None
    conn = None
    try:
        conn = pg_cluster.connect(name, autocommit=True)
        with conn.cursor() as cur:
            cur.execute("SHOW server_encoding")
            assert cur.fetchone()[0] == "LATIN1"
        install(conn)
        with conn.cursor() as cur:
            for mode in ("statement", "row"):
                cur.execute(f"CREATE TABLE enc_{mode} (id serial PRIMARY KEY, t text, doc json, secret text)")
        for mode in ("statement", "row"):
            assert watch_table(conn, f"public.enc_{mode}", channel="enc", exclude_columns=("secret",),
                               mode=mode) == mode

        got = Collector()
        listener = Listener(config_for(pg_cluster.conninfo(name), channels=("enc",)), name="latin1",
                            registry=False)
        listener.on_event("enc", got)
        listener.start()

        with conn.cursor() as cur:
            for mode in ("statement", "row"):
                table = f"enc_{mode}"
                cur.execute(f"INSERT INTO {table} (t, doc, secret) VALUES ('café', %s, 'TOPSECRET')", (ENC_DOC,))
                cur.execute(f"INSERT INTO {table} (t, doc, secret) SELECT 'café', %s, 'TOPSECRET' "
                            "FROM generate_series(1, 3)", (ENC_DOC,))
                cur.execute(f"INSERT INTO {table} (t, doc, secret) SELECT 'café', %s, 'TOPSECRET' "
                            "FROM generate_series(1, 10)", (ENC_DOC,))     # a range in statement mode
                cur.execute(f"UPDATE {table} SET secret = 'OTHERSECRET' WHERE id IN (1, 2)")   # no event
                cur.execute(f"UPDATE {table} SET secret = 'NEWSECRET', doc = %s WHERE id IN (1, 2)",
                            (ENC_DOC.replace("{", '{"u": 1, ', 1),))
                cur.execute(f"DELETE FROM {table} WHERE id = 1")
                cur.execute(f"DELETE FROM {table} WHERE id > 4")            # 10 rows
            cur.execute("INSERT INTO enc_row (t, doc) VALUES ('END', '{}')")
        _wait_for_marker(got, "t", "END")

        expected = _assert_exactly_the_logged_events(got, pg_cluster, name, "enc")
        assert len(expected) == 2 * (1 + 3 + 10 + 2 + 1 + 10) + 1
        events = [e for e in got.events if e.data["t"] != "END"]
        assert {e.table for e in events} == {"enc_statement", "enc_row"}
        for event in events:
            for row in (event.data, event.old):
                if row is None:
                    continue
                assert "secret" not in row
                assert row["t"] == "café"
                assert row["doc"]["e"] == "€" and row["doc"]["n"] == "\x00"
    finally:
        if listener is not None:
            listener.stop(timeout=5.0)
        if conn is not None:
            conn.close()
        pg_cluster.drop_database(name)


# -- value formats (README, "Events": timestamps as ISO strings, bytea as \x.. text) ----

@pytest.mark.parametrize("mode", ["statement", "row"])
def test_timestamps_bytea_and_uuid_arrive_in_their_promised_formats(db, make_listener, mode):
    import datetime
    install(db)
    with db.cursor() as cur:
        cur.execute("CREATE TABLE typed (id serial PRIMARY KEY, tz timestamptz, ts timestamp, d date, "
                    "by bytea, u uuid, secret text)")
    watch_table(db, "public.typed", channel="typed", exclude_columns=("secret",), mode=mode)
    listener = make_listener(channels=("typed",))
    got = Collector()
    listener.on_event("typed", got)
    listener.start()
    with db.cursor() as cur:
        cur.execute("SET TIME ZONE 'Europe/Paris'")       # the writer's session decides the offset
        cur.execute("INSERT INTO typed (tz, ts, d, by, u) VALUES ('2026-01-02T03:04:05.25Z', "
                    "'2026-07-08 09:10:11.123456', '2026-02-28', '\\x00ff7f'::bytea, "
                    "'6F1C8E52-8F4B-4D3A-9B1E-0C3F1F2A9D10')")
        cur.execute("UPDATE typed SET by = ''::bytea, tz = '2026-07-01 12:00:00+00'")
    ins, upd = got.wait(2)
    assert ins.data == {"id": 1, "tz": "2026-01-02T04:04:05.25+01:00", "ts": "2026-07-08T09:10:11.123456",
                        "d": "2026-02-28", "by": "\\x00ff7f", "u": "6f1c8e52-8f4b-4d3a-9b1e-0c3f1f2a9d10"}
    assert datetime.datetime.fromisoformat(ins.data["tz"]) == datetime.datetime(
        2026, 1, 2, 3, 4, 5, 250000, tzinfo=datetime.timezone.utc)
    assert upd.old == ins.data
    assert upd.data == dict(ins.data, by="\\x", tz="2026-07-01T14:00:00+02:00")
