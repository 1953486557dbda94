"""ISIC 2017: the 2000 training images, for 3-class classification or 2D lesion segmentation (``cfg.task``).

Layout under ``data.root``: ``ISIC-2017_Training_Data/<id>.jpg``, ``ISIC-2017_Training_Part3_GroundTruth.csv``
(melanoma, seborrheic_keratosis; neither = nevus), masks ``ISIC-2017_Training_Part1_GroundTruth*/<id>_segmentation.png``
(0/255 -> label 0/1) and ``ISIC-2017_Training_Data_metadata.csv`` (age_approximate, sex; optional).
The 150 validation images are not used: they carry melanoma labels only (no seborrheic keratosis, no masks),
so our val/test splits are drawn from the training images instead (stratified by class, seeded).

Data dict keys: ``image`` (path), ``label`` (class int, or mask path for segmentation), ``index``,
``image_id``, ``diagnosis`` (class name), ``sex``, ``age`` (float, -1 unknown), ``age_band``.
"""

from __future__ import annotations

from pathlib import Path

from pipeline.config import Config
from pipeline.data.base import DataSplits
from pipeline.data.classes import ISIC2017_CLASSES, age_band, age_value, text_value
from pipeline.data.files import (csv_line, inside_root, outside_root, read_csv, report_missing, require_dir,
                                 require_root)
from pipeline.data.loading import IMAGE, LABEL, flips_2d, load_2d_files, preprocess_transforms
from pipeline.data.split import finalize, split_or_reuse
from pipeline.errors import InputError, ProblemList

IMAGES = "ISIC-2017_Training_Data"
LABELS_CSV = "ISIC-2017_Training_Part3_GroundTruth.csv"
META_CSV = "ISIC-2017_Training_Data_metadata.csv"
MASK_FOLDERS = ("ISIC-2017_Training_Part1_GroundTruth_256", "ISIC-2017_Training_Part1_GroundTruth")
DEFAULT_SIZE = (256, 256)


def _flag(csv: Path, pos: int, column: str, raw: str, problems: ProblemList) -> bool:
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if value not in (0.0, 1.0):
        problems.add(csv, f"line {csv_line(pos)}: column {column} must be 0 or 1, got '{raw}'")
    return value == 1.0


def _class_of(csv: Path, pos: int, row: dict, problems: ProblemList) -> int | None:
    melanoma = _flag(csv, pos, "melanoma", row["melanoma"], problems)
    keratosis = _flag(csv, pos, "seborrheic_keratosis", row["seborrheic_keratosis"], problems)
    if melanoma and keratosis:
        problems.add(csv, f"line {csv_line(pos)}: both melanoma and seborrheic_keratosis are 1")
        return None
    return 1 if melanoma else 2 if keratosis else 0


def _metadata(root: Path) -> dict[str, dict]:
    path = root / META_CSV
    if not path.is_file():
        return {}
    table = read_csv(path, ["image_id"])
    return {r["image_id"]: r for r in table.to_dict("records")}


def _mask_folder(root: Path) -> Path:
    for name in MASK_FOLDERS:
        if (root / name).is_dir():
            return require_dir(root / name, "ISIC 2017 segmentation masks")
    raise InputError(f"{root / MASK_FOLDERS[0]}: folder not found (segmentation masks for task segmentation)")


def _item(row: dict, label: int, image: Path, meta: dict) -> dict:
    extra = meta.get(row["image_id"], {})
    age = age_value(extra.get("age_approximate"))
    return {IMAGE: str(image), LABEL: label, "image_id": row["image_id"], "diagnosis": ISIC2017_CLASSES[label],
            "sex": text_value(extra.get("sex")), "age": age, "age_band": age_band(age)}


def read_items(root: Path, segmentation: bool, skip_missing: bool) -> tuple[list[dict], int]:
    images = require_dir(root / IMAGES, "ISIC 2017 training images")
    masks = _mask_folder(root) if segmentation else None
    csv = root / LABELS_CSV
    table = read_csv(csv, ["image_id", "melanoma", "seborrheic_keratosis"])
    meta = _metadata(root)
    problems, items, missing, missing_masks = ProblemList(), [], [], []
    for pos, row in enumerate(table.to_dict("records")):
        label = _class_of(csv, pos, row, problems)
        image = images / f"{row['image_id']}.jpg"
        mask = masks / f"{row['image_id']}_segmentation.png" if masks else None
        if not all(inside_root(root, p) for p in (image, mask) if p is not None):
            problems.add(csv, outside_root(root, row["image_id"], f"line {csv_line(pos)}: image_id"))
            continue
        absent = [p for p in (image, mask) if p is not None and not p.is_file()]
        missing += [(p, csv_line(pos)) for p in absent if p == image]
        missing_masks += [(p, csv_line(pos)) for p in absent if p == mask]
        if label is None or absent:
            continue
        item = _item(row, label, image, meta)
        if mask is not None:
            item[LABEL] = str(mask)
            item["class_label"] = label
        items.append(item)
    if not skip_missing:
        for found, folder, what in ((missing, images, "images"), (missing_masks, masks, "masks")):
            if found:
                report_missing(problems, found, len(table), csv, folder, what)
    problems.raise_if_any()
    return items, len({line for _, line in missing + missing_masks})


def build(cfg: Config) -> DataSplits:
    root = require_root(cfg.data.root, "isic2017", kind="dir")
    segmentation = cfg.task == "segmentation"
    items, skipped = read_items(root, segmentation, cfg.data.skip_missing)
    notes = ["the 150 ISIC 2017 validation images are not used (melanoma labels only); val/test are drawn "
             "from the 2000 training images"]
    if skipped:
        notes.append(f"skipped {skipped} rows of {LABELS_CSV} whose image or mask is missing (data.skip_missing)")
    stratify = "class_label" if segmentation else LABEL
    train, val, test = split_or_reuse(items, cfg.data, notes, what="images", stratify_key=stratify)
    train, val, test = finalize(train, val, test, limit=cfg.data.limit, seed=cfg.data.split_seed)
    size = tuple(cfg.data.image_size or DEFAULT_SIZE)
    keys = [IMAGE, LABEL] if segmentation else [IMAGE]
    return DataSplits(
        train=train, val=val, test=test, spatial_dims=2, in_channels=3,
        num_classes=2 if segmentation else len(ISIC2017_CLASSES),
        class_names=["background", "lesion"] if segmentation else list(ISIC2017_CLASSES),
        load_transforms=load_2d_files(segmentation=segmentation, image_size=size,
                                      preprocess=preprocess_transforms(cfg.data.preprocess, [IMAGE])),
        train_transforms=flips_2d(keys, size), skipped=skipped, notes=notes, image_size=size)
