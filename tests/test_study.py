"""``medrobust study``: study files, the comparison table and its checks, and a study killed mid-variant.

The end-to-end test runs a two-variant study on the built-in synthetic data through the real CLI in a
subprocess, kills it with SIGKILL while the second variant trains, runs it again (in this process) and
checks that the finished variant was not retrained, the interrupted one continued its own MLflow run, and
the MLflow parent run holds both children and the table.
"""

from __future__ import annotations

import copy
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pandas as pd
import pytest
import yaml

from pipeline.cli import main
from pipeline.model.checkpoint import load_checkpoint
from pipeline.errors import InputError
from pipeline.study.checks import protocol_checks
from pipeline.study.run import _epochs_done
from pipeline.study.spec import Study, config_digest
from pipeline.study.table import VariantResult, per_class_recall, recall_wide, results_table, write_results

REPO = Path(__file__).resolve().parents[1]

BASE = {
    "experiment": "study-test", "task": "classification", "seed": 3,
    "data": {"source": "synthetic", "synthetic_size": 32, "image_size": [16, 16], "cache": "none"},
    "model": {"name": "small_cnn", "channels": [4, 8]},
    "train": {"epochs": 1, "batch_size": 8, "lr": 0.01, "device": "cpu", "progress": False},
    "tracking": {"log_model": False},
}
PROTOCOL = {"norms": ["L2"], "eps_l2": [0.5, 2.0], "steps": 2, "losses": ["ce"], "fgsm": False, "noise": True,
            "margin": False, "gradcam_per_class": 0, "stratify": ["label"], "batch_size": 16}


def write_study(tmp: Path, study: dict, base: dict | None = None) -> Path:
    (tmp / "base.yaml").write_text(yaml.safe_dump(base or BASE))
    path = tmp / "study.yaml"
    path.write_text(yaml.safe_dump({"name": "tiny", "base": "base.yaml", "output_dir": str(tmp / "out"), **study},
                                   sort_keys=False))
    return path


# -- study files -------------------------------------------------------------------------------------------
def test_variants_resolve_from_base_shared_protocol_and_their_own_overrides(tmp_path):
    path = write_study(tmp_path, {"set": {"train.epochs": 2, "model.channels": [4, 8, 16]},
                                  "evaluate": {"steps": 7, "eps_l2": [1.0]},
                                  "variants": {"plain": None, "madry": {"method.name": "pgd_at", "method.eps": 0.25}}})
    study = Study(path)
    assert list(study.configs) == ["plain", "madry"]
    plain, madry = study.configs["plain"], study.configs["madry"]
    assert (plain.method.name, madry.method.name, madry.method.eps) == ("standard", "pgd_at", 0.25)
    assert plain.train.epochs == madry.train.epochs == 2 and madry.model.channels == [4, 8, 16]
    assert plain.evaluate == madry.evaluate and madry.evaluate.steps == 7 and madry.evaluate.eps_l2 == [1.0]
    assert madry.train.output_dir == tmp_path / "out" / "madry"
    assert (madry.tracking.experiment, madry.tracking.run_name) == ("study-tiny", "madry")
    # the digest ignores tracking (the parent run id is known only at run time), not what changes a result
    before = config_digest(madry.resolved())
    madry.tracking.parent_run_id = "abc"
    assert config_digest(madry.resolved()) == before
    madry.method.eps = 0.5
    assert config_digest(madry.resolved()) != before


@pytest.mark.parametrize(("study", "expected"), [
    ({"variants": {"a": {}}, "epochs": 3}, "study.yaml: epochs: unknown key"),
    ({"variants": {}}, "study.yaml: variants: Dictionary should have at least 1 item"),
    ({"variants": {"a": {"method.epz": 0.5}}}, "study.yaml: variants.a: method.epz: unknown key"),
    ({"variants": {"a": {"evaluate.steps": 5}}},
     "study.yaml: variants.a: evaluate.steps: set by the study (the protocol goes in its evaluate: section"),
    ({"variants": {"a/b": {}}}, "study.yaml: variants.a/b: a variant name is a folder name"),
    ({"evaluate": {"stepz": 5}, "variants": {"a": {}}}, "with set/evaluate): evaluate.stepz: unknown key"),
    ({"set": {"method.name": "fgsm_at"}, "variants": {"a": {}}}, "with set/evaluate): method.name: Input should be"),
])
def test_bad_study_files_name_the_file_and_key(tmp_path, study, expected):
    path = write_study(tmp_path, study)
    with pytest.raises(InputError) as err:
        Study(path)
    assert len(err.value.problems) == 1
    assert expected in err.value.problems[0]
    assert str(path) in err.value.problems[0]


def test_cli_reports_a_bad_study_in_one_line_with_exit_code_2(tmp_path, capsys):
    path = write_study(tmp_path, {"variants": {"a": {"method.epz": 0.5}}})
    assert main(["study", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"medrobust: error: {path}: variants.a: method.epz: unknown key")
    assert main(["study", str(tmp_path / "absent.yaml")]) == 2
    assert capsys.readouterr().err.strip() == f"medrobust: error: {tmp_path / 'absent.yaml'}: study file not found"


def test_a_checkpoint_of_the_last_epochs_end_counts_as_finished_training(tmp_path):
    cfg = Study(write_study(tmp_path, {"set": {"train.epochs": 2, "train.batch_size": 8},
                                       "variants": {"a": None}})).configs["a"]
    ckpt = {"epoch": 2, "iteration": 10, "data": {"n_train": 40}}          # 5 iterations per epoch
    assert _epochs_done(ckpt, cfg)
    assert not _epochs_done({**ckpt, "iteration": 9}, cfg)                # mid-way through the last epoch
    assert not _epochs_done({**ckpt, "epoch": 1, "iteration": 5}, cfg)


# -- the comparison ----------------------------------------------------------------------------------------
def metrics_frame(clean: float, pgd: list[float], noise: list[float], recall: dict[str, list[float]]) -> pd.DataFrame:
    """A long metrics table as ``evaluate`` writes it, eps 0.5 and 2 under L2, plain numbers."""
    rows = [("clean", "", 0.0, "accuracy", clean), ("clean", "", 0.0, "balanced_accuracy", clean - 0.1),
            ("clean", "", 0.0, "auc_macro", 0.9)]
    for attack, values in (("pgd", pgd), ("noise", noise)):
        for eps, value in zip((0.5, 2.0), values, strict=True):
            rows += [(attack, "L2", eps, "accuracy", value), (attack, "L2", eps, "balanced_accuracy", value / 2)]
        area = (clean + values[0]) / 8 + (values[0] + values[1]) * 3 / 8   # trapezoids over [0, 0.5, 2], / 2
        rows.append((attack, "L2", float("nan"), "accuracy_auc_norm", area))
    for name, values in recall.items():
        rows.append(("clean", "", 0.0, f"recall/{name}", values[0]))
        rows += [("pgd", "L2", eps, f"recall/{name}", v) for eps, v in zip((0.5, 2.0), values[1:], strict=True)]
    return pd.DataFrame(rows, columns=["attack", "norm", "eps", "metric", "value"])


def test_results_table_and_per_class_recall_hold_each_variants_numbers(tmp_path):
    std = VariantResult("std", "standard", metrics_frame(0.8, [0.3, 0.02], [0.78, 0.7],
                                                         {"nevus": [0.9, 0.4, 0.0], "mel": [0.5, 0.1, 0.1]}), 61.4, 9.6)
    ima = VariantResult("ima", "ima", metrics_frame(0.7, [0.6, 0.4], [0.7, 0.69],
                                                    {"nevus": [0.8, 0.7, 0.5], "mel": [0.4, 0.3, 0.2]}), 300.2, 10.0,
                        degenerate="predicts 'nevus' for 97% of 100 images")
    table = results_table([std, ima], "classification")
    assert list(table.columns) == [
        "variant", "method", "clean accuracy", "clean bal_acc", "clean AUC", "PGD-L2 acc@0.5", "PGD-L2 bal_acc@0.5",
        "PGD-L2 acc@2", "PGD-L2 bal_acc@2", "PGD-L2 AUC_norm", "noise-L2 acc@2", "noise-L2 AUC_norm",
        "train s", "eval s", "total s", "degenerate"]
    row = table.iloc[0]
    assert (row["clean accuracy"], row["clean bal_acc"], row["PGD-L2 acc@2"], row["PGD-L2 bal_acc@0.5"]) == \
        pytest.approx((0.8, 0.7, 0.02, 0.15))
    assert row["PGD-L2 AUC_norm"] == pytest.approx((0.8 + 0.3) / 8 + (0.3 + 0.02) * 3 / 8)
    assert row["noise-L2 acc@2"] == pytest.approx(0.7)
    assert (row["train s"], row["eval s"], row["total s"]) == (61, 10, 71)
    assert row["degenerate"] == "no"
    assert table.iloc[1]["degenerate"] == "DEGENERATE: predicts 'nevus' for 97% of 100 images"

    written = write_results(tmp_path, "study t", "Protocol: hand-made", [std, ima], "classification")
    assert [f.name for f in written.files] == ["results.md", "results.csv", "robustness_curves.png",
                                               "per_class_recall.csv", "per_class_recall.md"]
    assert all(f.stat().st_size > 0 for f in written.files)
    assert written.warnings == ["warning: variant 'ima' looks degenerate: predicts 'nevus' for 97% of 100 images"]
    md = (tmp_path / "results.md").read_text()
    assert "> warning: variant 'ima' looks degenerate" in md and "| ima | ima | 0.7000 |" in md
    assert "- PASS standard model broken: 'std' accuracy 0.0200 under PGD L2 eps 2 (at most 0.05)" in md

    wide = recall_wide(per_class_recall([std, ima]))
    assert list(wide.columns) == ["variant", "condition", "nevus", "mel"]
    assert wide["condition"].tolist() == ["clean", "PGD-L2@0.5", "PGD-L2@2"] * 2
    assert wide.iloc[2][["nevus", "mel"]].tolist() == pytest.approx([0.0, 0.1])
    assert wide.iloc[4][["nevus", "mel"]].tolist() == pytest.approx([0.7, 0.3])


def test_protocol_checks_pass_and_fail_with_the_numbers():
    def row(name, method, clean, pgd, noise):
        return {"variant": name, "method": method, "clean": clean,
                "curves": {("pgd", "L2"): [(0.5, pgd[0]), (2.0, pgd[1])],
                           ("noise", "L2"): [(0.5, noise[0]), (2.0, noise[1])]}}
    good = protocol_checks([row("std", "standard", 0.8, [0.3, 0.04], [0.8, 0.7]),
                            row("ima", "ima", 0.7, [0.69, 0.68], [0.7, 0.7])], "accuracy")
    assert good == [
        "PASS standard model broken: 'std' accuracy 0.0400 under PGD L2 eps 2 (at most 0.05)",
        "PASS no metric under attack above the clean one",
        "PASS noise weaker than PGD: 'std' L2 eps 2: noise costs 0.1000, PGD 0.7600 (noise at most 0.5 x PGD)",
        "n/a  noise weaker than PGD: 'ima' L2 eps 2: PGD costs only 0.0200"]
    bad = protocol_checks([row("std", "standard", 0.8, [0.3, 0.2], [0.81, 0.3])], "accuracy")
    assert bad[0] == "FAIL standard model broken: 'std' accuracy 0.2000 under PGD L2 eps 2 (at most 0.05)"
    assert bad[1] == "FAIL metric under attack above the clean one: std noise-L2@0.5 0.8100 > 0.8000"
    assert bad[2].startswith("FAIL noise weaker than PGD: 'std' L2 eps 2: noise costs 0.5000, PGD 0.6000")


# -- a study killed mid-variant, run again -----------------------------------------------------------------
def child_env(uri: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env.update(MLFLOW_TRACKING_URI=uri, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONPATH=str(REPO))
    return env


def kill_while_training(proc: subprocess.Popen, folder: Path, timeout: float = 120.0) -> dict:
    """SIGKILL ``proc`` as soon as ``folder`` holds a checkpoint of an unfinished training; that checkpoint."""
    state, last = folder / "variant.json", folder / "checkpoints" / "last.pt"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        if state.is_file() and last.is_file() and json.loads(state.read_text())["status"] == "training":
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.01)
    if proc.poll() is None and time.monotonic() >= deadline:
        proc.kill()
    output = proc.communicate(timeout=60)[0].decode(errors="replace")
    assert proc.returncode == -signal.SIGKILL, f"the study was not killed mid-variant:\n{output[-3000:]}"
    return load_checkpoint(last)


@pytest.mark.slow
def test_study_killed_mid_variant_resumes_without_retraining_what_finished(tmp_path, mlflow_uri, monkeypatch, capsys):
    epochs_b = 2
    path = write_study(tmp_path, {"evaluate": PROTOCOL, "variants": {
        "a": {"method.name": "standard"},
        "b": {"method.name": "pgd_at", "method.eps": 0.5, "method.steps": 3, "train.epochs": epochs_b,
              "train.checkpoint_every_iters": 1}}})
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "study", str(path)], cwd=tmp_path,
                            env=child_env(mlflow_uri), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    killed = kill_while_training(proc, out / "b")
    epoch_length = -(-killed["data"]["n_train"] // 8)
    assert killed["iteration"] < epochs_b * epoch_length                     # killed mid-variant
    state_a = (out / "a" / "variant.json").read_text()
    assert json.loads(state_a)["status"] == "evaluated"
    ckpt_a = (out / "a" / "checkpoints" / "last.pt").stat().st_mtime_ns

    monkeypatch.chdir(tmp_path)
    assert main(["study", str(path)]) == 0
    said = capsys.readouterr().out
    assert "study tiny [1/2] a: finished earlier with the same config" in said
    assert f"study tiny [2/2] b: resuming from {out / 'b' / 'checkpoints' / 'last.pt'}" in said

    # a: not retrained, not re-evaluated
    assert (out / "a" / "variant.json").read_text() == state_a
    assert (out / "a" / "checkpoints" / "last.pt").stat().st_mtime_ns == ckpt_a
    # b: continued its own MLflow run to the last epoch
    state_b = json.loads((out / "b" / "variant.json").read_text())
    assert (state_b["status"], state_b["attempts"]) == ("evaluated", 2)
    final_b = load_checkpoint(out / "b" / "checkpoints" / "last.pt")
    assert final_b["iteration"] == epochs_b * epoch_length
    assert state_b["run_id"] == final_b["mlflow_run_id"] == killed["mlflow_run_id"]

    client = mlflow.MlflowClient(mlflow_uri)
    parent_id = json.loads((out / "study.json").read_text())["parent_run_id"]
    parent = client.get_run(parent_id)
    assert parent.info.status == "FINISHED" and parent.data.tags["medrobust.kind"] == "study"
    runs = client.search_runs([parent.info.experiment_id])
    assert len(runs) == 3                                                    # parent + one run per variant
    children = client.search_runs([parent.info.experiment_id], f"tags.`mlflow.parentRunId` = '{parent_id}'")
    assert sorted(r.info.run_name for r in children) == ["a", "b"]
    assert {r.info.status for r in children} == {"FINISHED"}
    for child in children:
        assert {"eval/clean/accuracy", "eval/pgd_l2/accuracy_at_2", "study_train_s"} <= set(child.data.metrics)
    artifacts = {a.path for a in client.list_artifacts(parent_id)}
    assert {"results.md", "results.csv", "robustness_curves.png", "per_class_recall.csv"} <= artifacts

    table = pd.read_csv(out / "results.csv")
    assert table["variant"].tolist() == ["a", "b"] and table["method"].tolist() == ["standard", "pgd_at"]
    assert (table["PGD-L2 acc@2"] <= table["clean accuracy"]).all()
    by_name = {r.info.run_name: r.data.metrics for r in children}
    assert table["clean accuracy"].tolist() == pytest.approx([by_name["a"]["eval/clean/accuracy"],
                                                              by_name["b"]["eval/clean/accuracy"]])
    assert (table["train s"] >= 0).all() and "## Protocol checks" in (out / "results.md").read_text()


def test_a_variant_written_with_the_flat_method_section_keeps_its_digest(tmp_path):
    """Before the per-method config sections, a resolved config had one flat method section (every method's
    knobs, null for the method's default) and dice_threshold in it: read as today's config it has today's
    digest, so a study re-run does not retrain a variant whose settings did not change."""
    from pipeline.config import load_config
    from pipeline.study.spec import config_digest, stored_digest

    for name in ("pgd_at", "ima", "dpaat"):
        new = load_config(REPO / "configs" / f"dermamnist_{name}.yaml").resolved()
        old = copy.deepcopy(new)
        flat = {"name": name, "norm": "L2", "eps": 0.5, "steps": 10, "alpha": 4.0, "beta": None, "delta": 0.03,
                "eps_max": 3.0, "eps_min": 0.0, "bisection_steps": 10, "dice_threshold": old.pop("dice_threshold"),
                "quantile": 0.5, "momentum": 0.5, "attack_loss": None, "attack_bn": None,
                "boundary_bracket": "final", "random_start": True}
        flat.update({k: v for k, v in new["method"].items()})
        old["method"] = flat
        assert config_digest(old) != config_digest(new)
        assert stored_digest(old) == config_digest(new) == stored_digest(new)
        changed = copy.deepcopy(old)
        changed["method"]["steps"] = 3
        assert stored_digest(changed) != config_digest(new)
