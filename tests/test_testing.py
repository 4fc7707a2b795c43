"""pgnotify_sync.testing as users see it: the pytest plugin in a user's own suite, and postgres()."""

import os
import pathlib
import re

import psycopg2
import pytest

import pgnotify_sync
from pgnotify_sync.testing import PostgresDatabase, postgres

pytest_plugins = ["pytester"]

USER_CONFTEST = """
pytest_plugins = ["pgnotify_sync.testing.pytest_plugin"]
"""

# A user's tests of a handler: a Listener on a watched table gets the event; the next
# test has a database of its own (schema installed, no tables) on the same server.
USER_TESTS = """
import queue

from pgnotify_sync import Listener, watch_table

seen = []


def test_handler_gets_the_insert(pgnotify_db, pgnotify_config):
    conn = pgnotify_db.connect()
    with conn.cursor() as cur:
        cur.execute("CREATE TABLE orders (id serial PRIMARY KEY, item text)")
    watch_table(conn, "public.orders", channel="orders")
    got = queue.Queue()
    listener = Listener(pgnotify_config)
    listener.on_event("orders")(got.put)
    with listener:
        with conn.cursor() as cur:
            cur.execute("INSERT INTO orders (item) VALUES ('tea')")
        event = got.get(timeout=15)
    conn.close()
    assert (event.operation.value, event.table, event.data["item"]) == ("INSERT", "orders", "tea")
    seen.append((pgnotify_db.cluster, pgnotify_db.dbname))
    print("BASE_DIR", pgnotify_db.cluster.base_dir)


def test_next_test_gets_a_fresh_database_on_the_same_server(pgnotify_db, pgnotify_cluster):
    [(cluster, dbname)] = seen
    assert pgnotify_cluster is cluster is pgnotify_db.cluster and pgnotify_db.dbname != dbname
    conn = pgnotify_db.connect()
    with conn.cursor() as cur:
        cur.execute("SELECT to_regclass('public.orders'), to_regclass('pgnotify_sync.event_log')::text, "
                    "(SELECT count(*) FROM pg_database WHERE datname = %s)", (dbname,))
        assert cur.fetchone() == (None, "pgnotify_sync.event_log", 0)   # the first one is dropped
    conn.close()
"""


@pytest.mark.integration          # the user's suite starts a server of its own, without the pg_cluster fixture
def test_plugin_in_a_user_suite(pytester, monkeypatch):
    # The user's pytest imports this checkout's package, wherever pytester runs it.
    package_root = str(pathlib.Path(pgnotify_sync.__file__).resolve().parent.parent)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")])))
    pytester.makeconftest(USER_CONFTEST)
    pytester.makepyfile(test_handlers=USER_TESTS)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-s", timeout=120)
    result.assert_outcomes(passed=2)
    [base_dir] = re.findall(r"BASE_DIR (\S+)", result.stdout.str())
    assert not os.path.exists(base_dir)             # the session's server is deleted at the end


def test_postgres_on_a_shared_cluster(pg_cluster, admin_db):
    with postgres(cluster=pg_cluster, channels=("orders",), reconnect_delay_ms=50) as pg:
        assert isinstance(pg, PostgresDatabase) and pg.cluster is pg_cluster
        assert pg.dsn() == pg_cluster.conninfo(pg.dbname)
        assert pg.url() == f"postgresql://postgres:{pg_cluster.password}@127.0.0.1:{pg_cluster.port}/{pg.dbname}"
        cfg = pg.config
        assert (cfg.postgres_host, cfg.postgres_port, cfg.postgres_db) == (pg.host, pg.port, pg.dbname)
        assert (cfg.channels, cfg.reconnect_delay_ms, cfg.health_check_interval_s) == (("orders",), 50, 2.0)
        conn = pg.connect()
        with conn.cursor() as cur:
            cur.execute("SELECT count(*) FROM pgnotify_sync.event_log")
            assert cur.fetchone() == (0,)
        conn.close()
        psycopg2.connect(**pg.dsn()).close()
        psycopg2.connect(pg.url()).close()
        pg_cluster.stop()                           # left stopped: started again before the drop
    assert pg_cluster.is_running()
    admin = pg_cluster.connect()
    with admin.cursor() as cur:
        cur.execute("SELECT count(*) FROM pg_database WHERE datname = %s", (pg.dbname,))
        assert cur.fetchone() == (0,)
    admin.close()


def test_postgres_without_the_schema_and_a_wrong_override(pg_cluster):
    with postgres(install=False, cluster=pg_cluster, dbname="plain_db") as pg:
        conn = pg.connect()
        with conn.cursor() as cur:
            cur.execute("SELECT to_regnamespace('pgnotify_sync')")
            assert cur.fetchone() == (None,)
        conn.close()
    with pytest.raises(TypeError, match="no_such_setting"):
        with postgres(cluster=pg_cluster, dbname="never_created", no_such_setting=1):
            pass
    admin = pg_cluster.connect()
    with admin.cursor() as cur:
        cur.execute("SELECT count(*) FROM pg_database WHERE datname IN ('plain_db', 'never_created')")
        assert cur.fetchone() == (0,)
    admin.close()

