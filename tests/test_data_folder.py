"""``data.source: folder``: real ISIC 2017 and HAM10000 images re-saved in other formats and layouts (PNG, 16-bit
TIFF, GIF and JPEG masks under other names, a field-of-view folder, class subfolders); ``data check`` and a
one-epoch ``train`` on each; bad input gives exit 2 and one line naming the file."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from pipeline.cli import main
from pipeline.config import config_from_dict
from pipeline.data import build_data, validate

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
HAM_COUNTS = {"nv": 82, "bkl": 15, "mel": 9, "bcc": 9, "df": 4, "vasc": 3, "akiec": 2}
SMALL = (30, 40)  # (H, W): non-square on purpose


def isic_ids(shared: Path, n: int) -> list[str]:
    return sorted(p.stem for p in (shared / "isic2017" / "ISIC-2017_Training_Data").glob("*.jpg"))[:n]


def isic_pair(shared: Path, image_id: str, size=SMALL) -> tuple[Image.Image, Image.Image]:
    base = shared / "isic2017"
    image = Image.open(base / "ISIC-2017_Training_Data" / f"{image_id}.jpg").convert("RGB")
    mask = Image.open(base / "ISIC-2017_Training_Part1_GroundTruth_256" / f"{image_id}_segmentation.png")
    return image.resize(size[::-1], Image.BILINEAR), mask.convert("L").resize(size[::-1], Image.NEAREST)


def write_seg_folder(shared: Path, root: Path, n: int = 6) -> dict[str, int]:
    """Images as PNG (even) and TIFF (odd), masks as GIF (even) and JPEG (odd) named <id>_segmentation; returns the
    foreground pixel count of each mask file under the > 127 rule, computed from the file as written."""
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    expected = {}
    for k, image_id in enumerate(isic_ids(shared, n)):
        image, mask = isic_pair(shared, image_id)
        image.save(root / "images" / f"{image_id}.{'png' if k % 2 == 0 else 'tif'}")
        path = root / "masks" / f"{image_id}_segmentation.{'gif' if k % 2 == 0 else 'jpg'}"
        mask.save(path, **({} if k % 2 == 0 else {"quality": 75}))
        expected[image_id] = int((np.asarray(Image.open(path).convert("L")) > 127).sum())
    return expected


def write_class_folders(shared: Path, root: Path) -> Path:
    """HAM10000's 124 images as PNG, one subfolder per diagnosis."""
    ham = shared / "ham10000_sample"
    table = pd.read_csv(ham / "HAM10000_metadata.csv", dtype=str)
    have = {p.stem for p in (ham / "images").glob("*.jpg")}
    for row in table[table.image_id.isin(have)].itertuples():
        (root / "images" / row.dx).mkdir(parents=True, exist_ok=True)
        Image.open(ham / "images" / f"{row.image_id}.jpg").resize(SMALL[::-1]).save(
            root / "images" / row.dx / f"{row.image_id}.png")
    return root


@pytest.fixture(scope="module")
def seg_folder(shared_data, tmp_path_factory):
    root = tmp_path_factory.mktemp("polyp_like")
    return root, write_seg_folder(shared_data, root)


@pytest.fixture(scope="module")
def class_folder(shared_data, tmp_path_factory):
    return write_class_folders(shared_data, tmp_path_factory.mktemp("ham_classes"))


def cfg(root, task="segmentation", **data):
    return config_from_dict({"experiment": "t", "task": task, "data": {"source": "folder", "root": str(root),
                                                                       "cache": "none", **data}})


def cli(capsys, *argv):
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, [line for line in out.err.splitlines() if line.startswith("medrobust: error:")]


def tiny_train(capsys, config, sets, out_dir):
    """One epoch of IMA with a tiny CNN on 16 samples through the CLI: (exit code, stdout, stderr)."""
    tiny = {"model.name": "small_cnn", "model.channels": "[8,16]", "data.limit": 16, "method.steps": 2,
            "method.bisection_steps": 2, "train.epochs": 1, "train.batch_size": 8, "train.device": "cpu",
            "data.cache": "none", "train.progress": "false", "train.output_dir": out_dir, "tracking.log_model": "false"}
    args = [arg for key, value in tiny.items() for arg in ("--set", f"{key}={value}")]
    return cli(capsys, "train", config, *sets, *args)


def test_png_tiff_images_gif_jpeg_masks(seg_folder):
    root, expected = seg_folder
    splits = build_data(cfg(root, mask_suffix="_segmentation"))
    items = splits.train + splits.val + splits.test
    assert (len(splits.train), len(splits.val), len(splits.test)) == (4, 1, 1)
    assert splits.class_names == ["background", "foreground"] and splits.in_channels == 3
    assert splits.image_size == SMALL and sorted(i["id"] for i in items) == sorted(expected)
    jpeg = np.asarray(Image.open(next((root / "masks").glob("*.jpg"))))
    assert len(np.setdiff1d(np.unique(jpeg), [0, 255])) > 0  # JPEG artefacts: the > 127 rule matters
    for item in items:
        out = splits.load_transforms(dict(item))
        assert out["image"].shape == (3, *SMALL) and out["label"].shape == (1, *SMALL)
        assert set(torch.unique(out["label"]).tolist()) == {0.0, 1.0}
        assert int(out["label"].sum()) == expected[item["id"]]
    stats = validate(splits)
    assert stats.label_values == {0, 1} and stats.loaded == 6
    # 30x40: no quarter turns in training (they would swap H and W), flips only; square sizes get both
    kinds = lambda s: [type(t).__name__ for t in s.train_transforms.transforms]  # noqa: E731
    assert kinds(splits) == ["RandFlipd", "RandFlipd"]
    assert kinds(build_data(cfg(root, mask_suffix="_segmentation", image_size=[32, 32])))[-1] == "RandRotate90d"


def test_data_check_and_one_epoch_train(seg_folder, tmp_path, mlflow_uri, capsys):
    root, expected = seg_folder
    sets = ["--set", f"data.root={root}", "--set", "data.mask_suffix=_segmentation", "--set", "data.image_size=[32,32]"]
    code, out, errors = cli(capsys, "data", "check", CONFIGS / "folder_seg_ima.yaml", *sets)
    assert code == 0 and not errors
    assert "2 classes (background, foreground)" in out and "train: 4 samples" in out and "test: 1 samples" in out
    assert "mask label values: [0, 1]" in out and "zero-padded (data.resize_mode: pad)" in out
    assert "nevus" not in out and "ISIC 2017" not in out
    code, out, errors = cli(capsys, "train", CONFIGS / "folder_seg_ima.yaml", *sets, "--set", "model.channels=[4,8]",
                            "--set", "method.steps=2", "--set", "method.bisection_steps=2", "--set", "train.epochs=1",
                            "--set", "train.batch_size=4", "--set", "train.device=cpu", "--set", "data.cache=none",
                            "--set", "train.progress=false", "--set", f"train.output_dir={tmp_path / 'out'}",
                            "--set", "evaluate.epoch_steps=0", "--set", "tracking.log_model=false")
    assert code == 0 and not errors
    client = mlflow.MlflowClient(mlflow_uri)
    exp = client.get_experiment_by_name("folder_seg_ima")  # no experiment in the config: the file's stem
    (run,) = client.search_runs([exp.experiment_id])
    assert run.info.status == "FINISHED" and run.data.tags["medrobust.dataset"] == f"folder:{root.name}"
    assert 0.0 <= run.data.metrics["val_dice"] <= 1.0


def test_grey_16bit_tiff_with_field_of_view(shared_data, tmp_path):
    """A retina-style layout: <id>_training.tif (16-bit grey), masks <id>_manual1.gif, fov/<id>_training_mask.gif."""
    for sub in ("images", "masks", "fov"):
        (tmp_path / sub).mkdir()
    yy, xx = np.mgrid[: SMALL[0], : SMALL[1]]
    disc = ((yy - 15) ** 2 + (xx - 20) ** 2 <= 13 ** 2).astype(np.uint8) * 255
    greys = {}
    for k, image_id in enumerate(isic_ids(shared_data, 3)):
        image, mask = isic_pair(shared_data, image_id)
        greys[str(k)] = np.asarray(image.convert("L"))
        Image.fromarray(greys[str(k)].astype(np.uint16) * 257).save(tmp_path / "images" / f"{k}_training.tif")
        mask.save(tmp_path / "masks" / f"{k}_manual1.gif")
        Image.fromarray(disc).save(tmp_path / "fov" / f"{k}_training_mask.gif")
    splits = build_data(cfg(tmp_path, image_suffix="_training", mask_suffix="_manual1", roi_dir="fov",
                            roi_suffix="_training_mask"))
    assert splits.in_channels == 1
    assert sorted(i["id"] for i in splits.train + splits.val + splits.test) == ["0", "1", "2"]
    item = splits.train[0]
    out = splits.load_transforms(dict(item))
    assert out["image"].shape == (1, *SMALL) and out["roi"].shape == (1, *SMALL)
    torch.testing.assert_close(out["image"][0], torch.from_numpy(greys[item["id"]] / 255.0).float())  # 65535 -> 1
    assert int(out["roi"].sum()) == int((disc > 0).sum()) and set(torch.unique(out["roi"]).tolist()) == {0.0, 1.0}
    padded = build_data(cfg(tmp_path, image_suffix="_training", mask_suffix="_manual1", roi_dir="fov",
                            roi_suffix="_training_mask", image_size=[16, 16], resize_mode="pad"))
    out = padded.load_transforms(dict(padded.train[0]))
    # 30x40 scaled to 12x16, then 2 zero rows above and below: outside the field of view
    assert out["roi"].shape == (1, 16, 16) and int(out["roi"][0, :2].sum()) == 0 and int(out["roi"][0, 14:].sum()) == 0
    assert float(out["image"][0, :2].abs().sum()) == 0.0 and int(out["roi"][0, 2:14].sum()) > 0


def test_mask_rule_0_1_masks_labels_and_refusal(shared_data, tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    image, mask = isic_pair(shared_data, isic_ids(shared_data, 1)[0])
    image.save(tmp_path / "images" / "a.png")
    labels = (np.asarray(mask) > 127).astype(np.uint8)
    labels[:5] = 2  # a third class along the top
    Image.fromarray(labels).save(tmp_path / "masks" / "a.png")
    splits = build_data(cfg(tmp_path, mask_mode="labels", class_names=["skin", "lesion", "ruler"]))
    out = splits.load_transforms(dict(splits.train[0]))
    assert splits.num_classes == 3 and splits.class_names == ["skin", "lesion", "ruler"]
    assert {v: int((out["label"] == v).sum()) for v in (0, 1, 2)} == {v: int((labels == v).sum()) for v in (0, 1, 2)}
    with pytest.raises(Exception, match="mask values 0..2: neither a 0/1 nor a 0/255 mask; set data.mask_mode: labels"):
        validate(build_data(cfg(tmp_path)))
    Image.fromarray((labels == 1).astype(np.uint8)).save(tmp_path / "masks" / "a.png")  # 0/1: 1 is foreground
    out = build_data(cfg(tmp_path)).load_transforms({"image": str(tmp_path / "images" / "a.png"),
                                                    "label": str(tmp_path / "masks" / "a.png")})
    assert int(out["label"].sum()) == int((labels == 1).sum())


def test_class_subfolders_counts_names_and_train(class_folder, tmp_path, mlflow_uri, capsys):
    splits = build_data(cfg(class_folder, task="classification", image_size=[32, 32]))
    items = splits.train + splits.val + splits.test
    assert splits.class_names == ["akiec", "bcc", "bkl", "df", "mel", "nv", "vasc"]
    assert Counter(splits.class_names[i["label"]] for i in items) == HAM_COUNTS
    assert items[0]["id"].count("/") == 1  # <class>/<stem>
    order = ["nv", "mel", "bkl", "bcc", "akiec", "df", "vasc"]
    renamed = build_data(cfg(class_folder, task="classification", class_names=order))
    assert Counter(order[i["label"]] for i in renamed.train + renamed.val + renamed.test) == HAM_COUNTS
    sets = ["--set", f"data.root={class_folder}", "--set", "data.image_size=[32,32]"]
    code, out, errors = cli(capsys, "data", "check", CONFIGS / "folder_cls_ima.yaml", *sets)
    assert code == 0 and not errors
    assert "7 classes (akiec, bcc, bkl, df, mel, nv, vasc)" in out and "loaded 124 distinct samples" in out
    code, _, errors = tiny_train(capsys, CONFIGS / "folder_cls_ima.yaml", sets, tmp_path / "out")
    assert code == 0 and not errors
    client = mlflow.MlflowClient(mlflow_uri)
    (run,) = client.search_runs([client.get_experiment_by_name("folder_cls_ima").experiment_id])
    assert run.info.status == "FINISHED" and run.data.tags["medrobust.dataset"] == f"folder:{class_folder.name}"
    assert "val_accuracy" in run.data.metrics


def _tiny_seg(shared, root):
    write_seg_folder(shared, root, n=3)
    return ["--set", f"data.root={root}", "--set", "data.mask_suffix=_segmentation"]


def _image_without_mask(shared, root):
    sets = _tiny_seg(shared, root)
    image_id = isic_ids(shared, 3)[1]
    (root / "masks" / f"{image_id}_segmentation.jpg").unlink()
    return sets, [str(root / "images" / f"{image_id}.tif"), "no mask for this image",
                  f"{root / 'masks' / image_id}_segmentation.<png|"]


def _mask_of_another_size(shared, root):
    sets = _tiny_seg(shared, root)
    image_id = isic_ids(shared, 3)[2]
    bad = root / "masks" / f"{image_id}_segmentation.gif"
    Image.fromarray(np.zeros((20, 40), np.uint8)).save(bad)
    return sets, [str(bad), str(root / "images" / f"{image_id}.png"), "image/mask shape mismatch: image (30, 40), "
                                                                     "mask (20, 40)"]


def _unreadable_image(shared, root):
    sets = _tiny_seg(shared, root)
    bad = root / "images" / f"{isic_ids(shared, 3)[2]}.png"
    bad.write_bytes(bad.read_bytes()[:1500])  # truncated inside the pixel data
    return sets, [str(bad), "truncated image"]


def _unknown_class_folder(shared, root):
    for name in ("benign", "malignant", "unsure"):
        (root / "images" / name).mkdir(parents=True)
        isic_pair(shared, isic_ids(shared, 1)[0])[0].save(root / "images" / name / "a.png")
    return (["--set", f"data.root={root}", "--set", "data.class_names=[benign,malignant]"],
            [str(root / "images" / "unsure"), "unknown class folder 'unsure' (data.class_names: benign, malignant)"])


CASES = [_image_without_mask, _mask_of_another_size, _unreadable_image, _unknown_class_folder]


@pytest.mark.parametrize("make", CASES, ids=[c.__name__.strip("_") for c in CASES])
def test_bad_input_exit_2_one_line(make, shared_data, tmp_path, capsys):
    sets, wanted = make(shared_data, tmp_path / "data")
    config = CONFIGS / ("folder_cls_ima.yaml" if make is _unknown_class_folder else "folder_seg_ima.yaml")
    code, _, errors = cli(capsys, "data", "check", config, *sets)
    assert code == 2 and len(errors) == 1, errors
    assert all(w in errors[0] for w in wanted), errors[0]


def test_skip_missing_skips_the_image_without_mask(shared_data, tmp_path, capsys):
    sets, _ = _image_without_mask(shared_data, tmp_path / "data")
    code, out, errors = cli(capsys, "data", "check", CONFIGS / "folder_seg_ima.yaml", *sets,
                            "--set", "data.skip_missing=true")
    assert code == 0 and not errors and "loaded 2 distinct samples; skipped 1" in out


def test_stratified_report_skips_columns_the_data_lacks():
    """Folder data have no sex or age: the default stratify columns give class rows only, no all-unknown rows."""
    from pipeline.evaluation.results import CLEAN, Outcome, SuiteResult
    from pipeline.evaluation.stratified import stratified_table

    result = SuiteResult(task="classification", labels=np.array([0, 1, 1]), index=np.arange(3),
                         class_names=["benign", "malignant"], outcomes={CLEAN: Outcome(probs=np.eye(2)[[0, 1, 0]])},
                         meta={"sex": [None] * 3, "age": [None] * 3, "localization": [None] * 3})
    table = stratified_table(result, ["label", "sex", "age_band", "localization"])
    assert set(table["column"]) == {"class"} and set(table["group"]) == {"benign", "malignant"}
