"""Checks on the files a source is pointed at: the root, CSV tables, and images listed but absent."""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd

from pipeline.errors import InputError, ProblemList

MAX_LISTED = 5  # missing files listed one per line before the count line


def require_root(root: Path | None, source: str, *, kind: str) -> Path:
    """``data.root`` must be given and be an existing file (``kind="file"``) or folder (``kind="dir"``)."""
    if root is None:
        raise InputError(f"data.root: required for data.source '{source}'")
    root = Path(root).expanduser()
    if not root.exists():
        raise InputError(f"{root}: not found (data.root)")
    if kind == "dir" and not root.is_dir():
        raise InputError(f"{root}: expected a folder (data.root for source '{source}')")
    if kind == "file" and not root.is_file():
        raise InputError(f"{root}: expected a file (data.root for source '{source}')")
    return root


def inside_root(root: Path, path: Path) -> bool:
    """``path`` is ``root`` or below it, judged on the path as written (``..`` resolved, symlinks not followed,
    so a data folder may be a link). A name read from a CSV or JSON file that is absolute or climbs out with
    ``..`` is not."""
    top = os.path.normpath(os.path.abspath(root))
    target = os.path.normpath(os.path.abspath(path))
    return target == top or target.startswith(top.rstrip(os.sep) + os.sep)


def outside_root(root: Path, listed: str, where: str) -> str:
    """The problem line for a listed path that resolves outside the data root."""
    return f"{where} '{listed}' resolves outside the data root {root} (absolute path or '..'); refused"


def require_dir(path: Path, what: str) -> Path:
    if not path.is_dir():
        raise InputError(f"{path}: folder not found ({what})")
    if not any(path.iterdir()):
        raise InputError(f"{path}: empty folder ({what})")
    return path


def read_csv(path: Path, columns: list[str]) -> pd.DataFrame:
    """A CSV with the required columns, read as strings (no silent type guessing)."""
    if not path.is_file():
        raise InputError(f"{path}: file not found")
    try:
        table = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError, OSError) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InputError(f"{path}: not a readable CSV ({reason})") from None
    absent = [c for c in columns if c not in table.columns]
    if absent:
        raise InputError(f"{path}: missing column(s) {', '.join(absent)} (has {', '.join(map(str, table.columns))})")
    return table


def csv_line(row_position: int) -> int:
    """1-based line number in the file of the row at ``row_position`` (line 1 is the header)."""
    return row_position + 2


def report_missing(problems: ProblemList, missing: list[tuple[Path, int]], total: int, csv: Path,
                   folder: Path, what: str = "images") -> None:
    """One line per missing file, with the way out; beyond ``MAX_LISTED`` files the first few, then a count line.
    ``what`` names the kind of file (``images``, ``masks``) that ``folder`` should hold."""
    hint = "set data.skip_missing=true to skip them"
    few = len(missing) <= MAX_LISTED
    for path, line in missing[:MAX_LISTED]:
        problems.add(path, f"listed in {csv.name} (line {line}) but the file is missing" + (f"; {hint}" if few else ""))
    if not few:
        problems.add(csv, f"{len(missing)} of {total} listed {what} are missing from {folder} "
                          f"(first {MAX_LISTED} above); {hint}")
