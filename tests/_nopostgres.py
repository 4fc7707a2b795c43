"""No PostgreSQL outside integration tests: the pytest plugin (loaded by tests/conftest.py) enforcing it.

While a test not marked integration is set up, runs and is torn down:
 * TemporaryCluster refuses initdb and ``pg_ctl start`` (whatever its bindir), so
   neither the test nor a session fixture it pulls in can start a server here;
 * PATH starts with a fake ``pg_config`` whose bindir holds fake initdb, pg_ctl and
   postgres that record the call and fail: subprocesses (the benchmark, the demo,
   a user's suite run by pytester) that find the binaries the usual way
   (find_pg_bindir) cannot start one either.
A test that tried fails, naming the rule, even if it caught the error.
``guard`` is the running :class:`NoPostgres` (tests/test_cluster.py looks at it).
"""

import os
import pathlib
import shlex
import shutil
import tempfile

import pytest

from pgnotify_sync.testing import ClusterError, TemporaryCluster

NOT_INTEGRATION = ("tests/conftest.py: a test not marked 'integration' tried to run the PostgreSQL "
                   "server ({what}): mark it integration (pytestmark = pytest.mark.integration), "
                   "or `pytest -m \"not integration\"` would start PostgreSQL")

_SHIM = """#!/bin/sh
# tests/conftest.py: PostgreSQL is out of reach of tests not marked integration.
echo "$(basename "$0") $*" >> {log}
echo {message} >&2
exit 97
"""

_REFUSED_COMMANDS = ("initdb", "pg_ctl start")


class NoPostgres:
    def __init__(self):
        # Not under pytest's basetemp (mode 0700): as root the cluster code runs the
        # binaries as the postgres OS user, and the fakes must run and record for it too.
        self.root = pathlib.Path(tempfile.mkdtemp(prefix="pgnotify-no-postgres-"))
        self.root.chmod(0o755)
        self.bindir = self.root / "bin"
        self.bindir.mkdir()
        self.bindir.chmod(0o755)
        self.log = self.root / "calls.log"
        self.log.write_text("")
        self.log.chmod(0o666)
        for name in ("initdb", "pg_ctl", "postgres", "pg_config"):
            if name == "pg_config":
                text = f"#!/bin/sh\necho {shlex.quote(str(self.bindir))}\n"
            else:
                text = _SHIM.format(log=shlex.quote(str(self.log)),
                                    message=shlex.quote(NOT_INTEGRATION.format(what=name)))
            (self.bindir / name).write_text(text)
            (self.bindir / name).chmod(0o755)
        self.item = None
        self.tried = []
        self._path = None
        self._log_size = 0
        self.real_run = TemporaryCluster._run
        guard = self

        def run(cluster, argv, what):
            if guard.item is not None and what in _REFUSED_COMMANDS:
                guard.tried.append(what)
                raise ClusterError(NOT_INTEGRATION.format(what=what))
            return guard.real_run(cluster, argv, what)

        TemporaryCluster._run = run

    def begin(self, item):
        if item.get_closest_marker("integration") or self.item is not None:
            return
        self.item, self.tried = item, []
        self._log_size = self.log.stat().st_size
        self._path = os.environ.get("PATH")
        os.environ["PATH"] = f"{self.bindir}{os.pathsep}{self._path or ''}"

    def violations(self):
        with open(self.log) as f:
            f.seek(self._log_size)
            return self.tried + [line for line in f.read().split("\n") if line]

    def check(self, item):
        if self.item is item and self.violations():
            tried = self.violations()
            pytest.fail(NOT_INTEGRATION.format(what=tried[0]) + f"; all: {tried}", pytrace=False)

    def end(self, item):
        if self.item is not item:
            return
        self.item = None
        if self._path is None:
            os.environ.pop("PATH", None)
        else:
            os.environ["PATH"] = self._path

    def close(self):
        TemporaryCluster._run = self.real_run
        shutil.rmtree(self.root, ignore_errors=True)


guard = None


def pytest_configure(config):
    global guard
    guard = NoPostgres()


def pytest_unconfigure(config):
    if guard is not None:
        guard.close()


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    guard.begin(item)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item):
    result = yield
    guard.check(item)
    return result


@pytest.hookimpl(wrapper=True, trylast=True)
def pytest_runtest_teardown(item, nextitem):
    try:
        return (yield)
    finally:
        guard.end(item)
