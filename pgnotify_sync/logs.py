"""JSON log lines (the EventLog format).

The library only logs through the standard ``logging`` module under the
``pgnotify_sync`` logger and adds no handler. For JSON lines::

    import logging
    from pgnotify_sync.logs import JsonFormatter
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter())
    logging.getLogger("pgnotify_sync").addHandler(handler)

Each line has ``event`` (parsed, delivered, error, connected, disconnected,
reconnecting, overflow, ...), ``channel``,
``timestamp`` (ISO 8601 UTC), ``event_id``, ``level``, ``logger``, ``message`` and
``details``. Fields come from the ``extra`` of the log call when present.
"""

import datetime
import json
import logging


class JsonFormatter(logging.Formatter):
    def format(self, record):
        entry = {
            "timestamp": datetime.datetime.fromtimestamp(record.created, datetime.timezone.utc)
            .isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "level": record.levelname,
            "logger": record.name,
            "event": getattr(record, "event", None) or "log",
            "channel": getattr(record, "channel", None),
            "event_id": getattr(record, "event_id", None),
            "message": record.getMessage(),
            "details": getattr(record, "details", None) or {},
        }
        if record.exc_info:
            entry["details"] = dict(entry["details"], traceback=self.formatException(record.exc_info))
        return json.dumps(entry, default=str, ensure_ascii=False)
