"""DICOM studies: a study is a folder whose sub-folders are series (one series per folder).

``data.root`` may be a folder of studies (one volume each), a single study, or a single series folder (image
only). In a study, ``data.image_series`` patterns (fnmatch on the folder names, e.g. ``*T1post*``) pick the
series stacked as channels, in pattern order (all non-mask series, by name, when unset); ``data.mask_series``
picks the label series (none: image only). Slices are stacked by position along the slice normal.

With fewer than three studies there is nothing to hold out: all go to training and are reused for val/test
(said in ``notes``). Data dict keys: ``image`` (list of series folders), ``label`` (mask folder, when a mask
series is configured), ``id`` (``study_000``...: never the folder name, which may hold a patient id or date),
``series`` (the image series folder names joined by ","), ``slices``, ``index``. No header tag goes into a dict.
"""

from __future__ import annotations

import fnmatch
from pathlib import Path

import numpy as np

from pipeline.config import Config
from pipeline.data.base import DataSplits
from pipeline.data.dicom_series import PositionSortedDicomReader, SeriesInfo, is_series_folder, scan_series
from pipeline.data.files import require_root
from pipeline.data.loading import IMAGE, LABEL, load_3d, patches_3d, preprocess_transforms
from pipeline.data.split import finalize, split_or_reuse
from pipeline.errors import InputError, ProblemList

DEFAULT_ORIENTATION = "RAS"
DEFAULT_PATCH = (64, 64, 16)


def _subfolders(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def find_studies(root: Path) -> tuple[str, list[Path]]:
    """("series", [root]) | ("study", [root]) | ("studies", [study folders])."""
    if is_series_folder(root):
        return "series", [root]
    subs = _subfolders(root)
    if not subs:
        raise InputError(f"{root}: empty folder (no DICOM series or study folders)")
    if any(is_series_folder(s) for s in subs):
        return "study", [root]
    studies = [s for s in subs if any(is_series_folder(x) for x in _subfolders(s))]
    if not studies:
        raise InputError(f"{root}: no DICOM files in this folder or in its sub-folders (two levels)")
    return "studies", studies


def _match_one(study: Path, series: list[Path], pattern: str, key: str, problems: ProblemList) -> Path | None:
    hits = [s for s in series if fnmatch.fnmatch(s.name, pattern)]
    if len(hits) != 1:
        found = ", ".join(h.name for h in hits) if hits else "none"
        problems.add(study, f"{key} pattern '{pattern}' must match exactly one series folder (matched: {found})")
        return None
    return hits[0]


def _select_series(study: Path, cfg_data, problems: ProblemList) -> tuple[list[Path], Path | None]:
    series = [s for s in _subfolders(study) if is_series_folder(s)]
    mask = _match_one(study, series, cfg_data.mask_series, "data.mask_series", problems) \
        if cfg_data.mask_series else None
    if cfg_data.image_series:
        images = [_match_one(study, series, p, "data.image_series", problems) for p in cfg_data.image_series]
    else:
        images = [s for s in series if not (cfg_data.mask_series and fnmatch.fnmatch(s.name, cfg_data.mask_series))]
    return [i for i in images if i is not None], mask


def _check_aligned(infos: list[SeriesInfo], problems: ProblemList) -> None:
    """Series stacked as channels (and the mask) must share the slice grid."""
    first = infos[0]
    for info in infos[1:]:
        if (info.slices, info.rows, info.columns) != (first.slices, first.rows, first.columns):
            problems.add(info.folder, f"{info.slices} slices of {info.rows}x{info.columns}, but "
                                      f"{first.folder.name} has {first.slices} of {first.rows}x{first.columns}")
        elif not np.allclose(info.positions, first.positions, atol=0.1):
            problems.add(info.folder, f"slice positions differ from {first.folder.name} (series not co-registered)")


def _study_item(study: Path, number: int, cfg_data, problems: ProblemList, single_series: bool) -> dict | None:
    if single_series:
        if cfg_data.mask_series:
            problems.add(study, "data.root is a single series folder, so data.mask_series cannot be found "
                                "(set data.mask_series to null for an image-only check)")
        images, mask = [study], None
    else:
        images, mask = _select_series(study, cfg_data, problems)
    if not images:
        problems.add(study, "no image series selected")
        return None
    infos = [scan_series(s, problems) for s in [*images, *([mask] if mask else [])]]
    if any(i is None for i in infos):
        return None
    _check_aligned(infos, problems)
    item = {IMAGE: [str(s) for s in images], "id": f"study_{number:03d}",
            "series": ",".join(s.name for s in images), "slices": infos[0].slices}
    if mask is not None:
        item[LABEL] = str(mask)
    return item


def build(cfg: Config) -> DataSplits:
    root = require_root(cfg.data.root, "dicom", kind="dir")
    layout, studies = find_studies(root)
    problems = ProblemList()
    items = [_study_item(s, n, cfg.data, problems, layout == "series") for n, s in enumerate(studies)]
    problems.raise_if_any()
    items = [i for i in items if i is not None]
    has_label = all(LABEL in i for i in items)
    notes = [] if has_label else ["image only: no mask series (data.mask_series unset)"]
    train, val, test = split_or_reuse(items, cfg.data, notes, what="studies", stratify_key=None)
    train, val, test = finalize(train, val, test, limit=cfg.data.limit, seed=cfg.data.split_seed)
    return DataSplits(
        train=train, val=val, test=test, spatial_dims=3, in_channels=len(items[0][IMAGE]),
        num_classes=2 if has_label else 0, class_names=["background", "mask"] if has_label else None,
        load_transforms=load_3d(reader_factory=PositionSortedDicomReader, has_label=has_label,
                                orientation=cfg.data.orientation or DEFAULT_ORIENTATION, spacing=cfg.data.spacing,
                                preprocess=preprocess_transforms(cfg.data.preprocess, [IMAGE])),
        train_transforms=patches_3d(cfg.data.patch_size or DEFAULT_PATCH, cfg.data.patches_per_volume, has_label),
        notes=notes, patch_size=tuple(cfg.data.patch_size or DEFAULT_PATCH))
