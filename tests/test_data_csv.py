"""``data.source: csv``: HAM10000's real images listed in a CSV of our own (paths, diagnosis, lesion groups,
metadata), a split column, integer labels, a segmentation CSV of ISIC 2017 images; ``data check`` and a one-epoch
``train``; bad rows give exit 2 and one line naming the CSV line or the file."""

from __future__ import annotations

from collections import Counter

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from test_data_folder import (CONFIGS, HAM_COUNTS, SMALL, cli, isic_ids, isic_pair, tiny_train,
                              write_class_folders)

from pipeline.config import config_from_dict
from pipeline.data import build_data, validate


@pytest.fixture(scope="module")
def ham_csv(shared_data, tmp_path_factory):
    """HAM10000's 124 images as PNG under images/<dx>/, listed in study.csv with the metadata columns."""
    root = write_class_folders(shared_data, tmp_path_factory.mktemp("ham_study"))
    table = pd.read_csv(shared_data / "ham10000_sample" / "HAM10000_metadata.csv", dtype=str, keep_default_na=False)
    table = table[table.image_id.isin({p.stem for p in root.rglob("*.png")})]
    table.insert(0, "file", [f"images/{dx}/{i}.png" for dx, i in zip(table.dx, table.image_id)])
    table.drop(columns=["image_id"]).to_csv(root / "study.csv", index=False)
    return root / "study.csv"


def cfg(root, task="classification", **data):
    data = {"source": "csv", "root": str(root), "cache": "none", **data}
    return config_from_dict({"experiment": "t", "task": task, "data": data})


HAM_COLUMNS = {"image": "file", "label": "dx", "group": "lesion_id"}


def test_ham_csv_classes_metadata_and_lesion_groups(ham_csv):
    splits = build_data(cfg(ham_csv, columns=HAM_COLUMNS))
    items = splits.train + splits.val + splits.test
    assert splits.class_names == ["akiec", "bcc", "bkl", "df", "mel", "nv", "vasc"]
    assert Counter(splits.class_names[i["label"]] for i in items) == HAM_COUNTS
    assert {"lesion_id", "dx_type", "age", "sex", "localization"} <= set(items[0])
    assert Counter(i["sex"] for i in items)["unknown"] == 0 and {i["sex"] for i in items} <= {"male", "female"}
    lesions = [{i["lesion_id"] for i in part} for part in (splits.train, splits.val, splits.test)]
    assert not (lesions[0] & lesions[1] or lesions[0] & lesions[2] or lesions[1] & lesions[2])
    assert "columns used as metadata: lesion_id, dx_type, age, sex, localization" in splits.notes


def test_data_check_and_one_epoch_train(ham_csv, tmp_path, mlflow_uri, capsys):
    sets = ["--set", f"data.root={ham_csv}", "--set", "data.image_size=[32,32]"]
    code, out, errors = cli(capsys, "data", "check", CONFIGS / "csv_cls_ima.yaml", *sets)
    assert code == 0 and not errors
    assert "7 classes (akiec, bcc, bkl, df, mel, nv, vasc)" in out and "loaded 124 distinct samples; skipped 0" in out
    code, _, errors = tiny_train(capsys, CONFIGS / "csv_cls_ima.yaml", sets, tmp_path / "out")
    assert code == 0 and not errors
    client = mlflow.MlflowClient(mlflow_uri)
    (run,) = client.search_runs([client.get_experiment_by_name("csv_cls_ima").experiment_id])
    assert run.info.status == "FINISHED" and run.data.tags["medrobust.dataset"] == f"csv:{ham_csv.parent.name}"


def _small_csv(shared, root, rows: list[tuple[str, str, str]], header="image,label,split") -> None:
    (root / "img").mkdir(parents=True, exist_ok=True)
    for k, image_id in enumerate(isic_ids(shared, len(rows))):
        isic_pair(shared, image_id)[0].save(root / "img" / f"{k}.png")
    (root / "labels.csv").write_text(header + "\n" + "".join(",".join(r) + "\n" for r in rows))


def test_split_column_integer_labels_and_names(shared_data, tmp_path):
    rows = [(f"img/{k}.png", str(k % 2), "train" if k < 6 else "Test") for k in range(8)]
    _small_csv(shared_data, tmp_path, rows)
    splits = build_data(cfg(tmp_path / "labels.csv"))
    assert splits.class_names == ["0", "1"]
    assert (len(splits.train), len(splits.val), len(splits.test)) == (5, 1, 2)
    assert {i["id"] for i in splits.test} == {"img/6", "img/7"}
    assert any(n.startswith("no val rows in the split column: drawn from the training rows (val 1)")
               for n in splits.notes)
    named = build_data(cfg(tmp_path / "labels.csv", class_names=["benign", "malignant"]))
    assert named.class_names == ["benign", "malignant"] and [i["label"] for i in named.test] == [0, 1]


def test_segmentation_csv_with_masks_and_roi(shared_data, tmp_path):
    (tmp_path / "cases").mkdir()
    expected, lines = {}, []
    fov = np.zeros(SMALL, np.uint8)
    fov[:, 5:35] = 255
    Image.fromarray(fov).save(tmp_path / "cases" / "fov.bmp")
    for k, image_id in enumerate(isic_ids(shared_data, 4)):
        image, mask = isic_pair(shared_data, image_id)
        image.save(tmp_path / "cases" / f"{k}.tiff")
        mask.save(tmp_path / "cases" / f"{k}_lesion.png")
        expected[f"cases/{k}"] = int((np.asarray(mask) > 127).sum())
        lines.append(f"cases/{k}.tiff,cases/{k}_lesion.png,cases/fov.bmp,{'melanoma' if k % 2 else 'nevus'}\n")
    (tmp_path / "seg.csv").write_text("image,mask,roi,diagnosis\n" + "".join(lines))
    splits = build_data(cfg(tmp_path / "seg.csv", task="segmentation", columns={"label": "diagnosis"}))
    items = splits.train + splits.val + splits.test
    assert splits.class_names == ["background", "foreground"] and len(items) == 4
    assert {i["class_label"] for i in items} == {"melanoma", "nevus"}
    stats = validate(splits)
    assert stats.label_values == {0, 1} and sorted(stats.foreground) == sorted(expected.values())
    out = splits.load_transforms(dict(items[0]))
    assert int(out["roi"].sum()) == SMALL[0] * 30 and torch.equal(out["roi"][0, :, :5], torch.zeros(SMALL[0], 5))


def _outside(tmp_path):
    return [("img/0.png", "0", "train"), ("../elsewhere/1.png", "1", "train")], "line 3: image '../elsewhere/1.png' " \
                                                                                "resolves outside the data root"


def _absolute(tmp_path):
    return [("img/0.png", "0", "train"), ("/etc/passwd", "1", "train")], "line 3: image '/etc/passwd' resolves outside"


def _unknown_class(tmp_path):
    return [("img/0.png", "benign", "train"), ("img/1.png", "maybe", "train")], "line 3: unknown class 'maybe' in " \
                                                                              "column label"


def _bad_split(tmp_path):
    return [("img/0.png", "benign", "train"), ("img/1.png", "benign", "holdout")], "line 3: column split: 'holdout' " \
                                                                                 "is not train, val or test"


def _missing_file(tmp_path):
    return [("img/0.png", "benign", "train"), ("img/9.png", "benign", "train")], "img/9.png: listed in labels.csv " \
                                                                               "(line 3) but the file is missing"


CASES = [_outside, _absolute, _unknown_class, _bad_split, _missing_file]


@pytest.mark.parametrize("make", CASES, ids=[c.__name__.strip("_") for c in CASES])
def test_bad_rows_exit_2_one_line(make, shared_data, tmp_path, capsys):
    rows, wanted = make(tmp_path)
    _small_csv(shared_data, tmp_path, rows)
    names = ["--set", "data.class_names=[benign,malignant]"] if make is _unknown_class else []
    code, _, errors = cli(capsys, "data", "check", CONFIGS / "csv_cls_ima.yaml", "--set",
                          f"data.root={tmp_path / 'labels.csv'}", "--set", "data.columns={image: image, label: label}",
                          *names)
    where = str(tmp_path / "img/9.png") if make is _missing_file else str(tmp_path / "labels.csv")
    assert code == 2 and errors and errors[0].startswith(f"medrobust: error: {where}: "), errors
    assert wanted in errors[0] and len(errors) == 1, errors
