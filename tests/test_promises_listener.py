"""README promises about the listener's connections that no other test checks:
the reconnect backoff (growing delays with jitter, capped), start(timeout_s)
stopping the listener, and TCP keepalives on every connection."""

import os
import socket
import stat
import threading
import time

import pytest

from pgnotify_sync import ConnectError, ConnectionState, ListenerStateError

from helpers import wait_for


@pytest.fixture
def refused_port():
    """A 127.0.0.1 port nothing listens on: every connection attempt is refused at once.

    (The ``proxy`` fixture cut would do the same, but its teardown waits 5 s for its
    accept thread when no connection comes in after close.) The socket stays bound
    but not listening for the whole test, so no other process can take the port."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        yield s.getsockname()[1]


def test_reconnect_delays_grow_with_jitter_up_to_the_cap(refused_port, make_listener):
    # README: RECONNECT_DELAY is the "first backoff step (ms); doubles per attempt,
    # with jitter", RECONNECT_DELAY_MAX the "backoff cap (ms)". The jitter (_backoff.py)
    # is "equal jitter": a delay between half and all of the step.
    first, cap = 0.010, 0.080
    listener = make_listener(postgres_host="127.0.0.1", postgres_port=refused_port, max_reconnect_attempts=0,
                             reconnect_delay_ms=int(first * 1000), reconnect_delay_max_ms=int(cap * 1000))
    seen = []                                      # (when, attempt, delay_s) per reconnecting signal
    enough = threading.Event()

    def on_reconnecting(sender, attempt, delay_s, error, **kw):
        seen.append((time.monotonic(), attempt, delay_s))
        if len(seen) >= 14:
            enough.set()

    listener.signals.reconnecting.connect(on_reconnecting, weak=False)
    listener.start(wait=False)
    assert enough.wait(60), f"only {len(seen)} reconnecting signals"
    listener.stop()
    seen = seen[:14]
    attempts = [a for _, a, _ in seen]
    delays = [d for _, _, d in seen]
    assert attempts == list(range(2, 16))          # the attempt about to be made, after a failure
    steps = [min(cap, first * 2 ** (a - 2)) for a in attempts]      # attempt a follows failure a - 1
    assert steps[:5] == [0.01, 0.02, 0.04, 0.08, 0.08]
    for step, delay in zip(steps, delays):
        assert step / 2 - 1e-9 <= delay <= step + 1e-9, (step, delay)
    # They grow: while the step doubles, each delay is at least the one before.
    for i in range(3):
        assert delays[i + 1] >= delays[i], delays
    # Jitter: not the plain steps, and the delays at the cap are not all the same.
    assert any(abs(d - s) > 1e-6 for d, s in zip(delays, steps)), delays
    assert len({round(d, 6) for d in delays[4:]}) > 1, delays[4:]
    # And each delay is really waited before the next attempt (a lower bound only).
    for (t0, _, delay), (t1, _, _) in zip(seen, seen[1:]):
        assert t1 - t0 >= delay - 0.001, (t1 - t0, delay)


def test_start_timeout_stops_the_listener(refused_port, make_listener):
    # README/docstring: start() raises ConnectError "if timeout_s passes first (the
    # listener is then stopped)".
    before = set(threading.enumerate())
    listener = make_listener(postgres_host="127.0.0.1", postgres_port=refused_port, max_reconnect_attempts=0)
    with pytest.raises(ConnectError, match=r"not listening after 1\.0 s \(.*\); stopped$"):
        listener.start(timeout_s=1.0)
    assert listener.state is ConnectionState.STOPPED and listener.closed
    assert listener.threads() and not [t for t in listener.threads() if t.is_alive()]
    assert set(threading.enumerate()) - before == set()
    with pytest.raises(ListenerStateError, match="cannot be started again"):
        listener.start()


# -- TCP keepalives ---------------------------------------------------------------------------

def _tcp_sockets_to(port):
    """Duplicates of this process's TCP sockets connected to 127.0.0.1:*port*, by local port."""
    found = {}
    for name in os.listdir("/proc/self/fd"):
        try:
            fd = int(name)
            if not stat.S_ISSOCK(os.fstat(fd).st_mode):
                continue
            sock = socket.socket(fileno=os.dup(fd))
        except OSError:
            continue
        try:
            if sock.family == socket.AF_INET and sock.type == socket.SOCK_STREAM and sock.getpeername()[1] == port:
                found[sock.getsockname()[1]] = sock
                continue
        except OSError:
            pass
        sock.close()
    return found


def _keepalive(sock):
    return (sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE),
            sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE),
            sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL),
            sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT))


def test_every_connection_uses_tcp_keepalives(installed, make_listener, dsn, admin_db):
    # README: "Every connection uses libpq TCP keepalives (1 s idle, 1 s interval,
    # 3 probes)". Checked on the client sockets themselves, for the listener
    # connection and the pooled ones, matched to their backends by port.
    app = "keepalive-check"
    listener = make_listener(application_name=app)
    listener.start()
    listener.publish("messages", {"opens": "a pooled connection"})

    def backends():
        with admin_db.cursor() as cur:
            cur.execute("SELECT client_port, query FROM pg_stat_activity WHERE application_name = %s", (app,))
            return dict(cur.fetchall())

    def reader_port(ports):
        # The listener connection's last statement is its start snapshot or a health check.
        return [p for p, q in ports.items() if "to_regclass" in q or "pgnotify_sync.hc." in q]

    ports = wait_for(lambda: (lambda b: b if len(b) >= 2 and len(reader_port(b)) == 1 else None)(backends()),
                     timeout=30, message="the listener and a pooled connection")
    socks = _tcp_sockets_to(dsn["port"])
    try:
        ours = {port: socks[port] for port in ports if port in socks}
        assert len(ours) == len(ports) >= 2, (ports, sorted(socks))
        assert reader_port(ports)[0] in ours
        for port, sock in ours.items():
            assert _keepalive(sock) == (1, 1, 1, 3), (port, ports[port])
    finally:
        for sock in socks.values():
            sock.close()
