"""What "loss", "attack loss" and "handled correctly" mean for a task, per sample.

Every function returns one value per sample (shape ``(B,)``), computed in float32 whatever the dtype of
the network output (so it is safe under bf16/fp16 autocast).

Conventions:

* classification: ``pred`` logits ``(B, C)``; ``target`` integer labels ``(B,)`` or ``(B, 1)``.
* segmentation: ``pred`` logits ``(B, C, *spatial)`` (2D or 3D, C includes the background, binary
  segmentation uses 2-class softmax); ``target`` integer label maps ``(B, 1, *spatial)`` (any numeric dtype).

``roi`` (optional, every function): the batch's region-of-interest mask ``(B, 1, *spatial)``. Segmentation then
counts only the pixels with roi > 0 (losses are means over them, Dice ignores the others); classification
ignores it (there the ROI restricts only the attack's perturbation, :mod:`pipeline.adversarial.attack`).
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch
import torch.nn.functional as F
from monai.losses import DiceLoss

from pipeline.dice import dice_per_image
from pipeline.errors import InputError


class Task(ABC):
    """Per-sample losses and correctness for one kind of prediction."""

    name: str = ""
    attack_kinds: tuple[str, ...] = ()

    @abstractmethod
    def per_sample_loss(self, pred: torch.Tensor, target: torch.Tensor,
                        roi: torch.Tensor | None = None) -> torch.Tensor:
        """The training loss of each sample, ``(B,)``; its batch mean is the usual training loss."""

    @abstractmethod
    def attack_loss(self, pred: torch.Tensor, target: torch.Tensor, kind: str = "ce",
                    roi: torch.Tensor | None = None) -> torch.Tensor:
        """What an attack maximises, per sample ``(B,)``."""

    @abstractmethod
    def correct(self, pred: torch.Tensor, target: torch.Tensor, roi: torch.Tensor | None = None) -> torch.Tensor:
        """Bool ``(B,)``: the sample is handled correctly."""

    @abstractmethod
    def predict(self, pred: torch.Tensor) -> torch.Tensor:
        """Discrete prediction: class ``(B,)`` or label map ``(B, 1, *spatial)``."""

    def divergence(self, pred_ref: torch.Tensor, pred: torch.Tensor, roi: torch.Tensor | None = None) -> torch.Tensor:
        """KL(softmax(pred_ref) || softmax(pred)) per sample ``(B,)`` (pixel-wise, averaged over the image or its
        ROI, for maps)."""
        log_p = F.log_softmax(pred_ref.float(), dim=1)
        log_q = F.log_softmax(pred.float(), dim=1)
        kl = (log_p.exp() * (log_p - log_q)).sum(dim=1)
        return image_mean(kl, roi) if kl.dim() > 1 else kl

    def _check_kind(self, kind: str) -> None:
        if kind not in self.attack_kinds:
            raise InputError(f"attack loss '{kind}' is not one of {list(self.attack_kinds)} for {self.name}")

    @staticmethod
    def make(task_name: str, num_classes: int, dice_threshold: float = 0.6) -> Task:
        if task_name == "classification":
            return Classification()
        if task_name == "segmentation":
            return Segmentation(num_classes, dice_threshold)
        raise InputError(f"task '{task_name}' is not classification or segmentation")


def image_mean(values: torch.Tensor, roi: torch.Tensor | None = None) -> torch.Tensor:
    """Pixel values ``(B, *spatial)`` -> ``(B,)``: the mean over each image, or over its pixels with roi > 0
    (an image with an empty ROI gives 0)."""
    if roi is None:
        return values.flatten(1).mean(dim=1)
    inside = (roi > 0).flatten(1).to(values.device, values.dtype)
    return (values.flatten(1) * inside).sum(dim=1) / inside.sum(dim=1).clamp_min(1.0)


def _labels(target: torch.Tensor) -> torch.Tensor:
    """(B,) or (B, 1) labels -> long (B,)."""
    return target.reshape(target.shape[0], -1)[:, 0].long() if target.dim() > 1 else target.long()


def logit_margin(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """max_{j != y} z_j - z_y along dim 1 (CW-style); ``labels`` broadcastable as ``logits[:, :1]``."""
    z = logits.float()
    true = z.gather(1, labels)
    others = z.scatter(1, labels, float("-inf")).amax(dim=1, keepdim=True)
    return (others - true).squeeze(1)


def soft_logit_margin(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """logsumexp_{j != y} z_j - z_y along dim 1: the smooth margin IMA's released code attacks with ('slm')."""
    z = logits.float()
    true = z.gather(1, labels)
    others = z.scatter(1, labels, float("-inf")).logsumexp(dim=1, keepdim=True)
    return (others - true).squeeze(1)


class Classification(Task):
    name = "classification"
    attack_kinds = ("ce", "margin", "slm")

    def per_sample_loss(self, pred, target, roi=None):
        return F.cross_entropy(pred.float(), _labels(target), reduction="none")

    def attack_loss(self, pred, target, kind="ce", roi=None):
        self._check_kind(kind)
        if kind == "ce":
            return self.per_sample_loss(pred, target)
        margin = soft_logit_margin if kind == "slm" else logit_margin
        return margin(pred, _labels(target)[:, None])

    def correct(self, pred, target, roi=None):
        return pred.argmax(dim=1) == _labels(target)

    def predict(self, pred):
        return pred.argmax(dim=1)


class Segmentation(Task):
    """Dice+CE per image; "handled correctly" = per-image Dice (mean over foreground classes) >= threshold.

    Attack kinds: "dice_ce" (and its alias "ce", the config default, meaning "the training loss"), "margin"
    and "slm" (pixel-wise logit margin / soft logit margin averaged over the image).

    With ``roi``: the Dice loss counts only ROI pixels (MONAI's ``DiceLoss`` ``ignore_index``: the label outside
    is set to the out-of-range class ``num_classes``), the cross-entropy and margins are means over them, and
    Dice (hence "handled correctly") ignores the rest.
    """

    name = "segmentation"
    attack_kinds = ("ce", "dice_ce", "margin", "slm")

    def __init__(self, num_classes: int, dice_threshold: float = 0.6):
        if num_classes < 2:
            raise InputError(f"segmentation needs num_classes >= 2 (background included), got {num_classes}")
        self.num_classes = num_classes
        self.dice_threshold = dice_threshold
        self._dice_loss = DiceLoss(softmax=True, to_onehot_y=True, reduction="none")
        self._roi_dice_loss = DiceLoss(softmax=True, to_onehot_y=True, reduction="none", ignore_index=num_classes)

    def per_sample_loss(self, pred, target, roi=None):
        logits = pred.float()
        labels = target.long()
        if roi is not None:
            labels = torch.where(roi.to(labels.device) > 0, labels, self.num_classes)
            dice = self._roi_dice_loss(logits, labels).flatten(1).mean(dim=1)
            ce = F.cross_entropy(logits, labels[:, 0], ignore_index=self.num_classes, reduction="none")
            return dice + image_mean(ce, roi)
        dice = self._dice_loss(logits, labels).flatten(1).mean(dim=1)            # mean over classes
        ce = F.cross_entropy(logits, labels[:, 0], reduction="none").flatten(1).mean(dim=1)
        return dice + ce

    def attack_loss(self, pred, target, kind="dice_ce", roi=None):
        self._check_kind(kind)
        if kind in ("margin", "slm"):
            margin = soft_logit_margin if kind == "slm" else logit_margin
            return image_mean(margin(pred, target.long()), roi)
        return self.per_sample_loss(pred, target, roi)

    def dice(self, pred: torch.Tensor, target: torch.Tensor, roi: torch.Tensor | None = None) -> torch.Tensor:
        """Per-image Dice of the argmax prediction, mean over foreground classes, ``(B,)`` (:mod:`pipeline.dice`)."""
        return dice_per_image(pred, target, self.num_classes, roi)

    def correct(self, pred, target, roi=None):
        return self.dice(pred, target, roi) >= self.dice_threshold

    def predict(self, pred):
        return pred.argmax(dim=1, keepdim=True)
