"""Batched bisection onto the decision boundary between a point handled correctly and one that is not."""

from __future__ import annotations

from collections.abc import Callable

import torch

from pipeline.adversarial.context import attack_mode
from pipeline.adversarial.geometry import per_sample


@torch.no_grad()
def bisect(model: torch.nn.Module, x_in: torch.Tensor, x_out: torch.Tensor,
           is_correct: Callable[[torch.Tensor], torch.Tensor], steps: int = 10,
           update_bn: bool = False) -> torch.Tensor:
    """Halve each segment [x_in[i], x_out[i]] ``steps`` times; return the midpoints of the final brackets.

    ``is_correct(output) -> bool (B,)`` says which rows of a model output are handled correctly (the caller
    closes over the targets of exactly these rows). x_in should be handled correctly and x_out not; the
    true boundary crossing then lies within ``||x_out - x_in|| / 2**(steps + 1)`` of the returned point
    (the authors' IMA code returns this midpoint too). One no-grad forward per halving, whole batch at once.
    """
    lo, hi = x_in.detach().float(), x_out.detach().float()
    with attack_mode(model, update_bn) as net:
        for _ in range(steps):
            mid = (lo + hi) / 2
            ok = per_sample(is_correct(net(mid.to(x_in.dtype))), mid)
            lo, hi = torch.where(ok, mid, lo), torch.where(ok, hi, mid)
    return ((lo + hi) / 2).to(x_in.dtype)
