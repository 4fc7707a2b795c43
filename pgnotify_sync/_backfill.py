"""Backfill: a durable consumer gets a table's existing rows once, as BACKFILL
events, interleaved with its live changes (owns the thread ``<name>-backfill`` of a
Listener; the CLI runs it in its own process).

The watermark method of Netflix's DBLog, with PostgreSQL's snapshots as the
watermarks. Each chunk is one REPEATABLE READ transaction: lock the consumer's
``backfills`` row (``FOR UPDATE SKIP LOCKED``: one member of a group runs each
chunk), read the next chunk of rows in primary-key order with the caller's own
rights, and hand them to ``pgnotify_sync.backfill_rows``, which logs them as
BACKFILL events for this consumer carrying the transaction's snapshot; the progress
(``last_key``) moves in the same transaction, so a crash neither skips nor repeats
a chunk. A listener drops a BACKFILL row when the log holds a committed change of
the same row from a transaction the chunk's snapshot did not see
(:func:`superseded`): that change carries the newer row and reaches the consumer
too, before or after. So a consumer applying BACKFILL as an upsert and live events
as usual ends with exactly the table's contents.
"""

import json
import logging

import psycopg2
from psycopg2 import sql

from ._consumers import MINE
from .errors import PgNotifyError, SchemaError, first_line

log = logging.getLogger("pgnotify_sync")

# Rows per chunk (Config.backfill_chunk_rows): one transaction (and one short
# REPEATABLE READ snapshot) each.
CHUNK = 1000
# A chunk that failed (database away) is tried again after this long.
RETRY_S = 1.0

_LOCK = ("SELECT last_key::text, done, rows FROM pgnotify_sync.backfills "
         "WHERE consumer = %s AND schema_name = %s AND table_name = %s" + MINE + " FOR UPDATE SKIP LOCKED")
# Progress as last committed (another member holds the row now).
_PROGRESS = ("SELECT rows, done FROM pgnotify_sync.backfills "
             "WHERE consumer = %s AND schema_name = %s AND table_name = %s" + MINE)
_ADVANCE = ("UPDATE pgnotify_sync.backfills SET last_key = %s::json, rows = rows + %s "
            "WHERE consumer = %s AND schema_name = %s AND table_name = %s" + MINE + " RETURNING rows")
_DONE = ("UPDATE pgnotify_sync.backfills SET done = true, finished_at = now() "
         "WHERE consumer = %s AND schema_name = %s AND table_name = %s" + MINE)
# Which of these BACKFILL events a committed change of the same row supersedes.
SUPERSEDED_SQL = """
WITH b AS (
    SELECT b.id, b.channel, b.schema_name, b.table_name, (b.old->>'snapshot')::pg_snapshot AS snap,
           (SELECT string_agg(coalesce(b.data->>c, chr(1)), chr(31) ORDER BY n)
              FROM unnest(%(columns)s::text[]) WITH ORDINALITY k(c, n)) AS key
      FROM pgnotify_sync.event_log b WHERE b.id = ANY(%(ids)s)
), since AS (
    SELECT min(pg_snapshot_xmin(snap)) AS xmin FROM b
), live AS (
    SELECT l.xid, (SELECT string_agg(coalesce(l.data->>c, chr(1)), chr(31) ORDER BY n)
                     FROM unnest(%(columns)s::text[]) WITH ORDINALITY k(c, n)) AS key
      FROM pgnotify_sync.event_log l, since
     WHERE l.xid >= since.xmin AND l.channel = %(channel)s AND l.schema_name = %(schema)s
       AND l.table_name = %(table)s AND l.operation IN ('INSERT', 'UPDATE', 'DELETE')
       AND pg_visible_in_snapshot(l.xid, pg_current_snapshot())
)
SELECT DISTINCT b.id FROM b JOIN live ON live.key = b.key AND NOT pg_visible_in_snapshot(live.xid, b.snap)
"""


def describe(exc):
    """A failure's first line, without its text for a data error (class 22: its
    message may quote the value, a key from last_key)."""
    code = getattr(exc, "pgcode", None) or ""
    if code.startswith("22"):
        return f"{type(exc).__name__} (SQLSTATE {code}: a row's value does not fit)"
    return first_line(exc)


def _fatal(exc):
    """Not worth a retry: a schema error, no privilege, no table, no position yet, or
    a data error (a key that no longer fits the table's type)."""
    code = getattr(exc, "pgcode", None) or ""
    return isinstance(exc, SchemaError) or code in ("42501", "42P01", "55000") or code.startswith("22")


def split_table(name):
    schema, dot, table = name.partition(".")
    return (schema, table) if dot else ("public", name)


def start(conn, consumer, schema, table):
    """Register the backfill (idempotent); returns the table's wire channel."""
    with conn.cursor() as cur:
        cur.execute("SELECT pgnotify_sync.backfill_start(%s, %s, %s, current_user::regrole)",
                    (consumer, schema, table))
        channel = cur.fetchone()[0]
    conn.commit()
    return channel


def chunk(conn, consumer, schema, table, columns, size=CHUNK):
    """Log the next chunk. Returns (the rows logged: 0 once the table is done, None
    if another member holds the backfill now; the rows logged by the whole
    backfill so far)."""
    if not columns:
        raise SchemaError(f"backfill of {schema}.{table}: the table has no primary key (its rows cannot be read "
                          "in key order)")
    keys = sql.SQL(", ").join(sql.Identifier(c) for c in columns)
    rel = sql.Identifier(schema, table)
    try:
        with conn.cursor() as cur:
            cur.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
            cur.execute(_LOCK, (consumer, schema, table))
            row = cur.fetchone()
            if row is None:
                cur.execute(_PROGRESS, (consumer, schema, table))
                found = cur.fetchone()
                conn.rollback()
                if found is None:
                    raise SchemaError(f"backfill of {schema}.{table} for consumer {consumer!r}: its row in "
                                      "pgnotify_sync.backfills is gone (dropped while it ran)")
                return (0 if found[1] else None), found[0]
            last, done, total = row
            if done:
                conn.rollback()
                return 0, total
            after = sql.SQL("")
            if last is not None:
                after = sql.SQL("WHERE ({k}) > (SELECT {k} FROM json_populate_record(NULL::{rel}, %(last)s::json))").format(
                    k=keys, rel=rel)
            # The rows go on as the server wrote them (text: numbers stay numbers, as
            # in live events); only the last row is parsed, for its key.
            cur.execute(sql.SQL(
                "SELECT pg_current_snapshot()::text, json_agg(row_to_json(t))::text, "
                "(json_agg(row_to_json(t)) -> -1)::text, count(*) "
                "FROM (SELECT * FROM {rel} t {after} ORDER BY {k} LIMIT %(size)s) t").format(
                    rel=rel, after=after, k=keys), {"last": last, "size": size})
            snapshot, rows, last_row, n = cur.fetchone()
            if n == 0:
                cur.execute(_DONE, (consumer, schema, table))
                conn.commit()
                return 0, total
            last_key = json.dumps({c: json.loads(last_row)[c] for c in columns})
            cur.execute("SELECT pgnotify_sync.backfill_rows(%s, %s, %s, %s::json, %s, current_user::regrole)",
                        (consumer, schema, table, rows, snapshot))
            cur.execute(_ADVANCE, (last_key, n, consumer, schema, table))
            total = cur.fetchone()[0]
        conn.commit()
        return n, total
    except BaseException:
        conn.rollback()
        raise


def run(connect, consumer, tables, key_columns, size=CHUNK, stopping=lambda: False, wait=lambda s: None,
        name="backfill", progress=None, on_chunk=None):
    """Backfill every table of *tables* (``"schema.table"``) for *consumer* until done
    (or *stopping()*); *connect()* gives a connection (closed here), *key_columns*
    a KeyColumns. *progress* (a dict, updated as it goes): {table: {"rows": logged
    by the whole backfill as last seen (every member, every run), "done": bool}};
    ``on_chunk(table, state)`` after each chunk. Returns *progress*."""
    logged = {} if progress is None else progress
    for table in tables:
        logged.setdefault(table, {"rows": 0, "done": False})
    conn = None
    try:
        for table in tables:
            schema, relname = split_table(table)
            state = logged[table]
            started = None      # the connection start() registered this table on
            while not stopping():
                try:
                    if conn is None or conn.closed:
                        conn = connect()
                    if started is not conn:
                        start(conn, consumer, schema, relname)
                        started = conn
                    n, state["rows"] = chunk(conn, consumer, schema, relname, key_columns.of(schema, relname),
                                             size)
                except (psycopg2.Error, PgNotifyError) as exc:
                    if _fatal(exc):
                        raise
                    log.warning("%s: backfill of %s: %s (retrying in %g s)", name, table, describe(exc), RETRY_S)
                    if conn is not None:
                        conn.close()
                    conn = None
                    wait(RETRY_S)
                    continue
                state["done"] = n == 0
                if on_chunk is not None:
                    on_chunk(table, dict(state))
                if n == 0:
                    log.info("%s: backfill of %s for consumer %r done", name, table, consumer,
                             extra={"event": "backfill_done", "details": {"table": table}})
                    break
                if n is None:
                    wait(RETRY_S)       # another member runs it now
    finally:
        if conn is not None:
            conn.close()
    return logged


def run_for(p, tables):
    """A Listener's thread ``<name>-backfill`` (*p*: its parts): once the consumer's
    positions exist (its first session: rows logged before it would lie behind
    them), *tables* for its consumer, with its group's keys."""
    while not p.reader.ready.wait(0.5):
        if p.stop_event.is_set():
            return
    conns = p.connections
    try:
        run(lambda: psycopg2.connect(**conns._pool_connect_kwargs()), p.consumer, tables, p.group.keys,
            p.config.backfill_chunk_rows, stopping=p.stop_event.is_set, wait=p.stop_event.wait, name=p.name,
            progress=p.backfill)
    except (psycopg2.Error, PgNotifyError) as exc:
        p.reporter.report("internal", f"backfill failed: {describe(exc)}", None)


def superseded(query_all, wire, events, key_columns):
    """The ids of the BACKFILL *events* (of channel *wire*) a newer change of their
    row supersedes: one query a table, hashed on the key (no scan per row)."""
    by_table = {}
    for e in events:
        by_table.setdefault((e.schema, e.table), []).append(e.id)
    ids = set()
    for (schema, table), batch in by_table.items():
        ids.update(r[0] for r in query_all(SUPERSEDED_SQL, {
            "ids": batch, "columns": list(key_columns.of(schema, table)), "channel": wire, "schema": schema,
            "table": table}))
    return ids
