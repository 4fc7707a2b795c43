"""A small TCP proxy for fault injection (loopback only).

- ``freeze()``: existing connections stop forwarding but stay open: the kernel keeps
  ACKing, so TCP keepalives see nothing; only an application heartbeat notices.
  New connections are forwarded normally.
- ``cut()``: close every connection and refuse new ones until ``restore()``.
"""

import select
import socket
import threading


class TcpProxy:
    def __init__(self, target_host, target_port):
        self.target = (target_host, target_port)
        self._server = socket.socket()
        self._server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._server.bind(("127.0.0.1", 0))
        self._server.listen(64)
        self.port = self._server.getsockname()[1]
        self._lock = threading.Lock()
        self._pairs = []
        self._refusing = False
        self._closed = False
        self.accepted = 0       # connections accepted, refused ones included
        self._thread = threading.Thread(target=self._accept, name="tcpproxy-accept", daemon=True)
        self._thread.start()

    def _accept(self):
        while not self._closed:
            try:
                client, _ = self._server.accept()
            except OSError:
                return
            with self._lock:
                refusing = self._refusing
                self.accepted += 1
            if refusing:
                client.close()
                continue
            try:
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                client.close()
                continue
            pair = _Pair(client, upstream)
            with self._lock:
                self._pairs.append(pair)
            pair.start()

    @property
    def connections(self):
        with self._lock:
            return [p for p in self._pairs if not p.closed]

    def freeze(self):
        """Stop forwarding on every current connection (sockets stay open)."""
        with self._lock:
            for pair in self._pairs:
                pair.frozen = True

    def thaw(self):
        with self._lock:
            for pair in self._pairs:
                pair.frozen = False

    def cut(self):
        """Close every connection and refuse new ones."""
        with self._lock:
            self._refusing = True
            pairs, self._pairs = self._pairs, []
        for pair in pairs:
            pair.close()

    def restore(self):
        with self._lock:
            self._refusing = False

    def close(self):
        self._closed = True
        self.cut()
        try:
            # close() alone does not wake a thread blocked in accept() on Linux (the
            # join used to wait its whole 5 s); shutdown() does, with EINVAL.
            self._server.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._server.close()
        self._thread.join(5)
        if self._thread.is_alive():
            raise RuntimeError("tcpproxy: the accept thread did not end")


class _Pair:
    def __init__(self, a, b):
        self.a, self.b = a, b
        self.frozen = False
        self.closed = False
        self._thread = threading.Thread(target=self._pump, name="tcpproxy-pump", daemon=True)

    def start(self):
        self._thread.start()

    def _pump(self):
        socks = [self.a, self.b]
        try:
            while not self.closed:
                if self.frozen:
                    # Read nothing: the peer's kernel buffers fill, its TCP stays happy.
                    select.select([], [], [], 0.05)
                    continue
                readable, _, _ = select.select(socks, [], [], 0.05)
                for sock in readable:
                    data = sock.recv(65536)
                    if not data:
                        return
                    (self.b if sock is self.a else self.a).sendall(data)
        except OSError:
            pass
        finally:
            self.close()

    def close(self):
        self.closed = True
        for sock in (self.a, self.b):
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            try:
                sock.close()
            except OSError:
                pass
