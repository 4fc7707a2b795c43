"""A live message board: Flask, the SSE bridge, the health endpoint and /metrics.

Run it with gunicorn (the POSTGRES_* variables name the database)::

    gunicorn -c gunicorn.conf.py app:app

``/login?user=alice`` signs in (a session cookie); ``/`` is the live page: new
messages of the lobby and of the user's own room appear as they are committed,
by whoever writes them. ``/events/stream`` is the SSE stream, ``/events/health``
and ``/health`` the listener's health (200 while it listens, 503 otherwise: the
readiness probe), ``/metrics`` Prometheus.

One listener per worker process: it is made here, at import (no thread, no
connection yet), and started in gunicorn's ``post_fork`` (gunicorn.conf.py).
"""

import os
import secrets

import flask
import psycopg2

from pgnotify_sync import Config, Listener, install, watch_table
from pgnotify_sync.metrics import health_wsgi_app, metrics_wsgi_app
from pgnotify_sync.sse import SSEBridge

CONFIG = Config.from_env(channels=("messages",))
LOBBY = "lobby"

listener = Listener(CONFIG, name="web")
app = flask.Flask(__name__)
# Every worker must sign cookies with the same key: set FLASK_SECRET_KEY in
# production (a random key per master process is fine for the example: the
# workers fork from it).
app.secret_key = os.environ.get("FLASK_SECRET_KEY") or secrets.token_hex(32)


def authorize(info):
    """The stream is for signed-in users only (the Flask session, read in the
    stream's request); it reads the messages channel."""
    user = flask.session.get("user")
    if not user:
        return None
    info.environ["example.user"] = user      # for row_filter, which runs outside the request
    return {"messages"}


def row_filter(info, event):
    """A user sees the lobby and their own room."""
    return event.data.get("room") in (LOBBY, info.environ["example.user"])


bridge = SSEBridge(listener, ["messages"], authorize=authorize, row_filter=row_filter)
app.register_blueprint(bridge.blueprint(url_prefix="/events"))
_health = health_wsgi_app(listener)
_metrics = metrics_wsgi_app()


@app.after_request
def served_by(response):
    response.headers["X-Worker-Pid"] = str(os.getpid())     # which worker answered (handy behind a balancer)
    return response


@app.route("/login")
def login():
    user = flask.request.args.get("user", "")
    if not user.isidentifier():
        return "user: letters, digits and _ only\n", 400
    flask.session["user"] = user
    return flask.redirect(flask.url_for("page"))


@app.route("/")
def page():
    if not flask.session.get("user"):
        return flask.redirect(flask.url_for("login", user="guest"))
    return PAGE.replace("{user}", flask.session["user"])


@app.route("/messages", methods=["POST"])
def post_message():
    user = flask.session.get("user")
    if not user:
        return "sign in first\n", 403
    room = flask.request.form.get("room") or LOBBY
    conn = psycopg2.connect(**CONFIG.connect_kwargs())     # a real app would use its own pool
    try:
        with conn, conn.cursor() as cur:       # psycopg2's "with conn": one transaction (it does not close)
            cur.execute("INSERT INTO messages (room, author, body) VALUES (%s, %s, %s) RETURNING id",
                        (room, user, flask.request.form.get("body", "")))
            ident = cur.fetchone()[0]
    finally:
        conn.close()
    return {"id": ident}, 201


@app.route("/health")
def health():
    return flask.Response.from_app(_health, flask.request.environ)


@app.route("/metrics")
def metrics():
    return flask.Response.from_app(_metrics, flask.request.environ)


def setup_database():
    """The table and its trigger (idempotent): run once, by gunicorn's master."""
    conn = psycopg2.connect(**CONFIG.connect_kwargs())
    try:
        install(conn)
        with conn.cursor() as cur:
            cur.execute("CREATE TABLE IF NOT EXISTS messages (id bigserial PRIMARY KEY, room text NOT NULL, "
                        "author text NOT NULL, body text NOT NULL, at timestamptz NOT NULL DEFAULT now())")
        conn.commit()
        watch_table(conn, "public.messages", channel="messages")
    finally:
        conn.close()


PAGE = """<!doctype html>
<meta charset="utf-8"><title>Messages</title>
<h1>Messages for {user}</h1>
<form id="f"><input name="body" placeholder="a message" autofocus>
  <select name="room"><option>lobby</option><option>{user}</option></select><button>Send</button></form>
<ul id="list"></ul>
<script>
const seen = new Set();          // a resume may repeat an event: show each id once
const source = new EventSource("/events/stream?channels=messages");
source.addEventListener("messages", (e) => {
  if (seen.has(e.lastEventId)) return;
  seen.add(e.lastEventId);
  const m = JSON.parse(e.data).data;
  const li = document.createElement("li");
  li.textContent = `[${m.room}] ${m.author}: ${m.body}`;
  document.getElementById("list").prepend(li);
});
document.getElementById("f").addEventListener("submit", async (e) => {
  e.preventDefault();
  await fetch("/messages", {method: "POST", body: new FormData(e.target)});
  e.target.body.value = "";
});
</script>
"""
