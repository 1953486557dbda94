"""Evaluation metrics: classification scores from class probabilities, segmentation Dice per image and pooled.

Classification metrics are computed with scikit-learn; a class absent from the evaluated split (or from a
stratum of it) has no recall and no one-vs-rest AUC, so it is left out of the macro averages instead of
turning them into NaN. Segmentation Dice uses ``monai.metrics``.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from monai.metrics import compute_dice
from sklearn.metrics import average_precision_score, balanced_accuracy_score, recall_score, roc_auc_score

CLASSIFICATION_SUMMARY = ("accuracy", "balanced_accuracy", "auc_macro", "mean_ap")


def _present(labels: np.ndarray, num_classes: int) -> list[int]:
    """Classes that have both positives and negatives in ``labels`` (one-vs-rest scores are defined)."""
    return [c for c in range(num_classes) if 0 < int((labels == c).sum()) < len(labels)]


def macro_auc(probs: np.ndarray, labels: np.ndarray) -> float:
    """One-vs-rest ROC-AUC averaged over the classes present (NaN if no class has positives and negatives)."""
    scores = [roc_auc_score(labels == c, probs[:, c]) for c in _present(labels, probs.shape[1])]
    return float(np.mean(scores)) if scores else float("nan")


def mean_average_precision(probs: np.ndarray, labels: np.ndarray) -> float:
    """One-vs-rest average precision averaged over the classes present."""
    scores = [average_precision_score(labels == c, probs[:, c]) for c in _present(labels, probs.shape[1])]
    return float(np.mean(scores)) if scores else float("nan")


def _balanced_accuracy(labels: np.ndarray, preds: np.ndarray) -> float:
    """Mean recall over the classes present in ``labels`` (predictions of absent classes are just wrong)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return float(balanced_accuracy_score(labels, preds))


def per_class_recall(preds: np.ndarray, labels: np.ndarray, num_classes: int) -> dict[int, float]:
    """Recall (sensitivity) of every class that occurs in ``labels``."""
    present = sorted(int(c) for c in np.unique(labels))
    values = recall_score(labels, preds, labels=present, average=None, zero_division=0)
    return {c: float(v) for c, v in zip(present, values, strict=True) if c < num_classes}


def classification_metrics(probs: np.ndarray, labels: np.ndarray,
                           class_names: Sequence[str] | None = None) -> dict[str, float]:
    """accuracy, balanced_accuracy, auc_macro, mean_ap and ``recall/<class>`` for ``probs`` (N, C), ``labels`` (N,).

    ``probs`` are class probabilities (softmax of the logits). An empty input gives an empty dict.
    """
    probs = np.asarray(probs, dtype=np.float64)
    labels = np.asarray(labels).astype(np.int64).reshape(-1)
    if len(labels) == 0:
        return {}
    num_classes = probs.shape[1]
    names = list(class_names) if class_names is not None else [str(c) for c in range(num_classes)]
    preds = probs.argmax(axis=1)
    out = {
        "accuracy": float((preds == labels).mean()),
        "balanced_accuracy": _balanced_accuracy(labels, preds),
        "auc_macro": macro_auc(probs, labels),
        "mean_ap": mean_average_precision(probs, labels),
    }
    for c, value in per_class_recall(preds, labels, num_classes).items():
        out[f"recall/{metric_safe(names[c])}"] = value
    return out


def metric_safe(name: str) -> str:
    """A class or group name as it may appear inside an MLflow metric name (letters, digits, ``_ - .``)."""
    return "".join(ch if ch.isalnum() or ch in "_-." else "_" for ch in str(name)) or "_"


# -- segmentation -----------------------------------------------------------------------------------------
def _onehot(pred_logits: torch.Tensor, target: torch.Tensor, num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    pred = F.one_hot(pred_logits.argmax(dim=1), num_classes).movedim(-1, 1)
    true = F.one_hot(target[:, 0].long(), num_classes).movedim(-1, 1)
    return pred, true


def dice_per_image(pred_logits: torch.Tensor, target: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Dice of the argmax prediction per image, mean over foreground classes, ``(B,)``.

    A foreground class absent from both prediction and label counts as 1 (nothing to find, nothing found).
    """
    pred, true = _onehot(pred_logits, target, num_classes)
    return compute_dice(pred, true, include_background=False, ignore_empty=False).float().mean(dim=1)


class PooledDice:
    """Dice pooled over all voxels of all images: 2 * sum(TP) / (sum(pred) + sum(label)) per foreground class.

    Unlike the mean of per-image Dice, large structures weigh more; both are reported.
    """

    def __init__(self, num_classes: int):
        self.num_classes = num_classes
        self.intersection = torch.zeros(num_classes - 1, dtype=torch.float64)
        self.total = torch.zeros(num_classes - 1, dtype=torch.float64)

    def update(self, pred_logits: torch.Tensor, target: torch.Tensor) -> None:
        pred, true = _onehot(pred_logits.detach(), target, self.num_classes)
        pred, true = pred[:, 1:].flatten(2).double().cpu(), true[:, 1:].flatten(2).double().cpu()
        self.intersection += (pred * true).sum(dim=(0, 2))
        self.total += pred.sum(dim=(0, 2)) + true.sum(dim=(0, 2))

    def value(self) -> float:
        per_class = torch.where(self.total > 0, 2 * self.intersection / self.total.clamp_min(1e-12),
                                torch.ones_like(self.total))
        return float(per_class.mean()) if len(per_class) else float("nan")
