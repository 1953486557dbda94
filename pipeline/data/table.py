"""A CSV of your own images (``data.source: csv``; ``data.root`` is the CSV file).

One row per image. Columns (names set by ``data.columns``; defaults below):

- ``image``: the image path, relative to the CSV's folder (PNG, JPEG, TIFF, BMP, GIF);
- ``label``: the class (a name, or an integer index), for classification;
- ``mask``: the mask path, for segmentation (then a ``label`` column, when present, is kept as ``class_label``
  and stratifies the split);
- ``roi`` (optional): a region-of-interest (field-of-view) mask path;
- ``split`` (optional): train, val or test (also training, valid, validation, testing);
- ``data.columns.group`` (optional): rows sharing a value (one patient) never straddle two splits;
- every other column is metadata, kept as text (blank -> ``unknown``) for the stratified report.

Paths must stay inside the CSV's folder (no absolute paths, no ``..`` out of it).
"""

from __future__ import annotations

from pathlib import Path

from pipeline.config import Config
from pipeline.data.base import DataSplits
from pipeline.data.classes import text_value
from pipeline.data.files import csv_line, inside_root, outside_root, read_csv, report_missing, require_root
from pipeline.data.generic2d import ROI, SPLIT_NAMES, build_splits, class_names_of, segmentation_classes
from pipeline.data.loading import IMAGE, LABEL
from pipeline.errors import InputError, ProblemList
from pipeline.names import Keys as Ours

RESERVED = {IMAGE, LABEL, ROI, Ours.INDEX.value, "split", "class_label"}


class Rows:
    """Reads the rows of one CSV into data dicts, collecting every problem with its line number."""

    def __init__(self, csv: Path, cfg: Config):
        self.csv, self.base, self.cfg = csv, csv.parent, cfg
        self.cols = cfg.data.columns
        self.segmentation = cfg.task == "segmentation"
        need = [self.cols.image, self.cols.mask if self.segmentation else self.cols.label]
        self.table = read_csv(csv, need + ([self.cols.group] if self.cols.group else []))
        present = set(self.table.columns)
        self.paths = {IMAGE: self.cols.image, **({LABEL: self.cols.mask} if self.segmentation else {}),
                      **({ROI: self.cols.roi} if self.cols.roi in present else {})}
        used = {*self.paths.values(), self.cols.label, self.cols.split}
        self.meta = [c for c in self.table.columns if c not in used and c not in RESERVED]
        self.dropped = [c for c in self.table.columns if c not in used and c in RESERVED]
        self.has_split = self.cols.split in present
        self.has_label = self.cols.label in present
        self.names = [] if self.segmentation else class_names_of(
            [v.strip() for v in self.table[self.cols.label] if v.strip()], cfg.data.class_names)
        self.problems, self.missing = ProblemList(), []

    def _path(self, line: int, key: str, value: str) -> Path | None:
        column = self.paths[key]
        if not value.strip():
            self.problems.add(self.csv, f"line {line}: empty {column}")
            return None
        path = self.base / value.strip()
        if not inside_root(self.base, path):
            self.problems.add(self.csv, outside_root(self.base, value, f"line {line}: {column}"))
            return None
        if not path.is_file():
            self.missing.append((path, line))
            return None
        return path

    def _split(self, line: int, value: str) -> str | None:
        split = SPLIT_NAMES.get(value.strip().lower())
        if split is None:
            self.problems.add(self.csv, f"line {line}: column {self.cols.split}: '{value}' is not train, val or "
                                        "test")
        return split

    def _class(self, line: int, value: str) -> int | None:
        """Index of a class name, or of an integer label within the class names."""
        text = value.strip()
        if text in self.names:
            return self.names.index(text)
        if text.isdigit() and int(text) < len(self.names):
            return int(text)
        self.problems.add(self.csv, f"line {line}: unknown class '{text}' in column {self.cols.label} (classes: "
                                    f"{', '.join(self.names)}; data.class_names sets them)")
        return None

    def item(self, pos: int, row: dict) -> dict | None:
        line = csv_line(pos)
        paths = {key: self._path(line, key, row[column]) for key, column in self.paths.items()}
        split = self._split(line, row[self.cols.split]) if self.has_split else None
        label = None if self.segmentation else self._class(line, row[self.cols.label])
        if any(p is None for p in paths.values()) or (self.has_split and split is None) or (
                not self.segmentation and label is None):
            return None
        item = {key: str(p) for key, p in paths.items()}
        item["id"] = Path(row[self.cols.image].strip()).with_suffix("").as_posix()
        item.update({c: text_value(row[c]) for c in self.meta})
        group = self.cols.group
        if group and not row[group].strip():
            item[group] = f"(no {group}: line {line})"  # a row of its own, not one big 'unknown' group
        if split:
            item["split"] = split
        if self.segmentation and self.has_label:
            item["class_label"] = text_value(row[self.cols.label])
        elif not self.segmentation:
            item[LABEL] = label
        return item

    def read(self) -> tuple[list[dict], int]:
        items = [self.item(pos, row) for pos, row in enumerate(self.table.to_dict("records"))]
        if self.missing and not self.cfg.data.skip_missing:
            report_missing(self.problems, self.missing, len(self.table), self.csv, self.base, "files")
        self.problems.raise_if_any()
        kept = [i for i in items if i is not None]
        if not kept:
            raise InputError(f"{self.csv}: no usable rows")
        return kept, len(items) - len(kept)


def build(cfg: Config) -> DataSplits:
    csv = require_root(cfg.data.root, "csv", kind="file")
    rows = Rows(csv, cfg)
    items, skipped = rows.read()
    notes = [f"columns used as metadata: {', '.join(rows.meta)}"] if rows.meta else []
    if rows.dropped:
        notes.append(f"column(s) {', '.join(rows.dropped)} not kept: the name is one of ours (rename the column)")
    if skipped:
        notes.append(f"skipped {skipped} row(s) whose files are missing (data.skip_missing)")
    segmentation = cfg.task == "segmentation"
    names = segmentation_classes(cfg) if segmentation else rows.names
    stratify = ("class_label" if rows.has_label else None) if segmentation else LABEL
    return build_splits(cfg, items, class_names=names, segmentation=segmentation, notes=notes, skipped=skipped,
                        what="rows", stratify_key=stratify, group_key=cfg.data.columns.group)
