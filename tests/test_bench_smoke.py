"""The benchmark suite's --quick smoke mode runs end to end (it asserts nothing about
speed: figures belong to `python -m bench`, not to tests)."""

import os
import subprocess
import sys

import pytest

# The benchmark starts a throwaway PostgreSQL of its own (in its subprocess).
pytestmark = pytest.mark.integration

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.timeout(300)
def test_bench_quick_smoke_runs(tmp_path):
    out = tmp_path / "quick.json"
    proc = subprocess.run([sys.executable, "-m", "bench", "--quick", "--plot", "none", "--json", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=280)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "writer_bulk" in proc.stdout and "delivery" in proc.stdout and "catchup" in proc.stdout
    assert out.exists()
