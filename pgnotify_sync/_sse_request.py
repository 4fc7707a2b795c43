"""What the SSE bridge sees of a request (no thread, no state): the RequestInfo
handed to ``authorize`` and ``row_filter``, the default policies, the request's
headers from a WSGI environ, and the plain-text answers of refused requests.
Public names are re-exported by :mod:`pgnotify_sync.sse`."""

from .config import split_names


def allow_all(request_info):
    """An ``authorize`` that lets every client read every channel it asks for."""
    return set(request_info.requested_channels)


def refuse_all(request_info):
    """The default ``authorize``: refuses every client (pass one explicitly)."""
    return None


class RequestInfo:
    """What ``authorize`` and ``row_filter`` see of a request."""

    __slots__ = ("headers", "args", "remote_addr", "requested_channels", "environ")

    def __init__(self, headers, args, remote_addr, requested_channels, environ=None):
        self.headers = headers
        self.args = args
        self.remote_addr = remote_addr
        self.requested_channels = tuple(requested_channels)
        self.environ = environ

    def __repr__(self):
        return f"<RequestInfo {self.remote_addr} channels={list(self.requested_channels)!r}>"


class _Headers:
    """Case-insensitive, read-only view of a WSGI environ's request headers."""

    def __init__(self, environ):
        self._items = {}
        for key, value in environ.items():
            if key.startswith("HTTP_"):
                self._items[key[len("HTTP_"):].replace("_", "-").lower()] = value
            elif key in ("CONTENT_TYPE", "CONTENT_LENGTH") and value:
                self._items[key.replace("_", "-").lower()] = value

    def get(self, name, default=None):
        return self._items.get(name.lower(), default)

    def __getitem__(self, name):
        return self._items[name.lower()]

    def __contains__(self, name):
        return name.lower() in self._items

    def __iter__(self):
        return iter(self._items)

    def items(self):
        return self._items.items()

    def __repr__(self):
        return f"<headers {sorted(self._items)}>"


def _split(value):
    if not value:
        return ()
    return tuple(dict.fromkeys(c for c in split_names(value) if c))


def _plain(status, reason):
    body = (reason + "\n").encode()
    return status, [("Content-Type", "text/plain; charset=utf-8"), ("Content-Length", str(len(body)))], [body]
