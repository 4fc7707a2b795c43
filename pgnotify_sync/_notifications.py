"""Notifications in, events out: one batch read by the reader is decoded and handed
to the dispatcher per channel, in arrival (commit) order, without blocking. A
payload that is not an event is counted and reported (kind ``payload``) and the
batch goes on: the wire is not trusted.
"""

import logging
import time

from .errors import PayloadError
from .events import EventRange, decode_payload
from .metrics import Histogram

log = logging.getLogger("pgnotify_sync")


class Router:
    """Routes notifications of listener *name* to *dispatcher*'s channels."""

    def __init__(self, name, dispatcher, report, accept_plain=False):
        self._name = name
        self._dispatcher = dispatcher
        self._accept_plain = accept_plain
        self._report = report
        self.decode_hist = Histogram()     # decode time per event

    def route(self, batch, hc, marker_seen):
        """Decode *batch* and push it per channel, in order; the health check's marker
        calls *marker_seen(hc)* after what came before it was pushed. Returns the
        count of events received."""
        started = time.perf_counter()
        debug = log.isEnabledFor(logging.DEBUG)
        by_wire = self._dispatcher.by_wire
        push = self._dispatcher.push
        groups = {}
        received = 0
        for notify in batch:
            ch = by_wire.get(notify.channel)
            if ch is None:
                if hc.is_marker(notify):
                    # Keep the order: what came before the marker is queued before Advance.
                    for group_ch, events in groups.items():
                        push(group_ch, events)
                    groups = {}
                    hc.marker_seen = True
                    marker_seen(hc)
                continue
            received += 1
            ch.received += 1
            try:
                event = decode_payload(ch.name, notify.payload, self._accept_plain)
            except PayloadError as exc:
                ch.parse_errors += 1
                self._report("payload", exc, ch.name)
                continue
            if debug:
                log.debug("%s: received event %s on %r", self._name, event.id, ch.name,
                          extra={"event": "parsed", "channel": ch.name, "event_id": event.id,
                                 "details": {"operation": getattr(event, "operation", None),
                                             "table": getattr(event, "table", None)}})
            events = groups.get(ch)
            if type(event) is EventRange:
                received += event.n - 1
                ch.received += event.n - 1
                if events:
                    last = events[-1]
                    if type(last) is EventRange and last.xid == event.xid and last.last + 1 == event.first:
                        # The next statement of the same transaction, its ids right after:
                        # one range (read in slices of SLICE_IDS, not a query per statement).
                        parts = last.parts or [(last.first, last.last, last.n)]    # (a list: no copy a merge)
                        parts.append((event.first, event.last, event.n))
                        events[-1] = EventRange(ch.name, event.xid, last.first, event.last, last.n + event.n, parts)
                        continue
            if events is None:
                groups[ch] = [event]
            else:
                events.append(event)
        if received:
            self.decode_hist.observe((time.perf_counter() - started) / received)
        for ch, events in groups.items():
            push(ch, events)
        return received
