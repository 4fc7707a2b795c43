"""A batch step that waits for another system to finish: job JOB_ID's row in the
table ``jobs`` must reach status ``done`` within a deadline.

    python batch_job.py JOB_ID [--timeout-s 60]     # POSTGRES_* name the database

Exit status: 0 the job is done, 1 it failed (status ``failed``), 124 the deadline
passed first (as ``timeout(1)``), 2 a usage or configuration error, 3 the database
could not be reached (the job's state is unknown: try again). Safe against
the race every "wait for a change" has: the listener listens *before* the row is
read, so a change committed in between is seen either in the read or as an event.
"""

import argparse
import sys
import threading

import psycopg2

from pgnotify_sync import Config, ConfigError, ConnectError, Listener, install, watch_table

DONE, FAILED, TIMED_OUT, USAGE, UNREACHABLE = 0, 1, 124, 2, 3
FINAL = {"done": DONE, "failed": FAILED}


def setup(config):
    """The table (idempotent): the system that runs the jobs would own it."""
    conn = psycopg2.connect(**config.connect_kwargs())
    try:
        install(conn)
        with conn.cursor() as cur:
            cur.execute("CREATE TABLE IF NOT EXISTS jobs (id bigint PRIMARY KEY, status text NOT NULL)")
        conn.commit()
        watch_table(conn, "public.jobs", channel="jobs")
    finally:
        conn.close()


def status_of(config, job_id):
    conn = psycopg2.connect(**config.connect_kwargs())
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT status FROM jobs WHERE id = %s", (job_id,))
            row = cur.fetchone()
    finally:
        conn.close()
    return row[0] if row else None


def wait_for_job(config, job_id, timeout_s):
    """The job's final status, or None when *timeout_s* passed first."""
    final = threading.Event()
    seen = {}

    def on_change(event):
        if event.data.get("id") == job_id and event.data.get("status") in FINAL:
            seen["status"] = event.data["status"]
            final.set()

    listener = Listener(config, name="batch-job")
    listener.on_event("jobs", on_change)
    with listener:                              # listening from here on
        status = status_of(config, job_id)      # ... so nothing falls between read and wait
        if status in FINAL:
            return status
        print(f"job {job_id}: {status or 'not created yet'}; waiting up to {timeout_s:g} s", flush=True)
        return seen["status"] if final.wait(timeout_s) else None


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("job_id", type=int)
    parser.add_argument("--timeout-s", type=float, default=60.0)
    args = parser.parse_args(argv)
    try:
        config = Config.from_env(channels=("jobs",))
    except ConfigError as exc:
        print(f"batch_job: configuration error: {exc}", file=sys.stderr)
        return USAGE
    try:
        setup(config)
        status = wait_for_job(config, args.job_id, args.timeout_s)
    except (psycopg2.OperationalError, ConnectError) as exc:
        print(f"batch_job: cannot reach the database: {str(exc).splitlines()[0]}", file=sys.stderr)
        return UNREACHABLE
    if status is None:
        print(f"job {args.job_id}: not finished within {args.timeout_s:g} s", file=sys.stderr)
        return TIMED_OUT
    print(f"job {args.job_id}: {status}")
    return FINAL[status]


if __name__ == "__main__":
    sys.exit(main())
