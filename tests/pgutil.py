"""Helpers for integration tests: configs, listeners that always stop, collectors."""

import threading

from pgnotify_sync import Config, Listener

from helpers import wait_for


def config_for(dsn, **overrides):
    values = dict(postgres_host=dsn["host"], postgres_port=dsn["port"], postgres_user=dsn["user"],
                  postgres_password=dsn["password"], postgres_db=dsn["dbname"],
                  health_check_interval_s=2.0, health_check_timeout_s=2.0,
                  reconnect_delay_ms=50, reconnect_delay_max_ms=500, connect_timeout_s=3.0)
    values.update(overrides)
    return Config(**values)


class Collector:
    """A handler that records events; thread-safe; wait for counts with a deadline."""

    def __init__(self):
        self.events = []
        self._lock = threading.Lock()

    def __call__(self, event):
        with self._lock:
            self.events.append(event)

    def __len__(self):
        with self._lock:
            return len(self.events)

    def wait(self, count, timeout=15.0):
        wait_for(lambda: len(self) >= count, timeout=timeout,
                 message=f"expected {count} events, have {len(self)}")
        return list(self.events)

    def ids(self):
        with self._lock:
            return [e.id for e in self.events]


class ListenerFactory:
    """Creates listeners and stops every one of them at teardown."""

    def __init__(self, dsn):
        self.dsn = dsn
        self.listeners = []

    def __call__(self, channels=("messages",), consumer=None, name=None, registry=False, **overrides):
        # registry=False: no metrics unless a test asks (the global registry would
        # accumulate every listener of the run).
        listener = Listener(config_for(self.dsn, channels=channels, **overrides), consumer=consumer, name=name,
                            registry=registry)
        self.listeners.append(listener)
        return listener

    def stop_all(self):
        for listener in self.listeners:
            listener.stop(timeout=5.0)
