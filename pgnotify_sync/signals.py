"""Blinker signals of a Listener.

Each listener has its own signals (two listeners in one process never see each
other's events)::

    listener.signals.event.connect(receiver, sender="messages")   # one channel
    listener.signals.event.connect(receiver)                       # every channel
    def receiver(channel, event): ...

    listener.signals.connected.connect(lambda listener, **kw: ...)
    listener.signals.disconnected.connect(lambda listener, error=None, **kw: ...)
    listener.signals.reconnecting.connect(lambda listener, attempt, delay_s, error, **kw: ...)
    listener.signals.error.connect(lambda listener, error, kind, channel=None, **kw: ...)
    listener.signals.failed.connect(lambda listener, error, **kw: ...)

Receivers are called one by one: one that raises is logged and reported through
``error`` (kind ``"handler"``) and does not stop the others nor later events.
Like blinker itself, ``connect()`` holds a weak reference unless ``weak=False``:
a lambda or closure connected with the default vanishes with its last reference.
:meth:`Listener.on_event` connects strongly.
"""

import blinker


class ListenerSignals:
    """The signals of one listener. ``event`` is sent with the channel as sender."""

    __slots__ = ("event", "connected", "disconnected", "reconnecting", "error", "failed")

    def __init__(self):
        #: sender = logical channel name; kwargs: event
        self.event = blinker.Signal("event: a DatabaseEvent for its channel (sender: channel name)")
        #: sender = listener; every channel is LISTENed and the catch-up is done
        self.connected = blinker.Signal("connected: listening on every channel, caught up")
        #: sender = listener; kwargs: error (None on stop)
        self.disconnected = blinker.Signal("disconnected: the listener connection was lost or closed")
        #: sender = listener; kwargs: attempt, delay_s, error
        self.reconnecting = blinker.Signal("reconnecting: next attempt after delay_s")
        #: sender = listener; kwargs: error, kind, channel
        self.error = blinker.Signal("error: a background failure (kind: payload, handler, catchup, ...)")
        #: sender = listener; kwargs: error. Reconnect attempts are used up; state FAILED.
        self.failed = blinker.Signal("failed: gave up reconnecting")
