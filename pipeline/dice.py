"""Dice, the one implementation: per image (mean over the foreground classes) and pooled over all voxels.

Training (the per-sample "handled correctly" of segmentation, the per-epoch validation under attack) and
evaluation use these two and nothing else. Both take an optional region-of-interest mask ``roi`` (the batch's
``roi``, (B, 1, *spatial)): pixels with roi <= 0 are left out of prediction and label alike.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from monai.metrics import compute_dice


def _onehot(pred_logits: torch.Tensor, target: torch.Tensor, num_classes: int,
            roi: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One-hot argmax prediction and label; with ``roi`` ((B, 1, *spatial)) every pixel with roi <= 0 is zero in
    both, so it counts as neither prediction nor label."""
    # max(...).indices, not argmax: the same first-maximum index, 10 to 40x faster over the class axis on CPU
    # (torch 2.13), and this runs on every attack iterate of segmentation
    pred = F.one_hot(pred_logits.max(dim=1).indices, num_classes).movedim(-1, 1)
    true = F.one_hot(target[:, 0].long(), num_classes).movedim(-1, 1)
    if roi is not None:
        inside = (roi > 0).to(pred.device)
        pred, true = pred * inside, true * inside
    return pred, true


def dice_per_image(pred_logits: torch.Tensor, target: torch.Tensor, num_classes: int,
                   roi: torch.Tensor | None = None) -> torch.Tensor:
    """Dice of the argmax prediction per image, mean over foreground classes, ``(B,)`` float32.

    A foreground class absent from both prediction and label counts as 1 (nothing to find, nothing found),
    absent from the label only as 0. ``roi`` ((B, 1, *spatial), optional): only pixels with roi > 0 count.
    """
    pred, true = _onehot(pred_logits, target, num_classes, roi)
    return compute_dice(pred, true, include_background=False, ignore_empty=False).float().mean(dim=1)


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
        pred, true = _onehot(pred_logits.detach(), target, self.num_classes, roi)
        pred, true = pred[:, 1:].flatten(2).double().cpu(), true[:, 1:].flatten(2).double().cpu()
        self.intersection += (pred * true).sum(dim=(0, 2))
        self.total += pred.sum(dim=(0, 2)) + true.sum(dim=(0, 2))

    def value(self) -> float:
        per_class = torch.where(self.total > 0, 2 * self.intersection / self.total.clamp_min(1e-12),
                                torch.ones_like(self.total))
        return float(per_class.mean()) if len(per_class) else float("nan")
