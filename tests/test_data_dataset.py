"""make_dataset: the MONAI dataset class follows data.cache; persistent needs a folder."""

from __future__ import annotations

import pytest
from monai.data import CacheDataset, Dataset, PersistentDataset

from pipeline.config import config_from_dict
from pipeline.data import build_data, make_dataset
from pipeline.errors import InputError


def cfg(**data):
    return config_from_dict({"experiment": "t", "data": {"source": "synthetic", "synthetic_size": 40, **data}})


@pytest.mark.parametrize("mode,kind", [("none", Dataset), ("cache", CacheDataset), ("persistent", PersistentDataset)])
def test_dataset_kind_and_items(mode, kind, tmp_path):
    config = cfg(cache=mode)
    splits = build_data(config)
    ds = make_dataset(splits.val, splits.transform_for("val"), config, cache_dir=tmp_path / "cache")
    assert isinstance(ds, kind) and len(ds) == len(splits.val)
    sample = ds[1]
    assert sample["index"] == 1 and tuple(sample["image"].shape) == (3, 32, 32)


def test_persistent_without_folder_is_an_input_error():
    config = cfg(cache="persistent")
    splits = build_data(config)
    with pytest.raises(InputError, match="data.cache_dir"):
        make_dataset(splits.val, splits.load_transforms, config)
