"""The superuser's SQL on a cluster: create and drop databases, end client backends.

Each function takes an autocommit cursor on the ``postgres`` database and the
server's version number (``conn.server_version``), and picks the statement that
version supports.
"""

from psycopg2 import sql


def create_database(cur, name):
    cur.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))


def drop_database(cur, server_version, name):
    """Drop *name* if it exists, disconnecting anyone still using it."""
    ident = sql.Identifier(name)
    if server_version >= 130000:
        cur.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(ident))
    else:
        terminate_backends(cur, server_version, name, None)
        cur.execute(sql.SQL("DROP DATABASE IF EXISTS {}").format(ident))


def terminate_backends(cur, server_version, dbname, application_name):
    """pg_terminate_backend every other client backend matching the filters; return how many."""
    # The timeout form (PG 14+) makes the call return only once the backend is
    # gone, so callers observe the disconnect without polling.
    call = "pg_terminate_backend(pid, 5000)" if server_version >= 140000 else "pg_terminate_backend(pid)"
    cur.execute(
        f"""
        SELECT count(*) FILTER (WHERE {call})
        FROM pg_stat_activity
        WHERE pid <> pg_backend_pid()
          AND backend_type = 'client backend'
          AND (%(db)s::text IS NULL OR datname = %(db)s)
          AND (%(app)s::text IS NULL OR application_name = %(app)s)
        """,
        {"db": dbname, "app": application_name},
    )
    return cur.fetchone()[0]
