"""A listener's periodic work on one thread, ``<name>-maintenance``: small task
objects on a scheduler that sleeps until the next one is due (in place of a loop
polling four jobs every 0.25 s).

A task that raises is logged and runs again at its next time: maintenance never
stops because of one failure (a database away, a trim that timed out). The
listener's own tasks are :func:`listener_tasks`.
"""

import logging
import time

from ._deadletters import POLL_S as DEAD_LETTER_POLL_S
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


# A listener's tasks (listener_tasks). How soon the maintenance thread resumes a
# channel that fell back to the log once there is room again, and sends buffered
# publishes once the database is back.
RESUME_EVERY_S = 0.25
FLUSH_EVERY_S = 0.25
# Pooled connections kept open: one for the workers' reads of hinted rows, one for
# maintenance (lag, retention, publish) so neither opens one while the other reads.
WARM_CONNECTIONS = 2
POOL_FILL_EVERY_S = 5.0


def listener_tasks(cfg, has_log, listening, fill_pool, dispatcher, publisher, update_lag, cleanup,
                       poll_dead_letters):
    """The tasks of a Listener's maintenance thread."""
    tasks = [
        # Reads on the delivery path find a connection open (no connect stall).
        Every("open pooled connections", POOL_FILL_EVERY_S, fill_pool, first_s=0.0, when=listening),
        Every("retry overflowed channels", RESUME_EVERY_S, dispatcher.retry_overflowed),
        Every("flush publishes", FLUSH_EVERY_S, publisher.flush, when=lambda: len(publisher) > 0),
        # Lag feeds the metrics and health().
        Every("lag", cfg.health_check_interval_s, update_lag, first_s=1.0, when=listening),
    ]
    if poll_dead_letters:
        tasks.append(Every("dead letters", DEAD_LETTER_POLL_S, poll_dead_letters, first_s=0.5, when=listening))
    if cfg.cleanup_interval_s:
        tasks.append(Every("retention", cfg.cleanup_interval_s, TrimUnlessRefused(cleanup),
                           first_s=min(cfg.cleanup_interval_s, 5.0), when=has_log))
    return tasks
