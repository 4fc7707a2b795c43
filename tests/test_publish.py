"""publish(): through the event log, buffered in order during an outage when asked to."""

import pytest

from pgnotify_sync import ConnectError, PgNotifyError, PublishBufferFull, install

from helpers import wait_for
from pgutil import Collector
from tcpproxy import TcpProxy


@pytest.fixture
def proxy(dsn):
    p = TcpProxy(dsn["host"], dsn["port"])
    yield p
    p.close()


def test_publish_is_parameterized_and_logged(db, make_listener):
    install(db)
    listener = make_listener(channels=("app",))
    got = Collector()
    listener.on_event("app", got)
    listener.start()
    nasty = {"text": "'); DROP TABLE x; --", "ünï": "☃", "big": "y" * 20_000}
    ident = listener.publish("app", nasty)
    (event,) = got.wait(1)
    assert event.data == nasty and event.id == ident
    with db.cursor() as cur:
        cur.execute("SELECT channel, operation FROM pgnotify_sync.event_log WHERE id = %s", (ident,))
        assert cur.fetchone() == ("app", "PUBLISH")
    with pytest.raises(PgNotifyError, match="not JSON-serialisable"):
        listener.publish("app", {"x": object()})


def test_publish_without_buffering_raises_at_once_during_an_outage(db, make_listener, proxy):
    install(db)
    publisher = make_listener(channels=("app",), postgres_port=proxy.port)
    publisher.publish("app", {"n": 0})
    proxy.cut()
    with pytest.raises(ConnectError):
        publisher.publish("app", {"n": 1})


def test_buffered_publishes_are_sent_in_order_after_the_outage(db, make_listener, proxy, dsn):
    install(db)
    watcher = make_listener(channels=("app",))       # direct: sees what arrives
    got = Collector()
    watcher.on_event("app", got)
    watcher.start()
    publisher = make_listener(channels=("app",), postgres_port=proxy.port, enable_event_buffering=True,
                              publish_buffer_size=5)
    publisher.start()
    assert publisher.publish("app", {"n": 0}) is not None
    proxy.cut()
    for n in range(1, 6):
        assert publisher.publish("app", {"n": n}) is None          # kept, not sent yet
    with pytest.raises(PublishBufferFull, match="was not sent"):
        publisher.publish("app", {"n": 6})
    assert publisher.get_stats()["publish_buffered"] == 5
    proxy.restore()
    events = got.wait(6, timeout=20)                                   # the watchdog flushes
    assert [e.data["n"] for e in events] == [0, 1, 2, 3, 4, 5]
    wait_for(lambda: publisher.get_stats()["publish_buffered"] == 0)
    publisher.publish("app", {"n": 7})
    assert [e.data["n"] for e in got.wait(7)][-1] == 7
