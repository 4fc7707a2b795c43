"""Unit tests for pgnotify_sync.errors: ErrorKind, first_line, describe, retry_can_fix (no database)."""

import pathlib
import re

import pytest

import pgnotify_sync
from pgnotify_sync.errors import ErrorKind, describe, first_line, retry_can_fix

README = pathlib.Path(__file__).resolve().parent.parent / "README.md"

KINDS = ["payload", "handler", "receiver", "catchup", "overflow", "connect", "gap", "missing", "publish",
         "internal", "sse", "type"]


def readme_kinds():
    """The kinds README's ``error`` signal bullet lists after "`kind` is" (asides in
    parentheses left out)."""
    text = README.read_text(encoding="utf-8")
    start = text.index("`kind` is") + len("`kind` is")
    end = text.index("\n- ", start)
    bullet = re.sub(r"\([^)]*\)", "", text[start:end])
    return re.findall(r"`([a-z_]+)`", bullet)


# -- ErrorKind ---------------------------------------------------------------------------


def test_error_kinds_are_the_readme_list():
    assert readme_kinds() == KINDS
    assert [kind.value for kind in ErrorKind] == KINDS


def test_error_kind_is_exported():
    assert pgnotify_sync.ErrorKind is ErrorKind


@pytest.mark.parametrize("kind", list(ErrorKind), ids=str)
def test_error_kind_is_its_value_as_text(kind):
    assert str(kind) == kind.value
    assert f"{kind}" == kind.value
    assert "{}".format(kind) == kind.value
    assert kind == kind.value                   # a str: kind == "handler" works
    assert isinstance(kind, str)
    assert ErrorKind(kind.value) is kind


@pytest.mark.parametrize("value", ["nope", "HANDLER", "", "Handler"])
def test_unknown_error_kind_refused(value):
    with pytest.raises(ValueError):
        ErrorKind(value)


# -- first_line / describe ----------------------------------------------------------------


class Quiet(Exception):
    """An exception whose text is empty."""


@pytest.mark.parametrize("text, expected", [
    ('relation "x" does not exist\nLINE 1: SELECT * FROM x\n              ^', 'relation "x" does not exist'),
    ("server closed the connection unexpectedly\n\tThis probably means...\n", "server closed the connection "
                                                                             "unexpectedly"),
    ("\n\n  leading blank lines\nsecond", "leading blank lines"),
    ("one line", "one line"),
    ("crlf line\r\nnext", "crlf line"),
])
def test_first_line(text, expected):
    assert first_line(RuntimeError(text)) == expected


@pytest.mark.parametrize("exc, expected", [
    (Quiet(), "Quiet"),
    (RuntimeError(""), "RuntimeError"),
    (ValueError("   \n\t "), "ValueError"),
])
def test_first_line_of_empty_text_is_the_type_name(exc, expected):
    assert first_line(exc) == expected


def test_describe():
    assert describe(ValueError("bad value\nDETAIL: more")) == "ValueError: bad value"
    assert describe(Quiet()) == "Quiet: Quiet"
    assert describe(KeyError("k")) == "KeyError: 'k'"


# -- retry_can_fix -----------------------------------------------------------------------


class Refused(Exception):
    retryable = False


class Marked(Exception):
    retryable = True


PERMANENT = [
    'connection to server at "127.0.0.1", port 5432 failed: FATAL:  password authentication failed for user "app"',
    'connection to server at "127.0.0.1", port 5432 failed: FATAL:  database "shop" does not exist',
    'FATAL:  no pg_hba.conf entry for host "10.0.0.7", user "app", database "shop", no encryption',
    "FATAL:  permission denied for database shop",
    "pgnotify_sync is not installed in this database",
]

TRANSIENT = [
    'connection to server at "127.0.0.1", port 5432 failed: Connection refused\n\tIs the server running?',
    "server closed the connection unexpectedly",
    "could not translate host name \"db\" to address: Temporary failure in name resolution",
    "timeout expired",
    "",
]


@pytest.mark.parametrize("first_session", [True, False])
@pytest.mark.parametrize("text", ["Host key verification failed", "", TRANSIENT[0]])
def test_retryable_false_is_never_retryable(text, first_session):
    assert retry_can_fix(Refused(text), first_session=first_session) is False


def test_retryable_false_is_read_from_the_instance():
    exc = OSError("ssh: permission to key refused")
    exc.retryable = False
    assert retry_can_fix(exc, first_session=False) is False
    assert retry_can_fix(OSError("ssh: connection reset"), first_session=False) is True


@pytest.mark.parametrize("text", PERMANENT)
def test_permanent_answers_not_retryable_before_the_first_session(text):
    assert retry_can_fix(OSError(text), first_session=True) is False
    assert retry_can_fix(OSError(text)) is False                # the default: before a session
    assert retry_can_fix(Marked(text), first_session=True) is False


@pytest.mark.parametrize("text", PERMANENT)
def test_permanent_answers_retryable_after_a_session(text):
    assert retry_can_fix(OSError(text), first_session=False) is True


@pytest.mark.parametrize("first_session", [True, False])
@pytest.mark.parametrize("text", TRANSIENT)
def test_network_errors_are_retryable(text, first_session):
    assert retry_can_fix(ConnectionRefusedError(text), first_session=first_session) is True
    assert retry_can_fix(Marked(text), first_session=first_session) is True
