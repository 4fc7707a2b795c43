"""SSEBridge's constructor arguments, checked like Config's fields; no thread (runs in the caller's).

Every wrong value raises :class:`~pgnotify_sync.ConfigError` whose message starts
with the argument's name and says what is wrong with the value (bools are not
numbers). ``authorize`` and ``row_filter`` that are not callable raise a
ConfigError that is also a ``TypeError``, which they raised before.
"""

import math

from .config import split_names
from .errors import ConfigError

# Characters a channel name served over SSE cannot hold: a CR or LF would end the
# ``event:`` line of a frame, a comma would split it in ``?channels=a,b``.
_FORBIDDEN_IN_CHANNEL = "\r\n,"


class NotCallable(ConfigError, TypeError):
    """A ConfigError that is also the TypeError these arguments raised before."""


def checked_channels(listener, channels):
    """*channels* (a sequence, or a comma-separated string) as a tuple of distinct
    names the listener listens on; ConfigError otherwise."""
    if isinstance(channels, str):
        channels = [c for c in split_names(channels) if c]
    try:
        channels = list(channels)
    except TypeError:
        raise ConfigError(f"channels: expected a sequence of channel names, got {type(channels).__name__}") from None
    for channel in channels:
        if not isinstance(channel, str) or not channel or any(c in channel for c in _FORBIDDEN_IN_CHANNEL):
            raise ConfigError(f"channels: {channel!r} is not a usable channel name for SSE")
    channels = tuple(dict.fromkeys(channels))
    if not channels:
        raise ConfigError("channels: the bridge needs at least one channel")
    for channel in channels:
        if channel not in listener.channels:
            raise ConfigError(f"channels: the listener does not listen on {channel!r}; "
                              f"list it in Config.channels")
    return channels


# The largest id a log row can have (bigint).
_MAX_ID = 2 ** 63 - 1


def parse_last_event_id(raw):
    """The event id of a ``Last-Event-ID`` header (or ``last_event_id`` argument),
    None when absent or empty; ValueError with the reason otherwise. ASCII digits
    only: ``int()`` would take ``-1``, ``1_000``, `` 7 `` and non-ASCII digits."""
    if raw is None or raw == "":
        return None
    text = str(raw)
    if not (text.isascii() and text.isdigit()) or len(text) > 19 or int(text) > _MAX_ID:
        raise ValueError(f"Last-Event-ID must be an event id: ASCII digits, at most {_MAX_ID}; got {text[:40]!r}")
    return int(text)


def check_options(authorize, row_filter, client_buffer, heartbeat_s, replay_limit, replay_max_events=1,
                  max_clients=1, max_replays=1):
    """ConfigError naming the first of these arguments that is wrong, and why."""
    if not callable(authorize):
        raise NotCallable(f"authorize: expected a callable (e.g. pgnotify_sync.sse.allow_all), got {authorize!r}")
    if row_filter is not None and not callable(row_filter):
        raise NotCallable(f"row_filter: expected a callable or None, got {row_filter!r}")
    for name, value, minimum in (("client_buffer", client_buffer, 1), ("replay_limit", replay_limit, 0),
                                 ("replay_max_events", replay_max_events, 1), ("max_clients", max_clients, 1),
                                 ("max_replays", max_replays, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise ConfigError(f"{name}: expected a whole number >= {minimum}, got {value!r}")
    if isinstance(heartbeat_s, bool) or not isinstance(heartbeat_s, (int, float)):
        raise ConfigError(f"heartbeat_s: expected a number > 0, got {heartbeat_s!r}")
    if not math.isfinite(heartbeat_s):
        raise ConfigError(f"heartbeat_s: must be a finite number, got {heartbeat_s!r}")
    if not heartbeat_s > 0:
        raise ConfigError(f"heartbeat_s: expected a number > 0, got {heartbeat_s!r}")
