"""The SSE bridge (sse.py, _sse_stream.py, _sse_ring.py) over real HTTP: werkzeug's threaded
server on a free port, a small SSE reader on http.client, a real PostgreSQL.

Resume after a client disconnect (ring: exact, in delivery order, late commits
included), ring miss (event-log fallback, no duplicate with live events), a
PostgreSQL restart under an open stream, slow-client eviction, authorization,
clean shutdown, heartbeats, and the Flask blueprint.
"""

import http.client
import json
import socket
import threading
import time
from urllib.parse import urlsplit

import psycopg2
import pytest

from helpers import wait_for
from pgutil import counter, logged_ids
from pgnotify_sync.errors import ConfigError
from pgnotify_sync.sse import SSEBridge, allow_all
from pgnotify_sync.testing.web import make_server


# -- a tiny SSE client ---------------------------------------------------------------

class SSEClient:
    """GET an SSE stream; a thread parses it into ``events`` (dicts) and ``comments``.

    A non-200 answer is read whole into ``body``. ``close()`` drops the connection.
    """

    def __init__(self, url, headers=None, timeout=60.0):
        parts = urlsplit(url)
        self.conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout)
        path = parts.path + (f"?{parts.query}" if parts.query else "")
        self.conn.request("GET", path, headers=dict(headers or {}))
        self.sock = self.conn.sock
        self.resp = self.conn.getresponse()
        self.status = self.resp.status
        self.headers = self.resp.headers
        self.events = []
        self.comments = []
        self.retry = None
        self.body = None
        self.error = None
        self.ended = threading.Event()
        self._lock = threading.Lock()
        if self.status != 200:
            self.body = self.resp.read().decode()
            self.ended.set()
            self.thread = None
        else:
            self.thread = threading.Thread(target=self._read, name="sse-test-client", daemon=True)
            self.thread.start()

    def _read(self):
        fields = {}
        try:
            while True:
                raw = self.resp.readline()
                if not raw:
                    return                              # EOF: the server ended the stream
                line = raw.decode().rstrip("\r\n")
                if not line:
                    if "data" in fields or "id" in fields:
                        with self._lock:
                            self.events.append(fields)
                    fields = {}
                elif line.startswith(":"):
                    with self._lock:
                        self.comments.append(line[1:].strip())
                else:
                    name, _, value = line.partition(":")
                    value = value[1:] if value.startswith(" ") else value
                    if name == "retry":
                        self.retry = int(value)
                    elif name == "data" and "data" in fields:
                        fields["data"] += "\n" + value
                    else:
                        fields[name] = value
        except (OSError, http.client.HTTPException, ValueError) as exc:
            self.error = exc
        finally:
            self.ended.set()

    def ids(self):
        with self._lock:
            return [int(e["id"]) for e in self.events if "id" in e]

    def wait_ids(self, count, timeout=15.0):
        wait_for(lambda: len(self.ids()) >= count, timeout=timeout,
                 message=f"expected {count} events, got {self.ids()} (ended={self.ended.is_set()})")
        return self.ids()

    def wait_ended(self, timeout=10.0):
        assert self.ended.wait(timeout), "the stream did not end"

    def close(self):
        try:
            self.sock.shutdown(socket.SHUT_RDWR)      # the reader thread sees EOF
        except OSError:
            pass
        if self.thread is not None:
            self.thread.join(5)
        self.resp.close()
        self.conn.close()
        self.sock.close()


class SSEHarness:
    """Servers, bridges and clients of a test; all closed at teardown."""

    def __init__(self):
        self.bridges = []
        self.servers = []
        self.clients = []

    def serve(self, app):
        server = make_server(app, port=0)
        thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        thread.start()
        self.servers.append((server, thread))
        return f"http://127.0.0.1:{server.server_port}"

    def start(self, listener, channels=("messages",), **options):
        bridge = SSEBridge(listener, list(channels), **options)
        self.bridges.append(bridge)
        return bridge, self.serve(bridge.wsgi_app)

    def client(self, url, headers=None):
        client = SSEClient(url, headers)
        self.clients.append(client)
        return client

    def close(self):
        for client in self.clients:
            client.close()
        for bridge in self.bridges:
            bridge.close()
        for server, thread in self.servers:
            server.shutdown()
            server.server_close()
            thread.join(5)


@pytest.fixture
def sse(make_listener):
    harness = SSEHarness()
    yield harness
    harness.close()


def insert(conn, count, room="r", body="hello"):
    with conn.cursor() as cur:
        for i in range(count):
            cur.execute("INSERT INTO messages (room, body, password_hash, n) VALUES (%s, %s, 'secret', %s)",
                        (room, body, i))


def messages_ids(pg_cluster, dbname):
    return logged_ids(pg_cluster, dbname, channel="messages")


def end_marker(listener, *clients, channel="messages"):
    """Publish a marker on *channel* and wait until every client streamed it.

    Events of a channel are delivered (and streamed) in commit order: once the
    marker is there, everything committed before it has been sent, so a late
    duplicate or a late event shows in the comparison that follows.
    """
    marker = listener.publish(channel, {"end_marker": True})
    for client in clients:
        wait_for(lambda: marker in client.ids(), timeout=30,
                 message=f"the end marker {marker} was not streamed (got {client.ids()}, ended={client.ended.is_set()})")
    return marker


# -- the stream ------------------------------------------------------------------------

def test_stream_format_headers_and_events(installed, make_listener, sse, pg_cluster, dbname):
    listener = make_listener()
    bridge, url = sse.start(listener, authorize=allow_all)
    listener.start()
    client = sse.client(f"{url}/stream?channels=messages")
    assert client.status == 200
    assert client.headers["Content-Type"].startswith("text/event-stream")
    assert client.headers["Cache-Control"] == "no-cache"
    assert client.headers["X-Accel-Buffering"] == "no"
    wait_for(lambda: client.retry == 1000, message="no 'retry: 1000' at the start")
    with installed.cursor() as cur:
        cur.execute("INSERT INTO messages (room, body, password_hash) VALUES ('a', 'hi', 'secret') RETURNING id")
        row = cur.fetchone()[0]
        cur.execute("UPDATE messages SET body = 'edited' WHERE id = %s", (row,))
        cur.execute("DELETE FROM messages WHERE id = %s", (row,))
    client.wait_ids(3)
    marker = end_marker(listener, client)
    ids = client.ids()
    assert ids == messages_ids(pg_cluster, dbname) and ids[-1] == marker
    ids = ids[:3]
    events = [json.loads(e["data"]) for e in client.events[:3]]
    assert [e["event"] for e in client.events] == ["messages"] * 4
    assert [e["operation"] for e in events] == ["INSERT", "UPDATE", "DELETE"]
    assert [e["id"] for e in events] == ids
    assert events[0]["data"] == {"id": row, "room": "a", "body": "hi", "n": None}
    assert events[1]["old"]["body"] == "hi" and events[1]["data"]["body"] == "edited"
    assert all("password_hash" not in (e["data"] or {}) and "password_hash" not in (e["old"] or {})
               for e in events)
    assert bridge.sent == 4 and bridge.clients == 1


def test_resume_after_client_disconnect_no_gap_no_duplicate(installed, make_listener, sse, pg_cluster, dbname):
    listener = make_listener()
    bridge, url = sse.start(listener, authorize=allow_all, heartbeat_s=0.2)
    listener.start()
    first = sse.client(f"{url}/stream?channels=messages")
    insert(installed, 3)
    seen = first.wait_ids(3)
    first.close()
    insert(installed, 4)                              # while no client is connected
    # The server notices the closed connection at its next write (event or heartbeat).
    wait_for(lambda: bridge.clients == 0, message="the closed stream is still registered")
    wait_for(lambda: bridge.stats()["ring"] == 7, message="the listener did not deliver the 4 events")
    second = sse.client(f"{url}/stream?channels=messages", headers={"Last-Event-ID": str(seen[-1])})
    missed = second.wait_ids(4)
    insert(installed, 2)
    second.wait_ids(6)
    marker = end_marker(listener, second)
    logged = messages_ids(pg_cluster, dbname)
    assert logged[-1] == marker
    assert seen + second.ids() == logged, "resumed stream has a gap or a duplicate"
    assert missed == logged[3:7]
    assert bridge.replayed == 4 and bridge.replayed_from_log == 0


def test_resume_replays_late_commit_in_delivery_order(installed, make_listener, sse, pg_cluster, dbname):
    """A transaction that commits late has a lower id than events delivered before
    it: resume follows delivery (commit) order, not id order, so it is not missed."""
    listener = make_listener()
    bridge, url = sse.start(listener, authorize=allow_all)
    listener.start()
    late = pg_cluster.connect(dbname, autocommit=False)
    try:
        with late.cursor() as cur:
            cur.execute("INSERT INTO messages (room, body) VALUES ('late', 'begun first')")
        first = sse.client(f"{url}/stream?channels=messages")
        insert(installed, 1, room="early")
        (early_id,) = first.wait_ids(1)
        first.close()
        late.commit()
    finally:
        late.close()
    logged = messages_ids(pg_cluster, dbname)
    late_id = min(logged)
    assert late_id < early_id
    wait_for(lambda: bridge.stats()["ring"] == 2, message="late commit not delivered")
    second = sse.client(f"{url}/stream?channels=messages", headers={"Last-Event-ID": str(early_id)})
    assert second.wait_ids(1) == [late_id]
    marker = end_marker(listener, second)
    assert second.ids() == [late_id, marker]
    assert bridge.replayed == 1


def test_events_without_log_id_are_streamed_but_not_replayed(installed, make_listener, sse, pg_cluster, dbname):
    """A foreign trigger's plain payload (no id) goes out live without an ``id:``
    line; it takes no place in the ring, so resuming after a later event is exact."""
    listener = make_listener(accept_plain_payloads=True)
    bridge, url = sse.start(listener, authorize=allow_all)
    listener.start()
    first = sse.client(f"{url}/stream?channels=messages")
    plain = json.dumps({"operation": "INSERT", "schema": "public", "table": "messages", "data": {"plain": 1}})
    insert(installed, 1)
    with installed.cursor() as cur:
        cur.execute("SELECT pg_notify('messages', %s)", (plain,))
    insert(installed, 2)
    wait_for(lambda: len(first.events) == 4, message=f"expected 4 events, got {first.events}")
    logged = messages_ids(pg_cluster, dbname)
    assert first.ids() == logged
    assert "id" not in first.events[1] and json.loads(first.events[1]["data"])["data"] == {"plain": 1}
    first.close()
    resumed = sse.client(f"{url}/stream?channels=messages", headers={"Last-Event-ID": str(logged[1])})
    assert resumed.wait_ids(1) == logged[2:]
    insert(installed, 1)
    resumed.wait_ids(2)
    end_marker(listener, resumed)
    assert resumed.ids() == messages_ids(pg_cluster, dbname)[2:]
    assert len(resumed.events) == 3


def test_resume_after_ring_miss_reads_the_event_log(installed, make_listener, sse, pg_cluster, dbname):
    listener = make_listener()
    bridge, url = sse.start(listener, authorize=allow_all, replay_limit=3)
    listener.start()
    watcher = sse.client(f"{url}/stream?channels=messages")
    insert(installed, 8)
    ids = watcher.wait_ids(8)
    # ?last_event_id= (for tests and first loads) works like the header.
    resumed = sse.client(f"{url}/stream?channels=messages&last_event_id={ids[1]}")
    assert resumed.wait_ids(6) == ids[2:]
    assert bridge.replayed_from_log == 6 and bridge.replayed == 0

    # Live events racing the log read are neither lost nor sent twice.
    stop = threading.Event()
    writer_error = []

    def write():
        conn = pg_cluster.connect(dbname)
        try:
            while not stop.is_set():
                insert(conn, 1, room="racing")
        except psycopg2.Error as exc:
            writer_error.append(exc)
        finally:
            conn.close()

    thread = threading.Thread(target=write, daemon=True)
    thread.start()
    try:
        wait_for(lambda: len(watcher.ids()) >= 20, message="the writer made no progress")
        racing = sse.client(f"{url}/stream?channels=messages", headers={"Last-Event-ID": str(ids[0])})
        count = len(watcher.ids())
        wait_for(lambda: len(watcher.ids()) >= count + 20, message="the writer made no progress")
    finally:
        stop.set()
        thread.join(10)
    assert not writer_error
    end_marker(listener, watcher, resumed, racing)
    logged = messages_ids(pg_cluster, dbname)
    assert racing.ids() == logged[1:], "duplicate or gap between the log replay and the live stream"
    assert resumed.ids() == logged[2:], "duplicate or gap between the log replay and the live stream"
    assert watcher.ids() == logged


def test_log_replay_with_channel_prefix_and_no_ring(db, make_listener, sse, pg_cluster, dbname):
    """With a channel prefix the log holds wire names; events come back under the
    logical name. replay_limit=0 keeps no ring: every resume reads the log."""
    from pgnotify_sync import install, watch_table
    install(db)
    with db.cursor() as cur:
        cur.execute("CREATE TABLE messages (id serial PRIMARY KEY, room text, body text, password_hash text, "
                    "n integer)")
    watch_table(db, "public.messages", channel="messages", channel_prefix="app")
    listener = make_listener(channel_prefix="app")
    bridge, url = sse.start(listener, authorize=allow_all, replay_limit=0)
    listener.start()
    live = sse.client(f"{url}/stream?channels=messages")
    insert(db, 3)
    ids = live.wait_ids(3)
    assert ids == logged_ids(pg_cluster, dbname, channel="app.messages")
    resumed = sse.client(f"{url}/stream?channels=messages", headers={"Last-Event-ID": str(ids[0])})
    assert resumed.wait_ids(2) == ids[1:]
    marker = end_marker(listener, live, resumed)
    assert live.ids() == ids + [marker] == logged_ids(pg_cluster, dbname, channel="app.messages")
    assert resumed.ids() == ids[1:] + [marker]
    assert {e["event"] for e in resumed.events} == {"messages"}
    assert {json.loads(e["data"])["channel"] for e in resumed.events} == {"messages"}
    assert bridge.replayed_from_log == 2 and bridge.stats()["ring"] == 0


def test_open_stream_survives_postgres_restart(installed, make_listener, sse, pg_cluster, dbname):
    listener = make_listener()
    bridge, url = sse.start(listener, authorize=allow_all)
    listener.start()
    client = sse.client(f"{url}/stream?channels=messages")
    insert(installed, 2)
    client.wait_ids(2)
    pg_cluster.restart(mode="fast")
    conn = pg_cluster.connect(dbname)
    try:
        insert(conn, 3, room="after restart")    # the listener is still reconnecting
    finally:
        conn.close()
    client.wait_ids(5, timeout=30)
    end_marker(listener, client)
    assert client.ids() == messages_ids(pg_cluster, dbname)
    assert not client.ended.is_set()
    assert listener.stats["reconnects"] == 1


def test_slow_client_is_evicted_others_get_everything(installed, make_listener, sse, pg_cluster, dbname):
    listener = make_listener()
    bridge, url = sse.start(listener, authorize=allow_all, client_buffer=50)
    listener.start()
    fast = sse.client(f"{url}/stream?channels=messages")
    port = urlsplit(url).port
    slow = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    slow.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    slow.connect(("127.0.0.1", port))
    try:
        slow.sendall(b"GET /stream?channels=messages HTTP/1.1\r\nHost: x\r\n\r\n")
        wait_for(lambda: bridge.clients == 2, message="the slow client did not register")
        body = "x" * 6000
        deadline = time.monotonic() + 60
        total = 0
        while bridge.evicted == 0:
            # Batches smaller than client_buffer, each read by the fast client before
            # the next: only the client that does not read falls behind. Large rows
            # fill the socket buffers quickly, so its stream's writes block.
            assert time.monotonic() < deadline, "the slow client was never evicted"
            with installed.cursor() as cur:
                cur.execute("INSERT INTO messages (room, body) SELECT 'bulk', %s FROM generate_series(1, 20)",
                            (body,))
            total += 20
            fast.wait_ids(total, timeout=30)
        logged = messages_ids(pg_cluster, dbname)
        assert fast.wait_ids(len(logged), timeout=30) == logged
        assert bridge.evicted == 1
        assert bridge.clients == 1
        # Once the slow client reads, it finds its stream ended (it would resume).
        slow.settimeout(30)
        received = 0
        while True:
            chunk = slow.recv(1 << 16)
            if not chunk:
                break
            received += len(chunk)
        assert received > 0
    finally:
        slow.close()
    insert(installed, 1)
    fast.wait_ids(total + 1)
    end_marker(listener, fast)
    assert fast.ids() == messages_ids(pg_cluster, dbname)
    assert not fast.ended.is_set()


# -- authorization ------------------------------------------------------------------------

def test_default_bridge_refuses_everyone(installed, make_listener, sse):
    listener = make_listener()
    bridge, url = sse.start(listener)
    listener.start()
    client = sse.client(f"{url}/stream?channels=messages")
    assert client.status == 403
    assert client.body.count("\n") == 1 and client.body.strip()
    assert bridge.clients == 0


def test_authorize_subset_unknown_channel_and_row_filter(installed, make_listener, sse, pg_cluster, dbname):
    listener = make_listener(channels=("messages", "other"))

    def authorize(info):
        return {"messages"} if info.headers.get("x-user") == "alice" else None

    def row_filter(info, event):
        return event.data.get("room") != "secret"

    bridge, url = sse.start(listener, channels=("messages", "other"), authorize=authorize,
                            row_filter=row_filter)
    listener.start()
    alice = {"X-User": "alice"}
    refused = sse.client(f"{url}/stream?channels=messages")
    assert refused.status == 403
    other = sse.client(f"{url}/stream?channels=messages,other", headers=alice)
    assert other.status == 403 and "'other'" in other.body
    unknown = sse.client(f"{url}/stream?channels=nope", headers=alice)
    assert unknown.status == 404 and "'nope'" in unknown.body
    bad = sse.client(f"{url}/stream?channels=messages", headers={**alice, "Last-Event-ID": "abc"})
    assert bad.status == 400

    client = sse.client(f"{url}/stream?channels=messages", headers=alice)
    assert client.status == 200
    insert(installed, 1, room="public")
    insert(installed, 1, room="secret", body="classified")
    insert(installed, 1, room="public")
    logged = messages_ids(pg_cluster, dbname)
    assert client.wait_ids(2) == [logged[0], logged[2]]
    wait_for(lambda: bridge.stats()["ring"] == 3)
    assert all("classified" not in e["data"] for e in client.events)
    # The replay is filtered too.
    resumed = sse.client(f"{url}/stream?channels=messages", headers={**alice, "Last-Event-ID": str(logged[0])})
    insert(installed, 1, room="public")
    assert resumed.wait_ids(2) == [logged[2], logged[2] + 1]
    marker = end_marker(listener, client, resumed)
    assert client.ids() == [logged[0], logged[2], logged[2] + 1, marker]
    assert resumed.ids() == [logged[2], logged[2] + 1, marker]
    assert all("classified" not in e["data"] for e in resumed.events)


def test_bridge_rejects_channels_the_listener_does_not_listen_on(make_listener):
    listener = make_listener(channels=("messages",))
    with pytest.raises(ConfigError, match="other"):
        SSEBridge(listener, ["messages", "other"], authorize=allow_all)


# -- lifecycle --------------------------------------------------------------------------------

def _request_threads():
    return [t for t in threading.enumerate() if "process_request_thread" in t.name]


def test_close_ends_open_streams_and_their_threads(installed, make_listener, sse):
    listener = make_listener()
    bridge, url = sse.start(listener, authorize=allow_all)
    listener.start()
    clients = [sse.client(f"{url}/stream?channels=messages") for _ in range(3)]
    insert(installed, 1)
    for client in clients:
        client.wait_ids(1)
    assert bridge.clients == 3
    bridge.close()
    for client in clients:
        client.wait_ended()
        assert client.error is None, f"stream ended uncleanly: {client.error!r}"
    assert bridge.clients == 0
    wait_for(lambda: not _request_threads(), message="request threads still running")
    after = sse.client(f"{url}/stream?channels=messages")
    assert after.status == 503


def test_listener_stop_ends_streams(installed, make_listener, sse):
    listener = make_listener()
    bridge, url = sse.start(listener, authorize=allow_all)
    listener.start()
    client = sse.client(f"{url}/stream?channels=messages")
    wait_for(lambda: bridge.clients == 1)
    listener.stop()
    client.wait_ended()
    assert client.error is None
    wait_for(lambda: bridge.clients == 0, message="stream of a stopped listener still registered")
    assert sse.client(f"{url}/stream?channels=messages").status == 503


def test_heartbeat_comments_when_idle(installed, make_listener, sse):
    listener = make_listener()
    bridge, url = sse.start(listener, authorize=allow_all, heartbeat_s=0.2)
    listener.start()
    client = sse.client(f"{url}/stream?channels=messages")
    wait_for(lambda: client.comments.count("keep-alive") >= 3, message="no heartbeats")
    assert client.events == []


def test_flask_blueprint(installed, make_listener, sse, pg_cluster, dbname):
    flask = pytest.importorskip("flask")
    listener = make_listener()
    bridge = SSEBridge(listener, ["messages"], authorize=allow_all, heartbeat_s=0.2)
    refusing = SSEBridge(listener, ["messages"])
    sse.bridges += [bridge, refusing]
    app = flask.Flask(__name__)
    app.register_blueprint(bridge.blueprint(url_prefix="/events"))
    app.register_blueprint(refusing.blueprint(url_prefix="/closed", name="closed"))
    url = sse.serve(app)
    listener.start()
    assert sse.client(f"{url}/closed/stream?channels=messages").status == 403
    client = sse.client(f"{url}/events/stream?channels=messages")
    assert client.status == 200 and client.headers["Content-Type"].startswith("text/event-stream")
    insert(installed, 2)
    assert client.wait_ids(2) == messages_ids(pg_cluster, dbname)
    resumed = sse.client(f"{url}/events/stream", headers={"Last-Event-ID": str(client.ids()[0])})
    assert resumed.wait_ids(1) == client.ids()[1:]
    marker = end_marker(listener, client, resumed)
    assert client.ids() == messages_ids(pg_cluster, dbname) and client.ids()[-1] == marker
    assert resumed.ids() == client.ids()[1:]
    client.close()
    resumed.close()
    # A client that went away is unregistered at the next write (heartbeat).
    wait_for(lambda: bridge.clients == 0, message="closed Flask streams still registered")


def test_authorize_and_row_filter_that_raise_are_counted_and_reported(installed, make_listener, sse, pg_cluster,
                                                                     dbname):
    listener = make_listener(channels=("messages",))
    errors = counter(listener.signals.error)

    def authorize(info):
        if info.headers.get("x-user") == "bug":
            raise KeyError("session store down")
        return {"messages"}

    def row_filter(info, event):
        if event.data.get("room") == "boom":
            raise ValueError("filter bug")
        return True

    bridge, url = sse.start(listener, channels=("messages",), authorize=authorize, row_filter=row_filter)
    listener.start()
    refused = sse.client(f"{url}/stream?channels=messages", headers={"X-User": "bug"})
    assert refused.status == 500
    client = sse.client(f"{url}/stream?channels=messages", headers={"X-User": "alice"})
    assert client.status == 200
    insert(installed, 1, room="public")
    insert(installed, 1, room="boom")
    insert(installed, 1, room="public")
    logged = messages_ids(pg_cluster, dbname)
    assert client.wait_ids(2) == [logged[0], logged[2]]
    wait_for(lambda: bridge.stats()["user_code_errors"] == 2, timeout=10)
    reported = [e for e in errors if e["kind"] == "sse"]
    assert sorted(type(e["error"]).__name__ for e in reported) == ["KeyError", "ValueError"]
    assert [e["event_id"] for e in reported if isinstance(e["error"], ValueError)] == [logged[1]]


# -- bounds (issue 13): Last-Event-ID, replay size, clients -----------------------------------

@pytest.mark.parametrize("raw", ["-1", "1_000", "+7", "7a", "%D9%A3", "99999999999999999999", "%207"])
def test_last_event_id_must_be_ascii_digits(installed, make_listener, sse, raw):
    listener = make_listener()
    _bridge, url = sse.start(listener, authorize=allow_all)
    client = sse.client(f"{url}/stream?channels=messages&last_event_id={raw}")
    assert client.status == 400
    assert client.body.startswith("Last-Event-ID must be an event id: ASCII digits, at most 9223372036854775807")


def test_a_resume_over_replay_max_events_is_told_to_reload_and_goes_on_live(installed, make_listener, sse):
    listener = make_listener()
    bridge, url = sse.start(listener, authorize=allow_all, replay_limit=0, replay_max_events=3)
    listener.start()
    watcher = sse.client(f"{url}/stream?channels=messages")
    insert(installed, 5)
    ids = watcher.wait_ids(5)
    near = sse.client(f"{url}/stream?channels=messages", headers={"Last-Event-ID": str(ids[1])})
    assert near.wait_ids(3) == ids[2:]                     # 3 to replay: within the cap
    far = sse.client(f"{url}/stream?channels=messages", headers={"Last-Event-ID": str(ids[0])})
    wait_for(lambda: far.events, message="no reload event")
    assert far.events[0] == {"event": "reload", "id": str(ids[-1]),
                             "data": '{"reason": "replay_too_long", "max_events": 3}'}
    insert(installed, 1)
    assert far.wait_ids(2)[1] == watcher.wait_ids(6)[5]     # then live events
    assert bridge.replayed_from_log == 3


def test_more_clients_than_max_clients_are_refused_with_503(installed, make_listener, sse):
    listener = make_listener()
    bridge, url = sse.start(listener, authorize=allow_all, max_clients=2, heartbeat_s=0.2)  # a gone client: at a write
    first = sse.client(f"{url}/stream?channels=messages")
    sse.client(f"{url}/stream?channels=messages")
    refused = sse.client(f"{url}/stream?channels=messages")
    assert refused.status == 503 and refused.body == "too many event streams (max_clients=2)\n"
    first.close()
    wait_for(lambda: bridge.clients == 1, message="the closed stream was not noticed")
    assert sse.client(f"{url}/stream?channels=messages").status == 200


def test_authorize_is_asked_again_when_a_client_resumes(installed, make_listener, sse):
    allowed = {"alice"}
    listener = make_listener()
    _bridge, url = sse.start(listener, authorize=lambda info: {"messages"} if info.headers.get("X-User") in allowed
                             else None)
    listener.start()
    client = sse.client(f"{url}/stream?channels=messages", headers={"X-User": "alice"})
    insert(installed, 1)
    (first,) = client.wait_ids(1)
    allowed.clear()                                        # alice loses her access
    resumed = sse.client(f"{url}/stream?channels=messages", headers={"X-User": "alice", "Last-Event-ID": str(first)})
    assert resumed.status == 403 and resumed.body == "not authorized\n"
