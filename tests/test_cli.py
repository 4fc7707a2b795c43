"""The ``pgnotify-sync`` command, run as real subprocesses (``python -m pgnotify_sync``)
against the test cluster: configuration from POSTGRES_* variables, exit codes,
one-line errors, JSON output, durable consumers, and the web demo's server.
"""

import json
import os
import signal
import subprocess
import sys
import threading

import pytest

from helpers import wait_for

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMMANDS = ("install", "uninstall", "watch", "unwatch", "listen", "publish", "status", "demo")


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


def test_unreachable_database_exits_1_with_one_line(cli, pg_cluster):
    from pgnotify_sync._cluster import free_port
    port = str(free_port())
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

def test_install_is_idempotent_and_watch_unwatch_exclude(cli, messages_table):
    for _ in range(2):
        proc = cli.run("install")
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.strip() == "installed"
    proc = cli.run("watch", "public.messages", "--channel", "messages", "--exclude", "password_hash")
    assert proc.returncode == 0, proc.stderr
    status = json.loads(cli.run("status").stdout)
    assert status["watched_tables"] == [{"table": "public.messages", "channel": "messages",
                                         "exclude_columns": ["password_hash"]}]
    assert isinstance(status["notification_queue_usage"], float)
    insert(messages_table, "one")
    rows = logged(messages_table)
    assert len(rows) == 1 and rows[0][1]["body"] == "one" and "password_hash" not in rows[0][1]

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


def test_listen_prints_json_lines_for_the_given_seconds(cli, messages_table):
    _watched(cli, messages_table)
    proc = cli.start("-v", "listen", "messages", "--seconds", "3")
    _listening(proc)
    insert(messages_table, "a", "b", "c")
    assert proc.wait(timeout=30) == 0, "".join(proc.stderr)
    events = proc.events()
    assert [e["id"] for e in events] == [row[0] for row in logged(messages_table)]
    assert [e["data"]["body"] for e in events] == ["a", "b", "c"]
    assert all(e["channel"] == "messages" and e["operation"] == "INSERT" and "password_hash" not in e["data"]
               for e in events)


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
