"""What a listener shows of itself: ``get_stats()``, ``health()``, the Prometheus
samples (read at scrape time) and the lag gauge (updated by the maintenance
thread). Reads the listener's parts; owns no thread.
"""

import time
import types

from ._breaker import SUSPENDED
from ._channel import lanes
from ._counters import Counters
from ._lifecycle import ConnectionState
from ._position import handled_count
from .metrics import Histogram

# Totals of the per-channel counters: kept once, on the channels (each has one
# writer: the reader, or the worker holding the channel), and summed on reading.
CHANNEL_TOTALS = {"received": "received", "delivered": "delivered", "parse_errors": "parse_errors",
                  "handler_errors": "handler_errors", "handler_retries": "handler_retries",
                  "type_errors": "type_errors", "caught_up": "caught_up",
                  "unmatched_hints": "unmatched_hints", "missed": "missed", "polled": "polled"}


# A group member's channel counts on the channel (the reader's counters) and on its
# lanes (the workers'): shown as one channel.
_SUMMED = tuple(CHANNEL_TOTALS.values()) + ("dropped", "gap_events")


def _states(ch):
    return (ch,) + ch.lanes


def channel_totals(channels):
    """``{stat name: () -> sum over channels}`` for :class:`~._counters.Counters`."""
    def total(attr):
        return lambda: sum(getattr(x, attr) for ch in list(channels.values()) for x in _states(ch))
    return {name: total(attr) for name, attr in CHANNEL_TOTALS.items()}


def merged(ch):
    """*ch*'s figures over its lanes: the channel itself when it has none. Lag is
    the largest of the held lanes' (each lane's counts every partition's events)."""
    if not ch.lanes:
        return ch
    states = _states(ch)
    view = types.SimpleNamespace(name=ch.name, **{a: sum(getattr(x, a) for x in states) for a in _SUMMED})
    view.handler_hist = Histogram(ch.handler_hist.buckets)
    view.delivered_by = {}
    for x in states:
        view.handler_hist.add(x.handler_hist)
        for key, n in list(x.delivered_by.items()):
            view.delivered_by[key] = view.delivered_by.get(key, 0) + n
    held = [lane for lane in ch.lanes if lane.active]
    lags = [lane.lag for lane in held if lane.lag is not None]
    view.lag = max(lags) if lags else None
    times = [x.last_event_at for x in states if x.last_event_at is not None]
    view.last_event_at = max(times) if times else None
    view.overflow = any(lane.overflow for lane in held)
    return view


def new_stats(channels):
    """The listener's Counters. Thread-safe: counted from the reader, the workers,
    the fetch threads and the maintenance thread; the per-channel counters of
    *channels* are summed, not counted twice."""
    return Counters(
        derived=channel_totals(channels),
        receiver_errors=0, reconnects=0, reconnect_attempts=0, health_checks=0, health_check_failures=0,
        publish_flushed=0, publish_dropped=0, retention_deleted=0, consumer_gap_events=0, internal_errors=0,
        last_health_rtt_s=None, connected_since=None, last_event_at=None, last_error=None)


class Observer:
    """*parts*: the listener's ``name``, ``config``, ``channels``, ``stats``,
    ``lifecycle``, ``publisher``, ``connections`` and, once started, ``reader`` and
    ``dispatcher`` (None before)."""

    def __init__(self, parts):
        self._p = parts

    def stats(self):
        p = self._p
        stats = p.stats.snapshot()
        stats["state"] = p.lifecycle.state.value
        stats["publish_buffered"] = len(p.publisher)
        if p.dispatcher is not None:
            stats["buffered"] = p.dispatcher.buffered
            stats["capacity"] = p.dispatcher.capacity
            stats["dropped_to_log"] = sum(x.dropped for ch in p.channels.values() for x in _states(ch))
        return stats

    def health(self):
        p = self._p
        st = p.stats.snapshot()
        channels = {}
        for ch in map(merged, list(p.channels.values())):
            channels[ch.name] = {"lag": ch.lag, "delivered": ch.delivered, "last_event_at": ch.last_event_at,
                                 "falling_back": ch.overflow}
        times = [c["last_event_at"] for c in channels.values() if c["last_event_at"] is not None]
        state = p.lifecycle.state
        return {
            "ok": state is ConnectionState.LISTENING and not any(c["falling_back"] for c in channels.values()),
            "state": state.value,
            "connected_since": st["connected_since"],
            "last_event_at": max(times) if times else None,
            "queue_size": p.dispatcher.buffered if p.dispatcher is not None else 0,
            "queue_capacity": p.config.event_buffer_size,
            "reconnects": st["reconnects"],
            "last_error": st["last_error"],
            "last_health_check_rtt_s": st["last_health_rtt_s"],
            "channels": channels,
            "consumer": p.group.status() if p.group is not None else None,
            "handlers": p.breakers.not_closed(),
            **({"backfill": {t: dict(s) for t, s in list(p.backfill.items())}} if p.backfill else {}),
        }

    def collect(self, fams):
        """Add this listener's samples to the metric families (scrape time)."""
        p = self._p
        me = p.name

        def add(name, labels, value):
            fams[f"pgnotify_sync_{name}"].add_metric([me] + labels, value)

        def add_hist(name, labels, hist):
            fams[f"pgnotify_sync_{name}"].add_metric([me] + labels, hist.cumulative(), hist.sum)

        for ch in list(p.channels.values()):
            self._collect_channel(merged(ch), add, add_hist)
        for channel, breaker in p.breakers.items():
            add("handler_suspended", [channel, breaker.name], 1 if breaker.state in SUSPENDED else 0)
            add("handler_suspended_events", [channel, breaker.name], breaker.rejected)
        for ch in list(p.channels.values()):
            if ch.dead_letters is not None:
                add("dead_letters", [p.consumer, ch.name], ch.dead_letters)
        for table, state in list(p.backfill.items()):
            add("backfill_rows", [p.consumer, table], state["rows"])
            add("backfill_done", [p.consumer, table], 1 if state["done"] else 0)
        if p.group is not None:
            add("consumer_partitions_owned", [p.group.consumer], len(p.group.owned))
            add("consumer_rebalances", [p.group.consumer], p.group.rebalances)
            add("consumer_members", [p.group.consumer], len(p.group.members))
        if p.reader is not None:
            add_hist("decode_duration_seconds", [], p.reader.decode_hist)
            add_hist("health_check_rtt_seconds", [], p.reader.rtt_hist)
        add("queue_size", [], p.dispatcher.buffered if p.dispatcher else 0)
        add("queue_capacity", [], p.config.event_buffer_size)
        state = p.lifecycle.state
        for each in ConnectionState:
            add("connection_state", [each.value], 1 if state is each else 0)
        st = p.stats.snapshot()
        since = st.get("connected_since")
        add("connection_uptime_seconds", [], time.time() - since if since else 0)
        for name in ("reconnect_attempts", "reconnects", "health_check_failures", "retention_deleted"):
            add(name, [], st.get(name, 0))
        pool = p.connections.pool
        add("pool_connections_in_use", [], pool.in_use if pool else 0)
        add("pool_connections_discarded", [], pool.discarded if pool else 0)
        for kind, tunnel in p.connections.tunnels():
            add("tunnel_restarts", [kind], tunnel.restarts)
        add("publish_buffer_size", [], len(p.publisher))

    @staticmethod
    def _collect_channel(ch, add, add_hist):
        labels = [ch.name]
        add("events_received", labels, ch.received)
        for (operation, table), n in list(ch.delivered_by.items()):
            add("events_delivered", [ch.name, operation.value, table], n)
        add("parse_errors", labels, ch.parse_errors)
        add("handler_errors", labels, ch.handler_errors)
        add("handler_retries", labels, ch.handler_retries)
        add("type_errors", labels, ch.type_errors)
        add_hist("handler_duration_seconds", labels, ch.handler_hist)
        add("overflow_events", labels, ch.dropped)
        add("catchup_events", labels, ch.caught_up)
        add("consumer_gap_events", labels, ch.gap_events)
        add("unmatched_hints", labels, ch.unmatched_hints)
        add("missed_events", labels, ch.missed)
        add("polled_events", labels, ch.polled)
        if ch.lag is not None:
            add("lag_events", labels, ch.lag)

    def update_lag(self):
        """Events in the log not handled yet, per channel (a gauge; the durable
        position says what is handled, so this is exact up to events in flight)."""
        p = self._p
        for ch in list(p.channels.values()):
            for lane in lanes(ch):
                pos = lane.position
                if pos is None or not lane.active:
                    continue
                lane.lag = max(0, p.connections.event_log.pending(lane.wire, pos) - handled_count(lane))
