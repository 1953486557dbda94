"""ISIC 2017: 3-class labels from the ground-truth CSV, masks 0/255 -> {0, 1}, mismatches named."""

from __future__ import annotations

import dataclasses
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from pipeline.config import config_from_dict
from pipeline.data import build_data, validate
from pipeline.errors import InputError


def cfg(root, task="classification", **data):
    return config_from_dict({"experiment": "t", "task": task,
                             "data": {"source": "isic2017", "root": str(root), **data}})


def write_isic(root, n=4, mask_size=(40, 40), image_size=(40, 40)):
    images, masks = root / "ISIC-2017_Training_Data", root / "ISIC-2017_Training_Part1_GroundTruth_256"
    images.mkdir(parents=True)
    masks.mkdir()
    rng = np.random.default_rng(0)
    rows = []
    for k in range(n):
        Image.fromarray(rng.integers(0, 255, (*image_size, 3), dtype=np.uint8)).save(images / f"ISIC_{k:07d}.jpg")
        mask = np.zeros(mask_size, np.uint8)
        mask[5:20, 5:25] = 255
        Image.fromarray(mask).save(masks / f"ISIC_{k:07d}_segmentation.png")
        rows.append(f"ISIC_{k:07d},{float(k == 1)},{float(k == 2)}\n")
    (root / "ISIC-2017_Training_Part3_GroundTruth.csv").write_text("image_id,melanoma,seborrheic_keratosis\n"
                                                                   + "".join(rows))
    return root


def test_real_classification_counts(shared_data):
    splits = build_data(cfg(shared_data / "isic2017"))
    items = splits.train + splits.val + splits.test
    assert len(items) == 2000 and splits.class_names == ["nevus", "melanoma", "seborrheic_keratosis"]
    assert Counter(i["diagnosis"] for i in items) == {"nevus": 1372, "melanoma": 374, "seborrheic_keratosis": 254}
    assert (len(splits.train), len(splits.val), len(splits.test)) == (1400, 300, 300)
    assert {i["sex"] for i in items} == {"female", "male", "unknown"}
    assert all(isinstance(i["age"], float) for i in items)


def test_real_segmentation_masks_are_binary(shared_data):
    splits = build_data(cfg(shared_data / "isic2017", task="segmentation", limit=12))
    assert len(splits.train) == 12 and len(splits.val) + len(splits.test) == 600
    assert all(i["label"].endswith("_segmentation.png") for i in splits.train + splits.val + splits.test)
    small = dataclasses.replace(splits, val=splits.val[:4], test=splits.test[:4])
    stats = validate(small)
    assert stats.label_values == {0, 1} and stats.loaded == 20
    out = splits.load_transforms(dict(splits.train[0]))
    assert out["image"].shape == (3, 256, 256) and out["label"].shape == (1, 256, 256)


def test_image_mask_shape_mismatch_names_both_files(tmp_path):
    root = write_isic(tmp_path / "isic", n=4)
    bad = root / "ISIC-2017_Training_Part1_GroundTruth_256" / "ISIC_0000003_segmentation.png"
    Image.fromarray(np.zeros((30, 40), np.uint8)).save(bad)
    splits = build_data(cfg(root, task="segmentation", image_size=[32, 32]))
    with pytest.raises(InputError) as err:
        validate(splits)
    (line,) = err.value.problems
    assert str(root / "ISIC-2017_Training_Data" / "ISIC_0000003.jpg") in line and str(bad) in line
    assert "image/mask shape mismatch: image (40, 40), mask (30, 40)" in line


def test_missing_mask_and_bad_flag(tmp_path):
    root = write_isic(tmp_path / "isic", n=3)
    (root / "ISIC-2017_Training_Part1_GroundTruth_256" / "ISIC_0000001_segmentation.png").unlink()
    with pytest.raises(InputError) as err:
        build_data(cfg(root, task="segmentation"))
    assert "ISIC_0000001_segmentation.png: listed in ISIC-2017_Training_Part3_GroundTruth.csv (line 3) " \
           "but the file is missing" in err.value.problems[0]
    assert len(build_data(cfg(root)).train) >= 1  # classification does not need masks
    csv = root / "ISIC-2017_Training_Part3_GroundTruth.csv"
    csv.write_text(csv.read_text().replace("ISIC_0000002,0.0,1.0", "ISIC_0000002,0.0,yes"))
    with pytest.raises(InputError, match="line 4: column seborrheic_keratosis must be 0 or 1, got 'yes'"):
        build_data(cfg(root))


def test_missing_masks_are_called_masks(tmp_path):
    root = write_isic(tmp_path / "isic", n=8)
    masks = root / "ISIC-2017_Training_Part1_GroundTruth_256"
    for k in range(1, 7):
        (masks / f"ISIC_{k:07d}_segmentation.png").unlink()
    with pytest.raises(InputError) as err:
        build_data(cfg(root, task="segmentation"))
    assert len(err.value.problems) == 6  # five named masks, then the count
    assert err.value.problems[-1].endswith(f"6 of 8 listed masks are missing from {masks} (first 5 above); "
                                           "set data.skip_missing=true to skip them")
    splits = build_data(cfg(root, task="segmentation", skip_missing=True))
    assert splits.skipped == 6 and len(splits.train) == 2  # too few to hold out: reused for val/test
