"""``medrobust sync OUTPUT_DIR``: upload what a run could not log while its tracking server was away.

``TrackingSession`` records each failed call in ``<output_dir>/unlogged.json``; this replays the metrics,
tags, artifacts and the final status into the same run, and rewrites the file with whatever still fails. The
``mlflow.pytorch`` model export is not replayed (the logged checkpoints hold the network).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from mlflow.entities import Metric, RunTag
from mlflow.tracking import MlflowClient

from pipeline.errors import InputError
from pipeline.tracking.session import _is_remote, probe


def sync(output_dir: str | Path, tracking_uri: str | None = None) -> tuple[int, int]:
    """Returns (uploaded, still failing)."""
    path = Path(output_dir) / "unlogged.json"
    if not path.is_file():
        raise InputError(f"{path}: nothing to sync (no unlogged.json in that folder)")
    try:
        record = json.loads(path.read_text())
        run_id, items = record["run_id"], record["items"]
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise InputError(f"{path}: not a medrobust unlogged record ({exc})") from None
    uri = tracking_uri or record.get("tracking_uri")
    if uri and _is_remote(uri):
        reason = probe(uri)
        if reason is not None:
            raise InputError(f"{path}: MLflow server {uri} is still unreachable ({reason}); nothing uploaded")
    client = MlflowClient(tracking_uri=uri)
    left, done = [], 0
    for item in items:
        if item.get("kind") == "model":  # the mlflow.pytorch export is not replayed: the checkpoint holds the model
            continue
        try:
            if "metrics" in item:
                now = int(time.time() * 1000)
                client.log_batch(run_id, metrics=[Metric(k, float(v), now, int(item["step"]))
                                                  for k, v in item["metrics"].items()])
            elif "path" in item:
                client.log_artifact(run_id, item["path"], item.get("artifact_path"))
            elif "tags" in item:
                client.log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in item["tags"].items()])
            elif item.get("kind") == "status":
                client.set_terminated(run_id, item.get("status", "FINISHED"))
            else:
                left.append(item)
                continue
            done += 1
        except Exception as exc:  # noqa: BLE001 - keep what still fails for the next sync
            left.append({**item, "error": f"{type(exc).__name__}: {str(exc)[:200]}"})
    if left:
        path.write_text(json.dumps({**record, "tracking_uri": uri, "items": left}, indent=1))
    else:
        path.rename(path.with_name(f"unlogged.synced-{time.strftime('%Y%m%d-%H%M%S')}.json"))
    return done, len(left)
