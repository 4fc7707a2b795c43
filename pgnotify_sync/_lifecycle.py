"""Where the listener connection stands: the states, the moves between them as
data, and one place that makes them (under a lock). No I/O, no thread.

    STOPPED --start--> CONNECTING --session--> LISTENING --lost--> RECONNECTING
                          |  ^                     ^                  |
                          |  +---start again--+    +----session-------+
                          v                   |
                        FAILED <--gave up / cannot be fixed--(any live state)

``stop()`` moves every state to STOPPED, which is final: a thread that ends late
and tries to move a stopped listener is refused quietly (the move returns False).
Any other move not in the table is a bug and raises :class:`ListenerStateError`.
"""

import enum
import logging
import threading

from .errors import ListenerStateError

log = logging.getLogger("pgnotify_sync")


class ConnectionState(str, enum.Enum):
    """Where the listener connection stands (``listener.state``)."""

    STOPPED = "STOPPED"
    CONNECTING = "CONNECTING"
    LISTENING = "LISTENING"
    RECONNECTING = "RECONNECTING"
    FAILED = "FAILED"

    def __str__(self):
        return self.value


_S = ConnectionState
# state -> the states it may move to (staying put is always allowed).
MOVES = {
    _S.STOPPED: frozenset({_S.CONNECTING}),
    _S.CONNECTING: frozenset({_S.LISTENING, _S.RECONNECTING, _S.FAILED, _S.STOPPED}),
    # LISTENING -> CONNECTING: a first session that failed after LISTEN (it is retried as one).
    _S.LISTENING: frozenset({_S.RECONNECTING, _S.CONNECTING, _S.FAILED, _S.STOPPED}),
    _S.RECONNECTING: frozenset({_S.LISTENING, _S.CONNECTING, _S.FAILED, _S.STOPPED}),
    _S.FAILED: frozenset({_S.CONNECTING, _S.STOPPED}),
}


class Lifecycle:
    """The current :class:`ConnectionState` of listener *name*, moved only by
    :meth:`move` (from the caller's thread and the reader)."""

    def __init__(self, name):
        self._name = name
        self._lock = threading.Lock()
        self._state = _S.STOPPED
        self._stopped = False       # stop() was called: STOPPED is final from now on

    @property
    def state(self):
        return self._state

    def move(self, to):
        """Move to *to*; True if the state is now *to*. Refused quietly (False) once
        the listener was stopped; ListenerStateError for a move not in MOVES."""
        with self._lock:
            now = self._state
            if now is to:
                return True
            if self._stopped:
                return False
            if to not in MOVES[now]:
                raise ListenerStateError(f"{self._name}: no move from {now.value} to {to.value}")
            self._state = to
            if to is _S.STOPPED:
                self._stopped = True
        log.debug("%s: state %s -> %s", self._name, now.value, to.value)
        return True
