"""What the two generic 2D sources (``folder``, ``csv``) share: image files, class names, splits, load transforms.

Images are PNG, JPEG, TIFF, BMP or GIF, read by MONAI's ``PILReader``; grey or RGB as the first image (or
``data.channels``), 16-bit grey scaled to 8 bits, intensities then scaled to [0, 1]. Masks follow the rule of
``pipeline.data.masks``. An optional region-of-interest mask (key ``roi``, (1, H, W) float 0/1) is loaded,
checked and resized with its image, nearest-neighbour like the mask; consumers restrict loss, metric and attack
to ``roi > 0``. Every image is resized to ``data.image_size`` (default: the first image's size), either
stretched (``data.resize_mode: stretch``) or scaled to fit with its aspect ratio kept and zero-padded
(``pad``); the data check's notes say which.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from monai.data import PILReader
from monai.transforms import (
    Compose,
    EnsureChannelFirstd,
    EnsureTyped,
    Resized,
    ResizeWithPadOrCropd,
    ScaleIntensityRanged,
)
from PIL import Image, UnidentifiedImageError

from pipeline.config import Config
from pipeline.data.base import DataSplits
from pipeline.data.loading import (IMAGE, LABEL, AssertSameSpatialShaped, LoadImageCheckedd, flips_2d,
                                   preprocess_transforms)
from pipeline.data.masks import MaskValuesd, is_grey, label_values, to_grey8, to_rgb8
from pipeline.data.problems import describe_exception
from pipeline.data.split import finalize, split_or_reuse
from pipeline.errors import InputError

ROI = "roi"
EXTENSIONS = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".gif")
SPLIT_NAMES = {"train": "train", "training": "train", "val": "val", "valid": "val", "validation": "val",
               "test": "test", "testing": "test"}


def is_image_file(path: Path) -> bool:
    return path.suffix.lower() in EXTENSIONS and not path.name.startswith(".")


def peek(path: str | Path) -> tuple[str, tuple[int, int]]:
    """(PIL mode, (H, W)) from the file header, without decoding the pixels."""
    try:
        with Image.open(path) as img:
            return img.mode, (img.height, img.width)
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise InputError(f"{path}: {describe_exception(exc, [str(path)])}") from None


def class_names_of(found: Sequence[str], configured: list[str] | None) -> list[str]:
    """Class names in label order: ``data.class_names`` when given, else the names found, sorted; integer names
    (class indices) give ``"0"`` .. ``"<largest>"``."""
    if configured:
        return list(configured)
    if found and all(name.isdigit() for name in found):
        return [str(k) for k in range(max(int(n) for n in found) + 1)]
    return sorted(set(found))


def segmentation_classes(cfg: Config) -> list[str]:
    """Names of the mask classes: two for binary masks; ``data.class_names`` or ``data.num_classes`` for labels."""
    data = cfg.data
    if data.mask_mode == "binary":
        names = data.class_names or ["background", "foreground"]
        if len(names) != 2:
            raise InputError(f"data.class_names: binary masks have 2 classes, got {len(names)}; set "
                             "data.mask_mode: labels for label maps")
        return list(names)
    if data.class_names:
        if data.num_classes not in (None, len(data.class_names)):
            raise InputError(f"data.num_classes: {data.num_classes}, but data.class_names lists "
                             f"{len(data.class_names)}")
        return list(data.class_names)
    if not data.num_classes or data.num_classes < 2:
        raise InputError("data.num_classes: required (at least 2, background included) with data.mask_mode: "
                         "labels, or give data.class_names")
    return ["background", *(f"class_{k}" for k in range(1, data.num_classes))]


def assign_splits(items: list[dict], cfg: Config, notes: list[str], *, stratify_key: str | None,
                  group_key: str | None, what: str) -> tuple[list[dict], list[dict], list[dict]]:
    """Items carrying ``split`` (from a CSV column) keep it; an empty val or test split is then drawn from the
    training items by ``data.val_fraction`` / ``data.test_fraction``. Without a split: seeded, stratified."""
    if not any("split" in item for item in items):
        return split_or_reuse(items, cfg.data, notes, what=what, stratify_key=stratify_key, group_key=group_key)
    parts: dict[str, list[dict]] = {"train": [], "val": [], "test": []}
    for item in items:
        parts[item["split"]].append(item)
    carve = {name: frac for name, frac in (("val", cfg.data.val_fraction), ("test", cfg.data.test_fraction))
             if not parts[name] and frac > 0}
    if carve and parts["train"]:
        fractions = SimpleNamespace(val_fraction=carve.get("val", 0.0), test_fraction=carve.get("test", 0.0),
                                    split_seed=cfg.data.split_seed)
        train, val, test = split_or_reuse(parts["train"], fractions, notes, what=what, stratify_key=stratify_key,
                                          group_key=group_key)
        carved = {"val": val, "test": test}
        parts.update({"train": train, **{name: carved[name] for name in carve}})
        notes.append(f"no {' or '.join(carve)} {what} in the split column: drawn from the training {what} "
                     f"({', '.join(f'{n} {len(parts[n])}' for n in carve)})")
    return parts["train"], parts["val"], parts["test"]


def resize_steps(keys_modes: dict[str, str], size: Sequence[int], mode: str) -> list:
    """Stretch to ``size``, or (``pad``) scale the longer side to fit and zero-pad to ``size``, centred."""
    keys, modes = list(keys_modes), list(keys_modes.values())
    smooth = [m != "nearest" for m in modes]
    if mode == "stretch":
        return [Resized(keys=keys, spatial_size=tuple(size), mode=modes, anti_aliasing=smooth)]
    return [Resized(keys=keys, spatial_size=max(size), size_mode="longest", mode=modes, anti_aliasing=smooth),
            ResizeWithPadOrCropd(keys=keys, spatial_size=tuple(size))]


def load_transforms(*, channels: int, size: Sequence[int], resize_mode: str, mask: str | None, roi: bool,
                    num_classes: int, preprocess: list) -> Compose:
    """Image (+ mask, + ROI) files -> float (C, H, W) in [0, 1], mask (1, H, W), ROI (1, H, W) in {0, 1}.

    ``mask`` is None (classification), ``"binary"`` or ``"labels"`` (``data.mask_mode``)."""
    steps: list = [LoadImageCheckedd(IMAGE, reader=PILReader(converter=to_grey8 if channels == 1 else to_rgb8,
                                                             reverse_indexing=False)),
                   EnsureChannelFirstd(keys=IMAGE)]
    keys_modes = {IMAGE: "bilinear"}
    if mask:
        steps += [LoadImageCheckedd(LABEL, reader=PILReader(converter=to_grey8 if mask == "binary" else label_values,
                                                            reverse_indexing=False)),
                  EnsureChannelFirstd(keys=LABEL), AssertSameSpatialShaped(IMAGE, LABEL),
                  MaskValuesd(LABEL, mode=mask, num_classes=num_classes)]
        keys_modes[LABEL] = "nearest"
    if roi:
        steps += [LoadImageCheckedd(ROI, reader=PILReader(converter=to_grey8, reverse_indexing=False)),
                  EnsureChannelFirstd(keys=ROI), AssertSameSpatialShaped(IMAGE, ROI), MaskValuesd(ROI)]
        keys_modes[ROI] = "nearest"
    steps += [ScaleIntensityRanged(keys=IMAGE, a_min=0.0, a_max=255.0, b_min=0.0, b_max=1.0, clip=True),
              *preprocess, *resize_steps(keys_modes, size, resize_mode),
              EnsureTyped(keys=list(keys_modes), dtype=torch.float32)]
    return Compose(steps)


def _resize_note(size: tuple[int, ...], configured: bool, mode: str, first: tuple[int, int]) -> str:
    target = "x".join(map(str, size))
    how = ("stretched to it: the aspect ratio is not kept (data.resize_mode: pad keeps it)" if mode == "stretch"
           else "scaled to fit with the aspect ratio kept, then zero-padded (data.resize_mode: pad)")
    where = "" if configured else f" (data.image_size not set: the first image's size, {first[0]}x{first[1]})"
    return f"images resized to {target}{where}, {how}"


def build_splits(cfg: Config, items: list[dict[str, Any]], *, class_names: list[str], segmentation: bool,
                 notes: list[str], skipped: int, what: str, stratify_key: str | None,
                 group_key: str | None = None) -> DataSplits:
    """Split, number and describe the items of a generic 2D source as ``DataSplits``."""
    data = cfg.data
    mode, first_size = peek(items[0][IMAGE])
    channels = data.channels or (1 if is_grey(mode) else 3)
    size = tuple(data.image_size or first_size)
    notes.append(_resize_note(size, bool(data.image_size), data.resize_mode, first_size))
    train, val, test = assign_splits(items, cfg, notes, stratify_key=stratify_key, group_key=group_key, what=what)
    train, val, test = finalize(train, val, test, limit=data.limit, seed=data.split_seed)
    has_roi = ROI in items[0]
    keys = [IMAGE, *([LABEL] if segmentation else []), *([ROI] if has_roi else [])]
    return DataSplits(
        train=train, val=val, test=test, spatial_dims=2, in_channels=channels, num_classes=len(class_names),
        class_names=class_names,
        load_transforms=load_transforms(channels=channels, size=size, resize_mode=data.resize_mode,
                                        mask=data.mask_mode if segmentation else None, roi=has_roi,
                                        num_classes=len(class_names),
                                        preprocess=preprocess_transforms(data.preprocess, [IMAGE])),
        train_transforms=flips_2d(keys, size) if data.augment == "flips" else Compose([]),
        skipped=skipped, notes=notes, image_size=size)
