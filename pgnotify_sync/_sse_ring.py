"""The SSE replay ring: recent events in delivery order, framed once. No thread: used under the bridge's lock.

Every delivered event becomes an :class:`Entry` holding its SSE frame (built once,
shared by every client). Events with a log id are also kept in the ring, the last
``limit`` of them, numbered by ``seq`` (consecutive, so the position of an entry is
``seq - first seq``). A ``Last-Event-ID`` found in the ring is resumed exactly, in
delivery order (which is commit order, not id order: see sse.py's docstring).

Not thread-safe by itself: the bridge adds (on the listener's worker threads) and
looks up (on the request threads) while holding its own lock. :func:`log_replay`
reads a resume older than the ring from the event log, page by page.
"""

import collections
import itertools

from ._sse_stream import ReplayTooLong


def frame(channel, event):
    """One SSE message as bytes (JSON has no raw newline: one data line)."""
    head = f"id: {event.id}\n" if event.id is not None else ""
    return f"{head}event: {channel}\ndata: {event.to_json()}\n\n".encode()


class Entry:
    """A delivered event, framed once for every client (``seq`` 0: not in the ring)."""

    __slots__ = ("seq", "channel", "event", "frame")

    def __init__(self, seq, channel, event, frame):
        self.seq = seq
        self.channel = channel
        self.event = event
        self.frame = frame


class ReplayRing:
    """The last *limit* delivered events that have a log id (0: keep none)."""

    def __init__(self, limit):
        self.limit = limit
        self._entries = collections.deque(maxlen=limit)   # Entry, in delivery order
        self._seq_of = {}       # event id -> seq, for the entries in the ring
        self.seq = 0            # seq of the newest entry (0: none yet)

    def __len__(self):
        return len(self._entries)

    def add(self, channel, event, framed):
        """The Entry of a delivered *event* (already *framed*); kept if it has a log id.

        Events without a log id (plain payloads of foreign triggers) are never replayed.
        """
        if event.id is None or not self.limit:
            return Entry(0, channel, event, framed)
        self.seq += 1
        entry = Entry(self.seq, channel, event, framed)
        entries = self._entries
        if len(entries) == entries.maxlen:
            old = entries[0]
            if self._seq_of.get(old.event.id) == old.seq:
                del self._seq_of[old.event.id]
        entries.append(entry)
        self._seq_of[event.id] = entry.seq
        return entry

    def after(self, event_id, channels):
        """The entries of *channels* delivered after event *event_id*, in delivery
        order; None if the ring does not hold it (read the event log instead)."""
        seq = self._seq_of.get(event_id)
        if seq is None:
            return None
        start = seq - self._entries[0].seq + 1
        return [e for e in itertools.islice(self._entries, start, None) if e.channel in channels]

    def delivered_by(self, event_id, seq):
        """True if event *event_id* is in the ring and was delivered at or before *seq*."""
        at = self._seq_of.get(event_id)
        return at is not None and at <= seq


def log_replay(event_log, wires, after, most, delivered_before):
    """(The events of channels *wires* above id *after* from the event log, as
    entries read page by page; the set of their ids the live queue must skip,
    filled as pages are read: those not in ``delivered_before(ids)``, which may
    still reach the queue.) ReplayTooLong when more than *most* follow *after*."""
    count, newest = event_log.replay_size(wires, after, most + 1)
    if count > most:
        raise ReplayTooLong(newest)
    skip = set()

    def entries():
        for page in event_log.replay_pages(wires, after):
            got = [Entry(0, event.channel, event, frame(event.channel, event)) for event in page]
            delivered = delivered_before([e.event.id for e in got])
            skip.update(e.event.id for e in got if e.event.id not in delivered)
            yield from got
    return entries(), skip
