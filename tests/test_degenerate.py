"""A degenerate model (one class everywhere, chance-level balanced accuracy, empty or full masks) is flagged in the
evaluation summary, in MLflow and in the report, instead of looking robust."""

from __future__ import annotations

import json

import mlflow
import numpy as np
import pytest
from deploy_toys import QUICK_EVAL, one_class_npz

from pipeline.config import config_from_dict
from pipeline.evaluation.degenerate import (classification_verdict, near_chance, segmentation_verdict,
                                            verdict_from_metrics)

NAMES = ["akiec", "bcc", "bkl", "df", "mel", "nv", "vasc"]


def test_one_class_for_every_image_is_degenerate():
    labels = np.arange(14) % 7
    verdict = classification_verdict(np.full(14, 5), labels, NAMES)
    assert verdict.degenerate
    assert verdict.reason == "predicts 'nv' for 100% of 14 images (balanced accuracy 0.14, chance 0.14)"
    assert verdict.cell.startswith("DEGENERATE: predicts 'nv'")


def test_a_model_that_separates_the_classes_is_not():
    labels = np.arange(20) % 4
    preds = labels.copy()
    preds[:3] = (preds[:3] + 1) % 4       # 17 of 20 right, every class predicted
    assert not classification_verdict(preds, labels)
    assert classification_verdict(preds, labels).cell == "no"


def test_balanced_accuracy_near_chance_is_degenerate_even_without_one_dominant_class():
    labels = np.array([0] * 10 + [1] * 10)
    preds = np.array([0, 1] * 10)          # half right in each class: balanced accuracy 0.50 = chance
    verdict = classification_verdict(preds, labels)
    assert verdict.degenerate and verdict.reason == "balanced accuracy 0.50, chance 0.50 on 2 classes"
    assert near_chance(0.52, 2) and not near_chance(0.53, 2)     # chance + 5% of the way to perfect: 0.525
    assert near_chance(0.185, 7) and not near_chance(0.19, 7)    # 1/7 + 0.05 * 6/7 = 0.1857


def test_masks_empty_or_full_almost_everywhere():
    assert segmentation_verdict([0.0] * 19 + [0.2]).reason == "19 of 20 predicted masks empty"
    assert segmentation_verdict([0.0] * 10 + [1.0] * 10).reason == \
        "10 of 20 predicted masks empty and 10 of 20 predicted masks full"
    assert not segmentation_verdict([0.0] * 18 + [0.2, 0.3])      # 90% empty: not "almost every"


def test_runs_evaluated_before_the_tag_existed_are_judged_by_their_metrics():
    recalls = {f"eval/clean/recall/{n}": 0.0 for n in NAMES}
    assert verdict_from_metrics({"eval/clean/balanced_accuracy": 1 / 7, **recalls}).degenerate
    assert not verdict_from_metrics({"eval/clean/balanced_accuracy": 0.6, **recalls})
    assert verdict_from_metrics({}, {"medrobust.degenerate": "no"}).degenerate is False
    assert verdict_from_metrics({}, {"medrobust.degenerate": "why"}).reason == "why"


@pytest.fixture(scope="module")
def one_class_run(tmp_path_factory):
    """Trained on images that are all labelled class 0, evaluated on four classes, in a fresh MLflow store."""
    from pipeline.engine.run import train
    from pipeline.evaluation.run import evaluate

    tmp = tmp_path_factory.mktemp("one-class")
    raw = {"experiment": "one-class", "task": "classification", "seed": 0,
           "data": {"source": "medmnist", "root": str(one_class_npz(tmp / "toyderm.npz")), "cache": "none"},
           "model": {"name": "small_cnn", "channels": [8, 16]}, "method": {"name": "standard"},
           "train": {"epochs": 2, "batch_size": 16, "lr": 0.01, "device": "cpu", "progress": False,
                     "output_dir": str(tmp / "run")},
           "tracking": {"run_name": "one-class", "log_model": False}, "evaluate": dict(QUICK_EVAL)}
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp / 'mlflow.db'}")
        trained = train(config_from_dict(raw))
        yield trained, evaluate(config_from_dict(raw), run_id=trained.run_id), tmp
        mlflow.set_tracking_uri(None)


def test_evaluation_summary_flags_the_one_class_model(one_class_run, capsys):
    trained, ev, _ = one_class_run
    assert ev.verdict.degenerate
    assert ev.verdict.reason.startswith("predicts 'class_0' for 100% of 24 images")
    assert ev.metrics["eval/clean/accuracy"] == pytest.approx(0.25)              # 6 of 24 are class 0
    assert ev.metrics["eval/clean/balanced_accuracy"] == pytest.approx(0.25)
    assert ev.metrics["eval/clean/degenerate"] == 1.0
    summary = json.loads((ev.output_dir / "summary.json").read_text())
    assert summary["degenerate"] == {"flag": True, "reason": ev.verdict.reason}
    from pipeline.evaluation.run import format_summary

    text = format_summary(ev.result, ev.metrics, ev.verdict)
    lines = text.splitlines()
    assert lines[0].endswith("DEGENERATE") and "balanced_accuracy 0.2500" in lines[0]
    assert any(line.startswith("pgd_l2       balanced_accuracy: eps=0.5: 0.") for line in lines)
    assert lines[-1].startswith("WARNING: degenerate model: predicts 'class_0' for 100% of 24 images")
    run = mlflow.MlflowClient(trained.tracking_uri).get_run(trained.run_id)
    assert run.data.tags["medrobust.degenerate"] == ev.verdict.reason


def test_report_flags_the_one_class_model_in_its_row_and_a_warning(one_class_run, capsys):
    from pipeline.evaluation.report import report

    trained, ev, tmp = one_class_run
    capsys.readouterr()
    rep = report("one-class", out=tmp / "report", tracking_uri=trained.tracking_uri)
    row = rep.table.set_index("method").loc["standard"]
    assert row["degenerate"] == f"DEGENERATE: {ev.verdict.reason}"
    assert row["pgd_l2 balanced_accuracy @0.5"] <= 0.25                        # beside the accuracy
    columns = list(rep.table.columns)
    assert columns.index("pgd_l2 balanced_accuracy @0.5") == columns.index("pgd_l2 accuracy @0.5") + 1
    warning = f"WARNING: one-class (standard) is a degenerate model: {ev.verdict.reason}"
    assert warning in capsys.readouterr().out
    assert warning in (tmp / "report" / "report.md").read_text()
    assert "is a degenerate model" in (tmp / "report" / "report.html").read_text()


def test_study_table_flags_the_one_class_model(one_class_run, tmp_path):
    from pipeline.study.table import VariantResult, read_metrics, write_results

    _, ev, _ = one_class_run       # what a study keeps of a variant's evaluation: its metrics.csv and verdict
    variant = VariantResult("one-class", "standard", read_metrics(ev.output_dir / "metrics.csv"), 1.0, 1.0,
                            degenerate=ev.verdict.reason if ev.verdict else None)
    written = write_results(tmp_path / "study", "one class", "protocol", [variant], "classification")
    assert written.table.iloc[0]["degenerate"] == f"DEGENERATE: {ev.verdict.reason}"
    assert written.warnings == [f"warning: variant 'one-class' looks degenerate: {ev.verdict.reason}"]
    assert written.warnings[0] in (tmp_path / "study" / "results.md").read_text()

def test_a_segmenter_that_predicts_empty_masks_is_flagged(shared_data, tmp_path, mlflow_uri):
    import torch

    from deploy_toys import untrained_checkpoint
    from pipeline.model.checkpoint import save_checkpoint
    from pipeline.evaluation.run import evaluate, format_summary

    raw = {"experiment": "empty-masks", "task": "segmentation",
           "data": {"source": "isic2017", "root": str(shared_data / "isic2017"), "image_size": [32, 32],
                    "limit": 4, "cache": "none"},
           "model": {"name": "unet", "channels": [4, 8]},
           "train": {"device": "cpu", "output_dir": str(tmp_path / "eval")},
           "evaluate": {**QUICK_EVAL, "max_samples": 4, "batch_size": 4}}
    cfg, _ = untrained_checkpoint(raw, tmp_path / "seg.pt")
    ckpt = torch.load(tmp_path / "seg.pt", weights_only=True)
    for key, value in ckpt["network"].items():   # every weight 0: the output is the last bias, background wins
        if value.is_floating_point():
            value.fill_(1.0 if key.endswith("running_var") else 0.0)
    last_bias = [k for k, v in ckpt["network"].items() if k.endswith("bias") and tuple(v.shape) == (2,)][-1]
    ckpt["network"][last_bias][0] = 1.0
    save_checkpoint(tmp_path / "seg.pt", ckpt)
    ev = evaluate(cfg, checkpoint=str(tmp_path / "seg.pt"))
    assert ev.verdict.reason == "4 of 4 predicted masks empty"
    summary = format_summary(ev.result, ev.metrics, ev.verdict).splitlines()
    assert summary[0].startswith("clean        dice ") and summary[0].endswith("DEGENERATE")
    assert summary[-1].startswith("WARNING: degenerate model: 4 of 4 predicted masks empty")
