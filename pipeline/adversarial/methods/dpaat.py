"""DPAAT: this project's reading of the ABSTRACT of Li, Ma, Jiang, Meng, arXiv 2403.06798.

Only the abstract is public to us; this is not the authors' code. Its two ideas as SPEC 3 specifies them:
(a) per-sample radii adapted during training, (b) the criterion for "robust at eps[i]" is a threshold tau
learned online from the losses collected in training, not a fixed rule such as "argmax correct" or
"Dice >= 0.6".
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field, model_validator

from pipeline.adversarial.methods.adversarial import AttackingMethod, LossAttackConfig, batch_metrics
from pipeline.adversarial.methods.base import MethodOutput
from pipeline.adversarial.state import SampleState


class DPAATConfig(LossAttackConfig):
    """``method: {name: dpaat, ...}``."""

    name: Literal["dpaat"] = "dpaat"
    eps: float = Field(default=0.5, ge=0.0, description="the starting radius of every sample (clipped to "
                                                         "[eps_min, eps_max])")
    delta: float = Field(default=0.03, gt=0.0, description="how much a radius grows (adversarial loss <= tau) "
                                                           "or shrinks (otherwise) at the end of an epoch")
    eps_min: float = Field(default=0.0, ge=0.0, description="the smallest per-sample radius")
    eps_max: float = Field(default=3.0, gt=0.0, description="the largest per-sample radius")
    beta: float = Field(default=0.5, ge=0.0, description="loss = (1 - beta) * clean loss + beta * adversarial loss")
    quantile: float = Field(default=0.5, gt=0.0, lt=1.0, description="q: the epoch's new threshold is this "
                                                                     "quantile of the clean training losses")
    momentum: float = Field(default=0.5, ge=0.0, le=1.0, description="m: tau = (1 - m) * tau + m * new threshold")

    @model_validator(mode="after")
    def _radii_ordered(self) -> DPAATConfig:
        if self.eps_min > self.eps_max:
            raise ValueError(f"eps_min ({self.eps_min:g}) must not exceed eps_max ({self.eps_max:g})")
        return self


class DPAAT(AttackingMethod):
    """Per batch: PGD at eps[index]; loss = (1 - beta) * mean clean loss + beta * mean adversarial loss;
    both per-sample losses go into the state's loss bank.

    End of epoch: new = ``quantile``-quantile (linear interpolation) of the clean losses of the samples
    seen this epoch; tau = new on the first epoch, else (1 - m) * tau + m * new; a sample seen this epoch
    with adversarial loss <= tau grows its radius by delta (at most eps_max), the others shrink it by
    delta (at least eps_min). Same for classification and segmentation. ``MethodOutput.pred`` is the
    clean output.
    """

    config_class = DPAATConfig
    cfg: DPAATConfig

    @classmethod
    def initial_state(cls, cfg: DPAATConfig, n_train: int) -> SampleState:
        return SampleState(n_train, min(max(cfg.eps, cfg.eps_min), cfg.eps_max))

    def loss(self, model, inputs, targets, index, roi=None):
        state = self.state_on(inputs.device)
        index = index.reshape(-1).to(inputs.device, torch.long)
        pred, stats = self.clean_forward(model, inputs)
        clean = self.task.per_sample_loss(pred, targets, roi)
        clean_term = (1 - self.beta) * clean.mean()
        done = self.backward_now(clean_term)
        x_adv = self.attack(model, inputs, targets, state.eps[index], stats=stats, roi=roi)
        adv = self.task.per_sample_loss(model(x_adv), targets, roi)
        loss = self.beta * adv.mean() + (clean_term if done is None else 0)
        state.record(index, correct=self.task.correct(pred.detach(), targets, roi), clean_loss=clean, adv_loss=adv)
        metrics = batch_metrics(clean_loss=clean.mean(), adv_loss=adv.mean(), eps_batch=state.eps[index].mean())
        return MethodOutput(loss=loss, pred=pred, adv=x_adv, metrics=metrics, done=done)

    def update(self, state) -> None:
        cfg = self.cfg
        seen = state.seen
        if bool(seen.any()):
            new = float(torch.quantile(state.clean_loss[seen].float(), cfg.quantile))
            state.tau = new if state.tau is None else (1 - cfg.momentum) * state.tau + cfg.momentum * new
            robust = state.adv_loss <= state.tau
            grown = (state.eps + cfg.delta).clamp(max=cfg.eps_max)
            shrunk = (state.eps - cfg.delta).clamp(min=cfg.eps_min)
            state.eps = torch.where(seen, torch.where(robust, grown, shrunk), state.eps)
