"""FGSM and PGD with per-sample radii, L2 or Linf, random start and restarts (torchattacks-style classes).

Gradients are taken with respect to the input only (``torch.autograd.grad``), never ``.backward()``: no
parameter ``.grad`` is touched. The iterate is kept in float32 whatever autocast is active; the model sees
it in the dtype of the clean input. Attacks work inside ``torch.no_grad()`` (MONAI's ``eval_mode``) but not
inside ``torch.inference_mode()``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from pipeline.adversarial.context import attack_mode
from pipeline.adversarial.geometry import (as_radius, check_norm, clamp_range, direction, project,
                                           random_in_ball, per_sample)
from pipeline.adversarial.tasks import Task

Range = tuple[float, float] | None


def ascent_step(net: torch.nn.Module, x_adv: torch.Tensor, x: torch.Tensor,
                objective: Callable[[torch.Tensor], torch.Tensor], *, eps: torch.Tensor, step: torch.Tensor,
                norm: str, clamp: Range, input_dtype: torch.dtype = torch.float32
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """One projected ascent step of ``objective(output) -> (B,)`` from ``x_adv`` (float32, around the clean
    x, float32). Returns (next iterate, detached output at x_adv)."""
    xa = x_adv.detach().requires_grad_(True)
    with torch.enable_grad():
        out = net(xa.to(input_dtype))
        (grad,) = torch.autograd.grad(objective(out).sum(), xa)
    delta = project(xa.detach() + per_sample(step, x) * direction(grad, norm) - x, eps, norm)
    return clamp_range(x + delta, clamp), out.detach()


def pgd(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float | torch.Tensor, *, task: Task,
        norm: str = "L2", steps: int = 10, alpha: float = 4.0, step_size: float | torch.Tensor | None = None,
        random_start: bool = True, restarts: int = 1, loss: str = "ce", clamp: Range = None,
        update_bn: bool = False) -> torch.Tensor:
    """PGD inside each sample's ball of radius ``eps[i]``; returns x_adv (detached, dtype of x).

    Step size ``alpha * eps[i] / steps`` unless ``step_size`` is given (float or ``(B,)``). With several
    restarts each sample keeps its worst restart: one not handled correctly beats one that is, then the
    higher attack loss wins (one extra no-grad forward per restart).
    """
    check_norm(norm)
    x0 = x.detach().float()
    r = as_radius(eps, x)
    step = alpha * r / steps if step_size is None else as_radius(step_size, x)
    best, best_wrong, best_loss = x0, None, None

    def objective(out):
        return task.attack_loss(out, y, loss)

    with attack_mode(model, update_bn) as net:
        for _ in range(restarts):
            x_adv = clamp_range(x0 + random_in_ball(x0, r, norm), clamp) if random_start else x0
            for _ in range(steps):
                x_adv, _ = ascent_step(net, x_adv, x0, objective, eps=r, step=step, norm=norm, clamp=clamp,
                                       input_dtype=x.dtype)
            if restarts == 1:
                best = x_adv
                break
            with torch.no_grad():
                out = net(x_adv.to(x.dtype))
                wrong, value = ~task.correct(out, y), task.attack_loss(out, y, loss)
            if best_wrong is None:
                best, best_wrong, best_loss = x_adv, wrong, value
                continue
            better = (wrong & ~best_wrong) | ((wrong == best_wrong) & (value > best_loss))
            best = torch.where(per_sample(better, x0), x_adv, best)
            best_wrong, best_loss = best_wrong | wrong, torch.where(better, value, best_loss)
    return best.detach().to(x.dtype)


def fgsm(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float | torch.Tensor, *, task: Task,
         norm: str = "Linf", loss: str = "ce", clamp: Range = None, update_bn: bool = False) -> torch.Tensor:
    """One step of size eps[i] along sign(grad) (Linf) or grad/||grad|| (L2), from the clean input."""
    return pgd(model, x, y, eps, task=task, norm=norm, steps=1, step_size=eps, random_start=False, loss=loss,
               clamp=clamp, update_bn=update_bn)


@dataclass
class PGD:
    """``PGD(task, ...)(model, x, y, eps) -> x_adv``; see :func:`pgd`."""

    task: Task
    norm: str = "L2"
    steps: int = 10
    alpha: float = 4.0
    step_size: float | None = None
    random_start: bool = True
    restarts: int = 1
    loss: str = "ce"
    clamp: Range = None
    update_bn: bool = False

    def __call__(self, model, x, y, eps):
        return pgd(model, x, y, eps, task=self.task, norm=self.norm, steps=self.steps, alpha=self.alpha,
                   step_size=self.step_size, random_start=self.random_start, restarts=self.restarts,
                   loss=self.loss, clamp=self.clamp, update_bn=self.update_bn)


@dataclass
class FGSM:
    """``FGSM(task, ...)(model, x, y, eps) -> x_adv``; see :func:`fgsm`."""

    task: Task
    norm: str = "Linf"
    loss: str = "ce"
    clamp: Range = None
    update_bn: bool = False

    def __call__(self, model, x, y, eps):
        return fgsm(model, x, y, eps, task=self.task, norm=self.norm, loss=self.loss, clamp=self.clamp,
                    update_bn=self.update_bn)
