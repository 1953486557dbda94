"""What the attack suite produces, and how it becomes metric names, tables and curves.

A *condition* is one way of presenting the test set: clean, or one attack (``fgsm``, ``pgd``, ``noise``) at
one norm and radius. For every condition the suite keeps, per sample, the outcome of the worst candidate
input it tried (class probabilities, or per-image Dice). Metric names in MLflow:

* ``eval/clean/<metric>``
* ``eval/<attack>_<norm>/<metric>_at_<eps>``, e.g. ``eval/pgd_l2/accuracy_at_0.5`` (MLflow forbids ``@``)
* ``eval/<attack>_<norm>/auc_norm``: normalised area under the headline metric's curve (clean point at eps 0)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from pipeline.evaluation.curves import normalised_auc
from pipeline.evaluation.metrics import CLASSIFICATION_SUMMARY, classification_metrics
from pipeline.names import format_eps


@dataclass(frozen=True, order=True)
class Condition:
    attack: str                  # "clean", "fgsm", "pgd", "noise"
    norm: str = ""               # "L2", "Linf"; "" for clean
    eps: float = 0.0

    @property
    def family(self) -> str:
        """``clean`` or ``<attack>_<norm>`` in lower case: the metric-name prefix and curve name."""
        return "clean" if self.attack == "clean" else f"{self.attack}_{self.norm.lower()}"

    def metric(self, name: str) -> str:
        if self.attack == "clean":
            return f"eval/clean/{name}"
        return f"eval/{self.family}/{name}_at_{format_eps(self.eps)}"


CLEAN = Condition("clean")


@dataclass
class Outcome:
    """Per-sample results of one condition. Classification: ``probs`` (N, C). Segmentation: ``dice`` (N,)."""

    probs: np.ndarray | None = None
    dice: np.ndarray | None = None
    dice_pooled: float | None = None


@dataclass
class SuiteResult:
    task: str
    labels: np.ndarray                              # classification: (N,) class; segmentation: unused (zeros)
    index: np.ndarray                               # the data dicts' stable ``index``
    class_names: list[str] | None
    outcomes: dict[Condition, Outcome]
    meta: dict[str, list[Any]] = field(default_factory=dict)
    dice_threshold: float = 0.6

    # -- per condition ---------------------------------------------------------------------------------
    @property
    def headline(self) -> str:
        return "accuracy" if self.task == "classification" else "dice"

    def correct(self, cond: Condition) -> np.ndarray:
        """Bool per sample: argmax right (classification) or Dice at least the threshold (segmentation)."""
        out = self.outcomes[cond]
        if out.probs is not None:
            return out.probs.argmax(axis=1) == self.labels
        return out.dice >= self.dice_threshold

    def metrics_of(self, cond: Condition, rows: np.ndarray | None = None) -> dict[str, float]:
        """All metrics of one condition, optionally on a subset of the samples (whole set: cached)."""
        if rows is None:
            cache = self.__dict__.setdefault("_cache", {})
            if cond not in cache:
                cache[cond] = self._metrics_of(cond, None)
            return dict(cache[cond])
        return self._metrics_of(cond, rows)

    def _metrics_of(self, cond: Condition, rows: np.ndarray | None) -> dict[str, float]:
        out = self.outcomes[cond]
        if out.probs is not None:
            probs, labels = out.probs, self.labels
            if rows is not None:
                probs, labels = probs[rows], labels[rows]
            return classification_metrics(probs, labels, self.class_names)
        dice = out.dice if rows is None else out.dice[rows]
        values = {"dice": float(np.mean(dice)) if len(dice) else float("nan")}
        if rows is None and out.dice_pooled is not None:
            values["dice_pooled"] = float(out.dice_pooled)
        return values

    def families(self) -> dict[str, list[Condition]]:
        """Attacked conditions grouped by ``<attack>_<norm>``, each sorted by eps."""
        groups: dict[str, list[Condition]] = {}
        for cond in sorted(self.outcomes):
            if cond.attack != "clean":
                groups.setdefault(cond.family, []).append(cond)
        return groups

    def curve(self, family: str, metric: str | None = None) -> tuple[list[float], list[float]]:
        """``([0, eps...], [clean metric, metric at eps...])`` for one family."""
        metric = metric or self.headline
        conds = self.families()[family]
        xs = [0.0] + [c.eps for c in conds]
        ys = [self.metrics_of(CLEAN)[metric]] + [self.metrics_of(c)[metric] for c in conds]
        return xs, ys

    # -- flat views ------------------------------------------------------------------------------------
    def metrics(self) -> dict[str, float]:
        """Every logged scalar: per-condition metrics (summary ones under attack) and each curve's area."""
        flat = {CLEAN.metric(k): v for k, v in self.metrics_of(CLEAN).items()}
        keep = set(CLASSIFICATION_SUMMARY) | {"dice", "dice_pooled"}
        for family, conds in self.families().items():
            for cond in conds:
                flat.update({cond.metric(k): v for k, v in self.metrics_of(cond).items() if k in keep})
            flat[f"eval/{family}/auc_norm"] = normalised_auc(*self.curve(family))
        return flat

    def table(self) -> pd.DataFrame:
        """Long table: attack, norm, eps, metric, value (every metric, per-class recall included)."""
        rows = []
        for cond in sorted(self.outcomes):
            for name, value in self.metrics_of(cond).items():
                rows.append({"attack": cond.attack, "norm": cond.norm, "eps": cond.eps, "metric": name,
                             "value": value})
        for family in self.families():
            attack, norm = self.families()[family][0].attack, self.families()[family][0].norm
            rows.append({"attack": attack, "norm": norm, "eps": float("nan"), "metric": f"{self.headline}_auc_norm",
                         "value": normalised_auc(*self.curve(family))})
        return pd.DataFrame(rows, columns=["attack", "norm", "eps", "metric", "value"])

    def per_sample(self) -> pd.DataFrame:
        """One row per sample: index, label, metadata, and per condition 'correct' (and Dice)."""
        frame = pd.DataFrame({"index": self.index})
        if self.task == "classification":
            frame["label"] = self.labels
            if self.class_names:
                frame["class"] = [self.class_names[int(c)] for c in self.labels]
        for key, values in self.meta.items():
            frame[key] = values
        for cond in sorted(self.outcomes):
            column = "clean" if cond.attack == "clean" else f"{cond.family}@{format_eps(cond.eps)}"
            frame[f"correct:{column}"] = self.correct(cond)
            if self.outcomes[cond].dice is not None:
                frame[f"dice:{column}"] = self.outcomes[cond].dice
        return frame


def conditions_for(norms: Sequence[str], eps: dict[str, Sequence[float]], attacks: Sequence[str]) -> list[Condition]:
    """Every (attack, norm, eps) of the configured suite, clean first."""
    return [CLEAN] + [Condition(a, n, float(e)) for a in attacks for n in norms for e in eps[n]]
