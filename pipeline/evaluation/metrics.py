"""Evaluation metrics of classification: scores from class probabilities (Dice lives in ``pipeline.dice``).

Classification metrics are computed with scikit-learn; a class absent from the evaluated split (or from a
stratum of it) has no recall and no one-vs-rest AUC, so it is left out of the macro averages instead of
turning them into NaN.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np
from sklearn.metrics import average_precision_score, balanced_accuracy_score, recall_score, roc_auc_score

from pipeline.names import metric_safe

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
