"""``torchrun`` with 2 CPU processes (gloo): the same per-sample state as one process over the same batches.

Why the two runs see exactly the same per-step sample groups:

* ``train.batch_size`` is per process. With 2 processes at batch B, ``DistributedSampler`` (our
  ``ResumableSampler``) first draws one permutation of the whole training set from (seed, epoch) alone, the
  same one a single process draws, then gives rank r the positions r, r + 2, r + 4, ... Step s of rank r
  therefore takes positions 2sB + r, 2sB + r + 2, ..., and the two ranks together take the positions
  2sB .. 2sB + 2B - 1: exactly step s of a single process at batch 2B. ``shuffle`` can stay on.
* The training set size is a multiple of 2B, so ``DistributedSampler`` pads nothing and every step of
  both runs has full batches.
* DDP averages the two ranks' gradients of their batch means, which is the gradient of the mean over the
  2B samples; IMA's loss is a per-sample sum divided by the batch size, so the same holds for it.
* The small CNN has no BatchNorm (instance norm, per sample) and no dropout, so a sample's output does not
  depend on which other samples share its batch.
* Nothing random depends on the order in which a process meets its samples: no augmentation (a
  MedMNIST-layout file whose name is not in the flip-invariant list, so the comparison does not rest on
  how augmentation is seeded) and no random start of the attack (``method.random_start: false``; it draws
  from the process's global torch stream, which advances differently over B and 2B samples).
* ``train.checkpoint_every_iters`` makes the ranks synchronise the per-sample state mid-epoch too, which
  must not change the result.

What is left is floating-point summation order (a batch of B instead of 2B, gradients summed across
ranks), hence a small tolerance. The DDP ranks run in different working directories with a relative
``train.output_dir``, so what rank 1 writes would show up in its own folder: it must stay empty.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
import yaml

from pipeline.config import ModelConfig, config_from_dict
from pipeline.data.synthetic import make_image
from pipeline.model.checkpoint import load_checkpoint
from pipeline.model.networks import build_network
from pipeline.engine.run import train

REPO = Path(__file__).resolve().parents[1]
PER_RANK_BATCH = 6
N_TRAIN = 4 * 2 * PER_RANK_BATCH   # 4 steps per epoch, nothing padded


def _write_npz(path: Path) -> Path:
    """Synthetic lesion images in the MedMNIST layout (no augmentation for this file name)."""
    sizes = {"train": N_TRAIN, "val": 12, "test": 4}
    arrays, start = {}, 0
    for split, n in sizes.items():
        labels = np.arange(start, start + n) % 4
        arrays[f"{split}_images"] = np.stack([make_image(start + i, int(labels[i])) for i in range(n)])
        arrays[f"{split}_labels"] = labels.reshape(-1, 1).astype(np.uint8)
        start += n
    np.savez(path, **arrays)
    return path


def _config(npz: Path, experiment: str, batch_size: int, output_dir: str) -> dict:
    return {
        "experiment": experiment,
        "seed": 5,
        "data": {"source": "medmnist", "root": str(npz), "cache": "none"},
        "model": {"name": "small_cnn", "channels": [8, 16]},
        "method": {"name": "ima", "steps": 3, "delta": 0.2, "eps_max": 2.0, "bisection_steps": 4,
                   "random_start": False},
        "train": {"epochs": 2, "batch_size": batch_size, "lr": 0.01, "device": "cpu", "progress": False,
                  "shuffle": True, "output_dir": output_dir, "checkpoint_every_iters": 3},
        "tracking": {"run_name": experiment},
    }


def test_two_cpu_processes_match_one_process(tmp_path, mlflow_uri):
    npz = _write_npz(tmp_path / "tinyderm.npz")

    probe = torch.from_numpy(np.load(npz)["val_images"]).permute(0, 3, 1, 2).float() / 255
    began = time.perf_counter()

    # one process, batch 2B
    reference = train(config_from_dict(_config(npz, "single", 2 * PER_RANK_BATCH, str(tmp_path / "single"))))
    single = load_checkpoint(reference.checkpoint)
    took_single = time.perf_counter() - began

    # torchrun, 2 processes of batch B, each in its own working directory
    cfg_path = tmp_path / "ddp.yaml"
    cfg_path.write_text(yaml.safe_dump(_config(npz, "ddp", PER_RANK_BATCH, "out")))
    for rank in (0, 1):
        (tmp_path / f"rank{rank}").mkdir()
    inner = (f'cd "rank$LOCAL_RANK" && exec {shlex.quote(sys.executable)} -m pipeline.cli train '
             f"{shlex.quote(str(cfg_path))}")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "--no-python", "sh", "-c", inner]
    env = dict(os.environ, MLFLOW_TRACKING_URI=mlflow_uri, OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    began = time.perf_counter()
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    took = time.perf_counter() - began

    # rank 0 alone saved and logged
    assert sorted(os.listdir(tmp_path / "rank1")) == [], "rank 1 wrote files"
    ckpt_dir = tmp_path / "rank0" / "out" / "checkpoints"
    assert sorted(p.name for p in ckpt_dir.iterdir()) == ["best.pt", "last.pt"]
    client = mlflow.MlflowClient(mlflow_uri)
    runs = client.search_runs([client.get_experiment_by_name("ddp").experiment_id])
    assert len(runs) == 1 and runs[0].info.status == "FINISHED", [r.info for r in runs]
    ddp = load_checkpoint(ckpt_dir / "last.pt")
    assert ddp["mlflow_run_id"] == runs[0].info.run_id and ddp["epoch"] == 2
    assert ddp["iteration"] == single["iteration"] == 2 * N_TRAIN // (2 * PER_RANK_BATCH)

    # the same per-sample radii and distances as the single process, and the same network
    a, b = single["method_state"], ddp["method_state"]
    assert a["eps"].shape == (N_TRAIN,)
    torch.testing.assert_close(b["eps"], a["eps"], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(b["dist"], a["dist"], rtol=1e-4, atol=1e-5)
    assert len(torch.unique(a["eps"])) >= 3, f"radii too uniform for a meaningful comparison: {a['eps']}"
    # the same function (not compared weight by weight: a conv bias followed by instance norm has a zero
    # gradient up to rounding, which Adam scales up to full steps in either run)
    outputs = []
    for ckpt in (single, ddp):
        net = build_network(ModelConfig(name="small_cnn", channels=[8, 16]), task="classification",
                            spatial_dims=2, in_channels=3, num_classes=4, image_size=(32, 32))
        net.load_state_dict(ckpt["network"])
        with torch.no_grad():
            outputs.append(net.eval()(probe))
    torch.testing.assert_close(outputs[1], outputs[0], rtol=1e-3, atol=1e-4)
    history = client.get_metric_history(runs[0].info.run_id, "eps_mean")
    assert [m.step for m in history] == [1, 2]
    assert history[-1].value == pytest.approx(float(b["eps"].mean()), rel=1e-6)
    print(f"one process in-process {took_single:.1f} s, torchrun 2 processes {took:.1f} s")
