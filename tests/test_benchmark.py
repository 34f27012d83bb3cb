"""The benchmark script runs end to end (at a smoke size), so a GPU session finds it working."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_benchmark_script_runs_and_reports_both_paths(tmp_path):
    out = tmp_path / "rows.json"
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "benchmark.py"), "--preset", "smoke",
                             "--json", str(out)], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(out.read_text())
    row = report["rows"][0]
    assert row["size"] == 64 and row["diffusers_s"] > 0 and row["ours_cold_s"] > 0 and row["dit_step_ms"] > 0
    assert "| 64² | 2 |" in result.stdout
