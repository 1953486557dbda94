"""``RUN_ID|CHECKPOINT``: the trained model that ``predict`` and ``export`` use.

A path to an existing file is a checkpoint written by ``medrobust train``; anything else is an MLflow run id,
whose ``checkpoints/last.pt`` artifact is downloaded. The network is rebuilt from the configuration stored in
the checkpoint (read with ``weights_only=True``).
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from mlflow.tracking import MlflowClient
from torch import nn

from pipeline.config import Config
from pipeline.model.checkpoint import load_checkpoint
from pipeline.errors import InputError
from pipeline.evaluation.loading import download_run_checkpoint, load_model
from pipeline.tracking.session import resolve_uri


@dataclass
class TrainedModel:
    network: nn.Module          # eval mode, on the requested device
    cfg: Config                 # the configuration it was trained with
    data: dict[str, Any]        # class_names, spatial_dims, in_channels, num_classes, image_size, geometry
    run_id: str | None          # the MLflow run that trained it
    tracking_uri: str
    epoch: int | None = None

    @property
    def class_names(self) -> list[str]:
        n = int(self.data["num_classes"])
        names = list(self.data.get("class_names") or [])
        return names if len(names) == n else [str(c) for c in range(n)]


def _looks_like_path(text: str) -> bool:
    return "/" in text or "\\" in text or text.endswith((".pt", ".pth", ".ckpt"))


def open_model(model: str, device: torch.device | str = "cpu", tracking_uri: str | None = None) -> TrainedModel:
    """The network of a checkpoint file or of an MLflow run's final checkpoint, in eval mode on ``device``."""
    uri = resolve_uri(tracking_uri)
    path = Path(model)
    if path.is_file():
        return _from_file(path, device, uri)
    if _looks_like_path(model) or path.exists():
        raise InputError(f"{model}: checkpoint file not found (give a checkpoint file or an MLflow run id)")
    with tempfile.TemporaryDirectory(prefix="medrobust-model-") as tmp:
        ckpt = download_run_checkpoint(MlflowClient(tracking_uri=uri), model, Path(tmp))
        trained = _from_file(ckpt, device, uri)
    trained.run_id = trained.run_id or model
    return trained


def _from_file(path: Path, device: torch.device | str, uri: str) -> TrainedModel:
    ckpt = load_checkpoint(path)
    if not ckpt.get("config"):
        raise InputError(f"{path}: checkpoint lacks the training config (written by an older version?)")
    loaded = load_model(path, None, torch.device(device))
    return TrainedModel(loaded.network, loaded.trained, loaded.data, loaded.run_id, uri, ckpt.get("epoch"))
