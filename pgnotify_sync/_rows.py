"""``ordering="row"``: one channel's events of different rows handled in parallel,
each row's in order (owns the threads ``<name>-row-N``).

The channel's worker splits what it delivers by a hash of each event's row key
(_keys.py) over N row threads and waits for all of them: the same row always goes
to the same thread, which runs its share in order, so one row's events keep their
commit order while different rows run side by side. The channel's worker waits at
the end of each part it hands over (a batch, or ``checkpoint_every`` events), so
a durable consumer's position only covers what every row thread finished.
"""

import queue
import threading

from ._keys import key_hash, row_key
from ._threads import join_all, spawn


class _Part:
    """What one row thread runs for one wait: *events* through *fn*."""

    __slots__ = ("events", "fn", "result", "error", "latch")

    def __init__(self, events, fn, latch):
        self.events = events
        self.fn = fn
        self.latch = latch
        self.result = None
        self.error = None


class _Latch:
    def __init__(self, count):
        self._count = count
        self._cond = threading.Condition(threading.Lock())

    def done(self):
        with self._cond:
            self._count -= 1
            if self._count == 0:
                self._cond.notify_all()

    def wait(self):
        with self._cond:
            while self._count:
                self._cond.wait()


class RowPool:
    """*n* row threads of listener *name*; *key_columns* the KeyColumns of _keys.py."""

    def __init__(self, name, n, key_columns):
        self._name = name
        self._keys = key_columns
        self._queues = [queue.SimpleQueue() for _ in range(n)]
        self._threads = [spawn(self._work, f"{name}-row-{i}", q) for i, q in enumerate(self._queues)]

    def run(self, events, fn):
        """``fn(part)`` for the parts of *events* split by row, each on its row's
        thread (one part: on the caller's); returns their results once all ended.
        An exception of *fn* (our bug, handlers are isolated inside it) is raised
        here after every part ended."""
        n = len(self._queues)
        parts = [[] for _ in range(n)]
        keys = self._keys
        for event in events:
            parts[key_hash(row_key(event, keys)) % n].append(event)
        used = [i for i in range(n) if parts[i]]
        if len(used) == 1:
            return [fn(parts[used[0]])]
        latch = _Latch(len(used))
        jobs = []
        for i in used:
            job = _Part(parts[i], fn, latch)
            jobs.append(job)
            self._queues[i].put(job)
        latch.wait()
        for job in jobs:
            if job.error is not None:
                raise job.error
        return [job.result for job in jobs]

    @staticmethod
    def _work(q):
        while True:
            job = q.get()
            if job is None:
                return
            try:
                job.result = job.fn(job.events)
            except BaseException as exc:
                job.error = exc
            finally:
                job.latch.done()

    def close(self, deadline):
        for q in self._queues:
            q.put(None)
        return join_all(self._threads, deadline)

    def threads(self):
        return list(self._threads)
