"""Shared pieces of the benchmark scripts in ``bench/``.

* :func:`bench_target` - where to measure: a throwaway cluster started with
  :class:`pgnotify_sync.testing.TemporaryCluster` (the default; always cleaned
  up), or the server named by the ``POSTGRES_*`` environment variables.
* :func:`prepare_bench_table`, :func:`reset_bench_table`, :func:`drop_bench_table`
  - the watched table ``public.bench_rows``; :func:`prepare_plain_table` - an
  identical table ``public.bench_plain`` with the product spec's "plain row
  trigger" (notify only, no log), the raw baselines' source;
  :func:`write_burst` / :func:`write_transaction` / :class:`BurstWriter` - the
  writer that fills them with multi-row ``INSERT ... SELECT`` statements, one
  transaction each or all in one (by default in its own process).
* :class:`RawReceiver` - the raw baseline: a bare psycopg2 LISTEN loop in a thread.
* :class:`Tally` - counts received events from any thread, records the time of
  the last one and fails a run that stops making progress.
* :data:`now`, :func:`process_cpu_s` - wall clock and CPU clock.
* :func:`summarize`, :func:`print_table`, :func:`machine_info`,
  :func:`print_machine` - figures and their presentation.

Nothing here asserts anything about speed: the scripts print, people judge.
"""

import contextlib
import datetime
import json
import multiprocessing
import os
import platform
import resource
import select
import statistics
import sys
import threading
import time

import attrs
import psycopg2

from pgnotify_sync import Config, install, unwatch_table, watch_table
from pgnotify_sync.testing import TemporaryCluster

#: The clock of every measurement. On Linux it is CLOCK_MONOTONIC (nanosecond
#: resolution): the same clock in every thread and every process of the machine.
now = time.monotonic


def process_cpu_s():
    """CPU seconds (user + system) used so far by this whole process, every thread."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime

BENCH_TABLE = "public.bench_rows"
BENCH_DB = "pgnotify_bench"

#: The raw baselines' table: same columns as ``bench_rows``, with the product
#: spec's plain row trigger (one pg_notify per row, no event log) on channel ``plain``.
PLAIN_TABLE = "public.bench_plain"
PLAIN_CHANNEL = "plain"

#: The "plain row trigger" of the product spec, verbatim (only the channel is ours).
PLAIN_FUNCTION_SQL = """
CREATE OR REPLACE FUNCTION public.plain_notify() RETURNS trigger LANGUAGE plpgsql AS $fn$
BEGIN
    PERFORM pg_notify('plain', json_build_object('operation', TG_OP, 'schema', TG_TABLE_SCHEMA,
                                                 'table', TG_TABLE_NAME, 'data', row_to_json(NEW))::text);
    RETURN NEW;
END
$fn$
"""


class BenchError(RuntimeError):
    """A run could not complete (nothing to do with speed)."""


# -- where to measure -----------------------------------------------------------


@attrs.define
class Target:
    """A database to benchmark against.

    :ivar config: a :class:`Config` holding the connection fields; derive the
        listener's with :meth:`config_for`.
    :ivar owned: True for a throwaway cluster (the bench may truncate anything in
        it); False for a database from the environment (the bench only touches
        its own table and its own event-log rows).
    """

    config: Config
    owned: bool
    description: str
    cluster: object = None

    def config_for(self, **overrides):
        """The base config with *overrides* (channels, buffer size, ...)."""
        return attrs.evolve(self.config, **overrides)

    def connect(self, application_name="pgnotify-bench", autocommit=True, address=None):
        """A plain psycopg2 connection with the same connect arguments a Listener uses
        (to *address* = ``(host, port)`` instead, e.g. the local end of a tunnel)."""
        kwargs = self.config.connect_kwargs(*(address or ()))
        kwargs["application_name"] = application_name
        conn = psycopg2.connect(**kwargs)
        conn.autocommit = autocommit
        return conn


@contextlib.contextmanager
def bench_target(dsn_from_env=False, dbname=BENCH_DB, cluster_settings=None):
    """Yield a :class:`Target`; a throwaway cluster is stopped and deleted on exit,
    whatever happens in the block.

    With *dsn_from_env* the ``POSTGRES_*`` variables name the server and database
    (``Config.from_env``); the database must exist. SSH settings are refused: the
    raw baselines connect directly, so the comparison would not be like for like.
    """
    if dsn_from_env:
        # Channel settings from the environment would change the wire names.
        config = Config.from_env(channels=(), channel_prefix="")
        if config.use_ssh:
            raise BenchError("--dsn-from-env with SSH_HOST set: the raw baseline would bypass the tunnel; "
                             "unset SSH_* (use the ssh-tunnel bench for tunnelled figures)")
        yield Target(config=config, owned=False,
                     description=f"environment: {config.describe_target()}")
        return
    cluster = TemporaryCluster(settings=cluster_settings)
    with cluster:          # start(); cleanup() on exit, even on error
        cluster.create_database(dbname)
        info = cluster.conninfo(dbname)
        config = Config(postgres_host=info["host"], postgres_port=info["port"],
                        postgres_user=info["user"], postgres_password=info["password"],
                        postgres_db=dbname)
        yield Target(config=config, owned=True, cluster=cluster,
                     description=f"throwaway cluster {cluster.host}:{cluster.port} (fsync=off), "
                                 f"database {dbname}")


# -- the watched table ----------------------------------------------------------------


def prepare_bench_table(conn, channel):
    """install() the schema, (re)create ``bench_rows`` and watch it on *channel*."""
    install(conn)
    with conn.cursor() as cur:
        cur.execute("DROP TABLE IF EXISTS public.bench_rows")
        cur.execute("CREATE TABLE public.bench_rows (id bigserial PRIMARY KEY, n int, body text)")
    watch_table(conn, BENCH_TABLE, channel=channel)


def create_rows_table(conn, table):
    """(Re)create *table* with the columns of ``bench_rows`` (no trigger)."""
    with conn.cursor() as cur:
        cur.execute(f"DROP TABLE IF EXISTS {table}")
        cur.execute(f"CREATE TABLE {table} (id bigserial PRIMARY KEY, n int, body text)")


def prepare_plain_table(conn, table=PLAIN_TABLE):
    """(Re)create *table* like ``bench_rows`` with the plain row trigger on channel ``plain``."""
    create_rows_table(conn, table)
    with conn.cursor() as cur:
        cur.execute(PLAIN_FUNCTION_SQL)
        cur.execute(f"CREATE TRIGGER plain_notify AFTER INSERT OR UPDATE OR DELETE ON {table} "
                    "FOR EACH ROW EXECUTE FUNCTION public.plain_notify()")


def drop_plain_table(conn, table=PLAIN_TABLE):
    with conn.cursor() as cur:
        cur.execute(f"DROP TABLE IF EXISTS {table}")
        cur.execute("DROP FUNCTION IF EXISTS public.plain_notify()")


def reset_bench_table(conn, target):
    """Empty ``bench_rows`` and the event log between runs.

    In a throwaway cluster the whole event log is truncated; in a database from
    the environment only this table's rows are deleted from it.
    """
    with conn.cursor() as cur:
        cur.execute("TRUNCATE public.bench_rows RESTART IDENTITY")
        cur.execute(f"SELECT to_regclass('{PLAIN_TABLE}') IS NOT NULL")
        if cur.fetchone()[0]:
            cur.execute(f"TRUNCATE {PLAIN_TABLE} RESTART IDENTITY")
        if target.owned:
            cur.execute("TRUNCATE pgnotify_sync.event_log")
        else:
            cur.execute("DELETE FROM pgnotify_sync.event_log "
                        "WHERE schema_name = 'public' AND table_name = 'bench_rows'")


def drop_bench_table(conn, target):
    """Remove what the bench created (only matters outside a throwaway cluster)."""
    unwatch_table(conn, BENCH_TABLE)
    with conn.cursor() as cur:
        if not target.owned:
            cur.execute("DELETE FROM pgnotify_sync.event_log "
                        "WHERE schema_name = 'public' AND table_name = 'bench_rows'")
        cur.execute("DROP TABLE IF EXISTS public.bench_rows")


def batch_sizes(rows, batch):
    """Split *rows* into transactions of *batch* rows (the last one may be smaller)."""
    full, rest = divmod(rows, batch)
    return [batch] * full + ([rest] if rest else [])


def write_burst(conn, rows, batch, table=BENCH_TABLE):
    """Insert *rows* rows into *table* (``bench_rows``), *batch* rows per autocommit
    transaction (one ``INSERT ... SELECT generate_series``). Returns the time the
    first INSERT was sent (the start of the measured interval).
    """
    if not conn.autocommit:
        raise BenchError("write_burst needs an autocommit connection (one transaction per batch)")
    statement = f"INSERT INTO {table} (n, body) SELECT g, 'x' FROM generate_series(1, %s) g"
    with conn.cursor() as cur:
        started = now()
        for size in batch_sizes(rows, batch):
            cur.execute(statement, (size,))
    return started


def write_transaction(conn, rows, batch, table=BENCH_TABLE):
    """Insert *rows* rows into *table* in *batch*-row statements, all in ONE
    transaction. Returns the :data:`now` times ``(commit_sent, commit_returned)``:
    just before COMMIT was sent and right after it returned."""
    statement = f"INSERT INTO {table} (n, body) SELECT g, 'x' FROM generate_series(1, %s) g"
    autocommit = conn.autocommit
    conn.autocommit = False
    try:
        with conn.cursor() as cur:
            for size in batch_sizes(rows, batch):
                cur.execute(statement, (size,))
        sent = now()
        conn.commit()
        return sent, now()
    finally:
        conn.autocommit = autocommit


def _writer_process(config, pipe):
    """Body of the writer process: one connection, one burst per request."""
    conn = None
    try:
        kwargs = config.connect_kwargs()
        kwargs["application_name"] = "pgnotify-bench-writer"
        conn = psycopg2.connect(**kwargs)
        conn.autocommit = True
        pipe.send(("ready",))
        while True:
            request = pipe.recv()
            if request[0] == "stop":
                return
            if request[0] == "transaction":
                _, rows, batch, table = request
                pipe.send(("done",) + write_transaction(conn, rows, batch, table))
                continue
            _, rows, batch, table = request
            started = write_burst(conn, rows, batch, table)
            pipe.send(("done", started, now()))
    except (EOFError, KeyboardInterrupt):
        pass
    except Exception as exc:  # reported to the parent, which raises BenchError
        try:
            pipe.send(("error", f"{type(exc).__name__}: {str(exc).strip()}"))
        except OSError:
            pass
    finally:
        if conn is not None:
            conn.close()


class BurstWriter:
    """Writes bursts into ``bench_rows``; use as a context manager.

    By default the writer is a separate process (``multiprocessing``, spawned):
    its Python loop then does not compete with the receivers of this process
    for the GIL. In-process (*in_process*), a receiver that holds the GIL while
    a batch's notifications arrive delays the writer's next INSERT and so
    lowers its own figure; that is real for an application that writes and
    listens in one process, but it is not what the receiver costs.

    :meth:`burst` returns ``(started, done)``: :data:`now` times when the first
    INSERT was sent and when the last one returned. ``time.monotonic`` is
    ``CLOCK_MONOTONIC`` on Linux: the same clock in every process.
    """

    def __init__(self, target, in_process=False):
        self.in_process = in_process
        self._target = target
        self._conn = None
        self._proc = None
        self._pipe = None

    def __enter__(self):
        if self.in_process:
            self._conn = self._target.connect(application_name="pgnotify-bench-writer")
            return self
        ctx = multiprocessing.get_context("spawn")   # never fork a process that has threads
        self._pipe, child = ctx.Pipe()
        self._proc = ctx.Process(target=_writer_process, args=(self._target.config, child),
                                 name="pgnotify-bench-writer", daemon=True)
        try:
            self._proc.start()
            child.close()
            self._reply(60.0)
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc_info):
        self.close()

    def describe(self):
        return "in this process (shares the GIL with the receivers)" if self.in_process else "a separate process"

    def burst(self, rows, batch, table=BENCH_TABLE):
        if self.in_process:
            started = write_burst(self._conn, rows, batch, table)
            return started, now()
        self._pipe.send(("burst", rows, batch, table))
        _, started, done = self._reply(None)
        return started, done

    def transaction(self, rows, batch, table=BENCH_TABLE):
        """*rows* rows in ONE transaction; returns ``(commit_sent, commit_returned)``
        as the writer saw them (in its own process by default: its clock is not
        delayed by this process's threads holding the GIL)."""
        if self.in_process:
            return write_transaction(self._conn, rows, batch, table)
        self._pipe.send(("transaction", rows, batch, table))
        _, sent, returned = self._reply(None)
        return sent, returned

    def _reply(self, timeout_s):
        deadline = None if timeout_s is None else now() + timeout_s
        while not self._pipe.poll(0.5):
            if not self._proc.is_alive():
                raise BenchError(f"writer process died (exit code {self._proc.exitcode})")
            if deadline is not None and now() > deadline:
                raise BenchError(f"writer process: no answer within {timeout_s:.0f} s")
        reply = self._pipe.recv()
        if reply[0] == "error":
            raise BenchError(f"writer process: {reply[1]}")
        return reply

    def close(self):
        if self._conn is not None:
            self._conn.close()
            self._conn = None
        if self._proc is not None:
            try:
                self._pipe.send(("stop",))
            except OSError:
                pass
            self._proc.join(10)
            if self._proc.is_alive():
                self._proc.terminate()
                self._proc.join(5)
            self._pipe.close()
            self._proc = None


# -- counting what arrives -------------------------------------------------------------


class Tally:
    """Counts events towards *expected* and records when the last one arrived.

    ``add()`` is kept cheap (no lock, no clock read except for the first and the
    last event) so counting does not weigh on what is measured; it must be called
    by one thread at a time: a receiving thread, or the handlers of one channel
    (which a Listener never runs concurrently). ``wait()`` may run anywhere.

    ``first_at`` / ``last_at`` are :data:`now` times of the first call and of the
    call that reached *expected*.
    """

    def __init__(self, expected):
        self.expected = expected
        self.count = 0
        self.first_at = None
        self.last_at = None
        self.error = None
        self._done = threading.Event()

    def add(self, n=1):
        if self.first_at is None:
            self.first_at = now()
        self.count += n
        if self.count >= self.expected and self.last_at is None:
            self.last_at = now()
            self._done.set()

    def fail(self, error):
        """A receiving thread died: make ``wait()`` raise at once."""
        self.error = error
        self._done.set()

    @property
    def done(self):
        return self._done.is_set()

    def wait(self, idle_timeout_s=30.0, describe=None):
        """Block until *expected* events arrived; raise :class:`BenchError` if a
        receiver failed or the count did not move for *idle_timeout_s*
        (*describe()* adds context to the message)."""
        seen = -1
        idle_since = now()
        while not self._done.wait(0.5):
            count = self.count
            if count != seen:
                seen, idle_since = count, now()
            elif now() - idle_since > idle_timeout_s:
                extra = f" ({describe()})" if describe else ""
                raise BenchError(f"stuck at {count} of {self.expected} events for {idle_timeout_s:.0f} s{extra}")
        if self.error is not None:
            raise BenchError(f"receiver failed: {self.error!r}") from self.error


# -- the raw baseline ------------------------------------------------------------------


class RawReceiver:
    """The raw baseline in a thread: a bare psycopg2 LISTEN loop.

    Autocommit connection, ``LISTEN <channel>``, ``select.select()`` +
    ``conn.poll()``, drain ``conn.notifies`` in order and ``json.loads()`` every
    payload; the events of each drained batch are counted in *tally* (one
    ``add`` per batch: no per-event call that the raw loop would not need).
    With *stamps* (a dict), the receive time (``time.perf_counter()``, read after
    each payload is decoded) is recorded under the row's ``data.n``.

    Use as a context manager: on enter the thread runs and has LISTENed.
    *address* connects somewhere else than the target (a tunnel's local end).
    """

    def __init__(self, target, tally, channel=PLAIN_CHANNEL, stamps=None, address=None):
        self._target = target
        self._tally = tally
        self._channel = channel
        self._stamps = stamps
        self._address = address
        self._listening = threading.Event()
        self._stop = threading.Event()
        self._thread = None

    def __enter__(self):
        self._thread = threading.Thread(target=self._run, name="bench-raw-receiver", daemon=True)
        self._thread.start()
        if not self._listening.wait(30):
            self.close()
            raise BenchError("raw receiver: not listening after 30 s")
        if self._tally.error is not None:
            self.close()
            raise BenchError(f"raw receiver failed: {self._tally.error!r}") from self._tally.error
        return self

    def __exit__(self, *exc_info):
        self.close()

    def close(self):
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
            self._thread = None

    def _run(self):
        tally = self._tally
        try:
            conn = self._target.connect(application_name="pgnotify-bench-raw", address=self._address)
            try:
                with conn.cursor() as cur:
                    cur.execute(f'LISTEN "{self._channel}"')
                self._listening.set()
                notifies = conn.notifies
                loads = json.loads
                stamps = self._stamps
                perf = time.perf_counter
                stop = self._stop
                while not stop.is_set():
                    if select.select([conn], [], [], 0.2) == ([], [], []):
                        continue
                    conn.poll()
                    if notifies:
                        batch = notifies[:]
                        del notifies[:]
                        if stamps is None:
                            for notify in batch:
                                loads(notify.payload)
                        else:
                            for notify in batch:
                                stamps[loads(notify.payload)["data"]["n"]] = perf()
                        tally.add(len(batch))
            finally:
                conn.close()
        except BaseException as exc:  # report it to the waiting main thread
            tally.fail(exc)
            self._listening.set()


class RawReadReceiver(RawReceiver):
    """The bare loop the untrusted wire allows: a RawReceiver on one of *our*
    channels (hints ``{id, xid}``, no row) that reads each drained batch's rows by
    id from the event log on a second connection (one query a batch, the
    listener's hint read) and stamps each row when it is read. What any design
    that takes notifications as hints pays at least, without threads or checks."""

    SQL = ("SELECT data FROM pgnotify_sync.event_log WHERE id = ANY(%s) AND channel = %s ORDER BY id")

    def _run(self):
        tally = self._tally
        try:
            conn = self._target.connect(application_name="pgnotify-bench-raw")
            reader = self._target.connect(application_name="pgnotify-bench-raw-read")
            try:
                with conn.cursor() as cur:
                    cur.execute(f'LISTEN "{self._channel}"')
                self._listening.set()
                notifies, loads, stamps, perf, stop = conn.notifies, json.loads, self._stamps, time.perf_counter, self._stop
                with reader.cursor() as cur:
                    while not stop.is_set():
                        if select.select([conn], [], [], 0.2) == ([], [], []):
                            continue
                        conn.poll()
                        if notifies:
                            ids = [loads(n.payload)["id"] for n in notifies]
                            del notifies[:]
                            cur.execute(self.SQL, (ids, self._channel))
                            for (data,) in cur.fetchall():
                                stamps[data["n"]] = perf()
                            tally.add(len(ids))
            finally:
                conn.close()
                reader.close()
        except BaseException as exc:  # report it to the waiting main thread
            tally.fail(exc)
            self._listening.set()


# -- figures ---------------------------------------------------------------------------


@attrs.frozen
class Summary:
    median: float
    min: float
    max: float
    values: tuple


def summarize(values):
    values = tuple(values)
    if not values:
        raise ValueError("no values to summarize")
    return Summary(statistics.median(values), min(values), max(values), values)


def fmt_rate(value):
    """Events per second with thousands separators: ``118,532``."""
    return f"{value:,.0f}"


def print_table(headers, rows, out=None):
    """Print a plain aligned text table (first column left, the rest right)."""
    out = out or sys.stdout
    table = [list(map(str, headers))] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(headers))]

    def line(row):
        cells = [row[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(row[1:], widths[1:])]
        return "  ".join(cells).rstrip()

    print(line(table[0]), file=out)
    print("  ".join("-" * w for w in widths), file=out)
    for row in table[1:]:
        print(line(row), file=out)


def _cpu_model():
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for text in f:
                if text.startswith("model name"):
                    return text.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_info(conn):
    """(label, value) pairs describing where the figures come from."""
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        usable = os.cpu_count()
    with conn.cursor() as cur:
        cur.execute("SHOW server_version")
        pg_version = cur.fetchone()[0]
    return [
        ("date", datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")),
        ("nproc", f"{usable} (cpu: {_cpu_model()})"),
        ("python", f"{platform.python_implementation()} {platform.python_version()}"),
        ("psycopg2", psycopg2.__version__.split()[0]),
        ("postgresql", pg_version),
        ("host", platform.node()),
    ]


def print_machine(info, extra=(), out=None):
    out = out or sys.stdout
    pairs = list(info) + list(extra)
    width = max(len(k) for k, _ in pairs)
    for key, value in pairs:
        print(f"{key.ljust(width)}  {value}", file=out)
