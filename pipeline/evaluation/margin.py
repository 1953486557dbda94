"""Per-sample robustness margin: the smallest radius at which the attack breaks a sample.

Search: PGD (worst case over the attack losses) at an increasing grid of radii, each sample only until it
first breaks; then bisection on the radius between the last radius that held and the first that broke, all
samples of a batch bisected together. The estimate is that first breaking radius after bisection, an upper
bound on the true distance to the decision boundary (PGD is a lower-bound attack, so the true margin can only
be smaller). A sample wrong on clean input has margin 0; a sample that survives the largest radius is
*censored*: its margin is only known to exceed the grid (``inf`` in the per-sample values; quantiles then
report the largest radius as a lower bound and ``unbroken_fraction`` says how many).

Reuse of the attack suite: :func:`known_brackets` reads from a :class:`SuiteResult` the largest evaluation
radius at which each sample held and the smallest at which it broke; :func:`estimate_margin` started from
those brackets attacks the grid only above the largest radius for samples never broken, and bisects the
others' brackets directly. With ``early_stop`` (default) PGD drops a sample at its first wrong iterate.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from pipeline.adversarial.pgd import PGD  # noqa: E402
from pipeline.adversarial.tasks import Task  # noqa: E402
from pipeline.evaluation.results import CLEAN, SuiteResult  # noqa: E402

QUANTILES = {"p10": 0.10, "p50": 0.50, "p90": 0.90}


def radius_grid(eps: Sequence[float], points: int = 12, below: float = 4.0, above: float = 4.0) -> list[float]:
    """A geometric grid from min(eps)/below to max(eps)*above (the evaluation radii in its middle)."""
    lo, hi = min(eps) / below, max(eps) * above
    return [float(r) for r in np.geomspace(lo, hi, points)]


def margin_attacks(*, task: Task, norm: str, losses: Sequence[str], steps: int, restarts: int = 1,
                   alpha: float = 2.5, clamp: tuple[float, float] | None = None, early_stop: bool = True) -> list[PGD]:
    """The PGD attacks :func:`broken` runs in turn: one per attack loss with ``restarts`` restarts, or with
    ``early_stop`` one per loss and restart (K steps of ``alpha * eps / K``)."""
    runs = ([(loss, 1) for _ in range(restarts) for loss in losses] if early_stop
            else [(loss, restarts) for loss in losses])
    return [PGD(task, norm=norm, steps=steps, alpha=alpha, restarts=tries, loss=loss, clamp=clamp,
                early_stop=early_stop) for loss, tries in runs]


def broken(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, eps: torch.Tensor, attacks: Sequence[PGD], *,
           start: torch.Tensor | None = None, roi: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Bool (B,): some attack of ``attacks`` (:func:`margin_attacks`) finds an input inside eps[i] that is not
    handled correctly; and per sample the input that did (or, for a sample that held, the last attack's final
    iterate).

    Each attack runs only on the samples the ones before did not break. ``start`` (B, ...): the first iterate
    (projected into the ball) of the first attack of each loss instead of a random one; the restarts after it
    start at random (a second run from the same point would repeat the first exactly). ``roi`` ((B, 1, *spatial),
    optional): perturb inside it only, and judge "handled correctly" on its pixels (as the attack suite does).
    """
    hit = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
    found = x.detach().float().clone()
    warm = set()
    for attack in attacks:
        todo = (~hit).nonzero().squeeze(1)
        if not todo.numel():
            break
        first = start is not None and attack.loss not in warm
        warm.add(attack.loss)
        rows_roi = None if roi is None else roi[todo]
        args = (model, x[todo], y[todo], eps[todo])
        kwargs = {"start": start[todo] if first else None, "roi": rows_roi}
        if attack.early_stop and attack.restarts == 1:   # the attack judged the point it kept: no forward here
            run = attack.judged(*args, **kwargs)
            x_adv, wrong = run.x_adv, run.wrong
        else:
            x_adv = attack(*args, **kwargs)
            with torch.no_grad():
                wrong = ~attack.task.correct(model(x_adv), y[todo], rows_roi)
        found[todo] = x_adv.float()
        hit[todo] = wrong
    return hit, found


def known_brackets(result: SuiteResult, norm: str, attack: str = "pgd") -> tuple[np.ndarray, np.ndarray]:
    """Per sample (lo, hi) from the suite: the largest radius of ``attack``/``norm`` that held below the first that
    broke (0 if none), and that first breaking radius (0 if wrong on clean input, inf if never broken)."""
    n = len(result.index)
    lo, hi = np.zeros(n), np.full(n, np.inf)
    hi[~result.correct(CLEAN)] = 0.0
    for cond in result.families().get(f"{attack}_{norm.lower()}", []):
        ok, open_ = result.correct(cond), np.isinf(hi)
        hi[open_ & ~ok] = cond.eps
        lo[open_ & ok] = cond.eps
    return lo, hi


def estimate_margin(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, *, task: Task, norm: str,
                    radii: Sequence[float], losses: Sequence[str], steps: int, bisection_steps: int = 8,
                    restarts: int = 1, clamp: tuple[float, float] | None = None, early_stop: bool = True,
                    lo: torch.Tensor | np.ndarray | None = None,
                    hi: torch.Tensor | np.ndarray | None = None, roi: torch.Tensor | None = None) -> torch.Tensor:
    """Per-sample margin (float32, (B,)): 0 if wrong on clean input, inf if never broken within the grid.

    ``lo``/``hi`` (B,): brackets already known (:func:`known_brackets`); the grid is then attacked only above
    ``lo`` for samples with ``hi = inf``, and the other brackets go straight to bisection. ``roi`` (B, 1,
    *spatial): the batch's region of interest (attacks and "handled correctly" inside it only).
    """
    model.eval()
    with torch.no_grad():
        ok = task.correct(model(x), y, roi)
    lo = torch.zeros(x.shape[0], device=x.device) if lo is None else torch.as_tensor(lo).float().to(x.device)
    hi = (torch.full_like(lo, float("inf")) if hi is None else torch.as_tensor(hi).float().to(x.device)).clone()
    hi[~ok] = 0.0
    attacks = margin_attacks(task=task, norm=norm, losses=losses, steps=steps, restarts=restarts, clamp=clamp,
                             early_stop=early_stop)
    # early exit: a sample's first attack starts at random, every later one from the point the previous one ended
    # at, projected into the new ball (the input that broke it at a larger radius, or the final iterate where it
    # held at a smaller one): breaks near the boundary then take a few steps instead of most of them
    last = x.detach().float().clone()
    warm = torch.zeros_like(ok)

    def attack(todo: torch.Tensor, radius: torch.Tensor) -> torch.Tensor:
        hit = torch.zeros(todo.numel(), dtype=torch.bool, device=x.device)
        for part in ((~warm[todo]).nonzero().squeeze(1), warm[todo].nonzero().squeeze(1)):
            if part.numel():
                rows = todo[part]
                hit[part], found = broken(model, x[rows], y[rows], radius[part], attacks,
                                          start=last[rows] if bool(warm[rows[0]]) else None,
                                          roi=None if roi is None else roi[rows])
                last[rows] = found
        warm[todo] = early_stop
        return hit

    for r in sorted(radii):
        todo = (torch.isinf(hi) & (lo < r)).nonzero().squeeze(1)
        if not todo.numel():
            continue
        hit = attack(todo, torch.full((todo.numel(),), r, device=x.device))
        hi[todo[hit]] = r
        lo[todo[~hit]] = r
    for _ in range(bisection_steps):
        todo = (torch.isfinite(hi) & (hi > 0)).nonzero().squeeze(1)
        if not todo.numel():
            break
        mid = (lo[todo] + hi[todo]) / 2
        hit = attack(todo, mid)
        hi[todo] = torch.where(hit, mid, hi[todo])
        lo[todo] = torch.where(hit, lo[todo], mid)
    return hi


def margin_summary(margins: np.ndarray, grid_max: float) -> dict[str, float]:
    """p10/p50/p90 (censored samples count as the largest radius: a lower bound), mean of the broken ones,
    and the fraction never broken."""
    m = np.asarray(margins, dtype=np.float64)
    if m.size == 0:
        return {}
    capped = np.where(np.isfinite(m), m, grid_max)
    out = {name: float(np.quantile(capped, q)) for name, q in QUANTILES.items()}
    out["unbroken_fraction"] = float(np.mean(~np.isfinite(m)))
    finite = m[np.isfinite(m)]
    out["mean_broken"] = float(finite.mean()) if finite.size else float("nan")
    return out


def plot_margins(margins: np.ndarray, path: str | Path, norm: str, grid_max: float) -> Path:
    """Histogram of the per-sample margins; censored samples in their own bar right of the grid."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    m = np.asarray(margins, dtype=np.float64)
    finite = m[np.isfinite(m)]
    fig, ax = plt.subplots(figsize=(6, 4))
    bins = np.linspace(0, grid_max, 31)
    ax.hist(finite, bins=bins, color="tab:blue", label="broken at this radius")
    censored = int((~np.isfinite(m)).sum())
    if censored:
        ax.bar(grid_max * 1.05, censored, width=grid_max / 30, color="tab:gray", label=f"> {grid_max:.3g} (not broken)")
    for name, value in margin_summary(m, grid_max).items():
        if name in QUANTILES:
            ax.axvline(value, linestyle="--", color="k", alpha=0.5)
            ax.text(value, ax.get_ylim()[1] * 0.95, name, rotation=90, va="top", fontsize=8)
    ax.set_xlabel(f"smallest breaking radius ({norm})")
    ax.set_ylabel("samples")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
