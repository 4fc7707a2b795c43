"""Small helpers shared by the tests.

Tests never sleep for a fixed time: they poll a condition with a deadline via
``wait_for`` so they are fast when things work and still tolerant of slow CI.
"""

import time


def wait_for(predicate, timeout=10.0, interval=0.005, message=""):
    """Call ``predicate`` until it returns something truthy and return that value.

    Raises AssertionError (``message`` plus the last value seen) once ``timeout``
    seconds have passed.  Exceptions raised by ``predicate`` propagate: a
    condition that errors is a bug in the test, not something to wait out.
    """
    deadline = time.monotonic() + timeout
    while True:
        last = predicate()
        if last:
            return last
        if time.monotonic() >= deadline:
            prefix = f"{message}: " if message else ""
            raise AssertionError(f"{prefix}condition not met within {timeout}s; last value: {last!r}")
        time.sleep(interval)
