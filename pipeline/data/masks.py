"""Pixel values of 2D image files as the pipeline wants them: 8-bit grey or RGB images, and masks as labels.

The mask rule (``data.mask_mode``):

- ``binary`` (default): a mask whose values are only 0 and 1 keeps 1 as foreground; any other mask is 8-bit
  style, foreground where the value is above 127 (0/255 masks, and JPEG masks whose edges blur into
  in-between values). A mask whose highest value lies between 2 and 127 fits neither and is refused: it is a
  label map (use ``labels``) or a faint, damaged mask.
- ``labels``: integer values are class labels, kept as they are (a palette PNG/GIF gives its palette indices);
  every value must lie in 0..num_classes-1.

A region-of-interest (field-of-view) mask always follows the ``binary`` rule.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from monai.transforms import MapTransform
from PIL import Image

from pipeline.data.problems import DataProblem, show_path

GREY_MODES = {"1", "L", "LA", "I", "F", "I;16", "I;16B", "I;16L", "I;16N"}
_WIDE = {"I", "F", "I;16", "I;16B", "I;16L", "I;16N"}  # more than 8 bits per pixel
LABEL_MODES = {"P", "L", "I", "I;16", "I;16B", "I;16L", "I;16N"}  # values read as they are in labels mode


def is_grey(mode: str) -> bool:
    """A PIL mode that holds one channel (a palette image counts as colour)."""
    return mode in GREY_MODES


def to_grey8(img: Image.Image) -> Image.Image:
    """Any PIL image -> 8-bit grey; 16-bit images are scaled (65535 -> 255), not clipped."""
    if img.mode in _WIDE:
        values = np.asarray(img, dtype=np.float64)
        if img.mode != "F" and values.max(initial=0) > 255:
            values = values / 257.0
        return Image.fromarray(np.clip(np.rint(values), 0, 255).astype(np.uint8))
    return img if img.mode == "L" else img.convert("L")


def to_rgb8(img: Image.Image) -> Image.Image:
    """Any PIL image -> 8-bit RGB (16-bit grey is scaled first)."""
    return to_grey8(img).convert("RGB") if img.mode in _WIDE else img.convert("RGB")


def label_values(img: Image.Image) -> Image.Image:
    """Labels mode: palette indices and grey values as they are; colour masks fall back to grey."""
    return img if img.mode in LABEL_MODES else img.convert("L")


def _file_of(value: Any) -> str:
    meta = getattr(value, "meta", None) or {}
    return show_path(meta.get("filename_or_obj", "<mask>"))


def binarise(mask: torch.Tensor, where: str) -> torch.Tensor:
    """The ``binary`` rule above, as float 0/1."""
    top = float(mask.max()) if mask.numel() else 0.0
    if top <= 1:
        return (mask > 0).to(torch.float32)
    if top <= 127:
        raise DataProblem(where, f"mask values 0..{top:g}: neither a 0/1 nor a 0/255 mask; set "
                                 "data.mask_mode: labels if the values are class labels")
    return (mask > 127).to(torch.float32)


def check_labels(mask: torch.Tensor, num_classes: int, where: str) -> torch.Tensor:
    values = torch.unique(mask)
    bad = values[(values < 0) | (values >= num_classes) | (values != torch.round(values))]
    if len(bad):
        raise DataProblem(where, f"mask value {float(bad[0]):g} is not a class label 0..{num_classes - 1} "
                                 "(data.num_classes / data.class_names)")
    return mask.to(torch.float32)


class MaskValuesd(MapTransform):
    """Apply the mask rule to ``keys``: ``binary`` -> {0, 1}; ``labels`` -> checked integer classes."""

    def __init__(self, keys, mode: str = "binary", num_classes: int = 2):
        super().__init__(keys)
        self.mode, self.num_classes = mode, num_classes

    def __call__(self, data):
        out = dict(data)
        for key in self.key_iterator(out):
            where = _file_of(out[key])
            out[key] = (binarise(out[key], where) if self.mode == "binary"
                        else check_labels(out[key], self.num_classes, where))  # MetaTensor ops keep the meta data
        return out
