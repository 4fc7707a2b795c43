"""Tests of pgnotify_sync._publisher.Publisher against the real cluster.

The publisher's pool reaches the database through a TcpProxy (conftest ``proxy``):
``proxy.cut()`` is the database going away (every connection closed, new ones
refused), ``proxy.restore()`` its return. What reached the database is read from
the event log directly.
"""

import contextlib
import json
import threading
import time

import psycopg2
import pytest

from pgnotify_sync import install
from pgnotify_sync._counters import Counters
from pgnotify_sync._pool import ConnectionPool
from pgnotify_sync._publisher import Publisher
from pgnotify_sync.errors import ConfigError, ConnectError, ListenerStateError, PgNotifyError, PublishBufferFull

from helpers import wait_for
from pgutil import config_for, execute


class Rig:
    """A Publisher on a pool behind *port*, with recording stats and report."""

    def __init__(self, dsn, port, **overrides):
        self.config = config_for(dsn, postgres_port=port, channel_prefix="app", **overrides)
        # validate_after_s=60: an idle connection is handed out unchecked, so a cut
        # shows as a failed query first (the case the retry is for).
        self.pool = ConnectionPool("pub-pool", self.config.connect_kwargs, 2, statement_timeout_ms=5000,
                                   validate_after_s=60)
        self.stats = Counters(publish_flushed=0, publish_dropped=0)
        self.reports = []
        self.is_closed = False
        self.pool_calls = 0
        self.publisher = Publisher("pub", self.config, self.get_pool, self.stats, self.report,
                                   closed=lambda: self.is_closed)

    def get_pool(self):
        self.pool_calls += 1
        return self.pool

    def report(self, kind, error, channel, **kwargs):
        self.reports.append((kind, error, channel))


@pytest.fixture
def rig(db, dsn, proxy):
    install(db)
    rigs = []

    def make(**overrides):
        r = Rig(dsn, proxy.port, **overrides)
        rigs.append(r)
        return r

    yield make
    for r in rigs:
        r.pool.close()


def logged(db):
    """(id, channel, data) of every event in the log, in id order."""
    return execute(db, "SELECT id, channel, data FROM pgnotify_sync.event_log ORDER BY id")


def logged_n(db):
    return [data["n"] for _, _, data in logged(db)]


# -- publish -------------------------------------------------------------------------------


def test_publish_writes_the_log_and_notifies_on_the_wire_channel(rig, db):
    r = rig()
    execute(db, 'LISTEN "app.orders"')
    ident = r.publisher.publish("orders", {"n": 1, "text": "é'; --"})
    assert isinstance(ident, int)
    assert logged(db) == [(ident, "app.orders", {"n": 1, "text": "é'; --"})]
    assert execute(db, "SELECT operation FROM pgnotify_sync.event_log") == [("PUBLISH",)]

    def notified():
        db.poll()
        return list(db.notifies)
    (notify,) = wait_for(notified, message="no notification")
    assert notify.channel == "app.orders"
    body = json.loads(notify.payload)
    assert body == {"id": ident, "xid": body["xid"]} and type(body["xid"]) is int     # a hint: no row values
    row = execute(db, "SELECT data FROM pgnotify_sync.event_log WHERE id = %s", (ident,))
    assert row == [({"n": 1, "text": "é'; --"},)]
    assert len(r.publisher) == 0


def test_bad_payloads_and_channels_are_refused(rig, db):
    r = rig(enable_event_buffering=True)
    with pytest.raises(PgNotifyError, match="^publish on 'orders': payload is not JSON-serialisable"):
        r.publisher.publish("orders", {"x": object()})
    with pytest.raises(ConfigError, match="^channel: "):
        r.publisher.publish("", {"n": 1})
    with pytest.raises(ConfigError, match="^channel: .*63-byte"):
        r.publisher.publish("x" * 60, {"n": 1})
    assert logged(db) == [] and len(r.publisher) == 0


def test_publish_on_a_stopped_listener_raises(rig, db):
    r = rig(enable_event_buffering=True)
    r.is_closed = True
    with pytest.raises(ListenerStateError, match="^pub: stopped"):
        r.publisher.publish("orders", {"n": 1})
    assert logged(db) == [] and len(r.publisher) == 0
    assert r.pool_calls == 0        # not even a pool made for it


def test_a_database_error_is_raised_not_buffered(rig, db):
    r = rig(enable_event_buffering=True)
    execute(db, "DROP SCHEMA pgnotify_sync CASCADE")
    with pytest.raises(PgNotifyError, match="^pub: publish on 'app.orders' failed: ") as info:
        r.publisher.publish("orders", {"n": 1})
    assert not isinstance(info.value, ConnectError)      # retrying would not help
    assert len(r.publisher) == 0


# -- retry ---------------------------------------------------------------------------------


def test_a_dead_pooled_connection_is_retried_on_a_fresh_one(rig, db, pg_cluster, dbname):
    r = rig()
    r.publisher.publish("orders", {"n": 1})            # leaves an idle connection in the pool
    assert pg_cluster.terminate_backends(dbname, application_name="pgnotify_sync") == 1
    ident = r.publisher.publish("orders", {"n": 2})     # no error: the second try works
    assert ident is not None and logged_n(db) == [1, 2]
    assert r.pool.discarded == 1


class LosesFirstReply:
    """A pool whose first block commits and then loses the reply (as a connection
    dying between COMMIT and its answer would)."""

    def __init__(self, pool):
        self.pool = pool
        self.lost = 0

    @contextlib.contextmanager
    def connection(self, timeout_s=30.0):
        with self.pool.connection(timeout_s) as conn:
            yield conn
        if not self.lost:
            self.lost += 1
            raise psycopg2.OperationalError("server closed the connection unexpectedly")


def test_a_lost_reply_is_retried_without_a_second_event(rig, db):
    r = rig()
    flaky = LosesFirstReply(r.pool)
    r.get_pool = lambda: flaky
    r.publisher = Publisher("pub", r.config, r.get_pool, r.stats, r.report, closed=lambda: False)
    ident = r.publisher.publish("orders", {"n": 1})
    assert flaky.lost == 1
    # The retry carried the same key: the first copy stands, and its id is returned.
    assert logged(db) == [(ident, "app.orders", {"n": 1})]


# -- the database away ---------------------------------------------------------------------


def test_without_buffering_publish_raises_while_the_database_is_away(rig, db, proxy):
    r = rig()
    r.publisher.publish("orders", {"n": 0})
    proxy.cut()
    with pytest.raises(ConnectError):
        r.publisher.publish("orders", {"n": 1})
    assert len(r.publisher) == 0
    proxy.restore()
    assert r.publisher.flush() == 0
    assert logged_n(db) == [0]          # the refused event was never sent


def test_buffered_while_away_then_flushed_in_order(rig, db, proxy):
    r = rig(enable_event_buffering=True, publish_buffer_size=5)
    assert r.publisher.publish("orders", {"n": 0}) is not None
    proxy.cut()
    assert r.publisher.publish("orders", {"n": 1}) is None
    assert r.publisher.publish("orders", {"n": 2}) is None
    assert len(r.publisher) == 2
    assert r.publisher.flush() == 2             # still away: nothing sent, nothing dropped
    assert r.stats["publish_flushed"] == 0
    proxy.restore()
    # Reachable again, but older events wait: this one goes behind them.
    assert r.publisher.publish("orders", {"n": 3}) is None
    assert logged_n(db) == [0]
    assert r.publisher.flush() == 0
    assert logged_n(db) == [0, 1, 2, 3]
    assert r.stats["publish_flushed"] == 3
    assert r.publisher.publish("orders", {"n": 4}) is not None     # empty buffer: sent at once
    assert logged_n(db) == [0, 1, 2, 3, 4]
    assert r.reports == []


def test_a_full_buffer_raises_and_keeps_what_it_has(rig, db, proxy):
    r = rig(enable_event_buffering=True, publish_buffer_size=2)
    proxy.cut()
    r.publisher.publish("orders", {"n": 1})
    r.publisher.publish("orders", {"n": 2})
    with pytest.raises(PublishBufferFull,
                       match=r"^pub: database unreachable and the publish buffer is full \(2 events\): "
                             r"the event on 'orders' was not sent$"):
        r.publisher.publish("orders", {"n": 3})
    assert len(r.publisher) == 2
    proxy.restore()
    assert r.publisher.flush() == 0
    assert logged_n(db) == [1, 2]


def test_flush_until_gives_up_at_the_deadline_and_reports_the_loss(rig, db, proxy):
    r = rig(enable_event_buffering=True)
    proxy.cut()
    r.publisher.publish("orders", {"n": 1})
    r.publisher.publish("orders", {"n": 2})
    started = time.monotonic()
    r.publisher.flush_until(started + 0.3)
    assert 0.3 <= time.monotonic() - started < 5
    assert len(r.publisher) == 0
    assert r.stats["publish_dropped"] == 2
    assert r.reports == [("publish", "stop(): 2 buffered publishes could not be sent "
                                     "(database unreachable until the timeout)", None)]
    proxy.restore()
    assert r.publisher.flush() == 0
    assert logged_n(db) == []           # dropped means not sent later either


def test_flush_until_keeps_trying_until_the_database_is_back(rig, db, proxy):
    r = rig(enable_event_buffering=True)
    proxy.cut()
    r.publisher.publish("orders", {"n": 1})
    r.publisher.publish("orders", {"n": 2})
    tried = proxy.accepted
    done = threading.Event()
    t = threading.Thread(target=lambda: (r.publisher.flush_until(time.monotonic() + 20), done.set()),
                         name="flush-until")
    t.start()
    try:
        # Let it fail at least twice before the database comes back.
        wait_for(lambda: proxy.accepted >= tried + 2, message="flush_until did not try to connect")
        proxy.restore()
        assert done.wait(15), "flush_until did not return once the database was back"
    finally:
        proxy.restore()
        t.join(25)
    assert logged_n(db) == [1, 2]
    assert len(r.publisher) == 0
    assert r.stats["publish_flushed"] == 2 and r.stats["publish_dropped"] == 0
    assert r.reports == []
