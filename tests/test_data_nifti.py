"""NIfTI: volumes of different spacing/orientation come out alike; patches keep the volume's index."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest

from pipeline.config import config_from_dict
from pipeline.data import build_data, validate
from pipeline.errors import InputError


def cfg(root, **data):
    return config_from_dict({"experiment": "t", "task": "segmentation",
                             "data": {"source": "nifti", "root": str(root), **data}})


def test_two_volumes_one_spacing_and_orientation(shared_data):
    splits = build_data(cfg(shared_data / "nifti_msd", patch_size=[16, 16, 16], patches_per_volume=3))
    assert len(splits.train) == 2 and splits.num_classes == 2 and splits.in_channels == 1
    stats = validate(splits)
    assert stats.orientations == {"RAS"}
    assert {tuple(round(s, 3) for s in sp) for sp in stats.spacings} == {(2.0, 2.0, 2.0)}
    assert stats.label_values == {0, 1}
    patches = splits.transform_for("train")(dict(splits.train[1]))
    assert len(patches) == 3 and all(p["index"] == 1 for p in patches)
    assert all(tuple(p["image"].shape) == (1, 16, 16, 16) for p in patches)


def _write(path, data, zoom=1.0):
    nib.save(nib.Nifti1Image(data, np.diag([zoom, zoom, zoom, 1.0])), str(path))


def test_nan_voxels_and_missing_label(tmp_path):
    (tmp_path / "imagesTr").mkdir()
    (tmp_path / "labelsTr").mkdir()
    vol = np.random.default_rng(0).random((8, 8, 8)).astype(np.float32)
    bad = vol.copy()
    bad[0, 0, :3] = np.nan
    _write(tmp_path / "imagesTr" / "a.nii.gz", vol)
    _write(tmp_path / "imagesTr" / "b.nii.gz", bad)
    _write(tmp_path / "imagesTr" / "c.nii.gz", vol)
    for name in ("a", "b"):
        _write(tmp_path / "labelsTr" / f"{name}.nii.gz", (vol > 0.5).astype(np.uint8))
    with pytest.raises(InputError) as err:
        build_data(cfg(tmp_path))
    assert err.value.problems == [f"{tmp_path / 'imagesTr' / 'c.nii.gz'}: no label with the same name in "
                                  f"{tmp_path / 'labelsTr'}"]
    splits = build_data(cfg(tmp_path, skip_missing=True, spacing=[1.0, 1.0, 1.0]))
    assert splits.skipped == 1
    with pytest.raises(InputError) as err:
        validate(splits)
    assert any(line.startswith(str(tmp_path / "imagesTr" / "b.nii.gz")) and "NaN/inf" in line
               for line in err.value.problems)


def test_empty_images_folder(tmp_path):
    (tmp_path / "imagesTr").mkdir()
    (tmp_path / "labelsTr").mkdir()
    with pytest.raises(InputError, match="imagesTr: empty folder"):
        build_data(cfg(tmp_path))


def test_preprocess_sees_raw_intensities(tmp_path):
    """A CT window in data.preprocess maps Hounsfield units (not pre-scaled [0, 1] values) to [0, 1]; without
    a preprocess step the default per-channel percentile scaling applies."""
    (tmp_path / "imagesTr").mkdir()
    (tmp_path / "labelsTr").mkdir()
    hu = np.linspace(-1000.0, 1000.0, 8 * 8 * 8, dtype=np.float32).reshape(8, 8, 8)
    hu[0, 0, 0], hu[0, 0, 1], hu[0, 0, 2] = 0.0, 40.0, 80.0         # brain window: level 40, width 80
    _write(tmp_path / "imagesTr" / "ct.nii.gz", hu)
    _write(tmp_path / "labelsTr" / "ct.nii.gz", (hu > 0).astype(np.uint8))
    common = {"spacing": [1.0, 1.0, 1.0], "orientation": "RAS"}
    windowed = build_data(cfg(tmp_path, preprocess=[{"name": "ct_window", "preset": "brain"}], **common))
    image = windowed.load_transforms(dict(windowed.train[0]))["image"][0].numpy()
    expected = np.clip((hu - 0.0) / 80.0, 0.0, 1.0)                  # [level - width/2, level + width/2] -> [0, 1]
    np.testing.assert_allclose(image, expected, atol=1e-5)
    assert image[0, 0, 1] == pytest.approx(0.5, abs=1e-5)
    default = build_data(cfg(tmp_path, **common))
    scaled = default.load_transforms(dict(default.train[0]))["image"][0].numpy()
    lo, hi = np.percentile(hu, [0.5, 99.5])
    np.testing.assert_allclose(scaled, np.clip((hu - lo) / (hi - lo), 0, 1), atol=1e-4)


def test_patch_larger_than_resampled_volume_is_a_warning(shared_data, caplog):
    splits = build_data(cfg(shared_data / "nifti_msd", spacing=[2.0, 2.0, 2.0], patch_size=[40, 40, 16]))
    with caplog.at_level("WARNING", logger="pipeline.data.scan"):
        stats = validate(splits)
    volume = shared_data / "nifti_msd" / "imagesTr" / "brain_001.nii"
    assert stats.warnings == [f"{volume}: the training patch (40, 40, 16) is larger than the resampled volume "
                              "(33, 41, 25); the volume is zero-padded to the patch size"]
    assert [r.getMessage() for r in caplog.records] == stats.warnings
