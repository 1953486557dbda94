"""Determinism: the same config and seed on the CPU (``train.deterministic``) give identical results twice."""

from __future__ import annotations

import torch

from pipeline.config import config_from_dict
from pipeline.model.checkpoint import load_checkpoint
from pipeline.engine.run import train


def tiny(tmp_path, name: str) -> dict:
    return {
        "experiment": "determinism", "task": "classification", "seed": 11,
        "data": {"source": "synthetic", "synthetic_size": 48, "cache": "cache"},
        "model": {"name": "small_cnn", "channels": [8, 16]},
        "method": {"name": "dpaat", "steps": 2, "eps": 0.3, "delta": 0.1, "eps_max": 1.0},
        "train": {"epochs": 2, "batch_size": 16, "lr": 0.01, "device": "cpu", "progress": False,
                  "deterministic": True, "output_dir": str(tmp_path / name)},
        "tracking": {"run_name": name, "log_model": False},
    }


def test_same_config_and_seed_give_identical_metrics_twice(tmp_path, mlflow_uri):
    first = train(config_from_dict(tiny(tmp_path, "first")))
    second = train(config_from_dict(tiny(tmp_path, "second")))
    assert first.run_id != second.run_id
    assert {"train_loss", "val_accuracy", "eps_mean", "tau"} <= set(first.metrics)
    assert first.metrics == second.metrics                      # every metric, exactly
    a, b = load_checkpoint(first.checkpoint), load_checkpoint(second.checkpoint)
    for key in a["network"]:
        torch.testing.assert_close(a["network"][key], b["network"][key], rtol=0, atol=0, msg=key)
    torch.testing.assert_close(a["method_state"]["eps"], b["method_state"]["eps"], rtol=0, atol=0)
    assert not torch.equal(a["method_state"]["eps"], torch.full_like(a["method_state"]["eps"], 0.3))
