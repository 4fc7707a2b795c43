"""The exception hierarchy (one root, grouped by kind), the kinds of the ``error``
signal, and the two rules every module shares about foreign errors: how one is
described in a line, and whether retrying can fix it.

Exceptions are raised only in the caller's thread. Failures in background
threads become a log line, a metric and an ``error`` signal instead.
"""

import contextlib
import enum
import threading

import psycopg2


class ErrorKind(str, enum.Enum):
    """The ``kind`` of an ``error`` signal (a ``str``: ``kind == "handler"`` works)."""

    PAYLOAD = "payload"         # a notification that is not a usable hint, or names no committed event (ignored)
    HANDLER = "handler"         # an on_event handler raised
    RECEIVER = "receiver"       # a lifecycle signal receiver raised
    CATCHUP = "catchup"         # reading the event log failed; the channel falls back and retries
    OVERFLOW = "overflow"       # handlers fell behind; the channel reads from the log
    CONNECT = "connect"         # the listener could not connect (FAILED)
    GAP = "gap"                 # a durable consumer's position was trimmed past
    MISSING = "missing"         # announced events no longer in the log
    PUBLISH = "publish"         # buffered publishes could not be sent
    INTERNAL = "internal"       # a bug of ours, caught so delivery goes on
    SSE = "sse"                 # an SSE authorize or row_filter raised
    TYPE = "type"               # a row did not fit the model of on_event(..., row=Model)

    def __str__(self):
        return self.value


class PgNotifyError(Exception):
    """Root of every exception raised by pgnotify_sync."""


class ConfigError(PgNotifyError, ValueError):
    """A configuration value is missing or wrong. The message names the setting.
    Not retried (a consumer group's members disagreeing on the partition count)."""

    retryable = False


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


class PrivilegeError(PgNotifyError):
    """The database role lacks a grant it needs (``grant_listener``,
    ``grant_publisher``, ``grant_admin``); the message names it. Not retried:
    waiting does not grant anything."""

    retryable = False


class RowTypeError(PgNotifyError, TypeError):
    """A row did not fit the model a handler asked for (``on_event(..., row=Model)``).
    The message names the model and the fields at fault, never a value."""


class HandlerSuspended(PgNotifyError):
    """An event failed without its handler being called: the handler's circuit
    breaker is open after ``handler_breaker_failures`` events failed in a row
    (Config). The ``error`` of such an event's ``handler`` report and its dead
    letter's ``error_type``; it is tried again every ``handler_breaker_reset_ms``."""

    def __init__(self, receiver, channel, failures):
        super().__init__(f"handler {receiver} of channel {channel!r} is suspended after {failures} events "
                         "failed in a row; not called")
        self.receiver = receiver
        self.channel = channel


class PublishBufferFull(PgNotifyError):
    """publish() could not reach the database and the publish buffer is full: the
    event was NOT sent and NOT kept. Nothing is ever dropped silently."""


def first_line(exc):
    """The first line of *exc*'s text, or its type's name: server errors span lines
    (DETAIL, HINT), log lines and messages take one."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


@contextlib.contextmanager
def translated(error_type, what=None):
    """The one mapping of the driver's errors, used at each I/O boundary (httpcore's
    ``map_exceptions``): a ``psycopg2.Error`` raised in the block comes out as
    ``error_type("what: first line")``, chained to it; everything else passes
    through. (paramiko's errors are mapped in _tunnel.py, the one module that talks
    to it, with their ``retryable`` flag.)"""
    try:
        yield
    except psycopg2.Error as exc:
        raise error_type(f"{what}: {first_line(exc)}" if what else first_line(exc)) from exc


def describe(exc):
    """'Type: first line' of an exception raised by user code (its text is theirs)."""
    return f"{type(exc).__name__}: {first_line(exc)}"


# Server answers that retrying cannot change (libpq's texts; the SQLSTATE is not
# available before a session exists).
_NOT_RETRYABLE_TEXT = ("authentication failed", "does not exist", "no pg_hba.conf entry",
                       "permission denied", "is not installed",
                       # a certificate or key libpq will not accept
                       "certificate verify failed", "does not match host name", "certificate file",
                       "private key file", "certificate is not yet valid", "certificate has expired")


def retry_can_fix(exc, first_session=True):
    """Whether retrying a failed connect can succeed: not for an exception marked
    ``retryable = False`` (a refused SSH key, an unknown host key); not, before the
    first session, for a wrong password or a missing database (after a session
    they may be a moment's trouble: a database being restored)."""
    if getattr(exc, "retryable", True) is False:
        return False
    return not (first_session and any(part in str(exc) for part in _NOT_RETRYABLE_TEXT))


def must_propagate(exc):
    """User code is isolated from everything but Ctrl-C in the main thread, which is
    the user's own way to stop their program (in our threads it cannot arrive)."""
    return isinstance(exc, KeyboardInterrupt) and threading.current_thread() is threading.main_thread()
