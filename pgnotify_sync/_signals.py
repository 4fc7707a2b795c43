"""Work started by a signal, done on a thread of its own (owns the thread
``<name>``, started when the handler is installed).

A Python signal handler runs on the main thread between two bytecodes, possibly
while that thread holds a lock the work needs (the bridge's, the listener's, the
logging module's): work done in the handler itself could deadlock. The handler
only writes a byte to a pipe (no lock taken), and the thread that waits on the
pipe does the work; the signal then goes on to the handler installed before, so
the server's own shutdown (gunicorn's: stop accepting, wait for the requests)
runs as usual.
"""

import logging
import os
import signal

from ._threads import spawn

log = logging.getLogger("pgnotify_sync")


def on_signal(signum, action, name):
    """Run ``action()`` on thread *name* when *signum* arrives (once), then what was
    installed before: a handler function is called (in the signal handler, at
    once); the default action, ending the process, is taken once the work is done
    (exit status 128 + signum); an ignored signal stays ignored. Call from the main
    thread. Returns the thread."""
    read_fd, write_fd = os.pipe()
    os.set_blocking(write_fd, False)        # a handler never waits
    previous = signal.getsignal(signum)

    def wait():
        signalled = False
        try:
            signalled = bool(os.read(read_fd, 1))
            if signalled:
                action()
        except Exception:
            log.exception("%s: the work for signal %s failed", name, signal.Signals(signum).name)
        finally:
            # The write end stays open: a later signal's write then fails (EPIPE)
            # instead of landing in a file that reused its number.
            os.close(read_fd)
        if signalled and previous in (signal.SIG_DFL, None):
            # The default action ends the process: so it does, after the work (a
            # signal's usual exit status; the thread cannot restore the default).
            os._exit(128 + signum)

    def handler(sig, frame):
        try:
            os.write(write_fd, b"x")
        except OSError:
            pass        # the work ran already (the pipe is closed)
        if callable(previous):
            previous(sig, frame)

    thread = spawn(wait, name)
    signal.signal(signum, handler)
    return thread
