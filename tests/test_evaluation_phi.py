"""No PHI from DICOM headers (or from the study folder name) in what an evaluation logs to MLflow.

The TCIA PGBM-001 study is evaluated end to end (DICOM loader, 3D sliding-window inference, PGD on the
whole volume) with a small randomly initialised UNet checkpoint that points at a real MLflow run; then every
param, tag, metric name and artifact byte of that run is searched for the header values.
"""

from __future__ import annotations

from pathlib import Path

import mlflow
import pytest
import torch

from pipeline.config import config_from_dict
from pipeline.model.checkpoint import save_checkpoint
from pipeline.model.networks import build_network

# PatientName/PatientID, AccessionNumber, StudyDate (as in the header and in the folder name), StudyInstanceUID
PHI = ["PGBM-001", "PGBM", "5686274134839343", "19920402", "1992-04-02",
       "1.3.6.1.4.1.14519.5.2.1.4429.7055.304625516276205756661744279896"]


def brain_config(shared_data: Path, out: Path) -> dict:
    return {
        "experiment": "phi-check", "task": "segmentation", "seed": 0,
        "data": {"source": "dicom", "root": str(shared_data / "tcia_pgbm001"),
                 "image_series": ["*T1post*", "*T1prereg*", "*FLAIR*", "*T2reg*"], "mask_series": "*MaskTumor*",
                 "orientation": "RAS", "spacing": [2.75, 2.75, 5.0], "patch_size": [32, 32, 16], "cache": "none"},
        "model": {"name": "unet", "channels": [4, 8]},
        "train": {"device": "cpu", "output_dir": str(out)},
        "evaluate": {"eps_l2": [1.0], "norms": ["L2"], "steps": 1, "losses": ["ce"], "fgsm": False,
                     "margin": False, "gradcam_per_class": 0, "max_samples": 1,
                     "stratify": ["label", "sex", "age_band"]},
    }


def test_dicom_evaluation_logs_no_phi(shared_data, tmp_path, mlflow_uri):
    if not (shared_data / "tcia_pgbm001").is_dir():
        pytest.skip("tcia_pgbm001 is absent from the shared data folder")
    from pipeline.evaluation.run import evaluate

    raw = brain_config(shared_data, tmp_path / "out")
    cfg = config_from_dict(raw)
    client = mlflow.MlflowClient(mlflow_uri)
    exp = client.create_experiment("phi-check")
    run_id = client.create_run(exp, run_name="brain", tags={"medrobust.method": "standard"}).info.run_id
    torch.manual_seed(0)
    net = build_network(cfg.model, task="segmentation", spatial_dims=3, in_channels=4, num_classes=2)
    ckpt = save_checkpoint(tmp_path / "brain.pt", {
        "network": net.state_dict(), "config": cfg.resolved(), "epoch": 1, "iteration": 1, "mlflow_run_id": run_id,
        "data": {"class_names": ["background", "mask"], "spatial_dims": 3, "in_channels": 4, "num_classes": 2,
                 "image_size": []}})
    ev = evaluate(cfg, checkpoint=str(ckpt))
    assert ev.run_id == run_id and "eval/pgd_l2/dice_at_1" in ev.metrics

    run = client.get_run(run_id)
    texts = [*run.data.params, *run.data.params.values(), *run.data.tags, *run.data.tags.values(),
             *run.data.metrics]
    for phi in PHI:
        assert not any(phi in t for t in texts), phi
    local = Path(client.download_artifacts(run_id, "", str(tmp_path / "artifacts")))
    files = [p for p in local.rglob("*") if p.is_file()]
    assert any(p.name == "per_sample.csv" for p in files)
    for path in files:
        content = path.read_bytes()
        for phi in PHI:
            assert phi.encode() not in content, f"{phi} in {path.name}"
