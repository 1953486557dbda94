"""IMA's attack, :class:`BoundaryPGD`: PGD inside each sample's ball, then bisection onto the decision boundary
(SPEC 3, IMA step 2).

As in the authors' released code with its MedMNIST defaults, a sample *crossed* if any PGD iterate (the random
start and the final iterate included) was not handled correctly, and its boundary point is found by bisecting
the segment between the **clean input x** and the PGD end point; the correctly handled end of the last bracket
is returned and ``||x_b - x||`` is the distance estimate. The end point is the final iterate (``bracket="final"``,
the released behaviour) or, as a speed-up, the first iterate not handled correctly (``"first_wrong"``: the
sample stops costing compute there). Bisecting between iterates along the PGD path would be wrong: with a random
start the path begins about eps away from x, so every estimate would come out near eps.

With a region of interest (``roi``) PGD perturbs only inside it (:mod:`pipeline.adversarial.attack`), so the end
point, and every point of the segment [x, end point], equals x outside it; "handled correctly" is judged on the
ROI's pixels (segmentation).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pipeline.adversarial.attack import Batch
from pipeline.adversarial.bisection import bisect
from pipeline.adversarial.geometry import size
from pipeline.adversarial.pgd import PGD

BRACKETS = ("final", "first_wrong")


@dataclass
class BoundaryResult:
    x_adv: torch.Tensor     # boundary point (crossed), final PGD iterate (not crossed), x (clean-incorrect)
    crossed: torch.Tensor   # bool (B,): an iterate inside eps[i] was not handled correctly
    dist: torch.Tensor      # float32 (B,): ||x_adv - x|| in the attack norm
    correct: torch.Tensor   # bool (B,): the clean input is handled correctly (in the attack's network mode)


@dataclass(frozen=True)
class BoundaryPGD(PGD):
    """PGD (K steps of ``alpha * eps[i] / K``, random start in the ball, every iterate judged) then
    ``bisection_steps`` halvings of [x, end point]; a call returns a :class:`BoundaryResult`.

    The stopping rule is ``bracket`` (see the module doc), not ``early_stop``; no restarts. Samples whose clean
    input is not handled correctly are not attacked: x_adv = x, crossed False, dist 0. "Handled correctly at x" is
    judged on the call's ``clean`` output when given (a caller that gives it must have computed it in the attack's
    network mode), else with one no-grad forward; with a ROI, on its pixels.
    """

    steps: int = 20
    loss: str = "slm"
    bisection_steps: int = 10
    bracket: str = "final"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.bracket not in BRACKETS:
            raise ValueError(f"bracket must be one of {BRACKETS}, got {self.bracket!r}")
        if self.early_stop or self.restarts != 1:
            raise ValueError("BoundaryPGD stops by its bracket (not early_stop) and has no restarts")

    def perturb(self, net, batch, *, clean=None, start=None):
        task = self.task
        x_adv = batch.x0.clone()
        crossed = torch.zeros(batch.x0.shape[0], dtype=torch.bool, device=batch.x0.device)
        correct = task.correct(self.clean_output(net, batch, clean), batch.y, batch.inside)
        act = correct.nonzero().squeeze(1)
        if act.numel():
            sub = batch if act.numel() == correct.numel() else batch.rows(act)
            run = self.descend(net, sub, self.objective(net, sub, None), start=None if start is None else start[act],
                               track=True, early_stop=self.bracket == "first_wrong")
            x_adv[act] = run.x_adv
            crossed[act] = run.wrong
            hit = run.wrong.nonzero().squeeze(1)
            if hit.numel():
                y_hit = sub.y[hit]
                m_hit = None if sub.inside is None else sub.inside[hit]
                x_adv[act[hit]] = bisect(net, sub.x0[hit], run.x_adv[hit],
                                         lambda out: task.correct(out, y_hit, m_hit), self.bisection_steps)
        return BoundaryResult(x_adv, crossed, size(x_adv - batch.x0, self.norm), correct)

    def result(self, found: BoundaryResult, batch: Batch) -> BoundaryResult:
        return BoundaryResult(found.x_adv.to(batch.dtype), found.crossed, found.dist, found.correct)
