"""PGD adversarial training (Madry et al.): the loss on PGD inputs at a fixed radius."""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from pipeline.adversarial.context import attack_mode, unwrap
from pipeline.adversarial.methods.adversarial import AttackingMethod, LossAttackConfig, batch_metrics
from pipeline.adversarial.methods.base import MethodOutput


class PGDATConfig(LossAttackConfig):
    """``method: {name: pgd_at, ...}``."""

    name: Literal["pgd_at"] = "pgd_at"
    eps: float = Field(default=0.5, ge=0.0, description="the radius of every training attack (fixed, the same "
                                                         "for every sample)")


class PGDAT(AttackingMethod):
    """K-step PGD at ``cfg.eps`` (step ``alpha * eps / K``), loss = mean task loss on the adversarial inputs.

    ``MethodOutput.pred`` is the CLEAN output, as for every method (training metrics and handlers read it).
    The loss needs no clean forward, so the one made for ``pred`` is the cheapest there is: without gradient
    (about a third of a training forward + backward) and in the attack's BatchNorm mode: with ``attack_bn:
    running`` (the default) in eval mode, running statistics untouched; with ``batch`` in train mode, which
    records the clean batch's statistics the attack needs (and, as any train-mode forward, moves the running
    statistics). The adversarial loss is reported as ``adv_loss``.
    """

    config_class = PGDATConfig
    cfg: PGDATConfig

    def loss(self, model, inputs, targets, index, roi=None):
        stats = None
        with torch.no_grad():
            if self.bn == "batch":
                clean, stats = self.clean_forward(unwrap(model), inputs)
            else:
                with attack_mode(model, self.bn) as net:
                    clean = net(inputs)
        x_adv = self.attack(model, inputs, targets, self.cfg.eps, stats=stats, roi=roi)
        adv = self.task.per_sample_loss(model(x_adv), targets, roi).mean()
        return MethodOutput(loss=adv, pred=clean, adv=x_adv, metrics=batch_metrics(adv_loss=adv))
