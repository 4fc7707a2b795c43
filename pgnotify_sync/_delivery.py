"""Delivery: events handed to the handlers of a channel, on the dispatcher's
worker threads, one channel at a time and in order.

Handlers are user code: whatever one raises (SystemExit too) is logged, counted
and reported (kind ``handler``) and the next handler and event still run; only
Ctrl-C in the main thread propagates. A failure is retried with backoff; a handler
that keeps failing is suspended by its circuit breaker (_breaker.py), so that it
does not hold the other handlers of its channel back. A durable consumer's position
is stored every ``checkpoint_every`` events along the way (see _consumers.py).
"""

import bisect
import functools
import logging
import time

from ._breaker import Admit, Breakers
from ._channel import BOOTTIME, LeaseLost, lease_clock
from ._keys import partition_of
from .errors import HandlerSuspended, RowTypeError, first_line, must_propagate
from .events import DatabaseEvent, Operation
from .metrics import Histogram

log = logging.getLogger("pgnotify_sync")

BACKFILL = Operation.BACKFILL

# The ``table`` metric label of plain events (accept_plain_payloads): their table
# name comes from the wire, where anyone can make one up (unbounded series).
PLAIN_TABLE = "(plain)"

# A channel counts its events by (operation, table) for at most this many pairs;
# the rest under the table label OTHER_TABLES. The names come from the log, where a
# watched table's owner may write any table name on its own channel: the series a
# scrape shows stay bounded whatever it writes.
MAX_TABLE_SERIES = 256
OTHER_TABLES = "(other)"


def _series(by, key):
    """*key* (operation, table label) as counted in *by*: the same, or the
    operation's OTHER_TABLES once *by* holds MAX_TABLE_SERIES pairs without it."""
    return key if key in by or len(by) < MAX_TABLE_SERIES else (key[0], OTHER_TABLES)


class Interrupted(Exception):
    """stop() came during a handler's retry backoff: *events* (from the one being
    retried on) were not all handled and must not be stored as handled; the channel
    delivers nothing more (*halt*)."""

    halt = True

    def __init__(self, events):
        super().__init__(f"{len(events)} events not handled")
        self.events = events


class Redo(Interrupted):
    """An event failed for good but could not be parked as a dead letter (the
    database is away): it and what follows are read again from the log later."""

    halt = False


def _call_receiver(receiver, sender, event):
    receiver(sender, event=event)


class Delivery:
    """Delivers events of listener *name* through *signals*.event; *save(ch,
    undelivered)* stores a durable consumer's position (None: not durable). A
    consumer group's lane delivers only its partition's events (of *partitions*,
    by the rows' *keys*, a KeyColumns); with *rows* (a RowPool: ``ordering="row"``)
    different rows run in parallel. *breakers* (a Breakers) suspend handlers that
    keep failing (None: none is)."""

    def __init__(self, name, signals, report, checkpoint_every, save=None, keys=None, partitions=1, rows=None,
                 backoff=None, stop=None, park=None, consumer=None, superseded=None, breakers=None):
        self._name = name
        self._breakers = breakers if breakers is not None else Breakers(0, float("inf"))
        self._consumer = consumer       # BACKFILL events are this consumer's only
        self._superseded = superseded   # superseded(ch, events) -> ids of BACKFILL rows a newer change replaced
        self._park = park           # park(ch, event, exc, attempts): a durable consumer's dead letter
        self._backoff = backoff     # a Backoff of handler retries (None: no retry)
        self._stop = stop           # set by stop(): a backoff ends at once
        self._signals = signals
        self._report = report
        self._checkpoint_every = checkpoint_every
        self._save = save
        self._keys = keys
        self._partitions = partitions
        self._rows = rows

    def deliver(self, ch, events):
        """Hand *events* (fresh, in order) to the handlers of channel *ch*."""
        if ch.partition is not None and self._partitions > 1:
            # A lane: the other partitions' events are handled by their owners (they
            # were marked handled here all the same: the position passes them).
            mine, keys, n = ch.partition, self._keys, self._partitions
            events = [e for e in events if partition_of(e, keys, n) == mine]
            if not events:
                return
        events = self._backfills(ch, events)
        if not events:
            return
        if self._rows is not None and len(events) > 1:
            self._deliver_rows(ch, events)
            return
        checkpoint = self._checkpoint_every if self._save else 0
        n, fast, total, errors, lost, (cut, stopped) = self._handle(ch, events, ch.handler_hist, ch.delivered_by,
                                                                    checkpoint)
        ch.handler_errors += errors
        self._delivered(ch, n, fast, total)
        if cut is not None:
            raise type(stopped)(events[cut:])
        if lost:
            raise LeaseLost(ch.name)

    def _handle(self, ch, events, hist, by, checkpoint):
        """Run *events* through the handlers of *ch*, timed into *hist* and counted
        into *by*; returns (events handled, how many under the first bucket bound,
        seconds in handlers, handler errors, whether the lease was lost, and the index
        of the event whose retry stop() interrupted, or None)."""
        name = ch.name
        calls, breakers = self._receivers(name)
        debug = log.isEnabledFor(logging.DEBUG)
        perf = time.perf_counter
        counts, buckets = hist.counts, hist.buckets
        # A durable consumer stores its position every checkpoint_every events: a crash
        # then repeats at most that many. The ids of this batch not yet handed to
        # receivers must not be stored as handled.
        undelivered = {e.id for e in events} if checkpoint else None
        # delivered_by is counted per run of events of one (operation, table).
        op = table = label = None
        run = 0
        total = 0.0
        started = perf()
        first_bound = buckets[0]
        fast = 0            # events faster than the first bucket bound (most, in a burst)
        errors = 0
        only = calls[0] if len(calls) == 1 else None
        breaker = breakers[0] if only is not None else None
        lease = ch.lease_deadline is not None
        # A group lane delivers only while its lease surely holds (lease_clock(),
        # inlined: it runs before every event).
        clock, boottime = time.clock_gettime, BOOTTIME
        handled = len(events)
        cut = stopped = None
        for i, event in enumerate(events):
            if lease and (not ch.active or clock(boottime) >= ch.lease_deadline):
                # A group lane whose lease ran out stops before anyone else may take
                # its partition (their lease starts later than ours ends).
                handled = events.index(event)
                break
            # Handlers are user code: whatever they raise (SystemExit too) is reported
            # and the next handler and event still run.
            try:
                if only is not None and breaker.clean:     # _call_all inlined for one healthy handler: the hot path
                    try:
                        only(event)
                    except BaseException as exc:
                        errors += self._retry(ch, only, breaker, event, exc, Admit.RETRY)
                else:
                    errors += self._call_all(ch, calls, breakers, event)
            except Interrupted as exc:
                handled, cut, stopped = i, i, exc
                break
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
                label = _series(by, (op, table if event.id is not None else PLAIN_TABLE))[1]
            run += 1
            if debug:
                self._log_delivered(name, event, elapsed)
            if checkpoint and self._checkpoint(ch, event, undelivered, checkpoint):
                started = perf()     # the write is not the handler's time
        if run:
            key = (op, label)
            by[key] = by.get(key, 0) + run
        return handled, fast, total, errors, handled < len(events) and cut is None, (cut, stopped)

    def _backfills(self, ch, events):
        """*events* without the BACKFILL rows that are not this consumer's or that a
        newer change of their row supersedes (_backfill.py); this consumer's others
        arrive with ``old`` None. Most batches have none: one pass to see."""
        for event in events:
            if event.operation is BACKFILL:
                break
        else:
            return events
        consumer = self._consumer

        def mine(e):
            return e.operation is BACKFILL and isinstance(e.old, dict) and e.old.get("backfill_for") == consumer
        ours = [e for e in events if mine(e)] if consumer else []
        stale = self._superseded(ch, ours) if ours else set()
        return [e if e.operation is not BACKFILL
                else DatabaseEvent(e.channel, e.operation, e.schema, e.table, e.data, None, e.id, e.xid)
                for e in events if e.operation is not BACKFILL or (mine(e) and e.id not in stale)]

    def _deliver_rows(self, ch, events):
        """``ordering="row"``: *events* split by row over the row threads, in parts of
        ``checkpoint_every`` (a durable consumer stores its position after each part,
        once every row thread finished it)."""
        every = self._checkpoint_every if self._save else 0
        step = every or len(events)
        undelivered = {e.id for e in events} if every else None

        def part(share):
            hist, by = Histogram(ch.handler_hist.buckets), {}
            return share, (hist, by) + self._handle(ch, share, hist, by, 0)

        for start in range(0, len(events), step):
            window = events[start:start + step]
            lost = False
            cut, stopped = len(window), None
            for share, (hist, by, n, fast, total, errors, part_lost, (part_cut, why)) in self._rows.run(window, part):
                lost |= part_lost
                if part_cut is not None and window.index(share[part_cut]) < cut:  # a share stopped short
                    cut, stopped = window.index(share[part_cut]), why
                ch.handler_hist.add(hist)
                for key, count in by.items():
                    key = _series(ch.delivered_by, key)     # (each row thread's share is capped alike)
                    ch.delivered_by[key] = ch.delivered_by.get(key, 0) + count
                ch.handler_errors += errors
                self._delivered(ch, n, fast, total)
            if lost:        # nothing of the lane is stored any more: whatever else stopped
                raise LeaseLost(ch.name)
            if cut < len(window):
                raise type(stopped)(events[start + cut:])
            if every:
                undelivered.difference_update(e.id for e in window)
                if ch.in_catchup:
                    ch.catchup_upto = window[-1].id     # catch-up delivers in id order
                ch.since_checkpoint += len(window)
                if ch.since_checkpoint >= every:
                    self._save(ch, undelivered)

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
        """One callable per receiver of channel *name* (on_event handlers directly,
        bare blinker receivers with the signal's arguments), and their breakers."""
        receivers = list(self._signals.event.receivers_for(name))
        return ([getattr(r, "_pgnotify_handler", None) or functools.partial(_call_receiver, r, name)
                 for r in receivers], self._breakers.of(name, receivers))

    def _log_delivered(self, name, event, elapsed):
        # DEBUG only, and no row values (they may be secret).
        log.debug("%s: delivered event %s on %r (%s %s.%s)", self._name, event.id, name,
                  event.operation.value, event.schema, event.table,
                  extra={"event": "delivered", "channel": name, "event_id": event.id,
                         "details": {"operation": event.operation.value, "table": event.table,
                                     "duration": round(elapsed * 1000, 3)}})

    def _call_all(self, ch, calls, breakers, event, asked=False):
        """Every receiver of *ch* for *event* (*asked*: a dead letter's retry, asked
        for); returns how many failed for good."""
        errors = 0
        for call, breaker in zip(calls, breakers):
            if breaker.clean:
                try:
                    call(event)
                except BaseException as exc:
                    errors += self._retry(ch, call, breaker, event, exc, Admit.RETRY)
            else:
                errors += self._guarded(ch, call, breaker, event, asked)
        return errors

    def _guarded(self, ch, call, breaker, event, asked=False):
        """*call* for *event* as its breaker (not clean) allows: once, or not at all
        (the event fails at once). Returns 1 if it failed for good, else 0."""
        admit = breaker.admit(asked)
        if admit is Admit.REJECT:
            return self._suspended(ch, breaker, event)
        try:
            call(event)
        except BaseException as exc:
            return self._retry(ch, call, breaker, event, exc, admit)
        if breaker.succeeded():
            log.warning("%s: handler %s of channel %r works again: its breaker is closed", self._name,
                        breaker.name, ch.name, extra={"event": "breaker_closed", "channel": ch.name,
                                                      "details": {"receiver": breaker.name}})
        return 0

    def _suspended(self, ch, breaker, event):
        """*event* fails without a call (the breaker is open): counted, reported
        through the error signal (logged at DEBUG only: the opening was logged) and
        parked for a durable consumer."""
        exc = HandlerSuspended(breaker.name, ch.name, breaker.failures)
        self._report("handler", exc, ch.name, event_id=event.id, level=logging.DEBUG)
        self._park_or_redo(ch, event, exc, 0)
        return 1

    def _retry(self, ch, call, breaker, event, exc, admit):
        """*call* raised *exc* for *event*: with *admit* RETRY, called again after a
        backoff, up to ``handler_max_attempts`` calls (only this receiver: the others
        had it); with ONCE or TRIAL (its breaker is not clean), not again. Returns 1 if it
        failed for good (reported; the breaker told), 0 if a retry succeeded; raises
        Interrupted if stop() came during a backoff."""
        attempt = 1
        while True:
            if must_propagate(exc):
                breaker.abandon(admit)
                raise exc
            if isinstance(exc, RowTypeError):      # the row does not fit: calling again cannot help
                breaker.abandon(admit)             # (and it says nothing of the handler)
                ch.type_errors += 1
                self._report("type", exc, ch.name, event_id=event.id)
                self._park_or_redo(ch, event, exc, attempt)
                return 0
            if admit is not Admit.RETRY or self._backoff is None or self._backoff.exhausted(attempt):
                if breaker.failed(event.id, admit):
                    log.warning("%s: handler %s of channel %r failed %d events in a row: suspended, its events "
                                "fail at once (tried again every %g s)", self._name, breaker.name, ch.name,
                                breaker.failures, breaker.reset_s,
                                extra={"event": "breaker_open", "channel": ch.name,
                                       "details": {"receiver": breaker.name, "failures": breaker.failures}})
                return self._failed(ch, exc, event, attempt)
            ch.handler_retries += 1     # the channel's worker (or its row thread): one writer a row
            delay = self._backoff.delay_s(attempt)
            log.info("%s: handler of %r failed on event %s (%s, attempt %d of %d); retrying in %.3g s",
                     self._name, ch.name, event.id, type(exc).__name__, attempt, self._backoff.max_attempts, delay,
                     extra={"event": "handler_retry", "channel": ch.name, "event_id": event.id,
                            "details": {"attempt": attempt, "error": type(exc).__name__}})
            if self._stop is not None and self._stop.wait(delay):
                raise Interrupted([event])
            if ch.lease_deadline is not None and (not ch.active or lease_clock() >= ch.lease_deadline):
                raise LeaseLost(ch.name)    # another member may hold the partition now
            attempt += 1
            try:
                call(event)
                return 0
            except BaseException as again:
                exc = again

    def _failed(self, ch, exc, event, attempts=1):
        """A handler failed for good (after *attempts* calls): reported; returns 1
        (counted by the caller: row threads count apart)."""
        if must_propagate(exc):
            raise exc
        self._report("handler", exc, ch.name, event_id=event.id, exc_info=True)
        self._park_or_redo(ch, event, exc, attempts)
        return 1

    def _park_or_redo(self, ch, event, exc, attempts):
        """A durable consumer parks the event as a dead letter; if it cannot, the
        event is not passed (Redo: read again from the log later)."""
        if self._park is None or event.id is None:
            return
        try:
            self._park(ch, event, exc, attempts)
        except Exception as why:
            log.warning("%s: channel %r: cannot park event %s as a dead letter (%s); it is read again later",
                        self._name, ch.name, event.id, first_line(why))
            raise Redo([event]) from None

    def redeliver(self, ch, events, requested, done):
        """Dead letters whose retry was asked for (and still is: *requested(ch,
        event)*; only this lane delivers its partition's, one at a time, so asking
        is enough) go to the handlers again: ``done(ch, event)`` once they all took it,
        else it is parked again (which clears the request). If stop() or a failed
        re-park cuts it short, the request stays for the next start; nothing of the
        channel's own position is touched (these events were passed long ago)."""
        if ch.partition is not None and self._partitions > 1:
            events = [e for e in events if partition_of(e, self._keys, self._partitions) == ch.partition]
        calls, breakers = self._receivers(ch.name)
        for event in events:
            if not requested(ch, event):
                continue
            typed_out = ch.type_errors
            try:
                failed = self._call_all(ch, calls, breakers, event, asked=True)
            except Interrupted as exc:
                raise type(exc)([]) from None
            if failed == 0 and ch.type_errors == typed_out:
                done(ch, event)
                log.info("%s: channel %r: dead letter %s delivered", self._name, ch.name, event.id,
                         extra={"event": "dead_letter_retried", "channel": ch.name, "event_id": event.id})

