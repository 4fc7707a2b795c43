"""Configuration: a frozen attrs class, built directly or from environment variables.

Example::

    from pgnotify_sync import Config
    cfg = Config(postgres_host="127.0.0.1", postgres_port=5432, postgres_user="app",
                 postgres_password="secret", postgres_db="app", channels=("messages",))
    cfg = Config.from_env()                 # reads os.environ
    cfg = Config.from_env(environ={...})    # or any mapping

Every invalid value raises :class:`ConfigError` naming the setting (and, from
``from_env``, the environment variable) and saying what is wrong with it. The
password is never part of ``repr()`` or of any message.
"""

import logging
import math
import os

import attrs

from . import _tls
from .errors import ConfigError

# PostgreSQL truncates identifiers (channel names) to NAMEDATALEN-1 bytes.
MAX_CHANNEL_BYTES = 63
PREFIX_SEPARATOR = "."


def wire_channel_name(channel, prefix=""):
    """The LISTEN/NOTIFY name of logical *channel* (``prefix.channel``).

    Raises ValueError if it is empty or longer than PostgreSQL's identifier limit
    (pg_notify() would fail inside a writer's transaction). Callers name the setting.
    """
    if not isinstance(channel, str) or not channel:
        raise ValueError(f"every channel must be a non-empty string, got {channel!r}")
    wire = f"{prefix}{PREFIX_SEPARATOR}{channel}" if prefix else channel
    if len(wire.encode("utf-8")) > MAX_CHANNEL_BYTES:
        raise ValueError(f"{wire!r} is longer than PostgreSQL's {MAX_CHANNEL_BYTES}-byte identifier limit "
                         "(prefix included)")
    return wire


def _positive_int(name, minimum=1, maximum=None):
    def check(instance, attribute, value):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{name}: expected a whole number, got {type(value).__name__} {value!r}")
        if value < minimum or (maximum is not None and value > maximum):
            bound = f">= {minimum}" if maximum is None else f"between {minimum} and {maximum}"
            raise ConfigError(f"{name}: must be {bound}, got {value}")
    return check


# Config.ordering: a channel's events in commit order, or only each row's.
ORDERINGS = ("channel", "row")


def _one_of(name, choices):
    def check(instance, attribute, value):
        if value not in choices:
            raise ConfigError(f"{name}: expected one of {', '.join(map(repr, choices))}, got {value!r}")
    return check


def _positive_float(name, minimum=0.0, allow_zero=False):
    def check(instance, attribute, value):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{name}: expected a number, got {type(value).__name__} {value!r}")
        if not math.isfinite(value):
            raise ConfigError(f"{name}: must be a finite number, got {value}")
        if value < minimum or (value == minimum and not allow_zero):
            raise ConfigError(f"{name}: must be {'>=' if allow_zero else '>'} {minimum}, got {value}")
    return check


def _bool(name):
    def check(instance, attribute, value):
        if not isinstance(value, bool):
            raise ConfigError(f"{name}: expected True or False, got {type(value).__name__} {value!r}")
    return check


def split_names(text):
    """A comma-separated list of names, each stripped. Empty names are kept: the
    caller decides whether one is an error (Config, the environment) or skipped (a
    browser's ``?channels=``)."""
    return [part.strip() for part in text.split(",")]


def _channels_tuple(value):
    if value is None:
        return ()
    if isinstance(value, str):
        value = split_names(value)
    try:
        return tuple(value)
    except TypeError:
        raise ConfigError(f"channels: expected a sequence of channel names, got {type(value).__name__}") from None


@attrs.frozen(kw_only=True)
class Config:
    """Everything a :class:`~pgnotify_sync.Listener` needs to know.

    Units are in the names: ``*_ms`` milliseconds, ``*_s`` seconds.

    :param channels: logical channel names to LISTEN on.
    :param channel_prefix: prefix applied on the wire (``prefix.channel``) so several
        apps can share one database; handlers always see the logical name.
    :param max_reconnect_attempts: 0 means retry forever (the default: a production
        listener should outlive any outage; alert on the ``reconnecting`` signal or the
        metrics instead of dying).
    :param reconnect_delay_ms: first backoff step; doubles per attempt with jitter,
        capped by ``reconnect_delay_max_ms``.
    :param event_buffer_size: at most this many events are held in memory (queued
        notifications, and rows read from the event log ahead of delivery), plus one
        page in flight per channel; the rest are re-read from the log when there is
        room (nothing is lost). A statement bigger than the buffer still streams live,
        in pages of ``event_buffer_size // 8`` rows (at most 10,000), with up to half
        the buffer read ahead; a catch-up reads pages of at most the buffer (and
        5,000 rows). Each page is also bounded by bytes: at most 8 MiB of
        row text (a wide row comes alone), so with rows wider than 1 KiB a listener
        holds at most about 8 MiB times the pages it holds (the page delivered, up to
        4 read ahead per channel and the first page of each of the next 4 statements).
        ``health()["queue_size"]`` and ``pgnotify_sync_queue_size`` count all of it,
        but for the pages a consumer group member holding several partitions of one
        channel keeps for its slower lanes (up to 18 pages, _shared.py).
    :param worker_pool_size: threads running handlers; one channel's handlers run one
        event at a time, different channels in parallel.
    :param query_timeout_s: deadline of every query on a pooled connection (catch-up
        pages, ranges, publish, consumer positions, retention): the server's
        ``statement_timeout`` and, a second later, a client-side deadline that closes
        the connection, since a frozen path (a paused proxy or SSH session) never
        answers and TCP keepalives do not notice it. The work is redone on a fresh
        connection.
    :param retention_s: event-log rows older than this are deleted every
        ``cleanup_interval_s`` (0 disables cleanup by this listener), except rows a
        durable consumer has not handled yet; those are kept up to
        ``consumer_retention_s``, after which the consumer is told of the gap.
    :param poll_interval_s: how often the log is polled for channels with a
        notify-free table (``watch_table(..., notify=False)``): one indexed query for
        all of them, and new events are read only when it finds some. Listeners
        without such channels look whether they have one every 30 s.
    :param consumer_partitions: a consumer group (listeners of one ``consumer`` name,
        in any process or host) splits each channel's events into this many
        partitions by a hash of the row's primary key (published events: by their
        id); each partition is handled by one member at a time. Every member must use
        the same count. 1 (the default): one member does a channel's work, the others
        stand by.
    :param consumer_lease_s: a group member holds its partitions for this long and
        renews every third of it; a member that dies or freezes loses them once it
        runs out, and another resumes them from the stored position.
    :param ordering: ``"channel"`` (the default): a channel's events are handled one
        at a time in commit order. ``"row"``: only one row's events (same primary
        key) keep their order; different rows of a channel are handled in parallel on
        ``worker_pool_size`` threads.
    :param handler_max_attempts: a handler that raises is called again for the same
        event, up to this many calls in all (1: no retry), after a backoff that starts
        at ``handler_retry_delay_ms`` and doubles per attempt (with jitter) up to
        ``handler_retry_delay_max_ms``. Meanwhile the channel waits (its order is
        kept); ``stop()`` interrupts a backoff at once.
    :param handler_breaker_failures: a handler that failed this many events in a row
        (each after its ``handler_max_attempts`` calls) is suspended: its events fail
        at once, without a call (reported, counted, parked as dead letters for a
        durable consumer), so it no longer holds back its channel's other handlers.
        After a first event failed for good, its next events get one call each, no
        backoff. 0: never suspended. An event read again from the log after it
        could not be parked counts once.
    :param handler_breaker_reset_ms: a suspended handler is called again for one
        event this long after it was suspended; a success ends the suspension, a
        failure starts another.
    :param backfill_chunk_rows: a backfill (``Listener(..., backfill=...)``, the CLI's
        ``backfill``) reads and logs this many rows per transaction: larger chunks
        cost fewer round trips, smaller ones hold each short REPEATABLE READ
        snapshot (and the event buffer's share of one chunk) for less.
    :param postgres_sslmode: libpq's ``sslmode`` for every connection, listener and
        pool (``verify-full`` recommended: the server's certificate is checked against
        ``postgres_sslrootcert`` and the host name); with ``postgres_sslrootcert``,
        ``postgres_sslcert`` and ``postgres_sslkey`` (PEM files, checked when the
        Config is made). None: libpq's defaults.
    :param accept_plain_payloads: deliver notifications that carry a whole event and
        no log id (a foreign trigger's ``pg_notify``, the product spec's example).
        Off by default: any role that can connect may NOTIFY any channel, so such
        an event may be forged by anyone; our own notifications are only hints, and
        every event is read from the event log. Turn it on only if you trust every
        role that can connect to the database.
    """

    postgres_user: str = attrs.field()
    postgres_db: str = attrs.field()
    postgres_password: str = attrs.field(default="", repr=False)
    postgres_host: str = attrs.field(default="127.0.0.1")
    postgres_port: int = attrs.field(default=5432, validator=_positive_int("postgres_port", 1, 65535))
    postgres_sslmode: str = attrs.field(default=None, validator=lambda _i, _a, v: _tls.check_mode(v))
    postgres_sslrootcert: str = attrs.field(
        default=None, validator=lambda _i, _a, v: _tls.check_file("postgres_sslrootcert", v, "certificate"))
    postgres_sslcert: str = attrs.field(
        default=None, validator=lambda _i, _a, v: _tls.check_file("postgres_sslcert", v, "certificate"))
    postgres_sslkey: str = attrs.field(
        default=None, validator=lambda _i, _a, v: _tls.check_file("postgres_sslkey", v, "key"))
    channels: tuple = attrs.field(default=(), converter=_channels_tuple)
    channel_prefix: str = attrs.field(default="")

    ssh_host: str = attrs.field(default=None)
    ssh_port: int = attrs.field(default=22, validator=_positive_int("ssh_port", 1, 65535))
    ssh_user: str = attrs.field(default=None)
    ssh_key_path: str = attrs.field(default=None)
    ssh_known_hosts: str = attrs.field(default=None)
    ssh_key_passphrase: str = attrs.field(default=None, repr=False)
    #: Do not verify the SSH server's host key. For throwaway test servers only.
    ssh_insecure_skip_host_key_check: bool = attrs.field(default=False, validator=_bool("ssh_insecure_skip_host_key_check"))

    max_reconnect_attempts: int = attrs.field(default=0, validator=_positive_int("max_reconnect_attempts", 0))
    reconnect_delay_ms: int = attrs.field(default=500, validator=_positive_int("reconnect_delay_ms", 1))
    reconnect_delay_max_ms: int = attrs.field(default=30_000, validator=_positive_int("reconnect_delay_max_ms", 1))
    connect_timeout_s: float = attrs.field(default=5.0, validator=_positive_float("connect_timeout_s"))
    health_check_interval_s: float = attrs.field(default=10.0, validator=_positive_float("health_check_interval_s"))
    health_check_timeout_s: float = attrs.field(default=5.0, validator=_positive_float("health_check_timeout_s"))
    query_timeout_s: float = attrs.field(default=30.0, validator=_positive_float("query_timeout_s"))

    enable_db_events: bool = attrs.field(default=True, validator=_bool("enable_db_events"))
    enable_event_buffering: bool = attrs.field(default=False, validator=_bool("enable_event_buffering"))
    accept_plain_payloads: bool = attrs.field(default=False, validator=_bool("accept_plain_payloads"))
    worker_pool_size: int = attrs.field(default=4, validator=_positive_int("worker_pool_size", 1, 1024))
    # 80,000: pages of a statement of 10,000 rows (event_buffer_size // 8), three read
    # ahead within half the buffer: one 100,000-row statement drains as fast as it
    # did before the buffer bounded what is read ahead (with 10,000: pages of 1,250,
    # about 25% slower). What it holds at most is what the old default of 10,000
    # could hold uncounted (a page of 20,000 and up to 40,000 read ahead).
    event_buffer_size: int = attrs.field(default=80_000, validator=_positive_int("event_buffer_size", 1))
    publish_buffer_size: int = attrs.field(default=1_000, validator=_positive_int("publish_buffer_size", 1))
    pool_max_connections: int = attrs.field(default=10, validator=_positive_int("pool_max_connections", 1, 10))
    application_name: str = attrs.field(default="pgnotify_sync")
    retention_s: float = attrs.field(default=86_400.0, validator=_positive_float("retention_s"))
    consumer_retention_s: float = attrs.field(default=7 * 86_400.0,
                                              validator=_positive_float("consumer_retention_s"))
    poll_interval_s: float = attrs.field(default=0.1, validator=_positive_float("poll_interval_s"))
    handler_max_attempts: int = attrs.field(default=5, validator=_positive_int("handler_max_attempts", 1, 1000))
    handler_retry_delay_ms: int = attrs.field(default=100, validator=_positive_int("handler_retry_delay_ms", 1))
    handler_retry_delay_max_ms: int = attrs.field(default=30_000,
                                                  validator=_positive_int("handler_retry_delay_max_ms", 1))
    handler_breaker_failures: int = attrs.field(default=5, validator=_positive_int("handler_breaker_failures", 0))
    handler_breaker_reset_ms: int = attrs.field(default=10_000,
                                                validator=_positive_int("handler_breaker_reset_ms", 1))
    consumer_partitions: int = attrs.field(default=1, validator=_positive_int("consumer_partitions", 1, 1024))
    consumer_lease_s: float = attrs.field(default=10.0,
                                          validator=_positive_float("consumer_lease_s", 1.0, allow_zero=True))
    ordering: str = attrs.field(default="channel", validator=_one_of("ordering", ORDERINGS))
    backfill_chunk_rows: int = attrs.field(default=1000,
                                           validator=_positive_int("backfill_chunk_rows", 1, 100_000))
    cleanup_interval_s: float = attrs.field(default=300.0,
                                            validator=_positive_float("cleanup_interval_s", allow_zero=True))

    @postgres_user.validator
    @postgres_db.validator
    def _check_required(self, attribute, value):
        if not isinstance(value, str) or not value:
            raise ConfigError(f"{attribute.name}: required, got {value!r}")

    @postgres_host.validator
    def _check_host(self, attribute, value):
        if not isinstance(value, str) or not value:
            raise ConfigError(f"postgres_host: required, got {value!r}")

    @channels.validator
    def _check_channels(self, attribute, value):
        for name in value:
            self.checked_wire_channel(name)
        if len(set(value)) != len(value):
            raise ConfigError(f"channels: duplicate channel names in {list(value)!r}")

    @channel_prefix.validator
    def _check_prefix(self, attribute, value):
        if not isinstance(value, str):
            raise ConfigError(f"channel_prefix: expected a string, got {value!r}")

    @ssh_host.validator
    def _check_ssh(self, attribute, value):
        if value and not self.ssh_user:
            raise ConfigError("ssh_user: required when ssh_host is set")
        if value and not self.ssh_key_path:
            raise ConfigError("ssh_key_path: required when ssh_host is set (private-key authentication only)")

    @consumer_retention_s.validator
    def _check_consumer_retention(self, attribute, value):
        if value < self.retention_s:
            raise ConfigError(f"consumer_retention_s: must be >= retention_s ({self.retention_s}), got {value}")

    @handler_retry_delay_max_ms.validator
    def _check_handler_delay_cap(self, attribute, value):
        if value < self.handler_retry_delay_ms:
            raise ConfigError(f"handler_retry_delay_max_ms: must be >= handler_retry_delay_ms "
                              f"({self.handler_retry_delay_ms}), got {value}")

    @reconnect_delay_max_ms.validator
    def _check_delay_cap(self, attribute, value):
        if value < self.reconnect_delay_ms:
            raise ConfigError(
                f"reconnect_delay_max_ms: must be >= reconnect_delay_ms ({self.reconnect_delay_ms}), got {value}")

    # -- derived values -------------------------------------------------

    @property
    def use_ssh(self):
        return bool(self.ssh_host)

    def wire_channel(self, channel):
        """The channel name used in LISTEN/NOTIFY for a logical channel."""
        return f"{self.channel_prefix}{PREFIX_SEPARATOR}{channel}" if self.channel_prefix else channel

    def checked_wire_channel(self, channel, setting="channels"):
        """:meth:`wire_channel`, or ConfigError naming *setting* if PostgreSQL cannot take it."""
        try:
            return wire_channel_name(channel, self.channel_prefix)
        except ValueError as exc:
            raise ConfigError(f"{setting}: {exc}") from None

    def logical_channel(self, wire):
        """Inverse of :meth:`wire_channel`; None if *wire* does not carry our prefix."""
        if not self.channel_prefix:
            return wire
        head = self.channel_prefix + PREFIX_SEPARATOR
        return wire[len(head):] if wire.startswith(head) else None

    def connect_kwargs(self, host=None, port=None):
        """psycopg2.connect() keyword arguments. Contains the password: never log it."""
        return {
            "host": host or self.postgres_host,
            "port": port or self.postgres_port,
            "user": self.postgres_user,
            "password": self.postgres_password,
            "dbname": self.postgres_db,
            "application_name": self.application_name,
            "connect_timeout": max(1, int(round(self.connect_timeout_s))),
            # A silently dead path is noticed by TCP keepalives: 1 s idle + 3 probes 1 s apart.
            "keepalives": 1,
            "keepalives_idle": 1,
            "keepalives_interval": 1,
            "keepalives_count": 3,
            **_tls.connect_kwargs(self, host),
        }

    def describe_target(self):
        """Where we connect, safe for logs (no password)."""
        via = f" via ssh {self.ssh_user}@{self.ssh_host}:{self.ssh_port}" if self.use_ssh else ""
        return (f"{self.postgres_user}@{self.postgres_host}:{self.postgres_port}/{self.postgres_db}{via}"
                f"{_tls.describe(self)}")

    @classmethod
    def from_env(cls, environ=None, **overrides):
        """Build a Config from environment variables (see the README's table).

        *overrides* (field names) win over the environment.
        """
        env = os.environ if environ is None else environ
        if env.get("SSH_PASSWORD"):
            message = "SSH_PASSWORD: password authentication is not supported; use a private key (SSH_KEY_PATH)"
            logging.getLogger("pgnotify_sync.security").warning(
                "refused: %s", message, extra={"event": "security", "details": {"reason": "ssh-password"}})
            raise ConfigError(message)
        values = {}
        for var, field, parse in _ENV_VARS:
            raw = env.get(var)
            if raw is None or (raw.strip() == "" and parse is not _parse_str):
                continue
            try:
                values[field] = parse(raw)
            except ValueError as exc:
                raise ConfigError(f"{var}: {exc}") from None
        values.update(overrides)
        try:
            return cls(**values)
        except ConfigError as exc:
            raise ConfigError(_name_variable(str(exc))) from None
        except TypeError as exc:
            missing = [var for var, field, _ in _ENV_VARS
                       if field in ("postgres_user", "postgres_db") and field not in values]
            if missing:
                raise ConfigError(f"{missing[0]}: required, not set") from None
            raise ConfigError(str(exc)) from None


def _parse_str(raw):
    return raw


def _parse_int(raw):
    try:
        return int(raw.strip())
    except ValueError:
        raise ValueError(f"expected a whole number, got {raw!r}") from None


def _parse_float(raw):
    try:
        return float(raw.strip())
    except ValueError:
        raise ValueError(f"expected a number, got {raw!r}") from None


_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def _parse_bool(raw):
    value = raw.strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise ValueError(f"expected true or false, got {raw!r}")


def _parse_channels(raw):
    parts = split_names(raw)
    if any(not part for part in parts):
        raise ValueError(f"expected a comma-separated list of channel names, got {raw!r} (empty name)")
    return tuple(parts)


_ENV_VARS = (
    ("POSTGRES_HOST", "postgres_host", _parse_str),
    ("POSTGRES_PORT", "postgres_port", _parse_int),
    ("POSTGRES_USER", "postgres_user", _parse_str),
    ("POSTGRES_PASSWORD", "postgres_password", _parse_str),
    ("POSTGRES_DB", "postgres_db", _parse_str),
    ("POSTGRES_SSLMODE", "postgres_sslmode", _parse_str),
    ("POSTGRES_SSLROOTCERT", "postgres_sslrootcert", _parse_str),
    ("POSTGRES_SSLCERT", "postgres_sslcert", _parse_str),
    ("POSTGRES_SSLKEY", "postgres_sslkey", _parse_str),
    ("PG_NOTIFY_CHANNELS", "channels", _parse_channels),
    ("PG_NOTIFY_CHANNEL", "channel_prefix", _parse_str),
    ("SSH_HOST", "ssh_host", _parse_str),
    ("SSH_PORT", "ssh_port", _parse_int),
    ("SSH_USER", "ssh_user", _parse_str),
    ("SSH_KEY_PATH", "ssh_key_path", _parse_str),
    ("SSH_KNOWN_HOSTS", "ssh_known_hosts", _parse_str),
    ("SSH_KEY_PASSPHRASE", "ssh_key_passphrase", _parse_str),
    ("SSH_INSECURE_SKIP_HOST_KEY_CHECK", "ssh_insecure_skip_host_key_check", _parse_bool),
    ("MAX_RECONNECT_ATTEMPTS", "max_reconnect_attempts", _parse_int),
    ("RECONNECT_DELAY", "reconnect_delay_ms", _parse_int),
    ("RECONNECT_DELAY_MAX", "reconnect_delay_max_ms", _parse_int),
    ("PG_NOTIFY_CONNECT_TIMEOUT", "connect_timeout_s", _parse_float),
    ("PG_NOTIFY_HEALTH_CHECK_INTERVAL", "health_check_interval_s", _parse_float),
    ("PG_NOTIFY_HEALTH_CHECK_TIMEOUT", "health_check_timeout_s", _parse_float),
    ("PG_NOTIFY_QUERY_TIMEOUT", "query_timeout_s", _parse_float),
    ("ENABLE_DB_EVENTS", "enable_db_events", _parse_bool),
    ("ENABLE_EVENT_BUFFERING", "enable_event_buffering", _parse_bool),
    ("PG_NOTIFY_ACCEPT_PLAIN", "accept_plain_payloads", _parse_bool),
    ("PG_NOTIFY_WORKERS", "worker_pool_size", _parse_int),
    ("PG_NOTIFY_BUFFER_SIZE", "event_buffer_size", _parse_int),
    ("PG_NOTIFY_PUBLISH_BUFFER_SIZE", "publish_buffer_size", _parse_int),
    ("PG_POOL_MAX", "pool_max_connections", _parse_int),
    ("PG_NOTIFY_RETENTION", "retention_s", _parse_float),
    ("PG_NOTIFY_CONSUMER_RETENTION", "consumer_retention_s", _parse_float),
    ("PG_NOTIFY_CLEANUP_INTERVAL", "cleanup_interval_s", _parse_float),
    ("PG_NOTIFY_POLL_INTERVAL", "poll_interval_s", _parse_float),
    ("PG_NOTIFY_CONSUMER_PARTITIONS", "consumer_partitions", _parse_int),
    ("PG_NOTIFY_CONSUMER_LEASE", "consumer_lease_s", _parse_float),
    ("PG_NOTIFY_ORDERING", "ordering", _parse_str),
    ("PG_NOTIFY_HANDLER_MAX_ATTEMPTS", "handler_max_attempts", _parse_int),
    ("PG_NOTIFY_HANDLER_RETRY_DELAY", "handler_retry_delay_ms", _parse_int),
    ("PG_NOTIFY_HANDLER_RETRY_DELAY_MAX", "handler_retry_delay_max_ms", _parse_int),
    ("PG_NOTIFY_HANDLER_BREAKER_FAILURES", "handler_breaker_failures", _parse_int),
    ("PG_NOTIFY_HANDLER_BREAKER_RESET", "handler_breaker_reset_ms", _parse_int),
    ("PG_NOTIFY_BACKFILL_CHUNK", "backfill_chunk_rows", _parse_int),
)

ENV_VARIABLES = tuple(var for var, _, _ in _ENV_VARS)
_FIELD_TO_VAR = {field: var for var, field, _ in _ENV_VARS}


def _name_variable(message):
    """Prefix a validator message 'field: ...' with the environment variable's name."""
    field, sep, rest = message.partition(":")
    var = _FIELD_TO_VAR.get(field)
    if sep and var:
        return f"{var} ({field}):{rest}"
    return message
