"""The fleets figure (issue 15): events/s with a 20 ms handler (a stand-in for a
call to a search server), for a consumer group of 1, 2 and 4 member processes,
and for ``ordering="row"`` against ``"channel"`` in one listener.

- **Members.** ``consumer_partitions=4``; every member is its own process with
  ``worker_pool_size=1``, so a member handles one event at a time and the figure
  shows what more members add (within one member, partitions also run in parallel
  over its workers). The members start and settle (every partition held, spread
  evenly) before the rows are written; the clock runs from the COMMIT of one
  statement of N rows to the last handled row (the handlers record each event in
  a table). The baseline is the 1-member group of the same run.
- **Ordering.** One Listener (no consumer), 4 workers, N rows of distinct keys:
  ``"row"`` against ``"channel"`` (the baseline: one event at a time).
"""

import json
import os
import subprocess
import sys
import time

from bench._common import BenchError, now
from pgnotify_sync import Listener, install, watch_table

HANDLER_S = 0.02
PARTITIONS = 4
MEMBERS = (1, 2, 4)
LEASE_S = 3.0
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

MEMBER = """
import json, sys, threading, time
sys.path.insert(0, {root!r})
import psycopg2
from pgnotify_sync import Config, Listener
args = json.loads({args!r})
record = psycopg2.connect(**args["dsn"])
record.autocommit = True
listener = Listener(Config(**args["cfg"]), consumer="bench-group", registry=False)

@listener.on_event("g_jobs")
def handle(event):
    time.sleep(args["handler_s"])
    with record.cursor() as cur:
        cur.execute("INSERT INTO g_handled VALUES (%s)", (event.id,))

listener.start()
print("ready", flush=True)
sys.stdin.read()            # until the bench closes our stdin
listener.stop(timeout=10)
"""


def _prepare(admin):
    install(admin)
    with admin.cursor() as cur:
        cur.execute("DROP TABLE IF EXISTS g_jobs, g_handled")
        cur.execute("CREATE TABLE g_jobs (id serial PRIMARY KEY, n int)")
        cur.execute("CREATE TABLE g_handled (event_id bigint)")
    watch_table(admin, "public.g_jobs", channel="g_jobs")


def _scalar(admin, sql, params=()):
    with admin.cursor() as cur:
        cur.execute(sql, params)
        return cur.fetchone()[0]


def _wait(predicate, timeout, what):
    deadline = now() + timeout
    while not predicate():
        if now() >= deadline:
            raise BenchError(f"groups: {what} within {timeout} s")
        time.sleep(0.02)


def _write(admin, rows):
    """One statement of *rows* rows; returns the clock at its COMMIT."""
    with admin.cursor() as cur:
        cur.execute("INSERT INTO g_jobs (n) SELECT g FROM generate_series(1, %s) g", (rows,))
    return now()


def _members_once(target, admin, members, rows):
    with admin.cursor() as cur:
        cur.execute("TRUNCATE g_handled")
        cur.execute("DELETE FROM pgnotify_sync.consumers WHERE name = 'bench-group'")
        cur.execute("DELETE FROM pgnotify_sync.consumer_groups WHERE name = 'bench-group'")
        cur.execute("DELETE FROM pgnotify_sync.consumer_members WHERE name = 'bench-group'")
    cfg = target.config
    dsn = dict(host=cfg.postgres_host, port=cfg.postgres_port, user=cfg.postgres_user,
               password=cfg.postgres_password, dbname=cfg.postgres_db)
    config = dict(postgres_host=cfg.postgres_host, postgres_port=cfg.postgres_port, postgres_user=cfg.postgres_user,
                  postgres_password=cfg.postgres_password, postgres_db=cfg.postgres_db, channels=["g_jobs"],
                  consumer_partitions=PARTITIONS, consumer_lease_s=LEASE_S, worker_pool_size=1)
    args = json.dumps({"cfg": config, "dsn": dsn, "handler_s": HANDLER_S})
    procs = []
    try:
        for _ in range(members):
            proc = subprocess.Popen([sys.executable, "-c", MEMBER.format(root=ROOT, args=args)],
                                    stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
            procs.append(proc)
            if proc.stdout.readline().strip() != "ready":
                raise BenchError("groups: a member did not start")
        share = -(-PARTITIONS // members)
        _wait(lambda: _scalar(admin, "SELECT count(DISTINCT owner) = %s AND max(n) <= %s FROM (SELECT owner, "
                                     "count(*) n FROM pgnotify_sync.consumers WHERE name = 'bench-group' AND "
                                     "lease_until > clock_timestamp() GROUP BY owner) o", (members, share)),
              30, f"{members} members did not settle")
        committed = _write(admin, rows)
        _wait(lambda: _scalar(admin, "SELECT count(DISTINCT event_id) FROM g_handled") >= rows, 120,
              f"{members} members did not handle {rows} events")
        return rows / (now() - committed)
    finally:
        for proc in procs:
            try:
                proc.stdin.close()
                proc.wait(20)
            except (OSError, subprocess.TimeoutExpired):
                proc.kill()
                proc.wait()


def _ordering_once(target, ordering, rows):
    done = []
    listener = Listener(target.config_for(channels=("g_jobs",), ordering=ordering, worker_pool_size=4),
                        registry=False)

    def handle(event):
        time.sleep(HANDLER_S)
        done.append(event.id)

    listener.on_event("g_jobs", handle)
    listener.start(timeout_s=30)
    try:
        admin = target.connect(application_name="pgnotify-bench-groups-writer")
        try:
            committed = _write(admin, rows)
        finally:
            admin.close()
        _wait(lambda: len(done) >= rows, 120, f"ordering={ordering} did not deliver {rows} events")
        return rows / (now() - committed)
    finally:
        listener.stop()


def groups(ctx):
    from bench.figures import Line, alternate
    rows = ctx.sizes.group_rows
    runs = {f"members_{n}": [] for n in MEMBERS}
    runs.update(ordering_channel=[], ordering_row=[])
    admin = ctx.target.connect(application_name="pgnotify-bench-groups")
    try:
        _prepare(admin)
        for run in range(ctx.runs):
            for n in alternate(MEMBERS, run):
                runs[f"members_{n}"].append(_members_once(ctx.target, admin, n, rows))
            for ordering in alternate(("channel", "row"), run):
                runs[f"ordering_{ordering}"].append(_ordering_once(ctx.target, ordering, rows))
            ctx.log(f"  run {run + 1}: " + "  ".join(f"{k} {v[-1]:,.0f}/s" for k, v in runs.items()))
    finally:
        admin.close()
    handler = f"{HANDLER_S * 1000:.0f} ms handler"
    lines = [Line(f"group of {n} members ({PARTITIONS} partitions, 1 worker each), {handler}", "events/s",
                  runs[f"members_{n}"], runs["members_1"]) for n in MEMBERS[1:]]
    lines.append(Line(f"ordering='row' vs 'channel' (4 workers, distinct rows), {handler}", "events/s",
                      runs["ordering_row"], runs["ordering_channel"]))
    return lines, {"unit": "events/s", "rows": rows, "handler_s": HANDLER_S, "partitions": PARTITIONS, **runs}
