"""Every query of the event log, and the building of events from its rows.

Used by the listener (hinted rows, statement ranges, catch-up pages, the position
check, lag, retention), the
SSE bridge (replay after ``Last-Event-ID``) and the CLI (``status``). No thread of
its own: each call borrows a pooled connection for one query.

The log is the truth: whatever a notification said, the events handed to handlers
are built here from rows read on our own connection.
"""

import bisect
import contextlib
import itertools
import logging

import psycopg2
import psycopg2.errors

from ._pages import WIDE, RangeRows, page_rows
from ._snapshot import Snapshot
from .errors import ConnectError, PgNotifyError, PrivilegeError, first_line
from .events import OPERATIONS, DatabaseEvent, loads

log = logging.getLogger("pgnotify_sync")

# A catch-up page holds at most this many rows (and PAGE_BYTES): a page is one
# query and one parse; bigger pages save little and hold more memory.
CATCHUP_PAGE = 5000
# A statement's rows are read in pages of at most this many rows (and PAGE_BYTES).
RANGE_PAGE = 20_000
# Retention examines at most this many rows per statement: each batch is its own
# short transaction (a large backlog in one statement would never finish within
# the statement timeout).
TRIM_BATCH = 10_000
# The SSE replay reads this many rows per query.
REPLAY_PAGE = 5000

# Rows come back as one JSON text per (operation, schema, table) group, a flat array
# [id, xid, data, old, id, xid, data, old, ...] in id order: one C-speed parse per
# page and no per-row repetition of the names. String concatenation costs the server
# less than json_agg(json_build_array(...)) and the client parses a third less text.
# A statement's range is one group; a catch-up page has a group per table and
# operation, merged by id on the client.
#
# A page is bounded by bytes as well as rows: it ends with the row that reaches
# PAGE_BYTES of row text (at least one row), so wide rows never build a text near
# PostgreSQL's 1 GB limit, and what a page holds in memory stays small. The last
# column says the page was cut there (the caller reads on after its last id).
PAGE_BYTES = 4 << 20
# Each row's text is one concat_ws() call (a third of the server's cost of a chain
# of ||), the running size a ROWS frame (cheaper than the default RANGE frame: ids
# are unique, so the sums are the same).
_SIZED = ("FROM (SELECT *, sum(size) OVER (ORDER BY id ROWS UNBOUNDED PRECEDING) AS upto "
          "      FROM (SELECT *, coalesce(octet_length(data::text), 4) + coalesce(octet_length(old::text), 4) AS size "
          # sized after the LIMIT (its own level: a subquery with LIMIT is not flattened),
          # else the planner may size every row of the range for each page
          "            FROM (SELECT id, xid, operation, schema_name, table_name, data, old "
          "                    FROM pgnotify_sync.event_log WHERE {where} ORDER BY id {limit}) l) w) r "
          "WHERE upto - size < %(max_bytes)s")
_ROWS = ("SELECT operation, schema_name, table_name, '[' || string_agg(concat_ws(',', id, xid, "
         "coalesce(data::text, 'null'), coalesce(old::text, 'null')), ',' ORDER BY id) || ']', "
         "bool_or(upto >= %(max_bytes)s) " + _SIZED + " GROUP BY 1, 2, 3")
# A statement's rows share one operation and table: a range page is one aggregate
# without GROUP BY (its sort) or ORDER BY in string_agg (a second sort), the names
# checked with min = max (a range whose rows are not all alike, several statements
# of one transaction on different tables or operations, merged by the reader or
# named by a forged hint, is read again with _ROWS), the xid left out of the text
# (the WHERE names it) and the id order checked by the client (the rows come in id
# order; nothing is assumed). A quarter less of the server's time a page.
_C = ' COLLATE "C"'
_ONE_GROUP = ("SELECT min(operation{c}), max(operation{c}), min(schema_name{c}), max(schema_name{c}), "
              "min(table_name{c}), max(table_name{c}), '[' || string_agg(concat_ws(',', id, "
              "coalesce(data::text, 'null'), coalesce(old::text, 'null')), ',') || ']', "
              "bool_or(upto >= %(max_bytes)s) ").format(c=_C) + _SIZED

# A BACKFILL row is for one consumer only (the one whose backfill logged it, under
# the role that registered that backfill): every read of a listener leaves out the
# others, so they are never read, delivered, counted as lag or replayed to a
# browser, and a role that logs rows for a consumer name of its own invents nothing
# for another role's consumer of that name. Plain rows pass on the first test.
# (coalesce: never NULL, so NOT MINE is its complement; a listener without a
# consumer passes NULL.)
# The role is current_user's, as the consumer's positions record it (a login role
# that switches role with SET ROLE or ALTER ROLE ... SET role reads as that role).
MINE = ("(operation <> 'BACKFILL' OR coalesce(old->>'backfill_for' = %(consumer)s "
        "AND old->>'role' = to_regrole(quote_ident(current_user))::oid::text, false))")

# Events of transactions visible in snapshot %(to)s and not in %(pos)s: what a
# catch-up reads and what the position check lists (see _window_params).
_BECAME_VISIBLE = """channel = %(channel)s
   AND xid >= %(pos_xmin)s::text::xid8 AND xid < %(to_xmax)s::text::xid8
   AND pg_visible_in_snapshot(xid, %(to)s::pg_snapshot)
   AND NOT pg_visible_in_snapshot(xid, %(pos)s::pg_snapshot)
   AND """ + MINE

_CATCHUP_SQL = _ROWS.format(where=_BECAME_VISIBLE + " AND id > %(after)s", limit="LIMIT %(limit)s")

# xid compared through coalesce() on purpose: not indexable, so the planner takes the
# id range on the primary key. With "xid = X" it may pick the xid index and walk
# every entry of a big transaction for each 1000-row range (seen on a log without
# statistics yet). (xid::text = X did the same at twice the cost a row.)
_RANGE_WHERE = ("id BETWEEN %(first)s AND %(last)s AND coalesce(xid, '0'::xid8) = %(xid)s::xid8 "
                "AND channel = %(channel)s AND " + MINE)
_RANGE_SQL = _ONE_GROUP.format(where=_RANGE_WHERE, limit="LIMIT %(limit)s")
_RANGE_SQL_GROUPED = _ROWS.format(where=_RANGE_WHERE, limit="LIMIT %(limit)s")
# The first page of a slice, without the window of the byte bound (half the
# server's time a page): rows wider than %(row_max)s bytes are left out of the
# text and the first one's id returned, where the client cuts the page (the rest
# comes by _RANGE_SQL). row_max is 2 * PAGE_BYTES over the rows the page may hold
# (FAST_PAGE, or fewer ids left in the range), so a page is at most 2 * PAGE_BYTES
# of row text. (octet_length of a compressed or TOASTed value reads its header:
# sizing a wide row costs no decompression.)
_RANGE_FAST_SQL = (
    "SELECT min(operation{c}), max(operation{c}), min(schema_name{c}), max(schema_name{c}), "
    "min(table_name{c}), max(table_name{c}), '[' || string_agg(concat_ws(',', id, coalesce(data::text, 'null'), "
    "coalesce(old::text, 'null')), ',') FILTER (WHERE size <= %(row_max)s) || ']', "
    "min(id) FILTER (WHERE size > %(row_max)s) "
    "FROM (SELECT *, coalesce(octet_length(data::text), 4) + coalesce(octet_length(old::text), 4) AS size "
    "      FROM (SELECT id, operation, schema_name, table_name, data, old FROM pgnotify_sync.event_log "
    "             WHERE {w} ORDER BY id LIMIT %(limit)s) l) s").format(c=_C, w=_RANGE_WHERE)
FAST_PAGE = 10_000
# A range none of whose rows is this listener's: how many are another consumer's
# BACKFILL rows (a backfill's chunk is one statement: all of its rows are, or none).
_OTHERS_SQL = ("SELECT count(*) FROM pgnotify_sync.event_log WHERE id BETWEEN %(first)s AND %(last)s "
               "AND xid::text = %(xid)s AND channel = %(channel)s AND NOT " + MINE)

# Hints read together: the ids are checked against the channel here, the xids by
# the worker (a hint must name the row's own transaction). A plain query, the json
# parsed by the driver (the pool registers our loads): a third of _ROWS's cost for
# the one-row reads of light traffic, where planning _ROWS dominated (0.19 against
# 0.64 ms a read here), and cheaper for 256 ids too. At most HINT_READ rows a query:
# memory is bounded by a count of events, as the event buffer is.
#
# Without MINE: this is the read of every single-row event, and planning MINE cost
# 20-50 us a read here (p50 commit -> handler 0.49 against 0.39 ms). No BACKFILL row
# is ever hinted by id (a chunk sends a range), so the worker takes one a hint names
# for a forged hint (_worker.py).
_IDS_SQL = ("SELECT id, xid::text::bigint, operation, schema_name, table_name, data, old "
            "FROM pgnotify_sync.event_log WHERE id = ANY(%(ids)s) AND channel = %(channel)s ORDER BY id")
# ... and with MINE, for ids that come from anywhere but a hint: the position
# check's and a dead letter's (its row may be another role's, made up).
_MINE_IDS_SQL = _IDS_SQL.replace(" ORDER BY id", " AND " + MINE + " ORDER BY id")
HINT_READ = 256

# The position check: (id, xid) of events of transactions that became visible.
_WINDOW_SQL = "SELECT id, xid::text::bigint FROM pgnotify_sync.event_log WHERE " + _BECAME_VISIBLE

_REPLAY_SQL = """
SELECT id, xid::text::bigint, operation, schema_name, table_name, data, old, channel
  FROM pgnotify_sync.event_log
 WHERE channel = ANY(%(wires)s) AND id > %(after)s AND """ + MINE + """
 ORDER BY id
 LIMIT %(limit)s
"""

_REPLAY_SIZE_SQL = """
SELECT (SELECT count(*) FROM (SELECT 1 FROM pgnotify_sync.event_log
                               WHERE channel = ANY(%(wires)s) AND id > %(after)s AND """ + MINE + """
                               ORDER BY id LIMIT %(most)s) s),
       (SELECT max(id) FROM pgnotify_sync.event_log WHERE channel = ANY(%(wires)s) AND id > %(after)s)
"""

_PENDING_SQL = ("SELECT count(*) FROM pgnotify_sync.event_log WHERE channel = %(channel)s "
                "AND xid >= %(xmin)s::text::xid8 AND NOT pg_visible_in_snapshot(xid, %(pos)s::pg_snapshot) AND " +
                MINE)

_repeat = itertools.repeat


class CatchUpFailed(Exception):
    """The log could not be read; the channel retries later."""


def _event_id(event):
    return event.id


@contextlib.contextmanager
def _readable():
    """A read of the log that fails (server away, pool closed) raises CatchUpFailed:
    the channel falls back and retries."""
    try:
        yield
    except (psycopg2.Error, PgNotifyError) as exc:
        raise CatchUpFailed(first_line(exc)) from exc


def _window_params(wire, position, target, consumer):
    return {"channel": wire, "pos_xmin": str(position.xmin), "to_xmax": str(target.xmax),
            "to": str(target), "pos": str(position), "consumer": consumer}


class EventLog:
    """The event log, read and trimmed on connections of *pool*, for durable
    consumer *consumer* (None: a listener without one; see MINE)."""

    def __init__(self, pool, timeout_s, consumer=None):
        self._pool = pool
        self._timeout_s = timeout_s     # to get a pooled connection, where a caller waits
        self._consumer = consumer

    def snapshot(self):
        """The server's current snapshot (the target of a catch-up)."""
        with _readable(), self._pool.connection(autocommit=True) as conn, conn.cursor() as cur:
            cur.execute("SELECT pg_current_snapshot()::text")
            return Snapshot.parse(cur.fetchone()[0])

    def _read(self, channel, sql_text, params):
        """Events of *channel* from one page (see _ROWS) and whether the page was cut
        by its byte bound (more rows may follow its last id); CatchUpFailed if it
        cannot be read. (Reads are single statements in autocommit: one round trip,
        not BEGIN, the query and COMMIT.)"""
        params["max_bytes"] = PAGE_BYTES
        params["consumer"] = self._consumer
        with _readable(), self._pool.connection(autocommit=True) as conn, conn.cursor() as cur:
            cur.execute(sql_text, params)
            groups = cur.fetchall()
        ops = OPERATIONS
        events = []
        extend = events.extend
        cut = False
        for op, schema, table, text, group_cut in groups:
            flat = loads(text)
            cut = cut or group_cut
            # map() over slices builds the events from C: a quarter cheaper than a
            # comprehension unpacking the flat list.
            extend(map(DatabaseEvent, _repeat(channel), _repeat(ops[op]), _repeat(schema), _repeat(table),
                       flat[2::4], flat[3::4], flat[0::4], flat[1::4]))
        if len(groups) > 1:
            events.sort(key=_event_id)
        return events, cut

    def catchup_page(self, channel, wire, position, target, after, previous=None, limit=CATCHUP_PAGE):
        """Events of transactions visible in *target* but not in *position*, above id
        *after*, in id order: one page (of at most *limit* rows, and CATCHUP_PAGE) and
        whether more may follow."""
        limit = page_rows(min(limit, CATCHUP_PAGE), previous)
        params = _window_params(wire, position, target, self._consumer)
        params.update(limit=limit, after=after)
        events, cut = self._read(channel, _CATCHUP_SQL, params)
        return events, cut or len(events) == limit

    def range_rows(self, channel, wire, rng, after=0, previous=None, limit=RANGE_PAGE):
        """The rows of one statement (an EventRange) above id *after*: one page of at
        most *limit* rows (and RANGE_PAGE; *previous*: RangeRows.previous of the page
        before it) as :class:`RangeRows`,
        whose events are built when asked for (the worker builds them a chunk at a
        time, as it delivers), and whether more follow.

        The first page (and one after a full first page) is read by _RANGE_FAST_SQL;
        after a page cut by a wide row, or by bytes, the rest by _RANGE_SQL."""
        most = min(limit, RANGE_PAGE)
        fast = min(FAST_PAGE, most)
        first = max(rng.first, after + 1)
        params = {"first": first, "last": rng.last, "xid": str(rng.xid), "channel": wire,
                  "max_bytes": PAGE_BYTES, "consumer": self._consumer}
        if previous is None or previous == fast:
            # A page holds at most as many rows as the range has ids left: a short
            # range allows wider rows for the same bytes.
            params.update(limit=fast, row_max=2 * PAGE_BYTES // max(1, min(fast, rng.last - first + 1)))
            rows, more = self._range_query(channel, _RANGE_FAST_SQL, params, rng.xid)
            if rows is not None:
                return rows, more
            previous = WIDE         # its first row is wider than row_max: read by bytes
        params["limit"] = most if previous == WIDE else page_rows(most, previous)
        return self._range_query(channel, _RANGE_SQL, params, rng.xid)

    def _range_query(self, channel, sql_text, params, xid):
        """One page of a range by *sql_text* (_RANGE_SQL or _RANGE_FAST_SQL): its
        RangeRows and whether more may follow; (None, True) if the fast read's
        first row was too wide for it."""
        limit = params["limit"]
        with _readable(), self._pool.connection(autocommit=True) as conn, conn.cursor() as cur:
            cur.execute(sql_text, params)
            op, op_, schema, schema_, table, table_, text, cut = cur.fetchone()
        wide = cut if sql_text is _RANGE_FAST_SQL else None      # the first too wide row's id, or None
        if text is None:
            return (None, True) if wide is not None else (RangeRows.of([]), False)
        if op != op_ or schema != schema_ or table != table_:
            events, cut = self._read(channel, _RANGE_SQL_GROUPED, params)   # rows of several statements
            return RangeRows.of(events), cut or len(events) == limit
        flat = loads(text)
        ids = flat[0::3]
        if ids != sorted(ids):
            # (the rows come in id order from the index scan; nothing is assumed)
            order = sorted(range(len(ids)), key=ids.__getitem__)
            flat = [v for i in order for v in flat[3 * i:3 * i + 3]]
            ids = flat[0::3]
        if wide is not None:
            # only the rows before the first wide one: the page ends there
            keep = bisect.bisect_left(ids, wide)
            if keep == 0:
                return None, True
            del flat[3 * keep:]
            ids = flat[0::3]
        rows = RangeRows(channel, OPERATIONS[op], schema, table, xid, flat, ids, wide=wide is not None)
        return rows, wide is not None or bool(cut) or len(ids) == limit

    def others_in_range(self, wire, rng):
        """How many rows of statement *rng* are another consumer's BACKFILL rows
        (asked only of a range that gave this listener none)."""
        return self.query_one(_OTHERS_SQL, {"first": rng.first, "last": rng.last, "xid": str(rng.xid),
                                            "channel": wire, "consumer": self._consumer})[0]

    def events_by_id(self, channel, wire, ids, mine=False):
        """The committed events of channel *wire* among log ids *ids*, in id order
        (HINT_READ ids a query); with *mine*, no other consumer's BACKFILL row (see
        MINE). CatchUpFailed if the log cannot be read."""
        ids = sorted(set(ids))
        found = []
        ops = OPERATIONS
        sql = _MINE_IDS_SQL if mine else _IDS_SQL
        with _readable(), self._pool.connection(autocommit=True) as conn, conn.cursor() as cur:
            for start in range(0, len(ids), HINT_READ):
                cur.execute(sql, {"ids": ids[start:start + HINT_READ], "channel": wire, "consumer": self._consumer})
                found.extend(DatabaseEvent(channel, ops[op], schema, table, data, old, ident, xid)
                             for ident, xid, op, schema, table, data, old in cur.fetchall())
        return found

    def window(self, wire, position, target):
        """(id, xid) of every event of channel *wire* whose transaction is visible
        in *target* and not in *position*; CatchUpFailed if the log cannot be read."""
        with _readable(), self._pool.connection(autocommit=True) as conn, conn.cursor() as cur:
            cur.execute(_WINDOW_SQL, _window_params(wire, position, target, self._consumer))
            return cur.fetchall()

    def query_all(self, sql, params):
        """Every row of *sql* (autocommit, the pool's deadline)."""
        with _readable(), self._pool.connection(autocommit=True) as conn, conn.cursor() as cur:
            cur.execute(sql, params)
            return cur.fetchall()

    def query_one(self, sql, params):
        """One row of *sql* (autocommit, the pool's deadline): the poller's query."""
        with _readable(), self._pool.connection(autocommit=True) as conn, conn.cursor() as cur:
            cur.execute(sql, params)
            return cur.fetchone()

    def replay(self, channels_by_wire, after):
        """Every event of these channels above id *after*, in id order (the SSE
        replay; ``channels_by_wire`` maps wire names to logical ones)."""
        return [event for page in self.replay_pages(channels_by_wire, after) for event in page]

    def replay_pages(self, channels_by_wire, after):
        """:meth:`replay` as pages of at most REPLAY_PAGE events, each read on a
        connection of its own when asked for: a long replay holds neither a
        connection nor more than a page in memory."""
        while True:
            with self._pool.connection(timeout_s=self._timeout_s) as conn, conn.cursor() as cur:
                cur.execute(_REPLAY_SQL, {"wires": list(channels_by_wire), "after": after, "limit": REPLAY_PAGE,
                                          "consumer": self._consumer})
                rows = cur.fetchall()
            yield [DatabaseEvent(channels_by_wire[wire], OPERATIONS[operation], schema, table, data, old, ident, xid)
                   for ident, xid, operation, schema, table, data, old, wire in rows]
            if len(rows) < REPLAY_PAGE:
                return
            after = rows[-1][0]

    def replay_size(self, wires, after, most):
        """(events of channels *wires* above id *after*, counted up to *most*; the
        newest log id of those channels, or *after*)."""
        with self._pool.connection(timeout_s=self._timeout_s) as conn, conn.cursor() as cur:
            cur.execute(_REPLAY_SIZE_SQL, {"wires": list(wires), "after": after, "most": most,
                                           "consumer": self._consumer})
            count, newest = cur.fetchone()
            return count, newest if newest is not None else after

    def pending(self, wire, position):
        """Logged events of *wire* in transactions not visible in *position*."""
        with self._pool.connection(timeout_s=self._timeout_s) as conn, conn.cursor() as cur:
            cur.execute(_PENDING_SQL, {"channel": wire, "xmin": str(position.xmin), "pos": str(position),
                                       "consumer": self._consumer})
            return cur.fetchone()[0]

    def trim(self, name, retention_s, consumer_retention_s, stopping, on_batch):
        """Trim the log in bounded batches (TRIM_BATCH rows, each its own short
        transaction) until done or ``stopping()``; ``on_batch(rows deleted)`` after
        each. Returns the rows deleted; ConnectError if the database fails."""
        deleted = 0
        after = 0
        try:
            while after is not None and not stopping():
                n, after = self.trim_batch(retention_s, consumer_retention_s, after)
                deleted += n
                on_batch(n)
        except psycopg2.errors.InsufficientPrivilege as exc:
            raise PrivilegeError(f"{name}: this role may not trim the event log ({first_line(exc)}): retention is "
                                 "left to a role given grant_admin (or the installer)") from exc
        except psycopg2.Error as exc:
            raise ConnectError(f"{name}: cleanup failed after deleting {deleted} rows: {first_line(exc)}") from exc
        if deleted:
            log.info("%s: retention deleted %d event-log rows", name, deleted,
                     extra={"event": "retention", "details": {"deleted": deleted}})
        return deleted

    def trim_batch(self, retention_s, consumer_retention_s, after):
        """One retention batch (``trim_event_log_batch``): (rows deleted, the last id
        examined or None when the log is done)."""
        with self._pool.connection() as conn, conn.cursor() as cur:
            cur.execute("SELECT deleted, last_id FROM pgnotify_sync.trim_event_log_batch(%s, %s, %s, %s)",
                        (retention_s, consumer_retention_s, after, TRIM_BATCH))
            return cur.fetchone()


# A stored position's lag bound (c: a consumers row): the channel's events of
# transactions not visible in it, without other consumers' BACKFILL rows (as MINE).
CONSUMER_LAG = """(SELECT count(*) FROM pgnotify_sync.event_log l
  WHERE l.channel = c.channel AND NOT pg_visible_in_snapshot(l.xid, c.position)
    AND l.xid >= pg_snapshot_xmin(c.position)
    AND (l.operation <> 'BACKFILL' OR (l.old->>'backfill_for' = c.name AND l.old->>'role' = c.role::text)))"""


def xids_of(cur, ids):
    """{log id: xid} of those of *ids* still in the log (a consumer's handled ids)."""
    if not ids:
        return {}
    cur.execute("SELECT id, xid::text::bigint FROM pgnotify_sync.event_log WHERE id = ANY(%s)", (ids,))
    return dict(cur.fetchall())


def log_status(cur):
    """The log's size and age, and each consumer's lag bound (``pgnotify-sync status``)."""
    cur.execute("SELECT count(*), min(id), max(id), min(created_at), max(created_at), "
                "pg_total_relation_size('pgnotify_sync.event_log') FROM pgnotify_sync.event_log")
    count, first, last, oldest, newest, size = cur.fetchone()
    summary = {"rows": count, "first_id": first, "last_id": last, "oldest": oldest, "newest": newest,
               "bytes": size}
    cur.execute("""
        SELECT c.name, c.channel, c.partition, c.updated_at, """ + CONSUMER_LAG + """ AS lag
          FROM pgnotify_sync.consumers c ORDER BY 1, 2, 3""")
    consumers = [{"name": n, "channel": ch, "partition": p, "updated_at": u, "lag_upper_bound": lag}
                 for n, ch, p, u, lag in cur.fetchall()]
    return summary, consumers
