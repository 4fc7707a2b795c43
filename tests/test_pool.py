"""Tests of pgnotify_sync._pool.ConnectionPool against the real cluster.

Pools are built as Listener._require_pool builds them (Config.connect_kwargs of the
test database); ``make_pool`` closes every one at teardown. Connections are told
apart by their backend pid; the server side is read from pg_stat_activity.
"""

import contextlib
import decimal
import threading
import time

import psycopg2
import psycopg2.errors
import psycopg2.extensions
import pytest

from pgnotify_sync.testing import free_port
from pgnotify_sync._pool import ConnectionPool
from pgnotify_sync.errors import ConnectError, QueryTimeout

from helpers import wait_for
from pgutil import config_for, execute


@pytest.fixture
def make_pool(dsn):
    pools = []
    config = config_for(dsn)

    def make(name="test-pool", maxconn=2, connect_kwargs_fn=config.connect_kwargs, **kwargs):
        kwargs.setdefault("statement_timeout_ms", 30_000)
        pool = ConnectionPool(name, connect_kwargs_fn, maxconn, **kwargs)
        pools.append(pool)
        return pool

    yield make
    for pool in pools:
        pool.close()


def pid_of(pool, **kwargs):
    with pool.connection(**kwargs) as conn:
        return conn.info.backend_pid


def pool_backends(db):
    """Pids of the pools' backends (application_name of Config) on the test database."""
    return {r[0] for r in execute(db, "SELECT pid FROM pg_stat_activity WHERE application_name = 'pgnotify_sync' "
                                      "AND datname = current_database()")}


def terminate(db, pid):
    assert execute(db, "SELECT pg_terminate_backend(%s, 5000)", (pid,)) == [(True,)]


# -- checkout basics -----------------------------------------------------------------------


def test_a_block_commits_on_success(make_pool, db):
    execute(db, "CREATE TABLE t (n int)")
    pool = make_pool()
    with pool.connection() as conn:
        assert conn.info.transaction_status == psycopg2.extensions.TRANSACTION_STATUS_IDLE
        with conn.cursor() as cur:
            cur.execute("INSERT INTO t VALUES (1)")
    assert execute(db, "SELECT n FROM t") == [(1,)]


def test_an_idle_connection_is_reused_and_connect_kwargs_asked_per_new_one(make_pool, dsn):
    config = config_for(dsn)
    calls = []

    def kwargs():
        calls.append(1)
        return config.connect_kwargs()
    pool = make_pool(connect_kwargs_fn=kwargs, validate_after_s=60)
    first = pid_of(pool)
    assert pid_of(pool) == first and len(calls) == 1
    with pool.connection() as a, pool.connection() as b:       # two at once: one more
        assert {a.info.backend_pid, b.info.backend_pid} >= {first} and len(calls) == 2
    assert pool.discarded == 0


def test_json_is_decoded_with_exact_numerics(make_pool):
    pool = make_pool()
    with pool.connection() as conn, conn.cursor() as cur:
        cur.execute("""SELECT '{"a": 0.1, "b": 2}'::jsonb, '[1.25]'::json""")
        jsonb, json_ = cur.fetchone()
    assert jsonb == {"a": decimal.Decimal("0.1"), "b": 2} and type(jsonb["b"]) is int
    assert json_ == [decimal.Decimal("1.25")]


def test_a_connection_that_cannot_be_opened_raises_connect_error_and_frees_its_slot(make_pool, dsn):
    config = config_for(dsn)
    port = free_port()          # nothing listens there
    pool = make_pool(name="nowhere", maxconn=1, connect_kwargs_fn=lambda: config.connect_kwargs(port=port))
    for _ in range(2):          # the second would time out if the first had kept the slot
        with pytest.raises(ConnectError, match="^nowhere: cannot open a pooled connection: "):
            with pool.connection(timeout_s=1.0):
                pass
    assert pool.in_use == 0 and pool.discarded == 0


# -- the limit -----------------------------------------------------------------------------


def test_at_most_maxconn_and_a_waiter_gets_the_released_one(make_pool, db):
    pool = make_pool(maxconn=2, validate_after_s=60)
    first, second = contextlib.ExitStack(), contextlib.ExitStack()
    c1 = first.enter_context(pool.connection())
    c2 = second.enter_context(pool.connection())
    assert pool.in_use == 2
    waiting = threading.Event()
    got = {}

    def waiter():
        waiting.set()
        with pool.connection(timeout_s=10) as conn:
            got["pid"] = conn.info.backend_pid
            got["in_use"] = pool.in_use
    t = threading.Thread(target=waiter, name="waiter")
    t.start()
    try:
        assert waiting.wait(10)
        assert pool_backends(db) == {c1.info.backend_pid, c2.info.backend_pid}
        assert "pid" not in got
        released = c1.info.backend_pid
        first.close()
        wait_for(lambda: "pid" in got, message="the waiter got no connection after one was released")
    finally:
        first.close()
        second.close()
        t.join(10)
    assert got == {"pid": released, "in_use": 2}       # the one released, never a third
    assert pool.in_use == 0
    assert len(pool_backends(db)) == 2


def test_waiting_times_out_with_connect_error(make_pool):
    pool = make_pool(name="busy", maxconn=2)
    with pool.connection(), pool.connection():
        started = time.monotonic()
        with pytest.raises(ConnectError, match=r"^busy: no pooled connection free after 0.2 s$"):
            with pool.connection(timeout_s=0.2):
                pass
        assert time.monotonic() - started >= 0.2
        assert pool.in_use == 2
    # The timed-out wait took no slot: both can be had again at once.
    with pool.connection(timeout_s=1), pool.connection(timeout_s=1):
        assert pool.in_use == 2
    assert pool.in_use == 0


def test_fill_opens_connections_up_to_count_and_maxconn_and_checkouts_take_them(make_pool, dsn, db):
    config = config_for(dsn)
    calls = []

    def kwargs():
        calls.append(1)
        return config.connect_kwargs()
    pool = make_pool(maxconn=2, connect_kwargs_fn=kwargs, validate_after_s=60)
    assert pool.fill(5) == 2 and len(calls) == 2          # bounded by maxconn
    assert len(pool_backends(db)) == 2
    assert pool.fill(2) == 0                              # already there: nothing opened
    with pool.connection() as a, pool.connection() as b:   # both at once: no connect
        assert a.info.backend_pid != b.info.backend_pid
    assert len(calls) == 2
    with pool.connection():
        assert pool.fill(2) == 0                          # one in use counts


def test_fill_after_a_connection_died_opens_its_replacement(make_pool, db):
    pool = make_pool(maxconn=2, validate_after_s=0)
    assert pool.fill(2) == 2
    victim = pid_of(pool)
    terminate(db, victim)
    with pool.connection() as conn:                       # found dead on checkout: the sibling
        assert conn.info.backend_pid != victim
    assert pool.discarded == 1 and pool.fill(2) == 1      # the dead one's replacement
    backends = pool_backends(db)
    assert len(backends) == 2 and victim not in backends


def test_fill_after_close_opens_nothing_and_a_failure_is_left_to_the_next_checkout(make_pool, dsn):
    config = config_for(dsn)
    port = free_port()          # nothing listens there
    broken = make_pool(name="nowhere", connect_kwargs_fn=lambda: config.connect_kwargs(port=port))
    assert broken.fill(2) == 0
    with pytest.raises(ConnectError, match="^nowhere: cannot open a pooled connection: "):
        with broken.connection(timeout_s=1.0):
            pass
    closed = make_pool()
    closed.close()
    assert closed.fill(2) == 0


def test_the_check_of_an_idle_connection_leaves_the_callers_transaction_mode_alone(make_pool, db):
    """The check (one autocommit SELECT 1) runs before every checkout here
    (validate_after_s=0): a block without autocommit still is one transaction."""
    execute(db, "CREATE TABLE t (n int)")
    pool = make_pool(maxconn=1, validate_after_s=0)
    with pool.connection(autocommit=True) as conn:
        assert conn.autocommit
    with pytest.raises(RuntimeError):
        with pool.connection() as conn, conn.cursor() as cur:
            assert not conn.autocommit
            cur.execute("INSERT INTO t VALUES (1)")
            raise RuntimeError("roll it back")
    assert execute(db, "SELECT count(*) FROM t") == [(0,)]


# -- dead connections ----------------------------------------------------------------------


def test_a_terminated_idle_connection_is_discarded_and_replaced(make_pool, db):
    """Idle past validate_after_s (0 here: always): checked on checkout, replaced
    without the caller seeing an error."""
    pool = make_pool(validate_after_s=0)
    old = pid_of(pool)
    terminate(db, old)
    with pool.connection() as conn, conn.cursor() as cur:
        cur.execute("SELECT 1")
        assert cur.fetchone() == (1,)
        new = conn.info.backend_pid
    assert new != old
    assert pool.discarded == 1 and pool.in_use == 0
    assert pid_of(pool) == new          # the replacement is kept


def test_a_connection_used_moments_ago_that_died_fails_once_and_is_discarded(make_pool, db):
    """Returned moments ago (within validate_after_s): handed out unchecked; the
    query fails with a connection error and the connection is not reused."""
    pool = make_pool(validate_after_s=60)
    old = pid_of(pool)
    terminate(db, old)
    with pytest.raises(psycopg2.OperationalError):
        with pool.connection() as conn, conn.cursor() as cur:
            assert conn.info.backend_pid == old
            cur.execute("SELECT 1")
    assert pool.discarded == 1 and pool.in_use == 0
    new = pid_of(pool)
    assert new != old and pid_of(pool) == new


def test_a_dead_connection_gets_its_idle_siblings_checked_before_their_next_use(make_pool, db):
    """Connections that came the same way (a tunnel, a proxy) die together: after one
    is found dead, a retry must not be handed a sibling unchecked (within
    validate_after_s) that died with it."""
    pool = make_pool(maxconn=2, validate_after_s=60)
    with pool.connection() as first, pool.connection() as second:
        pids = {first.info.backend_pid, second.info.backend_pid}
    for pid in pids:
        terminate(db, pid)
    with pytest.raises(psycopg2.OperationalError):
        with pool.connection() as conn, conn.cursor() as cur:
            cur.execute("SELECT 1")
    with pool.connection() as conn, conn.cursor() as cur:     # the sibling is checked, found dead, replaced
        cur.execute("SELECT 1")
        assert conn.info.backend_pid not in pids
    assert pool.discarded == 2


# -- failed transactions -------------------------------------------------------------------


def test_a_failed_transaction_is_rolled_back_and_the_connection_reused(make_pool, db):
    execute(db, "CREATE TABLE t (n int)")
    pool = make_pool(validate_after_s=60)
    with pytest.raises(psycopg2.errors.UndefinedTable):
        with pool.connection() as conn, conn.cursor() as cur:
            pid = conn.info.backend_pid
            cur.execute("INSERT INTO t VALUES (1)")
            cur.execute("SELECT * FROM no_such_table")
    assert execute(db, "SELECT n FROM t") == []         # the insert was rolled back
    with pool.connection() as conn, conn.cursor() as cur:
        assert conn.info.backend_pid == pid             # not discarded: reused
        assert conn.info.transaction_status == psycopg2.extensions.TRANSACTION_STATUS_IDLE
        cur.execute("INSERT INTO t VALUES (2)")
    assert execute(db, "SELECT n FROM t") == [(2,)]
    assert pool.discarded == 0 and pool.in_use == 0


def test_an_error_of_the_caller_rolls_back_and_propagates(make_pool, db):
    execute(db, "CREATE TABLE t (n int)")
    pool = make_pool(validate_after_s=60)
    error = ValueError("mine")
    with pytest.raises(ValueError) as info:
        with pool.connection() as conn, conn.cursor() as cur:
            pid = conn.info.backend_pid
            cur.execute("INSERT INTO t VALUES (1)")
            raise error
    assert info.value is error
    assert execute(db, "SELECT n FROM t") == []
    assert pid_of(pool) == pid and pool.in_use == 0 and pool.discarded == 0


def test_an_error_caught_inside_the_block_leaves_a_usable_connection(make_pool):
    pool = make_pool(validate_after_s=60)
    with pool.connection() as conn, conn.cursor() as cur:
        pid = conn.info.backend_pid
        try:
            cur.execute("SELECT 1/0")
        except psycopg2.errors.DivisionByZero:
            pass
    with pool.connection() as conn, conn.cursor() as cur:
        cur.execute("SELECT 2")
        assert cur.fetchone() == (2,) and conn.info.backend_pid == pid


# -- timeouts ------------------------------------------------------------------------------


def test_statement_timeout_is_set_on_every_connection(make_pool):
    pool = make_pool(statement_timeout_ms=1234)
    with pool.connection() as a, pool.connection() as b:
        for conn in (a, b):
            assert execute(conn, "SHOW statement_timeout") == [("1234ms",)]


def test_a_query_past_statement_timeout_is_cancelled_and_the_connection_kept(make_pool):
    pool = make_pool(statement_timeout_ms=100, validate_after_s=60)
    started = time.monotonic()
    with pytest.raises(psycopg2.errors.QueryCanceled):
        with pool.connection() as conn:
            pid = conn.info.backend_pid
            execute(conn, "SELECT pg_sleep(5)")
    assert time.monotonic() - started < 4
    assert pid_of(pool) == pid
    assert pool.discarded == 0 and pool.timeouts == 0


def test_a_query_past_the_client_deadline_raises_query_timeout(make_pool):
    """The server's statement_timeout cannot reach us on a frozen path: the watcher
    shuts the socket down at the pool's own deadline."""
    pool = make_pool(name="slow", statement_timeout_ms=60_000, deadline_s=0.3, validate_after_s=60)
    started = time.monotonic()
    with pytest.raises(QueryTimeout, match=r"^slow: no answer within 0.3 s") as info:
        with pool.connection() as conn:
            pid = conn.info.backend_pid
            execute(conn, "SELECT pg_sleep(30)")
    assert isinstance(info.value, ConnectError)
    assert 0.3 <= time.monotonic() - started < 5
    assert conn.closed
    assert pool.timeouts == 1 and pool.discarded == 1 and pool.in_use == 0
    assert pid_of(pool) != pid          # a fresh connection, not the shut one


# -- close ---------------------------------------------------------------------------------


def test_no_thread_before_use_then_one_named_watcher_that_ends_on_close(make_pool):
    pool = make_pool(name="orders-pool")
    assert pool.threads() == []
    pid_of(pool)
    pid_of(pool)
    (watcher,) = pool.threads()
    assert watcher.name == "orders-pool-deadlines" and watcher.daemon and watcher.is_alive()
    pool.close()
    assert not watcher.is_alive()


def test_close_closes_idle_connections_and_later_use_raises(make_pool, db):
    pool = make_pool(name="gone", maxconn=1)
    with pool.connection() as conn:
        pid = conn.info.backend_pid
    assert pool_backends(db) == {pid}
    pool.close()
    assert conn.closed
    wait_for(lambda: not pool_backends(db), message="the pool's backends are still there after close()")
    for _ in range(2):      # maxconn=1: the first refusal must not keep the slot
        with pytest.raises(ConnectError, match="^gone: pool is closed$"):
            with pool.connection(timeout_s=1):
                pass
    assert pool.in_use == 0


def test_close_ends_a_query_in_progress(make_pool, db):
    """A thread blocked in a query (say on a frozen path) must not outlive close()."""
    pool = make_pool(statement_timeout_ms=60_000)
    outcome = []

    def query():
        try:
            with pool.connection() as conn:
                outcome.append(conn)
                execute(conn, "SELECT pg_sleep(30)")
        except BaseException as exc:
            outcome.append(exc)
    t = threading.Thread(target=query, name="blocked-query")
    t.start()
    wait_for(lambda: execute(db, "SELECT 1 FROM pg_stat_activity WHERE query = 'SELECT pg_sleep(30)' "
                                 "AND state = 'active'"), message="the query did not start")
    pool.close()
    t.join(5)
    assert not t.is_alive(), "the query outlived close()"
    conn, error = outcome
    assert isinstance(error, QueryTimeout)
    assert conn.closed and pool.in_use == 0


def test_a_connection_returned_after_close_is_closed(make_pool):
    pool = make_pool()
    with pool.connection() as conn:
        pool.close()
    assert conn.closed          # not kept: the pool is closed
    assert pool.in_use == 0
