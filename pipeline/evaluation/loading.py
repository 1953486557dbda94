"""The model under evaluation: a checkpoint file, or the final checkpoint of an MLflow run.

Checkpoints are read with ``weights_only=True`` (``pipeline.model.checkpoint``). The network is rebuilt
from the configuration stored in the checkpoint (the one it was trained with), so evaluating with another
config file only changes the data and the evaluation settings, never the architecture.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from monai.inferers import SlidingWindowInferer
from torch import nn

from pipeline.config import Config, stored_config
from pipeline.model.checkpoint import load_checkpoint
from pipeline.model.networks import build_network
from pipeline.errors import InputError

RUN_CHECKPOINT = "checkpoints/last.pt"


def download_run_checkpoint(client: MlflowClient, run_id: str, dst: Path) -> Path:
    """The artifact ``checkpoints/last.pt`` of ``run_id``, downloaded into ``dst``."""
    try:
        client.get_run(run_id)
    except MlflowException:
        raise InputError(f"--run-id {run_id}: no such MLflow run at {client.tracking_uri}") from None
    try:
        path = client.download_artifacts(run_id, RUN_CHECKPOINT, str(dst))
    except (MlflowException, OSError) as exc:
        raise InputError(f"--run-id {run_id}: the run has no artifact {RUN_CHECKPOINT} "
                         f"({type(exc).__name__}); was it trained by medrobust train to the end?") from None
    return Path(path)


@dataclass
class LoadedModel:
    network: nn.Module
    trained: Config                 # the configuration the network was trained with
    data: dict[str, Any]            # class_names, spatial_dims, in_channels, num_classes, image_size
    run_id: str | None              # the MLflow run that trained it


def load_model(path: str | Path, fallback: Config, device: torch.device) -> LoadedModel:
    """Rebuild the trained network of a checkpoint, in eval mode on ``device``."""
    ckpt = load_checkpoint(path)
    trained = stored_config(ckpt["config"], f"{path}: config") if ckpt.get("config") else fallback
    data = dict(ckpt.get("data") or {})
    missing = [k for k in ("spatial_dims", "in_channels", "num_classes") if k not in data]
    if missing:
        raise InputError(f"{path}: checkpoint lacks data.{', data.'.join(missing)} (written by an older version?)")
    size = tuple(data.get("image_size") or ()) or None
    network = build_network(trained.model, task=trained.task, spatial_dims=int(data["spatial_dims"]),
                            in_channels=int(data["in_channels"]), num_classes=int(data["num_classes"]),
                            image_size=size)
    try:
        network.load_state_dict(ckpt["network"])
    except RuntimeError as exc:
        raise InputError(f"{path}: weights do not fit model.name={trained.model.name} "
                         f"({str(exc).splitlines()[0][:160]})") from None
    return LoadedModel(network.to(device).eval(), trained, data, ckpt.get("mlflow_run_id"))


class SlidingWindowModel(nn.Module):
    """A 3D segmenter seen through ``SlidingWindowInferer``: whole volume in, whole-volume logits out.

    The inferer is differentiable with respect to its input, so an attack on this module perturbs the whole
    volume with one radius per volume (gradients flow back through every window). Memory grows with the
    volume; use it for volumes of a few million voxels, or evaluate on crops.
    """

    def __init__(self, network: nn.Module, roi_size: list[int], sw_batch_size: int = 4, overlap: float = 0.25):
        super().__init__()
        self.network = network
        self.inferer = SlidingWindowInferer(roi_size=roi_size, sw_batch_size=sw_batch_size, overlap=overlap,
                                            mode="gaussian")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inferer(x, self.network)


def inference_model(network: nn.Module, spatial_dims: int, patch_size: list[int] | None) -> nn.Module:
    """The network itself (2D, or 3D without a patch size), else its sliding-window view."""
    if spatial_dims == 3 and patch_size:
        return SlidingWindowModel(network, list(patch_size)).eval()
    return network
