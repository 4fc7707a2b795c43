"""Figures measured in a fresh child process (``multiprocessing``, spawned).

* :func:`catchup_child` - a durable consumer that starts behind and catches up
  from the log. In a child so that a run cut off at its deadline leaves no
  thread behind that would keep working during the next figures.
* :func:`paced_writer_child` - the paced single-row writer of the latency and
  load figures with ``--writer process`` (out of this process's GIL).
* :func:`memory_child` - the Listener's resident memory (VmRSS of its own
  process) during a burst with a slow handler. In a child so that what earlier
  figures left on this process's heap neither hides nor inflates the growth.

Both talk to the parent through a ``Pipe``; :func:`run_child` starts one and
returns the connection to it. Every message is a tuple whose first item names it.
"""

import gc
import logging
import multiprocessing
import os
import threading
import time

from bench._common import BenchError, Tally, now

CHANNEL = "bench"


def run_child(func, *args):
    """Start ``func(pipe, *args)`` in a spawned process; return ``(process, pipe)``."""
    ctx = multiprocessing.get_context("spawn")   # never fork a process that has threads
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=func, args=(child,) + args, name=f"bench-{func.__name__}", daemon=True)
    proc.start()
    child.close()
    return proc, parent


def receive(proc, pipe, timeout_s, what):
    """The child's next message; BenchError if it died, failed or said nothing in time."""
    deadline = now() + timeout_s
    while not pipe.poll(0.2):
        if not proc.is_alive():
            raise BenchError(f"{what}: child process died (exit code {proc.exitcode})")
        if now() > deadline:
            raise BenchError(f"{what}: no answer from the child process within {timeout_s:.0f} s")
    try:
        message = pipe.recv()
    except EOFError:
        proc.join(5)
        raise BenchError(f"{what}: child process ended without an answer (exit code {proc.exitcode})") from None
    if message[0] == "error":
        raise BenchError(f"{what}: {message[1]}")
    return message


def end_child(proc, pipe):
    """Let the child exit (it does once it has sent its result), else kill it."""
    proc.join(5)
    if proc.is_alive():
        proc.kill()
        proc.join(5)
    pipe.close()


def _quiet_logs():
    # The overflow and "did not stop" warnings are expected here; errors still show.
    logging.basicConfig(level=logging.ERROR, format="%(asctime)s %(levelname)s %(name)s [child]: %(message)s")


def _fail(pipe, exc):
    try:
        pipe.send(("error", f"{type(exc).__name__}: {str(exc).strip()}"))
    except OSError:
        pass


# -- catch-up -------------------------------------------------------------------


def catchup_child(pipe, config, expected, checkpoint_every, deadline_s):
    """Start ``Listener(config, consumer="bench")``; time until *expected* events
    were delivered, or until *deadline_s* (the result then says how far it got)."""
    _quiet_logs()
    try:
        from pgnotify_sync import Listener

        tally = Tally(expected)
        listener = Listener(config, consumer="bench", name="bench-catchup", checkpoint_every=checkpoint_every,
                            registry=False)
        add = tally.add
        listener.on_event(CHANNEL, lambda event: add())
        started = now()
        listener.start(timeout_s=30)
        listening = now()
        complete = tally._done.wait(max(0.0, deadline_s - (listening - started)))
        if tally.error is not None:
            raise tally.error
        ended = tally.last_at if complete else now()
        pipe.send(("result", {
            "expected": expected, "delivered": tally.count, "complete": bool(complete),
            "elapsed_s": ended - started, "start_s": listening - started,
            "rate": tally.count / (ended - started), "checkpoint_every": checkpoint_every,
            "stats": {k: v for k, v in listener.get_stats().items() if isinstance(v, (int, float, str))},
        }))
    except BaseException as exc:
        _fail(pipe, exc)
    finally:
        pipe.close()
        # Do not stop() a listener that is still catching up (a checkpoint per event
        # can take minutes): the process just ends; the server closes its sessions.
        os._exit(0)


# -- paced writer -----------------------------------------------------------------

SINGLE_SQL = "INSERT INTO {} (n, body) VALUES (%s, 'x')"


def paced_threads(conns, table, rate, total, start, commits):
    """Rows ``0 .. total-1`` into *table*, one autocommit INSERT each, row ``n`` due
    at ``start + n / rate`` (``time.perf_counter`` clock), connection ``n % k``
    (one thread per connection). A thread that falls behind does not sleep until
    it has caught up. After each INSERT returns: ``commits[n] = perf_counter()``.
    Returns the first error, or None."""
    k = len(conns)
    statement = SINGLE_SQL.format(table)
    errors = []

    def write(j, conn):
        perf = time.perf_counter
        sleep = time.sleep
        try:
            with conn.cursor() as cur:
                for n in range(j, total, k):
                    wait = start + n / rate - perf()
                    if wait > 0:
                        sleep(wait)
                    cur.execute(statement, (n,))
                    commits[n] = perf()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=write, args=(j, conn), name=f"bench-paced-{j}", daemon=True)
               for j, conn in enumerate(conns)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return errors[0] if errors else None


def paced_writer_child(pipe, config, table, rate, total, connections):
    """:func:`paced_threads` in a process of its own. ``perf_counter`` is
    CLOCK_MONOTONIC on Linux, the same clock in every process, so the parent
    compares these commit times with its handlers' receive times directly.

    Protocol: ``("ready",)`` once connected; the parent answers ``("go", start)``;
    the child answers ``("result", commits)``."""
    conns = []
    try:
        import psycopg2

        for j in range(connections):
            kwargs = config.connect_kwargs()
            kwargs["application_name"] = f"pgnotify-bench-paced-{j}"
            conn = psycopg2.connect(**kwargs)
            conn.autocommit = True
            conns.append(conn)
        pipe.send(("ready",))
        _, start = pipe.recv()
        commits = {}
        error = paced_threads(conns, table, rate, total, start, commits)
        if error is not None:
            raise error
        pipe.send(("result", commits))
    except BaseException as exc:
        _fail(pipe, exc)
    finally:
        for conn in conns:
            conn.close()
        pipe.close()


# -- memory ---------------------------------------------------------------------


def rss_bytes():
    """This process's resident set size (VmRSS of /proc/self/status), in bytes."""
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise BenchError("no VmRSS in /proc/self/status")


def held_ids(channels):
    """Entries the dispatcher holds as handled: ids in ``ch.handled``, records of
    whole statements in ``ch.xranges`` (one per statement) and, where the library
    has it, ``ch.caught`` (ids handled by the catch-up in progress)."""
    return sum(len(ch.handled) + sum(map(len, getattr(ch, "xranges", {}).values())) + len(getattr(ch, "caught", ()))
               for ch in channels)


def memory_child(pipe, config, expected, handler_s, sample_s, period_s=0.02):
    """A Listener with a slow handler (busy for *handler_s* per event, GIL released:
    ``time.sleep``) samples its own VmRSS every *period_s*.

    Protocol: the child sends ``("ready", baseline_rss)`` once listening; the
    parent writes the burst and sends ``("written",)``; the child keeps sampling
    until every event was handled or *sample_s* passed since "written", then sends
    ``("result", {...})`` and exits without draining the rest.
    """
    _quiet_logs()
    try:
        from pgnotify_sync import Listener

        tally = Tally(expected)
        listener = Listener(config, name="bench-memory", registry=False)
        add = tally.add
        sleep = time.sleep

        @listener.on_event(CHANNEL)
        def slow(event):
            sleep(handler_s)
            add()

        listener.start(timeout_s=30)
        gc.collect()
        warm = []
        for _ in range(10):
            warm.append(rss_bytes())
            time.sleep(0.03)
        baseline = sorted(warm)[len(warm) // 2]
        t0 = now()
        samples = [(0.0, baseline)]
        peak = baseline
        held_peak = 0
        queue_peak = 0          # what the listener counts as held (health()["queue_size"])
        channels = list(listener._channels.values())
        written_at = None
        pipe.send(("ready", baseline))
        while True:
            if written_at is None and pipe.poll(period_s):
                pipe.recv()
                written_at = now()
            elif written_at is not None:
                time.sleep(period_s)
            rss = rss_bytes()
            peak = max(peak, rss)
            samples.append((now() - t0, rss))
            # Ids the dispatcher remembers as handled (a diagnostic read of internals).
            held_peak = max(held_peak, held_ids(channels))
            queue_peak = max(queue_peak, listener.health()["queue_size"])
            if written_at is not None and (tally.done or now() - written_at >= sample_s):
                break
        stats = listener.get_stats()
        pipe.send(("result", {
            "expected": expected, "delivered": tally.count, "drained": tally.done,
            "baseline_rss": baseline, "peak_rss": peak, "growth": peak - baseline,
            "write_s": written_at - t0, "sampled_s": now() - t0,
            "dropped_to_log": stats.get("dropped_to_log"), "caught_up": stats.get("caught_up"),
            "handled_ids": held_ids(channels), "handled_ids_peak": held_peak, "queue_peak": queue_peak,
            "samples": samples[::max(1, len(samples) // 400)],
        }))
    except BaseException as exc:
        _fail(pipe, exc)
    finally:
        pipe.close()
        os._exit(0)
