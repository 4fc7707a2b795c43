"""Tests of pgnotify_sync._healthcheck.HealthCheck, driven directly as the reader
drives it: the state with fake connections (no database), and one round trip on a
real asynchronous connection that LISTENs on the marker channel.
"""

import select
import re
import time

import psycopg2
import psycopg2.extensions
import pytest
from psycopg2.extensions import Notify

from pgnotify_sync._healthcheck import HealthCheck, Lost
from pgnotify_sync._snapshot import Snapshot

CHANNEL = "pgnotify_sync.hc.4242"


class FakeCursor:
    def __init__(self, error=None, row=None):
        self.error = error
        self.row = row
        self.executed = []
        self.closed = False

    def execute(self, statement, args):
        self.executed.append((statement, args))
        if self.error is not None:
            raise self.error

    def fetchone(self):
        if self.error is not None:
            raise self.error
        return self.row

    def close(self):
        self.closed = True


class FakeConnection:
    def __init__(self, cursor):
        self._cursor = cursor

    def cursor(self):
        return self._cursor


def answered(hc, row=("10:20:12",)):
    """*hc* after a sent round trip whose statement answered with *row*."""
    hc.send(FakeConnection(FakeCursor(row=row)), 5.0)
    hc.take_snapshot()
    return hc


# -- the state (no database) ---------------------------------------------------------------


def test_a_new_check_is_due_at_first_at_and_not_pending():
    hc = HealthCheck(CHANNEL, 123.0)
    assert hc.next_at == 123.0
    assert not hc.pending and not hc.marker_seen and hc.token is None
    assert hc.finish(10.0) is None


def test_send_starts_a_round_trip_with_a_new_token():
    hc = HealthCheck(CHANNEL, 0.0)
    cur = FakeCursor()
    before = time.monotonic()
    hc.send(FakeConnection(cur), 2.5)
    first = hc.token
    assert re.fullmatch(r"[0-9a-f]{32}", first) and hc.pending and hc.cursor is cur      # random: unguessable
    assert before <= hc.sent_at <= time.monotonic()
    assert hc.deadline == pytest.approx(hc.sent_at + 2.5)
    ((statement, args),) = cur.executed
    assert "pg_current_snapshot()" in statement and "pg_notify(" in statement
    assert args == (CHANNEL, first)
    # The next round trip forgets what the last one found.
    hc.marker_seen, hc.snapshot = True, Snapshot(1, 2)
    hc.send(FakeConnection(FakeCursor()), 2.5)
    assert hc.token != first and not hc.marker_seen and hc.snapshot is None


def test_send_that_fails_is_lost():
    hc = HealthCheck(CHANNEL, 0.0)
    error = psycopg2.OperationalError("server closed the connection unexpectedly\n\tThis probably means ...")
    with pytest.raises(Lost, match=r"^health check failed: server closed the connection unexpectedly$") as info:
        hc.send(FakeConnection(FakeCursor(error=error)), 1.0)
    assert info.value.__cause__ is error


def test_take_snapshot_keeps_the_answer_and_closes_the_cursor():
    hc = HealthCheck(CHANNEL, 0.0)
    cur = FakeCursor(row=("10:20:12,15",))
    hc.send(FakeConnection(cur), 1.0)
    hc.take_snapshot()
    assert hc.snapshot == Snapshot(10, 20, frozenset({12, 15}))
    assert cur.closed and hc.cursor is None


def test_take_snapshot_of_a_failed_statement_is_lost():
    hc = HealthCheck(CHANNEL, 0.0)
    cur = FakeCursor()
    hc.send(FakeConnection(cur), 1.0)
    cur.error = psycopg2.OperationalError("terminating connection due to administrator command")
    with pytest.raises(Lost, match="^health check failed: terminating connection"):
        hc.take_snapshot()


def test_is_marker_needs_the_channel_the_current_token_and_our_backend():
    hc = HealthCheck(CHANNEL, 0.0, pid=4242)
    hc.send(FakeConnection(FakeCursor()), 1.0)
    earlier = hc.token
    hc.send(FakeConnection(FakeCursor()), 1.0)
    token = hc.token
    assert hc.is_marker(Notify(4242, CHANNEL, token))
    assert not hc.is_marker(Notify(4242, CHANNEL, earlier))               # an earlier round trip's
    assert not hc.is_marker(Notify(4242, "pgnotify_sync.hc.1", token))    # another session's
    assert not hc.is_marker(Notify(4242, "messages", token))
    assert not hc.is_marker(Notify(999, CHANNEL, token))                  # sent by another backend
    hc.pending = False
    assert not hc.is_marker(Notify(4242, CHANNEL, token))                 # no round trip running


def test_marker_channels_are_random_identifiers():
    from pgnotify_sync._healthcheck import channel_name
    names = {channel_name() for _ in range(100)}
    assert len(names) == 100
    assert all(re.fullmatch(r"pgnotify_sync\.hc\.[0-9a-f]{32}", n) and len(n) <= 63 for n in names)


def test_finish_needs_the_answer_and_the_marker():
    hc = answered(HealthCheck(CHANNEL, 0.0))
    assert hc.finish(10.0) is None          # the marker is not in yet
    hc.marker_seen = True
    before = time.monotonic()
    rtt = hc.finish(10.0)
    assert rtt is not None and 0 <= rtt <= time.monotonic() - hc.sent_at
    assert not hc.pending
    assert before + 10.0 <= hc.next_at <= time.monotonic() + 10.0
    assert hc.finish(10.0) is None          # done once


def test_finish_before_the_answer_is_not_done():
    """The marker can come back before the statement's answer is read."""
    hc = HealthCheck(CHANNEL, 0.0)
    hc.send(FakeConnection(FakeCursor(row=("1:2:",))), 1.0)
    hc.marker_seen = True
    assert hc.finish(1.0) is None and hc.pending
    hc.take_snapshot()
    assert hc.finish(1.0) is not None


# -- a real round trip ---------------------------------------------------------------------


def wait_ready(conn, timeout=10.0):
    """Poll async *conn* until its current operation is done (deadline-bounded)."""
    deadline = time.monotonic() + timeout
    while True:
        state = conn.poll()
        if state == psycopg2.extensions.POLL_OK:
            return
        left = deadline - time.monotonic()
        assert left > 0, "the asynchronous connection did not get ready in time"
        if state == psycopg2.extensions.POLL_READ:
            select.select([conn.fileno()], [], [], left)
        else:
            select.select([], [conn.fileno()], [], left)


@pytest.fixture
def async_conn(dsn):
    conn = psycopg2.connect(async_=True, **dsn)
    wait_ready(conn)
    yield conn
    conn.close()


def test_a_round_trip_on_a_real_connection(async_conn, db):
    conn = async_conn
    hc = HealthCheck(f"pgnotify_sync.hc.{conn.info.backend_pid}", 0.0)
    cur = conn.cursor()
    cur.execute(f'LISTEN "{hc.channel}"; LISTEN work')
    wait_ready(conn)
    # A transaction committed before the check: visible in its snapshot, and its
    # notification arrives before the marker.
    with db.cursor() as other:
        other.execute("BEGIN")
        other.execute("SELECT pg_current_xact_id()::text::bigint")
        (xid,) = other.fetchone()
        other.execute("NOTIFY work, 'before'")
        other.execute("COMMIT")
    hc.send(conn, 5.0)
    wait_ready(conn)
    hc.take_snapshot()
    assert hc.snapshot.visible(xid)
    deadline = time.monotonic() + 10
    arrived = []
    while not any(hc.is_marker(n) for n in arrived):
        assert time.monotonic() < deadline, f"the marker did not come back; got {arrived}"
        select.select([conn.fileno()], [], [], 0.1)
        wait_ready(conn)
        arrived.extend(conn.notifies)
        del conn.notifies[:]
    assert [(n.channel, n.payload) for n in arrived] == [("work", "before"), (hc.channel, hc.token)]
    hc.marker_seen = True
    assert hc.finish(1.0) is not None


def test_send_on_a_closed_connection_is_lost(dsn):
    conn = psycopg2.connect(async_=True, **dsn)
    wait_ready(conn)
    conn.close()
    hc = HealthCheck("pgnotify_sync.hc.1", 0.0)
    with pytest.raises(Lost, match="^health check failed: "):
        hc.send(conn, 1.0)
