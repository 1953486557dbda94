"""Batched bisection onto the decision boundary between a point handled correctly and one that is not."""

from __future__ import annotations

from collections.abc import Callable

import torch

from pipeline.adversarial.geometry import per_sample


@torch.no_grad()
def bisect(net: torch.nn.Module, x_in: torch.Tensor, x_out: torch.Tensor,
           is_correct: Callable[[torch.Tensor], torch.Tensor], steps: int = 10) -> torch.Tensor:
    """Halve each segment [x_in[i], x_out[i]] ``steps`` times; return the correctly handled end of each final
    bracket (as the authors' IMA code does with its default settings).

    ``net`` is the network as the attack sees it (inside :func:`~pipeline.adversarial.context.attack_mode`).
    ``is_correct(output) -> bool (B,)`` says which rows of an output are handled correctly (the caller closes
    over the targets of exactly these rows). With x_in handled correctly and x_out not, the returned point is
    handled correctly and lies within ``||x_out - x_in|| / 2**steps`` of a boundary crossing on the segment.
    One no-grad forward per halving, whole batch at once.
    """
    lo, hi = x_in.detach().float(), x_out.detach().float()
    for _ in range(steps):
        mid = (lo + hi) / 2
        ok = per_sample(is_correct(net(mid.to(x_in.dtype))), mid)
        lo, hi = torch.where(ok, mid, lo), torch.where(ok, hi, mid)
    return lo.to(x_in.dtype)
