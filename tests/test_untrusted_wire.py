"""The wire is untrusted (issue 12).

LISTEN and NOTIFY need no privilege: any role that can connect may send and read
notifications on any channel. So notifications carry hints only ({id, xid} for a
row, {xid, first, last, n} for a statement), never row values; every event handed
to a handler is read from the event log (channel and xid checked); plain payloads
without a log id are refused unless ``Config(accept_plain_payloads=True)``; the
health-check marker cannot be forged; a transaction written with
``SET pgnotify_sync.notify = off`` (no notification at all) is still delivered,
found by the position moves, which are checked against the log.

The attacker is ``mallory``, a LOGIN role with no privilege but CONNECT (through
PUBLIC), over 127.0.0.1. Forged notifications carry the log ids about to be used
(read from the log's identity sequence) and the exact (id, xid) of a transaction
still open, so a listener that trusted them would deliver a fake or drop the
real event later. "Nothing fake arrived" is checked after an end marker (a real
logged event published after the forgeries) was delivered: every delivered event
must then be a row of the channel's log, field for field, each delivered once,
and every row logged since the listener started must have been delivered.
"""

import json
import re
import secrets
import threading
import uuid

import psycopg2
import psycopg2.errors
import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from psycopg2 import sql

from pgnotify_sync import Config, ConfigError, install, watch_table
from pgnotify_sync.events import loads
from pgnotify_sync.testing import TemporaryCluster

from helpers import wait_for
from pgutil import Collector, ListenerFactory, counter, execute, publish_end_marker

MALLORY = "mallory"
MALLORY_PASSWORD = "x"
# In row values only: it must never appear on the wire.
SECRET = "s3cr3t-" + uuid.uuid4().hex[:12]
# What a notification may be (issue 12, 1.).
HINT_KEYS = ({"id", "xid"}, {"xid", "first", "last", "n"})
# Short health-check interval for the tests that wait for position moves.
INTERVAL = 0.5


# -- fixtures ---------------------------------------------------------------------

def _make_tables(conn):
    install(conn)
    with conn.cursor() as cur:
        cur.execute("CREATE TABLE messages (id serial PRIMARY KEY, body text, n integer)")
        cur.execute("CREATE TABLE other (id serial PRIMARY KEY, body text)")
    watch_table(conn, "public.messages", channel="messages")
    watch_table(conn, "public.other", channel="other")
    return conn


@pytest.fixture
def wire_db(db):
    """pgnotify_sync installed; ``messages`` watched on channel "messages", ``other``
    on channel "other" (statement mode: the default)."""
    return _make_tables(db)


class Mallory:
    """The unprivileged role: sends and listens on any channel, nothing else."""

    def __init__(self, cluster, dbname):
        self.kwargs = dict(host="127.0.0.1", port=cluster.port, user=MALLORY, password=MALLORY_PASSWORD,
                           dbname=dbname)
        self._conns = []
        self._sender = None

    def connect(self):
        conn = psycopg2.connect(**self.kwargs)
        conn.autocommit = True
        self._conns.append(conn)
        return conn

    def notify(self, channel, *payloads):
        """One notification per payload (a dict is sent as JSON), each committed on
        its own (so none is merged with an equal one)."""
        if self._sender is None:
            self._sender = self.connect()
        with self._sender.cursor() as cur:
            for payload in payloads:
                text = payload if isinstance(payload, str) else json.dumps(payload)
                cur.execute("SELECT pg_notify(%s, %s)", (channel, text))

    def listen(self, channel):
        return Spy(self.connect(), channel)

    def close(self):
        for conn in self._conns:
            try:
                conn.close()
            except Exception:
                pass


class Spy:
    """A plain psycopg2 LISTEN connection collecting every payload of *channel*."""

    def __init__(self, conn, channel):
        self.conn = conn
        self.payloads = []
        with conn.cursor() as cur:
            cur.execute(sql.SQL("LISTEN {}").format(sql.Identifier(channel)))

    def drain(self):
        self.conn.poll()
        while self.conn.notifies:
            self.payloads.append(self.conn.notifies.pop(0).payload)
        return self.payloads

    def wait_for_id(self, ident, timeout=10.0):
        wait_for(lambda: any(mentions(p, ident) for p in self.drain()), timeout=timeout,
                 message=f"no notification naming log id {ident} reached the LISTENer")


@pytest.fixture
def mallory(pg_cluster, dbname, admin_db):
    with admin_db.cursor() as cur:
        cur.execute(f"DROP ROLE IF EXISTS {MALLORY}")
        cur.execute(f"CREATE ROLE {MALLORY} LOGIN PASSWORD %s", (MALLORY_PASSWORD,))
    m = Mallory(pg_cluster, dbname)
    try:
        yield m
    finally:
        m.close()
        with admin_db.cursor() as cur:     # roles are cluster-wide
            cur.execute(f"DROP ROLE IF EXISTS {MALLORY}")


# -- helpers ----------------------------------------------------------------------

def mentions(payload, ident):
    """Does notification *payload* name log id *ident* (as an id or in a range)?"""
    try:
        obj = json.loads(payload)
    except ValueError:
        return False
    if not isinstance(obj, dict):
        return False
    if obj.get("id") == ident:
        return True
    first, last = obj.get("first"), obj.get("last")
    return isinstance(first, int) and isinstance(last, int) and first <= ident <= last


def next_log_id(conn):
    """The id the next event-log row will get."""
    (seq,) = execute(conn, "SELECT pg_get_serial_sequence('pgnotify_sync.event_log', 'id')")[0]
    last_value, is_called = execute(conn, sql.SQL("SELECT last_value, is_called FROM {}").format(
        sql.Identifier(*seq.split("."))))[0]
    return last_value + 1 if is_called else last_value


def current_xid(conn):
    return execute(conn, "SELECT pg_current_xact_id()::text::bigint")[0][0]


def log_rows(cluster, dbname, channel):
    """{id: (xid, operation, schema, table, data, old)} of *channel*'s log rows."""
    conn = cluster.connect(dbname)
    try:
        rows = execute(conn, "SELECT id, xid::text::bigint, operation, schema_name, table_name, data::text, "
                             "old::text FROM pgnotify_sync.event_log WHERE channel = %s ORDER BY id", (channel,))
    finally:
        conn.close()
    return {r[0]: (r[1], r[2], r[3], r[4], None if r[5] is None else loads(r[5]),
                   None if r[6] is None else loads(r[6])) for r in rows}


def log_ids(cluster, dbname, body_like, channel="messages"):
    """Log ids of *channel*'s rows whose ``body`` is LIKE *body_like* (log ids are
    not the table's ids: an UPDATE or DELETE takes a log id too)."""
    conn = cluster.connect(dbname)
    try:
        rows = execute(conn, "SELECT id FROM pgnotify_sync.event_log WHERE channel = %s AND data->>'body' LIKE %s "
                             "ORDER BY id", (channel, body_like))
    finally:
        conn.close()
    return [r[0] for r in rows]


def _fields(event):
    return (event.xid, str(event.operation), event.schema, event.table, event.data, event.old)


def verify_against_log(cluster, dbname, got, channel, since_id, earlier=(), timeout=10.0):
    """Publish an end marker on *channel*, wait for *got* to deliver it, then check
    (forgeries first, so that is what a failure names): every delivered event is a
    row of the channel's log, field for field (xid, operation, schema, table, data,
    old), delivered once; every row logged from *since_id* on was delivered
    (*earlier*: events delivered before by another listener of the same consumer);
    nothing came after the marker. Returns the delivered events."""
    marker = publish_end_marker(cluster, dbname, channel)
    late = None
    try:
        wait_for(lambda: marker in got.ids(), timeout=timeout,
                 message=f"the end marker {marker} on {channel!r} was not delivered")
    except AssertionError as exc:
        late = str(exc)
    rows = log_rows(cluster, dbname, channel)
    events = list(earlier) + list(got.events)
    fakes = [e for e in events if e.id not in rows or _fields(e) != rows[e.id] or e.channel != channel]
    assert not fakes, (f"{len(fakes)} delivered events on {channel!r} are not rows of its event log "
                       f"(forged on the wire): {fakes[:5]}")
    assert late is None, late
    ids = [e.id for e in events]
    twice = sorted({i for i in ids if ids.count(i) > 1})
    assert not twice, f"events delivered more than once: {twice[:10]}"
    expected = sorted(i for i in rows if i >= since_id)
    assert sorted(ids) == expected, (f"logged but never delivered: {sorted(set(expected) - set(ids))[:10]}; "
                                     f"delivered though logged before the start: "
                                     f"{sorted(set(ids) - set(expected))[:10]}")
    assert got.ids()[-1] == marker, "events delivered after the end marker"
    return events


def forgeries(ids, xids, table="messages", schema="public"):
    """Everything a forger may send naming *ids* (about to be used) with *xids*:
    full events in the old payload format (with made-up row values), bare hints,
    refs, statement ranges (also with n bigger than the span), and a plain payload."""
    out = []
    for i in ids:
        for x in xids:
            out.append({"id": i, "xid": x, "operation": "INSERT", "schema": schema, "table": table,
                        "data": {"id": 900000 + i, "body": f"FAKE-{i}", "n": -1}, "old": None})
            out.append({"id": i, "xid": x, "operation": "UPDATE", "schema": schema, "table": table,
                        "data": {"id": 1, "body": f"FAKE-new-{i}", "n": -1},
                        "old": {"id": 1, "body": f"FAKE-old-{i}", "n": -1}})
            out.append({"id": i, "xid": x})
            out.append({"id": i, "xid": x, "ref": True})
            out.append({"xid": x, "first": i, "last": i + 2, "n": 3})
            out.append({"xid": x, "first": i, "last": i, "n": 50})          # n bigger than the span
        out.append({"id": i, "ref": True})                                   # no xid at all
        out.append({"id": i, "operation": "DELETE", "schema": schema, "table": table,
                    "data": {"id": 1, "body": "FAKE-no-xid"}, "old": None})
    out.append({"operation": "INSERT", "schema": schema, "table": table, "data": {"body": "FAKE-plain"}})
    return out


def xids_ahead(conn):
    """Transaction ids a forger would try: the next few, and some far ahead."""
    now = current_xid(conn)
    return [now + k for k in (1, 2, 3, 5, 20, 1000, 10**6)]


def insert(conn, body, n=None):
    return execute(conn, "INSERT INTO messages (body, n) VALUES (%s, %s) RETURNING id", (body, n))[0][0]


def real_writes(conn, tag):
    """27 events on "messages": single rows, an UPDATE, a 3-row and a 20-row
    statement, a DELETE."""
    a = insert(conn, f"{tag}-1", 1)
    insert(conn, f"{tag}-2", 2)
    execute(conn, "UPDATE messages SET body = %s WHERE id = %s", (f"{tag}-1-edited", a))
    execute(conn, "INSERT INTO messages (body, n) SELECT %s || g, g FROM generate_series(1, 3) g", (f"{tag}-few-",))
    execute(conn, "DELETE FROM messages WHERE id = %s", (a,))
    execute(conn, "INSERT INTO messages (body, n) SELECT %s || g, g FROM generate_series(1, 20) g",
            (f"{tag}-many-",))
    return 27


def forge_open_transaction(cluster, dbname, mallory, channel="messages"):
    """A writer transaction left open after its INSERT, and mallory forging every
    kind of notification with its exact log id and xid (which a forger can guess:
    ids and xids are handed out in order). Returns the open connection: commit it."""
    writer = cluster.connect(dbname, autocommit=False)
    with writer.cursor() as cur:
        cur.execute("SELECT pg_current_xact_id()::text::bigint")
        xid = cur.fetchone()[0]
        cur.execute("INSERT INTO messages (body, n) VALUES ('open-then-committed', 7)")
        cur.execute("SELECT id FROM pgnotify_sync.event_log WHERE xid = pg_current_xact_id()")
        (ident,) = cur.fetchone()
    mallory.notify(channel, *forgeries([ident], [xid]))
    return writer


def health_channel(listener, conn):
    """The listener's marker channel: ``listener._reader.health_channel`` (issue 12),
    else today's ``pgnotify_sync.hc.<pid of the listener connection>``."""
    channel = getattr(listener._reader, "health_channel", None)
    if channel is not None:
        return channel
    rows = execute(conn, "SELECT pid FROM pg_stat_activity WHERE application_name = %s "
                         "AND (query LIKE 'LISTEN %%' OR query LIKE 'SELECT pg_current_snapshot()::text, %%')",
                   (listener.config.application_name,))
    assert len(rows) == 1, f"cannot tell the listener connection: {rows}"
    return f"pgnotify_sync.hc.{rows[0][0]}"


def health_checks(listener):
    return listener.get_stats().get("health_checks", 0)


def started(make_listener, channel="messages", **overrides):
    listener = make_listener(channels=(channel,), **overrides)
    got = Collector()
    listener.on_event(channel, got)
    listener.start()
    return listener, got


# -- forged notifications deliver nothing ------------------------------------------------

def test_mallory_is_unprivileged_and_cannot_touch_the_log(wire_db, mallory):
    """The premise of every other test here (holds today): mallory may only connect,
    LISTEN and NOTIFY; she can neither read nor write the log, nor publish()."""
    conn = mallory.connect()
    assert execute(conn, "SELECT rolsuper FROM pg_roles WHERE rolname = current_user") == [(False,)]
    for statement in ("SELECT count(*) FROM pgnotify_sync.event_log",
                      "INSERT INTO pgnotify_sync.event_log (channel, operation, schema_name, table_name) "
                      "VALUES ('messages', 'INSERT', 'public', 'messages')",
                      "SELECT pgnotify_sync.publish('messages', '{}'::jsonb)",
                      "INSERT INTO messages (body) VALUES ('x')"):
        with pytest.raises(psycopg2.errors.InsufficientPrivilege):
            execute(conn, statement)
    execute(conn, "LISTEN messages")
    execute(conn, "SELECT pg_notify('messages', 'anything')")


def test_forged_events_hints_refs_and_ranges_deliver_nothing_and_real_events_arrive_once(
        wire_db, mallory, make_listener, pg_cluster, dbname):
    listener, got = started(make_listener)
    since = next_log_id(wire_db)
    # The ids the real writes below will take, with plausible and far xids ...
    mallory.notify("messages", *forgeries(range(since + 1, since + 28), xids_ahead(wire_db)))
    # ... and the exact (id, xid) of a transaction still open.
    writer = forge_open_transaction(pg_cluster, dbname, mallory)
    writer.commit()
    writer.close()
    real_writes(wire_db, "real")
    # Replays of real events (their true ids and xids, made-up values) after the fact.
    rows = log_rows(pg_cluster, dbname, "messages")
    for ident, (xid, *_rest) in rows.items():
        mallory.notify("messages", *forgeries([ident], [xid, xid + 1]))
    verify_against_log(pg_cluster, dbname, got, "messages", since)


def test_durable_consumer_gets_no_forgery_and_loses_nothing_across_a_restart(
        wire_db, mallory, make_listener, pg_cluster, dbname):
    first, got = started(make_listener, consumer="c")
    since = next_log_id(wire_db)
    mallory.notify("messages", *forgeries(range(since + 1, since + 28), xids_ahead(wire_db)))
    writer = forge_open_transaction(pg_cluster, dbname, mallory)
    writer.commit()
    writer.close()
    real_writes(wire_db, "before-stop")
    verify_against_log(pg_cluster, dbname, got, "messages", since)
    first.stop()

    # Written while no process runs: the restarted consumer reads them from the log.
    insert(wire_db, "while-stopped-1")
    insert(wire_db, "while-stopped-2")
    second, got2 = started(make_listener, consumer="c")
    upcoming = next_log_id(wire_db)
    mallory.notify("messages", *forgeries(range(upcoming, upcoming + 28), xids_ahead(wire_db)))
    writer = forge_open_transaction(pg_cluster, dbname, mallory)
    writer.commit()
    writer.close()
    real_writes(wire_db, "after-restart")
    verify_against_log(pg_cluster, dbname, got2, "messages", since, earlier=got.events)


def test_forged_ref_or_hint_naming_another_channels_event_delivers_nothing(
        wire_db, mallory, make_listener, pg_cluster, dbname):
    # A long interval: the position does not move past the other channel's
    # transaction, so only the channel check can refuse the true-xid forgeries.
    listener = make_listener(channels=("messages", "other"), health_check_interval_s=30.0,
                             health_check_timeout_s=5.0)
    got, other = Collector(), Collector()
    listener.on_event("messages", got)
    listener.on_event("other", other)
    listener.start()
    since = next_log_id(wire_db)
    execute(wire_db, "INSERT INTO other (body) VALUES (%s)", (SECRET,))
    (real,) = other.wait(1)
    assert real.data["body"] == SECRET
    ident, xid = real.id, real.xid
    assert log_ids(pg_cluster, dbname, SECRET, channel="other") == [ident]
    mallory.notify("messages",
                   {"id": ident, "xid": xid, "ref": True}, {"id": ident, "xid": xid},
                   {"xid": xid, "first": ident, "last": ident, "n": 1},
                   {"xid": xid, "first": ident - 5, "last": ident + 5, "n": 11},
                   {"id": ident, "ref": True}, {"id": ident, "xid": xid + 10**6, "ref": True},
                   {"id": ident, "xid": xid + 10**6})
    events = verify_against_log(pg_cluster, dbname, got, "messages", since)
    assert all(e.id != ident and SECRET not in json.dumps(e.data) for e in events)
    verify_against_log(pg_cluster, dbname, other, "other", since)


# -- nothing of a row on the wire ----------------------------------------------------------

def test_an_unprivileged_listener_receives_no_row_value(wire_db, mallory, make_listener, pg_cluster, dbname):
    # Every capture path on one channel: statement mode (messages), row mode
    # (rowtab) and a partitioned parent (ptab).
    execute(wire_db, "CREATE TABLE rowtab (id serial PRIMARY KEY, body text)")
    execute(wire_db, "CREATE TABLE ptab (id int, body text) PARTITION BY RANGE (id)")
    execute(wire_db, "CREATE TABLE ptab_low PARTITION OF ptab FOR VALUES FROM (0) TO (100)")
    execute(wire_db, "CREATE TABLE ptab_high PARTITION OF ptab FOR VALUES FROM (100) TO (200)")
    watch_table(wire_db, "public.rowtab", channel="messages", mode="row")
    watch_table(wire_db, "public.ptab", channel="messages")
    listener, got = started(make_listener)
    since = next_log_id(wire_db)
    spy = mallory.listen("messages")
    a = insert(wire_db, f"{SECRET}-insert", 1)
    execute(wire_db, "UPDATE messages SET body = %s WHERE id = %s", (f"{SECRET}-update", a))   # old and new
    execute(wire_db, "DELETE FROM messages WHERE id = %s", (a,))
    execute(wire_db, "INSERT INTO messages (body, n) SELECT %s || g, g FROM generate_series(1, 3) g",
            (f"{SECRET}-few-",))
    execute(wire_db, "INSERT INTO messages (body, n) SELECT %s || g, g FROM generate_series(1, 500) g",
            (f"{SECRET}-many-",))
    execute(wire_db, "INSERT INTO rowtab (body) VALUES (%s)", (f"{SECRET}-row",))
    execute(wire_db, "UPDATE rowtab SET body = %s", (f"{SECRET}-row-update",))
    execute(wire_db, "DELETE FROM rowtab")
    execute(wire_db, "INSERT INTO ptab VALUES (1, %s), (150, %s)", (f"{SECRET}-p1", f"{SECRET}-p150"))
    execute(wire_db, "UPDATE ptab SET id = 2, body = %s WHERE id = 1", (f"{SECRET}-p2",))
    execute(wire_db, "UPDATE ptab SET id = 101 WHERE id = 2")        # moves: DELETE + INSERT
    listener.publish("messages", {"secret": SECRET})
    events = verify_against_log(pg_cluster, dbname, got, "messages", since)
    # The handler still gets the whole rows, read from the log.
    assert sum(SECRET in json.dumps(e.data) for e in events) == (1 + 1 + 1 + 3 + 500) + 3 + (2 + 1 + 2) + 1
    assert events[1].old["body"] == f"{SECRET}-insert"
    spy.wait_for_id(events[-1].id)      # the end marker: every notification before it is in
    leaked = [p for p in spy.payloads if SECRET in p]
    assert not leaked, f"{len(leaked)} of {len(spy.payloads)} notifications carry row values: {leaked[0][:300]}"
    for payload in spy.payloads:
        obj = json.loads(payload)
        assert isinstance(obj, dict) and set(obj) in HINT_KEYS, f"not a hint: {payload[:300]}"


# -- plain payloads ------------------------------------------------------------------------

PLAIN = json.dumps({"operation": "INSERT", "schema": "public", "table": "messages", "data": {"id": 7, "body": "plain"}})


def test_plain_payload_is_refused_by_default_and_counted(wire_db, make_listener, pg_cluster, dbname):
    listener, got = started(make_listener)
    errors = counter(listener.signals.error)
    since = next_log_id(wire_db)
    execute(wire_db, "SELECT pg_notify('messages', %s)", (PLAIN,))      # a foreign trigger's payload
    insert(wire_db, "real")
    verify_against_log(pg_cluster, dbname, got, "messages", since)
    wait_for(lambda: listener.stats.get("errors_payload", 0) >= 1 and any(e["kind"] == "payload" for e in errors),
             timeout=5, message="the refused plain payload was not reported as a payload error")


def test_plain_payload_is_accepted_with_accept_plain_payloads(wire_db, make_listener):
    # New setting: a TypeError from Config until it exists.
    listener, got = started(make_listener, accept_plain_payloads=True)
    execute(wire_db, "SELECT pg_notify('messages', %s)", (PLAIN,))
    row = insert(wire_db, "real")
    plain, real = got.wait(2, settle=listener)
    assert plain.id is None and plain.data == {"id": 7, "body": "plain"} and plain.operation == "INSERT"
    assert real.id is not None and real.data == {"id": row, "body": "real", "n": None}


def test_accept_plain_payloads_setting_and_its_environment_variable():
    base = {"postgres_user": "u", "postgres_db": "d"}
    assert Config(**base).accept_plain_payloads is False
    assert Config(**base, accept_plain_payloads=True).accept_plain_payloads is True
    env = {"POSTGRES_USER": "u", "POSTGRES_DB": "d"}
    assert Config.from_env(environ=env).accept_plain_payloads is False
    assert Config.from_env(environ={**env, "PG_NOTIFY_ACCEPT_PLAIN": "true"}).accept_plain_payloads is True
    assert Config.from_env(environ={**env, "PG_NOTIFY_ACCEPT_PLAIN": "0"}).accept_plain_payloads is False
    with pytest.raises(ConfigError, match="PG_NOTIFY_ACCEPT_PLAIN"):
        Config.from_env(environ={**env, "PG_NOTIFY_ACCEPT_PLAIN": "maybe"})


# -- transactions without a notification ---------------------------------------------------

def test_a_transaction_without_notification_is_delivered_within_a_few_intervals(
        wire_db, mallory, make_listener, pg_cluster, dbname):
    listener, got = started(make_listener, health_check_interval_s=INTERVAL)
    since = next_log_id(wire_db)
    spy = mallory.listen("messages")
    insert(wire_db, "loud-1")
    local = pg_cluster.connect(dbname, autocommit=False)
    with local.cursor() as cur:
        cur.execute("SET LOCAL pgnotify_sync.notify = off")
        cur.execute("INSERT INTO messages (body) VALUES ('silent-local')")
    local.commit()
    session = pg_cluster.connect(dbname, autocommit=True)
    execute(session, "SET pgnotify_sync.notify = off")
    rows = execute(session, "INSERT INTO messages (body) SELECT 'silent-session-' || g "
                            "FROM generate_series(1, 3) g RETURNING id")
    execute(session, "UPDATE messages SET body = 'silent-update' WHERE id = %s", (rows[1][0],))   # row capture
    insert(wire_db, "loud-2")
    silent = log_ids(pg_cluster, dbname, "silent-%")
    assert len(silent) == 5
    (loud,) = log_ids(pg_cluster, dbname, "loud-2")
    spy.wait_for_id(loud)       # committed after the silent ones: their notifications would be in
    notified = [p for p in spy.payloads if any(mentions(p, i) for i in silent)]
    assert not notified, f"notified despite pgnotify_sync.notify = off: {notified}"
    wait_for(lambda: set(silent) <= set(got.ids()), timeout=6 * INTERVAL + 1,
             message="events of transactions without a notification were not delivered within a few "
                     f"health-check intervals ({INTERVAL} s)")
    # One more silent transaction delivered means one more position move since:
    # the first ones must not come again.
    execute(session, "INSERT INTO messages (body) VALUES ('silent-last')")
    (last,) = log_ids(pg_cluster, dbname, "silent-last")
    wait_for(lambda: last in got.ids(), timeout=6 * INTERVAL + 1, message="the last silent event did not come")
    session.close()
    local.close()
    verify_against_log(pg_cluster, dbname, got, "messages", since)


@pytest.mark.integration        # a private server: the session cluster has no prepared transactions
def test_two_phase_commit_writers_with_notify_off_are_delivered():
    with TemporaryCluster(settings={"max_prepared_transactions": 10}) as cluster:
        dbname = "twophase"
        cluster.create_database(dbname)
        admin = cluster.connect(dbname)
        _make_tables(admin)
        execute(admin, "CREATE ROLE batch_writer LOGIN PASSWORD 'w'")
        execute(admin, "GRANT INSERT ON messages TO batch_writer")
        execute(admin, "GRANT USAGE ON SEQUENCE messages_id_seq TO batch_writer")
        execute(admin, "ALTER ROLE batch_writer SET pgnotify_sync.notify = off")
        factory = ListenerFactory(cluster.conninfo(dbname))
        try:
            listener, got = started(factory, health_check_interval_s=INTERVAL)
            since = next_log_id(admin)
            spy = Spy(cluster.connect(dbname), "messages")
            local = cluster.connect(dbname)
            session = cluster.connect(dbname)
            execute(session, "SET pgnotify_sync.notify = off")
            role = psycopg2.connect(**{**cluster.conninfo(dbname), "user": "batch_writer", "password": "w"})
            role.autocommit = True
            writers = [(local, "a", "SET LOCAL pgnotify_sync.notify = off"), (session, "b", None),
                       (role, "c", None)]
            for conn, gid, setting in writers:
                execute(conn, "BEGIN")
                if setting:
                    execute(conn, setting)
                execute(conn, "INSERT INTO messages (body) SELECT %s || g FROM generate_series(1, %s) g",
                        (f"2pc-{gid}-", {"a": 1, "b": 3, "c": 12}[gid]))
                try:
                    execute(conn, f"PREPARE TRANSACTION '{gid}'")
                except psycopg2.errors.FeatureNotSupported as exc:
                    pytest.fail(f"PREPARE TRANSACTION refused: the capture triggers NOTIFY although "
                                f"pgnotify_sync.notify = off ({str(exc).strip()})")
            # A notified event while they are prepared comes at once.
            insert(admin, "loud")
            (loud,) = log_ids(cluster, dbname, "loud")
            wait_for(lambda: loud in got.ids(), timeout=5, message="the notified event did not come")
            for _conn, gid, _setting in writers:
                execute(admin, f"COMMIT PREPARED '{gid}'")
            rows = log_rows(cluster, dbname, "messages")
            prepared = [i for i, r in rows.items() if r[4]["body"].startswith("2pc-")]
            assert len(prepared) == 16
            wait_for(lambda: set(prepared) <= set(got.ids()), timeout=6 * INTERVAL + 1,
                     message="events of committed prepared transactions were not delivered within a few "
                             f"health-check intervals ({INTERVAL} s)")
            execute(session, "INSERT INTO messages (body) VALUES ('silent-last')")
            (last,) = log_ids(cluster, dbname, "silent-last")
            wait_for(lambda: last in got.ids(), timeout=6 * INTERVAL + 1, message="the last silent event did not come")
            verify_against_log(cluster, dbname, got, "messages", since)
            assert not [p for p in spy.drain() if any(mentions(p, i) for i in prepared)]
            for conn in (local, session, role, spy.conn, admin):
                conn.close()
        finally:
            factory.stop_all()


# -- the health check ----------------------------------------------------------------------

def test_health_check_channel_is_not_derived_from_the_backend_pid(wire_db, make_listener):
    tag = uuid.uuid4().hex[:8]
    one, _ = started(make_listener, application_name=f"wire-a-{tag}")
    two, _ = started(make_listener, application_name=f"wire-b-{tag}")
    channels = [getattr(listener._reader, "health_channel", None) for listener in (one, two)]
    assert None not in channels, "Listener._reader.health_channel (the current marker channel) is not there"
    assert channels[0] != channels[1]
    for listener, channel in zip((one, two), channels):
        pids = [r[0] for r in execute(wire_db, "SELECT pid FROM pg_stat_activity WHERE application_name = %s",
                                      (listener.config.application_name,))]
        # Random (128 bits), not a pid: a substring check would fail by chance now and then.
        assert pids and re.fullmatch(r"pgnotify_sync\.hc\.[0-9a-f]{32}", channel), channel
        assert not any(channel == f"pgnotify_sync.hc.{pid}" for pid in pids), f"{channel!r} names a backend pid"


def test_forged_health_check_markers_move_nothing(wire_db, mallory, make_listener, pg_cluster, dbname):
    listener, got = started(make_listener, health_check_interval_s=0.3,
                            application_name=f"wire-hc-{uuid.uuid4().hex[:8]}")
    since = next_log_id(wire_db)
    channel = health_channel(listener, wire_db)
    tokens = [str(i) for i in range(1, 51)] + [secrets.token_hex(8) for _ in range(20)] + ["", "0", "null", "{}"]
    writer = pg_cluster.connect(dbname, autocommit=False)
    execute(writer, "INSERT INTO messages (body) VALUES ('held-open')")
    stop = threading.Event()
    failures = []

    def forge():
        try:
            while not stop.is_set():
                mallory.notify(channel, *tokens)
        except Exception as exc:  # reported by the test
            failures.append(exc)

    forger = threading.Thread(target=forge, daemon=True)
    forger.start()
    try:
        n = health_checks(listener)
        wait_for(lambda: health_checks(listener) >= n + 3, timeout=10, message="no health checks while forging")
        writer.commit()
        n = health_checks(listener)
        wait_for(lambda: health_checks(listener) >= n + 3, timeout=10, message="no health checks after the commit")
    finally:
        stop.set()
        forger.join(10)
        writer.close()
    assert not failures, failures
    events = verify_against_log(pg_cluster, dbname, got, "messages", since)
    assert [e.data["body"] for e in events[:1]] == ["held-open"]


# -- forged ranges and labels --------------------------------------------------------------

def test_huge_forged_ranges_do_not_keep_the_channel_in_overflow(wire_db, mallory, make_listener, pg_cluster, dbname):
    listener, got = started(make_listener, health_check_interval_s=INTERVAL)
    since = next_log_id(wire_db)
    execute(wire_db, "INSERT INTO messages (body) SELECT 'first-' || g FROM generate_series(1, 20) g")
    wait_for(lambda: len(got) == 20, timeout=10)
    real_xid = got.events[0].xid
    ahead = current_xid(wire_db) + 5
    nxt = next_log_id(wire_db)
    huge = [{"xid": ahead, "first": nxt, "last": nxt + 2, "n": 2**62},
            {"xid": ahead, "first": 1, "last": 10**12, "n": 10**12},
            {"xid": ahead + 1, "first": 10**12, "last": 2 * 10**12, "n": 10**12},
            {"xid": real_xid, "first": 1, "last": 10**12, "n": 2**62},
            {"xid": real_xid, "first": 1, "last": 10**12, "n": 5},
            {"xid": ahead, "first": nxt, "last": nxt + 2**27 - 1, "n": 2**27},    # n = span, both huge
            {"xid": real_xid, "first": 1, "last": 2**27, "n": 2**27},
            {"xid": ahead, "first": 2**63, "last": 2**64, "n": 1},              # beyond bigint
            {"xid": 2**64, "first": nxt, "last": nxt, "n": 1}]
    for _ in range(3):
        mallory.notify("messages", *huge)
    insert(wire_db, "after-the-flood")
    (ident,) = log_ids(pg_cluster, dbname, "after-the-flood")
    wait_for(lambda: ident in got.ids(), timeout=5, message="a real event after huge forged ranges did not come")
    wait_for(lambda: not listener.health()["channels"]["messages"]["falling_back"], timeout=5,
             message="the channel stays in overflow after huge forged ranges")
    mallory.notify("messages", *huge)
    insert(wire_db, "after-the-second-flood")
    (ident,) = log_ids(pg_cluster, dbname, "after-the-second-flood")
    wait_for(lambda: ident in got.ids(), timeout=5, message="a real event after more forged ranges did not come")
    events = verify_against_log(pg_cluster, dbname, got, "messages", since)
    assert listener.get_stats()["delivered"] == len(events)


def test_made_up_table_names_create_no_metric_series(wire_db, mallory, make_listener, pg_cluster, dbname):
    registry = CollectorRegistry()
    listener, got = started(make_listener, registry=registry)
    since = next_log_id(wire_db)
    tag = "evil" + uuid.uuid4().hex[:8]
    mallory.notify("messages", *forgeries(range(since, since + 3), xids_ahead(wire_db),
                                          table=f"{tag}_table", schema=f"{tag}_schema"))
    mallory.notify("messages", {"id": since, "xid": current_xid(wire_db) + 3, "table": f"{tag}_t2",
                                "schema": f"{tag}_s2"})
    execute(wire_db, "INSERT INTO messages (body) SELECT 'real-' || g FROM generate_series(1, 3) g")
    marker = publish_end_marker(pg_cluster, dbname, "messages")
    wait_for(lambda: marker in got.ids(), timeout=10, message="the end marker was not delivered")
    text = generate_latest(registry).decode()
    assert tag not in text, [line for line in text.splitlines() if tag in line][:5]
    tables = {s.labels["table"] for f in text_string_to_metric_families(text) for s in f.samples if "table" in s.labels}
    assert tables <= {"messages", ""}, tables
    verify_against_log(pg_cluster, dbname, got, "messages", since)
