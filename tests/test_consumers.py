"""Durable consumers and event-log retention."""

import json
import os
import queue
import signal
import subprocess
import sys
import threading

from pgnotify_sync import install, watch_table
from pgnotify_sync._listener_args import DEFAULT_CHECKPOINT_EVERY

from helpers import wait_for
from pgutil import Collector

import pytest


@pytest.fixture
def jobs_db(db):
    install(db)
    with db.cursor() as cur:
        cur.execute("CREATE TABLE jobs (id serial PRIMARY KEY, name text)")
    watch_table(db, "public.jobs", channel="jobs")
    return db


def insert(db, *names):
    with db.cursor() as cur:
        for name in names:
            cur.execute("INSERT INTO jobs (name) VALUES (%s)", (name,))


def test_consumer_resumes_after_a_clean_restart(jobs_db, make_listener):
    first = make_listener(channels=("jobs",), consumer="indexer")
    got = Collector()
    first.on_event("jobs", got)
    first.start()
    insert(jobs_db, "a", "b")
    got.wait(2)
    first.stop()
    insert(jobs_db, "c", "d")          # while no process runs
    second = make_listener(channels=("jobs",), consumer="indexer")
    got2 = Collector()
    second.on_event("jobs", got2)
    second.start()
    insert(jobs_db, "e")
    events = got2.wait(3)
    assert [e.data["name"] for e in events] == ["c", "d", "e"]
    second.publish("jobs", {"end": True})
    got2.wait(4)
    assert len(got2) == 4, "nothing handled before the restart may come again"


def test_new_consumer_starts_now_and_plain_listener_is_independent(jobs_db, make_listener):
    insert(jobs_db, "old")
    consumer = make_listener(channels=("jobs",), consumer="fresh")
    got = Collector()
    consumer.on_event("jobs", got)
    consumer.start()
    insert(jobs_db, "new")
    (event,) = got.wait(1)
    assert event.data["name"] == "new"
    with jobs_db.cursor() as cur:
        cur.execute("SELECT name, channel FROM pgnotify_sync.consumers")
        assert cur.fetchall() == [("fresh", "jobs")]


CRASHING_CONSUMER = r"""
import os, sys, json, threading, time
sys.path.insert(0, {root!r})
from pgnotify_sync import Config, Listener
cfg = Config(**json.loads({cfg!r}))
listener = Listener(cfg, consumer="crashy", **json.loads({kwargs!r}))
@listener.on_event("jobs")
def handle(event):
    print(event.data["name"], flush=True)
    if event.data["name"] == "crash":
        os._exit(1)                      # dies mid-handler: no stop(), no cleanup
    if event.data["name"] == "hang":
        threading.Event().wait()         # in flight until the test SIGKILLs the process
listener.start()
print("ready", flush=True)
time.sleep(60)
"""


class ChildLines:
    """A child's stdout lines, read by a thread: waiting for one has a deadline, so a
    hung child fails the test instead of hanging it."""

    def __init__(self, proc):
        self.proc = proc
        self._lines = queue.Queue()
        threading.Thread(target=self._pump, name="child-stdout", daemon=True).start()

    def _pump(self):
        for line in self.proc.stdout:
            self._lines.put(line.rstrip("\n"))
        self._lines.put(None)

    def next(self, timeout=30):
        try:
            line = self._lines.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"the child printed no line within {timeout}s") from None
        if line is None:
            self._lines.put(None)
            raise AssertionError(f"the child's output ended (exit code {self.proc.poll()})")
        return line

    def until_eof(self, timeout=60):
        """Every line up to the end of the output (the child exited or closed it)."""
        import time
        deadline = time.monotonic() + timeout
        lines = []
        while True:
            try:
                line = self._lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError(f"the child's output did not end within {timeout}s; "
                                     f"lines so far: {lines}") from None
            if line is None:
                return lines
            lines.append(line)


def start_crashing_consumer(dsn, **kwargs):
    """A child process running consumer 'crashy' (Listener keyword arguments
    *kwargs*) that prints each event's name and dies (os._exit) inside the handler of
    the event named 'crash', or blocks forever inside the handler of 'hang'.
    Returns (Popen, ChildLines)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    cfg = json.dumps(dict(postgres_host=dsn["host"], postgres_port=dsn["port"], postgres_user=dsn["user"],
                          postgres_password=dsn["password"], postgres_db=dsn["dbname"], channels=["jobs"],
                          # a short lease: the restarted consumer takes over from the dead one sooner
                          consumer_lease_s=2.0))
    proc = subprocess.Popen([sys.executable, "-c", CRASHING_CONSUMER.format(root=root, cfg=cfg,
                                                                            kwargs=json.dumps(kwargs))],
                            stdout=subprocess.PIPE, text=True)
    return proc, ChildLines(proc)


def test_consumer_crash_redelivers_only_the_event_in_flight(jobs_db, dsn, make_listener):
    proc, out = start_crashing_consumer(dsn, checkpoint_every=1)
    try:
        assert out.next() == "ready"
        insert(jobs_db, "one", "two", "crash", "after")
        assert out.until_eof() == ["one", "two", "crash"]
        assert proc.wait(20) == 1
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
    restarted = make_listener(channels=("jobs",), consumer="crashy")
    got = Collector()
    restarted.on_event("jobs", got)
    restarted.start()
    events = got.wait(2)
    # 'crash' was in flight (at least once); 'after' was never handled; 'one', 'two' never again.
    assert [e.data["name"] for e in events] == ["crash", "after"]
    restarted.publish("jobs", {"end": True})
    got.wait(3)
    assert len(got) == 3


def test_retention_trims_old_rows_but_keeps_what_a_consumer_needs(jobs_db, make_listener):
    consumer = make_listener(channels=("jobs",), consumer="slowpoke")
    consumer.start()
    consumer.stop()                     # registered, then away
    insert(jobs_db, "kept-for-consumer")
    with jobs_db.cursor() as cur:
        cur.execute("INSERT INTO pgnotify_sync.event_log (channel, operation, schema_name, table_name, data) "
                    "VALUES ('other', 'INSERT', 'public', 'x', '{}')")
        cur.execute("UPDATE pgnotify_sync.event_log SET created_at = now() - interval '2 days'")
    trimmer = make_listener(channels=("jobs",), retention_s=3600, consumer_retention_s=7 * 86400,
                            cleanup_interval_s=0)
    trimmer.start()
    assert trimmer.cleanup() == 1       # only the row no consumer needs
    with jobs_db.cursor() as cur:
        cur.execute("SELECT channel FROM pgnotify_sync.event_log")
        assert cur.fetchall() == [("jobs",)]
        cur.execute("UPDATE pgnotify_sync.event_log SET created_at = now() - interval '8 days'")
    assert trimmer.cleanup() == 1       # now older than consumer_retention_s: goes, and is accounted
    back = make_listener(channels=("jobs",), consumer="slowpoke")
    gaps = []
    back.signals.error.connect(lambda sender, **kw: gaps.append(kw), weak=False)
    back.start()
    wait_for(lambda: [g for g in gaps if g["kind"] == "gap"])
    gap = [g for g in gaps if g["kind"] == "gap"][0]
    assert gap["channel"] == "jobs" and "missed 1 events" in str(gap["error"])
    assert back.get_stats()["consumer_gap_events"] == 1


def test_retention_walks_the_log_from_its_oldest_id(jobs_db):
    # No index on created_at: trim_event_log deletes the old rows before the first
    # recent one. An old row behind it (a long transaction's) goes at a later trim.
    insert(jobs_db, "old-1", "old-2", "recent", "late-old")
    with jobs_db.cursor() as cur:
        cur.execute("UPDATE pgnotify_sync.event_log SET created_at = now() - interval '2 days' "
                    "WHERE data->>'name' <> 'recent'")
        cur.execute("SELECT pgnotify_sync.trim_event_log(3600, 3600)")
        assert cur.fetchone()[0] == 2
        cur.execute("SELECT data->>'name' FROM pgnotify_sync.event_log ORDER BY id")
        assert cur.fetchall() == [("recent",), ("late-old",)]
        cur.execute("UPDATE pgnotify_sync.event_log SET created_at = now() - interval '2 days'")
        cur.execute("SELECT pgnotify_sync.trim_event_log(3600, 3600)")
        assert cur.fetchone()[0] == 2
        cur.execute("SELECT count(*) FROM pgnotify_sync.event_log")
        assert cur.fetchone()[0] == 0
        cur.execute("SELECT count(*) FROM pg_indexes WHERE schemaname = 'pgnotify_sync' "
                    "AND indexname = 'event_log_created_at_idx'")
        assert cur.fetchone()[0] == 0


def test_consumer_crash_during_a_catch_up_repeats_only_the_event_in_flight(jobs_db, dsn, make_listener):
    first = make_listener(channels=("jobs",), consumer="crashy")
    first.start()
    first.stop()                                   # registered; now away
    names = [f"n{i}" for i in range(30)]
    names[17] = "crash"
    with jobs_db.cursor() as cur:                  # one statement: a range notification, read from the log
        cur.execute("INSERT INTO jobs (name) SELECT unnest(%s::text[])", (names,))
    proc, out = start_crashing_consumer(dsn, checkpoint_every=1)
    try:
        seen = out.until_eof()
        assert proc.wait(20) == 1
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
    assert [s for s in seen if s != "ready"] == names[:18]       # caught up to 'crash', then died
    restarted = make_listener(channels=("jobs",), consumer="crashy")
    got = Collector()
    restarted.on_event("jobs", got)
    restarted.start()
    events = got.wait(13)
    assert [e.data["name"] for e in events] == names[17:]          # 'crash' again (in flight), then the rest
    restarted.publish("jobs", {"end": True})
    got.wait(14)
    assert len(got) == 14, [(e.id, e.operation.value, e.data) for e in got.events]


def test_default_checkpoints_bound_the_repeats_after_a_crash(jobs_db, dsn, make_listener):
    # The default stores the position every DEFAULT_CHECKPOINT_EVERY events (and after
    # every batch): a crash in a burst repeats at most that many events, and loses none.
    first = make_listener(channels=("jobs",), consumer="crashy")
    first.start()
    first.stop()
    names = [f"n{i}" for i in range(400)]
    crash_at = 350
    names[crash_at] = "crash"
    with jobs_db.cursor() as cur:
        cur.execute("INSERT INTO jobs (name) SELECT unnest(%s::text[])", (names,))
    proc, out = start_crashing_consumer(dsn)
    try:
        seen = [line for line in out.until_eof() if line != "ready"]
        assert proc.wait(20) == 1
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
    assert seen == names[:crash_at + 1]
    restarted = make_listener(channels=("jobs",), consumer="crashy")
    got = Collector()
    restarted.on_event("jobs", got)
    restarted.start()
    wait_for(lambda: got.events and got.events[-1].data["name"] == names[-1], timeout=10,
             message="the restarted consumer did not reach the last event")
    again = [e.data["name"] for e in got.events]
    resumed_at = names.index(again[0])
    assert again == names[resumed_at:]                              # in order, nothing lost after it
    assert crash_at - DEFAULT_CHECKPOINT_EVERY <= resumed_at <= crash_at   # repeats bounded


def test_default_checkpoints_repeat_only_the_event_in_flight_under_light_traffic(jobs_db, dsn, make_listener):
    # README: with the default checkpoint_every, light traffic repeats after a crash
    # only the event in flight (the position is stored after every batch).
    proc, out = start_crashing_consumer(dsn)
    try:
        assert out.next() == "ready"
        for name in ("one", "two", "three", "hang"):       # spaced out: one batch each
            insert(jobs_db, name)
            assert out.next() == name
        # 'hang' is now in its handler: the process dies there.
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(20) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
    insert(jobs_db, "after")                               # while no process runs
    restarted = make_listener(channels=("jobs",), consumer="crashy")
    got = Collector()
    restarted.on_event("jobs", got)
    restarted.start()
    restarted.publish("jobs", {"end": True})
    wait_for(lambda: any(e.operation == "PUBLISH" for e in got.events), timeout=15,
             message="the restarted consumer did not reach the end marker")
    assert [e.data.get("name", "end") for e in got.events] == ["hang", "after", "end"]
