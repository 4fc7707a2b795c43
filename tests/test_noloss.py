"""No event lost, exactly once, per-row commit order: under real faults.

The oracle is the event log itself: every committed change is a row of
pgnotify_sync.event_log, so "delivered ids == logged ids" proves exactly-once
whatever the writers saw (a commit whose answer was lost still counts).
"""

import threading
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
    lost = counter(listener.signals.disconnected)
    listener.start()
    with Workload(dsn) as work:
        work.wait_commits(20)
        for kill in range(5):
            before, before_connected = listener.stats["reconnects"], len(connected)
            # The listener's own connection and its pooled ones (how many are open varies).
            assert pg_cluster.terminate_backends(dbname, application_name="pgnotify_sync") >= 1
            wait_for(lambda: listener.stats["reconnects"] > before and listener.state is ConnectionState.LISTENING,
                     timeout=15, message=f"no reconnect after kill {kill + 1}")
            # 'connected' comes once the catch-up of the new session is done
            wait_for(lambda: len(connected) > before_connected, timeout=15)
            # exactly one lost connection, one reconnect and one 'connected' per kill
            assert len(lost) == kill + 1 and listener.stats["reconnects"] == kill + 1
            assert len(connected) == kill + 2
            work.wait_commits(20)
    assert_exactly_once_in_row_order(got, pg_cluster, dbname)
    assert listener.stats["reconnects"] == 5


@pytest.mark.parametrize("mode", ["fast", "immediate"])
def test_server_restart_while_writing(stream_db, make_listener, dsn, pg_cluster, dbname, mode):
    listener = make_listener(channels=("stream",), name=f"restart-{mode}", reconnect_delay_ms=20,
                             reconnect_delay_max_ms=200)
    got = Collector()
    listener.on_event("stream", got)
    attempts = counter(listener.signals.reconnecting)
    lost = counter(listener.signals.disconnected)
    listener.start()
    try:
        with Workload(dsn) as work:
            work.wait_commits(30)
            pg_cluster.stop(mode=mode)
            # Stay down past the first backoff steps.
            wait_for(lambda: len(attempts) >= 4, timeout=20, message="listener did not keep retrying")
            assert listener.state is ConnectionState.RECONNECTING
            pg_cluster.start()
            wait_for(lambda: listener.state is ConnectionState.LISTENING, timeout=20)
            work.wait_commits(30)
    finally:
        if not pg_cluster.is_running():     # a failed assertion must not leave the session's cluster down
            pg_cluster.start()
    assert_exactly_once_in_row_order(got, pg_cluster, dbname)
    assert len(lost) == 1 and listener.stats["reconnects"] == 1


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
        # The pooled connection that read the first event's row is frozen too: the
        # catch-up gets a fresh one once the pool's deadline (query_timeout_s) cut it.
        listener = make_listener(channels=("stream",), postgres_port=proxy.port, name="frozen",
                                 health_check_interval_s=1.0, health_check_timeout_s=1.0, query_timeout_s=3)
        got = Collector()
        listener.on_event("stream", got)
        lost = counter(listener.signals.disconnected)
        listener.start()
        with stream_db.cursor() as cur:
            cur.execute("INSERT INTO stream (note) VALUES ('before')")
        got.wait(1)
        proxy.freeze()          # sockets open, nothing forwarded: no error anywhere
        with stream_db.cursor() as cur:
            cur.execute("INSERT INTO stream (note) VALUES ('during')")
        wait_for(lambda: lost, timeout=20, message="the frozen path was never noticed")
        # Noticed by the first missed round trip (not by an error, keepalives, or a
        # round trip retried): one lost connection, one failure, the deadline's message.
        assert len(lost) == 1
        assert str(lost[0]["error"]) == "health check got no answer within 1.0 s"
        assert listener.stats["health_check_failures"] == 1
        got.wait(2, timeout=20)     # reconnected through a new (unfrozen) proxy connection and caught up
        assert_exactly_once_in_row_order(got, pg_cluster, dbname)
        assert len(lost) == 1 and listener.stats["reconnects"] == 1
        assert listener.stats["health_check_failures"] == 1
    finally:
        proxy.close()


def test_slow_handler_burst_far_larger_than_the_buffer(row_stream_db, make_listener, admin_db, pg_cluster, dbname):
    # Row mode: one notification of ~600 bytes per row, 40,000 of them: ~24 MB in the
    # server's queue (8 kB pages), far more than the socket buffers between it and
    # us. If the reader stopped reading while the handlers are blocked, the listener
    # backend could not send, its queue position would stop and the cluster's queue
    # usage would stay above 0.
    capacity = 100
    total = 40_000
    listener = make_listener(channels=("stream",), name="slow", event_buffer_size=capacity)
    got = Collector()
    max_buffered = []
    entered = threading.Event()
    release = threading.Event()

    @listener.on_event("stream")
    def gated(event):
        got(event)
        max_buffered.append(listener.get_stats()["buffered"])
        entered.set()
        release.wait(120)       # the handler is blocked until the test has seen the queue drained

    def queue_usage():
        with admin_db.cursor() as cur:
            cur.execute("SELECT pg_notification_queue_usage()")
            return cur.fetchone()[0]

    listener.start()
    try:
        note = "n" * 500
        with row_stream_db.cursor() as cur:
            for _ in range(total // 1000):
                cur.execute("INSERT INTO stream (note) SELECT %s FROM generate_series(1, 1000)", (note,))
        assert entered.wait(30), "no event reached the handler"
        # The reader received every notification and the server's queue drained while
        # the one handler call is still blocked on its first event.
        wait_for(lambda: queue_usage() == 0, timeout=90, message="server notification queue not drained")
        wait_for(lambda: listener.stats["received"] == total, timeout=30,
                 message=f"the reader stopped reading: received {listener.stats['received']} of {total}")
        assert len(got) == 1
        stats = listener.get_stats()
        assert stats["buffered"] <= capacity
        # Only what fits in the buffer is held: the rest was dropped to the log.
        assert stats["dropped_to_log"] >= total - capacity
    finally:
        release.set()
    expected = assert_exactly_once_in_row_order(got, pg_cluster, dbname)
    assert len(expected) == total
    assert got.ids() == sorted(got.ids()), "one writer: events must arrive in log-id order"
    # the buffer, plus the one page in flight (a catch-up's: of at most the buffer), counted too
    assert max(max_buffered) <= 2 * capacity
    stats = listener.get_stats()
    assert stats["caught_up"] >= stats["dropped_to_log"] > 0


def test_stop_during_reconnect_interrupts_the_backoff(stream_db, make_listener, dsn):
    proxy = TcpProxy(dsn["host"], dsn["port"])
    try:
        # A first backoff step of 10 minutes: a stop that waited for it could not end
        # the reader within stop()'s own 5-second timeout.
        listener = make_listener(channels=("stream",), postgres_port=proxy.port, name="stopping",
                                 reconnect_delay_ms=600_000, reconnect_delay_max_ms=600_000)
        attempts = counter(listener.signals.reconnecting)
        listener.start()
        proxy.cut()
        # attempt 1 goes at once and fails; attempt 2 is announced before its backoff wait
        wait_for(lambda: len(attempts) >= 2, timeout=20)
        assert attempts[1]["delay_s"] >= 60
        listener.stop(timeout=5.0)
        assert not any(t.is_alive() for t in listener.threads())
        assert listener.state is ConnectionState.STOPPED
        assert len(attempts) == 2       # stopping made no further attempt
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
        (event,) = got.wait(1, settle=listener)
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


def test_round_trip_every_20000_events_whatever_the_interval(stream_db, make_listener):
    # README, "How no event is lost" step 4: every health_check_interval_s *and every
    # 20,000 events* the reader sends its marker round trip (which lets positions
    # advance under load). With a 10-minute interval only the event count can cause one.
    listener = make_listener(channels=("stream",), name="every-n", health_check_interval_s=600.0,
                             health_check_timeout_s=60.0)
    got = Collector()
    listener.on_event("stream", got)
    listener.start()
    delivered = 0
    for round_trip in range(1, 4):
        with stream_db.cursor() as cur:
            cur.execute("INSERT INTO stream (note) SELECT 'bulk' FROM generate_series(1, 19999)")
        delivered += 19_999
        got.wait(delivered, timeout=60)
        assert listener.stats["health_checks"] == round_trip - 1, "a round trip before the 20,000th event"
        with stream_db.cursor() as cur:
            cur.execute("INSERT INTO stream (note) VALUES ('20,000th')")
        delivered += 1
        got.wait(delivered, timeout=60)
        wait_for(lambda: listener.stats["health_checks"] == round_trip, timeout=30,
                 message=f"no round trip after {20_000 * round_trip} events "
                         f"(health checks: {listener.stats['health_checks']})")
    assert listener.stats["received"] == listener.stats["delivered"] == len(got) == 60_000
    assert listener.stats["health_checks"] == 3 and listener.stats["health_check_failures"] == 0
