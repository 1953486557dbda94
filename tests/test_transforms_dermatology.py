"""Dermatology transforms on synthetic images with known answers, and on one real HAM10000 image."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from scipy import ndimage
from skimage.draw import disk, line

from transforms import (LesionCentredCrop, LesionCentredCropd, RemoveHair, RemoveHaird, ShadesOfGray,
                        ShadesOfGrayd, intensity_range)

SKIN = np.array([0.85, 0.65, 0.55])
LESION = np.array([0.35, 0.22, 0.15])
HAIR = np.array([0.12, 0.09, 0.07])


def hairy_skin(n: int = 224):
    """Skin with a large dark lesion disk and four 3-px-wide dark hairs; returns clean, hairy, hair and lesion masks."""
    rng = np.random.default_rng(0)
    clean = SKIN[:, None, None] + rng.normal(0.0, 0.01, (3, n, n))
    lesion = np.zeros((n, n), bool)
    lesion[disk((n // 2, n // 2), n // 6)] = True
    clean[:, lesion] = LESION[:, None]
    hair = np.zeros((n, n), bool)
    for r0, c0, r1, c1 in [(5, 10, 200, 220), (220, 5, 10, 150), (30, 200, 190, 30), (0, 100, 223, 120)]:
        hair[line(*(v * (n - 1) // 223 for v in (r0, c0, r1, c1)))] = True
    hair = ndimage.binary_dilation(hair)
    hairy = clean.copy()
    hairy[:, hair] = HAIR[:, None]
    return clean.clip(0, 1), hairy.clip(0, 1), hair, lesion


@pytest.mark.parametrize("method", ["diffusion", "biharmonic"])
@pytest.mark.parametrize("footprint", ["disk", "lines"])
def test_remove_hair_restores_skin_and_keeps_lesion(method, footprint):
    clean, hairy, hair, lesion = hairy_skin()
    out = RemoveHair(method=method, footprint=footprint)(hairy)
    before, after = np.abs(hairy - clean).mean(), np.abs(out - clean).mean()
    assert after < 0.3 * before  # error to the hair-free image drops by more than 70%
    assert np.abs(out[:, hair] - SKIN[:, None]).mean() < np.abs(hairy[:, hair] - SKIN[:, None]).mean()
    assert np.abs(out[:, lesion].mean(axis=1) - clean[:, lesion].mean(axis=1)).max() < 0.01
    untouched = ndimage.binary_erosion(lesion, iterations=3) & ~ndimage.binary_dilation(hair, iterations=4)
    np.testing.assert_allclose(out[:, untouched], clean[:, untouched], atol=1e-12)


def test_remove_hair_uint8_and_metatensor_keep_type_range_and_affine():
    _, hairy, hair, _ = hairy_skin(96)
    as_uint8 = np.round(hairy * 255).astype(np.uint8)
    out = RemoveHair(size=3)(as_uint8)
    assert out.dtype == np.uint8 and out.shape == as_uint8.shape
    assert out[:, hair].mean() > as_uint8[:, hair].mean() + 100  # hair became skin-bright in 0-255 units
    affine = torch.diag(torch.tensor([0.5, 0.5, 1.0, 1.0], dtype=torch.float64))
    image = MetaTensor(torch.as_tensor(hairy, dtype=torch.float32), affine=affine, meta={"filename_or_obj": "a.jpg"})
    d = RemoveHaird(keys="image", size=3)({"image": image})
    assert isinstance(d["image"], MetaTensor) and d["image"].dtype == torch.float32
    assert torch.equal(d["image"].affine, affine) and d["image"].meta["filename_or_obj"] == "a.jpg"
    assert 0.0 <= float(d["image"].min()) and float(d["image"].max()) <= 1.0


def test_remove_hair_on_a_real_image(shared_data):
    from PIL import Image

    rgb = np.asarray(Image.open(shared_data / "ham10000_sample" / "images" / "ISIC_0024306.jpg"))
    image = np.moveaxis(rgb, -1, 0).copy()
    out = RemoveHair()(image)
    assert out.shape == image.shape and out.dtype == np.uint8
    assert out.min() >= image.min() and out.max() <= image.max()  # diffusion fill stays inside the known values
    changed = (out != image).any(axis=0).mean()
    assert 0.0 < changed < 0.2
    as_float = RemoveHair()(torch.as_tensor(image / 255.0, dtype=torch.float32))
    assert as_float.dtype == torch.float32 and 0.0 <= float(as_float.min()) and float(as_float.max()) <= 1.0


def test_intensity_range_detection():
    assert intensity_range(np.zeros((1, 2, 2), np.uint8)) == (0.0, 255.0)
    assert intensity_range(np.full((1, 2, 2), 0.7)) == (0.0, 1.0)
    assert intensity_range(np.full((1, 2, 2), 17.0)) == (0.0, 255.0)
    assert intensity_range(np.array([[[-3.0, 4000.0]]])) == (-3.0, 4000.0)


def test_shades_of_gray_on_a_hand_computed_2x2_image():
    # p = 2: illuminants e = (0.25, 0.5, 0.5), rms(e) = sqrt(0.1875); gains sqrt(3), sqrt(3)/2, sqrt(3)/2
    image = np.array([[[0.3, 0.4], [0.0, 0.0]],
                      [[0.5, 0.5], [0.5, 0.5]],
                      [[0.6, 0.8], [0.0, 0.0]]])
    out = ShadesOfGray(power=2)(image)
    r3 = np.sqrt(3.0)
    expected = np.array([[[0.3 * r3, 0.4 * r3], [0, 0]],
                         [[0.5 * r3 / 2] * 2] * 2,
                         [[0.6 * r3 / 2, 0.8 * r3 / 2], [0, 0]]])
    np.testing.assert_allclose(out, expected, rtol=1e-12)


def test_shades_of_gray_removes_a_colour_cast():
    rng = np.random.default_rng(1)
    grey_world = np.repeat(rng.uniform(0.05, 0.6, (1, 64, 64)), 3, axis=0) * rng.uniform(0.9, 1.1, (3, 64, 64))
    cast = grey_world * np.array([1.3, 0.9, 0.6])[:, None, None]
    out = ShadesOfGray(power=6)(cast)
    p_means = np.mean(out.reshape(3, -1) ** 6, axis=1) ** (1 / 6)
    np.testing.assert_allclose(p_means, p_means.mean(), rtol=1e-6)
    as_uint8 = ShadesOfGrayd(keys="image")({"image": np.round(cast * 255).astype(np.uint8)})["image"]
    assert as_uint8.dtype == np.uint8
    p_means = np.mean((as_uint8.reshape(3, -1) / 255.0) ** 6, axis=1) ** (1 / 6)
    np.testing.assert_allclose(p_means, p_means.mean(), rtol=0.02)


def test_shades_of_gray_clips_and_keeps_metatensor():
    # p = 1: e = (0.9, 0.5, 0.5); the green and blue gains rms(e) / 0.5 > 1.1 push 0.9 above 1: clipped
    image = MetaTensor(torch.tensor([[[0.9, 0.9]], [[0.1, 0.9]], [[0.1, 0.9]]]), affine=torch.eye(4) * 2)
    out = ShadesOfGray(power=1)(image)
    assert isinstance(out, MetaTensor) and torch.equal(out.affine, image.affine)
    assert float(out.max()) == 1.0 and float(out.min()) >= 0.0


def disk_image(centre=(70, 90), radius=20, shape=(160, 200)):
    image = np.ones((3, *shape)) * SKIN[:, None, None]
    mask = np.zeros((1, *shape), np.uint8)
    mask[0][disk(centre, radius)] = 1
    image[:, mask[0] > 0] = LESION[:, None]
    return image, mask


@pytest.mark.parametrize("use_mask", [True, False])
def test_lesion_crop_centred_on_the_disk_with_margin(use_mask):
    centre, radius, margin = (70, 90), 20, 0.25
    image, mask = disk_image(centre, radius)
    data = {"image": image, "label": mask}
    out = LesionCentredCropd(keys="image", mask_key="label" if use_mask else None, margin=margin)(data)
    start, end = out["foreground_start_coord"], out["foreground_end_coord"]
    side = 2 * radius - 1  # the bounding box of skimage's disk
    assert np.all(end - start >= side * (1 + 2 * margin))  # margin respected on both sides
    assert np.all(end - start <= side * (1 + 2 * margin) + 1)
    assert abs(((start + end) / 2 - 0.5) - np.array(centre)).max() <= 1.0
    assert np.all(start <= np.array(centre) - radius + 1) and np.all(end >= np.array(centre) + radius)
    np.testing.assert_array_equal(out["image"], image[:, start[0]:end[0], start[1]:end[1]])
    if use_mask:
        np.testing.assert_array_equal(out["label"], mask[:, start[0]:end[0], start[1]:end[1]])
        assert out["label"].sum() == mask.sum()


def test_lesion_crop_square_pads_outside_and_inverts():
    image, mask = disk_image(centre=(15, 100), radius=10, shape=(60, 200))
    crop = LesionCentredCropd(keys="image", mask_key="label", margin=1.0, square=True)
    data = {"image": MetaTensor(torch.as_tensor(image, dtype=torch.float32)),
            "label": MetaTensor(torch.as_tensor(mask))}
    out = crop(data)
    assert out["foreground_start_coord"][0] < 0  # the box reaches above the image: padded there
    assert out["image"].shape[1:] == out["label"].shape[1:] == (57, 57)  # 19 px lesion * (1 + 2 * margin)
    assert int(out["label"].sum()) == int(mask.sum())
    back = crop.inverse(out)
    assert back["image"].shape == image.shape
    np.testing.assert_array_equal(back["label"].numpy(), mask)


def test_lesion_crop_array_version_and_nothing_found():
    image, mask = disk_image()
    cropped = LesionCentredCrop(margin=0.0, square=False)(image, mask=mask)
    assert isinstance(cropped, np.ndarray) and cropped.shape == (3, 39, 39)
    flat = np.ones((3, 32, 32))
    assert LesionCentredCrop()(flat).shape == flat.shape  # no lesion: the whole image


def test_lesion_crop_finds_the_lesion_of_a_real_hairy_image(shared_data):
    from PIL import Image

    rgb = np.asarray(Image.open(shared_data / "ham10000_sample" / "images" / "ISIC_0024306.jpg"))  # 450 x 600
    out = LesionCentredCropd(keys="image", margin=0.1)({"image": np.moveaxis(rgb, -1, 0).copy()})
    start, end = out["foreground_start_coord"], out["foreground_end_coord"]
    # the lesion fills the middle of the image; hair crossing it to the border must not hide it
    assert 200 <= (end - start)[0] == (end - start)[1] <= 450
    assert np.all(np.abs((start + end) / 2 - np.array([225, 300])) < 100)
    assert out["image"].shape == (3, *(end - start))
