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

from .errors import PgNotifyError, SchemaError, first_line

log = logging.getLogger("pgnotify_sync")

# Rows per chunk: one transaction (and one short REPEATABLE READ snapshot) each.
CHUNK = 1000
# A chunk that failed (database away) is tried again after this long.
RETRY_S = 1.0

_LOCK = ("SELECT last_key::text, done FROM pgnotify_sync.backfills "
         "WHERE consumer = %s AND schema_name = %s AND table_name = %s FOR UPDATE SKIP LOCKED")
_ADVANCE = ("UPDATE pgnotify_sync.backfills SET last_key = %s::json, rows = rows + %s "
            "WHERE consumer = %s AND schema_name = %s AND table_name = %s")
_DONE = ("UPDATE pgnotify_sync.backfills SET done = true, finished_at = now() "
         "WHERE consumer = %s AND schema_name = %s AND table_name = %s")
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


def split_table(name):
    schema, dot, table = name.partition(".")
    return (schema, table) if dot else ("public", name)


def start(conn, consumer, schema, table):
    """Register the backfill (idempotent); returns the table's wire channel."""
    with conn.cursor() as cur:
        cur.execute("SELECT pgnotify_sync.backfill_start(%s, %s, %s)", (consumer, schema, table))
        channel = cur.fetchone()[0]
    conn.commit()
    return channel


def chunk(conn, consumer, schema, table, columns, size=CHUNK):
    """Log the next chunk. Returns the rows logged, 0 once the table is done, None
    if another member holds the backfill now."""
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
            if row is None or row[1]:
                conn.rollback()
                return None if row is None else 0
            last = row[0]
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
                return 0
            last_key = json.dumps({c: json.loads(last_row)[c] for c in columns})
            cur.execute("SELECT pgnotify_sync.backfill_rows(%s, %s, %s, %s::json, %s)",
                        (consumer, schema, table, rows, snapshot))
            cur.execute(_ADVANCE, (last_key, n, consumer, schema, table))
        conn.commit()
        return n
    except BaseException:
        conn.rollback()
        raise


def run(connect, consumer, tables, key_columns, size=CHUNK, stopping=lambda: False, wait=lambda s: None,
        name="backfill", progress=None):
    """Backfill every table of *tables* (``"schema.table"``) for *consumer* until done
    (or *stopping()*); *connect()* gives a connection (closed here), *key_columns*
    a KeyColumns. *progress* (a dict, updated as it goes): {table: {"rows": logged
    here, "done": bool}}. Returns it."""
    logged = {} if progress is None else progress
    conn = None
    try:
        for table in tables:
            schema, relname = split_table(table)
            logged[table] = state = {"rows": 0, "done": False}
            while not stopping():
                try:
                    if conn is None or conn.closed:
                        conn = connect()
                        start(conn, consumer, schema, relname)
                    n = chunk(conn, consumer, schema, relname, key_columns.of(schema, relname), size)
                except (psycopg2.Error, PgNotifyError) as exc:
                    if isinstance(exc, SchemaError) or getattr(exc, "pgcode", None) in ("42501", "42P01"):
                        raise
                    log.warning("%s: backfill of %s: %s (retrying in %g s)", name, table, first_line(exc), RETRY_S)
                    if conn is not None:
                        conn.close()
                    conn = None
                    wait(RETRY_S)
                    continue
                if n == 0:
                    state["done"] = True
                    log.info("%s: backfill of %s for consumer %r done", name, table, consumer,
                             extra={"event": "backfill_done", "details": {"table": table}})
                    break
                if n is None:
                    wait(RETRY_S)       # another member runs it now
                    continue
                state["rows"] += n
    finally:
        if conn is not None:
            conn.close()
    return logged


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
