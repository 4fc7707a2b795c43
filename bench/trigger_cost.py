"""Server-side cost of the capture trigger for single-row INSERT statements:
``python bench/trigger_cost.py OLD_REV [NEW_SQL_FILE]``.

One DO block of 5,000 single-row INSERTs per measurement, timed by
clock_timestamp() on the server (no client, network or commit in the figure, so
it is far steadier than a client loop on a busy machine), alternated, 10 rounds;
no trigger, OLD_REV's sql/install.sql and the working tree's (or NEW_SQL_FILE),
each for a table the installer owns and one another role (``towner``) owns.
Compare the best blocks: the medians carry the machine's noise.
"""
import statistics, subprocess, sys
import psycopg2
from pgnotify_sync.testing import TemporaryCluster
ROOT = __file__.rsplit("/bench/", 1)[0] if "/bench/" in __file__ else "."
old_sql = subprocess.run(["git", "-C", ROOT, "show", f"{sys.argv[1]}:sql/install.sql"], capture_output=True, text=True,
                         check=True).stdout
new_sql = open(sys.argv[2] if len(sys.argv) > 2 else f"{ROOT}/sql/install.sql").read()
N = 5000
with TemporaryCluster() as cl:
    cl.start()
    a = psycopg2.connect(**cl.conninfo("postgres")); a.autocommit = True
    a.cursor().execute("CREATE ROLE towner LOGIN PASSWORD 'x'")
    conns = {}
    for name, sql in (("old", old_sql), ("new", new_sql), ("none", None)):
        cl.create_database(name)
        c = psycopg2.connect(**cl.conninfo(name)); c.autocommit = True
        cur = c.cursor()
        cur.execute("CREATE TABLE m_inst (id serial primary key, author text, body text, n int)")
        cur.execute("CREATE TABLE m_own (id serial primary key, author text, body text, n int); ALTER TABLE m_own OWNER TO towner")
        if sql:
            cur.execute(sql)
            cur.execute("SELECT pgnotify_sync.watch_table('public.m_inst'::regclass, 'mi', '{}'::text[])")
            cur.execute("SELECT pgnotify_sync.watch_table('public.m_own'::regclass, 'mo', '{}'::text[])")
        conns[name] = c
    keys = [(v, t) for v in ("none", "old", "new") for t in ("m_inst", "m_own")]
    res = {k: [] for k in keys}
    for rnd in range(10):
        for k in (keys if rnd % 2 == 0 else keys[::-1]):
            cur = conns[k[0]].cursor()
            cur.execute(f"""DO $$ DECLARE t0 timestamptz := clock_timestamp(); BEGIN
                FOR i IN 1..{N} LOOP INSERT INTO {k[1]} (author, body, n) VALUES ('alice', 'hello there, a message body', i); END LOOP;
                RAISE NOTICE '%', extract(epoch from clock_timestamp() - t0); END $$""")
            res[k].append(float(conns[k[0]].notices.pop().split(":")[-1]) / N * 1e6)
            cur.execute(f"TRUNCATE {k[1]}")
            if k[0] != "none":
                cur.execute("TRUNCATE pgnotify_sync.event_log")
    for k, v in res.items():
        print(f"{k[0]:4} {k[1]:6} best {min(v):5.1f}  median {statistics.median(v):5.1f} us/insert ",
              [round(x, 1) for x in v])
