"""One MLflow run of medrobust, logged through ``MlflowClient`` so that a tracking outage never stops training.

The tracking URI comes from ``tracking.uri``, else ``MLFLOW_TRACKING_URI``, else MLflow's own default (a
local SQLite file ``mlflow.db`` in the working directory, artifacts under ``./mlruns``). A server that is
unreachable when the run starts is an input error (exit 2) unless ``tracking.offline_ok`` is set, in which
case the run goes to the local default store with a warning. A server that goes away mid-run only costs
the log calls made while it is away: they are recorded in ``<output_dir>/unlogged.json`` and listed at
the end, with the command that uploads them later (``medrobust sync``).

Reachability is judged by a quick probe of the server's ``/health`` endpoint (a few seconds at most), not by
a tracking call: MLflow's HTTP client retries a refused connection with exponential backoff for about four
minutes per call, which would delay the start-up error and stall training at every log call during an
outage. While the server is away, log calls are recorded without being tried, and the server is probed
again every ``REPROBE_S`` seconds; once it answers, logging goes on live.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import socket
import subprocess
import time
import urllib.error
import urllib.request
import warnings
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import torch
from mlflow.entities import Dataset, DatasetInput, InputTag, Metric, Param, RunTag
from mlflow.models.signature import ModelSignature
from mlflow.types import Schema, TensorSpec
from mlflow.tracking import MlflowClient
from mlflow.tracking._tracking_service.utils import _use_tracking_uri

from pipeline.errors import InputError
from pipeline.tracking.params import used_params

log = logging.getLogger(__name__)

LOCAL_DEFAULT = "sqlite:///mlflow.db"
MAX_PARAM_LEN = 6000
PROBE_TIMEOUT_S = 5.0
REPROBE_S = 30.0


def resolve_uri(configured: str | None) -> str:
    return configured or os.environ.get("MLFLOW_TRACKING_URI") or mlflow.get_tracking_uri() or LOCAL_DEFAULT


def flatten(data: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested config -> {"method.eps": "0.5", ...} as MLflow params (strings)."""
    out: dict[str, str] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = json.dumps(value) if isinstance(value, (list, tuple)) else str(value)
    return out


def dataset_digest(splits: dict[str, list[dict[str, Any]]]) -> str:
    """A short content digest of a dataset's splits: every sample's image (the pixels of an in-memory array,
    else the file path) and label, in split order."""
    h = hashlib.sha256()
    for name in sorted(splits):
        h.update(name.encode())
        for item in splits[name]:
            for key in ("image", "label"):
                value = item.get(key)
                h.update(value.tobytes() if isinstance(value, np.ndarray) else repr(value).encode())
    return h.hexdigest()[:16]


def tensor_signature(example: np.ndarray, output: np.ndarray, variable_size: bool) -> ModelSignature:
    """Float32 tensors, any batch size; any spatial size too when the network takes it (``variable_size``)."""
    def spec(array: np.ndarray, keep: int) -> TensorSpec:
        dims = [-1, *array.shape[1:keep], *([-1] * (array.ndim - keep) if variable_size else array.shape[keep:])]
        return TensorSpec(np.dtype(np.float32), tuple(dims))
    return ModelSignature(inputs=Schema([spec(example, 2)]), outputs=Schema([spec(output, 2)]))


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                              cwd=Path(__file__).resolve().parent).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _is_remote(uri: str) -> bool:
    return uri.startswith(("http://", "https://"))


def probe(uri: str, timeout: float = PROBE_TIMEOUT_S) -> str | None:
    """None when an HTTP server answers at ``uri`` (any status: it is up), else why it cannot be reached."""
    try:
        with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=timeout):
            return None
    except urllib.error.HTTPError:
        return None
    except (urllib.error.URLError, socket.timeout, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        return f"{type(reason).__name__}: {reason}"[:200]


class TrackingSession:
    """Creates (or re-opens) the run and logs to it; failures after the start are recorded, not raised."""

    def __init__(self, uri: str | None, experiment: str, output_dir: Path, offline_ok: bool = False):
        self.uri = resolve_uri(uri)
        self.experiment = experiment
        self.output_dir = Path(output_dir)
        self.unlogged: list[dict[str, Any]] = []
        self.offline = False
        self._down: str | None = None      # why the server is away, while it is
        self._last_probe = 0.0
        if self.uri.startswith("file:") or "://" not in self.uri:
            raise InputError(f"tracking.uri: '{self.uri}' is a folder (file store); MLflow 3 needs a database "
                             "URI such as sqlite:///mlflow.db or a server http://host:5000")
        self.client = MlflowClient(tracking_uri=self.uri)
        self._check_reachable(offline_ok)
        self.run_id: str | None = None

    def _check_reachable(self, offline_ok: bool) -> None:
        if not _is_remote(self.uri):
            return
        reason = probe(self.uri)
        if reason is None:
            try:
                self.client.search_experiments(max_results=1)
            except Exception as exc:  # noqa: BLE001 - any failure to use the server means the same thing here
                reason = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
        if reason is not None:
            if not offline_ok:
                raise InputError(f"tracking.uri: MLflow server {self.uri} is unreachable ({reason}); start it, "
                                 "or set tracking.offline_ok=true to log to the local store instead") from None
            warnings.warn(f"MLflow server {self.uri} is unreachable; logging this run to the local store "
                          f"{LOCAL_DEFAULT} instead (tracking.offline_ok)", stacklevel=2)
            self.uri, self.offline = LOCAL_DEFAULT, True
            self.client = MlflowClient(tracking_uri=self.uri)

    # -- run lifecycle -------------------------------------------------------------------------------
    def start(self, run_name: str | None, params: dict[str, Any], tags: dict[str, str],
              run_id: str | None = None) -> str:
        """Open the run (a new one, or ``run_id`` when resuming) and log params and tags."""
        if run_id is not None:
            try:
                self.experiment_id = self.client.get_run(run_id).info.experiment_id
                self.client.update_run(run_id, status="RUNNING")
                self.run_id = run_id
                print(f"MLflow run {run_id} (resumed): {self.run_url()}", flush=True)
                return run_id
            except Exception:  # noqa: BLE001 - resume into a fresh run when the old one is gone
                log.warning("MLflow run %s not found in %s; resuming into a new run", run_id, self.uri)
        exp = self.client.get_experiment_by_name(self.experiment)
        exp_id = exp.experiment_id if exp else self.client.create_experiment(self.experiment)
        parent = (params.get("tracking") or {}).get("parent_run_id")  # a study's variant: MLflow's nesting tag
        tags = {**tags, "mlflow.parentRunId": parent} if parent else tags
        run = self.client.create_run(exp_id, run_name=run_name, tags={"medrobust.commit": git_commit(), **tags})
        self.run_id, self.experiment_id = run.info.run_id, exp_id
        flat = {k: v[:MAX_PARAM_LEN] for k, v in flatten(used_params(params)).items()}
        items = [Param(k, v) for k, v in flat.items()]
        for i in range(0, len(items), 100):
            self._call("params", lambda chunk=items[i:i + 100]: self.client.log_batch(self.run_id, params=chunk))
        print(f"MLflow run {self.run_id}: {self.run_url()}", flush=True)
        return self.run_id

    def run_url(self) -> str:
        """The run's page in the MLflow UI: on the tracking server, or where ``mlflow ui`` serves a local store."""
        base = self.uri.rstrip("/") if _is_remote(self.uri) else "http://127.0.0.1:5000"
        url = f"{base}/#/experiments/{getattr(self, 'experiment_id', '0')}/runs/{self.run_id}"
        return url if _is_remote(self.uri) else f"{url} (after: mlflow ui --backend-store-uri {self.uri})"

    def end(self, status: str = "FINISHED") -> None:
        if self.run_id is not None:
            self._call("status", lambda: self.client.set_terminated(self.run_id, status), payload={"status": status})
        self._write_unlogged()

    # -- logging ---------------------------------------------------------------------------------------
    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, step) for k, v in metrics.items() if v is not None]
        if items:
            self._call("metrics", lambda: self.client.log_batch(self.run_id, metrics=items),
                       payload={"metrics": {m.key: m.value for m in items}, "step": step})

    def set_tags(self, tags: dict[str, str]) -> None:
        items = [RunTag(k, str(v)) for k, v in tags.items()]
        self._call("tags", lambda: self.client.log_batch(self.run_id, tags=items),
                   payload={"tags": {t.key: t.value for t in items}})

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> bool:
        """True when logged; False when recorded for ``medrobust sync`` (the file must stay where it is)."""
        return self._call("artifact", lambda: self.client.log_artifact(self.run_id, str(path), artifact_path),
                          payload={"path": str(Path(path).resolve()), "artifact_path": artifact_path})

    def log_dataset(self, name: str, source: str, splits: dict[str, list[dict[str, Any]]]) -> None:
        """The training data as an MLflow dataset input (the run page's "Datasets"): name, source, content
        digest, and the number of samples per split in its profile."""
        sizes = {k: len(v) for k, v in splits.items()}
        dataset = Dataset(name=name, digest=dataset_digest(splits), source_type="local",
                          source=json.dumps({"uri": source}),
                          profile=json.dumps({"num_rows": sum(sizes.values()), "splits": sizes}))
        tags = [InputTag("mlflow.data.context", "training")]
        self._call("dataset", lambda: self.client.log_inputs(self.run_id, datasets=[DatasetInput(dataset, tags)]),
                   payload={"dataset": name})

    def log_model(self, network, example: np.ndarray, metadata: dict[str, Any] | None = None,
                  variable_size: bool = False, name: str = "model") -> None:
        """The network (on the CPU, eval mode) via ``mlflow.pytorch`` as a regular (pickled) PyTorch module:
        ``mlflow.pytorch.load_model`` gives back a module that ``.eval()``s and takes every input size the network
        takes. ``example``: a real preprocessed input (batch first); ``metadata``: class names, preprocessing."""
        def _log():
            model = copy.deepcopy(network).cpu().eval()
            with torch.no_grad():
                output = model(torch.as_tensor(example)).numpy()
            with _active_run(self.uri, self.run_id):
                mlflow.pytorch.log_model(model, name=name, input_example=example, metadata=metadata,
                                         signature=tensor_signature(example, output, variable_size),
                                         serialization_format="pickle", pip_requirements=["torch", "monai"])
        self._call("model", _log)

    # -- failure bookkeeping ---------------------------------------------------------------------------
    def _server_up(self) -> bool:
        """Remote stores: probed before each call; while away, probed again at most every REPROBE_S."""
        if not _is_remote(self.uri):
            return True
        now = time.monotonic()
        if self._down is not None and now - self._last_probe < REPROBE_S:
            return False
        self._last_probe = now
        self._down = probe(self.uri)
        return self._down is None

    def _call(self, kind: str, fn, payload: dict[str, Any] | None = None) -> bool:
        try:
            if not self._server_up():
                raise ConnectionError(f"MLflow server unreachable ({self._down})")
            fn()
            return True
        except Exception as exc:  # noqa: BLE001 - an outage must never stop training
            if not self.unlogged:
                warnings.warn(f"MLflow logging to {self.uri} failed ({type(exc).__name__}); training goes on, "
                              "what could not be logged is recorded for a later upload", stacklevel=3)
            self.unlogged.append({"kind": kind, "error": f"{type(exc).__name__}: {str(exc)[:200]}",
                                  **(payload or {})})
            return False

    def _write_unlogged(self) -> None:
        target = self.output_dir / "unlogged.json"
        if not self.unlogged:
            return
        self.output_dir.mkdir(parents=True, exist_ok=True)
        target.write_text(json.dumps({"tracking_uri": self.uri, "run_id": self.run_id,
                                      "items": self.unlogged}, indent=1))

    def summary(self) -> str | None:
        if not self.unlogged:
            return None
        kinds: dict[str, int] = {}
        for item in self.unlogged:
            kinds[item["kind"]] = kinds.get(item["kind"], 0) + 1
        counts = ", ".join(f"{n} {k}" for k, n in sorted(kinds.items()))
        return (f"MLflow: {len(self.unlogged)} log calls to {self.uri} failed ({counts}); they are listed in "
                f"{self.output_dir / 'unlogged.json'}. Checkpoints are on disk in {self.output_dir}. Upload them "
                f"once the server is back with: medrobust sync {self.output_dir}"
                + (" (the model export is not replayed; the checkpoints hold the network)" if "model" in kinds else ""))


class _active_run:
    """Make ``run_id`` the active fluent run of ``uri`` for the duration of a ``mlflow.pytorch`` call, then put
    MLflow's process-wide URI and the MLFLOW_TRACKING_URI variable back exactly as they were (``set_tracking_uri``
    writes both, and a stale process-wide URI would win over the variable for every later client)."""

    def __init__(self, uri: str, run_id: str):
        self.uri, self.run_id = uri, run_id

    def __enter__(self):
        self._env = os.environ.get("MLFLOW_TRACKING_URI")
        self._scope = _use_tracking_uri(self.uri)
        self._scope.__enter__()
        mlflow.start_run(run_id=self.run_id)

    def __exit__(self, *exc):
        try:
            mlflow.end_run(status="RUNNING")
        finally:
            self._scope.__exit__(None, None, None)
            if self._env is None:
                os.environ.pop("MLFLOW_TRACKING_URI", None)
            else:
                os.environ["MLFLOW_TRACKING_URI"] = self._env
        return False
