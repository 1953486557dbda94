"""``medrobust evaluate`` end to end: train a tiny run, evaluate it by run id, everything in the same MLflow run."""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import pytest

from evaluation_toys import reset_mlflow_global, train_and_evaluate

from pipeline.config import config_from_dict
from pipeline.errors import InputError

EXPECTED_FILES = {"summary.json", "metrics.csv", "metrics.json", "curves.json", "robustness_curves.png",
                  "per_sample.csv", "stratified.csv", "stratified.json", "stratified.png", "margins.csv",
                  "margin_l2.png", "margin_linf.png", "gradcam"}


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("eval-run")
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    with pytest.MonkeyPatch.context() as mp:
        reset_mlflow_global()
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        trained, ev, raw = train_and_evaluate(tmp)
        yield uri, trained, ev, raw, tmp
        reset_mlflow_global()


def test_metrics_and_artifacts_land_in_the_training_run(evaluated):
    uri, trained, ev, _, _ = evaluated
    assert ev.run_id == trained.run_id
    client = mlflow.MlflowClient(uri)
    run = client.get_run(trained.run_id)
    metrics = run.data.metrics
    for name in ["eval/clean/accuracy", "eval/clean/balanced_accuracy", "eval/clean/auc_macro",
                 "eval/clean/mean_ap", "eval/pgd_l2/accuracy_at_0.5", "eval/pgd_l2/accuracy_at_2",
                 "eval/pgd_linf/accuracy_at_0.03", "eval/fgsm_l2/accuracy_at_0.5", "eval/noise_l2/accuracy_at_2",
                 "eval/pgd_l2/auc_norm", "eval/margin_l2/p50", "eval/margin_linf/p90"]:
        assert name in metrics, name
        assert metrics[name] == pytest.approx(ev.metrics[name])
    assert "val_accuracy" in metrics                           # the training metrics are still there
    assert metrics["eval/pgd_l2/accuracy_at_2"] <= metrics["eval/clean/accuracy"]
    assert run.data.tags["medrobust.evaluated"] == "true"
    files = {Path(f.path).name for f in client.list_artifacts(trained.run_id, "evaluation")}
    assert EXPECTED_FILES <= files
    panels = client.list_artifacts(trained.run_id, "evaluation/gradcam")
    assert len(panels) >= 2


def test_local_files_match_what_was_logged(evaluated):
    _, _, ev, raw, _ = evaluated
    summary = json.loads((ev.output_dir / "summary.json").read_text())
    assert summary["settings"]["samples"] == raw["evaluate"]["max_samples"]
    assert summary["metrics"]["eval/clean/accuracy"] == pytest.approx(ev.metrics["eval/clean/accuracy"])
    per_sample = (ev.output_dir / "per_sample.csv").read_text().splitlines()
    assert len(per_sample) == 1 + raw["evaluate"]["max_samples"]
    stratified = (ev.output_dir / "stratified.csv").read_text()
    assert "sex," in stratified and "localization," in stratified and "age_band," in stratified


def test_evaluating_a_checkpoint_file_logs_into_its_run(evaluated, monkeypatch):
    uri, trained, _, raw, _ = evaluated
    from pipeline.evaluation.run import evaluate

    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    raw = {**raw, "evaluate": {**raw["evaluate"], "norms": ["Linf"], "margin": False, "gradcam_per_class": 0,
                               "fgsm": False, "noise": False, "max_samples": 4}}
    ev = evaluate(config_from_dict(raw), checkpoint=str(trained.checkpoint))
    assert ev.run_id == trained.run_id
    assert set(ev.result.families()) == {"pgd_linf"}


def test_unknown_run_id_is_an_input_error(evaluated, monkeypatch):
    uri, _, _, raw, _ = evaluated
    from pipeline.evaluation.run import evaluate

    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    with pytest.raises(InputError, match="--run-id 0123456789abcdef: no such MLflow run"):
        evaluate(config_from_dict(raw), run_id="0123456789abcdef")


def test_run_id_latest_picks_the_newest_finished_run_of_the_method(evaluated, monkeypatch):
    uri, trained, _, raw, _ = evaluated
    from pipeline.evaluation.run import latest_run_id

    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    client = mlflow.MlflowClient(uri)
    assert latest_run_id(client, config_from_dict(raw)) == trained.run_id
    other = {**raw, "method": {**raw["method"], "name": "dpaat"}}
    with pytest.raises(InputError) as err:
        latest_run_id(client, config_from_dict(other))
    assert str(err.value.problems[0]).startswith(
        f"--run-id latest: no finished 'dpaat' run in MLflow experiment '{raw['experiment']}'")
