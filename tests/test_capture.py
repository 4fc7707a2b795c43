"""The capture triggers (sql/install.sql) at the SQL level: what they log and notify.

No Listener here: a bare LISTEN connection receives the notifications, and every
per-row payload is compared byte for byte with the hint made from the logged row,
``{"id":…,"xid":…}``: never a row value (any role may LISTEN).
"""

import itertools
import json
import select
import threading
import time

import psycopg2
import pytest

from pgnotify_sync import install, watch_table

from helpers import wait_for

# What a per-row notification must be, built from the logged row.
_EXPECTED_ROW_PAYLOADS = """
SELECT id, format('{"id":%%s,"xid":%%s}', id, xid) FROM pgnotify_sync.event_log WHERE channel = %s ORDER BY id
"""

ODD_SCHEMA = 'Sch "q" \\ é'
ODD_TABLE = 'Tab\nle "x"'


def _q(name):
    return '"' + name.replace('"', '""') + '"'


class Notifications:
    """A LISTEN connection on some channels; drain() returns what was notified so far."""

    def __init__(self, pg_cluster, dbname, *channels):
        self.conn = pg_cluster.connect(dbname, autocommit=True)
        self.channels = channels
        self._markers = itertools.count(1)
        with self.conn.cursor() as cur:
            for channel in channels:
                cur.execute(f"LISTEN {_q(channel)}")

    def drain(self, timeout=15.0):
        """Every notification of a transaction committed before this call, and nothing else.

        A barrier instead of a wait for silence: a marker is NOTIFYed now, in a
        transaction of its own, and notifications arrive in commit order, so what was
        committed earlier arrives before the marker and the marker ends the drain.
        """
        marker = f"drain-marker-{next(self._markers)}"
        with self.conn.cursor() as cur:
            cur.execute(f"NOTIFY {_q(self.channels[0])}, '{marker}'")
        got = []
        deadline = time.monotonic() + timeout
        while True:
            self.conn.poll()
            while self.conn.notifies:
                n = self.conn.notifies.pop(0)
                if (n.channel, n.payload) == (self.channels[0], marker):
                    return got
                got.append((n.channel, n.payload))
            remaining = deadline - time.monotonic()
            assert remaining > 0, f"the drain marker did not come back within {timeout}s; got {got!r}"
            select.select([self.conn], [], [], min(remaining, 0.5))

    def close(self):
        self.conn.close()


@pytest.fixture
def notes(pg_cluster, dbname):
    made = []

    def make(*channels):
        n = Notifications(pg_cluster, dbname, *channels)
        made.append(n)
        return n
    yield make
    for n in made:
        n.close()


def _log(db, channel):
    with db.cursor() as cur:
        cur.execute("SELECT id, xid::text::bigint, operation, schema_name, table_name, data::text, old::text "
                    "FROM pgnotify_sync.event_log WHERE channel = %s ORDER BY id", (channel,))
        return cur.fetchall()


def _expected_payloads(db, channel):
    with db.cursor() as cur:
        cur.execute(_EXPECTED_ROW_PAYLOADS, (channel,))
        return cur.fetchall()


def _table(db, name="t", schema="public", mode="statement", exclude=(), channel="c"):
    with db.cursor() as cur:
        if schema != "public":
            cur.execute(f"CREATE SCHEMA {_q(schema)}")
        # Column names jsonb would reorder (it sorts keys by length, then bytes).
        cur.execute(f"CREATE TABLE {_q(schema)}.{_q(name)} (zeta_long_name int, id bigserial PRIMARY KEY, "
                    "b text, secret text, aa int)")
    assert watch_table(db, f"{_q(schema)}.{_q(name)}", channel=channel, exclude_columns=exclude,
                       mode=mode) == mode
    return f"{_q(schema)}.{_q(name)}"


@pytest.fixture
def idb(db):
    install(db)
    return db


def test_event_log_stores_json_keeping_column_order(idb, notes):
    table = _table(idb)
    listen = notes("c")
    with idb.cursor() as cur:
        cur.execute("SELECT format_type(atttypid, atttypmod) FROM pg_attribute "
                    "WHERE attrelid = 'pgnotify_sync.event_log'::regclass AND attname IN ('data', 'old') "
                    "ORDER BY attname")
        assert [r[0] for r in cur.fetchall()] == ["json", "json"]
        cur.execute(f"INSERT INTO {table} (zeta_long_name, b, secret, aa) VALUES (7, 'x', 's', 1)")
    (row,) = _log(idb, "c")
    assert row[5] == '{"zeta_long_name":7,"id":1,"b":"x","secret":"s","aa":1}'
    ((channel, payload),) = listen.drain()
    assert channel == "c"
    assert json.loads(payload) == {"id": row[0], "xid": int(row[1])}          # a hint, no row values


@pytest.mark.parametrize("rows", [1, 2, 8])
def test_small_statements_notify_each_row_in_id_order(idb, notes, rows):
    table = _table(idb, name=ODD_TABLE, schema=ODD_SCHEMA)
    listen = notes("c")
    values = ", ".join(f"({100 - i}, 'row {i}', 's', {i})" for i in range(rows))
    with idb.cursor() as cur:
        cur.execute(f"INSERT INTO {table} (zeta_long_name, b, secret, aa) VALUES {values}")
    log = _log(idb, "c")
    assert len(log) == rows
    # ids follow the statement's row order
    assert [json.loads(r[5])["aa"] for r in log] == list(range(rows))
    assert all(r[2] == "INSERT" and (r[3], r[4]) == (ODD_SCHEMA, ODD_TABLE) and r[6] is None for r in log)
    assert len({r[1] for r in log}) == 1
    got = listen.drain()
    assert [p for _c, p in got] == [p for _id, p in _expected_payloads(idb, "c")]
    assert all(set(json.loads(p)) == {"id", "xid"} for _c, p in got)       # the names stay in the log


@pytest.mark.parametrize("rows", [9, 1000])
def test_big_statements_send_one_range_notification(idb, notes, rows):
    table = _table(idb)
    listen = notes("c")
    with idb.cursor() as cur:
        cur.execute(f"INSERT INTO {table} (zeta_long_name, b) SELECT g, 'x' FROM generate_series(1, %s) g",
                    (rows,))
        cur.execute("SELECT json_build_object('xid', min(xid::text::bigint), 'first', min(id), 'last', max(id), "
                    "'n', count(*))::text, count(DISTINCT xid) FROM pgnotify_sync.event_log WHERE channel = 'c'")
        expected, xids = cur.fetchone()
    assert xids == 1
    assert listen.drain() == [("c", expected)]
    assert [json.loads(r[5])["zeta_long_name"] for r in _log(idb, "c")] == list(range(1, rows + 1))


def test_statement_without_rows_logs_and_notifies_nothing(idb, notes):
    table = _table(idb)
    listen = notes("c")
    with idb.cursor() as cur:
        cur.execute(f"INSERT INTO {table} (b) SELECT 'x' WHERE false")
        cur.execute(f"DELETE FROM {table}")
    assert _log(idb, "c") == []
    assert listen.drain() == []


@pytest.mark.parametrize("rows", [1, 3, 9])
def test_statement_deletes(idb, notes, rows):
    table = _table(idb)
    with idb.cursor() as cur:
        cur.execute(f"INSERT INTO {table} (zeta_long_name, b) SELECT g, 'x' FROM generate_series(1, %s) g",
                    (rows,))
        cur.execute("TRUNCATE pgnotify_sync.event_log")
    listen = notes("c")
    with idb.cursor() as cur:
        cur.execute(f"DELETE FROM {table}")
    log = _log(idb, "c")
    assert len(log) == rows and all(r[2] == "DELETE" and r[6] is None for r in log)
    assert sorted(json.loads(r[5])["zeta_long_name"] for r in log) == list(range(1, rows + 1))
    got = listen.drain()
    if rows > 8:
        assert len(got) == 1
        assert json.loads(got[0][1]) == {"xid": log[0][1], "first": log[0][0], "last": log[-1][0], "n": rows}
    else:
        assert [p for _c, p in got] == [p for _id, p in _expected_payloads(idb, "c")]


@pytest.mark.parametrize("mode", ["statement", "row"])
@pytest.mark.parametrize("rows", [1, 9])
def test_excluded_columns_are_neither_logged_nor_notified(idb, notes, mode, rows):
    table = _table(idb, mode=mode, exclude=("secret", "aa"))
    listen = notes("c")
    with idb.cursor() as cur:
        cur.execute(f"INSERT INTO {table} (zeta_long_name, b, secret, aa) "
                    "SELECT g, 'x', 'TOPSECRET', 42 FROM generate_series(1, %s) g", (rows,))
        cur.execute(f"UPDATE {table} SET secret = 'OTHERSECRET', b = 'y'")
        cur.execute(f"DELETE FROM {table}")
    log = _log(idb, "c")
    assert len(log) == 3 * rows
    for row in log:
        for text in row[5:]:
            assert text is None or ("SECRET" not in text and '"aa"' not in text)
        assert set(json.loads(row[5])) == {"zeta_long_name", "id", "b"}
    expected = dict(_expected_payloads(idb, "c"))
    # statement mode, 9 rows: a range for the INSERT and one for the DELETE, UPDATE per row
    count = 3 * rows if mode == "row" or rows == 1 else rows + 2
    got = listen.drain()
    assert len(got) == count
    for _channel, payload in got:
        assert "SECRET" not in payload and '"aa"' not in payload
        body = json.loads(payload)
        if "id" in body:
            assert payload == expected[body["id"]]


@pytest.mark.parametrize("table_kind", ["statement", "row", "partitioned"])
def test_an_update_of_excluded_columns_alone_is_no_event(idb, notes, table_kind):
    """Only excluded columns changed (or nothing did): nothing logged, nothing
    notified, so nobody learns that a hidden column changed. The row's other
    changes are events as before, with the excluded column left out."""
    if table_kind == "partitioned":
        with idb.cursor() as cur:
            cur.execute("CREATE TABLE pt (id bigint, k int, b text, secret text, PRIMARY KEY (id, k)) "
                        "PARTITION BY RANGE (k)")
            cur.execute("CREATE TABLE pt_1 PARTITION OF pt FOR VALUES FROM (0) TO (100)")
        watch_table(idb, "public.pt", channel="c", exclude_columns=("secret",))
        table = "pt"
        with idb.cursor() as cur:
            cur.execute("INSERT INTO pt SELECT g, g, 'x', 'old' FROM generate_series(1, 3) g")
    else:
        table = _table(idb, mode=table_kind, exclude=("secret",))
        with idb.cursor() as cur:
            cur.execute(f"INSERT INTO {table} (zeta_long_name, b, secret) SELECT g, 'x', 'old' "
                        "FROM generate_series(1, 3) g")
    before = len(_log(idb, "c"))
    listen = notes("c")
    with idb.cursor() as cur:
        cur.execute(f"UPDATE {table} SET secret = 'new'")                       # excluded only
        cur.execute(f"UPDATE {table} SET secret = 'newer', b = b")              # kept ones unchanged
        cur.execute(f"UPDATE {table} SET b = 'y', secret = 'newest' WHERE id = 2")    # a real change
    log = _log(idb, "c")[before:]
    assert [(row[2], json.loads(row[5])["b"], json.loads(row[6])["b"]) for row in log] == [("UPDATE", "y", "x")]
    assert "secret" not in log[0][5] and "secret" not in log[0][6]
    got = listen.drain()
    assert [json.loads(p)["id"] for _c, p in got] == [log[0][0]]


@pytest.mark.parametrize("table_kind", ["statement", "row", "partitioned"])
def test_an_excluded_column_stays_excluded_when_renamed_or_dropped_and_added_again(idb, notes, table_kind):
    """The table's owner renames the excluded column (or drops it and adds one of the
    same name): its values still never reach the log or a notification, and
    watched_tables() names it as it is called now. Installing again (which watches
    tables again) keeps it so."""
    from pgnotify_sync import watched_tables
    with idb.cursor() as cur:
        if table_kind == "partitioned":
            # a partition whose columns are numbered unlike its parent's
            cur.execute("CREATE TABLE sb (id bigint, k int, pw text, note text, PRIMARY KEY (id, k)) "
                        "PARTITION BY RANGE (k)")
            cur.execute("CREATE TABLE sb_1 (note text, k int NOT NULL, pw text, id bigint NOT NULL)")
            cur.execute("ALTER TABLE sb ATTACH PARTITION sb_1 FOR VALUES FROM (0) TO (100)")
        else:
            cur.execute("CREATE TABLE sb (id bigint PRIMARY KEY, k int, pw text, note text)")
    watch_table(idb, "public.sb", channel="c", exclude_columns=("pw",),
                mode="row" if table_kind == "row" else "statement")
    listen = notes("c")

    def write(column, first):
        with idb.cursor() as cur:
            cur.execute(f"INSERT INTO sb (id, k, {column}, note) VALUES (%s, 1, 'SECRET-a', 'n')", (first,))
            cur.execute(f"INSERT INTO sb (id, k, {column}, note) SELECT g, 1, 'SECRET-b', 'n' "
                        "FROM generate_series(%s, %s) g", (first + 1, first + 10))
            cur.execute(f"UPDATE sb SET {column} = 'SECRET-c', note = 'm' WHERE id = %s", (first,))
            cur.execute("DELETE FROM sb WHERE id = %s", (first + 1,))

    def no_secret():
        log = _log(idb, "c")
        for row in log:
            for text in row[5:]:
                assert text is None or ("SECRET" not in text and "pw" not in text), text
            assert set(json.loads(row[5])) == {"id", "k", "note"}
        return log

    with idb.cursor() as cur:
        cur.execute("ALTER TABLE sb RENAME COLUMN pw TO pw_hash")
    write("pw_hash", 100)
    no_secret()
    assert [t["exclude_columns"] for t in watched_tables(idb)] == [["pw_hash"]]
    install(idb)                        # watches tables again: still excluded, by its new name
    assert [t["exclude_columns"] for t in watched_tables(idb)] == [["pw_hash"]]
    write("pw_hash", 200)
    with idb.cursor() as cur:
        cur.execute("ALTER TABLE sb DROP COLUMN pw_hash")
        cur.execute("ALTER TABLE sb ADD COLUMN pw text")
    write("pw", 300)
    assert len(no_secret()) == 3 * (11 + 1 + 1)
    for _channel, payload in listen.drain():
        assert "SECRET" not in payload


@pytest.mark.parametrize("mode", ["statement", "row"])
def test_row_mode_and_updates_make_the_same_payload_text(idb, notes, mode):
    table = _table(idb, name=ODD_TABLE, schema=ODD_SCHEMA, mode=mode)
    listen = notes("c")
    with idb.cursor() as cur:
        cur.execute(f"INSERT INTO {table} (zeta_long_name, b, secret, aa) VALUES (1, E'a\\nb \"c\" \\\\', NULL, 2)")
        cur.execute(f"UPDATE {table} SET b = 'é☃'")
        cur.execute(f"DELETE FROM {table}")
    log = _log(idb, "c")
    assert [r[2] for r in log] == ["INSERT", "UPDATE", "DELETE"]
    assert json.loads(log[1][6])["b"] == 'a\nb "c" \\' and json.loads(log[1][5])["b"] == "é☃"
    got = listen.drain()
    assert [p for _c, p in got] == [p for _id, p in _expected_payloads(idb, "c")]


@pytest.mark.parametrize("mode", ["statement", "row"])
def test_rows_over_8000_bytes_are_hinted_like_any_other(idb, notes, mode):
    table = _table(idb, mode=mode)
    listen = notes("c")
    with idb.cursor() as cur:
        cur.execute(f"INSERT INTO {table} (b) VALUES (%s)", ("é" * 5000,))          # 10 kB
        cur.execute(f"INSERT INTO {table} (b) VALUES ('small'), (%s), ('small')", ("x" * 7900,))
    log = _log(idb, "c")
    got = listen.drain()
    assert [p for _c, p in got] == [p for _id, p in _expected_payloads(idb, "c")]
    hints = [json.loads(p) for _c, p in got]
    assert hints == [{"id": r[0], "xid": int(r[1])} for r in log]
    # The log keeps the whole rows.
    assert json.loads(log[0][5])["b"] == "é" * 5000


def _interleaved_small_statements(db):
    with db.cursor() as cur:
        cur.execute("""
            SELECT count(*) FROM (SELECT xid, min(id) AS lo, max(id) AS hi FROM pgnotify_sync.event_log
                                   WHERE channel = 'c' GROUP BY xid HAVING count(*) BETWEEN 2 AND 8) s
             WHERE EXISTS (SELECT 1 FROM pgnotify_sync.event_log l
                            WHERE l.channel = 'c' AND l.id BETWEEN s.lo AND s.hi AND l.xid <> s.xid)""")
        return cur.fetchone()[0]


def test_concurrent_small_statements_each_notify_exactly_their_rows(idb, notes, dsn):
    """2 to 8 rows are read back from the log by id range and xid: rows of other
    transactions that fall inside the range must not be announced."""
    table = _table(idb)
    listen = notes("c")
    stop = threading.Event()
    errors = []

    def writer(w):
        conn = psycopg2.connect(**dsn)
        conn.autocommit = True
        try:
            with conn.cursor() as cur:
                i = 0
                while not stop.is_set():
                    i += 1
                    rows = (1, 2, 5, 8, 9, 3)[i % 6]
                    cur.execute(f"INSERT INTO {table} (zeta_long_name, b) "
                                "SELECT %s, 'w' || g FROM generate_series(1, %s) g", (w, rows))
        except Exception as exc:           # noqa: BLE001 - reported below
            errors.append(exc)
        finally:
            conn.close()

    threads = [threading.Thread(target=writer, args=(w,)) for w in range(4)]
    for t in threads:
        t.start()
    try:
        # Write until the case under test happened often enough: small statements (2 to 8
        # rows) whose id range holds rows of another transaction.
        wait_for(lambda: errors or _interleaved_small_statements(idb) >= 10, timeout=90,
                 interval=0.05, message="writers made too few interleaved small statements")
    finally:
        stop.set()
        for t in threads:
            t.join(30)
    assert not errors
    assert not any(t.is_alive() for t in threads)
    expected = dict(_expected_payloads(idb, "c"))
    with idb.cursor() as cur:
        # autocommit writers: one statement per transaction
        cur.execute("SELECT coalesce(sum(CASE WHEN n <= 8 THEN n ELSE 1 END), 0), count(*) FILTER (WHERE n > 1) "
                    "FROM (SELECT count(*) AS n FROM pgnotify_sync.event_log WHERE channel = 'c' GROUP BY xid) s")
        count, multi = cur.fetchone()
    assert multi > 10
    got = listen.drain()
    assert len(got) == count
    log = {r[0]: r for r in _log(idb, "c")}
    seen = []
    for _channel, payload in got:
        body = json.loads(payload)
        if "first" in body:
            ids = [i for i in log if body["first"] <= i <= body["last"] and log[i][1] == body["xid"]]
            assert len(ids) == body["n"] > 8
            seen.extend(ids)
        else:
            assert payload == expected[body["id"]]
            seen.append(body["id"])
    assert sorted(seen) == sorted(log) and len(seen) == len(set(seen))


def test_install_converts_a_jsonb_log_and_stays_idempotent(idb, notes):
    """Logs of earlier versions had jsonb columns: install() converts them, rows kept."""
    table = _table(idb)
    with idb.cursor() as cur:
        cur.execute("ALTER TABLE pgnotify_sync.event_log ALTER COLUMN data TYPE jsonb USING data::jsonb, "
                    "ALTER COLUMN old TYPE jsonb USING old::jsonb")
        cur.execute(f"INSERT INTO {table} (zeta_long_name, b) VALUES (1, 'before')")
    install(idb)
    install(idb)
    listen = notes("c")
    with idb.cursor() as cur:
        cur.execute(f"INSERT INTO {table} (zeta_long_name, b) VALUES (2, 'after')")
        cur.execute("SELECT format_type(atttypid, atttypmod) FROM pg_attribute "
                    "WHERE attrelid = 'pgnotify_sync.event_log'::regclass AND attname IN ('data', 'old')")
        assert {r[0] for r in cur.fetchall()} == {"json"}
    log = _log(idb, "c")
    assert [json.loads(r[5])["b"] for r in log] == ["before", "after"]
    ((_c, payload),) = listen.drain()
    assert payload == dict(_expected_payloads(idb, "c"))[log[1][0]]


def test_triggers_also_work_on_a_jsonb_log(idb, notes):
    """Should a log still have jsonb columns, the capture functions work unchanged."""
    table = _table(idb)
    row_table = _table(idb, name="r", mode="row", channel="c")
    with idb.cursor() as cur:
        cur.execute("ALTER TABLE pgnotify_sync.event_log ALTER COLUMN data TYPE jsonb USING data::jsonb, "
                    "ALTER COLUMN old TYPE jsonb USING old::jsonb")
    listen = notes("c")
    with idb.cursor() as cur:
        cur.execute(f"INSERT INTO {table} (zeta_long_name, b) VALUES (1, 'one')")
        cur.execute(f"INSERT INTO {table} (zeta_long_name, b) SELECT g, 'x' FROM generate_series(1, 3) g")
        cur.execute(f"INSERT INTO {row_table} (zeta_long_name, b) VALUES (1, 'row')")
        cur.execute(f"UPDATE {row_table} SET b = 'row2'")
    got = listen.drain()
    assert len(got) == 6
    expected = dict(_expected_payloads(idb, "c"))
    for _c, payload in got:
        body = json.loads(payload)
        assert body == json.loads(expected[body["id"]])
    assert [json.loads(r[5])["b"] for r in _log(idb, "c")] == ["one", "x", "x", "x", "row", "row2"]
