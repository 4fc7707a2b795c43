"""Unit tests for pgnotify_sync.events (no database)."""

import decimal
import json
import random
import sys

import cattrs.errors
import pytest

from pgnotify_sync.errors import PayloadError, PgNotifyError
from pgnotify_sync._json import loads_unlimited
from pgnotify_sync.events import MAX_RANGE_SPAN, DatabaseEvent, EventRange, EventRef, Operation, converter, loads
from pgnotify_sync.events import decode_payload as decode_hint


def decode_payload(channel, text):
    """Plain events (a whole event on the wire, no log id): decoded only with
    accept_plain_payloads; the wire's id and xid are never kept."""
    return decode_hint(channel, text, accept_plain=True)

SECRET = "s3cret-row-value-8842"


def payload(**fields):
    return json.dumps(fields)


def full(**overrides):
    fields = {"operation": "UPDATE", "schema": "public", "table": "orders",
              "data": {"id": 1, "note": SECRET}, "old": {"id": 1, "note": "before"}}
    fields.update(overrides)
    return fields


# -- Operation -------------------------------------------------------------------------


def test_operation_is_a_str_enum():
    assert issubclass(Operation, str)
    assert Operation.INSERT == "INSERT"
    assert "DELETE" == Operation.DELETE
    assert Operation("UPDATE") is Operation.UPDATE
    assert str(Operation.PUBLISH) == "PUBLISH"
    assert f"{Operation.INSERT}" == "INSERT"
    assert {op.value for op in Operation} == {"INSERT", "UPDATE", "DELETE", "PUBLISH", "BACKFILL"}


# -- decode_payload: good payloads ---------------------------------------------------------


def test_fast_path_fields():
    event = decode_payload("orders", payload(**full()))
    assert type(event) is DatabaseEvent
    assert event.channel == "orders"
    assert event.operation is Operation.UPDATE
    assert event.operation == "UPDATE"
    assert event.schema == "public"
    assert event.table == "orders"
    assert event.data == {"id": 1, "note": SECRET}
    assert event.old == {"id": 1, "note": "before"}
    assert event.id is None and event.xid is None     # a plain event has no log identity


def test_channel_argument_wins_over_payload():
    event = decode_payload("logical", payload(**full(channel="other")))
    assert event.channel == "logical"


@pytest.mark.parametrize("op", ["INSERT", "UPDATE", "DELETE", "PUBLISH"])
def test_every_operation(op):
    event = decode_payload("c", payload(**full(operation=op)))
    assert event.operation is Operation(op)


def test_null_data_and_old():
    event = decode_payload("c", payload(**full(operation="DELETE", data=None, old=None)))
    assert event.data is None and event.old is None
    event = decode_payload("c", payload(operation="INSERT", schema="s", table="t"))
    assert event.data is None and event.old is None


def test_numbers_with_fraction_decode_as_exact_decimal():
    raw = ('{"operation": "INSERT", "schema": "s", "table": "t", '
           '"data": {"price": 0.1, "big": 12345678901234567890.123456789012, "count": 3, '
           '"neg": -2.50, "exp": 1e-7, "huge": 98765432109876543210}}')
    event = decode_payload("c", raw)
    data = event.data
    assert type(data["price"]) is decimal.Decimal and data["price"] == decimal.Decimal("0.1")
    assert data["big"] == decimal.Decimal("12345678901234567890.123456789012")
    assert str(data["big"]) == "12345678901234567890.123456789012"
    assert str(data["neg"]) == "-2.50"
    assert data["exp"] == decimal.Decimal("1e-7")
    assert type(data["count"]) is int and data["count"] == 3
    assert data["huge"] == 98765432109876543210 and type(data["huge"]) is int
    assert loads("1.25") == decimal.Decimal("1.25")


def test_id_and_xid_are_ints():
    event = decode_payload("c", payload(**full(id=2 ** 40, xid=2 ** 33 + 5)))
    assert event.id == 2 ** 40
    assert event.xid == 2 ** 33 + 5


def test_plain_events_never_take_an_id_or_xid_from_the_wire():
    event = decode_payload("c", payload(**full(id=41, xid="abc")))
    assert type(event) is DatabaseEvent and event.id is None and event.xid is None


def test_reference_payload_gives_event_ref():
    ref = decode_payload("orders", '{"id": 5, "xid": 9, "ref": true}')
    assert ref == EventRef("orders", 5, 9)
    assert type(ref) is EventRef
    assert (ref.channel, ref.id, ref.xid) == ("orders", 5, 9)


def test_a_reference_without_xid_is_refused():
    with pytest.raises(PayloadError, match="carries no log id and xid"):
        decode_hint("c", '{"id": 5, "ref": true}')


def test_reference_with_non_int_id_is_an_error():
    with pytest.raises(PayloadError):
        decode_payload("c", '{"id": "x", "xid": 9, "ref": true}')


def test_plain_payload_without_id():
    event = decode_payload("c", payload(operation="INSERT", schema="public", table="t", data={"a": 1}))
    assert event.id is None
    assert event.xid is None
    assert event.data == {"a": 1}


def test_slow_path_converts_digit_string_id():
    # Not our trigger's shape (id as a string): the slow path still structures it.
    event = decode_payload("c", payload(**full(id="12", xid="13")))
    assert type(event) is DatabaseEvent and event.id is None and event.xid is None   # never the wire's


# -- decode_payload: malformed payloads -------------------------------------------------------


def decode_error(raw, channel="chan"):
    with pytest.raises(PayloadError) as info:
        decode_payload(channel, raw)
    exc = info.value
    text = str(exc)
    assert SECRET not in text
    assert SECRET not in repr(exc)
    assert exc.channel == channel
    assert exc.payload_size == len(raw)
    assert repr(channel) in text
    return text


MALFORMED = [
    # (id, payload, words that must appear in the message)
    ("not-json", '{"data": {"x": "' + SECRET + '"', ["not JSON"]),
    ("garbage", SECRET, ["not JSON"]),
    ("empty", "", ["not JSON"]),
    ("array", json.dumps([SECRET]), ["must be a JSON object", "list"]),
    ("string", json.dumps(SECRET), ["must be a JSON object", "str"]),
    ("number", "42", ["must be a JSON object", "int"]),
    ("null", "null", ["must be a JSON object", "NoneType"]),
    ("bad-operation", payload(**full(operation="UPSERT")), ["operation", "must be one of", "UPSERT"]),
    ("lowercase-operation", payload(**full(operation="insert")), ["operation", "must be one of"]),
    ("int-operation", payload(**full(operation=1)), ["operation", "must be one of"]),
    ("missing-operation", payload(schema="s", table="t", data={"x": SECRET}), ["operation", "missing"]),
    ("missing-schema", payload(operation="INSERT", table="t", data={"x": SECRET}), ["schema", "missing"]),
    ("missing-table", payload(operation="INSERT", schema="s", data={"x": SECRET}), ["table", "missing"]),
    ("schema-not-string", payload(**full(schema=5)), ["schema", "expected a string"]),
    ("data-list", payload(**full(data=[SECRET])), ["data", "JSON object", "list"]),
    ("data-string", payload(**full(data=SECRET)), ["data", "JSON object", "str"]),
    ("old-number", payload(**full(old=3)), ["old", "JSON object"]),
]


@pytest.mark.parametrize("raw, words", [(p, w) for _, p, w in MALFORMED], ids=[i for i, _, _ in MALFORMED])
def test_malformed_payload_raises_payload_error_naming_problem(raw, words):
    text = decode_error(raw)
    for word in words:
        assert word in text, (word, text)


def test_payload_error_is_value_error_and_library_error():
    assert issubclass(PayloadError, ValueError)
    assert issubclass(PayloadError, PgNotifyError)


def test_several_problems_are_all_named():
    text = decode_error(payload(operation="BAD", data=[SECRET]))
    for word in ("operation", "schema", "table", "data"):
        assert word in text, (word, text)


@pytest.mark.parametrize("operation", [["INSERT"], {"x": SECRET}], ids=["list", "object"])
def test_unhashable_operation_is_payload_error(operation):
    text = decode_error(payload(**full(operation=operation)))
    assert "operation" in text


def test_deeply_nested_payload_is_payload_error():
    decode_error("[" * 5000 + "]" * 5000)


@pytest.mark.skipif(not hasattr(sys, "get_int_max_str_digits"), reason="no int-string limit in this Python")
def test_overlong_integer_is_decoded_exactly():
    # int() refuses more than 4,300 digits; a numeric(10^5000) column must still arrive.
    event = decode_payload("chan", '{"operation": "INSERT", "schema": "s", "table": "t", "data": {"n": 1'
                           + "0" * 5000 + ', "f": 1.' + "5" * 5000 + "}}")
    assert event.data["n"] == 10 ** 5000
    assert event.data["f"] == decimal.Decimal("1." + "5" * 5000)


def test_deeply_nested_payload_is_decoded():
    # json.loads raises RecursionError past ~1,000 levels; PostgreSQL's json accepts them.
    depth = 3000
    event = decode_payload("chan", '{"operation": "INSERT", "schema": "s", "table": "t", "data": {"j": '
                           + "[" * depth + '{"k": "v"}' + "]" * depth + "}}")
    value, levels = event.data["j"], 0
    while isinstance(value, list):
        value, levels = value[0], levels + 1
    assert (levels, value) == (depth, {"k": "v"})


@pytest.mark.parametrize("text", ["[1,]", '{"a" 1}', "[1 2]", "", '{"a":1}x', "[", "nul", '{"a":1,}', "01"])
def test_unlimited_decoder_refuses_what_json_refuses(text):
    with pytest.raises(json.JSONDecodeError):
        json.loads(text)
    with pytest.raises(json.JSONDecodeError):
        loads_unlimited(text)


def test_unlimited_decoder_agrees_with_json():
    rng = random.Random(7)

    def gen(depth=0):
        r = rng.random()
        if depth > 4 or r < 0.3:
            return rng.choice([0, -2, 3.5, -1e-7, "a\"b\\", "\u0000", "é😀", None, True, False, ""])
        if r < 0.65:
            return [gen(depth + 1) for _ in range(rng.randint(0, 3))]
        return {f"k{i}\n": gen(depth + 1) for i in range(rng.randint(0, 3))}

    for _ in range(500):
        text = json.dumps(gen(), indent=rng.choice([None, 1]), ensure_ascii=rng.random() < 0.5)
        assert loads_unlimited(text) == json.loads(text, parse_float=decimal.Decimal), text


# -- converter / serialisation --------------------------------------------------------------------


def test_unstructure_structure_round_trip():
    event = decode_payload("orders", payload(**full()))
    d = converter.unstructure(event)
    assert d == {"channel": "orders", "operation": "UPDATE", "schema": "public", "table": "orders",
                 "data": {"id": 1, "note": SECRET}, "old": {"id": 1, "note": "before"},
                 "id": None, "xid": None}
    assert type(d["operation"]) is str and not isinstance(d["operation"], Operation)
    back = converter.structure(d, DatabaseEvent)
    assert back == event
    assert back.operation is Operation.UPDATE


def test_round_trip_keeps_decimals_and_none():
    event = DatabaseEvent("c", Operation.INSERT, "s", "t", {"p": decimal.Decimal("1.10")}, None, None, None)
    back = converter.structure(converter.unstructure(event), DatabaseEvent)
    assert back == event
    assert str(back.data["p"]) == "1.10"


def test_structure_rejects_bad_operation():
    d = converter.unstructure(decode_payload("c", payload(**full())))
    d["operation"] = "NOPE"
    with pytest.raises(cattrs.errors.ClassValidationError, match="While structuring DatabaseEvent") as info:
        converter.structure(d, DatabaseEvent)
    (cause,) = info.value.exceptions
    assert type(cause) is ValueError
    assert str(cause) == "operation must be one of INSERT, UPDATE, DELETE, PUBLISH, BACKFILL, got 'NOPE'"


def test_to_dict_and_to_json():
    event = decode_payload("orders", payload(**full()))
    expected = converter.unstructure(event)
    assert "xid" in expected
    del expected["xid"]                          # internal: not sent to browsers or printed
    assert event.to_dict() == expected
    text = event.to_json()
    assert " " not in text.replace(SECRET, "")    # compact separators
    assert json.loads(text) == expected


def test_to_json_keeps_decimal_digits():
    event = decode_payload("c", '{"operation": "INSERT", "schema": "s", "table": "t", "data": {"p": 1.10}}')
    out = json.loads(event.to_json())
    assert out["operation"] == "INSERT"
    assert str(out["data"]["p"]) == "1.10"       # serialised with every digit (as text)


def test_event_is_slotted_and_hides_xid_from_repr():
    event = DatabaseEvent("c", Operation.UPDATE, "public", "orders", {"id": 1}, None, 41, 7777)
    with pytest.raises(AttributeError):
        event.extra = 3       # slots: no stray attributes
    assert "7777" not in repr(event)
    assert "id=41" in repr(event)


# -- hints: the wire is untrusted ------------------------------------------------------


def test_a_row_hint_is_ids_only():
    assert decode_hint("c", '{"id":41,"xid":7777}') == EventRef("c", 41, 7777)


def test_whole_events_and_references_of_older_triggers_are_only_hints():
    # Their data is never used: the event is read from the log.
    assert decode_hint("c", payload(**full(id=41, xid=7777))) == EventRef("c", 41, 7777)
    assert decode_hint("c", '{"id": 5, "xid": 9, "ref": true}') == EventRef("c", 5, 9)


def test_plain_events_are_refused_by_default():
    with pytest.raises(PayloadError, match="plain event, refused") as info:
        decode_hint("c", payload(**full()))
    assert SECRET not in str(info.value)


@pytest.mark.parametrize("text", ['{"id": 0, "xid": 5}', '{"id": 5, "xid": -1}',
                                  '{"id": 9223372036854775808, "xid": 5}', '{"id": 5, "xid": 9223372036854775808}'])
def test_a_hint_needs_ids_of_the_log(text):
    # > 0 and bigint (past it, the read would compare numerics without the index)
    with pytest.raises(PayloadError, match="must be > 0 and < 2"):
        decode_hint("c", text)
    assert decode_hint("c", '{"id": 9223372036854775807, "xid": 9223372036854775807}').id == 2 ** 63 - 1


def test_a_statement_range():
    assert decode_hint("c", '{"xid": 9, "first": 10, "last": 19, "n": 10}') == EventRange("c", 9, 10, 19, 10)
    assert decode_hint("c", '{"xid": 9, "first": 10, "last": 30, "n": 10}') == EventRange("c", 9, 10, 30, 10)
    # spread by other writers' rows: up to n * RANGE_SPREAD + RANGE_SLACK ids
    assert decode_hint("c", payload(xid=9, first=1, last=10 * 64 + 4096, n=10)) == EventRange("c", 9, 1, 4736, 10)


@pytest.mark.parametrize("fields, message", [
    ({"xid": 9, "first": 10, "last": 19, "n": 2 ** 62}, "cannot span 10 ids"),           # n beyond its ids
    ({"xid": 9, "first": 1, "last": MAX_RANGE_SPAN + 1, "n": MAX_RANGE_SPAN}, f"at most {MAX_RANGE_SPAN}"),
    ({"xid": 9, "first": 1, "last": 10 * 64 + 4096 + 1, "n": 10}, f"at most {10 * 64 + 4096}"),   # too spread
    ({"xid": 9, "first": 10, "last": 9, "n": 1}, "not a range"),
    ({"xid": 9, "first": 0, "last": 9, "n": 1}, "not a range"),
    ({"xid": 9, "first": 2 ** 63 - 5, "last": 2 ** 63 + 4, "n": 10}, "not a range"),      # past bigint
    ({"xid": 2 ** 63, "first": 10, "last": 19, "n": 10}, "not a range"),                # past xid8's counter
    ({"xid": "9", "first": 1, "last": 9, "n": 1}, "not a range"),
    ({"xid": 9, "first": 1, "last": 9, "n": 0}, "cannot span"),
])
def test_a_forged_range_is_refused(fields, message):
    with pytest.raises(PayloadError, match=message):
        decode_hint("c", payload(**fields))
