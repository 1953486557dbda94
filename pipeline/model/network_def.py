"""The network of a checkpoint as a MONAI bundle ``network_def``: the same MONAI class with the same arguments
as ``pipeline.model.networks.build_network`` (a test checks that both give the same parameters), so that a
bundle builds it with MONAI alone."""

from __future__ import annotations

from typing import Any

from pipeline.config import ModelConfig
from pipeline.model.networks import _SMALL_INPUT
from pipeline.errors import InputError

NETS = "monai.networks.nets."


def network_def(cfg: ModelConfig, *, task: str, spatial_dims: int, in_channels: int, num_classes: int,
                image_size: list[int] | tuple[int, ...] | None = None) -> dict[str, Any]:
    small = bool(image_size) and min(image_size) < _SMALL_INPUT
    if task == "classification":
        if cfg.name in ("resnet18", "resnet34"):
            return {"_target_": NETS + "ResNet", "block": "basic",
                    "layers": [2, 2, 2, 2] if cfg.name == "resnet18" else [3, 4, 6, 3],
                    "block_inplanes": [64, 128, 256, 512], "spatial_dims": spatial_dims,
                    "n_input_channels": in_channels, "num_classes": num_classes, "conv1_t_size": 3 if small else 7,
                    "conv1_t_stride": 1 if small else 2, "no_max_pool": small, "act": ["relu", {"inplace": False}]}
        if cfg.name == "densenet121":
            return {"_target_": NETS + "DenseNet121", "spatial_dims": spatial_dims, "in_channels": in_channels,
                    "out_channels": num_classes, "dropout_prob": cfg.dropout}
        if cfg.name == "small_cnn":
            channels = list(cfg.channels or (16, 32, 64))
            return {"_target_": NETS + "Classifier", "in_shape": [in_channels, *image_size], "classes": num_classes,
                    "channels": channels, "strides": [2] * len(channels), "dropout": cfg.dropout or None}
    elif task == "segmentation":
        channels = list(cfg.channels or (16, 32, 64, 128))
        if cfg.name == "unet":
            return {"_target_": NETS + "UNet", "spatial_dims": spatial_dims, "in_channels": in_channels,
                    "out_channels": num_classes, "channels": channels, "strides": [2] * (len(channels) - 1),
                    "num_res_units": 2, "norm": "batch", "dropout": cfg.dropout}
        if cfg.name == "segresnet":
            return {"_target_": NETS + "SegResNet", "spatial_dims": spatial_dims, "in_channels": in_channels,
                    "out_channels": num_classes, "init_filters": channels[0], "dropout_prob": cfg.dropout or None}
    raise InputError(f"model.name: '{cfg.name}' is not a {task} network")


def takes_any_size(cfg: ModelConfig) -> bool:
    """Whether the network accepts inputs of another spatial size than the training one (all but the small CNN,
    whose last layer is sized for the training images)."""
    return cfg.name != "small_cnn"
