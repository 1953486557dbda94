"""Numerical faults: a NaN/inf loss, or an attack that produces non-finite inputs, stops training with a message
naming the epoch, the iteration and the method (exit code 3 from the CLI); the checkpoint left on disk is the
last good one (finite weights, written before the faulty step).
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import mlflow
import pytest
import torch
import yaml
from torch import nn

import pipeline.engine.run as run_module
from pipeline.cli import main
from pipeline.config import config_from_dict, method_knobs
from pipeline.model.checkpoint import load_checkpoint
from pipeline.engine.run import train
from pipeline.errors import NumericalFault

WHERE = re.compile(r"at epoch (\d+), iteration (\d+) \(method (\w+)\)")


def fault_config(out: Path, method: str, lr: float, epochs: int = 1, every: int = 1) -> dict:
    return {
        "experiment": "faults", "task": "classification", "seed": 2,
        "data": {"source": "synthetic", "synthetic_size": 64, "cache": "none"},
        "model": {"name": "small_cnn", "channels": [8, 16]},
        "method": method_knobs(method, steps=2, eps=0.3),
        "train": {"epochs": epochs, "batch_size": 8, "lr": lr, "device": "cpu", "progress": False,
                  "checkpoint_every_iters": every, "output_dir": str(out)},
        "tracking": {"run_name": f"fault-{method}"},
    }


def assert_all_finite(state: dict) -> None:
    for key, value in state.items():
        if isinstance(value, torch.Tensor) and value.is_floating_point():
            assert torch.isfinite(value).all(), key


def test_nan_loss_stops_the_cli_with_exit_3_and_keeps_the_last_good_checkpoint(tmp_path, mlflow_uri, capsys,
                                                                                monkeypatch):
    """A huge learning rate blows the weights up: the loss of a following step is inf/NaN."""
    out = tmp_path / "out"
    cfg = tmp_path / "nan.yaml"
    cfg.write_text(yaml.safe_dump(fault_config(out, "standard", lr=1e30)))
    monkeypatch.chdir(tmp_path)
    assert main(["train", str(cfg)]) == 3          # the CLI's entry point (in this process: no interpreter start)
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert "medrobust: stopped: non-finite training loss" in err and "last good checkpoint is kept" in err
    epoch, iteration, method = WHERE.search(err).groups()
    assert (epoch, method) == ("1", "standard") and int(iteration) >= 2

    ckpt = load_checkpoint(out / "checkpoints" / "last.pt")
    assert ckpt["iteration"] == int(iteration) - 1     # written after the last good step, not after the bad one
    assert_all_finite(ckpt["network"])
    run = mlflow.MlflowClient(mlflow_uri).get_run(ckpt["mlflow_run_id"])
    assert run.info.status == "FAILED"


class _NaNInputGradient(torch.autograd.Function):
    """Identity forward; from the ``poison_after``-th backward on, a NaN gradient for the input."""

    calls = 0
    poison_after = 0

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        cls = _NaNInputGradient
        cls.calls += 1
        return torch.full_like(grad, math.nan) if cls.calls > cls.poison_after else grad


class _BrokenGradientNet(nn.Module):
    """A real network behind an input whose gradient turns to NaN: the attack's steps then become NaN, while
    the network's output (NaN inputs are zeroed in its forward) and hence the loss stay finite."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x):
        return self.net(torch.nan_to_num(_NaNInputGradient.apply(x), nan=0.0))


def test_attack_producing_nan_inputs_is_caught_before_the_step(tmp_path, mlflow_uri, monkeypatch):
    raw = fault_config(tmp_path / "out", "pgd_at", lr=0.01, epochs=2, every=0)
    cfg = config_from_dict(raw)
    from pipeline.data import build_data

    n_train = len(build_data(cfg).train)
    iters_per_epoch = -(-n_train // 8)
    _NaNInputGradient.calls = 0
    _NaNInputGradient.poison_after = iters_per_epoch * raw["method"]["steps"]   # epoch 1 is healthy
    real_build = run_module.build_network
    monkeypatch.setattr(run_module, "build_network", lambda *a, **k: _BrokenGradientNet(real_build(*a, **k)))

    with pytest.raises(NumericalFault) as caught:
        train(cfg)
    message = str(caught.value)
    assert "the attack produced non-finite inputs" in message
    assert WHERE.search(message).groups() == ("2", str(iters_per_epoch + 1), "pgd_at")

    ckpt = load_checkpoint(tmp_path / "out" / "checkpoints" / "last.pt")
    assert ckpt["epoch"] == 1 and ckpt["iteration"] == iters_per_epoch    # the last good one: end of epoch 1
    assert_all_finite(ckpt["network"])
    run = mlflow.MlflowClient(mlflow_uri).get_run(ckpt["mlflow_run_id"])
    assert run.info.status == "FAILED"
