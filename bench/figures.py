"""The figures of ``python -m bench``, each measured with its baseline in the same run.

Tables (identical columns ``id bigserial, n int, body text``):

``public.bench_rows``
    watched by the library, ``watch_table(..., channel="bench")`` (statement mode,
    the default): one log ``INSERT ... SELECT`` per statement; up to 8 rows are
    notified one by one with their payload, more by one ``{xid, first, last, n}``.
``public.bench_rowmode``
    ``watch_table(..., mode="row")``: one log row and one notification per row.
``public.bench_plain``
    the product spec's "plain row trigger" (``pg_notify('plain', json_build_object
    (...row_to_json(NEW)))`` per row, no log): the raw baselines' source.

Every figure alternates its kinds run by run (A B, then B A, ...) and the tables
are emptied before every measurement.

The event log is not simply emptied: :func:`prepare` seeds it with a history
of 200,000 rows of every earlier transaction id on another channel and ANALYZEs it,
and :meth:`Ctx.reset` deletes only what the bench wrote (then VACUUMs), so the
planner works with the statistics of a log that has been in use, as in
production. (A freshly TRUNCATEd log has no row estimate; see the
``delivery, fresh log`` line.) A figure returns
:class:`Line` objects for the summary table and a JSON-ready dict of every value
measured.
"""

import math
import statistics
import time

import attrs

from bench import _child
from bench.concurrent import concurrent
from bench.groups import groups
from bench.faults import faults
from bench._common import (BENCH_TABLE, PLAIN_CHANNEL, PLAIN_TABLE, BenchError, BurstWriter, RawReadReceiver,
                           RawReceiver, Tally, create_rows_table, fmt_rate, now, prepare_bench_table, prepare_plain_table,
                           process_cpu_s, summarize, write_burst)
from pgnotify_sync import Config, Listener, watch_table
from pgnotify_sync._reader import ADVANCE_EVERY
from pgnotify_sync._listener_args import DEFAULT_CHECKPOINT_EVERY

CHANNEL = "bench"
ROWMODE_TABLE = "public.bench_rowmode"
ROWMODE_CHANNEL = "bench_rowmode"
BATCH = 1000                   # rows per INSERT ... SELECT statement
PER_WRITER_CONNECTION = 1500   # single-row commits/s one paced writer connection is asked for
IDLE_TIMEOUT_S = 30.0
HISTORY_CHANNEL = "bench_history"
HISTORY_ROWS = 200_000


def seed_history(cur):
    """Give the event log a past: rows of earlier (committed) transactions on a
    channel nobody listens to, then ANALYZE, so the planner has the statistics a
    log in use has."""
    cur.execute("TRUNCATE pgnotify_sync.event_log")
    cur.execute("SELECT pg_current_xact_id()::text::bigint")
    top = cur.fetchone()[0]
    cur.execute(
        "INSERT INTO pgnotify_sync.event_log (xid, channel, operation, schema_name, table_name, data) "
        "SELECT (3 + (g::bigint * (%s - 4)) / %s)::text::xid8, %s, 'INSERT', 'public', 'history', "
        "jsonb_build_object('id', g, 'n', g, 'body', 'x') FROM generate_series(1, %s) g",
        (top, HISTORY_ROWS + 1, HISTORY_CHANNEL, HISTORY_ROWS))
    cur.execute("VACUUM ANALYZE pgnotify_sync.event_log")


@attrs.frozen
class Sizes:
    bulk_statements: int        # writer_bulk: 1000-row statements per measurement
    single_inserts: int         # writer_single: autocommit INSERTs per measurement
    delivery_rows: int          # delivery(_ssh): rows of the one-transaction burst
    latency_rate: int           # latency: offered events/s
    latency_s: float            # latency: seconds of paced writing per measurement
    load_rates: tuple           # load: offered events/s
    load_s: float               # load: seconds of paced writing per point
    catchup_rows: int           # catchup: events the consumer is behind
    catchup_deadline_s: float   # catchup: a run is cut off after this long
    memory_rows: int            # memory: the big burst (the small one is 10x smaller)
    memory_sample_s: float      # memory: sampling continues this long after the writer
    memory_handler_s: float     # memory: the slow handler's time per event
    concurrent_s: int           # concurrent: seconds of pgbench per measurement (whole)
    drain_rows: int             # drain: rows of the one statement
    group_rows: int             # groups: rows of the one statement each group handles


FULL = Sizes(bulk_statements=40, single_inserts=3000, delivery_rows=200_000, latency_rate=1000, latency_s=5.0,
             load_rates=(500, 1000, 2000, 4000, 8000), load_s=2.5, catchup_rows=100_000, catchup_deadline_s=20.0,
             memory_rows=1_000_000, memory_sample_s=20.0, memory_handler_s=0.0001, concurrent_s=8,
             drain_rows=100_000, group_rows=400)
QUICK = Sizes(bulk_statements=5, single_inserts=300, delivery_rows=20_000, latency_rate=1000, latency_s=1.5,
              load_rates=(1000, 4000), load_s=1.0, catchup_rows=10_000, catchup_deadline_s=6.0,
              memory_rows=50_000, memory_sample_s=4.0, memory_handler_s=0.0001, concurrent_s=2,
              drain_rows=20_000, group_rows=60)


@attrs.define
class Line:
    """One row of the summary table (values are per run; the table shows medians)."""

    figure: str
    unit: str
    ours: tuple
    baseline: tuple = None
    fmt: object = fmt_rate
    target: str = "info"
    #: (ours Summary, baseline Summary or None) -> "yes" / "NO" / other text
    judge: object = None
    baseline_note: str = ""
    ratio_kind: str = "ratio"   # "ratio" (ours/baseline), "diff" (ours - baseline) or "none"
    footnote: str = ""          # printed under the table


@attrs.define
class Ctx:
    target: object
    admin: object
    sizes: Sizes
    runs: int
    ssh: object = None          # a started tests/sshd.py SshServer with --ssh
    log: object = print
    history_seeded: bool = False
    writer: str = "thread"      # the paced writer: "thread" (this process) or "process"
    peers: bool = False         # --peers: pg-listen in the same runs (bench/peers.py)

    def reset(self, fresh_log=False):
        """Empty the tables and the consumers, and delete the bench's rows from the
        event log (its seeded history stays). *fresh_log*: TRUNCATE the whole log
        instead, as right after install (no statistics, no row estimate)."""
        with self.admin.cursor() as cur:
            cur.execute(f"TRUNCATE {BENCH_TABLE}, {PLAIN_TABLE}, {ROWMODE_TABLE} RESTART IDENTITY")
            cur.execute("DELETE FROM pgnotify_sync.consumers")
            if fresh_log:
                cur.execute("TRUNCATE pgnotify_sync.event_log")
                # As right after install: no statistics either (a throwaway cluster's
                # superuser may do this).
                cur.execute("DELETE FROM pg_statistic WHERE starelid = 'pgnotify_sync.event_log'::regclass")
                self.history_seeded = False
                return
            if not self.history_seeded:
                seed_history(cur)
                self.history_seeded = True
            cur.execute(f"DELETE FROM pgnotify_sync.event_log WHERE channel <> '{HISTORY_CHANNEL}'")
            if cur.rowcount:
                cur.execute("VACUUM pgnotify_sync.event_log")

    def listener_config(self, via_ssh=False, **overrides):
        values = dict(channels=(CHANNEL,), application_name="pgnotify-bench-listener")
        if via_ssh:
            from bench._sshd import ssh_config_overrides
            values.update(ssh_config_overrides(self.ssh))
        values.update(overrides)
        return self.target.config_for(**values)


def prepare(ctx):
    """Create the three tables (in a throwaway cluster: the bench owns everything)."""
    prepare_bench_table(ctx.admin, CHANNEL)
    prepare_plain_table(ctx.admin)
    create_rows_table(ctx.admin, ROWMODE_TABLE)
    watch_table(ctx.admin, ROWMODE_TABLE, channel=ROWMODE_CHANNEL, mode="row")
    ctx.reset()


def alternate(kinds, run):
    """A B C on even runs, C B A on odd ones: no kind always goes first."""
    return list(kinds) if run % 2 == 0 else list(reversed(kinds))


def percentile(values, q):
    """The *q*-th percentile (0..100) by linear interpolation; values need not be sorted."""
    data = sorted(values)
    if not data:
        return float("nan")
    pos = (len(data) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(data) - 1)
    return data[lo] + (data[hi] - data[lo]) * (pos - lo)


def fmt_ms(value):
    return f"{value * 1000:.2f}"


def fmt_mib(value):
    return f"{value / 2**20:.1f}"


def at_least(factor):
    def judge(ours, base):
        return "yes" if ours.median >= factor * base.median else "NO"
    return judge


def absolute_at_least(value):
    def judge(ours, _base):
        return "yes" if ours.median >= value else "NO"
    return judge


# -- 1, 2: the writer ----------------------------------------------------------------

_BULK_SQL = "INSERT INTO {} (n, body) SELECT g, 'x' FROM generate_series(1, %s) g"
_SINGLE_SQL = _child.SINGLE_SQL


def _writer_rates(ctx, kinds, sql, args_of, count, warmups, rows_each, unit):
    """Rows/s of *count* autocommit executions of *sql* (``{}`` is the table,
    ``args_of(i)`` the parameters of the i-th) for each ``(kind, table)``, on one
    connection, kinds alternating run by run; no listener connected."""
    results = {kind: [] for kind, _ in kinds}
    conn = ctx.target.connect(application_name="pgnotify-bench-writer")
    try:
        with conn.cursor() as cur:
            for _kind, table in kinds:           # warm-up: plans, caches
                for i in range(warmups):
                    cur.execute(sql.format(table), args_of(i))
            for run in range(ctx.runs):
                for kind, table in alternate(kinds, run):
                    ctx.reset()
                    statement = sql.format(table)
                    started = now()
                    for i in range(count):
                        cur.execute(statement, args_of(i))
                    results[kind].append(count * rows_each / (now() - started))
                ctx.log(f"  run {run + 1}: " + "  ".join(f"{k} {fmt_rate(results[k][-1])} {unit}"
                                                       for k, _ in kinds))
    finally:
        conn.close()
    return results


def writer_bulk(ctx):
    """Rows/s of 1000-row ``INSERT ... SELECT`` autocommit statements, no listener
    connected (the trigger's cost; NOTIFY queues the same with or without one)."""
    kinds = (("plain", PLAIN_TABLE), ("ours", BENCH_TABLE), ("ours_row", ROWMODE_TABLE))
    statements = ctx.sizes.bulk_statements
    results = _writer_rates(ctx, kinds, _BULK_SQL, lambda i: (BATCH,), statements, 3, BATCH, "rows/s")
    lines = [
        Line("writer_bulk (1000-row INSERT...SELECT)", "rows/s", results["ours"], results["plain"],
             target=">= 1.0x", judge=at_least(1.0)),
        Line("writer_bulk, ours mode=\"row\"", "rows/s", results["ours_row"], results["plain"]),
    ]
    return lines, {"unit": "rows/s", "statements": statements, "rows_per_statement": BATCH, **results}


def writer_single(ctx):
    """Single-row autocommit INSERTs/s, one connection, no listener connected."""
    kinds = (("plain", PLAIN_TABLE), ("ours", BENCH_TABLE))
    inserts = ctx.sizes.single_inserts
    results = _writer_rates(ctx, kinds, _SINGLE_SQL, lambda i: (i,), inserts, 50, 1, "inserts/s")
    lines = [Line("writer_single (autocommit 1-row INSERT)", "inserts/s", results["ours"], results["plain"],
                  target=">= 0.8x", judge=at_least(0.8))]
    return lines, {"unit": "inserts/s", "inserts": inserts, **results}


# -- 3, 4: delivery of a one-transaction burst ------------------------------------------


def _wait_count(tally, count, timeout_s=IDLE_TIMEOUT_S):
    deadline = now() + timeout_s
    while tally.count < count:
        if tally.error is not None:
            raise BenchError(f"receiver failed: {tally.error!r}") from tally.error
        if now() > deadline:
            raise BenchError(f"warm-up: {tally.count} of {count} events after {timeout_s:.0f} s")
        time.sleep(0.005)


def delivery_once(ctx, writer, kind, rows, via_ssh=False, raw_address=None, batch=None, buffer=None):
    """One burst of *rows* rows committed at once by *writer* (a BurstWriter, in its
    own process), in statements of *batch* rows (default BATCH); events/s from
    COMMIT returning (the writer's clock) to the last event. A small warm-up burst
    goes first (connections, pool, tunnels). The Listener's buffer holds the whole
    burst unless *buffer* gives its size."""
    batch = batch or BATCH
    warm = min(2000, rows)
    tally = Tally(warm + rows)
    info = {}
    if kind == "pg_listen":
        from bench.peers import PgListenReceiver
        with PgListenReceiver(ctx.target, warm + rows) as peer:
            writer.transaction(warm, batch, PLAIN_TABLE)
            cpu = process_cpu_s()
            sent, committed = writer.transaction(rows, batch, PLAIN_TABLE)
            tally.last_at = peer.wait(IDLE_TIMEOUT_S)
            cpu = process_cpu_s() - cpu     # ours is nothing: the peer is another process
    elif kind == "raw":
        with RawReceiver(ctx.target, tally, PLAIN_CHANNEL, address=raw_address):
            writer.transaction(warm, batch, PLAIN_TABLE)
            _wait_count(tally, warm)
            cpu = process_cpu_s()
            sent, committed = writer.transaction(rows, batch, PLAIN_TABLE)
            tally.wait(IDLE_TIMEOUT_S, describe=lambda: "raw loop")
            cpu = process_cpu_s() - cpu
    else:
        config = ctx.listener_config(via_ssh=via_ssh, worker_pool_size=1,
                                     event_buffer_size=buffer or warm + rows + 10)
        listener = Listener(config, name=f"bench-{kind}")
        add = tally.add
        listener.on_event(CHANNEL, lambda event: add())
        try:
            listener.start(timeout_s=30)
            writer.transaction(warm, batch, BENCH_TABLE)
            _wait_count(tally, warm)
            cpu = process_cpu_s()
            sent, committed = writer.transaction(rows, batch, BENCH_TABLE)
            tally.wait(IDLE_TIMEOUT_S, describe=lambda: f"listener stats {listener.get_stats()}")
            cpu = process_cpu_s() - cpu
            stats = listener.get_stats()
        finally:
            listener.stop()
        problems = {k: stats.get(k) for k in ("dropped_to_log", "parse_errors", "handler_errors", "reconnects")
                    if stats.get(k)}
        if problems:
            info["problems"] = problems
            ctx.log(f"  note: {kind} was not a clean live run: {problems}")
    elapsed = tally.last_at - committed
    if elapsed <= 0:
        raise BenchError(f"delivery {kind}: the last event arrived {-elapsed * 1000:.1f} ms before the writer saw "
                         "its COMMIT return; no rate can be given from COMMIT returning")
    return rows / elapsed, {"elapsed_s": elapsed, "cpu_us_per_event": cpu / rows * 1e6,
                            "commit_s": committed - sent, "from_commit_sent_s": tally.last_at - sent, **info}


def delivery(ctx):
    rows = ctx.sizes.delivery_rows
    kinds = ("raw", "ours", "ours_fresh_log") + (("pg_listen",) if ctx.peers else ())
    results = {k: [] for k in kinds}
    details = {k: [] for k in kinds}
    with BurstWriter(ctx.target) as writer:
        for run in range(ctx.runs):
            for kind in alternate(kinds, run):
                ctx.reset(fresh_log=kind == "ours_fresh_log")
                rate, info = delivery_once(ctx, writer, "ours" if kind.startswith("ours") else kind, rows)
                results[kind].append(rate)
                details[kind].append(info)
            ctx.log(f"  run {run + 1}: " + "  ".join(
                f"{k} {fmt_rate(results[k][-1])} events/s ({details[k][-1]['cpu_us_per_event']:.1f} us CPU/event, "
                f"COMMIT {details[k][-1]['commit_s'] * 1000:.0f} ms)" for k in kinds))
    lines = [Line("delivery (burst, 1 worker)", "events/s", results["ours"], results["raw"],
                  target=">= 0.8x", judge=at_least(0.8)),
             Line("delivery, fresh (TRUNCATEd) event log", "events/s", results["ours_fresh_log"], results["raw"])]
    if ctx.peers:
        lines.append(Line("delivery (burst, 1 worker) vs pg-listen", "events/s", results["ours"],
                          results["pg_listen"], target=">= 1.2x", judge=at_least(1.2)))
    return lines, {"unit": "events/s", "rows": rows, **results, "details": details}


# The drain with a buffer smaller than the default, for information: pages of a
# statement are a fraction of the buffer (event_buffer_size // 8), so a smaller
# buffer reads a big statement in more, smaller pages.
DRAIN_SMALL_BUFFER = 10_000


def drain(ctx):
    """One statement of drain_rows rows in one transaction (the issue's "100,000-row
    transaction"), the Listener with its default buffer (and with
    DRAIN_SMALL_BUFFER): the range is read page by page, not dropped to a catch-up."""
    rows = ctx.sizes.drain_rows
    default = attrs.fields(Config).event_buffer_size.default
    buffers = {"ours": default, "ours_small_buffer": DRAIN_SMALL_BUFFER}
    kinds = ("raw", "ours", "ours_small_buffer") + (("pg_listen",) if ctx.peers else ())
    results = {k: [] for k in kinds}
    with BurstWriter(ctx.target) as writer:
        for run in range(ctx.runs):
            for kind in alternate(kinds, run):
                ctx.reset()
                rate, info = delivery_once(ctx, writer, "ours" if kind in buffers else kind, rows, batch=rows,
                                           buffer=buffers.get(kind))
                if info.get("problems"):
                    raise BenchError(f"drain: not a live range run: {info['problems']}")
                results[kind].append(rate)
            ctx.log(f"  run {run + 1}: " + "  ".join(f"{k} {fmt_rate(results[k][-1])} events/s" for k in kinds))
    lines = [Line(f"drain: one {fmt_rate(rows)}-row statement, default buffer ({default:,})", "events/s",
                  results["ours"], results["raw"], target="info"),
             Line(f"drain: one {fmt_rate(rows)}-row statement, buffer {DRAIN_SMALL_BUFFER:,}", "events/s",
                  results["ours_small_buffer"], results["raw"], target="info")]
    if ctx.peers:
        lines.append(Line(f"drain: one {fmt_rate(rows)}-row statement vs pg-listen", "events/s", results["ours"],
                          results["pg_listen"], target=">= 1.0x", judge=at_least(1.0)))
    return lines, {"unit": "events/s", "rows": rows, **results}


def delivery_ssh(ctx):
    from bench._sshd import raw_tunnel

    rows = ctx.sizes.delivery_rows
    kinds = ("raw_ssh", "ours_ssh", "ours_direct")
    results = {k: [] for k in kinds}
    details = {k: [] for k in kinds}
    with raw_tunnel(ctx.ssh, ctx.listener_config(via_ssh=True)) as address, BurstWriter(ctx.target) as writer:
        for run in range(ctx.runs):
            for kind in alternate(kinds, run):
                ctx.reset()
                if kind == "raw_ssh":
                    rate, info = delivery_once(ctx, writer, "raw", rows, raw_address=address)
                else:
                    rate, info = delivery_once(ctx, writer, kind, rows, via_ssh=kind == "ours_ssh")
                results[kind].append(rate)
                details[kind].append(info)
            ctx.log(f"  run {run + 1}: " + "  ".join(f"{k} {fmt_rate(results[k][-1])} events/s" for k in kinds))
    lines = [
        Line("delivery_ssh (burst through tunnels)", "events/s", results["ours_ssh"], results["raw_ssh"],
             target=">= 0.8x", judge=at_least(0.8)),
        Line("delivery_ssh, Listener tunnel vs direct", "events/s", results["ours_ssh"], results["ours_direct"]),
    ]
    return lines, {"unit": "events/s", "rows": rows, **results, "details": details}


# -- 5, 6: latency under a paced load ---------------------------------------------------


def paced_write(ctx, table, rate, duration_s, commits):
    """Single-row autocommit INSERTs into *table* at *rate* per second for
    *duration_s*, from ``ceil(rate / 1500)`` writer threads (one connection each),
    in this process (``ctx.writer == "thread"``) or in a child process.

    Row ``n`` is due at ``start + n / rate``; a writer that falls behind does not
    sleep until it has caught up (the offered rate holds on average). After each
    commit returns ``commits[n] = time.perf_counter()``. Returns ``(start, n_due)``.
    """
    k = max(1, math.ceil(rate / PER_WRITER_CONNECTION))
    total = int(rate * duration_s)
    if ctx.writer == "process":
        proc, pipe = _child.run_child(_child.paced_writer_child, ctx.target.config, table, rate, total, k)
        try:
            _child.receive(proc, pipe, 60, "paced writer (start)")
            start = time.perf_counter() + 0.05
            pipe.send(("go", start))
            _, result = _child.receive(proc, pipe, duration_s + 120, "paced writer")
        finally:
            _child.end_child(proc, pipe)
        commits.update(result)
        return start, total
    conns = [ctx.target.connect(application_name=f"pgnotify-bench-paced-{j}") for j in range(k)]
    try:
        start = time.perf_counter() + 0.05
        error = _child.paced_threads(conns, table, rate, total, start, commits)
    finally:
        for conn in conns:
            conn.close()
    if error is not None:
        raise BenchError(f"paced writer failed: {error!r}") from error
    return start, total


def paced_once(ctx, kind, rate, duration_s):
    """Latency of one paced run: commit (client clock after the INSERT returned) ->
    handler (raw: payload decoded), matched by the row's ``n``."""
    commits, stamps = {}, {}
    tally = Tally(10 ** 12)            # only counts; completion is judged by the stamps
    perf = time.perf_counter
    if kind in ("raw", "raw_read"):
        table = PLAIN_TABLE if kind == "raw" else BENCH_TABLE
        receiver = (RawReceiver(ctx.target, tally, PLAIN_CHANNEL, stamps=stamps) if kind == "raw"
                    else RawReadReceiver(ctx.target, tally, CHANNEL, stamps=stamps))
        receiver.__enter__()
        stop = receiver.close
    else:
        table = BENCH_TABLE
        listener = Listener(ctx.listener_config(), name="bench-latency")

        @listener.on_event(CHANNEL)
        def stamp(event):
            stamps[event.data["n"]] = perf()

        listener.start(timeout_s=30)
        stop = listener.stop
    try:
        start, total = paced_write(ctx, table, rate, duration_s, commits)
        deadline, seen, idle_since = now() + 60, -1, now()
        while len(stamps) < total and now() < deadline:
            if len(stamps) != seen:
                seen, idle_since = len(stamps), now()
            elif now() - idle_since > 5:
                break
            if tally.error is not None:
                raise BenchError(f"raw receiver failed: {tally.error!r}") from tally.error
            time.sleep(0.01)
    finally:
        stop()
    warm_until = start + min(0.5, duration_s * 0.2)
    latencies = [stamps[n] - t for n, t in commits.items() if n in stamps and t >= warm_until]
    delivered = [n for n in commits if n in stamps]
    last_commit = max(commits.values())
    last_seen = max(stamps[n] for n in delivered) if delivered else last_commit
    return {
        "offered": rate, "written": len(commits),
        "achieved": len(commits) / (last_commit - start),
        "delivered": len(delivered) / (max(last_seen, last_commit) - start),
        "missing": len(commits) - len(delivered),
        "p50": percentile(latencies, 50), "p99": percentile(latencies, 99), "max": max(latencies, default=0.0),
        "samples": len(latencies),
    }


def latency(ctx):
    rate = ctx.sizes.latency_rate
    # raw_read: the bare loop that reads each hinted row from the log (what the
    # untrusted wire requires of any receiver), beside the raw loop on full payloads.
    kinds = ("raw", "raw_read", "ours")
    runs = {k: [] for k in kinds}
    for run in range(ctx.runs):
        for kind in alternate(kinds, run):
            ctx.reset()
            runs[kind].append(paced_once(ctx, kind, rate, ctx.sizes.latency_s))
        ctx.log(f"  run {run + 1}: " + "  ".join(
            f"{k} p50 {fmt_ms(runs[k][-1]['p50'])} p99 {fmt_ms(runs[k][-1]['p99'])} ms "
            f"(writer {fmt_rate(runs[k][-1]['achieved'])}/s, missing {runs[k][-1]['missing']})" for k in kinds))

    def judge(ours, base):
        return "yes" if ours.median <= base.median + 0.001 else "NO"

    label = f"latency @ {fmt_rate(rate)}/s"
    lines = [
        Line(f"{label} p50", "ms", [r["p50"] for r in runs["ours"]], [r["p50"] for r in runs["raw"]], fmt=fmt_ms,
             ratio_kind="diff"),
        Line(f"{label} p99", "ms", [r["p99"] for r in runs["ours"]], [r["p99"] for r in runs["raw"]], fmt=fmt_ms,
             target="<= raw + 1 ms", judge=judge, ratio_kind="diff"),
        Line(f"{label} p50 vs a bare loop reading the row", "ms", [r["p50"] for r in runs["ours"]],
             [r["p50"] for r in runs["raw_read"]], fmt=fmt_ms, ratio_kind="diff"),
        Line(f"{label} p99 vs a bare loop reading the row", "ms", [r["p99"] for r in runs["ours"]],
             [r["p99"] for r in runs["raw_read"]], fmt=fmt_ms, ratio_kind="diff"),
    ]
    if any(r["p50"] < 0 for rs in runs.values() for r in rs):
        lines[0].footnote = ("latency: a negative latency means the handler ran before the writer thread read its "
                             "clock after the INSERT returned (the notification and the COMMIT's answer race; "
                             "the commit time is the client's, as specified)")
    return lines, {"unit": "seconds", "rate": rate, "duration_s": ctx.sizes.latency_s, "writer": ctx.writer, **runs}


def load(ctx):
    kinds = ("raw", "ours")
    points = {}
    for rate in ctx.sizes.load_rates:
        runs = {k: [] for k in kinds}
        for run in range(ctx.runs):
            for kind in alternate(kinds, run):
                ctx.reset()
                runs[kind].append(paced_once(ctx, kind, rate, ctx.sizes.load_s))
        points[rate] = runs
        ctx.log(f"  offered {fmt_rate(rate)}/s: " + "  ".join(
            f"{k} written {fmt_rate(statistics.median(r['achieved'] for r in runs[k]))}/s "
            f"delivered {fmt_rate(statistics.median(r['delivered'] for r in runs[k]))}/s "
            f"p99 {fmt_ms(statistics.median(r['p99'] for r in runs[k]))} ms" for k in kinds))
    return [], {"unit": "events/s, seconds", "duration_s": ctx.sizes.load_s, "writer": ctx.writer,
                "points": {str(rate): runs for rate, runs in points.items()}}


def load_table(raw):
    """Rows for the load-curve table from :func:`load`'s JSON part. The writer's
    achieved rate is shown per kind: with the writer in this process, a receiver
    that takes more CPU (or GIL) also slows the writer."""
    rows = []
    for rate, runs in raw["points"].items():
        def med(kind, key):
            return statistics.median(r[key] for r in runs[kind])
        rows.append([fmt_rate(int(rate)),
                     fmt_rate(med("ours", "achieved")), fmt_rate(med("ours", "delivered")),
                     fmt_rate(med("raw", "achieved")), fmt_rate(med("raw", "delivered")),
                     fmt_ms(med("ours", "p50")), fmt_ms(med("raw", "p50")),
                     fmt_ms(med("ours", "p99")), fmt_ms(med("raw", "p99")),
                     str(sum(r["missing"] for r in runs["ours"] + runs["raw"]))])
    return (["offered/s", "ours: written/s", "delivered/s", "raw: written/s", "delivered/s", "ours p50 ms",
             "raw p50 ms", "ours p99 ms", "raw p99 ms", "missing"], rows)


# -- 7: catch-up of a durable consumer ----------------------------------------------------


def _catchup_once(ctx, checkpoint_every, rows, deadline_s):
    ctx.reset()
    config = ctx.listener_config()
    registering = Listener(config, consumer="bench", name="bench-consumer-register", registry=False)
    registering.start(timeout_s=30)          # a new consumer starts "now" ...
    registering.stop()                       # ... and is stopped while the rows are written
    write_burst(ctx.admin, rows, BATCH, BENCH_TABLE)
    proc, pipe = _child.run_child(_child.catchup_child, config, rows, checkpoint_every, deadline_s)
    try:
        _, result = _child.receive(proc, pipe, deadline_s + 90, "catchup")
    finally:
        _child.end_child(proc, pipe)
    return result


def catchup(ctx):
    rows, deadline = ctx.sizes.catchup_rows, ctx.sizes.catchup_deadline_s
    # None: the Listener's default (DEFAULT_CHECKPOINT_EVERY); 1: a write per event.
    kinds = (("default", None), ("checkpoint_every=1", 1))
    runs = {k: [] for k, _ in kinds}
    for run in range(ctx.runs):
        for kind, every in alternate(kinds, run):
            runs[kind].append(_catchup_once(ctx, every, rows, deadline))
        ctx.log(f"  run {run + 1}: " + "  ".join(
            f"{k}: {runs[k][-1]['delivered']:,}/{rows:,} in {runs[k][-1]['elapsed_s']:.1f} s = "
            f"{fmt_rate(runs[k][-1]['rate'])}/s" for k, _ in kinds))
    incomplete = [r for r in runs["checkpoint_every=1"] if not r["complete"]]
    note = ""
    if incomplete:
        note = (f"catchup (checkpoint_every=1): {len(incomplete)} of {len(incomplete)} runs cut off at "
                f"{deadline:.0f} s, {min(r['delivered'] for r in incomplete):,} to "
                f"{max(r['delivered'] for r in incomplete):,} of {rows:,} events delivered by then")
    lines = [
        Line(f"catchup, consumer (default checkpoint_every={DEFAULT_CHECKPOINT_EVERY})", "events/s",
             [r["rate"] for r in runs["default"]],
             target=">= 50,000/s", judge=absolute_at_least(50_000), ratio_kind="none",
             baseline_note="n/a: raw NOTIFY loses them"),
        Line("catchup, consumer checkpoint_every=1", "events/s", [r["rate"] for r in runs["checkpoint_every=1"]],
             baseline_note="n/a", ratio_kind="none", footnote=note),
    ]
    return lines, {"unit": "events/s", "rows": rows, "deadline_s": deadline, **runs}


# -- 8: memory ------------------------------------------------------------------------------


# The memory figure's event buffers, beside each other: what event_buffer_size
# bounds (queued items, pages of statements, pages read ahead) shows in RSS.
MEMORY_BUFFERS = (200, 100_000)


def _memory_once(ctx, rows, buffer):
    ctx.reset()
    sizes = ctx.sizes
    config = ctx.listener_config(event_buffer_size=buffer)
    proc, pipe = _child.run_child(_child.memory_child, config, rows, sizes.memory_handler_s, sizes.memory_sample_s)
    try:
        _child.receive(proc, pipe, 60, "memory (start)")
        write_burst(ctx.admin, rows, BATCH, BENCH_TABLE)
        pipe.send(("written",))
        _, result = _child.receive(proc, pipe, sizes.memory_sample_s + 60, "memory")
    finally:
        _child.end_child(proc, pipe)
    return result


def memory(ctx):
    """Peak VmRSS growth of the Listener's process during a big and a 10x smaller burst
    (1000-row autocommit statements), slow handler, with each of MEMORY_BUFFERS as
    event_buffer_size. One run of each (each burst in a fresh process), small first."""
    big = ctx.sizes.memory_rows
    small = big // 10
    results = {}
    lines = []
    for buffer in MEMORY_BUFFERS:
        by = results[buffer] = {}
        for label, rows in (("small", small), ("big", big)):
            r = _memory_once(ctx, rows, buffer)
            by[label] = r
            ctx.log(f"  buffer {buffer:,}, {rows:,} events: baseline {fmt_mib(r['baseline_rss'])} MiB, peak "
                    f"+{fmt_mib(r['growth'])} MiB, {r['delivered']:,} handled in {r['sampled_s'] - r['write_s']:.1f} s "
                    f"after the writer ({'all' if r['drained'] else 'cut off'}), dropped to log "
                    f"{r['dropped_to_log']:,}, held (queue_size) up to {r['queue_peak']:,}, handled-id set "
                    f"{r['handled_ids']:,}")
        extra = by["big"]["growth"] - by["small"]["growth"]
        per_event = extra / (big - small)
        held = max(by["big"]["handled_ids_peak"], by["big"]["handled_ids"])
        # Flat: the extra events cost well under what holding one costs (~100s of bytes),
        # and the handled-id set stays within its bound: ids of transactions the position
        # does not cover yet, pruned by the marker round trip every ADVANCE_EVERY events
        # (plus what the buffer and one batch hold meanwhile).
        flat_rss = per_event < 16
        id_bound = ADVANCE_EVERY + 2 * buffer
        bounded = held <= id_bound
        by["extra_growth_bytes"] = extra
        by["extra_bytes_per_event"] = per_event

        def judge(_ours, _base, flat_rss=flat_rss, bounded=bounded, per_event=per_event):
            if flat_rss and bounded:
                return f"flat ({per_event:+.1f} B/extra event)"
            if flat_rss:
                return f"RSS flat ({per_event:+.1f} B/ev), ids grow"
            return f"GROWS ({per_event:+.1f} B/extra event)"

        b = by["big"]
        note = (f"memory, event_buffer_size {buffer:,}: the {big:,}-event burst was "
                f"{'drained' if b['drained'] else 'cut off'} {b['sampled_s'] - b['write_s']:.0f} s after the writer "
                f"with {b['delivered']:,} events handled, {b['dropped_to_log']:,} dropped to the log; held "
                f"(queue_size) up to {b['queue_peak']:,} events; up to {held:,} handled ids (bound {id_bound:,}: "
                f"the position advances every {ADVANCE_EVERY:,} events)")
        lines.append(Line(f"memory: peak RSS growth, buffer {buffer:,}, {fmt_rate(big)} events "
                          f"(baseline: {fmt_rate(small)})", "MiB", [b["growth"]], [by["small"]["growth"]],
                          fmt=fmt_mib, target="flat vs 10x smaller burst", judge=judge, footnote=note))
    return lines, {"unit": "bytes", "handler_s": ctx.sizes.memory_handler_s, "event_buffer_sizes": MEMORY_BUFFERS,
                   "sample_s": ctx.sizes.memory_sample_s, **{str(k): v for k, v in results.items()}}


FIGURES = {
    "writer_bulk": writer_bulk,
    "writer_single": writer_single,
    "delivery": delivery,
    "delivery_ssh": delivery_ssh,
    "latency": latency,
    "load": load,
    "catchup": catchup,
    "memory": memory,
    "faults": faults,
    "concurrent": concurrent,
    "drain": drain,
    "groups": groups,
}


def summary_row(line):
    """``[figure, ours, baseline, ratio, target, met?]`` for one :class:`Line`."""
    ours = summarize(line.ours)

    def cell(s):
        text = line.fmt(s.median)
        if len(s.values) > 1:
            text += f" ({line.fmt(s.min)} - {line.fmt(s.max)})"
        return text

    base = summarize(line.baseline) if line.baseline else None
    ratio = ""
    if base is not None and line.ratio_kind == "ratio" and base.median > 0 and ours.median >= 0:
        ratio = f"{ours.median / base.median:.2f}x"
    elif base is not None and line.ratio_kind == "diff":
        ratio = f"{'+' if ours.median >= base.median else '-'}{line.fmt(abs(ours.median - base.median))}"
    met = line.judge(ours, base) if line.judge else "info"
    return [f"{line.figure} [{line.unit}]", cell(ours), cell(base) if base else line.baseline_note, ratio,
            line.target, met]
