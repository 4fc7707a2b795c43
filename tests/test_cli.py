"""The ``pgnotify-sync`` command, run as real subprocesses (``python -m pgnotify_sync``)
against the test cluster: configuration from POSTGRES_* variables, exit codes,
one-line errors, JSON output, durable consumers, and the web demo's server.
"""

import contextlib
import datetime
import json
import os
import signal
import socket
import subprocess
import sys
import threading

import pytest

from helpers import wait_for

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMMANDS = ("install", "uninstall", "watch", "unwatch", "listen", "publish", "status", "backfill", "demo")


def cli_env(dsn, **overrides):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("POSTGRES_", "PG_", "SSH_"))}
    env["PYTHONUNBUFFERED"] = "1"
    if dsn is not None:
        env.update(POSTGRES_HOST=dsn["host"], POSTGRES_PORT=str(dsn["port"]), POSTGRES_USER=dsn["user"],
                   POSTGRES_PASSWORD=dsn["password"], POSTGRES_DB=dsn["dbname"])
    env.update(overrides)
    return env


class Cli:
    """Runs the command; every output is checked for the password."""

    def __init__(self, dsn):
        self.dsn = dsn
        self.secrets = [dsn["password"]]
        self.procs = []

    def _check(self, *texts):
        for text in texts:
            for secret in self.secrets:
                assert secret not in text, "the password appeared in the command's output"

    def run(self, *args, timeout=60, **env):
        proc = subprocess.run([sys.executable, "-m", "pgnotify_sync", *args], env=cli_env(self.dsn, **env),
                              cwd=ROOT, capture_output=True, text=True, timeout=timeout)
        self._check(proc.stdout, proc.stderr)
        return proc

    def start(self, *args, **env):
        proc = Proc([sys.executable, "-m", "pgnotify_sync", *args], cli_env(self.dsn, **env))
        self.procs.append(proc)
        return proc

    def close(self):
        for proc in self.procs:
            proc.kill()
            self._check("".join(proc.stdout), "".join(proc.stderr))


class Proc:
    """A background command whose stdout and stderr lines are collected by threads."""

    def __init__(self, argv, env):
        self.popen = subprocess.Popen(argv, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True)
        self.stdout = []
        self.stderr = []
        self.threads = [threading.Thread(target=self._pump, args=(self.popen.stdout, self.stdout), daemon=True),
                        threading.Thread(target=self._pump, args=(self.popen.stderr, self.stderr), daemon=True)]
        for t in self.threads:
            t.start()

    @staticmethod
    def _pump(stream, lines):
        for line in stream:
            lines.append(line)

    def wait_line(self, predicate, stream="stdout", timeout=30, message="expected output"):
        lines = getattr(self, stream)

        def found():
            for line in list(lines):
                if predicate(line):
                    return line
            if self.popen.poll() is not None:
                raise AssertionError(f"{message}: the command exited ({self.popen.returncode}); "
                                     f"stdout={''.join(self.stdout)!r} stderr={''.join(self.stderr)!r}")
            return None

        return wait_for(found, timeout=timeout, message=message)

    def wait(self, timeout=30):
        code = self.popen.wait(timeout)
        for t in self.threads:
            t.join(5)
        return code

    def interrupt(self):
        self.popen.send_signal(signal.SIGINT)

    def kill(self):
        if self.popen.poll() is None:
            self.popen.kill()
        self.wait()

    def events(self):
        return [json.loads(line) for line in self.stdout if line.startswith("{")]


@pytest.fixture
def cli(dsn):
    runner = Cli(dsn)
    yield runner
    runner.close()


@pytest.fixture
def messages_table(db):
    with db.cursor() as cur:
        cur.execute("CREATE TABLE messages (id serial PRIMARY KEY, room text, body text, password_hash text)")
    return db


def insert(db, *bodies):
    with db.cursor() as cur:
        for body in bodies:
            cur.execute("INSERT INTO messages (room, body, password_hash) VALUES ('r', %s, 'hash')", (body,))


def logged(db, channel="messages"):
    with db.cursor() as cur:
        cur.execute("SELECT id, data FROM pgnotify_sync.event_log WHERE channel = %s ORDER BY id", (channel,))
        return cur.fetchall()


def assert_one_line_error(proc):
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("pgnotify-sync: "), proc.stderr
    assert "Traceback" not in proc.stderr


# -- help, configuration and connection errors (no database needed for most) ---------

def test_help_for_every_command_exits_0():
    dsn = None
    procs = {name: subprocess.Popen([sys.executable, "-m", "pgnotify_sync", *([name] if name else []), "--help"],
                                    env=cli_env(dsn), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                    text=True)
             for name in ("",) + COMMANDS}
    for name, proc in procs.items():
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, f"{name or 'pgnotify-sync'} --help: exit {proc.returncode}: {err}"
        assert "usage:" in out
    assert "--web" in subprocess.run([sys.executable, "-m", "pgnotify_sync", "demo", "--help"], env=cli_env(dsn),
                                     capture_output=True, text=True, timeout=60).stdout


def test_bad_config_exits_2_naming_the_variable(cli):
    proc = cli.run("status", POSTGRES_PORT="abc")
    assert proc.returncode == 2
    assert_one_line_error(proc)
    assert "POSTGRES_PORT" in proc.stderr


@contextlib.contextmanager
def refused_port():
    """A 127.0.0.1 port where connections are refused, for as long as the block runs: it
    is bound (so no other process can take it and answer) but never listened on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield sock.getsockname()[1]


def test_unreachable_database_exits_1_with_one_line(cli, pg_cluster):
    with refused_port() as port:
        _unreachable(cli, str(port))


def _unreachable(cli, port):
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", int(port)), timeout=5).close()
    for command in (["status"], ["install"], ["publish", "messages", "{}"]):
        proc = cli.run(*command, POSTGRES_PORT=port)
        assert proc.returncode == 1, (command, proc.stderr)
        assert_one_line_error(proc)
    proc = cli.run("listen", "messages", "--timeout", "1", POSTGRES_PORT=port)
    assert proc.returncode == 1
    assert proc.stderr.splitlines()[-1].startswith("pgnotify-sync: ") and "Traceback" not in proc.stderr


def test_wrong_password_is_never_shown(cli):
    cli.secrets.append("wrong-Pa55word")
    proc = cli.run("status", POSTGRES_PASSWORD="wrong-Pa55word")
    assert proc.returncode == 1
    assert_one_line_error(proc)
    assert "authentication failed" in proc.stderr


# -- schema commands --------------------------------------------------------------------

def _server(db):
    with db.cursor() as cur:
        cur.execute("SELECT version()")
        return cur.fetchone()[0].split(",")[0]


def _log_state(db):
    with db.cursor() as cur:
        cur.execute("SELECT count(*), min(id), max(id), min(created_at), max(created_at), "
                    "pg_total_relation_size('pgnotify_sync.event_log') FROM pgnotify_sync.event_log")
        rows, first, last, oldest, newest, size = cur.fetchone()
    return {"rows": rows, "first_id": first, "last_id": last,
            "oldest": None if oldest is None else str(oldest), "newest": None if newest is None else str(newest),
            "bytes": size}


def test_install_is_idempotent_and_watch_unwatch_exclude(cli, messages_table):
    server = _server(messages_table)
    assert server.startswith("PostgreSQL ")
    # Nothing runs on this cluster but this test: no listener holds the notification queue.
    assert json.loads(cli.run("status").stdout) == {"server": server, "notification_queue_usage": 0.0,
                                                    "installed": False}
    for _ in range(2):
        proc = cli.run("install")
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.strip() == "installed"
    proc = cli.run("watch", "public.messages", "--channel", "messages", "--exclude", "password_hash")
    assert proc.returncode == 0, proc.stderr
    insert(messages_table, "one")
    rows = logged(messages_table)
    assert len(rows) == 1 and rows[0][1]["body"] == "one" and "password_hash" not in rows[0][1]
    status = json.loads(cli.run("status").stdout)
    log_state = _log_state(messages_table)
    assert log_state["rows"] == 1 and log_state["first_id"] == log_state["last_id"] == rows[0][0]
    assert datetime.datetime.fromisoformat(log_state["oldest"]).tzinfo is not None
    assert status == {"server": server, "notification_queue_usage": 0.0, "installed": True,
                      "event_log": log_state,
                      "watched_tables": [{"table": "public.messages", "channel": "messages",
                                          "exclude_columns": ["password_hash"]}],
                      "consumers": [], "consumer_groups": [], "backfills": [],
                      "privileges": {"model": True, "role": "postgres", "unrestricted": True,
                                     "granted": ["admin", "listen", "publish"], "grants": [],
                                     "retention_floors": {"consumer_retention_floor_s": 0.0,
                                                          "retention_floor_s": 0.0},
                                     "capture_owner_mismatch": []}}

    proc = cli.run("unwatch", "public.messages")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(cli.run("status").stdout)["watched_tables"] == []
    insert(messages_table, "two")
    assert len(logged(messages_table)) == 1


def test_publish_prints_the_event_id(cli, db):
    assert cli.run("install").returncode == 0
    proc = cli.run("publish", "news", '{"hello": 1}')
    assert proc.returncode == 0, proc.stderr
    ident = int(proc.stdout.strip())
    rows = logged(db, "news")
    assert rows == [(ident, {"hello": 1})]
    bad = cli.run("publish", "news", "{not json")
    assert bad.returncode == 2
    assert_one_line_error(bad)


def _watched(cli, db):
    assert cli.run("install").returncode == 0
    assert cli.run("watch", "public.messages", "--channel", "messages", "--exclude", "password_hash").returncode == 0


def _listening(proc):
    proc.wait_line(lambda line: "listening on" in line, stream="stderr", message="the listener did not start")


def _publish_marker(cli, channel="messages"):
    """Publish a marker event on *channel* (after what the test wrote: events of one
    channel are printed in commit order, so the marker comes last); returns its id."""
    proc = cli.run("publish", channel, '{"marker": true}')
    assert proc.returncode == 0, proc.stderr
    return int(proc.stdout)


def _until_marker(proc, marker_id):
    proc.wait_line(lambda line: line.startswith("{") and json.loads(line)["id"] == marker_id,
                   message="the marker event was not printed")
    proc.interrupt()
    assert proc.wait(timeout=30) == 0, "".join(proc.stderr)
    *events, marker = proc.events()
    assert marker["operation"] == "PUBLISH" and marker["data"] == {"marker": True}
    return events


def test_listen_prints_json_lines(cli, messages_table):
    _watched(cli, messages_table)
    proc = cli.start("-v", "listen", "messages")
    _listening(proc)
    insert(messages_table, "a", "b", "c")
    marker = _publish_marker(cli)
    events = _until_marker(proc, marker)
    assert [e["id"] for e in events] + [marker] == [row[0] for row in logged(messages_table)]
    assert [e["data"]["body"] for e in events] == ["a", "b", "c"]
    assert all(e["channel"] == "messages" and e["operation"] == "INSERT" and "password_hash" not in e["data"]
               for e in events)


def test_listen_seconds_ends_the_command_by_itself(cli, messages_table):
    _watched(cli, messages_table)
    proc = cli.start("-v", "listen", "messages", "--seconds", "0.5")
    assert proc.wait(timeout=60) == 0, "".join(proc.stderr)      # not interrupted: it stopped itself
    assert any("listening on" in line for line in proc.stderr)
    assert proc.stdout == []


LOG_FIELDS = {"timestamp", "level", "logger", "event", "channel", "event_id", "message", "details"}


def test_listen_log_format_json_writes_one_json_object_per_stderr_line(cli, messages_table):
    _watched(cli, messages_table)
    proc = cli.start("-vv", "--log-format", "json", "listen", "messages")
    proc.wait_line(lambda line: "listening on" in line, stream="stderr",
                   message="the listener did not start")
    insert(messages_table, "row-value-never-logged")
    marker = _publish_marker(cli)
    events = _until_marker(proc, marker)
    assert [e["data"]["body"] for e in events] == ["row-value-never-logged"]
    records = []
    for line in proc.stderr:
        try:
            record = json.loads(line)
        except ValueError:
            raise AssertionError(f"a stderr line is not JSON: {line!r}") from None
        assert type(record) is dict and set(record) == LOG_FIELDS, record
        stamp = datetime.datetime.fromisoformat(record["timestamp"].replace("Z", "+00:00"))
        assert record["timestamp"].endswith("Z") and stamp.utcoffset() == datetime.timedelta(0), record
        assert record["level"] in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
        assert record["logger"].startswith("pgnotify_sync") and type(record["details"]) is dict
        records.append(record)
    assert "row-value-never-logged" not in "".join(proc.stderr)
    (listening,) = [r for r in records if r["event"] == "listening"]
    assert listening["level"] == "INFO" and listening["details"] == {"channels": ["messages"]}
    delivered = [r for r in records if r["event"] == "delivered"]
    assert [(r["level"], r["channel"], r["event_id"]) for r in delivered] == \
        [("DEBUG", "messages", events[0]["id"]), ("DEBUG", "messages", marker)]
    assert delivered[0]["details"]["operation"] == "INSERT" and delivered[0]["details"]["table"] == "messages"
    assert records[-1]["event"] == "stopped"


def test_listen_with_consumer_resumes_across_runs(cli, messages_table):
    _watched(cli, messages_table)
    first = cli.start("-v", "listen", "messages", "--consumer", "indexer")
    _listening(first)
    insert(messages_table, "1", "2")
    wait_for(lambda: len(first.events()) == 2, timeout=15, message="first run: 2 events")
    first.interrupt()
    assert first.wait() == 0, "".join(first.stderr)

    insert(messages_table, "3", "4")                  # nobody listening
    second = cli.start("-v", "listen", "messages", "--consumer", "indexer")
    _listening(second)
    insert(messages_table, "5")
    wait_for(lambda: len(second.events()) >= 3, timeout=15, message="second run: 3 events")
    second.interrupt()
    assert second.wait() == 0, "".join(second.stderr)
    bodies = [e["data"]["body"] for e in first.events()] + [e["data"]["body"] for e in second.events()]
    assert bodies == ["1", "2", "3", "4", "5"]
    ids = [e["id"] for e in first.events() + second.events()]
    assert ids == [row[0] for row in logged(messages_table)]
    with messages_table.cursor() as cur:
        cur.execute("SELECT updated_at FROM pgnotify_sync.consumers WHERE name = 'indexer' AND channel = 'messages'")
        (updated_at,) = cur.fetchone()
    (consumer,) = json.loads(cli.run("status").stdout)["consumers"]
    # Every event was handled. The bound counts what the stored snapshot does not cover:
    # the live event '5' may be remembered by id (consumers.handled) rather than by it.
    assert consumer == {"name": "indexer", "channel": "messages", "partition": 0, "updated_at": str(updated_at),
                        "lag_upper_bound": consumer["lag_upper_bound"]}
    assert consumer["lag_upper_bound"] in (0, 1)
    insert(messages_table, "6", "7")                  # nobody listening: two events to go
    assert json.loads(cli.run("status").stdout)["consumers"] == [
        dict(consumer, lag_upper_bound=consumer["lag_upper_bound"] + 2)]
    # The group: no member runs, its one partition is free (handed over at the stop).
    (group,) = json.loads(cli.run("consumers").stdout)
    (position,) = group["positions"]
    assert (group["name"], group["partitions"], group["members"]) == ("indexer", 1, [])
    assert position == {"channel": "messages", "partition": 0, "owner": None, "epoch": 2, "lease_left_s": None,
                        "updated_at": position["updated_at"], "lag_upper_bound": consumer["lag_upper_bound"] + 2}


# -- the web demo ---------------------------------------------------------------------

def test_demo_web_serves_page_and_stream(cli, db):
    import urllib.request

    from test_sse import SSEClient

    proc = cli.start("demo", "--web", "--web-port", "0", "--changes", "4", "--interval-s", "0.01", "--forever")
    line = proc.wait_line(lambda line: line.startswith("demo: open http://"), message="no URL printed")
    url = line.split()[2]
    with urllib.request.urlopen(url, timeout=10) as resp:
        page = resp.read().decode()
    assert "EventSource" in page and "/events/stream?channels=demo" in page
    proc.wait_line(lambda line: "4 changes written" in line, message="the writer did not finish")
    client = SSEClient(f"{url}events/stream?channels=demo&last_event_id=0")
    try:
        assert client.status == 200
        ids = client.wait_ids(4)
        assert ids == [row[0] for row in logged(db, "demo")]
        proc.interrupt()
        assert proc.wait() == 130
        client.wait_ended()
    finally:
        client.close()


def test_grant_listener_publisher_admin_and_revoke_show_in_status(cli, db, admin_db, dbname):
    role = f"{dbname}_cli_reader"
    with admin_db.cursor() as cur:
        cur.execute(f"CREATE ROLE {role} LOGIN")
    try:
        assert cli.run("install").returncode == 0
        for args in (("grant-listener", role, "--channel", "acc", "--channel", "books"),
                     ("grant-publisher", role, "--channel", "acc"), ("grant-admin", role)):
            proc = cli.run(*args)
            assert proc.returncode == 0, proc.stderr
        assert cli.run("grant-listener", role, "--channel", "acc", PG_NOTIFY_CHANNEL="prod").returncode == 0
        proc = cli.run("retention-floor", "--retention", "600")
        assert proc.returncode == 0, proc.stderr
        privileges = json.loads(cli.run("status").stdout)["privileges"]
        assert privileges["grants"] == [{"role": role, "kind": "admin", "channels": []},
                                        {"role": role, "kind": "listen", "channels": ["acc", "books", "prod.acc"]},
                                        {"role": role, "kind": "publish", "channels": ["acc"]}]
        assert privileges["retention_floors"]["retention_floor_s"] == 600
        proc = cli.run("revoke", role)
        assert proc.returncode == 0 and proc.stdout.strip() == f"revoked 5 grant(s) of {role}"
        assert json.loads(cli.run("status").stdout)["privileges"]["grants"] == []
        proc = cli.run("grant-listener", "no_such_role_here", "--channel", "acc")
        assert proc.returncode != 0 and 'role "no_such_role_here" does not exist' in proc.stderr
    finally:
        with db.cursor() as cur:
            cur.execute(f"DROP OWNED BY {role}")
        with admin_db.cursor() as cur:
            cur.execute(f"DROP ROLE {role}")
