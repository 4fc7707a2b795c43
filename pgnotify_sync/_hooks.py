"""What the dispatcher and the reader call back into (the DispatchHooks of
_dispatch.py and part of the ReaderHost of _reader.py): reads of the event log,
delivery, a durable consumer's stored position, and "connected" once every
channel has caught up. Runs on the worker, fetch and reader threads; owns none.
"""

import logging
import threading
import types

from ._backfill import superseded
from ._backoff import Backoff
from ._delivery import Delivery
from ._fetch import Window, fetch_timeout_s, read_pages
from ._channel import lanes
from ._lifecycle import ConnectionState
from ._shared import SharedReads

log = logging.getLogger("pgnotify_sync")


class ListenerHooks:
    """*parts* gives the listener's ``connections``, ``dispatcher``, ``reader``,
    ``lifecycle``, ``reporter``, ``channels``, ``stats``, ``config``, ``consumer``,
    ``breakers`` and ``name`` (see Listener.__init__); events go to *signals*' receivers (Delivery)."""

    def __init__(self, parts, signals, checkpoint_every):
        self._p = parts
        self._lock = threading.Lock()
        self._pending_catchup = set()
        self.report = parts.reporter.report
        self._signals = signals
        self._checkpoint_every = checkpoint_every
        self.deliver = self._delivery().deliver
        self._redeliver = None
        # A group member's lanes of one channel read the same hints once (_shared.py).
        self._shared = SharedReads(fetch_timeout_s(parts.config))

    def _delivery(self, keys=None, partitions=1, rows=None):
        p = self._p
        cfg = p.config
        backoff = Backoff(cfg.handler_retry_delay_ms / 1000, cfg.handler_retry_delay_max_ms / 1000,
                          cfg.handler_max_attempts) if cfg.handler_max_attempts > 1 else None
        return Delivery(p.name, self._signals, self.report, self._checkpoint_every,
                        save=self.save_consumer if p.consumer else None, keys=keys, partitions=partitions, rows=rows,
                        backoff=backoff, stop=p.stop_event, park=self._park if p.consumer else None,
                        consumer=p.consumer, superseded=lambda ch, events: superseded(
                            p.connections.event_log.query_all, ch.wire, events, keys), breakers=p.breakers)

    def configure_delivery(self, keys, partitions, rows):
        """At start(), before any delivery: the rows' *keys* (a KeyColumns), the group's
        *partitions* and the RowPool of ``ordering="row"`` (None: a channel's order)."""
        delivery = self._delivery(keys, partitions, rows)
        self.deliver, self._redeliver = delivery.deliver, delivery.redeliver

    # -- DispatchHooks ----------------------------------------------------------------

    def dispatch_hooks(self):
        """The DispatchHooks of _dispatch.py, and nothing else."""
        return types.SimpleNamespace(deliver=self.deliver, catch_up=self.catch_up, fetch_ids=self.fetch_ids,
                                     fetch_range=self.fetch_range, others_in_range=self.others_in_range,
                                     window=self.window, report=self.report,
                                     caught_up=self.caught_up, after_batch=self.after_batch,
                                     lease_lost=self.lease_lost, redeliver=self.redeliver)

    def catch_up(self, ch, reason):
        """(target snapshot, the pages of events from ch.position up to it); events
        a poll found are counted as polled, the others as caught up."""
        pos = ch.position
        if self._p.reader.installed is False:
            return pos, (events for events in ())   # no event log to read (plain payloads only)
        log_ = self._p.connections.event_log
        target = log_.snapshot()

        dispatcher = self._p.dispatcher
        page = dispatcher.catchup_rows

        def read(after, previous=None):
            return log_.catchup_page(ch.name, ch.wire, pos, target, after, previous, limit=page)

        def counted(events):
            if reason == "poll":
                ch.polled += len(events)
            else:
                ch.caught_up += len(events)

        return target, read_pages(read, dispatcher.submit, dispatcher.result, counted,
                                  Window(dispatcher, page, whole=True, own=False))

    def fetch_ids(self, ch, ids, mine=False):
        if self._p.reader.installed is False:
            return []   # no event log: no hint can name an event (nothing to fall back for)
        read = self._p.connections.event_log.events_by_id
        if ch.partition is None or mine:
            return read(ch.name, ch.wire, ids, mine)
        return self._shared.ids(ch.wire, ids, self._readers(ch), lambda wanted: read(ch.name, ch.wire, wanted))

    def _readers(self, lane):
        """Lanes of *lane*'s channel that this member holds (and that read alike)."""
        channel = self._p.dispatcher.by_wire.get(lane.wire)
        return sum(1 for other in channel.lanes if other.active) if channel is not None else 1

    def window(self, ch, target):
        if self._p.reader.installed is False:
            return ()   # no event log (plain payloads only)
        return self._p.connections.event_log.window(ch.wire, ch.position, target)

    def fetch_range(self, ch, rng, after=0, previous=None):
        """The rows of one statement, announced by id range, after id *after*: one
        page (RangeRows; *previous* is the row count of the page before it) and
        whether more follow it."""
        read = self._p.connections.event_log.range_rows
        limit = self._p.dispatcher.page_rows
        if ch.partition is None:
            return read(ch.name, ch.wire, rng, after, previous, limit)
        key = (ch.wire, rng.xid, rng.first, rng.last, after, previous)
        return self._shared.page(key, self._readers(ch), lambda: read(ch.name, ch.wire, rng, after, previous, limit))

    def others_in_range(self, ch, rng):
        return self._p.connections.event_log.others_in_range(ch.wire, rng)

    def caught_up(self, ch, reason, count):
        key = (ch.name, ch.partition)
        with self._lock:
            if key not in self._pending_catchup:
                return
            self._pending_catchup.discard(key)
            done = not self._pending_catchup
        if done and self._p.lifecycle.state is ConnectionState.LISTENING:
            log.info("%s: connected and caught up (%s)", self._p.name, reason,
                     extra={"event": "connected", "details": {"reason": reason}})
            self._p.reporter.emit("connected")

    def after_batch(self, ch):
        if self._p.consumer:
            self.save_consumer(ch)

    # -- dead letters (_deadletters.py) ---------------------------------------------------

    def _park(self, ch, event, exc, attempts):
        self._p.connections.dead_letters.park(ch.wire, event, exc, attempts)

    def redeliver(self, ch, events):
        store = self._p.connections.dead_letters
        try:
            self._redeliver(ch, events, lambda lane, e: store.requested(lane.wire, e.id),
                            lambda lane, e: store.done(lane.wire, e.id))
        finally:
            ch.redeliver_pending = False

    def lease_lost(self, lane):
        self._p.group.lost(lane, "its lease ran out before it could be renewed")

    # -- the reader's ------------------------------------------------------------------

    def expect_catchup(self):
        """Every channel catches up now; 'connected' comes once all have (caught_up).
        A group member's channels of which it holds no partition have nothing to
        catch up."""
        with self._lock:
            self._pending_catchup = {(lane.name, lane.partition) for ch in self._p.channels.values()
                                     for lane in lanes(ch) if lane.active}
            done = not self._pending_catchup
        if done:
            log.info("%s: connected (holding no partition of consumer group %r yet)", self._p.name,
                     self._p.consumer, extra={"event": "connected", "details": {"reason": "standby"}})
            self._p.reporter.emit("connected")

    # -- durable consumers (the store: _consumers.py) ---------------------------------------

    def load_consumer(self, start):
        self._p.group.join(start)
        self.check_consumer_gaps()

    def save_consumer(self, ch, undelivered=None):
        self._p.connections.consumer_store.save(ch, undelivered)

    def check_consumer_gaps(self):
        p = self._p
        for wire, lost in p.connections.consumer_store.take_gaps():
            channel = p.config.logical_channel(wire) or wire
            p.stats.inc("consumer_gap_events", lost)
            if channel in p.channels:
                p.channels[channel].gap_events += lost
            self.report("gap", f"consumer {p.consumer!r} missed {lost} events: the event log was trimmed "
                               f"past its position (older than consumer_retention_s)", channel)
