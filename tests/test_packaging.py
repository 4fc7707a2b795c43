"""The built wheel, as pip would install it: the typing marker, the SQL, the
classifiers and the Python versions it claims (those the suite runs on)."""

import email
import os
import shutil
import subprocess
import sys
import zipfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_the_wheel_is_typed_and_claims_what_the_suite_runs_on(tmp_path):
    # Built from a copy: pip builds in the source tree (build/, *.egg-info).
    source = tmp_path / "src"
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(".venv", ".git", "build", "*.egg-info", "__pycache__",
                                                                 ".pytest_cache", ".tmp"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path), str(source)],
                   check=True, capture_output=True, timeout=120)
    (wheel,) = tmp_path.glob("pgnotify_sync-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        (meta_name,) = [n for n in names if n.endswith(".dist-info/METADATA")]
        meta = email.message_from_bytes(zf.read(meta_name))
    assert "pgnotify_sync/py.typed" in names
    assert "pgnotify_sync/sql/install.sql" in names
    classifiers = set(meta.get_all("Classifier"))
    assert {"Framework :: Flask", "Topic :: Database", "Typing :: Typed"} <= classifiers
    # The floor is the oldest Python the suite runs on (this machine's), and it is the one
    # we run on now: a claim no run of the suite checked would fail here.
    assert meta["Requires-Python"] == ">=3.11"
    assert sys.version_info[:2] >= (3, 11)
    assert "Programming Language :: Python :: 3.11" in classifiers
    runtime = [r for r in meta.get_all("Requires-Dist") or [] if "extra ==" not in r]
    assert runtime and not [r for r in runtime if r.lower().startswith(("gunicorn", "flask", "pytest"))]
