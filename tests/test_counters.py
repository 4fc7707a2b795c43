"""Unit tests for pgnotify_sync._counters.Counters (no database).

The thread test shortens the interpreter's switch interval so that threads
interleave inside ``inc``'s read-add-write: without the lock, counts get lost.
"""

import sys
import threading

import pytest

from pgnotify_sync._counters import Counters


def test_initial_values_inc_set_get():
    c = Counters(received=0, last_error=None)
    assert c["received"] == 0 and c["last_error"] is None
    c.inc("received")
    c.inc("received", 5)
    c.inc("fresh", 2)           # a name not given initially starts at 0
    c.set("last_error", {"kind": "handler"})
    assert c["received"] == 6
    assert c.get("fresh") == 2
    assert c.get("last_error") == {"kind": "handler"}
    assert c.get("unknown") == 0 and c.get("unknown", None) is None
    with pytest.raises(KeyError):
        c["unknown"]


def test_snapshot_is_a_copy():
    c = Counters(a=1, b=2)
    snap = c.snapshot()
    assert snap == {"a": 1, "b": 2} and type(snap) is dict
    snap["a"] = 100
    snap["new"] = 1
    assert c["a"] == 1 and c.get("new", None) is None
    c.inc("a")
    c.set("b", 7)
    assert snap == {"a": 100, "b": 2, "new": 1}      # later changes do not reach it
    assert c.snapshot() == {"a": 2, "b": 7}


@pytest.fixture
def fast_switching():
    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    yield
    sys.setswitchinterval(old)


def test_inc_from_many_threads_loses_nothing(fast_switching):
    threads_n, per_thread = 8, 20_000
    c = Counters(shared=0)
    start = threading.Barrier(threads_n)

    def work(i):
        start.wait(10)
        for _ in range(per_thread):
            c.inc("shared")
            c.inc(f"own-{i % 2}", 2)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(threads_n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
        assert not t.is_alive()
    snap = c.snapshot()
    assert snap["shared"] == threads_n * per_thread
    assert snap["own-0"] == snap["own-1"] == threads_n // 2 * per_thread * 2
