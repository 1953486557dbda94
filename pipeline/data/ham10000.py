"""HAM10000 in its original layout: ``images/ISIC_*.jpg`` and ``HAM10000_metadata.csv``.

Classes in the MedMNIST order (akiec, bcc, bkl, df, mel, nv, vasc). The split is lesion-aware: all images of
one ``lesion_id`` land in the same split, stratified by diagnosis. Data dict keys: ``image`` (JPEG path),
``label``, ``index``, ``image_id``, ``lesion_id``, ``dx``, ``dx_type``, ``sex``, ``age`` (float, -1 unknown),
``age_band`` (e.g. "40-59" or "unknown"), ``localization``.
"""

from __future__ import annotations

from pathlib import Path

from pipeline.config import Config
from pipeline.data.base import DataSplits
from pipeline.data.classes import DERMA_CLASSES, age_band, age_value, text_value
from pipeline.data.files import (csv_line, inside_root, outside_root, read_csv, report_missing, require_dir,
                                 require_root)
from pipeline.data.loading import IMAGE, flips_2d, load_2d_files, preprocess_transforms
from pipeline.data.split import finalize, split_or_reuse
from pipeline.errors import ProblemList

CSV_NAME = "HAM10000_metadata.csv"
COLUMNS = ["lesion_id", "image_id", "dx", "dx_type", "age", "sex", "localization"]
DEFAULT_SIZE = (224, 224)


def _find_image(folders: list[Path], image_id: str) -> Path | None:
    for folder in folders:
        path = folder / f"{image_id}.jpg"
        if path.is_file():
            return path
    return None


def _image_folders(root: Path) -> list[Path]:
    """``images/`` or the two folders of the Kaggle/Harvard download (``HAM10000_images_part_1|2``)."""
    folders = [p for p in (root / "images", root / "HAM10000_images_part_1", root / "HAM10000_images_part_2")
               if p.is_dir()]
    return folders or [require_dir(root / "images", "HAM10000 images")]


def _row_item(row, path: Path) -> dict:
    age = age_value(row["age"])
    return {IMAGE: str(path), "label": DERMA_CLASSES.index(row["dx"]), "image_id": row["image_id"],
            "lesion_id": text_value(row["lesion_id"]), "dx": row["dx"], "dx_type": text_value(row["dx_type"]),
            "sex": text_value(row["sex"]), "age": age, "age_band": age_band(age),
            "localization": text_value(row["localization"])}


def read_items(root: Path, skip_missing: bool) -> tuple[list[dict], int]:
    """Data dicts of the CSV rows whose image exists; raises ``InputError`` for unknown classes and
    (unless ``skip_missing``) for missing images. Returns (items, number skipped)."""
    csv = root / CSV_NAME
    table = read_csv(csv, COLUMNS)
    folders = _image_folders(root)
    problems = ProblemList()
    items, missing = [], []
    for pos, row in enumerate(table.to_dict("records")):
        if row["dx"] not in DERMA_CLASSES:
            problems.add(csv, f"line {csv_line(pos)}: unknown class '{row['dx']}' in column dx "
                              f"(known: {', '.join(DERMA_CLASSES)})")
            continue
        if not all(inside_root(root, folder / f"{row['image_id']}.jpg") for folder in folders):
            problems.add(csv, outside_root(root, row["image_id"], f"line {csv_line(pos)}: image_id"))
            continue
        path = _find_image(folders, row["image_id"])
        if path is None:
            missing.append((folders[0] / f"{row['image_id']}.jpg", csv_line(pos)))
            continue
        items.append(_row_item(row, path))
    if missing and not skip_missing:
        report_missing(problems, missing, len(table), csv, folders[0])
    if not items and not problems:
        problems.add(csv, "no usable rows")
    problems.raise_if_any()
    return items, len(missing)


def build(cfg: Config) -> DataSplits:
    root = require_root(cfg.data.root, "ham10000", kind="dir")
    items, skipped = read_items(root, cfg.data.skip_missing)
    notes = [f"skipped {skipped} CSV rows whose image is missing (data.skip_missing)"] if skipped else []
    train, val, test = split_or_reuse(items, cfg.data, notes, what="images", stratify_key="label",
                                      group_key="lesion_id")
    train, val, test = finalize(train, val, test, limit=cfg.data.limit, seed=cfg.data.split_seed)
    size = tuple(cfg.data.image_size or DEFAULT_SIZE)
    return DataSplits(
        train=train, val=val, test=test, spatial_dims=2, in_channels=3, num_classes=len(DERMA_CLASSES),
        class_names=list(DERMA_CLASSES),
        load_transforms=load_2d_files(segmentation=False, image_size=size,
                                      preprocess=preprocess_transforms(cfg.data.preprocess, [IMAGE])),
        train_transforms=flips_2d([IMAGE], size), skipped=skipped, notes=notes, image_size=size)
