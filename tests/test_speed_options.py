"""``train.compile``, ``train.channels_last`` and bf16 ``train.amp`` reach the network that trains (CPU).

Inductor needs about a minute on a 2-core CPU to compile even the small CNN (53 s for one PGD-AT step), so
``torch.compile`` is called with the ``eager`` backend here: the wiring (what gets compiled, that the training
and attack steps run through TorchDynamo, that checkpoints hold the plain network's keys) is what this test
checks; inductor's code generation is left to the GPU benchmark (``benchmarks/step_cost.py --compile``).
"""

from __future__ import annotations

import functools

import torch
import torch._dynamo

from pipeline.config import config_from_dict
from pipeline.model.checkpoint import load_checkpoint
from pipeline.engine.run import train


def test_compile_channels_last_and_bf16_amp_are_wired(tmp_path, mlflow_uri, monkeypatch):
    compiled = []
    real_compile = torch.compile

    def compile_spy(model, **kwargs):
        first_conv = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d))
        compiled.append((type(model).__name__, first_conv.weight.is_contiguous(memory_format=torch.channels_last)))
        return real_compile(model, **{**kwargs, "backend": "eager"})

    monkeypatch.setattr(torch, "compile", functools.wraps(real_compile)(compile_spy))
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    cfg = config_from_dict({
        "experiment": "speed-options",
        "data": {"source": "synthetic", "synthetic_size": 40, "cache": "none"},
        "model": {"name": "small_cnn", "channels": [8, 16]},
        "method": {"name": "pgd_at", "steps": 1, "eps": 0.3},
        "train": {"epochs": 1, "batch_size": 14, "device": "cpu", "progress": False, "compile": True,
                  "channels_last": True, "amp": True, "amp_dtype": "bfloat16",
                  "output_dir": str(tmp_path / "out")},
    })
    try:
        result = train(cfg)
    finally:
        torch._dynamo.reset()
    assert compiled == [("Classifier", True)]  # the bare network, already channels_last, compiled once
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1  # the steps ran through Dynamo
    ckpt = load_checkpoint(result.checkpoint)
    assert not any(key.startswith("_orig_mod.") for key in ckpt["network"])  # the plain network is saved
    assert ckpt["iteration"] == 2 and result.metrics["train_loss"] > 0
