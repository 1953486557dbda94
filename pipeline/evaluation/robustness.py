"""The attack suite: clean, FGSM, PGD-k with restarts and the white-noise baseline, L2 and Linf, over eps lists.

Worst case per sample. For every condition each sample keeps the worst of its candidate inputs: the clean
input itself (the zero perturbation lies in every ball), and one adversarial input per configured attack
loss (``ce`` and ``margin``; PGD keeps each sample's worst restart). So a sample counts as broken if ANY
loss breaks it, and a sample wrong on clean input is wrong under every attack. "Worst" is: handled
incorrectly before correctly, then the lower probability of the true class (classification); the lower
per-image Dice (segmentation), whose pooled Dice is then taken over the chosen predictions.

The data are read once: every batch goes through all conditions before the next batch is loaded.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np
import torch
from monai.data import MetaTensor

from pipeline.adversarial.geometry import per_sample
from pipeline.adversarial.attacks import fgsm, pgd
from pipeline.adversarial.tasks import Task
from pipeline.config import EvaluateConfig
from pipeline.evaluation.metrics import PooledDice, dice_per_image
from pipeline.evaluation.noise import noisy
from pipeline.evaluation.results import Condition, Outcome, SuiteResult, conditions_for

EVAL_ALPHA = 2.5  # PGD step size alpha * eps / steps (Madry et al.'s evaluation setting)
Range = tuple[float, float] | None


class WorstCase:
    """Per sample, the output (and optionally the input) of the candidate with the lowest score so far."""

    def __init__(self) -> None:
        self.score: torch.Tensor | None = None
        self.output: torch.Tensor | None = None
        self.inputs: torch.Tensor | None = None

    def offer(self, score: torch.Tensor, output: torch.Tensor, inputs: torch.Tensor | None = None) -> None:
        if self.score is None:
            self.score, self.output, self.inputs = score, output, inputs
            return
        worse = score < self.score
        self.score = torch.where(worse, score, self.score)
        self.output = torch.where(per_sample(worse, output), output, self.output)
        if inputs is not None and self.inputs is not None:
            self.inputs = torch.where(per_sample(worse, inputs), inputs, self.inputs)


class Scorer:
    """Turns a network output into (score, kept output): low score = handled worse."""

    def __init__(self, task: Task, num_classes: int):
        self.task, self.num_classes = task, num_classes
        self.segmentation = task.name == "segmentation"

    def __call__(self, logits: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.segmentation:
            return dice_per_image(logits, y, self.num_classes), logits.argmax(dim=1, keepdim=True)
        probs = logits.float().softmax(dim=1)
        p_true = probs.gather(1, y.reshape(-1, 1).long()).squeeze(1)
        return self.task.correct(logits, y).float() + p_true, probs


def attack_losses(task: Task, losses: Sequence[str]) -> list[str]:
    """The configured attack losses that the task knows (segmentation: ``ce`` means Dice+CE)."""
    kinds = [k for k in losses if k in task.attack_kinds]
    return kinds or [task.attack_kinds[0]]


def candidates(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, cond: Condition, *, task: Task,
               ev: EvaluateConfig, clamp: Range, generator: torch.Generator | None = None) -> Iterable[torch.Tensor]:
    """The adversarial (or noisy) inputs tried for one condition, one at a time (clean excluded)."""
    eps = torch.full((x.shape[0],), cond.eps, device=x.device)
    if cond.attack == "noise":
        for _ in range(ev.restarts):
            yield noisy(x, eps, cond.norm, clamp, generator)
        return
    for loss in attack_losses(task, ev.losses):
        if cond.attack == "fgsm":
            yield fgsm(model, x, y, eps, task=task, norm=cond.norm, loss=loss, clamp=clamp)
        elif cond.attack == "pgd":
            yield pgd(model, x, y, eps, task=task, norm=cond.norm, steps=ev.steps, alpha=EVAL_ALPHA,
                      restarts=ev.restarts, loss=loss, clamp=clamp)
        else:
            raise ValueError(f"unknown attack {cond.attack!r}")


def worst_case(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, cond: Condition, *, task: Task,
               scorer: Scorer, ev: EvaluateConfig, clamp: Range, clean_logits: torch.Tensor | None = None,
               keep_inputs: bool = False, generator: torch.Generator | None = None) -> WorstCase:
    """The worst candidate per sample for one condition, the clean input included."""
    worst = WorstCase()
    with torch.no_grad():
        logits = model(x) if clean_logits is None else clean_logits
    worst.offer(*scorer(logits, y), x if keep_inputs else None)
    if cond.attack == "clean":
        return worst
    for x_adv in candidates(model, x, y, cond, task=task, ev=ev, clamp=clamp, generator=generator):
        with torch.no_grad():
            worst.offer(*scorer(model(x_adv), y), x_adv if keep_inputs else None)
    return worst


class _Accumulator:
    """Collects the per-batch worst cases of one condition into an :class:`Outcome`."""

    def __init__(self, segmentation: bool, num_classes: int):
        self.segmentation = segmentation
        self.parts: list[np.ndarray] = []
        self.pooled = PooledDice(num_classes) if segmentation else None

    def add(self, worst: WorstCase, y: torch.Tensor, num_classes: int) -> None:
        if self.segmentation:
            self.parts.append(worst.score.detach().float().cpu().numpy())
            onehot_logits = torch.nn.functional.one_hot(worst.output[:, 0].long(), num_classes).movedim(-1, 1)
            self.pooled.update(onehot_logits.float(), y)
        else:
            self.parts.append(worst.output.detach().float().cpu().numpy())

    def outcome(self) -> Outcome:
        data = np.concatenate(self.parts) if self.parts else np.zeros((0,))
        if self.segmentation:
            return Outcome(dice=data, dice_pooled=self.pooled.value())
        return Outcome(probs=data)


def as_plain(value: Any, device: str | torch.device) -> torch.Tensor:
    """A batch entry as a plain tensor on ``device`` (MONAI's MetaTensor costs time on every op of an attack)."""
    tensor = value.as_tensor() if isinstance(value, MetaTensor) else torch.as_tensor(value)
    return tensor.to(device)


def _meta_values(batch: dict[str, Any], key: str, n: int) -> list[Any]:
    value = batch[key]
    if isinstance(value, torch.Tensor):
        return value.reshape(n, -1)[:, 0].tolist() if value.numel() >= n else [value.item()] * n
    return list(value) if isinstance(value, (list, tuple)) else [value] * n


def run_suite(model: torch.nn.Module, batches: Iterable[dict[str, Any]], task: Task, ev: EvaluateConfig, *,
              num_classes: int, clamp: Range = None, device: str | torch.device = "cpu",
              class_names: Sequence[str] | None = None, meta_keys: Sequence[str] = (), seed: int = 0,
              on_batch: Callable[[int], None] | None = None) -> SuiteResult:
    """Evaluate ``model`` (in eval mode) on every condition of ``ev`` over ``batches`` of MONAI data dicts."""
    eps = {"L2": list(ev.eps_l2), "Linf": list(ev.eps_linf)}
    attacks = [a for a, on in (("fgsm", ev.fgsm), ("pgd", True), ("noise", ev.noise)) if on]
    conds = conditions_for(ev.norms, eps, attacks)
    seg = task.name == "segmentation"
    scorer = Scorer(task, num_classes)
    acc = {c: _Accumulator(seg, num_classes) for c in conds}
    labels, index, meta = [], [], {k: [] for k in meta_keys}
    generator = None
    model.eval()
    for b, batch in enumerate(batches):
        x, y = as_plain(batch["image"], device).float(), as_plain(batch["label"], device)
        if not seg:
            y = y.reshape(-1).long()
        n = x.shape[0]
        if generator is None:
            generator = torch.Generator(device=x.device).manual_seed(seed)
        with torch.no_grad():
            clean_logits = model(x)
        for cond in conds:
            worst = worst_case(model, x, y, cond, task=task, scorer=scorer, ev=ev, clamp=clamp,
                               clean_logits=clean_logits, generator=generator)
            acc[cond].add(worst, y, num_classes)
        labels.append(np.zeros(n, dtype=np.int64) if seg else y.cpu().numpy())
        raw_index = batch.get("index")
        index.append(np.asarray(_meta_values(batch, "index", n) if raw_index is not None else range(n)))
        for key in meta_keys:
            meta[key].extend(_meta_values(batch, key, n) if key in batch else [None] * n)
        if on_batch is not None:
            on_batch(b)
    meta = {k: v for k, v in meta.items() if any(item is not None for item in v)}
    return SuiteResult(task=task.name, labels=np.concatenate(labels) if labels else np.zeros(0, np.int64),
                       index=np.concatenate(index) if index else np.zeros(0, np.int64),
                       class_names=list(class_names) if class_names else None,
                       outcomes={c: acc[c].outcome() for c in conds}, meta=meta,
                       dice_threshold=getattr(task, "dice_threshold", 0.6))
