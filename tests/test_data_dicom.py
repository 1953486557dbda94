"""DICOM: series stacked as channels, slices ordered by position, several series in a folder refused, no PHI."""

from __future__ import annotations

import shutil

import numpy as np
import pydicom
import pytest
from monai.transforms import LoadImage

from pipeline.config import config_from_dict
from pipeline.data import build_data, validate
from pipeline.data.dicom_series import PositionSortedDicomReader, dicom_files, slice_positions
from pipeline.errors import InputError

SERIES = ["*T1post*", "*T1prereg*", "*FLAIR*", "*T2reg*"]


def cfg(root, **data):
    return config_from_dict({"experiment": "t", "task": "segmentation", "data": {
        "source": "dicom", "root": str(root), "image_series": SERIES, "mask_series": "*MaskTumor*", **data}})


def _assert_ordered_by_position(folder):
    files = dicom_files(folder)
    datasets = [pydicom.dcmread(f) for f in files]
    order = np.argsort(slice_positions(datasets))
    volume = np.asarray(LoadImage(reader=PositionSortedDicomReader(), image_only=True)(str(folder)))
    assert volume.shape[-1] == len(files)
    for k, i in enumerate(order):  # the reader swaps rows/columns (MONAI convention) and applies the rescale
        ds = datasets[i]
        expected = ds.pixel_array * float(getattr(ds, "RescaleSlope", 1)) + float(getattr(ds, "RescaleIntercept", 0))
        assert np.array_equal(volume[..., k], expected.T.astype(volume.dtype))
    assert np.all(np.diff(np.sort(slice_positions(datasets))) > 0)


def test_pgbm001_one_volume_four_channels(shared_data):
    splits = build_data(cfg(shared_data / "tcia_pgbm001"))
    assert len(splits.train) == len(splits.val) == len(splits.test) == 1
    assert splits.in_channels == 4 and any("reused" in n for n in splits.notes)
    item = splits.train[0]
    assert item["id"] == "study_000" and "PGBM" not in item["id"]
    assert set(item) == {"image", "label", "id", "series", "slices", "index"}
    stats = validate(splits)
    assert stats.shapes == [(4, 260, 320, 24)] and stats.foreground == [6809] and stats.label_values == {0, 1}
    assert stats.orientations == {"RAS"}
    out = splits.load_transforms(dict(item))
    assert "PatientName" not in str(out["image"].meta) and "PGBM-001" not in str(
        {k: v for k, v in out["image"].meta.items() if k != "filename_or_obj"})


def test_slices_ordered_by_position(shared_data):
    _assert_ordered_by_position(shared_data / "ct_dicom_tiny")
    _assert_ordered_by_position(next((shared_data / "tcia_pgbm001").glob("*/11-T1post-*")))


def test_ct_tiny_image_only(shared_data):
    splits = build_data(cfg(shared_data / "ct_dicom_tiny", image_series=None, mask_series=None))
    assert splits.num_classes == 0 and splits.in_channels == 1
    assert validate(splits).shapes == [(1, 16, 16, 4)]


def test_folder_with_two_series_and_empty_series(tmp_path, shared_data):
    study = tmp_path / "study"
    src = next((shared_data / "tcia_pgbm001").glob("*"))
    for s in src.iterdir():
        shutil.copytree(s, study / s.name)
    t1 = next(study.glob("11-T1post-*"))
    shutil.copy(next(study.glob("*FLAIR*")) / "000000.dcm", t1 / "extra.dcm")
    for f in next(study.glob("*T2reg*")).iterdir():
        f.unlink()
    with pytest.raises(InputError) as err:
        build_data(cfg(study))
    lines = err.value.problems
    assert f"{t1}: holds 2 DICOM series (different SeriesInstanceUID); put each series in its own folder" in lines
    assert not any("PGBM-001" in line.split(":", 1)[1] for line in lines)  # no header value in messages
    assert any("data.image_series pattern '*T2reg*'" in line for line in lines)  # empty folder is no series
