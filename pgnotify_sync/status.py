"""Listener-relevant server state (``pgnotify-sync status``)."""

from ._eventlog import log_status


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
        status["event_log"], consumers = log_status(cur)
        cur.execute("SELECT schema_name, table_name, channel, exclude_columns FROM pgnotify_sync.watched_tables "
                    "ORDER BY 1, 2")
        status["watched_tables"] = [{"table": f"{s}.{t}", "channel": c, "exclude_columns": list(x)}
                                    for s, t, c, x in cur.fetchall()]
        status["consumers"] = consumers
    conn.rollback()
    return status
