"""The automatic retention cleanup: a listener trims the event log by itself every
``cleanup_interval_s`` (README, "Retention"), with no call to ``cleanup()``.

Rows are aged by moving their ``created_at`` back; the tests wait (with a deadline)
for the log to hold exactly the rows that must remain.
"""

from helpers import wait_for


def _log(db):
    with db.cursor() as cur:
        cur.execute("SELECT channel, data->>'body' FROM pgnotify_sync.event_log ORDER BY id")
        return cur.fetchall()


def _insert(db, *bodies):
    with db.cursor() as cur:
        for body in bodies:
            cur.execute("INSERT INTO messages (body) VALUES (%s)", (body,))


def _age(db, days, where="true"):
    with db.cursor() as cur:
        cur.execute(f"UPDATE pgnotify_sync.event_log SET created_at = now() - %s * interval '1 day' WHERE {where}",
                    (days,))


def _other_channel_row(db, body):
    with db.cursor() as cur:
        cur.execute("INSERT INTO pgnotify_sync.event_log (channel, operation, schema_name, table_name, data) "
                    "VALUES ('other', 'INSERT', 'public', 'x', json_build_object('body', %s::text))", (body,))


def test_listener_trims_the_log_every_cleanup_interval_by_itself(installed, make_listener):
    # Old rows first: the trim walks the log from its oldest id up to the first recent row
    # (test_consumers.py::test_retention_walks_the_log_from_its_oldest_id).
    _other_channel_row(installed, "old-other")
    _insert(installed, "old-1", "old-2", "recent")
    _age(installed, 2, "data->>'body' LIKE 'old%%'")
    listener = make_listener(retention_s=3600, consumer_retention_s=7 * 86400, cleanup_interval_s=0.2)
    listener.start()
    remaining = [("messages", "recent")]
    # The counter follows the commit of the deletion: wait for both.
    deleted = lambda: listener.get_stats()["retention_deleted"]     # noqa: E731
    wait_for(lambda: _log(installed) == remaining and deleted() >= 3, timeout=60, interval=0.05,
             message="the listener did not trim the rows older than retention_s by itself")
    assert deleted() == 3
    # Not once at start: again at a later interval, when the remaining row is old too.
    _insert(installed, "new")
    _age(installed, 2, "data->>'body' = 'recent'")
    wait_for(lambda: _log(installed) == [("messages", "new")] and deleted() >= 4, timeout=60, interval=0.05,
             message="no later cleanup trimmed the row that became old")
    assert deleted() == 4


def test_automatic_trim_keeps_the_rows_a_durable_consumer_still_needs(installed, make_listener):
    away = make_listener(consumer="slowpoke")
    away.start()
    away.stop()                                  # registered on 'messages', then away
    _other_channel_row(installed, "nobody-needs-it")
    _insert(installed, "needed-1", "needed-2")
    _age(installed, 2)
    trimmer = make_listener(retention_s=3600, consumer_retention_s=7 * 86400, cleanup_interval_s=0.2)
    trimmer.start()
    # The trim that removes the row nobody needs decides about the others too.
    wait_for(lambda: ("other", "nobody-needs-it") not in _log(installed)
             and trimmer.get_stats()["retention_deleted"] >= 1, timeout=60, interval=0.05,
             message="the listener did not trim the old row by itself")
    assert _log(installed) == [("messages", "needed-1"), ("messages", "needed-2")]   # kept, though old
    assert trimmer.get_stats()["retention_deleted"] == 1
