"""The concurrent-writers figure (issue 14): pgbench, 16 clients, fsync on.

Each run is ``pgbench -n -c 16 -j 2 -T <s>`` of one single-row autocommit INSERT
into a table with: no trigger; the product spec's plain NOTIFY row trigger, read
by the raw select/poll loop; our capture (default); our capture with
``notify=False``. For ours, a Listener runs during the load and must deliver every
row written (else the run fails). A fresh cluster with ``fsync=on``: with fsync off
NOTIFY's commit-time lock costs almost nothing, and the figure would say nothing
about production. Kinds alternate run by run.
"""

import os
import re
import subprocess
import tempfile
import time

from bench._common import PLAIN_CHANNEL, PLAIN_FUNCTION_SQL, BenchError, RawReceiver, Tally, bench_target, now
from pgnotify_sync import Listener, install, watch_table
from pgnotify_sync.testing import find_pg_bindir

CLIENTS = 16
KINDS = ("none", "plain", "ours", "ours_notify_free")
TABLES = {"none": "w_none", "plain": "w_plain", "ours": "w_ours", "ours_notify_free": "w_quiet"}


def _prepare(conn):
    install(conn)
    with conn.cursor() as cur:
        for table in TABLES.values():
            cur.execute(f"DROP TABLE IF EXISTS {table}")
            cur.execute(f"CREATE TABLE {table} (id bigserial PRIMARY KEY, client int, body text)")
        cur.execute(PLAIN_FUNCTION_SQL)
        cur.execute("CREATE TRIGGER plain_notify AFTER INSERT ON w_plain FOR EACH ROW "
                    "EXECUTE FUNCTION public.plain_notify()")
    watch_table(conn, "public.w_ours", channel="w_ours")
    watch_table(conn, "public.w_quiet", channel="w_quiet", notify=False)


def _pgbench(target, table, seconds, folder):
    script = os.path.join(folder, f"{table}.sql")
    with open(script, "w") as f:
        f.write(f"INSERT INTO {table} (client, body) VALUES (:client_id, 'a row from a concurrent writer');\n")
    cfg = target.config
    env = dict(os.environ, PGPASSWORD=cfg.postgres_password)
    proc = subprocess.run([os.path.join(find_pg_bindir(), "pgbench"), "-n", "-h", cfg.postgres_host,
                           "-p", str(cfg.postgres_port), "-U", cfg.postgres_user, "-c", str(CLIENTS), "-j", "2",
                           "-T", str(seconds), "-f", script, cfg.postgres_db],
                          env=env, capture_output=True, text=True, timeout=seconds + 60)
    found = re.search(r"tps = ([0-9.]+) \(without initial connection time\)", proc.stdout)
    if proc.returncode != 0 or not found:
        raise BenchError(f"pgbench failed ({proc.returncode}): {proc.stderr.strip()[-300:]}")
    return float(found.group(1))


def _wait(predicate, deadline):
    while not predicate():
        if now() >= deadline:
            return False
        time.sleep(0.01)
    return True


def _rows(conn, table):
    with conn.cursor() as cur:
        cur.execute(f"SELECT count(*) FROM {table}")
        return cur.fetchone()[0]


def _once(target, admin, kind, seconds, folder):
    table = TABLES[kind]
    with admin.cursor() as cur:
        cur.execute(f"TRUNCATE {table} RESTART IDENTITY")
        cur.execute("TRUNCATE pgnotify_sync.event_log")
        cur.execute("CHECKPOINT")
    tally = Tally(10 ** 12)
    receiver = listener = None
    if kind == "plain":
        receiver = RawReceiver(target, tally, PLAIN_CHANNEL)
        receiver.__enter__()
    elif kind != "none":
        listener = Listener(target.config_for(channels=(table,), poll_interval_s=0.1,
                                              application_name="pgnotify-bench-concurrent"), registry=False)
        listener.on_event(table, lambda event: tally.add())
        listener.start(timeout_s=30)
    try:
        tps = _pgbench(target, table, seconds, folder)
        written = _rows(admin, table)
        if listener is not None or receiver is not None:
            if not _wait(lambda: tally.count >= written, now() + 60):
                raise BenchError(f"concurrent {kind}: delivered {tally.count} of {written} rows")
        if tally.count > written and kind != "plain":
            raise BenchError(f"concurrent {kind}: delivered {tally.count} events for {written} rows")
    finally:
        if receiver is not None:
            receiver.close()
        if listener is not None:
            listener.stop()
    return tps


def concurrent(ctx):
    from bench.figures import Line, alternate, at_least
    seconds = ctx.sizes.concurrent_s
    runs = {kind: [] for kind in KINDS}
    settings = {"fsync": "on", "max_connections": "60"}
    with bench_target(cluster_settings=settings) as target, tempfile.TemporaryDirectory() as folder:
        admin = target.connect(application_name="pgnotify-bench-concurrent-admin")
        try:
            _prepare(admin)
            for run in range(ctx.runs):
                for kind in alternate(KINDS, run):
                    runs[kind].append(_once(target, admin, kind, seconds, folder))
                ctx.log(f"  run {run + 1}: " + "  ".join(f"{k} {runs[k][-1]:,.0f} tps" for k in KINDS))
        finally:
            admin.close()
    label = f"concurrent writers ({CLIENTS} pgbench clients, fsync on)"
    lines = [
        Line(f"{label} no trigger", "commits/s", runs["none"], runs["plain"]),
        Line(f"{label} ours, notify=False", "commits/s", runs["ours_notify_free"], runs["plain"],
             target=">= 2.0x", judge=at_least(2.0)),
        Line(f"{label} ours (default)", "commits/s", runs["ours"], runs["plain"], target=">= 1.0x", judge=at_least(1.0)),
    ]
    return lines, {"unit": "commits/s", "clients": CLIENTS, "seconds": seconds, **runs}
