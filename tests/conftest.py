"""Shared fixtures: one throwaway PostgreSQL cluster per test session.

Fixtures
    pg_cluster  session  the running TemporaryCluster
    dbname      function a fresh, empty database ``t_<n>``, dropped afterwards
    dsn         function psycopg2.connect(**dsn) keyword arguments for ``dbname``
    db          function autocommit psycopg2 connection to ``dbname``
    admin_db    function autocommit psycopg2 connection to the ``postgres`` database

Every test that (directly or indirectly) uses ``pg_cluster`` gets the
``integration`` marker; tests that start a server of their own (a private
TemporaryCluster, the benchmark in a subprocess) are marked explicitly.  So
``pytest -m "not integration"`` runs the DB-free unit tests without starting
PostgreSQL, and that is enforced: while a test *not* marked ``integration`` runs,
the PostgreSQL server binaries are out of its reach (``_NoPostgres`` below), and a
test that tries to run them fails, naming this rule.  If the cluster cannot
be started, the integration tests error with the ClusterError text; they are never
skipped, so a broken environment cannot pass as green.
"""

import itertools
import os
import tempfile

import pytest

from pgnotify_sync.testing import ClusterError, TemporaryCluster, find_pg_bindir

# Why the session cluster failed to start, if it did (shown by the setup hook).
_cluster_failure = None

_db_counter = itertools.count(1)


def pytest_collection_modifyitems(config, items):
    for item in items:
        if "pg_cluster" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.integration)


def pytest_report_header(config):
    try:
        return f"postgresql bindir: {find_pg_bindir()}"
    except ClusterError as exc:
        return f"postgresql bindir: NOT FOUND ({exc})"


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    _no_postgres.begin(item)
    # Once the cluster failed, fail the remaining integration tests at once with
    # the same message instead of letting each one re-run (and re-wait for) initdb.
    if _cluster_failure is not None and "pg_cluster" in getattr(item, "fixturenames", ()):
        pytest.fail(_cluster_failure, pytrace=False)


# -- no PostgreSQL outside integration tests ----------------------------------------
#
# While a test not marked integration is set up, runs and is torn down:
#  * TemporaryCluster refuses initdb and ``pg_ctl start`` (whatever its bindir), so
#    neither the test nor a session fixture it pulls in can start a server here;
#  * PATH starts with a fake ``pg_config`` whose bindir holds fake initdb, pg_ctl and
#    postgres that record the call and fail: subprocesses (the benchmark, the demo)
#    that find the binaries the usual way (find_pg_bindir) cannot start one either.
# A test that tried fails, naming the rule, even if it caught the error.

NOT_INTEGRATION = ("tests/conftest.py: a test not marked 'integration' tried to run the PostgreSQL "
                   "server ({what}): mark it integration (pytestmark = pytest.mark.integration), "
                   "or `pytest -m \"not integration\"` would start PostgreSQL")

_SHIM = """#!/bin/sh
# tests/conftest.py: PostgreSQL is out of reach of tests not marked integration.
echo "$(basename "$0") $*" >> {log}
echo {message} >&2
exit 97
"""

_REFUSED_COMMANDS = ("initdb", "pg_ctl start")


class _NoPostgres:
    def __init__(self):
        import pathlib
        import shlex
        # Not under pytest's basetemp (mode 0700): as root the cluster code runs the
        # binaries as the postgres OS user, and the fakes must run and record for it too.
        self.root = pathlib.Path(tempfile.mkdtemp(prefix="pgnotify-no-postgres-"))
        self.root.chmod(0o755)
        self.bindir = self.root / "bin"
        self.bindir.mkdir()
        self.bindir.chmod(0o755)
        self.log = self.root / "calls.log"
        self.log.write_text("")
        self.log.chmod(0o666)
        for name in ("initdb", "pg_ctl", "postgres", "pg_config"):
            if name == "pg_config":
                text = f"#!/bin/sh\necho {shlex.quote(str(self.bindir))}\n"
            else:
                text = _SHIM.format(log=shlex.quote(str(self.log)),
                                    message=shlex.quote(NOT_INTEGRATION.format(what=name)))
            (self.bindir / name).write_text(text)
            (self.bindir / name).chmod(0o755)
        self.item = None
        self.tried = []
        self._path = None
        self._log_size = 0
        self._real_run = TemporaryCluster._run
        guard = self

        def run(cluster, argv, what):
            if guard.item is not None and what in _REFUSED_COMMANDS:
                guard.tried.append(what)
                raise ClusterError(NOT_INTEGRATION.format(what=what))
            return guard._real_run(cluster, argv, what)

        TemporaryCluster._run = run

    def begin(self, item):
        if item.get_closest_marker("integration") or self.item is not None:
            return
        self.item, self.tried = item, []
        self._log_size = self.log.stat().st_size
        self._path = os.environ.get("PATH")
        os.environ["PATH"] = f"{self.bindir}{os.pathsep}{self._path or ''}"

    def violations(self):
        with open(self.log) as f:
            f.seek(self._log_size)
            return self.tried + [line for line in f.read().split("\n") if line]

    def check(self, item):
        if self.item is item and self.violations():
            tried = self.violations()
            pytest.fail(NOT_INTEGRATION.format(what=tried[0]) + f"; all: {tried}", pytrace=False)

    def end(self, item):
        if self.item is not item:
            return
        self.item = None
        if self._path is None:
            os.environ.pop("PATH", None)
        else:
            os.environ["PATH"] = self._path

    def close(self):
        import shutil
        TemporaryCluster._run = self._real_run
        shutil.rmtree(self.root, ignore_errors=True)


_no_postgres = None


def pytest_configure(config):
    global _no_postgres
    _no_postgres = _NoPostgres()


def pytest_unconfigure(config):
    if _no_postgres is not None:
        _no_postgres.close()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item):
    result = yield
    _no_postgres.check(item)
    return result


@pytest.hookimpl(wrapper=True, trylast=True)
def pytest_runtest_teardown(item, nextitem):
    try:
        return (yield)
    finally:
        _no_postgres.end(item)


@pytest.fixture(scope="session")
def pg_cluster():
    global _cluster_failure
    # Not under pytest's basetemp: pytest resets /tmp/pytest-of-<user> to mode 0700
    # whenever another pytest run starts, which would lock the postgres OS user out.
    cluster = TemporaryCluster()
    try:
        cluster.start()
    except ClusterError as exc:
        _cluster_failure = f"PostgreSQL test cluster could not be started:\n{exc}"
    if _cluster_failure is not None:
        # Outside the except block so the report is just the message, unchained.
        try:
            cluster.cleanup()
        except ClusterError:
            pass  # the start failure is the error worth reporting
        pytest.fail(_cluster_failure, pytrace=False)
    try:
        yield cluster
    finally:
        cluster.cleanup()


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
