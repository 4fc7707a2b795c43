"""One SSE client's stream (queue, replay, live events, heartbeats), on the server thread serving its request.

A :class:`Client` is a bounded queue: the listener's worker threads fill it
through the bridge (:meth:`Client.offer` never waits; a full queue ends the
client instead), the request's thread drains it in :func:`stream`, the response
body: ``retry``, the replay after ``Last-Event-ID``, then live events and
``: keep-alive`` heartbeats until the client goes away, is evicted, or the bridge
or the listener is closed. What the stream needs of the bridge (the row filter,
the event-log replay, the counters, unregistering) it asks through
:class:`StreamHooks`.
"""

import collections
import logging
import threading
import time
import typing

from .errors import first_line

log = logging.getLogger("pgnotify_sync.sse")

# First line of every stream: EventSource reconnects 1000 ms after a stream ends.
RETRY = b"retry: 1000\n\n"
# Sent after heartbeat_s without output; a client that went away is noticed at a write.
HEARTBEAT = b": keep-alive\n\n"
# Sent instead of the replay when the event log cannot be read; the browser retries.
REPLAY_FAILED = b": replay failed\n\n"
# Longest a stream waits before it checks whether the listener was stopped.
STATE_CHECK_S = 1.0
# Replayed frames joined into one write (fewer syscalls for replays).
WRITE_BATCH_BYTES = 64 * 1024
# Live frames joined into one write (fewer syscalls for bursts).
LIVE_BATCH_FRAMES = 256


class Client:
    """One connected stream: a bounded queue filled by the listener's workers."""

    def __init__(self, ident, channels, info, capacity):
        self.id = ident
        self.channels = frozenset(channels)
        self.info = info
        self.capacity = capacity
        self.cond = threading.Condition(threading.Lock())
        self.items = collections.deque()
        self.ended = None          # why the stream must end: "evicted", "closed", "stopped"

    def offer(self, entry):
        """Queue *entry* without waiting; False if the queue was full (the client is then ended)."""
        with self.cond:
            if self.ended is not None:
                return True
            if len(self.items) >= self.capacity:
                self.ended = "evicted"
                self.items.clear()
                self.cond.notify()
                return False
            self.items.append(entry)
            self.cond.notify()
            return True

    def end(self, reason):
        with self.cond:
            if self.ended is None:
                self.ended = reason
                self.items.clear()
            self.cond.notify()

    def take(self, timeout):
        """Every queued entry (possibly none after *timeout*); ``ended`` says whether to stop."""
        with self.cond:
            if not self.items and self.ended is None:
                self.cond.wait(timeout)
            items = list(self.items)
            self.items.clear()
            return items


class StreamHooks(typing.Protocol):
    """What a stream asks of its bridge, on the request's thread."""

    def visible(self, client, entry) -> bool:
        """Whether the row filter lets *client* see *entry* (a filter that raises hides it)."""

    def replay_from_log(self, client, after, registered_at) -> tuple:
        """(entries above id *after* from the event log, ids the live queue must skip); may raise."""

    def count_sent(self, count, replayed_from=None) -> None:
        """*count* events were written; *replayed_from* is "ring" or "log" for a replay."""

    def forget(self, client_id) -> None:
        """Unregister the client (idempotent)."""

    def stopped(self) -> bool:
        """True once the listener was stopped: the stream ends."""


def stream(client, hooks, heartbeat_s, last_event_id, registered_at, replay):
    """The response body: retry, replay, then live events and heartbeats.

    *replay* is the ring's entries after *last_event_id*, or None to read them from
    the event log (*registered_at*: the ring's seq when the client registered).
    """
    ended_by = "client"
    try:
        yield RETRY
        skip = None
        if last_event_id is not None:
            from_log = replay is None
            if from_log:
                try:
                    replay, skip = hooks.replay_from_log(client, last_event_id, registered_at)
                except Exception as exc:    # database down, pool closed...: end; the browser retries
                    log.warning("SSE client %s: cannot replay from the event log (%s); it retries",
                                client.id, first_line(exc))
                    ended_by = "replay failed"
                    yield REPLAY_FAILED
                    return
            count = yield from _replayed(client, hooks, replay)
            hooks.count_sent(count, "log" if from_log else "ring")
        ended_by = yield from _live(client, hooks, heartbeat_s, skip)
    finally:
        hooks.forget(client.id)
        log.debug("SSE client %s ended (%s)", client.id, ended_by)


def _replayed(client, hooks, entries):
    """Write the visible *entries* in batches; returns how many were written."""
    batch, size, count = [], 0, 0
    for entry in entries:
        if hooks.visible(client, entry):
            batch.append(entry.frame)
            size += len(entry.frame)
            count += 1
            if size >= WRITE_BATCH_BYTES:
                yield b"".join(batch)
                batch, size = [], 0
    if batch:
        yield b"".join(batch)
    return count


def _live(client, hooks, heartbeat_s, skip):
    """Queued events and heartbeats until the stream must end; returns why it ended.

    *skip*: ids already sent by a replay from the log that may still reach the queue.
    """
    last_write = time.monotonic()
    while True:
        wait = min(heartbeat_s - (time.monotonic() - last_write), STATE_CHECK_S)
        items = client.take(max(0.0, wait))
        if client.ended is not None:
            return client.ended
        if hooks.stopped():
            return "listener stopped"
        if items:
            batch = []
            for entry in items:
                if skip and entry.event.id in skip:
                    skip.discard(entry.event.id)
                    continue
                if hooks.visible(client, entry):
                    batch.append(entry.frame)
            if batch:
                for start in range(0, len(batch), LIVE_BATCH_FRAMES):
                    yield b"".join(batch[start:start + LIVE_BATCH_FRAMES])
                last_write = time.monotonic()
                hooks.count_sent(len(batch))
        if time.monotonic() - last_write >= heartbeat_s:
            yield HEARTBEAT
            last_write = time.monotonic()


class Body:
    """The WSGI response body: closing it unregisters the client even if it was never iterated."""

    def __init__(self, gen, forget, client_id):
        self._gen = gen
        self._forget = forget
        self._client_id = client_id

    def __iter__(self):
        return self._gen

    def close(self):
        self._gen.close()
        self._forget(self._client_id)
