"""A listener's periodic work on one thread, ``<name>-maintenance``: small task
objects on a scheduler that sleeps until the next one is due (in place of a loop
polling four jobs every 0.25 s).

A task that raises is logged and runs again at its next time: maintenance never
stops because of one failure (a database away, a trim that timed out).
"""

import logging
import time

from ._threads import spawn
from .errors import PrivilegeError, first_line

log = logging.getLogger("pgnotify_sync")

# A task whose condition does not hold yet (e.g. not connected) looks again this
# often: it then runs as soon as the condition holds, not a whole interval later.
RECHECK_S = 0.25


class Every:
    """*action()* every *interval_s* seconds (the first time after *first_s*, default
    one interval), when *when()* (default: always) holds."""

    __slots__ = ("name", "interval_s", "action", "when", "next_at")

    def __init__(self, name, interval_s, action, first_s=None, when=None):
        if interval_s <= 0:
            raise ValueError(f"task {name!r}: interval_s must be > 0, got {interval_s!r}")
        self.name = name
        self.interval_s = interval_s
        self.action = action
        self.when = when
        self.next_at = time.monotonic() + (interval_s if first_s is None else first_s)

    def __repr__(self):
        return f"<Every {self.name} {self.interval_s} s>"


class Maintenance:
    """Runs *tasks* on a thread named *thread_name* until *stop_event* is set."""

    def __init__(self, thread_name, stop_event, tasks):
        self._tasks = list(tasks)
        self._stop = stop_event
        self.name = thread_name
        self.thread = None

    def start(self):
        self.thread = spawn(self._run, self.name)
        return self.thread

    def run_due(self, now):
        """Run every task due at *now*; returns when the next one is due."""
        for task in self._tasks:
            if task.next_at > now:
                continue
            try:
                if task.when is not None and not task.when():
                    task.next_at = now + min(RECHECK_S, task.interval_s)
                    continue
                task.next_at = now + task.interval_s
                task.action()
            except Exception as exc:    # the condition too: nothing ends this thread
                task.next_at = max(task.next_at, now + min(RECHECK_S, task.interval_s))
                log.warning("%s: %s: %s", self.name, task.name, first_line(exc))
        return min((t.next_at for t in self._tasks), default=now + RECHECK_S)

    def _run(self):
        while not self._stop.is_set():
            next_at = self.run_due(time.monotonic())
            if self._stop.wait(max(0.0, next_at - time.monotonic())):
                return


class TrimUnlessRefused:
    """The retention task's action, *cleanup*: a role the database does not let
    trim (no grant_admin) is told so once, at INFO, and not asked again; an
    admin's listener or a cron job trims."""

    def __init__(self, cleanup):
        self._cleanup = cleanup
        self.refused = False

    def __call__(self):
        if self.refused:
            return 0
        try:
            return self._cleanup()
        except PrivilegeError as exc:
            self.refused = True
            log.info("%s", exc, extra={"event": "retention_not_granted"})
            return 0
