"""Unit tests for pgnotify_sync.config (no database)."""

import atexit
import os
import shutil
import tempfile

import attrs
import pytest

from pgnotify_sync import config as config_module
from pgnotify_sync.config import MAX_CHANNEL_BYTES, Config
from pgnotify_sync.errors import ConfigError, PgNotifyError

PASSWORD = "pw-Zq8#never-log-me"

BASE_ENV = {
    "POSTGRES_USER": "app",
    "POSTGRES_DB": "appdb",
    "POSTGRES_PASSWORD": PASSWORD,
}


def env(**extra):
    values = dict(BASE_ENV)
    values.update(extra)
    return values


def make(**kwargs):
    values = {"postgres_user": "app", "postgres_db": "appdb", "postgres_password": PASSWORD}
    values.update(kwargs)
    return Config(**values)


def config_error(callable_, *args, **kwargs):
    """Run *callable_*, expect ConfigError, check the password is not in it, return its text."""
    with pytest.raises(ConfigError) as info:
        callable_(*args, **kwargs)
    text = str(info.value)
    assert PASSWORD not in text
    assert PASSWORD not in repr(info.value)
    return text


# -- construction ------------------------------------------------------------------


def test_defaults():
    cfg = Config(postgres_user="u", postgres_db="d")
    assert cfg.postgres_host == "127.0.0.1"
    assert cfg.postgres_port == 5432
    assert cfg.postgres_password == ""
    assert cfg.channels == ()
    assert cfg.channel_prefix == ""
    assert cfg.max_reconnect_attempts == 0
    assert cfg.reconnect_delay_ms == 500
    assert cfg.reconnect_delay_max_ms == 30_000
    assert cfg.use_ssh is False
    assert cfg.enable_db_events is True
    assert cfg.enable_event_buffering is False


def test_errors_are_value_errors_and_library_errors():
    assert issubclass(ConfigError, ValueError)
    assert issubclass(ConfigError, PgNotifyError)


def test_channels_accepts_list_and_comma_string():
    assert make(channels=["a", "b"]).channels == ("a", "b")
    assert make(channels=" a , b ").channels == ("a", "b")
    assert make(channels=None).channels == ()


@pytest.mark.parametrize("kwargs, field, problem", [
    ({"postgres_port": 0}, "postgres_port", "between 1 and 65535"),
    ({"postgres_port": 65536}, "postgres_port", "between 1 and 65535"),
    ({"postgres_port": "5432"}, "postgres_port", "whole number"),
    ({"postgres_port": True}, "postgres_port", "whole number"),
    ({"postgres_port": 5432.0}, "postgres_port", "whole number"),
    ({"ssh_port": 0}, "ssh_port", "between 1 and 65535"),
    ({"max_reconnect_attempts": -1}, "max_reconnect_attempts", ">= 0"),
    ({"reconnect_delay_ms": 0}, "reconnect_delay_ms", ">= 1"),
    ({"reconnect_delay_ms": 1000, "reconnect_delay_max_ms": 999}, "reconnect_delay_max_ms",
     "must be >= reconnect_delay_ms (1000)"),
    ({"connect_timeout_s": 0}, "connect_timeout_s", "> 0"),
    ({"connect_timeout_s": -1.5}, "connect_timeout_s", "> 0"),
    ({"connect_timeout_s": "5"}, "connect_timeout_s", "expected a number"),
    ({"health_check_interval_s": 0.0}, "health_check_interval_s", "> 0"),
    ({"health_check_timeout_s": False}, "health_check_timeout_s", "expected a number"),
    ({"worker_pool_size": 0}, "worker_pool_size", "between 1 and 1024"),
    ({"worker_pool_size": 1025}, "worker_pool_size", "between 1 and 1024"),
    ({"event_buffer_size": 0}, "event_buffer_size", ">= 1"),
    ({"publish_buffer_size": -3}, "publish_buffer_size", ">= 1"),
    ({"pool_max_connections": 11}, "pool_max_connections", "between 1 and 10"),
    ({"postgres_user": ""}, "postgres_user", "required"),
    ({"postgres_db": None}, "postgres_db", "required"),
    ({"postgres_host": ""}, "postgres_host", "required"),
    ({"channels": ["a", ""]}, "channels", "non-empty string"),
    ({"channels": "a,,b"}, "channels", "non-empty string"),
    ({"channels": ["a", 5]}, "channels", "non-empty string"),
    ({"channels": ["a", "b", "a"]}, "channels", "duplicate"),
    ({"channel_prefix": 7}, "channel_prefix", "expected a string"),
    ({"ssh_host": "bastion", "ssh_key_path": "/k"}, "ssh_user", "required when ssh_host is set"),
    ({"ssh_host": "bastion", "ssh_user": "u"}, "ssh_key_path", "required when ssh_host is set"),
])
def test_validation_error_names_field_and_problem(kwargs, field, problem):
    text = config_error(make, **kwargs)
    assert text.startswith(f"{field}:"), text
    assert problem in text, text


def test_value_bounds_are_inclusive():
    cfg = make(postgres_port=65535, ssh_port=1, max_reconnect_attempts=0, worker_pool_size=1024,
               pool_max_connections=10, reconnect_delay_ms=1000, reconnect_delay_max_ms=1000)
    assert cfg.postgres_port == 65535
    assert cfg.reconnect_delay_max_ms == cfg.reconnect_delay_ms == 1000


def test_ssh_complete_is_accepted():
    cfg = make(ssh_host="bastion", ssh_user="tunnel", ssh_key_path="/keys/id_ed25519", ssh_port=2222)
    assert cfg.use_ssh is True


def test_missing_required_argument_is_a_type_error_for_direct_construction():
    # Direct construction follows Python's calling convention for required arguments.
    with pytest.raises(TypeError, match="missing 1 required keyword-only argument: 'postgres_user'"):
        Config(postgres_db="d")


# -- channels and the prefix -------------------------------------------------------------


def test_wire_and_logical_channel_without_prefix():
    cfg = make(channels=("orders",))
    assert cfg.wire_channel("orders") == "orders"
    assert cfg.logical_channel("orders") == "orders"
    assert cfg.logical_channel("anything") == "anything"


def test_wire_and_logical_channel_with_prefix():
    cfg = make(channels=("orders",), channel_prefix="shop")
    assert cfg.wire_channel("orders") == "shop.orders"
    assert cfg.logical_channel("shop.orders") == "orders"
    assert cfg.logical_channel(cfg.wire_channel("a.b")) == "a.b"
    # Not ours: a different prefix, no prefix at all, or a prefix without the separator.
    assert cfg.logical_channel("other.orders") is None
    assert cfg.logical_channel("orders") is None
    assert cfg.logical_channel("shoporders") is None
    assert cfg.logical_channel("shopping.orders") is None


def test_channel_length_limit_counts_prefix_and_bytes():
    prefix = "app"
    longest = "c" * (MAX_CHANNEL_BYTES - len(prefix) - 1)
    cfg = make(channel_prefix=prefix, channels=(longest,))
    assert len(cfg.wire_channel(longest).encode()) == MAX_CHANNEL_BYTES

    too_long = longest + "c"
    text = config_error(make, channel_prefix=prefix, channels=(too_long,))
    assert text.startswith("channels:")
    assert "63-byte" in text
    assert "prefix included" in text
    # Without the prefix the same name fits.
    assert make(channels=(too_long,)).channels == (too_long,)


def test_channel_length_limit_counts_utf8_bytes():
    name = "é" * 32            # 32 characters, 64 bytes
    text = config_error(make, channels=(name,))
    assert "63-byte" in text
    assert make(channels=("é" * 31,)).channels == ("é" * 31,)


# -- password safety ---------------------------------------------------------------------


def test_password_not_in_repr_or_describe_target():
    cfg = make(ssh_host="bastion", ssh_user="tunnel", ssh_key_path="/k")
    assert PASSWORD not in repr(cfg)
    assert PASSWORD not in str(cfg)
    target = cfg.describe_target()
    assert PASSWORD not in target
    assert target == "app@127.0.0.1:5432/appdb via ssh tunnel@bastion:22"
    assert make().describe_target() == "app@127.0.0.1:5432/appdb"


def test_password_in_connect_kwargs_only():
    kwargs = make(postgres_host="db", postgres_port=6000, connect_timeout_s=2.4).connect_kwargs()
    assert kwargs["password"] == PASSWORD
    assert kwargs["host"] == "db" and kwargs["port"] == 6000
    assert kwargs["user"] == "app" and kwargs["dbname"] == "appdb"
    assert kwargs["connect_timeout"] == 2
    override = make().connect_kwargs(host="127.0.0.2", port=7000)
    assert override["host"] == "127.0.0.2" and override["port"] == 7000


# -- frozen --------------------------------------------------------------------------------


def test_frozen():
    cfg = make()
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        cfg.postgres_port = 1
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        cfg.postgres_password = "x"
    assert cfg.postgres_port == 5432


def test_evolve_validates():
    cfg = make()
    assert attrs.evolve(cfg, postgres_port=6000).postgres_port == 6000
    with pytest.raises(ConfigError, match=r"^postgres_port: must be between 1 and 65535, got 70000$"):
        attrs.evolve(cfg, postgres_port=70000)


# -- from_env ------------------------------------------------------------------------------

# One non-default raw value per environment variable, and what it must parse to.
def _pem_files():
    """A CA, a client certificate and its key as the TLS settings check them (PEM
    headers; the key mode 0600): the content itself is libpq's business."""
    folder = tempfile.mkdtemp(prefix="pgnotify-config-tls-")
    atexit.register(shutil.rmtree, folder, True)
    paths = {}
    for name, head in (("ca.crt", "CERTIFICATE"), ("client.crt", "CERTIFICATE"), ("client.key", "PRIVATE KEY")):
        paths[name] = os.path.join(folder, name)
        with open(paths[name], "w") as f:
            f.write(f"-----BEGIN {head}-----\nMIIB\n-----END {head}-----\n")
        os.chmod(paths[name], 0o600)
    return paths


_TLS = _pem_files()

FULL_ENV = {
    "POSTGRES_HOST": ("db.example.internal", "postgres_host", "db.example.internal"),
    "POSTGRES_SSLMODE": ("verify-full", "postgres_sslmode", "verify-full"),
    "POSTGRES_SSLROOTCERT": (_TLS["ca.crt"], "postgres_sslrootcert", _TLS["ca.crt"]),
    "POSTGRES_SSLCERT": (_TLS["client.crt"], "postgres_sslcert", _TLS["client.crt"]),
    "POSTGRES_SSLKEY": (_TLS["client.key"], "postgres_sslkey", _TLS["client.key"]),
    "POSTGRES_PORT": (" 6543 ", "postgres_port", 6543),
    "POSTGRES_USER": ("svc", "postgres_user", "svc"),
    "POSTGRES_PASSWORD": (PASSWORD, "postgres_password", PASSWORD),
    "POSTGRES_DB": ("svcdb", "postgres_db", "svcdb"),
    "PG_NOTIFY_CHANNELS": ("orders, users ,audit", "channels", ("orders", "users", "audit")),
    "PG_NOTIFY_CHANNEL": ("myapp", "channel_prefix", "myapp"),
    "SSH_HOST": ("bastion.example", "ssh_host", "bastion.example"),
    "SSH_PORT": ("2222", "ssh_port", 2222),
    "SSH_USER": ("tunnel", "ssh_user", "tunnel"),
    "SSH_KEY_PATH": ("/keys/id_ed25519", "ssh_key_path", "/keys/id_ed25519"),
    "SSH_KNOWN_HOSTS": ("/keys/known_hosts", "ssh_known_hosts", "/keys/known_hosts"),
    "SSH_KEY_PASSPHRASE": ("key-Passphrase-771", "ssh_key_passphrase", "key-Passphrase-771"),
    "SSH_INSECURE_SKIP_HOST_KEY_CHECK": ("on", "ssh_insecure_skip_host_key_check", True),
    "MAX_RECONNECT_ATTEMPTS": ("7", "max_reconnect_attempts", 7),
    "RECONNECT_DELAY": ("250", "reconnect_delay_ms", 250),
    "RECONNECT_DELAY_MAX": ("8000", "reconnect_delay_max_ms", 8000),
    "PG_NOTIFY_CONNECT_TIMEOUT": ("2.5", "connect_timeout_s", 2.5),
    "PG_NOTIFY_HEALTH_CHECK_INTERVAL": ("3", "health_check_interval_s", 3.0),
    "PG_NOTIFY_HEALTH_CHECK_TIMEOUT": ("1.5", "health_check_timeout_s", 1.5),
    "PG_NOTIFY_QUERY_TIMEOUT": ("12.5", "query_timeout_s", 12.5),
    "ENABLE_DB_EVENTS": ("false", "enable_db_events", False),
    "ENABLE_EVENT_BUFFERING": ("YES", "enable_event_buffering", True),
    "PG_NOTIFY_ACCEPT_PLAIN": ("true", "accept_plain_payloads", True),
    "PG_NOTIFY_WORKERS": ("8", "worker_pool_size", 8),
    "PG_NOTIFY_BUFFER_SIZE": ("500", "event_buffer_size", 500),
    "PG_NOTIFY_PUBLISH_BUFFER_SIZE": ("50", "publish_buffer_size", 50),
    "PG_POOL_MAX": ("3", "pool_max_connections", 3),
    "PG_NOTIFY_RETENTION": ("3600", "retention_s", 3600.0),
    "PG_NOTIFY_CONSUMER_RETENTION": ("7200.5", "consumer_retention_s", 7200.5),
    "PG_NOTIFY_CLEANUP_INTERVAL": ("0", "cleanup_interval_s", 0.0),
    "PG_NOTIFY_POLL_INTERVAL": ("0.25", "poll_interval_s", 0.25),
    "PG_NOTIFY_CONSUMER_PARTITIONS": ("8", "consumer_partitions", 8),
    "PG_NOTIFY_CONSUMER_LEASE": ("4.5", "consumer_lease_s", 4.5),
    "PG_NOTIFY_ORDERING": ("row", "ordering", "row"),
    "PG_NOTIFY_HANDLER_MAX_ATTEMPTS": ("3", "handler_max_attempts", 3),
    "PG_NOTIFY_HANDLER_RETRY_DELAY": ("50", "handler_retry_delay_ms", 50),
    "PG_NOTIFY_HANDLER_RETRY_DELAY_MAX": ("5000", "handler_retry_delay_max_ms", 5000),
    "PG_NOTIFY_HANDLER_BREAKER_FAILURES": ("0", "handler_breaker_failures", 0),
    "PG_NOTIFY_HANDLER_BREAKER_RESET": ("2500", "handler_breaker_reset_ms", 2500),
    "PG_NOTIFY_BACKFILL_CHUNK": ("250", "backfill_chunk_rows", 250),
}


def test_full_env_table_covers_every_variable():
    declared = [var for var, _, _ in config_module._ENV_VARS]
    missing = [var for var in declared if var not in FULL_ENV]
    assert not missing, f"config._ENV_VARS has variables this test does not parse yet: {missing}"
    assert set(FULL_ENV) == set(declared)
    assert set(FULL_ENV) == set(config_module.ENV_VARIABLES)
    for var, field, _ in config_module._ENV_VARS:
        assert FULL_ENV[var][1] == field, var


def test_from_env_parses_every_variable():
    cfg = Config.from_env(environ={var: raw for var, (raw, _, _) in FULL_ENV.items()})
    for var, (raw, field, expected) in FULL_ENV.items():
        value = getattr(cfg, field)
        assert value == expected, (var, raw, value)
        assert type(value) is type(expected), (var, value)


def test_from_env_minimal_uses_defaults():
    cfg = Config.from_env(environ={"POSTGRES_USER": "u", "POSTGRES_DB": "d"})
    assert cfg == Config(postgres_user="u", postgres_db="d")


def test_from_env_reads_os_environ_by_default(monkeypatch):
    for var in config_module.ENV_VARIABLES:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("POSTGRES_USER", "osuser")
    monkeypatch.setenv("POSTGRES_DB", "osdb")
    monkeypatch.setenv("POSTGRES_PORT", "5999")
    cfg = Config.from_env()
    assert (cfg.postgres_user, cfg.postgres_db, cfg.postgres_port) == ("osuser", "osdb", 5999)


def test_reconnect_delay_is_milliseconds():
    cfg = Config.from_env(environ=env(RECONNECT_DELAY="1500", RECONNECT_DELAY_MAX="60000"))
    assert cfg.reconnect_delay_ms == 1500
    assert cfg.reconnect_delay_max_ms == 60_000


@pytest.mark.parametrize("raw, expected", [
    ("1", True), ("true", True), ("True", True), (" on ", True), ("yes", True),
    ("0", False), ("false", False), ("OFF", False), ("no", False),
])
def test_from_env_booleans(raw, expected):
    cfg = Config.from_env(environ=env(ENABLE_DB_EVENTS=raw, ENABLE_EVENT_BUFFERING=raw))
    assert cfg.enable_db_events is expected
    assert cfg.enable_event_buffering is expected


def test_blank_non_string_variables_mean_default():
    cfg = Config.from_env(environ=env(POSTGRES_PORT="", ENABLE_DB_EVENTS="  ", PG_NOTIFY_WORKERS=" "))
    assert cfg.postgres_port == 5432
    assert cfg.enable_db_events is True
    assert cfg.worker_pool_size == 4


@pytest.mark.parametrize("var, raw, problem", [
    ("POSTGRES_PORT", "abc", "expected a whole number, got 'abc'"),
    ("POSTGRES_PORT", "54.32", "expected a whole number"),
    ("POSTGRES_PORT", "70000", "between 1 and 65535, got 70000"),
    ("POSTGRES_PORT", "0", "between 1 and 65535"),
    ("SSH_PORT", "99999", "between 1 and 65535"),
    ("MAX_RECONNECT_ATTEMPTS", "-1", "must be >= 0, got -1"),
    ("RECONNECT_DELAY", "0", ">= 1"),
    ("RECONNECT_DELAY", "fast", "expected a whole number"),
    ("RECONNECT_DELAY_MAX", "100", "must be >= reconnect_delay_ms (500)"),
    ("PG_NOTIFY_CONNECT_TIMEOUT", "soon", "expected a number"),
    ("PG_NOTIFY_CONNECT_TIMEOUT", "0", "> 0"),
    ("PG_NOTIFY_HEALTH_CHECK_INTERVAL", "-1", "> 0"),
    ("PG_NOTIFY_HEALTH_CHECK_TIMEOUT", "x", "expected a number"),
    ("ENABLE_DB_EVENTS", "maybe", "expected true or false, got 'maybe'"),
    ("ENABLE_EVENT_BUFFERING", "2", "expected true or false"),
    ("PG_NOTIFY_CHANNELS", "a,,b", "empty name"),
    ("PG_NOTIFY_CHANNELS", "a,", "empty name"),
    ("PG_NOTIFY_CHANNELS", "a,b,a", "duplicate"),
    ("PG_NOTIFY_CHANNELS", "x" * 64, "63-byte"),
    ("PG_NOTIFY_WORKERS", "0", "between 1 and 1024"),
    ("PG_NOTIFY_BUFFER_SIZE", "-5", ">= 1"),
    ("PG_NOTIFY_PUBLISH_BUFFER_SIZE", "many", "expected a whole number"),
    ("PG_POOL_MAX", "50", "between 1 and 10"),
    ("SSH_INSECURE_SKIP_HOST_KEY_CHECK", "sometimes", "expected true or false"),
    ("PG_NOTIFY_RETENTION", "0", "> 0"),
    ("PG_NOTIFY_CONSUMER_RETENTION", "60", "must be >= retention_s"),
    ("PG_NOTIFY_CLEANUP_INTERVAL", "-1", ">= 0"),
    ("POSTGRES_HOST", "", "required"),
    ("POSTGRES_USER", "", "required"),
])
def test_from_env_bad_value_names_variable(var, raw, problem):
    text = config_error(Config.from_env, environ=env(**{var: raw}))
    assert text.startswith(var), text
    assert problem in text, text


def test_from_env_error_also_names_field():
    text = config_error(Config.from_env, environ=env(POSTGRES_PORT="70000"))
    assert text == "POSTGRES_PORT (postgres_port): must be between 1 and 65535, got 70000"


def test_from_env_long_channel_with_prefix_refused():
    name = "c" * 60
    assert Config.from_env(environ=env(PG_NOTIFY_CHANNELS=name)).channels == (name,)
    text = config_error(Config.from_env, environ=env(PG_NOTIFY_CHANNELS=name, PG_NOTIFY_CHANNEL="prod"))
    assert text.startswith("PG_NOTIFY_CHANNELS")
    assert "prod." + name in text
    assert "63-byte" in text


@pytest.mark.parametrize("missing", ["POSTGRES_USER", "POSTGRES_DB"])
def test_from_env_missing_required_variable(missing):
    environ = env()
    del environ[missing]
    text = config_error(Config.from_env, environ=environ)
    assert text.startswith(missing), text
    assert "required" in text


def test_from_env_missing_both_names_one():
    text = config_error(Config.from_env, environ={"POSTGRES_PASSWORD": PASSWORD})
    assert text.startswith("POSTGRES_USER") or text.startswith("POSTGRES_DB")
    assert "required" in text


@pytest.mark.parametrize("extra, var", [
    ({"SSH_HOST": "bastion", "SSH_KEY_PATH": "/k"}, "SSH_USER"),
    ({"SSH_HOST": "bastion", "SSH_USER": "tunnel"}, "SSH_KEY_PATH"),
    ({"SSH_HOST": "bastion"}, "SSH_USER"),
])
def test_from_env_ssh_host_needs_user_and_key(extra, var):
    text = config_error(Config.from_env, environ=env(**extra))
    assert text.startswith(var), text
    assert "required when ssh_host is set" in text


def test_from_env_ssh_complete():
    cfg = Config.from_env(environ=env(SSH_HOST="bastion", SSH_USER="tunnel", SSH_KEY_PATH="/k"))
    assert cfg.use_ssh
    assert PASSWORD not in cfg.describe_target()
    assert "tunnel@bastion:22" in cfg.describe_target()


def test_from_env_prefix_applies_to_wire_channels():
    cfg = Config.from_env(environ=env(PG_NOTIFY_CHANNELS="orders,users", PG_NOTIFY_CHANNEL="shop"))
    assert [cfg.wire_channel(c) for c in cfg.channels] == ["shop.orders", "shop.users"]
    assert cfg.logical_channel("shop.users") == "users"
    assert cfg.logical_channel("users") is None


def test_overrides_win_over_environ():
    cfg = Config.from_env(environ=env(POSTGRES_PORT="6000", PG_NOTIFY_CHANNELS="a,b", ENABLE_DB_EVENTS="true"),
                          postgres_port=7000, channels=("z",), enable_db_events=False,
                          postgres_user="override")
    assert cfg.postgres_port == 7000
    assert cfg.channels == ("z",)
    assert cfg.enable_db_events is False
    assert cfg.postgres_user == "override"


def test_override_can_supply_required_field():
    cfg = Config.from_env(environ={"POSTGRES_DB": "d"}, postgres_user="from-code")
    assert cfg.postgres_user == "from-code"


def test_invalid_override_names_field():
    text = config_error(Config.from_env, environ=env(), worker_pool_size=0)
    assert text.startswith("PG_NOTIFY_WORKERS (worker_pool_size):"), text


def test_password_never_in_any_from_env_error():
    bad = [
        {"POSTGRES_PORT": "abc"}, {"POSTGRES_PORT": "70000"}, {"MAX_RECONNECT_ATTEMPTS": "-1"},
        {"ENABLE_DB_EVENTS": "maybe"}, {"PG_NOTIFY_CHANNELS": "a,,b"}, {"SSH_HOST": "h"},
        {"RECONNECT_DELAY_MAX": "1"}, {"POSTGRES_HOST": ""}, {"PG_NOTIFY_CONNECT_TIMEOUT": "x"},
    ]
    for extra in bad:
        config_error(Config.from_env, environ=env(**extra))
    for missing in ("POSTGRES_USER", "POSTGRES_DB"):
        environ = env()
        del environ[missing]
        config_error(Config.from_env, environ=environ)


def test_ssh_secrets_not_in_repr_describe_target_or_errors():
    passphrase = "key-Passphrase-771"
    environ = env(SSH_HOST="bastion", SSH_USER="tunnel", SSH_KEY_PATH="/k", SSH_KEY_PASSPHRASE=passphrase)
    cfg = Config.from_env(environ=environ)
    assert cfg.ssh_key_passphrase == passphrase
    for text in (repr(cfg), cfg.describe_target()):
        assert passphrase not in text and PASSWORD not in text
    text = config_error(Config.from_env, environ=dict(environ, SSH_PORT="0"))
    assert passphrase not in text


def test_ssh_password_refused_without_echoing_it():
    ssh_password = "ssh-Pw-5521"
    text = config_error(Config.from_env, environ=env(SSH_PASSWORD=ssh_password, SSH_HOST="bastion",
                                                     SSH_USER="tunnel", SSH_KEY_PATH="/k"))
    assert text.startswith("SSH_PASSWORD")
    assert "not supported" in text
    assert ssh_password not in text


def test_password_with_odd_characters_is_taken_verbatim():
    raw = "  p:a,s=s ;' "
    cfg = Config.from_env(environ=env(POSTGRES_PASSWORD=raw))
    assert cfg.postgres_password == raw
    assert raw not in repr(cfg)


@pytest.mark.parametrize("var", ["PG_NOTIFY_CONNECT_TIMEOUT", "PG_NOTIFY_HEALTH_CHECK_INTERVAL",
                                 "PG_NOTIFY_HEALTH_CHECK_TIMEOUT"])
def test_from_env_nan_float_refused(var):
    text = config_error(Config.from_env, environ=env(**{var: "nan"}))
    assert text.startswith(var)


def test_non_iterable_channels_is_config_error():
    text = config_error(make, channels=5)
    assert text.startswith("channels:")


@pytest.mark.parametrize("field", ["ssh_insecure_skip_host_key_check", "enable_db_events", "enable_event_buffering",
                                   "accept_plain_payloads"])
@pytest.mark.parametrize("value", ["no", 0, 1, None])
def test_switches_take_only_true_or_false(field, value):
    # "no" is truthy: taken as is it would switch the opposite way from what was meant.
    with pytest.raises(ConfigError, match=rf"^{field}: expected True or False, got "):
        Config(postgres_user="u", postgres_db="d", **{field: value})
