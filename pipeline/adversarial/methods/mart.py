"""MART (Wang et al., ICLR 2020): misclassification-aware adversarial training."""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field

from pipeline.adversarial.methods.adversarial import AttackingMethod, LossAttackConfig, batch_metrics
from pipeline.adversarial.methods.base import MethodOutput
from pipeline.adversarial.tasks import image_mean


def _per_image(values: torch.Tensor, roi: torch.Tensor | None = None) -> torch.Tensor:
    """(B,) stays; (B, *spatial) maps are averaged per image (over its ROI pixels, with a ``roi``)."""
    return image_mean(values, roi) if values.dim() > 1 else values


class MARTConfig(LossAttackConfig):
    """``method: {name: mart, ...}``: a fixed radius for every sample, as PGD-AT, and the weight of the
    misclassification-aware KL term (Wang et al. 2020)."""

    name: Literal["mart"] = "mart"
    eps: float = Field(default=0.5, ge=0.0, description="the radius of the PGD attack (fixed, the same for every "
                                                         "sample)")
    beta: float = Field(default=6.0, ge=0.0, description="weight of the misclassification-weighted KL term: "
                                                         "loss = boosted CE + beta * weighted KL")


class MART(AttackingMethod):
    """Loss = mean boosted CE on adversarial inputs + beta * mean(KL(p_clean || p_adv) * (1 - p_clean[y])).

    Boosted CE: CE(adv) - log(1 - max_{k != y} p_adv[k]), which also pushes down the strongest wrong class.
    The KL term is weighted per sample by the clean probability of *not* being right, so samples the network
    gets wrong (or barely right) are regularised hardest. PGD at ``eps`` maximises the CE (K steps, running
    statistics by default, as the authors' code). Segmentation: every term pixel-wise, averaged per image (over
    the ROI pixels when the batch has a ``roi``).
    ``MethodOutput.pred`` is the clean output.
    """

    config_class = MARTConfig
    cfg: MARTConfig

    def loss(self, model, inputs, targets, index, roi=None):
        pred, x_adv = self.clean_and_attack(model, inputs, lambda stats, _: self.attack(
            model, inputs, targets, self.cfg.eps, stats=stats, roi=roi))
        adv_logits = model(x_adv)
        labels = targets.long() if pred.dim() > 2 else targets.reshape(-1).long()
        labels = labels[:, None] if labels.dim() == 1 else labels          # class axis of size 1
        p_adv = adv_logits.float().softmax(dim=1)
        p_clean = pred.float().softmax(dim=1)
        wrong_best = p_adv.scatter(1, labels, 0.0).amax(dim=1)
        boosted = F.cross_entropy(adv_logits.float(), labels.squeeze(1), reduction="none") \
            - torch.log((1.0 - wrong_best).clamp_min(1e-12))
        kl = (p_clean * (torch.log(p_clean.clamp_min(1e-12)) - torch.log(p_adv.clamp_min(1e-12)))).sum(dim=1)
        weight = 1.0 - p_clean.gather(1, labels).squeeze(1)
        adv_loss = _per_image(boosted, roi).mean()
        kl_term = _per_image(kl * weight, roi).mean()
        return MethodOutput(loss=adv_loss + self.beta * kl_term, pred=pred, adv=x_adv,
                            metrics=batch_metrics(adv_loss=adv_loss, kl=kl_term))
