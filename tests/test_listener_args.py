"""The Listener's own arguments are checked like Config's fields: a ConfigError
naming the argument and what is wrong with the value (no database)."""

import pytest
from prometheus_client import CollectorRegistry

from pgnotify_sync import Config, ConfigError, Listener

CFG = Config(postgres_user="u", postgres_db="d", channels=("a",))


@pytest.mark.parametrize("kwargs, message", [
    ({"name": ""}, r"^name: expected a non-empty string, got ''"),
    ({"name": "   "}, r"^name: expected a non-empty string"),
    ({"name": 7}, r"^name: expected a non-empty string, got 7"),
    ({"name": "x" * 64}, r"^name: at most 63 printable characters"),
    ({"name": "a\nb"}, r"^name: at most 63 printable characters"),
    ({"consumer": ""}, r"^consumer: expected a non-empty name"),
    ({"consumer": " "}, r"^consumer: expected a non-empty name"),
    ({"consumer": 3}, r"^consumer: expected a non-empty name, got 3"),
    ({"checkpoint_every": -1}, r"^checkpoint_every: expected a whole number >= 0, got -1"),
    ({"checkpoint_every": True}, r"^checkpoint_every: expected a whole number >= 0, got True"),
    ({"checkpoint_every": 1.5}, r"^checkpoint_every: expected a whole number >= 0, got 1.5"),
    ({"registry": "global"}, r"^registry: expected a prometheus_client CollectorRegistry, None or False, got str"),
    ({"registry": True}, r"^registry: expected a prometheus_client CollectorRegistry"),
])
def test_bad_arguments_name_the_argument_and_the_problem(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        Listener(CFG, **kwargs)


def test_config_must_be_a_config():
    with pytest.raises(ConfigError, match=r"^config: expected a pgnotify_sync.Config, got dict"):
        Listener({"postgres_user": "u"})


@pytest.mark.parametrize("kwargs", [
    {}, {"name": "orders-worker"}, {"consumer": "indexer"}, {"checkpoint_every": 0},
    {"registry": False}, {"registry": None}, {"registry": CollectorRegistry()},
])
def test_good_arguments_are_taken(kwargs):
    listener = Listener(CFG, **kwargs)
    assert listener.closed is False
    for key, value in kwargs.items():
        if key in ("name", "consumer", "checkpoint_every"):
            assert getattr(listener, key) == value
