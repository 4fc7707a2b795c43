"""Peer libraries in the same runs as ours (``python -m bench --peers``).

pg-listen (the Node library the product seed names) drains the plain NOTIFY
trigger's notifications, like the raw loop: ``pg-listen@1.7.0`` and ``pg@8.11.3``
are installed with npm into a cache folder (``~/.cache/pgnotify_sync-bench``, or
``$PGNOTIFY_BENCH_CACHE``) the first time. Without node and npm the peer is
skipped with a message saying so.

The receiver runs as a child process (``node``) that LISTENs with pg-listen,
parses every payload (pg-listen's default), and prints ``done <ns>`` with
``process.hrtime.bigint()`` when it has counted the expected events: on Linux
that is CLOCK_MONOTONIC, the clock of Python's ``time.monotonic()``, so the time
compares with the writer's COMMIT.
"""

import os
import pathlib
import shutil
import subprocess
import threading

from bench._common import PLAIN_CHANNEL, BenchError

PG_LISTEN = "pg-listen@1.7.0"
PG = "pg@8.11.3"

_SCRIPT = r"""
const createSubscriber = require("pg-listen");
const expected = BigInt(process.argv[2]);
const subscriber = createSubscriber({
  host: process.env.PGHOST, port: Number(process.env.PGPORT), user: process.env.PGUSER,
  password: process.env.PGPASSWORD, database: process.env.PGDATABASE,
});
let count = 0n;
subscriber.notifications.on(process.argv[3], (payload) => {
  count += 1n;
  if (count === expected) {
    process.stdout.write(`done ${process.hrtime.bigint()}\n`);
  }
});
subscriber.events.on("error", (error) => { process.stderr.write(`error ${error}\n`); process.exit(1); });
process.stdin.on("data", (line) => {
  if (String(line).startsWith("count")) process.stdout.write(`count ${count}\n`);
});
(async () => {
  await subscriber.connect();
  await subscriber.listenTo(process.argv[3]);
  process.stdout.write("ready\n");
})();
"""


def unavailable():
    """Why the peers cannot run here (None: they can)."""
    missing = [tool for tool in ("node", "npm") if shutil.which(tool) is None]
    if missing:
        return f"peers skipped: {' and '.join(missing)} not found (apt-get install nodejs npm)"
    return None


def _cache():
    return pathlib.Path(os.environ.get("PGNOTIFY_BENCH_CACHE", pathlib.Path.home() / ".cache" / "pgnotify_sync-bench"))


def install():
    """The folder holding node_modules with pg-listen and pg (npm install, once)."""
    folder = _cache() / "pg-listen-1.7.0"
    if not (folder / "node_modules" / "pg-listen" / "package.json").exists():
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "package.json").write_text('{"name": "pgnotify-bench-peers", "private": true}\n')
        proc = subprocess.run(["npm", "install", "--no-audit", "--no-fund", "--silent", PG_LISTEN, PG],
                              cwd=folder, capture_output=True, text=True, timeout=300)
        if proc.returncode != 0:
            raise BenchError(f"npm install {PG_LISTEN} {PG} failed: {proc.stderr.strip()[-400:]}")
    (folder / "receiver.js").write_text(_SCRIPT)
    return folder


class PgListenReceiver:
    """pg-listen draining channel *channel* in a node child process, until
    *expected* notifications arrived; ``done_at`` is then their last arrival
    (time.monotonic's clock). A context manager: on enter it is listening."""

    def __init__(self, target, expected, channel=PLAIN_CHANNEL, folder=None):
        self._target = target
        self._expected = expected
        self._channel = channel
        self._folder = folder or install()
        self._proc = None
        self.done_at = None
        self._done = threading.Event()
        self._ready = threading.Event()
        self._lines = []

    def __enter__(self):
        cfg = self._target.config
        env = dict(os.environ, PGHOST=cfg.postgres_host, PGPORT=str(cfg.postgres_port), PGUSER=cfg.postgres_user,
                   PGPASSWORD=cfg.postgres_password, PGDATABASE=cfg.postgres_db)
        self._proc = subprocess.Popen(["node", "receiver.js", str(self._expected), self._channel], cwd=self._folder,
                                      env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True)
        threading.Thread(target=self._read, daemon=True, name="bench-pg-listen").start()
        if not self._ready.wait(30):
            self.close()
            raise BenchError(f"pg-listen: not listening after 30 s: {self._proc.stderr.read()[-300:]}")
        return self

    def _read(self):
        for line in self._proc.stdout:
            self._lines.append(line)
            if line.startswith("ready"):
                self._ready.set()
            elif line.startswith("done "):
                self.done_at = int(line.split()[1]) / 1e9
                self._done.set()

    def wait(self, timeout_s):
        if not self._done.wait(timeout_s):
            raise BenchError(f"pg-listen: {self._expected} notifications not received within {timeout_s} s")
        return self.done_at

    def close(self):
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait(10)

    def __exit__(self, *exc_info):
        self.close()
