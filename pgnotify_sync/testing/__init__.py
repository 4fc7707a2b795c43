"""Test against a real server: a throwaway PostgreSQL, a fresh database with the schema, pytest fixtures.

``postgres()`` is the short way, for any test runner::

    from pgnotify_sync import Listener
    from pgnotify_sync.testing import postgres

    with postgres() as pg:                  # a PostgresDatabase
        listener = Listener(pg.config)      # a Config for a fresh database, schema installed
        conn = pg.connect()                 # psycopg2, autocommit; pg.dsn(), pg.url()
        pg.cluster.restart()                # the TemporaryCluster, for fault tests

With pytest, ``pytest_plugins = ["pgnotify_sync.testing.pytest_plugin"]`` gives
the fixtures ``pgnotify_cluster`` (one server per run), ``pgnotify_db`` and
``pgnotify_config`` (a fresh database per test); see pytest_plugin.py.

``TemporaryCluster`` runs ``initdb`` into a private temporary directory and
starts a server on 127.0.0.1 (a free port, durability off); ``cleanup()`` (or
leaving its ``with`` block) stops it and deletes everything.  It needs the
PostgreSQL server binaries (``initdb``, ``pg_ctl``: ``apt-get install
postgresql``), found with ``pg_config --bindir`` or under
``/usr/lib/postgresql/*/bin`` (:func:`find_pg_bindir`).  As root the server
runs as the ``postgres`` OS user.  Everything here fails with
:class:`ClusterError` when the server cannot be created, started or stopped.
"""

from ._cluster import TemporaryCluster
from ._database import TEST_CONFIG, PostgresDatabase, config_for, postgres
from ._server import ClusterError, find_pg_bindir, free_port

__all__ = ["TEST_CONFIG", "ClusterError", "PostgresDatabase", "TemporaryCluster", "config_for", "find_pg_bindir",
           "free_port", "postgres"]
