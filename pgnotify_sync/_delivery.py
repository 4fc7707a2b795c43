"""Delivery: events handed to the handlers of a channel, on the dispatcher's
worker threads, one channel at a time and in order.

Handlers are user code: whatever one raises (SystemExit too) is logged, counted
and reported (kind ``handler``) and the next handler and event still run; only
Ctrl-C in the main thread propagates. A durable consumer's position is stored
every ``checkpoint_every`` events along the way (see _consumers.py).
"""

import bisect
import functools
import logging
import time

from .errors import must_propagate

log = logging.getLogger("pgnotify_sync")

# The ``table`` metric label of plain events (accept_plain_payloads): their table
# name comes from the wire, where anyone can make one up (unbounded series).
PLAIN_TABLE = "(plain)"


def _call_receiver(receiver, sender, event):
    receiver(sender, event=event)


class Delivery:
    """Delivers events of listener *name* through *signals*.event; *save(ch,
    undelivered)* stores a durable consumer's position (None: not durable)."""

    def __init__(self, name, signals, report, checkpoint_every, save=None):
        self._name = name
        self._signals = signals
        self._report = report
        self._checkpoint_every = checkpoint_every
        self._save = save

    def deliver(self, ch, events):
        """Hand *events* (fresh, in order) to the handlers of channel *ch*."""
        name = ch.name
        calls = self._receivers(name)
        debug = log.isEnabledFor(logging.DEBUG)
        perf = time.perf_counter
        hist = ch.handler_hist
        counts, buckets = hist.counts, hist.buckets
        by = ch.delivered_by
        # A durable consumer stores its position every checkpoint_every events: a crash
        # then repeats at most that many. The ids of this batch not yet handed to
        # receivers must not be stored as handled.
        checkpoint = self._checkpoint_every if self._save else 0
        undelivered = {e.id for e in events} if checkpoint else None
        # delivered_by is counted per run of events of one (operation, table).
        op = table = label = None
        run = 0
        total = 0.0
        started = perf()
        first_bound = buckets[0]
        fast = 0            # events faster than the first bucket bound (most, in a burst)
        only = calls[0] if len(calls) == 1 else None
        for event in events:
            # Handlers are user code: whatever they raise (SystemExit too) is reported
            # and the next handler and event still run.
            if only is not None:
                try:
                    only(event)
                except BaseException as exc:
                    self._failed(ch, exc, event)
            else:
                for call in calls:
                    try:
                        call(event)
                    except BaseException as exc:
                        self._failed(ch, exc, event)
            done = perf()
            elapsed = done - started
            started = done
            if elapsed <= first_bound:
                fast += 1
            else:
                counts[bisect.bisect_left(buckets, elapsed)] += 1
            total += elapsed
            if event.operation is not op or event.table != table:
                if run:
                    key = (op, label)
                    by[key] = by.get(key, 0) + run
                op, table, run = event.operation, event.table, 0
                # A plain event's table is the wire's word: one label for all of them.
                label = table if event.id is not None else PLAIN_TABLE
            run += 1
            if debug:
                self._log_delivered(name, event, elapsed)
            if checkpoint and self._checkpoint(ch, event, undelivered, checkpoint):
                started = perf()     # the write is not the handler's time
        if run:
            key = (op, label)
            by[key] = by.get(key, 0) + run
        self._delivered(ch, len(events), fast, total)

    def _delivered(self, ch, count, fast, total):
        """Account a batch of *count* events: *fast* of them under the first bucket
        bound (counted in one go), *total* seconds in handlers."""
        hist = ch.handler_hist
        hist.counts[0] += fast
        hist.sum += total
        hist.count += count
        ch.delivered += count
        ch.last_event_at = time.time()

    def _checkpoint(self, ch, event, undelivered, every):
        """*event* was handled: store the position if it is time; True if stored."""
        undelivered.discard(event.id)
        if ch.in_catchup:
            ch.catchup_upto = event.id      # catch-up delivers in id order
        # Counted per channel, as positions are stored per channel: the bound on
        # repeats after a crash holds for each of several busy channels.
        ch.since_checkpoint += 1
        if ch.since_checkpoint < every:
            return False
        self._save(ch, undelivered)
        return True

    def _receivers(self, name):
        """One callable per receiver of channel *name*: on_event handlers directly,
        bare blinker receivers with the signal's arguments."""
        return [getattr(r, "_pgnotify_handler", None) or functools.partial(_call_receiver, r, name)
                for r in self._signals.event.receivers_for(name)]

    def _log_delivered(self, name, event, elapsed):
        # DEBUG only, and no row values (they may be secret).
        log.debug("%s: delivered event %s on %r (%s %s.%s)", self._name, event.id, name,
                  event.operation.value, event.schema, event.table,
                  extra={"event": "delivered", "channel": name, "event_id": event.id,
                         "details": {"operation": event.operation.value, "table": event.table,
                                     "duration": round(elapsed * 1000, 3)}})

    def _failed(self, ch, exc, event):
        if must_propagate(exc):
            raise exc
        ch.handler_errors += 1
        self._report("handler", exc, ch.name, event_id=event.id, exc_info=True)

