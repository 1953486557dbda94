"""Robustness curves (a metric against the attack radius) and their normalised area."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

Curve = tuple[Sequence[float], Sequence[float]]


def normalised_auc(eps: Sequence[float], values: Sequence[float]) -> float:
    """Trapezoid area under ``values`` over ``eps``, divided by the eps range.

    Pass the clean point as eps 0, so that a model whose metric never drops has area equal to its clean
    metric, and one that drops to 0 immediately has area close to 0. A single point returns its value.
    """
    x = np.asarray(eps, dtype=np.float64)
    y = np.asarray(values, dtype=np.float64)
    if x.shape != y.shape or x.size == 0:
        raise ValueError(f"eps and values must be non-empty and of the same length, got {x.size} and {y.size}")
    order = np.argsort(x, kind="stable")
    x, y = x[order], y[order]
    span = x[-1] - x[0]
    if span <= 0:
        return float(y.mean())
    area = float(np.sum((x[1:] - x[:-1]) * (y[1:] + y[:-1]) / 2.0))
    return area / float(span)


def plot_curves(panels: Mapping[str, Mapping[str, Curve]], path: str | Path, ylabel: str,
                title: str | None = None) -> Path:
    """One subplot per panel (e.g. per norm), one line per curve (e.g. per attack or per run); a PNG."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    names = list(panels)
    fig, axes = plt.subplots(1, max(1, len(names)), figsize=(5 * max(1, len(names)), 4), squeeze=False)
    for ax, name in zip(axes[0], names, strict=False):
        for label, (xs, ys) in panels[name].items():
            ax.plot(list(xs), list(ys), marker="o", label=label)
        ax.set_title(name)
        ax.set_xlabel("eps")
        ax.set_ylabel(ylabel)
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
        if panels[name]:
            ax.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
