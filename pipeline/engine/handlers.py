"""Small ignite/MONAI handlers that add medrobust's behaviour to the trainer through events.

- ``MethodEpochUpdate``: the method's end-of-epoch update of the per-sample state (IMA, DPAAT).
- ``BatchAverages``: per-epoch means of the method's per-batch scalars (clean/adversarial loss, ...).
- ``FiniteLossGuard``: stops the run on a NaN/inf loss or adversarial input, naming epoch, iteration, method.
- ``CheckpointEveryEpoch``: atomic checkpoints every epoch and every N iterations, plus the best one.
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
from pipeline.engine.checkpoint import save_checkpoint
from pipeline.engine.trainer import ADV, METRICS
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
    """Sample-weighted means over one epoch of the scalars a method reports per batch, as ``train_<name>``."""

    def __init__(self, prefix: str = "train_"):
        self.prefix = prefix
        self._sums: dict[str, float] = {}
        self._count = 0
        self._pending: dict[str, Any] | None = None

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_STARTED, self.reset)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self.update)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self.write)

    def state_dict(self) -> dict[str, Any]:
        return {"sums": dict(self._sums), "count": self._count}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Sums of a checkpoint written mid-epoch: the next ``reset`` (the resumed epoch's start) starts from
        them, so that the epoch's means also cover the batches trained before the interruption."""
        self._pending = state

    def reset(self, engine: Engine) -> None:
        pending, self._pending = self._pending, None
        self._sums = {str(k): float(v) for k, v in (pending or {}).get("sums", {}).items()}
        self._count = int((pending or {}).get("count", 0))

    def update(self, engine: Engine) -> None:
        out = engine.state.output
        n = int(out[Keys.IMAGE].shape[0])
        scalars = {"loss": float(out[Keys.LOSS].detach()), **out.get(METRICS, {})}
        for key, value in scalars.items():
            self._sums[key] = self._sums.get(key, 0.0) + float(value) * n
        self._count += n

    def write(self, engine: Engine) -> None:
        if self._count:
            engine.state.metrics.update({f"{self.prefix}{k}": v / self._count for k, v in self._sums.items()})


class FiniteLossGuard:
    """Raises ``NumericalFault`` before the optimiser step when the loss or the adversarial inputs are not finite."""

    def __init__(self, method_name: str):
        self.method_name = method_name

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(IterationEvents.LOSS_COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        out = engine.state.output
        where = (f"epoch {engine.state.epoch}, iteration {engine.state.iteration} "
                 f"(method {self.method_name})")
        adv = out.get(ADV)  # first: non-finite attack inputs are the cause of a non-finite loss, if any
        if adv is not None and not torch.isfinite(adv).all():
            bad = int((~torch.isfinite(adv.detach().flatten(1))).any(1).sum())
            raise NumericalFault(f"the attack produced non-finite inputs ({bad} of {adv.shape[0]} samples) at "
                                 f"{where}; training stopped before the optimiser step")
        if not torch.isfinite(out[Keys.LOSS].detach()).all():
            raise NumericalFault(f"non-finite training loss ({float(out[Keys.LOSS].detach()):.4g}) at {where}; "
                                 "training stopped before the optimiser step")


class CheckpointEveryEpoch:
    """Writes ``last.pt`` at every epoch end (and every ``every_iters`` iterations) and ``best.pt`` when the
    validator's key metric improves. ``payload(engine)`` builds the checkpoint dict."""

    def __init__(self, folder: Path, payload: Callable[[Engine], dict[str, Any]], every_iters: int = 0,
                 validator: Engine | None = None):
        self.folder = Path(folder)
        self.payload = payload
        self.every_iters = every_iters
        self.validator = validator
        self._best_epoch = -1

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
