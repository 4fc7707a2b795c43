"""One thread-safe store for a listener's counters and gauges.

``stats[name] += n`` on a plain dict is a read, an add and a write: two threads doing
it at once lose counts. Every counter of a listener goes through :meth:`inc` (one
lock), and metrics and ``get_stats()`` read a consistent copy.
"""

import threading


class Counters:
    __slots__ = ("_lock", "_values")

    def __init__(self, **initial):
        self._lock = threading.Lock()
        self._values = dict(initial)

    def inc(self, name, n=1):
        with self._lock:
            self._values[name] = self._values.get(name, 0) + n

    def set(self, name, value):
        with self._lock:
            self._values[name] = value

    def get(self, name, default=0):
        with self._lock:
            return self._values.get(name, default)

    def __getitem__(self, name):
        with self._lock:
            return self._values[name]

    def snapshot(self):
        """A plain dict copy."""
        with self._lock:
            return dict(self._values)
