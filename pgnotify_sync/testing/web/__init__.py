"""The demo web page (``pgnotify-sync demo --web``) and the WSGI glue serving it.

``demo_app(bridge)`` is a plain WSGI application: ``/`` is ``index.html`` (inline
JS and CSS, no external assets), ``/events/stream`` is the SSE bridge. Any WSGI
server that runs each request in its own thread can serve it; the demo uses
werkzeug's threaded development server (:func:`make_server`).
"""

import os

_HERE = os.path.dirname(os.path.abspath(__file__))


def index_html():
    """The demo page as bytes (read from the package directory)."""
    with open(os.path.join(_HERE, "index.html"), "rb") as fh:
        return fh.read()


def demo_app(bridge, stream_path="/events/stream"):
    """WSGI app: the page at ``/``, the bridge's stream at *stream_path*."""
    page = index_html()

    def app(environ, start_response):
        path = environ.get("PATH_INFO") or "/"
        if path == stream_path:
            return bridge.wsgi_app(environ, start_response)
        if path in ("/", "/index.html"):
            start_response("200 OK", [("Content-Type", "text/html; charset=utf-8"),
                                      ("Content-Length", str(len(page))), ("Cache-Control", "no-cache")])
            return [page]
        if path == "/favicon.ico":
            start_response("204 No Content", [])
            return [b""]
        body = b"not found\n"
        start_response("404 Not Found", [("Content-Type", "text/plain; charset=utf-8"),
                                         ("Content-Length", str(len(body)))])
        return [body]

    return app


def make_server(app, host="127.0.0.1", port=0, quiet=True):
    """A threaded werkzeug server for *app* (not started); ``quiet`` drops per-request log lines."""
    from werkzeug.serving import WSGIRequestHandler, make_server as _make_server

    handler = WSGIRequestHandler
    if quiet:
        class _QuietHandler(WSGIRequestHandler):
            def log_request(self, *args, **kwargs):
                pass

        handler = _QuietHandler
    return _make_server(host, port, app, threaded=True, request_handler=handler)
