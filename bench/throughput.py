"""Throughput of a burst of row inserts: a bare psycopg2 LISTEN loop vs. the Listener.

What is measured
----------------
Two identical tables. ``public.bench_rows`` is watched with
``watch_table(..., channel="bench")`` (statement mode, the default: one event-log
``INSERT ... SELECT`` per statement and, for more than 8 rows, ONE notification
``{xid, first, last, n}`` that the Listener answers by reading the rows from the
log). ``public.bench_plain`` has the product spec's plain row trigger: one
``pg_notify('plain', json_build_object(...row_to_json(NEW)))`` per row, no log.
A writer connection inserts ``--rows`` rows as
``INSERT ... SELECT g, 'x' FROM generate_series(1, batch)``, one autocommit
transaction per ``--batch`` rows. The writer runs in a separate process by
default; ``--writer thread`` runs it in this process, where it competes for the
GIL with the receiver (which then slows the writer by about its own CPU cost per
batch). The bursts are received by:

raw
    a bare psycopg2 loop in a thread (``bench._common.RawReceiver``): autocommit
    connection, ``LISTEN plain``, ``select.select()`` + ``conn.poll()``, drain
    ``conn.notifies`` in order and ``json.loads()`` every payload, until every
    row of ``bench_plain`` has arrived;
listener
    ``Listener(Config(channels=("bench",), event_buffer_size=rows + 10,
    worker_pool_size=1))`` with one ``on_event("bench", handler)`` handler that
    counts (decoding, reading the rows from the log, queueing, blinker dispatch
    included) the rows of ``bench_rows``.

With ``--ssh`` a throwaway sshd is started (``tests/sshd.py``) and two more kinds
run in the same alternation: ``raw_ssh`` (the raw loop connected through an
``sshtunnel.SSHTunnelForwarder`` in this process) and ``listener_ssh`` (the
Listener with ``ssh_host=...``: its LISTEN connection and its pool each through
their own tunnel). The report then adds the events/s delivered through the
Listener's tunnel versus its direct connection, and versus the raw loop through
a tunnel.

All figures are ``rows / (last receive - start of the first INSERT)``, in
events per second; for the Listener "receive" is the handler call of the last
row. The writer's own time (start of the first INSERT to the return of the last)
is shown too: when a receiver finishes right after the writer, the writer (the
trigger in PostgreSQL) was the bottleneck, not the receiver. So is the CPU time
this Python process used per event (``getrusage`` of every thread, from the
first INSERT to the last event; the writer loop too with ``--writer thread``):
the receivers' own cost, whatever bounds the rate. (``python -m bench``'s
``delivery`` figure measures the receivers alone: one burst committed at once.)

Runs alternate raw, listener, raw, listener ... (``--runs`` of each) after one
small unmeasured warm-up of each; the tables and the event log are truncated
before every run. The figures depend on the machine, so always compare the
Listener with the raw loop *of the same invocation*. Nothing here asserts speed.

Usage (from the repository root)::

    python -m bench.throughput               # 100,000 rows, batches of 1000, 3 runs
    python -m bench.throughput --quick       # 10,000 rows, 1 run
    python -m bench.throughput --ssh         # + raw and Listener through SSH tunnels
    python bench/throughput.py --rows 50000 --batch 500 --runs 5
    POSTGRES_USER=... POSTGRES_DB=... python -m bench.throughput --dsn-from-env

By default a throwaway cluster (``pgnotify_sync.testing.TemporaryCluster``) is
started and deleted at the end, even on error. ``--dsn-from-env`` uses the
server and database of the ``POSTGRES_*`` variables instead: the schema is
installed there, ``bench_rows`` and ``bench_plain`` are created and dropped, and
only the bench's own rows are deleted from the event log.

The last line is machine-readable::

    RESULT raw=<median events/s> listener=<median events/s> ratio=<listener/raw>
           [ssh_raw=<...> ssh_listener=<...> ssh_ratio=<listener_ssh/raw_ssh> ssh_vs_direct=<listener_ssh/listener>]
"""

import argparse
import contextlib
import logging
import pathlib
import sys

if __package__ in (None, ""):  # run as a file: python bench/throughput.py
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

from bench._common import (PLAIN_CHANNEL, PLAIN_TABLE, BenchError, BurstWriter, RawReceiver, Tally, bench_target,
                           drop_bench_table, drop_plain_table, fmt_rate, machine_info, prepare_bench_table,
                           prepare_plain_table, print_machine, print_table, process_cpu_s, reset_bench_table,
                           summarize)
from pgnotify_sync import Listener, PgNotifyError
from pgnotify_sync.testing import ClusterError

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


def run_raw(target, writer, rows, batch, address=None):
    """The bare loop (RawReceiver) on the plain trigger's table; *address*: through a tunnel."""
    tally = Tally(rows)
    with RawReceiver(target, tally, PLAIN_CHANNEL, address=address):
        cpu_before = process_cpu_s()
        started, writer_done = writer.burst(rows, batch, PLAIN_TABLE)
        tally.wait(IDLE_TIMEOUT_S, describe=lambda: "raw loop")
        cpu_s = process_cpu_s() - cpu_before
    return RunResult(rows, started, writer_done, tally.last_at, cpu_s)


# -- the library --------------------------------------------------------------------


def run_listener(target, writer, rows, batch, ssh=None):
    """The Listener on ``bench_rows``; *ssh*: Config fields of a tunnel to go through."""
    tally = Tally(rows)
    config = target.config_for(channels=(CHANNEL,), event_buffer_size=rows + 10, worker_pool_size=1,
                               application_name="pgnotify-bench-listener", **(ssh or {}))
    listener = Listener(config, name="bench")
    add = tally.add

    @listener.on_event(CHANNEL)
    def count(event):
        add()

    try:
        listener.start(timeout_s=30)
        # Open the pool (and, with --ssh, its tunnel) before the burst, as in a listener
        # that has been running: the first range read would pay for it otherwise.
        listener.publish("bench_warmup", {"warm": True})
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


KINDS = ("raw", "listener")
SSH_KINDS = ("raw_ssh", "listener_ssh")


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
    parser.add_argument("--ssh", action="store_true",
                        help="also measure the raw loop and the Listener through SSH tunnels to a throwaway sshd "
                             "(tests/sshd.py; needs /usr/sbin/sshd)")
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


@contextlib.contextmanager
def _tunnels(target, enabled):
    """With *enabled*: a throwaway sshd, the raw loop's forwarder through it and the
    Listener's Config fields for it; yields ``(raw_address, listener_ssh)`` (or Nones)."""
    if not enabled:
        yield None, None
        return
    from bench._sshd import raw_tunnel, ssh_config_overrides, ssh_server
    with ssh_server() as server:
        overrides = ssh_config_overrides(server)
        with raw_tunnel(server, target.config_for(**overrides)) as address:
            yield address, overrides


def measure(target, args):
    kinds = KINDS + (SSH_KINDS if args.ssh else ())
    results = {kind: [] for kind in kinds}
    admin = target.connect(application_name="pgnotify-bench-admin")
    try:
        prepare_bench_table(admin, CHANNEL)
        prepare_plain_table(admin)
        with BurstWriter(target, in_process=args.writer == "thread") as writer, \
                _tunnels(target, args.ssh) as (raw_address, listener_ssh):
            runners = {
                "raw": lambda rows: run_raw(target, writer, rows, args.batch),
                "listener": lambda rows: run_listener(target, writer, rows, args.batch),
                "raw_ssh": lambda rows: run_raw(target, writer, rows, args.batch, address=raw_address),
                "listener_ssh": lambda rows: run_listener(target, writer, rows, args.batch, ssh=listener_ssh),
            }
            print_machine(machine_info(admin), extra=[
                ("target", target.description),
                ("burst", f"{args.rows:,} rows, {args.batch:,} rows per INSERT ... SELECT transaction"),
                ("writer", writer.describe()),
                ("runs", f"{args.runs} of each, alternating {'/'.join(kinds)}, after one unmeasured warm-up "
                         "of each"),
            ] + ([("ssh", f"throwaway sshd {listener_ssh['ssh_host']}:{listener_ssh['ssh_port']}; raw loop via a "
                          f"local sshtunnel forwarder, Listener via its own two tunnels")] if args.ssh else []))
            print(flush=True)

            warm_rows = min(args.rows, 5 * args.batch)
            for kind in kinds:
                reset_bench_table(admin, target)
                runners[kind](warm_rows)

            for i in range(1, args.runs + 1):
                for kind in (kinds if i % 2 else tuple(reversed(kinds))):
                    reset_bench_table(admin, target)
                    res = runners[kind](args.rows)
                    results[kind].append(res)
                    print(f"run {i} {kind:<12}  {fmt_rate(res.rate):>8} events/s   "
                          f"writer {fmt_rate(res.writer_rate):>8} rows/s   "
                          f"last event {res.tail_s * 1000:6.1f} ms after the writer   "
                          f"client CPU {res.cpu_us_per_event:5.1f} us/event", flush=True)
        reset_bench_table(admin, target)
        if not target.owned:
            drop_bench_table(admin, target)
            drop_plain_table(admin)
    finally:
        admin.close()
    return results


def report(results):
    raw_runs, lib_runs = results["raw"], results["listener"]
    raw = summarize(r.rate for r in raw_runs)
    lib = summarize(r.rate for r in lib_runs)
    writer_raw = summarize(r.writer_rate for r in raw_runs)
    writer_lib = summarize(r.writer_rate for r in lib_runs)
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
            ["writer, plain trigger (raw runs), rows/s", fmt_rate(writer_raw.median), rng(writer_raw),
             len(writer_raw.values)],
            ["writer, our trigger (listener runs), rows/s", fmt_rate(writer_lib.median), rng(writer_lib),
             len(writer_lib.values)],
            ["raw: client CPU, us/event", us(raw_cpu.median), rng(raw_cpu, us), len(raw_cpu.values)],
            ["Listener: client CPU, us/event", us(lib_cpu.median), rng(lib_cpu, us), len(lib_cpu.values)],
        ],
    )
    # When the last event arrives right after the writer's last INSERT returns, the
    # receiver kept up: events/s then measures the writer (the capture trigger).
    every = [r for runs in results.values() for r in runs]
    tails = [r.tail_s for r in every]
    durations = [r.last_received - r.started for r in every]
    if max(t / d for t, d in zip(tails, durations)) < 0.05:
        print()
        print(f"note: in every run the last event arrived at most {max(tails) * 1000:.0f} ms after the writer's "
              "last INSERT returned: both receivers kept up, so events/s is bounded by the writer (the capture "
              "trigger in PostgreSQL), not by the receivers; client CPU per event is what tells them apart.")
    extra = ""
    if "listener_ssh" in results:
        raw_ssh = summarize(r.rate for r in results["raw_ssh"])
        lib_ssh = summarize(r.rate for r in results["listener_ssh"])
        ssh_ratio = lib_ssh.median / raw_ssh.median
        vs_direct = lib_ssh.median / lib.median
        print()
        print("through SSH tunnels (same run):")
        print_table(
            ["figure", "median", "min - max", "runs"],
            [
                ["raw loop via sshtunnel, events/s", fmt_rate(raw_ssh.median), rng(raw_ssh), len(raw_ssh.values)],
                ["Listener via its tunnels, events/s", fmt_rate(lib_ssh.median), rng(lib_ssh), len(lib_ssh.values)],
                ["ratio listener/raw through tunnels", f"{ssh_ratio:.2f}", "", ""],
                ["Listener: tunnel / direct connection", f"{vs_direct:.2f}", "", ""],
                ["raw: tunnel / direct connection", f"{raw_ssh.median / raw.median:.2f}", "", ""],
            ],
        )
        extra = (f" ssh_raw={raw_ssh.median:.0f} ssh_listener={lib_ssh.median:.0f} ssh_ratio={ssh_ratio:.2f}"
                 f" ssh_vs_direct={vs_direct:.2f}")
    print()
    print(f"RESULT raw={raw.median:.0f} listener={lib.median:.0f} ratio={ratio:.2f}{extra}", flush=True)


def main(argv=None):
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    print("pgnotify_sync throughput bench: raw psycopg2 LISTEN loop vs. Listener"
          + (" (direct and through SSH tunnels)" if args.ssh else ""), flush=True)
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
