"""Install the schema objects and attach capture triggers to tables.

Example::

    import psycopg2
    from pgnotify_sync import install, watch_table

    conn = psycopg2.connect(...)
    install(conn)                                     # idempotent
    watch_table(conn, "public.messages", channel="messages",
                exclude_columns=("password_hash",))   # never leaves the database

The same SQL is usable without Python: ``psql -1 -f sql/install.sql`` and
``SELECT pgnotify_sync.watch_table('public.messages', 'messages', ARRAY['password_hash'])``.
Each function runs in its own transaction and commits it (the connection's
autocommit setting is respected and restored).
"""

import contextlib
import pathlib

try:
    from importlib.resources import files as _resource_files
except ImportError:  # pragma: no cover - Python < 3.9
    _resource_files = None

import psycopg2

from .config import wire_channel_name
from .errors import SchemaError

SCHEMA = "pgnotify_sync"


def sql_text(name):
    """The text of ``sql/<name>`` (``install.sql``, ``rollback.sql``).

    Installed, the files ship as the package ``pgnotify_sync.sql`` (setup.cfg maps
    it to the top-level ``sql/`` folder); from a source checkout they are read there.
    """
    try:
        return _resource_files("pgnotify_sync.sql").joinpath(name).read_text(encoding="utf-8")
    except ModuleNotFoundError:
        return (pathlib.Path(__file__).resolve().parent.parent / "sql" / name).read_text(encoding="utf-8")


@contextlib.contextmanager
def _transaction(conn):
    """Run a block in one transaction whatever the connection's autocommit mode."""
    was_autocommit = conn.autocommit
    if was_autocommit:
        conn.autocommit = False
    try:
        with conn.cursor() as cur:
            yield cur
        conn.commit()
    except psycopg2.Error as exc:
        conn.rollback()
        raise SchemaError(_pg_message(exc)) from exc
    except BaseException:
        conn.rollback()
        raise
    finally:
        if was_autocommit:
            conn.autocommit = True


def _pg_message(exc):
    diag = getattr(exc, "diag", None)
    primary = getattr(diag, "message_primary", None) if diag else None
    return primary or str(exc).strip()


def install(conn):
    """Create (or update) the schema objects of ``sql/install.sql``. Idempotent."""
    with _transaction(conn) as cur:
        cur.execute(sql_text("install.sql"))


def uninstall(conn):
    """Drop every object ``install`` created, capture triggers and the event log included."""
    with _transaction(conn) as cur:
        cur.execute(sql_text("rollback.sql"))


def _wire(channel, channel_prefix):
    try:
        return wire_channel_name(channel, channel_prefix)
    except ValueError as exc:
        raise SchemaError(f"channel: {exc}") from None


def watch_table(conn, table, channel, exclude_columns=(), channel_prefix="", mode="statement", notify=True):
    """Attach the capture trigger to *table* (``"schema.table"``, quoted as in SQL for
    awkward names: ``'public."My Table"'``), sending its changes on *channel*.

    *exclude_columns* never leave the database: not in notifications, not in the
    event log. Nor does the fact that one changed: an UPDATE that leaves every other
    column as it was is no event at all (without *exclude_columns*, every UPDATE is
    one, even one that changes nothing). An exclusion follows its column: renamed,
    it stays excluded; dropped and added again under its old name, too. *channel_prefix* must match the listeners'
    ``Config.channel_prefix``.
    Calling it again replaces the previous triggers of that table.

    *mode* ``"statement"`` (default) captures INSERT and DELETE once per statement
    (a 1000-row INSERT ... SELECT costs about what a plain notify-only row trigger
    does) and UPDATE per row; ``"row"`` captures everything per row. Partitions and
    inheritance children always use ``"row"``. Returns the mode in effect.

    *notify* ``False``: a notify-free table. Its triggers only write the log and
    listeners find the rows by polling it every ``Config.poll_interval_s``:
    concurrent writers no longer commit one at a time behind NOTIFY's lock (about
    3x the writes with 16 of them), at the price of up to a poll interval of latency.
    """
    if isinstance(exclude_columns, str):
        raise SchemaError("exclude_columns must be a sequence of column names, not a string")
    wire = _wire(channel, channel_prefix)
    if mode not in ("statement", "row"):
        raise SchemaError(f"mode must be 'statement' or 'row', got {mode!r}")
    if not isinstance(notify, bool):
        raise SchemaError(f"notify must be True or False, got {notify!r}")
    with _transaction(conn) as cur:
        cur.execute("SELECT pgnotify_sync.watch_table(%s::regclass, %s, %s::text[], %s, %s)",
                    (table, wire, list(exclude_columns), mode, notify))
        return cur.fetchone()[0]


def unwatch_table(conn, table):
    """Remove the capture trigger from *table*. Idempotent."""
    with _transaction(conn) as cur:
        cur.execute("SELECT pgnotify_sync.unwatch_table(%s::regclass)", (table,))


def watched_tables(conn):
    """List of dicts: schema, table, channel, exclude_columns (by the names they have
    now: an exclusion follows its column through a rename), mode, notify."""
    with _transaction(conn) as cur:
        cur.execute("SELECT schema_name, table_name, channel, "
                    "pgnotify_sync.excluded_columns(relid, exclude_columns, exclude_attnums), mode, notify "
                    "FROM pgnotify_sync.watched_tables ORDER BY 1, 2")
        return [dict(schema=r[0], table=r[1], channel=r[2], exclude_columns=list(r[3]), mode=r[4], notify=r[5])
                for r in cur.fetchall()]


# -- who may do what (sql/install.sql, "Who may do what") ----------------------------

def _wires(channels, channel_prefix):
    if isinstance(channels, str):
        raise SchemaError("channels must be a sequence of channel names, not a string")
    wires = [_wire(c, channel_prefix) for c in channels]
    if not wires:
        raise SchemaError("channels: give at least one channel")
    return wires


def grant_listener(conn, role, channels, channel_prefix=""):
    """Let *role* read the events of *channels* (row-level security on the log, by
    channel; *channel_prefix* as in the listeners' ``Config.channel_prefix``) and
    keep its own durable consumer positions; nothing else. Run as the installer
    (or a superuser). Adds to the role's earlier grants."""
    wires = _wires(channels, channel_prefix)
    with _transaction(conn) as cur:
        cur.execute("SELECT pgnotify_sync.grant_listener(%s::regrole, %s::text[])", (_role(role), wires))


def grant_publisher(conn, role, channels, channel_prefix=""):
    """Let *role* ``publish()`` on *channels* only."""
    wires = _wires(channels, channel_prefix)
    with _transaction(conn) as cur:
        cur.execute("SELECT pgnotify_sync.grant_publisher(%s::regrole, %s::text[])", (_role(role), wires))


def grant_admin(conn, role):
    """Let *role* trim the log (``trim_event_log`` runs as the installer and never
    goes below the floors of :func:`set_retention_floor`) and see every consumer's
    position and every watched table. Watching and unwatching stay with the
    installer or a superuser: capture code runs with a table owner's rights."""
    with _transaction(conn) as cur:
        cur.execute("SELECT pgnotify_sync.grant_admin(%s::regrole)", (_role(role),))


def revoke(conn, role):
    """Take every grant of *role* back (what capture of the tables it owns needs
    stays). Returns how many grants were removed."""
    with _transaction(conn) as cur:
        cur.execute("SELECT pgnotify_sync.revoke_role(%s::regrole)", (_role(role),))
        return cur.fetchone()[0]


def set_retention_floor(conn, retention_s=None, consumer_retention_s=None):
    """Keep in the database the least retention any trim may use (seconds; None
    leaves a floor as it is): a listener configured for less keeps this much."""
    with _transaction(conn) as cur:
        cur.execute("SELECT pgnotify_sync.set_retention_floor(%s, %s)", (retention_s, consumer_retention_s))


def grants(conn):
    """Who may do what: a list of dicts role, kind (``listen``, ``publish``,
    ``admin``), channels (wire names; empty for admin), as the caller may see them
    (the installer: every grant)."""
    with _transaction(conn) as cur:
        cur.execute("SELECT g.role::regrole::text, g.kind, array_agg(g.channel ORDER BY g.channel) "
                    "FILTER (WHERE g.channel <> '') FROM pgnotify_sync.grants g GROUP BY 1, 2 ORDER BY 1, 2")
        return [dict(role=r[0], kind=r[1], channels=list(r[2] or ())) for r in cur.fetchall()]


def _role(role):
    if not isinstance(role, str) or not role:
        raise SchemaError(f"role: expected a role name, got {role!r}")
    # regrole input takes an identifier: quote it, so any role name works as given.
    return '"' + role.replace('"', '""') + '"'
