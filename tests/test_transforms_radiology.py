"""Radiology transforms with hand-computed values, and the config registry."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.data import MetaTensor

from pipeline.errors import InputError
from transforms import (REGISTRY, CTWindow, CTWindowd, LesionCentredCropd, MRIPercentileNormalise,
                        MRIPercentileNormalised, build_preprocess)


def test_ct_brain_window_hand_values():
    hu = torch.tensor([[[0.0, 40.0, 80.0, -1000.0, 1000.0, 20.0]]])
    out = CTWindow("brain")(hu)
    torch.testing.assert_close(out, torch.tensor([[[0.0, 0.5, 1.0, 0.0, 1.0, 0.25]]]))


@pytest.mark.parametrize("preset, width, level", [("lung", 1500, -600), ("bone", 1800, 400),
                                                  ("soft_tissue", 400, 40), ("subdural", 200, 80),
                                                  ("liver", 150, 30)])
def test_ct_presets_map_level_to_half_and_edges_to_0_and_1(preset, width, level):
    hu = np.array([[level - width / 2, level, level + width / 2, level + width / 4]], dtype=np.float64)
    out = CTWindow(preset)(hu)
    assert isinstance(out, np.ndarray) and out.dtype == np.float32
    np.testing.assert_allclose(out, [[0.0, 0.5, 1.0, 0.75]], atol=1e-6)


def test_ct_window_explicit_and_dict_keeps_metatensor():
    affine = torch.diag(torch.tensor([0.7, 0.7, 2.5, 1.0], dtype=torch.float64))
    volume = MetaTensor(torch.tensor([[[[-100.0, 0.0, 100.0]]]]), affine=affine)
    out = CTWindowd(keys="image", width=200, level=0)({"image": volume})["image"]
    assert isinstance(out, MetaTensor) and torch.equal(out.affine, affine)
    torch.testing.assert_close(out.as_tensor(), torch.tensor([[[[0.0, 0.5, 1.0]]]]))
    with pytest.raises(ValueError, match="unknown CT window preset 'abdomen'"):
        CTWindow("abdomen")
    with pytest.raises(ValueError, match="width and level"):
        CTWindow(width=100)


def test_mri_percentile_over_foreground_per_channel():
    values = np.arange(1, 101, dtype=np.float64)  # foreground 1..100; background zeros around it
    channel0 = np.zeros((20, 20))
    channel0.flat[:100] = values
    channel1 = np.zeros((20, 20))
    channel1.flat[200:300] = values * 10 + 1000
    image = np.stack([channel0, channel1])
    out = MRIPercentileNormalise(lower=0, upper=100)(image)
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out[image == 0], 0.0)  # background stays 0
    for c in range(2):
        fg = out[c][image[c] != 0]
        assert fg.min() == 0.0 and fg.max() == 1.0
        np.testing.assert_allclose(fg, (values - 1) / 99, atol=1e-6)  # same shape per channel, own scale
    # 10th and 90th percentiles of 1..100 (linear interpolation): 10.9 and 90.1
    out = MRIPercentileNormalise(lower=10, upper=90)(image)
    fg = out[0][image[0] != 0]
    np.testing.assert_allclose(fg[[0, 10, 50, 95]], [0.0, (11 - 10.9) / 79.2, (51 - 10.9) / 79.2, 1.0], atol=1e-6)


def test_mri_percentile_metatensor_3d_and_empty_channel():
    volume = torch.zeros(2, 4, 4, 4)
    volume[0, 1:3, 1:3, 1:3] = torch.arange(1, 9, dtype=torch.float32).reshape(2, 2, 2)
    image = MetaTensor(volume, affine=torch.eye(4) * 3, meta={"filename_or_obj": "t1.nii.gz"})
    out = MRIPercentileNormalised(keys="image", lower=0, upper=100)({"image": image})["image"]
    assert isinstance(out, MetaTensor) and torch.equal(out.affine, image.affine)
    assert out.meta["filename_or_obj"] == "t1.nii.gz"
    assert float(out[0].max()) == 1.0 and float(out[0, 1, 1, 1]) == 0.0 and float(out[0, 0, 0, 0]) == 0.0
    assert float(out[1].abs().max()) == 0.0  # a channel without foreground stays 0
    with pytest.raises(ValueError):
        MRIPercentileNormalise(lower=99, upper=1)


SPECS = [{"name": "shades_of_gray", "power": 6}, {"name": "remove_hair"}, {"name": "lesion_crop", "mask_key": "label"},
         {"name": "ct_window", "preset": "brain"}, {"name": "mri_percentile", "lower": 1, "upper": 99}]


def test_registry_builds_each_name():
    built = build_preprocess(SPECS, ["image"])
    assert [type(t) for t in built] == [REGISTRY[s["name"]] for s in SPECS]
    assert all(list(t.keys) == ["image"] for i, t in enumerate(built) if i != 2)
    assert list(built[2].keys) == ["image", "label"] and isinstance(built[2], LesionCentredCropd)
    assert built[0].transform.power == 6.0 and built[3].transform.width == 80.0
    assert build_preprocess([{"name": "ct_window", "width": 400, "level": 40, "keys": ["ct"]}], ["image"])[0].keys \
        == ("ct",)


def test_registry_result_runs_in_a_pipeline():
    rng = np.random.default_rng(0)
    data = {"image": torch.as_tensor(rng.uniform(0.5, 0.9, (3, 32, 32)), dtype=torch.float32)}
    for transform in build_preprocess([{"name": "shades_of_gray"}, {"name": "remove_hair", "size": 2}], ["image"]):
        data = transform(data)
    assert data["image"].shape == (3, 32, 32) and data["image"].dtype == torch.float32


@pytest.mark.parametrize("specs, message", [
    ([{"name": "ct_window", "preset": "brain"}, {"name": "foo"}],
     r"data.preprocess\[1\]: unknown transform 'foo' \(known: ct_window, lesion_crop, mri_percentile, "
     r"remove_hair, shades_of_gray\)"),
    ([{"name": "shades_of_gray", "gamma": 2}], r"data.preprocess\[0\]: shades_of_gray has no argument 'gamma'"),
    ([{"name": "ct_window", "preset": "abdomen"}], r"data.preprocess\[0\]: ct_window: unknown CT window preset"),
    ([{"name": "mri_percentile", "lower": 99, "upper": 1}], r"data.preprocess\[0\]: mri_percentile: need 0 <= lower"),
    ([{"name": "remove_hair", "footprint": "star"}], r"data.preprocess\[0\]: remove_hair: footprint must be"),
    ([{"power": 6}], r"data.preprocess\[0\]: expected a mapping with a 'name'"),
])
def test_registry_bad_specs_raise_input_error(specs, message):
    with pytest.raises(InputError, match=message):
        build_preprocess(specs, ["image"])
