"""``medrobust train`` end to end on small synthetic data: the MLflow run's contents, resume bit-for-bit."""

from __future__ import annotations

import math

import mlflow
import pytest
import torch

from pipeline.config import config_from_dict, method_knobs
from pipeline.model.checkpoint import load_checkpoint
from pipeline.engine.run import train


def tiny_config(tmp_path, method: str = "ima", epochs: int = 2, **train_extra) -> dict:
    return {
        "experiment": "tiny",
        "task": "classification",
        "seed": 3,
        "data": {"source": "synthetic", "synthetic_size": 96, "cache": "none"},
        "model": {"name": "small_cnn", "channels": [8, 16]},
        "method": method_knobs(method, steps=3, delta=0.1, eps_max=1.0, eps=0.3, bisection_steps=4),
        "train": {"epochs": epochs, "batch_size": 16, "lr": 0.01, "device": "cpu", "progress": False,
                  "deterministic": True, "output_dir": str(tmp_path / "out"), **train_extra},
        "tracking": {"run_name": f"tiny-{method}"},
    }


def test_training_run_is_complete_in_mlflow(tmp_path, mlflow_uri):
    cfg = config_from_dict(tiny_config(tmp_path, "ima"))
    result = train(cfg)
    client = mlflow.MlflowClient(mlflow_uri)
    run = client.get_run(result.run_id)
    assert run.info.status == "FINISHED"
    params, tags = run.data.params, run.data.tags
    assert params["method.name"] == "ima" and params["train.epochs"] == "2" and params["data.source"] == "synthetic"
    assert tags["medrobust.method"] == "ima" and tags["medrobust.task"] == "classification"
    assert tags["medrobust.dataset"] == "synthetic" and len(tags["medrobust.commit"]) > 0
    for key in ["train_clean_loss", "train_loss", "val_accuracy", "val_balanced_accuracy", "eps_mean",
                "eps_p50", "epoch_time_s"]:
        history = client.get_metric_history(result.run_id, key)
        assert [m.step for m in history] == [1, 2], key
    eps_mean = client.get_metric_history(result.run_id, "eps_mean")[-1].value
    assert eps_mean == pytest.approx(float(result.state["eps"].mean()), rel=1e-6)
    top = {a.path for a in client.list_artifacts(result.run_id)}
    assert {"config.yaml", "checkpoints", "eps_histograms", "adversarial_grids"} <= top
    models = mlflow.search_logged_models(experiment_ids=[run.info.experiment_id], output_format="list",
                                         filter_string=f"source_run_id = '{result.run_id}'")
    assert len(models) == 1 and models[0].name == "model"
    loaded = mlflow.pytorch.load_model(models[0].model_uri)
    assert tuple(loaded(torch.rand(2, 3, 32, 32)).shape) == (2, 4)
    ckpts = {a.path for a in client.list_artifacts(result.run_id, "checkpoints")}
    best_epoch = load_checkpoint(result.output_dir / "checkpoints" / "best.pt")["epoch"]   # logged if not the last
    assert ckpts == {"checkpoints/last.pt"} | ({"checkpoints/best.pt"} if best_epoch != 2 else set())
    hists = [a.path for a in client.list_artifacts(result.run_id, "eps_histograms")]
    assert len(hists) == 2
    local = client.download_artifacts(result.run_id, "checkpoints/last.pt", str(tmp_path / "dl"))
    ckpt = load_checkpoint(local)
    assert ckpt["epoch"] == 2 and ckpt["mlflow_run_id"] == result.run_id
    torch.testing.assert_close(ckpt["method_state"]["eps"], result.state["eps"], rtol=0, atol=0)


@pytest.mark.parametrize("method", ["ima", "dpaat"])
def test_resume_restores_state_bit_for_bit(tmp_path, mlflow_uri, method):
    full = train(config_from_dict(tiny_config(tmp_path / "full", method, epochs=3)))
    first = train(config_from_dict(tiny_config(tmp_path / "part", method, epochs=2)))
    resumed = train(config_from_dict(tiny_config(tmp_path / "part", method, epochs=3)),
                    resume=str(first.checkpoint))
    assert resumed.run_id == first.run_id  # the same MLflow run continues
    a, b = load_checkpoint(full.checkpoint), load_checkpoint(resumed.checkpoint)
    assert a["epoch"] == b["epoch"] == 3
    for key in a["method_state"]:
        if isinstance(a["method_state"][key], torch.Tensor):
            torch.testing.assert_close(a["method_state"][key], b["method_state"][key], rtol=0, atol=0,
                                       equal_nan=True, msg=key)
    for key in a["network"]:
        torch.testing.assert_close(a["network"][key], b["network"][key], rtol=0, atol=0, msg=key)
    history = mlflow.MlflowClient(mlflow_uri).get_metric_history(first.run_id, "eps_mean")
    assert [m.step for m in history] == [1, 2, 3]


def test_learning_rate_is_logged_every_epoch(tmp_path, mlflow_uri):
    """``lr``: the rate each epoch trained with, one value per epoch; cosine annealing over 3 epochs steps it
    after every epoch (before the epoch's checkpoint, which holds the stepped scheduler)."""
    cfg = config_from_dict(tiny_config(tmp_path, "standard", epochs=3, scheduler="cosine"))
    result = train(cfg)
    history = mlflow.MlflowClient(mlflow_uri).get_metric_history(result.run_id, "lr")
    assert [m.step for m in history] == [1, 2, 3]
    expected = [0.01 * (1 + math.cos(math.pi * e / 3)) / 2 for e in range(3)]   # 0.01, 0.0075, 0.0025
    assert [m.value for m in history] == pytest.approx(expected, rel=1e-9)
    assert load_checkpoint(result.checkpoint)["scheduler"]["last_epoch"] == 3
