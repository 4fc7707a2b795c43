"""SSEBridge's constructor arguments (pgnotify_sync/_sse_args.py), checked like
Config's fields: a ConfigError whose message starts with the argument's name and
says what is wrong with the value. No database: the listener is never started.
"""

import math

import pytest

from pgnotify_sync import Config, ConfigError, Listener
from pgnotify_sync._sse_args import parse_last_event_id
from pgnotify_sync.sse import SSEBridge, allow_all


@pytest.fixture
def listener():
    listener = Listener(Config(postgres_user="u", postgres_db="d", channels=("messages", "other")), registry=False)
    yield listener
    listener.stop()


def refused(listener, match, channels=("messages",), **options):
    """The ConfigError of a bridge built with *options*; nothing left subscribed."""
    with pytest.raises(ConfigError, match=match) as info:
        SSEBridge(listener, channels, **{"authorize": allow_all, **options})
    assert not listener.signals.event.receivers, "a refused bridge stayed subscribed to the listener"
    return info.value


def test_valid_arguments_are_kept(listener):
    bridge = SSEBridge(listener, "messages, other,messages", authorize=allow_all, row_filter=lambda i, e: True,
                       client_buffer=1, heartbeat_s=2, replay_limit=0)
    try:
        assert bridge.channels == ("messages", "other")
        assert bridge.client_buffer == 1 and bridge.replay_limit == 0
        assert bridge.heartbeat_s == 2.0 and isinstance(bridge.heartbeat_s, float)
    finally:
        bridge.close()
    assert not [r for c in ("messages", "other") for r in listener.signals.event.receivers_for(c)]


def test_defaults(listener):
    bridge = SSEBridge(listener, ["messages"])
    try:
        assert (bridge.client_buffer, bridge.heartbeat_s, bridge.replay_limit) == (1000, 15.0, 10000)
        assert bridge.row_filter is None
    finally:
        bridge.close()


@pytest.mark.parametrize("value", [0, -1, 1.5, 10.0, "10", None, True, False])
def test_client_buffer_must_be_a_whole_number_above_zero(listener, value):
    refused(listener, rf"^client_buffer: expected a whole number >= 1, got {value!r}$", client_buffer=value)


@pytest.mark.parametrize("value", [-1, 2.0, "5", None, True, False])
def test_replay_limit_must_be_a_whole_number_from_zero(listener, value):
    refused(listener, rf"^replay_limit: expected a whole number >= 0, got {value!r}$", replay_limit=value)


@pytest.mark.parametrize("name", ["replay_max_events", "max_clients", "max_replays"])
@pytest.mark.parametrize("value", [0, -1, 2.0, "5", None, True])
def test_the_bounds_must_be_whole_numbers_above_zero(listener, name, value):
    refused(listener, rf"^{name}: expected a whole number >= 1, got {value!r}$", **{name: value})


def test_the_bounds_have_defaults(listener):
    bridge = SSEBridge(listener, ["messages"])
    try:
        assert (bridge.replay_max_events, bridge.max_clients) == (10000, 1000)
    finally:
        bridge.close()


@pytest.mark.parametrize("raw,expected", [(None, None), ("", None), ("0", 0), ("42", 42),
                                          ("9223372036854775807", 2 ** 63 - 1)])
def test_last_event_id_of_ascii_digits(raw, expected):
    assert parse_last_event_id(raw) == expected


@pytest.mark.parametrize("raw", ["-1", "1_000", " 7", "7 ", "+7", "\u0663", "\uff17", "1e3", "0x10",
                                 "9223372036854775808", "1" * 30])
def test_last_event_id_of_anything_else_is_refused_with_the_reason(raw):
    with pytest.raises(ValueError, match="^Last-Event-ID must be an event id: ASCII digits, at most "
                                         "9223372036854775807; got "):
        parse_last_event_id(raw)


@pytest.mark.parametrize("value", [0, 0.0, -1, -0.5, "15", None, True, False])
def test_heartbeat_s_must_be_a_number_above_zero(listener, value):
    refused(listener, rf"^heartbeat_s: expected a number > 0, got {value!r}$", heartbeat_s=value)


@pytest.mark.parametrize("value", [math.inf, math.nan, -math.inf])
def test_heartbeat_s_must_be_finite(listener, value):
    refused(listener, rf"^heartbeat_s: must be a finite number, got {value!r}$", heartbeat_s=value)


@pytest.mark.parametrize("value", [None, "allow_all", 42, {"messages"}])
def test_authorize_must_be_callable(listener, value):
    error = refused(listener, r"^authorize: expected a callable \(e\.g\. pgnotify_sync\.sse\.allow_all\), got ",
                    authorize=value)
    assert str(error).endswith(repr(value))
    assert isinstance(error, TypeError), "it raised TypeError before: callers catching that still do"


@pytest.mark.parametrize("value", ["room != 'staff'", 1, True])
def test_row_filter_must_be_callable_or_none(listener, value):
    error = refused(listener, rf"^row_filter: expected a callable or None, got {value!r}$", row_filter=value)
    assert isinstance(error, TypeError)


@pytest.mark.parametrize("channels, match", [
    ([], r"^channels: the bridge needs at least one channel$"),
    ("", r"^channels: the bridge needs at least one channel$"),
    (" , ", r"^channels: the bridge needs at least one channel$"),
    (None, r"^channels: expected a sequence of channel names, got NoneType$"),
    (5, r"^channels: expected a sequence of channel names, got int$"),
    ([1], r"^channels: 1 is not a usable channel name for SSE$"),
    ([["messages"]], r"^channels: \['messages'\] is not a usable channel name for SSE$"),
    ([""], r"^channels: '' is not a usable channel name for SSE$"),
    (["mess\nages"], r"^channels: 'mess\\nages' is not a usable channel name for SSE$"),
    (["mess\rages"], r"^channels: 'mess\\rages' is not a usable channel name for SSE$"),
    (["messages,other"], r"^channels: 'messages,other' is not a usable channel name for SSE$"),
    (["messages", "nope"], r"^channels: the listener does not listen on 'nope'; list it in Config.channels$"),
])
def test_channels(listener, channels, match):
    refused(listener, match, channels=channels)
