"""IMA, increasing-margin adversarial training (Ma & Liang, arXiv 2005.09147), as the authors' released code
behaves with its MedMNIST defaults (SPEC 3)."""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from pipeline.adversarial.boundary import BoundaryPGD
from pipeline.adversarial.context import unwrap
from pipeline.adversarial.methods.adversarial import AttackConfig, AttackingMethod, batch_metrics
from pipeline.adversarial.methods.base import MethodOutput
from pipeline.adversarial.state import SampleState


class IMAConfig(AttackConfig):
    """``method: {name: ima, ...}``. Every per-sample radius starts at ``delta``."""

    name: Literal["ima"] = "ima"
    delta: float = Field(default=0.03, gt=0.0, description="the starting radius of every sample, and how much a "
                                                           "radius grows at the end of an epoch in which no "
                                                           "adversarial example of the sample was found")
    eps_max: float = Field(default=3.0, gt=0.0, description="the largest per-sample radius")
    beta: float = Field(default=0.5, ge=0.0, description="loss = (1 - beta) * clean loss + beta * loss on the "
                                                         "boundary points found")
    bisection_steps: int = Field(default=10, ge=0, description="halvings towards the boundary after the attack")
    boundary_bracket: Literal["final", "first_wrong"] = Field(
        default="final", description="bisect [x, final PGD iterate] (released code) or [x, first iterate not "
                                     "handled correctly] (faster, less exact boundary distances)")
    attack_loss: Literal["ce", "margin", "slm"] | None = Field(
        default=None, description="what the attack maximises; None: slm (the soft logit margin of the released "
                                  "code) for classification, ce (the training loss) for segmentation")
    attack_bn: Literal["batch", "running"] = Field(
        default="batch", description="BatchNorm in the attack, its flags and the bisection: 'batch' = statistics "
                                     "of the clean training batch (the released code), 'running' = running "
                                     "statistics (eval mode). Attack forwards never move the running statistics")

    def attack_loss_for(self, task):
        if self.attack_loss is not None:
            return self.attack_loss
        return "slm" if task.name == "classification" else "ce"


class IMA(AttackingMethod):
    """Per-sample radii grown by ``delta`` while no adversarial example is found, set to the estimated
    distance to the decision boundary once one is.

    Per batch: clean training forward (recording the batch's BatchNorm statistics, the attack's default network
    mode); ``correct`` judged in the attack's mode; :class:`BoundaryPGD` at eps[index] (PGD, then bisection on
    [x, PGD end point]); loss = (1 - beta) * mean clean loss + beta * (sum of the adversarial losses of the samples
    correct and crossed) / batch size, the adversarial forward on those samples only.
    State: found = correct & crossed, correct, and for the found ones dist[i] = (dist[i] + ||x_b,i - x_i||) / 2,
    dist being reset to eps at the start of every epoch (:meth:`SampleState.reset_epoch`).
    ``MethodOutput.pred`` is the clean output; ``adv`` holds boundary points / final iterates.
    """

    config_class = IMAConfig
    cfg: IMAConfig

    @classmethod
    def initial_state(cls, cfg: IMAConfig, n_train: int) -> SampleState:
        return SampleState(n_train, cfg.delta)

    def build_attack(self):
        return self.attack_from_config(BoundaryPGD, bisection_steps=self.cfg.bisection_steps,
                                       bracket=self.cfg.boundary_bracket)

    def loss(self, model, inputs, targets, index, roi=None):
        state = self.state_on(inputs.device)
        batch = inputs.shape[0]
        pred, stats = self.clean_forward(model, inputs)
        clean = self.task.per_sample_loss(pred, targets, roi)
        clean_term = (1 - self.beta) * clean.mean()
        done = self.backward_now(clean_term)
        index = index.reshape(-1).to(inputs.device, torch.long)
        found = self.attack(model, inputs, targets, state.eps[index], stats=stats, roi=roi,
                            clean=pred.detach() if self.bn == "batch" else None)
        hit = found.crossed & found.correct
        rows = hit.nonzero().squeeze(1)
        adv_sum = clean.new_zeros(())
        if rows.numel():
            # a single row is doubled so that BatchNorm in train mode never sees a batch of one value; the
            # module inside DDP runs it, because ranks differ in whether they need this forward at all and
            # DDP's forward is a collective (buffer broadcast); the gradients reach the same parameters
            fwd = rows.repeat(2) if rows.numel() == 1 else rows
            adv = self.task.per_sample_loss(unwrap(model)(found.x_adv[fwd]), targets[fwd],
                                            None if roi is None else roi[fwd])
            adv_sum = adv.sum() * (rows.numel() / fwd.numel())
        loss = self.beta * adv_sum / batch + (clean_term if done is None else 0)
        state.record(index, correct=found.correct, found=hit, clean_loss=clean)
        where, d = state.mean_by_index(index, found.dist, hit)
        state.dist[where] = (state.dist[where] + d) / 2
        metrics = batch_metrics(clean_loss=clean.mean().detach(), adv_loss_sum=adv_sum.detach() / batch,
                                found_frac=hit.float().mean(), eps_batch=state.eps[index].mean())
        return MethodOutput(loss=loss, pred=pred, adv=found.x_adv, metrics=metrics, done=done)

    def update(self, state) -> None:
        """correct & ~found: eps += delta; correct & found: eps = dist; else unchanged; clamp [0, eps_max]."""
        grow = state.correct & ~state.found
        shrink = state.correct & state.found
        eps = torch.where(grow, state.eps + self.cfg.delta, torch.where(shrink, state.dist, state.eps))
        state.eps = eps.clamp(0.0, self.cfg.eps_max)
