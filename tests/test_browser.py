"""The web demo in a real browser: Debian's headless chromium driven through
chromedriver's W3C WebDriver HTTP API with urllib (no selenium).

The page's EventSource must show rows inserted by the test, and keep doing so
across a PostgreSQL restart: rows inserted right after the server is back (while
the listener is still reconnecting) reach the page too, each exactly once.

Needs /usr/bin/chromium and /usr/bin/chromedriver (``scripts/bootstrap.sh``
installs them as root): without them the test fails, saying so (it is never skipped).
chromedriver picks its own port (``--port=0``) and says which in its log, and chromium's
DevTools port is left to chromedriver: no port is found free and then handed over.
"""

import json
import os
import re
import subprocess
import urllib.error
import urllib.request

import pytest

from helpers import wait_for
from pgutil import config_for
from pgnotify_sync.testing.demo import serve_demo

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"

MISSING = ("{path} not found, but the browser test needs it: as root, scripts/bootstrap.sh "
           "(run by scripts/test.sh) installs it; or: apt-get install chromium chromium-driver")

PAGE_IDS = "return [...document.querySelectorAll('li')].map(li => li.dataset.id)"


class WebDriver:
    """The few W3C WebDriver commands the test needs, over urllib."""

    def __init__(self, tmp_path):
        self.log_path = tmp_path / "chromedriver.log"
        self.log = open(self.log_path, "wb")
        self.proc = subprocess.Popen([CHROMEDRIVER, "--port=0"], stdout=self.log, stderr=subprocess.STDOUT)
        self.base = None
        self.session = None
        try:
            self.port = wait_for(self._port, timeout=30, message="chromedriver did not say its port")
            self.base = f"http://127.0.0.1:{self.port}"
            wait_for(self._ready, timeout=30, message="chromedriver did not start")
            args = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                    "--disable-background-networking", "--disable-component-update", "--disable-sync",
                    "--disable-dev-shm-usage", f"--user-data-dir={tmp_path / 'profile'}"]
            caps = {"capabilities": {"alwaysMatch": {
                "browserName": "chrome", "goog:chromeOptions": {"binary": CHROMIUM, "args": args}}}}
            self.session = self._call("POST", "/session", caps, timeout=60)["sessionId"]
        except BaseException:
            self.quit()
            raise

    def _port(self):
        if self.proc.poll() is not None:
            raise AssertionError(f"chromedriver exited ({self.proc.returncode}): {self.log_path.read_text()}")
        found = re.search(r"started successfully on port (\d+)", self.log_path.read_text(errors="replace"))
        return int(found.group(1)) if found else None

    def _ready(self):
        if self.proc.poll() is not None:
            raise AssertionError(f"chromedriver exited ({self.proc.returncode}): {self.log_path.read_text()}")
        try:
            return self._call("GET", "/status", timeout=2).get("ready")
        except OSError:
            return False

    def _call(self, method, path, body=None, timeout=30):
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(self.base + path, data=data, method=method,
                                         headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=timeout) as resp:
                return json.loads(resp.read())["value"]
        except urllib.error.HTTPError as exc:
            raise AssertionError(f"WebDriver {method} {path}: HTTP {exc.code}: {exc.read()[:2000]!r}") from None

    def get(self, url):
        self._call("POST", f"/session/{self.session}/url", {"url": url})

    def script(self, source, *args):
        return self._call("POST", f"/session/{self.session}/execute/sync", {"script": source, "args": list(args)})

    def quit(self):
        try:
            if self.session is not None:
                self._call("DELETE", f"/session/{self.session}", timeout=15)
        except (OSError, AssertionError):
            pass
        finally:
            self.session = None
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
            self.log.close()


@pytest.fixture
def browser(tmp_path):
    for path in (CHROMIUM, CHROMEDRIVER):
        if not os.access(path, os.X_OK):
            pytest.fail(MISSING.format(path=path), pytrace=False)
    driver = WebDriver(tmp_path)
    yield driver
    driver.quit()


def _demo_ids(pg_cluster, dbname):
    conn = pg_cluster.connect(dbname)
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT id FROM pgnotify_sync.event_log WHERE channel = 'demo' ORDER BY id")
            return [row[0] for row in cur.fetchall()]
    finally:
        conn.close()


def _write(pg_cluster, dbname, *bodies):
    conn = pg_cluster.connect(dbname)
    try:
        with conn.cursor() as cur:
            for body in bodies:
                cur.execute("INSERT INTO demo_messages (author, body, password_hash) VALUES ('test', %s, 'hash')",
                            (body,))
            cur.execute("UPDATE demo_messages SET body = body || ' (edited)' WHERE body = %s", (bodies[0],))
    finally:
        conn.close()


def test_page_shows_live_rows_across_a_postgres_restart(browser, pg_cluster, dsn, dbname):
    cfg = config_for(dsn, channels=("demo",))
    demo = serve_demo(cfg, port=0)
    try:
        browser.get(demo.url)
        wait_for(lambda: browser.script("return document.getElementById('status').textContent") == "connected",
                 timeout=30, message="the page's EventSource did not connect")
        wait_for(lambda: demo.bridge.clients == 1, message="the page's stream is not registered")

        _write(pg_cluster, dbname, "first", "second")

        def page_matches_log():
            page = browser.script(PAGE_IDS)
            return sorted(int(i) for i in page) == _demo_ids(pg_cluster, dbname) and page

        page = wait_for(page_matches_log, timeout=20, message="rows did not appear on the page")
        assert len(page) == 3

        pg_cluster.restart(mode="fast")
        _write(pg_cluster, dbname, "after restart", "while reconnecting")   # the listener is still away
        page = wait_for(page_matches_log, timeout=30, message="rows written after the restart did not appear")
        assert len(page) == 6 and len(set(page)) == 6
        # Every row is shown with its operation; the excluded column never reaches the page.
        text = browser.script("return document.getElementById('events').innerText")
        assert "INSERT" in text and "UPDATE" in text and "while reconnecting" in text
        assert "password_hash" not in text
        assert demo.listener.stats["reconnects"] >= 1
        # The page's stream stayed open through the restart (nothing had to be replayed).
        assert demo.bridge.replayed == 0 and demo.bridge.replayed_from_log == 0
    finally:
        demo.close()
