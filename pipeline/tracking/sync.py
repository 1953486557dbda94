"""``medrobust sync OUTPUT_DIR``: upload what a run could not log while its tracking server was away.

``TrackingSession`` (training and evaluation alike) records each failed call with its content in
``<output_dir>/unlogged.json``; this replays them in order into the same run: the creation of an evaluation run
that could not be created, params, metrics with their steps, tags, dataset records, artifacts with their
artifact path, and the final status. The file is rewritten with whatever still fails (exit 1: run it again
later), or renamed ``unlogged.synced-<time>.json`` once everything is in. The ``mlflow.pytorch`` model export is
not replayed (the logged checkpoints hold the network), nor are items recorded without their content by an
older medrobust.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient

from pipeline.errors import InputError
from pipeline.tracking.session import JOURNAL, _is_remote, dataset_input, get_or_create_experiment, probe

# what each kind of item must carry to be replayed
NEEDS = {"run": "experiment", "params": "params", "metrics": "metrics", "tags": "tags", "artifact": "path",
         "dataset": "digest", "status": None}


def _replay(client: MlflowClient, run_id: str, item: dict[str, Any]) -> None:
    kind = item["kind"]
    if kind == "params":
        client.log_batch(run_id, params=[Param(k, str(v)) for k, v in item["params"].items()])
    elif kind == "metrics":
        stamp = int(item.get("timestamp") or time.time() * 1000)
        client.log_batch(run_id, metrics=[Metric(k, float(v), stamp, int(item["step"]))
                                          for k, v in item["metrics"].items()])
    elif kind == "tags":
        client.log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in item["tags"].items()])
    elif kind == "artifact":
        client.log_artifact(run_id, item["path"], item.get("artifact_path"))
    elif kind == "dataset":
        client.log_inputs(run_id, datasets=[dataset_input(item)])
    elif kind == "status":
        client.set_terminated(run_id, item.get("status") or "FINISHED")
    else:
        raise AssertionError(kind)


def _create_run(client: MlflowClient, item: dict[str, Any]) -> str:
    """The run an evaluation could not create: in its experiment, with its name and tags."""
    exp_id = get_or_create_experiment(client, item["experiment"])
    return client.create_run(exp_id, run_name=item.get("run_name"), tags=dict(item.get("tags") or {})).info.run_id


def _steps(item: dict[str, Any]) -> list[dict[str, Any]]:
    """A recorded run creation is two steps, the creation and its status, so that a status that fails is
    retried later without creating the run twice."""
    if item.get("kind") == "run" and item.get("status"):
        return [{k: v for k, v in item.items() if k != "status"}, {"kind": "status", "status": item["status"]}]
    return [item]


def sync(output_dir: str | Path, tracking_uri: str | None = None) -> tuple[int, int]:
    """Returns (uploaded, still failing). ``output_dir``: a run's folder (its ``unlogged.json``), or a record
    file itself (e.g. ``unlogged.run-<id>.json``, another run's record kept aside)."""
    path = Path(output_dir)
    path = path if path.suffix == ".json" and path.is_file() else path / JOURNAL
    if not path.is_file():
        raise InputError(f"{path}: nothing to sync (no {JOURNAL} in that folder)")
    try:
        record = json.loads(path.read_text())
        run_id, items = record["run_id"], [step for item in record["items"] for step in _steps(item)]
    except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as exc:
        raise InputError(f"{path}: not a medrobust unlogged record ({exc})") from None
    uri = tracking_uri or record.get("tracking_uri")
    if uri and _is_remote(uri):
        reason = probe(uri)
        if reason is not None:
            raise InputError(f"{path}: MLflow server {uri} is still unreachable ({reason}); nothing uploaded")
    client = MlflowClient(tracking_uri=uri)
    left, done, dropped = [], 0, []
    for item in items:
        kind = item.get("kind")
        if kind not in NEEDS or (NEEDS[kind] and NEEDS[kind] not in item):
            dropped.append(str(kind))  # the model export, or an item recorded without its content
            continue
        if run_id is None and kind != "run":
            left.append({**item, "error": "its run could not be created yet"})
            continue
        try:
            if kind == "run":
                run_id = _create_run(client, item)
            else:
                _replay(client, run_id, item)
            done += 1
        except Exception as exc:  # noqa: BLE001 - keep what still fails for the next sync
            left.append({**item, "error": f"{type(exc).__name__}: {str(exc)[:200]}"})
    if dropped:
        kinds = ", ".join(sorted(set(dropped)))
        print(f"{len(dropped)} recorded item(s) cannot be replayed and were left out ({kinds}: the model export "
              "is not replayed, the checkpoints hold the network; older records lack the content)")
    if left:
        path.write_text(json.dumps({**record, "tracking_uri": uri, "run_id": run_id, "items": left}, indent=1))
    else:
        path.rename(path.with_name(f"unlogged.synced-{time.strftime('%Y%m%d-%H%M%S')}.json"))
    return done, len(left)
