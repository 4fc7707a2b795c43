"""Listener-relevant server state (``pgnotify-sync status``)."""


def server_status(conn):
    """A dict: notification queue usage, event-log size and age, consumers, watched tables."""
    with conn.cursor() as cur:
        cur.execute("SELECT pg_notification_queue_usage(), version()")
        usage, version = cur.fetchone()
        status = {"server": version.split(",")[0], "notification_queue_usage": float(usage)}
        cur.execute("SELECT to_regclass('pgnotify_sync.event_log') IS NOT NULL")
        if not cur.fetchone()[0]:
            status["installed"] = False
            conn.rollback()
            return status
        status["installed"] = True
        cur.execute("SELECT count(*), min(id), max(id), min(created_at), max(created_at), "
                    "pg_total_relation_size('pgnotify_sync.event_log') FROM pgnotify_sync.event_log")
        count, first, last, oldest, newest, size = cur.fetchone()
        status["event_log"] = {"rows": count, "first_id": first, "last_id": last, "oldest": oldest,
                               "newest": newest, "bytes": size}
        cur.execute("SELECT schema_name, table_name, channel, exclude_columns FROM pgnotify_sync.watched_tables "
                    "ORDER BY 1, 2")
        status["watched_tables"] = [{"table": f"{s}.{t}", "channel": c, "exclude_columns": list(x)}
                                    for s, t, c, x in cur.fetchall()]
        cur.execute("""
            SELECT c.name, c.channel, c.updated_at,
                   (SELECT count(*) FROM pgnotify_sync.event_log l
                     WHERE l.channel = c.channel AND NOT pg_visible_in_snapshot(l.xid, c.position)
                       AND l.xid >= pg_snapshot_xmin(c.position)) AS lag
              FROM pgnotify_sync.consumers c ORDER BY 1, 2""")
        status["consumers"] = [{"name": n, "channel": ch, "updated_at": u, "lag_upper_bound": lag}
                               for n, ch, u, lag in cur.fetchall()]
    conn.rollback()
    return status
