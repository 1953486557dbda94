"""What the attacking methods share: the attack knobs of their configs, the attack object built once from the
config, the clean forward that records the BatchNorm statistics the attack will use, batch metrics."""

from __future__ import annotations

from collections.abc import Callable

from typing import Any, Literal

import torch
from pydantic import Field

from pipeline.adversarial.attack import Attack
from pipeline.adversarial.context import BatchStatistics
from pipeline.adversarial.methods.base import BaseMethodConfig, Method
from pipeline.adversarial.pgd import PGD
from pipeline.adversarial.state import SampleState
from pipeline.adversarial.tasks import Task


class AttackConfig(BaseMethodConfig):
    """The knobs of the training attack that every attacking method has (a method's config adds its own)."""

    norm: Literal["L2", "Linf"] = Field(default="L2", description="the norm of the attack's ball")
    steps: int = Field(default=10, ge=1, description="K, the attack's steps")
    alpha: float = Field(default=4.0, gt=0.0, description="step size = alpha * r / K, r the sample's radius")
    random_start: bool = Field(default=True, description="start the attack at a uniform point of the ball "
                                                         "(false: at the clean input)")
    attack_bn: Literal["batch", "running"] = Field(
        default="running", description="BatchNorm in the attack (and its 'handled correctly' checks): 'batch' = "
                                       "statistics of the clean training batch, 'running' = running statistics "
                                       "(eval mode). Attack forwards never move the running statistics")

    def attack_loss_for(self, task: Task) -> str | None:
        """What the attack maximises on ``task`` (a loss kind of ``task.attack_kinds``); None: the method gives
        the attack its own objective."""
        return None


class LossAttackConfig(AttackConfig):
    """An attack that maximises a loss of the task, chosen by ``attack_loss``."""

    attack_loss: Literal["ce", "margin", "slm"] = Field(
        default="ce", description="what the attack maximises: ce = the training loss (Dice + CE for "
                                  "segmentation), margin = the logit margin, slm = the soft logit margin")

    def attack_loss_for(self, task: Task) -> str | None:
        return self.attack_loss


class AttackingMethod(Method):
    """A method that runs attacks. ``clamp``: valid intensity range of the inputs (None: no clamp).

    ``bn`` (``method.attack_bn``): the BatchNorm rule of every attack forward, flag and bisection of the method
    (see :mod:`pipeline.adversarial.context`). ``attack``: the method's training attack
    (:class:`~pipeline.adversarial.pgd.PGD` unless :meth:`build_attack` says otherwise), built once from the
    config; a step calls ``self.attack(model, inputs, targets, eps, stats=stats, roi=roi)``.
    """

    cfg: AttackConfig

    def __init__(self, task: Task, cfg: AttackConfig, state: SampleState | None = None,
                 clamp: tuple[float, float] | None = None):
        super().__init__(task, cfg, state)
        self.clamp = None if clamp is None else (float(clamp[0]), float(clamp[1]))
        self.bn = cfg.attack_bn
        self.attack = self.build_attack()

    @classmethod
    def from_config(cls, cfg: AttackConfig, task: Task, n_train: int,
                    clamp: tuple[float, float] | None = None) -> AttackingMethod:
        return cls(task, cfg, cls.initial_state(cfg, n_train), clamp=clamp)

    @classmethod
    def initial_state(cls, cfg: AttackConfig, n_train: int) -> SampleState | None:
        """The per-sample state at the start of training (radii, ...); None for methods without one."""
        return None

    def build_attack(self) -> Attack:
        """The method's attack (``self.attack``); a method overrides it to build another attack class."""
        return self.attack_from_config(PGD)

    def attack_from_config(self, attack_class: type[Attack], **settings: Any) -> Attack:
        """``attack_class`` with the config's attack knobs (norm, steps, alpha, random_start, attack_bn, the attack
        loss when the config names one), the method's clamp, and the class's own ``settings``."""
        cfg = self.cfg
        loss = cfg.attack_loss_for(self.task)
        if loss is not None:
            settings["loss"] = loss
        return attack_class(self.task, norm=cfg.norm, steps=cfg.steps, alpha=cfg.alpha,
                            random_start=cfg.random_start, clamp=self.clamp, bn=self.bn, **settings)

    @property
    def beta(self) -> float:
        """The method's loss weight (``method.beta``) for methods that have one."""
        return self.cfg.beta

    def clean_forward(self, model: torch.nn.Module, inputs: torch.Tensor) -> tuple[torch.Tensor, BatchStatistics | None]:
        """The training forward on the clean batch; with ``bn='batch'`` also the statistics it normalised with."""
        if self.bn != "batch":
            return model(inputs), None
        with BatchStatistics(model) as stats:
            pred = model(inputs)
        return pred, stats

    def clean_and_attack(self, model: torch.nn.Module, inputs: torch.Tensor,
                         attack: Callable[[BatchStatistics | None, torch.Tensor | None], torch.Tensor]
                         ) -> tuple[torch.Tensor, torch.Tensor]:
        """(clean training output, adversarial inputs) for a loss that differentiates through both (TRADES,
        MART). ``attack(stats, clean)`` runs the method's attack. With ``bn='running'`` the attack runs first,
        then the clean training forward, as in the authors' TRADES and MART code: the clean forward's graph is
        not held through the K attack steps. With ``bn='batch'`` the attack needs that forward's statistics, so
        it comes first and its detached output is passed as ``clean``."""
        if self.bn == "batch":
            pred, stats = self.clean_forward(model, inputs)
            return pred, attack(stats, pred.detach())
        x_adv = attack(None, None)
        return model(inputs), x_adv

    def state_on(self, device: torch.device) -> SampleState:
        if self.state.eps.device != device:
            self.state.to_(device)
        return self.state


def batch_metrics(**values: torch.Tensor) -> dict[str, float]:
    """Scalars for logging, read with one host sync."""
    numbers = torch.stack([v.detach().float().reshape(()) for v in values.values()]).tolist()
    return dict(zip(values, numbers))
