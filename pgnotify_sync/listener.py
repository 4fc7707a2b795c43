"""The Listener: a dedicated LISTEN connection, a reader thread, a worker pool.

Example::

    from pgnotify_sync import Config, Listener

    listener = Listener(Config.from_env())

    @listener.on_event("messages")
    def on_message(event):
        print(event.operation, event.data)

    listener.start()          # returns once every channel is LISTENed
    ...
    listener.stop()

Threads (named after the listener): ``<name>-reader`` owns the listener
connection: it connects (with the retry policy), LISTENs, waits with poll() on the
socket and a wake-up pipe, drains notifications in order, decodes them and hands
them to the dispatcher without ever blocking; it also runs the health check (a
round trip that proves the whole path) and reconnects with backoff.
``<name>-worker-N`` run handlers (see _dispatch.py); ``<name>-fetch-N`` read
statements' rows and catch-up pages from the log ahead of them.
``<name>-maintenance`` runs the periodic tasks (see _maintenance.py).
"""

import itertools
import logging
import threading
import time
import types

import psycopg2

from ._consumers import ConsumerStore
from ._counters import Counters
from ._delivery import Delivery
from ._channel import ChannelState
from ._dispatch import Dispatcher
from ._fetch import READ_AHEAD, fetch_timeout_s
from ._eventlog import EventLog
from ._lifecycle import ConnectionState, Lifecycle
from ._maintenance import Every, Maintenance
from ._pool import ConnectionPool
from ._position import handled_count
from ._publisher import Publisher
from ._reader import Reader
from .config import Config
from .errors import ConfigError, ConnectError, ErrorKind, ListenerStateError, describe, first_line, must_propagate
from ._threads import join_all
from .metrics import collector_for
from .signals import ListenerSignals

log = logging.getLogger("pgnotify_sync")

_names = itertools.count(1)

# A durable consumer's default: store the position at least every this many events.
# A write per event (1) bounds the repeats after a crash to the event in flight but
# costs a round trip and a commit per event (``python -m bench --only catchup``: a
# few thousand events/s instead of about 100,000); 100 makes the
# writes 1% of the work and bounds the repeats to 100 events.
DEFAULT_CHECKPOINT_EVERY = 100


# Kinds logged at ERROR: the listener cannot go on as asked (the rest are WARNING:
# user code, bad input, or trouble the listener works around).
_ERROR_LEVEL_KINDS = frozenset({ErrorKind.CONNECT, ErrorKind.GAP, ErrorKind.MISSING, ErrorKind.PUBLISH,
                                ErrorKind.INTERNAL})


class Listener:
    """Turns notifications of watched tables into :class:`DatabaseEvent` objects.

    :param config: a :class:`Config`.
    :param consumer: optional durable consumer name: its position is stored in
        PostgreSQL and a restarted process resumes where it left off.
    :param name: names threads, logs and metrics; default ``pgnotify-N``.
    :param checkpoint_every: a durable consumer stores its position after this many
        events, and after every batch the worker takes (default 100). After a crash
        at most that many events come again; with light traffic a batch is one event,
        so only the event in flight does. 1 stores it after every event, which bounds
        the repeats to the event in flight but costs a write per event (a catch-up
        runs some 25 times slower: ``python -m bench --only catchup``). 0 stores it only per batch
        (a whole catch-up is one batch).
    :param registry: prometheus_client registry for this listener's metrics (default:
        the global ``REGISTRY``; ``False``: no metrics).
    """

    def __init__(self, config, *, consumer=None, name=None, checkpoint_every=None, registry=None):
        if not isinstance(config, Config):
            raise ConfigError(f"config: expected a pgnotify_sync.Config, got {type(config).__name__}")
        self.config = config
        self.name = name or f"pgnotify-{next(_names)}"
        self.consumer = consumer
        if consumer is not None and (not isinstance(consumer, str) or not consumer):
            raise ConfigError(f"consumer: expected a non-empty name, got {consumer!r}")
        if checkpoint_every is None:
            checkpoint_every = DEFAULT_CHECKPOINT_EVERY
        if isinstance(checkpoint_every, bool) or not isinstance(checkpoint_every, int) or checkpoint_every < 0:
            raise ConfigError(f"checkpoint_every: expected a whole number >= 0, got {checkpoint_every!r}")
        self.checkpoint_every = checkpoint_every
        self.signals = ListenerSignals()
        self._channels = {}
        for channel in config.channels:
            self._add_channel(channel)
        self._lock = threading.RLock()
        self._lifecycle = Lifecycle(self.name)
        self._closed = False
        self._started = False
        self._stop_event = threading.Event()
        self._reader = None
        self._maintenance = None
        self._dispatcher = None
        self._pool = None
        self._log = None            # the EventLog, on the pool
        self._consumer_store = None     # a durable consumer's ConsumerStore, on the pool
        self._pending_catchup = set()
        self._listener_tunnel = self._pool_tunnel = None
        self._registry = registry
        self._metrics = None
        # Thread-safe: counted from the reader, the workers, the fetch threads and the maintenance thread.
        self.stats = Counters(
            received=0, delivered=0, parse_errors=0, handler_errors=0, receiver_errors=0, reconnects=0,
            reconnect_attempts=0, health_checks=0, health_check_failures=0, caught_up=0, publish_flushed=0,
            publish_dropped=0, retention_deleted=0, consumer_gap_events=0, internal_errors=0,
            last_health_rtt_s=None, connected_since=None, last_event_at=None, last_error=None)
        self._delivery = Delivery(self.name, self.signals, self.stats, self._report, checkpoint_every,
                                  save=self._save_consumer if consumer else None)
        self._publisher = Publisher(self.name, config, self._require_pool, self.stats, self._report,
                                    closed=lambda: self._closed)

    # -- public API ------------------------------------------------------------

    def __repr__(self):
        return (f"<Listener {self.name!r} state={self._lifecycle.state.value} "
                f"channels={sorted(self._channels)!r} target={self.config.describe_target()!r}>")

    @property
    def state(self):
        """The :class:`ConnectionState`."""
        return self._lifecycle.state

    @property
    def closed(self):
        """True once ``stop()`` was called: the listener cannot be started again."""
        return self._closed

    @property
    def channels(self):
        """Logical channel names this listener listens on."""
        return tuple(self._channels)

    def on_event(self, channel, handler=None):
        """Call ``handler(event)`` for every event of *channel*. Usable as a decorator.

        Subscribing to a channel not in ``Config.channels`` adds it (before ``start()``).
        The handler is held strongly (unlike a bare blinker ``connect``).
        """
        if handler is None:
            return lambda fn: self.on_event(channel, fn)
        if not callable(handler):
            raise TypeError(f"handler must be callable, got {type(handler).__name__}")
        if channel not in self._channels:
            if self._started:
                raise ListenerStateError(
                    f"{self.name}: cannot add channel {channel!r} after start(); list it in Config.channels")
            self._add_channel(channel)

        def receiver(sender, event, **_kw):
            handler(event)

        receiver.__name__ = getattr(handler, "__name__", "handler")
        receiver.__wrapped__ = handler
        receiver._pgnotify_handler = handler     # Delivery calls it directly
        self.signals.event.connect(receiver, sender=channel, weak=False)
        return handler

    def start(self, wait=True, timeout_s=30.0):
        """Connect and LISTEN on every channel.

        With *wait* (the default) it returns once every channel is LISTENed, and
        raises :class:`ConnectError` if that fails for a reason retrying cannot fix
        (bad password, missing database), if the retry policy gives up, or if
        *timeout_s* passes first (the listener is then stopped). ``wait=False``
        returns at once and connects in the background.

        On a FAILED listener, ``start()`` tries again. A stopped listener cannot
        be restarted: create a new one.
        """
        if not self.config.enable_db_events:
            log.info("%s: database events are disabled (ENABLE_DB_EVENTS=false); not connecting", self.name)
            return self
        with self._lock:
            if self._closed:
                raise ListenerStateError(f"{self.name}: a stopped listener cannot be started again; "
                                         "create a new Listener")
            if self._lifecycle.state in (ConnectionState.CONNECTING, ConnectionState.LISTENING,
                               ConnectionState.RECONNECTING):
                return self
            if not self._channels:
                raise ConfigError("channels: no channel to listen on; set Config(channels=...) "
                                  "(PG_NOTIFY_CHANNELS) or call on_event() before start()")
            if not self._started:
                self._make_tunnels()     # a bad key or known_hosts raises here, in the caller's thread
                self._started = True
                self._setup()
            self._set_state(ConnectionState.CONNECTING)
            self._reader.start()
        if not wait:
            return self
        if not self._reader.ready.wait(timeout_s):
            self.stop()
            raise ConnectError(f"{self.name}: not listening after {timeout_s} s "
                               f"({self.config.describe_target()}); stopped")
        if self._reader.start_error is not None:
            raise self._reader.start_error
        return self

    def stop(self, timeout=5.0):
        """Stop: close the listener connection, deliver what was already received
        (until *timeout* seconds), end every thread, close every connection.

        Idempotent; safe from a handler or a signal receiver (the calling thread
        ends once its handler returns).
        """
        with self._lock:
            if self._closed:
                return
            self._closed = True
        deadline = time.monotonic() + timeout
        self._stop_event.set()
        if self._reader is not None:
            self._reader.wake()
        # In reverse order of start(): the reader (nothing new comes in) and the
        # maintenance thread, the dispatcher (what was received is delivered), the
        # buffered publishes, then the connections.
        late = join_all((self._reader and self._reader.thread, self._maintenance), deadline)
        if self._dispatcher is not None:
            late += self._dispatcher.close(max(0.0, deadline - time.monotonic()))
        if len(self._publisher):
            self._publisher.flush_until(deadline)
        if self._pool is not None:
            late += self._pool.close(max(0.0, deadline - time.monotonic()))
        for tunnel in (self._listener_tunnel, self._pool_tunnel):
            if tunnel is not None:
                tunnel.close()
        if self._reader is not None:
            self._reader.close()
        if late:
            log.warning("%s: threads that did not stop within %g s: %s", self.name, timeout, ", ".join(late))
        was_connected = self._reader is not None and self._reader.had_session
        self._set_state(ConnectionState.STOPPED)
        if was_connected:
            self._emit("disconnected", error=None)
        if self._metrics is not None:
            self._metrics.remove(self)
        log.info("%s: stopped", self.name, extra={"event": "stopped"})

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc_info):
        self.stop()

    def threads(self):
        """The threads this listener started (for tests and diagnostics)."""
        threads = [t for t in (self._reader and self._reader.thread, self._maintenance) if t is not None]
        if self._dispatcher is not None:
            threads.extend(self._dispatcher.threads())
        if self._pool is not None:
            threads.extend(self._pool.threads())
        return threads

    def get_stats(self):
        """A plain dict of counters and gauges."""
        stats = self.stats.snapshot()
        stats["state"] = self._lifecycle.state.value
        stats["publish_buffered"] = len(self._publisher)
        if self._dispatcher is not None:
            stats["buffered"] = self._dispatcher.buffered
            stats["capacity"] = self._dispatcher.capacity
            stats["dropped_to_log"] = sum(ch.dropped for ch in self._channels.values())
        return stats

    def health(self):
        """A plain, JSON-ready dict for a health endpoint.

        ``ok`` is true while the listener is LISTENING and no channel is falling back
        to the event log. Times are Unix timestamps (``time.time()``) or None.
        ``lag`` per channel is the count of logged events not handled yet (updated
        every ``health_check_interval_s``; None before the first count)::

            {"ok": True, "state": "LISTENING", "connected_since": 1764579000.1,
             "last_event_at": 1764579012.5, "queue_size": 0, "queue_capacity": 10000,
             "reconnects": 0, "last_error": None, "last_health_check_rtt_s": 0.0004,
             "channels": {"messages": {"lag": 0, "delivered": 12, "last_event_at": ...,
                                       "falling_back": False}}}
        """
        st = self.stats.snapshot()
        dispatcher = self._dispatcher
        channels = {}
        for ch in list(self._channels.values()):
            channels[ch.name] = {"lag": ch.lag, "delivered": ch.delivered, "last_event_at": ch.last_event_at,
                                 "falling_back": ch.overflow}
        times = [c["last_event_at"] for c in channels.values() if c["last_event_at"] is not None]
        state = self._lifecycle.state
        return {
            "ok": state is ConnectionState.LISTENING and not any(c["falling_back"] for c in channels.values()),
            "state": state.value,
            "connected_since": st["connected_since"],
            "last_event_at": max(times) if times else None,
            "queue_size": dispatcher.buffered if dispatcher is not None else 0,
            "queue_capacity": self.config.event_buffer_size,
            "reconnects": st["reconnects"],
            "last_error": st["last_error"],
            "last_health_check_rtt_s": st["last_health_rtt_s"],
            "channels": channels,
        }

    def publish(self, channel, payload):
        """Send an application event on *channel*: written to the event log and
        notified in one transaction, so it has the same no-loss guarantees as table
        events. *payload* must be JSON-serialisable. Returns the event's log id.

        Each call carries a unique key stored with the event, so a retry (after a
        commit whose reply was lost) never logs it twice.

        If the database cannot be reached: with ``enable_event_buffering`` the event
        is kept in a bounded in-memory buffer (``publish_buffer_size``), sent in order
        once the database is back (by the maintenance thread, or the next ``publish()``), and
        ``None`` is returned; while events wait there, ``publish()`` adds to the
        buffer at once instead of trying the database again. When that buffer is full
        :class:`PublishBufferFull` is raised. Without buffering :class:`ConnectError`
        is raised at once. ``stop()`` sends what is buffered, within its timeout.
        After ``stop()``, :class:`ListenerStateError`.
        """
        return self._publisher.publish(channel, payload)

    def flush_publishes(self):
        """Send buffered publishes in order; returns how many are still waiting."""
        return self._publisher.flush()

    # -- set-up -------------------------------------------------------------------

    def _add_channel(self, channel):
        self._channels[channel] = ChannelState(channel, self.config.checked_wire_channel(channel))

    def _require_pool(self):
        with self._lock:
            if self._pool is None:
                if self._closed:
                    raise ListenerStateError(f"{self.name}: stopped")
                self._make_tunnels()
                self._pool = ConnectionPool(f"{self.name}-pool", self._pool_connect_kwargs,
                                            self.config.pool_max_connections,
                                            statement_timeout_ms=self.config.query_timeout_s * 1000)
                self._log = EventLog(self._pool, self.config.connect_timeout_s)
                if self.consumer:
                    self._consumer_store = ConsumerStore(self._pool, self.consumer, self.name)
        return self._pool

    def event_log(self):
        """The :class:`~pgnotify_sync._eventlog.EventLog` this listener reads, on its
        pool (the SSE bridge replays from it)."""
        self._require_pool()
        return self._log

    def _pool_connect_kwargs(self):
        if self._pool_tunnel is not None:
            return self.config.connect_kwargs(*self._pool_tunnel.local_address())
        return self.config.connect_kwargs()

    def _listener_connect_kwargs(self, fresh):
        """Where the reader connects; *fresh*: rebuild the tunnel first."""
        if self._listener_tunnel is not None:
            return self.config.connect_kwargs(*self._listener_tunnel.local_address(fresh=fresh))
        return self.config.connect_kwargs()

    def _expect_catchup(self):
        """Every channel catches up now; 'connected' comes once all have (_caught_up)."""
        with self._lock:
            self._pending_catchup = set(self._channels)

    def _make_tunnels(self):
        if self.config.use_ssh and self._listener_tunnel is None:
            from ._tunnel import make_tunnels
            self._listener_tunnel, self._pool_tunnel = make_tunnels(self.config, self.name)

    def _setup(self):
        if self._registry is not False:
            self._metrics = collector_for(self._registry)
            self._metrics.add(self)
        self._require_pool()
        workers = self.config.worker_pool_size
        # Each fetch thread holds a pooled connection while it reads: leave one for
        # publish() and the workers' own reads.
        fetchers = max(1, min(workers * READ_AHEAD, self.config.pool_max_connections - 1))
        self._dispatcher = Dispatcher(self.name, self._channels, self.config.event_buffer_size, workers,
                                      self._dispatch_hooks(),
                                      fetchers=fetchers, compact_ranges=not self.consumer,
                                      fetch_timeout_s=fetch_timeout_s(self.config))
        self._dispatcher.start()
        host = types.SimpleNamespace(   # the ReaderHost of _reader.py
            name=self.name, config=self.config, channels=self._channels, consumer=self.consumer, stats=self.stats,
            dispatcher=self._dispatcher, set_state=self._set_state, emit=self._emit, report=self._report,
            load_consumer=self._load_consumer, listener_connect_kwargs=self._listener_connect_kwargs,
            expect_catchup=self._expect_catchup)
        self._reader = Reader(host, self._stop_event)
        self._maintenance = Maintenance(f"{self.name}-maintenance", self._stop_event,
                                        self._maintenance_tasks()).start()

    def _set_state(self, state):
        self._lifecycle.move(state)

    def _emit(self, name, **kwargs):
        """Send the lifecycle signal *name* to its receivers one by one.

        Receivers are user code: whatever one raises (SystemExit included) is logged,
        counted (``receiver_errors``) and reported through ``error`` (kind
        ``receiver``), and the next receiver still runs. Never called with one of our
        locks held, so a receiver may call ``stop()``.
        """
        for receiver in getattr(self.signals, name).receivers_for(self):
            try:
                receiver(self, **kwargs)
            except BaseException as exc:
                if must_propagate(exc):
                    raise
                self.stats.inc("receiver_errors")
                if name == "error":
                    # Not reported through the signal that failed (no loop).
                    log.error("%s: a receiver of the error signal raised %s", self.name, describe(exc),
                              exc_info=True, extra={"event": "error", "details": {"kind": "receiver"}})
                else:
                    self._report("receiver", exc, None, exc_info=True, what=f"a receiver of {name!r}")

    # -- reader thread --------------------------------------------------------------

    # -- dispatcher hooks (worker threads) ------------------------------------------

    def _dispatch_hooks(self):
        """The DispatchHooks of _dispatch.py."""
        return types.SimpleNamespace(
            deliver=self._delivery.deliver, catch_up=self._catch_up, fetch_ref=self._fetch_ref,
            fetch_range=self._fetch_range, report=self._report, caught_up=self._caught_up,
            after_batch=self._after_batch)

    def _catch_up(self, ch):
        pos = ch.position
        if self._reader.installed is False:
            return pos, iter(())    # no event log to read (plain payloads only)
        target = self._log.snapshot()

        def read(after, previous=None):
            return self._log.catchup_page(ch.name, ch.wire, pos, target, after, previous)

        def pages():
            # The next page is read on a fetch thread while this one is delivered.
            events, more = read(0)
            while events:
                self.stats.inc("caught_up", len(events))
                ch.caught_up += len(events)
                ahead = self._dispatcher.submit(read, events[-1].id, len(events)) if more else None
                yield events
                if ahead is None:
                    return
                events, more = self._dispatcher.result(ahead)

        return target, pages()

    def _fetch_ref(self, ch, ref):
        event = self._log.event(ch.name, ref.id)
        if event is None:
            self._report("missing", f"event {ref.id} is no longer in the event log", ch.name)
        return event

    def _fetch_range(self, ch, rng, after=0, previous=None):
        """The rows of one statement, announced by id range, after id *after*: one
        page (*previous* is the row count of the page before it) and whether more
        follow it."""
        return self._log.range_page(ch.name, ch.wire, rng, after, previous)

    def _caught_up(self, ch, reason, count):
        with self._lock:
            if ch.name not in self._pending_catchup:
                return
            self._pending_catchup.discard(ch.name)
            done = not self._pending_catchup
        if done and self._lifecycle.state is ConnectionState.LISTENING:
            log.info("%s: connected and caught up (%s)", self.name, reason,
                     extra={"event": "connected", "details": {"reason": reason}})
            self._emit("connected")

    def _after_batch(self, ch):
        if self.consumer:
            self._save_consumer(ch)

    def _report(self, kind, error, channel, event_id=None, exc_info=False, what=None):
        """A background failure: log line, counter, ``error`` signal.

        Never called with one of our locks held: the ``error`` receivers run here.
        """
        kind = ErrorKind(kind)      # an unknown kind is a bug: ValueError
        level = logging.ERROR if kind in _ERROR_LEVEL_KINDS else logging.WARNING
        text = error if isinstance(error, str) else describe(error)
        if what:
            text = f"{what}: {text}"
        where = f" on channel {channel!r}" if channel is not None else ""
        self.stats.inc(f"errors_{kind}")
        self.stats.set("last_error", {"kind": kind, "channel": channel, "error": text, "at": time.time()})
        log.log(level, "%s: %s error%s%s: %s", self.name, kind, where,
                f" (event {event_id})" if event_id is not None else "", text, exc_info=exc_info,
                extra={"event": "error", "channel": channel, "event_id": event_id,
                       "details": {"kind": kind, "error": text}})
        self._emit("error", error=error, kind=kind, channel=channel, event_id=event_id)

    # -- maintenance (the thread: _maintenance.py) --------------------------------

    def _maintenance_tasks(self):
        cfg = self.config
        has_log = lambda: self._reader.installed is not False     # noqa: E731 - known after connecting
        tasks = [
            Every("retry overflowed channels", 0.25, self._dispatcher.retry_overflowed),
            Every("flush publishes", 0.25, self._publisher.flush, when=lambda: len(self._publisher) > 0),
            # Lag feeds the metrics and health().
            Every("lag", cfg.health_check_interval_s, self._update_lag, first_s=1.0,
                  when=lambda: has_log() and self._lifecycle.state is ConnectionState.LISTENING),
        ]
        if cfg.cleanup_interval_s:
            tasks.append(Every("retention", cfg.cleanup_interval_s, self.cleanup,
                               first_s=min(cfg.cleanup_interval_s, 5.0), when=has_log))
        return tasks

    def cleanup(self):
        """Trim the event log now (also done every ``cleanup_interval_s``). Returns rows deleted.

        Rows older than ``retention_s`` go, except rows a durable consumer has not
        handled yet, which are kept up to ``consumer_retention_s``.
        """
        self._require_pool()
        cfg = self.config
        deleted = 0
        after = 0
        try:
            # Bounded batches (TRIM_BATCH rows), each its own short transaction.
            while after is not None and not self._stop_event.is_set():
                n, after = self._log.trim_batch(cfg.retention_s, cfg.consumer_retention_s, after)
                deleted += n
                self.stats.inc("retention_deleted", n)
        except psycopg2.Error as exc:
            raise ConnectError(f"{self.name}: cleanup failed after deleting {deleted} rows: "
                               f"{first_line(exc)}") from exc
        if deleted:
            log.info("%s: retention deleted %d event-log rows", self.name, deleted,
                     extra={"event": "retention", "details": {"deleted": deleted}})
        if self.consumer:
            self._check_consumer_gaps()
        return deleted

    # -- durable consumers (the store: _consumers.py) -----------------------------------

    def _load_consumer(self, start):
        self._consumer_store.load(self._channels.values(), start)
        self._check_consumer_gaps()

    def _save_consumer(self, ch, undelivered=None):
        self._consumer_store.save(ch, undelivered)

    def _check_consumer_gaps(self):
        for wire, lost in self._consumer_store.take_gaps():
            channel = self.config.logical_channel(wire) or wire
            self.stats.inc("consumer_gap_events", lost)
            if channel in self._channels:
                self._channels[channel].gap_events += lost
            self._report("gap", f"consumer {self.consumer!r} missed {lost} events: the event log was trimmed "
                                f"past its position (older than consumer_retention_s)", channel)

    # -- metrics ------------------------------------------------------------------------

    def _collect_metrics(self, fams):
        """Add this listener's samples to the metric families (scrape time)."""
        me = self.name
        st = self.stats.snapshot()

        def add(name, labels, value):
            fams[f"pgnotify_sync_{name}"].add_metric([me] + labels, value)

        def add_hist(name, labels, hist):
            fams[f"pgnotify_sync_{name}"].add_metric([me] + labels, hist.cumulative(), hist.sum)

        for ch in list(self._channels.values()):
            add("events_received", [ch.name], ch.received)
            for (operation, table), n in list(ch.delivered_by.items()):
                add("events_delivered", [ch.name, operation.value, table], n)
            add("parse_errors", [ch.name], ch.parse_errors)
            add("handler_errors", [ch.name], ch.handler_errors)
            add_hist("handler_duration_seconds", [ch.name], ch.handler_hist)
            add("overflow_events", [ch.name], ch.dropped)
            add("catchup_events", [ch.name], ch.caught_up)
            add("consumer_gap_events", [ch.name], ch.gap_events)
            if ch.lag is not None:
                add("lag_events", [ch.name], ch.lag)
        reader = self._reader
        if reader is not None:
            add_hist("decode_duration_seconds", [], reader.decode_hist)
            add_hist("health_check_rtt_seconds", [], reader.rtt_hist)
        dispatcher = self._dispatcher
        add("queue_size", [], dispatcher.buffered if dispatcher else 0)
        add("queue_capacity", [], self.config.event_buffer_size)
        for state in ConnectionState:
            add("connection_state", [state.value], 1 if self._lifecycle.state is state else 0)
        since = st.get("connected_since")
        add("connection_uptime_seconds", [], time.time() - since if since else 0)
        add("reconnect_attempts", [], st["reconnect_attempts"])
        add("reconnects", [], st["reconnects"])
        add("health_check_failures", [], st["health_check_failures"])
        pool = self._pool
        add("pool_connections_in_use", [], pool.in_use if pool else 0)
        add("pool_connections_discarded", [], pool.discarded if pool else 0)
        for kind, tunnel in (("listener", self._listener_tunnel), ("pool", self._pool_tunnel)):
            if tunnel is not None:
                add("tunnel_restarts", [kind], tunnel.restarts)
        add("publish_buffer_size", [], len(self._publisher))
        add("retention_deleted", [], st.get("retention_deleted", 0))

    def _update_lag(self):
        """Events in the log not handled yet, per channel (a gauge; the durable
        position says what is handled, so this is exact up to events in flight)."""
        for ch in list(self._channels.values()):
            pos = ch.position
            if pos is None:
                continue
            ch.lag = max(0, self._log.pending(ch.wire, pos) - handled_count(ch))
