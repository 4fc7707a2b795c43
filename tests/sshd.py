"""A throwaway OpenSSH server on a free 127.0.0.1 port for the SSH-tunnel tests.

``SshServer(base_dir)`` generates an ed25519 host key and an ed25519 client key pair
(no passphrase, mode 0600), writes ``sshd_config`` (see docs/TESTING.md, "sshd on a
free loopback port"), an ``authorized_keys`` holding the client key and a
``known_hosts`` line for ``[127.0.0.1]:<port>``.  ``start()`` runs
``/usr/sbin/sshd -D -e -f sshd_config`` as a Popen child and returns once the port
answers an SSH banner.  The listener's stderr (LogLevel VERBOSE) is collected by a
thread, so the pipe never fills up; ``log_text()`` returns it.

Fault injection works on *sessions*: the per-connection sshd processes, which are
children of the listening sshd (each holds the server side of one TCP connection).

- ``session_for_client_port(port)`` maps a client's local port (for sshtunnel:
  ``forwarder._transport.sock.getsockname()[1]``) to its session pid.
- ``kill_session(pid)`` SIGKILLs it (client sees the connection close within ms).
- ``freeze_session(pid)`` / ``thaw_session(pid)`` SIGSTOP / SIGCONT it: sockets stay
  open, nothing is answered (only a heartbeat with a deadline notices).

kill/freeze/thaw act on the session process *and its descendants* (privilege-
separated children), so the process actually holding the socket is always hit.
They refuse pids that are not sessions of this server, so a stale pid can never
hit an unrelated process.

``stop()`` SIGKILLs every session (frozen ones included: SIGKILL ends a stopped
process), terminates the listener and waits; it is idempotent.  ``restart()`` is
``stop()`` + ``start()`` on the same port, with the same host key, so known_hosts
stays valid.

Paths are ``str`` (sshtunnel's ``ssh_pkey`` treats only ``str`` as a key file name).
"""

import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import weakref
from pathlib import Path

SSHD_PATH = "/usr/sbin/sshd"
SSH_KEYGEN = "ssh-keygen"

MISSING_SSHD_HINT = ("scripts/bootstrap.sh installs openssh-server "
                     "(or: apt-get install -y openssh-server)")

START_TIMEOUT = 10.0     # seconds for sshd to answer an SSH banner
STOP_TIMEOUT = 5.0       # seconds for processes to go away after a signal


def _free_port(host):
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _proc_stat(pid):
    """(ppid, state) of ``pid`` from /proc, or None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    # "pid (comm) state ppid ..." - comm may contain spaces and parentheses.
    rest = data[data.rindex(b")") + 2:].split()
    return int(rest[1]), rest[0].decode()


def _proc_table():
    """{pid: (ppid, state)} for every process currently visible in /proc."""
    table = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            st = _proc_stat(int(name))
            if st is not None:
                table[int(name)] = st
    return table


def _comm(pid):
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip()
    except OSError:
        return ""


def _socket_inodes(pid):
    """Set of socket inodes open in ``pid`` (empty if it is gone)."""
    inodes = set()
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return inodes
    for fd in fds:
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(int(target[8:-1]))
    return inodes


def _alive(pid):
    """True while ``pid`` exists and is not a zombie."""
    st = _proc_stat(pid)
    return st is not None and st[1] != "Z"


def _hex_addr(ip, port):
    """An IPv4 address as /proc/net/tcp spells it (host byte order), e.g. 0100007F:1F90."""
    return "%08X:%04X" % (int.from_bytes(socket.inet_aton(ip), sys.byteorder), port)


def _sshd_version(sshd_path):
    """(major, minor) of the OpenSSH server, or (0, 0) if it cannot be told."""
    try:
        out = subprocess.run([sshd_path, "-V"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return (0, 0)
    m = re.search(r"OpenSSH_(\d+)\.(\d+)", out.stdout + out.stderr)
    return (int(m.group(1)), int(m.group(2))) if m else (0, 0)


def _emergency_stop(proc):
    """Finalizer: if the owner forgot stop() (crash, interpreter exit), leave nothing running."""
    if proc.poll() is not None:
        return
    table = _proc_table()
    todo, victims = [proc.pid], []
    while todo:
        parent = todo.pop()
        kids = [p for p, (pp, _) in table.items() if pp == parent]
        victims += kids
        todo += kids
    for p in victims:
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.kill()
    try:
        proc.wait(STOP_TIMEOUT)
    except subprocess.TimeoutExpired:
        pass


class SshServer:
    """A throwaway OpenSSH server on a free 127.0.0.1 port, run as a Popen child (sshd -D -e -f cfg)."""

    host = "127.0.0.1"
    user = "root"

    def __init__(self, base_dir, sshd_path=SSHD_PATH, port=None):
        if not os.access(sshd_path, os.X_OK):
            raise FileNotFoundError(f"{sshd_path} not found: {MISSING_SSHD_HINT}")
        self.sshd_path = sshd_path
        self.base_dir = Path(base_dir)
        self.base_dir.mkdir(parents=True, exist_ok=True)
        self._keys_dir = self.base_dir / "keys"
        self._keys_dir.mkdir(exist_ok=True)

        # Port chosen by us; re-chosen only if another process grabs it before the
        # very first start (after that the port is fixed: known_hosts names it).
        self._port_fixed = port is not None
        self.port = port if port is not None else _free_port(self.host)

        host_key = self.base_dir / "host_ed25519"
        client_key = self.base_dir / "client_ed25519"
        self._keygen(host_key, "ed25519", "", comment="pgnotify-sync-test-host")
        self._keygen(client_key, "ed25519", "", comment="pgnotify-sync-test-client")
        os.chmod(client_key, 0o600)

        self.host_key_path = str(host_key)
        self.host_pub_path = str(host_key) + ".pub"
        self.client_key_path = str(client_key)
        self.client_pub_path = str(client_key) + ".pub"
        self.authorized_keys_path = str(self.base_dir / "authorized_keys")
        self.known_hosts_path = str(self.base_dir / "known_hosts")
        self.config_path = str(self.base_dir / "sshd_config")

        Path(self.authorized_keys_path).write_text("")
        self.authorize(self.client_pub_path)
        self._version = _sshd_version(sshd_path)
        self._write_port_files()
        # Privilege-separation chroot directory; must be root-owned, not writable by others.
        os.makedirs("/run/sshd", mode=0o755, exist_ok=True)

        self._proc = None
        self._reader = None
        self._finalizer = None
        self._log = []               # stderr lines of every sshd run, in order
        self._frozen = set()         # pids we SIGSTOPped and have not SIGCONTed yet
        self._lock = threading.RLock()

    # -- files --------------------------------------------------------------------

    def _keygen(self, path, key_type, passphrase, comment="", bits=None, kdf_rounds=None):
        cmd = [SSH_KEYGEN, "-q", "-t", key_type, "-N", passphrase, "-C", comment, "-f", str(path)]
        if bits is not None:
            cmd[4:4] = ["-b", str(bits)]
        if kdf_rounds is not None:
            cmd[4:4] = ["-a", str(kdf_rounds)]
        res = subprocess.run(cmd, capture_output=True, text=True, stdin=subprocess.DEVNULL)
        if res.returncode != 0:
            raise RuntimeError(f"ssh-keygen failed ({res.returncode}): {' '.join(cmd)}\n"
                               f"{res.stderr.strip()}")

    def _write_port_files(self):
        lines = [
            f"Port {self.port}",
            f"ListenAddress {self.host}",
            "AddressFamily inet",
            f"HostKey {self.host_key_path}",
            "PidFile none",
            f"AuthorizedKeysFile {self.authorized_keys_path}",
            "PasswordAuthentication no",
            "KbdInteractiveAuthentication no",
            "UsePAM no",
            "PermitRootLogin prohibit-password",
            "AllowTcpForwarding yes",
            "StrictModes no",
            "X11Forwarding no",
            "ClientAliveInterval 0",
            "MaxStartups 100",
            "MaxSessions 100",
            "LogLevel VERBOSE",
        ]
        if self._version >= (9, 8):
            # Newer sshd penalises a source address whose sessions crash or are
            # killed; the tests kill sessions on purpose, all from 127.0.0.1.
            lines.append("PerSourcePenalties no")
        Path(self.config_path).write_text("\n".join(lines) + "\n")
        host_pub = Path(self.host_pub_path).read_text().split()
        Path(self.known_hosts_path).write_text(
            f"[{self.host}]:{self.port} {host_pub[0]} {host_pub[1]}\n")

    def make_key(self, name, key_type="ed25519", passphrase="", mode=0o600, authorize=False,
                 bits=None, kdf_rounds=None):
        """Generate an extra client key ``keys/<name>`` (+ ``.pub``) and return its path.

        Not authorized unless ``authorize=True``.  ``mode`` is applied to the private
        key file.  RSA keys default to 2048 bits (fast to generate).  ``kdf_rounds``
        (ssh-keygen -a) sets the bcrypt rounds of a passphrase: the default 16 costs
        ~0.2 s at every load; 1 is plenty for a test.
        """
        if not name or "/" in name or name.startswith("."):
            raise ValueError(f"bad key name {name!r}")
        path = self._keys_dir / name
        if path.exists():
            raise FileExistsError(str(path))
        if bits is None and key_type == "rsa":
            bits = 2048
        self._keygen(path, key_type, passphrase, comment=f"pgnotify-sync-test-{name}", bits=bits,
                     kdf_rounds=kdf_rounds)
        os.chmod(path, mode)
        if authorize:
            self.authorize(str(path) + ".pub")
        return str(path)

    def authorize(self, pub_path, options=""):
        """Append a public key to authorized_keys (sshd reads it at each login: no restart)."""
        key = Path(pub_path).read_text().strip()
        line = f"{options} {key}" if options else key
        with open(self.authorized_keys_path, "a") as f:
            f.write(line + "\n")

    def client_pkey(self):
        """The client private key as a paramiko key object."""
        import paramiko
        return paramiko.Ed25519Key.from_private_key_file(self.client_key_path)

    # -- lifecycle ----------------------------------------------------------------

    @property
    def pid(self):
        """The listening sshd's pid while it runs, else None."""
        proc = self._proc
        return proc.pid if proc is not None and proc.poll() is None else None

    @property
    def running(self):
        return self.pid is not None

    def start(self):
        """Start sshd (no-op if it runs) and wait until it answers an SSH banner.

        Raises RuntimeError with the tail of sshd's stderr if it does not come up
        within 10 s.
        """
        with self._lock:
            if self.running:
                return
            if self._proc is not None:
                self.stop()  # the listener died on its own: clear up its sessions
            for _ in range(5):
                try:
                    self._start_once()
                    return
                except _PortTaken:
                    if self._port_fixed:
                        raise RuntimeError(
                            f"sshd could not listen on {self.host}:{self.port}: address already "
                            f"in use\n{self._tail()}") from None
                    self.port = _free_port(self.host)
                    self._write_port_files()
            raise RuntimeError(f"sshd found no free port after 5 tries\n{self._tail()}")

    def _start_once(self):
        log_start = len(self._log)
        self._log.append(f"# tests/sshd.py: starting {self.sshd_path} on {self.host}:{self.port}")
        proc = subprocess.Popen(
            [self.sshd_path, "-D", "-e", "-f", self.config_path],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        reader = threading.Thread(target=self._pump, args=(proc.stderr,),
                                  name=f"sshd-stderr-{proc.pid}", daemon=True)
        reader.start()
        self._proc, self._reader = proc, reader
        self._finalizer = weakref.finalize(self, _emergency_stop, proc)
        started = time.monotonic()
        deadline = started + START_TIMEOUT
        while True:
            if proc.poll() is not None:
                reader.join(2.0)
                self._proc = self._reader = None
                self._finalizer.detach()
                if any("Address already in use" in line for line in self._log[log_start:]):
                    raise _PortTaken()
                raise RuntimeError(f"sshd exited with code {proc.returncode} while starting "
                                   f"(config {self.config_path}):\n{self._tail()}")
            # Probe once sshd says it listens (or after 1 s, should that line change):
            # probing earlier could reach whoever else holds the port.
            listening = any(line.startswith("Server listening on") for line in self._log[log_start:])
            if (listening or time.monotonic() - started > 1.0) and self._answers_banner(deadline):
                self._port_fixed = True
                return
            if time.monotonic() >= deadline:
                self.stop()
                raise RuntimeError(f"sshd did not answer an SSH banner on {self.host}:{self.port} "
                                   f"within {START_TIMEOUT:g}s:\n{self._tail()}")
            time.sleep(0.01)

    def _answers_banner(self, deadline):
        try:
            # Short per-probe timeout: the loop must get back to checking whether sshd
            # exited (e.g. someone else's listener holds the port and never answers).
            timeout = min(0.5, max(0.05, deadline - time.monotonic()))
            with socket.create_connection((self.host, self.port), timeout=timeout) as s:
                data = b""
                while b"\n" not in data and len(data) < 512:
                    chunk = s.recv(512)
                    if not chunk:
                        break
                    data += chunk
                ok = data.startswith(b"SSH-")
                if ok:
                    # Say hello back so sshd logs a clean close rather than a bad banner.
                    try:
                        s.sendall(b"SSH-2.0-tests_sshd_probe\r\n")
                    except OSError:
                        pass
                return ok
        except OSError:
            return False

    def _pump(self, stream):
        try:
            for raw in iter(stream.readline, b""):
                self._log.append(raw.decode("utf-8", "replace").rstrip("\r\n"))
        finally:
            stream.close()

    def stop(self):
        """SIGKILL every session (frozen or not), terminate the listener, wait. Idempotent."""
        with self._lock:
            proc, reader = self._proc, self._reader
            if proc is None:
                return
            # Sessions first, while the listener is alive to reap them.
            self._kill_pids(self._all_session_pids(include_orphans=proc.poll() is not None))
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(STOP_TIMEOUT)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
            # Sessions accepted between the scan and the listener's exit are orphans now.
            self._kill_pids(self._all_session_pids(include_orphans=True))
            self._frozen.clear()
            if self._finalizer is not None:
                self._finalizer.detach()
            if reader is not None:
                reader.join(STOP_TIMEOUT)  # EOF once every holder of the pipe is gone
            self._proc = self._reader = None
            self._log.append(f"# tests/sshd.py: stopped (exit code {proc.returncode})")

    def restart(self):
        """stop() + start() on the same port (same host key: known_hosts stays valid)."""
        with self._lock:
            self.stop()
            self.start()

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc):
        self.stop()

    def __repr__(self):
        return f"<SshServer {self.host}:{self.port} pid={self.pid}>"

    # -- sessions -----------------------------------------------------------------

    def sessions(self):
        """Pids of the per-connection sshd processes (children of the listener), sorted.

        Includes pre-authentication connections (e.g. the start-up banner probe,
        for the few ms until it closes) and frozen sessions; excludes zombies.
        """
        listener = self.pid
        if listener is None:
            return []
        return sorted(pid for pid, (ppid, state) in _proc_table().items()
                      if ppid == listener and state != "Z")

    def frozen_sessions(self):
        """Sessions of which some process is stopped (SIGSTOP), sorted."""
        table = _proc_table()
        return [s for s in self.sessions()
                if any(table.get(p, (0, ""))[1] in ("T", "t") for p in [s] + self._descendants(s, table))]

    def session_for_client_port(self, client_port):
        """The session pid serving the TCP connection whose client side is 127.0.0.1:client_port.

        Looks the connection up in /proc/net/tcp (local 127.0.0.1:<sshd port>, remote
        127.0.0.1:client_port), then finds the session whose process tree has that
        socket open.  None if there is no such connection or session (yet).
        """
        inode = self._server_socket_inode(client_port)
        if inode is None:
            return None
        table = _proc_table()
        for session in self.sessions():
            for pid in [session] + self._descendants(session, table):
                if inode in _socket_inodes(pid):
                    return session
        return None

    def kill_session(self, pid):
        """SIGKILL a session (and its children); returns once they are dead."""
        victims = self._session_tree(pid)
        self._kill_pids(victims)
        with self._lock:
            self._frozen.difference_update(victims)

    def freeze_session(self, pid):
        """SIGSTOP a session (and its children); returns once they are stopped."""
        victims = self._session_tree(pid)
        with self._lock:
            self._frozen.update(victims)
        for p in victims:
            self._signal(p, signal.SIGSTOP)
        self._wait(lambda: all(_proc_stat(p) is None or _proc_stat(p)[1] in ("T", "t", "Z")
                               for p in victims), f"session {pid} to stop")

    def thaw_session(self, pid):
        """SIGCONT a frozen session (and its children). No-op for a session that is gone."""
        with self._lock:
            self._frozen.discard(pid)
        table = _proc_table()
        if not self._is_ours(pid, table):
            return
        for p in [pid] + self._descendants(pid, table):
            self._signal(p, signal.SIGCONT)
            with self._lock:
                self._frozen.discard(p)

    def thaw_all(self):
        """SIGCONT every stopped process of every session; returns the sessions thawed."""
        table = _proc_table()
        thawed = []
        for s in self.sessions():
            procs = [s] + self._descendants(s, table)
            stopped = [p for p in procs if table.get(p, (0, ""))[1] in ("T", "t") or p in self._frozen]
            for p in stopped:
                self._signal(p, signal.SIGCONT)
            if stopped:
                thawed.append(s)
        with self._lock:
            self._frozen.clear()
        return thawed

    def log_text(self):
        """sshd's stderr so far, all runs (lines starting '# tests/sshd.py:' mark start/stop)."""
        return "\n".join(list(self._log))

    # -- internals ----------------------------------------------------------------

    def _tail(self, n=25):
        return "\n".join(list(self._log)[-n:]) or "(sshd wrote nothing to stderr)"

    @staticmethod
    def _descendants(pid, table):
        out, todo = [], [pid]
        while todo:
            parent = todo.pop()
            kids = [p for p, (pp, _) in table.items() if pp == parent]
            out.extend(kids)
            todo.extend(kids)
        return out

    def _session_tree(self, pid):
        """{pid} plus its descendants; LookupError unless pid is a live session of ours."""
        sessions = self.sessions()
        if pid not in sessions:
            raise LookupError(f"pid {pid} is not a session of {self!r} (sessions: {sessions})")
        return {pid} | set(self._descendants(pid, _proc_table()))

    def _is_ours(self, pid, table):
        listener = self.pid
        p = pid
        for _ in range(16):
            st = table.get(p)
            if st is None:
                return False
            if st[0] == listener:
                return True
            p = st[0]
        return False

    def _server_inodes(self):
        """Inodes of the established server-side sockets of our port."""
        local = _hex_addr(self.host, self.port)
        inodes = set()
        for line in self._tcp_lines():
            f = line.split()
            if f[1] == local and f[3] != "0A" and int(f[9]):
                inodes.add(int(f[9]))
        return inodes

    def _server_socket_inode(self, client_port):
        local = _hex_addr(self.host, self.port)
        remote = _hex_addr(self.host, client_port)
        for line in self._tcp_lines():
            f = line.split()
            if f[1] == local and f[2] == remote and int(f[9]):
                return int(f[9])
        return None

    @staticmethod
    def _tcp_lines():
        with open("/proc/net/tcp") as fh:
            return fh.read().splitlines()[1:]

    def _all_session_pids(self, include_orphans):
        """Every process of every session: the listener's subtree and, if asked, any
        sshd process holding a server-side socket of our port (sessions orphaned by a
        listener that died)."""
        table = _proc_table()
        pids = set()
        listener = self.pid  # None once it exited: its old pid may belong to anyone now
        if listener is not None:
            pids.update(self._descendants(listener, table))
        if include_orphans:
            inodes = self._server_inodes()
            if inodes:
                for pid in table:
                    if pid != os.getpid() and _comm(pid).startswith("sshd") \
                            and _socket_inodes(pid) & inodes:
                        pids.add(pid)
                        pids.update(self._descendants(pid, table))
        pids.discard(os.getpid())
        return pids

    def _kill_pids(self, pids):
        # SIGKILL ends stopped processes too (no SIGCONT needed).
        for p in pids:
            self._signal(p, signal.SIGKILL)
        self._wait(lambda: not any(_alive(p) for p in pids), f"pids {sorted(pids)} to die")

    @staticmethod
    def _signal(pid, sig):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass

    @staticmethod
    def _wait(predicate, what, timeout=STOP_TIMEOUT):
        deadline = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() >= deadline:
                raise RuntimeError(f"timed out after {timeout:g}s waiting for {what}")
            time.sleep(0.002)


class _PortTaken(Exception):
    """sshd could not bind its port (another process took it)."""
