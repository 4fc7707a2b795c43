"""No event lost, exactly once, per-row commit order: under real faults.

The oracle is the event log itself: every committed change is a row of
pgnotify_sync.event_log, so "delivered ids == logged ids" proves exactly-once
whatever the writers saw (a commit whose answer was lost still counts).
"""

import time

import psycopg2
import pytest

from pgnotify_sync import ConnectionState

from helpers import wait_for
from pgutil import Collector, Workload, assert_exactly_once_in_row_order, counter
from tcpproxy import TcpProxy


def test_backend_killed_repeatedly_during_concurrent_writes(stream_db, make_listener, dsn, pg_cluster, dbname):
    listener = make_listener(channels=("stream",), name="killed", worker_pool_size=4)
    got = Collector()
    listener.on_event("stream", got)
    connected = counter(listener.signals.connected)
    listener.start()
    with Workload(dsn) as work:
        work.wait_commits(20)
        for kill in range(5):
            before, before_connected = listener.stats["reconnects"], len(connected)
            assert pg_cluster.terminate_backends(dbname, application_name="pgnotify_sync") >= 1
            wait_for(lambda: listener.stats["reconnects"] > before and listener.state is ConnectionState.LISTENING,
                     timeout=15, message=f"no reconnect after kill {kill + 1}")
            # 'connected' comes once the catch-up of the new session is done
            wait_for(lambda: len(connected) > before_connected, timeout=15)
            work.wait_commits(20)
    assert_exactly_once_in_row_order(got, pg_cluster, dbname)
    assert listener.stats["reconnects"] >= 5


@pytest.mark.parametrize("mode", ["fast", "immediate"])
def test_server_restart_while_writing(stream_db, make_listener, dsn, pg_cluster, dbname, mode):
    listener = make_listener(channels=("stream",), name=f"restart-{mode}", reconnect_delay_ms=20,
                             reconnect_delay_max_ms=200)
    got = Collector()
    listener.on_event("stream", got)
    attempts = counter(listener.signals.reconnecting)
    listener.start()
    with Workload(dsn) as work:
        work.wait_commits(30)
        pg_cluster.stop(mode=mode)
        # Stay down past the first backoff steps.
        wait_for(lambda: len(attempts) >= 4, timeout=20, message="listener did not keep retrying")
        assert listener.state is ConnectionState.RECONNECTING
        pg_cluster.start()
        wait_for(lambda: listener.state is ConnectionState.LISTENING, timeout=20)
        work.wait_commits(30)
    assert_exactly_once_in_row_order(got, pg_cluster, dbname)


def test_outbox_gap_transaction_committed_while_away(stream_db, make_listener, pg_cluster, dbname, dsn):
    proxy = TcpProxy(dsn["host"], dsn["port"])
    try:
        listener = make_listener(channels=("stream",), postgres_port=proxy.port, name="gap")
        got = Collector()
        listener.on_event("stream", got)
        attempts = counter(listener.signals.reconnecting)
        listener.start()
        early = psycopg2.connect(**dsn)             # direct, not through the proxy
        with early.cursor() as cur:
            cur.execute("INSERT INTO stream (note) VALUES ('began before the disconnect')")
        # ... still open. Later transactions get higher log ids and commit first:
        with stream_db.cursor() as cur:
            for _ in range(3):
                cur.execute("INSERT INTO stream (note) VALUES ('later')")
        got.wait(3)
        proxy.cut()
        wait_for(lambda: len(attempts) >= 2, message="listener did not notice the cut")
        early.commit()                               # committed while the listener is away
        early.close()
        proxy.restore()
        events = got.wait(4)
        late = events[-1]
        assert late.data["note"] == "began before the disconnect"
        assert late.id < min(e.id for e in events[:3]), "the gap row must have the lowest log id"
        assert_exactly_once_in_row_order(got, pg_cluster, dbname)
    finally:
        proxy.close()


def test_silent_path_is_noticed_by_the_health_check(stream_db, make_listener, pg_cluster, dbname, dsn):
    proxy = TcpProxy(dsn["host"], dsn["port"])
    try:
        listener = make_listener(channels=("stream",), postgres_port=proxy.port, name="frozen",
                                 health_check_interval_s=1.0, health_check_timeout_s=1.0)
        got = Collector()
        listener.on_event("stream", got)
        lost = counter(listener.signals.disconnected)
        listener.start()
        with stream_db.cursor() as cur:
            cur.execute("INSERT INTO stream (note) VALUES ('before')")
        got.wait(1)
        proxy.freeze()          # sockets open, nothing forwarded: no error anywhere
        frozen_at = time.monotonic()
        with stream_db.cursor() as cur:
            cur.execute("INSERT INTO stream (note) VALUES ('during')")
        wait_for(lambda: lost, timeout=10, message="the frozen path was never noticed")
        noticed_after = time.monotonic() - frozen_at
        # interval + timeout = 2 s, plus scheduling slack
        assert noticed_after < 3.5, f"noticed after {noticed_after:.2f} s"
        assert "health check" in str(lost[0]["error"])
        got.wait(2)             # reconnected through a new (unfrozen) proxy connection and caught up
        assert_exactly_once_in_row_order(got, pg_cluster, dbname)
    finally:
        proxy.close()


def test_slow_handler_burst_far_larger_than_the_buffer(stream_db, make_listener, admin_db, pg_cluster, dbname):
    capacity = 100
    total = 100 * capacity
    listener = make_listener(channels=("stream",), name="slow", event_buffer_size=capacity)
    got = Collector()
    max_buffered = []

    @listener.on_event("stream")
    def slow(event):
        got(event)
        max_buffered.append(listener.get_stats()["buffered"])
        time.sleep(0.0003)      # the handler is slower than the writer

    listener.start()
    with stream_db.cursor() as cur:
        for _ in range(total // 1000):
            cur.execute("INSERT INTO stream (note) SELECT 'burst' FROM generate_series(1, 1000)")

    def queue_usage():
        with admin_db.cursor() as cur:
            cur.execute("SELECT pg_notification_queue_usage()")
            return cur.fetchone()[0]
    # The reader drained the server's queue while handlers still have most of the work.
    wait_for(lambda: queue_usage() == 0, timeout=10, message="server notification queue not drained")
    assert len(got) < total
    expected = assert_exactly_once_in_row_order(got, pg_cluster, dbname)
    assert len(expected) == total
    assert got.ids() == sorted(got.ids()), "one writer: events must arrive in log-id order"
    assert max(max_buffered) <= capacity
    stats = listener.get_stats()
    assert stats["dropped_to_log"] > 0 and stats["caught_up"] > 0


def test_stop_during_reconnect_is_prompt(stream_db, make_listener, dsn):
    proxy = TcpProxy(dsn["host"], dsn["port"])
    try:
        listener = make_listener(channels=("stream",), postgres_port=proxy.port, name="stopping",
                                 reconnect_delay_ms=2000, reconnect_delay_max_ms=10_000)
        attempts = counter(listener.signals.reconnecting)
        listener.start()
        proxy.cut()
        wait_for(lambda: len(attempts) >= 2, timeout=10)   # now in a multi-second backoff wait
        started = time.monotonic()
        listener.stop()
        assert time.monotonic() - started < 1.5
        assert not any(t.is_alive() for t in listener.threads())
        assert listener.state is ConnectionState.STOPPED
    finally:
        proxy.close()


def test_first_connection_uses_the_retry_policy(stream_db, make_listener, dsn):
    proxy = TcpProxy(dsn["host"], dsn["port"])
    try:
        proxy.cut()
        listener = make_listener(channels=("stream",), postgres_port=proxy.port, name="late-db")
        attempts = counter(listener.signals.reconnecting)
        got = Collector()
        listener.on_event("stream", got)
        listener.start(wait=False)
        wait_for(lambda: len(attempts) >= 3)
        assert listener.state is ConnectionState.CONNECTING
        proxy.restore()
        wait_for(lambda: listener.state is ConnectionState.LISTENING, timeout=10)
        with stream_db.cursor() as cur:
            cur.execute("INSERT INTO stream (note) VALUES ('x')")
        got.wait(1)
    finally:
        proxy.close()


def test_failed_listener_starts_again_and_catches_up(stream_db, make_listener, dsn, pg_cluster, dbname):
    proxy = TcpProxy(dsn["host"], dsn["port"])
    try:
        listener = make_listener(channels=("stream",), postgres_port=proxy.port, name="failing",
                                 max_reconnect_attempts=2)
        got = Collector()
        listener.on_event("stream", got)
        failed = counter(listener.signals.failed)
        errors = counter(listener.signals.error)
        listener.start()
        proxy.cut()
        wait_for(lambda: failed, timeout=10)
        assert listener.state is ConnectionState.FAILED
        assert any(e["kind"] == "connect" for e in errors)
        with stream_db.cursor() as cur:
            cur.execute("INSERT INTO stream (note) VALUES ('while failed')")
        proxy.restore()
        listener.start()
        assert listener.state is ConnectionState.LISTENING
        (event,) = got.wait(1)
        assert event.data["note"] == "while failed"
        assert_exactly_once_in_row_order(got, pg_cluster, dbname)
    finally:
        proxy.close()


def test_fresh_listener_starts_from_now(stream_db, make_listener):
    with stream_db.cursor() as cur:
        cur.execute("INSERT INTO stream (note) VALUES ('before start')")
    listener = make_listener(channels=("stream",))
    got = Collector()
    listener.on_event("stream", got)
    listener.start()
    with stream_db.cursor() as cur:
        cur.execute("INSERT INTO stream (note) VALUES ('after start')")
    (event,) = got.wait(1)
    assert event.data["note"] == "after start"
    listener.publish("stream", {"final": True})     # everything before it has been delivered
    got.wait(2)
    assert len(got) == 2
