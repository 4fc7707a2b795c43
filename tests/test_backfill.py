"""Backfill (issue 16, part 4): a durable consumer gets a table's existing rows once,
interleaved with live changes, so a mirror applying BACKFILL as an upsert ends equal to
the table, against the real server with concurrent writers."""

import random
import threading
from decimal import Decimal

import pytest

from pgnotify_sync import Operation, install, watch_table

from helpers import wait_for
from pgutil import execute


@pytest.fixture
def items(db):
    install(db)
    execute(db, "CREATE TABLE items (id int PRIMARY KEY, v int, secret text, price numeric DEFAULT 1.50)")
    execute(db, "INSERT INTO items SELECT g, 0, 'pw' FROM generate_series(1, 20000) g")
    watch_table(db, "public.items", channel="items", exclude_columns=["secret"])
    return db


class Mirror:
    """What a consumer holding the table's rows would have (upserts and deletes)."""

    def __init__(self):
        self.rows = {}
        self.backfilled = 0
        self.lock = threading.Lock()

    def __call__(self, event):
        with self.lock:
            if event.operation is Operation.DELETE:
                self.rows.pop(event.data["id"], None)
            else:
                assert "secret" not in event.data
                assert isinstance(event.data["price"], Decimal)     # as in live events: a number
                self.rows[event.data["id"]] = event.data["v"]
                self.backfilled += event.operation is Operation.BACKFILL


def backfill_done(db):
    rows = execute(db, "SELECT done FROM pgnotify_sync.backfills")
    return bool(rows) and rows[0][0]


def table(db):
    return dict(execute(db, "SELECT id, v FROM items"))


def test_a_backfill_under_concurrent_writes_ends_with_the_table(items, make_listener, dsn):
    import psycopg2
    stop = threading.Event()

    def write(seed):
        rnd = random.Random(seed)
        conn = psycopg2.connect(**{k: dsn[k] for k in ("host", "port", "user", "password", "dbname")})
        conn.autocommit = True
        n = 30000 + seed * 1000
        with conn.cursor() as cur:
            while not stop.is_set():
                action = rnd.random()
                row = rnd.randint(1, 20000)
                if action < 0.6:
                    cur.execute("UPDATE items SET v = v + 1 WHERE id = %s", (row,))
                elif action < 0.8:
                    cur.execute("DELETE FROM items WHERE id = %s", (row,))
                else:
                    n += 1
                    cur.execute("INSERT INTO items VALUES (%s, 7, 'pw') ON CONFLICT (id) DO UPDATE SET v = 9",
                                (rnd.choice([row, n]),))
        conn.close()
    mirror = Mirror()
    listener = make_listener(channels=("items",), consumer="search", backfill=("public.items",))
    listener.on_event("items", mirror)
    writers = [threading.Thread(target=write, args=(i,), daemon=True) for i in range(3)]
    listener.start()
    for w in writers:
        w.start()
    wait_for(lambda: backfill_done(items), timeout=60, message="the backfill did not end")
    stop.set()
    for w in writers:
        w.join(10)
    # everything written so far reaches the mirror: wait for the log's last event
    last = execute(items, "SELECT max(id) FROM pgnotify_sync.event_log")[0][0]
    def differ():
        t = table(items)
        return sum(1 for k in set(t) | set(mirror.rows) if t.get(k) != mirror.rows.get(k))
    wait_for(lambda: listener.health()["channels"]["items"]["lag"] == 0 and differ() == 0, timeout=60,
             message="the mirror does not equal the table")
    assert mirror.backfilled > 10000
    assert listener.health()["backfill"]["public.items"]["done"] is True
    assert last > 20000
