"""Test against a real server: a throwaway PostgreSQL cluster (``TemporaryCluster``).

``TemporaryCluster`` runs ``initdb`` into a private temporary directory and
starts a server on 127.0.0.1 (a free port, durability off); ``cleanup()`` (or
leaving its ``with`` block) stops it and deletes everything.  It needs the
PostgreSQL server binaries (``initdb``, ``pg_ctl``: ``apt-get install
postgresql``), found with ``pg_config --bindir`` or under
``/usr/lib/postgresql/*/bin`` (:func:`find_pg_bindir`).  As root the server
runs as the ``postgres`` OS user.
"""

from ._cluster import TemporaryCluster
from ._server import ClusterError, find_pg_bindir, free_port

__all__ = ["ClusterError", "TemporaryCluster", "find_pg_bindir", "free_port"]
