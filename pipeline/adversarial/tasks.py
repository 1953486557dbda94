"""What "loss", "attack loss" and "handled correctly" mean for a task, per sample.

Every function returns one value per sample (shape ``(B,)``), computed in float32 whatever the dtype of
the network output (so it is safe under bf16/fp16 autocast).

Conventions:

* classification: ``pred`` logits ``(B, C)``; ``target`` integer labels ``(B,)`` or ``(B, 1)``.
* segmentation: ``pred`` logits ``(B, C, *spatial)`` (2D or 3D, C includes the background, binary
  segmentation uses 2-class softmax); ``target`` integer label maps ``(B, 1, *spatial)`` (any numeric dtype).
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch
import torch.nn.functional as F
from monai.losses import DiceLoss
from monai.metrics import compute_dice

from pipeline.errors import InputError


class Task(ABC):
    """Per-sample losses and correctness for one kind of prediction."""

    name: str = ""
    attack_kinds: tuple[str, ...] = ()

    @abstractmethod
    def per_sample_loss(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """The training loss of each sample, ``(B,)``; its batch mean is the usual training loss."""

    @abstractmethod
    def attack_loss(self, pred: torch.Tensor, target: torch.Tensor, kind: str = "ce") -> torch.Tensor:
        """What an attack maximises, per sample ``(B,)``."""

    @abstractmethod
    def correct(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Bool ``(B,)``: the sample is handled correctly."""

    @abstractmethod
    def predict(self, pred: torch.Tensor) -> torch.Tensor:
        """Discrete prediction: class ``(B,)`` or label map ``(B, 1, *spatial)``."""

    def divergence(self, pred_ref: torch.Tensor, pred: torch.Tensor) -> torch.Tensor:
        """KL(softmax(pred_ref) || softmax(pred)) per sample ``(B,)`` (pixel-wise, averaged, for maps)."""
        log_p = F.log_softmax(pred_ref.float(), dim=1)
        log_q = F.log_softmax(pred.float(), dim=1)
        kl = (log_p.exp() * (log_p - log_q)).sum(dim=1)
        return kl.flatten(1).mean(dim=1) if kl.dim() > 1 else kl

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

    def per_sample_loss(self, pred, target):
        return F.cross_entropy(pred.float(), _labels(target), reduction="none")

    def attack_loss(self, pred, target, kind="ce"):
        self._check_kind(kind)
        if kind == "ce":
            return self.per_sample_loss(pred, target)
        margin = soft_logit_margin if kind == "slm" else logit_margin
        return margin(pred, _labels(target)[:, None])

    def correct(self, pred, target):
        return pred.argmax(dim=1) == _labels(target)

    def predict(self, pred):
        return pred.argmax(dim=1)


class Segmentation(Task):
    """Dice+CE per image; "handled correctly" = per-image Dice (mean over foreground classes) >= threshold.

    Attack kinds: "dice_ce" (and its alias "ce", the config default, meaning "the training loss"), "margin"
    and "slm" (pixel-wise logit margin / soft logit margin averaged over the image).
    """

    name = "segmentation"
    attack_kinds = ("ce", "dice_ce", "margin", "slm")

    def __init__(self, num_classes: int, dice_threshold: float = 0.6):
        if num_classes < 2:
            raise InputError(f"segmentation needs num_classes >= 2 (background included), got {num_classes}")
        self.num_classes = num_classes
        self.dice_threshold = dice_threshold
        self._dice_loss = DiceLoss(softmax=True, to_onehot_y=True, reduction="none")

    def per_sample_loss(self, pred, target):
        logits = pred.float()
        labels = target.long()
        dice = self._dice_loss(logits, labels).flatten(1).mean(dim=1)            # mean over classes
        ce = F.cross_entropy(logits, labels[:, 0], reduction="none").flatten(1).mean(dim=1)
        return dice + ce

    def attack_loss(self, pred, target, kind="dice_ce"):
        self._check_kind(kind)
        if kind in ("margin", "slm"):
            margin = soft_logit_margin if kind == "slm" else logit_margin
            return margin(pred, target.long()).flatten(1).mean(dim=1)
        return self.per_sample_loss(pred, target)

    def dice(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Per-image Dice of the argmax prediction, mean over foreground classes, ``(B,)``.

        A class absent from both prediction and label counts as Dice 1, absent from the label only as 0.
        """
        onehot_pred = F.one_hot(pred.argmax(dim=1), self.num_classes).movedim(-1, 1)
        onehot_true = F.one_hot(target[:, 0].long(), self.num_classes).movedim(-1, 1)
        return compute_dice(onehot_pred, onehot_true, include_background=False, ignore_empty=False).mean(dim=1)

    def correct(self, pred, target):
        return self.dice(pred, target) >= self.dice_threshold

    def predict(self, pred):
        return pred.argmax(dim=1, keepdim=True)
