"""MedMNIST npz: the official split, class tables, tensors in [0, 1], bad files named."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.config import config_from_dict
from pipeline.data import build_data, validate
from pipeline.errors import InputError


def cfg(**data):
    return config_from_dict({"experiment": "t", "data": {"source": "medmnist", **data}})


def test_dermamnist_official_split_and_classes(shared_data):
    splits = build_data(cfg(root=shared_data / "dermamnist" / "dermamnist.npz"))
    assert (len(splits.train), len(splits.val), len(splits.test)) == (7007, 1003, 2005)
    assert splits.class_names == ["akiec", "bcc", "bkl", "df", "mel", "nv", "vasc"]
    assert (splits.in_channels, splits.num_classes, splits.image_size) == (3, 7, (28, 28))
    assert [i["index"] for i in splits.val] == list(range(1003))
    out = splits.load_transforms(dict(splits.train[0]))
    assert out["image"].shape == (3, 28, 28) and out["image"].dtype == torch.float32
    assert 0.0 <= float(out["image"].min()) and float(out["image"].max()) <= 1.0
    assert isinstance(out["label"], int)
    stats = validate(splits)
    assert stats.counts == {"train": 7007, "val": 1003, "test": 2005}
    assert stats.class_counts["train"]["nv"] == 4693


def test_pneumoniamnist_grey_and_limit(shared_data):
    splits = build_data(cfg(root=shared_data / "pneumoniamnist" / "pneumoniamnist.npz", limit=50))
    assert (len(splits.train), len(splits.val), len(splits.test)) == (50, 524, 624)
    assert splits.class_names == ["normal", "pneumonia"] and splits.in_channels == 1
    assert [i["index"] for i in splits.train] == list(range(50))
    again = build_data(cfg(root=shared_data / "pneumoniamnist" / "pneumoniamnist.npz", limit=50))
    assert [i["id"] for i in splits.train] == [i["id"] for i in again.train]
    assert splits.load_transforms(dict(splits.train[0]))["image"].shape == (1, 28, 28)


def test_npz_missing_keys_named(tmp_path):
    path = tmp_path / "dermamnist.npz"
    np.savez(path, train_images=np.zeros((2, 28, 28, 3), np.uint8), train_labels=np.zeros((2, 1), np.uint8))
    with pytest.raises(InputError) as err:
        build_data(cfg(root=path))
    line = err.value.problems[0]
    assert str(path) in line and "missing key(s)" in line and "val_images" in line


def test_npz_not_a_zip_and_label_out_of_range(tmp_path):
    bad = tmp_path / "broken.npz"
    bad.write_bytes(b"not a zip file at all")
    with pytest.raises(InputError, match="not a readable npz"):
        build_data(cfg(root=bad))
    path = tmp_path / "pneumoniamnist.npz"
    arrays = {f"{s}_images": np.zeros((3, 28, 28), np.uint8) for s in ("train", "val", "test")}
    arrays |= {f"{s}_labels": np.array([[0], [1], [5]], np.uint8) for s in ("train", "val", "test")}
    np.savez(path, **arrays)
    with pytest.raises(InputError, match=r"outside 0\.\.1"):
        build_data(cfg(root=path))


def test_class_names_override_and_wrong_count(shared_data):
    path = shared_data / "pneumoniamnist" / "pneumoniamnist.npz"
    splits = build_data(cfg(root=path, limit=8, class_names=["healthy", "pneumonia"]))
    assert splits.class_names == ["healthy", "pneumonia"] and splits.num_classes == 2
    with pytest.raises(InputError, match=r"data.class_names: 3 names, but the data has 2 classes \(normal, pneumonia\)"):
        build_data(cfg(root=path, limit=8, class_names=["a", "b", "c"]))
