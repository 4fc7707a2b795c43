"""Unit tests for pgnotify_sync._lifecycle: the listener's state machine (no database).

Every pair of states is tried: a move in MOVES works, staying put always works, any
other move raises ListenerStateError and leaves the state alone; once stopped,
every move is refused quietly. The concurrency tests widen the lock's window on
purpose (a MOVES lookup that yields the GIL) so a missing lock shows.
"""

import collections
import itertools
import logging
import random
import sys
import threading
import time

import pytest

from pgnotify_sync import _lifecycle
from pgnotify_sync._lifecycle import MOVES, ConnectionState, Lifecycle
from pgnotify_sync.errors import ListenerStateError, PgNotifyError

S = ConnectionState
STATES = list(ConnectionState)
LIVE = (S.CONNECTING, S.LISTENING, S.RECONNECTING)

# The table as the module's docstring draws it, plus the two retries its comments
# name (LISTENING/RECONNECTING -> CONNECTING). A change of MOVES must change this too.
DOCUMENTED = {
    S.STOPPED: {S.CONNECTING},
    S.CONNECTING: {S.LISTENING, S.RECONNECTING, S.FAILED, S.STOPPED},
    S.LISTENING: {S.RECONNECTING, S.CONNECTING, S.FAILED, S.STOPPED},
    S.RECONNECTING: {S.LISTENING, S.CONNECTING, S.FAILED, S.STOPPED},
    S.FAILED: {S.CONNECTING, S.STOPPED},
}


def path_to(state):
    """Legal moves from a fresh Lifecycle (STOPPED, never stopped) to *state*,
    not through STOPPED (which is final once reached)."""
    paths = {S.STOPPED: []}
    todo = collections.deque([S.STOPPED])
    while todo:
        now = todo.popleft()
        for to in sorted(MOVES[now]):
            if to is not S.STOPPED and to not in paths:
                paths[to] = paths[now] + [to]
                todo.append(to)
    return paths[state]


def at(state, name="t"):
    life = Lifecycle(name)
    for step in path_to(state):
        assert life.move(step) is True
    assert life.state is state
    return life


# -- the table ----------------------------------------------------------------------------


def test_moves_is_the_documented_table():
    assert {k: set(v) for k, v in MOVES.items()} == DOCUMENTED
    assert set(MOVES) == set(STATES)


def test_every_live_state_can_fail_and_be_stopped():
    for state in LIVE:
        assert S.FAILED in MOVES[state] and S.STOPPED in MOVES[state]


def test_states_are_strings():
    assert S.LISTENING == "LISTENING"
    assert str(S.RECONNECTING) == "RECONNECTING"
    assert f"{S.FAILED}" == "FAILED"


def test_a_new_lifecycle_is_stopped_but_can_start():
    life = Lifecycle("t")
    assert life.state is S.STOPPED
    assert life.move(S.CONNECTING) is True
    assert life.state is S.CONNECTING


# -- every pair of states -----------------------------------------------------------------


LEGAL = [(a, b) for a in STATES for b in STATES if b in MOVES[a]]
ILLEGAL = [(a, b) for a in STATES for b in STATES if b is not a and b not in MOVES[a]]


def test_the_pairs_cover_every_pair():
    assert len(LEGAL) + len(ILLEGAL) + len(STATES) == len(STATES) ** 2
    assert len(LEGAL) == sum(len(v) for v in DOCUMENTED.values()) == 15


@pytest.mark.parametrize("now, to", LEGAL, ids=[f"{a}->{b}" for a, b in LEGAL])
def test_legal_move(now, to):
    life = at(now)
    assert life.move(to) is True
    assert life.state is to


@pytest.mark.parametrize("now, to", ILLEGAL, ids=[f"{a}->{b}" for a, b in ILLEGAL])
def test_illegal_move_raises_and_keeps_the_state(now, to):
    life = at(now, name="orders")
    with pytest.raises(ListenerStateError) as info:
        life.move(to)
    assert info.value.args[0] == f"orders: no move from {now.value} to {to.value}"
    assert isinstance(info.value, PgNotifyError) and isinstance(info.value, RuntimeError)
    assert life.state is now
    # The refused move changed nothing: a legal one still works from here.
    to_next = sorted(MOVES[now])[0]
    assert life.move(to_next) is True and life.state is to_next


@pytest.mark.parametrize("state", STATES, ids=str)
def test_staying_put_is_always_allowed(state):
    life = at(state)
    assert life.move(state) is True
    assert life.state is state
    if state is not S.STOPPED:
        # ... and does not count as a stop: the listener still moves on.
        assert life.move(S.STOPPED) is True


def test_a_fresh_stopped_lifecycle_is_not_final():
    """Never started (or only STOPPED -> STOPPED): illegal moves still raise."""
    life = Lifecycle("t")
    assert life.move(S.STOPPED) is True
    with pytest.raises(ListenerStateError):
        life.move(S.LISTENING)
    assert life.move(S.CONNECTING) is True


# -- STOPPED is final ---------------------------------------------------------------------


@pytest.mark.parametrize("before", [s for s in STATES if s is not S.STOPPED], ids=str)
def test_stopped_is_final(before):
    life = at(before)
    assert life.move(S.STOPPED) is True
    for to in STATES:
        if to is S.STOPPED:
            assert life.move(to) is True        # staying put
        else:
            # Refused quietly, even the moves that would be illegal anyway.
            assert life.move(to) is False
        assert life.state is S.STOPPED


def test_a_move_is_logged_at_debug(caplog):
    life = Lifecycle("orders")
    with caplog.at_level(logging.DEBUG, logger="pgnotify_sync"):
        life.move(S.CONNECTING)
        life.move(S.CONNECTING)       # staying put: no line
        life.move(S.LISTENING)
    lines = [r.getMessage() for r in caplog.records if r.name == "pgnotify_sync"]
    assert lines == ["orders: state STOPPED -> CONNECTING", "orders: state CONNECTING -> LISTENING"]


# -- concurrency --------------------------------------------------------------------------


class YieldingMoves(dict):
    """MOVES whose lookup gives the GIL away: another thread runs between move()'s
    read of the state and its write, as it may on any real switch."""

    def __getitem__(self, key):
        time.sleep(0)
        return dict.__getitem__(self, key)


@pytest.fixture
def racy(monkeypatch):
    monkeypatch.setattr(_lifecycle, "MOVES", YieldingMoves(MOVES))
    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    yield
    sys.setswitchinterval(old)


class Transitions(logging.Handler):
    """Records every (from, to) move() reports (the debug line is its only trace)."""

    def __init__(self):
        super().__init__(logging.DEBUG)
        self.moves = []

    def emit(self, record):
        _name, now, to = record.args
        self.moves.append((S(now), S(to)))


@pytest.fixture
def transitions():
    handler = Transitions()
    logger = logging.getLogger("pgnotify_sync")
    old = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    yield handler
    logger.removeHandler(handler)
    logger.setLevel(old)


def run_threads(n, target):
    errors = []
    start = threading.Barrier(n)

    def run(i):
        try:
            start.wait(10)
            target(i)
        except BaseException as exc:      # reported below, not lost in the thread
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,), name=f"mover-{i}") for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
        assert not t.is_alive(), f"{t.name} did not finish"
    return errors


def test_concurrent_moves_form_one_legal_chain(racy, transitions):
    """Threads moving at random: each recorded move is legal, and together they are
    one chain from STOPPED to the final state (every state entered as often as it
    was left, give or take the ends): no two threads moved away from the same state."""
    life = Lifecycle("t")
    assert life.move(S.CONNECTING)
    refused = collections.Counter()
    lock = threading.Lock()

    def mover(i):
        rng = random.Random(i)
        for _ in range(400):
            to = rng.choice([S.CONNECTING, S.LISTENING, S.RECONNECTING, S.FAILED])
            try:
                assert life.move(to) is True
            except ListenerStateError:
                with lock:
                    refused["illegal"] += 1

    assert run_threads(6, mover) == []
    moves = transitions.moves
    assert all(to in MOVES[now] for now, to in moves), "an illegal move was made"
    left = collections.Counter(now for now, _ in moves)
    entered = collections.Counter(to for _, to in moves)
    balance = {s: entered[s] - left[s] for s in STATES if entered[s] != left[s]}
    expected = {} if life.state is S.STOPPED else {S.STOPPED: -1, life.state: 1}
    assert balance == expected, f"moves do not form one chain (entered - left per state): {balance}"
    assert refused["illegal"] > 0 and len(moves) > 100     # the test did race


def test_stop_wins_against_concurrent_moves(racy):
    """While threads keep moving the listener between live states, stop(): afterwards
    it is STOPPED and stays so; every move after the stop returned False."""
    for attempt in range(20):
        life = at(S.LISTENING)
        stopped = threading.Event()
        after_stop = []

        def mover(i):
            cycle = itertools.cycle([S.RECONNECTING, S.LISTENING] if i % 2 else [S.CONNECTING, S.LISTENING])
            for n in range(300):
                if i == 0 and n == 50:
                    assert life.move(S.STOPPED) is True
                    stopped.set()
                    continue
                was_stopped = stopped.is_set()
                ok = life.move(next(cycle))     # any move between live states is legal
                if was_stopped:
                    after_stop.append(ok)

        assert run_threads(4, mover) == []
        assert life.state is S.STOPPED, f"attempt {attempt}: a late move overwrote STOPPED with {life.state}"
        assert after_stop and not any(after_stop), "a move after stop() succeeded"
