"""Tracking outage, against a real ``mlflow server`` on 127.0.0.1 that the tests stop (and restart).

* The server goes away mid-run: training completes, checkpoints stay on disk, the end of the run says what
  could not be logged and how to upload it; once the server is back ``medrobust sync`` uploads it.
* The server is away at start: exit code 2 before any training, fast (no minutes of HTTP retries), unless
  ``tracking.offline_ok`` is set: then the run goes to the local store with a warning.
* The server goes away right after the run is created: the params, the dataset record and everything else are
  recorded with their content, and ``medrobust sync`` puts them into the run.
* The server is away during ``medrobust evaluate``: the evaluation finishes, its files are on disk, exit 0
  with a note; ``medrobust sync`` puts the evaluation into the training run (or creates the evaluation run).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import math

import mlflow
import pytest
import yaml
from evaluation_toys import tiny_run_config
from test_mlflow_server import free_port, stop, wait_healthy

from pipeline.cli import main
from pipeline.config import config_from_dict
from pipeline.model.checkpoint import load_checkpoint
from pipeline.engine.run import train
from pipeline.tracking.handler import MlflowTracking
from pipeline.tracking.params import used_params
from pipeline.tracking.session import MAX_PARAM_LEN, TrackingSession, flatten

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


@pytest.mark.slow
def test_params_and_dataset_lost_at_the_start_are_replayed_by_sync(server, tmp_path, monkeypatch, capsys):
    if server.proc is None or server.proc.poll() is not None:
        server.start()
    real_create = mlflow.MlflowClient.create_run

    def create_then_outage(self, *args, **kwargs):   # the real call; then the server dies, before the params
        run = real_create(self, *args, **kwargs)
        server.stop()
        return run
    monkeypatch.setattr(mlflow.MlflowClient, "create_run", create_then_outage)

    out = tmp_path / "out"
    cfg = config_from_dict(outage_config(out, server.url, log_model=False))
    with pytest.warns(UserWarning, match="training goes on"):
        result = train(cfg)
    monkeypatch.undo()
    expected = {k: v[:MAX_PARAM_LEN] for k, v in flatten(used_params(cfg.resolved())).items()}
    record = json.loads((out / "unlogged.json").read_text())
    kinds = {item["kind"] for item in record["items"]}
    assert {"params", "dataset", "metrics", "artifact", "status"} <= kinds
    recorded = {k: v for item in record["items"] if item["kind"] == "params" for k, v in item["params"].items()}
    assert recorded == expected                           # the params are recorded with their values
    assert f"medrobust sync {out}" in capsys.readouterr().out

    server.start()
    assert main(["sync", str(out)]) == 0
    client = mlflow.MlflowClient(server.url)
    run = client.get_run(result.run_id)
    assert run.data.params == expected
    assert [d.dataset.name for d in run.inputs.dataset_inputs] == [cfg.data.dataset_tag()]
    assert run.info.status == "FINISHED" and "val_accuracy" in run.data.metrics
    assert [m.step for m in client.get_metric_history(result.run_id, "eps_mean")] == list(range(1, EPOCHS + 1))
    assert "config.yaml" in {a.path for a in client.list_artifacts(result.run_id)}
    assert not (out / "unlogged.json").exists()


def test_evaluate_with_the_server_away_finishes_and_sync_uploads_it(tmp_path, mlflow_uri, capsys):
    raw = tiny_run_config(tmp_path)                      # trained into the local store of ``mlflow_uri``
    trained = train(config_from_dict(raw))
    down = f"http://127.0.0.1:{free_port()}"            # nothing listens there
    raw["tracking"] = {**raw["tracking"], "uri": down}
    raw["evaluate"] = {**raw["evaluate"], "norms": ["L2"], "margin": False, "gradcam_per_class": 0,
                       "fgsm": False, "noise": False, "max_samples": 4}
    cfg = tmp_path / "evaluate.yaml"
    cfg.write_text(yaml.safe_dump(raw))
    capsys.readouterr()

    started = time.monotonic()
    with pytest.warns(UserWarning, match=f"MLflow server {down} is unreachable .*evaluation goes on"):
        assert main(["evaluate", str(cfg), "--checkpoint", str(trained.checkpoint)]) == 0
    assert time.monotonic() - started < 120              # no minutes of HTTP retries
    out_dir = Path(raw["train"]["output_dir"]) / f"evaluation-{trained.run_id[:12]}"
    printed = capsys.readouterr().out
    assert "unlogged.json" in printed and f"medrobust sync {out_dir}" in printed
    summary = json.loads((out_dir / "summary.json").read_text())   # the results are on disk
    assert summary["metrics"]["eval/clean/accuracy"] >= 0
    record = json.loads((out_dir / "unlogged.json").read_text())
    assert record["run_id"] == trained.run_id and record["tracking_uri"] == down
    assert {item["kind"] for item in record["items"]} == {"metrics", "tags", "artifact"}
    client = mlflow.MlflowClient(mlflow_uri)
    assert not any(k.startswith("eval/") for k in client.get_run(trained.run_id).data.metrics)

    assert main(["sync", str(out_dir), "--tracking-uri", mlflow_uri]) == 0   # the server is back
    run = client.get_run(trained.run_id)
    finite = {k: v for k, v in summary["metrics"].items() if math.isfinite(v)}
    assert finite and {k: run.data.metrics[k] for k in finite} == pytest.approx(finite)
    assert "val_accuracy" in run.data.metrics and run.info.status == "FINISHED"
    assert run.data.tags["medrobust.evaluated"] == "true" and run.data.tags["medrobust.eval.split"] == "test"
    files = {Path(f.path).name for f in client.list_artifacts(trained.run_id, "evaluation")}
    assert {"summary.json", "metrics.csv", "per_sample.csv"} <= files and "unlogged.json" not in files
    assert not (out_dir / "unlogged.json").exists()


def test_an_evaluation_run_that_could_not_be_created_is_created_by_sync(tmp_path, mlflow_uri):
    down = f"http://127.0.0.1:{free_port()}"
    out = tmp_path / "evaluation"
    (out / "sub").mkdir(parents=True)
    (out / "metrics.csv").write_text("metric,value\n")
    (out / "sub" / "panel.txt").write_text("panel")
    with pytest.warns(UserWarning, match="unreachable"):
        session = TrackingSession(down, "created-later", out, unreachable="record", activity="evaluation")
    tags = {"medrobust.kind": "evaluation", "medrobust.dataset": "synthetic"}
    assert session.open_run("evaluate-standard", tags) is None
    session.log_metrics({"eval/clean/accuracy": 0.75}, step=0)
    session.set_tags({"medrobust.evaluated": "true"})
    session.log_artifacts(out, "evaluation")
    session.end(status=None)
    assert "medrobust sync" in session.summary()

    assert main(["sync", str(out), "--tracking-uri", mlflow_uri]) == 0
    client = mlflow.MlflowClient(mlflow_uri)
    runs = client.search_runs([client.get_experiment_by_name("created-later").experiment_id])
    assert len(runs) == 1
    run = runs[0]
    assert run.info.run_name == "evaluate-standard" and run.info.status == "FINISHED"
    assert run.data.metrics == {"eval/clean/accuracy": 0.75}
    assert {k: run.data.tags[k] for k in (*tags, "medrobust.evaluated")} == {**tags, "medrobust.evaluated": "true"}
    assert {a.path for a in client.list_artifacts(run.info.run_id, "evaluation")} == \
        {"evaluation/metrics.csv", "evaluation/sub"}
    assert [a.path for a in client.list_artifacts(run.info.run_id, "evaluation/sub")] == ["evaluation/sub/panel.txt"]


def test_evaluate_by_run_id_with_the_server_away_is_exit_2_with_the_way_out(tmp_path, capsys):
    raw = tiny_run_config(tmp_path)
    down = f"http://127.0.0.1:{free_port()}"
    raw["tracking"] = {**raw["tracking"], "uri": down}
    cfg = tmp_path / "evaluate.yaml"
    cfg.write_text(yaml.safe_dump(raw))
    started = time.monotonic()
    with pytest.warns(UserWarning, match="unreachable"):
        assert main(["evaluate", str(cfg), "--run-id", "latest"]) == 2
    assert time.monotonic() - started < 60
    err = capsys.readouterr().err
    assert f"medrobust: error: --run-id latest: MLflow server {down} is unreachable" in err
    assert "--checkpoint PATH" in err and "Traceback" not in err


def _session_losing_its_server(mlflow_uri: str, out: Path, run_id: str | None = None):
    """A session on the real local store whose client then points at a port where nothing listens: every call
    after the start fails as in an outage and is recorded (the record names the local store)."""
    from mlflow.tracking import MlflowClient

    from pipeline.tracking.session import TrackingSession

    session = TrackingSession(mlflow_uri, "journal", out)
    session.start("attempt", {"seed": 0}, {"medrobust.kind": "training"}, run_id=run_id)
    session.client = MlflowClient(tracking_uri=f"http://127.0.0.1:{free_port()}")
    return session


def test_a_resumed_run_ending_live_is_not_ended_again_by_the_earlier_attempts_record(tmp_path, mlflow_uri,
                                                                                       monkeypatch):
    """Attempt 1 loses the server and is killed (its metrics and status KILLED recorded); attempt 2 resumes the
    run with the server back and ends it FINISHED live. sync replays attempt 1's metrics, not its status."""
    from mlflow.tracking import MlflowClient

    from pipeline.tracking.session import JOURNAL, TrackingSession
    from pipeline.tracking.sync import sync

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    first = _session_losing_its_server(mlflow_uri, tmp_path)
    first.log_metrics({"loss": 0.5}, step=1)
    on_disk = json.loads((tmp_path / JOURNAL).read_text())     # written at once: a SIGKILL here loses nothing
    assert [(i["kind"], i["metrics"]) for i in on_disk["items"]] == [("metrics", {"loss": 0.5})]
    first.end("KILLED")
    record = json.loads((tmp_path / JOURNAL).read_text())
    assert [i["kind"] for i in record["items"]] == ["metrics", "status"] and record["run_id"] == first.run_id
    second = TrackingSession(mlflow_uri, "journal", tmp_path)
    second.start("attempt", {"seed": 0}, {}, run_id=first.run_id)
    second.log_metrics({"loss": 0.25}, step=2)
    second.end("FINISHED")
    record = json.loads((tmp_path / JOURNAL).read_text())
    assert [i["kind"] for i in record["items"]] == ["metrics"]            # the stale status is gone
    assert sync(tmp_path) == (1, 0)
    client = MlflowClient(tracking_uri=mlflow_uri)
    assert client.get_run(first.run_id).info.status == "FINISHED"
    assert [(m.step, m.value) for m in client.get_metric_history(first.run_id, "loss")] == [(1, 0.5), (2, 0.25)]


def test_another_runs_record_in_the_same_folder_is_kept_aside_not_overwritten(tmp_path, mlflow_uri, monkeypatch,
                                                                                capsys):
    from mlflow.tracking import MlflowClient

    from pipeline.tracking.session import JOURNAL
    from pipeline.tracking.sync import sync

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    one = _session_losing_its_server(mlflow_uri, tmp_path)
    one.log_metrics({"loss": 1.0}, step=1)
    one.end("FINISHED")
    two = _session_losing_its_server(mlflow_uri, tmp_path)           # a new run, trained anew in the same folder
    two.log_metrics({"loss": 2.0}, step=1)
    two.end("FINISHED")
    aside = tmp_path / f"unlogged.run-{one.run_id}.json"
    assert f"kept as {aside}" in capsys.readouterr().out
    assert json.loads(aside.read_text())["run_id"] == one.run_id
    assert json.loads((tmp_path / JOURNAL).read_text())["run_id"] == two.run_id
    assert sync(aside) == (2, 0) and sync(tmp_path) == (2, 0)
    client = MlflowClient(tracking_uri=mlflow_uri)
    for run, value in ((one, 1.0), (two, 2.0)):
        assert [m.value for m in client.get_metric_history(run.run_id, "loss")] == [value]
        assert client.get_run(run.run_id).info.status == "FINISHED"


def test_a_study_whose_server_goes_away_finishes_and_sync_uploads_what_it_missed(server, tmp_path, monkeypatch,
                                                                                    capsys):
    """The server dies right after a variant's evaluation: the study still logs its timings to that variant's run
    (recorded in the variant's folder), writes its table and ends; ``medrobust sync`` of the variant's and the
    study's folders puts the timings, the table and the final status into MLflow."""
    import pipeline.evaluation.run as evaluation_run
    from pipeline.study.run import run_study

    if server.proc is None or server.proc.poll() is not None:
        server.start()
    base = {"experiment": "study-outage", "task": "classification", "seed": 3,
            "data": {"source": "synthetic", "synthetic_size": 32, "image_size": [16, 16], "cache": "none"},
            "model": {"name": "small_cnn", "channels": [4, 8]},
            "train": {"epochs": 1, "batch_size": 8, "lr": 0.01, "device": "cpu", "progress": False},
            "tracking": {"uri": server.url, "log_model": False}}
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(base))
    study_file = tmp_path / "study.yaml"
    out = tmp_path / "out"
    study_file.write_text(yaml.safe_dump({
        "name": "outage", "base": "base.yaml", "output_dir": str(out), "variants": {"plain": None},
        "evaluate": {"norms": ["L2"], "eps_l2": [0.5], "steps": 2, "losses": ["ce"], "fgsm": False,
                     "noise": False, "margin": False, "gradcam_per_class": 0, "apgd": False}}, sort_keys=False))
    real_evaluate = evaluation_run.evaluate

    def evaluate_then_outage(*args, **kwargs):      # the real evaluation; then the server dies
        result = real_evaluate(*args, **kwargs)
        server.stop()
        return result
    monkeypatch.setattr(evaluation_run, "evaluate", evaluate_then_outage)

    started = time.monotonic()
    with pytest.warns(UserWarning, match="goes on"):
        result = run_study(study_file)
    assert time.monotonic() - started < 180                 # no minutes of HTTP retries per failed call
    child = result.states["plain"].run_id
    assert (out / "results.md").is_file() and len(result.table) == 1
    printed = capsys.readouterr().out
    assert f"medrobust sync {out / 'plain'}" in printed and f"medrobust sync {out}" in printed
    child_record = json.loads((out / "plain" / "unlogged.json").read_text())
    assert child_record["run_id"] == child
    assert {item["kind"] for item in child_record["items"]} == {"metrics", "tags"}
    parent_record = json.loads((out / "unlogged.json").read_text())
    assert parent_record["run_id"] == result.parent_run_id
    assert {item["kind"] for item in parent_record["items"]} == {"artifact", "status"}

    server.start()                                          # back: upload what the study could not log
    assert main(["sync", str(out / "plain")]) == 0
    assert main(["sync", str(out)]) == 0
    client = mlflow.MlflowClient(server.url)
    run = client.get_run(child)
    assert run.data.metrics["study_train_s"] == pytest.approx(result.states["plain"].train_s)
    assert run.data.metrics["study_eval_s"] == pytest.approx(result.states["plain"].eval_s)
    assert run.data.tags["medrobust.study"] == "outage"
    parent = client.get_run(result.parent_run_id)
    assert parent.info.status == "FINISHED"
    assert "results.md" in {Path(a.path).name for a in client.list_artifacts(result.parent_run_id)}
    assert not (out / "plain" / "unlogged.json").exists() and not (out / "unlogged.json").exists()
