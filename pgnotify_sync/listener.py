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

This module is the facade: the public API, the wiring of the parts, and
``stop()`` in the reverse order of ``start()`` under one deadline. It owns no
thread; the parts own theirs (README "Architecture"): ``<name>-reader``
(_reader.py: connect, LISTEN, read, health check, reconnect), ``<name>-worker-N``
(_dispatch.py, _worker.py: queues and handlers), ``<name>-fetch-N`` (_fetch.py:
reads of the log ahead of delivery), ``<name>-maintenance`` (_maintenance.py:
periodic tasks), ``<name>-pool-deadlines`` (_pool.py).
"""

import functools
import itertools
import logging
import threading
import time
import types

from . import _backfill as backfill
from ._breaker import Breakers
from ._channel import ChannelState
from ._connections import Connections
from ._dispatch import Dispatcher
from ._fetch import READ_AHEAD, fetch_timeout_s
from ._group import Group
from ._keys import catalog_keys
from ._hooks import ListenerHooks
from ._lifecycle import ConnectionState, Lifecycle
from ._listener_args import checked_backfill, checked_checkpoint_every, checked_consumer, checked_name, checked_registry
from ._maintenance import WARM_CONNECTIONS, Maintenance, listener_tasks
from ._poller import Poller
from ._observe import Observer, new_stats
from ._publisher import Publisher
from ._reader import Reader
from ._reporting import Reporter
from ._rows import RowPool
from ._threads import join_all, spawn
from .config import Config
from .errors import ConfigError, ConnectError, ListenerStateError
from .events import typed
from ._deadletters import list_dead_letters, queue_retries, request_retry
from .metrics import collector_for
from .signals import ListenerSignals

log = logging.getLogger("pgnotify_sync")

_names = itertools.count(1)


class Listener:
    """Turns notifications of watched tables into :class:`DatabaseEvent` objects.

    :param config: a :class:`Config`.
    :param consumer: optional durable consumer name: its position is stored in
        PostgreSQL and a restarted process resumes where it left off. Listeners of
        one consumer name, in any process, form a group that shares the work
        (``Config.consumer_partitions``; README "Running many processes").
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

    def __init__(self, config, *, consumer=None, name=None, checkpoint_every=None, registry=None, backfill=()):
        if not isinstance(config, Config):
            raise ConfigError(f"config: expected a pgnotify_sync.Config, got {type(config).__name__}")
        self.config = config
        self.name = checked_name(name) if name is not None else f"pgnotify-{next(_names)}"
        self.consumer = checked_consumer(consumer)
        self.checkpoint_every = checked_checkpoint_every(checkpoint_every)
        self.backfill = checked_backfill(backfill, self.consumer)
        # table -> {"rows", "done"} (_backfill.run; health(), metrics), from the start
        self.backfilled = {table: {"rows": 0, "done": False} for table in self.backfill}
        self._registry = checked_registry(registry)
        self.signals = ListenerSignals()
        self._channels = {}
        for channel in config.channels:
            self._add_channel(channel)
        self._lock = threading.RLock()
        self._lifecycle = Lifecycle(self.name)
        self._closed = False
        self._started = False
        self._stop_event = threading.Event()
        self._stopped = threading.Event()       # set once stop() is done
        self._metrics = None
        self.stats = new_stats(self._channels)
        self._reporter = Reporter(self.name, self, self.signals, self.stats)
        self._connections = Connections(self.name, config, consumer)
        self._publisher = Publisher(self.name, config, self._connections.require_pool, self.stats,
                                    self._reporter.report, closed=lambda: self._closed)
        # The parts, as each is built (the reader and the dispatcher at start()).
        self._parts = types.SimpleNamespace(
            name=self.name, config=config, consumer=consumer, channels=self._channels, stats=self.stats,
            lifecycle=self._lifecycle, reporter=self._reporter, connections=self._connections,
            publisher=self._publisher, reader=None, dispatcher=None, group=None, stop_event=self._stop_event,
            backfill=self.backfilled,
            breakers=Breakers(config.handler_breaker_failures, config.handler_breaker_reset_ms / 1000))
        self._hooks = ListenerHooks(self._parts, self.signals, self.checkpoint_every)
        self._observer = Observer(self._parts)
        self._reader = self._dispatcher = self._maintenance = self._poller = self._group = self._rows = None
        self._backfiller = None

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

    def on_event(self, channel, handler=None, *, row=None, converter=None):
        """Call ``handler(event)`` for every event of *channel*. Usable as a decorator.

        Subscribing to a channel not in ``Config.channels`` adds it (before ``start()``).
        The handler is held strongly (unlike a bare blinker ``connect``). With *row*
        (an attrs class, or anything cattrs can structure; *converter*: a cattrs
        Converter with your hooks, e.g. for datetimes) the handler gets a
        ``DatabaseEvent[row]`` whose ``data`` and ``old`` are *row* objects; a row that
        does not fit is an ``error`` of kind ``type`` (no values logged), not retried.
        """
        if handler is None:
            return lambda fn: self.on_event(channel, fn, row=row, converter=converter)
        if not callable(handler):
            raise TypeError(f"handler must be callable, got {type(handler).__name__}")
        call = handler if row is None else functools.partial(_typed_call, handler, row, converter)
        if channel not in self._channels:
            if self._started:
                raise ListenerStateError(
                    f"{self.name}: cannot add channel {channel!r} after start(); list it in Config.channels")
            self._add_channel(channel)

        def receiver(sender, event, **_kw):
            call(event)

        receiver.__name__ = getattr(handler, "__name__", "handler")
        receiver.__wrapped__ = handler
        receiver._pgnotify_handler = call        # our own function: Delivery calls the handler directly
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
                self._connections.make_tunnels()     # a bad key or known_hosts raises here, in the caller's thread
                self._started = True
                self._setup()
            self._lifecycle.move(ConnectionState.CONNECTING)
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
        ends once its handler returns). A second call, from a thread not of this
        listener, returns once the first one is done (up to *timeout*): a process
        that exits after it has stopped for good (a durable consumer its final
        checkpoint stored).
        """
        with self._lock:
            second = self._closed
            self._closed = True
        if second:
            if threading.current_thread() not in self.threads():
                self._stopped.wait(timeout)
            return
        deadline = time.monotonic() + timeout
        self._stop_event.set()
        if self._reader is not None:
            self._reader.wake()
        # In reverse order of start(): the reader (nothing new comes in) and the
        # maintenance thread, the dispatcher (what was received is delivered), the
        # buffered publishes, then the connections.
        late = join_all(self._own_threads(), deadline)
        if self._dispatcher is not None:
            late += self._dispatcher.close(max(0.0, deadline - time.monotonic()))
        if self._rows is not None:
            late += self._rows.close(deadline)
        if self._group is not None:
            late += self._group.stop_ticking(deadline)
            self._group.leave()         # hands every partition over at its final position
        if len(self._publisher):
            self._publisher.flush_until(deadline)
        late += self._connections.close(max(0.0, deadline - time.monotonic()))
        if self._reader is not None:
            self._reader.close()
        if late:
            log.warning("%s: threads that did not stop within %g s: %s", self.name, timeout, ", ".join(late))
        was_connected = self._reader is not None and self._reader.had_session
        self._lifecycle.move(ConnectionState.STOPPED)
        if was_connected:
            self._reporter.emit("disconnected", error=None)
        if self._metrics is not None:
            self._metrics.remove(self._observer)
        log.info("%s: stopped", self.name, extra={"event": "stopped"})
        self._stopped.set()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc_info):
        self.stop()

    def threads(self):
        """The threads this listener started (for tests and diagnostics)."""
        threads = [t for t in self._own_threads() + (self._group and self._group.thread,) if t is not None]
        if self._dispatcher is not None:
            threads.extend(self._dispatcher.threads())
        if self._rows is not None:
            threads.extend(self._rows.threads())
        threads.extend(self._connections.threads())
        return threads

    def get_stats(self):
        """A plain dict of counters and gauges."""
        return self._observer.stats()

    def health(self):
        """A plain, JSON-ready dict for a health endpoint.

        ``ok`` is true while the listener is LISTENING and no channel is falling back
        to the event log. Times are Unix timestamps (``time.time()``) or None.
        ``lag`` per channel is the count of logged events not handled yet (updated
        every ``health_check_interval_s``; None before the first count)::

            {"ok": True, "state": "LISTENING", "connected_since": 1764579000.1,
             "last_event_at": 1764579012.5, "queue_size": 0, "queue_capacity": 80000,
             "reconnects": 0, "last_error": None, "last_health_check_rtt_s": 0.0004,
             "channels": {"messages": {"lag": 0, "delivered": 12, "last_event_at": ...,
                                       "falling_back": False}},
             "consumer": None, "handlers": {}}

        ``handlers`` lists the handlers that failed their last event for good, by
        channel and name (module.qualname): ``{"messages": {"app.index": {"state":
        "open", "failures": 3, "opened_at": ..., "rejected": 120}}}``; ``open`` while
        it is suspended (its events fail without a call), ``suspect`` while it is
        called once per event without retries, ``trial`` during its one call after
        ``handler_breaker_reset_ms`` (see Config.handler_breaker_failures). A handler
        leaves the dict with its first success. It does not change ``ok``: restarting
        the process would not mend a handler.

        A consumer group member's ``consumer``: ``{"name", "member", "partitions",
        "members", "owned", "lease_age_s", "rebalances"}`` (README "Running many processes").
        A listener that backfills has ``backfill``: ``{table: {"rows": logged so far
        (by every member), "done": bool}}``.
        """
        return self._observer.health()

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

    def report(self, kind, error, channel=None, event_id=None, what=None):
        """Report a failure of code working for this listener (the SSE bridge's
        ``authorize`` or ``row_filter``, an extension): logged, counted
        (``errors_<kind>``) and sent through the ``error`` signal. *kind* is an
        :class:`ErrorKind`; *what* says which code failed."""
        self._reporter.report(kind, error, channel, event_id=event_id, what=what)

    def dead_letters(self):
        """This durable consumer's dead letters (events its handlers failed on for
        good), as dicts: channel, event_id, attempts, error_type, error, first and last
        failure time, retry_requested. No row values."""
        self._require_consumer("dead_letters")
        with self._connections.pool.connection() as conn:
            return list_dead_letters(conn, self.consumer, mine=True)

    def retry_dead_letters(self, ids=None):
        """Deliver these dead letters (event ids; None: all) to the handlers again, in
        the member holding each one's partition (within ``dead_letters.POLL_S``, or
        at the next start); returns how many were asked for."""
        self._require_consumer("retry_dead_letters")
        with self._connections.pool.connection() as conn:
            return request_retry(conn, self.consumer, None if ids is None else [int(i) for i in ids])

    def _require_consumer(self, what):
        if not self.consumer:
            raise ListenerStateError(f"{self.name}: {what}() is for a durable consumer (Listener(consumer=...))")
        self._connections.require_pool()

    def event_log(self):
        """The :class:`~pgnotify_sync._eventlog.EventLog` this listener reads, on its
        pool (the SSE bridge replays from it)."""
        self._connections.require_pool()
        return self._connections.event_log

    def cleanup(self):
        """Trim the event log now (also done every ``cleanup_interval_s``). Returns rows deleted.

        Rows older than ``retention_s`` go, except rows a durable consumer has not
        handled yet, which are kept up to ``consumer_retention_s``.
        """
        self._connections.require_pool()
        deleted = self._connections.event_log.trim(
            self.name, self.config.retention_s, self.config.consumer_retention_s, self._stop_event.is_set,
            lambda n: self.stats.inc("retention_deleted", n))
        if self.consumer:
            self._hooks.check_consumer_gaps()
        return deleted

    # -- wiring -------------------------------------------------------------------

    def _own_threads(self):
        """The reader's, maintenance's and poller's threads (None where not started)."""
        return (self._reader and self._reader.thread, self._maintenance, self._poller and self._poller.thread,
                self._backfiller)

    def _add_channel(self, channel):
        self._channels[channel] = ChannelState(channel, self.config.checked_wire_channel(channel))

    def _setup(self):
        """Build the parts, in the order stop() undoes."""
        cfg, parts = self.config, self._parts
        if self._registry is not False:
            self._metrics = collector_for(self._registry)
            self._metrics.add(self._observer)
        self._connections.require_pool()
        # A durable consumer is a member of its group (_group.py).
        if self.consumer:
            self._group = parts.group = Group.member(self.name, self.consumer, cfg, self._channels,
                                                     self._connections, lambda: self._dispatcher)
        keys = self._group.keys if self._group else catalog_keys(self._connections.event_log.query_one)
        partitions = cfg.consumer_partitions if self._group else 1
        if cfg.ordering == "row" and cfg.worker_pool_size > 1:
            self._rows = RowPool(self.name, cfg.worker_pool_size, keys)
        self._hooks.configure_delivery(keys, partitions, self._rows)
        # Each fetch thread holds a pooled connection while it reads: leave one for
        # publish() and the workers' own reads.
        fetchers = max(1, min(cfg.worker_pool_size * READ_AHEAD, cfg.pool_max_connections - 1))
        self._dispatcher = parts.dispatcher = Dispatcher(
            self.name, self._channels, cfg.event_buffer_size, cfg.worker_pool_size, self._hooks.dispatch_hooks(),
            fetchers=fetchers, compact_ranges=not self.consumer, fetch_timeout_s=fetch_timeout_s(cfg),
            whole_pages=self._rows is not None)
        self._dispatcher.start()
        hooks, conns = self._hooks, self._connections
        host = types.SimpleNamespace(   # the ReaderHost of _reader.py
            name=self.name, config=cfg, channels=self._channels, consumer=self.consumer, stats=self.stats,
            dispatcher=self._dispatcher, set_state=self._lifecycle.move, emit=self._reporter.emit,
            report=self._reporter.report, load_consumer=hooks.load_consumer,
            listener_connect_kwargs=conns.listener_connect_kwargs, expect_catchup=hooks.expect_catchup)
        self._reader = parts.reader = Reader(host, self._stop_event)
        has_log = lambda: self._reader.installed is not False     # noqa: E731 - known after connecting
        self._maintenance = Maintenance(f"{self.name}-maintenance", self._stop_event, listener_tasks(
            cfg, has_log, lambda: has_log() and self._lifecycle.state is ConnectionState.LISTENING,
            lambda: self._connections.pool.fill(WARM_CONNECTIONS), self._dispatcher, self._publisher,
            self._observer.update_lag, self.cleanup, self.consumer and (lambda: queue_retries(
                self.name, self._connections.dead_letters, self._channels, self._dispatcher.push_control)))).start()
        self._poller = Poller(self.name, cfg.poll_interval_s, self._channels, self._connections.event_log.query_one,
                              lambda ch, item: self._dispatcher.push_control(ch, item, skip_overflowing=True),
                              self._stop_event, ready=lambda: self._reader.installed is True
                              and self._lifecycle.state is ConnectionState.LISTENING)
        self._poller.start()
        if self._group is not None:
            self._group.start()
        if self.backfill:
            self._backfiller = spawn(functools.partial(backfill.run_for, self._parts, self.backfill),
                                     f"{self.name}-backfill")


def _typed_call(handler, model, converter, event):
    handler(typed(event, model, converter))
