"""Throughput of a burst of row inserts: a bare psycopg2 LISTEN loop vs. the Listener.

What is measured
----------------
A table ``public.bench_rows`` is watched with ``watch_table(..., channel="bench")``,
so every inserted row goes through the library's capture trigger (one event-log
row plus one ``pg_notify`` of a JSON payload). A writer connection then inserts
``--rows`` rows as ``INSERT ... SELECT g, 'x' FROM generate_series(1, batch)``,
one autocommit transaction per ``--batch`` rows. The writer runs in a separate
process by default; ``--writer thread`` runs it in this process, where it
competes for the GIL with the receiver (which then slows the writer by about
its own CPU cost per batch). The same burst is received by:

raw
    a bare psycopg2 loop in a thread: autocommit connection, ``LISTEN bench``,
    ``select.select()`` + ``conn.poll()``, drain ``conn.notifies`` in order and
    ``json.loads()`` every payload, until every row has arrived;
listener
    ``Listener(Config(channels=("bench",), event_buffer_size=rows + 10,
    worker_pool_size=1))`` with one ``on_event("bench", handler)`` handler that
    counts (decoding to ``DatabaseEvent``, queueing, blinker dispatch included).

Both figures are ``rows / (last receive - start of the first INSERT)``, in
events per second; for the Listener "receive" is the handler call of the last
row. The writer's own time (start of the first INSERT to the return of the last)
is shown too: when a receiver finishes right after the writer, the writer (the
trigger in PostgreSQL) was the bottleneck, not the receiver. So is the CPU time
this Python process used per event (``getrusage`` of every thread, from the
first INSERT to the last event; the writer loop too with ``--writer thread``):
the receivers' own cost, whatever bounds the rate.

Runs alternate raw, listener, raw, listener ... (``--runs`` of each) after one
small unmeasured warm-up of each; ``bench_rows`` and the event log are truncated
before every run. The figures depend on the machine, so always compare the
Listener with the raw loop *of the same invocation*. Nothing here asserts speed.

Usage (from the repository root)::

    python -m bench.throughput               # 100,000 rows, batches of 1000, 3 runs
    python -m bench.throughput --quick       # 10,000 rows, 1 run
    python bench/throughput.py --rows 50000 --batch 500 --runs 5
    POSTGRES_USER=... POSTGRES_DB=... python -m bench.throughput --dsn-from-env

By default a throwaway cluster (``pgnotify_sync._cluster.TemporaryCluster``) is
started and deleted at the end, even on error. ``--dsn-from-env`` uses the
server and database of the ``POSTGRES_*`` variables instead: the schema is
installed there, ``bench_rows`` is created and dropped, and only its own rows
are deleted from the event log.

The last line is machine-readable::

    RESULT raw=<median events/s> listener=<median events/s> ratio=<listener/raw>
"""

import argparse
import json
import logging
import pathlib
import select
import sys
import threading

if __package__ in (None, ""):  # run as a file: python bench/throughput.py
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

from bench._common import (BenchError, BurstWriter, Tally, bench_target, drop_bench_table, fmt_rate,
                           machine_info, prepare_bench_table, print_machine, print_table, process_cpu_s,
                           reset_bench_table, summarize)
from pgnotify_sync import Listener, PgNotifyError
from pgnotify_sync._cluster import ClusterError

CHANNEL = "bench"
IDLE_TIMEOUT_S = 30.0


class RunResult:
    __slots__ = ("rows", "started", "writer_done", "last_received", "cpu_s")

    def __init__(self, rows, started, writer_done, last_received, cpu_s):
        self.rows = rows
        self.started = started
        self.writer_done = writer_done
        self.last_received = last_received
        self.cpu_s = cpu_s

    @property
    def rate(self):
        """Events per second: first INSERT sent -> last event received."""
        return self.rows / (self.last_received - self.started)

    @property
    def writer_rate(self):
        """Rows per second the writer managed (first INSERT sent -> last INSERT returned)."""
        return self.rows / (self.writer_done - self.started)

    @property
    def tail_s(self):
        """How long after the writer finished the last event arrived."""
        return self.last_received - self.writer_done

    @property
    def cpu_us_per_event(self):
        """CPU of every thread of this process per event, in microseconds (the receiver;
        the writer loop too with ``--writer thread``)."""
        return self.cpu_s / self.rows * 1e6


# -- the raw baseline ---------------------------------------------------------------


def _raw_receive(target, tally, listening, stop):
    """The bare loop: LISTEN, select, poll, drain in order, json.loads each payload."""
    try:
        conn = target.connect(application_name="pgnotify-bench-raw")
        try:
            with conn.cursor() as cur:
                cur.execute(f"LISTEN {CHANNEL}")
            listening.set()
            notifies = conn.notifies
            loads = json.loads
            while not tally.done and not stop.is_set():
                if select.select([conn], [], [], 0.5) == ([], [], []):
                    continue
                conn.poll()
                if notifies:
                    batch = notifies[:]
                    del notifies[:]
                    for notify in batch:
                        loads(notify.payload)
                    tally.add(len(batch))
        finally:
            conn.close()
    except BaseException as exc:  # report it to the waiting main thread
        tally.fail(exc)
        listening.set()


def run_raw(target, writer, rows, batch):
    tally = Tally(rows)
    listening = threading.Event()
    stop = threading.Event()
    thread = threading.Thread(target=_raw_receive, args=(target, tally, listening, stop),
                              name="bench-raw-receiver", daemon=True)
    thread.start()
    try:
        if not listening.wait(30):
            raise BenchError("raw receiver: not listening after 30 s")
        if tally.error is not None:
            raise BenchError(f"raw receiver failed: {tally.error!r}") from tally.error
        cpu_before = process_cpu_s()
        started, writer_done = writer.burst(rows, batch)
        tally.wait(IDLE_TIMEOUT_S, describe=lambda: "raw loop")
        cpu_s = process_cpu_s() - cpu_before
    finally:
        stop.set()
        thread.join(5)
    return RunResult(rows, started, writer_done, tally.last_at, cpu_s)


# -- the library --------------------------------------------------------------------


def run_listener(target, writer, rows, batch):
    tally = Tally(rows)
    config = target.config_for(channels=(CHANNEL,), event_buffer_size=rows + 10, worker_pool_size=1,
                               application_name="pgnotify-bench-listener")
    listener = Listener(config, name="bench")
    add = tally.add

    @listener.on_event(CHANNEL)
    def count(event):
        add()

    try:
        listener.start(timeout_s=30)
        cpu_before = process_cpu_s()
        started, writer_done = writer.burst(rows, batch)
        tally.wait(IDLE_TIMEOUT_S, describe=lambda: f"listener stats {listener.get_stats()}")
        cpu_s = process_cpu_s() - cpu_before
        stats = listener.get_stats()
    finally:
        listener.stop()
    problems = {k: stats.get(k) for k in ("dropped_to_log", "parse_errors", "handler_errors", "caught_up",
                                          "reconnects") if stats.get(k)}
    if problems:
        # Not fatal (nothing was lost), but the figure no longer measures the live path.
        print(f"  note: listener run was not a clean live run: {problems}", flush=True)
    return RunResult(rows, started, writer_done, tally.last_at, cpu_s)


# -- driver -------------------------------------------------------------------------


KINDS = (("raw", run_raw), ("listener", run_listener))


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        prog="python -m bench.throughput",
        description="Events/s of a burst of watched-row inserts: bare psycopg2 LISTEN loop vs. Listener.")
    parser.add_argument("--rows", type=int, default=None, help="rows per run (default 100000; 10000 with --quick)")
    parser.add_argument("--batch", type=int, default=1000, help="rows per INSERT transaction (default 1000)")
    parser.add_argument("--runs", type=int, default=None, help="runs of each kind (default 3; 1 with --quick)")
    parser.add_argument("--quick", action="store_true", help="10000 rows, 1 run (explicit --rows/--runs win)")
    parser.add_argument("--writer", choices=("process", "thread"), default="process",
                        help="where the writer runs: a separate process (default) or a thread of this process, "
                             "competing with the receivers for the GIL")
    parser.add_argument("--dsn-from-env", action="store_true",
                        help="use the POSTGRES_* environment variables instead of a throwaway cluster")
    args = parser.parse_args(argv)
    if args.rows is None:
        args.rows = 10_000 if args.quick else 100_000
    if args.runs is None:
        args.runs = 1 if args.quick else 3
    for name in ("rows", "batch", "runs"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1")
    return args


def measure(target, args):
    results = {kind: [] for kind, _ in KINDS}
    admin = target.connect(application_name="pgnotify-bench-admin")
    try:
        prepare_bench_table(admin, CHANNEL)
        with BurstWriter(target, in_process=args.writer == "thread") as writer:
            print_machine(machine_info(admin), extra=[
                ("target", target.description),
                ("burst", f"{args.rows:,} rows, {args.batch:,} rows per INSERT ... SELECT transaction"),
                ("writer", writer.describe()),
                ("runs", f"{args.runs} of each, alternating raw/listener, after one unmeasured warm-up of each"),
            ])
            print(flush=True)

            warm_rows = min(args.rows, 5 * args.batch)
            for _kind, run in KINDS:
                reset_bench_table(admin, target)
                run(target, writer, warm_rows, args.batch)

            for i in range(1, args.runs + 1):
                for kind, run in KINDS:
                    reset_bench_table(admin, target)
                    res = run(target, writer, args.rows, args.batch)
                    results[kind].append(res)
                    print(f"run {i} {kind:<8}  {fmt_rate(res.rate):>8} events/s   "
                          f"writer {fmt_rate(res.writer_rate):>8} rows/s   "
                          f"last event {res.tail_s * 1000:6.1f} ms after the writer   "
                          f"client CPU {res.cpu_us_per_event:5.1f} us/event", flush=True)
        reset_bench_table(admin, target)
        if not target.owned:
            drop_bench_table(admin, target)
    finally:
        admin.close()
    return results


def report(results):
    raw_runs, lib_runs = results["raw"], results["listener"]
    raw = summarize(r.rate for r in raw_runs)
    lib = summarize(r.rate for r in lib_runs)
    writer = summarize(r.writer_rate for r in raw_runs + lib_runs)
    raw_cpu = summarize(r.cpu_us_per_event for r in raw_runs)
    lib_cpu = summarize(r.cpu_us_per_event for r in lib_runs)
    ratio = lib.median / raw.median

    def rng(s, fmt=fmt_rate):
        return f"{fmt(s.min)} - {fmt(s.max)}"

    def us(value):
        return f"{value:.1f}"

    print()
    print_table(
        ["figure", "median", "min - max", "runs"],
        [
            ["raw psycopg2 loop, events/s", fmt_rate(raw.median), rng(raw), len(raw.values)],
            ["Listener (1 worker), events/s", fmt_rate(lib.median), rng(lib), len(lib.values)],
            ["ratio listener/raw (medians)", f"{ratio:.2f}", "", ""],
            ["writer alone (all runs), rows/s", fmt_rate(writer.median), rng(writer), len(writer.values)],
            ["raw: client CPU, us/event", us(raw_cpu.median), rng(raw_cpu, us), len(raw_cpu.values)],
            ["Listener: client CPU, us/event", us(lib_cpu.median), rng(lib_cpu, us), len(lib_cpu.values)],
        ],
    )
    # When the last event arrives right after the writer's last INSERT returns, the
    # receiver kept up: events/s then measures the writer (the capture trigger).
    tails = [r.tail_s for r in raw_runs + lib_runs]
    durations = [r.last_received - r.started for r in raw_runs + lib_runs]
    if max(t / d for t, d in zip(tails, durations)) < 0.05:
        print()
        print(f"note: in every run the last event arrived at most {max(tails) * 1000:.0f} ms after the writer's "
              "last INSERT returned: both receivers kept up, so events/s is bounded by the writer (the capture "
              "trigger in PostgreSQL), not by the receivers; client CPU per event is what tells them apart.")
    print()
    print(f"RESULT raw={raw.median:.0f} listener={lib.median:.0f} ratio={ratio:.2f}", flush=True)


def main(argv=None):
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    print("pgnotify_sync throughput bench: raw psycopg2 LISTEN loop vs. Listener", flush=True)
    try:
        with bench_target(args.dsn_from_env) as target:
            results = measure(target, args)
    except (BenchError, ClusterError, PgNotifyError) as exc:
        print(f"bench failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    report(results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
