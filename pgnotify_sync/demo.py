"""``pgnotify-sync demo``: live events from a demo table.

With no database configured (POSTGRES_DB unset) it starts a throwaway local
PostgreSQL (see _cluster.py; as root it runs the server as the ``postgres`` OS
user), installs the schema objects, creates and watches ``demo_messages``, and
prints each event as the demo writer inserts, updates and deletes rows.
"""

import itertools
import os
import sys
import threading
import time

from .config import Config


_print_lock = threading.Lock()


def say(text):
    """One whole line at a time: events and lifecycle lines come from several threads."""
    with _print_lock:
        sys.stdout.write(text + "\n")
        sys.stdout.flush()


def _target(args):
    if os.environ.get("POSTGRES_DB") or args.db:
        from .cli import _config
        return _config(args, channels=("demo",)), None
    from ._cluster import TemporaryCluster
    say("demo: no POSTGRES_DB set: starting a throwaway PostgreSQL ...")
    cluster = TemporaryCluster().start()
    info = cluster.conninfo("postgres")
    say(f"demo: PostgreSQL running on {info['host']}:{info['port']} ({cluster.base_dir})")
    cfg = Config(postgres_host=info["host"], postgres_port=info["port"], postgres_user=info["user"],
                 postgres_password=info["password"], postgres_db=info["dbname"], channels=("demo",),
                 reconnect_delay_ms=100, health_check_interval_s=2.0)
    return cfg, cluster


def run_demo(args):
    import psycopg2

    from .listener import Listener
    from .schema import install, watch_table

    cfg, cluster = _target(args)
    listener = None
    try:
        conn = psycopg2.connect(**cfg.connect_kwargs())
        conn.autocommit = True
        install(conn)
        with conn.cursor() as cur:
            cur.execute("CREATE TABLE IF NOT EXISTS demo_messages (id serial PRIMARY KEY, author text, "
                        "body text, password_hash text, created_at timestamptz DEFAULT now())")
        watch_table(conn, "public.demo_messages", channel="demo", exclude_columns=("password_hash",),
                    channel_prefix=cfg.channel_prefix)
        conn.close()

        listener = Listener(cfg, name="demo")
        received = []
        lock = threading.Lock()

        @listener.on_event("demo")
        def show(event):
            with lock:
                received.append(event.id)
            row = {k: v for k, v in event.data.items() if k != "created_at"}
            say(f"  event #{event.id}: {event.operation.value:<6} {event.schema}.{event.table} {row}")

        listener.signals.reconnecting.connect(
            lambda sender, attempt, delay_s, error, **kw: say(
                f"  (listener: reconnecting, attempt {attempt} in {delay_s:.2f} s: {error})"), weak=False)
        listener.signals.connected.connect(
            lambda sender, **kw: say("  (listener: connected, caught up from the event log)"),
            weak=False)
        listener.start()
        say("demo: listening on channel 'demo'; the writer now changes rows of demo_messages "
            "(password_hash is excluded and never shown)")
        written = _write(cfg, args, cluster)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            with lock:
                if len(received) >= written:
                    break
            time.sleep(0.05)
        with lock:
            got = len(received)
        say(f"demo: {written} changes written, {got} events received")
        return 0 if got >= written else 1
    except KeyboardInterrupt:
        return 130
    finally:
        if listener is not None:
            listener.stop()
        if cluster is not None:
            cluster.cleanup()


def _write(cfg, args, cluster):
    import psycopg2
    authors = itertools.cycle(["ada", "linus", "grace", "guido"])
    written = 0
    count = itertools.count() if args.forever else range(args.changes)
    conn = None
    for i in count:
        if args.restart_server and cluster is not None and i == args.changes // 2:
            say("demo: restarting PostgreSQL; rows written while the listener is away still arrive")
            if conn is not None:
                conn.close()
                conn = None
            cluster.restart(mode="fast")
        if conn is None:
            conn = psycopg2.connect(**cfg.connect_kwargs())
            conn.autocommit = True
        with conn.cursor() as cur:
            step = i % 4
            if step in (0, 1):
                cur.execute("INSERT INTO demo_messages (author, body, password_hash) VALUES (%s, %s, 'hash')",
                            (next(authors), f"message {i}"))
            elif step == 2:
                cur.execute("UPDATE demo_messages SET body = body || ' (edited)' "
                            "WHERE id = (SELECT max(id) FROM demo_messages)")
            else:
                cur.execute("DELETE FROM demo_messages WHERE id = (SELECT min(id) FROM demo_messages)")
            written += cur.rowcount
        time.sleep(args.interval_s)
    if conn is not None:
        conn.close()
    return written
