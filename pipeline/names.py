"""How things are named across layers: the keys of a batch and of a training step's output, radii in metric names.

A bottom module (no imports from the package): the trainer, its handlers, MLflow logging and the evaluation
read and write the same names without importing each other.
"""

from __future__ import annotations

from enum import Enum


class Keys(str, Enum):
    """Keys of ours in MONAI's batch dicts and in ``engine.state.output`` (MONAI's own are ``CommonKeys``)."""

    INDEX = "index"              # the stable integer id of a training sample (per-sample state key)
    ROI = "roi"                  # optional region-of-interest mask (B, 1, *spatial): loss, Dice, attacks see roi > 0
    ADV = "adv"                  # the adversarial inputs of a training step (detached)
    METRICS = "method_metrics"   # a method's per-batch scalars


def format_eps(eps: float) -> str:
    """A radius as it appears in metric and column names: 6 significant digits, no trailing zeros."""
    return f"{eps:.6g}"


def metric_safe(name: str) -> str:
    """A class or group name as it may appear inside an MLflow metric name (letters, digits, ``_ - .``)."""
    return "".join(ch if ch.isalnum() or ch in "_-." else "_" for ch in str(name)) or "_"
