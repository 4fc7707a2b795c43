"""Row keys: which row an event is about, and its partition (no thread, no lock of
its own beyond the cache's).

A table event's key is its table and the values of the table's primary-key columns
(from ``data``, which is the deleted row for a DELETE). A published event's key is
its id. An event whose key columns are not in the row (no primary key, an excluded
key column) is keyed by its table alone: all of that table's events then share one
key, which keeps them in order. A row's partition is a stable hash of its key
(CRC-32 of a canonical text, each value tagged with its JSON type: the same in
every process and on every host), modulo the partition count.

Consumer groups (_group.py) and ``ordering="row"`` (_delivery.py) use the same key.
"""

import decimal
import json
import threading
import zlib

from ._consumers import MINE
from .events import Operation

# The key columns of each table, from the catalog: used where no group fixed them.
CATALOG_KEY_SQL = """
SELECT coalesce(ARRAY(SELECT a.attname::text
                        FROM pg_index i
                        CROSS JOIN LATERAL unnest(i.indkey) WITH ORDINALITY k(attnum, n)
                        JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum
                       WHERE i.indrelid = to_regclass(format('%%I.%%I', %(schema)s, %(table)s)) AND i.indisprimary
                       ORDER BY k.n), '{}')
"""

# A consumer group's key columns of a table: the first member to meet it fixes them.
_FIX_KEY = ("INSERT INTO pgnotify_sync.consumer_keys (name, schema_name, table_name, columns) "
            "VALUES (%(name)s, %(schema)s, %(table)s, (" + CATALOG_KEY_SQL + ")) ON CONFLICT DO NOTHING")
_KEY = ("SELECT columns FROM pgnotify_sync.consumer_keys "
        "WHERE name = %(name)s AND schema_name = %(schema)s AND table_name = %(table)s" + MINE)


class KeyColumns:
    """Each table's key columns, looked up once: *lookup(schema, table)* returns them
    (a tuple, empty for a table without a primary key); *known* pre-fills the cache."""

    def __init__(self, lookup, known=None):
        self._lookup = lookup
        self._lock = threading.Lock()
        self._columns = dict(known or {})

    def update(self, known):
        with self._lock:
            self._columns.update(known)

    def of(self, schema, table):
        key = (schema, table)
        columns = self._columns.get(key)
        if columns is None:
            columns = tuple(self._lookup(schema, table))
            with self._lock:
                columns = self._columns.setdefault(key, columns)
        return columns


def catalog_keys(query_one):
    """KeyColumns from each table's primary key (*query_one(sql, params)*: one row)."""
    return KeyColumns(lambda schema, table: query_one(CATALOG_KEY_SQL, {"schema": schema, "table": table})[0])


def group_key_columns(cur, consumer, schema, table):
    """Consumer group *consumer*'s key columns of *schema.table*: as stored, or the
    table's primary key, stored now (the caller commits)."""
    params = {"name": consumer, "schema": schema, "table": table}
    cur.execute(_FIX_KEY, params)
    cur.execute(_KEY, params)
    row = cur.fetchone()
    return tuple(row[0]) if row else ()


def row_key(event, key_columns):
    """The key of the row *event* is about: a tuple of its table and its key
    columns' values, each as canonical text (see :func:`key_text`)."""
    if event.operation is Operation.PUBLISH:
        return ("", "", _text(event.id))
    schema, table = event.schema, event.table
    columns = key_columns.of(schema, table)
    if columns:
        try:        # data: for a DELETE, the deleted row
            return (schema, table, *map(_text, map(event.data.__getitem__, columns)))
        except (KeyError, AttributeError):
            pass    # a key column excluded (or no row): the table's key
    return (schema, table)


_JSON = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)


def _text(value):
    """A key value as text tagged with its type (1, "1" and true differ); a JSON
    value decoded from the log always gives the same text."""
    cls = type(value)
    if cls is int:
        return f"i{value}"
    if cls is str:
        return f"s{value}"
    if cls is decimal.Decimal:
        return f"d{value}"
    return f"j{_JSON.encode(value)}"        # bool, None, float, objects, arrays


def key_hash(key):
    """A stable 32-bit hash of *key* (the same in every process)."""
    return zlib.crc32("\x1f".join(key).encode())


def partition_of(event, key_columns, partitions):
    """The partition (0 .. partitions-1) of *event*."""
    if partitions == 1:
        return 0
    return key_hash(row_key(event, key_columns)) % partitions
