"""The ``pgnotify-sync`` command (also ``python -m pgnotify_sync``).

Configuration comes from the same environment variables as the library
(POSTGRES_HOST, POSTGRES_PORT, POSTGRES_USER, POSTGRES_PASSWORD, POSTGRES_DB, ...);
flags override them. Exit codes: 0 success, 1 runtime failure (cannot connect,
SQL error), 2 usage or configuration error, 130 interrupted.
"""

import argparse
import json
import logging
import signal
import sys
import threading
import time

from . import __version__
from .config import Config
from .errors import ConfigError, PgNotifyError, first_line

EXIT_OK, EXIT_FAILURE, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130

# How often ``listen`` looks at Ctrl-C / SIGTERM and its --seconds deadline: stops
# within a fifth of a second without busy-waiting.
LISTEN_POLL_S = 0.2
# Log level by the number of -v flags: warnings, -v info, -vv (or more) debug.
VERBOSITY_LEVELS = (logging.WARNING, logging.INFO, logging.DEBUG)

log = logging.getLogger("pgnotify_sync.cli")


def _add_db_flags(parser):
    group = parser.add_argument_group("database (default: the POSTGRES_* environment variables)")
    group.add_argument("--host", help="POSTGRES_HOST")
    group.add_argument("--port", type=int, help="POSTGRES_PORT")
    group.add_argument("--user", help="POSTGRES_USER")
    group.add_argument("--db", help="POSTGRES_DB")
    group.add_argument("--channel-prefix", help="PG_NOTIFY_CHANNEL: prefix applied to channel names on the wire")


def _config(args, **extra):
    overrides = {k: v for k, v in {
        "postgres_host": args.host, "postgres_port": args.port, "postgres_user": args.user,
        "postgres_db": args.db, "channel_prefix": getattr(args, "channel_prefix", None),
    }.items() if v is not None}
    overrides.update(extra)
    return Config.from_env(**overrides)


def _connect(cfg):
    import psycopg2
    try:
        return psycopg2.connect(**cfg.connect_kwargs())
    except psycopg2.Error as exc:
        raise PgNotifyError(f"cannot connect to {cfg.describe_target()}: {first_line(exc)}") from None


def _with_connection(args, action):
    """Run *action(conn, cfg)* on a fresh connection, always closed afterwards."""
    cfg = _config(args)
    conn = _connect(cfg)
    try:
        return action(conn, cfg)
    finally:
        conn.close()


def cmd_install(args):
    from .schema import install
    _with_connection(args, lambda conn, cfg: install(conn))
    print("installed")


def cmd_uninstall(args):
    from .schema import uninstall
    _with_connection(args, lambda conn, cfg: uninstall(conn))
    print("uninstalled")


def cmd_watch(args):
    from .schema import watch_table
    mode = _with_connection(args, lambda conn, cfg: watch_table(
        conn, args.table, channel=args.channel, exclude_columns=tuple(args.exclude or ()),
        channel_prefix=cfg.channel_prefix, mode=args.mode, notify=not args.no_notify))
    quiet = ", notify-free: listeners poll the log" if args.no_notify else ""
    print(f"watching {args.table} on channel {args.channel!r} ({mode} mode{quiet})")


def cmd_unwatch(args):
    from .schema import unwatch_table
    _with_connection(args, lambda conn, cfg: unwatch_table(conn, args.table))
    print(f"no longer watching {args.table}")


def cmd_grant(args):
    from . import schema
    if args.kind == "admin":
        _with_connection(args, lambda conn, cfg: schema.grant_admin(conn, args.role))
        print(f"{args.role} may now trim the event log (above the floors) and see every consumer")
        return
    grant = schema.grant_listener if args.kind == "listener" else schema.grant_publisher
    _with_connection(args, lambda conn, cfg: grant(conn, args.role, args.channel, channel_prefix=cfg.channel_prefix))
    what = "read" if args.kind == "listener" else "publish on"
    print(f"{args.role} may now {what} " + ", ".join(repr(c) for c in args.channel))


def cmd_revoke(args):
    from .schema import revoke
    n = _with_connection(args, lambda conn, cfg: revoke(conn, args.role))
    print(f"revoked {n} grant(s) of {args.role}")


def cmd_retention_floor(args):
    from .schema import set_retention_floor
    _with_connection(args, lambda conn, cfg: set_retention_floor(conn, args.retention, args.consumer_retention))
    print("retention floors set")


def cmd_publish(args):
    from .listener import Listener
    try:
        payload = json.loads(args.json)
    except ValueError as exc:
        raise ConfigError(f"JSON: not valid JSON ({exc})") from None
    listener = Listener(_config(args, channels=(args.channel,)))
    try:
        ident = listener.publish(args.channel, payload)
    finally:
        listener.stop()
    print(ident)


def cmd_listen(args):
    from .listener import Listener
    listener = Listener(_config(args, channels=tuple(args.channels)), consumer=args.consumer)
    lock = threading.Lock()
    out = sys.stdout

    def printer(event):
        line = event.to_json()
        with lock:
            out.write(line + "\n")
            out.flush()

    for channel in args.channels:
        listener.on_event(channel, printer)
    stop = threading.Event()
    _on_signals(stop)
    listener.start(timeout_s=args.timeout)
    try:
        deadline = time.monotonic() + args.seconds if args.seconds else None
        while not stop.wait(LISTEN_POLL_S):
            if deadline and time.monotonic() >= deadline:
                break
    finally:
        listener.stop()


def cmd_status(args):
    from .status import server_status
    status = _with_connection(args, lambda conn, cfg: server_status(conn))
    print(json.dumps(status, indent=2, default=str))


def cmd_consumers(args):
    from .status import consumer_groups

    def read(conn, cfg):
        with conn.cursor() as cur:
            return consumer_groups(cur)
    print(json.dumps(_with_connection(args, read), indent=2, default=str))


def cmd_demo(args):
    from .testing.demo import run_demo
    return run_demo(args)


def _on_signals(stop_event):
    def handler(signum, frame):
        stop_event.set()
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            signal.signal(sig, handler)
        except ValueError:
            pass  # not the main thread


def _add_schema_parsers(sub):
    """install, uninstall, watch, unwatch: one connection, one change to the schema."""
    p = sub.add_parser("install", help="create the schema objects (idempotent)")
    _add_db_flags(p)
    p.set_defaults(func=cmd_install)

    p = sub.add_parser("uninstall", help="drop every schema object, triggers and event log included")
    _add_db_flags(p)
    p.set_defaults(func=cmd_uninstall)

    p = sub.add_parser("watch", help="send a table's changes on a channel")
    p.add_argument("table", help='schema-qualified table, quoted as in SQL for odd names: \'public."My Table"\'')
    p.add_argument("--channel", required=True)
    p.add_argument("--exclude", action="append", metavar="COLUMN",
                   help="a column that never leaves the database (an UPDATE of such columns alone is no event)")
    p.add_argument("--mode", choices=("statement", "row"), default="statement",
                   help="statement (default): INSERT/DELETE captured per statement; row: everything per row")
    p.add_argument("--no-notify", action="store_true",
                   help="log only, no NOTIFY: concurrent writers commit in parallel; listeners poll the log "
                        "(PG_NOTIFY_POLL_INTERVAL)")
    _add_db_flags(p)
    p.set_defaults(func=cmd_watch)

    p = sub.add_parser("unwatch", help="stop sending a table's changes")
    p.add_argument("table")
    _add_db_flags(p)
    p.set_defaults(func=cmd_unwatch)


def _add_grant_parsers(sub):
    """grant-listener, grant-publisher, grant-admin, revoke, retention-floor: who may
    do what (run as the installer or a superuser)."""
    for kind, text in (("listener", "let a role read the events of these channels and keep its consumer positions"),
                       ("publisher", "let a role publish on these channels")):
        p = sub.add_parser(f"grant-{kind}", help=text)
        p.add_argument("role")
        p.add_argument("--channel", action="append", required=True, metavar="CHANNEL",
                       help="a channel (repeat for more); the channel prefix (PG_NOTIFY_CHANNEL) is applied "
                            "as listeners do")
        _add_db_flags(p)
        p.set_defaults(func=cmd_grant, kind=kind)
    p = sub.add_parser("grant-admin", help="let a role trim the event log (above the floors) and see every consumer")
    p.add_argument("role")
    _add_db_flags(p)
    p.set_defaults(func=cmd_grant, kind="admin")
    p = sub.add_parser("revoke", help="take every grant of a role back")
    p.add_argument("role")
    _add_db_flags(p)
    p.set_defaults(func=cmd_revoke)
    p = sub.add_parser("retention-floor", help="the least retention any trim keeps, whoever asks")
    p.add_argument("--retention", type=float, metavar="SECONDS")
    p.add_argument("--consumer-retention", type=float, metavar="SECONDS")
    _add_db_flags(p)
    p.set_defaults(func=cmd_retention_floor)


def _add_event_parsers(sub):
    """listen, publish, status: events and the server's state."""
    p = sub.add_parser("listen", help="print events as JSON lines")
    p.add_argument("channels", nargs="+", metavar="CHANNEL")
    p.add_argument("--consumer", help="durable consumer name: resume where it left off")
    p.add_argument("--seconds", type=float, default=0, help="stop after this long (default: until interrupted)")
    p.add_argument("--timeout", type=float, default=30.0, help="give up connecting after this long")
    _add_db_flags(p)
    p.set_defaults(func=cmd_listen)

    p = sub.add_parser("publish", help="send an application event; prints its log id")
    p.add_argument("channel")
    p.add_argument("json", metavar="JSON")
    _add_db_flags(p)
    p.set_defaults(func=cmd_publish)

    p = sub.add_parser("status", help="listener-relevant server state as JSON")
    _add_db_flags(p)
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("consumers", help="consumer groups as JSON: members, and each partition's owner, lease "
                                         "and position")
    _add_db_flags(p)
    p.set_defaults(func=cmd_consumers)


def cmd_dead_letters(args):
    from . import _deadletters as dl

    def act(conn, cfg):
        if args.action == "list":
            for row in dl.list_dead_letters(conn, args.consumer, args.channel and cfg.wire_channel(args.channel)):
                print(json.dumps(row, default=str))
            return
        if not args.all and not args.ids:
            raise ConfigError("dead-letters: name the event ids, or --all")
        ids = None if args.all else args.ids
        change = dl.request_retry if args.action == "retry" else dl.drop_dead_letters
        print(change(conn, args.consumer, ids))
    _with_connection(args, act)


def cmd_backfill(args):
    """Deliver TABLE's existing rows to consumer NAME (as BACKFILL events, through
    its running or next listener), in this process: JSON lines of progress, exit 0
    once done. Interrupted, it resumes where it stopped on the next run (or in a
    listener given backfill=)."""
    import psycopg2
    from . import _backfill as backfill
    from ._keys import KeyColumns, group_key_columns
    extra = {"backfill_chunk_rows": args.chunk_rows} if args.chunk_rows is not None else {}
    cfg = _config(args, **extra)
    stop = threading.Event()
    _on_signals(stop)
    last = {}

    def key_columns(schema, table):
        # Once a table (KeyColumns caches), on a connection of its own: a long first
        # table would outlive an idle one (idle_session_timeout, a proxy).
        conn = _connect(cfg)
        try:
            conn.autocommit = True
            with conn.cursor() as cur:
                return group_key_columns(cur, args.consumer, schema, table)
        finally:
            conn.close()

    def shown(table, state):
        if last.get(table) != state:
            last[table] = state
            print(json.dumps({"table": table, **state}), flush=True)
    try:
        progress = backfill.run(lambda: _connect(cfg), args.consumer, args.tables, KeyColumns(key_columns),
                                cfg.backfill_chunk_rows, stopping=stop.is_set, wait=stop.wait,
                                name="pgnotify-sync backfill", on_chunk=shown)
    except psycopg2.Error as exc:
        raise PgNotifyError(f"backfill for consumer {args.consumer!r}: {backfill.describe(exc)}") from None
    return EXIT_OK if all(s["done"] for s in progress.values()) else EXIT_INTERRUPTED


def _add_backfill_parser(sub):
    p = sub.add_parser("backfill", help="deliver the existing rows of watched tables to a durable consumer once "
                                        "(BACKFILL events); JSON lines of progress; resumable")
    p.add_argument("tables", nargs="+", metavar="TABLE", help="schema.table (or table: public)")
    p.add_argument("--consumer", required=True, help="the durable consumer (its listener must have run once)")
    p.add_argument("--chunk-rows", type=int, default=None, help="rows per transaction (PG_NOTIFY_BACKFILL_CHUNK, "
                                                                "default 1000)")
    _add_db_flags(p)
    p.set_defaults(func=cmd_backfill)


def _add_dead_letter_parsers(sub):
    p = sub.add_parser("dead-letters", help="a durable consumer's dead letters: list (JSON lines), retry, drop")
    actions = p.add_subparsers(dest="action", metavar="ACTION")
    actions.required = True
    q = actions.add_parser("list", help="JSON lines: consumer, channel, event_id, attempts, error type and line")
    q.add_argument("--consumer", default=None)
    q.add_argument("--channel", default=None, help="a logical channel (the prefix is added)")
    _add_db_flags(q)
    q.set_defaults(func=cmd_dead_letters)
    for action, text in (("retry", "deliver them again to the consumer's handlers (at once if it runs, else at "
                                   "its next start); prints how many"),
                         ("drop", "forget them; prints how many")):
        q = actions.add_parser(action, help=text)
        q.add_argument("--consumer", required=True)
        q.add_argument("--all", action="store_true", help="every dead letter of the consumer")
        q.add_argument("ids", nargs="*", type=int, metavar="ID", help="event ids")
        _add_db_flags(q)
        q.set_defaults(func=cmd_dead_letters)


def _add_demo_parser(sub):
    p = sub.add_parser("demo", help="live events from a demo table (starts a throwaway PostgreSQL "
                                    "when POSTGRES_DB is not set)")
    p.add_argument("--changes", type=int, default=None,
                   help="how many changes the demo writer makes (default 12; with --web: until interrupted)")
    p.add_argument("--interval-s", type=float, default=0.3, help="pause between the writer's changes")
    p.add_argument("--forever", action="store_true",
                   help="keep writing until interrupted (with --web and --changes: keep serving after them)")
    p.add_argument("--web", action="store_true",
                   help="serve the events to a browser (a page with an EventSource) on 127.0.0.1; "
                        "prints the URL; needs the sse extra")
    p.add_argument("--web-port", type=int, default=8000, metavar="PORT",
                   help="port of the --web page (default 8000; 0: a free port). --port is PostgreSQL's")
    p.add_argument("--restart-server", action="store_true",
                   help="restart the throwaway server half-way: events written meanwhile still arrive")
    _add_db_flags(p)
    p.set_defaults(func=cmd_demo)


def build_parser():
    """The ``pgnotify-sync`` parser: global options, then one sub-command each (in --help order)."""
    parser = argparse.ArgumentParser(prog="pgnotify-sync", description=(
        "PostgreSQL row changes as events: install the triggers, watch tables, listen, publish."))
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-vv: debug)")
    parser.add_argument("--log-format", choices=("text", "json"), default="text", help="log line format (stderr)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    _add_schema_parsers(sub)
    _add_grant_parsers(sub)
    _add_event_parsers(sub)
    _add_dead_letter_parsers(sub)
    _add_backfill_parser(sub)
    _add_demo_parser(sub)
    return parser


def _setup_logging(args):
    level = VERBOSITY_LEVELS[min(args.verbose, len(VERBOSITY_LEVELS) - 1)]
    handler = logging.StreamHandler(sys.stderr)
    if args.log_format == "json":
        from .logs import JsonFormatter
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger("pgnotify_sync")
    root.addHandler(handler)
    root.setLevel(level)


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    _setup_logging(args)
    try:
        code = args.func(args)
        return EXIT_OK if code is None else code
    except ConfigError as exc:
        print(f"pgnotify-sync: configuration error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except PgNotifyError as exc:
        print(f"pgnotify-sync: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
