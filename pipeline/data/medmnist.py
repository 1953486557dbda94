"""MedMNIST npz files (DermaMNIST, PneumoniaMNIST, ...): ``{split}_images`` uint8 and ``{split}_labels``.

The official train/val/test split of the file is used. Each data dict holds its uint8 array (H, W[, C]),
the class ``label`` (int), ``id`` (``"<split>_<position in the file>"``) and ``index``.
"""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
from monai.transforms import Compose

from pipeline.config import Config
from pipeline.data.base import DataSplits
from pipeline.data.classes import MEDMNIST_CLASSES
from pipeline.data.files import require_root
from pipeline.data.loading import IMAGE, flips_2d, load_2d_arrays, preprocess_transforms
from pipeline.data.split import finalize
from pipeline.errors import InputError, ProblemList

SPLITS = ("train", "val", "test")
_FLIP_INVARIANT = {"dermamnist", "pathmnist", "bloodmnist"}


def dataset_name(path: Path) -> str:
    """``dermamnist`` from ``dermamnist.npz`` or ``dermamnist_224.npz``."""
    return path.stem.lower().split("_")[0]


def _open(path: Path) -> dict[str, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as npz:
            return {k: npz[k] for k in npz.files}
    except (zipfile.BadZipFile, ValueError, OSError, EOFError) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InputError(f"{path}: not a readable npz file ({reason})") from None


def _check_arrays(path: Path, arrays: dict[str, np.ndarray]) -> None:
    problems = ProblemList()
    need = [f"{s}_{kind}" for s in SPLITS for kind in ("images", "labels")]
    absent = [k for k in need if k not in arrays]
    if absent:
        problems.add(path, f"missing key(s) {', '.join(absent)} (has {', '.join(sorted(arrays)) or 'none'})")
        problems.raise_if_any()
    for s in SPLITS:
        images, labels = arrays[f"{s}_images"], arrays[f"{s}_labels"]
        if images.ndim not in (3, 4) or (images.ndim == 4 and images.shape[-1] not in (1, 3)):
            problems.add(path, f"{s}_images: expected shape (N, H, W) or (N, H, W, 1|3), got {images.shape}")
        if not np.issubdtype(images.dtype, np.integer):
            problems.add(path, f"{s}_images: expected uint8 pixels, got {images.dtype}")
        if len(labels) != len(images):
            problems.add(path, f"{s}_labels: {len(labels)} labels for {len(images)} images")
    problems.raise_if_any()


def _class_names(path: Path, arrays: dict[str, np.ndarray], configured: int | None, notes: list[str]) -> list[str]:
    table = MEDMNIST_CLASSES.get(dataset_name(path))
    if table is not None:
        if configured is not None and configured != len(table):
            raise InputError(f"data.num_classes: {configured}, but {path.name} has {len(table)} classes "
                             f"({', '.join(table)})")
        return table
    count = configured or int(max(int(arrays[f"{s}_labels"].max(initial=0)) for s in SPLITS)) + 1
    notes.append(f"{path.name}: no known class table; classes named class_0..class_{count - 1}")
    return [f"class_{i}" for i in range(count)]


def _items(path: Path, arrays: dict[str, np.ndarray], split: str, n_classes: int,
           problems: ProblemList) -> list[dict]:
    images = arrays[f"{split}_images"]
    labels = arrays[f"{split}_labels"].reshape(len(images), -1)[:, 0].astype(np.int64)
    bad = np.flatnonzero((labels < 0) | (labels >= n_classes))
    if len(bad):
        problems.add(path, f"{split}_labels: {len(bad)} label(s) outside 0..{n_classes - 1} "
                           f"(first at position {int(bad[0])}: {int(labels[bad[0]])})")
    return [{IMAGE: images[i], "label": int(labels[i]), "id": f"{split}_{i:05d}"} for i in range(len(images))]


def build(cfg: Config) -> DataSplits:
    path = require_root(cfg.data.root, "medmnist", kind="file")
    arrays = _open(path)
    _check_arrays(path, arrays)
    notes: list[str] = []
    names = _class_names(path, arrays, cfg.data.num_classes, notes)
    problems = ProblemList()
    train, val, test = (_items(path, arrays, s, len(names), problems) for s in SPLITS)
    problems.raise_if_any()
    train, val, test = finalize(train, val, test, limit=cfg.data.limit, seed=cfg.data.split_seed)
    sample = arrays["train_images"]
    channels_last = sample.ndim == 4
    size = tuple(cfg.data.image_size) if cfg.data.image_size else tuple(sample.shape[1:3])
    preprocess = preprocess_transforms(cfg.data.preprocess, [IMAGE])
    augment = flips_2d([IMAGE]) if dataset_name(path) in _FLIP_INVARIANT else Compose([])
    return DataSplits(
        train=train, val=val, test=test, spatial_dims=2, in_channels=sample.shape[-1] if channels_last else 1,
        num_classes=len(names), class_names=names,
        load_transforms=load_2d_arrays(channels_last=channels_last, image_size=cfg.data.image_size,
                                       preprocess=preprocess),
        train_transforms=augment, notes=notes, image_size=size)
