"""Against a real ``mlflow server`` (SQLite backend, artifact root, HTTP): log a run, read it back, report it.

The server runs as a subprocess on a free port of 127.0.0.1 and is always terminated by the fixture's
finalizer. The slow test trains and evaluates two tiny runs against it and reports them, all over HTTP.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import mlflow
import pytest
from evaluation_toys import log_evaluated_run, train_and_evaluate

from pipeline.evaluation.report import report

START_TIMEOUT_S = 90


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(url: str, proc: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"mlflow server exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as resp:
                if resp.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise RuntimeError(f"mlflow server not healthy after {START_TIMEOUT_S} s:\n{log.read_text()[-3000:]}")


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    """``http://127.0.0.1:<port>`` of a fresh server; stopped (and killed if it must be) at the end."""
    root = tmp_path_factory.mktemp("mlflow-server")
    port = free_port()
    log = root / "server.log"
    cmd = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
           "--artifacts-destination", str(root / "artifacts"), "--host", "127.0.0.1", "--port", str(port),
           "--workers", "1"]
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, proc, log)
        yield url
    finally:
        stop(proc)


def stop(proc: subprocess.Popen) -> None:
    """SIGTERM to the server's own process group (the server and its workers, nothing else), then SIGKILL."""
    for sig, wait_s in ((signal.SIGTERM, 5), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        try:
            proc.wait(timeout=wait_s)
            break
        except subprocess.TimeoutExpired:
            continue


@pytest.fixture()
def served(mlflow_server, monkeypatch):
    """MLFLOW_TRACKING_URI pointing at the server for one test; MLflow's global URI forgotten afterwards."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    yield mlflow_server  # conftest's autouse fixture forgets MLflow's process-wide URI afterwards


def test_log_and_read_back_over_http(mlflow_server, served, tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    client = mlflow.MlflowClient(mlflow_server)
    exp = client.create_experiment("served")
    run_a = log_evaluated_run(client, exp, "standard", 0.9, [0.3, 0.0], [0.5, 1.0], [5.0])
    run_b = log_evaluated_run(client, exp, "dpaat", 0.8, [0.6, 0.4], [0.5, 1.0], [9.0, 9.0])

    fresh = mlflow.MlflowClient(mlflow_server)                 # read back through a new HTTP client
    run = fresh.get_run(run_a)
    assert run.data.metrics["eval/clean/accuracy"] == pytest.approx(0.9)
    assert run.data.tags["medrobust.method"] == "standard"
    assert [m.value for m in fresh.get_metric_history(run_b, "epoch_time_s")] == [9.0, 9.0]
    local = fresh.download_artifacts(run_a, "evaluation/summary.json", str(tmp_path / "dl"))
    assert Path(local).read_text() == '{"clean": 0.9}'

    rep = report("served", out=tmp_path / "rep")             # URI from MLFLOW_TRACKING_URI
    assert set(rep.table["method"]) == {"standard", "dpaat"}
    files = {f.path for f in fresh.list_artifacts(rep.run_id, "report")}
    assert "report/report.md" in files and "report/robustness_curves.png" in files


@pytest.mark.slow
def test_train_evaluate_report_against_the_server(mlflow_server, served, tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    runs = {}
    for method in ("standard", "pgd_at"):
        trained, ev, raw = train_and_evaluate(tmp_path, method)
        assert ev.run_id == trained.run_id and ev.tracking_uri == mlflow_server
        runs[method] = trained.run_id
    client = mlflow.MlflowClient(mlflow_server)
    for method, run_id in runs.items():
        run = client.get_run(run_id)
        assert run.data.tags["medrobust.method"] == method
        assert "eval/pgd_l2/auc_norm" in run.data.metrics and "val_accuracy" in run.data.metrics
        names = {Path(f.path).name for f in client.list_artifacts(run_id, "evaluation")}
        assert {"robustness_curves.png", "stratified.csv", "metrics.json"} <= names
    rep = report(raw["experiment"], out=tmp_path / "rep")
    assert set(rep.table["method"]) == {"standard", "pgd_at"}
    assert (rep.table["training time (s)"] > 0).all()
    assert (tmp_path / "rep" / "robustness_curves.png").exists()
