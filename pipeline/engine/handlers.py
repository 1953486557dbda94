"""Small ignite/MONAI handlers that add medrobust's behaviour to the trainer through events.

- ``MethodEpochUpdate``: the method's end-of-epoch update of the per-sample state (IMA, DPAAT).
- ``BatchAverages``: per-epoch means of the method's per-batch scalars (clean/adversarial loss, ...), over
  all DDP ranks.
- ``FiniteLossGuard``: stops the run (every DDP rank at once) on a NaN/inf loss or adversarial input, naming
  epoch, iteration, method.
- ``CheckpointEveryEpoch``: atomic checkpoints every epoch and every N iterations, plus the best one; the
  validator's best metric travels in the checkpoint, so a resumed run keeps the best.pt it had.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from ignite.engine import Engine, Events
from monai.engines.utils import IterationEvents
from monai.utils.enums import CommonKeys as Keys

from pipeline.adversarial.methods.base import Method
from pipeline.engine import distributed as dist
from pipeline.model.checkpoint import save_checkpoint
from pipeline.names import Keys as Ours
from pipeline.errors import NumericalFault

log = logging.getLogger(__name__)


class MethodEpochUpdate:
    def __init__(self, method: Method):
        self.method = method

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        engine.state.metrics.update(self.method.epoch_completed())


class BatchAverages:
    """Sample-weighted means over one epoch of the scalars a method reports per batch, as ``train_<name>``.

    Under DDP the means cover every rank's batches: sums and sample counts are all-reduced at the epoch end and,
    with ``sync_every``, every that many iterations (so that a mid-epoch checkpoint, written by rank 0, holds all
    ranks' batches so far). Both are collectives: attach on every rank; every rank reports the same scalars.
    """

    def __init__(self, prefix: str = "train_", sync_every: int = 0):
        self.prefix = prefix
        self.sync_every = sync_every
        self._synced: dict[str, float] = {}   # over all ranks, up to the last sync
        self._synced_count = 0
        self._sums: dict[str, float] = {}     # this rank's batches since the last sync
        self._count = 0
        self._pending: dict[str, Any] | None = None

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_STARTED, self.reset)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self.update)
        if self.sync_every and dist.world_size() > 1:
            engine.add_event_handler(Events.ITERATION_COMPLETED(every=self.sync_every), self.sync)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self.write)

    def state_dict(self) -> dict[str, Any]:
        sums = dict(self._synced)
        for key, value in self._sums.items():
            sums[key] = sums.get(key, 0.0) + value
        return {"sums": sums, "count": self._synced_count + self._count}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Sums of a checkpoint written mid-epoch: the next ``reset`` (the resumed epoch's start) starts from
        them, so that the epoch's means also cover the batches trained before the interruption."""
        self._pending = state

    def reset(self, engine: Engine) -> None:
        pending, self._pending = self._pending, None
        self._synced = {str(k): float(v) for k, v in (pending or {}).get("sums", {}).items()}
        self._synced_count = int((pending or {}).get("count", 0))
        self._sums, self._count = {}, 0

    def update(self, engine: Engine) -> None:
        out = engine.state.output
        n = int(out[Keys.IMAGE].shape[0])
        scalars = {"loss": float(out[Keys.LOSS].detach()), **out.get(Ours.METRICS, {})}
        for key, value in scalars.items():
            self._sums[key] = self._sums.get(key, 0.0) + float(value) * n
        self._count += n

    def sync(self, engine: Engine) -> None:
        """Adds every rank's batches since the last sync to the all-rank sums (a no-op with one process)."""
        if dist.world_size() == 1:
            return
        keys = sorted(self._sums)
        local = torch.tensor([self._count, *(self._sums[k] for k in keys)], dtype=torch.float64)
        count, *sums = dist.sum_over_ranks(local).tolist()
        for key, value in zip(keys, sums):
            self._synced[key] = self._synced.get(key, 0.0) + value
        self._synced_count += int(round(count))
        self._sums, self._count = {}, 0

    def write(self, engine: Engine) -> None:
        self.sync(engine)
        totals = self.state_dict()
        if totals["count"]:
            engine.state.metrics.update({f"{self.prefix}{k}": v / totals["count"] for k, v in totals["sums"].items()})


class FiniteLossGuard:
    """Raises ``NumericalFault`` before the optimiser step when the loss or the adversarial inputs are not finite.

    Under DDP the verdict is all-reduced, so every rank raises at the same iteration (a rank that went on to the
    backward pass would wait forever in DDP's gradient all-reduce): one small collective per iteration.
    """

    def __init__(self, method_name: str):
        self.method_name = method_name

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(IterationEvents.LOSS_COMPLETED, self)

    @staticmethod
    def counts(out: dict) -> tuple[int, int, int]:
        """(non-finite adversarial samples, adversarial samples, ranks with a non-finite loss) over all ranks."""
        loss = out[Keys.LOSS].detach()
        adv = out.get(Ours.ADV)
        if adv is None:
            bad_adv = n_adv = torch.zeros((), dtype=torch.int64, device=loss.device)
        else:
            bad_adv = (~torch.isfinite(adv.detach().flatten(1))).any(1).sum()
            n_adv = torch.tensor(adv.shape[0], device=bad_adv.device)
        local = torch.stack([bad_adv.to(loss.device), n_adv.to(loss.device), (~torch.isfinite(loss)).any().long()])
        bad, n, bad_loss = dist.sum_over_ranks(local).tolist()
        return int(bad), int(n), int(bad_loss)

    def __call__(self, engine: Engine) -> None:
        out = engine.state.output
        bad, n, bad_loss = self.counts(out)
        if not (bad or bad_loss):
            return
        where = (f"epoch {engine.state.epoch}, iteration {engine.state.iteration} "
                 f"(method {self.method_name})")
        ranks = f" over {dist.world_size()} ranks" if dist.world_size() > 1 else ""
        if bad:  # first: non-finite attack inputs are the cause of a non-finite loss, if any
            raise NumericalFault(f"the attack produced non-finite inputs ({bad} of {n} samples{ranks}) at "
                                 f"{where}; training stopped before the optimiser step")
        value = f"{float(out[Keys.LOSS].detach()):.4g}"
        if ranks:
            value = f"on {bad_loss} of {dist.world_size()} ranks; rank {dist.rank()}: {value}"
        raise NumericalFault(f"non-finite training loss ({value}) at {where}; "
                             "training stopped before the optimiser step")


class CheckpointEveryEpoch:
    """Writes ``last.pt`` at every epoch end (and every ``every_iters`` iterations) and ``best.pt`` when the
    validator's key metric improves. ``payload(engine)`` builds the checkpoint dict.

    ``state_dict`` (into the payload) and ``load_state_dict`` (on resume, every rank) carry the validator's best
    metric and its epoch: without them a resumed validator starts from "no best yet" and its first epoch would
    replace a better best.pt."""

    def __init__(self, folder: Path, payload: Callable[[Engine], dict[str, Any]], every_iters: int = 0,
                 validator: Engine | None = None):
        self.folder = Path(folder)
        self.payload = payload
        self.every_iters = every_iters
        self.validator = validator
        self._best_epoch = -1

    def state_dict(self) -> dict[str, float | int]:
        state = getattr(self.validator, "state", None)
        return {"best_metric": float(getattr(state, "best_metric", -1)),
                "best_metric_epoch": int(getattr(state, "best_metric_epoch", -1))}

    def load_state_dict(self, state: dict[str, float | int]) -> None:
        if self.validator is not None and state:
            self.validator.state.best_metric = float(state["best_metric"])
            self.validator.state.best_metric_epoch = int(state["best_metric_epoch"])
            self._best_epoch = int(state["best_metric_epoch"])

    @property
    def last(self) -> Path:
        return self.folder / "last.pt"

    @property
    def best(self) -> Path:
        return self.folder / "best.pt"

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_COMPLETED, self.epoch_completed)
        if self.every_iters:
            engine.add_event_handler(Events.ITERATION_COMPLETED(every=self.every_iters), self.iteration_completed)

    def iteration_completed(self, engine: Engine) -> None:
        if engine.state.iteration % engine.state.epoch_length:  # the epoch-end save covers the last one
            save_checkpoint(self.last, self.payload(engine))

    def epoch_completed(self, engine: Engine) -> None:
        payload = self.payload(engine)
        save_checkpoint(self.last, payload)
        state = getattr(self.validator, "state", None)
        best_epoch = getattr(state, "best_metric_epoch", -1)
        if self.validator is None or (best_epoch == engine.state.epoch and best_epoch != self._best_epoch):
            save_checkpoint(self.best, payload)
            self._best_epoch = engine.state.epoch
