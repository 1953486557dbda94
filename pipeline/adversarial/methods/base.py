"""The interface every adversarial training method implements (one small class per method)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field

import torch

from pipeline.adversarial.state import SampleState
from pipeline.adversarial.tasks import Task
from pipeline.config import MethodConfig


@dataclass
class MethodOutput:
    loss: torch.Tensor                 # scalar, to be back-propagated into the parameters
    pred: torch.Tensor                 # network output on the clean inputs (for metrics and handlers)
    adv: torch.Tensor | None = None    # adversarial inputs (for image grids), detached
    metrics: dict[str, float] = field(default_factory=dict)  # per-batch scalars: clean_loss, adv_loss, ...


class Method(ABC):
    """One adversarial training method.

    ``loss`` computes the training loss of one batch (it may run attacks; attacks never produce parameter
    gradients). ``roi`` (optional): the batch's region-of-interest mask (B, 1, *spatial); every method passes it
    to the task's losses (segmentation: only ROI pixels count) and to its attacks (perturbation inside it only).
    ``epoch_completed`` applies the end-of-epoch update of the per-sample state and returns scalars to log (eps
    mean/percentiles, tau, ...). ``state`` is None for methods without per-sample state.
    """

    name: str = ""

    def __init__(self, task: Task, cfg: MethodConfig, state: SampleState | None = None):
        self.task = task
        self.cfg = cfg
        self.state = state

    @abstractmethod
    def loss(self, model: torch.nn.Module, inputs: torch.Tensor, targets: torch.Tensor,
             index: torch.Tensor, roi: torch.Tensor | None = None) -> MethodOutput: ...

    def epoch_completed(self) -> dict[str, float]:
        """The per-sample state's end of epoch, in one place for every method: combine the ranks' records
        (DDP), apply the method's :meth:`update` rule, summarise (eps percentiles, tau, fractions), clear the
        epoch's records. Returns the summary to log ({} for methods without state)."""
        state = self.state
        if state is None:
            return {}
        state.sync_()
        self.update(state)
        state.epoch += 1
        summary = state.summary()
        state.reset_epoch()
        return summary

    def update(self, state: SampleState) -> None:
        """The method's end-of-epoch rule on the epoch's records (radii, tau); none by default."""
