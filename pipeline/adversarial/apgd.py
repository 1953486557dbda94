"""APGD (Croce & Hein, ICML 2020, arXiv 2003.01690): PGD whose step size adapts per sample, with momentum.

An :class:`~pipeline.adversarial.attack.Attack` like PGD: ``APGD(task, norm=..., steps=...)(model, x, y, eps)``
returns x_adv (detached, dtype of x). One input gradient per step, like PGD, so at the same number of steps
both cost the same; the gain is that no step size has to be tuned (``alpha`` is not read).

The iteration, per sample (the paper's Algorithm 1):

* step size ``eta = 2 * eps`` at the start; the first step is a plain projected ascent step;
* then ``z = P(x_k + eta * d(grad))`` and ``x_{k+1} = P(x_k + a (z - x_k) + (1 - a)(x_k - x_{k-1}))`` with
  momentum ``a = 0.75`` (``d`` is the L2-normalised gradient or its sign for Linf; ``P`` projects onto the ball
  and clamps to the valid intensity range);
* at the checkpoints ``w_j = ceil(p_j * steps)``, ``p_0 = 0``, ``p_1 = 0.22``,
  ``p_{j+1} = p_j + max(p_j - p_{j-1} - 0.03, 0.06)``, the step size is halved and the iterate restarts from the
  best point so far if (1) the loss went up in fewer than ``rho = 0.75`` of the steps since the last checkpoint,
  or (2) neither the step size nor the best loss changed since the last checkpoint.

Losses: ``"ce"`` (the task's attack loss of that name: cross-entropy, Dice+CE for segmentation; any other kind
of ``task.attack_kinds`` works too) and ``"dlr"``, the *targeted* difference-of-logits-ratio loss of
classification, ``-(z_y - z_t) / (z_pi1 - (z_pi3 + z_pi4) / 2)`` with ``pi`` the logits sorted in decreasing
order and ``t`` the target class: the one of rank ``target`` among the other classes on the clean output (0,
the default: the highest other logit; the call's ``clean`` output when given, else a no-grad forward at x).
With fewer than four classes the denominator is ``z_pi1 - z_pi3`` (three classes) or 1 (two, where the
targeted DLR loss is the logit margin).

The random start is uniform in the ball (a call's ``start`` replaces it). The result is the first iterate that
is not handled correctly (``task.correct`` false), else the iterate of highest loss. ``early_stop=True`` returns
the same points but a sample leaves the batch at that first wrong iterate, so it costs no further compute.

``roi`` (the batch's (B, 1, *spatial) region-of-interest mask, optional): as in PGD, the random start and the
gradient are multiplied by the mask and every projected point is reset to x outside it, so all iterates stay in
the ball and equal x outside the ROI; the "ce" loss and "handled correctly" count only its pixels (segmentation).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from pipeline.adversarial.attack import Attack, Batch, input_gradient, masked
from pipeline.adversarial.geometry import direction, per_sample

MOMENTUM = 0.75
RHO = 0.75


def checkpoints(steps: int) -> list[int]:
    """The iterations at which the step size may be halved: ``ceil(p_j * steps)`` for p_1 = 0.22, ...."""
    marks, prev, cur = [], 0.0, 0.22
    while cur <= 1.0:
        marks.append(math.ceil(cur * steps - 1e-9))
        prev, cur = cur, cur + max(cur - prev - 0.03, 0.06)
    return sorted({m for m in marks if 0 < m < steps})


def dlr_targeted(logits: torch.Tensor, labels: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Targeted DLR loss per sample (B,): ``-(z_y - z_t) / (z_pi1 - (z_pi3 + z_pi4) / 2)`` (see the module doc)."""
    z = logits.float()
    gap = z.gather(1, labels.reshape(-1, 1).long()) - z.gather(1, target.reshape(-1, 1).long())
    ranked = z.sort(dim=1, descending=True).values
    classes = z.shape[1]
    if classes >= 4:
        scale = ranked[:, :1] - (ranked[:, 2:3] + ranked[:, 3:4]) / 2
    elif classes == 3:
        scale = ranked[:, :1] - ranked[:, 2:3]
    else:
        scale = torch.ones_like(gap)
    return (-gap / (scale + 1e-12)).squeeze(1)


def top_other_classes(logits: torch.Tensor, labels: torch.Tensor, k: int) -> torch.Tensor:
    """(B, k): the k highest-scoring classes other than each sample's label, best first (APGD-T's targets)."""
    z = logits.float().scatter(1, labels.reshape(-1, 1).long(), float("-inf"))
    return z.topk(min(k, z.shape[1] - 1), dim=1).indices


class _State:
    """The per-sample APGD state of the samples still in the batch (rows ``idx`` of the input)."""

    FIELDS = ("idx", "x0", "r", "cur", "prev", "best", "g_best", "eta", "f_best", "f_prev", "ups", "f_best_mark",
              "halved_mark")

    def __init__(self, attack: APGD, net: torch.nn.Module, batch: Batch, objective, start: torch.Tensor | None):
        self.attack, self.net, self.task, self.y, self.dtype = attack, net, attack.task, batch.y, batch.dtype
        self.objective, self.inside = objective, batch.inside
        x0, r = batch.x0, batch.r
        n = x0.shape[0]
        self.idx = torch.arange(n, device=x0.device)
        self.x0, self.r = x0, r
        self.cur = attack.first_point(batch, start)
        self.prev = self.best = self.cur
        self.g_best = torch.zeros_like(x0)
        self.eta = 2 * r
        self.f_best = torch.full((n,), float("-inf"), device=x0.device)
        self.f_prev = self.f_best.clone()
        self.f_best_mark = self.f_best.clone()
        self.ups = torch.zeros(n, device=x0.device)
        self.halved_mark = torch.zeros(n, dtype=torch.bool, device=x0.device)

    def keep(self, rows: torch.Tensor) -> None:
        for name in self.FIELDS:
            setattr(self, name, getattr(self, name)[rows])

    def record(self, f: torch.Tensor, grad: torch.Tensor | None, first: bool) -> None:
        """Count the loss increases and keep the best point (and its gradient) so far."""
        if not first:
            self.ups += (f > self.f_prev).float()
        better = f > self.f_best
        self.best = torch.where(per_sample(better, self.cur), self.cur, self.best)
        if grad is not None:
            self.g_best = torch.where(per_sample(better, grad), grad, self.g_best)
        self.f_best, self.f_prev = torch.where(better, f, self.f_best), f
        if first:
            self.f_best_mark = self.f_best.clone()

    def checkpoint(self, span: int, grad: torch.Tensor) -> torch.Tensor:
        """Halve eta and go back to the best point where progress stalled since the last checkpoint; returns the
        gradient to step with (the best point's where it went back)."""
        stalled = self.ups < RHO * span
        unchanged = ~self.halved_mark & (self.f_best <= self.f_best_mark)
        halve = stalled | unchanged
        back = per_sample(halve, self.cur)
        self.eta = torch.where(halve, self.eta / 2, self.eta)
        self.cur = torch.where(back, self.best, self.cur)
        self.prev = torch.where(back, self.best, self.prev)
        self.halved_mark, self.f_best_mark = halve, self.f_best.clone()
        self.ups = torch.zeros_like(self.ups)
        return torch.where(back, self.g_best, grad)

    def rows_inside(self) -> torch.Tensor | None:
        return None if self.inside is None else self.inside[self.idx]

    def step(self, grad: torch.Tensor, first: bool) -> None:
        grad = masked(grad, self.rows_inside())
        z = self._project(self.cur + per_sample(self.eta, self.x0) * direction(grad, self.attack.norm))
        a = 1.0 if first else MOMENTUM
        self.prev, self.cur = self.cur, self._project(self.cur + a * (z - self.cur) + (1 - a) * (self.cur - self.prev))

    def _project(self, point: torch.Tensor) -> torch.Tensor:
        return self.attack.into_ball(self.x0, point, self.r, self.rows_inside())

    def run(self, steps: int, early_stop: bool, out_x: torch.Tensor) -> None:
        """Iterate; write each sample's result into ``out_x`` (rows of the full batch)."""
        marks, last_mark = set(checkpoints(steps)), 0
        done = torch.zeros(out_x.shape[0], dtype=torch.bool, device=out_x.device)
        for k in range(steps + 1):
            last = k == steps
            if last:
                grad = None
                with torch.no_grad():
                    out = self.net(self.cur.to(self.dtype))
            else:
                grad, out = input_gradient(self.net, self.cur, lambda o: self.objective(o, self.idx), self.dtype)
            f = self.objective(out, self.idx).detach()
            wrong = ~self.task.correct(out, self.y[self.idx], self.rows_inside()) & ~done[self.idx]
            out_x[self.idx[wrong]] = self.cur[wrong]
            done[self.idx[wrong]] = True
            self.record(f, grad, first=k == 0)
            if last:
                break
            if early_stop and wrong.any():
                rows = (~wrong).nonzero().squeeze(1)
                self.keep(rows)
                grad = grad[rows]
                if not rows.numel():
                    break
            if k in marks:
                grad = self.checkpoint(k - last_mark, grad)
                last_mark = k
            self.step(grad, first=k == 0)
        rest = ~done[self.idx]
        out_x[self.idx[rest]] = self.best[rest]


@dataclass(frozen=True)
class APGD(Attack):
    """APGD inside each sample's ball of radius ``eps[i]`` (inside ``roi`` only, when given; see the module doc).

    ``loss``: ``"ce"`` (or another kind of ``task.attack_kinds``) or ``"dlr"``, the targeted DLR loss
    (classification only) towards the class of rank ``target`` among the other classes on the clean output.
    """

    steps: int = 100
    target: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.loss == "dlr" and self.task.name != "classification":
            raise ValueError("the DLR loss is defined for classification only")

    def perturb(self, net, batch, *, clean=None, start=None):
        task, y, loss, inside = self.task, batch.y, self.loss, batch.inside
        if loss == "dlr":
            target = top_other_classes(self.clean_output(net, batch, clean), y, self.target + 1)[:, self.target]

        def objective(out: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
            if loss == "dlr":
                return dlr_targeted(out, y[rows], target[rows])
            return task.attack_loss(out, y[rows], loss, None if inside is None else inside[rows])

        out_x = batch.x0.clone()
        _State(self, net, batch, objective, start).run(self.steps, self.early_stop, out_x)
        return out_x
