"""gunicorn settings for app.py: 2 gthread workers, one listener each, started after
the fork; on SIGTERM (a stop, a scale-down, a rolling restart with HUP) each
worker keeps streaming for the bridge's grace (1 s, so a replacement worker is
listening by then), ends every stream with a last ``retry:`` (the browsers come
back to another worker and resume with Last-Event-ID) and stops its listener:
it exits within 2 s instead of waiting for graceful_timeout.

    gunicorn -c gunicorn.conf.py app:app
"""

import os
import signal

bind = os.environ.get("BIND", "127.0.0.1:8000")
workers = int(os.environ.get("WEB_CONCURRENCY", "2"))
worker_class = "gthread"
# Each open event stream holds one thread of its worker for as long as it lasts.
threads = int(os.environ.get("GUNICORN_THREADS", "32"))
# The app (Flask, the library) is imported once, by the master; the listener is
# made then but started in each worker (post_fork): never share a connection
# across a fork.
preload_app = True
# A backstop only: the streams end after the bridge's grace.
graceful_timeout = 10
timeout = 30


def on_starting(server):
    import app
    app.setup_database()


def post_fork(server, worker):
    from app import listener
    listener.start()


def pre_request(worker, req):
    # An event stream's connection is never kept alive: the browser's reconnect then
    # opens a new connection, which a live worker accepts. (A kept-alive one would
    # bring it back to this worker while it shuts down, to be refused; and gunicorn
    # would wait for such connections before the worker exits.)
    if req.path.startswith("/events/stream"):
        req.must_close = True


def post_worker_init(worker):
    # gunicorn installed its own SIGTERM handler by now: close_on_signal chains to it.
    from app import bridge, listener
    bridge.close_on_signal(signal.SIGTERM, then=listener.stop)


def worker_int(worker):
    # SIGINT / SIGQUIT: gunicorn exits the worker right after this hook, which runs in
    # its signal handler: the work goes to a thread (a handler must not take locks
    # the interrupted code may hold), given a second.
    import threading
    from app import bridge, listener
    closing = threading.Thread(target=lambda: (bridge.close(), listener.stop(timeout=1.0)), daemon=True)
    closing.start()
    closing.join(1.0)


def worker_exit(server, worker):
    from app import listener
    listener.stop(timeout=1.0)      # idempotent: already stopped after a SIGTERM
