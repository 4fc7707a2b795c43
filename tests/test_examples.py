"""The examples (examples/), run as a user would run them: the Flask app under a real
gunicorn (2 gthread workers, the example's gunicorn.conf.py) with SSE clients that
behave like EventSource (reconnect after ``retry:``, resume with Last-Event-ID),
SIGTERM and HUP with open streams; the indexer under SIGKILL; the batch job."""

import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

from helpers import wait_for
from pgutil import execute

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = os.path.join(ROOT, "examples")


def example_env(dsn, **extra):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("POSTGRES_", "PG_"))}
    env.update(POSTGRES_HOST=dsn["host"], POSTGRES_PORT=str(dsn["port"]), POSTGRES_USER=dsn["user"],
               POSTGRES_PASSWORD=dsn["password"], POSTGRES_DB=dsn["dbname"], PYTHONUNBUFFERED="1")
    env.update(extra)
    return env


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Output:
    """A subprocess's stdout and stderr lines, collected by threads."""

    def __init__(self, popen):
        self.popen = popen
        self.lines = []
        self._threads = [threading.Thread(target=self._pump, args=(s,), daemon=True)
                         for s in (popen.stdout, popen.stderr) if s is not None]
        for t in self._threads:
            t.start()

    def _pump(self, stream):
        for line in stream:
            self.lines.append(line)

    def text(self):
        return "".join(self.lines)


class Gunicorn:
    """``gunicorn -c gunicorn.conf.py app:app`` in examples/flask_app."""

    def __init__(self, dsn):
        self.port = free_port()
        self.popen = subprocess.Popen(
            [sys.executable, "-m", "gunicorn", "-c", "gunicorn.conf.py", "app:app"],
            cwd=os.path.join(EXAMPLES, "flask_app"), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            env=example_env(dsn, BIND=f"127.0.0.1:{self.port}", FLASK_SECRET_KEY="test-secret"))
        self.output = Output(self.popen)
        wait_for(lambda: self.get("/health")[0] == 200 or self.exited(), timeout=60,
                 message="gunicorn did not answer /health with 200")
        assert not self.exited(), self.output.text()

    def exited(self):
        return self.popen.poll() is not None

    def get(self, path, headers=None):
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        try:
            conn.request("GET", path, headers=headers or {})
            resp = conn.getresponse()
            return resp.status, resp.getheaders(), resp.read()
        except OSError:
            return None, [], b""
        finally:
            conn.close()

    def post(self, path, form, cookie=None):
        from urllib.parse import urlencode
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        try:
            headers = {"Content-Type": "application/x-www-form-urlencoded", **({"Cookie": cookie} if cookie else {})}
            conn.request("POST", path, body=urlencode(form), headers=headers)
            resp = conn.getresponse()
            return resp.status, resp.read()
        finally:
            conn.close()

    def login(self, user):
        status, headers, _ = self.get(f"/login?user={user}")
        assert status == 302, status
        cookie = dict(headers)["Set-Cookie"].split(";")[0]
        return cookie

    def workers(self):
        out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(self.popen.pid)], capture_output=True, text=True)
        return {int(p) for p in out.stdout.split()}

    def stop(self):
        if not self.exited():
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(15)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(5)


@pytest.fixture
def gunicorn(dsn):
    server = Gunicorn(dsn)
    yield server
    server.stop()


class Browser:
    """An EventSource: reads /events/stream, and after the stream ends waits the
    last ``retry:`` and reconnects with Last-Event-ID (as a browser does)."""

    def __init__(self, port, cookie):
        self.port, self.cookie = port, cookie
        self.ids = []               # the events' messages ids, in arrival order
        self.streams = []           # (worker pid, how it ended: "retry" if its last frame was a retry)
        self.last_id = None
        self.retry_ms = 1000
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        while not self._stop.is_set():
            self._stream()
            self._stop.wait(self.retry_ms / 1000)

    def _stream(self):
        headers = {"Cookie": self.cookie, "Accept": "text/event-stream"}
        if self.last_id is not None:
            headers["Last-Event-ID"] = self.last_id
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        last_frame = None
        try:
            conn.request("GET", "/events/stream?channels=messages", headers=headers)
            resp = conn.getresponse()
            if resp.status != 200:
                self.streams.append((None, f"status {resp.status}"))
                return
            pid = int(resp.getheader("X-Worker-Pid"))
            self.streams.append((pid, "open"))
            fields = {}
            while not self._stop.is_set():
                line = resp.readline()
                if not line:
                    break
                line = line.decode().rstrip("\n")
                if line == "":
                    if "retry" in fields:
                        self.retry_ms = int(fields["retry"])
                    if "id" in fields:
                        self.last_id = fields["id"]
                        if "data" in fields:        # the messages row's id (the frame's is the log's)
                            self.ids.append(json.loads(fields["data"])["data"]["id"])
                    last_frame = "retry" if "retry" in fields and len(self.ids) else fields.get("event", "comment")
                    fields = {}
                elif not line.startswith(":"):
                    name, _, value = line.partition(":")
                    fields[name] = value[1:] if value.startswith(" ") else value
            self.streams[-1] = (pid, "retry" if last_frame == "retry" else f"ended after {last_frame}")
        except (OSError, http.client.HTTPException) as exc:
            self.streams.append((None, f"error {exc!r}"))
        finally:
            conn.close()

    def pids(self):
        return {pid for pid, _ in self.streams if pid is not None}

    def close(self):
        self._stop.set()


def insert(db, rows):
    execute(db, "INSERT INTO messages (room, author, body) SELECT r, 'test', 'm' FROM unnest(%s::text[]) r", (rows,))


def lobby_and_alice(db):
    return [r[0] for r in execute(db, "SELECT id FROM messages WHERE room IN ('lobby', 'alice') ORDER BY id")]


def browsers_on_both_workers(server, cookie, most=20):
    """Browsers until streams on both workers are open (the kernel picks the worker,
    among those accepting: both have answered /health first, ready, listening)."""
    browsers = []
    workers = wait_for(lambda: len(server.workers()) == 2 and server.workers(), message="two workers")
    answered = set()

    def both_answer():
        status, headers, _ = server.get("/health")
        if status == 200:
            answered.add(int(dict(headers)["X-Worker-Pid"]))
        return answered == workers

    wait_for(both_answer, timeout=30, message="both workers answer /health with 200")
    while len(browsers) < most:
        browsers.append(Browser(server.port, cookie))
        wait_for(lambda: browsers[-1].streams, message="a stream did not open")
        if set().union(*(b.pids() for b in browsers)) == workers:
            return browsers
    raise AssertionError(f"{most} streams all went to the same worker")


def test_streams_on_both_workers_get_every_event_in_order(gunicorn, db):
    cookie = gunicorn.login("alice")
    browsers = browsers_on_both_workers(gunicorn, cookie)
    for k in range(50):
        insert(db, ["lobby" if k % 5 else "bob", "alice"] if k % 2 else ["lobby"])
    status, body = gunicorn.post("/messages", {"body": "from the page", "room": "alice"}, cookie)
    assert status == 201 and json.loads(body)["id"] > 0
    assert gunicorn.post("/messages", {"body": "x"})[0] == 403          # no session
    expected = lobby_and_alice(db)
    try:
        for b in browsers:
            wait_for(lambda: len(b.ids) >= len(expected), timeout=30, message="a stream missed events")
        for b in browsers:
            assert b.ids == expected        # everything, once, in commit order; none of bob's room
    finally:
        for b in browsers:
            b.close()
    status, _, body = gunicorn.get("/metrics")
    assert status == 200 and b"pgnotify_sync_events_delivered_total" in body
    assert gunicorn.get("/login?user=x;drop")[0] == 400
    assert gunicorn.get("/events/stream?channels=messages")[0] == 403     # no session


class Writers:
    """Threads inserting messages of the lobby until stopped, each its own rows in turn."""

    def __init__(self, dsn, count=2):
        import psycopg2
        self.stop_event = threading.Event()
        self.by_writer = [[] for _ in range(count)]
        self.conns = [psycopg2.connect(**{k: dsn[k] for k in ("host", "port", "user", "password", "dbname")})
                      for _ in range(count)]
        for conn in self.conns:
            conn.autocommit = True
        self.threads = [threading.Thread(target=self._write, args=(i,), daemon=True) for i in range(count)]
        for t in self.threads:
            t.start()

    def _write(self, i):
        with self.conns[i].cursor() as cur:
            while not self.stop_event.wait(0.005):
                cur.execute("INSERT INTO messages (room, author, body) VALUES ('lobby', %s, 'm') RETURNING id",
                            (f"w{i}",))
                self.by_writer[i].append(cur.fetchone()[0])

    def stop(self):
        self.stop_event.set()
        for t in self.threads:
            t.join(10)
        for conn in self.conns:
            conn.close()
        return sorted(i for ids in self.by_writer for i in ids)


def all_exact(browsers, expected, writers):
    """Once every browser has as many events as were written: each exact."""
    for b in browsers:
        wait_for(lambda: len(b.ids) >= len(expected), timeout=30, message="a stream missed events")
    for b in browsers:
        assert_exact(b, expected, writers)


def assert_exact(browser, expected, writers):
    """Every event once (no loss, no repeat), each writer's in its commit order."""
    assert len(browser.ids) == len(set(browser.ids)), "an event was repeated"
    missing = sorted(set(expected) - set(browser.ids))
    assert not missing, f"events lost: {missing[:10]}"
    assert sorted(browser.ids) == expected
    for ids in writers.by_writer:
        mine = set(ids)
        got = [i for i in browser.ids if i in mine]
        bad = [k for k in range(1, len(got)) if got[k] < got[k - 1]]
        assert not bad, f"a writer's events out of order: {got[max(0, bad[0] - 5):bad[0] + 5]}"


def test_sigterm_ends_a_worker_with_open_streams_in_two_seconds_and_browsers_resume_exactly(gunicorn, db, dsn):
    cookie = gunicorn.login("alice")
    browsers = browsers_on_both_workers(gunicorn, cookie)
    writers = Writers(dsn)
    try:
        wait_for(lambda: all(len(b.ids) > 20 for b in browsers), message="the streams got no events")
        victim = browsers[0].streams[-1][0]
        started = time.monotonic()
        os.kill(victim, signal.SIGTERM)
        wait_for(lambda: victim not in gunicorn.workers(), timeout=10, message="the worker did not exit")
        took = time.monotonic() - started
        assert took < 2.0, f"a SIGTERMed worker with open streams took {took:.2f} s"
        moved = [b for b in browsers if victim in b.pids()]
        wait_for(lambda: all(b.streams[-1][0] not in (None, victim) and b.streams[-1][1] == "open" for b in moved),
                 timeout=10, message="the browsers did not reconnect")
        for b in moved:
            assert (victim, "retry") in b.streams, "the stream did not end with a retry"
        wait_for(lambda: all(len(b.ids) > len(browsers[0].ids) // 2 + 50 for b in moved),
                 message="no events after the resume")
    finally:
        expected = writers.stop()
    try:
        all_exact(browsers, expected, writers)
    finally:
        for b in browsers:
            b.close()


def test_a_rolling_restart_loses_and_repeats_nothing_and_sigterm_stops_in_seconds(gunicorn, db, dsn):
    import psycopg2
    cookie = gunicorn.login("alice")
    browsers = browsers_on_both_workers(gunicorn, cookie)
    writers = Writers(dsn)
    # A transaction that began before the restart and commits while the browsers are
    # between workers: a lower id than what they got last (a resume "after the last
    # id" from the log would skip it; the replacement's ring has it in order).
    late = psycopg2.connect(**{k: dsn[k] for k in ("host", "port", "user", "password", "dbname")})
    try:
        wait_for(lambda: all(len(b.ids) > 20 for b in browsers), message="the streams got no events")
        with late.cursor() as cur:
            cur.execute("INSERT INTO messages (room, author, body) VALUES ('lobby', 'late', 'm') RETURNING id")
            writers.by_writer.append([cur.fetchone()[0]])
        wait_for(lambda: all(b.ids[-1] > writers.by_writer[-1][0] + 10 for b in browsers), message="no events")
        old = gunicorn.workers()
        gunicorn.popen.send_signal(signal.SIGHUP)
        wait_for(lambda: all(b.streams[-1][1] == "retry" for b in browsers), timeout=10,
                 message="the old workers did not end the streams")
        late.commit()
        wait_for(lambda: not (gunicorn.workers() & old) and len(gunicorn.workers()) == 2, timeout=20,
                 message="HUP did not replace the workers")
        new = gunicorn.workers()
        wait_for(lambda: all(b.streams[-1][0] in new and b.streams[-1][1] == "open" for b in browsers), timeout=10,
                 message="the browsers did not reconnect to the new workers")
        count = max(len(b.ids) for b in browsers)
        wait_for(lambda: all(len(b.ids) > count + 20 for b in browsers), message="no events after the restart")
    finally:
        late.close()
        expected = writers.stop()
    try:
        all_exact(browsers, expected, writers)
        for b in browsers:
            assert all(end == "retry" for pid, end in b.streams[:-1]), b.streams
        # SIGTERM with the streams open: gunicorn stops in seconds, not graceful_timeout.
        started = time.monotonic()
        gunicorn.popen.send_signal(signal.SIGTERM)
        gunicorn.popen.wait(10)
        took = time.monotonic() - started
        assert took < 5.0, f"gunicorn with open streams took {took:.2f} s to stop"
        served = lambda b: [end for pid, end in b.streams if pid is not None]     # noqa: E731
        wait_for(lambda: all(served(b)[-1] == "retry" for b in browsers), message="streams not ended with retry")
    finally:
        for b in browsers:
            b.close()


# -- examples/indexer.py and examples/batch_job.py ------------------------------------------

class Script:
    """``python examples/<name> ...`` with its output collected."""

    def __init__(self, dsn, name, *args, **env):
        self.popen = subprocess.Popen([sys.executable, os.path.join(EXAMPLES, name), *args], cwd=EXAMPLES,
                                      env=example_env(dsn, **env), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      text=True)
        self.output = Output(self.popen)

    def wait_line(self, text, timeout=30):
        wait_for(lambda: text in self.output.text() or self.popen.poll() is not None, timeout=timeout,
                 message=f"no {text!r}")
        assert text in self.output.text(), self.output.text()

    def wait(self, timeout=30):
        code = self.popen.wait(timeout)
        return code


INDEXER_ENV = {"PG_NOTIFY_CONSUMER_LEASE": "2", "PG_NOTIFY_HANDLER_RETRY_DELAY": "10",
               "PG_NOTIFY_BACKFILL_CHUNK": "200"}


def index_differs(db):
    """Rows where search_index is not what messages says (missing, stale or extra)."""
    return execute(db, """
        SELECT count(*) FROM messages m FULL JOIN search_index s USING (id)
         WHERE m.body <> '' AND (s.id IS NULL OR s.words <> to_tsvector('simple', m.body))
            OR m.id IS NULL OR m.body = '' AND s.id IS NOT NULL""")[0][0]


def test_the_indexer_backfills_survives_sigkill_parks_a_bad_row_and_stops_on_sigterm(db, dsn):
    import random
    execute(db, "CREATE TABLE messages (id bigserial PRIMARY KEY, room text NOT NULL, author text NOT NULL, "
                "body text NOT NULL, at timestamptz NOT NULL DEFAULT now())")
    execute(db, "INSERT INTO messages (room, author, body) SELECT 'lobby', 'old', 'old message ' || g "
                "FROM generate_series(1, 1000) g")
    indexer = Script(dsn, "indexer.py", **INDEXER_ENV)
    indexer.wait_line("indexing as consumer")
    stop = threading.Event()

    def write():
        import psycopg2
        rnd = random.Random(7)
        conn = psycopg2.connect(**{k: dsn[k] for k in ("host", "port", "user", "password", "dbname")})
        conn.autocommit = True
        with conn.cursor() as cur:
            while not stop.wait(0.002):
                action, row = rnd.random(), rnd.randint(1, 1200)
                if action < 0.5:
                    cur.execute("UPDATE messages SET body = body || ' edited' WHERE id = %s", (row,))
                elif action < 0.6:
                    cur.execute("DELETE FROM messages WHERE id = %s", (row,))
                else:
                    cur.execute("INSERT INTO messages (room, author, body) VALUES ('lobby', 'w', 'new words')")
        conn.close()
    writer = threading.Thread(target=write, daemon=True)
    writer.start()
    try:
        wait_for(lambda: execute(db, "SELECT count(*) FROM search_index")[0][0] > 300, message="nothing indexed")
        indexer.popen.kill()                                    # SIGKILL: no goodbye, no checkpoint
        assert indexer.wait() == -signal.SIGKILL
        execute(db, "INSERT INTO messages (room, author, body) VALUES ('lobby', 'w', '')")    # refused by the index
        indexer = Script(dsn, "indexer.py", **INDEXER_ENV)
        indexer.wait_line("indexing as consumer")
        wait_for(lambda: execute(db, "SELECT count(*) FROM pgnotify_sync.dead_letters")[0][0] == 1, timeout=30,
                 message="the empty message was not parked")
    finally:
        stop.set()
        writer.join(10)
    wait_for(lambda: index_differs(db) == 0, timeout=60, message="the index does not equal the table")
    assert execute(db, "SELECT consumer, error_type FROM pgnotify_sync.dead_letters") == [
        ("search-indexer", "ValueError")]
    started = time.monotonic()
    indexer.popen.send_signal(signal.SIGTERM)
    assert indexer.wait(10) == 0, indexer.output.text()
    assert time.monotonic() - started < 5
    assert "is a dead letter after every attempt" in indexer.output.text()


@pytest.fixture
def jobs(db):
    from pgnotify_sync import install, watch_table
    install(db)
    execute(db, "CREATE TABLE jobs (id bigint PRIMARY KEY, status text NOT NULL)")
    watch_table(db, "public.jobs", channel="jobs")
    execute(db, "INSERT INTO jobs VALUES (1, 'running'), (2, 'done'), (3, 'running'), (4, 'running')")
    return db


def test_the_batch_job_waits_for_its_row_with_a_deadline(jobs, dsn):
    waiting = Script(dsn, "batch_job.py", "1", "--timeout-s", "30")
    failing = Script(dsn, "batch_job.py", "3", "--timeout-s", "30")
    waiting.wait_line("job 1: running; waiting up to 30 s")
    failing.wait_line("job 3: running; waiting")
    execute(jobs, "UPDATE jobs SET status = 'done' WHERE id = 1")
    execute(jobs, "UPDATE jobs SET status = 'failed' WHERE id = 3")
    assert waiting.wait() == 0 and "job 1: done" in waiting.output.text()
    assert failing.wait() == 1 and "job 3: failed" in failing.output.text()
    already = Script(dsn, "batch_job.py", "2")
    assert already.wait() == 0 and "job 2: done" in already.output.text()
    late = Script(dsn, "batch_job.py", "4", "--timeout-s", "0.5")
    assert late.wait() == 124 and "job 4: not finished within 0.5 s" in late.output.text()
    bad = Script(dsn, "batch_job.py", "4", POSTGRES_PORT="nope")
    assert bad.wait() == 2 and "POSTGRES_PORT" in bad.output.text()
    away = Script(dsn, "batch_job.py", "4", POSTGRES_PORT=str(free_port()))
    assert away.wait() == 3 and "cannot reach the database" in away.output.text()
