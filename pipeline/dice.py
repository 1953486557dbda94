"""Dice, the one implementation: per image (mean over the foreground classes) and pooled over all voxels.

Training (the per-sample "handled correctly" of segmentation, the per-epoch validation under attack) and
evaluation use these two and nothing else. Both take an optional region-of-interest mask ``roi`` (the batch's
``roi``, (B, 1, *spatial)): pixels with roi <= 0 are left out of prediction and label alike.
"""

from __future__ import annotations

import torch


def label_map(pred_logits: torch.Tensor) -> torch.Tensor:
    """The argmax over the class axis ``(B, *spatial)``, ties to the first class and NaN as the largest value,
    as ``argmax``: with two classes by comparisons (bool, 4x faster than ``max(dim=1)`` on CPU at 256 x 256),
    else ``max(...).indices`` (the same index as argmax, 10 to 40x faster over the class axis on CPU)."""
    if pred_logits.shape[1] == 2:
        z0, z1 = pred_logits[:, 0], pred_logits[:, 1]
        return (z1 > z0) | (z1.isnan() & ~z0.isnan())
    return pred_logits.max(dim=1).indices


def class_counts(pred_logits: torch.Tensor, target: torch.Tensor, num_classes: int,
                 roi: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per image and foreground class ``(B, num_classes - 1)``: overlap, predicted and labelled voxel counts of the
    argmax prediction against the label; with ``roi`` ((B, 1, *spatial)) only pixels with roi > 0 count.

    Class by class with comparisons, not one-hot tensors: this runs on every attack iterate of segmentation (the
    "handled correctly" check), and MONAI's ``compute_dice`` wants one-hot inputs whose construction costs three
    times the rest (256 x 256, 2 classes, CPU); ``tests/test_evaluation_metrics.py`` checks the result against
    ``compute_dice``.
    """
    pred = label_map(pred_logits).flatten(1)
    true = target[:, 0].to(pred.device).long().flatten(1)
    inside = None if roi is None else (roi[:, 0] > 0).to(pred.device).flatten(1)
    counts = []
    for c in range(1, num_classes):
        p, t = pred == c, true == c
        if inside is not None:
            p, t = p & inside, t & inside
        counts.append(torch.stack([(p & t).sum(1), p.sum(1), t.sum(1)]))
    if not counts:
        empty = torch.zeros(pred.shape[0], 0, dtype=torch.long, device=pred.device)
        return empty, empty, empty
    inter, pred_sum, true_sum = torch.stack(counts, dim=2)     # (3, B, C - 1)
    return inter, pred_sum, true_sum


def dice_per_image(pred_logits: torch.Tensor, target: torch.Tensor, num_classes: int,
                   roi: torch.Tensor | None = None) -> torch.Tensor:
    """Dice of the argmax prediction per image, mean over foreground classes, ``(B,)`` float32.

    A foreground class absent from both prediction and label counts as 1 (nothing to find, nothing found),
    absent from the label only as 0 (MONAI's ``compute_dice`` with ``ignore_empty=False``). ``roi`` ((B, 1,
    *spatial), optional): only pixels with roi > 0 count.
    """
    inter, pred_sum, true_sum = class_counts(pred_logits, target, num_classes, roi)
    total = (pred_sum + true_sum).float()
    per_class = torch.where(total > 0, 2 * inter.float() / total.clamp_min(1), torch.ones_like(total))
    return per_class.mean(dim=1)


class PooledDice:
    """Dice pooled over all voxels of all images: 2 * sum(TP) / (sum(pred) + sum(label)) per foreground class.

    Unlike the mean of per-image Dice, large structures weigh more; both are reported.
    """

    def __init__(self, num_classes: int):
        self.num_classes = num_classes
        self.intersection = torch.zeros(num_classes - 1, dtype=torch.float64)
        self.total = torch.zeros(num_classes - 1, dtype=torch.float64)

    def update(self, pred_logits: torch.Tensor, target: torch.Tensor, roi: torch.Tensor | None = None) -> None:
        """Add a batch; with ``roi`` ((B, 1, *spatial)) only its pixels with roi > 0 count."""
        inter, pred_sum, true_sum = class_counts(pred_logits.detach(), target, self.num_classes, roi)
        self.intersection += inter.sum(dim=0).double().cpu()
        self.total += (pred_sum + true_sum).sum(dim=0).double().cpu()

    def value(self) -> float:
        per_class = torch.where(self.total > 0, 2 * self.intersection / self.total.clamp_min(1e-12),
                                torch.ones_like(self.total))
        return float(per_class.mean()) if len(per_class) else float("nan")
