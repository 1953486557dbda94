"""``medrobust predict``: the training preprocessing on new files, the evaluation's clean predictions exactly,
masks in the input's format and geometry, margins, bad inputs as one line and exit code 2."""

from __future__ import annotations

import csv
import shutil

import numpy as np
import pytest
from deploy_toys import QUICK_EVAL, untrained_checkpoint, write_pngs

from pipeline.cli import main


def _rows(path):
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


@pytest.fixture(scope="module")
def ham_model(shared_data, tmp_path_factory):
    """An untrained (seeded) ResNet-free small CNN checkpoint of the HAM10000 sample at 32x32."""
    tmp = tmp_path_factory.mktemp("ham")
    raw = {"experiment": "predict-ham", "task": "classification", "seed": 0,
           "data": {"source": "ham10000", "root": str(shared_data / "ham10000_sample"), "skip_missing": True,
                    "image_size": [32, 32], "cache": "none"},
           "model": {"name": "small_cnn", "channels": [8, 16]},
           "train": {"device": "cpu", "output_dir": str(tmp / "eval")}, "evaluate": dict(QUICK_EVAL)}
    cfg, splits = untrained_checkpoint(raw, tmp / "ham.pt")
    return cfg, splits, tmp / "ham.pt", tmp


def test_predict_reproduces_the_evaluations_clean_predictions(ham_model, mlflow_uri, capsys):
    from pipeline.deploy.predict import predict
    from pipeline.evaluation.results import CLEAN
    from pipeline.evaluation.run import evaluate

    cfg, splits, ckpt, tmp = ham_model
    ev = evaluate(cfg, checkpoint=str(ckpt))
    files = [item["image"] for item in splits.test]          # no max_samples: the whole test split, in order
    assert len(files) == len(ev.result.labels) >= 10
    result = predict(str(ckpt), files, tmp / "pred", device="cpu", batch_size=5)
    probs = np.array([[float(r[f"prob_{c}"]) for c in splits.class_names] for r in _rows(result.table)])
    reference = ev.result.outcomes[CLEAN].probs
    assert np.array_equal(probs.argmax(axis=1), reference.argmax(axis=1))
    assert np.abs(probs - reference).max() < 1e-6
    rows = _rows(result.table)
    assert [r["file"] for r in rows] == files
    assert [r["class"] for r in rows] == [splits.class_names[c] for c in reference.argmax(axis=1)]
    assert "predict: 100%" in capsys.readouterr().err                     # the progress bar


def test_predict_cli_on_a_folder_with_margins(ham_model, shared_data, tmp_path, capsys):
    _, splits, ckpt, _ = ham_model
    folder = tmp_path / "new"
    folder.mkdir()
    for item in splits.test[:3]:
        shutil.copy(item["image"], folder)
    code = main(["predict", str(ckpt), str(folder), "--out", str(tmp_path / "out"), "--margin", "--steps", "2",
                 "--device", "cpu"])
    assert code == 0
    rows = _rows(tmp_path / "out" / "predictions.csv")
    assert len(rows) == 3
    assert list(rows[0]) == ["file", "class", *(f"prob_{c}" for c in splits.class_names), "margin_L2"]
    for row in rows:
        assert sum(float(row[f"prob_{c}"]) for c in splits.class_names) == pytest.approx(1.0, abs=1e-5)
        assert float(row["margin_L2"]) >= 0.0                              # a radius, or inf: never broken
    assert "predicted 3 input(s)" in capsys.readouterr().out


def test_bad_inputs_are_one_line_each_and_exit_2(ham_model, tmp_path, capsys):
    _, _, ckpt, _ = ham_model
    fake = tmp_path / "broken.png"
    fake.write_text("not an image")
    volume = tmp_path / "scan.nii.gz"
    volume.write_bytes(b"")
    code = main(["predict", str(ckpt), str(tmp_path / "absent.jpg"), str(volume), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert err == [f"medrobust: error: {tmp_path / 'absent.jpg'}: no such file or folder",
                   f"medrobust: error: {volume}: not one of the images (png, jpg, jpeg, tif, tiff, bmp, gif) this "
                   "2D model predicts on"]
    code = main(["predict", str(ckpt), str(fake), "--out", str(tmp_path / "o")])
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("medrobust:")]
    assert code == 2 and len(err) == 1 and err[0].startswith(f"medrobust: error: {fake}: unreadable image")
    code = main(["predict", str(tmp_path / "no-model.pt"), str(fake)])
    assert code == 2
    assert capsys.readouterr().err.strip().endswith("no-model.pt: checkpoint file not found (give a checkpoint "
                                                    "file or an MLflow run id)")


def test_2d_masks_come_back_as_png_at_the_input_size(shared_data, tmp_path):
    from PIL import Image

    from pipeline.deploy.predict import predict

    raw = {"experiment": "predict-seg", "task": "segmentation",
           "data": {"source": "isic2017", "root": str(shared_data / "isic2017"), "image_size": [32, 32],
                    "limit": 4, "cache": "none"},
           "model": {"name": "unet", "channels": [4, 8]}, "train": {"device": "cpu"}}
    _, splits = untrained_checkpoint(raw, tmp_path / "seg.pt")
    files = [item["image"] for item in splits.test[:2]]
    result = predict(str(tmp_path / "seg.pt"), files, tmp_path / "out", device="cpu")
    for row, source in zip(result.rows, files, strict=True):
        mask = Image.open(row["mask"])
        assert row["mask"].endswith("_mask.png") and mask.mode == "L"
        assert mask.size == Image.open(source).size == (256, 256)
        values = np.asarray(mask)
        assert set(np.unique(values)) <= {0, 255}
        assert row["foreground_fraction"] == pytest.approx((values > 0).mean(), abs=0.05)


def test_3d_masks_come_back_as_nifti_on_the_input_grid(shared_data, tmp_path):
    import nibabel as nib

    from pipeline.deploy.predict import predict

    raw = {"experiment": "predict-3d", "task": "segmentation",
           "data": {"source": "nifti", "root": str(shared_data / "nifti_msd"), "patch_size": [16, 16, 16],
                    "val_fraction": 0.0, "test_fraction": 0.0, "cache": "none"},
           "model": {"name": "unet", "channels": [4, 8]}, "train": {"device": "cpu"}}
    untrained_checkpoint(raw, tmp_path / "seg3d.pt")
    result = predict(str(tmp_path / "seg3d.pt"), [str(shared_data / "nifti_msd" / "imagesTr")], tmp_path / "out",
                     device="cpu")
    assert [r["mask"].rsplit("/", 1)[-1] for r in result.rows] == ["brain_001_mask.nii.gz", "brain_002_mask.nii.gz"]
    for row in result.rows:        # volume 2 is at 4 mm in another orientation: resampled back onto its grid
        mask, source = nib.load(row["mask"]), nib.load(row["file"])
        assert mask.shape == source.shape[:3]
        assert np.allclose(mask.affine, source.affine)
        assert set(np.unique(mask.get_fdata())) <= {0.0, 1.0}


def test_a_synthetic_models_preprocessing_reads_png_files_like_the_arrays_it_was_trained_on(tmp_path):
    """MedMNIST/synthetic models were trained on in-memory arrays: a PNG of the same pixels predicts the same."""
    import torch

    from pipeline.config import config_from_dict
    from pipeline.data import build_data
    from pipeline.model.preprocessing import build, preprocessing_spec

    raw = {"experiment": "x", "data": {"source": "synthetic", "synthetic_size": 8, "cache": "none"},
           "model": {"name": "small_cnn"}}
    cfg = config_from_dict(raw)
    splits = build_data(cfg)
    paths = write_pngs(tmp_path, 1, start=0)                 # image 0 of the source, class 0
    spec = preprocessing_spec(cfg, {"in_channels": 3, "image_size": [32, 32], "spatial_dims": 2})
    from_file = build(spec)({"image": str(paths[0])})["image"]
    item = next(i for i in splits.train + splits.val + splits.test if i["id"] == "synthetic_00000")
    from_array = splits.load_transforms(dict(item))["image"]
    assert from_file.shape == (3, 32, 32) and torch.equal(torch.as_tensor(from_file), torch.as_tensor(from_array))
