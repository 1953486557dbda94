"""TRADES (Zhang et al. 2019): clean loss + beta * KL(clean || adversarial), the attack maximising the KL."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from pipeline.adversarial.methods.adversarial import AttackConfig, AttackingMethod, batch_metrics
from pipeline.adversarial.methods.base import MethodOutput
from pipeline.adversarial.pgd import TradesKL


class TRADESConfig(AttackConfig):
    """``method: {name: trades, ...}``. The attack maximises the KL divergence (no ``attack_loss``)."""

    name: Literal["trades"] = "trades"
    eps: float = Field(default=0.5, ge=0.0, description="the radius of the KL attack (fixed, the same for every "
                                                         "sample)")
    beta: float = Field(default=6.0, ge=0.0, description="weight of the KL term: loss = clean loss + beta * KL")
    random_start: bool = Field(default=True, description="start the attack at x + 0.001 * N(0, 1), as TRADES "
                                                         "(false: at the clean input)")


class TRADES(AttackingMethod):
    """Loss = mean task loss (CE; Dice+CE for segmentation) on clean inputs + beta * mean KL(clean || adv).

    The attack starts at x + 0.001 * N(0, 1) (projected into the ball, clamped) and takes K steps of size
    ``alpha * eps / K`` maximising KL(reference || output); for segmentation the KL is pixel-wise and averaged
    per image. Both sides of the attack's KL are computed in the attack's network mode, as in the original
    TRADES: with ``attack_bn: running`` (the default) the reference is one extra no-grad eval-mode forward of the
    clean batch, and the attack runs before the training forwards (the authors' order); with ``batch`` it is the
    training forward's own output (the attack normalises with that batch's statistics, so that forward comes
    first). ``MethodOutput.pred`` is the clean output.
    """

    config_class = TRADESConfig
    cfg: TRADESConfig

    def build_attack(self):
        return self.attack_from_config(TradesKL)

    def loss(self, model, inputs, targets, index, roi=None):
        # the KL reference: under 'batch' the training output, else the attack's own eval-mode forward
        pred, x_adv = self.clean_and_attack(model, inputs, lambda stats, reference: self.attack(
            model, inputs, targets, self.cfg.eps, stats=stats, roi=roi, clean=reference))
        clean = self.task.per_sample_loss(pred, targets, roi).mean()
        kl = self.task.divergence(pred, model(x_adv), roi).mean()
        return MethodOutput(loss=clean + self.beta * kl, pred=pred, adv=x_adv,
                            metrics=batch_metrics(clean_loss=clean, kl=kl))
