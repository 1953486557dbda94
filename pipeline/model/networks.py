"""Networks from MONAI's zoo, adapted to the input size of the data."""

from __future__ import annotations

from monai.networks.nets import UNet, Classifier, DenseNet121, ResNet, SegResNet

from pipeline.config import ModelConfig
from pipeline.errors import InputError

_SMALL_INPUT = 64  # below this edge length the ResNet stem keeps full resolution (3x3, stride 1, no max-pool)


def build_network(cfg: ModelConfig, *, task: str, spatial_dims: int, in_channels: int, num_classes: int,
                  image_size: tuple[int, ...] | None = None):
    """A classifier (ResNet-18/34, DenseNet121, a small CNN) or a segmenter (UNet, SegResNet)."""
    small = image_size is not None and min(image_size) < _SMALL_INPUT
    if task == "classification":
        if cfg.name in ("resnet18", "resnet34"):
            layers = [2, 2, 2, 2] if cfg.name == "resnet18" else [3, 4, 6, 3]
            return ResNet("basic", layers, [64, 128, 256, 512], spatial_dims=spatial_dims,
                          n_input_channels=in_channels, num_classes=num_classes,
                          conv1_t_size=3 if small else 7, conv1_t_stride=1 if small else 2, no_max_pool=small,
                          act=("relu", {"inplace": False}))
        if cfg.name == "densenet121":
            return DenseNet121(spatial_dims=spatial_dims, in_channels=in_channels, out_channels=num_classes,
                               dropout_prob=cfg.dropout)
        if cfg.name == "small_cnn":
            if image_size is None:
                raise InputError("model.name: small_cnn needs a fixed image size (data.image_size)")
            channels = tuple(cfg.channels or (16, 32, 64))
            return Classifier((in_channels, *image_size), num_classes, channels, (2,) * len(channels),
                              dropout=cfg.dropout or None)
    elif task == "segmentation":
        channels = tuple(cfg.channels or (16, 32, 64, 128))
        if cfg.name == "unet":
            return UNet(spatial_dims=spatial_dims, in_channels=in_channels, out_channels=num_classes,
                        channels=channels, strides=(2,) * (len(channels) - 1), num_res_units=2,
                        norm="batch", dropout=cfg.dropout)
        if cfg.name == "segresnet":
            return SegResNet(spatial_dims=spatial_dims, in_channels=in_channels, out_channels=num_classes,
                             init_filters=channels[0], dropout_prob=cfg.dropout or None)
    raise InputError(f"model.name: '{cfg.name}' is not a {task} network")
