"""HAM10000: lesion-aware split, metadata kept, missing images listed (or skipped), bad files named."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from pipeline.config import config_from_dict
from pipeline.data import build_data, validate
from pipeline.errors import InputError

HEADER = "lesion_id,image_id,dx,dx_type,age,sex,localization\n"


def cfg(root, **data):
    return config_from_dict({"experiment": "t", "data": {"source": "ham10000", "root": str(root),
                                                         "image_size": [32, 32], **data}})


def write_ham(root, rows: list[tuple[str, str, str]], images: list[str]):
    """A tiny HAM10000 folder: CSV rows (lesion_id, image_id, dx) and random JPEGs for ``images``."""
    (root / "images").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for image_id in images:
        Image.fromarray(rng.integers(0, 255, (45, 60, 3), dtype=np.uint8)).save(root / "images" / f"{image_id}.jpg")
    lines = [f"{les},{img},{dx},histo,{'' if n % 2 else 45.0},{'male' if n % 3 else ''},back\n"
             for n, (les, img, dx) in enumerate(rows)]
    (root / "HAM10000_metadata.csv").write_text(HEADER + "".join(lines))
    return root


def test_real_sample_with_skip_missing(shared_data):
    splits = build_data(cfg(shared_data / "ham10000_sample", skip_missing=True, image_size=None))
    items = splits.train + splits.val + splits.test
    assert len(items) == 124 and splits.skipped == 10015 - 124
    lesions = [{i["lesion_id"] for i in part} for part in (splits.train, splits.val, splits.test)]
    assert not (lesions[0] & lesions[1] or lesions[0] & lesions[2] or lesions[1] & lesions[2])
    for part in (splits.train, splits.val, splits.test):
        assert [i["index"] for i in part] == list(range(len(part)))
    item = splits.train[0]
    assert {"image_id", "lesion_id", "dx", "dx_type", "sex", "age", "age_band", "localization"} <= set(item)
    assert all(isinstance(i["age"], float) and isinstance(i["sex"], str) for i in items)
    assert sum(i["dx"] == "nv" for i in items) == 82
    out = splits.load_transforms(dict(item))
    assert out["image"].shape == (3, 224, 224) and 0.0 <= float(out["image"].min()) <= float(out["image"].max()) <= 1.0
    again = build_data(cfg(shared_data / "ham10000_sample", skip_missing=True, image_size=None))
    assert [i["image_id"] for i in again.test] == [i["image_id"] for i in splits.test]


def test_real_sample_missing_images_listed(shared_data):
    with pytest.raises(InputError) as err:
        build_data(cfg(shared_data / "ham10000_sample"))
    lines = err.value.problems
    assert len(lines) == 6  # five files, one per line, then the count
    assert lines[0].endswith("listed in HAM10000_metadata.csv (line 2) but the file is missing")
    assert "ISIC_0027419.jpg" in lines[0]
    assert "9891 of 10015 listed images are missing" in lines[-1] and "data.skip_missing" in lines[-1]


def test_metadata_sentinels_and_age_band(tmp_path):
    root = write_ham(tmp_path / "ham", [("L1", "ISIC_1", "nv"), ("L2", "ISIC_2", "mel")], ["ISIC_1", "ISIC_2"])
    splits = build_data(cfg(root))
    items = {i["image_id"]: i for i in splits.train}
    assert items["ISIC_1"]["age"] == 45.0 and items["ISIC_1"]["age_band"] == "40-59"
    assert items["ISIC_1"]["sex"] == "unknown"
    assert items["ISIC_2"]["age"] == -1.0 and items["ISIC_2"]["age_band"] == "unknown"
    assert items["ISIC_2"]["label"] == 4  # mel in akiec, bcc, bkl, df, mel, nv, vasc


def test_unknown_class_names_csv_and_line(tmp_path):
    root = write_ham(tmp_path / "ham", [("L1", "ISIC_1", "nv"), ("L2", "ISIC_2", "melanoma")], ["ISIC_1", "ISIC_2"])
    with pytest.raises(InputError) as err:
        build_data(cfg(root))
    assert err.value.problems == [f"{root / 'HAM10000_metadata.csv'}: line 3: unknown class 'melanoma' in column dx "
                                  "(known: akiec, bcc, bkl, df, mel, nv, vasc)"]


def test_truncated_and_unreadable_images_all_reported(tmp_path):
    ids = [f"ISIC_{n}" for n in range(4)]
    root = write_ham(tmp_path / "ham", [(f"L{n}", i, "nv") for n, i in enumerate(ids)], ids)
    jpeg = (root / "images" / "ISIC_1.jpg").read_bytes()
    (root / "images" / "ISIC_1.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    (root / "images" / "ISIC_2.jpg").write_bytes(b"this is not an image")
    with pytest.raises(InputError) as err:
        validate(build_data(cfg(root)))
    lines = sorted(err.value.problems)
    assert len(lines) == 2
    assert lines[0].startswith(str(root / "images" / "ISIC_1.jpg") + ": truncated image")
    assert lines[1].startswith(str(root / "images" / "ISIC_2.jpg") + ": unreadable image")
    assert "Traceback" not in "".join(lines)
