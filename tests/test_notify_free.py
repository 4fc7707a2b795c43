"""Notify-free channels (issue 14): ``watch_table(..., notify=False)``.

The triggers only write the event log (no NOTIFY, so concurrent writers are not
serialised by NOTIFY's commit lock); listeners find the rows by polling the log
every ``poll_interval_s`` and read them with the checked position move. A
listener can mix notified and notify-free channels; a durable consumer of a
notify-free channel resumes like any other.
"""

import json
import select

import pytest

from pgnotify_sync import SchemaError, install, watch_table, watched_tables

from helpers import wait_for
from pgutil import Collector, execute
from test_cli import Cli


@pytest.fixture
def quiet_db(db):
    install(db)
    execute(db, "CREATE TABLE quiet (id serial PRIMARY KEY, body text); "
                "CREATE TABLE loud (id serial PRIMARY KEY, body text)")
    watch_table(db, "public.quiet", channel="quiet", notify=False)
    watch_table(db, "public.loud", channel="loud")
    return db


def listening(pg_cluster, dbname, *channels):
    """A raw LISTENing connection (to see what goes over the wire)."""
    conn = pg_cluster.connect(dbname, autocommit=True)
    for channel in channels:
        execute(conn, f"LISTEN {channel}")
    return conn


def drained(conn):
    if select.select([conn], [], [], 0)[0]:
        conn.poll()
    notes = [(n.channel, n.payload) for n in conn.notifies]
    conn.notifies.clear()
    return notes


def test_rows_of_a_notify_free_table_arrive_by_polling_and_nothing_is_notified(quiet_db, make_listener, pg_cluster,
                                                                              dbname):
    wire = listening(pg_cluster, dbname, "quiet", "loud")
    listener = make_listener(channels=("quiet",), poll_interval_s=0.05)
    got = Collector()
    listener.on_event("quiet", got)
    listener.start()
    execute(quiet_db, "INSERT INTO quiet (body) VALUES ('one')")
    execute(quiet_db, "INSERT INTO quiet (body) SELECT 'many ' || g FROM generate_series(1, 20) g")
    execute(quiet_db, "UPDATE quiet SET body = 'edited' WHERE body = 'one'")
    execute(quiet_db, "DELETE FROM quiet WHERE body = 'many 1'")
    events = got.wait(23)
    assert [e.operation for e in events] == ["INSERT"] * 21 + ["UPDATE", "DELETE"]
    assert [e.id for e in events] == [r[0] for r in execute(quiet_db, "SELECT id FROM pgnotify_sync.event_log "
                                                                       "WHERE channel = 'quiet' ORDER BY id")]
    assert events[0].data == {"id": 1, "body": "one"} and events[21].old == {"id": 1, "body": "one"}
    assert listener.get_stats()["polled"] == 23 and listener.get_stats()["missed"] == 0
    assert drained(wire) == []                   # nothing went over the wire
    assert watched_tables(quiet_db)[1]["notify"] is False


def test_a_listener_mixes_notified_and_notify_free_channels(quiet_db, make_listener, pg_cluster, dbname):
    wire = listening(pg_cluster, dbname, "quiet", "loud")
    listener = make_listener(channels=("quiet", "loud"), poll_interval_s=0.05)
    got = {"quiet": Collector(), "loud": Collector()}
    listener.on_event("quiet", got["quiet"])
    listener.on_event("loud", got["loud"])
    listener.start()
    for n in range(5):
        execute(quiet_db, "INSERT INTO quiet (body) VALUES (%s); INSERT INTO loud (body) VALUES (%s)", (n, n))
    assert [e.data["body"] for e in got["quiet"].wait(5)] == ["0", "1", "2", "3", "4"]
    assert [e.data["body"] for e in got["loud"].wait(5)] == ["0", "1", "2", "3", "4"]
    assert listener.get_stats()["polled"] == 5                     # the notified ones came by their hints
    notes = wait_for(lambda: drained(wire) or None, message="no hint of the notified table")
    assert {channel for channel, _ in notes} == {"loud"} and all(json.loads(p)["id"] for _, p in notes)


def test_a_durable_consumer_of_a_notify_free_channel_resumes_after_a_restart(quiet_db, make_listener):
    got = Collector()

    def start():
        listener = make_listener(channels=("quiet",), consumer="q", poll_interval_s=0.05)
        listener.on_event("quiet", got)
        listener.start()
        return listener
    listener = start()
    execute(quiet_db, "INSERT INTO quiet (body) VALUES ('before')")
    got.wait(1)
    listener.stop()
    execute(quiet_db, "INSERT INTO quiet (body) VALUES ('while away')")
    start()
    execute(quiet_db, "INSERT INTO quiet (body) VALUES ('after')")
    assert [e.data["body"] for e in got.wait(3)] == ["before", "while away", "after"]


def test_a_table_made_notify_free_later_is_polled_and_back(quiet_db, make_listener):
    listener = make_listener(channels=("loud",), poll_interval_s=0.05)
    got = Collector()
    listener.on_event("loud", got)
    listener.start()
    execute(quiet_db, "INSERT INTO loud (body) VALUES ('notified')")
    got.wait(1)
    watch_table(quiet_db, "public.loud", channel="loud", notify=False)
    execute(quiet_db, "INSERT INTO loud (body) VALUES ('polled')")
    # The poller sees the channel at its next look (QUIET_RECHECK_S); the health
    # check's position move (every 2 s here) delivers it in any case.
    assert [e.data["body"] for e in got.wait(2, timeout=40)] == ["notified", "polled"]


def test_notify_must_be_a_bool_and_the_cli_takes_no_notify(quiet_db, dsn):
    with pytest.raises(SchemaError, match="notify must be True or False, got 'no'"):
        watch_table(quiet_db, "public.loud", channel="loud", notify="no")
    cli = Cli(dsn)
    try:
        proc = cli.run("watch", "public.loud", "--channel", "loud", "--no-notify")
        assert proc.returncode == 0, proc.stderr
        assert "notify-free: listeners poll the log" in proc.stdout
    finally:
        cli.close()
    assert {t["table"]: t["notify"] for t in watched_tables(quiet_db)} == {"loud": False, "quiet": False}


def test_poll_interval_comes_from_the_environment():
    from pgnotify_sync import Config
    cfg = Config.from_env({"POSTGRES_USER": "u", "POSTGRES_DB": "d", "PG_NOTIFY_POLL_INTERVAL": "0.25"})
    assert cfg.poll_interval_s == 0.25
    with pytest.raises(Exception, match="PG_NOTIFY_POLL_INTERVAL"):
        Config.from_env({"POSTGRES_USER": "u", "POSTGRES_DB": "d", "PG_NOTIFY_POLL_INTERVAL": "0"})



# -- large statements (issue 14, 2.) -------------------------------------------------------

def test_a_statement_bigger_than_the_buffer_streams_as_a_range_without_a_catch_up(stream_db, make_listener):
    """25,000 rows in one INSERT (more than a range page of 20,000) with a buffer of
    1,000: delivered from the range hint, page by page, exactly once, in id order;
    nothing dropped to the overflow path."""
    listener = make_listener(channels=("stream",), event_buffer_size=1000)
    got = Collector()
    listener.on_event("stream", got)
    listener.start()
    execute(stream_db, "INSERT INTO stream (w) SELECT g FROM generate_series(1, 25000) g")
    events = got.wait(25000, timeout=60, settle=listener)
    assert [e.data["w"] for e in events] == list(range(1, 25001))
    stats = listener.get_stats()
    assert stats["caught_up"] == 0 and stats["missed"] == 0 and stats["dropped_to_log"] == 0
