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
                             "--step-cache", "--json", str(out)], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(out.read_text())
    row = report["rows"][0]
    assert row["size"] == 64 and row["diffusers_s"] > 0 and row["ours_cold_s"] > 0 and row["dit_step_ms"] > 0
    assert "| 64 | 2 |" in result.stdout
    assert row["psnr_db"] > 25  # ours in dtype=auto against the float32 baseline (inf where auto is float32)
    assert row["diffusers_same_dtype_s"] > 0 and row["ours_no_text_cache_s"] > 0
    assert row["diffusers_passes"] == row["ours_passes"] == 2  # one transformer pass per step, guidance included
    caches = {r["step_cache"]: r for r in report["step_cache"]}
    assert caches["off"]["passes"] == 20 and caches["taylorseer"]["passes"] == caches["taylorseer-lite"]["passes"] == 11
    # (1 warm-up step, every 2nd, the last 2)
    assert caches["off"]["speedup"] == 1 and "| taylorseer | 64 | 20 |" in result.stdout
    assert [r["batch"] for r in report["batching"]] == [1, 2]
    modes = {r["mode"]: r for r in report["memory_modes"]}
    assert set(modes) == {"resident", "text-offload", "model-offload", "sequential-offload"}
    assert all(r["same_pixels"] for r in modes.values())


@pytest.mark.slow
def test_training_benchmark_times_the_variants_against_the_fp32_baseline(tmp_path):
    out = tmp_path / "training.json"
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "demo_training.py"),
                             "--variants", "fp32 eager,bf16 eager", "--rounds", "2", "--steps", "1", "--warmup", "1",
                             "--batch-size", "4", "--json", str(out)], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    rows = {row["variant"]: row for row in json.loads(out.read_text())["rows"]}
    assert set(rows) == {"fp32 eager", "bf16 eager"}
    assert rows["fp32 eager"]["speedup"] == 1 and rows["bf16 eager"]["speedup"] > 0
    assert all(len(row["rounds"]) == 2 and row["s_per_step"] > 0 for row in rows.values())
    assert "| fp32 eager |" in result.stdout and "| bf16 eager |" in result.stdout


def test_training_benchmark_names_the_valid_variants_for_a_wrong_one():
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "demo_training.py"), "--variants", "fp16"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "unknown ['fp16']" in result.stderr and "bf16 compiled" in result.stderr
