"""Handler retries with backoff (issue 16, part 1) against the real server."""

import threading
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


# -- a handler that keeps failing is suspended (circuit breaker) -----------------------------


def test_a_handler_that_always_raises_does_not_hold_back_its_channel(jobs, make_listener):
    """Defaults (5 attempts with backoff, breaker after 5 events): one of two handlers
    raises on every event; the other gets all 50 within 5 s of the writes, and the
    failing one is shown suspended in health() and the metrics."""
    from prometheus_client import CollectorRegistry

    from pgnotify_sync import HandlerSuspended
    registry = CollectorRegistry()
    # (the tests' config_for makes 1 attempt; this one runs with the library's default)
    listener = make_listener(channels=("jobs",), registry=registry, handler_max_attempts=5)
    calls = []

    @listener.on_event("jobs")
    def broken(event):
        calls.append(event.data["n"])
        raise KeyError("a new column")
    got = Collector()
    listener.on_event("jobs", got)
    errors = []
    listener.signals.error.connect(lambda sender, **kw: errors.append((kw["kind"], type(kw["error"]))), weak=False)
    listener.start()
    began = time.monotonic()
    for n in range(50):
        execute(jobs, "INSERT INTO jobs (n) VALUES (%s)", (n,))
    got.wait(50, timeout=5 - (time.monotonic() - began))
    assert [e.data["n"] for e in got.events] == list(range(50))
    # 5 calls for the first event, one each for the next four, then none but a trial
    # every handler_breaker_reset_ms (10 s: not within this test)
    assert calls == [0] * 5 + [1, 2, 3, 4]
    wait_for(lambda: len(errors) == 50, timeout=5, message=f"{len(errors)} errors")
    assert errors[:5] == [("handler", KeyError)] * 5 and set(errors[5:]) == {("handler", HandlerSuspended)}
    name = f"{broken.__module__}.{broken.__qualname__}"
    suspended = listener.health()["handlers"]["jobs"][name]
    assert suspended["state"] == "open" and suspended["failures"] == 5 and suspended["rejected"] == 45
    assert listener.health()["ok"]
    labels = {"listener": listener.name, "channel": "jobs", "receiver": name}
    assert registry.get_sample_value("pgnotify_sync_handler_suspended", labels) == 1
    assert registry.get_sample_value("pgnotify_sync_handler_suspended_events_total", labels) == 45
    assert listener.get_stats()["handler_errors"] == 50


def test_a_suspended_handler_is_tried_again_and_works_again(jobs, make_listener):
    """After handler_breaker_reset_ms one event calls it again; once the cause is
    mended that call succeeds, the breaker closes and every later event reaches it.
    A durable consumer parks the events failed meanwhile as dead letters, and their
    retry delivers them."""
    listener = make_listener(channels=("jobs",), consumer="breaker", handler_breaker_failures=2,
                             handler_breaker_reset_ms=300, handler_max_attempts=2, handler_retry_delay_ms=10,
                             handler_retry_delay_max_ms=10)
    broken = threading.Event()
    broken.set()
    done = []

    @listener.on_event("jobs")
    def indexer(event):
        if broken.is_set():
            raise ConnectionError("index away")
        done.append(event.data["n"])
    listener.start()
    for n in range(6):
        execute(jobs, "INSERT INTO jobs (n) VALUES (%s)", (n,))
    wait_for(lambda: len(listener.dead_letters()) == 6, timeout=15, message=f"{listener.dead_letters()}")
    letters = {d["event_id"]: d for d in listener.dead_letters()}
    assert sorted(d["error_type"] for d in letters.values()).count("HandlerSuspended") >= 3
    (state,) = listener.health()["handlers"]["jobs"].values()
    assert state["state"] == "open"
    broken.clear()
    # the next event after the reset time is the trial: it succeeds and closes it
    wait_for(lambda: time.time() - state["opened_at"] > 0.4, timeout=5, message="time stands still")
    for n in range(6, 9):
        execute(jobs, "INSERT INTO jobs (n) VALUES (%s)", (n,))
    wait_for(lambda: done == [6, 7, 8], timeout=10, message=f"done {done}")
    assert listener.health()["handlers"] == {}
    assert listener.retry_dead_letters() == 6
    wait_for(lambda: sorted(done) == list(range(9)), timeout=15, message=f"done {done}")
    assert listener.dead_letters() == []
