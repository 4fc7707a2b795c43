"""SSEBridge's constructor arguments, checked like Config's fields; no thread (runs in the caller's).

A wrong value raises :class:`~pgnotify_sync.ConfigError` whose message starts with
the argument's name and says what is wrong with the value (bools are not numbers).
"""

from .config import split_names
from .errors import ConfigError

# Characters a channel name served over SSE cannot hold: a CR or LF would end the
# ``event:`` line of a frame, a comma would split it in ``?channels=a,b``.
_FORBIDDEN_IN_CHANNEL = "\r\n,"


def checked_channels(listener, channels):
    """*channels* (a sequence, or a comma-separated string) as a tuple of distinct
    names the listener listens on; ConfigError otherwise."""
    if isinstance(channels, str):
        channels = [c for c in split_names(channels) if c]
    channels = tuple(dict.fromkeys(channels))
    if not channels:
        raise ConfigError("channels: the bridge needs at least one channel")
    for channel in channels:
        if not isinstance(channel, str) or not channel or any(c in channel for c in _FORBIDDEN_IN_CHANNEL):
            raise ConfigError(f"channels: {channel!r} is not a usable channel name for SSE")
        if channel not in listener.channels:
            raise ConfigError(f"channels: the listener does not listen on {channel!r}; "
                              f"list it in Config.channels")
    return channels


def check_options(authorize, row_filter, client_buffer, heartbeat_s, replay_limit):
    """An exception naming the first of these arguments that is wrong."""
    if not callable(authorize):
        raise TypeError("authorize must be callable (e.g. pgnotify_sync.sse.allow_all)")
    if row_filter is not None and not callable(row_filter):
        raise TypeError("row_filter must be callable or None")
    for name, value, minimum in (("client_buffer", client_buffer, 1), ("replay_limit", replay_limit, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise ConfigError(f"{name}: expected a whole number >= {minimum}, got {value!r}")
    if isinstance(heartbeat_s, bool) or not isinstance(heartbeat_s, (int, float)) or not heartbeat_s > 0:
        raise ConfigError(f"heartbeat_s: expected a number > 0, got {heartbeat_s!r}")
