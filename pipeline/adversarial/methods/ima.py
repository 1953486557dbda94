"""IMA, increasing-margin adversarial training (Ma & Liang, arXiv 2005.09147), as SPEC 3 describes it."""

from __future__ import annotations

import torch

from pipeline.adversarial.boundary import boundary_attack
from pipeline.adversarial.context import unwrap
from pipeline.adversarial.methods.adversarial import AttackingMethod, batch_metrics
from pipeline.adversarial.methods.base import MethodOutput


class IMA(AttackingMethod):
    """Per-sample radii grown by ``delta`` while no adversarial example is found, set to the estimated
    distance to the decision boundary once one is.

    Per batch: clean forward; ``correct`` from it; :func:`boundary_attack` at eps[index] (stops each sample
    at the boundary); loss = (1 - beta) * mean clean loss + beta * (sum of the adversarial losses of the
    samples correct and crossed) / batch size; the adversarial forward runs on those samples only.
    State: found = correct & crossed, correct, dist[i] = (dist[i] + ||x_adv_i - x_i||) / 2 for those found.
    ``MethodOutput.pred`` is the clean output; ``adv`` holds boundary points / final iterates.
    """

    name = "ima"

    def loss(self, model, inputs, targets, index):
        state = self.state_on(inputs.device)
        batch = inputs.shape[0]
        pred = model(inputs)
        clean = self.task.per_sample_loss(pred, targets)
        correct = self.task.correct(pred.detach(), targets)
        index = index.reshape(-1).to(inputs.device, torch.long)
        kwargs = self.attack_kwargs()
        kwargs["bisection_steps"] = self.cfg.bisection_steps
        found = boundary_attack(model, inputs, targets, state.eps[index], clean_correct=correct, **kwargs)
        hit = found.crossed & correct
        rows = hit.nonzero().squeeze(1)
        adv_sum = clean.new_zeros(())
        if rows.numel():
            # a single row is doubled so that BatchNorm in train mode never sees a batch of one value; the
            # module inside DDP runs it, because ranks differ in whether they need this forward at all and
            # DDP's forward is a collective (buffer broadcast); the gradients reach the same parameters
            fwd = rows.repeat(2) if rows.numel() == 1 else rows
            adv = self.task.per_sample_loss(unwrap(model)(found.x_adv[fwd]), targets[fwd])
            adv_sum = adv.sum() * (rows.numel() / fwd.numel())
        loss = (1 - self.beta) * clean.mean() + self.beta * adv_sum / batch
        state.record(index, correct=correct, found=hit, clean_loss=clean)
        where, d = state.mean_by_index(index, found.dist, hit)
        state.dist[where] = (state.dist[where] + d) / 2
        metrics = batch_metrics(clean_loss=clean.mean().detach(), adv_loss_sum=adv_sum.detach() / batch,
                                found_frac=hit.float().mean(), eps_batch=state.eps[index].mean())
        return MethodOutput(loss=loss, pred=pred, adv=found.x_adv, metrics=metrics)

    def epoch_completed(self) -> dict[str, float]:
        """correct & ~found: eps += delta; correct & found: eps = dist; else unchanged; clamp [0, eps_max]."""
        state = self.state
        state.sync_()
        grow = state.correct & ~state.found
        shrink = state.correct & state.found
        eps = torch.where(grow, state.eps + self.cfg.delta, torch.where(shrink, state.dist, state.eps))
        state.eps = eps.clamp(0.0, self.cfg.eps_max)
        state.epoch += 1
        summary = state.summary()
        state.reset_epoch()
        return summary
