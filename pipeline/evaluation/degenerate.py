"""Is a model degenerate? One class predicted for almost every image, balanced accuracy at chance, or (for
segmentation) an empty or full mask almost everywhere.

Such a model looks "robust" in every table (an attack cannot change an answer that never depends on the
input), so reports must say so next to its numbers. The checks take what every caller has at hand:
predicted classes and labels, per-image foreground fractions of predicted masks, or the logged metrics of a
run that was evaluated before this check existed.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

ALMOST_ALL = 0.95       # "almost every image": this share of the predictions or more
NEAR_CHANCE = 0.05      # balanced accuracy within this fraction of the way from chance to perfect
EMPTY, FULL = 0.001, 0.999  # a mask with at most / at least this foreground fraction is empty / full


@dataclass(frozen=True)
class Verdict:
    """``degenerate`` and, when it is, why (one line, with the numbers)."""

    degenerate: bool
    reason: str = ""

    def __bool__(self) -> bool:
        return self.degenerate

    @property
    def cell(self) -> str:
        """What a table shows in the row: ``DEGENERATE: <reason>`` or ``no``."""
        return f"DEGENERATE: {self.reason}" if self.degenerate else "no"


OK = Verdict(False)


def near_chance(balanced_accuracy: float, num_classes: int) -> bool:
    chance = 1.0 / max(num_classes, 1)
    return num_classes >= 2 and balanced_accuracy <= chance + NEAR_CHANCE * (1.0 - chance) + 1e-9


def classification_verdict(preds: Sequence[int] | np.ndarray, labels: Sequence[int] | np.ndarray,
                           class_names: Sequence[str] | None = None) -> Verdict:
    """Degenerate when one class takes at least 95% of the predictions, or when the balanced accuracy (mean
    recall over the classes present in ``labels``) is within 5% of chance (1 / classes present)."""
    preds = np.asarray(preds).astype(np.int64).reshape(-1)
    labels = np.asarray(labels).astype(np.int64).reshape(-1)
    if len(preds) < 2 or len(preds) != len(labels):
        return OK
    values, counts = np.unique(preds, return_counts=True)
    top, share = int(values[counts.argmax()]), float(counts.max() / len(preds))
    present = np.unique(labels)
    balanced = float(np.mean([(preds[labels == c] == c).mean() for c in present]))
    name = class_names[top] if class_names is not None and 0 <= top < len(class_names) else str(top)
    numbers = f"balanced accuracy {balanced:.2f}, chance {1 / len(present):.2f}"
    if share >= ALMOST_ALL:
        return Verdict(True, f"predicts '{name}' for {share:.0%} of {len(preds)} images ({numbers})")
    if near_chance(balanced, len(present)):
        return Verdict(True, f"{numbers} on {len(present)} classes")
    return OK


def segmentation_verdict(foreground_fraction: Sequence[float] | np.ndarray) -> Verdict:
    """Degenerate when at least 95% of the predicted masks are empty or full (foreground fraction per image)."""
    frac = np.asarray(foreground_fraction, dtype=np.float64).reshape(-1)
    if len(frac) < 2:
        return OK
    empty, full = int((frac <= EMPTY).sum()), int((frac >= FULL).sum())
    if (empty + full) / len(frac) >= ALMOST_ALL:
        parts = [f"{n} of {len(frac)} predicted masks {what}" for n, what in ((empty, "empty"), (full, "full")) if n]
        return Verdict(True, " and ".join(parts))
    return OK


def verdict_from_metrics(metrics: Mapping[str, float], tags: Mapping[str, str] | None = None) -> Verdict:
    """The verdict of an evaluated run: the ``medrobust.degenerate`` tag written by ``evaluate``; for runs
    evaluated without it, the clean balanced accuracy against chance over the classes with a recall metric."""
    reason = (tags or {}).get("medrobust.degenerate")
    if reason is not None:
        return OK if reason == "no" else Verdict(True, reason)
    balanced = metrics.get("eval/clean/balanced_accuracy")
    classes = sum(1 for k in metrics if k.startswith("eval/clean/recall/"))
    if balanced is not None and near_chance(float(balanced), classes):
        return Verdict(True, f"balanced accuracy {balanced:.2f}, chance {1 / classes:.2f} on {classes} classes")
    return OK
