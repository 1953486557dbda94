"""DPAAT: this project's reading of the ABSTRACT of Li, Ma, Jiang, Meng, arXiv 2403.06798.

Only the abstract is public to us; this is not the authors' code. Its two ideas as SPEC 3 specifies them:
(a) per-sample radii adapted during training, (b) the criterion for "robust at eps[i]" is a threshold tau
learned online from the losses collected in training, not a fixed rule such as "argmax correct" or
"Dice >= 0.6".
"""

from __future__ import annotations

import torch

from pipeline.adversarial.methods.adversarial import AttackingMethod, batch_metrics
from pipeline.adversarial.methods.base import MethodOutput
from pipeline.adversarial.pgd import pgd


class DPAAT(AttackingMethod):
    """Per batch: PGD at eps[index]; loss = (1 - beta) * mean clean loss + beta * mean adversarial loss;
    both per-sample losses go into the state's loss bank.

    End of epoch: new = ``quantile``-quantile (linear interpolation) of the clean losses of the samples
    seen this epoch; tau = new on the first epoch, else (1 - m) * tau + m * new; a sample seen this epoch
    with adversarial loss <= tau grows its radius by delta (at most eps_max), the others shrink it by
    delta (at least eps_min). Same for classification and segmentation. ``MethodOutput.pred`` is the
    clean output.
    """

    name = "dpaat"

    def loss(self, model, inputs, targets, index, roi=None):
        state = self.state_on(inputs.device)
        index = index.reshape(-1).to(inputs.device, torch.long)
        pred, stats = self.clean_forward(model, inputs)
        clean = self.task.per_sample_loss(pred, targets, roi)
        x_adv = pgd(model, inputs, targets, state.eps[index], stats=stats, roi=roi, **self.attack_kwargs())
        adv = self.task.per_sample_loss(model(x_adv), targets, roi)
        loss = (1 - self.beta) * clean.mean() + self.beta * adv.mean()
        state.record(index, correct=self.task.correct(pred.detach(), targets, roi), clean_loss=clean, adv_loss=adv)
        metrics = batch_metrics(clean_loss=clean.mean(), adv_loss=adv.mean(), eps_batch=state.eps[index].mean())
        return MethodOutput(loss=loss, pred=pred, adv=x_adv, metrics=metrics)

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
