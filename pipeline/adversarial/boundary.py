"""IMA's attack: PGD inside each sample's ball, then bisection onto the decision boundary (SPEC 3, IMA step 2).

As in the authors' released code with its MedMNIST defaults, a sample *crossed* if any PGD iterate (the random
start and the final iterate included) was not handled correctly, and its boundary point is found by bisecting
the segment between the **clean input x** and the PGD end point; the correctly handled end of the last bracket
is returned and ``||x_b - x||`` is the distance estimate. The end point is the final iterate (``bracket="final"``,
the released behaviour) or, as a speed-up, the first iterate not handled correctly (``"first_wrong"``: the
sample stops costing compute there). Bisecting between iterates along the PGD path would be wrong: with a random
start the path begins about eps away from x, so every estimate would come out near eps.

With a region of interest (``roi``) PGD perturbs only inside it (:mod:`pipeline.adversarial.pgd`), so the end
point, and every point of the segment [x, end point], equals x outside it; "handled correctly" is judged on the
ROI's pixels (segmentation).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pipeline.adversarial.bisection import bisect
from pipeline.adversarial.context import BatchStatistics, attack_mode
from pipeline.adversarial.geometry import as_radius, check_norm, size
from pipeline.adversarial.pgd import Range, roi_inside, run_pgd
from pipeline.adversarial.tasks import Task

BRACKETS = ("final", "first_wrong")


@dataclass
class BoundaryResult:
    x_adv: torch.Tensor     # boundary point (crossed), final PGD iterate (not crossed), x (clean-incorrect)
    crossed: torch.Tensor   # bool (B,): an iterate inside eps[i] was not handled correctly
    dist: torch.Tensor      # float32 (B,): ||x_adv - x|| in the attack norm
    correct: torch.Tensor   # bool (B,): the clean input is handled correctly (in the attack's network mode)


def boundary_attack(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float | torch.Tensor, *,
                    task: Task, norm: str = "L2", steps: int = 20, alpha: float = 4.0,
                    random_start: bool = True, loss: str = "slm", clamp: Range = None,
                    bisection_steps: int = 10, bn: str = "running", stats: BatchStatistics | None = None,
                    clean_correct: torch.Tensor | None = None, bracket: str = "final",
                    roi: torch.Tensor | None = None) -> BoundaryResult:
    """PGD (K steps of ``alpha * eps[i] / K``, random start in the ball) then bisection on [x, end point].

    Samples whose clean input is not handled correctly (``clean_correct``, judged here in the attack's mode
    when not given; a caller that gives it must have judged it in the same mode) are not attacked: x_adv = x,
    crossed False, dist 0. ``roi`` (B, 1, *spatial): perturb only inside it; a caller's ``clean_correct`` must
    then be judged on the same ROI.
    """
    check_norm(norm)
    if bracket not in BRACKETS:
        raise ValueError(f"bracket must be one of {BRACKETS}, got {bracket!r}")
    x0 = x.detach().float()
    r = as_radius(eps, x)
    x_adv = x0.clone()
    crossed = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
    inside = roi_inside(roi, x)
    with attack_mode(model, bn, stats) as net:
        if clean_correct is None:
            with torch.no_grad():
                clean_correct = task.correct(net(x), y, inside)
        act = clean_correct.nonzero().squeeze(1)
        if act.numel():
            ya = y[act]
            ma = None if inside is None else inside[act]
            run = run_pgd(net, x0[act], ya, r[act], alpha * r[act] / steps, task=task,
                          objective=lambda out, t, m=None: task.attack_loss(out, t, loss, m), norm=norm, steps=steps,
                          random_start=random_start, clamp=clamp, input_dtype=x.dtype, track=True,
                          early_stop=bracket == "first_wrong", roi=ma)
            x_adv[act] = run.x_adv
            crossed[act] = run.wrong
            hit = run.wrong.nonzero().squeeze(1)
            if hit.numel():
                y_hit = ya[hit]
                m_hit = None if ma is None else ma[hit]
                x_adv[act[hit]] = bisect(net, x0[act[hit]], run.x_adv[hit],
                                         lambda out: task.correct(out, y_hit, m_hit), bisection_steps)
    return BoundaryResult(x_adv.to(x.dtype), crossed, size(x_adv - x0, norm), clean_correct)
