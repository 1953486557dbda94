"""FGSM and PGD with per-sample radii, L2 or Linf, random start, restarts and early stopping.

Gradients are taken with respect to the input only (``torch.autograd.grad``), never ``.backward()``: no
parameter ``.grad`` is touched. The iterate is kept in float32 whatever autocast is active; the model sees
it in the dtype of the clean input. Under float16 autocast the attack objective is scaled before the input
gradient is taken (and the scale lowered if that overflows), so that small gradients do not underflow to zero
and stall the attack silently; the step direction is normalised, so the scale does not change it. Attacks work
inside ``torch.no_grad()`` (MONAI's ``eval_mode``) but not inside ``torch.inference_mode()``.

BatchNorm follows ``bn`` (see :mod:`pipeline.adversarial.context`): ``"running"`` statistics, or the clean
batch's ``"batch"`` statistics recorded by :class:`~pipeline.adversarial.context.BatchStatistics`.

Region of interest (``roi``, the batch's ``(B, 1, *spatial)`` mask, optional): only pixels with roi > 0 are
perturbed, in every channel. The random start and each step's input gradient are multiplied by the mask before
the projection, and every point is reset to x outside it after the clamp, so each iterate lies in the ball and
equals x exactly outside the ROI; the attack loss and "handled correctly" count only the ROI's pixels
(segmentation, see :mod:`pipeline.adversarial.tasks`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from monai.utils import convert_to_tensor

from pipeline.adversarial.context import BatchStatistics, attack_mode
from pipeline.adversarial.geometry import (as_radius, check_norm, clamp_range, direction, per_sample, project,
                                           random_in_ball)
from pipeline.adversarial.tasks import Task

Range = tuple[float, float] | None
# (output, targets of those rows) -> (B,); an attack with a ROI passes the ROI of those rows as a third argument
Objective = Callable[..., torch.Tensor]

_FP16_SCALES = (2.0 ** 16, 2.0 ** 8, 1.0)


def _fp16_autocast() -> bool:
    for device in ("cuda", "cpu"):
        if torch.is_autocast_enabled(device) and torch.get_autocast_dtype(device) == torch.float16:
            return True
    return False


def input_gradient(net: torch.nn.Module, x: torch.Tensor, value: Callable[[torch.Tensor], torch.Tensor],
                   input_dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """(d sum(value(net(x))) / dx in float32, detached output at x): the one place attacks differentiate.

    Under float16 (autocast or a float16 input) the objective is scaled by 2**16 before differentiation, then
    2**8 and 1 if the gradient is not finite; the gradient returned is unscaled.
    """
    xa = x.detach().requires_grad_(True)
    with torch.enable_grad():
        out = net(xa.to(input_dtype))
        total = value(out).sum()
        scales = _FP16_SCALES if (input_dtype == torch.float16 or _fp16_autocast()) else (1.0,)
        for i, scale in enumerate(scales):
            last = i == len(scales) - 1
            (grad,) = torch.autograd.grad(total * scale if scale != 1.0 else total, xa, retain_graph=not last)
            if last or bool(torch.isfinite(grad).all()):
                break
    return grad.float() / scale, out.detach()


def roi_inside(roi: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor | None:
    """The ROI as a bool mask ``roi > 0`` on x's device (``(B, 1, *spatial)``, broadcast over channels), or None."""
    return None if roi is None else convert_to_tensor(roi, device=x.device, track_meta=False) > 0


def keep_outside(x0: torch.Tensor, point: torch.Tensor, inside: torch.Tensor | None) -> torch.Tensor:
    """``point`` inside the ROI, x0 exactly outside it (``inside``: :func:`roi_inside`; None: ``point``)."""
    return point if inside is None else torch.where(inside, point, x0)


def start_point(x0: torch.Tensor, r: torch.Tensor, norm: str, random_start: bool | float, clamp: Range,
                roi: torch.Tensor | None = None) -> torch.Tensor:
    """True: uniform in each ball; a float s: x + s * N(0, 1) projected into the ball (TRADES); False: x.

    With ``roi`` the random perturbation is multiplied by the mask before projection (so it stays in the ball)
    and the point equals x outside the ROI."""
    inside = roi_inside(roi, x0)
    if inside is None:
        if random_start is True:
            return clamp_range(x0 + random_in_ball(x0, r, norm), clamp)
        if random_start:
            return clamp_range(x0 + project(float(random_start) * torch.randn_like(x0), r, norm), clamp)
        return x0
    if random_start is True:
        delta = random_in_ball(x0, r, norm) * inside
    elif random_start:
        delta = project(float(random_start) * torch.randn_like(x0) * inside, r, norm)
    else:
        return x0
    return keep_outside(x0, clamp_range(x0 + delta, clamp), inside)


@dataclass
class PGDRun:
    x_adv: torch.Tensor   # float32: final iterate, or (early_stop) the first iterate not handled correctly
    wrong: torch.Tensor   # bool (B,): some iterate (start and final included) was not handled correctly


def run_pgd(net: torch.nn.Module, x0: torch.Tensor, y: torch.Tensor, r: torch.Tensor, step: torch.Tensor, *,
            task: Task, objective: Objective, norm: str, steps: int, random_start: bool | float, clamp: Range,
            input_dtype: torch.dtype, early_stop: bool = False, track: bool = False,
            roi: torch.Tensor | None = None, start: torch.Tensor | None = None) -> PGDRun:
    """The PGD loop on an already prepared network (see :func:`pgd`); x0 float32.

    ``track``: also judge every iterate x_0 .. x_K (x_0..x_{K-1} come free with the gradient forwards, x_K
    costs one no-grad forward). ``early_stop`` (implies ``track``): a sample leaves the batch at its first
    iterate not handled correctly, which it keeps; the others go on, so finished samples cost no compute.
    ``roi``: perturb only inside it (module doc); ``objective`` then gets the ROI rows as a third argument.
    ``start``: the first iterate (projected into each ball), instead of ``random_start``'s.
    """
    track = track or early_stop
    ma = roi_inside(roi, x0)
    if start is None:
        cur = start_point(x0, r, norm, random_start, clamp, ma)
    else:
        cur = keep_outside(x0, clamp_range(x0 + project(start.detach().float() - x0, r, norm), clamp), ma)
    x_adv = cur.clone()
    wrong = torch.zeros(x0.shape[0], dtype=torch.bool, device=x0.device)
    active = torch.arange(x0.shape[0], device=x0.device)
    xa, ya, ra, sa = x0, y, r, step
    for k in range(steps + (1 if track else 0)):
        if k < steps:
            if ma is None:
                grad, out = input_gradient(net, cur, lambda o, t=ya: objective(o, t), input_dtype)
                nxt = clamp_range(xa + project(cur + per_sample(sa, xa) * direction(grad, norm) - xa, ra, norm),
                                  clamp)
            else:
                grad, out = input_gradient(net, cur, lambda o, t=ya, m=ma: objective(o, t, m), input_dtype)
                move = per_sample(sa, xa) * direction(grad * ma, norm)
                nxt = keep_outside(xa, clamp_range(xa + project(cur + move - xa, ra, norm), clamp), ma)
        else:
            with torch.no_grad():
                out = net(cur.to(input_dtype))
        if track:
            bad = ~task.correct(out, ya, ma)
            wrong[active] |= bad
        if early_stop:
            x_adv[active] = cur  # frozen here if wrong, overwritten later otherwise
            keep = (~bad).nonzero().squeeze(1)
            if keep.numel() < active.numel():
                active, xa, ya, ra, sa, cur = active[keep], xa[keep], ya[keep], ra[keep], sa[keep], cur[keep]
                ma = None if ma is None else ma[keep]
                if k < steps:
                    nxt = nxt[keep]
            if not active.numel():
                break
        if k < steps:
            cur = nxt
    if early_stop:
        x_adv[active] = cur
    else:
        x_adv = cur
    return PGDRun(x_adv.detach(), wrong)


def pgd(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float | torch.Tensor, *, task: Task,
        norm: str = "L2", steps: int = 10, alpha: float = 4.0, step_size: float | torch.Tensor | None = None,
        random_start: bool | float = True, restarts: int = 1, loss: str = "ce", clamp: Range = None,
        bn: str = "running", stats: BatchStatistics | None = None, early_stop: bool = False,
        objective: Objective | None = None, roi: torch.Tensor | None = None,
        start: torch.Tensor | None = None) -> torch.Tensor:
    """PGD inside each sample's ball of radius ``eps[i]``; returns x_adv (detached, dtype of x).

    Step size ``alpha * eps[i] / steps`` unless ``step_size`` is given (float or ``(B,)``). The attack
    maximises ``task.attack_loss(output, y, loss)`` unless ``objective(output, y) -> (B,)`` is given (with a
    ``roi``: ``objective(output, y, roi)``). ``early_stop``: each sample stops at its first iterate not handled
    correctly. With several restarts each sample keeps its worst restart: one not handled correctly beats one
    that is, then the higher attack loss wins (one extra no-grad forward per restart). ``roi``: perturb only
    inside it (module doc). ``start``: the first restart's first iterate (e.g. an earlier attack's result,
    projected into the ball) instead of a random one.
    """
    check_norm(norm)
    x0 = x.detach().float()
    r = as_radius(eps, x)
    step = alpha * r / steps if step_size is None else as_radius(step_size, x)
    if objective is None:
        def objective(out, t, m=None):
            return task.attack_loss(out, t, loss, m)
    inside = roi_inside(roi, x)
    extra = () if inside is None else (inside,)
    best, best_wrong, best_loss = x0, None, None
    with attack_mode(model, bn, stats) as net:
        for i in range(restarts):
            x_adv = run_pgd(net, x0, y, r, step, task=task, objective=objective, norm=norm, steps=steps,
                            random_start=random_start, clamp=clamp, input_dtype=x.dtype,
                            early_stop=early_stop, roi=inside, start=start if i == 0 else None).x_adv
            if restarts == 1:
                best = x_adv
                break
            with torch.no_grad():
                out = net(x_adv.to(x.dtype))
                wrong, value = ~task.correct(out, y, inside), objective(out, y, *extra)
            if best_wrong is None:
                best, best_wrong, best_loss = x_adv, wrong, value
                continue
            better = (wrong & ~best_wrong) | ((wrong == best_wrong) & (value > best_loss))
            best = torch.where(per_sample(better, x0), x_adv, best)
            best_wrong, best_loss = best_wrong | wrong, torch.where(better, value, best_loss)
    return best.detach().to(x.dtype)


def fgsm(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float | torch.Tensor, *, task: Task,
         norm: str = "Linf", loss: str = "ce", clamp: Range = None, bn: str = "running",
         roi: torch.Tensor | None = None) -> torch.Tensor:
    """One step of size eps[i] along sign(grad) (Linf) or grad/||grad|| (L2), from the clean input (inside
    ``roi`` only, when given)."""
    return pgd(model, x, y, eps, task=task, norm=norm, steps=1, step_size=eps, random_start=False, loss=loss,
               clamp=clamp, bn=bn, roi=roi)
