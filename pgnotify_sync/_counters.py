"""One thread-safe store for a listener's counters and gauges (no thread).

``stats[name] += n`` on a plain dict is a read, an add and a write: two threads doing
it at once lose counts. Every counter of a listener goes through :meth:`inc` (one
lock), and metrics and ``get_stats()`` read a consistent copy. Totals of counters
kept elsewhere (per channel) are *derived*: computed on reading, never counted
twice.
"""

import threading


class Counters:
    __slots__ = ("_lock", "_values", "_derived")

    def __init__(self, derived=None, **initial):
        self._lock = threading.Lock()
        self._values = dict(initial)
        self._derived = dict(derived or {})     # name -> () -> value

    def inc(self, name, n=1):
        if name in self._derived:
            raise KeyError(f"{name!r} is derived from other counters: count it there")
        with self._lock:
            self._values[name] = self._values.get(name, 0) + n

    def set(self, name, value):
        if name in self._derived:
            raise KeyError(f"{name!r} is derived from other counters: count it there")
        with self._lock:
            self._values[name] = value

    def get(self, name, default=0):
        fn = self._derived.get(name)
        if fn is not None:
            return fn()
        with self._lock:
            return self._values.get(name, default)

    def __getitem__(self, name):
        fn = self._derived.get(name)
        if fn is not None:
            return fn()
        with self._lock:
            return self._values[name]

    def snapshot(self):
        """A plain dict copy."""
        with self._lock:
            values = dict(self._values)
        for name, fn in self._derived.items():
            values[name] = fn()
        return values
