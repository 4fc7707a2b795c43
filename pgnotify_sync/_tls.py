"""TLS settings of direct connections (``Config.postgres_sslmode`` and the files),
checked before the first connect: a bad file gets an error naming the setting and
what is wrong with the file, not libpq's first complaint at connect time."""

import os
import stat

from .errors import ConfigError

SSL_MODES = ("disable", "allow", "prefer", "require", "verify-ca", "verify-full")

def check_mode(value):
    if value is not None and value not in SSL_MODES:
        raise ConfigError(f"postgres_sslmode: expected one of {', '.join(SSL_MODES)}, got {value!r}")


def check_file(field, path, kind):
    """*kind*: ``"certificate"`` (a PEM certificate) or ``"key"`` (a PEM private key,
    unencrypted, readable by us only: libpq refuses group or world access)."""
    if path is None:
        return
    if not isinstance(path, str) or not path:
        raise ConfigError(f"{field}: expected a file path, got {path!r}")
    try:
        with open(path, "rb") as f:
            head = f.read(65536)
        info = os.stat(path)
    except OSError as exc:
        raise ConfigError(f"{field}: cannot read {path!r}: {exc.strerror}") from None
    text = head.decode("ascii", "replace")
    if kind == "certificate":
        if "-----BEGIN CERTIFICATE-----" not in text:
            raise ConfigError(f"{field}: {path!r} is not a PEM certificate (no '-----BEGIN CERTIFICATE-----' line)")
        return
    if "PRIVATE KEY-----" not in text:
        raise ConfigError(f"{field}: {path!r} is not a PEM private key (no '-----BEGIN ... PRIVATE KEY-----' line)")
    if "ENCRYPTED" in text:
        raise ConfigError(f"{field}: {path!r} is encrypted: a listener cannot type its passphrase; "
                          "use an unencrypted key readable only by this user")
    if info.st_mode & (stat.S_IRWXG | stat.S_IRWXO) and info.st_uid == os.getuid():
        raise ConfigError(f"{field}: {path!r} has group or world access (mode {stat.S_IMODE(info.st_mode):04o}); "
                          "libpq refuses such a key: chmod 600 it")


def connect_kwargs(config, tunnelled_host):
    """The TLS part of psycopg2.connect()'s arguments. Through a tunnel the socket
    goes to the tunnel's local end (``hostaddr``) while the certificate is checked
    against the database host's own name (``host``)."""
    kwargs = {name: value for name, value in (
        ("sslmode", config.postgres_sslmode), ("sslrootcert", config.postgres_sslrootcert),
        ("sslcert", config.postgres_sslcert), ("sslkey", config.postgres_sslkey)) if value is not None}
    if kwargs and tunnelled_host is not None:
        kwargs.update(host=config.postgres_host, hostaddr=tunnelled_host)
    return kwargs


def describe(config):
    """'TLS verify-full, CA /path' for messages; '' without TLS settings."""
    if config.postgres_sslmode is None:
        return ""
    ca = f", CA {config.postgres_sslrootcert}" if config.postgres_sslrootcert else ""
    return f" (TLS {config.postgres_sslmode}{ca})"
