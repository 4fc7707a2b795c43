"""Helpers for integration tests: configs, listeners that always stop, collectors."""

import collections
import json
import threading
import uuid

import psycopg2

from pgnotify_sync import Config, Listener
from pgnotify_sync._snapshot import Snapshot

from helpers import wait_for


def config_for(dsn, **overrides):
    values = dict(postgres_host=dsn["host"], postgres_port=dsn["port"], postgres_user=dsn["user"],
                  postgres_password=dsn["password"], postgres_db=dsn["dbname"],
                  health_check_interval_s=2.0, health_check_timeout_s=2.0,
                  reconnect_delay_ms=50, reconnect_delay_max_ms=500, connect_timeout_s=3.0,
                  # a raising handler is reported at once (the tests of retries ask for them)
                  handler_max_attempts=1)
    values.update(overrides)
    return Config(**values)


class Collector:
    """A handler that records events; thread-safe; wait for counts with a deadline."""

    def __init__(self):
        self.events = []
        self._lock = threading.Lock()

    def __call__(self, event):
        with self._lock:
            self.events.append(event)

    def __len__(self):
        with self._lock:
            return len(self.events)

    def wait(self, count, timeout=15.0, settle=None):
        """Wait for *count* events and return them.

        With *settle* (the Listener feeding this collector) it is *exactly* count: an
        end marker is then published on the channel of the last event and waited for
        (a channel's events arrive in commit order), so a late duplicate or an extra
        event shows. The marker is a real logged event and stays in ``events`` (log
        comparisons count it); it is not in the returned list.
        """
        wait_for(lambda: len(self) >= count, timeout=timeout,
                 message=f"expected {count} events, have {len(self)}")
        if settle is None:
            return list(self.events)
        token = uuid.uuid4().hex
        settle.publish(self.events[count - 1].channel, {"end_marker": token})

        def is_marker(event):
            return isinstance(event.data, dict) and event.data.get("end_marker") == token
        wait_for(lambda: any(is_marker(e) for e in list(self.events)), timeout=timeout,
                 message=f"the end marker after {count} events was not delivered")
        with self._lock:
            events = list(self.events)
        at = next(i for i, e in enumerate(events) if is_marker(e))
        assert at == count and len(events) == count + 1, (
            f"expected exactly {count} events before the end marker, got {at} (and {len(events) - at - 1} after it)")
        return events[:count]

    def ids(self):
        with self._lock:
            return [e.id for e in self.events]


class ListenerFactory:
    """Creates listeners and stops every one of them at teardown."""

    def __init__(self, dsn):
        self.dsn = dsn
        self.listeners = []

    def __call__(self, channels=("messages",), consumer=None, name=None, registry=False, backfill=(), **overrides):
        # registry=False: no metrics unless a test asks (the global registry would
        # accumulate every listener of the run).
        listener = Listener(config_for(self.dsn, channels=channels, **overrides), consumer=consumer, name=name,
                            registry=registry, backfill=backfill)
        self.listeners.append(listener)
        return listener

    def stop_all(self):
        for listener in self.listeners:
            listener.stop(timeout=5.0)


class Workload:
    """Writers inserting and updating rows of ``stream`` until stopped; they ride out faults."""

    def __init__(self, dsn, writers=3):
        self.dsn = dsn
        self.stop_event = threading.Event()
        self.commits = 0
        self.failures = 0
        self._lock = threading.Lock()
        self.threads = [threading.Thread(target=self._write, args=(w,), daemon=True) for w in range(writers)]

    def __enter__(self):
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc):
        self.stop()

    def stop(self):
        self.stop_event.set()
        for t in self.threads:
            t.join(10)

    def wait_commits(self, n, timeout=20):
        start = self.commits
        wait_for(lambda: self.commits >= start + n, timeout=timeout, message="writers made no progress")

    def _write(self, w):
        conn = None
        mine = []
        i = 0
        while not self.stop_event.is_set():
            try:
                if conn is None:
                    conn = psycopg2.connect(**self.dsn)
                with conn.cursor() as cur:
                    i += 1
                    if i % 5 == 0:
                        cur.execute("INSERT INTO stream (w) SELECT %s FROM generate_series(1, 5)", (w,))
                    else:
                        cur.execute("INSERT INTO stream (w) VALUES (%s) RETURNING id", (w,))
                        mine.append(cur.fetchone()[0])
                    if mine:
                        # Updates of one row: their events must arrive in commit order.
                        cur.execute("UPDATE stream SET v = v + 1 WHERE id = %s", (mine[i % len(mine)],))
                conn.commit()
                with self._lock:
                    self.commits += 1
            except psycopg2.Error:
                with self._lock:
                    self.failures += 1
                if conn is not None:
                    conn.close()
                conn = None
                self.stop_event.wait(0.02)
        if conn is not None:
            conn.close()


def execute(db, sql, args=None):
    """Run *sql* on connection *db*; its rows, or None for a statement without any."""
    with db.cursor() as cur:
        cur.execute(sql, args)
        return cur.fetchall() if cur.description else None


def snapshot(db):
    """The server's current snapshot, as a Snapshot."""
    return Snapshot.parse(execute(db, "SELECT pg_current_snapshot()::text")[0][0])


def logged_ids(pg_cluster, dbname, channel="stream"):
    with pg_cluster.connect(dbname) as conn, conn.cursor() as cur:
        cur.execute("SELECT id FROM pgnotify_sync.event_log WHERE channel = %s ORDER BY id", (channel,))
        ids = [r[0] for r in cur.fetchall()]
    conn.close()
    return ids


def publish_end_marker(pg_cluster, dbname, channel="stream"):
    """Publish one event on *channel* (committed now) and return its log id.

    Events of one channel reach handlers in commit order, so once this marker is
    delivered, everything committed before it has been delivered before it.
    """
    conn = pg_cluster.connect(dbname)
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT pgnotify_sync.publish(%s, %s::jsonb)",
                        (channel, json.dumps({"end_marker": uuid.uuid4().hex})))
            return cur.fetchone()[0]
    finally:
        conn.close()


def assert_exactly_once_in_row_order(got, pg_cluster, dbname):
    """Call once the writers have stopped. Publishes an end marker on ``stream`` and
    waits for it (everything committed before it is delivered before it, so a late
    duplicate or a late event shows), then checks: delivered ids == logged ids, no
    duplicate, nothing after the marker, per-row commit order (update versions) and
    per-writer commit order (each Workload writer ``w`` commits sequentially, so its
    events must arrive in increasing log-id order, across rows).

    Returns the logged ids of the events before the marker.
    """
    marker = publish_end_marker(pg_cluster, dbname)
    wait_for(lambda: marker in got.ids(), timeout=60,
             message=f"the end marker {marker} was not delivered ({len(got)} events so far)")
    expected = logged_ids(pg_cluster, dbname)
    ids = got.ids()
    events = list(got.events)
    duplicates = sorted(i for i, n in collections.Counter(ids).items() if n > 1)
    assert not duplicates, f"events delivered twice: {duplicates[:10]}"
    assert sorted(ids) == expected, (f"delivered != logged: missing {sorted(set(expected) - set(ids))[:10]}, "
                                     f"not logged {sorted(set(ids) - set(expected))[:10]}")
    assert ids[-1] == marker, f"delivered after the end marker: {ids[ids.index(marker) + 1:][:10]}"
    last_v = {}
    last_id_of_writer = {}
    for event in events:
        if event.operation == "PUBLISH":
            continue
        row = event.data["id"]
        if event.operation == "UPDATE":
            assert event.data["v"] > last_v.get(row, 0), f"row {row}: update events out of commit order"
            last_v[row] = event.data["v"]
        w = event.data.get("w")
        if w is not None:
            previous = last_id_of_writer.get(w)
            assert previous is None or event.id > previous, (
                f"writer {w}: event {event.id} ({event.operation} row {row}) delivered after event {previous}: "
                "out of commit order")
            last_id_of_writer[w] = event.id
    return [i for i in expected if i != marker]


def counter(signal):
    calls = []
    signal.connect(lambda sender, **kw: calls.append(kw), weak=False)
    return calls
