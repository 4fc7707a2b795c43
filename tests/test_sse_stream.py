"""The SSE bridge's parts without a database or a server: the replay ring
(pgnotify_sync/_sse_ring.py) and one client's stream (pgnotify_sync/_sse_stream.py)
driven by hand through fake StreamHooks.
"""

import contextlib
import json
import threading
import types

import pytest

from pgnotify_sync import DatabaseEvent, Operation
from pgnotify_sync._sse_ring import Entry, ReplayRing, frame
from pgnotify_sync._sse_stream import (HEARTBEAT, LIVE_BATCH_FRAMES, RECONNECT, REPLAY_FAILED, RETRY,
                                       WRITE_BATCH_BYTES, Body, Client, ReplayTooLong, StreamHooks, reload_frame,
                                       socket_gone, stream)


def event(ident, channel="messages", body="hi"):
    return DatabaseEvent(channel, Operation.INSERT, "public", "messages", {"body": body}, None, ident, 7)


def add(ring, ident, channel="messages"):
    ev = event(ident, channel)
    return ring.add(channel, ev, frame(channel, ev))


def ids(entries):
    return [e.event.id for e in entries]


# -- the ring ------------------------------------------------------------------------

def test_frame_format():
    ev = event(42)
    head, data = frame("messages", ev).decode().split("data: ")
    assert head == "id: 42\nevent: messages\n"
    assert data.endswith("\n\n") and "\n" not in data[:-2]
    assert json.loads(data) == ev.to_dict()
    plain = DatabaseEvent("messages", Operation.INSERT, "public", "messages", {"plain": 1})
    assert frame("messages", plain).decode().startswith("event: messages\ndata: ")


def test_ring_resumes_after_an_id_in_delivery_order_on_the_clients_channels():
    ring = ReplayRing(10)
    for ident, channel in [(5, "messages"), (3, "other"), (9, "messages"), (4, "messages")]:
        add(ring, ident, channel)
    assert len(ring) == 4 and ring.seq == 4
    assert ids(ring.after(5, {"messages"})) == [9, 4]            # delivery order, not id order
    assert ids(ring.after(5, {"messages", "other"})) == [3, 9, 4]
    assert ring.after(4, {"messages"}) == []
    assert ring.after(6, {"messages"}) is None                   # not in the ring: read the log


def test_ring_keeps_only_events_with_a_log_id_and_none_with_limit_zero():
    ring = ReplayRing(10)
    plain = DatabaseEvent("messages", Operation.INSERT, "public", "messages", {"plain": 1})
    entry = ring.add("messages", plain, b"x")
    assert isinstance(entry, Entry) and entry.seq == 0 and entry.frame == b"x"
    assert len(ring) == 0 and ring.seq == 0
    empty = ReplayRing(0)
    assert add(empty, 1).seq == 0 and len(empty) == 0
    assert empty.after(1, {"messages"}) is None


def test_ring_forgets_the_oldest_and_a_repeated_id_keeps_its_newest_place():
    ring = ReplayRing(3)
    for ident in (1, 2, 1, 4):      # 1 delivered twice (e.g. a catch-up repeat)
        add(ring, ident)
    # The first 1 fell off the ring; the second one is still there.
    assert len(ring) == 3 and ids(ring.after(1, {"messages"})) == [4]
    assert ring.after(2, {"messages"}) is not None
    add(ring, 5)
    assert ring.after(2, {"messages"}) is None
    assert ids(ring.after(1, {"messages"})) == [4, 5]
    add(ring, 6)
    assert ring.after(1, {"messages"}) is None


def test_ring_delivered_by():
    ring = ReplayRing(10)
    add(ring, 10)
    at = ring.seq
    add(ring, 11)
    assert ring.delivered_by(10, at) and not ring.delivered_by(11, at) and ring.delivered_by(11, ring.seq)
    assert not ring.delivered_by(12, ring.seq)


# -- one client's queue ------------------------------------------------------------------

def test_client_full_queue_ends_it_and_drops_what_it_held():
    client = Client(1, ["messages"], None, capacity=2)
    assert client.offer("a") and client.offer("b")
    assert not client.offer("c")
    assert client.ended == "evicted" and client.take(0) == []
    assert client.offer("d"), "an ended client takes nothing and is not evicted twice"
    client.end("closed")
    assert client.ended == "evicted"


# -- the stream ----------------------------------------------------------------------------

class FakeHooks:
    """StreamHooks that record what the stream asked."""

    def __init__(self, hidden=(), log=None, skip=None, fail=None, most=10_000, slot_free=True):
        self.hidden = set(hidden)
        self.log = log or []
        self.skip = skip
        self.fail = fail
        self.most = most
        self.slot_free = slot_free
        self.slots_taken = 0
        self.sent = []
        self.forgotten = []
        self.is_stopped = False
        self.log_reads = []

    def visible(self, client, entry):
        return entry.event.id not in self.hidden

    def replay_from_log(self, client, after, registered_at):
        self.log_reads.append((after, registered_at))
        if self.fail:
            raise self.fail
        return self.log, set(self.skip or ())

    def count_sent(self, count, replayed_from=None):
        self.sent.append((count, replayed_from))

    @contextlib.contextmanager
    def replay_slot(self):
        if not self.slot_free:
            raise TimeoutError("no replay slot free within 10 s (max_replays)")
        self.slots_taken += 1
        yield

    def replay_max(self):
        return self.most

    def forget(self, client_id):
        self.forgotten.append(client_id)

    def stopped(self):
        return self.is_stopped


def entries(*idents):
    ring = ReplayRing(0)
    return [add(ring, ident) for ident in idents]


def frames_of(chunk):
    return [int(part.split("\n", 1)[0]) for part in chunk.decode().split("id: ")[1:]]


@pytest.fixture
def guarded():
    """Client(...) that ends itself after 10 s: a stream that would wait forever for
    an expected write fails instead of hanging the test."""
    timers = []

    def make(ident, channels, capacity):
        client = Client(ident, channels, None, capacity)
        timer = threading.Timer(10, client.end, ("test deadline",))
        timer.daemon = True
        timer.start()
        timers.append(timer)
        return client

    yield make
    for timer in timers:
        timer.cancel()


def test_fake_hooks_implement_the_protocol():
    declared = {name for name in vars(StreamHooks) if not name.startswith("_")}
    assert declared == {"visible", "replay_from_log", "count_sent", "forget", "stopped", "replay_slot", "replay_max"}
    assert all(callable(getattr(FakeHooks(), name)) for name in declared)


def test_live_events_filtered_counted_and_the_end_unregisters(guarded):
    client, hooks = guarded(7, ["messages"], 100), FakeHooks(hidden={2})
    body = stream(client, hooks, 60.0, None, 0, None)
    assert next(body) == RETRY
    for entry in entries(1, 2, 3):
        client.offer(entry)
    assert frames_of(next(body)) == [1, 3]
    assert hooks.sent == [], "counted once written: when the server asks for more"
    client.end("closed")
    assert list(body) == [RECONNECT]
    assert hooks.sent == [(2, None)]
    assert hooks.forgotten == [7]


def test_replay_from_the_ring_comes_first_and_is_counted_as_such(guarded):
    client, hooks = guarded(1, ["messages"], 100), FakeHooks(hidden={3})
    body = stream(client, hooks, 60.0, 1, 5, entries(2, 3, 4))
    assert next(body) == RETRY
    assert frames_of(next(body)) == [2, 4]
    client.end("closed")
    assert list(body) == [RECONNECT] and hooks.forgotten == [1]
    assert hooks.sent == [(2, "ring")] and hooks.log_reads == []


def test_replay_from_the_log_and_its_ids_skipped_once_in_the_live_queue(guarded):
    client = guarded(1, ["messages"], 100)
    hooks = FakeHooks(log=entries(2, 3), skip={3})
    body = stream(client, hooks, 60.0, 1, 5, None)
    assert next(body) == RETRY
    assert frames_of(next(body)) == [2, 3]
    assert hooks.log_reads == [(1, 5)]
    for entry in entries(3, 4, 3):
        client.offer(entry)
    assert frames_of(next(body)) == [4, 3], "a skipped id is skipped once"
    assert hooks.sent == [(2, "log")]
    client.end("closed")
    assert list(body) == [RECONNECT]
    assert hooks.sent == [(2, "log"), (2, None)]


def test_replay_failure_ends_the_stream_with_a_comment(guarded):
    client = guarded(1, ["messages"], 100)
    hooks = FakeHooks(fail=OSError("database down"))
    assert list(stream(client, hooks, 60.0, 1, 0, None)) == [RETRY, REPLAY_FAILED]
    assert hooks.sent == [] and hooks.forgotten == [1]


def test_heartbeat_when_idle_and_the_end_once_the_listener_stops(guarded):
    client, hooks = guarded(1, ["messages"], 100), FakeHooks()
    body = stream(client, hooks, 0.01, None, 0, None)
    assert next(body) == RETRY
    assert next(body) == HEARTBEAT
    hooks.is_stopped = True
    assert list(body) == [RECONNECT] and hooks.forgotten == [1]


def test_writes_are_batched(guarded):
    big = "x" * (WRITE_BATCH_BYTES // 4)
    ring = ReplayRing(0)
    replay = [ring.add("messages", event(i, body=big), frame("messages", event(i, body=big))) for i in range(10)]
    client, hooks = guarded(1, ["messages"], 10_000), FakeHooks()
    body = stream(client, hooks, 60.0, 0, 0, replay)
    next(body)
    chunks = [next(body) for _ in range(3)]
    assert [frames_of(c) for c in chunks] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    for entry in entries(*range(100, 100 + LIVE_BATCH_FRAMES + 1)):
        client.offer(entry)
    assert len(frames_of(next(body))) == LIVE_BATCH_FRAMES
    assert len(frames_of(next(body))) == 1
    client.end("closed")
    assert list(body) == [RECONNECT]
    assert hooks.sent == [(10, "ring"), (LIVE_BATCH_FRAMES + 1, None)]
    assert hooks.forgotten == [1]


def test_body_close_unregisters_a_stream_never_iterated():
    forgotten = []
    gen = (chunk for chunk in [b"never"])
    body = Body(gen, forgotten.append, 9)
    assert iter(body) is gen
    body.close()
    assert forgotten == [9] and list(gen) == []


def test_bridge_hooks_match_the_protocol():
    """SSEBridge hands every stream the hooks StreamHooks declares."""
    from pgnotify_sync import Config, Listener
    from pgnotify_sync.sse import SSEBridge, allow_all

    listener = Listener(Config(postgres_user="u", postgres_db="d", channels=("messages",)), registry=False)
    bridge = SSEBridge(listener, ["messages"], authorize=allow_all)
    try:
        hooks = bridge._hooks
        assert isinstance(hooks, types.SimpleNamespace)
        declared = {name for name in vars(StreamHooks) if not name.startswith("_")}
        assert set(vars(hooks)) == declared
        assert hooks.stopped() is False
    finally:
        bridge.close()
        listener.stop()
    assert hooks.stopped() is True


def test_a_closed_bridge_is_not_kept_alive_by_the_listener():
    import gc
    import weakref
    from pgnotify_sync import Config, Listener
    from pgnotify_sync.sse import SSEBridge, allow_all
    listener = Listener(Config(postgres_user="u", postgres_db="d", channels=("a", "b")), registry=False)
    bridge = SSEBridge(listener, ("a", "b"), authorize=allow_all)
    assert len(listener.signals.event.receivers) == 1
    bridge.close()
    assert not listener.signals.event.receivers      # blinker keeps per-sender disconnects here
    gone = weakref.ref(bridge)
    del bridge
    gc.collect()
    assert gone() is None, "the listener still holds a closed bridge (and its replay ring)"


def test_a_ring_replay_over_the_cap_is_a_reload_frame_then_live_events(guarded):
    client, hooks = guarded(1, ["messages"], 100), FakeHooks(most=2)
    body = stream(client, hooks, 60.0, 1, 0, entries(2, 3, 4))
    assert next(body) == RETRY
    assert next(body) == reload_frame(4, 2) == (b'event: reload\nid: 4\ndata: {"reason": "replay_too_long", '
                                                b'"max_events": 2}\n\n')
    client.offer(entries(5)[0])
    assert frames_of(next(body)) == [5]
    client.end("closed")
    assert list(body) == [RECONNECT] and hooks.sent == [(1, None)]


def test_a_log_replay_over_the_cap_is_a_reload_frame_at_the_newest_id(guarded):
    client = guarded(1, ["messages"], 100)
    hooks = FakeHooks(fail=ReplayTooLong(99), most=5)
    body = stream(client, hooks, 60.0, 1, 0, None)
    assert next(body) == RETRY and next(body) == reload_frame(99, 5)
    client.offer(entries(100)[0])
    assert frames_of(next(body)) == [100]
    client.end("closed")
    assert list(body) == [RECONNECT] and hooks.slots_taken == 1


def test_a_log_replay_failing_midway_ends_with_replay_failed(guarded):
    """A page read fails after the first (a lost connection): the stream ends with
    the comment; the browser resumes from the last id it got, so what was read but
    not yet written is replayed again, not lost."""
    def pages():
        yield from entries(2, 3)
        raise OSError("connection lost")
    client = guarded(1, ["messages"], 100)
    hooks = FakeHooks(log=pages())
    assert list(stream(client, hooks, 60.0, 1, 0, None)) == [RETRY, REPLAY_FAILED]
    assert hooks.sent == [(0, "log")] and hooks.forgotten == [1]


def test_no_free_replay_slot_ends_the_stream_with_replay_failed(guarded):
    client = guarded(1, ["messages"], 100)
    hooks = FakeHooks(log=entries(2), slot_free=False)
    assert list(stream(client, hooks, 60.0, 1, 0, None)) == [RETRY, REPLAY_FAILED]
    assert hooks.log_reads == []


# -- the end of a stream: told to reconnect, or the client noticed gone ----------------------

def test_only_a_stream_the_server_ends_asks_the_browser_back_soon(guarded):
    client, hooks = guarded(1, ["messages"], 1), FakeHooks()
    body = stream(client, hooks, 60.0, None, 0, None)
    assert next(body) == RETRY
    client.offer(entries(1)[0])
    client.offer(entries(2)[0])          # over its buffer: evicted, not told anything more
    assert list(body) == [] and hooks.forgotten == [1]
    assert RECONNECT.endswith(b"retry: 250\n\n") and RECONNECT.startswith(b":")


def test_a_client_that_closed_its_socket_is_noticed_without_a_write(guarded):
    import socket
    import time
    with socket.create_server(("127.0.0.1", 0)) as listening:       # TCP, as a browser's
        client_end = socket.create_connection(listening.getsockname())
        server_end, _ = listening.accept()
    try:
        gone = socket_gone(server_end)
        assert gone() is False
        client_end.sendall(b"x")                # data (say a pipelined request) is no end
        assert gone() is False
        assert server_end.recv(1) == b"x"
        client, hooks = guarded(1, ["messages"], 100), FakeHooks()
        body = stream(client, hooks, 60.0, None, 0, None, gone)
        assert next(body) == RETRY
        client_end.close()
        started = time.monotonic()
        assert list(body) == [] and hooks.forgotten == [1]
        assert time.monotonic() - started < 2.5       # STATE_CHECK_S, not the heartbeat's 60 s
        assert gone() is True
    finally:
        server_end.close()
    assert socket_gone(server_end) is None          # closed: nothing to ask
    assert socket_gone(object()) is None


def _open_bridge_stream():
    from pgnotify_sync import Config, Listener
    from pgnotify_sync.sse import RequestInfo, SSEBridge, allow_all
    listener = Listener(Config(postgres_user="u", postgres_db="d", channels=("messages",)), registry=False)
    bridge = SSEBridge(listener, ["messages"], authorize=allow_all)
    status, _, body = bridge._serve(RequestInfo({}, {}, "127.0.0.1", ["messages"], {}), None)
    assert status == "200 OK"
    it = iter(body)
    assert next(it) == RETRY
    return listener, bridge, it


def test_close_with_a_grace_streams_on_then_ends_with_a_reconnect():
    import time
    listener, bridge, body = _open_bridge_stream()
    try:
        ended = []
        closer = threading.Thread(target=lambda: (bridge.close(grace_s=0.5), ended.append(time.monotonic())))
        started = time.monotonic()
        closer.start()
        bridge._on_event("messages", event(5))          # during the grace: still streamed
        assert frames_of(next(body)) == [5]
        assert list(body) == [RECONNECT]
        closer.join(5)
        assert 0.5 <= ended[0] - started < 2.0
        assert bridge.clients == 0
    finally:
        listener.stop()


def test_close_on_signal_closes_from_a_thread_and_passes_the_signal_on():
    import signal
    listener, bridge, body = _open_bridge_stream()
    before = signal.getsignal(signal.SIGUSR1)
    passed_on, stopped = [], []
    try:
        signal.signal(signal.SIGUSR1, lambda sig, frame: passed_on.append(sig))
        thread = bridge.close_on_signal(signal.SIGUSR1, grace_s=0.0, then=lambda: stopped.append(True))
        assert thread.name == "pgnotify-sse-close" and thread.is_alive()
        signal.raise_signal(signal.SIGUSR1)
        assert passed_on == [signal.SIGUSR1]            # the server's own handler ran, in the handler
        assert list(body) == [RECONNECT]                # the close ran on the thread
        thread.join(5)
        assert stopped == [True] and not thread.is_alive()
    finally:
        signal.signal(signal.SIGUSR1, before)
        listener.stop()


def test_close_on_signal_with_the_default_action_ends_the_process_after_the_work(tmp_path):
    # A plain script (no server handler): SIGTERM still ends it, once the streams are closed.
    import signal
    import subprocess
    import sys
    script = tmp_path / "serve.py"
    script.write_text(
        "import os, signal, sys, time\n"
        "from pgnotify_sync import Config, Listener\n"
        "from pgnotify_sync.sse import SSEBridge, allow_all\n"
        "listener = Listener(Config(postgres_user='u', postgres_db='d', channels=('m',)), registry=False)\n"
        "bridge = SSEBridge(listener, ['m'], authorize=allow_all)\n"
        "bridge.close_on_signal(signal.SIGTERM, grace_s=0.0, then=lambda: print('closed', flush=True))\n"
        "print('ready', flush=True)\n"
        "time.sleep(30)\n"
        "print('not ended', flush=True)\n")
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline() == "ready\n"
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=10)
    assert out == "closed\n" and proc.returncode == 128 + signal.SIGTERM


def test_a_busy_stream_asks_about_its_socket_once_a_second_not_once_a_batch(guarded):
    asked = []
    client, hooks = guarded(1, ["messages"], 10_000), FakeHooks()
    body = stream(client, hooks, 60.0, None, 0, None, lambda: asked.append(1) or False)
    assert next(body) == RETRY
    for i in range(200):                      # 200 batches, well within a second
        client.offer(entries(i)[0])
        assert frames_of(next(body)) == [i]
    assert len(asked) <= 1
    client.end("closed")
    assert list(body) == [RECONNECT]
