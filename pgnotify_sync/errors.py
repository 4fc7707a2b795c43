"""The exception hierarchy: one root, grouped by kind.

Exceptions are raised only in the caller's thread. Failures in background
threads become a log line, a metric and an ``error`` signal instead.
"""


class PgNotifyError(Exception):
    """Root of every exception raised by pgnotify_sync."""


class ConfigError(PgNotifyError, ValueError):
    """A configuration value is missing or wrong. The message names the setting."""


class ConnectError(PgNotifyError):
    """The database (or the SSH tunnel in front of it) could not be reached."""


class QueryTimeout(ConnectError):
    """A query on a pooled connection got no answer within ``query_timeout_s`` (a
    frozen network path, a paused proxy or SSH session): the connection was closed."""


class PayloadError(PgNotifyError, ValueError):
    """A notification payload could not be decoded into a DatabaseEvent."""

    def __init__(self, message, channel=None, payload_size=None):
        super().__init__(message)
        self.channel = channel
        # Only the size is kept: the payload may carry row data.
        self.payload_size = payload_size


class ListenerStateError(PgNotifyError, RuntimeError):
    """The listener cannot do this in its current state (e.g. start after stop)."""


class SchemaError(PgNotifyError):
    """install/watch_table failed, or the schema objects are missing."""


class PublishBufferFull(PgNotifyError):
    """publish() could not reach the database and the publish buffer is full: the
    event was NOT sent and NOT kept. Nothing is ever dropped silently."""
