"""``medrobust export --bundle``: a MONAI bundle that MONAI alone runs and that predicts what ``medrobust predict``
predicts; and the run's MLflow side: a loadable PyTorch model, the params it uses, its dataset, lean artifacts."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys

import mlflow
import numpy as np
import pytest
import torch
from deploy_toys import synthetic_raw, write_pngs
from monai.bundle import ConfigParser

from pipeline.config import ModelConfig, config_from_dict
from pipeline.model.network_def import network_def
from pipeline.model.networks import build_network

CASES = [("classification", "resnet18", 2, [28, 28]), ("classification", "resnet34", 2, [96, 96]),
         ("classification", "densenet121", 2, [64, 64]), ("classification", "small_cnn", 2, [28, 28]),
         ("segmentation", "unet", 3, [32, 32, 16]), ("segmentation", "segresnet", 2, [64, 64])]


@pytest.mark.parametrize(("task", "name", "dims", "size"), CASES)
def test_network_def_builds_the_training_network(task, name, dims, size):
    model = ModelConfig(name=name, channels=[8, 16] if name == "small_cnn" else None)
    kwargs = dict(task=task, spatial_dims=dims, in_channels=3, num_classes=4, image_size=size)
    ours = build_network(model, **kwargs).state_dict()
    theirs = ConfigParser({"net": network_def(model, **kwargs)}).get_parsed_content("net").state_dict()
    assert list(theirs) == list(ours)
    assert all(theirs[k].shape == ours[k].shape for k in ours)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    from pipeline.engine.run import train

    tmp = tmp_path_factory.mktemp("bundle")
    raw = synthetic_raw(tmp, "bundle")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp / 'mlflow.db'}")
        yield train(config_from_dict(raw)), tmp
        mlflow.set_tracking_uri(None)


def _csv(path):
    with open(path, newline="") as fh:
        return list(csv.reader(fh))


def test_bundle_runs_with_monai_alone_and_predicts_what_medrobust_predicts(trained):
    from pipeline.deploy.bundle import export_bundle
    from pipeline.deploy.predict import predict

    result, tmp = trained
    bundle = export_bundle(result.run_id, tmp / "bundle", tracking_uri=result.tracking_uri)
    assert bundle.monai_only and bundle.logged_to == result.run_id
    for part in ("configs/metadata.json", "configs/inference.json", "models/model.pt", "docs/README.md"):
        assert (tmp / "bundle" / part).is_file(), part
    meta = json.loads((tmp / "bundle" / "configs" / "metadata.json").read_text())
    image = meta["network_data_format"]["inputs"]["image"]
    assert (image["num_channels"], image["spatial_shape"], image["value_range"]) == (3, [32, 32], [0.0, 1.0])
    assert meta["network_data_format"]["outputs"]["pred"]["channel_def"] == {
        "0": "nevus", "1": "melanoma", "2": "keratosis", "3": "vascular"}
    assert meta["medrobust"]["method"] == "standard" and meta["required_packages_version"] == {}
    assert "training method: `standard`" in (tmp / "bundle" / "docs" / "README.md").read_text()
    logged = {f.path for f in mlflow.MlflowClient(result.tracking_uri).list_artifacts(result.run_id, "bundle/configs")}
    assert logged == {"bundle/configs/inference.json", "bundle/configs/metadata.json"}

    images = tmp / "images"
    write_pngs(images, 5)
    ours = predict(str(result.checkpoint), [str(images)], tmp / "ours", device="cpu")
    shadow = tmp / "shadow" / "pipeline"               # `import pipeline` fails in the bundle's process
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("raise ImportError('the bundle imported medrobust')\n")
    env = {**os.environ, "PYTHONPATH": str(tmp / "shadow")}
    probe = subprocess.run([sys.executable, "-c", "import pipeline"], cwd=tmp / "bundle", env=env,
                           capture_output=True, text=True)
    assert "the bundle imported medrobust" in probe.stderr
    run = subprocess.run([sys.executable, "-m", "monai.bundle", "run", "--config_file", "configs/inference.json",
                          "--dataset_dir", str(images), "--output_dir", str(tmp / "theirs")],
                         cwd=tmp / "bundle", env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    theirs = {row[0]: np.array(row[1:], dtype=float) for row in _csv(tmp / "theirs" / "predictions.csv")}
    mine = {row["file"]: np.array([row[f"prob_{c}"] for c in ("nevus", "melanoma", "keratosis", "vascular")])
            for row in ours.rows}
    assert sorted(theirs) == sorted(mine) and len(mine) == 5
    for name, probs in mine.items():
        assert np.abs(theirs[name] - probs).max() < 1e-6
        assert theirs[name].argmax() == probs.argmax()


def test_the_mlflow_run_logs_a_loadable_model_its_params_dataset_and_lean_artifacts(tmp_path, mlflow_uri, capsys):
    from pipeline.engine.run import train

    raw = synthetic_raw(tmp_path, "mlflow-model")
    raw["model"] = {"name": "resnet18"}
    raw["data"]["image_size"] = [16, 16]
    raw["tracking"]["log_model"] = True
    result = train(config_from_dict(raw))
    out = capsys.readouterr().out
    url = f"http://127.0.0.1:5000/#/experiments/1/runs/{result.run_id}"
    assert out.count(url) == 2                                           # at the start and at the end
    assert f"medrobust evaluate {result.output_dir / 'config.yaml'} --run-id {result.run_id}" in out

    model = mlflow.pytorch.load_model(f"runs:/{result.run_id}/model")
    assert isinstance(model, torch.nn.Module)
    model.eval()
    with torch.no_grad():
        assert model(torch.rand(2, 3, 16, 16)).shape == (2, 4)
        assert model(torch.rand(1, 3, 24, 20)).shape == (1, 4)           # another size ResNet takes
    info = mlflow.models.get_model_info(f"runs:/{result.run_id}/model")
    assert info.signature.inputs.inputs[0].shape == (-1, 3, -1, -1)
    assert info.metadata["class_names"] == ["nevus", "melanoma", "keratosis", "vascular"]
    assert [step["_target_"] for step in info.metadata["preprocessing"]][:2] == ["LoadImaged", "EnsureChannelFirstd"]
    example = mlflow.models.Model.load(info.model_uri).load_input_example(
        mlflow.artifacts.download_artifacts(info.model_uri))
    assert np.asarray(example).shape == (1, 3, 16, 16) and 0.0 <= np.asarray(example).min() < 0.9  # a real image

    client = mlflow.MlflowClient(mlflow_uri)
    run = client.get_run(result.run_id)
    params = run.data.params
    assert params["method.name"] == "standard" and params["data.synthetic_size"] == "48"
    for unused in ("method.eps", "method.delta", "method.quantile", "data.spacing", "evaluate.overlay_cases"):
        assert unused not in params                                       # other methods', sources', tasks'
    (dataset,) = run.inputs.dataset_inputs
    assert dataset.dataset.name == "synthetic" and len(dataset.dataset.digest) == 16
    assert json.loads(dataset.dataset.profile)["splits"] == {"train": 32, "val": 8, "test": 8}
    files = {f.path for f in client.list_artifacts(result.run_id, "checkpoints")}
    assert files == {"checkpoints/last.pt"}                              # best.pt is the same epoch
    local = client.download_artifacts(result.run_id, "checkpoints/last.pt", str(tmp_path / "dl"))
    ckpt = torch.load(local, weights_only=True)
    assert "optimizer" not in ckpt and {"network", "config", "data"} <= set(ckpt)
    assert not (result.output_dir / "to_log").exists()


def test_params_are_the_fields_the_run_uses():
    from pipeline.tracking.params import used_params
    from pipeline.tracking.session import flatten

    def params(method: str, **data) -> dict[str, str]:
        raw = {"experiment": "p", "data": {"source": "synthetic", **data}, "method": {"name": method},
               "evaluate": {"norms": ["L2"]}}
        return flatten(used_params(config_from_dict(raw).resolved()))

    ima, standard, dpaat = params("ima"), params("standard"), params("dpaat")
    assert {"method.delta", "method.eps_max", "method.bisection_steps", "method.beta"} <= set(ima)
    assert not {"method.eps", "method.quantile", "method.eps_min"} & set(ima)
    assert [k for k in standard if k.startswith("method.")] == ["method.name"]
    assert {"method.quantile", "method.momentum", "method.eps_min", "method.eps"} <= set(dpaat)
    assert "evaluate.eps_l2" in ima and "evaluate.eps_linf" not in ima      # only L2 is evaluated
    assert "data.synthetic_size" in ima and "data.spacing" not in ima and "evaluate.overlay_cases" not in ima
    assert len(standard) < len(flatten(config_from_dict({"experiment": "p", "data": {"source": "synthetic"}})
                                       .resolved()))
