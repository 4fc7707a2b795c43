"""How fast faults are noticed and refusals come back: the timings the tests used to
assert with wall-clock thresholds (issue 18 moved them here; the tests now check the
behaviour: which signal, how many retries, which error).

Each figure is measured ``--runs`` times beside its baseline from the same run:

faults_frozen     a silent network path (tests/tcpproxy.py ``freeze()``: sockets stay
                  open, nothing is forwarded): freeze -> ``disconnected`` signal,
                  health_check_interval_s=1, health_check_timeout_s=1. Baseline: the
                  configured bound, interval + timeout.          <= bound + 1.5 s
faults_stop       ``stop()`` while the listener waits out a 10 s reconnect backoff.
                  Baseline: the backoff it interrupts.                  < 1 s
faults_refusal    ``start()`` with a wrong password -> ConnectError (not retried).
                  Baseline: a successful ``start()`` of the same listener.  < 1 s
"""

import contextlib
import pathlib
import sys
import threading
import time

from pgnotify_sync import ConnectError, Listener

_TESTS = pathlib.Path(__file__).resolve().parent.parent / "tests"

FROZEN_INTERVAL_S = 1.0
FROZEN_TIMEOUT_S = 1.0
STOP_BACKOFF_MS = 10_000


def _proxy_class():
    if str(_TESTS) not in sys.path:
        sys.path.insert(0, str(_TESTS))
    from tcpproxy import TcpProxy  # tests/tcpproxy.py: one implementation to maintain
    return TcpProxy


def _wait(event, timeout_s, what):
    from bench._common import BenchError
    if not event.wait(timeout_s):
        raise BenchError(f"faults: {what} did not happen within {timeout_s:.0f} s")


@contextlib.contextmanager
def _behind_proxy(ctx, name, signal, **overrides):
    """A started Listener connected through a fresh TcpProxy, and an Event set by
    its *signal*; both closed on exit."""
    proxy = _proxy_class()(ctx.target.config.postgres_host, ctx.target.config.postgres_port)
    listener = Listener(ctx.listener_config(postgres_port=proxy.port, **overrides), name=name, registry=False)
    fired = threading.Event()
    getattr(listener.signals, signal).connect(lambda sender, **kw: fired.set(), weak=False)
    try:
        listener.start(timeout_s=30)
        yield listener, proxy, fired
    finally:
        listener.stop(timeout=5)
        proxy.close()


def _frozen_once(ctx):
    with _behind_proxy(ctx, "bench-frozen", "disconnected", health_check_interval_s=FROZEN_INTERVAL_S,
                       health_check_timeout_s=FROZEN_TIMEOUT_S) as (_listener, proxy, lost):
        proxy.freeze()
        frozen_at = time.monotonic()
        _wait(lost, 30, "the frozen path was noticed")
        return time.monotonic() - frozen_at


def _stop_once(ctx):
    with _behind_proxy(ctx, "bench-stop", "reconnecting", reconnect_delay_ms=STOP_BACKOFF_MS,
                       reconnect_delay_max_ms=STOP_BACKOFF_MS * 2) as (listener, proxy, waiting):
        proxy.cut()
        _wait(waiting, 30, "a reconnect backoff")
        started = time.monotonic()
        listener.stop(timeout=30)
        return time.monotonic() - started


def _refusal_once(ctx, password):
    listener = Listener(ctx.listener_config(postgres_password=password, max_reconnect_attempts=0),
                        name="bench-refusal", registry=False)
    started = time.monotonic()
    try:
        listener.start(timeout_s=30)
    except ConnectError:
        pass
    finally:
        elapsed = time.monotonic() - started
        listener.stop(timeout=5)
    return elapsed


def faults(ctx):
    from bench.figures import Line, alternate, fmt_ms  # here: figures imports this module

    def under(limit_s):
        def judge(ours, _base):
            return "yes" if ours.median < limit_s else "NO"
        return judge

    def within_bound(slack_s):
        def judge(ours, base):
            return "yes" if ours.median <= base.median + slack_s else "NO"
        return judge

    ctx.reset()
    frozen, stop, refused, accepted = [], [], [], []
    good = ctx.target.config.postgres_password
    for run in range(ctx.runs):
        frozen.append(_frozen_once(ctx))
        stop.append(_stop_once(ctx))
        for kind in alternate(("refused", "accepted"), run):
            if kind == "refused":
                refused.append(_refusal_once(ctx, "wrong-password"))
            else:
                accepted.append(_refusal_once(ctx, good))
        ctx.log(f"  run {run + 1}: frozen path noticed after {frozen[-1]:.2f} s; stop() in a backoff "
                f"{stop[-1] * 1000:.0f} ms; wrong password refused in {refused[-1] * 1000:.0f} ms "
                f"(a good start {accepted[-1] * 1000:.0f} ms)")
    bound = FROZEN_INTERVAL_S + FROZEN_TIMEOUT_S
    fmt_s = lambda value: f"{value:.2f}"  # noqa: E731 - a one-line formatter
    lines = [
        Line("faults: frozen path -> disconnected", "s", frozen, [bound] * len(frozen), fmt=fmt_s,
             target="<= interval + timeout + 1.5 s", judge=within_bound(1.5), ratio_kind="diff"),
        Line(f"faults: stop() in a {STOP_BACKOFF_MS / 1000:.0f} s backoff", "ms", stop,
             [STOP_BACKOFF_MS / 1000] * len(stop), fmt=fmt_ms, target="< 1 s", judge=under(1.0), ratio_kind="none"),
        Line("faults: wrong password -> ConnectError (vs a good start)", "ms", refused, accepted, fmt=fmt_ms,
             target="< 1 s", judge=under(1.0), ratio_kind="diff"),
    ]
    raw = {"unit": "s", "frozen_bound_s": bound, "frozen_s": frozen, "stop_s": stop, "refused_s": refused,
           "accepted_s": accepted}
    return lines, raw

