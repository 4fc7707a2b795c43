"""A listener's lifecycle signals and background failures: log line, counter,
``error`` signal (runs on whichever thread reports; owns none).

Receivers are user code: whatever one raises (SystemExit included) is logged,
counted (``receiver_errors``) and reported through ``error`` (kind ``receiver``),
and the next receiver still runs. Never called with one of our locks held, so a
receiver may call ``stop()``.
"""

import logging
import time

from .errors import ErrorKind, describe, must_propagate

log = logging.getLogger("pgnotify_sync")

# Kinds logged at ERROR: the listener cannot go on as asked (the rest are WARNING:
# user code, bad input, or trouble the listener works around).
ERROR_LEVEL_KINDS = frozenset({ErrorKind.CONNECT, ErrorKind.GAP, ErrorKind.MISSING, ErrorKind.PUBLISH,
                               ErrorKind.INTERNAL})


class Reporter:
    """Sends *signals* with *sender* (the listener) and counts into *stats*."""

    def __init__(self, name, sender, signals, stats):
        self._name = name
        self._sender = sender
        self._signals = signals
        self._stats = stats

    def emit(self, signal_name, **kwargs):
        """Send the lifecycle signal *signal_name* to its receivers one by one."""
        sender = self._sender
        for receiver in getattr(self._signals, signal_name).receivers_for(sender):
            try:
                receiver(sender, **kwargs)
            except BaseException as exc:
                if must_propagate(exc):
                    raise
                self._stats.inc("receiver_errors")
                if signal_name == "error":
                    # Not reported through the signal that failed (no loop).
                    log.error("%s: a receiver of the error signal raised %s", self._name, describe(exc),
                              exc_info=True, extra={"event": "error", "details": {"kind": "receiver"}})
                else:
                    self.report("receiver", exc, None, exc_info=True, what=f"a receiver of {signal_name!r}")

    def report(self, kind, error, channel, event_id=None, exc_info=False, what=None, level=None):
        """A background failure of *kind* (an :class:`ErrorKind`; an unknown kind is a
        bug: ValueError) on *channel* (None: the listener as a whole), logged at
        *level* (None: by kind; a flood whose cause was logged once goes at DEBUG)."""
        kind = ErrorKind(kind)
        if level is None:
            level = logging.ERROR if kind in ERROR_LEVEL_KINDS else logging.WARNING
        text = error if isinstance(error, str) else describe(error)
        if what:
            text = f"{what}: {text}"
        where = f" on channel {channel!r}" if channel is not None else ""
        self._stats.inc(f"errors_{kind}")
        self._stats.set("last_error", {"kind": kind, "channel": channel, "error": text, "at": time.time()})
        log.log(level, "%s: %s error%s%s: %s", self._name, kind, where,
                f" (event {event_id})" if event_id is not None else "", text, exc_info=exc_info,
                extra={"event": "error", "channel": channel, "event_id": event_id,
                       "details": {"kind": kind, "error": text}})
        self.emit("error", error=error, kind=kind, channel=channel, event_id=event_id)
