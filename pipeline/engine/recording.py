"""A training run's MLflow run, opened and ended; what happens in between is the per-epoch handler's
(:class:`pipeline.tracking.handler.MlflowTracking`).

* ``start_run``: the run (a new one, or the checkpoint's when resuming) with params, tags, the dataset of a
  new run, and the resolved ``config.yaml``.
* ``ended_as``: a run that raises ends FAILED on a numerical fault (whose message then says which checkpoint
  is kept) and KILLED on anything else.
* ``finish_run``: a finished run logs its final weights (slim copies of last.pt and, when it is another epoch,
  best.pt; a local copy stays only while it could not be logged), the model when ``tracking.log_model``, ends
  FINISHED and prints where everything is.

Everything goes through ``TrackingSession``; ``session`` is None on the DDP ranks other than 0, where every
function here does nothing.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml
from torch import nn

from pipeline.config import Config
from pipeline.engine.checkpointing import Checkpoints
from pipeline.engine.data import RunData
from pipeline.errors import NumericalFault
from pipeline.model.describe import input_example, model_metadata
from pipeline.model.network_def import takes_any_size
from pipeline.model.weights import final_weights
from pipeline.tracking.session import TrackingSession


def start_run(session: TrackingSession | None, cfg: Config, run_name: str, output_dir: Path, data: RunData,
              resume: dict[str, Any] | None = None) -> str | None:
    """The MLflow run id (None on ranks other than 0); ``resume``: the checkpoint a resumed run continues, whose
    MLflow run it logs into."""
    if session is None:
        return None
    run_id = session.start(run_name, cfg.resolved(), tags={
        "medrobust.method": cfg.method.name, "medrobust.task": cfg.task,
        "medrobust.dataset": cfg.data.dataset_tag(), "medrobust.experiment": cfg.experiment,
        "medrobust.output_dir": str(output_dir.resolve())}, run_id=resume.get("mlflow_run_id") if resume else None)
    if resume is None:
        splits = data.splits
        session.log_dataset(cfg.data.dataset_tag(), str(Path(cfg.data.root).resolve()) if cfg.data.root
                            else f"{cfg.data.source} (generated in memory)",
                            {"train": splits.train, "val": splits.val, "test": splits.test})
    output_dir.mkdir(parents=True, exist_ok=True)
    resolved = output_dir / "config.yaml"
    resolved.write_text(yaml.safe_dump(cfg.resolved(), sort_keys=False))
    session.log_artifact(resolved)
    return run_id


@contextmanager
def ended_as(session: TrackingSession | None, checkpoints: Checkpoints) -> Iterator[None]:
    try:
        yield
    except NumericalFault as exc:
        if session is not None:
            session.end("FAILED")
        kept = (f"the last good checkpoint is kept: {checkpoints.last}" if checkpoints.last.exists()
                else "no checkpoint had been written yet")
        raise NumericalFault(f"{exc}; {kept}") from None
    except BaseException:
        if session is not None:
            session.end("KILLED")
        raise


def finish_run(session: TrackingSession | None, run_id: str | None, cfg: Config, checkpoints: Checkpoints,
               network: nn.Module, data: RunData, output_dir: Path) -> None:
    if session is None:
        return
    to_log = output_dir / "to_log"
    for path in final_weights(checkpoints.last, checkpoints.best, to_log):
        if session.log_artifact(path, "checkpoints"):
            path.unlink()
    if not any(to_log.iterdir()):
        to_log.rmdir()
    if cfg.tracking.log_model:
        session.log_model(network, input_example(data.example_image(), data.info.get("patch_size")),
                          metadata=model_metadata(cfg, data.info), variable_size=takes_any_size(cfg.model))
    session.end("FINISHED")
    note = session.summary()
    if note:
        print(note)
    print(f"run {run_id} finished: MLflow {session.uri}, experiment '{cfg.tracking.experiment or cfg.experiment}'; "
          f"outputs in {output_dir}\nMLflow run: {session.run_url()}\n"
          f"evaluate it with: medrobust evaluate {output_dir / 'config.yaml'} --run-id {run_id}", flush=True)
