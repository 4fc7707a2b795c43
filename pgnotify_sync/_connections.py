"""A listener's ways to the database: its SSH tunnels (when configured), the
connection pool and what lives on it (the event log, a durable consumer's store).
Owns no thread of its own (the tunnels' and the pool's are theirs).

The pool is made on first use (``publish()`` before ``start()`` works); the
tunnels before it, in the caller's thread, so a bad key or known_hosts raises
there.
"""

import threading

from ._consumers import ConsumerStore
from ._deadletters import DeadLetters
from ._eventlog import EventLog
from ._pool import ConnectionPool
from .errors import ListenerStateError


class Connections:
    def __init__(self, name, config, consumer):
        self._name = name
        self._config = config
        self._consumer = consumer
        self._lock = threading.Lock()
        self._closed = False
        self.pool = None
        self.event_log = None           # the EventLog, on the pool
        self.consumer_store = None      # a durable consumer's ConsumerStore, on the pool
        self.dead_letters = None        # ... and its DeadLetters
        self.listener_tunnel = self.pool_tunnel = None

    def make_tunnels(self):
        """Build the SSH tunnels (if configured; once)."""
        with self._lock:
            self._make_tunnels_locked()

    def _make_tunnels_locked(self):
        if self._config.use_ssh and self.listener_tunnel is None:
            from ._tunnel import make_tunnels
            self.listener_tunnel, self.pool_tunnel = make_tunnels(self._config, self._name)

    def require_pool(self):
        """The pool, made (with the tunnels) on first use; ListenerStateError once closed."""
        with self._lock:
            if self.pool is None:
                if self._closed:
                    raise ListenerStateError(f"{self._name}: stopped")
                self._make_tunnels_locked()
                cfg = self._config
                self.pool = ConnectionPool(f"{self._name}-pool", self._pool_connect_kwargs, cfg.pool_max_connections,
                                           statement_timeout_ms=cfg.query_timeout_s * 1000)
                self.event_log = EventLog(self.pool, cfg.connect_timeout_s, self._consumer)
                if self._consumer:
                    self.consumer_store = ConsumerStore(self.pool, self._consumer, self._name)
                    self.dead_letters = DeadLetters(self.pool, self._consumer)
            return self.pool

    def _pool_connect_kwargs(self):
        if self.pool_tunnel is not None:
            return self._config.connect_kwargs(*self.pool_tunnel.local_address())
        return self._config.connect_kwargs()

    def listener_connect_kwargs(self, fresh):
        """Where the reader connects; *fresh*: rebuild the tunnel first."""
        if self.listener_tunnel is not None:
            return self._config.connect_kwargs(*self.listener_tunnel.local_address(fresh=fresh))
        return self._config.connect_kwargs()

    def tunnels(self):
        """(kind, tunnel) of each tunnel (for the metrics)."""
        return [(kind, t) for kind, t in (("listener", self.listener_tunnel), ("pool", self.pool_tunnel))
                if t is not None]

    def threads(self):
        return self.pool.threads() if self.pool is not None else []

    def close(self, timeout_s):
        """Close the pool and the tunnels; returns the names of threads still running."""
        with self._lock:
            self._closed = True
            pool = self.pool
        late = pool.close(timeout_s) if pool is not None else []
        for _, tunnel in self.tunnels():
            tunnel.close()
        return late
