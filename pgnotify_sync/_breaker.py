"""A circuit breaker per receiver of a channel: a receiver that keeps failing stops
holding its channel back (a pure state machine; no thread, no I/O, no user code).

Retries (``handler_max_attempts``, with backoff) are for failures that pass: a
database blip. A receiver that fails every event (a ``KeyError`` on a new column)
would make each event wait out the whole backoff (about 1.5 s with the defaults),
and with it every other receiver of the channel, the SSE bridge and the buffer
behind them. So each receiver has a breaker:

========  ==============================================  =======================
state     a call                                          moves to
========  ==============================================  =======================
CLOSED    healthy: a failure is retried with backoff      SUSPECT when an event
                                                          fails for good
SUSPECT   called once per event, no backoff (a failure    CLOSED on a success;
          that outlived a whole backoff is not passing)   OPEN after ``threshold``
                                                          events failed in a row
OPEN      not called: its events fail at once (but a      TRIAL after ``reset_s``
          dead letter whose retry was asked for: once)
TRIAL     one caller gets one call; the others fail at    CLOSED on success, OPEN
          once meanwhile                                  again on its failure
========  ==============================================  =======================

With the defaults (5 attempts, threshold 5, as pybreaker's ``fail_max``) a
receiver that always raises holds its channel for one backoff series (0.75 to
1.5 s) and four single calls, then its
events fail at once (reported, counted and, for a durable consumer, parked as dead
letters) while the other receivers go on at full speed; every ``reset_s`` one
event tries it again, and the first success closes it. ``threshold`` 0: never
opens (and SUSPECT still calls without backoff). An event that fails again after
it was read again from the log (it could not be parked) counts once: a run of
failures is one of different events.

Receivers of one channel run on its worker, or on several row threads
(``ordering="row"``) and group lanes at once: transitions take the breaker's own
lock, never held while user code runs. The hot path (CLOSED, no failure: every
event of a healthy receiver) reads one attribute, ``clean``, without the lock.
"""

import enum
import threading
import time


class State(str, enum.Enum):
    CLOSED = "closed"
    SUSPECT = "suspect"
    OPEN = "open"
    TRIAL = "trial"

    def __str__(self):
        return self.value


# States in which a handler's events fail without a call (but for a trial's one).
SUSPENDED = frozenset({State.OPEN, State.TRIAL})


class Admit(enum.Enum):
    """What :meth:`Breaker.admit` allows for one event."""

    RETRY = "retry"     # call, and retry a failure with backoff
    ONCE = "once"       # call once: a failure fails the event
    TRIAL = "trial"     # call once, as the trial of a suspended handler: its outcome decides
    REJECT = "reject"   # do not call: the event fails at once


class Breaker:
    """The breaker of receiver *name* (for reports and metric labels) of one
    channel: opens after *threshold* events failed in a row (0: never), tries again
    after *reset_s*. *clock* is monotonic seconds."""

    __slots__ = ("name", "threshold", "reset_s", "_clock", "_lock", "state", "clean", "failures",
                 "opened_at", "opened_wall", "rejected", "opened", "_last")

    def __init__(self, name, threshold, reset_s, clock=time.monotonic):
        self.name = name
        self.threshold = threshold
        self.reset_s = reset_s
        self._clock = clock
        self._lock = threading.Lock()
        self.state = State.CLOSED
        self.clean = True           # CLOSED with no failure: the hot path's one test
        self.failures = 0           # events failed for good in a row
        self.opened_at = None       # clock() of the last opening
        self.opened_wall = None     # time.time() of it (health())
        self.rejected = 0           # events failed without a call (a counter)
        self.opened = 0             # times it opened (a counter)
        self._last = None           # the key of the last event failed

    def admit(self, asked=False):
        """May this event call the receiver? (An :class:`Admit`.) *asked*: the retry
        of a dead letter, asked for by someone: called once whatever the state."""
        with self._lock:
            state = self.state
            if state is State.CLOSED:
                return Admit.RETRY
            if state is State.SUSPECT or asked:
                return Admit.ONCE
            if state is State.OPEN and self._clock() - self.opened_at >= self.reset_s:
                self.state = State.TRIAL
                return Admit.TRIAL
            self.rejected += 1
            return Admit.REJECT

    def succeeded(self):
        """A call returned. True if that closed the breaker (it had failed before)."""
        if self.clean:
            return False
        with self._lock:
            was = self.state
            self.state, self.clean, self.failures = State.CLOSED, True, 0
            self.opened_at = self.opened_wall = self._last = None
            return was is not State.CLOSED

    def failed(self, key=None, admit=Admit.RETRY):
        """An event (*key*: its id, or None) failed for good (after its calls, made
        as *admit* allowed). True if that opened the breaker. The event that failed
        last, failing again, does not count again. While it is suspended, only its
        trial's call decides (a call admitted before, on another thread, ending now
        does not open it again)."""
        with self._lock:
            if key is None or key != self._last:
                self.failures += 1
            self._last = key
            self.clean = False
            state = self.state
            if state is State.OPEN or (state is State.TRIAL and admit is not Admit.TRIAL):
                return False
            if state is State.TRIAL or (self.threshold and self.failures >= self.threshold):
                self.state = State.OPEN
                self.opened_at, self.opened_wall = self._clock(), time.time()
                self.opened += 1
                return True
            self.state = State.SUSPECT
            return False

    def abandon(self, admit):
        """The call admitted (as *admit*) said nothing of the handler (Ctrl-C, a row
        that did not fit the model): if it was the trial, the breaker goes back to
        OPEN, due for a trial at once."""
        with self._lock:
            if admit is Admit.TRIAL and self.state is State.TRIAL:
                self.state = State.OPEN

    def status(self):
        """A JSON-ready dict for health()."""
        with self._lock:
            return {"state": self.state.value, "failures": self.failures, "opened_at": self.opened_wall,
                    "rejected": self.rejected}


def receiver_name(receiver):
    """A receiver's name for reports and metric labels: its handler's module and
    qualified name (code, never data). A receiver is user code: an attribute lookup
    that raises gives its type's name."""
    try:
        target = getattr(receiver, "__wrapped__", receiver)
        target = getattr(target, "__func__", target)
        module = getattr(target, "__module__", None) or ""
        name = getattr(target, "__qualname__", None) or type(target).__name__
    except Exception:
        module, name = type(receiver).__module__, type(receiver).__qualname__
    return f"{module}.{name}" if module else name


def _key(receiver):
    # A bound method is a new object each time blinker dereferences it: keyed by
    # its instance and function, as blinker keys it.
    try:
        owner = getattr(receiver, "__self__", None)
        if owner is not None and hasattr(receiver, "__func__"):
            return id(owner), id(receiver.__func__)
    except Exception:       # user code's attribute lookup
        pass
    return id(receiver)


class Breakers:
    """The breakers of a listener's receivers, by channel (shared by a channel's
    lanes and row threads; read by health() and the metrics)."""

    def __init__(self, threshold, reset_s, clock=time.monotonic):
        self._threshold = threshold
        self._reset_s = reset_s
        self._clock = clock
        self._lock = threading.Lock()
        self._by_channel = {}       # channel -> (receiver keys, [Breaker])

    def of(self, channel, receivers):
        """The breakers of *receivers* (in order) on *channel*; those of receivers
        no longer connected are forgotten."""
        keys = tuple(map(_key, receivers))
        known = self._by_channel.get(channel)       # (a tuple, replaced whole under the lock)
        if known is not None and known[0] == keys:
            return known[1]
        names = [receiver_name(r) for r in receivers]     # user objects' attributes: not under our lock
        with self._lock:
            known = self._by_channel.get(channel)
            if known is not None and known[0] == keys:
                return known[1]
            old = dict(zip(*known)) if known is not None else {}
            breakers = [old.get(key) for key in keys]
            taken = {b.name for b in breakers if b is not None}
            for i, base in enumerate(names):
                if breakers[i] is None:
                    # unique on the channel: two lambdas are "<lambda>" and "<lambda>#2"
                    name = base
                    k = 1
                    while name in taken:
                        k += 1
                        name = f"{base}#{k}"
                    taken.add(name)
                    breakers[i] = Breaker(name, self._threshold, self._reset_s, self._clock)
            self._by_channel[channel] = (keys, breakers)
            return breakers

    def items(self):
        """(channel, Breaker) of every receiver known."""
        with self._lock:
            return [(channel, b) for channel, (_, breakers) in self._by_channel.items() for b in breakers]

    def not_closed(self):
        """``{channel: {receiver: status}}`` of the breakers not CLOSED (health())."""
        out = {}
        for channel, breaker in self.items():
            if not breaker.clean:
                out.setdefault(channel, {})[breaker.name] = breaker.status()
        return out
