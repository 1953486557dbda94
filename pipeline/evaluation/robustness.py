"""The attack suite: clean, FGSM, PGD-k and APGD, and the white-noise baseline, L2 and Linf, over eps lists.

Worst case per sample. For every condition each sample keeps the worst of its candidate inputs: the clean
input itself (the zero perturbation lies in every ball), and one adversarial input per attack of the family's
plan (:func:`plan`: FGSM per attack loss; for ``pgd`` PGD per attack loss and restart, then APGD-CE and
APGD-T with the targeted DLR loss, so the reported PGD numbers are the worst case over PGD and APGD). So a
sample counts as broken if ANY attack breaks it, and a sample wrong on clean input is wrong under every attack.
"Worst" is: handled incorrectly before correctly, then the lower probability of the true class
(classification); the lower per-image Dice (segmentation), whose pooled Dice is then taken over the chosen
predictions.

Schedule (``evaluate.schedule``). ``early_exit`` (default) spends gradients only where the answer is open:
the radii of a norm are attacked in increasing order and each starts from the worst case of the radius below
(the smaller ball lies inside the larger one), each attack of the plan runs only on the samples that are still
handled correctly, and PGD and APGD drop a sample at its first iterate that is not (``early_stop``). Broken
samples cannot come back, since only the worst case is kept. ``exhaustive`` runs every attack of the plan on
every sample at every radius for all its steps (the schedule of earlier versions): on the same random starts
every sample it breaks is broken by ``early_exit`` too, so ``early_exit`` never reports a higher accuracy.
Both keep, at every radius, the worst case found at the smaller radii of the same norm, so robustness curves
(accuracy, and Dice, which early exit would stop near the threshold) never rise with the radius.

The data are read once: every batch goes through all conditions before the next batch is loaded.

Region of interest: a batch with ``roi`` (a (B, 1, *spatial) mask per image) is attacked inside it only (every
attack, and the noise baseline, leaves the pixels outside it unchanged) and its Dice, per image and pooled,
counts only the pixels with roi > 0; for classification it restricts the perturbation only.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from monai.data import MetaTensor

from pipeline.adversarial.apgd import APGD
from pipeline.adversarial.attack import Attack, Range, keep_outside, roi_inside
from pipeline.adversarial.geometry import per_sample
from pipeline.adversarial.pgd import FGSM, PGD
from pipeline.adversarial.tasks import Task
from pipeline.config import EvaluateConfig
from pipeline.dice import PooledDice, dice_per_image
from pipeline.evaluation.noise import noisy
from pipeline.evaluation.results import Condition, Outcome, SuiteResult, conditions_for
from pipeline.names import Keys as Ours

EVAL_ALPHA = 2.5  # PGD step size alpha * eps / steps (Madry et al.'s evaluation setting)


class WorstCase:
    """Per sample, the score, output (and optionally input) of the candidate with the lowest score so far."""

    def __init__(self) -> None:
        self.score: torch.Tensor | None = None
        self.output: torch.Tensor | None = None
        self.inputs: torch.Tensor | None = None

    def offer(self, score: torch.Tensor, output: torch.Tensor, inputs: torch.Tensor | None = None,
              rows: torch.Tensor | None = None) -> None:
        """Offer one candidate per sample, or per sample of ``rows`` only (the others keep theirs)."""
        if self.score is None:
            self.score, self.output, self.inputs = score, output, inputs
            return
        if rows is not None:
            score, output, inputs = (_scatter(self.score, rows, score), _scatter(self.output, rows, output),
                                     None if inputs is None or self.inputs is None
                                     else _scatter(self.inputs, rows, inputs))
        worse = score < self.score
        self.score = torch.where(worse, score, self.score)
        self.output = torch.where(per_sample(worse, output), output, self.output)
        if inputs is not None and self.inputs is not None:
            self.inputs = torch.where(per_sample(worse, inputs), inputs, self.inputs)


def _scatter(base: torch.Tensor, rows: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    out = base.clone()
    out[rows] = values.to(base.dtype)
    return out


class Scorer:
    """Turns a network output into (score, kept output): low score = handled worse."""

    def __init__(self, task: Task, num_classes: int):
        self.task, self.num_classes = task, num_classes
        self.segmentation = task.name == "segmentation"

    def __call__(self, logits: torch.Tensor, y: torch.Tensor,
                 roi: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``roi``: segmentation Dice over its pixels only (classification ignores it)."""
        if self.segmentation:
            return dice_per_image(logits, y, self.num_classes, roi), logits.argmax(dim=1, keepdim=True)
        probs = logits.float().softmax(dim=1)
        p_true = probs.gather(1, y.reshape(-1, 1).long()).squeeze(1)
        return self.task.correct(logits, y).float() + p_true, probs

    def correct(self, score: torch.Tensor) -> torch.Tensor:
        """Bool (B,): the candidate of this score is handled correctly (classification: score = correct + p)."""
        return score >= (self.task.dice_threshold if self.segmentation else 1.0)


def attack_losses(task: Task, losses: Sequence[str]) -> list[str]:
    """The configured attack losses that the task knows (segmentation: ``ce`` means Dice+CE)."""
    kinds = [k for k in losses if k in task.attack_kinds]
    return kinds or [task.attack_kinds[0]]


@dataclass(frozen=True)
class Planned:
    """One attack of a family's plan: ``kind`` (fgsm, pgd, apgd) and its loss; APGD-T: ``target`` is the rank
    of the target class among the other classes on the clean input (0 = the most likely other class)."""

    kind: str
    loss: str
    target: int = -1

    def __str__(self) -> str:
        return f"{self.kind}-{self.loss}" + (f"-t{self.target + 1}" if self.target >= 0 else "")

    def build(self, task: Task, norm: str, ev: EvaluateConfig, clamp: Range, early_stop: bool) -> Attack:
        """The attack object of the protocol: FGSM; PGD with ``ev.steps`` steps of ``EVAL_ALPHA * eps / steps``;
        APGD with ``ev.steps`` steps (``early_stop``: PGD and APGD drop a sample at its first wrong iterate)."""
        if self.kind == "fgsm":
            return FGSM(task, norm=norm, loss=self.loss, clamp=clamp)
        if self.kind == "pgd":
            return PGD(task, norm=norm, steps=ev.steps, alpha=EVAL_ALPHA, loss=self.loss, clamp=clamp,
                       early_stop=early_stop)
        return APGD(task, norm=norm, steps=ev.steps, loss=self.loss, target=max(self.target, 0), clamp=clamp,
                    early_stop=early_stop)


def plan(attack: str, task: Task, ev: EvaluateConfig, num_classes: int) -> list[Planned]:
    """The attacks whose worst case one condition of family ``attack`` (fgsm or pgd) reports, in running order."""
    losses = attack_losses(task, ev.losses)
    if attack == "fgsm":
        return [Planned("fgsm", loss) for loss in losses]
    if attack != "pgd":
        raise ValueError(f"unknown attack {attack!r}")
    attacks = [Planned("pgd", loss) for _ in range(ev.restarts) for loss in losses]
    if ev.apgd:
        attacks.append(Planned("apgd", "ce"))
        if task.name == "classification":
            attacks += [Planned("apgd", "dlr", t) for t in range(min(ev.apgd_targets, num_classes - 1))]
    return attacks


def family_worst_cases(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, attack: str, norm: str,
                       radii: Sequence[float], *, task: Task, scorer: Scorer, ev: EvaluateConfig, clamp: Range,
                       clean_logits: torch.Tensor, keep_inputs: bool = False,
                       roi: torch.Tensor | None = None) -> dict[float, WorstCase]:
    """The worst case per sample at every radius of one family (fgsm or pgd) and norm, per the schedule."""
    early = ev.schedule == "early_exit"
    attacks = [one.build(task, norm, ev, clamp, early) for one in plan(attack, task, ev, scorer.num_classes)]
    clean = scorer(clean_logits, y, roi)
    results: dict[float, WorstCase] = {}
    below: WorstCase | None = None
    for eps in sorted(radii):
        worst = WorstCase()
        worst.offer(*clean, x if keep_inputs else None)
        if below is not None:                       # the smaller ball lies inside this one: its worst case counts
            worst.offer(below.score, below.output, below.inputs)
        for one in attacks:
            rows = scorer.correct(worst.score).nonzero().squeeze(1) if early else None
            if rows is not None and not rows.numel():
                break
            xs, ys, logits = (x, y, clean_logits) if rows is None else (x[rows], y[rows], clean_logits[rows])
            rs = roi if roi is None or rows is None else roi[rows]
            x_adv = one(model, xs, ys, float(eps), roi=rs, clean=logits)
            with torch.no_grad():
                worst.offer(*scorer(model(x_adv), ys, rs), x_adv if keep_inputs else None, rows=rows)
        results[float(eps)] = below = worst
    return results


def noise_worst_case(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, cond: Condition, *, scorer: Scorer,
                     ev: EvaluateConfig, clamp: Range, clean_logits: torch.Tensor,
                     generator: torch.Generator | None = None, roi: torch.Tensor | None = None) -> WorstCase:
    """The white-noise baseline: the worst of the clean input and ``restarts`` random perturbations of radius eps
    (with a ``roi``: the same noise, kept inside it only, so an L2 draw is shorter than eps)."""
    worst = WorstCase()
    worst.offer(*scorer(clean_logits, y, roi))
    eps = torch.full((x.shape[0],), cond.eps, device=x.device)
    inside = roi_inside(roi, x)
    for _ in range(ev.restarts):
        with torch.no_grad():
            worst.offer(*scorer(model(keep_outside(x, noisy(x, eps, cond.norm, clamp, generator), inside)), y, roi))
    return worst


def worst_case(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, cond: Condition, *, task: Task,
               scorer: Scorer, ev: EvaluateConfig, clamp: Range, clean_logits: torch.Tensor | None = None,
               keep_inputs: bool = False, generator: torch.Generator | None = None,
               roi: torch.Tensor | None = None) -> WorstCase:
    """The worst candidate per sample for one condition, the clean input included (``roi``: see the module doc)."""
    if clean_logits is None:
        with torch.no_grad():
            clean_logits = model(x)
    if cond.attack == "noise":
        return noise_worst_case(model, x, y, cond, scorer=scorer, ev=ev, clamp=clamp, clean_logits=clean_logits,
                                generator=generator, roi=roi)
    if cond.attack == "clean":
        worst = WorstCase()
        worst.offer(*scorer(clean_logits, y, roi), x if keep_inputs else None)
        return worst
    return family_worst_cases(model, x, y, cond.attack, cond.norm, [cond.eps], task=task, scorer=scorer, ev=ev,
                              clamp=clamp, clean_logits=clean_logits, keep_inputs=keep_inputs,
                              roi=roi)[float(cond.eps)]


class _Accumulator:
    """Collects the per-batch worst cases of one condition into an :class:`Outcome`."""

    def __init__(self, segmentation: bool, num_classes: int):
        self.segmentation = segmentation
        self.parts: list[np.ndarray] = []
        self.pooled = PooledDice(num_classes) if segmentation else None

    def add(self, worst: WorstCase, y: torch.Tensor, num_classes: int, roi: torch.Tensor | None = None) -> None:
        if self.segmentation:
            self.parts.append(worst.score.detach().float().cpu().numpy())
            onehot_logits = torch.nn.functional.one_hot(worst.output[:, 0].long(), num_classes).movedim(-1, 1)
            self.pooled.update(onehot_logits.float(), y, roi)
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


def _batch_worst_cases(model, x, y, conds: list[Condition], *, task: Task, scorer: Scorer, ev: EvaluateConfig,
                       clamp: Range, clean_logits: torch.Tensor, generator: torch.Generator | None,
                       roi: torch.Tensor | None = None):
    """(condition, worst case) for every condition on one batch; an attacked family's radii together."""
    families: dict[tuple[str, str], list[float]] = {}
    for cond in conds:
        if cond.attack in ("fgsm", "pgd"):
            families.setdefault((cond.attack, cond.norm), []).append(cond.eps)
        else:
            yield cond, worst_case(model, x, y, cond, task=task, scorer=scorer, ev=ev, clamp=clamp,
                                   clean_logits=clean_logits, generator=generator, roi=roi)
    for (attack, norm), radii in families.items():
        found = family_worst_cases(model, x, y, attack, norm, radii, task=task, scorer=scorer, ev=ev, clamp=clamp,
                                   clean_logits=clean_logits, roi=roi)
        for eps in radii:
            yield Condition(attack, norm, eps), found[float(eps)]


def run_suite(model: torch.nn.Module, batches: Iterable[dict[str, Any]], task: Task, ev: EvaluateConfig, *,
              num_classes: int, clamp: Range = None, device: str | torch.device = "cpu",
              class_names: Sequence[str] | None = None, meta_keys: Sequence[str] = (), seed: int = 0,
              on_batch: Callable[[int], None] | None = None) -> SuiteResult:
    """Evaluate ``model`` (in eval mode) on every condition of ``ev`` over ``batches`` of MONAI data dicts (a
    batch's ``roi``, when it has one, restricts attacks and Dice: see the module doc)."""
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
        roi = as_plain(batch[Ours.ROI.value], device) if Ours.ROI.value in batch else None
        n = x.shape[0]
        if generator is None:
            generator = torch.Generator(device=x.device).manual_seed(seed)
        with torch.no_grad():
            clean_logits = model(x)
        for cond, worst in _batch_worst_cases(model, x, y, conds, task=task, scorer=scorer, ev=ev, clamp=clamp,
                                              clean_logits=clean_logits, generator=generator, roi=roi):
            acc[cond].add(worst, y, num_classes, roi)
        labels.append(np.zeros(n, dtype=np.int64) if seg else y.cpu().numpy())
        raw_index = batch.get(Ours.INDEX.value)
        index.append(np.asarray(_meta_values(batch, Ours.INDEX.value, n) if raw_index is not None else range(n)))
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
