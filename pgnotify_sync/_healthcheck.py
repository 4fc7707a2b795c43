"""The reader's health check: a round trip on the listener connection itself.

The reader takes a snapshot and NOTIFYs a marker to itself in one statement. The
snapshot is taken before that NOTIFY commits and notifications arrive in commit
order, so when the marker comes back every transaction visible in the snapshot
has been received: positions may advance to it. No answer within the timeout
means the path is dead (a frozen proxy or SSH session shows no error at all).
State only: the reader (its one user, on its own thread) drives it.

Any role that can connect may NOTIFY any channel, and a marker moves positions: so
the marker channel is random per session, the token random per round trip, and
only a notification sent by our own backend (its pid) counts. Anything else on
that channel is ignored.
"""

import secrets
import time

from ._snapshot import Snapshot
from .errors import translated


def channel_name():
    """A marker channel nobody can guess (an identifier: 17 + 32 characters)."""
    return f"pgnotify_sync.hc.{secrets.token_hex(16)}"


class Lost(Exception):
    """The listener connection is gone (or did not answer a health check in time)."""


class HealthCheck:
    """One session's round trips on marker channel *channel* (see :func:`channel_name`),
    the first due at *first_at* (monotonic); *pid*: our backend's, the only sender
    of a marker (None: not checked)."""

    __slots__ = ("channel", "token", "next_at", "sent_at", "deadline", "cursor", "snapshot", "marker_seen",
                 "pending", "pid", "backend")

    def __init__(self, channel, first_at, pid=None):
        self.channel = channel
        self.pid = pid
        self.token = None
        self.next_at = first_at
        self.sent_at = 0.0
        self.deadline = 0.0
        self.cursor = None
        self.snapshot = None
        self.marker_seen = False
        self.pending = False
        self.backend = None     # (pid, backend_start) of the session

    def send(self, conn, timeout_s):
        """Start a round trip on async connection *conn*; Lost if it cannot be sent."""
        self.token = secrets.token_hex(16)
        self.sent_at = time.monotonic()
        self.deadline = self.sent_at + timeout_s
        self.pending = True
        self.marker_seen = False
        self.snapshot = None
        with translated(Lost, "health check failed"):
            self.cursor = conn.cursor()     # raises too on a closed connection
            self.cursor.execute("SELECT pg_current_snapshot()::text, pg_notify(%s, %s)", (self.channel, self.token))

    def take_snapshot(self):
        """The statement's answer is in: keep its snapshot; Lost if it failed."""
        with translated(Lost, "health check failed"):
            self.snapshot = Snapshot.parse(self.cursor.fetchone()[0])
        self.cursor.close()
        self.cursor = None

    def is_marker(self, notify):
        return (notify.channel == self.channel and notify.payload == self.token and self.pending
                and (self.pid is None or notify.pid == self.pid))

    def finish(self, interval_s):
        """The round trip time if both the answer and the marker are in (the next
        check is then due after *interval_s*), else None."""
        if not (self.pending and self.marker_seen and self.snapshot is not None and self.cursor is None):
            return None
        now = time.monotonic()
        self.pending = False
        self.next_at = now + interval_s
        return now - self.sent_at
