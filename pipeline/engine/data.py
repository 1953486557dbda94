"""A training run's data: the checked splits, the two loaders, and the description every checkpoint keeps.

The training transform is :class:`SampleSeededCompose` around the split's own (``DataSplits.transform_for``),
so that a sample's augmentation depends on (seed, epoch, index) only; the trainer sets its epoch. The
training sampler is :class:`ResumableSampler` (the order of an epoch depends on (seed, epoch) only).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from monai.data import DataLoader, ThreadDataLoader
from torch.utils.data.distributed import DistributedSampler

from pipeline.config import Config
from pipeline.data import build_data, make_dataset
from pipeline.data.base import DataSplits
from pipeline.data.scan import DataStats, validate
from pipeline.engine import distributed as dist
from pipeline.engine.sampler import ResumableSampler
from pipeline.engine.seeding import SampleSeededCompose
from pipeline.errors import InputError
from pipeline.model.preprocessing import geometry_of


@dataclass
class RunData:
    splits: DataSplits
    image_size: tuple[int, ...] | None
    train_transform: SampleSeededCompose
    train_loader: DataLoader
    val_loader: DataLoader
    info: dict[str, Any]   # class names, channels, sizes, geometry: the checkpoints' ``data``

    @classmethod
    def build(cls, cfg: Config, cache_dir: Path) -> RunData:
        """The config's data, every sample loaded once and checked first (``InputError`` listing all problems)."""
        splits = build_data(cfg)
        stats = validate(splits)
        if not splits.train:
            raise InputError(f"data.root: {cfg.data.root}: no training samples")
        size = image_size_of(splits, stats)
        transform = SampleSeededCompose([splits.transform_for("train")], seed=cfg.seed)
        return cls(splits, size, transform,
                   make_loader(cfg, splits.train, transform, train=True, cache_dir=cache_dir),
                   make_loader(cfg, splits.val or splits.test, splits.transform_for("val"), train=False,
                               cache_dir=cache_dir),
                   describe(cfg, splits, size))

    def example_image(self) -> torch.Tensor:
        """The first validation (else test, else training) image as the network sees it: a model's input example."""
        splits = self.splits
        return splits.load_transforms(dict((splits.val or splits.test or splits.train)[0]))["image"]


def image_size_of(splits: DataSplits, stats: DataStats | None = None) -> tuple[int, ...] | None:
    """The fixed size of the loaded images (2D sources declare it); for volumes, which vary, the first training
    sample's: as ``validate`` loaded it (its first recorded shape) when its ``stats`` are given, else loaded here."""
    if splits.image_size:
        return tuple(int(s) for s in splits.image_size)
    if stats is not None:
        return tuple(int(s) for s in stats.shapes[0][1:]) if stats.shapes else None
    if not splits.train:
        return None
    return tuple(int(s) for s in splits.load_transforms(dict(splits.train[0]))["image"].shape[1:])


def describe(cfg: Config, splits: DataSplits, size: tuple[int, ...] | None) -> dict[str, Any]:
    return {"class_names": splits.class_names or [], "spatial_dims": splits.spatial_dims,
            "in_channels": splits.in_channels, "num_classes": splits.num_classes, "image_size": list(size or []),
            "n_train": len(splits.train),
            **geometry_of(splits.load_transforms, getattr(splits, "patch_size", None) or cfg.data.patch_size)}


def make_loader(cfg: Config, items: list[dict], transform, *, train: bool, cache_dir: Path) -> DataLoader:
    dataset = make_dataset(items, transform, cfg, cache_dir=cache_dir)
    batch = cfg.train.batch_size if train else max(1, cfg.train.batch_size if cfg.data.patch_size is None else 1)
    if train:
        sampler = ResumableSampler(dataset, shuffle=cfg.train.shuffle, seed=cfg.seed)
    else:
        sampler = DistributedSampler(dataset, shuffle=False) if dist.world_size() > 1 else None
    loader_cls = ThreadDataLoader if cfg.data.cache != "none" and cfg.train.num_workers == 0 else DataLoader
    # a generator of its own: creating the loader's iterator must not advance the global torch RNG, whose
    # state a checkpoint restores (a resumed run creates one iterator more than the uninterrupted one)
    return loader_cls(dataset, batch_size=batch, sampler=sampler, num_workers=cfg.train.num_workers,
                      drop_last=False, generator=torch.Generator().manual_seed(cfg.seed))
