"""SSH tunnels against a real OpenSSH server: faults, recovery, refusals."""

import logging
import os
import shutil
import threading

import pytest

from pgnotify_sync import Config, ConfigError, ConnectError, ConnectionState, Listener
from pgnotify_sync._tunnel import HostKeyError, SshAuthError

from helpers import wait_for
from pgutil import Collector, Workload, assert_exactly_once_in_row_order, config_for, counter


def ssh_config(dsn, server, **overrides):
    values = dict(ssh_host=server.host, ssh_port=server.port, ssh_user=server.user,
                  ssh_key_path=server.client_key_path, ssh_known_hosts=server.known_hosts_path,
                  health_check_interval_s=1.0, health_check_timeout_s=1.0)
    values.update(overrides)
    return config_for(dsn, **values)


@pytest.fixture
def make_ssh_listener(dsn, ssh_server):
    made = []

    def make(channels=("stream",), **overrides):
        listener = Listener(ssh_config(dsn, ssh_server, channels=channels, **overrides), registry=False,
                            name=f"ssh-{len(made)}")
        made.append(listener)
        return listener

    yield make
    for listener in made:
        listener.stop()


def session_of(server, tunnel):
    port = tunnel.transport.sock.getsockname()[1]
    return server.session_for_client_port(port)


def test_events_flow_through_two_separate_tunnels(stream_db, make_ssh_listener, ssh_server):
    listener = make_ssh_listener()
    got = Collector()
    listener.on_event("stream", got)
    listener.start()
    listener.publish("stream", {"via": "pool tunnel"})
    with stream_db.cursor() as cur:
        cur.execute("INSERT INTO stream (note) VALUES ('through ssh')")
    events = got.wait(2, settle=listener)
    assert {e.operation for e in events} == {"PUBLISH", "INSERT"}
    mine = session_of(ssh_server, listener._connections.listener_tunnel)
    pools = session_of(ssh_server, listener._connections.pool_tunnel)
    assert mine and pools and mine != pools, "the listener must have its own SSH session"


def test_listener_session_killed_tunnel_rebuilt_nothing_lost(stream_db, make_ssh_listener, ssh_server, dsn,
                                                            pg_cluster, dbname):
    listener = make_ssh_listener()
    got = Collector()
    listener.on_event("stream", got)
    listener.start()
    listener.publish("stream", {"opens": "the pool tunnel"})
    old_port = listener._connections.listener_tunnel.local_address()[1]
    pool_session = session_of(ssh_server, listener._connections.pool_tunnel)
    with Workload(dsn) as work:
        work.wait_commits(20)
        ssh_server.kill_session(session_of(ssh_server, listener._connections.listener_tunnel))
        wait_for(lambda: listener.stats["reconnects"] >= 1 and listener.state is ConnectionState.LISTENING,
                 timeout=20)
        work.wait_commits(20)
    assert_exactly_once_in_row_order(got, pg_cluster, dbname)
    assert listener._connections.listener_tunnel.restarts >= 1
    assert listener._connections.listener_tunnel.local_address()[1] != old_port
    assert listener._connections.pool_tunnel.restarts == 0
    assert session_of(ssh_server, listener._connections.pool_tunnel) == pool_session


def test_frozen_listener_session_noticed_by_the_health_check(stream_db, make_ssh_listener, ssh_server,
                                                            pg_cluster, dbname):
    listener = make_ssh_listener()
    got = Collector()
    listener.on_event("stream", got)
    lost = counter(listener.signals.disconnected)
    listener.start()
    ssh_server.freeze_session(session_of(ssh_server, listener._connections.listener_tunnel))
    with stream_db.cursor() as cur:
        cur.execute("INSERT INTO stream (note) VALUES ('while frozen')")
    wait_for(lambda: lost, timeout=30, message="a frozen SSH session was never noticed")
    # Noticed by the health check's deadline (nothing else can see a frozen session).
    assert "health check got no answer" in str(lost[0]["error"])
    assert listener.stats["health_check_failures"] >= 1
    (event,) = got.wait(1, timeout=30, settle=listener)
    assert event.data["note"] == "while frozen"
    assert listener._connections.listener_tunnel.restarts >= 1
    assert_exactly_once_in_row_order(got, pg_cluster, dbname)


def test_sshd_down_then_back(stream_db, make_ssh_listener, ssh_server, pg_cluster, dbname):
    listener = make_ssh_listener(reconnect_delay_ms=50, reconnect_delay_max_ms=300)
    got = Collector()
    listener.on_event("stream", got)
    attempts = counter(listener.signals.reconnecting)
    listener.start()
    ssh_server.stop()
    with stream_db.cursor() as cur:
        cur.execute("INSERT INTO stream (note) VALUES ('while sshd is down')")
    wait_for(lambda: len(attempts) >= 3, timeout=20, message="no retries while sshd is down")
    assert listener.state is ConnectionState.RECONNECTING
    ssh_server.start()
    (event,) = got.wait(1, timeout=20, settle=listener)
    assert event.data["note"] == "while sshd is down"
    assert_exactly_once_in_row_order(got, pg_cluster, dbname)


def test_pool_session_killed_pool_recovers_listener_unaffected(stream_db, make_ssh_listener, ssh_server):
    listener = make_ssh_listener()
    got = Collector()
    listener.on_event("stream", got)
    listener.start()
    listener.publish("stream", {"n": 1})
    got.wait(1)
    lost = counter(listener.signals.disconnected)
    ssh_server.kill_session(session_of(ssh_server, listener._connections.pool_tunnel))
    wait_for(lambda: not listener._connections.pool_tunnel._forwarder.is_active)
    checks = listener.stats["health_checks"]
    listener.publish("stream", {"n": 2})             # a dead pooled connection is replaced
    got.wait(2)
    # A barrier: a health-check round trip after the kill. Had the listener's own
    # connection been hurt, it would have been lost (and reported) before it.
    wait_for(lambda: listener.stats["health_checks"] > checks, timeout=20, message="no health check")
    assert lost == [] and listener.state is ConnectionState.LISTENING
    assert listener._connections.pool_tunnel.restarts == 1
    assert listener._connections.pool.discarded >= 1
    assert listener.stats["reconnects"] == 0 and listener._connections.listener_tunnel.restarts == 0


def test_stop_ends_every_thread_and_tunnel(stream_db, make_ssh_listener, ssh_server):
    before = set(threading.enumerate())
    listener = make_ssh_listener()
    listener.start()
    listener.publish("stream", {"warm": True})
    wait_for(lambda: len(ssh_server.sessions()) >= 2)
    listener.stop()
    wait_for(lambda: set(threading.enumerate()) - before == set(), message="threads left after stop")
    wait_for(lambda: ssh_server.sessions() == [], message="SSH sessions left after stop")


# -- refusals: each with its own message, none retried ------------------------------------

def test_wrong_key_is_refused_without_retrying(stream_db, make_ssh_listener, ssh_server):
    other = ssh_server.make_key("tunnel-stranger")
    listener = make_ssh_listener(ssh_key_path=other)
    retries = counter(listener.signals.reconnecting)
    with pytest.raises(SshAuthError, match="refused the key for user 'root'"):
        listener.start(timeout_s=20)
    wait_for(lambda: not listener._reader.is_alive(), message="reader still running")
    assert retries == [] and listener.stats["reconnect_attempts"] == 0     # not retried
    assert listener.state is ConnectionState.FAILED


def test_wrong_user_is_refused(stream_db, make_ssh_listener):
    listener = make_ssh_listener(ssh_user="nobody-here")
    with pytest.raises(SshAuthError, match="nobody-here"):
        listener.start(timeout_s=20)


def test_unknown_host_is_refused(stream_db, make_ssh_listener, tmp_path):
    empty = tmp_path / "known_hosts"
    empty.write_text("")
    listener = make_ssh_listener(ssh_known_hosts=str(empty))
    with pytest.raises(HostKeyError, match="not in .*known_hosts.*ssh-keyscan"):
        listener.start()
    assert listener.threads() == []          # refused before any thread started


def test_changed_host_key_is_refused(stream_db, make_ssh_listener, ssh_server, tmp_path):
    impostor = ssh_server.make_key("tunnel-impostor-host")
    with open(impostor + ".pub") as fh:
        key_type, blob = fh.read().split()[:2]
    known = tmp_path / "known_hosts"
    known.write_text(f"[{ssh_server.host}]:{ssh_server.port} {key_type} {blob}\n")
    listener = make_ssh_listener(ssh_known_hosts=str(known))
    retries = counter(listener.signals.reconnecting)
    with pytest.raises(HostKeyError, match="does not match known_hosts"):
        listener.start(timeout_s=20)
    wait_for(lambda: not listener._reader.is_alive(), message="reader still running")
    assert retries == [] and listener.stats["reconnect_attempts"] == 0     # not retried
    assert listener.state is ConnectionState.FAILED


def test_key_readable_by_others_is_refused(stream_db, make_ssh_listener, ssh_server):
    loose = ssh_server.make_key("tunnel-loose", mode=0o644, authorize=True)
    listener = make_ssh_listener(ssh_key_path=loose)
    with pytest.raises(ConfigError, match=r"SSH_KEY_PATH: .*loose.*mode 0644.*chmod 600"):
        listener.start()


def test_encrypted_key_needs_its_passphrase(stream_db, make_ssh_listener, ssh_server):
    locked = ssh_server.make_key("tunnel-locked", passphrase="open sesame", authorize=True, kdf_rounds=1)
    with pytest.raises(ConfigError, match="encrypted.*SSH_KEY_PASSPHRASE"):
        make_ssh_listener(ssh_key_path=locked).start()
    with pytest.raises(ConfigError, match="wrong passphrase"):
        make_ssh_listener(ssh_key_path=locked, ssh_key_passphrase="nope").start()
    listener = make_ssh_listener(ssh_key_path=locked, ssh_key_passphrase="open sesame")
    listener.start()
    assert listener.state is ConnectionState.LISTENING


@pytest.mark.parametrize("key_type", ["ecdsa", "rsa"])
def test_ecdsa_and_rsa_keys_work(stream_db, make_ssh_listener, ssh_server, key_type):
    key = ssh_server.make_key(f"tunnel-k-{key_type}", key_type=key_type, authorize=True)
    listener = make_ssh_listener(ssh_key_path=key)
    listener.start()
    assert listener.state is ConnectionState.LISTENING


def test_missing_and_malformed_key_files(stream_db, make_ssh_listener, tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        make_ssh_listener(ssh_key_path=str(tmp_path / "nope")).start()
    junk = tmp_path / "junk"
    junk.write_text("hello\n")
    os.chmod(junk, 0o600)
    with pytest.raises(ConfigError, match="not a private key"):
        make_ssh_listener(ssh_key_path=str(junk)).start()


def test_secrets_never_in_errors(stream_db, make_ssh_listener, ssh_server, caplog):
    locked = ssh_server.make_key("tunnel-locked2", passphrase="Pass-Phrase-9931", authorize=True, kdf_rounds=1)
    with pytest.raises(ConfigError, match="wrong passphrase") as info:
        make_ssh_listener(ssh_key_path=locked, ssh_key_passphrase="Wrong-Phrase-1177").start()
    listener = make_ssh_listener(ssh_key_path=locked, ssh_key_passphrase="Pass-Phrase-9931")
    listener.start()
    for text in (str(info.value), caplog.text, repr(listener), repr(listener.config)):
        assert "Pass-Phrase-9931" not in text and "Wrong-Phrase-1177" not in text
        assert listener.config.postgres_password not in text
    with open(locked) as fh:
        key_body = fh.read().splitlines()[1]
    assert key_body not in caplog.text


# -- README promises: public keys, SSH_PASSWORD, the insecure opt-out, the security logger ----

def security_records(caplog):
    return [r for r in caplog.records if r.name == "pgnotify_sync.security" and r.levelno >= logging.WARNING]


def private_copy(path, tmp_path, name, mode=0o600):
    """A copy of *path* under *name*, with *mode* (a key's own mode would hide what is tested)."""
    target = tmp_path / name
    shutil.copyfile(path, target)
    os.chmod(target, mode)
    return str(target)


def test_public_key_file_refused_saying_so(stream_db, make_ssh_listener, ssh_server, tmp_path):
    pub = private_copy(ssh_server.client_key_path + ".pub", tmp_path, "id_test.pub")
    with pytest.raises(ConfigError, match=r"^SSH_KEY_PATH: .*id_test\.pub is a public key; give the private key"):
        make_ssh_listener(ssh_key_path=pub).start()
    # Recognised by its content too, whatever its name.
    renamed = private_copy(ssh_server.client_key_path + ".pub", tmp_path, "id_test")
    with pytest.raises(ConfigError, match=r"id_test is a public key; give the private key"):
        make_ssh_listener(ssh_key_path=renamed).start()


def test_public_key_with_its_usual_mode_refused_as_a_public_key(stream_db, make_ssh_listener, ssh_server,
                                                                tmp_path):
    pub = private_copy(ssh_server.client_key_path + ".pub", tmp_path, "id_usual.pub", mode=0o644)
    with pytest.raises(ConfigError, match=r"id_usual\.pub is a public key; give the private key"):
        make_ssh_listener(ssh_key_path=pub).start()


def test_ssh_password_refused_for_a_listener_from_the_environment(stream_db, ssh_server, dsn, monkeypatch):
    secret = "ssh-Pw-Listener-3390"
    environ = {"POSTGRES_HOST": dsn["host"], "POSTGRES_PORT": str(dsn["port"]), "POSTGRES_USER": dsn["user"],
               "POSTGRES_PASSWORD": dsn["password"], "POSTGRES_DB": dsn["dbname"], "PG_NOTIFY_CHANNELS": "stream",
               "SSH_HOST": ssh_server.host, "SSH_PORT": str(ssh_server.port), "SSH_USER": ssh_server.user,
               "SSH_KEY_PATH": ssh_server.client_key_path, "SSH_KNOWN_HOSTS": ssh_server.known_hosts_path}
    for var, value in environ.items():
        monkeypatch.setenv(var, value)
    assert Listener(Config.from_env(), registry=False).config.use_ssh      # the same environment, no password
    monkeypatch.setenv("SSH_PASSWORD", secret)
    before = set(threading.enumerate())
    made = []
    try:
        with pytest.raises(ConfigError, match=r"^SSH_PASSWORD: password authentication is not supported; "
                                              r"use a private key \(SSH_KEY_PATH\)$") as info:
            made.append(Listener(Config.from_env(), registry=False))
            made[-1].start()
    finally:
        for listener in made:
            listener.stop()
    assert made == []                                   # refused before any Listener exists
    assert secret not in str(info.value) and secret not in repr(info.value)
    assert dsn["password"] not in str(info.value)
    assert set(threading.enumerate()) - before == set()
    assert ssh_server.sessions() == []                  # no SSH session was even tried


def test_insecure_skip_warns_on_every_listener(stream_db, make_ssh_listener, ssh_server, tmp_path, caplog):
    empty = tmp_path / "known_hosts"
    empty.write_text("")                                 # not consulted with the opt-out
    caplog.set_level(logging.WARNING, logger="pgnotify_sync.security")
    warned = []
    for n in (1, 2):
        listener = make_ssh_listener(ssh_insecure_skip_host_key_check=True, ssh_known_hosts=str(empty))
        listener.start()
        assert listener.state is ConnectionState.LISTENING
        records = [r for r in security_records(caplog) if "NOT verified" in r.getMessage()]
        assert len(records) >= n, f"listener {n}: no warning"        # once per process is not enough
        warned = records
    for record in warned:
        assert record.levelno == logging.WARNING
        assert f"{ssh_server.host}:{ssh_server.port}" in record.getMessage()


def test_insecure_skip_warns_again_when_a_tunnel_is_rebuilt(stream_db, make_ssh_listener, ssh_server, caplog):
    caplog.set_level(logging.WARNING, logger="pgnotify_sync.security")
    listener = make_ssh_listener(ssh_insecure_skip_host_key_check=True)
    listener.start()
    before = len([r for r in security_records(caplog) if "NOT verified" in r.getMessage()])
    ssh_server.kill_session(session_of(ssh_server, listener._connections.listener_tunnel))
    wait_for(lambda: listener._connections.listener_tunnel.restarts >= 1 and listener.state is ConnectionState.LISTENING,
             timeout=30)
    after = len([r for r in security_records(caplog) if "NOT verified" in r.getMessage()])
    assert after > before


def _refusal(case, server, tmp_path):
    """Config overrides that make the listener refuse to connect, and the error expected."""
    if case == "permissions":
        return dict(ssh_key_path=private_copy(server.client_key_path, tmp_path, "loose", 0o644)), ConfigError
    if case == "unknown-host":
        empty = tmp_path / "known_hosts"
        empty.write_text("")
        return dict(ssh_known_hosts=str(empty)), HostKeyError
    if case == "changed-host-key":
        with open(server.client_key_path + ".pub") as fh:           # any other key will do
            key_type, blob = fh.read().split()[:2]
        known = tmp_path / "known_hosts"
        known.write_text(f"[{server.host}]:{server.port} {key_type} {blob}\n")
        return dict(ssh_known_hosts=str(known)), HostKeyError
    if case == "user-refused":
        return dict(ssh_user="nobody-here"), SshAuthError
    if case == "key-refused":
        return dict(ssh_key_path=server.make_key("tunnel-stranger-logged")), SshAuthError
    if case in ("encrypted-no-passphrase", "wrong-passphrase"):
        key = server.make_key(f"tunnel-locked-{case}", passphrase="Right-Phrase-5", authorize=True, kdf_rounds=1)
        return dict(ssh_key_path=key, ssh_key_passphrase="Wrong-Phrase-6" if case == "wrong-passphrase"
                    else None), ConfigError
    if case == "missing-key":
        return dict(ssh_key_path=str(tmp_path / "nope")), ConfigError
    if case == "public-key":
        return dict(ssh_key_path=private_copy(server.client_key_path + ".pub", tmp_path, "k.pub")), ConfigError
    if case == "not-a-key":
        junk = tmp_path / "junk"
        junk.write_text("hello\n")
        os.chmod(junk, 0o600)
        return dict(ssh_key_path=str(junk)), ConfigError
    raise AssertionError(case)


@pytest.mark.parametrize("case", ["permissions", "unknown-host", "changed-host-key", "user-refused", "key-refused",
                                  "missing-key", "public-key", "not-a-key", "encrypted-no-passphrase",
                                  "wrong-passphrase"])
def test_each_refusal_is_logged_on_the_security_logger(stream_db, make_ssh_listener, ssh_server, tmp_path,
                                                       caplog, case):
    overrides, error = _refusal(case, ssh_server, tmp_path)
    caplog.set_level(logging.WARNING, logger="pgnotify_sync.security")
    listener = make_ssh_listener(**overrides)
    retries = counter(listener.signals.reconnecting)
    with pytest.raises(error):
        listener.start(timeout_s=20)
    if listener._reader is not None:
        wait_for(lambda: not listener._reader.is_alive(), message="reader still running")
    assert retries == []                                # none retried
    assert security_records(caplog), f"{case}: nothing on the pgnotify_sync.security logger"


def test_ssh_password_refusal_is_logged_on_the_security_logger(caplog):
    caplog.set_level(logging.WARNING, logger="pgnotify_sync.security")
    with pytest.raises(ConfigError, match="^SSH_PASSWORD"):
        Config.from_env(environ={"POSTGRES_USER": "u", "POSTGRES_DB": "d", "SSH_HOST": "h", "SSH_USER": "u",
                                 "SSH_KEY_PATH": "/k", "SSH_PASSWORD": "x-Pw-1"})
    assert security_records(caplog)


# -- known_hosts markers and weak algorithms (issue 13) ----------------------------------

def host_line(server):
    with open(server.host_pub_path) as fh:
        key_type, blob = fh.read().split()[:2]
    return f"[{server.host}]:{server.port}", key_type, blob


def test_a_host_key_marked_revoked_is_refused_even_if_also_listed(stream_db, make_ssh_listener, ssh_server,
                                                                  tmp_path):
    name, key_type, blob = host_line(ssh_server)
    known = tmp_path / "known_hosts"
    known.write_text(f"{name} {key_type} {blob}\n@revoked {name} {key_type} {blob}\n")
    listener = make_ssh_listener(ssh_known_hosts=str(known))
    with pytest.raises(HostKeyError, match=r"SSH host key of .* is marked @revoked in .*known_hosts: refusing it"):
        listener.start()
    assert listener.threads() == []


def test_a_revoked_key_of_another_host_or_an_old_key_does_not_stop_a_good_one(stream_db, make_ssh_listener,
                                                                             ssh_server, tmp_path):
    name, key_type, blob = host_line(ssh_server)
    old = ssh_server.make_key("tunnel-old-host")
    with open(old + ".pub") as fh:
        old_type, old_blob = fh.read().split()[:2]
    known = tmp_path / "known_hosts"
    known.write_text(f"@revoked {name} {old_type} {old_blob}\n@revoked other.example {key_type} {blob}\n"
                     f"{name} {key_type} {blob}\n")
    listener = make_ssh_listener(ssh_known_hosts=str(known))
    listener.on_event("stream", lambda e: None)
    listener.start(timeout_s=20)
    assert listener.state is ConnectionState.LISTENING


def test_a_host_known_only_through_a_cert_authority_gets_a_clear_error(stream_db, make_ssh_listener, ssh_server,
                                                                     tmp_path):
    name, key_type, blob = host_line(ssh_server)
    known = tmp_path / "known_hosts"
    known.write_text(f"@cert-authority *:{ssh_server.port},[{ssh_server.host}]:* {key_type} {blob}\n")
    listener = make_ssh_listener(ssh_known_hosts=str(known))
    with pytest.raises(HostKeyError, match=r"trusts a certificate authority for .* \(@cert-authority\), which this "
                                           r"client cannot check .* add the host's own key"):
        listener.start()


@pytest.mark.parametrize("offer", ["Ciphers aes128-cbc,aes256-cbc", "Ciphers aes128-ctr\nMACs hmac-sha1,hmac-md5"])
def test_a_server_offering_only_weak_algorithms_is_refused_at_once(stream_db, dsn, tmp_path, offer):
    from sshd import SshServer
    server = SshServer(tmp_path / "weak")
    with open(server.config_path, "a") as fh:
        fh.write(offer + "\n")
    server.start()
    try:
        listener = Listener(ssh_config(dsn, server, channels=("stream",)), registry=False, name="weak")
        retries = counter(listener.signals.reconnecting)
        try:
            with pytest.raises(ConnectError, match="offers no algorithm we accept .*CBC ciphers and SHA-1/MD5 MACs "
                                                   "are refused as weak"):
                listener.start(timeout_s=20)
            assert retries == []
        finally:
            listener.stop()
    finally:
        server.stop()
