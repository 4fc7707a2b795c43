"""The Listener's own arguments checked like Config's: a wrong one is a
:class:`ConfigError` naming it (as _sse_args.py does for the SSE bridge)."""

from .errors import ConfigError

# Listener names appear in thread names, log lines and metric labels.
NAME_MAX = 63

# A durable consumer's default: store the position at least every this many events.
# A write per event (1) bounds the repeats after a crash to the event in flight but
# costs a round trip and a commit per event (``python -m bench --only catchup``: a
# few thousand events/s instead of about 100,000); 100 makes the
# writes 1% of the work and bounds the repeats to 100 events.
DEFAULT_CHECKPOINT_EVERY = 100


def checked_name(name):
    if not isinstance(name, str) or not name.strip():
        raise ConfigError(f"name: expected a non-empty string, got {name!r}")
    if len(name) > NAME_MAX or not name.isprintable():
        raise ConfigError(f"name: at most {NAME_MAX} printable characters (it names threads, log lines "
                          f"and metric labels), got {name!r}")
    return name


def checked_consumer(consumer):
    if consumer is not None and (not isinstance(consumer, str) or not consumer.strip()):
        raise ConfigError(f"consumer: expected a non-empty name, got {consumer!r}")
    return consumer


def checked_checkpoint_every(value):
    if value is None:
        return DEFAULT_CHECKPOINT_EVERY
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ConfigError(f"checkpoint_every: expected a whole number >= 0, got {value!r}")
    return value


def checked_registry(registry):
    if registry not in (None, False) and not callable(getattr(registry, "register", None)):
        raise ConfigError(f"registry: expected a prometheus_client CollectorRegistry, None or False, "
                          f"got {type(registry).__name__}")
    return registry


def checked_backfill(tables, consumer):
    """``backfill=``: table names ("schema.table" or "table"), for a durable consumer."""
    if isinstance(tables, str):
        tables = (tables,)
    tables = tuple(tables or ())
    for t in tables:
        if not isinstance(t, str) or not t.strip():
            raise ConfigError(f"backfill: expected table names, got {t!r}")
    if tables and not consumer:
        raise ConfigError("backfill: only a durable consumer backfills (Listener(cfg, consumer=..., backfill=...))")
    return tables
