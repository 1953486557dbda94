"""TRADES (Zhang et al. 2019): clean loss + beta * KL(clean || adversarial), the attack maximising the KL."""

from __future__ import annotations

import torch

from pipeline.adversarial.context import attack_mode
from pipeline.adversarial.geometry import as_radius, clamp_range, project
from pipeline.adversarial.methods.adversarial import AttackingMethod, batch_metrics
from pipeline.adversarial.methods.base import MethodOutput
from pipeline.adversarial.pgd import ascent_step


class TRADES(AttackingMethod):
    """Loss = mean task loss (CE; Dice+CE for segmentation) on clean inputs + beta * mean KL(clean || adv).

    The attack starts at x + 0.001 * N(0, 1) (projected into the ball, clamped) and takes K steps of size
    ``alpha * eps / K`` maximising the KL to the clean prediction; for segmentation the KL is pixel-wise
    and averaged per image. The attack's reference distribution is the (detached) clean output of the
    training forward, which saves the extra eval-mode forward of the original code.
    ``MethodOutput.pred`` is the clean output.
    """

    name = "trades"
    default_beta = 6.0

    def _attack(self, model, x, reference):
        cfg = self.cfg
        x0 = x.detach().float()
        r = as_radius(cfg.eps, x)
        step = cfg.alpha * r / cfg.steps
        x_adv = clamp_range(x0 + project(0.001 * torch.randn_like(x0), r, cfg.norm), self.clamp)
        with attack_mode(model, cfg.update_bn_during_attack) as net:
            for _ in range(cfg.steps):
                x_adv, _ = ascent_step(net, x_adv, x0, lambda out: self.task.divergence(reference, out), eps=r,
                                       step=step, norm=cfg.norm, clamp=self.clamp, input_dtype=x.dtype)
        return x_adv.to(x.dtype)

    def loss(self, model, inputs, targets, index):
        pred = model(inputs)
        clean = self.task.per_sample_loss(pred, targets).mean()
        x_adv = self._attack(model, inputs, pred.detach())
        kl = self.task.divergence(pred, model(x_adv)).mean()
        return MethodOutput(loss=clean + self.beta * kl, pred=pred, adv=x_adv,
                            metrics=batch_metrics(clean_loss=clean, kl=kl))
