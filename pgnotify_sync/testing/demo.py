"""``pgnotify-sync demo``: live events from a demo table.

With no database configured (POSTGRES_DB unset) it starts a throwaway local
PostgreSQL (:mod:`pgnotify_sync.testing`; as root it runs the server as the
``postgres`` OS user), installs the schema objects, creates and watches
``demo_messages``, and prints each event as the demo writer inserts, updates and
deletes rows.

``--web`` serves the same events to a browser instead: a threaded werkzeug server
on 127.0.0.1 with a page (``pgnotify_sync/testing/web/index.html``) whose ``EventSource``
reads the SSE bridge (:mod:`pgnotify_sync.sse`). :func:`serve_demo` is that
server, usable on its own (the browser test drives it)::

    demo = serve_demo(cfg, port=0)      # cfg: a Config with channels=("demo",)
    print(demo.url)
    ...
    demo.close()
"""

import itertools
import os
import sys
import threading
import time

from ..errors import PgNotifyError


_print_lock = threading.Lock()


def say(text):
    """One whole line at a time: events and lifecycle lines come from several threads."""
    with _print_lock:
        sys.stdout.write(text + "\n")
        sys.stdout.flush()


def _target(args):
    if os.environ.get("POSTGRES_DB") or args.db:
        from ..cli import _config
        return _config(args, channels=("demo",)), None
    from . import TemporaryCluster, config_for
    say("demo: no POSTGRES_DB set: starting a throwaway PostgreSQL ...")
    cluster = TemporaryCluster().start()
    say(f"demo: PostgreSQL running on {cluster.host}:{cluster.port} ({cluster.base_dir})")
    return config_for(cluster, "postgres", channels=("demo",)), cluster


def prepare_demo_table(cfg):
    """Install the schema objects, create ``demo_messages`` and watch it on channel ``demo``."""
    import psycopg2

    from ..schema import install, watch_table

    conn = psycopg2.connect(**cfg.connect_kwargs())
    try:
        conn.autocommit = True
        install(conn)
        with conn.cursor() as cur:
            cur.execute("CREATE TABLE IF NOT EXISTS demo_messages (id serial PRIMARY KEY, author text, "
                        "body text, password_hash text, created_at timestamptz DEFAULT now())")
        watch_table(conn, "public.demo_messages", channel="demo", exclude_columns=("password_hash",),
                    channel_prefix=cfg.channel_prefix)
    finally:
        conn.close()


class DemoServer:
    """A running web demo: ``url``, ``listener``, ``bridge``, ``server``; ``close()`` stops it all."""

    def __init__(self, listener, bridge, server, thread):
        self.listener = listener
        self.bridge = bridge
        self.server = server
        self.thread = thread
        host, port = server.server_address[:2]
        self.url = f"http://{host}:{port}/"

    def close(self):
        self.bridge.close()             # ends every open stream: the server threads return
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)
        self.listener.stop()

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()


def serve_demo(cfg, port=0, host="127.0.0.1", listener_name="demo-web", prepare=True, **bridge_options):
    """Start the web demo against *cfg*'s database and return a :class:`DemoServer`.

    Prepares ``demo_messages`` (unless ``prepare=False``), starts a listener on
    channel ``demo``, an :class:`~pgnotify_sync.sse.SSEBridge` with ``authorize=allow_all``
    (a local demo; *bridge_options* go to the bridge) and a threaded werkzeug server on
    *host*:*port* (0: a free port) serving the page at ``/`` and the stream at
    ``/events/stream``. Nothing is written: that is the caller's (or the demo writer's) job.
    """
    from ..listener import Listener
    from ..sse import SSEBridge, allow_all
    from .web import demo_app, make_server

    if "demo" not in cfg.channels:
        import attrs
        cfg = attrs.evolve(cfg, channels=tuple(cfg.channels) + ("demo",))
    if prepare:
        prepare_demo_table(cfg)
    listener = Listener(cfg, name=listener_name)
    bridge = server = None
    try:
        bridge = SSEBridge(listener, ["demo"], authorize=allow_all, **bridge_options)
        listener.start()
        try:
            server = make_server(demo_app(bridge), host=host, port=port)
        except OSError as exc:
            raise PgNotifyError(f"demo: cannot serve on {host}:{port}: {exc.strerror or exc}"
                                + ("; pass --web-port 0 for a free port" if port else "")) from None
        thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1},
                                  name="demo-web-server", daemon=True)
        thread.start()
    except BaseException:
        if bridge is not None:
            bridge.close()
        listener.stop()
        raise
    return DemoServer(listener, bridge, server, thread)


def run_demo(args):
    if getattr(args, "web", False):
        return _run_web_demo(args)
    if args.changes is None:
        args.changes = 12
    from ..listener import Listener

    cfg, cluster = _target(args)
    listener = None
    try:
        prepare_demo_table(cfg)

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


def _run_web_demo(args):
    import importlib.util
    if importlib.util.find_spec("werkzeug") is None:
        raise PgNotifyError("demo --web needs the sse extra: pip install 'pgnotify_sync[sse]'")
    _terminate_as_interrupt()
    cfg, cluster = _target(args)
    demo = None
    try:
        demo = serve_demo(cfg, port=args.web_port)
        say(f"demo: open {demo.url} (events stream at {demo.url}events/stream?channels=demo; Ctrl-C stops)")
        if args.changes is None:
            args.forever = True
            _write(cfg, args, cluster)          # until interrupted
            return 0
        forever, args.forever = args.forever, False
        written = _write(cfg, args, cluster)
        say(f"demo: {written} changes written")
        if forever:
            say("demo: still serving (--forever); Ctrl-C stops")
            while True:
                time.sleep(3600)
        return 0
    except KeyboardInterrupt:
        return 130
    finally:
        if demo is not None:
            demo.close()
        if cluster is not None:
            cluster.cleanup()


def _terminate_as_interrupt():
    """SIGTERM ends the web demo like Ctrl-C: the throwaway cluster is removed."""
    import signal

    def handler(signum, frame):
        raise KeyboardInterrupt
    try:
        signal.signal(signal.SIGTERM, handler)
    except ValueError:
        pass  # not the main thread


def _write(cfg, args, cluster):
    import psycopg2
    authors = itertools.cycle(["ada", "linus", "grace", "guido"])
    written = 0
    count = itertools.count() if args.forever else range(args.changes)
    restart_at = args.changes // 2 if args.changes else 20
    conn = None
    for i in count:
        if args.restart_server and cluster is not None and i == restart_at:
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
