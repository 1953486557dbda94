"""One DICOM series folder: header scan (one series per folder, slice geometry) and a position-ordering reader.

Only geometry and the series UID are read from the headers; no patient tag is ever returned.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from monai.data import PydicomReader
from pydicom.misc import is_dicom

from pipeline.errors import ProblemList

_GEOMETRY_TAGS = ["SeriesInstanceUID", "ImagePositionPatient", "ImageOrientationPatient", "Rows", "Columns",
                  "InstanceNumber", "PixelSpacing"]


@dataclass
class SeriesInfo:
    """Non-PHI geometry of one series folder."""

    folder: Path
    slices: int
    rows: int
    columns: int
    positions: np.ndarray  # slice positions along the slice normal (mm), sorted


def dicom_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".") and is_dicom(p))


def is_series_folder(folder: Path) -> bool:
    return folder.is_dir() and any(p.is_file() and is_dicom(p) for p in folder.iterdir())


def slice_normal(orientation) -> np.ndarray:
    row, col = np.asarray(orientation[:3], dtype=float), np.asarray(orientation[3:6], dtype=float)
    return np.cross(row, col)


def slice_positions(datasets) -> np.ndarray | None:
    """Distance of every slice along the normal of the first one, or None when a slice lacks geometry."""
    if not all(hasattr(ds, "ImagePositionPatient") and hasattr(ds, "ImageOrientationPatient") for ds in datasets):
        return None
    normal = slice_normal(datasets[0].ImageOrientationPatient)
    return np.array([float(np.dot(normal, np.asarray(ds.ImagePositionPatient, dtype=float))) for ds in datasets])


def scan_series(folder: Path, problems: ProblemList) -> SeriesInfo | None:
    """Read the headers of a series folder; report an empty folder, unreadable files, several series,
    mixed slice sizes or duplicate positions."""
    files = dicom_files(folder)
    if not files:
        problems.add(folder, "empty folder (no DICOM files)")
        return None
    headers = []
    for path in files:
        try:
            headers.append(pydicom.dcmread(path, stop_before_pixels=True, specific_tags=_GEOMETRY_TAGS))
        except Exception as exc:  # pydicom raises several types for damaged files
            problems.add(path, f"unreadable DICOM header ({type(exc).__name__}: {str(exc).splitlines()[0]})")
    if len(headers) < len(files):
        return None
    uids = {str(getattr(h, "SeriesInstanceUID", "")) for h in headers}
    if len(uids) > 1:
        problems.add(folder, f"holds {len(uids)} DICOM series (different SeriesInstanceUID); "
                             "put each series in its own folder")
        return None
    sizes = {(int(getattr(h, "Rows", 0)), int(getattr(h, "Columns", 0))) for h in headers}
    if len(sizes) > 1:
        problems.add(folder, f"slices of different sizes {sorted(sizes)}")
        return None
    positions = slice_positions(headers)
    if positions is None:
        positions = np.array([float(getattr(h, "InstanceNumber", i)) for i, h in enumerate(headers)])
    positions = np.sort(positions)
    if len(positions) > 1 and np.any(np.diff(positions) < 1e-4):
        problems.add(folder, "two or more slices share one position (duplicate slices?)")
        return None
    rows, columns = sizes.pop()
    return SeriesInfo(folder=folder, slices=len(files), rows=rows, columns=columns, positions=positions)


class PositionSortedDicomReader(PydicomReader):
    """MONAI's ``PydicomReader`` that stacks the slices of a series by their position along the slice normal
    (``ImagePositionPatient`` projected on the normal of ``ImageOrientationPatient``), not by InstanceNumber,
    and reads only DICOM files from a folder."""

    def __init__(self, **kwargs):
        kwargs.setdefault("fname_regex", None)  # None: keep the files pydicom recognises as DICOM
        super().__init__(**kwargs)

    def _combine_dicom_series(self, data, filenames):
        data, filenames = list(data), list(filenames)
        positions = slice_positions(data)
        if positions is not None:
            order = np.argsort(positions, kind="stable")
            data, filenames = [data[i] for i in order], [filenames[i] for i in order]
            for rank, ds in enumerate(data):  # the base class stacks by InstanceNumber: make it the position rank
                ds.InstanceNumber = rank + 1
        return super()._combine_dicom_series(data, filenames)
