"""What every data source returns: lists of MONAI data dicts per split, plus the transforms that load them."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from monai.transforms import Compose


@dataclass
class DataSplits:
    """Train/val/test lists of MONAI data dicts and how to turn them into tensors.

    Every dict has ``index``: the stable integer id of the sample within its split (0..len-1, assigned after
    the reproducible split and ``data.limit``). Adversarial methods key their per-sample state by it.
    After ``load_transforms`` a dict holds ``image`` as a float tensor (C, *spatial) and ``label``: an int
    class for classification, a (1, *spatial) mask for segmentation. Metadata values (sex, age, ...) are
    plain str/int/float so that they collate. The generic 2D sources may add ``roi``: a (1, *spatial) float
    0/1 region-of-interest (field-of-view) mask, resized with the image; loss, metric and attack are meant to
    count only ``roi > 0``.
    """

    train: list[dict[str, Any]]
    val: list[dict[str, Any]]
    test: list[dict[str, Any]]
    spatial_dims: int
    in_channels: int
    num_classes: int
    class_names: list[str] | None
    load_transforms: Compose
    train_transforms: Compose = field(default_factory=lambda: Compose([]))
    skipped: int = 0
    notes: list[str] = field(default_factory=list)
    image_size: tuple[int, ...] | None = None  # fixed spatial size of the loaded images (2D), None when it varies
    patch_size: tuple[int, ...] | None = None  # 3D: the training patch size (a larger one pads the volume)

    def split(self, name: str) -> list[dict[str, Any]]:
        return {"train": self.train, "val": self.val, "test": self.test}[name]

    def transform_for(self, name: str) -> Compose:
        """Load transforms, followed by the random training transforms for the train split only."""
        if name == "train":
            return Compose([*self.load_transforms.transforms, *self.train_transforms.transforms])
        return self.load_transforms
