"""Backfill (issue 16, part 4): a durable consumer gets a table's existing rows once,
interleaved with live changes, so a mirror applying BACKFILL as an upsert ends equal to
the table, against the real server with concurrent writers."""

import json
import random
import threading
from decimal import Decimal

import prometheus_client
import pytest

from pgnotify_sync import Operation, install, watch_table

from helpers import wait_for
from pgutil import execute


@pytest.fixture
def items(db):
    install(db)
    execute(db, "CREATE TABLE items (id int PRIMARY KEY, v int, secret text, price numeric DEFAULT 1.50)")
    execute(db, "INSERT INTO items SELECT g, 0, 'pw' FROM generate_series(1, 20000) g")
    watch_table(db, "public.items", channel="items", exclude_columns=["secret"])
    return db


class Mirror:
    """What a consumer holding the table's rows would have (upserts and deletes)."""

    def __init__(self):
        self.rows = {}
        self.backfilled = 0
        self.lock = threading.Lock()

    def __call__(self, event):
        with self.lock:
            if event.operation is Operation.DELETE:
                self.rows.pop(event.data["id"], None)
            else:
                assert "secret" not in event.data
                assert isinstance(event.data["price"], Decimal)     # as in live events: a number
                self.rows[event.data["id"]] = event.data["v"]
                self.backfilled += event.operation is Operation.BACKFILL


def backfill_done(db):
    rows = execute(db, "SELECT done FROM pgnotify_sync.backfills")
    return bool(rows) and rows[0][0]


def table(db):
    return dict(execute(db, "SELECT id, v FROM items"))


def test_a_backfill_under_concurrent_writes_ends_with_the_table(items, make_listener, dsn):
    import psycopg2
    stop = threading.Event()

    def write(seed):
        rnd = random.Random(seed)
        conn = psycopg2.connect(**{k: dsn[k] for k in ("host", "port", "user", "password", "dbname")})
        conn.autocommit = True
        n = 30000 + seed * 1000
        with conn.cursor() as cur:
            while not stop.is_set():
                action = rnd.random()
                row = rnd.randint(1, 20000)
                if action < 0.6:
                    cur.execute("UPDATE items SET v = v + 1 WHERE id = %s", (row,))
                elif action < 0.8:
                    cur.execute("DELETE FROM items WHERE id = %s", (row,))
                else:
                    n += 1
                    cur.execute("INSERT INTO items VALUES (%s, 7, 'pw') ON CONFLICT (id) DO UPDATE SET v = 9",
                                (rnd.choice([row, n]),))
        conn.close()
    mirror = Mirror()
    listener = make_listener(channels=("items",), consumer="search", backfill=("public.items",))
    listener.on_event("items", mirror)
    writers = [threading.Thread(target=write, args=(i,), daemon=True) for i in range(3)]
    listener.start()
    for w in writers:
        w.start()
    wait_for(lambda: backfill_done(items), timeout=60, message="the backfill did not end")
    stop.set()
    for w in writers:
        w.join(10)
    # everything written so far reaches the mirror: wait for the log's last event
    last = execute(items, "SELECT max(id) FROM pgnotify_sync.event_log")[0][0]
    def differ():
        t = table(items)
        return sum(1 for k in set(t) | set(mirror.rows) if t.get(k) != mirror.rows.get(k))
    wait_for(lambda: listener.health()["channels"]["items"]["lag"] == 0 and differ() == 0, timeout=60,
             message="the mirror does not equal the table")
    assert mirror.backfilled > 10000
    assert listener.health()["backfill"]["public.items"]["done"] is True
    assert last > 20000


def test_a_renamed_excluded_column_stays_out_of_a_backfill(items, make_listener):
    """The excluded column renamed by the table's owner before the backfill: no
    backfilled row (nor any event) carries it, under its new name or any."""
    execute(items, "ALTER TABLE items RENAME COLUMN secret TO secret_renamed")
    got = []
    listener = make_listener(channels=("items",), consumer="renamed", backfill=("public.items",))
    listener.on_event("items", got.append)
    listener.start()
    wait_for(lambda: backfill_done(items) and len(got) >= 20000, timeout=60, message=f"{len(got)} backfilled")
    assert all(set(e.data) == {"id", "v", "price"} for e in got)
    assert execute(items, "SELECT count(*) FROM pgnotify_sync.event_log WHERE data::text LIKE '%%secret%%'") == [(0,)]


# -- the CLI, other consumers, an unprivileged role ----------------------------------------

def mirror_equals_table(db, mirror, listener):
    def differ():
        t = table(db)
        return sum(1 for k in set(t) | set(mirror.rows) if t.get(k) != mirror.rows.get(k))
    wait_for(lambda: listener.health()["channels"]["items"]["lag"] == 0 and differ() == 0, timeout=60,
             message="the mirror does not equal the table")


def test_the_cli_backfills_a_running_consumer_and_other_listeners_see_none_of_it(items, make_listener, dsn):
    from test_cli import Cli
    from pgutil import Collector
    mirror = Mirror()
    search = make_listener(channels=("items",), consumer="search")
    search.on_event("items", mirror)
    cache, plain = Collector(), Collector()
    other = make_listener(channels=("items",), consumer="cache")
    other.on_event("items", cache)
    live = make_listener(channels=("items",))
    live.on_event("items", plain)
    for listener in (search, other, live):
        listener.start()
    errors = []
    for listener in (search, other, live):
        listener.signals.error.connect(lambda sender, **kw: errors.append(kw), weak=False)
    runner = Cli(dsn)
    try:
        run = runner.start("backfill", "public.items", "--consumer", "search", "--chunk-rows", "700")
        execute(items, "UPDATE items SET v = 5 WHERE id <= 10")
        assert run.wait(timeout=120) == 0, "".join(run.stderr)
        progress = run.events()
        assert progress[-1] == {"table": "public.items", "rows": 20000, "done": True}
        assert len(progress) == 20000 // 700 + 2        # a line a chunk, and the last (empty) one
        mirror_equals_table(items, mirror, search)
        assert mirror.backfilled >= 19990
        # The CLI again: nothing more (done is done).
        again = runner.run("backfill", "public.items", "--consumer", "search")
        assert again.returncode == 0 and json.loads(again.stdout) == progress[-1]
        shown = json.loads(runner.run("status").stdout)
    finally:
        runner.close()
    wait_for(lambda: len(plain.events) == 10 and len(cache.events) == 10, message="the live UPDATE")
    for got in (cache.events, plain.events):
        assert {e.operation for e in got} == {Operation.UPDATE}
    wait_for(lambda: other.health()["channels"]["items"]["lag"] == 0 and
             live.health()["channels"]["items"]["lag"] == 0, message="other consumers' lag counts the backfill")
    # Not even as hints that match nothing: another consumer's chunk is no forgery.
    assert errors == []
    assert not [e for e in live.event_log().replay({"items": "items"}, 0) if e.operation is Operation.BACKFILL]
    assert [(b["consumer"], b["table"], b["rows"], b["done"]) for b in shown["backfills"]] == [
        ("search", "public.items", 20000, True)]
    lag = {c["name"]: c["lag_upper_bound"] for c in shown["consumers"]}
    assert lag["cache"] <= 10, "another consumer's lag bound counts the backfill's rows"


def test_the_cli_refuses_a_consumer_that_never_ran(items, dsn):
    from test_cli import Cli
    runner = Cli(dsn)
    proc = runner.run("backfill", "items", "--consumer", "nobody")
    assert proc.returncode == 1
    assert "consumer nobody" in proc.stderr and "has no position on channel items yet" in proc.stderr
    assert execute(items, "SELECT count(*) FROM pgnotify_sync.backfills") == [(0,)]
    assert execute(items, "SELECT count(*) FROM pgnotify_sync.event_log WHERE operation = 'BACKFILL'") == [(0,)]


def as_role(make_listener, role_dsn, **kwargs):
    """A listener connecting with *role_dsn*, stopped at teardown with the fixture's
    (before the test's roles are dropped: a listener left running retries their
    login for ever)."""
    listener = make_listener.__class__(role_dsn)(**kwargs)
    make_listener.listeners.append(listener)
    return listener


@pytest.fixture
def roles(pg_cluster, dbname, make_listener):
    from test_least_privilege import Roles
    r = Roles(pg_cluster, dbname)
    yield r
    make_listener.stop_all()        # their listeners first: a dropped role's login fails
    r.drop_all([dbname])


def test_an_unprivileged_consumer_backfills_with_its_own_rights_and_another_role_invents_nothing(
        items, make_listener, dsn, roles):
    """A listener role (grant_listener, SELECT on the table) backfills. Another role
    with a listener grant, which registers a backfill of the same consumer name
    first and logs made-up rows through backfill_rows, reaches nobody but itself;
    and a role that may not SELECT the table logs nothing."""
    import contextlib
    from pgnotify_sync import grant_listener
    from test_least_privilege import PASSWORD
    reader, intruder, blind = roles.make("reader"), roles.make("intruder"), roles.make("blind")
    for role in (reader, intruder, blind):
        grant_listener(items, role, ["items"])
    execute(items, f"GRANT SELECT ON items TO {reader}, {intruder}")
    # The intruder takes partition 1 of consumer "search" on the channel (the reader's
    # group has one) and registers "search"'s backfill first, with rows of its own.
    with contextlib.closing(roles.connect(intruder)) as conn:
        execute(conn, "INSERT INTO pgnotify_sync.consumers (name, channel, partition, position) "
                      "VALUES ('search', 'items', 1, pg_current_snapshot())")
    as_reader = dict(dsn, user=reader, password=PASSWORD)
    mirror, errors = Mirror(), []
    listener = as_role(make_listener, as_reader, channels=("items",), consumer="search")
    listener.on_event("items", mirror)
    listener.signals.error.connect(lambda sender, **kw: errors.append(kw), weak=False)
    listener.start()
    with contextlib.closing(roles.connect(intruder)) as conn:
        execute(conn, "SELECT pgnotify_sync.backfill_start('search', 'public', 'items')")
        execute(conn, """SELECT pgnotify_sync.backfill_rows('search', 'public', 'items',
                             '[{"id": 1, "v": 666, "price": 1.5}, {"id": 99999, "v": 666, "price": 1.5}]',
                             pg_current_snapshot()::text)""")
    execute(items, "UPDATE items SET v = 1 WHERE id = 2")
    wait_for(lambda: mirror.rows.get(2) == 1, message="the live UPDATE after the made-up rows")
    assert mirror.rows == {2: 1} and errors == [], "another role's BACKFILL rows reached the consumer"
    listener.stop()
    # The reader's own backfill: refused while the intruder's registration holds the
    # name (a denial of service, not an invented event); once it is gone, it runs.
    execute(items, "DELETE FROM pgnotify_sync.backfills")
    registry = prometheus_client.CollectorRegistry()
    listener = as_role(make_listener, as_reader, channels=("items",), consumer="search", backfill=("public.items",),
                       registry=registry)
    listener.on_event("items", mirror)
    listener.signals.error.connect(lambda sender, **kw: errors.append(kw), weak=False)
    listener.start()
    wait_for(lambda: listener.health().get("backfill", {}).get("public.items", {}).get("done"), timeout=60,
             message="the reader's backfill did not end")
    mirror_equals_table(items, mirror, listener)
    assert mirror.backfilled == 20000 and errors == []
    labels = {"listener": listener.name, "consumer": "search", "table": "public.items"}
    assert registry.get_sample_value("pgnotify_sync_backfill_rows", labels) == 20000
    assert registry.get_sample_value("pgnotify_sync_backfill_done", labels) == 1
    listener.stop()
    # A role that may not read the table: the backfill fails and logs nothing.
    as_blind = dict(dsn, user=blind, password=PASSWORD)
    blind_listener = as_role(make_listener, as_blind, channels=("items",), consumer="blind_search",
                             backfill=("public.items",))
    blind_listener.signals.error.connect(lambda sender, **kw: errors.append(kw), weak=False)
    blind_listener.start()
    wait_for(lambda: errors, message="the backfill of a table the role may not read did not fail")
    assert "backfill failed" in str(errors[0]["error"]) and "permission denied for table items" in str(
        errors[0]["error"])
    assert execute(items, "SELECT count(*) FROM pgnotify_sync.event_log "
                          "WHERE operation = 'BACKFILL' AND old->>'backfill_for' = 'blind_search'") == [(0,)]
    blind_listener.stop()


def test_a_login_role_that_sets_its_role_backfills_as_that_role(items, make_listener, dsn, roles, pg_cluster, dbname):
    """A login role whose sessions SET ROLE to the application's role (ALTER ROLE ...
    SET role): positions, backfill and MINE all speak of the application's role."""
    from pgnotify_sync import grant_listener
    from test_least_privilege import PASSWORD
    app = roles.make("app")
    login = roles.make("login")
    with pg_cluster.connect("postgres", autocommit=True) as conn, conn.cursor() as cur:
        cur.execute(f"GRANT {app} TO {login}")
        cur.execute(f"ALTER ROLE {login} IN DATABASE {dbname} SET role = {app}")
    grant_listener(items, app, ["items"])
    execute(items, f"GRANT SELECT ON items TO {app}")
    mirror, errors = Mirror(), []
    listener = as_role(make_listener, dict(dsn, user=login, password=PASSWORD), channels=("items",),
                       consumer="search", backfill=("public.items",))
    listener.on_event("items", mirror)
    listener.signals.error.connect(lambda sender, **kw: errors.append(kw), weak=False)
    listener.start()
    wait_for(lambda: listener.health()["backfill"]["public.items"]["done"] or errors, timeout=60,
             message="the backfill did not end")
    assert errors == []
    mirror_equals_table(items, mirror, listener)
    assert mirror.backfilled == 20000
    assert execute(items, "SELECT DISTINCT role::regrole::text FROM pgnotify_sync.backfills") == [(app,)]


def test_another_roles_made_up_dead_letter_delivers_nothing(items, make_listener, roles):
    """The installer's consumer sees every role's rows (row-level security does not
    bind a table's owner): a dead letter of another role, asking to retry a row it
    made up, is not this consumer's."""
    import contextlib
    from pgnotify_sync import grant_listener
    intruder = roles.make("intruder")
    grant_listener(items, intruder, ["items"])
    mirror = Mirror()
    registry = prometheus_client.CollectorRegistry()
    listener = make_listener(channels=("items",), consumer="search", registry=registry)
    listener.on_event("items", mirror)
    listener.start()
    with contextlib.closing(roles.connect(intruder)) as conn:
        execute(conn, "INSERT INTO pgnotify_sync.consumers (name, channel, partition, position) "
                      "VALUES ('search', 'items', 1, pg_current_snapshot())")
        execute(conn, "SELECT pgnotify_sync.backfill_start('search', 'public', 'items')")
        execute(conn, "SET pgnotify_sync.notify = off")      # no hint: only the dead letter names it
        execute(conn, """SELECT pgnotify_sync.backfill_rows('search', 'public', 'items',
                             '[{"id": 99999, "v": 666, "price": 1.5}]', pg_current_snapshot()::text)""")
        made_up = execute(conn, "SELECT max(id) FROM pgnotify_sync.event_log")[0][0]
        execute(conn, "INSERT INTO pgnotify_sync.dead_letters (consumer, channel, event_id, attempts, error_type, "
                      "error, retry_requested) VALUES ('search', 'items', %s, 1, 'E', 'e', true)", (made_up,))
    labels = {"listener": listener.name, "consumer": "search", "channel": "items"}
    wait_for(lambda: registry.get_sample_value("pgnotify_sync_dead_letters", labels) is not None, timeout=15,
             message="the dead letters were never counted")
    execute(items, "UPDATE items SET v = 1 WHERE id = 2")
    wait_for(lambda: mirror.rows.get(2) == 1, message="the live UPDATE")
    assert registry.get_sample_value("pgnotify_sync_dead_letters", labels) == 0
    assert 99999 not in mirror.rows


def test_the_cli_resumes_after_sigterm_and_sigkill_without_a_gap_or_a_repeat(items, make_listener, dsn):
    import signal
    from test_cli import Cli
    mirror = Mirror()
    counts = {}

    def count(event):
        if event.operation is Operation.BACKFILL:
            with mirror.lock:
                counts[event.data["id"]] = counts.get(event.data["id"], 0) + 1
        mirror(event)
    search = make_listener(channels=("items",), consumer="search")
    search.on_event("items", count)
    search.start()
    runner = Cli(dsn)
    try:
        for sig, code in ((signal.SIGTERM, 130), (signal.SIGKILL, -signal.SIGKILL)):
            run = runner.start("backfill", "public.items", "--consumer", "search", "--chunk-rows", "50")
            run.wait_line(lambda line: '"done": false' in line, message="no progress")
            run.popen.send_signal(sig)
            assert run.wait() == code
            assert execute(items, "SELECT rows < 20000 FROM pgnotify_sync.backfills") == [(True,)]
        run = runner.start("backfill", "public.items", "--consumer", "search", "--chunk-rows", "5000")
        assert run.wait(timeout=120) == 0, "".join(run.stderr)
        assert run.events()[-1] == {"table": "public.items", "rows": 20000, "done": True}
    finally:
        runner.close()
    mirror_equals_table(items, mirror, search)
    assert len(counts) == 20000 and set(counts.values()) == {1}, "a row backfilled twice, or never"
