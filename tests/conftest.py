"""Shared fixtures: one throwaway PostgreSQL cluster per test session.

Fixtures
    pg_cluster  session  the running TemporaryCluster (the plugin's ``pgnotify_cluster``)
    dbname      function a fresh, empty database ``t_<n>``, dropped afterwards
    dsn         function psycopg2.connect(**dsn) keyword arguments for ``dbname``
    db          function autocommit psycopg2 connection to ``dbname``
    admin_db    function autocommit psycopg2 connection to the ``postgres`` database

The cluster is ``pgnotify_sync.testing.pytest_plugin``'s, the one users get (so its
``pgnotify_db`` and ``pgnotify_config`` work here too).  Every test that (directly
or indirectly) uses ``pg_cluster`` or ``pgnotify_cluster`` gets the ``integration``
marker; tests that start a server of their own (a private TemporaryCluster, the
benchmark or a user's suite in a subprocess) are marked explicitly.  So
``pytest -m "not integration"`` runs the DB-free unit tests without starting
PostgreSQL, and that is enforced: while a test *not* marked ``integration`` runs,
the PostgreSQL server binaries are out of its reach (tests/_nopostgres.py), and a
test that tries to run them fails, naming this rule.  If the cluster cannot be
started, the integration tests error with the ClusterError text (pytest keeps the
session fixture's failure: later tests fail at once with it, without another
initdb); they are never skipped, so a broken environment cannot pass as green.
"""

import itertools

import pytest

from pgnotify_sync.testing import ClusterError, find_pg_bindir

pytest_plugins = ["_nopostgres", "pgnotify_sync.testing.pytest_plugin"]

_db_counter = itertools.count(1)

_CLUSTER_FIXTURES = ("pg_cluster", "pgnotify_cluster")


def pytest_collection_modifyitems(config, items):
    for item in items:
        if any(name in getattr(item, "fixturenames", ()) for name in _CLUSTER_FIXTURES):
            item.add_marker(pytest.mark.integration)


def pytest_report_header(config):
    try:
        return f"postgresql bindir: {find_pg_bindir()}"
    except ClusterError as exc:
        return f"postgresql bindir: NOT FOUND ({exc})"


@pytest.fixture(scope="session")
def pg_cluster(pgnotify_cluster):
    return pgnotify_cluster


@pytest.fixture
def dbname(pg_cluster):
    name = f"t_{next(_db_counter)}"
    pg_cluster.create_database(name)
    yield name
    pg_cluster.drop_database(name)


@pytest.fixture
def dsn(pg_cluster, dbname):
    return pg_cluster.conninfo(dbname)


@pytest.fixture
def db(pg_cluster, dbname):
    conn = pg_cluster.connect(dbname, autocommit=True)
    yield conn
    conn.close()


@pytest.fixture
def admin_db(pg_cluster):
    conn = pg_cluster.connect("postgres", autocommit=True)
    yield conn
    conn.close()


# -- listener fixtures (pgnotify_sync itself) ------------------------------------

@pytest.fixture
def installed(db):
    """The fresh database with pgnotify_sync installed and a watched ``messages`` table."""
    from pgnotify_sync import install, watch_table
    install(db)
    with db.cursor() as cur:
        cur.execute("CREATE TABLE messages (id serial PRIMARY KEY, room text, body text, "
                    "password_hash text, n integer)")
    watch_table(db, "public.messages", channel="messages", exclude_columns=("password_hash",))
    return db


def _stream_table(db, mode):
    from pgnotify_sync import install, watch_table
    install(db)
    with db.cursor() as cur:
        cur.execute("CREATE TABLE stream (id serial PRIMARY KEY, w int, v int NOT NULL DEFAULT 0, note text)")
    watch_table(db, "public.stream", channel="stream", mode=mode)
    return db


@pytest.fixture
def stream_db(db):
    """Pgnotify_sync installed and a watched ``stream`` table (the no-loss workload's)."""
    return _stream_table(db, "statement")


@pytest.fixture
def row_stream_db(db):
    """``stream_db`` in row mode: one notification per row (fills the server's queue)."""
    return _stream_table(db, "row")


@pytest.fixture
def proxy(dsn):
    """A TcpProxy (tests/tcpproxy.py: freeze, cut, restore) in front of the test database."""
    from tcpproxy import TcpProxy
    p = TcpProxy(dsn["host"], dsn["port"])
    yield p
    p.close()


@pytest.fixture
def pool(dsn):
    """A ConnectionPool on the test database, built as Listener._require_pool builds one."""
    from pgnotify_sync._pool import ConnectionPool
    from pgutil import config_for
    config = config_for(dsn)
    p = ConnectionPool("test-pool", config.connect_kwargs, config.pool_max_connections,
                       statement_timeout_ms=config.query_timeout_s * 1000)
    yield p
    p.close()


@pytest.fixture
def make_listener(dsn):
    from pgutil import ListenerFactory
    factory = ListenerFactory(dsn)
    yield factory
    factory.stop_all()


# -- sshd fixtures (SSH-tunnel tests; see tests/sshd.py) ----------------------------

@pytest.fixture(scope="session")
def sshd(tmp_path_factory):
    """One throwaway OpenSSH server (tests/sshd.py ``SshServer``) on a free 127.0.0.1
    port for the whole session: user root, key ``sshd.client_key_path``.

    A missing /usr/sbin/sshd or a failed start fails the tests that use it (never
    skips them): pytest caches the failure, so later tests fail at once with it.
    """
    import os
    from sshd import MISSING_SSHD_HINT, SSHD_PATH, SshServer
    if not os.access(SSHD_PATH, os.X_OK):
        pytest.fail(f"{SSHD_PATH} not found, but the SSH-tunnel tests need it: "
                    f"{MISSING_SSHD_HINT}", pytrace=False)
    server = SshServer(tmp_path_factory.mktemp("sshd"))
    try:
        server.start()
    except RuntimeError as exc:
        message = f"test sshd could not be started:\n{exc}"
    else:
        message = None
    if message is not None:
        server.stop()
        pytest.fail(message, pytrace=False)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def ssh_server(sshd):
    """The session ``sshd``, running at the start of the test (restarted on the same
    port if an earlier test stopped it or it died); at the end, every session the test
    left frozen (SIGSTOP) is thawed, so nothing stays hung into the next test."""
    if not sshd.running:
        sshd.start()
    try:
        yield sshd
    finally:
        sshd.thaw_all()
