"""``medrobust data check``: build the splits of a config, validate every sample, print a summary."""

from __future__ import annotations

import time

import numpy as np

from pipeline.config import Config
from pipeline.data import build_data
from pipeline.data.base import DataSplits
from pipeline.data.scan import SPLITS, DataStats, validate

MAX_DETAIL_LINES = 20  # per split, with --verbose


def _range(rows: list[tuple], fmt: str) -> str:
    arr = np.asarray(rows, dtype=float)
    low, high = arr.min(axis=0), arr.max(axis=0)
    show = lambda v: "x".join(format(x, fmt) for x in v)  # noqa: E731
    return show(low) if np.array_equal(low, high) else f"{show(low)} .. {show(high)}"


def summary_lines(cfg: Config, splits: DataSplits, stats: DataStats) -> list[str]:
    lines = [f"source: {cfg.data.source}  root: {cfg.data.root or '(built in)'}  task: {cfg.task}",
             f"spatial dims {splits.spatial_dims}, {splits.in_channels} channel(s), {splits.num_classes} classes"
             + (f" ({', '.join(splits.class_names)})" if splits.class_names else "")]
    for name in SPLITS:
        per_class = stats.class_counts.get(name) or {}
        classes = ", ".join(f"{c} {per_class[c]}" for c in sorted(per_class, key=lambda c: -per_class[c]))
        lines.append(f"{name}: {stats.counts.get(name, 0)} samples" + (f" ({classes})" if classes else ""))
    if stats.shapes:
        lines.append(f"image shape (C, spatial): {_range(stats.shapes, '.0f')}")
    if stats.spacings:
        lines.append(f"spacing (mm): {_range(stats.spacings, '.3g')}; orientation: "
                     f"{', '.join(sorted(stats.orientations))}")
    if stats.loaded:
        lines.append(f"intensity range: {stats.intensity[0]:.4g} .. {stats.intensity[1]:.4g}"
                     + (" (of the loaded samples)" if stats.sampled else ""))
    if stats.label_values:
        lines.append(f"mask label values: {sorted(stats.label_values)}; foreground voxels per sample: "
                     f"{min(stats.foreground)} .. {max(stats.foreground)}")
    lines.append(f"loaded {stats.loaded} distinct samples"
                 + (" (in-memory arrays: all checked, an even sample loaded)" if stats.sampled else "")
                 + f"; skipped {splits.skipped}")
    lines += [f"note: {n}" for n in splits.notes]
    return lines


def run_check(cfg: Config, verbose: bool = False) -> int:
    """Build and validate the whole dataset; print the summary. Bad input raises ``InputError`` (exit 2)."""
    start = time.perf_counter()
    splits = build_data(cfg)
    stats = validate(splits, verbose=verbose)
    for line in summary_lines(cfg, splits, stats):
        print(line)
    if verbose:
        for line in stats.details[: MAX_DETAIL_LINES * len(SPLITS)]:
            print(f"  {line}")
    print(f"data check passed in {time.perf_counter() - start:.1f} s")
    return 0
