"""The step-cost benchmark runs end to end on CPU at tiny sizes and writes complete results.

Only that it works and what it writes are checked: timing targets are for the GPU run, never asserted here.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from benchmarks.step_cost import METHODS, WORKLOADS

REPO = Path(__file__).resolve().parents[1]


def test_step_cost_tiny_cpu_run(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    result = subprocess.run(
        [sys.executable, "-m", "benchmarks.step_cost", "--tiny", "--device", "cpu", "--iters", "2", "--warmup", "1",
         "--steps", "2", "--data", str(tmp_path / "no-data"), "--out", str(tmp_path)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    report = json.loads((tmp_path / "step_cost.json").read_text())
    assert report["settings"]["tiny"] is True and report["settings"]["steps"] == 2
    assert report["torch"] and report["device"]
    rows = {(r["workload"], r["method"]): r for r in report["rows"]}
    assert set(rows) == {(w, m) for w in WORKLOADS for m in METHODS}
    for (workload, method), row in rows.items():
        for key in ("clean_s", "attack_s", "full_s", "floor_s", "images_per_s"):
            assert row[key] > 0, (workload, method, key)
        assert row["ratio"] == row["full_s"] / row["floor_s"]
        assert row["K"] == (0 if method == "standard" else 2)
        assert row["peak_mem_mib"] is None  # CPU: no CUDA memory statistics
    for workload in WORKLOADS:
        assert rows[(workload, "standard")]["vs_monai"] > 0
        assert rows[(workload, "ima")]["vs_pgd_at"] > 0
    assert report["data_wait"] and all("skipped" in r for r in report["data_wait"])

    table = (tmp_path / "step_cost.md").read_text()
    assert report["device"] in table and f"torch {report['torch']}" in table
    assert table.count("| resnet18_224 |") == len(METHODS)


def test_data_wait_on_real_data(tmp_path, shared_data):
    """DermaMNIST through the config's CacheDataset + ThreadDataLoader: a share between 0 and 1."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    result = subprocess.run(
        [sys.executable, "-m", "benchmarks.step_cost", "--tiny", "--device", "cpu", "--iters", "2", "--warmup", "1",
         "--steps", "1", "--workloads", "unet2d_256", "--methods", "standard", "--data-methods", "standard",
         "--data", str(shared_data), "--out", str(tmp_path)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    waits = {r["dataset"]: r for r in json.loads((tmp_path / "step_cost.json").read_text())["data_wait"]}
    assert set(waits) == {"dermamnist", "isic2017"}
    for row in waits.values():
        assert "skipped" not in row
        assert 0 <= row["share"] < 1 and row["total_s"] > 0 and row["iterations"] == 2
