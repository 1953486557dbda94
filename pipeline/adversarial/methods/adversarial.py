"""What the attacking methods share: beta, the attack settings resolved once from the config, the clean forward
that records the BatchNorm statistics the attack will use, batch metrics."""

from __future__ import annotations

import torch

from pipeline.adversarial.context import BatchStatistics
from pipeline.adversarial.methods.base import Method
from pipeline.adversarial.state import SampleState
from pipeline.adversarial.tasks import Task
from pipeline.config import MethodConfig


class AttackingMethod(Method):
    """A method that runs attacks. ``clamp``: valid intensity range of the inputs (None: no clamp).

    ``bn`` (``method.attack_bn``, else ``default_bn``): the BatchNorm rule of every attack forward, flag and
    bisection of the method (see :mod:`pipeline.adversarial.context`); ``attack_loss`` (``method.attack_loss``,
    else :meth:`default_attack_loss`) what the attack maximises.
    """

    default_beta: float = 0.5
    default_bn: str = "running"

    def __init__(self, task: Task, cfg: MethodConfig, state: SampleState | None = None,
                 clamp: tuple[float, float] | None = None):
        super().__init__(task, cfg, state)
        self.clamp = None if clamp is None else (float(clamp[0]), float(clamp[1]))
        self.beta = self.default_beta if cfg.beta is None else cfg.beta
        self.bn = cfg.attack_bn or self.default_bn
        self.attack_loss = cfg.attack_loss or self.default_attack_loss(task)

    def default_attack_loss(self, task: Task) -> str:
        return "ce"

    def attack_kwargs(self) -> dict:
        cfg = self.cfg
        return dict(task=self.task, norm=cfg.norm, steps=cfg.steps, alpha=cfg.alpha,
                    random_start=cfg.random_start, loss=self.attack_loss, clamp=self.clamp, bn=self.bn)

    def clean_forward(self, model: torch.nn.Module, inputs: torch.Tensor) -> tuple[torch.Tensor, BatchStatistics | None]:
        """The training forward on the clean batch; with ``bn='batch'`` also the statistics it normalised with."""
        if self.bn != "batch":
            return model(inputs), None
        with BatchStatistics(model) as stats:
            pred = model(inputs)
        return pred, stats

    def state_on(self, device: torch.device) -> SampleState:
        if self.state.eps.device != device:
            self.state.to_(device)
        return self.state


def batch_metrics(**values: torch.Tensor) -> dict[str, float]:
    """Scalars for logging, read with one host sync."""
    numbers = torch.stack([v.detach().float().reshape(()) for v in values.values()]).tolist()
    return dict(zip(values, numbers))
