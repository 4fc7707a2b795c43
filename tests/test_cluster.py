"""Tests of the throwaway cluster manager that every integration test relies on."""

import os
import socket

import psycopg2
import pytest

from pgnotify_sync.testing import ClusterError, TemporaryCluster, _cluster, _server, find_pg_bindir, free_port


# What a session sees once the server ended it (the FATAL message, or only the close).
TERMINATED = "terminating connection due to administrator command|server closed the connection unexpectedly"


def _scalar(conn, query, params=None):
    with conn.cursor() as cur:
        cur.execute(query, params)
        return cur.fetchone()[0]


# -- no server needed -----------------------------------------------------------


def test_free_port_is_bindable():
    port = free_port()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))


def test_find_pg_bindir_error_is_clear(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))  # no pg_config
    monkeypatch.setattr(_server.glob, "glob", lambda pattern: [])
    with pytest.raises(ClusterError, match="initdb.*not found"):
        find_pg_bindir()


def test_bogus_bindir_raises_cluster_error(tmp_path):
    bogus = str(tmp_path / "no-such-bin")
    cluster = TemporaryCluster(base_dir=tmp_path / "c", bindir=bogus)
    with pytest.raises(ClusterError) as info:
        cluster.start()
    assert "initdb" in str(info.value) and bogus in str(info.value)
    cluster.cleanup()
    assert not (tmp_path / "c").exists()


def test_each_cluster_gets_its_own_random_password_unless_given(tmp_path):
    first, second = TemporaryCluster(base_dir=tmp_path / "a"), TemporaryCluster(base_dir=tmp_path / "b")
    assert first.password != second.password and len(first.password) >= 20
    assert TemporaryCluster(base_dir=tmp_path / "c", password="chosen").password == "chosen"


def test_stop_before_start_is_a_no_op(tmp_path):
    cluster = TemporaryCluster(base_dir=tmp_path / "never")
    cluster.stop()
    assert not cluster.is_running()


def test_tests_not_marked_integration_cannot_reach_postgres(tmp_path):
    """tests/_nopostgres.py's guard, seen from a test not marked integration: the binaries
    found here and in a subprocess are the fakes, and TemporaryCluster refuses initdb
    (the guard then fails the test whatever it caught, so only look, do not run)."""
    import subprocess
    import sys
    import _nopostgres
    fake = str(_nopostgres.guard.bindir)
    assert find_pg_bindir() == fake
    child = subprocess.run([sys.executable, "-c", "from pgnotify_sync.testing import find_pg_bindir; "
                            "print(find_pg_bindir())"], capture_output=True, text=True, timeout=60)
    assert child.stdout.strip() == fake, child.stderr
    assert TemporaryCluster._run is not _nopostgres.guard.real_run
    assert _nopostgres.guard.item is not None


@pytest.mark.integration
def test_integration_tests_reach_the_real_binaries():
    import _nopostgres
    assert find_pg_bindir() != str(_nopostgres.guard.bindir)
    assert _nopostgres.guard.item is None


# -- shared session cluster -------------------------------------------------------


def test_session_cluster_serves_loopback_with_fast_settings(pg_cluster, admin_db):
    assert pg_cluster.is_running()
    assert _scalar(admin_db, "SELECT 1") == 1
    assert _scalar(admin_db, "SHOW listen_addresses") == "127.0.0.1"
    assert _scalar(admin_db, "SHOW fsync") == "off"
    assert _scalar(admin_db, "SHOW server_encoding") == "UTF8"
    assert os.path.isfile(pg_cluster.log_path)


def test_wrong_password_is_rejected(pg_cluster):
    # scram-sha-256 on TCP: the password really matters (as it will over SSH).
    info = dict(pg_cluster.conninfo(), password="wrong")
    with pytest.raises(psycopg2.OperationalError, match="password authentication failed"):
        psycopg2.connect(**info)


def test_dbname_fixture_gives_fresh_database(db, dbname, dsn):
    assert dsn["dbname"] == dbname
    assert _scalar(db, "SELECT current_database()") == dbname
    assert _scalar(db, "SELECT count(*) FROM pg_tables WHERE schemaname = 'public'") == 0


def test_create_and_drop_database_disconnects_users(pg_cluster, admin_db):
    pg_cluster.create_database("scratch_db")
    user = pg_cluster.connect("scratch_db")
    assert _scalar(user, "SELECT current_database()") == "scratch_db"

    pg_cluster.drop_database("scratch_db")  # must not wait for `user` to leave
    assert _scalar(admin_db, "SELECT count(*) FROM pg_database WHERE datname = 'scratch_db'") == 0
    with pytest.raises(psycopg2.OperationalError, match=TERMINATED):
        _scalar(user, "SELECT 1")
    pg_cluster.drop_database("scratch_db")  # already gone: fine


def test_terminate_backends_by_application_name(pg_cluster, dsn, db):
    victim = psycopg2.connect(**dsn, application_name="victim")
    victim.autocommit = True
    try:
        assert pg_cluster.terminate_backends(application_name="victim") == 1
        # On PG 14+ terminate_backends waits until the backend has exited.
        with pytest.raises(psycopg2.OperationalError, match=TERMINATED):
            _scalar(victim, "SELECT 1")
        assert _scalar(db, "SELECT 1") == 1  # other sessions are untouched
        assert pg_cluster.terminate_backends(application_name="victim") == 0
    finally:
        victim.close()


def test_terminate_backends_by_database(pg_cluster, dbname, db, admin_db):
    assert pg_cluster.terminate_backends(dbname=dbname) == 1
    with pytest.raises(psycopg2.OperationalError, match=TERMINATED):
        _scalar(db, "SELECT 1")
    assert _scalar(admin_db, "SELECT 1") == 1


def test_restart_keeps_data_and_drops_connections(pg_cluster, db, dsn):
    with db.cursor() as cur:
        cur.execute("CREATE TABLE kept (v text); INSERT INTO kept VALUES ('survives')")
    port = pg_cluster.port
    # fast: a shutdown checkpoint.  (An immediate stop can lose the last commits
    # because the cluster runs with synchronous_commit=off.)
    pg_cluster.restart("fast")
    assert pg_cluster.port == port
    with pytest.raises(psycopg2.OperationalError, match=TERMINATED):
        _scalar(db, "SELECT 1")
    fresh = psycopg2.connect(**dsn)
    try:
        assert _scalar(fresh, "SELECT v FROM kept") == "survives"
    finally:
        fresh.close()


def test_stop_twice_then_start(pg_cluster):
    try:
        pg_cluster.stop()
        pg_cluster.stop()
        assert not pg_cluster.is_running()
    finally:
        pg_cluster.start()
    assert pg_cluster.is_running()


# -- a private cluster (costs one initdb) ----------------------------------------------


@pytest.mark.integration          # starts a server of its own, without the pg_cluster fixture
def test_private_cluster_lifecycle_and_port_conflicts(monkeypatch):
    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", 0))
        blocker.listen()
        taken = blocker.getsockname()[1]

        # The first port handed out is taken: start() must move to another one.
        ports = iter([taken])
        real_free_port = _cluster.free_port
        monkeypatch.setattr(_cluster, "free_port", lambda: next(ports, None) or real_free_port())

        with TemporaryCluster(settings={"work_mem": "8MB"}) as cluster:
            base_dir = cluster.base_dir
            assert cluster.port != taken
            conn = cluster.connect()
            assert _scalar(conn, "SHOW work_mem") == "8MB"
            conn.close()

            # An explicitly requested port is not silently replaced.
            cluster.stop()
            pinned = TemporaryCluster(base_dir=base_dir, port=taken)
            with pytest.raises(ClusterError, match="port in use"):
                pinned.start()
            assert os.path.isdir(base_dir)  # not ours to delete
            cluster.start()
            assert cluster.is_running()

    assert not os.path.exists(base_dir)
