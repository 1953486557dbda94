"""Data sources -> ``DataSplits`` (lists of MONAI data dicts + transforms), and the MONAI dataset around them.

``build_data(cfg)`` dispatches on ``cfg.data.source`` to one module per source; ``validate(splits)`` loads every
sample once and reports all problems before training; ``make_dataset`` wraps a split in a MONAI
``Dataset``/``CacheDataset``/``PersistentDataset`` as ``cfg.data.cache`` says.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

from monai.data import CacheDataset, Dataset, PersistentDataset

from pipeline.config import Config
from pipeline.data.base import DataSplits
from pipeline.data.scan import validate
from pipeline.errors import InputError

SOURCES = {
    "medmnist": "pipeline.data.medmnist",
    "ham10000": "pipeline.data.ham10000",
    "isic2017": "pipeline.data.isic2017",
    "nifti": "pipeline.data.nifti",
    "dicom": "pipeline.data.dicom",
    "synthetic": "pipeline.data.synthetic",
    "folder": "pipeline.data.folder",
    "csv": "pipeline.data.table",
}


def build_data(cfg: Config) -> DataSplits:
    """The train/val/test data dicts of ``cfg.data.source``; raises ``InputError`` on bad input."""
    module = importlib.import_module(SOURCES[cfg.data.source])
    splits = module.build(cfg)
    names = cfg.data.class_names
    if names and splits.class_names != names:  # folder/csv apply them while reading; the others are renamed
        if len(names) != splits.num_classes:
            raise InputError(f"data.class_names: {len(names)} names, but the data has {splits.num_classes} "
                             f"classes ({', '.join(splits.class_names or [])})")
        splits.class_names = list(names)
    return splits


def make_dataset(items: list[dict[str, Any]], transform: Callable, cfg: Config, *,
                 cache_dir: str | Path | None = None, num_workers: int | None = None) -> Dataset:
    """A MONAI dataset by ``cfg.data.cache``: ``none`` -> Dataset, ``cache`` -> CacheDataset (in memory, up to the
    first random transform), ``persistent`` -> PersistentDataset in ``cfg.data.cache_dir`` or ``cache_dir``."""
    mode = cfg.data.cache
    if mode == "none":
        return Dataset(items, transform=transform)
    if mode == "cache":
        return CacheDataset(items, transform=transform, progress=False,
                            num_workers=num_workers if num_workers is not None else 1)
    folder = cfg.data.cache_dir or cache_dir
    if folder is None:
        raise InputError("data.cache_dir: required when data.cache is 'persistent'")
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError(f"{folder}: cannot create the cache folder ({exc.strerror})") from None
    return PersistentDataset(items, transform=transform, cache_dir=folder)




__all__ = ["DataSplits", "SOURCES", "build_data", "make_dataset", "validate"]
