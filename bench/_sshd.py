"""A throwaway OpenSSH server for the tunnel figures (``--ssh``).

The server itself is the test suite's (``tests/sshd.py`` ``SshServer``: its own
host key, client key, ``known_hosts``, a free 127.0.0.1 port, sshd as a child
process), imported from ``tests/`` so there is one implementation to maintain.

:func:`ssh_server` starts one in a temporary directory and removes everything
on exit; :func:`ssh_config_overrides` gives the ``Config`` fields of a Listener
that goes through it; :func:`raw_tunnel` opens a plain
``sshtunnel.SSHTunnelForwarder`` for the raw baseline.
"""

import contextlib
import os
import pathlib
import shutil
import sys
import tempfile

from bench._common import BenchError

_TESTS = pathlib.Path(__file__).resolve().parent.parent / "tests"


def _import_server_class():
    if str(_TESTS) not in sys.path:
        sys.path.insert(0, str(_TESTS))
    try:
        from sshd import MISSING_SSHD_HINT, SSHD_PATH, SshServer  # tests/sshd.py
    except ImportError as exc:
        raise BenchError(f"--ssh needs tests/sshd.py (SshServer): {exc}") from exc
    if not os.access(SSHD_PATH, os.X_OK):
        raise BenchError(f"--ssh needs {SSHD_PATH}: {MISSING_SSHD_HINT}")
    return SshServer


@contextlib.contextmanager
def ssh_server():
    """Yield a started ``SshServer`` (user root, key ``client_key_path``); stopped and
    its directory deleted on exit."""
    server_class = _import_server_class()
    base = tempfile.mkdtemp(prefix="pgnotify-bench-sshd-")
    server = None
    try:
        server = server_class(base)
        try:
            server.start()
        except RuntimeError as exc:
            raise BenchError(f"sshd could not be started: {exc}") from exc
        yield server
    finally:
        if server is not None:
            server.stop()
        shutil.rmtree(base, ignore_errors=True)


def ssh_config_overrides(server):
    """Config fields for a Listener whose connections go through *server*."""
    return dict(ssh_host=server.host, ssh_port=server.port, ssh_user=server.user,
                ssh_key_path=server.client_key_path, ssh_known_hosts=server.known_hosts_path)


@contextlib.contextmanager
def raw_tunnel(server, config):
    """A started ``sshtunnel.SSHTunnelForwarder`` through *server* to the database of
    *config*; yields the local ``(host, port)``. The same library, the same kind of
    key and the same host-key check as the Listener's tunnels, in this process."""
    import paramiko
    import sshtunnel

    from pgnotify_sync._tunnel import load_host_key

    host_key = load_host_key(config)
    fwd = sshtunnel.SSHTunnelForwarder(
        (server.host, server.port), ssh_username=server.user,
        ssh_pkey=paramiko.Ed25519Key.from_private_key_file(server.client_key_path),
        ssh_host_key=host_key, remote_bind_address=(config.postgres_host, config.postgres_port),
        local_bind_address=("127.0.0.1", 0), allow_agent=False, host_pkey_directories=[],
        ssh_config_file=None, set_keepalive=5.0)
    fwd.start()
    try:
        yield "127.0.0.1", fwd.local_bind_port
    finally:
        fwd.stop(force=True)
