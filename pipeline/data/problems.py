"""Turning the many exception types of PIL, nibabel, pydicom and MONAI into one clean problem line each."""

from __future__ import annotations

import re
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


_EXC_LINE = re.compile(r"^([A-Za-z_][\w.]*(?:Error|Exception|Warning)): (.*)$")


def _strip_paths(text: str, paths: Sequence[str]) -> str:
    """The problem line names the file already: drop it from the reason."""
    for p in paths:
        if p:
            text = text.replace(f" '{p}'", "").replace(f"'{p}'", "the file").replace(p, "the file")
    return text.strip()


def _reader_reason(text: str) -> str | None:
    """MONAI's ``LoadImage`` packs the readers' tracebacks into its message, ours (tried first) first: keep the
    final exception line of that first traceback (the innermost one when exceptions were chained)."""
    tracebacks = text.split("Traceback (most recent call last):")
    first = tracebacks[1] if len(tracebacks) > 1 else text
    hits = [m for m in map(_EXC_LINE.match, first.splitlines()) if m]
    return f"{hits[-1].group(1).rsplit('.', 1)[-1]}: {hits[-1].group(2)}" if hits else None


def _truncation(exc: BaseException) -> BaseException | None:
    """An exception of the chain that says the file is truncated (PIL raises that one *from* a decoder error)."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if "truncated" in str(exc).lower():
            return exc
        exc = exc.__cause__ or exc.__context__
    return None


def describe_exception(exc: BaseException, paths: Sequence[str] = ()) -> str:
    """A short, user-facing reason, e.g. ``unreadable image (cannot identify image file)``."""
    exc = root_cause(exc) if isinstance(root_cause(exc), DataProblem) else (_truncation(exc) or root_cause(exc))
    if isinstance(exc, DataProblem):
        return exc.what
    full = str(exc).strip()
    text = full.splitlines()[0] if full else type(exc).__name__
    if "cannot find a suitable reader" in text:
        text = _reader_reason(full) or "no reader could open it"
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
