"""Tiny models and synthetic data for the evaluation tests (CPU, seconds).

Images are 1x8x8 in [0, 1]: class 0 is brighter in the left half, class 1 in the right half (class 2, when
asked for, in the top half). A small CNN separates them perfectly after a few hundred Adam steps.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn


def toy_images(n: int, num_classes: int = 2, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % num_classes
    x = 0.2 + 0.1 * torch.rand(n, 1, 8, 8, generator=g)
    x[y == 0, :, :, :4] += 0.5
    x[y == 1, :, :, 4:] += 0.5
    if num_classes > 2:
        x[y == 2, :, :4, :] += 0.5
    return x.clamp(0, 1), y


class ToyCNN(nn.Module):
    def __init__(self, num_classes: int = 2):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1),
                                      nn.ReLU())
        self.head = nn.Linear(8 * 4, num_classes)
        self.pool = nn.AdaptiveAvgPool2d(2)

    def forward(self, x):
        return self.head(self.pool(self.features(x)).flatten(1))


def train_toy(x: torch.Tensor, y: torch.Tensor, num_classes: int = 2, steps: int = 300, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = ToyCNN(num_classes)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(steps):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return model.eval()


def batches(x: torch.Tensor, y: torch.Tensor, size: int = 32, **meta) -> list[dict]:
    """MONAI-style collated batches with ``index`` and metadata lists."""
    out = []
    for start in range(0, len(x), size):
        sl = slice(start, start + size)
        batch = {"image": x[sl], "label": y[sl], "index": torch.arange(len(x))[sl]}
        batch.update({k: list(v[sl]) for k, v in meta.items()})
        out.append(batch)
    return out


class Affine2(nn.Module):
    """Logits (0, w.x + b): the decision boundary is the hyperplane w.x + b = 0."""

    def __init__(self, w: torch.Tensor, b: float):
        super().__init__()
        self.w = nn.Parameter(w.flatten().clone())
        self.b = nn.Parameter(torch.tensor(float(b)))

    def forward(self, x):
        z = x.flatten(1) @ self.w + self.b
        return torch.stack([torch.zeros_like(z), z], dim=1)


def log_evaluated_run(client, experiment_id: str, method: str, clean: float, pgd: list[float],
                      eps: list[float], epoch_times: list[float]) -> str:
    """A real MLflow run with what ``medrobust train`` + ``evaluate`` log: tags, per-epoch times, eval metrics,
    an evaluation artifact."""
    import json
    import tempfile
    from pathlib import Path

    run = client.create_run(experiment_id, run_name=f"{method}-run", tags={
        "medrobust.method": method, "medrobust.task": "classification", "medrobust.dataset": "synthetic"})
    rid = run.info.run_id
    client.log_param(rid, "method.name", method)
    for step, seconds in enumerate(epoch_times, start=1):
        client.log_metric(rid, "epoch_time_s", seconds, step=step)
    client.log_metric(rid, "eval/clean/accuracy", clean)
    for e, v in zip(eps, pgd, strict=True):
        client.log_metric(rid, f"eval/pgd_l2/accuracy_at_{e:g}", v)
    xs, ys = [0.0, *eps], [clean, *pgd]
    area = sum((xs[i + 1] - xs[i]) * (ys[i + 1] + ys[i]) / 2 for i in range(len(xs) - 1)) / (xs[-1] - xs[0])
    client.log_metric(rid, "eval/pgd_l2/auc_norm", area)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "summary.json"
        path.write_text(json.dumps({"clean": clean}))
        client.log_artifact(rid, str(path), "evaluation")
    client.set_terminated(rid)
    return rid


def tiny_run_config(tmp_path: Path, method: str = "standard") -> dict:
    from pipeline.config import method_knobs

    return {
        "experiment": "tiny-eval", "task": "classification", "seed": 1,
        "data": {"source": "synthetic", "synthetic_size": 64, "cache": "none"},
        "model": {"name": "small_cnn", "channels": [8, 16]},
        "method": method_knobs(method, steps=2, eps=0.3),
        "train": {"epochs": 1, "batch_size": 16, "lr": 0.01, "device": "cpu", "progress": False,
                  "output_dir": str(tmp_path / method)},
        "tracking": {"run_name": f"tiny-{method}"},
        "evaluate": {"eps_l2": [0.5, 2.0], "eps_linf": [0.03], "steps": 3, "max_samples": 6, "batch_size": 4,
                     "gradcam_per_class": 1},
    }


def train_and_evaluate(tmp_path: Path, method: str = "standard"):
    """Train ``method`` for one epoch on synthetic data, then evaluate its run (the tracking URI comes from
    MLFLOW_TRACKING_URI: a local store or a real server)."""
    from pipeline.config import config_from_dict
    from pipeline.engine.run import train
    from pipeline.evaluation.run import evaluate

    raw = tiny_run_config(tmp_path, method)
    trained = train(config_from_dict(raw))
    return trained, evaluate(config_from_dict(raw), run_id=trained.run_id), raw


def reset_mlflow_global() -> None:
    """Forget MLflow's process-wide tracking URI (``mlflow.set_tracking_uri`` also writes it into
    MLFLOW_TRACKING_URI), so that a URI used by one test never leaks into the next."""
    import mlflow

    mlflow.set_tracking_uri(None)
