"""Metrics checked by value where a fault or an outage makes the value known:
reconnect attempts, uptime, health checks, the pool, the publish buffer,
retention, consumer gaps and SSH tunnel restarts. (tests/test_metrics.py has the
scraper, the event counters, queue, lag, overflow and missing rows.)"""

import threading
import time

from prometheus_client.parser import text_string_to_metric_families

from pgnotify_sync import Listener

from helpers import wait_for
from pgutil import Collector, config_for, counter
from test_metrics import Scraper, insert_rows, registry, scraper  # noqa: F401 (fixtures)


def rtt_histogram(scraper, name):
    """{"count", "sum", <le>...} of the health-check rtt histogram, from one scrape."""
    prefix = "pgnotify_sync_health_check_rtt_seconds"
    out = {}
    for family in text_string_to_metric_families(scraper.scrape()):
        for sample in family.samples:
            if sample.name.startswith(prefix) and sample.labels.get("listener") == name:
                out[sample.labels.get("le") or sample.name[len(prefix) + 1:]] = sample.value
    assert "count" in out, f"no {prefix} for {name}"
    return out


def state_is(scraper, name, state):
    return scraper.value("pgnotify_sync_connection_state", listener=name, state=state) == 1


def test_reconnect_attempts_equal_failed_attempts_and_uptime_restarts(installed, make_listener, registry,
                                                                      scraper, proxy):
    name = "metrics-r"
    listener = make_listener(name=name, registry=registry, postgres_port=proxy.port, reconnect_delay_ms=20,
                             reconnect_delay_max_ms=100, connect_timeout_s=2.0)
    tries = counter(listener.signals.reconnecting)
    lost = counter(listener.signals.disconnected)
    attempts = lambda: scraper.value("pgnotify_sync_reconnect_attempts_total", listener=name)  # noqa: E731
    uptime = lambda: scraper.value("pgnotify_sync_connection_uptime_seconds", listener=name)  # noqa: E731
    proxy.cut()                         # the first connect fails until restored
    listener.start(wait=False)
    wait_for(lambda: len(tries) >= 3, timeout=20, message="no retries of the first connect")
    assert state_is(scraper, name, "CONNECTING") and uptime() == 0
    restored_at = time.time()
    proxy.restore()
    wait_for(lambda: state_is(scraper, name, "LISTENING"), timeout=20)
    # Each failed attempt is counted once and followed by one announcement of the next.
    assert attempts() == len(tries)
    assert scraper.value("pgnotify_sync_reconnects_total", listener=name) == 0
    assert 0 < uptime() <= time.time() - restored_at

    first_round = len(tries)
    proxy.cut()                         # the session is lost; reconnects fail until restored
    wait_for(lambda: len(tries) >= first_round + 4, timeout=20, message="no retries after the cut")
    wait_for(lambda: state_is(scraper, name, "RECONNECTING"))
    assert uptime() == 0
    restored_at = time.time()
    proxy.restore()
    wait_for(lambda: state_is(scraper, name, "LISTENING"), timeout=20)
    assert len(lost) == 1
    # After a loss the first attempt goes at once and is announced (attempt=1) but only
    # failed attempts count: one fewer than the announcements of that round.
    assert attempts() == len(tries) - len(lost)
    assert [t["attempt"] for t in tries[first_round:]] == list(range(1, len(tries) - first_round + 1))
    assert scraper.value("pgnotify_sync_reconnects_total", listener=name) == 1
    assert 0 < uptime() <= time.time() - restored_at


def test_health_check_failure_counted_once_per_frozen_path(installed, make_listener, registry, scraper, proxy):
    name = "metrics-h"
    listener = make_listener(name=name, registry=registry, postgres_port=proxy.port, health_check_interval_s=0.3,
                             health_check_timeout_s=1.0, query_timeout_s=2.0)
    lost = counter(listener.signals.disconnected)
    value = scraper.value
    listener.start()
    wait_for(lambda: value("pgnotify_sync_health_check_rtt_seconds_count", listener=name) >= 2, timeout=15)
    assert value("pgnotify_sync_health_check_failures_total", listener=name) == 0
    proxy.freeze()                      # sockets open, nothing forwarded: only the deadline notices
    wait_for(lambda: lost, timeout=15, message="the frozen path was never noticed")
    wait_for(lambda: listener.stats["reconnects"] == 1 and state_is(scraper, name, "LISTENING"), timeout=20)
    assert "health check got no answer" in str(lost[0]["error"])
    assert value("pgnotify_sync_health_check_failures_total", listener=name) == 1
    checks = listener.stats["health_checks"]
    wait_for(lambda: listener.stats["health_checks"] >= checks + 2, timeout=15)   # round trips again
    assert value("pgnotify_sync_health_check_failures_total", listener=name) == 1
    assert len(lost) == 1
    # Every answered round trip observed once, the missed one not at all (the count is
    # read in the same scrape as the buckets; the stats counter moves just before it).
    def observed():
        hist = rtt_histogram(scraper, name)          # one scrape: count and buckets agree
        return hist if hist["count"] == listener.stats["health_checks"] else None
    hist = wait_for(observed, timeout=15, message="rtt observations differ from answered round trips")
    count = hist["count"]
    assert count >= 4
    # All of them answered within the 1 s deadline.
    assert hist["1.0"] == hist["+Inf"] == count and hist["sum"] > 0


def test_pool_in_use_follows_checked_out_connections(installed, make_listener, registry, scraper, pg_cluster,
                                                     dbname):
    name = "metrics-p"
    listener = make_listener(name=name, registry=registry, cleanup_interval_s=0, health_check_interval_s=30.0)
    listener.start()
    in_use = lambda: scraper.value("pgnotify_sync_pool_connections_in_use", listener=name)  # noqa: E731
    wait_for(lambda: in_use() == 0)
    # A SHARE lock blocks publish()'s INSERT into the log but no read (lag, catch-up).
    blocker = pg_cluster.connect(dbname)
    results = []
    try:
        with blocker.cursor() as cur:
            cur.execute("BEGIN")
            cur.execute("LOCK TABLE pgnotify_sync.event_log IN SHARE MODE")
        threads = [threading.Thread(target=lambda n=n: results.append(listener.publish("messages", {"n": n})),
                                    daemon=True) for n in range(2)]
        for t in threads:
            t.start()

        def waiting():
            with installed.cursor() as cur:
                cur.execute("SELECT count(*) FROM pg_locks WHERE relation = 'pgnotify_sync.event_log'::regclass "
                            "AND NOT granted")
                return cur.fetchone()[0]
        wait_for(lambda: waiting() == 2, timeout=15, message="both publishes waiting on the lock")
        wait_for(lambda: in_use() == 2, message="two pooled connections checked out")
    finally:
        with blocker.cursor() as cur:
            cur.execute("ROLLBACK")
        blocker.close()
    for t in threads:
        t.join(15)
    assert len(results) == 2 and all(isinstance(r, int) for r in results)
    wait_for(lambda: in_use() == 0, message="both connections returned")
    assert scraper.value("pgnotify_sync_pool_connections_discarded_total", listener=name) == 0


def test_pool_discards_exactly_the_dead_connection(installed, make_listener, registry, scraper, pg_cluster,
                                                   dbname):
    name = "metrics-pd"
    listener = make_listener(name=name, registry=registry, pool_max_connections=1, cleanup_interval_s=0)
    got = Collector()
    listener.on_event("messages", got)
    listener.start()
    listener.publish("messages", {"n": 1})      # the pool's only connection exists, idle
    got.wait(1)
    discarded = lambda: scraper.value("pgnotify_sync_pool_connections_discarded_total", listener=name)  # noqa
    assert discarded() == 0
    # The listener's and the pool's backends: both killed.
    assert pg_cluster.terminate_backends(dbname, application_name="pgnotify_sync") == 2
    wait_for(lambda: listener.stats["reconnects"] == 1 and state_is(scraper, name, "LISTENING"), timeout=20)
    listener.publish("messages", {"n": 2})
    got.wait(2)
    assert discarded() == 1
    assert scraper.value("pgnotify_sync_pool_connections_in_use", listener=name) == 0


def test_publish_buffer_gauge_counts_the_waiting_publishes(installed, make_listener, registry, scraper, proxy):
    name = "metrics-b"
    listener = make_listener(name=name, registry=registry, postgres_port=proxy.port, enable_event_buffering=True,
                             connect_timeout_s=1.0)
    listener.start()
    buffered = lambda: scraper.value("pgnotify_sync_publish_buffer_size", listener=name)  # noqa: E731
    assert listener.publish("messages", {"n": 0}) is not None
    assert buffered() == 0
    proxy.cut()
    for n in range(1, 5):
        assert listener.publish("messages", {"n": n}) is None
        assert buffered() == n
    proxy.restore()
    wait_for(lambda: buffered() == 0, timeout=20, message="the buffer was never flushed")
    with installed.cursor() as cur:
        cur.execute("SELECT (data->>'n')::int FROM pgnotify_sync.event_log ORDER BY id")
        assert [r[0] for r in cur.fetchall()] == [0, 1, 2, 3, 4]


def test_retention_deleted_and_consumer_gap_count_the_trimmed_rows(installed, make_listener, registry, scraper):
    value = scraper.value
    away = make_listener(name="metrics-g1", consumer="slowpoke")
    away.start()
    away.stop()                                 # registered, then away: needs what follows
    insert_rows(installed, 1, statements=3)
    with installed.cursor() as cur:
        cur.execute("UPDATE pgnotify_sync.event_log SET created_at = now() - interval '8 days'")
    trimmer = make_listener(name="metrics-t", registry=registry, retention_s=3600, consumer_retention_s=7 * 86400,
                            cleanup_interval_s=1)
    trimmer.start()
    # The watchdog's cleanup: three rows past even the consumer retention.
    wait_for(lambda: value("pgnotify_sync_retention_deleted_total", listener="metrics-t") == 3, timeout=15)
    insert_rows(installed, 1, statements=2)     # old, but the consumer still needs them: kept
    with installed.cursor() as cur:
        cur.execute("INSERT INTO pgnotify_sync.event_log (channel, operation, schema_name, table_name, data) "
                    "VALUES ('other', 'INSERT', 'public', 'x', '{}')")     # old, nobody needs it: goes
        cur.execute("UPDATE pgnotify_sync.event_log SET created_at = now() - interval '2 days'")

        def left():
            cur.execute("SELECT channel, count(*) FROM pgnotify_sync.event_log GROUP BY 1 ORDER BY 1")
            return cur.fetchall()
        wait_for(lambda: left() == [("messages", 2)], timeout=15)
    # Counted once the batch's transaction is back (the rows are gone a moment before).
    wait_for(lambda: value("pgnotify_sync_retention_deleted_total", listener="metrics-t") == 4, timeout=5)
    assert trimmer.cleanup() == 0
    assert value("pgnotify_sync_retention_deleted_total", listener="metrics-t") == 4
    assert value("pgnotify_sync_consumer_gap_events_total", listener="metrics-t") == 0   # not a consumer

    back = make_listener(name="metrics-g2", registry=registry, consumer="slowpoke")
    got = Collector()
    back.on_event("messages", got)
    errors = counter(back.signals.error)
    back.start()
    got.wait(2)                                 # the two kept rows
    wait_for(lambda: [e for e in errors if e["kind"] == "gap"])
    assert value("pgnotify_sync_consumer_gap_events_total", listener="metrics-g2", channel="messages") == 3
    assert value("pgnotify_sync_retention_deleted_total", listener="metrics-g2") == 0


# -- SSH tunnels --------------------------------------------------------------------------


def session_of(server, tunnel):
    port = tunnel.transport.sock.getsockname()[1]
    return server.session_for_client_port(port)


def test_tunnel_restarts_counted_per_tunnel(installed, dsn, ssh_server, registry, scraper):
    name = "metrics-s"
    cfg = config_for(dsn, channels=("messages",), ssh_host=ssh_server.host, ssh_port=ssh_server.port,
                     ssh_user=ssh_server.user, ssh_key_path=ssh_server.client_key_path,
                     ssh_known_hosts=ssh_server.known_hosts_path, health_check_interval_s=1.0,
                     health_check_timeout_s=1.0)
    listener = Listener(cfg, registry=registry, name=name)
    restarts = lambda tunnel: scraper.value("pgnotify_sync_tunnel_restarts_total",  # noqa: E731
                                            listener=name, tunnel=tunnel)
    try:
        got = Collector()
        listener.on_event("messages", got)
        listener.start()
        listener.publish("messages", {"n": 1})          # opens the pool's tunnel
        got.wait(1)
        assert (restarts("listener"), restarts("pool")) == (0, 0)
        ssh_server.kill_session(session_of(ssh_server, listener._connections.listener_tunnel))
        wait_for(lambda: listener.stats["reconnects"] == 1 and state_is(scraper, name, "LISTENING"), timeout=20)
        assert (restarts("listener"), restarts("pool")) == (1, 0)
        ssh_server.kill_session(session_of(ssh_server, listener._connections.pool_tunnel))
        wait_for(lambda: not listener._connections.pool_tunnel._forwarder.is_active, timeout=15)
        listener.publish("messages", {"n": 2})          # through a rebuilt pool tunnel
        got.wait(2)
        assert (restarts("listener"), restarts("pool")) == (1, 1)
        assert listener.stats["reconnects"] == 1
    finally:
        listener.stop()
