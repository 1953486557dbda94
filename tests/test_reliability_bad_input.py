"""Bad input at scale: random and truncated bytes as JPEG, PNG, NIfTI and DICOM files, fed to the loaders
(``build_data`` + ``validate``, what ``medrobust train`` runs before the first step) and to ``medrobust data
check``: always one clean ``InputError`` naming the file, never another exception, a traceback or a hang.
Paths listed in a CSV or ``dataset.json`` that resolve outside the data root are refused.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_data_ham10000 import write_ham
from test_data_isic2017 import write_isic

from pipeline.cli import main
from pipeline.config import config_from_dict
from pipeline.data import build_data
from pipeline.data.scan import validate
from pipeline.errors import InputError

REPO = Path(__file__).resolve().parents[1]
EXAMPLE_LIMIT_S = 30   # a hang is a failure, not a stuck suite
FUZZ = settings(max_examples=25, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


@contextmanager
def time_limit(seconds: int):
    def _hang(signum, frame):
        raise AssertionError(f"no answer within {seconds} s: the loader hangs")
    previous = signal.signal(signal.SIGALRM, _hang)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


class Dataset:
    """A small valid dataset of one source, and the one file of it that the examples overwrite."""

    def __init__(self, raw: dict, target: Path):
        self.cfg = config_from_dict(raw)
        self.raw, self.target = raw, target
        self.original = target.read_bytes()

    def check(self, data: bytes) -> str | None:
        """Write ``data`` into the target file, run the loaders; the problem lines (None: accepted)."""
        self.target.write_bytes(data)
        try:
            with time_limit(EXAMPLE_LIMIT_S):
                validate(build_data(self.cfg))
            return None
        except InputError as exc:
            return "\n".join(exc.problems)
        finally:
            self.target.write_bytes(self.original)


def _ham(root: Path) -> Dataset:
    write_ham(root, [("L1", "ISIC_1", "nv"), ("L2", "ISIC_2", "mel"), ("L3", "ISIC_3", "bkl")],
              ["ISIC_1", "ISIC_2", "ISIC_3"])
    raw = {"experiment": "fuzz", "data": {"source": "ham10000", "root": str(root), "image_size": [32, 32],
                                          "cache": "none"}}
    return Dataset(raw, root / "images" / "ISIC_2.jpg")


def _isic_masks(root: Path) -> Dataset:
    write_isic(root, n=3)
    raw = {"experiment": "fuzz", "task": "segmentation",
           "data": {"source": "isic2017", "root": str(root), "image_size": [32, 32], "cache": "none"}}
    return Dataset(raw, root / "ISIC-2017_Training_Part1_GroundTruth_256" / "ISIC_0000001_segmentation.png")


def _nifti(root: Path) -> Dataset:
    for sub in ("imagesTr", "labelsTr"):
        (root / sub).mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in ("a", "b"):
        nib.save(nib.Nifti1Image(rng.random((8, 8, 6), dtype=np.float32), np.eye(4)),
                 str(root / "imagesTr" / f"{name}.nii.gz"))
        label = np.zeros((8, 8, 6), np.uint8)
        label[2:5, 2:5, 1:4] = 1
        nib.save(nib.Nifti1Image(label, np.eye(4)), str(root / "labelsTr" / f"{name}.nii.gz"))
    raw = {"experiment": "fuzz", "task": "segmentation",
           "data": {"source": "nifti", "root": str(root), "cache": "none", "patch_size": [8, 8, 4]}}
    return Dataset(raw, root / "imagesTr" / "b.nii.gz")


def _dicom(root: Path, shared: Path) -> Dataset:
    shutil.copytree(shared / "ct_dicom_tiny", root)
    raw = {"experiment": "fuzz", "data": {"source": "dicom", "root": str(root), "cache": "none"}}
    return Dataset(raw, sorted(p for p in root.iterdir() if p.is_file())[1])


def _assert_clean(dataset: Dataset, data: bytes) -> None:
    problems = dataset.check(data)
    if problems is None:   # bytes that still decode to the whole image are accepted (a PNG cut in its IEND chunk)
        return
    assert str(dataset.target) in problems or str(dataset.target.parent) in problems, problems
    assert "Traceback" not in problems


def junk(original_size: int):
    """Random bytes, or a truncation of the valid file at any length (0 included)."""
    return st.one_of(st.binary(max_size=4096), st.integers(min_value=0, max_value=original_size - 1))


def _bytes_of(dataset: Dataset, choice) -> bytes:
    return dataset.original[:choice] if isinstance(choice, int) else choice


@pytest.fixture(scope="module")
def datasets(tmp_path_factory) -> dict[str, Dataset]:
    base = tmp_path_factory.mktemp("fuzz")
    made = {"jpeg": _ham(base / "ham"), "png": _isic_masks(base / "isic"), "nifti": _nifti(base / "nifti")}
    for name, dataset in made.items():
        assert dataset.check(dataset.original) is None, name   # the pristine dataset is accepted
    return made


@pytest.mark.parametrize("kind", ["jpeg", "png", "nifti"])
def test_random_and_truncated_files_give_one_clean_error(datasets, kind):
    dataset = datasets[kind]

    @FUZZ
    @given(choice=junk(len(dataset.original)))
    def run(choice):
        _assert_clean(dataset, _bytes_of(dataset, choice))

    run()
    assert dataset.check(b"") is not None and dataset.check(dataset.original[: len(dataset.original) // 2])


def test_random_and_truncated_dicom_slices_give_one_clean_error(tmp_path, shared_data):
    dataset = _dicom(tmp_path / "series", shared_data)
    assert dataset.check(dataset.original) is None

    @FUZZ
    @given(choice=junk(len(dataset.original)))
    def run(choice):
        _assert_clean(dataset, _bytes_of(dataset, choice))

    run()
    assert dataset.check(dataset.original[: len(dataset.original) // 2]) is not None


def test_data_check_cli_on_broken_files_exits_2_without_traceback(datasets, tmp_path, capsys):
    """The real command: once in a subprocess (an interpreter start costs seconds), the rest in-process."""
    for kind, cut, subprocess_run in (("jpeg", 200, True), ("png", 60, False), ("nifti", 50, False)):
        dataset = datasets[kind]
        cfg = tmp_path / f"{kind}.yaml"
        cfg.write_text(yaml.safe_dump(dataset.raw))
        dataset.target.write_bytes(dataset.original[:cut])
        try:
            if subprocess_run:
                proc = subprocess.run([sys.executable, "-m", "pipeline.cli", "data", "check", str(cfg)],
                                      cwd=tmp_path, capture_output=True, text=True, timeout=120)
                code, err = proc.returncode, proc.stderr
            else:
                code, err = main(["data", "check", str(cfg)]), capsys.readouterr().err
        finally:
            dataset.target.write_bytes(dataset.original)
        assert code == 2, err[-2000:]
        assert f"medrobust: error: {dataset.target}: " in err
        assert "Traceback" not in err


@pytest.mark.parametrize("listed", ["../../outside", "../../../etc/passwd", "/etc/passwd", "sub/../../../outside"])
def test_csv_paths_outside_the_data_root_are_refused(tmp_path, listed):
    (tmp_path / "outside.jpg").write_bytes(b"not looked at")
    root = write_ham(tmp_path / "ham", [("L1", "ISIC_1", "nv"), ("L2", listed, "mel")], ["ISIC_1"])
    cfg = config_from_dict({"experiment": "t", "data": {"source": "ham10000", "root": str(root)}})
    with pytest.raises(InputError) as caught:
        build_data(cfg)
    line = "\n".join(caught.value.problems)
    assert f"{root / 'HAM10000_metadata.csv'}: line 3: image_id '{listed}' resolves outside the data root" in line


def test_isic_and_dataset_json_paths_outside_the_root_are_refused(tmp_path):
    root = write_isic(tmp_path / "isic", n=2)
    csv = root / "ISIC-2017_Training_Part3_GroundTruth.csv"
    csv.write_text(csv.read_text() + "../../escape,0.0,0.0\n")
    with pytest.raises(InputError, match=r"line 4: image_id '../../escape' resolves outside the data root"):
        build_data(config_from_dict({"experiment": "t", "data": {"source": "isic2017", "root": str(root)}}))

    msd = tmp_path / "msd"
    msd.mkdir()
    (msd / "dataset.json").write_text(json.dumps({"training": [
        {"image": "/etc/passwd", "label": "./labelsTr/a.nii.gz"}, {"image": 7, "label": "x"}]}))
    with pytest.raises(InputError) as caught:
        build_data(config_from_dict({"experiment": "t", "task": "segmentation",
                                     "data": {"source": "nifti", "root": str(msd)}}))
    text = "\n".join(caught.value.problems)
    assert "training[0]: path '/etc/passwd' resolves outside the data root" in text
    assert "training[1]: expected {image: <path>, label: <path>}" in text
