"""Small ignite/MONAI handlers that add medrobust's behaviour to the trainer through events.

- ``MethodEpochUpdate``: the method's end-of-epoch update of the per-sample state (IMA, DPAAT).
- ``BatchAverages``: per-epoch means of the method's per-batch scalars (clean/adversarial loss, ...), over
  all DDP ranks: an ignite ``Metric``.
- ``LearningRate``: the epoch's learning rate as the metric ``lr``.
- ``FiniteLossGuard``: stops the run (every DDP rank at once) on a NaN/inf loss or adversarial input, naming
  epoch, iteration, method.
- ``Progress``: ignite's progress bar over the epoch's batches and a one-line summary per epoch.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from ignite.engine import Engine, Events
from ignite.handlers import ProgressBar
from ignite.metrics.metric import EpochWise, Metric, reinit__is_reduced, sync_all_reduce
from monai.engines.utils import IterationEvents
from monai.utils.enums import CommonKeys as Keys

from pipeline.adversarial.methods.base import Method
from pipeline.engine import distributed as dist
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


def batch_scalars(output: dict) -> tuple[int, dict[str, float]]:
    """(samples in the batch, {"loss": ..., the method's per-batch scalars}) from a training step's output."""
    scalars = {"loss": float(output[Keys.LOSS].detach())}
    scalars.update({str(k): float(v) for k, v in output.get(Ours.METRICS, {}).items()})
    return int(output[Keys.IMAGE].shape[0]), scalars


class BatchAverages(Metric):
    """Sample-weighted means over one epoch of the scalars a method reports per batch, as ``train_<name>``.

    An ignite ``Metric``: per rank, the sample count and the sums of ``loss`` and of the method's scalars, in one
    float64 vector over the names in sorted order (every rank reports the same names); ``compute`` all-reduces
    it (``sync_all_reduce``), so the means cover every DDP rank's batches and every rank writes the same values.

    ``state_dict`` is that all-rank total so far, ``{"sums": {name: sum}, "count": n}``: what a mid-epoch
    checkpoint keeps. Under DDP it is a collective, called on every rank (``Checkpoints`` builds its checkpoint
    on every rank; rank 0 writes it). ``load_state_dict`` takes a mid-epoch checkpoint's totals: the next reset,
    the resumed epoch's start, begins from them (added to this run's sums, never all-reduced again).
    """

    required_output_keys = None   # the output transform gives a (count, scalars) tuple

    def __init__(self, prefix: str = "train_"):
        self.prefix = prefix
        self._resumed: dict[str, Any] | None = None
        super().__init__(output_transform=batch_scalars, skip_unrolling=True, metrics_result_mode="flatten")

    def attach(self, engine: Engine, name: str = "batch_averages", usage=EpochWise()) -> None:
        super().attach(engine, name, usage)

    @reinit__is_reduced
    def reset(self) -> None:
        start, self._resumed = self._resumed or {"sums": {}, "count": 0}, None
        self._names = sorted(start["sums"])
        # [count, *sums]: every rank's before a resume (the same on every rank), and this rank's own since
        self._before = torch.tensor([float(start["count"]), *(float(start["sums"][k]) for k in self._names)],
                                    dtype=torch.float64)
        self._totals = torch.zeros_like(self._before)

    @reinit__is_reduced
    def update(self, output: tuple[int, dict[str, float]]) -> None:
        n, scalars = output
        if not scalars.keys() <= set(self._names):   # a name reported for the first time: a new slot
            names = sorted({*self._names, *scalars})
            self._before, self._totals = (self._widen(t, names) for t in (self._before, self._totals))
            self._names = names
        self._totals += torch.tensor([1.0, *(scalars.get(k, 0.0) for k in self._names)], dtype=torch.float64) * n

    def _widen(self, vector: torch.Tensor, names: list[str]) -> torch.Tensor:
        old = dict(zip(self._names, vector[1:].tolist()))
        return torch.tensor([float(vector[0]), *(old.get(k, 0.0) for k in names)], dtype=torch.float64)

    @sync_all_reduce("_totals")
    def _all_ranks(self) -> torch.Tensor:
        return self._totals.cpu()

    def state_dict(self) -> dict[str, Any]:  # type: ignore[override]
        count, *sums = (self._before + self._all_ranks()).tolist()
        return {"sums": dict(zip(self._names, sums)), "count": int(round(count))}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:  # type: ignore[override]
        self._resumed = {"sums": {str(k): float(v) for k, v in state_dict.get("sums", {}).items()},
                         "count": int(state_dict.get("count", 0))}

    def compute(self) -> dict[str, float]:
        totals = self.state_dict()
        count = totals["count"]
        return {f"{self.prefix}{k}": v / count for k, v in totals["sums"].items()} if count else {}


class LearningRate:
    """Writes the learning rate the epoch trained with (the first parameter group's) as ``lr`` into the
    trainer's metrics at every epoch end; attach before the scheduler's step (``LrScheduleHandler``)."""

    def __init__(self, optimizer: torch.optim.Optimizer):
        self.optimizer = optimizer

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        engine.state.metrics["lr"] = float(self.optimizer.param_groups[0]["lr"])


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


class Progress:
    """A progress bar (ignite's ``ProgressBar``) with the batch loss, and the metrics of the trainer and the
    validator printed at every epoch end."""

    def __init__(self, validator: Engine | None = None):
        self.validator = validator

    def attach(self, engine: Engine) -> None:
        ProgressBar(persist=False, desc="train").attach(engine, output_transform=self.loss)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self.summary)

    @staticmethod
    def loss(output: dict) -> dict[str, float]:
        return {"loss": float(output[Keys.LOSS].detach())}

    def summary(self, engine: Engine) -> None:
        merged = {**engine.state.metrics, **(self.validator.state.metrics if self.validator is not None else {})}
        shown = {k: round(float(v), 4) for k, v in merged.items() if isinstance(v, (int, float))}
        took = engine.state.times.get(Events.EPOCH_COMPLETED.name) or 0.0
        print(f"epoch {engine.state.epoch}/{engine.state.max_epochs} ({took:.1f} s): {shown}", flush=True)
