"""Handler retries with backoff (issue 16, part 1) against the real server."""

import time

import pytest

from pgnotify_sync import install, watch_table

from helpers import wait_for
from pgutil import Collector, execute


@pytest.fixture
def jobs(db):
    install(db)
    execute(db, "CREATE TABLE jobs (id serial PRIMARY KEY, n int)")
    watch_table(db, "public.jobs", channel="jobs")
    return db


def errors_of(listener):
    errors = []
    listener.signals.error.connect(lambda sender, **kw: errors.append((kw["kind"], kw.get("event_id"))), weak=False)
    return errors


def test_a_flaky_handler_is_retried_and_events_stay_in_order(jobs, make_listener):
    listener = make_listener(channels=("jobs",), handler_max_attempts=5, handler_retry_delay_ms=20,
                             handler_retry_delay_max_ms=100)
    calls, done = [], []

    @listener.on_event("jobs")
    def flaky(event):
        calls.append(event.data["n"])
        if event.data["n"] == 3 and calls.count(3) < 3:
            raise ConnectionError("search server away")
        done.append(event.data["n"])
    errors = errors_of(listener)
    listener.start()
    for n in range(8):
        execute(jobs, "INSERT INTO jobs (n) VALUES (%s)", (n,))
    wait_for(lambda: len(done) == 8, timeout=20, message=f"done {done}")
    assert done == list(range(8))
    assert calls.count(3) == 3 and len(calls) == 10
    assert errors == []
    stats = listener.get_stats()
    assert stats["handler_retries"] == 2 and stats["handler_errors"] == 0


def test_a_handler_that_keeps_failing_is_reported_once_after_its_last_attempt(jobs, make_listener):
    listener = make_listener(channels=("jobs",), handler_max_attempts=3, handler_retry_delay_ms=10,
                             handler_retry_delay_max_ms=40)
    calls = []
    got = Collector()

    @listener.on_event("jobs")
    def broken_on_one(event):
        calls.append(event.data["n"])
        if event.data["n"] == 1:
            raise ValueError("cannot index this one")
        got(event)
    errors = errors_of(listener)
    listener.start()
    for n in range(3):
        execute(jobs, "INSERT INTO jobs (n) VALUES (%s)", (n,))
    got.wait(2)
    assert [e.data["n"] for e in got.events] == [0, 2]
    assert calls == [0, 1, 1, 1, 2]
    wait_for(lambda: errors, message="no error signal")
    assert [kind for kind, _ in errors] == ["handler"]
    assert listener.get_stats()["handler_errors"] == 1 and listener.get_stats()["handler_retries"] == 2


def test_stop_interrupts_a_backoff_and_a_consumer_gets_the_event_again(jobs, make_listener):
    failing = make_listener(channels=("jobs",), consumer="indexer", handler_max_attempts=5,
                            handler_retry_delay_ms=30_000, handler_retry_delay_max_ms=30_000)
    calls = []

    @failing.on_event("jobs")
    def down(event):
        calls.append(event.data["n"])
        raise ConnectionError("search server away")
    failing.start()
    execute(jobs, "INSERT INTO jobs (n) VALUES (1)")
    wait_for(lambda: calls, message="the handler was not called")
    began = time.monotonic()
    failing.stop()
    assert time.monotonic() - began < 3, "stop() waited for the backoff"
    assert calls == [1]
    again = make_listener(channels=("jobs",), consumer="indexer")
    got = Collector()
    again.on_event("jobs", got)
    again.start()
    assert [e.data["n"] for e in got.wait(1)] == [1], "the interrupted event was stored as handled"


# -- typed rows (issue 16, part 3) -----------------------------------------------------------


def test_typed_rows_arrive_as_the_model_and_a_row_that_does_not_fit_is_kind_type(db, make_listener, caplog):
    import logging

    import attrs

    from pgnotify_sync import DatabaseEvent
    install(db)
    execute(db, "CREATE TABLE notes (id serial PRIMARY KEY, body text, secret text)")
    watch_table(db, "public.notes", channel="notes")

    @attrs.define
    class Note:
        id: int
        body: str

    listener = make_listener(channels=("notes",), handler_max_attempts=5)
    got, raw = [], Collector()

    @listener.on_event("notes", row=Note)
    def typed_handler(event: DatabaseEvent[Note]):
        got.append(event)
    listener.on_event("notes", raw)
    errors = errors_of(listener)
    caplog.set_level(logging.INFO, logger="pgnotify_sync")
    listener.start()
    execute(db, "INSERT INTO notes (body, secret) VALUES ('hello', 'pw-1')")
    execute(db, "INSERT INTO notes (body, secret) VALUES (NULL, 'pw-2')")     # body: None does not fit str
    execute(db, "UPDATE notes SET body = 'edited' WHERE id = 1")
    raw.wait(3)
    wait_for(lambda: len(got) == 2 and errors, message=f"typed {got}, errors {errors}")
    assert [(type(e.data), e.data, type(e.old).__name__) for e in got] == [
        (Note, Note(1, "hello"), "NoneType"), (Note, Note(1, "edited"), "Note")]
    assert got[1].old == Note(1, "hello")
    assert isinstance(raw.events[0].data, dict)       # the other receiver's event is untouched
    assert [kind for kind, _ in errors] == ["type"]
    assert listener.get_stats()["type_errors"] == 1 and listener.get_stats()["handler_retries"] == 0
    assert not any("pw-" in r.getMessage() for r in caplog.records)
    assert any("does not fit Note" in r.getMessage() and "$.body" in r.getMessage() for r in caplog.records)


# -- dead letters (issue 16, part 2) --------------------------------------------------------


def test_a_dead_letter_is_listed_by_the_cli_and_delivered_once_after_the_fix(jobs, make_listener, dsn):
    import json

    from test_cli import Cli
    listener = make_listener(channels=("jobs",), consumer="indexer", handler_max_attempts=2,
                             handler_retry_delay_ms=10, handler_retry_delay_max_ms=20)
    broken = {"yes": True}
    handled = []

    @listener.on_event("jobs")
    def index(event):
        if event.data["n"] == 2 and broken["yes"]:
            raise ValueError("the search server refused this document")
        handled.append(event.data["n"])
    listener.start()
    for n in range(5):
        execute(jobs, "INSERT INTO jobs (n) VALUES (%s)", (n,))
    wait_for(lambda: handled == [0, 1, 3, 4], timeout=15, message=f"handled {handled}")
    cli = Cli(dsn)
    try:
        lines = cli.run("dead-letters", "list", "--consumer", "indexer").stdout.splitlines()
        (letter,) = [json.loads(line) for line in lines]
        two = execute(jobs, "SELECT id FROM pgnotify_sync.event_log WHERE (data->>'n')::int = 2")[0][0]
        assert (letter["consumer"], letter["channel"], letter["event_id"], letter["attempts"]) == (
            "indexer", "jobs", two, 2)
        assert (letter["error_type"], letter["error"]) == ("ValueError", "the search server refused this document")
        assert listener.dead_letters()[0]["event_id"] == two
        # retention keeps a dead letter's event while it is parked, past every bound
        assert execute(jobs, "SELECT pgnotify_sync.trim_event_log(0, 0)")[0][0] >= 0
        assert execute(jobs, "SELECT count(*) FROM pgnotify_sync.event_log WHERE id = %s", (two,))[0][0] == 1
        broken["yes"] = False                                   # the fix
        proc = cli.run("dead-letters", "retry", "--consumer", "indexer", "--all")
        assert proc.stdout.strip() == "1", proc.stderr
        wait_for(lambda: 2 in handled, timeout=15, message="the dead letter was not delivered again")
        wait_for(lambda: cli.run("dead-letters", "list", "--consumer", "indexer").stdout == "", timeout=10,
                 message="the dead letter is still listed")
        assert sorted(handled) == [0, 1, 2, 3, 4] and handled.count(2) == 1
        assert listener.retry_dead_letters() == 0
    finally:
        cli.close()


def test_dropping_dead_letters_and_the_gauge(jobs, make_listener):
    from prometheus_client import CollectorRegistry
    registry = CollectorRegistry()
    listener = make_listener(channels=("jobs",), consumer="indexer", registry=registry)

    @listener.on_event("jobs")
    def always_fails(event):
        raise RuntimeError("down")
    listener.start()
    execute(jobs, "INSERT INTO jobs (n) VALUES (1), (2)")
    wait_for(lambda: len(listener.dead_letters()) == 2, timeout=15, message="no dead letters")

    def gauge():
        return registry.get_sample_value("pgnotify_sync_dead_letters",
                                         {"listener": listener.name, "consumer": "indexer", "channel": "jobs"})
    wait_for(lambda: gauge() == 2, timeout=10, message=f"gauge {gauge()}")
    first = listener.dead_letters()[0]["event_id"]
    from pgnotify_sync._deadletters import drop_dead_letters
    with listener._connections.pool.connection() as conn:
        assert drop_dead_letters(conn, "indexer", [first]) == 1
    assert [d["event_id"] for d in listener.dead_letters()] != [first] and len(listener.dead_letters()) == 1
    wait_for(lambda: gauge() == 1, timeout=10, message=f"gauge {gauge()}")


def test_a_row_that_does_not_fit_becomes_a_dead_letter_of_a_durable_consumer(jobs, make_listener):
    import attrs

    @attrs.define
    class Job:
        id: int
        n: int

    listener = make_listener(channels=("jobs",), consumer="typed", handler_max_attempts=3, handler_retry_delay_ms=10,
                             handler_retry_delay_max_ms=20)
    got = []
    listener.on_event("jobs", got.append, row=Job)
    listener.start()
    execute(jobs, "INSERT INTO jobs (n) VALUES (1)")
    execute(jobs, "INSERT INTO jobs (n) VALUES (NULL)")       # n: None does not fit int
    execute(jobs, "INSERT INTO jobs (n) VALUES (3)")
    wait_for(lambda: len(got) == 2, timeout=15, message=f"got {got}")
    assert [e.data for e in got] == [Job(1, 1), Job(3, 3)]
    wait_for(lambda: listener.dead_letters(), timeout=10, message="no dead letter")
    (letter,) = listener.dead_letters()
    assert (letter["error_type"], letter["attempts"]) == ("RowTypeError", 1)
    assert "does not fit Job" in letter["error"] and "None" not in letter["error"]
    # asked for again before the model is fixed: parked again, not taken as delivered
    assert listener.retry_dead_letters() == 1
    wait_for(lambda: [(d["attempts"], d["retry_requested"]) for d in listener.dead_letters()] == [(2, False)],
             timeout=15, message=f"{listener.dead_letters()}")
    assert len(got) == 2
