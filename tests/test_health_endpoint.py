"""The health endpoint (issue 16, part 5): health_wsgi_app and the SSE blueprint's
/health route, against a real server reached through a proxy that is then cut."""

import json

import pytest
from werkzeug.test import Client

from pgnotify_sync import install
from pgnotify_sync.metrics import health_wsgi_app
from pgnotify_sync.sse import SSEBridge

from helpers import wait_for


def answer(client, path="/"):
    response = client.get(path)
    return response.status_code, response.headers["Content-Type"], json.loads(response.get_data())


def test_health_answers_200_while_listening_then_503_when_the_database_is_gone(db, make_listener, proxy):
    install(db)
    listener = make_listener(postgres_port=proxy.port, health_check_interval_s=0.5, health_check_timeout_s=1.0)
    client = Client(health_wsgi_app(listener))
    assert answer(client)[0] == 503                     # not started yet
    listener.start()
    status, content_type, body = answer(client)
    assert (status, content_type) == (200, "application/json")
    assert body["ok"] is True and body["state"] == "LISTENING" and "messages" in body["channels"]
    proxy.cut()
    wait_for(lambda: answer(client)[0] == 503, timeout=15, message="still 200 with the database gone")
    assert answer(client)[2]["state"] in ("RECONNECTING", "CONNECTING")
    proxy.restore()
    wait_for(lambda: answer(client)[0] == 200, timeout=20, message="not 200 again after the database came back")


def test_the_sse_blueprint_serves_health(db, make_listener):
    flask = pytest.importorskip("flask")
    install(db)
    listener = make_listener()
    listener.start()
    bridge = SSEBridge(listener, channels=("messages",), authorize=lambda request, channels: True)
    app = flask.Flask(__name__)
    app.register_blueprint(bridge.blueprint(url_prefix="/events"))
    status, content_type, body = answer(app.test_client(), "/events/health")
    assert (status, content_type, body["state"]) == (200, "application/json", "LISTENING")
    listener.stop()
    assert answer(app.test_client(), "/events/health")[0] == 503
    bridge.close()
