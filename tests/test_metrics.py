"""Prometheus metrics scraped from a real /metrics endpoint, and logs, while a
listener runs through events and faults. Every metric is checked by value, in a
situation where the right value is known (tests/test_metrics_values.py has more)."""

import io
import json
import logging
import threading
import time
import urllib.request

import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from pgnotify_sync.testing import free_port
from pgnotify_sync.logs import JsonFormatter
from pgnotify_sync.metrics import metrics_wsgi_app, start_metrics_server

from helpers import wait_for
from pgutil import Collector, counter

SECRET_COLUMN_VALUE = "hunter2-never-leaves"        # in the excluded column: never sent
ROW_VALUE = "row-value-7c1e9b-never-logged"         # in sent columns: reaches the listener


class Scraper:
    def __init__(self, registry):
        self.port = free_port()
        self.server, self.thread = start_metrics_server(self.port, registry=registry)
        self.text = ""

    def scrape(self):
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/metrics", timeout=5) as resp:
            assert resp.status == 200
            self.text = resp.read().decode()
        return self.text

    def samples(self, name, **labels):
        """The samples of *name* whose labels include *labels* (one fresh scrape)."""
        return [sample for family in text_string_to_metric_families(self.scrape()) for sample in family.samples
                if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items())]

    def value(self, name, **labels):
        """Sum of the samples of *name* whose labels include *labels*; a metric that is
        not exported at all fails the test (it never reads as 0)."""
        found = self.samples(name, **labels)
        assert found, f"no sample {name} with labels {labels} in the scrape:\n{self.text}"
        return sum(sample.value for sample in found)

    def maybe(self, name, **labels):
        """Like value(), but None when absent (for gauges exported only once known)."""
        found = self.samples(name, **labels)
        return sum(sample.value for sample in found) if found else None

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def registry():
    return CollectorRegistry()


@pytest.fixture
def scraper(registry):
    s = Scraper(registry)
    yield s
    s.close()


@pytest.fixture
def json_logs():
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger("pgnotify_sync")
    old_level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    yield stream
    logger.removeHandler(handler)
    logger.setLevel(old_level)


class Gate:
    """A handler wrapper that blocks on the first plain-payload event (no log id, so
    neither the log nor the lag counts it) until released: events pile up behind it."""

    PAYLOAD = '{"operation": "INSERT", "schema": "public", "table": "messages", "data": {"gate": true}}'

    def __init__(self):
        self.entered = threading.Event()
        self.released = threading.Event()

    def wrap(self, handler):
        def gated(event):
            if event.id is None and event.data == {"gate": True}:
                self.entered.set()
                self.released.wait(60)
            handler(event)
        return gated

    def close(self, db, channel="messages"):
        """Send the gate event and wait until the handler sits in it."""
        with db.cursor() as cur:
            cur.execute(f"NOTIFY {channel}, %s", (self.PAYLOAD,))
        assert self.entered.wait(15), "the gate event never reached the handler"

    def release(self):
        self.released.set()


@pytest.fixture
def gate(make_listener):
    # Set up after make_listener, so torn down (released) before the listeners stop.
    g = Gate()
    yield g
    g.release()


def insert_rows(db, n, body="x", statements=1):
    with db.cursor() as cur:
        for _ in range(statements):
            cur.execute("INSERT INTO messages (body) SELECT %s FROM generate_series(1, %s)", (body, n))


def test_counters_follow_events_and_faults(installed, make_listener, registry, scraper, pg_cluster, dbname,
                                           json_logs):
    listener = make_listener(name="metrics-a", registry=registry, event_buffer_size=4321)
    got = Collector()
    listener.on_event("messages", got)

    @listener.on_event("messages")
    def picky(event):
        if event.data.get("body") == "boom":
            raise ValueError("handler refused")

    listener.start()
    value = scraper.value
    assert value("pgnotify_sync_events_received_total", listener="metrics-a") == 0      # nothing yet
    assert value("pgnotify_sync_decode_duration_seconds_count", listener="metrics-a") == 0
    with installed.cursor() as cur:
        cur.execute("INSERT INTO messages (body, password_hash) SELECT 'row ' || g, %s "
                    "FROM generate_series(1, 1000) g", (SECRET_COLUMN_VALUE,))
    got.wait(1000)
    wait_for(lambda: value("pgnotify_sync_events_delivered_total", listener="metrics-a", channel="messages") == 1000)
    assert value("pgnotify_sync_events_delivered_total", listener="metrics-a", operation="INSERT",
                 table="messages") == 1000
    assert value("pgnotify_sync_events_received_total", listener="metrics-a") == 1000
    # Two handlers, one timed run per event: 1000 observations, not 2000.
    assert value("pgnotify_sync_handler_duration_seconds_count", listener="metrics-a") == 1000
    assert value("pgnotify_sync_handler_duration_seconds_bucket", listener="metrics-a", le="+Inf") == 1000
    assert value("pgnotify_sync_handler_duration_seconds_sum", listener="metrics-a") > 0
    # One statement of 1000 rows is one notification, drained once: one (mean) observation.
    assert value("pgnotify_sync_decode_duration_seconds_count", listener="metrics-a") == 1

    reconnects = value("pgnotify_sync_reconnects_total", listener="metrics-a")
    assert reconnects == 0
    cut_at = time.time()
    for _ in range(2):
        before = listener.stats["reconnects"]
        pg_cluster.terminate_backends(dbname, application_name="pgnotify_sync")
        wait_for(lambda: listener.stats["reconnects"] > before, timeout=15)
    assert value("pgnotify_sync_reconnects_total", listener="metrics-a") == 2
    wait_for(lambda: value("pgnotify_sync_connection_state", listener="metrics-a", state="LISTENING") == 1)
    assert value("pgnotify_sync_connection_state", listener="metrics-a") == 1      # the other states are 0
    # Uptime counts from the last connect (after the cuts), not from the first one.
    uptime = value("pgnotify_sync_connection_uptime_seconds", listener="metrics-a")
    assert 0 < uptime <= time.time() - cut_at

    with installed.cursor() as cur:
        cur.execute("NOTIFY messages, 'not json'")
        cur.execute("INSERT INTO messages (body) VALUES ('boom')")
    got.wait(1001)
    wait_for(lambda: value("pgnotify_sync_events_delivered_total", listener="metrics-a") == 1001)
    assert value("pgnotify_sync_parse_errors_total", listener="metrics-a", channel="messages") == 1
    assert value("pgnotify_sync_handler_errors_total", listener="metrics-a", channel="messages") == 1
    assert value("pgnotify_sync_events_received_total", listener="metrics-a") == 1002
    assert value("pgnotify_sync_queue_capacity", listener="metrics-a") == 4321
    assert value("process_resident_memory_bytes") > 0
    assert value("process_cpu_seconds_total") > 0

    text = scraper.scrape()
    logs = json_logs.getvalue()
    password = listener.config.postgres_password
    for where in (text, logs):
        assert password not in where
        assert SECRET_COLUMN_VALUE not in where
    records = [json.loads(line) for line in logs.splitlines()]
    kinds = {r["event"] for r in records}
    assert {"delivered", "parsed", "disconnected", "connected", "error"} <= kinds
    delivered_rec = next(r for r in records if r["event"] == "delivered")
    assert delivered_rec["channel"] == "messages" and isinstance(delivered_rec["event_id"], int)
    assert delivered_rec["timestamp"].endswith("Z") and "duration" in delivered_rec["details"]
    assert delivered_rec["details"]["operation"] == "INSERT" and delivered_rec["details"]["table"] == "messages"
    assert all(r["level"] != "DEBUG" for r in records if r["event"] in ("connected", "disconnected"))


@pytest.fixture
def all_logs():
    """Every record of the pgnotify_sync loggers, DEBUG included, kept as records."""
    records = []

    class Keep(logging.Handler):
        def emit(self, record):
            records.append(record)

    handler = Keep(logging.DEBUG)
    logger = logging.getLogger("pgnotify_sync")
    old_level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    yield records
    logger.removeHandler(handler)
    logger.setLevel(old_level)


def rendered(record):
    """Everything a handler could write for *record*: message, extras, traceback."""
    parts = [logging.Formatter("%(levelname)s %(name)s %(message)s").format(record), JsonFormatter().format(record)]
    parts.extend(repr(v) for k, v in vars(record).items() if k not in ("msg", "args", "exc_info"))
    return "\n".join(parts)


def test_row_values_are_never_logged(installed, make_listener, pg_cluster, dbname, all_logs):
    # README: per-event records are DEBUG ... "and row data is never logged" (no level
    # excepted). The value sits in columns that ARE sent (body, room) on every path:
    # inline rows, an UPDATE's old row, a statement read by range, a row too big for
    # NOTIFY read by reference, a buffer overflow and its catch-up, a handler error,
    # a reconnect's catch-up; and in a malformed payload ("logged without its content").
    listener = make_listener(name="nolog", event_buffer_size=50)
    got = Collector()
    listener.on_event("messages", got)

    @listener.on_event("messages")
    def refuse(event):
        if event.operation == "DELETE":
            raise ValueError("handler refused a delete")

    # The first event holds the worker until every statement is in: what follows
    # queues, and 50 single-row statements fill the buffer, so the 100-row statement
    # behind them meets a full buffer and overflows (a statement alone streams page by
    # page within the buffer: it never overflows by its size).
    gate = threading.Event()
    listener.on_event("messages", lambda event: gate.wait(10))
    listener.start()
    with installed.cursor() as cur:
        cur.execute("INSERT INTO messages (room, body, password_hash) VALUES (%s, %s, %s)",
                    (ROW_VALUE, ROW_VALUE, SECRET_COLUMN_VALUE))
        cur.execute("UPDATE messages SET body = body || '-edited'")
        cur.execute("INSERT INTO messages (body) SELECT %s || g FROM generate_series(1, 20) g", (ROW_VALUE,))
        cur.execute("INSERT INTO messages (body) VALUES (%s)", (ROW_VALUE + "y" * 9000,))
        for _ in range(50):
            cur.execute("INSERT INTO messages (body) VALUES (%s)", (ROW_VALUE,))      # a hint each: the buffer fills
        cur.execute("INSERT INTO messages (body) SELECT %s FROM generate_series(1, 100)", (ROW_VALUE,))  # overflows
        cur.execute("DELETE FROM messages WHERE room = %s", (ROW_VALUE,))
        cur.execute("NOTIFY messages, %s", (f'{{"broken": "{ROW_VALUE}"',))
    gate.set()
    got.wait(174)
    pg_cluster.terminate_backends(dbname, application_name="pgnotify_sync")
    insert_rows(installed, 3, body=ROW_VALUE)
    got.wait(177)
    wait_for(lambda: listener.stats["reconnects"] == 1 and listener.stats.get("errors_payload") == 1
             and listener.stats["handler_errors"] == 1, timeout=15)
    assert {e.data["body"] for e in got.events if e.operation == "INSERT"} >= {ROW_VALUE}   # it was sent
    # The overflow and catch-up paths were taken (the DELETE behind the 100 rows may be
    # dropped too, while the channel is still in overflow: 100 or 101).
    assert listener.get_stats()["dropped_to_log"] >= 100 and listener.stats["caught_up"] >= 100
    delivered_ids = {r.event_id for r in all_logs if getattr(r, "event", None) == "delivered"}
    assert delivered_ids >= {e.id for e in got.events}      # every event was logged (at DEBUG)
    levels = {r.levelno for r in all_logs}
    assert {logging.DEBUG, logging.INFO, logging.WARNING} <= levels
    for record in all_logs:
        text = rendered(record)
        assert ROW_VALUE not in text, f"row data in a {record.levelname} log record: {text}"
        assert SECRET_COLUMN_VALUE not in text


def test_two_listeners_share_a_registry_without_colliding(installed, make_listener, registry, scraper):
    a = make_listener(name="reg-a", registry=registry)
    b = make_listener(name="reg-b", registry=registry)
    got_a, got_b = Collector(), Collector()
    a.on_event("messages", got_a)
    b.on_event("messages", got_b)
    a.start()
    b.start()
    with installed.cursor() as cur:
        cur.execute("INSERT INTO messages (body) VALUES ('x')")
    got_a.wait(1)
    got_b.wait(1)
    wait_for(lambda: scraper.value("pgnotify_sync_events_delivered_total", listener="reg-a") == 1
             and scraper.value("pgnotify_sync_events_delivered_total", listener="reg-b") == 1)
    assert scraper.value("pgnotify_sync_events_received_total", listener="reg-a") == 1
    assert scraper.value("pgnotify_sync_events_received_total", listener="reg-b") == 1
    assert scraper.value("pgnotify_sync_connection_state", state="LISTENING") == 2


def test_queue_size_and_lag_count_the_events_behind_a_blocked_handler(installed, make_listener, registry,
                                                                      scraper, gate):
    listener = make_listener(name="metrics-q", registry=registry, accept_plain_payloads=True, health_check_interval_s=0.5)
    got = Collector()
    listener.on_event("messages", gate.wrap(got))
    listener.start()
    queue = lambda: scraper.value("pgnotify_sync_queue_size", listener="metrics-q")  # noqa: E731
    lag = lambda: scraper.maybe("pgnotify_sync_lag_events", listener="metrics-q", channel="messages")  # noqa: E731
    wait_for(lambda: lag() == 0, timeout=15, message="lag gauge never published")
    assert queue() == 0
    gate.close(installed)
    assert queue() == 1                                 # the event its worker holds still counts
    insert_rows(installed, 1, statements=5)             # five notifications of one row
    insert_rows(installed, 20)                          # one notification for 20 rows
    wait_for(lambda: scraper.value("pgnotify_sync_events_received_total", listener="metrics-q") == 26)
    wait_for(lambda: queue() == 26, message="queue size of 1 held + 25 waiting")
    # In the log and not handled: the 25 rows (the gate event has no log row).
    wait_for(lambda: lag() == 25, timeout=15, message="lag of the 25 logged events not handled")
    assert queue() == 26 and len(got) == 0
    gate.release()
    got.wait(26)
    wait_for(lambda: queue() == 0, message="queue size back to 0")
    wait_for(lambda: lag() == 0, timeout=15, message="lag back to 0")
    assert scraper.value("pgnotify_sync_overflow_events_total", listener="metrics-q") == 0
    assert scraper.value("pgnotify_sync_catchup_events_total", listener="metrics-q") == 0


def test_lag_leaves_out_events_handled_past_the_position(installed, make_listener, registry, scraper, gate):
    # Five rows and the gate in one transaction: the five are handled, then the gate
    # blocks. No position move can cover their transaction meanwhile (its marker
    # would queue behind the gate), so they are handled but past the position.
    listener = make_listener(name="metrics-l", registry=registry, accept_plain_payloads=True, health_check_interval_s=0.5)
    got = Collector()
    listener.on_event("messages", gate.wrap(got))
    listener.start()
    lag = lambda: scraper.maybe("pgnotify_sync_lag_events", listener="metrics-l", channel="messages")  # noqa: E731
    with installed.cursor() as cur:
        cur.execute("BEGIN")
        cur.execute("INSERT INTO messages (body) SELECT 'early' FROM generate_series(1, 5)")
        cur.execute("NOTIFY messages, %s", (Gate.PAYLOAD,))
        cur.execute("COMMIT")
    assert gate.entered.wait(15)
    assert len(got) == 5
    insert_rows(installed, 10)
    wait_for(lambda: scraper.value("pgnotify_sync_events_received_total", listener="metrics-l") == 16)
    # 15 logged past the position, 5 of them handled: 10.
    wait_for(lambda: lag() == 10, timeout=15, message="lag of the 10 logged events not handled")
    gate.release()
    got.wait(16)
    wait_for(lambda: lag() == 0, timeout=15, message="lag back to 0")


def test_overflow_and_catchup_and_lag_metrics(installed, make_listener, registry, scraper, gate):
    listener = make_listener(name="metrics-o", registry=registry, accept_plain_payloads=True, event_buffer_size=50,
                             health_check_interval_s=0.5)
    got = Collector()
    listener.on_event("messages", gate.wrap(got))
    listener.start()
    value = scraper.value
    lag = lambda: scraper.maybe("pgnotify_sync_lag_events", listener="metrics-o", channel="messages")  # noqa: E731
    gate.close(installed)
    insert_rows(installed, 1, statements=49)     # 49 hints: with the gate's event, the buffer is full
    wait_for(lambda: value("pgnotify_sync_queue_size", listener="metrics-o") == 50, message="the buffer did not fill")
    insert_rows(installed, 100)         # one statement of 100 rows: meets a full buffer
    wait_for(lambda: value("pgnotify_sync_overflow_events_total", listener="metrics-o", channel="messages") == 100,
             message="the 100 rows dropped from memory")
    assert value("pgnotify_sync_queue_size", listener="metrics-o") == 50
    assert value("pgnotify_sync_catchup_events_total", listener="metrics-o") == 0
    wait_for(lambda: lag() == 149, timeout=15, message="lag of the 149 rows not handled yet")
    gate.release()
    events = got.wait(150)
    # Read back from the log (the 100 dropped, and those of the 49 the catch-up's
    # pages hold too: they are counted as read, and delivered once).
    wait_for(lambda: value("pgnotify_sync_catchup_events_total", listener="metrics-o", channel="messages") >= 100)
    wait_for(lambda: lag() == 0, timeout=15, message="lag gauge should settle at 0")
    assert value("pgnotify_sync_overflow_events_total", listener="metrics-o") == 100
    assert value("pgnotify_sync_events_delivered_total", listener="metrics-o") == 150
    assert value("pgnotify_sync_queue_size", listener="metrics-o") == 0
    with installed.cursor() as cur:
        cur.execute("SELECT id FROM pgnotify_sync.event_log ORDER BY id")
        assert [e.id for e in events[1:]] == [r[0] for r in cur.fetchall()]


def test_rows_gone_from_the_log_are_reported_as_missing(installed, make_listener, registry, scraper, gate):
    # A range notification (20 rows) and a row's hint whose log rows are deleted
    # before the listener reads them: nothing delivered for either, kind "payload"
    # (a hint that matches no committed row: forged, or trimmed).
    listener = make_listener(name="metrics-m", registry=registry, accept_plain_payloads=True)
    got = Collector()
    listener.on_event("messages", gate.wrap(got))
    errors = counter(listener.signals.error)
    listener.start()
    gate.close(installed)
    insert_rows(installed, 20, body="gone")
    insert_rows(installed, 1, body="big" + "y" * 9000)
    insert_rows(installed, 20, body="kept")
    wait_for(lambda: scraper.value("pgnotify_sync_events_received_total", listener="metrics-m") == 42)
    with installed.cursor() as cur:
        cur.execute("DELETE FROM pgnotify_sync.event_log WHERE data->>'body' <> 'kept' "
                    "RETURNING id, data->>'body' = 'gone'")
        deleted = cur.fetchall()
    assert len(deleted) == 21
    gone = sorted(i for i, in_range in deleted if in_range)
    (big,) = [i for i, in_range in deleted if not in_range]
    gate.release()
    got.wait(21)
    wait_for(lambda: len([e for e in errors if e["kind"] == "payload"]) == 2, message="two unmatched reports")
    missing = [e for e in errors if e["kind"] == "payload"]
    assert [(e["channel"], str(e["error"])) for e in missing] == [
        ("messages", f"a range of 20 events (ids {gone[0]}..{gone[-1]}) matches no committed event of this "
                     "channel (forged, or trimmed)"),
        ("messages", "1 hints match no committed event of this channel in the event log (forged, or trimmed): "
                     "nothing delivered for them")]
    assert listener.get_stats()["errors_payload"] == 2 and listener.get_stats()["unmatched_hints"] == 2
    assert big not in [e.id for e in got.events]
    assert [e.data["body"] for e in got.events[1:]] == ["kept"] * 20
    wait_for(lambda: scraper.value("pgnotify_sync_events_delivered_total", listener="metrics-m") == 21)
    assert len(errors) == 2                 # nothing else went wrong


def test_flask_wsgi_metrics_app(registry, installed, make_listener):
    flask = pytest.importorskip("flask")
    from werkzeug.middleware.dispatcher import DispatcherMiddleware
    listener = make_listener(name="flaskm", registry=registry)
    listener.start()
    app = flask.Flask("t")
    app.wsgi_app = DispatcherMiddleware(app.wsgi_app, {"/metrics": metrics_wsgi_app(registry)})
    resp = app.test_client().get("/metrics")
    assert resp.status_code == 200
    assert b'pgnotify_sync_connection_state{listener="flaskm",state="LISTENING"} 1.0' in resp.data
