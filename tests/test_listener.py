"""Core listener behaviour against a real PostgreSQL (started by the fixtures)."""

import decimal
import json
import threading
import time

import psycopg2
import pytest

from pgnotify_sync import (ConnectError, ConnectionState, DatabaseEvent, Listener, ListenerStateError, Operation,
                           install, uninstall, unwatch_table, watch_table)

from helpers import wait_for
from pgutil import Collector, config_for, counter


def test_insert_update_delete_carry_exact_fields(installed, make_listener):
    listener = make_listener()
    got = Collector()
    listener.on_event("messages", got)
    listener.start()
    assert listener.state is ConnectionState.LISTENING
    with installed.cursor() as cur:
        cur.execute("INSERT INTO messages (room, body, password_hash, n) VALUES ('r1', 'hello', 'SECRET', 1)")
        cur.execute("UPDATE messages SET body = 'edited' WHERE room = 'r1'")
        cur.execute("DELETE FROM messages WHERE room = 'r1'")
    ins, upd, dele = got.wait(3, settle=listener)
    assert ins.channel == "messages" and ins.operation == "INSERT" and ins.operation is Operation.INSERT
    assert (ins.schema, ins.table) == ("public", "messages")
    assert ins.data == {"id": 1, "room": "r1", "body": "hello", "n": 1}
    assert ins.old is None
    assert upd.operation == "UPDATE"
    assert upd.data == {"id": 1, "room": "r1", "body": "edited", "n": 1}
    assert upd.old == {"id": 1, "room": "r1", "body": "hello", "n": 1}
    assert dele.operation == "DELETE" and dele.data == upd.data and dele.old is None
    assert ins.id < upd.id < dele.id
    assert isinstance(ins, DatabaseEvent)


def test_excluded_columns_never_leave_the_database(installed, make_listener):
    listener = make_listener()
    got = Collector()
    listener.on_event("messages", got)
    listener.start()
    with installed.cursor() as cur:
        cur.execute("INSERT INTO messages (body, password_hash) VALUES ('x', 'TOPSECRET')")
        cur.execute("UPDATE messages SET password_hash = 'OTHER'")             # no event at all
        cur.execute("UPDATE messages SET password_hash = 'OTHERS', body = 'y'")
        cur.execute("SELECT count(*) FROM pgnotify_sync.event_log WHERE data::text LIKE '%%SECRET%%' "
                    "OR old::text LIKE '%%SECRET%%' OR data::text LIKE '%%OTHER%%'")
        assert cur.fetchone()[0] == 0
    events = got.wait(2, settle=listener)
    for event in events:
        assert "password_hash" not in event.data
        assert event.old is None or "password_hash" not in event.old


def test_misspelt_excluded_column_is_refused(installed):
    from pgnotify_sync import SchemaError
    with pytest.raises(SchemaError, match="passwrd_hash"):
        watch_table(installed, "public.messages", channel="messages", exclude_columns=("passwrd_hash",))


def test_huge_row_is_delivered_whole_and_the_writer_succeeds(installed, make_listener):
    listener = make_listener()
    got = Collector()
    listener.on_event("messages", got)
    listener.start()
    body = "é" * 50_000 + "end"    # 100 kB of UTF-8
    with installed.cursor() as cur:
        cur.execute("INSERT INTO messages (body) VALUES (%s) RETURNING id", (body,))
        row_id = cur.fetchone()[0]
        cur.execute("UPDATE messages SET room = 'big' WHERE id = %s", (row_id,))
    ins, upd = got.wait(2, settle=listener)
    assert ins.data["body"] == body and ins.operation == "INSERT"
    assert upd.data["body"] == body and upd.old["room"] is None and upd.data["room"] == "big"


def test_unicode_nulls_and_many_column_types(db, make_listener):
    install(db)
    with db.cursor() as cur:
        cur.execute("""CREATE TABLE "Odd ""Table"" Ü" (
            id bigserial PRIMARY KEY, t text, n numeric, f float8, b boolean, ts timestamptz,
            j jsonb, arr int[], by bytea, nothing text, u uuid)""")
    watch_table(db, 'public."Odd ""Table"" Ü"', channel='Chan "Q" Mixed Case')
    listener = make_listener(channels=('Chan "Q" Mixed Case',))
    got = Collector()
    listener.on_event('Chan "Q" Mixed Case', got)
    listener.start()
    with db.cursor() as cur:
        cur.execute("""INSERT INTO "Odd ""Table"" Ü" (t, n, f, b, ts, j, arr, by, nothing, u) VALUES
            ('日本語 🎉 \\ "quote" '' ', 12345678901234567890.5, 'NaN', true, '2026-01-02T03:04:05Z',
             '{"k": [1, null]}', '{1,2,NULL}', '\\x00ff', NULL, '6f1c8e52-8f4b-4d3a-9b1e-0c3f1f2a9d10')""")
        cur.execute("""INSERT INTO "Odd ""Table"" Ü" (f) VALUES ('Infinity')""")
    event, inf = got.wait(2, settle=listener)
    assert event.table == 'Odd "Table" Ü' and event.channel == 'Chan "Q" Mixed Case'
    d = event.data
    assert d["t"] == '日本語 🎉 \\ "quote" \' '
    assert d["nothing"] is None and d["b"] is True
    assert d["j"] == {"k": [1, None]} and d["arr"] == [1, 2, None]
    assert d["f"] == "NaN" and inf.data["f"] == "Infinity"
    assert d["n"] == decimal.Decimal("12345678901234567890.5")


def test_plain_payload_of_the_spec_example_trigger_is_accepted(installed, make_listener):
    listener = make_listener(accept_plain_payloads=True)
    got = Collector()
    listener.on_event("messages", got)
    listener.start()
    payload = json.dumps({"operation": "INSERT", "schema": "public", "table": "messages", "data": {"id": 7}})
    with installed.cursor() as cur:
        cur.execute("SELECT pg_notify('messages', %s)", (payload,))
    (event,) = got.wait(1, settle=listener)
    assert event.id is None and event.data == {"id": 7} and event.operation == "INSERT"


def test_malformed_payloads_are_reported_and_the_listener_carries_on(installed, make_listener):
    listener = make_listener(accept_plain_payloads=True)
    got = Collector()
    errors = []
    listener.on_event("messages", got)
    listener.signals.error.connect(lambda sender, **kw: errors.append(kw), weak=False)
    listener.start()
    with installed.cursor() as cur:
        cur.execute("NOTIFY messages, 'not json'")
        cur.execute("""NOTIFY messages, '{"operation": "EXPLODE", "schema": "s", "table": "t", "data": {}}'""")
        cur.execute("""NOTIFY messages, '[1, 2]'""")
        cur.execute("INSERT INTO messages (body) VALUES ('after')")
    (event,) = got.wait(1, settle=listener)
    assert event.data["body"] == "after"
    wait_for(lambda: len(errors) == 3)
    assert [e["kind"] for e in errors] == ["payload"] * 3
    assert "not JSON" in str(errors[0]["error"])
    assert "EXPLODE" in str(errors[1]["error"]) and "operation" in str(errors[1]["error"])
    assert listener.get_stats()["parse_errors"] == 3
    assert listener.state is ConnectionState.LISTENING


def test_raising_receiver_stops_neither_other_receivers_nor_later_events(installed, make_listener):
    listener = make_listener()
    got = Collector()
    seen_by_bad = []

    @listener.on_event("messages")
    def bad(event):
        seen_by_bad.append(event.id)
        raise RuntimeError("handler bug")

    listener.on_event("messages", got)
    errors = []
    listener.signals.error.connect(lambda sender, **kw: errors.append(kw["kind"]), weak=False)
    listener.start()
    with installed.cursor() as cur:
        for i in range(5):
            cur.execute("INSERT INTO messages (body) VALUES (%s)", (str(i),))
    got.wait(5)
    assert [e.data["body"] for e in got.events] == ["0", "1", "2", "3", "4"]
    wait_for(lambda: len(seen_by_bad) == 5 and errors.count("handler") == 5)


def test_blinker_signal_filtered_by_channel(db, make_listener):
    install(db)
    with db.cursor() as cur:
        cur.execute("CREATE TABLE a (id int); CREATE TABLE b (id int)")
    watch_table(db, "a", channel="chan_a")
    watch_table(db, "b", channel="chan_b")
    listener = make_listener(channels=("chan_a", "chan_b"))
    only_a, every = [], []
    listener.signals.event.connect(lambda sender, event: only_a.append((sender, event.table)), sender="chan_a",
                                   weak=False)
    listener.signals.event.connect(lambda sender, event: every.append((sender, event.table)), weak=False)
    listener.start()
    with db.cursor() as cur:
        cur.execute("INSERT INTO a VALUES (1); INSERT INTO b VALUES (2)")
        cur.execute("INSERT INTO b VALUES (3)")      # a barrier on chan_b
    # Events of a channel are delivered one at a time, in commit order: once the
    # barrier reached `every`, every receiver is done with the event before it.
    wait_for(lambda: ("chan_b", "b") in every and len(every) == 3)
    assert only_a == [("chan_a", "a")]
    assert sorted(every) == [("chan_a", "a"), ("chan_b", "b"), ("chan_b", "b")]


def test_per_channel_order_and_one_at_a_time_with_four_workers(db, make_listener):
    install(db)
    channels = [f"c{i}" for i in range(6)]
    with db.cursor() as cur:
        for c in channels:
            cur.execute(f"CREATE TABLE {c} (id serial, seq int)")
    for c in channels:
        watch_table(db, c, channel=c)
    listener = make_listener(channels=tuple(channels), worker_pool_size=4)
    seen = {c: [] for c in channels}
    active = {c: 0 for c in channels}
    overlap = []
    parallel = set()
    lock = threading.Lock()

    def handler(event):
        with lock:
            active[event.channel] += 1
            if active[event.channel] > 1:
                overlap.append(event.channel)
            busy = [c for c, n in active.items() if n]
            if len(busy) > 1:
                parallel.add(tuple(sorted(busy)))
        time.sleep(0.0005)  # a slow-ish handler so channels overlap in time
        with lock:
            seen[event.channel].append(event.data["seq"])
            active[event.channel] -= 1

    for c in channels:
        listener.on_event(c, handler)
    listener.start()
    per_channel = 300
    with db.cursor() as cur:
        for start in range(0, per_channel, 50):
            for c in channels:
                cur.execute(f"INSERT INTO {c} (seq) SELECT g FROM generate_series(%s, %s) g",
                            (start, start + 49))
    wait_for(lambda: all(len(v) == per_channel for v in seen.values()), timeout=30)
    for c in channels:
        assert seen[c] == list(range(per_channel)), c
    assert overlap == []
    assert parallel, "different channels never ran at the same time"


def test_burst_of_10000_events_all_delivered(installed, make_listener):
    listener = make_listener()
    got = Collector()
    listener.on_event("messages", got)
    listener.start()
    with installed.cursor() as cur:
        for _ in range(10):
            cur.execute("INSERT INTO messages (n) SELECT g FROM generate_series(1, 1000) g")
    events = got.wait(10_000, timeout=60, settle=listener)
    ids = [e.id for e in events]
    assert len(ids) == 10_000 and len(set(ids)) == 10_000
    assert ids == sorted(ids)


def test_stop_twice_leaves_no_thread_and_no_connection(installed, make_listener, admin_db, dbname):
    before = set(threading.enumerate())
    listener = make_listener(name="stoptest")
    listener.on_event("messages", lambda e: None)
    listener.start()
    listener.publish("messages", {"warm": "pool"})   # opens a pooled connection too
    threads = listener.threads()
    assert any(t.name == "stoptest-reader" for t in threads)
    assert any(t.name.startswith("stoptest-worker-") for t in threads)
    listener.stop()
    listener.stop()
    assert listener.state is ConnectionState.STOPPED
    assert not [t for t in threads if t.is_alive()]
    assert set(threading.enumerate()) - before == set()

    def backends():
        with admin_db.cursor() as cur:
            cur.execute("SELECT count(*) FROM pg_stat_activity WHERE datname = %s AND application_name = %s",
                        (dbname, "pgnotify_sync"))
            return cur.fetchone()[0]
    wait_for(lambda: backends() == 0, message="listener connections still open")
    with pytest.raises(ListenerStateError, match="a stopped listener cannot be started again"):
        listener.start()


def test_two_pooled_connections_are_open_before_the_first_event_needs_one(installed, make_listener, admin_db,
                                                                          dbname):
    """The first hinted read, and one while maintenance holds the other connection,
    must not open a connection on the delivery path (~10 ms: a handshake and
    authentication); a terminated one is replaced by the maintenance thread."""
    listener = make_listener(pool_max_connections=3)
    listener.on_event("messages", lambda e: None)
    listener.start()

    def pool_pids():
        """Our backends but the listener's, the first one: the pool is filled only
        once the listener is LISTENING."""
        with admin_db.cursor() as cur:
            cur.execute("SELECT pid FROM pg_stat_activity WHERE datname = %s AND application_name = %s "
                        "ORDER BY backend_start", (dbname, "pgnotify_sync"))
            return {r[0] for r in cur.fetchall()[1:]}
    first = wait_for(lambda: len(pool_pids()) == 2 and pool_pids(), message="two pooled connections open")
    assert len(first) == 2
    with admin_db.cursor() as cur:
        cur.execute("SELECT pg_terminate_backend(%s, 5000)", (min(first),))
    # Found dead when next used; refilled within one fill interval (5 s) after that.
    with installed.cursor() as cur:
        cur.execute("INSERT INTO messages (room, body) VALUES ('r', 'x')")
    wait_for(lambda: len(pool_pids()) == 2 and min(first) not in pool_pids(), timeout=10,
             message="the terminated pooled connection replaced")


def test_stop_from_a_handler(installed, make_listener):
    listener = make_listener(name="selfstop")
    done = threading.Event()

    @listener.on_event("messages")
    def handler(event):
        listener.stop()
        done.set()

    listener.start()
    with installed.cursor() as cur:
        cur.execute("INSERT INTO messages (body) VALUES ('stop')")
    wait_for(done.is_set)
    wait_for(lambda: not any(t.is_alive() for t in listener.threads()), message="threads still alive")
    assert listener.state is ConnectionState.STOPPED


def test_context_manager_starts_and_stops(installed, dsn):
    got = Collector()
    with Listener(config_for(dsn, channels=("messages",))) as listener:
        listener.on_event("messages", got)
        with installed.cursor() as cur:
            cur.execute("INSERT INTO messages (body) VALUES ('cm')")
        got.wait(1)
    assert listener.state is ConnectionState.STOPPED
    assert not any(t.is_alive() for t in listener.threads())


def test_disabled_events_start_does_nothing(installed, make_listener, caplog):
    listener = make_listener(enable_db_events=False)
    with caplog.at_level("INFO", logger="pgnotify_sync"):
        listener.start()
    assert "disabled" in caplog.text
    assert listener.state is ConnectionState.STOPPED and listener.threads() == []


def test_wrong_password_fails_start_at_once_without_leaking_it(installed, dsn, make_listener, caplog):
    listener = make_listener(postgres_password="wrong-Pa55word", max_reconnect_attempts=0)
    retries = counter(listener.signals.reconnecting)
    failed = counter(listener.signals.failed)
    with pytest.raises(ConnectError, match="password authentication failed") as info:
        listener.start(timeout_s=20)
    # Not retried: no reconnecting signal, one attempt, one failed signal (sent
    # after start() is woken: counted once the reader thread has ended).
    wait_for(lambda: not listener._reader.is_alive(), message="reader still running")
    assert retries == [] and listener.stats["reconnect_attempts"] == 0
    assert len(failed) == 1 and failed[0]["error"] is info.value
    assert "wrong-Pa55word" not in str(info.value) and "wrong-Pa55word" not in caplog.text
    assert "wrong-Pa55word" not in repr(listener) and "wrong-Pa55word" not in repr(listener.config)
    assert listener.state is ConnectionState.FAILED


def test_unreachable_server_gives_up_after_max_attempts(dsn, make_listener):
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]       # nothing listens there once closed
    listener = make_listener(postgres_port=port, max_reconnect_attempts=3)
    attempts = []
    listener.signals.reconnecting.connect(lambda sender, **kw: attempts.append(kw["attempt"]), weak=False)
    failed = counter(listener.signals.failed)
    with pytest.raises(ConnectError, match="gave up after 3 attempts"):
        listener.start(timeout_s=30)
    wait_for(lambda: not listener._reader.is_alive(), message="reader still running")
    assert attempts == [2, 3]    # the attempt about to be made
    assert listener.stats["reconnect_attempts"] == 3 and len(failed) == 1
    assert listener.state is ConnectionState.FAILED


def test_install_and_uninstall_are_idempotent(db):
    install(db)
    install(db)
    with db.cursor() as cur:
        cur.execute("CREATE TABLE t (id int)")
    watch_table(db, "t", channel="c")
    watch_table(db, "t", channel="c2")    # replaces
    with db.cursor() as cur:
        cur.execute("SELECT count(*) FROM pg_trigger WHERE tgrelid = 't'::regclass AND NOT tgisinternal")
        assert cur.fetchone()[0] == 3          # statement mode: insert, delete, and update per row
        cur.execute("SELECT channel, mode FROM pgnotify_sync.watched_tables")
        assert cur.fetchall() == [("c2", "statement")]
    assert watch_table(db, "t", channel="c2", mode="row") == "row"
    with db.cursor() as cur:
        cur.execute("SELECT count(*) FROM pg_trigger WHERE tgrelid = 't'::regclass AND NOT tgisinternal")
        assert cur.fetchone()[0] == 1
    unwatch_table(db, "t")
    unwatch_table(db, "t")
    watch_table(db, "t", channel="c")
    uninstall(db)
    uninstall(db)
    with db.cursor() as cur:
        cur.execute("SELECT count(*) FROM pg_trigger WHERE tgrelid = 't'::regclass AND NOT tgisinternal")
        assert cur.fetchone()[0] == 0
        cur.execute("SELECT count(*) FROM pg_namespace WHERE nspname = 'pgnotify_sync'")
        assert cur.fetchone()[0] == 0
        cur.execute("INSERT INTO t VALUES (1)")   # the table still works
    install(db)


def test_install_sql_works_with_psql(pg_cluster, dbname):
    import os
    import subprocess
    from pgnotify_sync.testing import find_pg_bindir
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PGPASSWORD=pg_cluster.password)
    for name in ("install.sql", "install.sql", "rollback.sql", "rollback.sql"):
        subprocess.run([os.path.join(find_pg_bindir(), "psql"), "-X", "-q", "-1", "-v", "ON_ERROR_STOP=1",
                        "-h", pg_cluster.host, "-p", str(pg_cluster.port), "-U", pg_cluster.user, "-d", dbname,
                        "-f", os.path.join(root, "sql", name)], check=True, env=env, capture_output=True)


def test_writer_without_privileges_on_our_schema_still_succeeds(installed, make_listener):
    with installed.cursor() as cur:
        cur.execute("CREATE ROLE app_writer LOGIN PASSWORD 'w'; GRANT ALL ON messages TO app_writer; "
                    "GRANT USAGE ON SEQUENCE messages_id_seq TO app_writer")
    listener = make_listener()
    got = Collector()
    listener.on_event("messages", got)
    listener.start()
    try:
        params = installed.get_dsn_parameters()
        with psycopg2.connect(host=params["host"], port=params["port"], dbname=params["dbname"],
                              user="app_writer", password="w") as writer:
            with writer.cursor() as cur:
                cur.execute("INSERT INTO messages (body) VALUES ('from app_writer')")
        writer.close()
        (event,) = got.wait(1, settle=listener)
        assert event.data["body"] == "from app_writer"
    finally:
        with installed.cursor() as cur:
            cur.execute("DROP OWNED BY app_writer; DROP ROLE app_writer")


def test_publish_reaches_listeners_with_a_log_id(installed, make_listener):
    listener = make_listener(channels=("app",))
    got = Collector()
    listener.on_event("app", got)
    listener.start()
    ident = listener.publish("app", {"hello": "world", "n": [1, 2]})
    (event,) = got.wait(1, settle=listener)
    assert event.id == ident and event.operation == "PUBLISH" and event.data == {"hello": "world", "n": [1, 2]}


def test_channel_prefix_is_applied_on_the_wire(db, make_listener):
    install(db)
    with db.cursor() as cur:
        cur.execute("CREATE TABLE t (id int)")
    watch_table(db, "t", channel="messages", channel_prefix="app1")
    other = make_listener(channels=("messages",))          # no prefix: must not see app1's events
    mine = make_listener(channels=("messages",), channel_prefix="app1")
    got_other, got_mine = Collector(), Collector()
    other.on_event("messages", got_other)
    mine.on_event("messages", got_mine)
    other.start()
    mine.start()
    with db.cursor() as cur:
        cur.execute("INSERT INTO t VALUES (1)")
        cur.execute("SELECT channel FROM pgnotify_sync.event_log")
        assert cur.fetchall() == [("app1.messages",)]
    (event,) = got_mine.wait(1)
    assert event.channel == "messages"
    mine.publish("messages", {"x": 1})
    got_mine.wait(2)
    # A barrier: an unprefixed event, committed after app1's, that `other` does get.
    # One connection receives in commit order and a channel delivers in order, so
    # anything of app1's that reached `other` would be delivered before it.
    other.publish("messages", {"barrier": True})
    (barrier,) = got_other.wait(1)
    assert barrier.data == {"barrier": True}
    assert [e.data for e in got_mine.events] == [{"id": 1}, {"x": 1}]


@pytest.mark.parametrize("mode", ["statement", "row"])
def test_both_capture_modes_deliver_the_same_events(db, make_listener, mode):
    install(db)
    with db.cursor() as cur:
        cur.execute("CREATE TABLE m (id serial PRIMARY KEY, v int, secret text)")
    assert watch_table(db, "m", channel="m", exclude_columns=("secret",), mode=mode) == mode
    listener = make_listener(channels=("m",))
    got = Collector()
    listener.on_event("m", got)
    listener.start()
    with db.cursor() as cur:
        cur.execute("INSERT INTO m (v, secret) VALUES (1, 's')")                              # one row
        cur.execute("INSERT INTO m (v, secret) SELECT g, 's' FROM generate_series(2, 6) g")   # few rows
        cur.execute("INSERT INTO m (v, secret) SELECT g, 's' FROM generate_series(7, 506) g")  # many rows
        cur.execute("UPDATE m SET v = -v WHERE v <= 3")
        cur.execute("DELETE FROM m WHERE v > 500")
        cur.execute("INSERT INTO m (v) SELECT 1 WHERE false")                                 # no row: no event
    events = got.wait(506 + 3 + 6)
    listener.publish("m", {"end": True})
    got.wait(516)
    assert len(got) == 516
    inserts = [e for e in events if e.operation == "INSERT"]
    assert [e.data["v"] for e in inserts] == list(range(1, 507))
    assert all("secret" not in e.data for e in events)
    updates = [e for e in events if e.operation == "UPDATE"]
    assert [(e.old["v"], e.data["v"]) for e in updates] == [(1, -1), (2, -2), (3, -3)]
    deletes = [e for e in events if e.operation == "DELETE"]
    assert sorted(e.data["v"] for e in deletes) == list(range(501, 507))
    ids = [e.id for e in events]
    assert ids == sorted(ids) and len(set(ids)) == len(ids)


def test_partitions_fall_back_to_row_mode(db, make_listener):
    install(db)
    with db.cursor() as cur:
        cur.execute("CREATE TABLE p (id int, k int) PARTITION BY RANGE (k); "
                    "CREATE TABLE p1 PARTITION OF p FOR VALUES FROM (0) TO (100)")
    assert watch_table(db, "p1", channel="p") == "row"
    listener = make_listener(channels=("p",))
    got = Collector()
    listener.on_event("p", got)
    listener.start()
    with db.cursor() as cur:
        cur.execute("INSERT INTO p SELECT g, g FROM generate_series(1, 20) g")
    assert [e.data["k"] for e in got.wait(20)] == list(range(1, 21))


def test_database_without_the_schema_plain_payloads_only(db, make_listener, caplog):
    from pgnotify_sync import SchemaError
    listener = make_listener(channels=("legacy",), accept_plain_payloads=True)
    got = Collector()
    listener.on_event("legacy", got)
    with caplog.at_level("WARNING", logger="pgnotify_sync"):
        listener.start()
    assert "not installed" in caplog.text
    payload = json.dumps({"operation": "DELETE", "schema": "public", "table": "t", "data": {"id": 1}})
    barrier = json.dumps({"operation": "INSERT", "schema": "public", "table": "t", "data": {"id": 2}})
    with db.cursor() as cur:
        cur.execute("SELECT pg_notify('legacy', %s)", (payload,))
        cur.execute("SELECT pg_notify('legacy', %s)", (barrier,))
    event, after = got.wait(2)
    assert event.operation == "DELETE" and event.id is None and event.data == {"id": 1}
    assert after.data == {"id": 2}          # nothing else (no duplicate) came between them
    assert len(got) == 2
    # A hint (forged: no log here) names nothing and sends the channel into no fall-back loop.
    last = json.dumps({"operation": "INSERT", "schema": "public", "table": "t", "data": {"id": 3}})
    with db.cursor() as cur:
        cur.execute("SELECT pg_notify('legacy', %s)", ('{"id": 5, "xid": 1000000000000}',))
        cur.execute("SELECT pg_notify('legacy', %s)", (last,))
    got.wait(3)
    wait_for(lambda: listener.get_stats()["unmatched_hints"] == 1)
    assert listener.get_stats().get("errors_catchup", 0) == 0 and not listener._channels["legacy"].overflow
    durable = make_listener(channels=("legacy",), consumer="needs-a-log")
    with pytest.raises(SchemaError, match="not installed"):
        durable.start()


def test_disconnected_is_sent_on_stop(installed, make_listener):
    listener = make_listener()
    listener.on_event("messages", lambda e: None)
    seen = []
    listener.signals.disconnected.connect(lambda sender, **kw: seen.append(kw.get("error")), weak=False)
    listener.start()
    listener.stop()
    assert seen == [None] and listener.closed


def test_a_big_statement_under_a_stalled_handler_stays_within_the_buffer(installed, make_listener):
    """event_buffer_size=200 and a 30,000-row statement while the handler is stalled:
    what the listener reports as held (queued items, the statement's pages, pages
    read ahead) stays within the buffer plus one page, and the statement still
    streams live, page by page, without a catch-up."""
    listener = make_listener(event_buffer_size=200)
    page = 200 // 8
    gate = threading.Event()
    got, held = [], []

    @listener.on_event("messages")
    def slow(event):
        gate.wait(30)
        got.append(event.id)
        held.append(listener.health()["queue_size"])
    listener.start()
    with installed.cursor() as cur:
        cur.execute("INSERT INTO messages (body) SELECT 'x' FROM generate_series(1, 30000)")
    wait_for(lambda: listener.health()["queue_size"] > 0, message="the statement was not queued")
    # sampled while the handler is stalled and reads ahead run (or would)
    stalled = []
    deadline = time.monotonic() + 1.0
    while time.monotonic() < deadline:
        stalled.append(listener.health()["queue_size"])
        gate.wait(0.01)
    gate.set()
    wait_for(lambda: len(got) == 30000, timeout=60, message="not every row was delivered")
    with installed.cursor() as cur:
        cur.execute("SELECT id FROM pgnotify_sync.event_log WHERE channel = 'messages' ORDER BY id")
        assert got == [r[0] for r in cur.fetchall()]
    assert max(stalled) <= 200 + page, max(stalled)
    assert max(held) <= 200 + page, max(held)
    stats = listener.get_stats()
    assert stats["dropped_to_log"] == 0 and stats["caught_up"] == 0
    assert listener.health()["queue_capacity"] == 200
