"""NIfTI volumes with labels: an MSD-style ``dataset.json``, or ``imagesTr``/``labelsTr`` folders paired by name.

All volumes come out in one orientation (``data.orientation``, default RAS) and one spacing (``data.spacing``;
default: the finest spacing found among the volumes, read from the headers), intensities scaled by
``data.preprocess`` from the raw values (e.g. ``ct_window``) or, without it, per channel to [0, 1] between the 0.5
and 99.5 percentiles; labels resampled with nearest interpolation. Training samples
patches (``data.patch_size``, ``data.patches_per_volume``); every patch keeps its volume's ``index``.

Data dict keys: ``image``, ``label`` (paths), ``id`` (file name without extension), ``index``.
"""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
from monai.data import NibabelReader

from pipeline.config import Config
from pipeline.data.base import DataSplits
from pipeline.data.files import inside_root, outside_root, require_dir, require_root
from pipeline.data.loading import IMAGE, LABEL, load_3d, patches_3d, preprocess_transforms
from pipeline.data.problems import describe_exception
from pipeline.data.split import finalize, split_or_reuse
from pipeline.errors import InputError, ProblemList

DEFAULT_ORIENTATION = "RAS"
DEFAULT_PATCH = (64, 64, 32)
_SUFFIXES = (".nii.gz", ".nii")


def volume_id(path: Path) -> str:
    name = path.name
    for suffix in _SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def _nifti_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.name.endswith(_SUFFIXES) and not p.name.startswith("."))


def _from_json(root: Path, problems: ProblemList, skip_missing: bool) -> tuple[list[dict], dict, int]:
    path = root / "dataset.json"
    try:
        spec = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InputError(f"{path}: not valid JSON ({exc})") from None
    entries = spec.get("training") if isinstance(spec, dict) else None
    if not isinstance(entries, list) or not entries:
        raise InputError(f"{path}: no 'training' list of {{image, label}} entries")
    items, skipped = [], 0
    for n, entry in enumerate(entries):
        if not isinstance(entry, dict) or not all(isinstance(entry.get(k), str) for k in ("image", "label")):
            problems.add(path, f"training[{n}]: expected {{image: <path>, label: <path>}}")
            continue
        image, label = root / entry["image"], root / entry["label"]
        escaping = [entry[k] for k in ("image", "label") if not inside_root(root, root / entry[k])]
        if escaping:
            problems.add(path, outside_root(root, escaping[0], f"training[{n}]: path"))
            continue
        absent = [p for p in (image, label) if not p.is_file()]
        if absent:
            skipped += 1
            if not skip_missing:
                for p in absent:
                    problems.add(p, f"listed in dataset.json (training[{n}]) but the file is missing")
            continue
        items.append({IMAGE: str(image), LABEL: str(label), "id": volume_id(image)})
    return items, spec.get("labels") or {}, skipped


def _label_for(image: Path, labels: dict[str, Path]) -> Path | None:
    stem = volume_id(image)
    return labels.get(stem) or (labels.get(stem[:-5]) if stem.endswith("_0000") else None)


def _from_folders(root: Path, problems: ProblemList, skip_missing: bool) -> tuple[list[dict], int]:
    images_dir = require_dir(root / "imagesTr", "NIfTI images (or give a dataset.json)")
    labels_dir = require_dir(root / "labelsTr", "NIfTI labels")
    images = _nifti_files(images_dir)
    if not images:
        raise InputError(f"{images_dir}: no .nii or .nii.gz files")
    labels = {volume_id(p): p for p in _nifti_files(labels_dir)}
    items, skipped = [], 0
    for image in images:
        label = _label_for(image, labels)
        if label is None:
            skipped += 1
            if not skip_missing:
                problems.add(image, f"no label with the same name in {labels_dir}")
            continue
        items.append({IMAGE: str(image), LABEL: str(label), "id": volume_id(image)})
    return items, skipped


def _headers(items: list[dict], problems: ProblemList) -> list[tuple[np.ndarray, tuple[int, ...]]]:
    """(voxel sizes in RAS axis order, shape) of every image, from the headers only."""
    out = []
    for item in items:
        try:
            img = nib.load(item[IMAGE])
        except Exception as exc:  # nibabel raises several types for bad files
            problems.add(item[IMAGE], describe_exception(exc, [item[IMAGE]]))
            continue
        ornt = nib.orientations.io_orientation(img.affine)
        zooms = np.abs(np.asarray(img.header.get_zooms()[:3], dtype=float))
        ras = np.empty(3)
        ras[ornt[:, 0].astype(int)] = zooms
        out.append((ras, tuple(img.shape)))
    return out


def _class_names(labels: dict, configured: int | None) -> list[str]:
    if labels:
        return [str(labels[k]) for k in sorted(labels, key=lambda k: int(k))]
    return ["background", *(f"class_{i}" for i in range(1, configured or 2))]


def build(cfg: Config) -> DataSplits:
    root = require_root(cfg.data.root, "nifti", kind="dir")
    problems = ProblemList()
    label_names: dict = {}
    if (root / "dataset.json").is_file():
        items, label_names, skipped = _from_json(root, problems, cfg.data.skip_missing)
    else:
        items, skipped = _from_folders(root, problems, cfg.data.skip_missing)
    problems.raise_if_any()
    headers = _headers(items, problems)
    problems.raise_if_any()
    if not items:
        raise InputError(f"{root}: no image/label pairs")
    notes = [f"skipped {skipped} image(s) without a label file (data.skip_missing)"] if skipped else []
    spacing = cfg.data.spacing
    if spacing is None:
        spacing = [float(v) for v in np.min([h[0] for h in headers], axis=0)]
        notes.append(f"resampled to {tuple(round(v, 4) for v in spacing)} mm, the finest spacing found "
                     "(set data.spacing to choose)")
    orientation = cfg.data.orientation or DEFAULT_ORIENTATION
    train, val, test = split_or_reuse(items, cfg.data, notes, what="volumes", stratify_key=None)
    train, val, test = finalize(train, val, test, limit=cfg.data.limit, seed=cfg.data.split_seed)
    names = _class_names(label_names, cfg.data.num_classes)
    in_channels = headers[0][1][3] if len(headers[0][1]) == 4 else 1
    return DataSplits(
        train=train, val=val, test=test, spatial_dims=3, in_channels=in_channels, num_classes=len(names),
        class_names=names,
        load_transforms=load_3d(reader_factory=NibabelReader, has_label=True, orientation=orientation,
                                spacing=spacing, preprocess=preprocess_transforms(cfg.data.preprocess, [IMAGE])),
        train_transforms=patches_3d(cfg.data.patch_size or DEFAULT_PATCH, cfg.data.patches_per_volume, True),
        skipped=skipped, notes=notes, patch_size=tuple(cfg.data.patch_size or DEFAULT_PATCH))
