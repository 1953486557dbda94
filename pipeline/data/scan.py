"""Validation before training: load every sample once through the load transforms, collect ALL problems.

Unreadable or truncated images, image/mask shape mismatches, NaN/inf values, unexpected channel counts or
sizes: each becomes one line ``<file>: <what is wrong>``; ``InputError`` lists them all. Along the way the
statistics printed by ``medrobust data check`` are gathered (``DataStats``).
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import nibabel as nib
import numpy as np
import torch

from pipeline.data.base import DataSplits
from pipeline.data.loading import IMAGE, LABEL
from pipeline.data.problems import DataProblem, describe_exception, root_cause, show_path
from pipeline.errors import ProblemList

SPLITS = ("train", "val", "test")
logger = logging.getLogger(__name__)
ARRAY_SAMPLES = 64  # in-memory arrays per split run through the load transforms; all are checked as arrays


@dataclass
class DataStats:
    counts: dict[str, int] = field(default_factory=dict)
    class_counts: dict[str, Counter] = field(default_factory=dict)
    shapes: list[tuple[int, ...]] = field(default_factory=list)  # (C, *spatial) of every distinct sample
    spacings: list[tuple[float, ...]] = field(default_factory=list)
    orientations: set[str] = field(default_factory=set)
    intensity: list[float] = field(default_factory=lambda: [float("inf"), float("-inf")])
    label_values: set[int] = field(default_factory=set)
    foreground: list[int] = field(default_factory=list)  # foreground voxels per distinct segmentation sample
    loaded: int = 0
    sampled: bool = False  # in-memory arrays: an even sample went through the load transforms
    details: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)  # also logged; training goes on


def _key(item: dict[str, Any]) -> Any:
    """Identity of a sample's source (the same volume reused in val/test is loaded once)."""
    return tuple(id(v) if isinstance(v, np.ndarray) else repr(v) for v in (item.get(IMAGE), item.get(LABEL)))


def _where(item: dict[str, Any]) -> str:
    image = item.get(IMAGE)
    if isinstance(image, np.ndarray):
        return f"sample {item.get('id', '?')}"
    return show_path(image)


def _load(splits: DataSplits, item: dict[str, Any], problems: ProblemList) -> dict[str, Any] | None:
    try:
        return splits.load_transforms(dict(item))
    except Exception as exc:  # every reader raises its own types: one clean line each
        cause = root_cause(exc)
        if isinstance(cause, DataProblem):
            problems.add(cause.where, cause.what)
        else:
            problems.add(_where(item), describe_exception(cause))
        return None


def _check_tensor(name: str, value: Any, where: str, problems: ProblemList) -> torch.Tensor | None:
    if not isinstance(value, torch.Tensor):
        problems.add(where, f"{name} did not load as an array (got {type(value).__name__})")
        return None
    if hasattr(value, "as_tensor"):  # MetaTensor: plain tensor ops are much cheaper
        value = value.as_tensor()
    bad = int((~torch.isfinite(value)).sum())
    if bad:
        problems.add(where, f"{bad} NaN/inf value(s) in the {name}")
        return None
    return value


def _spatial_meta(image: torch.Tensor, spatial_dims: int, stats: DataStats) -> str:
    affine = getattr(image, "affine", None)
    if spatial_dims != 3 or affine is None:
        return ""
    aff = np.asarray(affine, dtype=float)
    spacing = tuple(float(v) for v in np.sqrt((aff[:3, :3] ** 2).sum(axis=0)))
    codes = "".join(nib.aff2axcodes(aff))
    stats.spacings.append(spacing)
    stats.orientations.add(codes)
    return f" spacing {tuple(round(s, 3) for s in spacing)} {codes}"


def _record(splits: DataSplits, item: dict[str, Any], out: dict[str, Any], stats: DataStats,
            problems: ProblemList) -> str:
    where = _where(item)
    spatial = _spatial_meta(out.get(IMAGE), splits.spatial_dims, stats)
    image = _check_tensor("image", out.get(IMAGE), where, problems)
    if image is None:
        return ""
    if image.shape[0] != splits.in_channels:
        problems.add(where, f"{image.shape[0]} channel(s), expected {splits.in_channels}")
    if splits.image_size and tuple(image.shape[1:]) != tuple(splits.image_size):
        problems.add(where, f"size {tuple(image.shape[1:])} after loading, expected {tuple(splits.image_size)}")
    stats.shapes.append(tuple(image.shape))
    patch = splits.patch_size
    if patch and any(p > n for p, n in zip(patch, image.shape[1:])):
        stats.warnings.append(f"{where}: the training patch {tuple(patch)} is larger than the resampled volume "
                              f"{tuple(image.shape[1:])}; the volume is zero-padded to the patch size")
    stats.intensity = [min(stats.intensity[0], float(image.min())), max(stats.intensity[1], float(image.max()))]
    text = f"shape {tuple(image.shape)}" + spatial
    label = out.get(LABEL)
    if isinstance(label, torch.Tensor) and label.ndim > 0:
        label = _check_tensor("mask", label, where, problems)
        if label is not None:
            stats.label_values.update(int(v) for v in torch.unique(label).tolist())
            stats.foreground.append(int((label > 0).sum()))
            text += f" foreground {stats.foreground[-1]}"
    return text


def _check_array(item: dict[str, Any], problems: ProblemList) -> None:
    image = item[IMAGE]
    if image.dtype.kind == "f" and not np.isfinite(image).all():
        problems.add(_where(item), f"{int((~np.isfinite(image)).sum())} NaN/inf value(s) in the image")


def _to_load(items: list[dict[str, Any]]) -> set[int]:
    """Positions loaded through the transforms: all file-backed items; an even sample of in-memory arrays."""
    arrays = [p for p, it in enumerate(items) if isinstance(it.get(IMAGE), np.ndarray)]
    if len(arrays) <= ARRAY_SAMPLES:
        return set(range(len(items)))
    sample = {arrays[int(k)] for k in np.linspace(0, len(arrays) - 1, ARRAY_SAMPLES)}
    return (set(range(len(items))) - set(arrays)) | sample


def _class_name(splits: DataSplits, label: Any) -> str | None:
    if isinstance(label, (int, np.integer)):
        names = splits.class_names or []
        return names[label] if 0 <= label < len(names) else str(label)
    return None


@contextmanager
def single_threaded_torch() -> Iterator[None]:
    """Per-sample loading gains nothing from intra-op threads, and on a busy or quota-limited CPU they cost
    (measured: 40 ms instead of 1 ms to scale one 256x256 RGB image with 2 threads): use one while loading."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def validate(splits: DataSplits, *, verbose: bool = False) -> DataStats:
    """Load each distinct sample once; raise ``InputError`` with every problem found, else return the stats."""
    with single_threaded_torch():
        return _validate(splits, verbose)


def _validate(splits: DataSplits, verbose: bool) -> DataStats:
    problems, stats = ProblemList(), DataStats()
    seen: set[Any] = set()
    for name in SPLITS:
        items = splits.split(name)
        stats.counts[name] = len(items)
        stats.class_counts[name] = Counter(c for c in (_class_name(splits, i.get(LABEL)) or i.get("diagnosis")
                                                         for i in items) if c)
        load = _to_load(items)
        for pos, item in enumerate(items):
            if isinstance(item.get(IMAGE), np.ndarray):
                _check_array(item, problems)
            key = _key(item)
            if pos not in load or key in seen:
                continue
            seen.add(key)
            out = _load(splits, item, problems)
            if out is None:
                continue
            stats.loaded += 1
            text = _record(splits, item, out, stats, problems)
            if verbose and text:
                stats.details.append(f"{name} {item.get('index')} {item.get('id', item.get('image_id', ''))}: {text}")
    stats.sampled = sum(stats.counts.values()) > stats.loaded and any(
        isinstance(i.get(IMAGE), np.ndarray) for i in splits.train[:1])
    if not any(stats.counts.values()):
        problems.add("data", "no samples in any split")
    problems.raise_if_any()
    for line in stats.warnings:
        logger.warning(line)
    return stats
