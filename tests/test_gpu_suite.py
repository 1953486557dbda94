"""``benchmarks/gpu_suite.sh --dry-run`` on CPU: the wheel install line really installs from a local folder, and
the suite's commands answer; nothing is benchmarked here (that needs the GPU machine)."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SUITE = REPO / "benchmarks" / "gpu_suite.sh"


def make_wheel(folder: Path) -> Path:
    """A minimal pure-Python wheel (one module), written by hand: what the install line must handle offline."""
    folder.mkdir(parents=True)
    path = folder / "medrobust_probe-0.1-py3-none-any.whl"
    info = "medrobust_probe-0.1.dist-info"
    files = {
        "medrobust_probe/__init__.py": "VALUE = 42\n",
        f"{info}/METADATA": "Metadata-Version: 2.1\nName: medrobust-probe\nVersion: 0.1\n",
        f"{info}/WHEEL": "Wheel-Version: 1.0\nGenerator: hand\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    files[f"{info}/RECORD"] = "".join(f"{name},,\n" for name in [*files, f"{info}/RECORD"])
    with zipfile.ZipFile(path, "w") as archive:
        for name, text in files.items():
            archive.writestr(name, text)
    return path


def run_suite(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHON=sys.executable, OMP_NUM_THREADS="1")
    env.pop("OUT", None)
    return subprocess.run(["bash", str(SUITE), *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=180)


def test_dry_run_installs_the_wheels_and_checks_every_command(tmp_path):
    make_wheel(tmp_path / "whl")
    out = tmp_path / "out"
    result = run_suite(tmp_path, "--dry-run", "--wheels", str(tmp_path / "whl"), "--out", str(out),
                       "--data", str(tmp_path / "data"))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    log = (out / "suite.log").read_text()
    assert "install 1 wheels from" in log
    assert "commands check: benchmarks.step_cost and medrobust study answer --help" in log
    for workload in ("resnet18_224", "unet2d_256", "unet3d_96"):
        assert f"would run (step_cost {workload} bf16 channels_last, at most 100 s)" in log
    assert "--amp bf16 --channels-last --compile" in log
    assert ("would run (study" in log) == (REPO / "studies" / "dermamnist_gpu.yaml").is_file()
    assert "finished in" in log
    assert not (out / "results.tar.gz").exists()              # a dry run writes only its log


def test_missing_wheels_and_unknown_arguments_stop_with_exit_2(tmp_path):
    result = run_suite(tmp_path, "--dry-run", "--wheels", str(tmp_path / "none"), "--out", str(tmp_path / "o"))
    assert result.returncode == 2
    assert f"no wheels in '{tmp_path / 'none'}'" in result.stdout
    result = run_suite(tmp_path, "--fast")
    assert result.returncode == 2 and "unknown argument '--fast'" in result.stderr
