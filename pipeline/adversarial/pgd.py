"""PGD and the attacks that are PGD with one thing changed: FGSM (one step), TRADES' KL attack (the objective).

All share the call of :class:`~pipeline.adversarial.attack.Attack` (model mode, dtypes, ball, clamp, ROI) and one
loop, :meth:`PGD.descend`; :class:`~pipeline.adversarial.boundary.BoundaryPGD` (IMA) runs the same loop with its
own stopping rule.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pipeline.adversarial.attack import Attack, Batch, Objective, input_gradient, masked
from pipeline.adversarial.context import attack_mode
from pipeline.adversarial.geometry import as_radius, direction, per_sample

START_STD = 0.001   # TRADES starts its attack at x + 0.001 * N(0, 1)


@dataclass
class PGDRun:
    x_adv: torch.Tensor   # float32: final iterate, or (early_stop) the first iterate not handled correctly
    wrong: torch.Tensor   # bool (B,): some iterate (start and final included) was not handled correctly


@dataclass(frozen=True)
class PGD(Attack):
    """PGD inside each sample's ball of radius ``eps[i]``, maximising ``task.attack_loss(output, y, loss)``.

    K steps of ``alpha * eps[i] / K`` along the gradient's sign (Linf) or its L2 direction, unless ``step_size``
    (a float or ``(B,)``) fixes the step. ``early_stop``: each sample stops at its first iterate not handled
    correctly. With several ``restarts`` each sample keeps its worst restart: one not handled correctly beats one
    that is, then the higher objective wins (one extra no-grad forward per restart). A call's ``start`` replaces
    the first restart's random start.
    """

    restarts: int = 1
    step_size: float | torch.Tensor | None = None

    def objective(self, net: torch.nn.Module, batch: Batch, clean: torch.Tensor | None) -> Objective:
        """What the attack maximises per sample: (output, targets of those rows, their ROI or None) -> (B,)."""
        task, loss = self.task, self.loss

        def attack_loss(out, t, m=None):
            return task.attack_loss(out, t, loss, m)
        return attack_loss

    def step(self, batch: Batch) -> torch.Tensor:
        """Each sample's step size ``(B,)``."""
        return self.alpha * batch.r / self.steps if self.step_size is None else as_radius(self.step_size, batch.x)

    def perturb(self, net, batch, *, clean=None, start=None):
        objective = self.objective(net, batch, clean)
        task, y, inside = self.task, batch.y, batch.inside
        best, best_wrong, best_loss = batch.x0, None, None
        for i in range(self.restarts):
            x_adv = self.descend(net, batch, objective, start=start if i == 0 else None,
                                 early_stop=self.early_stop).x_adv
            if self.restarts == 1:
                return x_adv
            with torch.no_grad():
                out = net(x_adv.to(batch.dtype))
                wrong, value = ~task.correct(out, y, inside), objective(out, y, inside)
            if best_wrong is None:
                best, best_wrong, best_loss = x_adv, wrong, value
                continue
            better = (wrong & ~best_wrong) | ((wrong == best_wrong) & (value > best_loss))
            best = torch.where(per_sample(better, batch.x0), x_adv, best)
            best_wrong, best_loss = best_wrong | wrong, torch.where(better, value, best_loss)
        return best

    def judged(self, model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float | torch.Tensor, *,
               roi: torch.Tensor | None = None, start: torch.Tensor | None = None) -> PGDRun:
        """The call with the attack's own verdict: ``x_adv`` (in the dtype of x) and ``wrong[i]``, x_adv[i] is not
        handled correctly. With ``early_stop`` every iterate is judged as it is evaluated and a sample keeps its
        first wrong one, so the verdict costs no forward of its own (the margin search runs thousands of these
        calls). One restart only: the best of several is judged by a forward of its own (:meth:`perturb`)."""
        if not self.early_stop or self.restarts != 1:
            raise ValueError("judged needs early_stop and one restart (the verdict of the iterate kept)")
        batch = Batch.of(x, y, eps, roi)
        with attack_mode(model, self.bn) as net:
            run = self.descend(net, batch, self.objective(net, batch, None), start=start, early_stop=True)
        return PGDRun(run.x_adv.to(batch.dtype), run.wrong)

    def descend(self, net: torch.nn.Module, batch: Batch, objective: Objective, *, start: torch.Tensor | None = None,
                early_stop: bool = False, track: bool = False) -> PGDRun:
        """The PGD loop, on the network as the attack sees it.

        ``track``: also judge every iterate x_0 .. x_K (x_0..x_{K-1} come free with the gradient forwards, x_K
        costs one no-grad forward). ``early_stop`` (implies ``track``): a sample leaves the batch at its first
        iterate not handled correctly, which it keeps; the others go on, so finished samples cost no compute.
        """
        track = track or early_stop
        steps, task, dtype = self.steps, self.task, batch.dtype
        cur = self.first_point(batch, start)
        x_adv = cur.clone() if early_stop else cur
        wrong = torch.zeros(batch.x0.shape[0], dtype=torch.bool, device=batch.x0.device)
        active = torch.arange(batch.x0.shape[0], device=batch.x0.device)
        xa, ya, ra, sa, ma = batch.x0, batch.y, batch.r, self.step(batch), batch.inside
        for k in range(steps + (1 if track else 0)):
            if k < steps:
                grad, out = input_gradient(net, cur, lambda o, t=ya, m=ma: objective(o, t, m), dtype)
                nxt = self.into_ball(xa, cur + per_sample(sa, xa) * direction(masked(grad, ma), self.norm), ra, ma)
            else:
                with torch.no_grad():
                    out = net(cur.to(dtype))
            if track:
                bad = ~task.correct(out, ya, ma)
                if early_stop:
                    wrong[active] |= bad
                else:
                    wrong |= bad
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


@dataclass(frozen=True)
class FGSM(PGD):
    """One step of size eps[i] along sign(grad) (Linf) or grad/||grad|| (L2), from the clean input (inside the
    ROI only, when given)."""

    norm: str = "Linf"
    steps: int = 1
    random_start: bool | float = False

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.steps != 1 or self.random_start is not False or self.restarts != 1 or self.step_size is not None:
            raise ValueError("FGSM is one step of size eps from the clean input: its steps, random_start, restarts "
                             "and step_size are fixed")

    def step(self, batch):
        return batch.r


@dataclass(frozen=True)
class TradesKL(PGD):
    """TRADES' attack: PGD maximising KL(clean output || output), starting at x + 0.001 * N(0, 1).

    ``random_start`` True means that start (projected into the ball, clamped), False the clean input. The clean
    output is the call's ``clean`` (a caller with ``bn="batch"`` gives its training forward's output), else the
    attack's own no-grad forward at x. Segmentation: the KL is pixel-wise, averaged per image (over the ROI). The
    reference is the whole batch's, so samples cannot leave it: no ``early_stop``.
    """

    loss: str = "kl"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.loss != "kl" or self.early_stop:
            raise ValueError("TradesKL maximises the KL divergence to the clean output (loss 'kl', no early_stop)")
        if self.random_start is True:
            object.__setattr__(self, "random_start", START_STD)

    def objective(self, net, batch, clean):
        reference, divergence = self.clean_output(net, batch, clean), self.task.divergence

        def kl(out, t, m=None):
            return divergence(reference, out, m)
        return kl
