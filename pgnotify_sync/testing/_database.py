"""A fresh database with the pgnotify_sync schema for tests: ``postgres()`` yields a ``PostgresDatabase``.

Example::

    from pgnotify_sync import Listener, watch_table
    from pgnotify_sync.testing import postgres

    with postgres() as pg:                       # throwaway server, fresh database, schema installed
        conn = pg.connect()                      # autocommit psycopg2 connection
        ...                                      # CREATE TABLE orders ...; watch_table(conn, ...)
        with Listener(pg.config) as listener:    # a Config for this database
            ...
        pg.cluster.restart()                     # faults: restart, stop/start, terminate_backends

The names follow testing.postgresql (``dsn()``: ``psycopg2.connect(**pg.dsn())``,
``url()``) and pytest-postgresql (``host``, ``port``, ``user``, ``password``,
``dbname``).
"""

import contextlib
import itertools
import os
import urllib.parse

from ..config import Config
from ..schema import install as install_schema
from ._cluster import TemporaryCluster

#: What :func:`config_for` sets beyond the connection (the demo's values): a
#: restarted server or an ended backend is reconnected to 0.1 s later, a silent
#: path is noticed within seconds.  Any of them can be overridden.
TEST_CONFIG = {"reconnect_delay_ms": 100, "health_check_interval_s": 2.0}

_names = itertools.count(1)


def config_for(cluster, dbname, **overrides):
    """A :class:`~pgnotify_sync.Config` for database *dbname* of *cluster*.

    :data:`TEST_CONFIG` values, then *overrides* (any ``Config`` field, e.g.
    ``channels=("orders",)``).
    """
    info = cluster.conninfo(dbname)
    values = dict(postgres_host=info["host"], postgres_port=info["port"], postgres_user=info["user"],
                  postgres_password=info["password"], postgres_db=info["dbname"], **TEST_CONFIG)
    values.update(overrides)
    return Config(**values)


class PostgresDatabase:
    """One database of a running :class:`TemporaryCluster`, as :func:`postgres` yields it.

    ``cluster``
        the TemporaryCluster (``restart()``, ``stop()``/``start()``,
        ``terminate_backends(dbname, application_name)`` for fault tests).
    ``dbname``, ``host``, ``port``, ``user``, ``password``
        where it is (read from the cluster, so they follow a port change).
    ``config``
        a :class:`~pgnotify_sync.Config` for it (:func:`config_for` with the
        overrides given to :func:`postgres`); change it with ``attrs.evolve``.
    """

    def __init__(self, cluster, dbname, config_overrides=None):
        self.cluster = cluster
        self.dbname = dbname
        self._config_overrides = dict(config_overrides or {})

    host = property(lambda self: self.cluster.host)
    port = property(lambda self: self.cluster.port)
    user = property(lambda self: self.cluster.user)
    password = property(lambda self: self.cluster.password)

    @property
    def config(self):
        return config_for(self.cluster, self.dbname, **self._config_overrides)

    def dsn(self):
        """``psycopg2.connect(**dsn())`` keyword arguments: host, port, user, password, dbname."""
        return self.cluster.conninfo(self.dbname)

    def url(self):
        """``postgresql://user:password@host:port/dbname`` (SQLAlchemy and libpq accept it)."""
        quote = urllib.parse.quote
        return (f"postgresql://{quote(self.user, safe='')}:{quote(self.password, safe='')}"
                f"@{self.host}:{self.port}/{quote(self.dbname, safe='')}")

    def connect(self, autocommit=True):
        """A new psycopg2 connection to this database (the caller closes it)."""
        return self.cluster.connect(self.dbname, autocommit=autocommit)

    def __repr__(self):
        return f"<PostgresDatabase {self.dbname!r} on {self.host}:{self.port}>"


@contextlib.contextmanager
def postgres(install=True, cluster=None, dbname=None, **config):
    """Yield a :class:`PostgresDatabase`: a fresh database, with the schema if *install*.

    Without *cluster* a :class:`TemporaryCluster` is started for the block and
    deleted after it.  With one (already started; the pytest plugin passes its
    session cluster) only the database is created, and dropped after the block;
    a cluster the block left stopped is started again first, so the next user
    finds it running.  *dbname* defaults to a new ``pgnotify_test_<pid>_<n>``;
    *config* overrides :func:`config_for`'s values (any ``Config`` field).
    """
    with contextlib.ExitStack() as stack:
        shared = cluster is not None
        if not shared:
            cluster = stack.enter_context(TemporaryCluster())
        name = dbname or _new_name()
        config_for(cluster, name, **config)      # a wrong override fails here, before anything is created
        cluster.create_database(name)
        if shared:
            stack.callback(_drop_database, cluster, name)
        database = PostgresDatabase(cluster, name, config)
        if install:
            conn = database.connect()
            try:
                install_schema(conn)
            finally:
                conn.close()
        yield database


def _new_name():
    return f"pgnotify_test_{os.getpid()}_{next(_names)}"


def _drop_database(cluster, name):
    if not cluster.is_running():
        cluster.start()
    cluster.drop_database(name)
