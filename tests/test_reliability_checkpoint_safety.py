"""Checkpoints and configs never execute code: checkpoints are read only with ``weights_only=True`` (a file
carrying a pickled object is refused, and the object is never built), configs only with a safe YAML loader."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch
import yaml

from pipeline.cli import main
from pipeline.config import load_config
from pipeline.engine.checkpointing import Checkpoints
from pipeline.model.checkpoint import FORMAT, load_checkpoint, save_checkpoint
from pipeline.errors import InputError

REPO = Path(__file__).resolve().parents[1]


class _Payload:
    """Unpickling this would create ``marker`` (stands for arbitrary code run by a hostile checkpoint)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def hostile_checkpoint(tmp_path: Path) -> tuple[Path, Path]:
    marker = tmp_path / "code-was-run"
    path = tmp_path / "hostile.pt"
    torch.save({"format": FORMAT, "network": {"w": torch.zeros(2)}, "extra": _Payload(marker)}, path)
    assert not marker.exists()
    return path, marker


def tiny_config_file(tmp_path: Path) -> Path:
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(yaml.safe_dump({
        "experiment": "safety", "data": {"source": "synthetic", "synthetic_size": 32, "cache": "none"},
        "model": {"name": "small_cnn", "channels": [8, 16]},
        "train": {"epochs": 1, "device": "cpu", "progress": False, "output_dir": str(tmp_path / "out")}}))
    return cfg


def test_pickled_payload_is_refused_and_never_run(tmp_path):
    path, marker = hostile_checkpoint(tmp_path)
    with pytest.raises(InputError, match=r"hostile\.pt: refused to load: the file holds more than weights"):
        load_checkpoint(path)
    assert not marker.exists()


def test_cli_refuses_hostile_checkpoint_for_resume_and_evaluate(tmp_path, mlflow_uri, capsys, monkeypatch):
    path, marker = hostile_checkpoint(tmp_path)
    cfg = tiny_config_file(tmp_path)
    monkeypatch.chdir(tmp_path)
    for argv in (["train", str(cfg), "--resume", str(path)], ["evaluate", str(cfg), "--checkpoint", str(path)]):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert f"medrobust: error: {path}: refused to load" in err and "Traceback" not in err
    assert not marker.exists()
    assert not (tmp_path / "out").exists()          # refused before any training


def test_a_real_checkpoint_round_trips_and_a_damaged_one_is_a_clean_error(tmp_path):
    path = save_checkpoint(tmp_path / "ok.pt", {"network": {"w": torch.arange(3.0)}, "epoch": 2})
    assert load_checkpoint(path)["epoch"] == 2
    assert [p.name for p in tmp_path.iterdir()] == ["ok.pt"]          # no temp file left behind
    damaged = tmp_path / "damaged.pt"
    damaged.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(InputError, match=r"damaged\.pt: not a readable checkpoint"):
        load_checkpoint(damaged)
    foreign = tmp_path / "foreign.pt"
    torch.save({"state_dict": {}}, foreign)
    with pytest.raises(InputError, match=r"foreign\.pt: not a medrobust checkpoint"):
        load_checkpoint(foreign)


def test_resuming_a_copy_without_the_training_state_is_a_clean_error(tmp_path, mlflow_uri, capsys, monkeypatch):
    """The MLflow artifact is a slim copy (network, config, per-sample state): --resume names what is missing
    before anything starts."""
    slim = save_checkpoint(tmp_path / "slim.pt", {"network": {"w": torch.arange(3.0)}, "epoch": 1, "iteration": 3})
    with pytest.raises(InputError, match=r"slim\.pt: cannot resume: no optimizer in the checkpoint"):
        Checkpoints.load(slim)
    monkeypatch.chdir(tmp_path)
    assert main(["train", str(tiny_config_file(tmp_path)), "--resume", str(slim)]) == 2
    assert "cannot resume: no optimizer" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()

def test_config_with_python_tag_is_rejected_by_the_safe_loader(tmp_path):
    marker = tmp_path / "code-was-run"
    cfg = tmp_path / "hostile.yaml"
    cfg.write_text(f"experiment: !!python/object/apply:os.system ['touch {marker}']\n"
                   "data: {source: synthetic}\n")
    with pytest.raises(InputError, match=r"hostile\.yaml: not valid YAML"):
        load_config(cfg)
    assert not marker.exists()


def _calls(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            yield node, ast.unparse(node.func)


def test_sources_load_only_weights_and_safe_yaml():
    """Every ``torch.load`` in the package passes ``weights_only=True``; no unsafe YAML or pickle loader."""
    torch_loads = 0
    for source in [*(REPO / "pipeline").rglob("*.py"), *(REPO / "transforms").rglob("*.py")]:
        tree = ast.parse(source.read_text(encoding="utf-8"))
        for node, name in _calls(tree):
            where = f"{source.relative_to(REPO)}:{node.lineno}"
            if name == "torch.load":
                torch_loads += 1
                flags = {kw.arg: ast.unparse(kw.value) for kw in node.keywords}
                assert flags.get("weights_only") == "True", where
            assert name not in {"yaml.load", "yaml.unsafe_load", "yaml.full_load", "pickle.load", "pickle.loads",
                                "torch.jit.load"}, where
            if name in {"np.load", "numpy.load"}:
                assert any(kw.arg == "allow_pickle" and ast.unparse(kw.value) == "False" for kw in node.keywords), where
    assert torch_loads == 1   # pipeline.model.checkpoint.load_checkpoint, the only way in
