"""Crash and resume: ``medrobust train`` killed with SIGKILL mid-epoch, resumed with ``--resume``, ends exactly
where an uninterrupted run ends (per-sample eps, network, per-epoch metrics), with determinism on, on the CPU.

The interrupted run is a real subprocess of the CLI writing a checkpoint every iteration; the test waits
until a checkpoint from the middle of the last epoch is on disk and kills the process without warning, then
resumes through the CLI's entry point with ``--resume`` (in this process, to spare an interpreter start).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest
import torch
import yaml

from pipeline.cli import main
from pipeline.config import config_from_dict
from pipeline.model.checkpoint import load_checkpoint
from pipeline.engine.run import train

REPO = Path(__file__).resolve().parents[1]
EPOCHS = 2
EPOCH_METRICS = ["train_loss", "train_clean_loss", "train_adv_loss_sum", "train_found_frac", "eps_mean", "eps_p90",
                 "found_frac", "correct_frac", "val_accuracy", "val_balanced_accuracy"]


def resume_config(out: Path) -> dict:
    return {
        "experiment": "resume", "task": "classification", "seed": 5,
        "data": {"source": "synthetic", "synthetic_size": 100, "cache": "none"},
        "model": {"name": "small_cnn", "channels": [8, 16]},
        "method": {"name": "ima", "steps": 4, "delta": 0.1, "eps_max": 1.0, "bisection_steps": 4},
        "train": {"epochs": EPOCHS, "batch_size": 8, "lr": 0.01, "device": "cpu", "progress": False,
                  "deterministic": True, "checkpoint_every_iters": 1, "scheduler": "cosine",
                  "output_dir": str(out)},
        "tracking": {"run_name": "resume", "log_model": False},
    }


def cli_env(uri: str) -> dict[str, str]:
    """The child's environment: this test's own MLflow store, one thread (as in the parent), no stale URI."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env.update(MLFLOW_TRACKING_URI=uri, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONPATH=str(REPO))
    return env


def epoch_histories(uri: str, run_id: str) -> dict[str, dict[int, float]]:
    client = mlflow.MlflowClient(uri)
    return {key: {m.step: m.value for m in client.get_metric_history(run_id, key)} for key in EPOCH_METRICS}


@pytest.mark.slow
def test_sigkill_mid_epoch_then_resume_equals_uninterrupted_run(tmp_path, mlflow_uri, monkeypatch):
    reference = train(config_from_dict(resume_config(tmp_path / "reference")))

    out = tmp_path / "killed"
    cfg_file = tmp_path / "resume.yaml"
    cfg_file.write_text(yaml.safe_dump(resume_config(out)))
    uri = mlflow_uri   # one store for both runs (its tables are created once)
    last = out / "checkpoints" / "last.pt"
    proc = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "train", str(cfg_file)], cwd=tmp_path,
                            env=cli_env(uri), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    epoch_length = None
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            if last.exists():
                ckpt = load_checkpoint(last)
                epoch_length = epoch_length or -(-ckpt["data"]["n_train"] // 8)
                if ckpt["epoch"] == EPOCHS and 0 < ckpt["iteration"] - (EPOCHS - 1) * epoch_length < epoch_length - 2:
                    proc.send_signal(signal.SIGKILL)   # mid-way through the last epoch, without warning
                    break
            time.sleep(0.01)
    finally:
        if proc.poll() is None and time.monotonic() >= deadline:
            proc.kill()
        output = proc.communicate(timeout=60)[0].decode(errors="replace")
    assert proc.returncode == -signal.SIGKILL, f"training was not killed mid-epoch:\n{output[-3000:]}"

    interrupted = load_checkpoint(last)
    done = interrupted["iteration"] - (EPOCHS - 1) * epoch_length
    assert interrupted["epoch"] == EPOCHS and 0 < done < epoch_length    # a mid-epoch checkpoint
    assert {"optimizer", "scheduler", "method_state", "rng", "batch_averages"} <= set(interrupted)
    assert interrupted["scheduler"]["last_epoch"] == EPOCHS - 1

    # the CLI's own entry point with --resume, in this process (a second interpreter start costs seconds)
    monkeypatch.chdir(tmp_path)
    assert main(["train", str(cfg_file), "--resume", str(last)]) == 0

    a, b = load_checkpoint(reference.checkpoint), load_checkpoint(last)
    assert a["iteration"] == b["iteration"] == EPOCHS * epoch_length
    assert b["mlflow_run_id"] == interrupted["mlflow_run_id"]          # the same MLflow run continued
    torch.testing.assert_close(a["method_state"]["eps"], b["method_state"]["eps"], rtol=0, atol=0)
    assert not torch.equal(a["method_state"]["eps"], torch.full_like(a["method_state"]["eps"], 0.03))
    for key in a["network"]:
        torch.testing.assert_close(a["network"][key], b["network"][key], rtol=0, atol=0, msg=key)

    want = epoch_histories(uri, reference.run_id)
    got = epoch_histories(uri, b["mlflow_run_id"])
    for key in EPOCH_METRICS:
        assert sorted(want[key]) == list(range(1, EPOCHS + 1)), key
        assert got[key] == want[key], key
    assert mlflow.MlflowClient(uri).get_run(b["mlflow_run_id"]).info.status == "FINISHED"
