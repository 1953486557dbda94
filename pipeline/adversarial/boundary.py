"""IMA's attack: PGD that stops each sample at the decision boundary (SPEC 3, IMA step 2).

Samples that are not handled correctly at some iterate have crossed: they leave the batch (the active set
shrinks by ``index_select``, so they stop costing compute) and their bracket (last iterate still handled
correctly, first iterate that is not) is bisected afterwards, all crossed samples in one batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pipeline.adversarial.bisection import bisect
from pipeline.adversarial.context import attack_mode
from pipeline.adversarial.geometry import as_radius, check_norm, clamp_range, random_in_ball, size
from pipeline.adversarial.pgd import Range, ascent_step
from pipeline.adversarial.tasks import Task


@dataclass
class BoundaryResult:
    x_adv: torch.Tensor     # boundary point (crossed), final PGD iterate (not crossed), x (clean-incorrect)
    crossed: torch.Tensor   # bool (B,): an iterate inside eps[i] was not handled correctly
    dist: torch.Tensor      # float32 (B,): ||x_adv - x|| in the attack norm


def boundary_attack(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float | torch.Tensor, *,
                    task: Task, norm: str = "L2", steps: int = 20, alpha: float = 4.0,
                    random_start: bool = True, loss: str = "ce", clamp: Range = None,
                    bisection_steps: int = 10, update_bn: bool = False,
                    clean_correct: torch.Tensor | None = None) -> BoundaryResult:
    """PGD (step ``alpha * eps[i] / steps``) from a random start in each ball, stopped at the first iterate
    not handled correctly, then bisected onto the boundary.

    Iterates x_0 (random start) .. x_K are checked, the checks on x_0 .. x_{K-1} come free with the
    gradient forwards, x_K costs one no-grad forward of the samples still active. The last iterate handled
    correctly starts as the clean x. Samples whose clean input is not handled correctly (``clean_correct``,
    computed here if not given) are not attacked: x_adv = x, crossed False, dist 0.
    """
    check_norm(norm)
    x0 = x.detach().float()
    r = as_radius(eps, x)
    step = alpha * r / steps
    x_adv, inside, outside = x0.clone(), x0.clone(), x0.clone()
    crossed = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
    with attack_mode(model, update_bn) as net:
        if clean_correct is None:
            with torch.no_grad():
                clean_correct = task.correct(net(x), y)
        active = clean_correct.nonzero().squeeze(1)
        xa, ya, ra, sa = x0[active], y[active], r[active], step[active]
        prev = xa
        cur = clamp_range(xa + random_in_ball(xa, ra, norm), clamp) if random_start else xa
        for k in range(steps + 1):
            if not active.numel():
                break
            if k < steps:
                nxt, out = ascent_step(net, cur, xa, lambda o, t=ya: task.attack_loss(o, t, loss), eps=ra,
                                       step=sa, norm=norm, clamp=clamp, input_dtype=x.dtype)
            else:
                with torch.no_grad():
                    nxt, out = cur, net(cur.to(x.dtype))
            ok = task.correct(out, ya)
            flipped = (~ok).nonzero().squeeze(1)
            if flipped.numel():
                where = active[flipped]
                inside.index_copy_(0, where, prev[flipped])
                outside.index_copy_(0, where, cur[flipped])
                crossed[where] = True
                keep = ok.nonzero().squeeze(1)
                active, xa, ya, ra, sa = active[keep], xa[keep], ya[keep], ra[keep], sa[keep]
                cur, nxt = cur[keep], nxt[keep]
            prev, cur = cur, nxt
        x_adv.index_copy_(0, active, cur)
        hit = crossed.nonzero().squeeze(1)
        if hit.numel():
            y_hit = y[hit]
            # update_bn=True: keep the mode attack_mode already set on net
            boundary = bisect(net, inside[hit], outside[hit], lambda out: task.correct(out, y_hit),
                              bisection_steps, update_bn=True)
            x_adv.index_copy_(0, hit, boundary)
    return BoundaryResult(x_adv.to(x.dtype), crossed, size(x_adv - x0, norm))
