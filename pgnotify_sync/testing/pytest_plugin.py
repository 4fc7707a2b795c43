"""pytest fixtures for testing handlers against a real PostgreSQL: one server per run, a fresh database per test.

Opt in from your top-level ``conftest.py`` (it is deliberately not a ``pytest11``
entry point, which would load it into every pytest run on the machine)::

    pytest_plugins = ["pgnotify_sync.testing.pytest_plugin"]

Fixtures
    pgnotify_cluster  session   a running :class:`~pgnotify_sync.testing.TemporaryCluster`,
                                started on first use, deleted at the end of the run
    pgnotify_db       function  a :class:`~pgnotify_sync.testing.PostgresDatabase`: a fresh
                                database with the pgnotify_sync schema installed, dropped
                                afterwards (``.config``, ``.connect()``, ``.dsn()``, ``.cluster``)
    pgnotify_config   function  ``pgnotify_db.config``: a ``Config`` for that database

Example::

    def test_order_handler(pgnotify_db):
        conn = pgnotify_db.connect()
        with conn.cursor() as cur:
            cur.execute("CREATE TABLE orders (id serial PRIMARY KEY, item text)")
        watch_table(conn, "public.orders", channel="orders")
        got = queue.Queue()
        with Listener(pgnotify_db.config) as listener:  # subscribe before start():
            ...                                          # listener.on_event("orders")(got.put)

If the server cannot be started, the tests using it fail (never skip) with the
reason.  For other server settings override ``pgnotify_cluster`` in your
conftest (``TemporaryCluster(settings={...})``, started, yielded, cleaned up).
"""

import pytest

from ._cluster import TemporaryCluster
from ._database import postgres
from ._server import ClusterError


@pytest.fixture(scope="session")
def pgnotify_cluster():
    # Not under pytest's basetemp: pytest resets /tmp/pytest-of-<user> to mode 0700
    # whenever another pytest run starts, which would lock the postgres OS user out.
    cluster = TemporaryCluster()
    failure = None
    try:
        cluster.start()
    except ClusterError as exc:
        failure = f"PostgreSQL test cluster could not be started:\n{exc}"
    if failure is not None:
        # Outside the except block so the report is just the message, unchained.
        try:
            cluster.cleanup()
        except ClusterError:
            pass  # the start failure is the error worth reporting
        pytest.fail(failure, pytrace=False)
    try:
        yield cluster
    finally:
        cluster.cleanup()


@pytest.fixture
def pgnotify_db(pgnotify_cluster):
    with postgres(cluster=pgnotify_cluster) as database:
        yield database


@pytest.fixture
def pgnotify_config(pgnotify_db):
    return pgnotify_db.config
