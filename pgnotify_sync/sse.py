"""Server-Sent Events: one shared Listener per process, fanned out to browsers.

Example (Flask; ``pip install 'pgnotify_sync[sse]'``)::

    from flask import Flask
    from pgnotify_sync import Config, Listener
    from pgnotify_sync.sse import SSEBridge

    app = Flask(__name__)
    listener = Listener(Config.from_env(channels=("messages",)))

    def authorize(request):          # -> the channels this client may read, or None
        user = current_user_from(request.headers.get("Cookie"))
        return {"messages"} if user else None

    bridge = SSEBridge(listener, ["messages"], authorize=authorize,
                       row_filter=lambda request, event: event.data.get("room") != "staff")
    app.register_blueprint(bridge.blueprint(url_prefix="/events"))
    listener.start()
    # in the page:  new EventSource("/events/stream?channels=messages")
    #               .addEventListener("messages", e => JSON.parse(e.data))
    # at shutdown:  bridge.close(); listener.stop()

Without Flask, ``bridge.wsgi_app`` is a plain WSGI application serving the
stream at whatever path it is mounted on. The server must run each request in
its own thread (werkzeug's threaded server, gunicorn ``gthread`` workers, ...):
a stream holds its thread for as long as the client stays connected.

The stream (``text/event-stream``) starts with ``retry: 1000``; each event is::

    id: <event.id>
    event: <channel>
    data: <event.to_json()>

followed by a blank line; a ``: keep-alive`` comment line is sent after
``heartbeat_s`` seconds without anything else (it also lets the server notice a
client that went away). Flask is imported only by :meth:`SSEBridge.blueprint`.

Authorization
    ``authorize(request_info)`` returns the set of channels the client may read,
    or ``None`` to refuse it (HTTP 403). ``request_info`` has ``headers``, ``args``
    (query parameters), ``remote_addr``, ``requested_channels`` and ``environ``.
    The default refuses every client: an application must decide, even if it
    decides :func:`allow_all`. ``row_filter(request_info, event) -> bool`` hides
    single events (a filter that raises hides the event and is logged). A channel
    the bridge does not serve is HTTP 404.

Fan-out and slow clients
    The listener's worker threads hand each event to the bridge once; the bridge
    puts it into every interested client's bounded queue (``client_buffer``)
    without ever waiting. A client whose queue is full is disconnected instead of
    slowing the others or growing memory (``evicted`` counts them); its browser
    reconnects by itself and resumes with ``Last-Event-ID``.

Resume (``Last-Event-ID``)
    A reconnecting ``EventSource`` sends the id of the last event it received in
    the ``Last-Event-ID`` header (``?last_event_id=N`` works too; the header wins).
    The client first gets every event delivered after event N, then the live
    stream, with no gap and no duplicate between the two:

    * If N is still in the bridge's ring of the last ``replay_limit`` delivered
      events, what follows N in the ring is replayed: exact, in delivery order.
      Delivery order is commit order, *not* id order: log ids are assigned at
      insert time, so a transaction that commits late is delivered after events
      with higher ids - which is why the ring, not an id comparison, decides.
    * Otherwise (the ring lost N: the web process restarted, or more than
      ``replay_limit`` events went by) the events with an id above N are read
      from the event log, in id order. This fallback is approximate: it misses a
      transaction that committed after N was delivered but has an id below N
      (it began earlier and committed late), and it repeats an event with an id
      above N that was delivered before N. Pages that must be exact should
      dedupe by id (the demo page does) and size ``replay_limit`` for the longest
      disconnection they want to bridge exactly.

    If the log cannot be read (database down) the stream ends at once with a
    ``: replay failed`` comment and the browser retries a second later with the
    same ``Last-Event-ID``. Events without a log id (plain payloads of foreign
    triggers) are streamed live but never replayed.

Shutdown
    :meth:`SSEBridge.close` ends every open stream (each server thread then
    returns), each with a last ``retry: 250`` so the browser comes back soon, to
    whichever process serves then, and resumes; new streams are refused with
    HTTP 503 (an ``EventSource`` does not retry a 503). Streams also end that way,
    and new ones are refused, once the listener is stopped.
    :meth:`SSEBridge.close_on_signal` does it when the server's worker is told to
    stop (SIGTERM), after a grace that lets a replacement start listening (see
    the README's gunicorn recipe). A client that went away is noticed within a
    second where the server gives the socket (gunicorn, werkzeug), else at the
    next write (an event or a heartbeat).

Layout
    This module is the facade: :class:`SSEBridge` (fan-out from the listener's
    worker threads, authorization, counters, shutdown) and the WSGI and Flask
    glue. One client's stream (its bounded queue, the replay, live events,
    heartbeats) is ``_sse_stream.py``, on the request's server thread; the
    replay ring is ``_sse_ring.py``; the constructor's argument checks are
    ``_sse_args.py``; the request's view (RequestInfo, headers, the default
    policies) is ``_sse_request.py``; the signal hook is ``_signals.py``.
"""

import itertools
import logging
import signal
import threading
import types
from urllib.parse import parse_qs

from . import _sse_stream
from ._sse_args import check_options, checked_channels, parse_last_event_id
from ._sse_request import RequestInfo, _Headers, _plain, _split, allow_all, refuse_all
from ._signals import on_signal
from ._sse_ring import ReplayRing, frame, log_replay
from .listener import ConnectionState
from .metrics import health_response

log = logging.getLogger("pgnotify_sync.sse")

__all__ = ["SSEBridge", "RequestInfo", "allow_all", "refuse_all"]

# Events queued per client before it is disconnected: bounds each client's memory
# (the queue holds shared entries); an evicted browser resumes with Last-Event-ID.
DEFAULT_CLIENT_BUFFER = 1000
# The HTML standard's advice for SSE: a comment "every 15 seconds or so" keeps
# proxies that drop idle HTTP connections from closing the stream.
DEFAULT_HEARTBEAT_S = 15.0
# Delivered events kept for an exact resume (bounds the ring's memory); a
# Last-Event-ID older than that falls back to the event log (approximate).
DEFAULT_REPLAY_LIMIT = 10000
# A resume further behind than this is told to reload (an ``event: reload`` frame)
# instead of being replayed; streams at once and replays at a time are bounded too,
# so clients cannot take the process's memory or the pool.
DEFAULT_REPLAY_MAX_EVENTS = 10000
DEFAULT_MAX_CLIENTS = 1000
# close_on_signal()'s grace: a replacement worker's listener is up well within it
# (measured in tests/test_examples.py under gunicorn), and the old worker still
# exits within 2 s.
DEFAULT_CLOSE_GRACE_S = 1.0
DEFAULT_MAX_REPLAYS = 4

_ids = itertools.count(1)


class _Refused(Exception):
    def __init__(self, status, reason):
        super().__init__(reason)
        self.status = status
        self.reason = reason


class SSEBridge:
    """Fans the events of one :class:`~pgnotify_sync.Listener` out to SSE clients.

    :param listener: the process's shared listener (started or not).
    :param channels: logical channels the bridge serves; the listener must listen on them.
    :param authorize: ``authorize(request_info) -> set of channels or None``;
        the default refuses everything (pass :func:`allow_all` for a local demo).
    :param row_filter: optional ``row_filter(request_info, event) -> bool``.
    :param client_buffer: events queued per client before it is disconnected.
    :param heartbeat_s: a ``: keep-alive`` comment after this long without output.
    :param replay_limit: delivered events kept for exact ``Last-Event-ID`` resume.
    :param replay_max_events: a resume with more events to replay gets an
        ``event: reload`` frame (its ``id`` is where the next resume starts) and live
        events from then on.
    :param max_clients: streams at once; more are refused (503).
    :param max_replays: replays from the event log at once; a resume waits up to
        10 s for one, then ends with ``: replay failed`` (the browser retries).

    A wrong argument raises :class:`~pgnotify_sync.ConfigError` naming it (for
    ``authorize`` and ``row_filter`` it is also a ``TypeError``).

    Counters: ``clients`` (connected now), ``evicted``, ``sent`` (events written
    to clients), ``replayed`` and ``replayed_from_log`` (events sent on resume).
    """

    def __init__(self, listener, channels, authorize=refuse_all, row_filter=None,
                 client_buffer=DEFAULT_CLIENT_BUFFER, heartbeat_s=DEFAULT_HEARTBEAT_S,
                 replay_limit=DEFAULT_REPLAY_LIMIT, replay_max_events=DEFAULT_REPLAY_MAX_EVENTS,
                 max_clients=DEFAULT_MAX_CLIENTS, max_replays=DEFAULT_MAX_REPLAYS):
        channels = checked_channels(listener, channels)
        check_options(authorize, row_filter, client_buffer, heartbeat_s, replay_limit, replay_max_events,
                      max_clients, max_replays)
        self.replay_max_events = replay_max_events
        self.max_clients = max_clients
        self._replay_slot = _sse_stream.ReplaySlots(max_replays)
        self.listener = listener
        self.channels = channels
        self.authorize = authorize
        self.row_filter = row_filter
        self.client_buffer = client_buffer
        self.heartbeat_s = float(heartbeat_s)
        self.replay_limit = replay_limit
        self._lock = threading.Lock()
        self._clients = {}                                   # id -> Client
        self._ring = ReplayRing(replay_limit)                # guarded by _lock
        self._closed = False
        self._closing = threading.Event()     # set: close() ends the streams now
        self.evicted = 0
        self.sent = 0
        self.user_code_errors = 0       # authorize / row_filter raised
        self.replayed = 0
        self.replayed_from_log = 0
        # What each stream (_sse_stream.StreamHooks) asks of the bridge, on its request thread.
        self._hooks = types.SimpleNamespace(
            visible=self._visible, replay_from_log=self._replay_from_log, count_sent=self._count_sent,
            forget=self._forget, stopped=lambda: _listener_stopped(self.listener), replay_slot=self._replay_slot,
            replay_max=lambda: self.replay_max_events)
        for channel in channels:
            listener.signals.event.connect(self._on_event, sender=channel, weak=False)

    def __repr__(self):
        return f"<SSEBridge channels={list(self.channels)!r} clients={self.clients}>"

    @property
    def clients(self):
        """Streams connected now."""
        return len(self._clients)

    def stats(self):
        return {"clients": self.clients, "evicted": self.evicted, "sent": self.sent, "replayed": self.replayed,
                "replayed_from_log": self.replayed_from_log, "ring": len(self._ring),
                "user_code_errors": self.user_code_errors}

    def _user_code_failed(self, what, exc, channel=None, event_id=None):
        """authorize / row_filter raised: logged (by the caller), counted, reported
        through the listener's ``error`` signal (kind ``sse``). Never under our lock."""
        with self._lock:
            self.user_code_errors += 1
        self.listener.report("sse", exc, channel, event_id=event_id, what=what)

    def close(self, grace_s=0.0):
        """End every open stream, each with a last ``retry:`` (come back in a quarter
        of a second, to whichever process serves then), and refuse new ones (503).
        Idempotent.

        *grace_s*: first keep streaming this long (this call waits). For a worker
        that begins shutting down while a replacement starts (a rolling restart):
        the replacement's listener, listening within *grace_s*, also delivers the
        streams' last events, so their resume there is exact (from its ring, see
        "Resume"). A close() meanwhile ends the wait.
        """
        if grace_s > 0 and not self._closed:
            self._closing.wait(grace_s)
        self._closing.set()
        with self._lock:
            self._closed = True
            clients = list(self._clients.values())
            self._clients.clear()
        for client in clients:
            client.end("closed")
        # One disconnect for every sender: blinker keeps a receiver disconnected only
        # sender by sender in ``receivers``, and with it this bridge and its ring.
        self.listener.signals.event.disconnect(self._on_event)

    def close_on_signal(self, signum=signal.SIGTERM, grace_s=DEFAULT_CLOSE_GRACE_S, then=None):
        """When *signum* arrives: ``close(grace_s)``, then ``then()`` (say
        ``listener.stop``), on thread ``pgnotify-sse-close`` (a signal handler must
        not take our locks), and the signal goes on to the handler installed before
        (gunicorn's: the worker stops accepting and waits for its requests, which
        end after *grace_s*). Call from the main thread once that handler is in place
        (gunicorn: in ``post_worker_init``). Returns the thread."""
        def shut():
            self.close(grace_s)
            if then is not None:
                then()
        return on_signal(signum, shut, "pgnotify-sse-close")

    # -- events from the listener (worker threads) ----------------------------------------

    def _on_event(self, channel, event=None, **_kw):
        if event is None:
            return
        framed = frame(channel, event)
        evicted = []
        with self._lock:
            if self._closed:
                return
            entry = self._ring.add(channel, event, framed)
            for client in self._clients.values():
                if channel in client.channels and not client.offer(entry):
                    evicted.append(client)
            for client in evicted:
                del self._clients[client.id]
                self.evicted += 1
        for client in evicted:
            log.warning("SSE client %s (%s) fell %d events behind: disconnected; it resumes with "
                        "Last-Event-ID", client.id, client.info.remote_addr, self.client_buffer)

    # -- requests -----------------------------------------------------------------------

    def _open(self, info, last_event_id):
        """Check the request and register the client, or raise _Refused.

        Returns ``(client, registered_at, replay)``: *replay* is the ring's events
        after *last_event_id* (None: not in the ring, read the log instead).
        """
        if self._closed or _listener_stopped(self.listener):
            raise _Refused("503 Service Unavailable", "the event stream is shut down")
        requested = info.requested_channels or self.channels
        info.requested_channels = tuple(requested)
        try:
            allowed = self.authorize(info)
        except Exception as exc:
            log.exception("SSE authorize() raised; refusing the client")
            self._user_code_failed("SSE authorize()", exc)
            raise _Refused("500 Internal Server Error", "authorization failed") from None
        if allowed is None:
            raise _Refused("403 Forbidden", "not authorized")
        for channel in requested:
            if channel not in self.channels:
                raise _Refused("404 Not Found", f"unknown channel {channel!r}")
        denied = [c for c in requested if c not in allowed]
        if denied:
            raise _Refused("403 Forbidden", f"not authorized for channel {denied[0]!r}")
        client = _sse_stream.Client(next(_ids), requested, info, self.client_buffer)
        with self._lock:
            if self._closed:
                raise _Refused("503 Service Unavailable", "the event stream is shut down")
            if len(self._clients) >= self.max_clients:
                raise _Refused("503 Service Unavailable", f"too many event streams (max_clients={self.max_clients})")
            # Registered before the replay is read: nothing falls between replay and live.
            self._clients[client.id] = client
            registered_at = self._ring.seq
            replay = None if last_event_id is None else self._ring.after(last_event_id, client.channels)
        return client, registered_at, replay

    # -- what the streams ask of the bridge (request threads; _sse_stream.StreamHooks) -------

    def _replay_from_log(self, client, after, registered_at):
        """Events above *after* from the log, page by page (_sse_ring.log_replay)."""
        def delivered_before(ids):
            with self._lock:
                return {i for i in ids if self._ring.delivered_by(i, registered_at)}
        wires = {self.listener.config.wire_channel(c): c for c in client.channels}
        return log_replay(self.listener.event_log(), wires, after, self.replay_max_events, delivered_before)

    def _visible(self, client, entry):
        if self.row_filter is None:
            return True
        try:
            return bool(self.row_filter(client.info, entry.event))
        except Exception as exc:
            log.exception("SSE row_filter raised for event %s; not sent", entry.event.id)
            self._user_code_failed("SSE row_filter()", exc, entry.event.channel, entry.event.id)
            return False

    def _count_sent(self, count, replayed_from=None):
        with self._lock:
            self.sent += count
            if replayed_from == "log":
                self.replayed_from_log += count
            elif replayed_from == "ring":
                self.replayed += count

    def _forget(self, client_id):
        """Unregister a client whose stream ended (idempotent)."""
        with self._lock:
            self._clients.pop(client_id, None)

    # -- HTTP ---------------------------------------------------------------------------

    def _serve(self, info, last_event_id_raw):
        """(status, headers, body iterable) for a stream request."""
        try:
            last_event_id = parse_last_event_id(last_event_id_raw)
        except ValueError as exc:
            return _plain("400 Bad Request", str(exc))
        try:
            client, registered_at, replay = self._open(info, last_event_id)
        except _Refused as refused:
            return _plain(refused.status, refused.reason)
        headers = [("Content-Type", "text/event-stream; charset=utf-8"), ("Cache-Control", "no-cache"),
                   ("X-Accel-Buffering", "no")]
        environ = info.environ or {}
        gone = _sse_stream.socket_gone(environ.get("gunicorn.socket") or environ.get("werkzeug.socket"))
        body = _sse_stream.stream(client, self._hooks, self.heartbeat_s, last_event_id, registered_at, replay, gone)
        return "200 OK", headers, _sse_stream.Body(body, self._forget, client.id)

    def wsgi_app(self, environ, start_response):
        """A WSGI application serving the stream (``?channels=a,b``) at any path."""
        args = {k: v[0] for k, v in parse_qs(environ.get("QUERY_STRING", ""), keep_blank_values=True).items()}
        headers = _Headers(environ)
        info = RequestInfo(headers, args, environ.get("REMOTE_ADDR"), _split(args.get("channels")), environ)
        status, response_headers, body = self._serve(
            info, headers.get("Last-Event-ID") or args.get("last_event_id"))
        start_response(status, response_headers)
        return body

    __call__ = wsgi_app

    def blueprint(self, url_prefix="/events", name="pgnotify_sse"):
        """A Flask Blueprint with the routes ``<url_prefix>/stream?channels=a,b`` and
        ``<url_prefix>/health`` (the listener's ``health()`` as JSON: 200 while it is
        LISTENING, 503 otherwise)."""
        import flask

        bp = flask.Blueprint(name, __name__, url_prefix=url_prefix)

        @bp.route("/stream")
        def stream():
            req = flask.request
            info = RequestInfo(req.headers, req.args, req.remote_addr, _split(req.args.get("channels")),
                               req.environ)
            status, headers, body = self._serve(
                info, req.headers.get("Last-Event-ID") or req.args.get("last_event_id"))
            return flask.Response(body, status=status, headers=headers)

        @bp.route("/health")
        def health():
            status, headers, body = health_response(self.listener)
            return flask.Response(body, status=status, headers=headers)

        return bp


def _listener_stopped(listener):
    # STOPPED is also the state before start(): only a listener that was stopped
    # (closed) ends the streams.
    return listener.state is ConnectionState.STOPPED and listener.closed
