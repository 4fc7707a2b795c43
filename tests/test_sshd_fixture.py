"""Tests of the sshd test fixture itself (tests/sshd.py, fixtures ``sshd`` / ``ssh_server``).

Real sshd, real sshtunnel forwarders to a tiny in-test TCP echo server, all on
127.0.0.1.  Waiting is done with ``wait_for`` deadlines; the only timed waits are the
short ones that show *nothing* arrives through a frozen session.
"""

import os
import socket
import stat
import threading

import paramiko
import pytest
import sshtunnel

from helpers import wait_for
from sshd import SshServer

# How long a frozen tunnel must stay silent to count as hung (a negative check can
# only be shown by waiting; kept short so the suite stays fast).
SILENCE = 0.2


# -- helpers -------------------------------------------------------------------------

class EchoServer:
    """A tiny threaded TCP echo server on a free 127.0.0.1 port."""

    def __init__(self):
        self._sock = socket.socket()
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(16)
        self.port = self._sock.getsockname()[1]
        self._conns = []
        threading.Thread(target=self._accept, name="echo-accept", daemon=True).start()

    def _accept(self):
        while True:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            self._conns.append(conn)
            threading.Thread(target=self._echo, args=(conn,), name="echo", daemon=True).start()

    @staticmethod
    def _echo(conn):
        try:
            while True:
                data = conn.recv(65536)
                if not data:
                    break
                conn.sendall(data)
        except OSError:
            pass
        finally:
            conn.close()

    def close(self):
        self._sock.close()
        for conn in self._conns:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            conn.close()


def recv_exactly(sock, n, timeout=5.0):
    sock.settimeout(timeout)
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise ConnectionError(f"EOF after {data!r}")
        data += chunk
    return data


def roundtrip(port, payload=b"ping", timeout=5.0):
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(payload)
        return recv_exactly(s, len(payload), timeout)


def connection_is_closed(sock, timeout=5.0):
    """True once ``sock`` reports EOF or a reset (within ``timeout``)."""
    sock.settimeout(timeout)
    try:
        return sock.recv(1) == b""
    except (ConnectionResetError, BrokenPipeError):
        return True


def client_port(forwarder):
    """The local port of the forwarder's SSH connection to sshd."""
    return forwarder._transport.sock.getsockname()[1]


def proc_state(pid):
    """The /proc state letter of ``pid`` ('R', 'S', 'T', 'Z', ...) or None if gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    return data[data.rindex(b")") + 2:].split()[0].decode()


# -- fixtures ------------------------------------------------------------------------

@pytest.fixture
def echo():
    server = EchoServer()
    yield server
    server.close()


@pytest.fixture
def make_forwarder(ssh_server, echo):
    """Factory: a started sshtunnel forwarder through ``ssh_server`` to ``echo``."""
    forwarders = []

    def make():
        fwd = sshtunnel.SSHTunnelForwarder(
            (ssh_server.host, ssh_server.port),
            ssh_username=ssh_server.user,
            ssh_pkey=paramiko.Ed25519Key.from_private_key_file(ssh_server.client_key_path),
            remote_bind_address=("127.0.0.1", echo.port),
            local_bind_address=("127.0.0.1", 0),
            allow_agent=False,
            host_pkey_directories=[],
            ssh_config_file=None,
        )
        forwarders.append(fwd)
        fwd.start()
        return fwd

    yield make
    for fwd in forwarders:
        fwd.stop(force=True)


# -- the server and its files ----------------------------------------------------------

def test_files_config_and_known_hosts(ssh_server):
    cfg = open(ssh_server.config_path).read().splitlines()
    for line in (f"Port {ssh_server.port}", "ListenAddress 127.0.0.1", "PidFile none",
                 "PasswordAuthentication no", "KbdInteractiveAuthentication no", "UsePAM no",
                 "PermitRootLogin prohibit-password", "AllowTcpForwarding yes", "StrictModes no",
                 "ClientAliveInterval 0", "MaxStartups 100", "MaxSessions 100",
                 "LogLevel VERBOSE", f"HostKey {ssh_server.host_key_path}",
                 f"AuthorizedKeysFile {ssh_server.authorized_keys_path}"):
        assert line in cfg
    assert stat.S_IMODE(os.stat(ssh_server.client_key_path).st_mode) == 0o600
    assert open(ssh_server.client_pub_path).read().split()[1] in open(
        ssh_server.authorized_keys_path).read()
    assert (ssh_server.host, ssh_server.user) == ("127.0.0.1", "root")

    # known_hosts really names this server's host key: a strict client accepts it.
    client = paramiko.SSHClient()
    client.load_host_keys(ssh_server.known_hosts_path)
    client.set_missing_host_key_policy(paramiko.RejectPolicy())
    client.connect(ssh_server.host, ssh_server.port, username="root",
                   key_filename=ssh_server.client_key_path, allow_agent=False,
                   look_for_keys=False, timeout=5)
    client.close()


def test_forward_works_and_session_is_found(ssh_server, make_forwarder):
    fwd = make_forwarder()
    assert fwd.is_active
    assert roundtrip(fwd.local_bind_port, b"hello through ssh") == b"hello through ssh"

    port = client_port(fwd)
    pid = ssh_server.session_for_client_port(port)
    assert pid is not None
    assert pid in ssh_server.sessions()
    assert ssh_server.session_for_client_port(ssh_server.port) is None  # no such client
    # The VERBOSE log was collected and names this client connection.
    wait_for(lambda: f"Accepted publickey for root from 127.0.0.1 port {port}"
             in ssh_server.log_text(), timeout=5, message="login in sshd log")


def test_two_forwarders_get_distinct_sessions(ssh_server, make_forwarder):
    a, b = make_forwarder(), make_forwarder()
    pa = ssh_server.session_for_client_port(client_port(a))
    pb = ssh_server.session_for_client_port(client_port(b))
    assert None not in (pa, pb) and pa != pb
    ssh_server.kill_session(pa)
    wait_for(lambda: not a.is_active, timeout=5, message="killed forwarder inactive")
    assert b.is_active and roundtrip(b.local_bind_port) == b"ping"


def test_kill_session_breaks_the_forward(ssh_server, make_forwarder):
    fwd = make_forwarder()
    port0 = fwd.local_bind_port
    conn = socket.create_connection(("127.0.0.1", port0), timeout=5)
    conn.sendall(b"a")
    assert recv_exactly(conn, 1) == b"a"
    pid = ssh_server.session_for_client_port(client_port(fwd))

    ssh_server.kill_session(pid)

    assert proc_state(pid) in (None, "Z")
    assert connection_is_closed(conn)          # the tunnelled connection is cut
    conn.close()
    wait_for(lambda: not fwd.is_active, timeout=5, message="forwarder transport down")
    wait_for(lambda: pid not in ssh_server.sessions(), timeout=5, message="session reaped")
    # sshtunnel: transport dead, but its local listener still accepts (is_alive stays
    # True) and closes each new connection at once; local_bind_port now raises.
    assert fwd.is_alive
    with socket.create_connection(("127.0.0.1", port0), timeout=5) as c2:
        c2.sendall(b"b")
        assert connection_is_closed(c2)
    with pytest.raises(sshtunnel.BaseSSHTunnelForwarderError):
        fwd.local_bind_port
    with pytest.raises(LookupError):
        ssh_server.kill_session(pid)            # gone: refused, not re-signalled

    # A restarted forwarder works again (on a new local port: it re-binds port 0).
    fwd.restart()
    assert fwd.is_active
    assert roundtrip(fwd.local_bind_port) == b"ping"


def test_freeze_and_thaw_session(ssh_server, make_forwarder):
    fwd = make_forwarder()
    conn = socket.create_connection(("127.0.0.1", fwd.local_bind_port), timeout=5)
    conn.sendall(b"1")
    assert recv_exactly(conn, 1) == b"1"
    pid = ssh_server.session_for_client_port(client_port(fwd))

    ssh_server.freeze_session(pid)
    assert proc_state(pid) == "T"
    assert ssh_server.frozen_sessions() == [pid]
    conn.sendall(b"2")
    with pytest.raises(socket.timeout):
        recv_exactly(conn, 1, timeout=SILENCE)  # nothing comes back ...
    assert fwd.is_active                        # ... and nothing notices

    ssh_server.thaw_session(pid)
    assert recv_exactly(conn, 1) == b"2"        # the byte held up arrives
    assert ssh_server.frozen_sessions() == []
    conn.sendall(b"3")
    assert recv_exactly(conn, 1) == b"3"
    conn.close()


@pytest.fixture
def left_frozen(sshd):
    """Requested *before* ssh_server, so its teardown runs after ssh_server's: checks
    that ssh_server thawed the session the test left frozen."""
    record = {}
    yield record
    transport = record.get("transport")
    try:
        assert proc_state(record["pid"]) not in ("T", "t"), "ssh_server left a session frozen"
        assert transport.is_active()
    finally:
        if proc_state(record.get("pid")) in ("T", "t") and record["pid"] in sshd.sessions():
            sshd.thaw_session(record["pid"])
        if transport is not None:
            transport.close()


def test_ssh_server_thaws_what_a_test_left_frozen(left_frozen, ssh_server):
    transport = paramiko.Transport((ssh_server.host, ssh_server.port))
    left_frozen["transport"] = transport
    transport.connect(username="root", pkey=ssh_server.client_pkey())
    pid = ssh_server.session_for_client_port(transport.sock.getsockname()[1])
    left_frozen["pid"] = pid
    ssh_server.freeze_session(pid)
    assert proc_state(pid) == "T"


def test_kill_and_freeze_refuse_foreign_pids(ssh_server):
    for action in (ssh_server.kill_session, ssh_server.freeze_session):
        with pytest.raises(LookupError):
            action(os.getpid())
        with pytest.raises(LookupError):
            action(ssh_server.pid)              # the listener is not a session


def test_restart_keeps_port_and_host_key(ssh_server, make_forwarder):
    fwd = make_forwarder()
    assert roundtrip(fwd.local_bind_port) == b"ping"
    port, old_pid = ssh_server.port, ssh_server.pid

    ssh_server.restart()

    assert ssh_server.running and ssh_server.port == port and ssh_server.pid != old_pid
    wait_for(lambda: not fwd.is_active, timeout=5, message="old tunnel cut by restart")
    fwd.restart()
    assert roundtrip(fwd.local_bind_port) == b"ping"
    assert ssh_server.session_for_client_port(client_port(fwd)) in ssh_server.sessions()
    # Same host key after restart: strict known_hosts checking still passes.
    client = paramiko.SSHClient()
    client.load_host_keys(ssh_server.known_hosts_path)
    client.set_missing_host_key_policy(paramiko.RejectPolicy())
    client.connect(ssh_server.host, port, username="root", pkey=ssh_server.client_pkey(),
                   allow_agent=False, look_for_keys=False, timeout=5)
    client.close()


def test_ssh_server_restarts_a_stopped_sshd(sshd, request):
    sshd.stop()
    assert not sshd.running and sshd.sessions() == []
    server = request.getfixturevalue("ssh_server")
    assert server is sshd and server.running


def test_extra_keys_and_authorize(ssh_server):
    def login(key):
        t = paramiko.Transport((ssh_server.host, ssh_server.port))
        try:
            t.connect(username="root", pkey=key)
            return t.is_authenticated()
        finally:
            t.close()

    path = ssh_server.make_key("stranger", mode=0o640)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o640
    stranger = paramiko.Ed25519Key.from_private_key_file(path)
    with pytest.raises(paramiko.AuthenticationException):
        login(stranger)
    ssh_server.authorize(path + ".pub")
    assert login(stranger)

    locked = ssh_server.make_key("locked", key_type="ecdsa", passphrase="s3cret", authorize=True,
                                 kdf_rounds=1)
    with pytest.raises(paramiko.PasswordRequiredException):
        paramiko.ECDSAKey.from_private_key_file(locked)
    assert login(paramiko.ECDSAKey.from_private_key_file(locked, password="s3cret"))


# -- a private server: stop semantics and start failures ------------------------------

def test_stop_kills_frozen_sessions_and_is_idempotent(tmp_path):
    server = SshServer(tmp_path / "own")
    server.start()
    try:
        transport = paramiko.Transport((server.host, server.port))
        transport.connect(username="root", pkey=server.client_pkey())
        pid = wait_for(lambda: server.session_for_client_port(transport.sock.getsockname()[1]),
                       timeout=5)
        server.freeze_session(pid)
        listener = server.pid

        server.stop()

        assert proc_state(pid) in (None, "Z") and proc_state(listener) in (None, "Z")
        assert not server.running and server.sessions() == []
        wait_for(lambda: not transport.is_active(), timeout=5, message="client sees close")
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection((server.host, server.port), timeout=5).close()
        server.stop()                            # idempotent
        transport.close()
    finally:
        server.stop()
    assert "Received signal 15; terminating." in server.log_text()


def test_start_failure_reports_sshd_stderr(tmp_path):
    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", 0))
        blocker.listen(1)
        server = SshServer(tmp_path / "busy", port=blocker.getsockname()[1])
        with pytest.raises(RuntimeError, match="Address already in use"):
            server.start()
        assert not server.running
        server.stop()
