"""Prometheus metrics.

Listeners count in plain Python integers on their hot paths; one collector per
registry turns those counters into metric families at scrape time, with a
``listener`` label so that several listeners share one registry without
colliding. Labels are listener, channel, operation, table, state, tunnel and
receiver (a handler's module and qualified name) names only: never a password,
never a row value.

Example (a plain script)::

    from pgnotify_sync import Listener
    from pgnotify_sync.metrics import start_metrics_server
    listener = Listener(cfg, registry=None)     # None: prometheus_client's global REGISTRY
    start_metrics_server(9108)                  # GET http://127.0.0.1:9108/metrics

Example (Flask)::

    from pgnotify_sync.metrics import metrics_wsgi_app
    from werkzeug.middleware.dispatcher import DispatcherMiddleware
    app.wsgi_app = DispatcherMiddleware(app.wsgi_app, {"/metrics": metrics_wsgi_app()})
"""

import bisect
import json
import threading
import weakref

from prometheus_client import REGISTRY, make_wsgi_app, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.process_collector import ProcessCollector

PREFIX = "pgnotify_sync"

#: Seconds. Handlers are usually fast; the tail matters.
DURATION_BUCKETS = (0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25,
                    0.5, 1.0, 2.5, 5.0, 10.0)


class Histogram:
    """A lock-free-enough histogram accumulator (one writer per instance in practice:
    a channel's handlers run on one worker at a time)."""

    __slots__ = ("buckets", "counts", "sum", "count")

    def __init__(self, buckets=DURATION_BUCKETS):
        self.buckets = buckets
        self.counts = [0] * (len(buckets) + 1)
        self.sum = 0.0
        self.count = 0

    def observe(self, value):
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.sum += value
        self.count += 1

    def add(self, other):
        """Add the observations of *other* (same buckets)."""
        for i, n in enumerate(other.counts):
            self.counts[i] += n
        self.sum += other.sum
        self.count += other.count

    def cumulative(self):
        out, total = [], 0
        for bound, n in zip(self.buckets, self.counts):
            total += n
            out.append((repr(float(bound)), total))
        out.append(("+Inf", total + self.counts[-1]))
        return out


class _LibraryCollector:
    """Collects every listener registered on one registry: each adds its source (an
    object with ``collect(families)``, held weakly: a listener nobody holds any more
    leaves the scrape)."""

    def __init__(self):
        self.sources = weakref.WeakSet()
        self._lock = threading.Lock()

    def add(self, source):
        with self._lock:
            self.sources.add(source)

    def remove(self, source):
        with self._lock:
            self.sources.discard(source)

    def describe(self):
        return list(self._families().values())

    def collect(self):
        with self._lock:
            sources = list(self.sources)
        families = self._families()
        for source in sources:
            try:
                source.collect(families)
            except Exception:  # a scrape must never break on one listener
                pass
        return list(families.values())

    @staticmethod
    def _families():
        def counter(name, doc, labels):
            return CounterMetricFamily(f"{PREFIX}_{name}", doc, labels=["listener"] + labels)

        def gauge(name, doc, labels):
            return GaugeMetricFamily(f"{PREFIX}_{name}", doc, labels=["listener"] + labels)

        def hist(name, doc, labels):
            return HistogramMetricFamily(f"{PREFIX}_{name}", doc, labels=["listener"] + labels)

        fams = [
            counter("events_received", "Notifications received on watched channels", ["channel"]),
            counter("events_delivered", "Events handed to handlers", ["channel", "operation", "table"]),
            counter("parse_errors", "Notifications that could not be decoded", ["channel"]),
            counter("handler_errors", "Handler (receiver) calls that failed for good (after every retry)",
                    ["channel"]),
            counter("handler_retries", "Handler calls made again after the handler raised", ["channel"]),
            counter("type_errors", "Rows that did not fit a handler's row model (on_event(..., row=Model))",
                    ["channel"]),
            gauge("handler_suspended", "1 while a handler's circuit breaker is open: it failed "
                                       "handler_breaker_failures events in a row and its events fail without a "
                                       "call", ["channel", "receiver"]),
            counter("handler_suspended_events", "Events failed without calling their suspended handler",
                    ["channel", "receiver"]),
            hist("handler_duration_seconds", "Time spent in the handlers of one event", ["channel"]),
            hist("decode_duration_seconds",
                 "Decode time per notification (mean over each drained batch)", []),
            gauge("queue_size", "Events held in memory: queued for handlers, and rows read ahead from the event log",
                  []),
            gauge("queue_capacity", "Configured event buffer size", []),
            counter("overflow_events", "Events dropped from memory when the buffer was full "
                                       "(re-read from the event log)", ["channel"]),
            counter("catchup_events", "Events read back from the event log (catch-up)", ["channel"]),
            counter("polled_events", "Events of notify-free tables found by polling the event log", ["channel"]),
            gauge("lag_events", "Events of the channel in the event log not handled yet", ["channel"]),
            gauge("connection_state", "1 for the current connection state", ["state"]),
            gauge("connection_uptime_seconds", "Seconds since the listener connection was established", []),
            counter("reconnect_attempts", "Failed connection attempts", []),
            counter("reconnects", "Successful reconnections after a lost connection", []),
            counter("health_check_failures", "Health-check round trips that missed their deadline", []),
            hist("health_check_rtt_seconds", "Health-check round-trip time", []),
            gauge("pool_connections_in_use", "Pooled connections checked out", []),
            counter("pool_connections_discarded", "Dead pooled connections discarded", []),
            counter("tunnel_restarts", "SSH tunnels rebuilt", ["tunnel"]),
            gauge("publish_buffer_size", "Publishes waiting for the database", []),
            counter("retention_deleted", "Event-log rows deleted by retention", []),
            counter("consumer_gap_events", "Events a durable consumer will never see (trimmed)", ["channel"]),
            gauge("dead_letters", "A durable consumer's dead letters: events its handlers failed on for good",
                  ["consumer", "channel"]),
            gauge("backfill_rows", "Rows a durable consumer's backfill of a table logged so far (every member)",
                  ["consumer", "table"]),
            gauge("backfill_done", "1 once a durable consumer's backfill of a table is done", ["consumer", "table"]),
            gauge("consumer_partitions_owned", "Partitions of its consumer group this member holds", ["consumer"]),
            counter("consumer_rebalances", "Times this member saw its group's members change", ["consumer"]),
            gauge("consumer_members", "Live members of the consumer group, as this member last saw them",
                  ["consumer"]),
            counter("unmatched_hints", "Notifications naming no committed event of their channel in the log "
                                       "(forged, or trimmed): nothing delivered", ["channel"]),
            counter("missed_events", "Events found in the log by the position check: their notification "
                                     "never came (lost, or pgnotify_sync.notify = off)", ["channel"]),
        ]
        return {f.name: f for f in fams}


_collectors = weakref.WeakKeyDictionary()
_collectors_lock = threading.Lock()


def collector_for(registry):
    """The library's collector on *registry* (registered on first use)."""
    registry = REGISTRY if registry is None else registry
    with _collectors_lock:
        coll = _collectors.get(registry)
        if coll is None:
            coll = _LibraryCollector()
            registry.register(coll)
            if registry is not REGISTRY:
                # The global registry has process metrics already; a private one gets them too.
                try:
                    ProcessCollector(registry=registry)
                except ValueError:
                    pass
            _collectors[registry] = coll
        return coll


def start_metrics_server(port, addr="127.0.0.1", registry=None):
    """Serve ``/metrics`` over HTTP from a daemon thread; returns (server, thread)."""
    return start_http_server(port, addr=addr, registry=REGISTRY if registry is None else registry)


def metrics_wsgi_app(registry=None):
    """A WSGI app serving the metrics (mount it at /metrics in Flask or any framework)."""
    return make_wsgi_app(REGISTRY if registry is None else registry)


def health_response(listener):
    """(status line, headers, body chunks) of ``listener.health()`` as JSON: ``200 OK``
    while the listener is LISTENING, ``503 Service Unavailable`` otherwise."""
    health = listener.health()
    body = (json.dumps(health, default=str) + "\n").encode()
    status = "200 OK" if health["state"] == "LISTENING" else "503 Service Unavailable"
    return status, [("Content-Type", "application/json"), ("Content-Length", str(len(body))),
                    ("Cache-Control", "no-store")], [body]


def health_wsgi_app(listener):
    """A WSGI app answering every request with :func:`health_response` (mount it at
    /health: a container's readiness and liveness probe)::

        from werkzeug.middleware.dispatcher import DispatcherMiddleware
        app.wsgi_app = DispatcherMiddleware(app.wsgi_app, {"/health": health_wsgi_app(listener)})
    """
    def app(environ, start_response):
        status, headers, body = health_response(listener)
        start_response(status, headers)
        return body
    return app
