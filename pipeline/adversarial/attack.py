"""The shape every attack has: its settings in the constructor, then one call per batch.

``attack = PGD(task, norm="L2", steps=10, ...)`` once; then ``x_adv = attack(model, x, y, eps, stats=..., roi=...)``
for every batch, ``eps`` a float or one radius per sample ``(B,)``. The attacks: :class:`~pipeline.adversarial.pgd.PGD`,
:class:`~pipeline.adversarial.pgd.FGSM`, :class:`~pipeline.adversarial.pgd.TradesKL`,
:class:`~pipeline.adversarial.boundary.BoundaryPGD` (IMA) and :class:`~pipeline.adversarial.apgd.APGD`.

The call (:meth:`Attack.__call__`) is the same for all and owns what they share:

* the network an attack sees: :func:`~pipeline.adversarial.context.attack_mode` with the BatchNorm rule ``bn``
  (``"running"`` statistics, or the clean batch's ``"batch"`` statistics that ``stats`` recorded with
  :class:`~pipeline.adversarial.context.BatchStatistics`); the model's modes are restored on exit;
* dtypes: the iterate is kept in float32 whatever autocast is active, the model sees it in the dtype of the clean
  input, and the result comes back detached in that dtype. Gradients are taken with respect to the input only
  (:func:`input_gradient`, the one function that differentiates), never with ``.backward()``: no parameter
  ``.grad`` is touched. Under float16 autocast the objective is scaled before differentiation (and the scale
  lowered if that overflows), so that small gradients do not underflow to zero and stall the attack silently;
  step directions are normalised, so the scale does not change them. Attacks work inside ``torch.no_grad()``
  (MONAI's ``eval_mode``) but not inside ``torch.inference_mode()``;
* the ball and the valid range: every point an attack visits is projected into each sample's ball and clamped to
  ``clamp`` (:meth:`Attack.into_ball`);
* the region of interest (``roi``, the batch's ``(B, 1, *spatial)`` mask, optional): only pixels with roi > 0 are
  perturbed, in every channel. The random start and each step's input gradient are multiplied by the mask before
  the projection, and every point is reset to x outside it after the clamp, so each iterate lies in the ball and
  equals x exactly outside the ROI; the attack loss and "handled correctly" count only the ROI's pixels
  (segmentation, see :mod:`pipeline.adversarial.tasks`).

Two optional call arguments serve the attacks that use them: ``clean``, the network's output at x as the attack
sees it, when the caller already has it (TRADES' reference, APGD-T's target class, the boundary attack's "handled
correctly at x"; an attack that needs it and is not given it computes it with one no-grad forward), and ``start``,
the first iterate instead of the random start (projected into each ball; the margin search's warm start).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from monai.utils import convert_to_tensor

from pipeline.adversarial.context import BatchStatistics, attack_mode
from pipeline.adversarial.geometry import as_radius, check_norm, clamp_range, project, random_in_ball
from pipeline.adversarial.tasks import Task

Range = tuple[float, float] | None
# (output, targets of those rows, ROI mask of those rows or None) -> (B,)
Objective = Callable[[torch.Tensor, torch.Tensor, "torch.Tensor | None"], torch.Tensor]

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
    grad = grad.float()
    return (grad if scale == 1.0 else grad / scale), out.detach()


def roi_inside(roi: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor | None:
    """The ROI as a bool mask ``roi > 0`` on x's device (``(B, 1, *spatial)``, broadcast over channels), or None."""
    return None if roi is None else convert_to_tensor(roi, device=x.device, track_meta=False) > 0


def keep_outside(x0: torch.Tensor, point: torch.Tensor, inside: torch.Tensor | None) -> torch.Tensor:
    """``point`` inside the ROI, x0 exactly outside it (``inside``: :func:`roi_inside`; None: ``point``)."""
    return point if inside is None else torch.where(inside, point, x0)


def masked(v: torch.Tensor, inside: torch.Tensor | None) -> torch.Tensor:
    """``v`` with every pixel outside the ROI set to zero (``inside`` None: ``v``)."""
    return v if inside is None else v * inside


def start_point(x0: torch.Tensor, r: torch.Tensor, norm: str, random_start: bool | float, clamp: Range,
                inside: torch.Tensor | None = None) -> torch.Tensor:
    """True: uniform in each ball; a float s: x + s * N(0, 1) projected into the ball (TRADES); False: x.

    With a ROI (``inside``, :func:`roi_inside`) the random perturbation is multiplied by the mask before
    projection (so it stays in the ball) and the point equals x outside the ROI."""
    if random_start is True:
        delta = masked(random_in_ball(x0, r, norm), inside)
    elif random_start:
        delta = project(masked(float(random_start) * torch.randn_like(x0), inside), r, norm)
    else:
        return x0
    return keep_outside(x0, clamp_range(x0 + delta, clamp), inside)


@dataclass
class Batch:
    """One call's inputs as every attack loop wants them."""

    x: torch.Tensor               # the clean input as given (the network sees every iterate in its dtype)
    x0: torch.Tensor              # the same, detached float32
    y: torch.Tensor               # targets
    r: torch.Tensor               # float32 (B,): each sample's radius
    inside: torch.Tensor | None   # the ROI as a bool mask (:func:`roi_inside`), or None

    @classmethod
    def of(cls, x: torch.Tensor, y: torch.Tensor, eps: float | torch.Tensor,
           roi: torch.Tensor | None = None) -> Batch:
        return cls(x, x.detach().float(), y, as_radius(eps, x), roi_inside(roi, x))

    @property
    def dtype(self) -> torch.dtype:
        return self.x.dtype

    def rows(self, idx: torch.Tensor) -> Batch:
        """The samples ``idx`` of the batch."""
        return Batch(self.x[idx], self.x0[idx], self.y[idx], self.r[idx],
                     None if self.inside is None else self.inside[idx])


@dataclass(frozen=True)
class Attack:
    """An attack's settings; calling it attacks one batch (see the module doc).

    ``task``: what "loss", "attack loss" and "handled correctly" mean; ``norm``: ``"L2"`` or ``"Linf"``; ``steps``:
    K, the input gradients per sample; ``alpha``: the step size rule, ``alpha * eps[i] / K`` (attacks whose step
    size adapts, APGD, do not read it); ``random_start``: True uniform in the ball, a float s x + s * N(0, 1),
    False x itself; ``loss``: the attack loss of the task it maximises (``task.attack_kinds``); ``clamp``: the
    valid intensity range, None for none; ``bn``: the BatchNorm rule of every forward; ``early_stop``: a sample
    stops at its first iterate not handled correctly. Subclasses implement :meth:`perturb`.
    """

    task: Task
    norm: str = "L2"
    steps: int = 10
    alpha: float = 4.0
    random_start: bool | float = True
    loss: str = "ce"
    clamp: Range = None
    bn: str = "running"
    early_stop: bool = False

    def __post_init__(self) -> None:
        check_norm(self.norm)

    def __call__(self, model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float | torch.Tensor, *,
                 stats: BatchStatistics | None = None, roi: torch.Tensor | None = None,
                 clean: torch.Tensor | None = None, start: torch.Tensor | None = None) -> Any:
        """Attack (x, y) inside each sample's ball of radius ``eps[i]`` (inside ``roi`` only, when given);
        ``stats``: the clean batch's BatchNorm statistics (``bn="batch"``); ``clean``, ``start``: see the module
        doc. Returns x_adv, detached, in the dtype of x (the boundary attack: its result)."""
        batch = Batch.of(x, y, eps, roi)
        with attack_mode(model, self.bn, stats) as net:
            found = self.perturb(net, batch, clean=clean, start=start)
        return self.result(found, batch)

    def perturb(self, net: torch.nn.Module, batch: Batch, *, clean: torch.Tensor | None,
                start: torch.Tensor | None) -> Any:
        """The attack proper, on the network as the attack sees it; returns float32 points (or what
        :meth:`result` turns into the call's result)."""
        raise NotImplementedError

    def result(self, found: torch.Tensor, batch: Batch) -> Any:
        return found.detach().to(batch.dtype)

    def into_ball(self, x0: torch.Tensor, point: torch.Tensor, r: torch.Tensor,
                  inside: torch.Tensor | None) -> torch.Tensor:
        """``point`` projected into each ball of radius r[i] around x0[i], clamped to the valid range, and x0
        outside the ROI."""
        return keep_outside(x0, clamp_range(x0 + project(point - x0, r, self.norm), self.clamp), inside)

    def first_point(self, batch: Batch, start: torch.Tensor | None = None) -> torch.Tensor:
        """The first iterate: ``start`` projected into the ball, else the random start."""
        if start is None:
            return start_point(batch.x0, batch.r, self.norm, self.random_start, self.clamp, batch.inside)
        return self.into_ball(batch.x0, start.detach().float(), batch.r, batch.inside)

    def clean_output(self, net: torch.nn.Module, batch: Batch, clean: torch.Tensor | None) -> torch.Tensor:
        """The output at x as the attack sees it: ``clean`` when the caller gave it, else one no-grad forward."""
        if clean is not None:
            return clean
        with torch.no_grad():
            return net(batch.x)
