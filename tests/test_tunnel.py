"""SSH tunnels against a real OpenSSH server: faults, recovery, refusals."""

import os
import threading

import pytest

from pgnotify_sync import ConfigError, ConnectionState, Listener
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
    events = got.wait(2)
    assert {e.operation for e in events} == {"PUBLISH", "INSERT"}
    mine = session_of(ssh_server, listener._listener_tunnel)
    pools = session_of(ssh_server, listener._pool_tunnel)
    assert mine and pools and mine != pools, "the listener must have its own SSH session"


def test_listener_session_killed_tunnel_rebuilt_nothing_lost(stream_db, make_ssh_listener, ssh_server, dsn,
                                                            pg_cluster, dbname):
    listener = make_ssh_listener()
    got = Collector()
    listener.on_event("stream", got)
    listener.start()
    listener.publish("stream", {"opens": "the pool tunnel"})
    old_port = listener._listener_tunnel.local_address()[1]
    pool_session = session_of(ssh_server, listener._pool_tunnel)
    with Workload(dsn) as work:
        work.wait_commits(20)
        ssh_server.kill_session(session_of(ssh_server, listener._listener_tunnel))
        wait_for(lambda: listener.stats["reconnects"] >= 1 and listener.state is ConnectionState.LISTENING,
                 timeout=20)
        work.wait_commits(20)
    assert_exactly_once_in_row_order(got, pg_cluster, dbname)
    assert listener._listener_tunnel.restarts >= 1
    assert listener._listener_tunnel.local_address()[1] != old_port
    assert listener._pool_tunnel.restarts == 0
    assert session_of(ssh_server, listener._pool_tunnel) == pool_session


def test_frozen_listener_session_noticed_by_the_health_check(stream_db, make_ssh_listener, ssh_server,
                                                            pg_cluster, dbname):
    listener = make_ssh_listener()
    got = Collector()
    listener.on_event("stream", got)
    lost = counter(listener.signals.disconnected)
    listener.start()
    ssh_server.freeze_session(session_of(ssh_server, listener._listener_tunnel))
    with stream_db.cursor() as cur:
        cur.execute("INSERT INTO stream (note) VALUES ('while frozen')")
    wait_for(lambda: lost, timeout=30, message="a frozen SSH session was never noticed")
    # Noticed by the health check's deadline (nothing else can see a frozen session).
    assert "health check got no answer" in str(lost[0]["error"])
    assert listener.stats["health_check_failures"] >= 1
    (event,) = got.wait(1, timeout=30)
    assert event.data["note"] == "while frozen"
    assert listener._listener_tunnel.restarts >= 1
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
    (event,) = got.wait(1, timeout=20)
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
    ssh_server.kill_session(session_of(ssh_server, listener._pool_tunnel))
    wait_for(lambda: not listener._pool_tunnel._forwarder.is_active)
    checks = listener.stats["health_checks"]
    listener.publish("stream", {"n": 2})             # a dead pooled connection is replaced
    got.wait(2)
    # A barrier: a health-check round trip after the kill. Had the listener's own
    # connection been hurt, it would have been lost (and reported) before it.
    wait_for(lambda: listener.stats["health_checks"] > checks, timeout=20, message="no health check")
    assert lost == [] and listener.state is ConnectionState.LISTENING
    assert listener._pool_tunnel.restarts == 1
    assert listener._pool.discarded >= 1
    assert listener.stats["reconnects"] == 0 and listener._listener_tunnel.restarts == 0


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
