"""SSH tunnels (sshtunnel + paramiko) with the checks OpenSSH users expect.

- Private-key authentication only (ed25519, ECDSA, RSA). A key file readable by
  group or others is refused, as OpenSSH does ("chmod 600"); a missing, unreadable,
  malformed or encrypted-without-passphrase key gives a ConfigError saying which.
- The server's host key is verified against a known_hosts file (SSH_KNOWN_HOSTS,
  default ~/.ssh/known_hosts). An unknown or changed key is refused; retrying cannot
  fix that, so the listener does not retry. ``ssh_insecure_skip_host_key_check``
  exists for throwaway test servers only and logs a warning every time it is used.
- A listener has two tunnels: its own for the LISTEN connection, one shared by the
  pool, so LISTEN/NOTIFY traffic is isolated from regular queries.

sshtunnel keeps ``tunnel_is_up`` True after the SSH session dies and binds a new
local port on every start: callers ask :meth:`SshTunnel.local_address` for the
address before every connect, and force a rebuild after a lost connection (a frozen
session still looks active).
"""

import logging
import os
import re
import select
import socket
import stat
import threading

import paramiko
import sshtunnel

from .errors import ConfigError, ConnectError

log = logging.getLogger("pgnotify_sync")
_ssh_log = logging.getLogger("pgnotify_sync.ssh")
security_log = logging.getLogger("pgnotify_sync.security")


class SshAuthError(ConnectError):
    """The SSH server refused our key. Retrying cannot fix it."""

    retryable = False


class HostKeyError(ConnectError):
    """The SSH server's host key is unknown or changed. Retrying cannot fix it."""

    retryable = False


_KEY_CLASSES = (paramiko.Ed25519Key, paramiko.ECDSAKey, paramiko.RSAKey)


def _refuse(reason, message):
    """Log a refused key on the security logger and return the ConfigError to raise.
    Every refusal goes there (README), so an operator can alert on one logger."""
    security_log.warning("refused SSH key: %s", message, extra={"event": "security", "details": {"reason": reason}})
    return ConfigError(message)


def load_private_key(path, passphrase=None):
    """Load and check a private key file; ConfigError saying what is wrong (also
    logged on ``pgnotify_sync.security``). The passphrase is never in a message."""
    var = "SSH_KEY_PATH"
    if not path:
        raise _refuse("key-missing", f"{var}: required when SSH_HOST is set (private-key authentication only)")
    path = os.path.expanduser(path)
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise _refuse("key-missing", f"{var}: key file {path} does not exist") from None
    except OSError as exc:
        raise _refuse("key-unreadable", f"{var}: cannot access key file {path}: {exc.strerror}") from None
    if not stat.S_ISREG(st.st_mode):
        raise _refuse("key-not-a-file", f"{var}: {path} is not a regular file")
    try:
        with open(path, "r", encoding="utf-8", errors="replace") as fh:
            head = fh.read(4096)
    except OSError as exc:
        raise _refuse("key-unreadable", f"{var}: cannot read key file {path}: {exc.strerror}") from None
    # What the file is comes before its mode: a .pub is usually 0644, and "run chmod
    # 600" would send the user the wrong way.
    if head.startswith(("ssh-", "ecdsa-")) or ".pub" in os.path.basename(path) and "PRIVATE KEY" not in head:
        raise _refuse("public-key", f"{var}: {path} is a public key; give the private key file")
    if "PRIVATE KEY" not in head:
        raise _refuse("not-a-key", f"{var}: {path} is not a private key file (no PRIVATE KEY block)")
    if st.st_mode & 0o077:
        raise _refuse("key-permissions", f"{var}: key file {path} is accessible by group or others (mode "
                                         f"{stat.S_IMODE(st.st_mode):04o}); private keys must not be: run chmod 600 "
                                         f"{path}")
    if "DSA PRIVATE KEY" in head and "ECDSA" not in head:
        raise _refuse("dsa-key", f"{var}: {path} is a DSA key, which is not supported; use ed25519, ECDSA or RSA")
    encrypted = False
    for cls in _KEY_CLASSES:
        try:
            return cls.from_private_key_file(path)
        except paramiko.PasswordRequiredException:
            encrypted = True
            break
        except (paramiko.SSHException, ValueError, TypeError):
            continue
    if not encrypted:
        raise _refuse("not-a-key", f"{var}: {path} is not a usable ed25519, ECDSA or RSA private key")
    if not passphrase:
        raise _refuse("key-encrypted", f"{var}: key file {path} is encrypted: set its passphrase (SSH_KEY_PASSPHRASE)")
    for cls in _KEY_CLASSES:
        try:
            return cls.from_private_key_file(path, password=passphrase)
        except (paramiko.SSHException, ValueError, TypeError):
            continue
    raise _refuse("wrong-passphrase", f"{var}: cannot decrypt key file {path}: wrong passphrase (SSH_KEY_PASSPHRASE)")


def _known_hosts_name(host, port):
    return host if port == 22 else f"[{host}]:{port}"


def load_host_key(config):
    """The server's expected host key from known_hosts, or None with the insecure opt-out."""
    if config.ssh_insecure_skip_host_key_check:
        return None             # warned by SshTunnel each time it opens a session
    path = os.path.expanduser(config.ssh_known_hosts or "~/.ssh/known_hosts")
    name = _known_hosts_name(config.ssh_host, config.ssh_port)
    scan = f"ssh-keyscan -p {config.ssh_port} {config.ssh_host} >> {path}"
    if not os.path.exists(path):
        raise ConfigError(f"SSH_KNOWN_HOSTS: {path} does not exist; verify the server's host key "
                          f"fingerprint and add it (e.g. {scan})")
    keys, revoked, authorities = _read_known_hosts(path, name)
    entry = {kind: key for kind, key in (keys.lookup(name) or {}).items() if key.get_base64() not in revoked}
    if not entry and revoked:
        security_log.warning("refused SSH server %s: its host key is marked @revoked in %s", name, path,
                             extra={"event": "security", "details": {"reason": "revoked-host-key"}})
        raise HostKeyError(f"SSH host key of {name} is marked @revoked in {path}: refusing it; verify the "
                           f"server's new key and add it")
    if not entry and authorities:
        raise HostKeyError(f"{path} trusts a certificate authority for {name} (@cert-authority), which this "
                           f"client cannot check (no host certificates in paramiko): add the host's own key "
                           f"(e.g. {scan})")
    if not entry:
        security_log.warning("refused SSH server %s: no host key in %s", name, path,
                             extra={"event": "security", "details": {"reason": "unknown-host-key"}})
        raise HostKeyError(f"SSH host {name} is not in {path}: refusing an unknown host; verify its "
                           f"fingerprint and add it (e.g. {scan})")
    for preferred in ("ssh-ed25519", "ecdsa-sha2-nistp256", "ecdsa-sha2-nistp384", "ecdsa-sha2-nistp521",
                      "rsa-sha2-512", "rsa-sha2-256", "ssh-rsa"):
        if preferred in entry:
            return entry[preferred]
    return next(iter(entry.values()))


def _read_known_hosts(path, name):
    """(paramiko.HostKeys of the plain lines, {base64 of the keys marked @revoked
    for host *name*}, whether a @cert-authority line names it). paramiko cannot
    parse marker lines (OpenSSH honours them); a malformed line is a ConfigError
    naming it."""
    keys, revoked, authorities = paramiko.HostKeys(), set(), False
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            lines = f.read().splitlines()
    except OSError as exc:
        raise ConfigError(f"SSH_KNOWN_HOSTS: cannot read {path}: {exc.strerror}") from None
    for number, line in enumerate(lines, 1):
        fields = line.split()
        if not fields or fields[0].startswith("#"):
            continue
        if fields[0].startswith("@"):
            if len(fields) < 4 or fields[0] not in ("@revoked", "@cert-authority"):
                raise ConfigError(f"SSH_KNOWN_HOSTS: {path} line {number}: unknown marker {fields[0]!r}")
            if _host_matches(name, fields[1]):
                if fields[0] == "@revoked":
                    revoked.add(fields[3])
                else:
                    authorities = True
            continue
        try:
            entry = paramiko.hostkeys.HostKeyEntry.from_line(line, number)
        except (paramiko.hostkeys.InvalidHostKey, paramiko.SSHException, ValueError) as exc:
            raise ConfigError(f"SSH_KNOWN_HOSTS: {path} line {number} is not a host key line: "
                              f"{type(exc).__name__}") from None
        if entry is not None:           # None: a key type paramiko does not know
            for host in entry.hostnames:
                keys.add(host, entry.key.get_name(), entry.key)
    return keys, revoked, authorities


def _host_matches(name, patterns):
    """OpenSSH's host patterns: comma-separated names, hashed names (``|1|``),
    ``*`` and ``?`` wildcards, ``!`` negation."""
    matched = False
    for pattern in patterns.split(","):
        negated = pattern.startswith("!")
        pattern = pattern[1:] if negated else pattern
        if pattern.startswith("|1|"):
            hit = paramiko.HostKeys.hash_host(name, pattern) == pattern
        else:       # only * and ? are special ("[host]:port" is literal)
            hit = re.fullmatch("".join(".*" if c == "*" else "." if c == "?" else re.escape(c) for c in pattern),
                               name) is not None
        if hit and negated:
            return False
        matched = matched or hit
    return matched


# SSH keepalives this often keep NAT and firewall state of an idle session (the
# health check notices a dead one; this only keeps a live one from being dropped).
SSH_KEEPALIVE_S = 5.0

# Forwarding sizes. paramiko's defaults (32 kB packets, 2 MB window) make a 100 kB
# page of rows several packets, each a wake-up of the transport thread, which in a
# busy process waits for the GIL every time (up to the 5 ms switch interval): the
# tunnel then caps a burst's delivery at ~70,000 events/s. 128 kB packets and an
# 8 MB window gave ~100,000 (bench delivery_ssh).
_CHUNK = 1 << 20
_MAX_PACKET = 1 << 17
_WINDOW = 1 << 23


# Algorithms a session may not use, whatever the server offers: CBC-mode ciphers
# (plaintext recovery attacks) and SHA-1/MD5 MACs. paramiko already offers no
# SHA-1 key exchange and no ssh-rsa/ssh-dss signatures.
WEAK_ALGORITHMS = {
    "ciphers": ["aes128-cbc", "aes192-cbc", "aes256-cbc", "3des-cbc", "blowfish-cbc", "arcfour", "arcfour128",
                "arcfour256"],
    "macs": ["hmac-sha1", "hmac-sha1-96", "hmac-md5", "hmac-md5-96"],
}


def _nodelay(sock):
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except (OSError, AttributeError):
        pass


class _Forwarder(sshtunnel.SSHTunnelForwarder):
    """Keeps the real reason a session could not be opened (sshtunnel only logs it),
    and turns Nagle's algorithm off on both hops: a query's answer otherwise waits for
    delayed ACKs (~40 ms per round trip through the tunnel)."""

    gateway_error = None

    def _make_ssh_forward_handler_class(self, remote_address_):
        base = super()._make_ssh_forward_handler_class(remote_address_)

        class Handler(base):
            def handle(self):
                _nodelay(self.request)
                super().handle()

            def _redirect(self, chan):
                # sshtunnel's loop, with bigger reads: a page of rows (~100 kB) is
                # moved in one or two passes instead of 16 kB at a time, and every
                # pass is a thread hop that waits for the GIL in a busy process.
                sock = self.request
                while chan.active:
                    ready, _, _ = select.select([sock, chan], [], [], 5)
                    if sock in ready:
                        data = sock.recv(_CHUNK)
                        if not data:
                            break
                        chan.sendall(data)
                    if chan in ready:
                        if not chan.recv_ready():
                            break
                        data = chan.recv(_CHUNK)
                        sock.sendall(data)

        return Handler

    def _connect_to_gateway(self):
        try:
            self._transport = self._get_transport()
            self._transport.disabled_algorithms = WEAK_ALGORITHMS     # read at negotiation
            _nodelay(self._transport.sock)
            self._transport.default_max_packet_size = _MAX_PACKET
            self._transport.default_window_size = _WINDOW
            self._transport.connect(hostkey=self.ssh_host_key, username=self.ssh_username,
                                    pkey=self.ssh_pkeys[0])
        except Exception as exc:
            self.gateway_error = exc
            try:
                self._stop_transport()
            except Exception:
                pass
            raise


class SshTunnel:
    """One SSH session forwarding a local port to PostgreSQL."""

    def __init__(self, config, name, key, host_key):
        self.config = config
        self.name = name
        self._key = key
        self._host_key = host_key
        self._lock = threading.Lock()
        self._forwarder = None
        self.restarts = 0

    def __repr__(self):
        return f"<SshTunnel {self.name} {self.config.ssh_user}@{self.config.ssh_host}:{self.config.ssh_port}>"

    @property
    def transport(self):
        fwd = self._forwarder
        return getattr(fwd, "_transport", None) if fwd is not None else None

    def local_address(self, fresh=False):
        """(host, port) to connect to; opens or rebuilds the tunnel when needed."""
        with self._lock:
            fwd = self._forwarder
            if fresh or fwd is None or not fwd.is_active:
                self._open_locked(rebuild=fwd is not None)
            return "127.0.0.1", self._forwarder.local_bind_port

    def _open_locked(self, rebuild):
        cfg = self.config
        self._close_locked()
        if self._host_key is None:
            # Every unverified session, rebuilt ones too: the README promises a warning
            # "every time", and each new session could be a different server.
            security_log.warning("%s: SSH host key of %s:%s is NOT verified (ssh_insecure_skip_host_key_check): "
                                 "anyone on the path can impersonate the server", self.name, cfg.ssh_host,
                                 cfg.ssh_port,
                                 extra={"event": "security", "details": {"reason": "host-key-check-disabled"}})
        fwd = _Forwarder(
            (cfg.ssh_host, cfg.ssh_port), ssh_username=cfg.ssh_user, ssh_pkey=self._key,
            ssh_host_key=self._host_key, remote_bind_address=(cfg.postgres_host, cfg.postgres_port),
            local_bind_address=("127.0.0.1", 0), allow_agent=False, host_pkey_directories=[],
            ssh_config_file=None,
            set_keepalive=SSH_KEEPALIVE_S, mute_exceptions=False, logger=_ssh_log)
        try:
            fwd.start()
        except Exception as exc:
            cause = fwd.gateway_error or exc
            try:
                fwd.stop(force=True)
            except Exception:
                pass
            raise self._translate(cause) from None
        self._forwarder = fwd
        if rebuild:
            self.restarts += 1
        log.info("%s: SSH tunnel %s %s@%s:%s -> local port %s", self.name, "rebuilt" if rebuild else "opened",
                 cfg.ssh_user, cfg.ssh_host, cfg.ssh_port, fwd.local_bind_port,
                 extra={"event": "tunnel_opened", "details": {"local_port": fwd.local_bind_port}})

    def _translate(self, exc):
        cfg = self.config
        where = f"{cfg.ssh_user}@{cfg.ssh_host}:{cfg.ssh_port}"
        if isinstance(exc, paramiko.BadHostKeyException) or "host key" in str(exc).lower():
            security_log.error("%s: SSH server %s presented a host key that does not match known_hosts",
                               self.name, where, extra={"event": "security", "details": {"reason": "host-key-mismatch"}})
            return HostKeyError(f"SSH host key of {cfg.ssh_host}:{cfg.ssh_port} does not match known_hosts: "
                                "refusing to connect (the key changed, or someone is in the middle)")
        if isinstance(exc, paramiko.AuthenticationException):
            security_log.error("%s: SSH authentication as %s refused", self.name, where,
                               extra={"event": "security", "details": {"reason": "auth-failed"}})
            return SshAuthError(f"SSH server {cfg.ssh_host}:{cfg.ssh_port} refused the key for user "
                                f"{cfg.ssh_user!r} (check SSH_USER and that the public key is authorized)")
        if isinstance(exc, paramiko.ssh_exception.IncompatiblePeer):
            security_log.error("%s: SSH server %s offers no algorithm we accept: %s", self.name, where, exc,
                               extra={"event": "security", "details": {"reason": "weak-algorithms"}})
            error = ConnectError(f"SSH server {cfg.ssh_host}:{cfg.ssh_port} offers no algorithm we accept ({exc}): "
                                 "CBC ciphers and SHA-1/MD5 MACs are refused as weak; enable aes*-ctr or "
                                 "*-gcm@openssh.com ciphers and hmac-sha2-* MACs on the server")
            error.retryable = False
            return error
        if isinstance(exc, (socket.error, EOFError, paramiko.SSHException)):
            return ConnectError(f"SSH tunnel to {where} failed: {exc or type(exc).__name__}")
        return ConnectError(f"SSH tunnel to {where} failed: {type(exc).__name__}: {exc}")

    def _close_locked(self):
        fwd, self._forwarder = self._forwarder, None
        if fwd is not None:
            try:
                # stop() on a forwarder whose session already died only logs a warning
                # about "not started" but still closes the transport.
                fwd.stop(force=True)
            except Exception as exc:
                log.debug("%s: closing SSH tunnel: %s", self.name, exc)
            log.info("%s: SSH tunnel closed", self.name, extra={"event": "tunnel_closed"})

    def close(self):
        with self._lock:
            self._close_locked()


def make_tunnels(config, name):
    """The listener's own tunnel and the pool's, sharing one checked key and host key."""
    key = load_private_key(config.ssh_key_path, config.ssh_key_passphrase)
    host_key = load_host_key(config)
    return (SshTunnel(config, f"{name}-listener-tunnel", key, host_key),
            SshTunnel(config, f"{name}-pool-tunnel", key, host_key))
