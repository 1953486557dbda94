"""Generic 2D folders (``data.source: folder``): your own images, no CSV needed.

Segmentation::

    <root>/images/<id><image_suffix>.<ext>     any of png, jpg, jpeg, tif, tiff, bmp, gif
    <root>/masks/<id><mask_suffix>.<ext>       the mask of that image, any of the same formats
    <root>/<roi_dir>/<id><roi_suffix>.<ext>    optional: a region-of-interest (field-of-view) mask per image

Classification: one subfolder per class, named after the class (``data.class_names`` fixes the order and the
names allowed; otherwise the folder names, sorted)::

    <root>/images/<class>/<file>.<ext>         files in nested folders below a class folder count too

The folder names are ``data.images_dir``, ``data.masks_dir`` and ``data.roi_dir``. Data dict keys: ``image``,
``label`` (class int, or the mask path), ``roi`` (path, when ``data.roi_dir`` is set), ``id``, ``index``.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from pipeline.config import Config
from pipeline.data.base import DataSplits
from pipeline.data.files import MAX_LISTED, require_dir, require_root
from pipeline.data.generic2d import (EXTENSIONS, ROI, build_splits, class_names_of, is_image_file,
                                     segmentation_classes)
from pipeline.data.loading import IMAGE, LABEL
from pipeline.errors import InputError, ProblemList

_EXT_TEXT = "|".join(e.lstrip(".") for e in EXTENSIONS)


def _files(folder: Path, recursive: bool, notes: list[str]) -> list[Path]:
    """Image files of ``folder``, sorted; other files are counted in a note, hidden ones ignored."""
    found = sorted(p for p in (folder.rglob("*") if recursive else folder.iterdir())
                   if p.is_file() and not p.name.startswith("."))
    others = Counter(p.suffix.lower() or "(none)" for p in found if not is_image_file(p))
    if others:
        notes.append(f"{folder}: ignored {sum(others.values())} file(s) that are not images ("
                     + ", ".join(f"{ext} {n}" for ext, n in others.most_common()) + ")")
    return [p for p in found if is_image_file(p)]


class Companions:
    """The files of one folder (masks or ROIs) by stem, for lookup as ``<id><suffix>.<any image ext>``."""

    def __init__(self, folder: Path, suffix: str, what: str, notes: list[str]):
        self.folder, self.suffix, self.what = folder, suffix, what
        self.by_stem: dict[str, list[Path]] = {}
        for path in _files(folder, False, notes):
            self.by_stem.setdefault(path.stem, []).append(path)
        self.used: set[str] = set()

    def find(self, image: Path, image_id: str, problems: ProblemList) -> Path | None:
        """The one file for ``image_id``; None when absent; several matches are a problem."""
        stem = image_id + self.suffix
        found = self.by_stem.get(stem, [])
        self.used.add(stem)
        if len(found) > 1:
            problems.add(image, f"{len(found)} {self.what}s match it in {self.folder}: "
                                + ", ".join(p.name for p in found))
        return found[0] if len(found) == 1 else None

    def expected(self, image_id: str) -> str:
        return f"{self.folder / (image_id + self.suffix)}.<{_EXT_TEXT}>"

    def unused_note(self) -> str | None:
        left = sum(len(v) for k, v in self.by_stem.items() if k not in self.used)
        return f"{self.folder}: {left} file(s) match no image (ignored)" if left else None


def _image_id(image: Path, suffix: str, problems: ProblemList) -> str | None:
    if suffix and not image.stem.endswith(suffix):
        problems.add(image, f"the name does not end with data.image_suffix '{suffix}'")
        return None
    return image.stem[: len(image.stem) - len(suffix)] if suffix else image.stem


def _report_missing(problems: ProblemList, missing: list[tuple[Path, str]], total: int, folder: Path,
                    what: str) -> None:
    """One line per image without its mask (the first few), with the way out; a count line beyond that."""
    hint = "; set data.skip_missing=true to skip such images"
    for image, expected in missing[:MAX_LISTED]:
        problems.add(image, f"no {what} for this image (looked for {expected})"
                            + (hint if len(missing) <= MAX_LISTED else ""))
    if len(missing) > MAX_LISTED:
        problems.add(folder, f"{len(missing)} of {total} images have no {what} here (first {MAX_LISTED} above)"
                             + hint)


def _pair_items(images: list[Path], cfg: Config, companions: list[tuple[str, Companions]],
                notes: list[str]) -> tuple[list[dict], int]:
    """Data dicts of the images whose companions (mask, ROI) all exist."""
    problems, items = ProblemList(), []
    missing: dict[str, list[tuple[Path, str]]] = {key: [] for key, _ in companions}
    skipped = 0
    for image in images:
        image_id = _image_id(image, cfg.data.image_suffix, problems)
        if image_id is None:
            continue
        item, absent = {IMAGE: str(image), "id": image_id}, False
        for key, files in companions:
            path = files.find(image, image_id, problems)
            if path is None:
                missing[key].append((image, files.expected(image_id)))
                absent = True
            else:
                item[key] = str(path)
        skipped += absent
        if not absent:
            items.append(item)
    if not cfg.data.skip_missing:
        for key, files in companions:
            if missing[key]:
                _report_missing(problems, missing[key], len(images), files.folder, files.what)
    problems.raise_if_any()
    notes += [n for _, files in companions if (n := files.unused_note())]
    if skipped:
        notes.append(f"skipped {skipped} image(s) without a mask or region of interest (data.skip_missing)")
    return items, skipped


def _companions(root: Path, cfg: Config, segmentation: bool, notes: list[str]) -> list[tuple[str, Companions]]:
    out = []
    if segmentation:
        folder = require_dir(root / cfg.data.masks_dir, "masks, data.masks_dir")
        out.append((LABEL, Companions(folder, cfg.data.mask_suffix, "mask", notes)))
    if cfg.data.roi_dir:
        folder = require_dir(root / cfg.data.roi_dir, "region-of-interest masks, data.roi_dir")
        out.append((ROI, Companions(folder, cfg.data.roi_suffix, "region-of-interest mask", notes)))
    return out


def _class_images(images_dir: Path, cfg: Config, notes: list[str]) -> tuple[list[Path], list[int], list[str]]:
    """Image paths, their class index and the class names, from one subfolder per class."""
    folders = sorted(p for p in images_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
    loose = _files(images_dir, False, [])
    if loose:
        raise InputError(f"{loose[0]}: not in a class subfolder of {images_dir} ({len(loose)} such image(s)); "
                         "classification expects <images_dir>/<class>/<file>")
    if not folders:
        raise InputError(f"{images_dir}: no class subfolders (classification expects <images_dir>/<class>/<file>)")
    known = cfg.data.class_names
    unknown = [f for f in folders if known and f.name not in known]
    if unknown:
        raise InputError([f"{f}: unknown class folder '{f.name}' (data.class_names: {', '.join(known)})"
                          for f in unknown])
    names = class_names_of([f.name for f in folders], known)
    images, labels = [], []
    for folder in folders:
        files = _files(folder, True, notes)
        if not files:
            notes.append(f"{folder}: class folder without images")
        images += files
        labels += [names.index(folder.name)] * len(files)
    absent = [n for n in names if n not in {f.name for f in folders}]
    if absent:
        notes.append(f"no folder (no images) for class(es) {', '.join(absent)} of data.class_names")
    return images, labels, names


def build(cfg: Config) -> DataSplits:
    root = require_root(cfg.data.root, "folder", kind="dir")
    segmentation = cfg.task == "segmentation"
    images_dir = require_dir(root / cfg.data.images_dir, "images, data.images_dir")
    notes: list[str] = []
    if segmentation:
        names, images, classes = segmentation_classes(cfg), _files(images_dir, False, notes), {}
    else:
        images, labels, names = _class_images(images_dir, cfg, notes)
        classes = dict(zip(map(str, images), labels))
    if not images:
        raise InputError(f"{images_dir}: no image files ({', '.join(EXTENSIONS)})")
    items, skipped = _pair_items(images, cfg, _companions(root, cfg, segmentation, notes), notes)
    if not items:
        raise InputError(f"{images_dir}: no image has all of its companion files")
    for item in items if classes else []:
        item[LABEL] = classes[item[IMAGE]]
        item["id"] = Path(item[IMAGE]).relative_to(images_dir).with_suffix("").as_posix()
    return build_splits(cfg, items, class_names=names, segmentation=segmentation, notes=notes, skipped=skipped,
                        what="images", stratify_key=None if segmentation else LABEL)
