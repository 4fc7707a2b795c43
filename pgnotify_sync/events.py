"""DatabaseEvent, Operation and the decoding of notification payloads.

Example::

    @listener.on_event("messages")
    def on_message(event: DatabaseEvent):
        if event.operation == "INSERT":
            print(event.table, event.id, event.data["body"])

Events are slotted attrs objects. One event object is handed to every receiver of its
channel (and kept by the SSE replay ring): treat it as read-only. :data:`converter`
(cattrs) turns them into plain dicts and back::

    d = converter.unstructure(event)          # JSON-ready dict
    event = converter.structure(d, DatabaseEvent)
"""

import decimal
import enum
import json
from typing import Any, Dict, Generic, Optional, TypeVar

import attrs
import cattrs

from ._json import loads
from .errors import PayloadError, RowTypeError

#: The type of a row (``DatabaseEvent[Model]``: ``data`` and ``old`` are ``Model``s,
#: from ``on_event(channel, handler, row=Model)``); a plain dict otherwise.
RowT = TypeVar("RowT")


class Operation(str, enum.Enum):
    """What happened to the row. A ``str`` enum: ``event.operation == "INSERT"`` holds."""

    INSERT = "INSERT"
    UPDATE = "UPDATE"
    DELETE = "DELETE"
    #: An application event sent with ``publish()`` (``data`` is its payload).
    PUBLISH = "PUBLISH"
    #: A row that existed when a durable consumer's backfill read it (``data``; apply
    #: it as an upsert: a row a newer change superseded never comes).
    BACKFILL = "BACKFILL"

    def __str__(self):
        return self.value


# Not frozen, on purpose: a frozen attrs class sets every field through
# object.__setattr__ and takes 1.8 us to build against 0.4 us, a fifth of the whole
# per-event cost of a burst; and its data/old dicts stay mutable whatever the class.
@attrs.define(slots=True, eq=True)
class DatabaseEvent(Generic[RowT]):
    """One change of one row (or one published application event).

    Shared by every receiver of the channel: read it, do not change it.

    :ivar channel: the logical channel name the handler subscribed to.
    :ivar operation: an :class:`Operation`.
    :ivar schema: schema of the changed table.
    :ivar table: name of the changed table.
    :ivar data: the new row as a dict; for DELETE the deleted row. Columns excluded
        with ``watch_table(exclude_columns=...)`` are never present.
    :ivar old: the previous row for UPDATE, else None.
    :ivar id: the event's id in the event log (increasing, unique), or None for a
        plain payload sent by a trigger that has no event log.
    :ivar xid: the writing transaction's id (``pg_current_xact_id()``), or None.
    """

    channel: str
    operation: Operation
    schema: str
    table: str
    data: Optional[RowT] = None
    old: Optional[RowT] = None
    id: Optional[int] = None
    xid: Optional[int] = attrs.field(default=None, repr=False)

    def to_dict(self):
        """A JSON-ready dict (the shape the SSE bridge and the CLI print).

        ``xid`` is left out: transaction ids are internal bookkeeping, not for
        browsers (``converter.unstructure(event)`` keeps it)."""
        d = converter.unstructure(self)
        d.pop("xid", None)
        return d

    def to_json(self):
        return json.dumps(self.to_dict(), separators=(",", ":"), default=str)


def _shown(value):
    """A value for an error message: short scalars only, never a row's contents."""
    if isinstance(value, (str, int, float)) and not isinstance(value, bool) and len(str(value)) <= 20:
        return repr(value)
    return f"a {type(value).__name__}"


def _structure_operation(value, _type):
    if isinstance(value, Operation):
        return value
    try:
        return Operation(value)
    except (ValueError, TypeError):
        raise ValueError(
            f"operation must be one of {', '.join(op.value for op in Operation)}, got {_shown(value)}") from None


def _structure_row(value, _type):
    if value is None or isinstance(value, dict):
        return value
    raise ValueError(f"a row must be a JSON object or null, got {type(value).__name__}")


def _structure_name(value, _type):
    if isinstance(value, str):
        return value
    raise ValueError(f"expected a string, got {type(value).__name__}")


def _structure_optional_int(value, _type):
    if value is None:
        return None
    if isinstance(value, bool):
        raise ValueError("expected an integer, got a boolean")
    if isinstance(value, int):
        return value
    if isinstance(value, str) and value.isdigit():
        return int(value)
    raise ValueError(f"expected an integer, got {_shown(value)}")


converter = cattrs.Converter()
converter.register_structure_hook(Operation, _structure_operation)
converter.register_structure_hook(Optional[Dict[str, Any]], _structure_row)
converter.register_structure_hook(str, _structure_name)
converter.register_structure_hook(Optional[int], _structure_optional_int)
# An event without a row type is one of dict rows.
converter.register_structure_hook(DatabaseEvent, lambda d, _: converter.structure(d, DatabaseEvent[Dict[str, Any]]))


def typed(event, model, rows=None):
    """*event* with ``data`` and ``old`` structured into *model* by *rows* (a cattrs
    Converter; default a plain one): a new event, the shared one is left alone.
    RowTypeError names the fields that do not fit, never their values."""
    conv = rows or _rows
    try:
        data = None if event.data is None else conv.structure(event.data, model)
        old = None if event.old is None else conv.structure(event.old, model)
    except Exception as exc:
        where = "; ".join(_where(exc)) or type(exc).__name__
        raise RowTypeError(f"a row of {event.schema}.{event.table} does not fit {getattr(model, '__name__', model)}: "
                           f"{where}") from None
    return DatabaseEvent(event.channel, event.operation, event.schema, event.table, data, old, event.id, event.xid)


def _strict(kind, accepts):
    def structure(value, _type):
        if not accepts(value):
            raise TypeError(f"expected {kind}, got {type(value).__name__}")
        return value if kind != "float" else float(value)
    return structure


# cattrs' own hooks call str() and int() on whatever comes (None becomes 'None',
# 1.5 becomes 1): for rows, a value of another JSON type does not fit.
def _where(exc, path="$", expected=None):
    """What did not fit, as "<error type>[, expected <type>] @ <path>" lines: built
    from cattrs' notes and exception types alone, since an exception's own text (a
    validator's, cattrs' transform_error) may quote the value."""
    if isinstance(exc, cattrs.errors.BaseValidationError):
        with_notes, without = exc.group_exceptions()
        out = []
        for sub, note in with_notes:
            name, index = getattr(note, "name", None), getattr(note, "index", None)
            where = f"{path}.{name}" if name is not None else f"{path}[{index}]" if index is not None else path
            out += _where(sub, where, getattr(note, "type", None))
        for sub in without:
            out += _where(sub, path)
        return out
    if isinstance(exc, KeyError):
        return [f"required field missing @ {path}"]
    wanted = f", expected {getattr(expected, '__name__', expected)}" if expected is not None else ""
    return [f"{type(exc).__name__}{wanted} @ {path}"]


_rows = cattrs.Converter()
_rows.register_structure_hook(str, _strict("str", lambda v: isinstance(v, str)))
_rows.register_structure_hook(int, _strict("int", lambda v: isinstance(v, int) and not isinstance(v, bool)))
_rows.register_structure_hook(bool, _strict("bool", lambda v: isinstance(v, bool)))
_rows.register_structure_hook(float, _strict("float", lambda v: isinstance(v, (int, float, decimal.Decimal))
                                             and not isinstance(v, bool)))
converter.register_unstructure_hook(Operation, lambda op: op.value)

#: The most ids one statement's range may span: a larger one is refused as forged
#: (its events still arrive: the position check reads them from the log).
MAX_RANGE_SPAN = 1 << 27
#: A statement of n rows spans at most n * RANGE_SPREAD + RANGE_SLACK ids: its rows
#: get consecutive ids but for other writers' rows logged at the same time.
RANGE_SPREAD = 64
RANGE_SLACK = 4096
#: Log ids are bigint and transaction ids below 2**63 (xid8 counts from 3 up): a
#: hint naming more is forged. (Unchecked, an id past bigint would be compared as
#: numeric, without the primary key's index; an xid past xid8 fails the query.)
MAX_LOG_ID = (1 << 63) - 1

#: Operation by its name, as the log and the payloads spell it (one lookup, no enum call).
OPERATIONS = {op.value: op for op in Operation}

@attrs.frozen(slots=True)
class EventRef:
    """A hint for one row: its log id and transaction id, ``{id, xid}``.

    The worker reads the event from the event log (channel and xid checked) before
    delivering it, so the handler never sees an EventRef; a hint that matches no
    committed row of its channel delivers nothing.
    """

    channel: str
    id: int
    xid: Optional[int] = None


@attrs.frozen(slots=True)
class EventRange:
    """A notification for a whole statement's rows (more than 8): log ids
    ``first..last`` of transaction ``xid``, ``n`` rows. The worker reads them from
    the event log in one query; handlers see ordinary events. ``parts``: the
    ``(first, last, n)`` of each hint of consecutive statements merged into this
    one (None: one hint), each checked against the rows read on its own."""

    channel: str
    xid: int
    first: int
    last: int
    n: int
    parts: Optional[list] = attrs.field(default=None, eq=False, repr=False)

    id = None     # not one event: never compared by id


def decode_payload(channel, payload, accept_plain=False, _loads=loads, _ops=OPERATIONS):
    """Decode one notification payload into a hint: an EventRef ``{id, xid}`` (a
    row) or an EventRange ``{xid, first, last, n}`` (a statement), which the worker
    completes from the event log. The wire is untrusted: nothing else of a payload
    is used (the data of older triggers' full payloads is ignored).

    A payload without a log id is a plain event: refused unless *accept_plain*
    (``Config.accept_plain_payloads``), then a DatabaseEvent without id or xid.

    *channel* is the logical channel. Raises :class:`PayloadError` naming what is
    wrong; the message never contains the payload itself (it may hold row data).
    """
    try:
        obj = _loads(payload)
    except json.JSONDecodeError as exc:
        raise PayloadError(f"payload on channel {channel!r} is not JSON ({exc.msg} at position {exc.pos})",
                           channel, len(payload)) from None
    except (ValueError, RecursionError) as exc:
        # e.g. an integer over Python's digit limit, or nesting deeper than the stack
        raise PayloadError(f"payload on channel {channel!r} is not usable JSON ({type(exc).__name__})",
                           channel, len(payload)) from None
    if type(obj) is not dict:
        raise PayloadError(f"payload on channel {channel!r} must be a JSON object, got {type(obj).__name__}",
                           channel, len(payload))
    ident = obj.get("id")
    xid = obj.get("xid")
    if type(ident) is int and type(xid) is int:
        if 0 < ident <= MAX_LOG_ID and 0 < xid <= MAX_LOG_ID:
            return EventRef(channel, ident, xid)
        raise PayloadError(f"payload on channel {channel!r}: id and xid must be > 0 and < 2**63", channel,
                           len(payload))
    first = obj.get("first")
    if type(first) is int and "operation" not in obj:
        return _range(channel, obj, first, xid, len(payload))
    if not accept_plain:
        raise PayloadError(f"payload on channel {channel!r} carries no log id and xid: a plain event, refused "
                           "(anyone who can connect may send one; Config.accept_plain_payloads trusts them)",
                           channel, len(payload))
    return _plain(channel, obj, len(payload), _ops)


def _range(channel, obj, first, xid, size):
    last, n = obj.get("last"), obj.get("n")
    if not (type(xid) is int and type(last) is int and type(n) is int and 0 < xid <= MAX_LOG_ID
            and 0 < first <= last <= MAX_LOG_ID):
        raise PayloadError(f"payload on channel {channel!r} is not a range of log ids", channel, size)
    span = last - first + 1
    widest = min(MAX_RANGE_SPAN, n * RANGE_SPREAD + RANGE_SLACK)
    if not 0 < n <= span <= widest:
        # A statement's n rows have n distinct ids in first..last, spread only by
        # other writers' rows logged meanwhile. A wider range is forged (or refused
        # as if it were: its rows still come through the position check); it would
        # make the worker scan the whole span.
        raise PayloadError(f"payload on channel {channel!r}: a range of {n} events cannot span {span} ids "
                           f"(at most {widest})", channel, size)
    return EventRange(channel, xid, first, last, n)


def _plain(channel, obj, size, ops):
    """A whole event from the wire (accept_plain_payloads): no log id, so never
    deduplicated or re-read."""
    op = obj.get("operation")
    op = ops.get(op) if type(op) is str else None
    data, old, schema, table = obj.get("data"), obj.get("old"), obj.get("schema"), obj.get("table")
    if (op is not None and type(schema) is str and type(table) is str
            and (data is None or type(data) is dict) and (old is None or type(old) is dict)):
        return DatabaseEvent(channel, op, schema, table, data, old, None, None)
    # Slow path: let cattrs structure it, so the error says precisely what is wrong.
    obj = dict(obj)
    obj["channel"] = channel
    obj["id"] = obj["xid"] = None
    try:
        return converter.structure(obj, DatabaseEvent)
    except RecursionError:
        raise PayloadError(f"payload on channel {channel!r} is nested too deeply", channel, size) from None
    except Exception as exc:  # cattrs raises ClassValidationError (an ExceptionGroup)
        raise PayloadError(f"payload on channel {channel!r} is not an event: {_describe(exc)}",
                           channel, size) from None


def _describe(exc):
    """Flatten cattrs' exception groups into 'field: problem' text (no values of rows)."""
    subs = getattr(exc, "exceptions", None)
    if not subs:
        return f"missing field {exc.args[0]!r}" if isinstance(exc, KeyError) else str(exc)
    parts = []
    for sub in subs:
        notes = [n for n in getattr(sub, "__notes__", []) or []]
        where = ""
        for note in notes:
            if note.startswith("Structuring class") and "@ attribute" in note:
                where = note.split("@ attribute", 1)[1].strip().split()[0]
        described = _describe(sub)
        parts.append(f"{where}: {described}" if where else described)
    return "; ".join(parts)
