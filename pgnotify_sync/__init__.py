"""pgnotify_sync: PostgreSQL row changes as typed events for synchronous Python.

Example::

    import psycopg2
    from pgnotify_sync import Config, Listener, install, watch_table

    cfg = Config.from_env()
    with psycopg2.connect(**cfg.connect_kwargs()) as conn:
        install(conn)
        watch_table(conn, "public.messages", channel="messages")

    listener = Listener(cfg)

    @listener.on_event("messages")
    def on_message(event):
        print(event.operation, event.data)

    listener.start()
"""

from .config import Config
from .errors import (ConfigError, ConnectError, ErrorKind, HandlerSuspended, ListenerStateError, PayloadError,
                     PgNotifyError, PrivilegeError, PublishBufferFull, RowTypeError, SchemaError)
from .events import DatabaseEvent, Operation, converter
from .listener import ConnectionState, Listener
from .schema import (grant_admin, grant_listener, grant_publisher, grants, install, revoke, set_retention_floor,
                     uninstall, unwatch_table, watch_table, watched_tables)

__version__ = "0.1.0"

__all__ = [
    "Config", "ConfigError", "ConnectError", "ConnectionState", "DatabaseEvent", "ErrorKind", "HandlerSuspended",
    "Listener",
    "ListenerStateError", "Operation", "PayloadError", "PgNotifyError", "PrivilegeError", "PublishBufferFull",
    "RowTypeError", "SchemaError",
    "converter",
    "install", "uninstall", "unwatch_table", "watch_table", "watched_tables",
    "grant_listener", "grant_publisher", "grant_admin", "revoke", "grants", "set_retention_floor",
]
