"""Tracking outage, against a real ``mlflow server`` on 127.0.0.1 that the tests stop (and restart).

* The server goes away mid-run: training completes, checkpoints stay on disk, the end of the run says what
  could not be logged and how to upload it; once the server is back ``medrobust sync`` uploads it.
* The server is away at start: exit code 2 before any training, fast (no minutes of HTTP retries), unless
  ``tracking.offline_ok`` is set: then the run goes to the local store with a warning.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest
import yaml
from test_mlflow_server import free_port, stop, wait_healthy

from pipeline.cli import main
from pipeline.config import config_from_dict
from pipeline.model.checkpoint import load_checkpoint
from pipeline.engine.run import train
from pipeline.tracking.handler import MlflowTracking

EPOCHS = 2


class Server:
    """One real ``mlflow server`` (SQLite backend) on a fixed loopback port, which a test can stop and restart."""

    def __init__(self, root: Path):
        self.root, self.port = root, free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        cmd = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri",
               f"sqlite:///{self.root / 'mlflow.db'}", "--artifacts-destination", str(self.root / "artifacts"),
               "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1"]
        env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
        log = self.root / "server.log"
        with open(log, "ab") as out:
            self.proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        wait_healthy(self.url, self.proc, log)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            stop(self.proc)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = Server(tmp_path_factory.mktemp("outage-server"))
    srv.start()
    try:
        yield srv
    finally:
        srv.stop()


def outage_config(out: Path, uri: str | None, **tracking) -> dict:
    return {
        "experiment": "outage", "task": "classification", "seed": 4,
        "data": {"source": "synthetic", "synthetic_size": 48, "cache": "none"},
        "model": {"name": "small_cnn", "channels": [8, 16]},
        "method": {"name": "ima", "steps": 2, "delta": 0.1, "eps_max": 1.0, "bisection_steps": 2},
        "train": {"epochs": EPOCHS, "batch_size": 16, "lr": 0.01, "device": "cpu", "progress": False,
                  "output_dir": str(out)},
        "tracking": {"uri": uri, "run_name": "outage", **tracking},
    }


@pytest.mark.slow
def test_server_going_away_mid_run(server, tmp_path, monkeypatch, capsys):
    if server.proc is None or server.proc.poll() is not None:
        server.start()
    real_epoch = MlflowTracking.epoch

    def epoch_then_outage(self, engine):   # the real handler; then the server dies, after epoch 1 is logged
        real_epoch(self, engine)
        if engine.state.epoch == 1:
            server.stop()
    monkeypatch.setattr(MlflowTracking, "epoch", epoch_then_outage)

    out = tmp_path / "out"
    started = time.monotonic()
    with pytest.warns(UserWarning, match="training goes on"):
        result = train(config_from_dict(outage_config(out, server.url)))
    assert time.monotonic() - started < 120           # no minutes of HTTP retries per failed call
    ckpt = load_checkpoint(out / "checkpoints" / "last.pt")
    assert ckpt["epoch"] == EPOCHS                      # training went on to the end, checkpoints are on disk
    assert (out / "checkpoints" / "best.pt").exists()

    printed = capsys.readouterr().out
    assert "unlogged.json" in printed and f"medrobust sync {out}" in printed
    record = json.loads((out / "unlogged.json").read_text())
    assert record["run_id"] == result.run_id and record["tracking_uri"] == server.url
    lost = {item["kind"] for item in record["items"]}
    assert {"metrics", "artifact", "status"} <= lost
    steps = {item["step"] for item in record["items"] if item["kind"] == "metrics" and "eps_mean" in item["metrics"]}
    assert steps == {EPOCHS}

    server.start()                                        # the server is back: upload what was missed
    assert main(["sync", str(out)]) == 0
    assert "uploaded" in capsys.readouterr().out
    client = mlflow.MlflowClient(server.url)
    run = client.get_run(result.run_id)
    assert run.info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(result.run_id, "eps_mean")] == list(range(1, EPOCHS + 1))
    best_epoch = load_checkpoint(out / "checkpoints" / "best.pt")["epoch"]    # logged if not the last epoch
    assert {a.path for a in client.list_artifacts(result.run_id, "checkpoints")} == \
        {"checkpoints/last.pt"} | ({"checkpoints/best.pt"} if best_epoch != EPOCHS else set())
    assert not (out / "unlogged.json").exists()


def test_server_away_at_start_is_exit_2_before_training(server, tmp_path, monkeypatch, capsys):
    server.stop()
    out = tmp_path / "out"
    cfg = tmp_path / "outage.yaml"
    cfg.write_text(yaml.safe_dump(outage_config(out, server.url)))
    monkeypatch.chdir(tmp_path)
    started = time.monotonic()
    assert main(["train", str(cfg)]) == 2
    assert time.monotonic() - started < 60
    err = capsys.readouterr().err
    assert f"medrobust: error: tracking.uri: MLflow server {server.url} is unreachable" in err
    assert "tracking.offline_ok=true" in err and "Traceback" not in err
    assert not out.exists() and not (tmp_path / "mlflow.db").exists()    # nothing trained, nothing logged

    with pytest.warns(UserWarning, match="logging this run to the local store"):
        assert main(["train", str(cfg), "--set", "tracking.offline_ok=true", "--set", "train.epochs=1",
                     "--set", "tracking.log_model=false"]) == 0
    assert load_checkpoint(out / "checkpoints" / "last.pt")["epoch"] == 1
    local = f"sqlite:///{tmp_path / 'mlflow.db'}"                          # MLflow's local default, in the cwd
    runs = mlflow.MlflowClient(local).search_runs(
        [mlflow.MlflowClient(local).get_experiment_by_name("outage").experiment_id])
    assert len(runs) == 1 and runs[0].info.status == "FINISHED" and "val_accuracy" in runs[0].data.metrics
