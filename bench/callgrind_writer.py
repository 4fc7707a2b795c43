"""Instructions per single-row INSERT, counted by callgrind (deterministic, unlike
the clock): ``python bench/callgrind_writer.py [SQL_FILE] [TABLES]``.

A single-user postgres backend (``postgres --single``) runs K and then N+K
single-row autocommit INSERTs under valgrind; (Ir(N+K) - Ir(K)) / N is the cost of
one INSERT, start-up excluded. Tables: ``t_none`` (no trigger), ``t_plain`` (the
product spec's plain NOTIFY row trigger), ``t_ours`` (our default capture),
``t_row`` (mode="row"), ``t_quiet`` (notify=False). SQL_FILE: the install script
to measure (default sql/install.sql), so a variant can be compared with it.
Needs valgrind (apt-get install valgrind); takes about 40 s.
"""
import os
import re
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import psycopg2  # noqa: E402

from pgnotify_sync.testing import TemporaryCluster, find_pg_bindir  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TABLES = ("t_none", "t_plain", "t_ours", "t_row", "t_quiet")
PLAIN = """CREATE OR REPLACE FUNCTION public.plain_notify() RETURNS trigger LANGUAGE plpgsql AS $fn$
BEGIN
    PERFORM pg_notify('plain', json_build_object('operation', TG_OP, 'schema', TG_TABLE_SCHEMA,
                                                 'table', TG_TABLE_NAME, 'data', row_to_json(NEW))::text);
    RETURN NEW;
END
$fn$"""
K, N = 50, 550


def prepare(cluster, sql):
    conn = psycopg2.connect(**cluster.conninfo("cg"))
    conn.autocommit = True
    with conn.cursor() as cur:
        cur.execute(sql)
        for table in TABLES:
            cur.execute(f"CREATE TABLE {table} (id bigserial PRIMARY KEY, author text, body text, n int)")
        cur.execute(PLAIN)
        cur.execute("CREATE TRIGGER p AFTER INSERT ON t_plain FOR EACH ROW EXECUTE FUNCTION public.plain_notify()")
        cur.execute("SELECT pgnotify_sync.watch_table('public.t_ours', 'ours')")
        cur.execute("SELECT pgnotify_sync.watch_table('public.t_row', 'row', '{}', 'row')")
        cur.execute("SELECT pgnotify_sync.watch_table('public.t_quiet', 'quiet', '{}', 'statement', false)")
    conn.close()


def instructions(cluster, out, table, n):
    """Ir of a single-user backend running *n* single-row INSERTs into *table*."""
    statements = "".join(f"INSERT INTO {table} (author, body, n) VALUES ('alice', 'hello there, a message body', "
                         f"{i});\n" for i in range(n))
    cmd = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={os.path.join(out, f'{table}.{n}')}",
           os.path.join(find_pg_bindir(), "postgres"), "--single", "-D", cluster.data_dir, "-c", "fsync=off", "cg"]
    if os.geteuid() == 0:
        cmd = ["runuser", "-u", "postgres", "--"] + cmd
    proc = subprocess.run(cmd, input=statements, capture_output=True, text=True)
    found = re.search(r"Collected : (\d+)", proc.stderr)
    if not found:
        sys.exit(f"valgrind failed: {proc.stderr[-2000:]}")
    return int(found.group(1))


def main():
    sql = open(sys.argv[1] if len(sys.argv) > 1 else os.path.join(ROOT, "sql", "install.sql")).read()
    tables = sys.argv[2].split(",") if len(sys.argv) > 2 else TABLES
    cluster = TemporaryCluster()
    try:
        cluster.start()
        cluster.create_database("cg")
        prepare(cluster, sql)
        cluster.stop()                  # single-user mode needs the data directory to itself
        out = tempfile.mkdtemp(prefix="pgnotify-callgrind-")
        os.chmod(out, 0o777)            # the postgres OS user writes there when we are root
        for table in tables:
            per_insert = (instructions(cluster, out, table, N) - instructions(cluster, out, table, K)) / (N - K)
            print(f"{table:8} {per_insert / 1000:6.0f}K instructions per INSERT", flush=True)
    finally:
        cluster.cleanup()


if __name__ == "__main__":
    main()
