"""``medrobust data check``: exit 0 and a summary on good data; exit 2, the file and the problem, no traceback,
on each kind of bad input. Two real subprocess runs; the other cases call ``pipeline.cli.main`` in-process."""

from __future__ import annotations

import shutil
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
import yaml
from PIL import Image
from test_data_ham10000 import write_ham
from test_data_isic2017 import write_isic

from pipeline.cli import main

REPO_CONFIGS = __import__("pathlib").Path(__file__).resolve().parents[1] / "configs"


def run_cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "pipeline.cli", "data", "check", *map(str, args)],
                          capture_output=True, text=True, cwd=cwd or REPO_CONFIGS.parent, timeout=300)


def write_cfg(tmp_path, task="classification", **data):
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump({"experiment": "t", "task": task, "data": data}))
    return path


def check(capsys, path, *sets):
    argv = ["data", "check", str(path)]
    for s in sets:
        argv += ["--set", s]
    code = main(argv)
    out = capsys.readouterr()
    return code, out.out, out.err


def test_dermamnist_subprocess_ok(shared_data):
    res = run_cli(REPO_CONFIGS / "dermamnist_ima.yaml", "--set", f"data.root={shared_data / 'dermamnist' / 'dermamnist.npz'}")
    assert res.returncode == 0, res.stderr
    assert "train: 7007 samples" in res.stdout and "val: 1003 samples" in res.stdout
    assert "test: 2005 samples" in res.stdout and "nv 4693" in res.stdout


def test_ham_missing_images_subprocess_exit_2(shared_data):
    res = run_cli(REPO_CONFIGS / "ham10000_ima.yaml", "--set", f"data.root={shared_data / 'ham10000_sample'}",
                  "--set", "data.skip_missing=false")
    assert res.returncode == 2
    assert "medrobust: error:" in res.stderr and "ISIC_0027419.jpg: listed in HAM10000_metadata.csv" in res.stderr
    assert "9891 of 10015 listed images are missing" in res.stderr and "Traceback" not in res.stderr


def test_every_config_is_valid():
    from pipeline.config import load_config

    names = sorted(p.name for p in REPO_CONFIGS.glob("*_ima.yaml"))
    assert {"dermamnist_ima.yaml", "pneumoniamnist_ima.yaml", "ham10000_ima.yaml", "isic2017_cls_ima.yaml",
            "isic2017_seg_ima.yaml", "nifti_seg_ima.yaml", "brain_mri_3d_ima.yaml"} <= set(names)
    for name in names:
        assert load_config(REPO_CONFIGS / name).method.name == "ima"


def test_dicom_config_in_process(shared_data, capsys):
    config = REPO_CONFIGS / "brain_mri_3d_ima.yaml"
    code, out, _ = check(capsys, config, f"data.root={shared_data / 'tcia_pgbm001'}")
    assert code == 0 and "4 channel(s)" in out and "1.38x1.38x6.5" in out and "reused" in out
    # at the native spacing the mask has its 6809 tumour voxels
    code, out, _ = check(capsys, config, f"data.root={shared_data / 'tcia_pgbm001'}", "data.spacing=null")
    assert code == 0 and "6809" in out and "0.688x0.688x6.5" in out


def _ham_truncated(tmp_path):
    root = write_ham(tmp_path / "ham", [("L1", "ISIC_1", "nv"), ("L2", "ISIC_2", "mel")], ["ISIC_1", "ISIC_2"])
    path = root / "images" / "ISIC_2.jpg"
    path.write_bytes(path.read_bytes()[:300])
    return write_cfg(tmp_path, source="ham10000", root=str(root)), str(path), "truncated image"


def _ham_unknown_class(tmp_path):
    root = write_ham(tmp_path / "ham", [("L1", "ISIC_1", "nv"), ("L2", "ISIC_2", "xyz")], ["ISIC_1", "ISIC_2"])
    return (write_cfg(tmp_path, source="ham10000", root=str(root)), str(root / "HAM10000_metadata.csv"),
            "line 3: unknown class 'xyz'")


def _ham_missing_file(tmp_path):
    root = write_ham(tmp_path / "ham", [("L1", "ISIC_1", "nv"), ("L2", "ISIC_2", "nv")], ["ISIC_1"])
    return (write_cfg(tmp_path, source="ham10000", root=str(root)), str(root / "images" / "ISIC_2.jpg"),
            "but the file is missing")


def _isic_mismatch(tmp_path):
    root = write_isic(tmp_path / "isic", n=3)
    mask = root / "ISIC-2017_Training_Part1_GroundTruth_256" / "ISIC_0000002_segmentation.png"
    Image.fromarray(np.zeros((20, 40), np.uint8)).save(mask)
    return (write_cfg(tmp_path, task="segmentation", source="isic2017", root=str(root)), str(mask),
            "image/mask shape mismatch")


def _nifti_nan(tmp_path):
    for sub in ("imagesTr", "labelsTr"):
        (tmp_path / sub).mkdir()
    vol = np.ones((6, 6, 6), np.float32)
    vol[1, 1, 1] = np.inf
    nib.save(nib.Nifti1Image(vol, np.eye(4)), str(tmp_path / "imagesTr" / "v.nii.gz"))
    nib.save(nib.Nifti1Image(np.zeros((6, 6, 6), np.uint8), np.eye(4)), str(tmp_path / "labelsTr" / "v.nii.gz"))
    return (write_cfg(tmp_path, task="segmentation", source="nifti", root=str(tmp_path)),
            str(tmp_path / "imagesTr" / "v.nii.gz"), "NaN/inf")


def _empty_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    return write_cfg(tmp_path, source="dicom", root=str(tmp_path / "empty")), str(tmp_path / "empty"), "empty folder"


def _dicom_two_series(tmp_path, shared_data):
    folder = tmp_path / "series"
    shutil.copytree(shared_data / "ct_dicom_tiny", folder)
    shutil.copy(next((shared_data / "tcia_pgbm001").glob("*/11-T1post-*")) / "000000.dcm", folder / "other.dcm")
    return write_cfg(tmp_path, source="dicom", root=str(folder)), str(folder), "holds 2 DICOM series"


def _npz_missing_keys(tmp_path):
    path = tmp_path / "dermamnist.npz"
    np.savez(path, train_images=np.zeros((1, 28, 28, 3), np.uint8))
    return write_cfg(tmp_path, source="medmnist", root=str(path)), str(path), "missing key(s)"


CASES = [_ham_truncated, _ham_unknown_class, _ham_missing_file, _isic_mismatch, _nifti_nan, _empty_folder,
         _npz_missing_keys]


@pytest.mark.parametrize("make", CASES, ids=[c.__name__.strip("_") for c in CASES])
def test_bad_input_exit_2_names_file(make, tmp_path, capsys):
    path, where, what = make(tmp_path)
    code, _, err = check(capsys, path)
    assert code == 2
    assert any(line.startswith(f"medrobust: error: ") and where in line and what in line for line in err.splitlines()), err
    assert "Traceback" not in err


def test_dicom_folder_with_two_series_exit_2(tmp_path, shared_data, capsys):
    path, where, what = _dicom_two_series(tmp_path, shared_data)
    code, _, err = check(capsys, path)
    assert code == 2 and f"{where}: {what}" in err and "Traceback" not in err


def test_unknown_key_suggests_the_closest_and_experiment_defaults_to_stem(tmp_path, capsys):
    path = tmp_path / "polyps_seg.yaml"
    path.write_text(yaml.safe_dump({"task": "segmentation", "data": {"source": "folder", "mask_sufix": "_mask"}}))
    code, _, err = check(capsys, path)
    assert code == 2 and err.strip().splitlines() == [
        f"medrobust: error: {path}: data.mask_sufix: unknown key (did you mean data.mask_suffix?)"]
    from pipeline.config import load_config
    path.write_text(yaml.safe_dump({"task": "segmentation", "data": {"source": "folder", "mask_suffix": "_mask"}}))
    assert load_config(path).experiment == "polyps_seg"
    assert load_config(path, ["experiment=polyps-2024"]).experiment == "polyps-2024"
