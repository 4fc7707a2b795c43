"""Listener-relevant server state (``pgnotify-sync status``)."""

import psycopg2.errors

from ._eventlog import CONSUMER_LAG, log_status


def server_status(conn):
    """A dict: notification queue usage, event-log size and age, consumers, watched
    tables, who may do what. Each part as far as this role may see it: a part the
    role's grants do not cover says ``"not granted"`` (the rows a role sees are its
    channels' alone)."""
    with conn.cursor() as cur:
        cur.execute("SELECT pg_notification_queue_usage(), version()")
        usage, version = cur.fetchone()
        status = {"server": version.split(",")[0], "notification_queue_usage": float(usage)}
        cur.execute("SELECT to_regnamespace('pgnotify_sync') IS NOT NULL AND "
                    "(NOT has_schema_privilege('pgnotify_sync', 'USAGE') "
                    " OR to_regclass('pgnotify_sync.event_log') IS NOT NULL)")
        if not cur.fetchone()[0]:
            status["installed"] = False
            conn.rollback()
            return status
        status["installed"] = True
        log_part = _granted(cur, log_status)
        summary, consumers = log_part if log_part != NOT_GRANTED else (NOT_GRANTED, NOT_GRANTED)
        status["event_log"] = summary
        status["watched_tables"] = _granted(cur, _watched)
        status["consumers"] = consumers
        status["consumer_groups"] = _granted(cur, consumer_groups)
        status["backfills"] = _granted(cur, backfills)
        status["privileges"] = _granted(cur, _privileges)
    conn.rollback()
    return status


NOT_GRANTED = "not granted"


def _granted(cur, part):
    """part(cur), or NOT_GRANTED if this role may not read what it reads."""
    cur.execute("SAVEPOINT pgnotify_status")
    try:
        value = part(cur)
    except psycopg2.errors.InsufficientPrivilege:
        cur.execute("ROLLBACK TO SAVEPOINT pgnotify_status")
        return NOT_GRANTED
    cur.execute("RELEASE SAVEPOINT pgnotify_status")
    return value


def _watched(cur):
    cur.execute("SELECT schema_name, table_name, channel, "
                "pgnotify_sync.excluded_columns(relid, exclude_columns, exclude_attnums) "
                "FROM pgnotify_sync.watched_tables ORDER BY 1, 2")
    return [{"table": f"{s}.{t}", "channel": c, "exclude_columns": list(x)} for s, t, c, x in cur.fetchall()]


def _privileges(cur):
    """Who may do what: this role's own grants, every role's grants (as far as this
    role may see them: the installer sees all), the retention floors, and watched
    tables whose capture does not run with their owner's rights yet."""
    cur.execute("SELECT to_regprocedure('pgnotify_sync.my_grants()') IS NOT NULL")
    if not cur.fetchone()[0]:
        return {"model": False}         # an install older than the grants
    cur.execute("SELECT current_user::text, pgnotify_sync.my_grants(), pgnotify_sync.unrestricted()")
    role, mine, unrestricted = cur.fetchone()
    cur.execute("SELECT g.role::regrole::text, g.kind, coalesce(array_agg(g.channel ORDER BY g.channel) "
                "FILTER (WHERE g.channel <> ''), '{}') FROM pgnotify_sync.grants g GROUP BY 1, 2 ORDER BY 1, 2")
    grants = [{"role": r, "kind": k, "channels": list(c)} for r, k, c in cur.fetchall()]
    cur.execute("SELECT name, value FROM pgnotify_sync.settings ORDER BY 1")
    floors = {n: v for n, v in cur.fetchall()}
    stale = []
    if unrestricted:        # capture_role() is the installer's
        cur.execute("SELECT w.schema_name || '.' || w.table_name FROM pgnotify_sync.watched_tables w "
                    "JOIN pg_class c ON c.oid = w.relid "
                    "WHERE w.runs_as IS DISTINCT FROM pgnotify_sync.capture_role(c.relowner) ORDER BY 1")
        stale = [r[0] for r in cur.fetchall()]
    return {"model": True, "role": role, "unrestricted": unrestricted, "granted": list(mine), "grants": grants,
            "retention_floors": floors, "capture_owner_mismatch": stale}


def backfills(cur):
    """Every backfill this role may see: consumer, table, rows logged so far, done,
    start and end (no key: ``last_key`` holds row values)."""
    cur.execute("SELECT to_regclass('pgnotify_sync.backfills') IS NOT NULL")
    if not cur.fetchone()[0]:
        return []       # an install older than the backfills
    cur.execute("SELECT consumer, schema_name || '.' || table_name, channel, rows, done, started_at, finished_at "
                "FROM pgnotify_sync.backfills ORDER BY 1, 2")
    return [{"consumer": c, "table": t, "channel": ch, "rows": n, "done": d, "started_at": s, "finished_at": f}
            for c, t, ch, n, d, s, f in cur.fetchall()]


def consumer_groups(cur):
    """Every consumer group this role may see (``pgnotify-sync consumers``): its
    role (each role's consumer of a name is its own), partition count, live
    members, and each partition's owner, epoch, lease left and position (as a lag
    bound)."""
    cur.execute("SELECT to_regclass('pgnotify_sync.consumer_groups') IS NOT NULL")
    if not cur.fetchone()[0]:
        return []       # an install older than the groups
    cur.execute("""
        SELECT n.role::regrole::text, n.name, g.partitions
          FROM (SELECT DISTINCT role, name FROM pgnotify_sync.consumers) n
          LEFT JOIN pgnotify_sync.consumer_groups g ON g.role = n.role AND g.name = n.name ORDER BY 2, 1""")
    groups = {(role, name): {"name": name, "role": role, "partitions": p, "members": [], "positions": []}
              for role, name, p in cur.fetchall()}
    cur.execute("""
        SELECT role::regrole::text, name, member, host, pid, channels, joined_at,
               extract(epoch FROM clock_timestamp() - heartbeat_at)::float8
          FROM pgnotify_sync.consumer_members ORDER BY 2, 1, 3""")
    for role, name, member, host, pid, channels, joined, age in cur.fetchall():
        if (role, name) in groups:
            groups[role, name]["members"].append({"member": member, "host": host, "pid": pid,
                                                  "channels": list(channels), "joined_at": joined,
                                                  "heartbeat_age_s": round(age, 3)})
    cur.execute("""
        SELECT c.role::regrole::text, c.name, c.channel, c.partition, c.owner, c.epoch,
               CASE WHEN c.lease_until > clock_timestamp()
                    THEN extract(epoch FROM c.lease_until - clock_timestamp())::float8 END,
               c.updated_at, """ + CONSUMER_LAG + """
          FROM pgnotify_sync.consumers c ORDER BY 2, 1, 3, 4""")
    for role, name, channel, partition, owner, epoch, left, updated, lag in cur.fetchall():
        groups[role, name]["positions"].append({
            "channel": channel, "partition": partition, "owner": owner if left is not None else None,
            "epoch": epoch, "lease_left_s": None if left is None else round(left, 3), "updated_at": updated,
            "lag_upper_bound": lag})
    return list(groups.values())
