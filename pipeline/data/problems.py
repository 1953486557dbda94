"""Turning the many exception types of PIL, nibabel, pydicom and MONAI into one clean problem line each."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any


class DataProblem(ValueError):
    """A problem with one input file, raised inside a transform: ``where`` names the file(s)."""

    def __init__(self, where: str, what: str):
        self.where = where
        self.what = what
        super().__init__(f"{where}: {what}")


def root_cause(exc: BaseException) -> BaseException:
    """The innermost exception: MONAI's ``Compose`` wraps the original error in a RuntimeError."""
    seen = set()
    while id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, DataProblem):
            return exc
        inner = exc.__cause__ or exc.__context__
        if inner is None:
            return exc
        exc = inner
    return exc


def _strip_paths(text: str, paths: Sequence[str]) -> str:
    for p in paths:
        if p:
            text = text.replace(f"'{p}'", "the file").replace(p, "the file")
    return text


def describe_exception(exc: BaseException, paths: Sequence[str] = ()) -> str:
    """A short, user-facing reason, e.g. ``unreadable image (cannot identify image file)``."""
    exc = root_cause(exc)
    if isinstance(exc, DataProblem):
        return exc.what
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    text = _strip_paths(text, paths)
    lowered = text.lower()
    if "truncated" in lowered:
        return f"truncated image ({text})"
    if isinstance(exc, FileNotFoundError) or "no such file" in lowered:
        return "file not found"
    if "cannot identify image" in lowered or "not a gzip" in lowered or "invalid dicom" in lowered:
        return f"unreadable image ({text})"
    return f"unreadable image ({type(exc).__name__}: {text})"


def show_path(value: Any) -> str:
    """A data-dict value that names files (a path or a list of paths) as text for a problem line."""
    if isinstance(value, (list, tuple)):
        return ", ".join(str(v) for v in value)
    if isinstance(value, (str, Path)):
        return str(value)
    return "<in-memory array>"
