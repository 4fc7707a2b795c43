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
import contextlib
import logging
import select
import socket
import ssl
import threading
import time
import typing

from .errors import first_line

log = logging.getLogger("pgnotify_sync.sse")

# First line of every stream: EventSource reconnects 1000 ms after a stream ends.
RETRY = b"retry: 1000\n\n"
# Last frame of a stream the server ends (bridge closed, listener stopped): come
# back soon, to whichever process serves then (it resumes with Last-Event-ID).
RECONNECT_MS = 250
RECONNECT = b": the server ends this stream: reconnect\nretry: %d\n\n" % RECONNECT_MS
# Why a stream ended (Client.ended, or the listener) that asks the browser back.
ENDED_BY_SERVER = ("closed", "listener stopped")
# Sent after heartbeat_s without output; a client that went away is noticed at a write.
HEARTBEAT = b": keep-alive\n\n"
# Sent instead of the replay when the event log cannot be read; the browser retries.
REPLAY_FAILED = b": replay failed\n\n"
# How long a resume waits for one of the bridge's replay slots (max_replays) before
# it ends with REPLAY_FAILED (the browser retries a second later).
REPLAY_SLOT_WAIT_S = 10.0
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


class ReplayTooLong(Exception):
    """More than ``replay_max_events`` events follow the client's Last-Event-ID;
    *newest* is the id it resumes from after reloading."""

    def __init__(self, newest):
        super().__init__(newest)
        self.newest = newest


class ReplaySlots:
    """At most *count* replays from the event log at once: ``with slots():``, or
    TimeoutError after REPLAY_SLOT_WAIT_S."""

    def __init__(self, count):
        self._free = threading.BoundedSemaphore(count)

    @contextlib.contextmanager
    def __call__(self):
        if not self._free.acquire(timeout=REPLAY_SLOT_WAIT_S):
            raise TimeoutError(f"no replay slot free within {REPLAY_SLOT_WAIT_S:g} s (max_replays)")
        try:
            yield
        finally:
            self._free.release()


def reload_frame(newest, most):
    """Sent instead of a replay over *most* events: the client should reload its
    state; its next resume starts at *newest* (the frame's id)."""
    return (f'event: reload\nid: {newest}\ndata: {{"reason": "replay_too_long", "max_events": {most}}}\n\n'
            .encode())


class StreamHooks(typing.Protocol):
    """What a stream asks of its bridge, on the request's thread."""

    def visible(self, client, entry) -> bool:
        """Whether the row filter lets *client* see *entry* (a filter that raises hides it)."""

    def replay_from_log(self, client, after, registered_at) -> tuple:
        """(entries above id *after* from the event log, an iterable read page by page;
        the set of ids the live queue must skip, filled as pages are read); may raise,
        also while iterated; ReplayTooLong over the bridge's replay_max_events."""

    def replay_slot(self) -> typing.ContextManager:
        """One of the bridge's concurrent replays; TimeoutError when none frees in time."""

    def replay_max(self) -> int:
        """The bridge's replay_max_events."""

    def count_sent(self, count, replayed_from=None) -> None:
        """*count* events were written; *replayed_from* is "ring" or "log" for a replay."""

    def forget(self, client_id) -> None:
        """Unregister the client (idempotent)."""

    def stopped(self) -> bool:
        """True once the listener was stopped: the stream ends."""


def stream(client, hooks, heartbeat_s, last_event_id, registered_at, replay, gone=None):
    """The response body: retry, replay, then live events and heartbeats.

    *replay* is the ring's entries after *last_event_id*, or None to read them from
    the event log (*registered_at*: the ring's seq when the client registered).
    *gone()*, if given, says whether the client closed its end (asked about once
    a STATE_CHECK_S: a browser that left is noticed then, not at the next write).
    """
    ended_by = "client"
    try:
        yield RETRY
        skip = None
        if last_event_id is not None and replay is not None:
            if len(replay) > hooks.replay_max():
                yield reload_frame(replay[-1].event.id, hooks.replay_max())
            else:
                hooks.count_sent((yield from _replayed(client, hooks, replay)), "ring")
        elif last_event_id is not None:
            skip = yield from _replayed_from_log(client, hooks, last_event_id, registered_at)
            if skip is None:
                ended_by = "replay failed"
                return
        ended_by = yield from _live(client, hooks, heartbeat_s, skip, gone)
        if ended_by in ENDED_BY_SERVER:
            yield RECONNECT
    finally:
        hooks.forget(client.id)
        log.debug("SSE client %s ended (%s)", client.id, ended_by)


def _replayed_from_log(client, hooks, after, registered_at):
    """The replay from the event log, page by page, in one of the bridge's replay
    slots; returns the ids the live queue must skip, or None after REPLAY_FAILED
    (database down, pool closed, no slot in time: the browser retries)."""
    try:
        with hooks.replay_slot():
            try:
                entries, skip = hooks.replay_from_log(client, after, registered_at)
            except ReplayTooLong as too_long:
                yield reload_frame(too_long.newest, hooks.replay_max())
                return set()
            count = 0
            try:
                count = yield from _replayed(client, hooks, entries)
            finally:
                hooks.count_sent(count, "log")
            return skip
    except Exception as exc:
        log.warning("SSE client %s: cannot replay from the event log (%s); it retries", client.id, first_line(exc))
        yield REPLAY_FAILED
        return None


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


def _live(client, hooks, heartbeat_s, skip, gone):
    """Queued events and heartbeats until the stream must end; returns why it ended.

    *skip*: ids already sent by a replay from the log that may still reach the queue.
    """
    last_write = asked_at = time.monotonic()
    while True:
        wait = min(heartbeat_s - (time.monotonic() - last_write), STATE_CHECK_S)
        items = client.take(max(0.0, wait))
        if client.ended is not None:
            return client.ended
        if hooks.stopped():
            return "listener stopped"
        # The socket once a STATE_CHECK_S, not once a batch: a busy stream would pay
        # a system call per event.
        if gone is not None and time.monotonic() - asked_at >= STATE_CHECK_S:
            asked_at = time.monotonic()
            if gone():
                return "client gone"
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


def socket_gone(sock):
    """A ``gone()`` for :func:`stream` on the client's socket *sock* (the server's:
    gunicorn's ``gunicorn.socket``, werkzeug's ``werkzeug.socket``): True once the
    client closed or reset its end. An SSE client sends nothing after its request,
    so a readable socket that gives no byte is one the client closed. None where
    it cannot tell (a TLS socket: a peek would read a TLS record)."""
    if not isinstance(sock, socket.socket) or isinstance(sock, ssl.SSLSocket):
        return None
    poller = select.poll()
    try:
        poller.register(sock, select.POLLIN)
    except (ValueError, OSError):
        return None     # already closed

    def gone():
        try:
            events = poller.poll(0)
            if not events:
                return False
            if events[0][1] & (select.POLLHUP | select.POLLERR | select.POLLNVAL):
                return True
            return sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
        except (BlockingIOError, InterruptedError):
            return False
        except OSError:
            return True     # reset, or closed under us
    return gone


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
