"""Least privilege (issue 13): capture code runs with the table owner's rights.

A table owner whose table the installer (a superuser here, as usual) watches
controls code that the capture trigger runs: a cast to json of a column type the
owner owns is called by row_to_json(). Before, the capture functions ran it as
the installer (``current_user`` inside it was ``postgres``). Now a table owned by
another role is captured by that owner's own copies of the capture functions, so
the cast runs with the owner's rights, and those rights are only: insert log rows
on the channels of the owner's watched tables, read back ids and xids.

Each test makes its roles (cluster-wide, so named after the test's database) and
drops them, with what they own, at teardown.
"""

import contextlib

import psycopg2
import psycopg2.errors
import pytest

from pgnotify_sync import (Listener, PrivilegeError, SchemaError, grant_admin, grant_listener, grant_publisher,
                           grants, install, revoke, set_retention_floor, uninstall, watch_table)

from helpers import wait_for
from pgutil import Collector, execute

PASSWORD = "pw"

# The owner's cast: records who runs it, then converts as text would.
CAST = """
CREATE TYPE mood AS ENUM ('happy', 'sad');
CREATE FUNCTION mood_json(mood) RETURNS json LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO public.cast_calls VALUES (current_user, session_user);
    RETURN to_json($1::text);
END $$;
CREATE CAST (mood AS json) WITH FUNCTION mood_json(mood);
"""


class Roles:
    """LOGIN roles for one test: ``make("owner")`` -> the role's name; ``connect``."""

    def __init__(self, pg_cluster, dbname):
        self.cluster, self.dbname, self.names = pg_cluster, dbname, []

    def make(self, suffix, *options):
        name = f"{self.dbname}_{suffix}"
        with self.cluster.connect("postgres", autocommit=True) as conn, conn.cursor() as cur:
            cur.execute(f"CREATE ROLE {name} LOGIN PASSWORD %s {' '.join(options)}", (PASSWORD,))
        self.names.append(name)
        return name

    def connect(self, name, dbname=None):
        """An autocommit connection as *name* (use contextlib.closing: psycopg2's own
        ``with conn`` is a transaction, even in autocommit)."""
        info = dict(self.cluster.conninfo(dbname or self.dbname), user=name, password=PASSWORD)
        conn = psycopg2.connect(**info)
        conn.autocommit = True
        return conn

    def drop_all(self, dbnames):
        for dbname in dbnames:
            with self.cluster.connect(dbname, autocommit=True) as conn, conn.cursor() as cur:
                for name in self.names:
                    cur.execute(f"DROP OWNED BY {name} CASCADE")
        with self.cluster.connect("postgres", autocommit=True) as conn, conn.cursor() as cur:
            for name in self.names:
                cur.execute(f"DROP ROLE IF EXISTS {name}")


@pytest.fixture
def roles(pg_cluster, dbname):
    r = Roles(pg_cluster, dbname)
    yield r
    r.drop_all([dbname])


@pytest.fixture
def owned(db, roles):
    """pgnotify_sync installed by the superuser; role ``owner`` owns table ``feelings``
    (a column of its own type ``mood``, with its cast to json) in schema ``own``."""
    install(db)
    owner = roles.make("owner")
    execute(db, f"CREATE SCHEMA own AUTHORIZATION {owner}; "
                "CREATE TABLE public.cast_calls (runs_as text, session_as text); "
                "GRANT INSERT ON public.cast_calls TO PUBLIC")
    conn = roles.connect(owner)
    with conn.cursor() as cur:
        cur.execute("SET search_path = own")
        cur.execute(CAST)
        cur.execute("CREATE TABLE own.feelings (id serial PRIMARY KEY, m mood, secret text, note text)")
    yield owner, conn
    conn.close()


def collecting(make_listener, channel):
    """A started listener of *channel* (the installer's) and its Collector."""
    listener = make_listener(channels=(channel,))
    got = Collector()
    listener.on_event(channel, got)
    listener.start()
    return listener, got


def cast_callers(db):
    return {r[0] for r in execute(db, "SELECT runs_as FROM public.cast_calls")}


@pytest.mark.parametrize("mode,exclude", [("statement", ()), ("row", ()), ("statement", ("secret",)),
                                          ("row", ("secret",))])
def test_the_owners_cast_runs_with_the_owners_rights_and_events_arrive(owned, db, make_listener, mode, exclude):
    owner, conn = owned
    watch_table(db, "own.feelings", channel="feelings", exclude_columns=exclude, mode=mode)
    listener, got = collecting(make_listener, "feelings")
    with conn.cursor() as cur:
        cur.execute("INSERT INTO own.feelings (m, secret, note) VALUES ('happy', 's', 'one')")
        cur.execute("INSERT INTO own.feelings (m, secret, note) SELECT 'sad', 's', 'n' || g "
                    "FROM generate_series(1, 12) g")
        cur.execute("UPDATE own.feelings SET m = 'sad' WHERE note = 'one'")
        cur.execute("DELETE FROM own.feelings WHERE note = 'n1'")
    events = got.wait(15, settle=listener)
    assert cast_callers(db) == {owner}          # never the installer
    assert [e.operation for e in events] == ["INSERT"] * 13 + ["UPDATE", "DELETE"]
    assert events[0].data["m"] == "happy" and events[13].data["m"] == "sad" and events[13].old["m"] == "happy"
    assert ("secret" in events[0].data) is not bool(exclude)
    assert {e.table for e in events} == {"feelings"} and {e.schema for e in events} == {"own"}


def test_a_partitioned_table_of_another_owner_captures_with_its_rights(owned, db, make_listener):
    owner, conn = owned
    with conn.cursor() as cur:
        cur.execute("SET search_path = own")
        cur.execute("CREATE TABLE own.parts (id int, m mood) PARTITION BY RANGE (id); "
                    "CREATE TABLE own.parts_1 PARTITION OF own.parts FOR VALUES FROM (0) TO (100)")
    watch_table(db, "own.parts", channel="parts")
    listener, got = collecting(make_listener, "parts")
    execute(conn, "INSERT INTO own.parts VALUES (1, 'happy')")
    (event,) = got.wait(1, settle=listener)
    assert (event.table, event.data) == ("parts", {"id": 1, "m": "happy"})
    assert cast_callers(db) == {owner}


def test_a_writer_without_privileges_on_our_schema_writes_an_owners_table(owned, db, roles, make_listener):
    owner, conn = owned
    watch_table(db, "own.feelings", channel="feelings")
    writer = roles.make("writer")
    execute(conn, f"GRANT USAGE ON SCHEMA own TO {writer}; GRANT INSERT ON own.feelings TO {writer}; "
                  f"GRANT USAGE ON SEQUENCE own.feelings_id_seq TO {writer}")
    listener, got = collecting(make_listener, "feelings")
    with contextlib.closing(roles.connect(writer)) as w:
        execute(w, "INSERT INTO own.feelings (m, note) VALUES ('sad', 'by the writer')")
    (event,) = got.wait(1, settle=listener)
    assert event.data["note"] == "by the writer"
    assert cast_callers(db) == {owner}          # the owner's rights, not the writer's, not ours


def test_after_the_table_changes_hands_its_capture_runs_with_the_new_owners_rights(db, roles, make_listener):
    """The usual migration: the superuser creates and watches the table, then gives
    it to the application's role, which then owns the column type's cast too."""
    install(db)
    owner = roles.make("owner")
    execute(db, "CREATE TABLE public.cast_calls (runs_as text, session_as text); "
                "GRANT INSERT ON public.cast_calls TO PUBLIC; "
                "CREATE TABLE public.handed (id serial PRIMARY KEY, note text)")
    watch_table(db, "public.handed", channel="handed")
    execute(db, f"GRANT CREATE ON SCHEMA public TO {owner}; ALTER TABLE public.handed OWNER TO {owner}")
    with contextlib.closing(roles.connect(owner)) as conn:
        execute(conn, CAST + "ALTER TABLE public.handed ADD COLUMN m mood")
        listener, got = collecting(make_listener, "handed")
        execute(conn, "INSERT INTO public.handed (note, m) VALUES ('x', 'happy')")
        (event,) = got.wait(1, settle=listener)
    assert event.data["m"] == "happy"
    assert cast_callers(db) == {owner}
    assert execute(db, "SELECT runs_as::regrole::text FROM pgnotify_sync.watched_tables "
                       "WHERE table_name = 'handed'") == [(owner,)]


def test_the_owners_rights_log_only_its_own_channels_and_read_no_values(owned, db):
    owner, conn = owned
    execute(db, "CREATE TABLE public.payroll (id serial PRIMARY KEY, salary int)")
    watch_table(db, "public.payroll", channel="payroll")
    watch_table(db, "own.feelings", channel="feelings")
    execute(db, "INSERT INTO public.payroll (salary) VALUES (1000)")
    # A cast function that tries to invent an event on another channel: refused, so
    # the owner's own statement fails (its own code raised).
    with conn.cursor() as cur:
        cur.execute("SET search_path = own")
        cur.execute("""CREATE OR REPLACE FUNCTION mood_json(mood) RETURNS json LANGUAGE plpgsql AS $$
            BEGIN
                INSERT INTO pgnotify_sync.event_log (channel, operation, schema_name, table_name, data)
                VALUES ('payroll', 'INSERT', 'public', 'payroll', '{"salary": 1}');
                RETURN to_json($1::text);
            END $$""")
        with pytest.raises(psycopg2.errors.InsufficientPrivilege, match="row-level security"):
            cur.execute("INSERT INTO own.feelings (m) VALUES ('happy')")
        with pytest.raises(psycopg2.errors.InsufficientPrivilege, match="event_log"):
            cur.execute("SELECT data FROM pgnotify_sync.event_log")
        with pytest.raises(psycopg2.errors.InsufficientPrivilege, match="publish"):
            cur.execute("SELECT pgnotify_sync.publish('payroll', '{}')")
        with pytest.raises(psycopg2.errors.InsufficientPrivilege, match="trim_event_log"):
            cur.execute("SELECT pgnotify_sync.trim_event_log(1e-9, 1e-9)")
        cur.execute("SELECT count(*) FROM pgnotify_sync.event_log")     # ids only, but it may count
    assert execute(db, "SELECT count(*) FROM pgnotify_sync.event_log WHERE channel = 'payroll'") == [(1,)]


def test_a_non_superuser_installer_is_told_why_it_cannot_watch_another_owners_table(pg_cluster, roles, db):
    installer = roles.make("installer")
    owner = roles.make("owner")
    name = f"{roles.dbname}_own"
    pg_cluster.create_database(name)
    try:
        with pg_cluster.connect(name, autocommit=True) as admin:
            execute(admin, f"GRANT CREATE ON DATABASE {name} TO {installer}; "
                           f"GRANT CREATE ON SCHEMA public TO {owner}, {installer}")
        with contextlib.closing(roles.connect(installer, name)) as conn:
            install(conn)
            execute(conn, "CREATE TABLE mine (id int)")
            watch_table(conn, "public.mine", channel="mine")      # its own table: fine
        with contextlib.closing(roles.connect(owner, name)) as conn:
            execute(conn, f"CREATE TABLE theirs (id int); GRANT TRIGGER ON theirs TO {installer}")
        with contextlib.closing(roles.connect(installer, name)) as conn:
            with pytest.raises(SchemaError, match=f"table owner {owner} is not the installer: watching its "
                                                  "tables needs a superuser"):
                watch_table(conn, "public.theirs", channel="theirs")
    finally:
        roles.drop_all([name])
        roles.names.clear()
        pg_cluster.drop_database(name)


def test_install_again_keeps_owners_copies_working_and_uninstall_removes_everything(owned, db, make_listener):
    owner, conn = owned
    watch_table(db, "own.feelings", channel="feelings")
    install(db)
    install(db)
    listener, got = collecting(make_listener, "feelings")
    execute(conn, "INSERT INTO own.feelings (m) VALUES ('happy')")
    got.wait(1, settle=listener)
    assert cast_callers(db) == {owner}
    listener.stop()
    uninstall(db)
    assert execute(db, "SELECT count(*) FROM pg_event_trigger WHERE evtname LIKE 'pgnotify_sync%'") == [(0,)]
    assert execute(db, "SELECT count(*) FROM pg_proc WHERE proname LIKE 'capture%'") == [(0,)]
    execute(conn, "INSERT INTO own.feelings (m) VALUES ('sad')")      # no trigger left to fail it


# -- who may do what: grant_listener, grant_publisher, grant_admin, revoke ----------------

@pytest.fixture
def ledger(db):
    """Installed; tables ``acc`` and ``payroll`` watched on channels of those names,
    one row logged in each."""
    install(db)
    execute(db, "CREATE TABLE acc (id serial PRIMARY KEY, note text); "
                "CREATE TABLE payroll (id serial PRIMARY KEY, salary int)")
    watch_table(db, "public.acc", channel="acc")
    watch_table(db, "public.payroll", channel="payroll")
    execute(db, "INSERT INTO acc (note) VALUES ('a1'); INSERT INTO payroll (salary) VALUES (5000)")
    return db


def as_role(roles, name, sql, args=None):
    with contextlib.closing(roles.connect(name)) as conn:
        return execute(conn, sql, args)


def refused(roles, name, sql, match, args=None):
    with pytest.raises(psycopg2.errors.InsufficientPrivilege, match=match):
        as_role(roles, name, sql, args)


def role_config(dsn, role, **overrides):
    from pgutil import config_for
    return config_for(dict(dsn, user=role, password=PASSWORD), **overrides)


def test_a_listener_role_reads_its_channels_and_can_do_nothing_else(ledger, roles):
    reader = roles.make("reader")
    grant_listener(ledger, reader, ["acc"])
    assert as_role(roles, reader, "SELECT channel, data->>'note' FROM pgnotify_sync.event_log") == [("acc", "a1")]
    refused(roles, reader, "SELECT pgnotify_sync.trim_event_log(1e-9, 1e-9)", "trim_event_log")
    refused(roles, reader, "SELECT pgnotify_sync.publish('acc', '{}')", "publish")
    refused(roles, reader, "INSERT INTO pgnotify_sync.event_log (channel, operation, schema_name, table_name) "
                           "VALUES ('acc', 'INSERT', 'public', 'acc')", "event_log")
    refused(roles, reader, "DELETE FROM pgnotify_sync.event_log", "event_log")
    refused(roles, reader, "SELECT pgnotify_sync.watch_table('public.acc', 'x')", "watch_table")
    # Other roles' consumer positions: invisible, so they cannot be moved.
    execute(ledger, "INSERT INTO pgnotify_sync.consumers (name, channel, position) "
                    "VALUES ('theirs', 'acc', pg_current_snapshot())")
    before = execute(ledger, "SELECT position::text, handled::text FROM pgnotify_sync.consumers")
    assert as_role(roles, reader, "SELECT count(*) FROM pgnotify_sync.consumers") == [(0,)]
    as_role(roles, reader, "UPDATE pgnotify_sync.consumers SET position = pg_current_snapshot(), handled = '[[1, 9]]'")
    assert execute(ledger, "SELECT position::text, handled::text FROM pgnotify_sync.consumers") == before
    assert grants(ledger) == [{"role": reader, "kind": "listen", "channels": ["acc"]}]


def test_a_listener_roles_durable_consumer_sees_only_its_channel_across_a_restart(ledger, roles, dsn):
    reader = roles.make("reader")
    grant_listener(ledger, reader, ["acc"])
    got = Collector()

    def start():
        listener = Listener(role_config(dsn, reader, channels=("acc",)), consumer="books", registry=False)
        listener.on_event("acc", got)
        listener.start(timeout_s=10)
        return listener
    listener = start()
    execute(ledger, "INSERT INTO acc (note) VALUES ('a2'); INSERT INTO payroll (salary) VALUES (6000)")
    wait_for(lambda: len(got) == 1, message="a2 not delivered")
    listener.stop()
    execute(ledger, "INSERT INTO acc (note) VALUES ('a3'); INSERT INTO payroll (salary) VALUES (7000)")
    listener = start()
    try:
        wait_for(lambda: len(got) == 2, message="a3 not delivered after the restart")
    finally:
        listener.stop()
    assert [e.data["note"] for e in got.events] == ["a2", "a3"]
    assert execute(ledger, "SELECT name, role::regrole::text FROM pgnotify_sync.consumers") == [("books", reader)]


def test_two_roles_consumers_of_one_name_are_two_consumers(ledger, roles, dsn):
    """A consumer name another role keeps neither blocks this role's consumer nor
    tells it that the name exists (it failed at start() with PrivilegeError): each
    role's consumer of that name has rows of its own and gets every event."""
    first, second = roles.make("first"), roles.make("second")
    for role in (first, second):
        grant_listener(ledger, role, ["acc"])
    keeper = Listener(role_config(dsn, first, channels=("acc",)), consumer="books", registry=False)
    other = Listener(role_config(dsn, second, channels=("acc",)), consumer="books", registry=False)
    got = {first: Collector(), second: Collector()}
    keeper.on_event("acc", got[first])
    other.on_event("acc", got[second])
    try:
        keeper.start(timeout_s=10)
        other.start(timeout_s=10)
        execute(ledger, "INSERT INTO acc (note) VALUES ('both')")
        for role in (first, second):
            assert [e.data["note"] for e in got[role].wait(1)] == ["both"]
    finally:
        other.stop()
        keeper.stop()
    assert sorted(execute(ledger, "SELECT name, role::regrole::text FROM pgnotify_sync.consumer_groups")) == sorted(
        [("books", first), ("books", second)])


def test_a_listener_without_the_grant_fails_at_start_naming_it(ledger, roles, dsn):
    nobody = roles.make("nobody")
    listener = Listener(role_config(dsn, nobody, channels=("acc",)), registry=False)
    try:
        with pytest.raises(PrivilegeError, match=f"role '{nobody}' has no grant on pgnotify_sync .*"
                                                 f"'pgnotify-sync grant-listener {nobody} --channel acc'"):
            listener.start(timeout_s=10)
    finally:
        listener.stop()         # a failed start leaves it FAILED, not stopped (it may be started again)
    reader = roles.make("reader")
    grant_listener(ledger, reader, ["acc"])
    listener = Listener(role_config(dsn, reader, channels=("acc", "payroll")), registry=False)
    try:
        with pytest.raises(PrivilegeError, match=f"role '{reader}' may not read channel\\(s\\) 'payroll' .*"
                                                 f"grant-listener {reader} --channel payroll"):
            listener.start(timeout_s=10)
    finally:
        listener.stop()


def test_a_publisher_publishes_on_its_channels_only_and_reads_no_values(ledger, roles):
    writer = roles.make("publisher")
    grant_publisher(ledger, writer, ["acc"])
    key = "1c3b1b6e-4a56-4d3e-9d59-3c9f6a1d2e01"
    first = as_role(roles, writer, "SELECT pgnotify_sync.publish('acc', '{\"n\": 1}', %s)", (key,))
    again = as_role(roles, writer, "SELECT pgnotify_sync.publish('acc', '{\"n\": 1}', %s)", (key,))
    assert first == again and first[0][0] is not None                 # idempotent for the publisher too
    refused(roles, writer, "SELECT pgnotify_sync.publish('payroll', '{}')", "row-level security")
    refused(roles, writer, "SELECT data FROM pgnotify_sync.event_log", "event_log")
    # Not even its own transaction's xid can be forged.
    refused(roles, writer, "INSERT INTO pgnotify_sync.event_log (xid, channel, operation, schema_name, table_name) "
                           "VALUES ('1'::xid8, 'acc', 'PUBLISH', '', '')", "row-level security")
    # Nor a table's identity (an event naming a table, a new metric series a row)
    for schema, table in (("public", "users"), ("", "x1"), ("x1", "")):
        refused(roles, writer, "INSERT INTO pgnotify_sync.event_log (xid, channel, operation, schema_name, "
                               f"table_name, data) VALUES (pg_current_xact_id(), 'acc', 'PUBLISH', '{schema}', "
                               f"'{table}', '{{}}')", "row-level security")
    assert as_role(roles, writer, "INSERT INTO pgnotify_sync.event_log (xid, channel, operation, schema_name, "
                                  "table_name, data) VALUES (pg_current_xact_id(), 'acc', 'PUBLISH', '', '', '{}') "
                                  "RETURNING 1") == [(1,)]           # what publish() writes
    assert execute(ledger, "SELECT count(*) FROM pgnotify_sync.event_log WHERE operation = 'PUBLISH'") == [(2,)]


def test_an_admin_trims_but_never_below_the_floor_kept_in_the_database(ledger, roles):
    admin = roles.make("admin")
    grant_admin(ledger, admin)
    set_retention_floor(ledger, 3600)
    assert as_role(roles, admin, "SELECT pgnotify_sync.trim_event_log(1e-9, 1e-9)") == [(0,)]
    refused(roles, admin, "SELECT data FROM pgnotify_sync.event_log", "event_log")
    refused(roles, admin, "SELECT pgnotify_sync.set_retention_floor(0)", "set_retention_floor")
    set_retention_floor(ledger, 0)
    assert as_role(roles, admin, "SELECT pgnotify_sync.trim_event_log(1e-9, 1e-9)") == [(2,)]


def test_revoke_takes_every_grant_back(ledger, roles):
    reader = roles.make("reader")
    grant_listener(ledger, reader, ["acc"])
    grant_publisher(ledger, reader, ["acc"])
    assert revoke(ledger, reader) == 2
    refused(roles, reader, "SELECT count(*) FROM pgnotify_sync.event_log", "pgnotify_sync")
    assert grants(ledger) == []


def test_the_cleanup_of_a_role_that_may_not_trim_says_so_once_at_info(ledger, roles, dsn, caplog):
    reader = roles.make("reader")
    grant_listener(ledger, reader, ["acc"])
    listener = Listener(role_config(dsn, reader, channels=("acc",), cleanup_interval_s=0.05), registry=False)
    got = Collector()
    listener.on_event("acc", got)
    errors = []
    listener.signals.error.connect(lambda sender, **kw: errors.append(kw), weak=False)
    with caplog.at_level("INFO", logger="pgnotify_sync"):
        listener.start(timeout_s=10)
        try:
            wait_for(lambda: any("may not trim" in r.getMessage() for r in caplog.records),
                     message="no word about trimming")
            for n in range(3):      # each round trip spans several cleanup intervals
                execute(ledger, "INSERT INTO acc (note) VALUES (%s)", (f"r{n}",))
                wait_for(lambda: len(got) == n + 1)
        finally:
            listener.stop()
    told = [r for r in caplog.records if "may not trim" in r.getMessage()]
    assert len(told) == 1 and told[0].levelname == "INFO"
    assert not [r for r in caplog.records if r.levelname in ("WARNING", "ERROR") and "retention" in r.getMessage()]
    assert errors == []


def test_status_as_a_granted_role_shows_what_it_may_see(ledger, roles, dsn):
    from pgnotify_sync.status import server_status
    reader, writer = roles.make("reader"), roles.make("publisher")
    grant_listener(ledger, reader, ["acc"])
    grant_publisher(ledger, writer, ["acc"])
    with contextlib.closing(roles.connect(reader)) as conn:
        conn.autocommit = False
        status = server_status(conn)
    assert status["event_log"]["rows"] == 1                     # its channel's row only
    assert status["watched_tables"] == "not granted"
    assert status["privileges"]["granted"] == ["listen"] and not status["privileges"]["unrestricted"]
    assert status["privileges"]["grants"] == [{"role": reader, "kind": "listen", "channels": ["acc"]}]
    with contextlib.closing(roles.connect(writer)) as conn:
        conn.autocommit = False
        status = server_status(conn)
    assert status["event_log"] == "not granted" and status["consumers"] == "not granted"
    assert status["privileges"]["granted"] == ["publish"]


# -- what a review found (each was an attack or a failing writer before) -----------------

def test_an_admin_cannot_write_watched_tables_nor_delete_or_move_positions_directly(ledger, roles):
    admin = roles.make("admin")
    grant_admin(ledger, admin)
    execute(ledger, "INSERT INTO pgnotify_sync.consumers (name, channel, position) "
                    "VALUES ('theirs', 'acc', pg_current_snapshot())")
    # A watched_tables row of its own would have had the event trigger (the
    # installer's rights) attach capture triggers to a table of its choice.
    refused(roles, admin, "INSERT INTO pgnotify_sync.watched_tables (schema_name, table_name, channel, relid, mode) "
                          "VALUES ('x', 'y', 'acc', 'public.payroll'::regclass, 'row')", "watched_tables")
    refused(roles, admin, "DELETE FROM pgnotify_sync.event_log", "event_log")          # only trim, above the floor
    refused(roles, admin, "UPDATE pgnotify_sync.consumers SET position = pg_current_snapshot()", "consumers")
    assert as_role(roles, admin, "SELECT name FROM pgnotify_sync.consumers") == [("theirs",)]


def test_grants_do_not_add_up_to_reading_a_publish_channel(ledger, roles):
    both = roles.make("both")
    grant_listener(ledger, both, ["acc"])
    grant_publisher(ledger, both, ["payroll"])
    execute(ledger, "SELECT pgnotify_sync.publish('payroll', '{\"salary\": 1}')")
    assert as_role(roles, both, "SELECT DISTINCT channel FROM pgnotify_sync.event_log") == [("acc",)]


def test_made_up_dead_letters_do_not_keep_events_from_being_trimmed(ledger, roles):
    """A listener role parks dead letters for the channel's present and future
    events under a consumer it never ran: retention deletes those events all the
    same (they pinned the log for good, even against trim_event_log(0, 0)). (A
    consumer that did run still keeps its dead letters' events: test_retries.)"""
    intruder = roles.make("intruder")
    grant_listener(ledger, intruder, ["acc"])
    top = execute(ledger, "SELECT max(id) FROM pgnotify_sync.event_log")[0][0]
    as_role(roles, intruder, "INSERT INTO pgnotify_sync.dead_letters (consumer, channel, event_id, attempts, "
                             "error_type, error) SELECT 'ghost', 'acc', g, 1, 'X', 'x' FROM generate_series(1, %s) g",
            (top + 1000,))
    execute(ledger, "INSERT INTO acc (note) SELECT 'n' FROM generate_series(1, 100)")
    execute(ledger, "SELECT pgnotify_sync.trim_event_log(1e-9, 1e-9)")
    assert execute(ledger, "SELECT count(*) FROM pgnotify_sync.event_log WHERE channel = 'acc'") == [(0,)]


def test_a_listener_keeps_positions_only_on_its_channels_and_only_well_formed_ones(ledger, roles):
    reader = roles.make("reader")
    grant_listener(ledger, reader, ["acc"])
    refused(roles, reader, "INSERT INTO pgnotify_sync.consumers (name, channel, position) "
                           "VALUES ('x', 'payroll', '1:1:')", "row-level security")
    with pytest.raises(psycopg2.errors.CheckViolation, match="consumers_handled_valid"):
        as_role(roles, reader, "INSERT INTO pgnotify_sync.consumers (name, channel, position, handled) "
                               "VALUES ('x', 'acc', '1:1:', '[[\"a\", \"b\"]]')")
    execute(ledger, "SELECT pgnotify_sync.trim_event_log(0, 0)")      # trimming works for everyone


def test_an_owners_table_is_captured_with_row_security_off_and_after_a_table_swap(owned, db, make_listener):
    owner, conn = owned
    watch_table(db, "own.feelings", channel="feelings")
    execute(conn, "SET row_security = off; INSERT INTO own.feelings (note) VALUES ('restored')")    # pg_dump's way
    # The old table renamed away and a new one of the old name watched: both write.
    execute(conn, "ALTER TABLE own.feelings RENAME TO feelings_old; "
                  "CREATE TABLE own.feelings (id serial PRIMARY KEY, note text)")
    watch_table(db, "own.feelings", channel="feelings_v2")
    execute(conn, "RESET row_security; INSERT INTO own.feelings_old (note) VALUES ('old'); "
                  "INSERT INTO own.feelings (note) VALUES ('new')")
    assert execute(db, "SELECT channel, table_name, data->>'note' FROM pgnotify_sync.event_log ORDER BY id") == [
        ("feelings", "feelings", "restored"), ("feelings", "feelings_old", "old"), ("feelings_v2", "feelings", "new")]


def test_the_event_trigger_never_fails_a_command(owned, db, roles):
    owner, conn = owned
    watch_table(db, "own.feelings", channel="feelings", exclude_columns=("secret",))
    other = roles.make("other")
    execute(db, "ALTER TABLE own.feelings DROP COLUMN secret")          # the exclusion no longer exists
    execute(db, f"GRANT CREATE ON SCHEMA own TO {other}; ALTER TABLE own.feelings OWNER TO {other}")  # warned only
    execute(conn, "CREATE TEMP TABLE scratch (a int); ALTER TABLE scratch ADD COLUMN b int")    # unrelated DDL


def test_a_publish_key_is_unique_per_channel(ledger):
    key = "5f0e8f1c-8f0a-4f7e-b0f7-3c1f2d9a7b11"
    first = execute(ledger, "SELECT pgnotify_sync.publish('acc', '{}', %s)", (key,))
    other = execute(ledger, "SELECT pgnotify_sync.publish('payroll', '{}', %s)", (key,))
    assert first != other
    assert execute(ledger, "SELECT pgnotify_sync.publish('acc', '{}', %s)", (key,)) == first


def test_a_table_owner_with_bypassrls_is_refused_saying_why(db, roles):
    """Its copies would not be held to its channels by row-level security."""
    install(db)
    owner = roles.make("bypass", "BYPASSRLS")
    execute(db, f"CREATE TABLE public.fast (id int); ALTER TABLE public.fast OWNER TO {owner}")
    with pytest.raises(SchemaError, match=f"table owner {owner} has BYPASSRLS: its capture could log events on any "
                                          "channel"):
        watch_table(db, "public.fast", channel="fast")


def test_an_event_that_cannot_be_parked_is_not_passed(ledger, roles, dsn):
    """Dead letters (issue 16): a role whose dead letters cannot be written (its grant
    on the table taken back: a real refusal by the server) never passes the event it
    failed on; once it can, the event is parked and delivery goes on, in order."""
    reader = roles.make("reader")
    grant_listener(ledger, reader, ["acc"])
    execute(ledger, f"REVOKE INSERT ON pgnotify_sync.dead_letters FROM {reader}")
    listener = Listener(role_config(dsn, reader, channels=("acc",)), consumer="books", registry=False)
    tried, done = [], []

    @listener.on_event("acc")
    def book(event):
        tried.append(event.data["note"])
        if event.data["note"] == "bad":
            raise ValueError("cannot book this one")
        done.append(event.data["note"])
    try:
        listener.start(timeout_s=10)
        execute(ledger, "INSERT INTO acc (note) VALUES ('ok1'); INSERT INTO acc (note) VALUES ('bad'); "
                        "INSERT INTO acc (note) VALUES ('ok2')")
        wait_for(lambda: tried.count("bad") >= 2, timeout=15, message=f"tried {tried}")
        assert done == ["ok1"], "an event after the one that could not be parked was passed"
        execute(ledger, f"GRANT INSERT ON pgnotify_sync.dead_letters TO {reader}")
        wait_for(lambda: done == ["ok1", "ok2"], timeout=15, message=f"done {done}")
        assert [(d["event_id"] > 0, d["error_type"]) for d in listener.dead_letters()] == [(True, "ValueError")]
    finally:
        listener.stop()


# -- another role's rows in the consumers' tables (issue 29, points 1-5) ---------------------
# The attacker holds a listener grant on acc only; the victim is the installer's
# durable consumer "books" (the installer bypasses row-level security: it saw every
# role's rows and took them for its own).

def attacker(ledger, roles):
    la = roles.make("la")
    grant_listener(ledger, la, ["acc"])
    return la


def books(make_listener, **kwargs):
    got = Collector()
    listener = make_listener(channels=("acc", "payroll"), consumer="books", **kwargs)
    listener.on_event("acc", got)
    listener.on_event("payroll", got)
    return listener, got


def test_another_roles_member_row_does_not_stall_a_group(ledger, roles, make_listener):
    la = attacker(ledger, roles)
    as_role(roles, la, "INSERT INTO pgnotify_sync.consumer_members (name, member, host, pid, channels, heartbeat_at, "
                       "lease_s) VALUES ('books', '0000-never', 'x', 1, '{acc,payroll}', 'infinity', 1e9)")
    listener, got = books(make_listener, consumer_partitions=2)
    listener.start()
    execute(ledger, "INSERT INTO acc (note) SELECT 'n' || g FROM generate_series(1, 20) g")
    got.wait(20)
    assert listener.health()["consumer"]["members"] == 1


def test_another_roles_backfill_row_neither_redirects_nor_blocks_a_backfill(ledger, roles, make_listener):
    la = attacker(ledger, roles)
    # the victim's consumer name, payroll's table, and the attacker's channel
    as_role(roles, la, "INSERT INTO pgnotify_sync.backfills (consumer, schema_name, table_name, channel) "
                       "VALUES ('books', 'public', 'payroll', 'acc')")
    listener, got = books(make_listener)
    listener.start()
    listener.stop()
    listener, got = books(make_listener, backfill=("public.payroll",))
    listener.start()
    wait_for(lambda: any(e.operation == "BACKFILL" for e in got.events), timeout=20, message="no backfill")
    assert [(e.channel, e.data["salary"]) for e in got.events if e.operation == "BACKFILL"] == [("payroll", 5000)]
    assert as_role(roles, la, "SELECT count(*) FROM pgnotify_sync.event_log WHERE operation = 'BACKFILL'") == [(0,)]


def test_another_roles_key_columns_skip_no_row_of_a_backfill(ledger, roles, make_listener):
    la = attacker(ledger, roles)
    execute(ledger, "INSERT INTO payroll (salary) SELECT 100 * (g % 3) FROM generate_series(1, 19) g")
    as_role(roles, la, "INSERT INTO pgnotify_sync.consumer_keys (name, schema_name, table_name, columns) "
                       "VALUES ('books', 'public', 'payroll', '{salary}')")
    listener, got = books(make_listener)
    listener.start()
    listener.stop()
    listener, got = books(make_listener, backfill=("public.payroll",), backfill_chunk_rows=3)
    listener.start()
    def backfilled():
        return sorted(e.data["id"] for e in list(got.events) if e.operation == "BACKFILL")
    # (logged is not yet delivered: wait for the rows, then for the end, then compare)
    wait_for(lambda: len(backfilled()) >= 20 and listener.health()["backfill"]["public.payroll"]["done"],
             timeout=30, message="the backfill did not deliver every row")
    assert backfilled() == list(range(1, 21))


def test_another_roles_position_row_is_not_taken_for_a_consumers_own(ledger, roles, make_listener):
    la = attacker(ledger, roles)
    now = execute(ledger, "SELECT pg_current_snapshot()::text")[0][0]
    as_role(roles, la, "INSERT INTO pgnotify_sync.consumers (name, channel, position, owner, epoch, lease_until) "
                       "VALUES ('books', 'acc', %s, 'la', 99, 'infinity')", (now,))
    listener, got = books(make_listener)
    listener.start()
    execute(ledger, "INSERT INTO acc (note) VALUES ('x1'), ('x2'), ('x3')")
    got.wait(3)
    # the attacker moves and fences its own row only
    as_role(roles, la, "UPDATE pgnotify_sync.consumers SET position = pg_current_snapshot(), epoch = 1000 "
                       "WHERE name = 'books'")
    execute(ledger, "INSERT INTO acc (note) VALUES ('x4')")
    assert [e.data["note"] for e in got.wait(4) if e.channel == "acc"] == ["x1", "x2", "x3", "x4"]
    listener.stop()
    again, got = books(make_listener)
    again.start()
    execute(ledger, "INSERT INTO acc (note) VALUES ('x5')")
    assert [e.data["note"] for e in got.wait(1)] == ["x5"]       # from its own stored position: no repeat, no gap
