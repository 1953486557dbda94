"""What the attacking methods share: the method's beta, the attack settings from the config, batch metrics."""

from __future__ import annotations

import torch

from pipeline.adversarial.methods.base import Method
from pipeline.adversarial.state import SampleState
from pipeline.adversarial.tasks import Task
from pipeline.config import MethodConfig


class AttackingMethod(Method):
    """A method that runs attacks. ``clamp``: valid intensity range of the inputs (None: no clamp)."""

    default_beta: float = 0.5

    def __init__(self, task: Task, cfg: MethodConfig, state: SampleState | None = None,
                 clamp: tuple[float, float] | None = None):
        super().__init__(task, cfg, state)
        self.clamp = None if clamp is None else (float(clamp[0]), float(clamp[1]))
        self.beta = self.default_beta if cfg.beta is None else cfg.beta

    def attack_kwargs(self) -> dict:
        cfg = self.cfg
        return dict(task=self.task, norm=cfg.norm, steps=cfg.steps, alpha=cfg.alpha,
                    random_start=cfg.random_start, loss=cfg.attack_loss, clamp=self.clamp,
                    update_bn=cfg.update_bn_during_attack)

    def state_on(self, device: torch.device) -> SampleState:
        if self.state.eps.device != device:
            self.state.to_(device)
        return self.state


def batch_metrics(**values: torch.Tensor) -> dict[str, float]:
    """Scalars for logging, read with one host sync."""
    numbers = torch.stack([v.detach().float().reshape(()) for v in values.values()]).tolist()
    return dict(zip(values, numbers))
