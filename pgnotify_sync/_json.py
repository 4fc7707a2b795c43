"""JSON decoding of notification payloads and event-log rows: exact numerics,
and anything PostgreSQL's json accepts (see :func:`loads`; events.py exports
it)."""

import decimal
import json
import re

_fast_loads = json.JSONDecoder(parse_float=decimal.Decimal).decode


def loads(text):
    """JSON decoding used for payloads and event-log rows.

    Non-integer numbers become ``decimal.Decimal``: a ``numeric`` column keeps every
    digit (as psycopg2 does for plain queries); integers stay ``int``. Anything
    PostgreSQL's json accepts is decoded: the C decoder (one built once) does the
    common case; a document it refuses for a limit of Python's, not of JSON
    (nesting past the recursion limit, an integer of more than 4,300 digits), goes
    to :func:`loads_unlimited`. Invalid JSON raises ``json.JSONDecodeError``.
    """
    try:
        return _fast_loads(text)
    except json.JSONDecodeError:
        raise
    except (RecursionError, ValueError):
        return loads_unlimited(text)


_WS = re.compile(r"[ \t\n\r]*")
_NUMBER = re.compile(r"-?(?:0|[1-9][0-9]*)(\.[0-9]+)?([eE][-+]?[0-9]+)?")
_CONSTANTS = {"true": True, "false": False, "null": None}
_scanstring = json.decoder.scanstring


def _number(match):
    text = match.group(0)
    if match.group(1) or match.group(2):
        return decimal.Decimal(text)
    if len(text) <= 4000:
        return int(text)
    # int(str) refuses more than sys.get_int_max_str_digits() digits; via Decimal it
    # has no such limit.
    with decimal.localcontext() as ctx:
        ctx.prec = len(text) + 1
        return int(decimal.Decimal(text))


def _fail(text, msg, pos):
    raise json.JSONDecodeError(msg, text, pos)


def _key_at(text, pos):
    """An object's key and its colon at *pos*: (key, where its value starts)."""
    if not text.startswith('"', pos):
        _fail(text, "Expecting property name enclosed in double quotes", pos)
    key, pos = _scanstring(text, pos + 1)
    pos = _WS.match(text, pos).end()
    if not text.startswith(":", pos):
        _fail(text, "Expecting ':' delimiter", pos)
    return key, _WS.match(text, pos + 1).end()


def _scalar_at(text, pos):
    """A string, number, true, false or null at *pos*: (value, end)."""
    if text.startswith('"', pos):
        return _scanstring(text, pos + 1)
    m = _NUMBER.match(text, pos)
    if m is not None and m.end() > pos:
        return _number(m), m.end()
    for word, const in _CONSTANTS.items():
        if text.startswith(word, pos):
            return const, pos + len(word)
    _fail(text, "Expecting value", pos)


def loads_unlimited(text):
    """A JSON decoder without recursion (any nesting depth) or integer-size limit.

    Slower than ``json.loads`` (pure Python); used only for what that refuses.
    """
    end = len(text)
    # Each frame: [container, key or None]; a value completes the top frame.
    stack = []
    pos = _WS.match(text, 0).end()
    while True:
        # -- read one value (or open a container) at pos
        if pos >= end:
            _fail(text, "Expecting value", pos)
        opener = text[pos]
        if opener == "{" or opener == "[":
            pos = _WS.match(text, pos + 1).end()
            if text.startswith("}" if opener == "{" else "]", pos):
                value, pos = ({} if opener == "{" else []), pos + 1
            elif opener == "{":
                key, pos = _key_at(text, pos)
                stack.append([{}, key])
                continue
            else:
                stack.append([[], None])
                continue
        else:
            value, pos = _scalar_at(text, pos)
        # -- hand the value to its container; close the containers that end here
        while True:
            pos = _WS.match(text, pos).end()
            if not stack:
                if pos != end:
                    _fail(text, "Extra data", pos)
                return value
            frame = stack[-1]
            container, key = frame
            if key is None:
                container.append(value)
            else:
                container[key] = value
            if text.startswith(",", pos):
                pos = _WS.match(text, pos + 1).end()
                if key is not None:
                    frame[1], pos = _key_at(text, pos)
                break           # read the next value
            if text.startswith("]" if key is None else "}", pos):
                stack.pop()
                value, pos = container, pos + 1
                continue        # the container is a value of the one below
            _fail(text, "Expecting ',' delimiter", pos)
