"""One MLflow run of medrobust, logged through ``MlflowClient`` so that a tracking outage never stops the work.

Training and evaluation both go through ``TrackingSession``: the experiment is got or created in one place
(``get_or_create_experiment``), the newest training run of a method is found in one place (``latest_run``),
and every log call goes through the same outage handling.

The tracking URI comes from ``tracking.uri``, else ``MLFLOW_TRACKING_URI``, else MLflow's own default (a
local SQLite file ``mlflow.db`` in the working directory, artifacts under ``./mlruns``). A server that is
unreachable when training starts is an input error (exit 2) unless ``tracking.offline_ok`` is set, in which
case the run goes to the local default store with a warning; an evaluation (``unreachable="record"``) goes on
instead and records everything it would log. A server that goes away mid-run only costs the log calls made
while it is away: they are recorded with their full content (params, metrics with their steps, tags, dataset
records, artifacts with their artifact path, the final status, the creation of an evaluation run) in
``<output_dir>/unlogged.json``, one summary line at the end says so, and ``medrobust sync`` uploads them later
(``pipeline/tracking/sync.py``). Only the ``mlflow.pytorch`` model export is not replayed.

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
from mlflow.exceptions import MlflowException
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


JOURNAL = "unlogged.json"
PARAMS_PER_BATCH = 100     # MLflow's limits per log_batch: 100 params, 100 tags, 1000 metrics
TAGS_PER_BATCH = 100
METRICS_PER_BATCH = 500
NOT_TRAINING = ("evaluation", "study")   # medrobust.kind of the runs that are not training runs


def get_or_create_experiment(client: MlflowClient, name: str) -> str:
    """The id of experiment ``name``, created when it does not exist yet (the one get-or-create)."""
    exp = client.get_experiment_by_name(name)
    return exp.experiment_id if exp else client.create_experiment(name)


def latest_run(client: MlflowClient, experiment: str, tags: dict[str, str]) -> str | None:
    """The newest FINISHED training run of ``experiment`` carrying ``tags`` (evaluation-only and study runs
    are skipped), or None."""
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return None
    where = " and ".join([*(f"tags.`{k}` = '{v}'" for k, v in tags.items()), "attributes.status = 'FINISHED'"])
    for run in client.search_runs([exp.experiment_id], where, order_by=["attributes.start_time DESC"],
                                  max_results=100):
        if run.data.tags.get("medrobust.kind") not in NOT_TRAINING:
            return run.info.run_id
    return None


def read_journal(path: Path) -> dict[str, Any] | None:
    """The record of ``unlogged.json`` (``tracking_uri``, ``run_id``, ``items``), None when absent or unreadable."""
    try:
        record = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return record if isinstance(record, dict) and isinstance(record.get("items"), list) else None


def is_journal(path: Path) -> bool:
    """``unlogged.json`` and its synced copies ``unlogged.synced-*.json``: bookkeeping, never an artifact."""
    return path.name.startswith("unlogged") and path.suffix == ".json"


class TrackingSession:
    """Creates (or re-opens) the run and logs to it; failures after the start are recorded, not raised.

    ``unreachable``: what a server that does not answer at the start means: ``"error"`` (training: exit 2, or
    the local store with ``offline_ok``), ``"record"`` (evaluation: go on, record every call for ``medrobust
    sync``; ``offline_ok`` plays no part: the results belong in the run on that server). ``activity`` names
    the work in the messages ("training goes on")."""

    def __init__(self, uri: str | None, experiment: str, output_dir: Path, offline_ok: bool = False, *,
                 unreachable: str = "error", activity: str = "training"):
        self.uri = resolve_uri(uri)
        self.experiment = experiment
        self.output_dir = Path(output_dir)
        if unreachable not in ("error", "record"):
            raise ValueError(f"unreachable: 'error' or 'record', not {unreachable!r}")
        self.activity = activity
        self.unlogged: list[dict[str, Any]] = []
        self.offline = False
        self.run_id: str | None = None
        self.experiment_id: str | None = None
        self._down: str | None = None      # why the server is away, while it is
        self._last_probe = 0.0
        self._warned = False
        self._earlier: list[dict[str, Any]] | None = None   # items of an unlogged.json of this run found on disk
        self._ours_on_disk = False                          # unlogged.json on disk is this run's record
        if self.uri.startswith("file:") or "://" not in self.uri:
            raise InputError(f"tracking.uri: '{self.uri}' is a folder (file store); MLflow 3 needs a database "
                             "URI such as sqlite:///mlflow.db or a server http://host:5000")
        self.client = MlflowClient(tracking_uri=self.uri)
        self._check_reachable(offline_ok, unreachable)

    def _check_reachable(self, offline_ok: bool, unreachable: str) -> None:
        if not _is_remote(self.uri):
            return
        reason = probe(self.uri)
        if reason is None:
            try:
                self.client.search_experiments(max_results=1)
            except Exception as exc:  # noqa: BLE001 - any failure to use the server means the same thing here
                reason = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
        if reason is None:
            return
        if unreachable == "record":
            self._down, self._last_probe, self._warned = reason, time.monotonic(), True
            warnings.warn(f"MLflow server {self.uri} is unreachable ({reason}); the {self.activity} goes on, what "
                          "it would log is recorded for a later upload (medrobust sync)", stacklevel=3)
            return
        if not offline_ok:
            raise InputError(f"tracking.uri: MLflow server {self.uri} is unreachable ({reason}); start it, "
                             "or set tracking.offline_ok=true to log to the local store instead") from None
        warnings.warn(f"MLflow server {self.uri} is unreachable; logging this run to the local store "
                      f"{LOCAL_DEFAULT} instead (tracking.offline_ok)", stacklevel=3)
        self.uri, self.offline = LOCAL_DEFAULT, True
        self.client = MlflowClient(tracking_uri=self.uri)

    @property
    def down(self) -> str | None:
        """Why the server is away, when it is known to be (a remote store that did not answer its last probe)."""
        return self._down

    # -- the experiment and its runs -----------------------------------------------------------------
    def ensure_experiment(self) -> str:
        """This session's experiment id; the experiment is created when it does not exist yet."""
        self.experiment_id = get_or_create_experiment(self.client, self.experiment)
        return self.experiment_id

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
        exp_id = self.ensure_experiment()
        parent = (params.get("tracking") or {}).get("parent_run_id")  # a study's variant: MLflow's nesting tag
        tags = {**tags, "mlflow.parentRunId": parent} if parent else tags
        run = self.client.create_run(exp_id, run_name=run_name, tags={"medrobust.commit": git_commit(), **tags})
        self.run_id, self.experiment_id = run.info.run_id, exp_id
        self.log_params(params)
        print(f"MLflow run {self.run_id}: {self.run_url()}", flush=True)
        return self.run_id

    def attach(self, run_id: str) -> bool:
        """Log into the existing run ``run_id`` as it is (no status change): an evaluation joining its training
        run. False when the server answers that there is no such run; True when it is there, or when the
        server is away (then nothing can be checked, and everything is recorded for ``medrobust sync``)."""
        if self._server_up():
            try:
                self.experiment_id = self.client.get_run(run_id).info.experiment_id
            except MlflowException as exc:
                if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
                    return False
            except Exception:  # noqa: BLE001 - the server went away: trust the run id, record what fails
                pass
        self.run_id = run_id
        return True

    def open_run(self, run_name: str, tags: dict[str, str], status: str = "FINISHED") -> str | None:
        """A new run of this experiment, terminated at once with ``status`` (an evaluation without a training
        run to log into). While the server is away its creation is recorded, and so is everything logged to
        it afterwards: ``medrobust sync`` creates the run and fills it; None is returned then."""
        def create():
            run = self.client.create_run(self.ensure_experiment(), run_name=run_name, tags=dict(tags))
            self.run_id, self.experiment_id = run.info.run_id, run.info.experiment_id
        if self._call("run", create, {"experiment": self.experiment, "run_name": run_name, "tags": dict(tags),
                                      "status": status}):
            self._call("status", lambda: self.client.set_terminated(self.run_id, status), {"status": status})
        return self.run_id

    def run_url(self) -> str:
        """The run's page in the MLflow UI: on the tracking server, or where ``mlflow ui`` serves a local store."""
        base = self.uri.rstrip("/") if _is_remote(self.uri) else "http://127.0.0.1:5000"
        url = f"{base}/#/experiments/{self.experiment_id or '0'}/runs/{self.run_id}"
        return url if _is_remote(self.uri) else f"{url} (after: mlflow ui --backend-store-uri {self.uri})"

    def end(self, status: str | None = "FINISHED") -> None:
        """Set the run's final status (None: leave it as it is, e.g. a training run an evaluation logged into)
        and write what could not be logged to ``<output_dir>/unlogged.json``."""
        final = self.run_id is not None and status is not None
        if final:
            self._call("status", lambda: self.client.set_terminated(self.run_id, status), payload={"status": status})
        self._write_unlogged(final_status=final)

    # -- logging ---------------------------------------------------------------------------------------
    def log_params(self, params: dict[str, Any]) -> None:
        """The config fields this run uses (``params.used_params``), flattened, in batches of 100."""
        flat = {k: v[:MAX_PARAM_LEN] for k, v in flatten(used_params(params)).items()}
        keys = list(flat)
        for i in range(0, len(keys), PARAMS_PER_BATCH):
            chunk = {k: flat[k] for k in keys[i:i + PARAMS_PER_BATCH]}
            self._call("params", lambda c=chunk: self.client.log_batch(
                self.run_id, params=[Param(k, v) for k, v in c.items()]), payload={"params": chunk})

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        now = int(time.time() * 1000)
        values = {k: float(v) for k, v in metrics.items() if v is not None}
        keys = list(values)
        for i in range(0, len(keys), METRICS_PER_BATCH):
            chunk = {k: values[k] for k in keys[i:i + METRICS_PER_BATCH]}
            self._call("metrics", lambda c=chunk: self.client.log_batch(
                self.run_id, metrics=[Metric(k, v, now, step) for k, v in c.items()]),
                payload={"metrics": chunk, "step": int(step), "timestamp": now})

    def set_tags(self, tags: dict[str, str]) -> None:
        values = {k: str(v) for k, v in tags.items()}
        keys = list(values)
        for i in range(0, len(keys), TAGS_PER_BATCH):
            chunk = {k: values[k] for k in keys[i:i + TAGS_PER_BATCH]}
            self._call("tags", lambda c=chunk: self.client.log_batch(
                self.run_id, tags=[RunTag(k, v) for k, v in c.items()]), payload={"tags": chunk})

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> bool:
        """True when logged; False when recorded for ``medrobust sync`` (the file must stay where it is)."""
        return self._call("artifact", lambda: self.client.log_artifact(self.run_id, str(path), artifact_path),
                          payload={"path": str(Path(path).resolve()), "artifact_path": artifact_path})

    def log_artifacts(self, folder: str | Path, artifact_path: str | None = None) -> bool:
        """Every file under ``folder`` (its sub-folders kept under ``artifact_path``), one file at a time, so
        that what fails is recorded file by file; ``unlogged*.json`` files are left out. True when all logged."""
        folder = Path(folder)
        ok = True
        for path in sorted(p for p in folder.rglob("*") if p.is_file()):
            if path.parent == folder and is_journal(path):
                continue
            sub = path.parent.relative_to(folder).as_posix()
            target = "/".join(part for part in (artifact_path, "" if sub == "." else sub) if part) or None
            ok = self.log_artifact(path, target) and ok
        return ok

    def log_dataset(self, name: str, source: str, splits: dict[str, list[dict[str, Any]]],
                    context: str = "training") -> None:
        """The data as an MLflow dataset input (the run page's "Datasets"): name, source, content digest, and
        the number of samples per split in its profile."""
        sizes = {k: len(v) for k, v in splits.items()}
        record = {"dataset": name, "digest": dataset_digest(splits), "source_type": "local",
                  "source": json.dumps({"uri": source}),
                  "profile": json.dumps({"num_rows": sum(sizes.values()), "splits": sizes}), "context": context}
        self._call("dataset", lambda: self.client.log_inputs(self.run_id, datasets=[dataset_input(record)]),
                   payload=record)

    def log_model(self, network, example: np.ndarray, metadata: dict[str, Any] | None = None,
                  variable_size: bool = False, name: str = "model") -> None:
        """The network (on the CPU, eval mode) via ``mlflow.pytorch`` as a regular (pickled) PyTorch module:
        ``mlflow.pytorch.load_model`` gives back a module that ``.eval()``s and takes every input size the network
        takes. ``example``: a real preprocessed input (batch first); ``metadata``: class names, preprocessing.
        Not replayed by ``medrobust sync`` when it fails (the logged checkpoints hold the network)."""
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
            if self.run_id is None and kind != "run":
                raise RuntimeError("no MLflow run yet (its creation is recorded too)")
            if not self._server_up():
                raise ConnectionError(f"MLflow server unreachable ({self._down})")
            fn()
            return True
        except Exception as exc:  # noqa: BLE001 - an outage must never stop training or evaluation
            if not self._warned:
                self._warned = True
                warnings.warn(f"MLflow logging to {self.uri} failed ({type(exc).__name__}); {self.activity} goes "
                              "on, what could not be logged is recorded for a later upload", stacklevel=3)
            self.unlogged.append({"kind": kind, "error": f"{type(exc).__name__}: {str(exc)[:200]}",
                                  **(payload or {})})
            try:    # on disk at once: a run killed during the outage keeps its record for medrobust sync
                self._write_unlogged()
            except OSError as err:
                log.warning("could not write %s: %s", self.output_dir / JOURNAL, err)
            return False

    def _write_unlogged(self, final_status: bool = False) -> None:
        """Write the record. An ``unlogged.json`` of the same run left on disk by an earlier attempt (a resumed
        training) is kept in front of this session's items, less its final status when this session set a later
        one (a replay must not end the run as the attempt before did). A record of another run found there is
        moved aside to ``unlogged.run-<its run id>.json`` (``medrobust sync`` takes that file), never overwritten."""
        if not self.unlogged and not final_status:
            return
        target = self.output_dir / JOURNAL
        if self._earlier is None:
            old = read_journal(target)
            same = (old is not None and self.run_id is not None and old.get("run_id") == self.run_id
                    and old.get("tracking_uri") == self.uri)
            if old is not None and not same and old["items"] and self.unlogged:
                aside = target.with_name(f"unlogged.run-{old.get('run_id') or 'uncreated'}.json")
                target.rename(aside)
                print(f"MLflow: {target} held what another run could not log; kept as {aside} (upload it with "
                      f"medrobust sync {aside})", flush=True)
            self._earlier = list(old["items"]) if same else []
            self._ours_on_disk = same
        if final_status:
            self._earlier = [item for item in self._earlier if item.get("kind") != "status"]
        items = self._earlier + self.unlogged
        if not items:
            if self._ours_on_disk:
                target.unlink()      # its only item was a status this session has replaced
                self._ours_on_disk = False
            return
        self.output_dir.mkdir(parents=True, exist_ok=True)
        target.write_text(json.dumps({"tracking_uri": self.uri, "run_id": self.run_id, "items": items}, indent=1))
        self._ours_on_disk = True

    def summary(self) -> str | None:
        if not self.unlogged:
            return None
        kinds: dict[str, int] = {}
        for item in self.unlogged:
            kinds[item["kind"]] = kinds.get(item["kind"], 0) + 1
        counts = ", ".join(f"{n} {k}" for k, n in sorted(kinds.items()))
        kept = ("Checkpoints are on disk in" if self.activity == "training"
                else f"The {self.activity}'s files are on disk in")
        return (f"MLflow: {len(self.unlogged)} log calls to {self.uri} failed ({counts}); they are listed in "
                f"{self.output_dir / JOURNAL}. {kept} {self.output_dir}. Upload them "
                f"once the server is back with: medrobust sync {self.output_dir}"
                + (" (the model export is not replayed; the checkpoints hold the network)" if "model" in kinds else ""))


def dataset_input(record: dict[str, Any]) -> DatasetInput:
    """A recorded dataset (``log_dataset``'s payload) as MLflow's dataset input."""
    dataset = Dataset(name=record["dataset"], digest=record["digest"], source_type=record["source_type"],
                      source=record["source"], profile=record.get("profile"))
    return DatasetInput(dataset, [InputTag("mlflow.data.context", record.get("context") or "training")])


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
