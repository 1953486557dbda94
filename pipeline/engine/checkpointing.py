"""``Checkpoints``: the one handler that writes a training run's whole state and restores it on ``--resume``.

What a checkpoint holds: every object of ``save_dict`` through its ``state_dict`` (network, optimizer,
scheduler, AMP scaler, the method's per-sample state, the batch averages), the handler's own state under
``best`` (the validator's best metric and its epoch: without it a resumed validator starts from "no best yet"
and its first epoch would replace a better best.pt), ``epoch``, ``iteration``, ``rng`` (Python, NumPy, torch
and the training GPU's generator) and the fixed ``meta`` (config, data description, MLflow run id). An entry
that is None (no scheduler, no float16 scaler, a method without per-sample state) is written as ``{}`` and
not restored. Files are written atomically and read with ``weights_only=True`` (:mod:`pipeline.model.checkpoint`).

When: ``last.pt`` at every epoch end and every ``every_iters`` iterations inside an epoch; ``best.pt`` at the
epoch end whose validation set a new best (every epoch without a validator). Attach after the handlers whose
effect the epoch's checkpoint must hold (the scheduler's step, the method's epoch update, the metrics).

DDP: every rank builds the checkpoint, rank 0 alone writes it, because building it holds collectives: the
batch averages' totals are summed over the ranks, and a mid-epoch checkpoint first combines every rank's
per-sample records of the epoch so far (``SampleState.sync_``). Attach on every rank.

Restore: ``Checkpoints.load`` reads the file and checks it holds a training state, before anything starts;
then, at the trainer's STARTED on every rank: every entry of ``save_dict``, the best metric, epoch and
iteration, the RNG states last. A checkpoint written mid-epoch resumes inside that epoch: the sampler skips
the samples already trained on (once) and the ignite metrics (the batch averages) start from the totals they
had. One written at an epoch end leaves the metrics alone: they reset at the next epoch's start.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ignite.engine import Engine, Events
from ignite.metrics import Metric

from pipeline.adversarial.state import SampleState
from pipeline.engine import distributed as dist
from pipeline.errors import InputError
from pipeline.model.checkpoint import load_checkpoint, rng_state, save_checkpoint, set_rng_state

REQUIRED = ("network", "optimizer", "epoch", "iteration")


class Checkpoints:
    def __init__(self, folder: Path, save_dict: dict[str, Any], meta: dict[str, Any], *, every_iters: int = 0,
                 validator: Engine | None = None, resume: dict[str, Any] | None = None):
        self.folder = Path(folder)
        self.save_dict = {**save_dict, "best": self}
        self.meta = meta
        self.every_iters = every_iters
        self.validator = validator
        self.resume = resume
        self._best_epoch = -1

    @staticmethod
    def load(path: str | Path) -> dict[str, Any]:
        """The checkpoint to resume from (read with ``weights_only=True``), checked for the training state."""
        ckpt = load_checkpoint(path)
        missing = [key for key in REQUIRED if key not in ckpt]
        if missing:
            raise InputError(f"{path}: cannot resume: no {', '.join(missing)} in the checkpoint (a copy without the "
                             "training state, such as the MLflow artifact); resume from the run's checkpoints/last.pt")
        return ckpt

    @property
    def last(self) -> Path:
        return self.folder / "last.pt"

    @property
    def best(self) -> Path:
        return self.folder / "best.pt"

    def attach(self, engine: Engine) -> None:
        if self.resume is not None:
            engine.add_event_handler(Events.STARTED, self.restore, self.resume)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self.epoch_completed)
        if self.every_iters:
            engine.add_event_handler(Events.ITERATION_COMPLETED(every=self.every_iters), self.iteration_completed)

    # -- the handler's own state: the validator's best metric ----------------------------------------------
    def state_dict(self) -> dict[str, float | int]:
        state = getattr(self.validator, "state", None)
        return {"best_metric": float(getattr(state, "best_metric", -1)),
                "best_metric_epoch": int(getattr(state, "best_metric_epoch", -1))}

    def load_state_dict(self, state: dict[str, float | int]) -> None:
        if self.validator is not None:
            self.validator.state.best_metric = float(state["best_metric"])
            self.validator.state.best_metric_epoch = int(state["best_metric_epoch"])
            self._best_epoch = int(state["best_metric_epoch"])

    # -- save ----------------------------------------------------------------------------------------------
    def checkpoint(self, engine: Engine, *, mid_epoch: bool = False) -> dict[str, Any]:
        """The checkpoint of this moment; a collective under DDP (see the module note): call it on every rank."""
        if mid_epoch and dist.world_size() > 1:
            for obj in self.save_dict.values():
                if isinstance(obj, SampleState):
                    obj.sync_()
        states = {key: {} if obj is None else obj.state_dict() for key, obj in self.save_dict.items()}
        return {**states, "epoch": engine.state.epoch, "iteration": engine.state.iteration, **self.meta,
                "rng": rng_state(engine.state.device)}

    def iteration_completed(self, engine: Engine) -> None:
        if engine.state.iteration % engine.state.epoch_length:   # the epoch-end save covers the last one
            payload = self.checkpoint(engine, mid_epoch=True)
            if dist.is_main():
                save_checkpoint(self.last, payload)

    def epoch_completed(self, engine: Engine) -> None:
        payload = self.checkpoint(engine)
        best_epoch = getattr(getattr(self.validator, "state", None), "best_metric_epoch", -1)
        new_best = self.validator is None or (best_epoch == engine.state.epoch and best_epoch != self._best_epoch)
        if dist.is_main():
            save_checkpoint(self.last, payload)
            if new_best:
                save_checkpoint(self.best, payload)
        if new_best:
            self._best_epoch = engine.state.epoch

    # -- restore -------------------------------------------------------------------------------------------
    def restore(self, engine: Engine, ckpt: dict[str, Any]) -> None:
        """Continue from ``ckpt`` (at STARTED: before the first epoch's data loader iterator is made)."""
        epoch_length = engine.state.epoch_length or len(engine.data_loader)
        iteration, epoch = int(ckpt["iteration"]), int(ckpt["epoch"])
        done_in_epoch = iteration - (epoch - 1) * epoch_length
        mid_epoch = 0 < done_in_epoch < epoch_length
        for key, obj in self.save_dict.items():
            if obj is None or not ckpt.get(key) or (isinstance(obj, Metric) and not mid_epoch):
                continue
            obj.load_state_dict(ckpt[key])
        if mid_epoch:   # finish that epoch without the samples it had trained on
            engine.data_loader.sampler.skip_once(done_in_epoch * engine.data_loader.batch_size)
            epoch -= 1
        engine.state.iteration, engine.state.epoch = iteration, epoch
        if ckpt.get("rng"):
            set_rng_state(ckpt["rng"], engine.state.device)
