"""Prometheus metrics scraped from a real /metrics endpoint, and JSON logs, while a
listener runs through events and faults."""

import io
import json
import logging
import urllib.request

import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from pgnotify_sync._cluster import free_port
from pgnotify_sync.logs import JsonFormatter
from pgnotify_sync.metrics import metrics_wsgi_app, start_metrics_server

from helpers import wait_for
from pgutil import Collector

SECRET_COLUMN_VALUE = "hunter2-never-leaves"


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

    def value(self, name, **labels):
        """Sum of the samples of *name* whose labels include *labels*."""
        total = 0.0
        for family in text_string_to_metric_families(self.scrape()):
            for sample in family.samples:
                if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                    total += sample.value
        return total

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


def test_counters_follow_events_and_faults(installed, make_listener, registry, scraper, pg_cluster, dbname,
                                           json_logs):
    listener = make_listener(name="metrics-a", registry=registry)
    got = Collector()
    listener.on_event("messages", got)

    @listener.on_event("messages")
    def picky(event):
        if event.data.get("body") == "boom":
            raise ValueError("handler refused")

    listener.start()
    delivered = lambda: scraper.value("pgnotify_sync_events_delivered_total", listener="metrics-a",  # noqa: E731
                                      channel="messages")
    base = delivered()
    with installed.cursor() as cur:
        cur.execute("INSERT INTO messages (body, password_hash) SELECT 'row ' || g, %s "
                    "FROM generate_series(1, 1000) g", (SECRET_COLUMN_VALUE,))
    got.wait(1000)
    wait_for(lambda: delivered() - base == 1000)
    assert scraper.value("pgnotify_sync_events_delivered_total", listener="metrics-a", operation="INSERT",
                         table="messages") == 1000
    assert scraper.value("pgnotify_sync_events_received_total", listener="metrics-a") == 1000
    assert scraper.value("pgnotify_sync_handler_duration_seconds_count", listener="metrics-a") == 1000
    assert scraper.value("pgnotify_sync_decode_duration_seconds_count", listener="metrics-a") >= 1

    reconnects = scraper.value("pgnotify_sync_reconnects_total", listener="metrics-a")
    for _ in range(2):
        before = listener.stats["reconnects"]
        pg_cluster.terminate_backends(dbname, application_name="pgnotify_sync")
        wait_for(lambda: listener.stats["reconnects"] > before, timeout=15)
    assert scraper.value("pgnotify_sync_reconnects_total", listener="metrics-a") - reconnects == 2
    wait_for(lambda: scraper.value("pgnotify_sync_connection_state", listener="metrics-a", state="LISTENING") == 1)
    assert scraper.value("pgnotify_sync_connection_uptime_seconds", listener="metrics-a") >= 0

    with installed.cursor() as cur:
        cur.execute("NOTIFY messages, 'not json'")
        cur.execute("INSERT INTO messages (body) VALUES ('boom')")
    wait_for(lambda: scraper.value("pgnotify_sync_parse_errors_total", listener="metrics-a") == 1)
    wait_for(lambda: scraper.value("pgnotify_sync_handler_errors_total", listener="metrics-a") == 1)
    assert scraper.value("pgnotify_sync_queue_capacity", listener="metrics-a") == 10_000
    assert "process_resident_memory_bytes" in scraper.text or "process_cpu_seconds_total" in scraper.text

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


def test_overflow_and_catchup_and_lag_metrics(installed, make_listener, registry, scraper):
    listener = make_listener(name="metrics-o", registry=registry, event_buffer_size=50,
                             health_check_interval_s=0.5)
    got = Collector()
    listener.on_event("messages", got)
    listener.start()
    with installed.cursor() as cur:
        cur.execute("INSERT INTO messages (body) SELECT 'x' FROM generate_series(1, 2000)")
    got.wait(2000)
    assert scraper.value("pgnotify_sync_overflow_events_total", listener="metrics-o") > 0
    assert scraper.value("pgnotify_sync_catchup_events_total", listener="metrics-o") > 0
    wait_for(lambda: 'pgnotify_sync_lag_events{channel="messages",listener="metrics-o"} 0.0' in scraper.scrape(),
             message="lag gauge should settle at 0")


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
