"""The method section of the config: one config class per method, found through the method registry; errors
that name the file and the key; the segmentation criterion as one top-level key; a method added in one file."""

from __future__ import annotations

import ast
from dataclasses import FrozenInstanceError
from pathlib import Path
from typing import Literal

import pytest
import torch
import yaml
from pydantic import Field, ValidationError

from pipeline.adversarial.methods import (METHODS, DPAAT, IMA, PGDAT, BaseMethodConfig, Method, MethodOutput,
                                          Standard, build_method)
from pipeline.adversarial.boundary import BoundaryPGD
from pipeline.adversarial.pgd import TradesKL
from pipeline.adversarial.tasks import Classification, Segmentation
from pipeline.cli import main
from pipeline.config import config_from_dict, load_config, method_config, method_knobs, stored_config
from pipeline.errors import InputError
from pipeline.tracking.params import used_params

REPO = Path(__file__).resolve().parents[1]
BASE = {"experiment": "x", "data": {"source": "synthetic"}}


def _problems(raw: dict, source: str = "x.yaml") -> list[str]:
    with pytest.raises(InputError) as err:
        config_from_dict(raw, source)
    return err.value.problems


def _cli_train(tmp_path: Path, capsys, raw: dict) -> tuple[Path, int, list[str]]:
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(raw))
    code = main(["train", str(path)])
    return path, code, capsys.readouterr().err.strip().splitlines()


def test_a_knob_of_another_method_exits_2_with_one_line_naming_file_and_key(tmp_path, capsys):
    path, code, err = _cli_train(tmp_path, capsys, {**BASE, "method": {"name": "pgd_at", "delta": 0.1}})
    assert code == 2 and len(err) == 1, err
    assert err[0].startswith(f"medrobust: error: {path}: method.delta: unknown key for method 'pgd_at'"), err
    assert "a knob of dpaat, ima" in err[0] and "Traceback" not in err[0]

    path, code, err = _cli_train(tmp_path, capsys, {**BASE, "method": {"name": "ima", "eps_min": 0.1}})
    assert code == 2 and err == [f"medrobust: error: {path}: method.eps_min: unknown key for method 'ima' "
                                 "(a knob of dpaat)"]


def test_old_dice_threshold_in_the_method_section_names_the_new_key(tmp_path, capsys):
    raw = {**BASE, "task": "segmentation", "method": {"name": "ima", "dice_threshold": 0.6}}
    path, code, err = _cli_train(tmp_path, capsys, raw)
    assert code == 2 and len(err) == 1
    assert err[0].startswith(f"medrobust: error: {path}: method.dice_threshold: this key moved: set dice_threshold "
                             "instead"), err


def test_closest_key_inside_a_method_and_tag_left_out_of_the_location():
    assert _problems({**BASE, "method": {"name": "ima", "delt": 0.1}}) == [
        "x.yaml: method.delt: unknown key for method 'ima' (did you mean method.delta?)"]
    assert _problems({**BASE, "method": {"name": "dpaat", "momentum": 2.0}}) == [
        "x.yaml: method.momentum: Input should be less than or equal to 1 (got 2.0)"]
    assert _problems({**BASE, "method": {"name": "dpaat", "eps_min": 2.0, "eps_max": 1.0}}) == [
        "x.yaml: method: eps_min (2) must not exceed eps_max (1)"]
    assert _problems({**BASE, "method": {"eps": 0.5}}) == [
        "x.yaml: method.eps: unknown key for method 'standard' (a knob of dpaat, mart, pgd_at, trades)"]
    (line,) = _problems({**BASE, "method": {"name": "pgd"}})
    assert line.startswith("x.yaml: method.name: Input should be one of 'standard', ") and "(got 'pgd')" in line
    assert line.endswith("(did you mean pgd_at?)")
    (line,) = _problems({**BASE, "method": None})
    assert line.startswith("x.yaml: method: expected a mapping with the method's name")


def test_method_omitted_is_standard_and_every_method_has_only_its_knobs():
    assert isinstance(config_from_dict(BASE).method, METHODS["standard"].config_class)
    assert config_from_dict({**BASE, "method": {}}).method.name == "standard"
    knobs = {name: set(cls.config_class.model_fields) - {"name"} for name, cls in METHODS.items()}
    assert knobs["standard"] == set()
    attack = {"norm", "steps", "alpha", "random_start", "attack_bn"}
    assert knobs["pgd_at"] == attack | {"attack_loss", "eps"}
    assert knobs["trades"] == attack | {"eps", "beta"}
    assert knobs["mart"] == attack | {"attack_loss", "eps", "beta"}
    assert knobs["ima"] == attack | {"attack_loss", "delta", "eps_max", "beta", "bisection_steps", "boundary_bracket"}
    assert knobs["dpaat"] == attack | {"attack_loss", "eps", "delta", "eps_min", "eps_max", "beta", "quantile",
                                       "momentum"}
    for name, cls in METHODS.items():
        for key, field in cls.config_class.model_fields.items():
            assert key == "name" or field.description, f"{name}.{key} has no description"


def test_defaults_are_those_of_the_flat_config():
    ima, dpaat = method_config(name="ima"), method_config(name="dpaat")
    assert (ima.norm, ima.steps, ima.alpha, ima.delta, ima.eps_max, ima.bisection_steps) == \
        ("L2", 10, 4.0, 0.03, 3.0, 10)
    assert (ima.beta, ima.attack_bn, ima.attack_loss, ima.boundary_bracket, ima.random_start) == \
        (0.5, "batch", None, "final", True)
    assert (dpaat.eps, dpaat.eps_min, dpaat.eps_max, dpaat.quantile, dpaat.momentum, dpaat.beta) == \
        (0.5, 0.0, 3.0, 0.5, 0.5, 0.5)
    for name, beta in (("trades", 6.0), ("mart", 6.0)):
        cfg = method_config(name=name)
        assert (cfg.eps, cfg.beta, cfg.attack_bn) == (0.5, beta, "running")
    assert method_config(name="pgd_at").attack_loss == "ce"
    assert method_knobs("standard", steps=2, eps=0.3) == {"name": "standard"}
    assert method_knobs("ima", steps=2, eps=0.3) == {"name": "ima", "steps": 2}
    with pytest.raises(ValidationError):
        method_config(name="pgd_at", delta=0.1)


def test_set_method_name_override(tmp_path):
    path = tmp_path / "plain.yaml"
    path.write_text(yaml.safe_dump(BASE))
    cfg = load_config(path, ["method.name=pgd_at", "method.eps=0.25"])
    assert isinstance(cfg.method, PGDAT.config_class) and cfg.method.eps == 0.25
    ima = REPO / "configs" / "dermamnist_ima.yaml"
    with pytest.raises(InputError, match=r"method\.delta: unknown key for method 'pgd_at'"):
        load_config(ima, ["method.name=pgd_at"])          # IMA's knobs are not PGD-AT's
    assert load_config(ima, ["method={name: pgd_at, eps: 0.5}"]).method.name == "pgd_at"


def test_dice_threshold_is_one_top_level_key_read_by_build_task():
    cfg = config_from_dict({**BASE, "task": "segmentation", "dice_threshold": 0.7})
    task = cfg.build_task(3)
    assert isinstance(task, Segmentation) and task.dice_threshold == 0.7
    assert isinstance(config_from_dict(BASE).build_task(3), Classification)
    assert _problems({**BASE, "dice_threshold": 0.0})[0].startswith("x.yaml: dice_threshold: Input should be greater")
    seg, cls = cfg.resolved(), config_from_dict(BASE).resolved()
    assert used_params(seg)["dice_threshold"] == 0.7 and "dice_threshold" not in used_params(cls)


def test_every_config_and_study_file_loads():
    from pipeline.study.spec import Study

    for path in sorted((REPO / "configs").glob("*.yaml")):
        cfg = load_config(path)
        assert "dice_threshold" not in cfg.resolved()["method"], path
    for path in sorted((REPO / "studies").glob("*.yaml")):
        assert Study(path).configs, path


def test_a_checkpoint_config_of_the_flat_layout_still_loads():
    old = {**BASE, "task": "segmentation",
           "method": {"name": "ima", "norm": "L2", "eps": 0.5, "steps": 4, "alpha": 4.0, "beta": None, "delta": 0.1,
                      "eps_max": 2.0, "eps_min": 0.0, "bisection_steps": 3, "dice_threshold": 0.7, "quantile": 0.5,
                      "momentum": 0.5, "attack_loss": None, "attack_bn": None, "boundary_bracket": "final",
                      "random_start": True}}
    cfg = stored_config(old)
    assert cfg.dice_threshold == 0.7 and cfg.method == method_config(name="ima", steps=4, delta=0.1, eps_max=2.0,
                                                                      bisection_steps=3)
    assert stored_config(cfg.resolved()) == cfg
    with pytest.raises(InputError, match="method.dice_threshold"):
        config_from_dict(old)                      # a user's file gets the error, not the migration


def test_from_config_builds_state_and_attack_settings_once():
    ima = build_method(method_config(name="ima", delta=0.2), Classification(), 5, clamp=(0, 1))
    assert isinstance(ima, IMA) and torch.equal(ima.state.eps, torch.full((5,), 0.2))
    assert isinstance(ima.attack, BoundaryPGD) and ima.attack.bracket == "final"
    assert ima.attack.loss == "slm" and ima.attack.bn == "batch"
    assert ima.attack.clamp == (0.0, 1.0)
    assert build_method(method_config(name="ima"), Segmentation(2), 2).attack.loss == "ce"
    with pytest.raises(FrozenInstanceError):
        ima.attack.steps = 3                                           # read-only
    dpaat = DPAAT.from_config(method_config(name="dpaat", eps=5.0, eps_min=0.5, eps_max=3.0), Classification(), 3)
    assert torch.equal(dpaat.state.eps, torch.full((3,), 3.0))      # the starting radius, clipped
    dpaat = build_method(method_config(name="dpaat", eps=0.1, eps_min=0.5, eps_max=3.0), Classification(), 3)
    assert torch.equal(dpaat.state.eps, torch.full((3,), 0.5))
    trades = build_method(method_config(name="trades", random_start=True), Classification(), 3)
    assert isinstance(trades.attack, TradesKL) and trades.attack.random_start == 0.001 and trades.attack.loss == "kl"
    standard = build_method(method_config(), Classification(), 3)
    assert isinstance(standard, Standard) and standard.state is None


class ToyConfig(BaseMethodConfig):
    """A throwaway method's config, as its own file would define it."""

    name: Literal["toy_scaled"] = "toy_scaled"
    scale: float = Field(default=2.0, gt=0.0, description="the clean loss is multiplied by this")


def test_a_method_added_in_one_file_is_registered_and_loadable():
    before = dict(METHODS)
    try:
        class ToyScaled(Method):
            config_class = ToyConfig

            def loss(self, model, inputs, targets, index, roi=None):
                pred = model(inputs)
                return MethodOutput(loss=self.cfg.scale * self.task.per_sample_loss(pred, targets, roi).mean(),
                                    pred=pred)

        assert METHODS["toy_scaled"] is ToyScaled and ToyScaled.name == "toy_scaled"
        cfg = config_from_dict({**BASE, "method": {"name": "toy_scaled", "scale": 3.0}})
        assert isinstance(cfg.method, ToyConfig) and cfg.method.scale == 3.0
        assert cfg.resolved()["method"] == {"name": "toy_scaled", "scale": 3.0}
        method = build_method(cfg.method, cfg.build_task(2), n_train=4)
        assert isinstance(method, ToyScaled) and method.state is None
        model, x, y = torch.nn.Linear(3, 2), torch.rand(4, 3), torch.tensor([0, 1, 1, 0])
        out = method.loss(model, x, y, torch.arange(4))
        torch.testing.assert_close(out.loss, 3.0 * torch.nn.functional.cross_entropy(model(x), y))
        assert method_config(name="toy_scaled").scale == 2.0
        assert _problems({**BASE, "method": {"name": "toy_scaled", "scal": 1.0}}) == [
            "x.yaml: method.scal: unknown key for method 'toy_scaled' (did you mean method.scale?)"]
        with pytest.raises(TypeError, match="defined twice"):
            class Again(Method):
                config_class = ToyConfig

                def loss(self, model, inputs, targets, index, roi=None): ...
    finally:
        METHODS.clear()
        METHODS.update(before)
    assert "toy_scaled" not in METHODS
    assert _problems({**BASE, "method": {"name": "toy_scaled"}})[0].startswith("x.yaml: method.name: Input should")


def test_a_config_class_without_its_name_is_refused():
    class Nameless(BaseMethodConfig):
        name: str = ""

    with pytest.raises(TypeError, match="needs its method's name"):
        class Broken(Method):
            config_class = Nameless

            def loss(self, model, inputs, targets, index, roi=None): ...
    assert "" not in METHODS


def test_adversarial_package_never_imports_the_config():
    for path in (REPO / "pipeline" / "adversarial").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = [node.module or ""] if isinstance(node, ast.ImportFrom) else \
                [a.name for a in node.names] if isinstance(node, ast.Import) else []
            assert not any(n == "pipeline.config" or n.startswith("pipeline.config.") for n in names), path
