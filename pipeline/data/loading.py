"""Load-transform building blocks shared by the sources: MONAI transforms, plus two small checks of our own.

``LoadImageCheckedd`` is MONAI's ``LoadImaged`` for one key that reports a failure as a ``DataProblem`` naming
the file; ``AssertSameSpatialShaped`` stops an image/mask pair whose shapes differ before any resize hides it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from monai.data import PILReader
from monai.transforms import (
    AsDiscreted,
    Compose,
    EnsureChannelFirstd,
    EnsureTyped,
    LoadImaged,
    MapTransform,
    Orientationd,
    RandCropByPosNegLabeld,
    RandFlipd,
    RandRotate90d,
    RandSpatialCropSamplesd,
    Resized,
    ScaleIntensityRanged,
    ScaleIntensityRangePercentilesd,
    Spacingd,
    SpatialPadd,
)

from pipeline.data.problems import DataProblem, describe_exception, show_path
from pipeline.errors import InputError

IMAGE, LABEL = "image", "label"


def to_rgb(img):
    """PIL converter (module level so that transforms pickle for worker processes)."""
    return img.convert("RGB")


def to_grey(img):
    return img.convert("L")


class LoadImageCheckedd(LoadImaged):
    """``LoadImaged`` of one key; a file that cannot be read raises ``DataProblem(file, reason)``."""

    def __init__(self, key: str, reader: Any = None, **kwargs: Any):
        super().__init__(keys=key, reader=reader, image_only=True, **kwargs)

    def __call__(self, data, reader=None):
        try:
            return super().__call__(data, reader)
        except Exception as exc:
            value = data.get(self.keys[0])
            paths = [str(v) for v in value] if isinstance(value, (list, tuple)) else [str(value)]
            raise DataProblem(show_path(value), describe_exception(exc, paths)) from exc


def _source_name(tensor: Any) -> str:
    meta = getattr(tensor, "meta", {}) or {}
    return show_path(meta.get("filename_or_obj", "?"))


class AssertSameSpatialShaped(MapTransform):
    """Raise ``DataProblem`` naming both files when the image and mask spatial shapes differ."""

    def __init__(self, image_key: str = IMAGE, label_key: str = LABEL):
        super().__init__(keys=(image_key, label_key))
        self.image_key, self.label_key = image_key, label_key

    def __call__(self, data):
        image, label = data[self.image_key], data[self.label_key]
        if tuple(image.shape[1:]) != tuple(label.shape[1:]):
            where = f"{_source_name(image)} and {_source_name(label)}"
            raise DataProblem(where, f"image/mask shape mismatch: image {tuple(image.shape[1:])}, "
                                     f"mask {tuple(label.shape[1:])}")
        return data


def preprocess_transforms(specs: list[dict[str, Any]], keys: Sequence[str]) -> list:
    """``data.preprocess`` specs ({name: shades_of_gray, ...}) as transforms, built by ``transforms.build_preprocess``."""
    if not specs:
        return []
    try:
        from transforms import build_preprocess
    except ImportError:
        raise InputError("data.preprocess: this installation has no transforms.build_preprocess; "
                         "remove data.preprocess or update medrobust") from None
    built = build_preprocess(specs, list(keys))
    return list(built.transforms) if isinstance(built, Compose) else list(built)


def resize(keys_modes: dict[str, str], image_size: Sequence[int] | None) -> list:
    if not image_size:
        return []
    return [Resized(keys=k, spatial_size=tuple(image_size), mode=m, anti_aliasing=(m != "nearest"))
            for k, m in keys_modes.items()]


def load_2d_files(*, segmentation: bool, image_size: Sequence[int] | None, preprocess: list) -> Compose:
    """RGB image files (JPEG/PNG) -> float (3, H, W) in [0, 1]; masks 0/255 -> (1, H, W) in {0, 1}."""
    steps: list = [LoadImageCheckedd(IMAGE, reader=PILReader(converter=to_rgb, reverse_indexing=False)),
                   EnsureChannelFirstd(keys=IMAGE)]
    if segmentation:
        steps += [LoadImageCheckedd(LABEL, reader=PILReader(converter=to_grey, reverse_indexing=False)),
                  EnsureChannelFirstd(keys=LABEL), AssertSameSpatialShaped(),
                  AsDiscreted(keys=LABEL, threshold=127.5)]
    steps += [ScaleIntensityRanged(keys=IMAGE, a_min=0.0, a_max=255.0, b_min=0.0, b_max=1.0, clip=True),
              *preprocess]
    steps += resize({IMAGE: "bilinear", **({LABEL: "nearest"} if segmentation else {})}, image_size)
    steps += [EnsureTyped(keys=[IMAGE, LABEL] if segmentation else IMAGE, dtype=torch.float32)]
    return Compose(steps)


def load_2d_arrays(*, channels_last: bool, image_size: Sequence[int] | None, preprocess: list) -> Compose:
    """uint8 arrays (H, W[, C]) held in the data dict -> float (C, H, W) in [0, 1]."""
    return Compose([
        EnsureChannelFirstd(keys=IMAGE, channel_dim=-1 if channels_last else "no_channel"),
        ScaleIntensityRanged(keys=IMAGE, a_min=0.0, a_max=255.0, b_min=0.0, b_max=1.0, clip=True),
        EnsureTyped(keys=IMAGE, dtype=torch.float32),
        *preprocess,
        *resize({IMAGE: "bilinear"}, image_size),
    ])


def load_3d(*, reader_factory, has_label: bool, orientation: str | None, spacing: Sequence[float] | None,
            preprocess: list) -> Compose:
    """Volumes -> float (C, *spatial), one orientation and spacing for all; labels resampled with nearest
    interpolation.

    Intensities: ``preprocess`` (``data.preprocess``, e.g. ``ct_window`` or ``mri_percentile``) sees the raw
    values (Hounsfield units for CT) and defines the scaling to the valid range; without it each channel is
    scaled to [0, 1] between its 0.5 and 99.5 percentiles."""
    keys = [IMAGE, LABEL] if has_label else [IMAGE]
    steps: list = [LoadImageCheckedd(IMAGE, reader=reader_factory()), EnsureChannelFirstd(keys=IMAGE)]
    if has_label:
        steps += [LoadImageCheckedd(LABEL, reader=reader_factory()), EnsureChannelFirstd(keys=LABEL),
                  AssertSameSpatialShaped()]
    if orientation:
        steps.append(Orientationd(keys=keys, axcodes=orientation, labels=(("L", "R"), ("P", "A"), ("I", "S"))))
    if spacing:
        steps.append(Spacingd(keys=keys, pixdim=tuple(spacing),
                              mode=("bilinear", "nearest") if has_label else "bilinear"))
    steps += list(preprocess) or [ScaleIntensityRangePercentilesd(keys=IMAGE, lower=0.5, upper=99.5, b_min=0.0,
                                                                   b_max=1.0, clip=True, channel_wise=True)]
    steps.append(EnsureTyped(keys=keys, dtype=torch.float32))
    return Compose(steps)


def flips_2d(keys: Sequence[str], image_size: Sequence[int] | None = None) -> Compose:
    """Label-preserving augmentation for dermatology: flips, and quarter turns unless ``image_size`` is not square
    (a turn would swap height and width, and the batch would not collate)."""
    keys = list(keys)
    turns = [RandRotate90d(keys=keys, prob=0.5, max_k=3)] if not image_size or len(set(image_size)) == 1 else []
    return Compose([RandFlipd(keys=keys, prob=0.5, spatial_axis=0), RandFlipd(keys=keys, prob=0.5, spatial_axis=1),
                    *turns])


def patches_3d(patch_size: Sequence[int], num_samples: int, has_label: bool) -> Compose:
    """Pad small volumes to the patch size, then sample patches (foreground/background balanced with a label).

    Each patch is a copy of the volume's dict, so it keeps the volume's ``index``.
    """
    keys = [IMAGE, LABEL] if has_label else [IMAGE]
    size = tuple(patch_size)
    steps: list = [SpatialPadd(keys=keys, spatial_size=size)]
    if has_label:
        steps.append(RandCropByPosNegLabeld(keys=keys, label_key=LABEL, spatial_size=size, pos=1, neg=1,
                                            num_samples=num_samples, image_key=IMAGE, image_threshold=0.0))
    else:
        steps.append(RandSpatialCropSamplesd(keys=keys, roi_size=size, num_samples=num_samples, random_size=False))
    steps.append(RandFlipd(keys=keys, prob=0.5, spatial_axis=0))
    return Compose(steps)
