"""Reliability under user code that misbehaves, frozen paths and large or odd data.

Each test reproduces one defect of issue 11 against a real server and fails on the
code before its fix (the note of that issue says how each was seen failing).
"""

import sys
import threading
import uuid

import psycopg2
import pytest

from pgnotify_sync import ConnectionState, Listener, ListenerStateError, install, watch_table

from helpers import wait_for
from pgutil import Collector, config_for, counter


def _insert(db, table, n=1, note="x"):
    with db.cursor() as cur:
        cur.execute(f"INSERT INTO {table} (note) SELECT %s FROM generate_series(1, %s)", (note, n))


def _marker(db, got, table="stream"):
    """Write one more row and wait for its event: whatever came before it has come."""
    with db.cursor() as cur:
        cur.execute(f"INSERT INTO {table} (note) VALUES ('END') RETURNING id")
        row = cur.fetchone()[0]
    wait_for(lambda: any(e.data and e.data.get("id") == row and e.data.get("note") == "END"
                         for e in list(got.events)), timeout=20, message="the end marker did not arrive")


def _logged(db, channel="stream"):
    with db.cursor() as cur:
        cur.execute("SELECT id FROM pgnotify_sync.event_log WHERE channel = %s ORDER BY id", (channel,))
        return [r[0] for r in cur.fetchall()]


# -- user code is isolated ---------------------------------------------------------------


def test_lifecycle_receivers_that_raise_do_not_kill_the_listener(stream_db, make_listener, pg_cluster, dbname):
    listener = make_listener(channels=("stream",), name="raising")
    got = Collector()
    listener.on_event("stream", got)
    errors = counter(listener.signals.error)

    def bad_connected(sender, **kw):
        raise RuntimeError("connected receiver bug")

    def bad_disconnected(sender, **kw):
        raise SystemExit(3)

    def bad_reconnecting(sender, **kw):
        raise ValueError("reconnecting receiver bug")

    for signal, receiver in ((listener.signals.connected, bad_connected),
                             (listener.signals.disconnected, bad_disconnected),
                             (listener.signals.reconnecting, bad_reconnecting)):
        signal.connect(receiver, weak=False)
    connected = counter(listener.signals.connected)
    lost = counter(listener.signals.disconnected)
    reconnecting = counter(listener.signals.reconnecting)
    listener.start()
    _insert(stream_db, "stream")
    got.wait(1)
    for kill in range(2):
        before = listener.stats["reconnects"]
        assert pg_cluster.terminate_backends(dbname, application_name="pgnotify_sync") >= 1
        wait_for(lambda: listener.stats["reconnects"] > before and listener.state is ConnectionState.LISTENING,
                 timeout=15, message=f"no reconnect after kill {kill + 1}")
        _insert(stream_db, "stream", note=f"after kill {kill + 1}")
    _marker(stream_db, got)
    assert sorted(got.ids()) == _logged(stream_db)
    assert len(got.ids()) == len(set(got.ids()))
    assert listener.stats["reconnects"] == 2
    wait_for(lambda: len(connected) == 3, timeout=10)
    assert len(lost) == 2 and len(reconnecting) >= 2     # a reconnect attempt may fail and be retried
    # 3 connected, 2 disconnected and every reconnecting: each receiver call raised, each counted and reported
    wait_for(lambda: listener.stats["receiver_errors"] == 3 + 2 + len(reconnecting), timeout=10,
             message=f"receiver errors {listener.stats['receiver_errors']}, signals sent {3 + 2 + len(reconnecting)}")
    reported = [e["error"] for e in errors if e["kind"] == "receiver"]
    assert len(reported) == listener.stats["receiver_errors"]
    assert {type(e) for e in reported} == {RuntimeError, SystemExit, ValueError}


def test_stop_from_an_error_receiver_on_the_overflow_path(stream_db, make_listener, db):
    # Payloads without a log id that do not fit in the buffer are reported (kind
    # "overflow") from the reader thread while it queues them: a receiver that calls
    # stop() there must not deadlock on the dispatcher's lock.
    listener = make_listener(channels=("plain",), name="stopper", event_buffer_size=2, worker_pool_size=1,
                             accept_plain_payloads=True)
    gate = threading.Event()
    listener.on_event("plain", lambda e: gate.wait(10))
    stopped = threading.Event()

    def on_error(sender, kind, **kw):
        if kind == "overflow":
            sender.stop(timeout=2.0)
            stopped.set()

    listener.signals.error.connect(on_error, weak=False)
    listener.start()
    with db.cursor() as cur:
        cur.execute("BEGIN")
        for i in range(10):     # no log id: these cannot be re-read, so dropping them is reported
            cur.execute("SELECT pg_notify('plain', %s)",
                        (f'{{"operation": "INSERT", "schema": "s", "table": "t", "data": {{"n": {i}}}}}',))
        cur.execute("COMMIT")
    try:
        wait_for(stopped.is_set, timeout=10, message="stop() from the error receiver did not return (deadlock)")
    finally:
        gate.set()
    wait_for(lambda: not any(t.is_alive() for t in listener.threads()), timeout=10,
             message="threads still running after stop()")
    assert listener.state is ConnectionState.STOPPED


def test_handler_raising_systemexit_or_baseexception_stops_nothing(stream_db, make_listener):
    listener = make_listener(channels=("stream",), name="sysexit", worker_pool_size=1)
    got = Collector()
    raised = []

    class Custom(BaseException):
        pass

    def handler(event):
        if event.data["note"] == "exit":
            raised.append(event.id)
            raise SystemExit(1)
        if event.data["note"] == "base":
            raised.append(event.id)
            raise Custom()
        got(event)

    listener.on_event("stream", handler)
    errors = counter(listener.signals.error)
    listener.start()
    _insert(stream_db, "stream", note="exit")
    _insert(stream_db, "stream", 3, note="base")
    _insert(stream_db, "stream", 12, note="after")
    _marker(stream_db, got)
    assert len(raised) == 4
    assert [e.data["note"] for e in got.events] == ["after"] * 12 + ["END"]
    assert listener.stats["handler_errors"] == 4
    assert [e["kind"] for e in errors].count("handler") == 4
    assert all(t.is_alive() for t in listener.threads())


# -- frozen paths ---------------------------------------------------------------------------


def test_frozen_path_old_backend_ended_and_queue_drains(row_stream_db, make_listener, admin_db, proxy):
    # The pooled connections that read the rows are frozen too: the catch-up gets
    # fresh ones once the pool's deadline (query_timeout_s) cut them.
    listener = make_listener(channels=("stream",), postgres_port=proxy.port, name="frozenq",
                             health_check_interval_s=1.0, health_check_timeout_s=1.0, query_timeout_s=3)
    got = Collector()
    listener.on_event("stream", got)
    lost = counter(listener.signals.disconnected)
    listener.start()
    _insert(row_stream_db, "stream")
    got.wait(1)
    assert listener.get_stats().get("stale_backends_ended", 0) == 0
    proxy.freeze()
    # Notifications of ~1 kB rows, several MB: the frozen backend's socket fills and
    # it stops reading the queue, so it holds the tail for the whole cluster.
    note = "n" * 1000
    for _ in range(30):
        _insert(row_stream_db, "stream", 1000, note=note)
    wait_for(lambda: lost, timeout=15, message="the frozen path was never noticed")
    wait_for(lambda: listener.state is ConnectionState.LISTENING, timeout=15)
    _marker(row_stream_db, got)
    ids = got.ids()
    assert len(ids) == len(set(ids))
    assert sorted(ids) == _logged(row_stream_db)
    with admin_db.cursor() as cur:
        def drained():
            cur.execute("SELECT pg_notification_queue_usage()")
            return cur.fetchone()[0] == 0
        wait_for(drained, timeout=15, message="the notification queue stays held")
    assert listener.stats["stale_backends_ended"] == 1
    assert len(lost) == 1 and listener.stats["reconnects"] == 1


def test_pooled_query_on_a_frozen_path_has_a_deadline(stream_db, make_listener, proxy):
    listener = make_listener(channels=("stream",), postgres_port=proxy.port, name="frozenpool",
                             query_timeout_s=1.0, health_check_interval_s=30.0, health_check_timeout_s=30.0)
    got = Collector()
    listener.on_event("stream", got)
    listener.start()
    assert listener.publish("stream", {"warm": 1}) is not None     # a pooled connection exists
    proxy.freeze()          # every connection so far: listener's and pool's
    result = {}

    def publish():
        try:
            result["id"] = listener.publish("stream", {"during": "freeze"})
        except BaseException as exc:   # reported to the test below
            result["error"] = exc

    t = threading.Thread(target=publish, daemon=True)
    t.start()
    t.join(15)
    assert not t.is_alive(), "publish() hangs on a frozen pooled connection"
    assert "error" not in result, result.get("error")
    with stream_db.cursor() as cur:
        cur.execute("SELECT count(*) FROM pgnotify_sync.event_log WHERE data->>'during' = 'freeze'")
        assert cur.fetchone()[0] == 1          # redone on a fresh connection, once
    assert listener._connections.pool.timeouts == 1
    proxy.thaw()
    listener.stop(timeout=5)
    assert not any(t.is_alive() for t in listener.threads())


# -- odd data -------------------------------------------------------------------------------


def test_deeply_nested_json_is_delivered_live_and_in_catch_up(db, make_listener):
    install(db)
    with db.cursor() as cur:
        cur.execute("CREATE TABLE docs (id serial PRIMARY KEY, doc json, note text)")
    watch_table(db, "public.docs", channel="docs")
    deep = "[" * 3000 + '"core"' + "]" * 3000          # under 8000 bytes: sent inline
    got = Collector()
    listener = make_listener(channels=("docs",), consumer="deep", name="deep1")
    listener.on_event("docs", got)
    errors = counter(listener.signals.error)
    listener.start()
    with db.cursor() as cur:
        cur.execute("INSERT INTO docs (doc, note) VALUES (%s, 'live')", (deep,))
    got.wait(1)
    listener.stop()
    with db.cursor() as cur:
        cur.execute("INSERT INTO docs (doc, note) VALUES (%s, 'while away')", (deep,))
    again = Collector()
    second = make_listener(channels=("docs",), consumer="deep", name="deep2")
    second.on_event("docs", again)
    second.start()
    again.wait(1)
    for event in got.events + again.events:
        value, depth = event.data["doc"], 0
        while isinstance(value, list):
            value, depth = value[0], depth + 1
        assert (depth, value) == (3000, "core")
    assert [e.data["note"] for e in got.events + again.events] == ["live", "while away"]
    assert not [e for e in errors if e["kind"] in ("payload", "catchup", "internal")]


# -- durable consumers --------------------------------------------------------------------


def test_checkpoint_every_is_counted_per_channel(db, dsn, make_listener):
    # Channel a delivers one 100-row statement in one batch, slowly; channel b a
    # stream of single events, each a batch of its own (each stored after its batch).
    # a's position must be stored every 10 of *its* events whatever b does.
    install(db)
    with db.cursor() as cur:
        cur.execute("CREATE TABLE ta (id serial PRIMARY KEY, note text)")
        cur.execute("CREATE TABLE tb (id serial PRIMARY KEY, note text)")
    watch_table(db, "public.ta", channel="a")
    watch_table(db, "public.tb", channel="b")
    listener = Listener(config_for(dsn, channels=("a", "b"), worker_pool_size=2), consumer="perch", name="perch",
                        checkpoint_every=10, registry=False)
    make_listener.listeners.append(listener)        # stopped at teardown
    seen_b = []
    b_moved = threading.Condition()
    stop_at = threading.Event()
    a_count = [0]

    def on_a(event):
        a_count[0] += 1
        if a_count[0] == 45:
            stop_at.set()
            release.wait(20)
            return
        # Let b deliver one event between each two of a's (interleaving for real).
        with db_writer_lock:
            with writer.cursor() as cur:
                cur.execute("INSERT INTO tb (note) VALUES ('b')")
        with b_moved:
            b_moved.wait_for(lambda: len(seen_b) >= a_count[0], timeout=10)

    def on_b(event):
        with b_moved:
            seen_b.append(event.id)
            b_moved.notify_all()

    release = threading.Event()
    db_writer_lock = threading.Lock()
    writer = psycopg2.connect(**dsn)
    writer.autocommit = True
    listener.on_event("a", on_a)
    listener.on_event("b", on_b)
    listener.start()
    try:
        with db.cursor() as cur:
            cur.execute("INSERT INTO ta (note) SELECT 'a' FROM generate_series(1, 100)")
        wait_for(stop_at.is_set, timeout=30, message="channel a did not reach its 45th event")
        with db.cursor() as cur:
            # a's events the stored state of channel a counts as handled
            cur.execute("SELECT count(*) FROM pgnotify_sync.event_log l, pgnotify_sync.consumers c "
                        "WHERE c.name = 'perch' AND c.channel = 'a' AND l.channel = 'a' "
                        "AND (pg_visible_in_snapshot(l.xid, c.position) "
                        "     OR pgnotify_sync.consumer_handled(c.handled, l.id, l.xid))")
            stored = cur.fetchone()[0]
        # 44 delivered: stored at 10, 20, 30, 40 -> a crash now repeats at most 10
        assert stored == 40
    finally:
        release.set()
        writer.close()


def test_counters_do_not_lose_counts_across_threads():
    from pgnotify_sync._counters import Counters
    counters = Counters(n=0)
    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        threads = [threading.Thread(target=lambda: [counters.inc("n") for _ in range(20_000)]) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        sys.setswitchinterval(old)
    assert counters["n"] == 80_000


def test_delivered_counter_matches_every_channel(db, make_listener):
    install(db)
    channels = [f"c{i}" for i in range(6)]
    with db.cursor() as cur:
        for ch in channels:
            cur.execute(f"CREATE TABLE {ch} (id serial PRIMARY KEY, note text)")
            watch_table(db, f"public.{ch}", channel=ch, mode="row")
    listener = make_listener(channels=tuple(channels), name="counts", worker_pool_size=4)
    got = Collector()
    for ch in channels:
        listener.on_event(ch, got)
    listener.start()
    with db.cursor() as cur:
        for _ in range(5):
            for ch in channels:
                cur.execute(f"INSERT INTO {ch} (note) SELECT 'x' FROM generate_series(1, 200)")
    got.wait(6000, timeout=60)
    wait_for(lambda: listener.stats["delivered"] >= 6000, timeout=10)
    assert listener.stats["delivered"] == len(got) == 6000
    assert listener.get_stats()["delivered"] == 6000


# -- publish --------------------------------------------------------------------------------


def test_publish_buffer_flushed_at_stop_without_duplicates_and_refused_after(stream_db, make_listener, proxy):
    listener = make_listener(channels=("stream",), postgres_port=proxy.port, name="pubbuf",
                             enable_event_buffering=True, connect_timeout_s=1.0)
    listener.start()
    assert listener.publish("stream", {"n": 0}) is not None
    proxy.cut()             # every connection closed, new ones refused
    assert listener.publish("stream", {"n": 1}) is None           # tried once, then buffered
    tried = proxy.accepted
    for n in range(2, 6):
        assert listener.publish("stream", {"n": n}) is None       # buffered at once: no new attempt
    assert proxy.accepted == tried
    assert listener.get_stats()["publish_buffered"] == 5
    proxy.restore()
    listener.stop(timeout=10)
    with stream_db.cursor() as cur:
        cur.execute("SELECT (data->>'n')::int FROM pgnotify_sync.event_log WHERE channel = 'stream' ORDER BY id")
        assert [r[0] for r in cur.fetchall()] == [0, 1, 2, 3, 4, 5]
    assert listener.stats["publish_dropped"] == 0
    with pytest.raises(ListenerStateError):
        listener.publish("stream", {"n": 6})


def test_publish_buffer_that_cannot_be_sent_at_stop_is_reported(stream_db, make_listener, proxy):
    listener = make_listener(channels=("stream",), postgres_port=proxy.port, name="pubdrop",
                             enable_event_buffering=True, connect_timeout_s=1.0)
    errors = counter(listener.signals.error)
    listener.start()
    proxy.cut()
    for n in range(3):
        assert listener.publish("stream", {"n": n}) is None
    listener.stop(timeout=1.5)
    assert listener.stats["publish_dropped"] == 3
    assert [e for e in errors if e["kind"] == "publish" and "3 buffered publishes" in str(e["error"])]


def test_publish_with_the_same_key_is_logged_once(stream_db):
    key = str(uuid.uuid4())
    with stream_db.cursor() as cur:
        cur.execute("SELECT pgnotify_sync.publish('stream', '{\"n\": 1}', %s)", (key,))
        first = cur.fetchone()[0]
        cur.execute("SELECT pgnotify_sync.publish('stream', '{\"n\": 1}', %s)", (key,))
        assert cur.fetchone()[0] == first
        cur.execute("SELECT count(*) FROM pgnotify_sync.event_log WHERE publish_key = %s", (key,))
        assert cur.fetchone()[0] == 1


# -- retention ------------------------------------------------------------------------------


def test_retention_trims_a_large_backlog_in_batches_and_counts_only_unhandled(stream_db, make_listener):
    with stream_db.cursor() as cur:
        cur.execute("INSERT INTO stream (note) SELECT 'old' FROM generate_series(1, 25000)")
        cur.execute("UPDATE pgnotify_sync.event_log SET created_at = now() - interval '3 days'")
        cur.execute("SELECT min(id), max(id), min(xid)::text FROM pgnotify_sync.event_log")
        low, high, xid = cur.fetchone()
        # A consumer positioned before the backlog that handled its first 100 rows
        # (kept as id ranges beyond its position).
        cur.execute("INSERT INTO pgnotify_sync.consumers (name, channel, position, handled) "
                    "VALUES ('c', 'stream', %s::pg_snapshot, %s::jsonb)",
                    (f"{xid}:{xid}:", f'{{"ranges": [[{low}, {low + 99}]]}}'))
    listener = make_listener(channels=("stream",), name="trimmer", retention_s=3600.0,
                             consumer_retention_s=7200.0, cleanup_interval_s=0, query_timeout_s=5.0)
    assert listener.cleanup() == 25000
    with stream_db.cursor() as cur:
        cur.execute("SELECT count(*) FROM pgnotify_sync.event_log")
        assert cur.fetchone()[0] == 0
        cur.execute("SELECT lost FROM pgnotify_sync.consumers WHERE name = 'c'")
        assert cur.fetchone()[0] == 25000 - 100


# -- health ---------------------------------------------------------------------------------


def test_health_reports_state_queue_reconnects_and_lag(stream_db, make_listener, pg_cluster, dbname):
    listener = make_listener(channels=("stream",), name="health", health_check_interval_s=0.5,
                             event_buffer_size=777)
    got = Collector()
    listener.on_event("stream", got)
    assert listener.health()["state"] == "STOPPED" and listener.health()["ok"] is False
    listener.start()
    _insert(stream_db, "stream", 3)
    got.wait(3)
    wait_for(lambda: listener.health()["channels"]["stream"]["lag"] == 0, timeout=10)
    health = listener.health()
    assert health["ok"] is True and health["state"] == "LISTENING"
    assert health["queue_capacity"] == 777 and health["queue_size"] == 0
    assert health["reconnects"] == 0 and health["last_error"] is None
    assert health["connected_since"] is not None and health["last_event_at"] >= health["connected_since"]
    assert health["channels"]["stream"]["delivered"] == 3
    pg_cluster.terminate_backends(dbname, application_name="pgnotify_sync")
    wait_for(lambda: listener.health()["reconnects"] == 1 and listener.health()["ok"], timeout=15)


# -- pages bounded by bytes -------------------------------------------------------------------


@pytest.mark.timeout(300)
def test_statement_of_wide_rows_past_1_gb_is_delivered_in_pages(db, make_listener):
    # One statement of 4,800 rows of 230 kB: 1.1 GB of row text, over PostgreSQL's
    # 1 GB limit for one text value if the range were read as one page.
    install(db)
    with db.cursor() as cur:
        cur.execute("CREATE TABLE wide (id serial PRIMARY KEY, body text)")
    watch_table(db, "public.wide", channel="wide")
    got = []
    listener = make_listener(channels=("wide",), name="wide", query_timeout_s=120.0)
    listener.on_event("wide", lambda e: got.append((e.id, e.data["id"], len(e.data["body"]))))
    errors = counter(listener.signals.error)
    listener.start()
    with db.cursor() as cur:
        cur.execute("INSERT INTO wide (body) SELECT repeat(chr(97 + i % 26), 230000) FROM generate_series(1, 4800) i")
    wait_for(lambda: len(got) >= 4800 or errors, timeout=240, message=f"delivered {len(got)} of 4800")
    assert not errors, errors[0]
    assert [ident for ident, _, _ in got] == _logged(db, "wide")
    assert [row for _, row, _ in got] == list(range(1, 4801))
    assert {size for _, _, size in got} == {230000}


def test_catch_up_pages_bounded_by_bytes_deliver_every_row_once(db, make_listener, monkeypatch):
    import pgnotify_sync._eventlog as eventlog
    install(db)
    with db.cursor() as cur:
        cur.execute("CREATE TABLE wide (id serial PRIMARY KEY, body text, note text)")
    watch_table(db, "public.wide", channel="wide")
    monkeypatch.setattr(eventlog, "PAGE_BYTES", 50_000)      # ~24 rows of 2 kB a page
    pages = []
    read_rows = eventlog.EventLog._read

    def counting(self, channel, sql_text, params):
        result = read_rows(self, channel, sql_text, params)
        pages.append((sql_text is eventlog._CATCHUP_SQL, len(result[0]), result[1]))
        return result

    monkeypatch.setattr(eventlog.EventLog, "_read", counting)
    first = make_listener(channels=("wide",), consumer="pages", name="pages1")
    first.start()
    first.stop()
    with db.cursor() as cur:
        for _ in range(3):
            cur.execute("INSERT INTO wide (body) SELECT repeat('w', 2000) FROM generate_series(1, 100)")
    got = Collector()
    second = make_listener(channels=("wide",), consumer="pages", name="pages2")
    second.on_event("wide", got)
    second.start()
    got.wait(300)
    _marker(db, got, table="wide")
    ids = got.ids()
    assert ids == sorted(ids) and len(ids) == len(set(ids))
    assert ids == _logged(db, "wide")
    catchup_pages = [p for p in pages if p[0]]
    assert len(catchup_pages) >= 12 and max(n for _, n, _ in catchup_pages) <= 30
    assert sum(n for _, n, _ in catchup_pages) == 300        # every row read in exactly one page
    full = [cut for _, n, cut in catchup_pages if n]
    assert all(full[:-1])          # every page but the last was cut by its byte bound
