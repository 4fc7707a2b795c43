"""Every background thread of the package is started by :func:`spawn` and ended by
:func:`join_all` (owns no thread itself).

Threads are daemons: a process whose main thread ends is never held up by a
listener nobody stopped. ``stop()`` still ends them: each owner signals its
threads, then the listener joins them all under one deadline and names those that
would not stop (psycopg_pool's ``spawn``/``gather``).
"""

import threading
import time


def spawn(target, name, *args):
    """Start ``target(*args)`` on a daemon thread named *name*; returns the thread."""
    thread = threading.Thread(target=target, name=name, args=args, daemon=True)
    thread.start()
    return thread


def join_all(threads, deadline):
    """Join *threads* (None entries and the calling thread are skipped) until
    *deadline* (``time.monotonic()``); returns the names of those still running."""
    me = threading.current_thread()
    late = []
    for thread in threads:
        if thread is None or thread is me:
            continue
        thread.join(max(0.0, deadline - time.monotonic()))
        if thread.is_alive():
            late.append(thread.name)
    return late
