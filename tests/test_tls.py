"""TLS for direct connections (issue 13): a real TLS-enabled server whose CA the
test makes with openssl.

``postgres_sslmode``/``postgres_sslrootcert``/... (env ``POSTGRES_SSLMODE``, ...)
go to every connection, the listener's and the pool's: with ``verify-full`` and
the right CA the listener works and every one of its backends uses TLS; with
another CA start() fails at once with a ConnectError naming the certificate (not
retried: waiting does not change a certificate); bad files are refused when the
Config is made, each error naming the setting.
"""

import contextlib
import os
import shutil
import subprocess

import pytest

from pgnotify_sync import Config, ConfigError, ConnectError, Listener, install, watch_table
from pgnotify_sync.testing import TemporaryCluster
from pgnotify_sync.testing import _postgres_user

from helpers import wait_for
from pgutil import Collector, execute

pytestmark = pytest.mark.integration


def openssl(*args, cwd):
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def make_ca(path, name):
    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", f"/CN={name}",
            "-keyout", f"{name}.key", "-out", f"{name}.crt", cwd=path)
    return os.path.join(path, f"{name}.crt")


@pytest.fixture(scope="module")
def tls(tmp_path_factory):
    """(cluster, ca, other_ca, certs dir): a server with ssl=on whose certificate
    (for DNS:localhost only) the CA signed."""
    if shutil.which("openssl") is None:
        pytest.fail("openssl not found: the TLS tests make their certificates with it (apt-get install openssl)",
                    pytrace=False)
    path = str(tmp_path_factory.mktemp("tls"))
    ca = make_ca(path, "ca")
    other = make_ca(path, "other")
    with open(os.path.join(path, "san.cnf"), "w") as f:
        f.write("subjectAltName=DNS:localhost\n")
    openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=localhost", "-keyout", "server.key",
            "-out", "server.csr", cwd=path)
    openssl("x509", "-req", "-in", "server.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
            "-days", "2", "-extfile", "san.cnf", "-out", "server.crt", cwd=path)
    server_dir = os.path.join(path, "server")
    os.mkdir(server_dir)
    for name in ("server.crt", "server.key"):
        with open(os.path.join(path, name)) as f:
            _postgres_user.write_secret(os.path.join(server_dir, name), f.read())
    _postgres_user.hand_over([server_dir])
    cluster = TemporaryCluster(settings={"ssl": "on", "ssl_cert_file": os.path.join(server_dir, "server.crt"),
                                         "ssl_key_file": os.path.join(server_dir, "server.key")})
    with cluster:
        cluster.start()
        cluster.create_database("tls")
        with contextlib.closing(cluster.connect("tls", autocommit=True)) as conn:
            install(conn)
            execute(conn, "CREATE TABLE notes (id serial PRIMARY KEY, body text)")
            watch_table(conn, "public.notes", channel="notes")
        yield cluster, ca, other, path


def tls_config(cluster, **overrides):
    info = cluster.conninfo("tls")
    values = dict(postgres_host="localhost", postgres_port=info["port"], postgres_user=info["user"],
                  postgres_password=info["password"], postgres_db="tls", channels=("notes",),
                  connect_timeout_s=5.0, reconnect_delay_ms=50)
    values.update(overrides)
    return Config(**values)


def test_verify_full_works_and_every_connection_uses_tls(tls):
    cluster, ca, _other, _path = tls
    listener = Listener(tls_config(cluster, postgres_sslmode="verify-full", postgres_sslrootcert=ca,
                                   application_name="tls-listener"), registry=False)
    got = Collector()
    listener.on_event("notes", got)
    listener.start(timeout_s=15)
    try:
        with contextlib.closing(cluster.connect("tls", autocommit=True)) as conn:
            execute(conn, "INSERT INTO notes (body) VALUES ('over tls')")
            (event,) = got.wait(1)          # read back from the log on the pool
            assert event.data["body"] == "over tls"
            rows = wait_for(lambda: execute(conn, "SELECT s.ssl FROM pg_stat_activity a JOIN pg_stat_ssl s "
                                                  "USING (pid) WHERE a.application_name = 'tls-listener'"),
                            message="no listener backend")
            assert len(rows) >= 2 and all(ssl for (ssl,) in rows)     # the listener's and the pool's
    finally:
        listener.stop()


def test_a_certificate_from_another_ca_is_refused_at_once_naming_it(tls):
    cluster, _ca, other, _path = tls
    listener = Listener(tls_config(cluster, postgres_sslmode="verify-full", postgres_sslrootcert=other),
                        registry=False)
    with pytest.raises(ConnectError, match=f"cannot connect to .*TLS verify-full, CA {other}.*certificate verify "
                                           "failed"):
        listener.start(timeout_s=15)
    assert listener.stats["reconnect_attempts"] == 0     # not retried: a certificate does not change by waiting
    listener.stop()


def test_a_host_name_the_certificate_does_not_name_is_refused_at_once(tls):
    cluster, ca, _other, _path = tls
    listener = Listener(tls_config(cluster, postgres_host="127.0.0.1", postgres_sslmode="verify-full",
                                   postgres_sslrootcert=ca), registry=False)
    with pytest.raises(ConnectError, match='TLS verify-full.*does not match host name "127.0.0.1"'):
        listener.start(timeout_s=15)
    assert listener.stats["reconnect_attempts"] == 0
    listener.stop()


def test_bad_tls_settings_are_refused_naming_the_variable(tls, tmp_path):
    cluster, ca, _other, path = tls
    with pytest.raises(ConfigError,
                       match="^POSTGRES_SSLMODE \\(postgres_sslmode\\): expected one of disable, .*got 'verify'"):
        Config.from_env({"POSTGRES_USER": "u", "POSTGRES_DB": "d", "POSTGRES_SSLMODE": "verify"})
    with pytest.raises(ConfigError, match="^POSTGRES_SSLROOTCERT \\(postgres_sslrootcert\\): cannot read "
                                          "'/nonexistent/ca.crt': No such file"):
        Config.from_env({"POSTGRES_USER": "u", "POSTGRES_DB": "d", "POSTGRES_SSLROOTCERT": "/nonexistent/ca.crt"})
    not_pem = tmp_path / "ca.txt"
    not_pem.write_text("hello")
    with pytest.raises(ConfigError, match="^postgres_sslrootcert: .* is not a PEM certificate"):
        tls_config(cluster, postgres_sslrootcert=str(not_pem))
    key = tmp_path / "client.key"
    shutil.copy(os.path.join(path, "ca.key"), key)
    os.chmod(key, 0o644)
    with pytest.raises(ConfigError, match="^postgres_sslkey: .* has group or world access \\(mode 0644\\)"):
        tls_config(cluster, postgres_sslkey=str(key))
    with pytest.raises(ConfigError, match="^postgres_sslkey: .* is not a PEM private key"):
        tls_config(cluster, postgres_sslkey=ca)
    os.chmod(key, 0o600)
    assert tls_config(cluster, postgres_sslcert=ca, postgres_sslkey=str(key)).connect_kwargs()["sslkey"] == str(key)
