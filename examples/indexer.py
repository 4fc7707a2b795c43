"""A durable worker: keeps a search index (here the table ``search_index``) equal
to the table ``messages``, as a plain script under a process manager.

    python indexer.py        # POSTGRES_* name the database; SIGTERM or Ctrl-C stops it

- **Durable.** The consumer name ``search-indexer`` stores its position in the
  database: stopped, killed (SIGKILL) or crashed, it resumes where it stopped, and
  nothing committed meanwhile is missed. At least once: after a kill a few events
  are handled again, so the handler is an idempotent upsert.
- **Backfill.** On its first run it also indexes the rows that exist already
  (``BACKFILL`` events, interleaved with live changes, resumable).
- **Retries and dead letters.** A handler that raises is retried with backoff
  (``PG_NOTIFY_HANDLER_MAX_ATTEMPTS``, default 5; the index being down for a
  moment costs nothing); an event that keeps failing (here: a message with an
  empty body, which the index refuses) is parked as a dead letter and the indexer
  goes on. ``pgnotify-sync dead-letters list`` shows them; ``dead-letters retry
  --consumer search-indexer --all`` delivers them again once the cause is fixed.
- **Shutdown.** SIGTERM (what systemd, Docker and Kubernetes send) ends the wait;
  leaving the ``with`` block stops the listener, which stores its position.

Run several copies to share the work (PG_NOTIFY_CONSUMER_PARTITIONS=4 in each):
they form a consumer group, and a copy that dies hands its partitions over.
"""

import logging
import signal
import sys
import threading

import psycopg2

from pgnotify_sync import Config, Listener, Operation, install, watch_table

log = logging.getLogger("indexer")

CONSUMER = "search-indexer"


class Index:
    """The "search server": a table, written on a connection per handler thread."""

    def __init__(self, config):
        self._config = config
        self._local = threading.local()

    def _conn(self):
        conn = getattr(self._local, "conn", None)
        if conn is None or conn.closed:
            conn = self._local.conn = psycopg2.connect(**self._config.connect_kwargs())
            conn.autocommit = True
        return conn

    def __call__(self, event):
        row = event.data
        try:
            with self._conn().cursor() as cur:
                if event.operation is Operation.DELETE:
                    cur.execute("DELETE FROM search_index WHERE id = %s", (row["id"],))
                    return
                if not row["body"].strip():
                    raise ValueError("the index refuses an empty document")
                cur.execute("INSERT INTO search_index (id, words) VALUES (%s, to_tsvector('simple', %s)) "
                            "ON CONFLICT (id) DO UPDATE SET words = excluded.words", (row["id"], row["body"]))
        except psycopg2.OperationalError:
            self._local.conn = None     # reconnect at the next call (the retry)
            raise


def setup(config):
    """The tables (idempotent): your application would own ``messages``."""
    conn = psycopg2.connect(**config.connect_kwargs())
    try:
        install(conn)
        with conn.cursor() as cur:
            cur.execute("CREATE TABLE IF NOT EXISTS messages (id bigserial PRIMARY KEY, room text NOT NULL, "
                        "author text NOT NULL, body text NOT NULL, at timestamptz NOT NULL DEFAULT now())")
            cur.execute("CREATE TABLE IF NOT EXISTS search_index (id bigint PRIMARY KEY, words tsvector NOT NULL)")
        conn.commit()
        watch_table(conn, "public.messages", channel="messages")
    finally:
        conn.close()


def main():
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    config = Config.from_env(channels=("messages",))
    setup(config)
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    index = Index(config)
    listener = Listener(config, consumer=CONSUMER, backfill=("public.messages",), name="indexer")
    listener.on_event("messages", index)
    # Failures that are not the handler's own (the database away, ...) are in the log
    # already; a dead letter is worth a line of its own.
    listener.signals.error.connect(
        lambda sender, kind, error, event_id=None, **_: kind == "handler" and log.warning(
            "event %s is a dead letter after every attempt: %s", event_id, error), weak=False)
    with listener:
        log.info("indexing as consumer %r", CONSUMER)
        stop.wait()
        log.info("stopping")
    return 0


if __name__ == "__main__":
    sys.exit(main())
