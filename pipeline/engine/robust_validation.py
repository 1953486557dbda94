"""``AdversarialValidation``: per validation epoch, segmentation Dice under a short PGD at the config's radii.

An ignite ``Metric`` of the per-epoch validator (a MONAI ``SupervisedEvaluator``): after each clean validation
batch it attacks the same inputs, so the data are read once. The attacked model is the validator's
own inferer around the network (:class:`InfererModel`): for 3D volumes that is the ``SlidingWindowInferer``,
so the whole volume is perturbed with one radius per volume and gradients flow back through every window.

Metric names, written into the validator's ``state.metrics`` next to ``val_dice`` / ``val_dice_pooled`` (so
the MLflow handler logs them every epoch):

* ``val_pgd_<norm>_dice_at_<eps>``: mean per-image Dice (mean over foreground classes) under PGD;
* ``val_pgd_<norm>_dice_pooled_at_<eps>``: Dice pooled over the voxels of all attacked images.

The attack: PGD with ``steps`` steps of ``alpha * eps / steps``, random start, Dice+CE loss, clamped to the
valid intensity range, on the first ``max_samples`` validation samples (a fixed subset), at every ``every``-th
epoch and the last (other epochs log no attacked metrics). A per-epoch trend, not the protocol: the full
protocol, 100 steps with APGD on the whole split, is ``medrobust evaluate``. ``AdversarialValidation.from_config``
reads ``evaluate.epoch_*``; its defaults (5 steps, 16 samples, the largest eps of each norm) cost 4% of a
training epoch of the ISIC 2017 ``standard`` config, the cheapest one (docs/evaluation.md). Under DDP the sums
are all-reduced (``sync_all_reduce``), so every rank holds the same values (each rank attacks up to
``max_samples`` of its own shard).

A validation batch with ``roi`` (a region-of-interest mask per image) is attacked inside it only, and its Dice
counts only the pixels with roi > 0.

The first ``overlay_cases`` samples are kept in ``cases`` (image, label, clean and adversarial prediction at
the largest eps of the first norm) for the overlay figure of :mod:`pipeline.tracking.figures`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from ignite.engine import Engine
from ignite.metrics.metric import EpochWise, Metric, reinit__is_reduced, sync_all_reduce
from monai.engines.utils import IterationEvents
from monai.utils import convert_to_tensor
from monai.utils.enums import CommonKeys as Keys
from torch import nn

from pipeline.adversarial.context import attack_mode
from pipeline.adversarial.pgd import PGD
from pipeline.adversarial.tasks import Segmentation
from pipeline.config import Config
from pipeline.dice import PooledDice
from pipeline.engine.validation import keep_roi
from pipeline.names import Keys as Ours, format_eps

EPOCH_ALPHA = 2.5  # step size alpha * eps / steps, as in the evaluation protocol


class InfererModel(nn.Module):
    """``inferer(x, network)`` as a module, so that attacks see exactly what the validator predicts."""

    def __init__(self, inferer, network: nn.Module):
        super().__init__()
        self.inferer = inferer
        self.network = network

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inferer(x, self.network)


@dataclass
class OverlayCase:
    image: torch.Tensor        # (C, *spatial)
    label: torch.Tensor        # (1, *spatial)
    clean: torch.Tensor        # (1, *spatial) argmax prediction on the clean input
    adversarial: torch.Tensor  # (1, *spatial) argmax prediction under PGD at ``eps``
    eps: float
    norm: str


def metric_name(norm: str, eps: float, pooled: bool = False) -> str:
    return f"val_pgd_{norm.lower()}_dice{'_pooled' if pooled else ''}_at_{format_eps(eps)}"


def _attack_inputs(out: dict) -> tuple:
    """(image, label, clean prediction, roi or None) of a validation step's output (``keep_roi`` adds the roi)."""
    return out[Keys.IMAGE], out[Keys.LABEL], out[Keys.PRED], out.get(Ours.ROI.value)


def _pooled_value(num_classes: int, sums: torch.Tensor) -> float:
    dice = PooledDice(num_classes)
    dice.intersection, dice.total = sums[0], sums[1]
    return dice.value()


class AdversarialValidation(Metric):
    """An ignite ``Metric`` of the validator: ``update`` attacks a batch and adds its Dice sums (per image, and
    pooled per foreground class), ``compute`` all-reduces them (``sync_all_reduce``) and gives both metrics of
    every attack. ``attach`` binds the attacked model (the validator's inferer around its network) and the roi.
    At an epoch that is not ``due`` nothing is attacked and the attacked metrics are removed from the validator's
    metrics (the validator keeps them between runs); ``cases`` then is empty."""

    required_output_keys = None   # the output transform gives a tuple

    def __init__(self, task: Segmentation, attacks: list[tuple[str, float]], *, steps: int = 5,
                 max_samples: int = 16, clamp: tuple[float, float] | None = (0.0, 1.0), overlay_cases: int = 4,
                 alpha: float = EPOCH_ALPHA, every: int = 1, last_epoch: int | None = None):
        self.task = task
        self.attacks = [(norm, float(eps)) for norm, eps in attacks]
        self.max_samples, self.overlay_cases = max_samples, overlay_cases
        self.every, self.last_epoch = every, last_epoch
        self.overlay_attack = max((a for a in self.attacks if a[0] == self.attacks[0][0]), key=lambda a: a[1]) \
            if self.attacks else None
        # one PGD per norm, built once: Dice+CE, random start, clamped to the valid range
        self.pgd = {norm: PGD(task, norm=norm, steps=steps, alpha=alpha, loss="dice_ce", clamp=clamp)
                    for norm, _ in self.attacks}
        self.model: nn.Module | None = None   # set by ``attach``
        self.cases: list[OverlayCase] = []
        self.active = True
        super().__init__(output_transform=_attack_inputs, skip_unrolling=True, metrics_result_mode="flatten")

    @classmethod
    def from_config(cls, task: Segmentation, cfg: Config, overlay_cases: int | None = None) -> AdversarialValidation:
        """The per-epoch check of ``cfg.evaluate`` (``epoch_steps``, ``epoch_max_samples``, ``epoch_every``,
        ``epoch_radii``: the largest eps of each norm, or all of them)."""
        ev = cfg.evaluate
        attacks = []
        for norm in ev.norms:
            radii = list(ev.eps_l2 if norm == "L2" else ev.eps_linf)
            attacks += [(norm, eps) for eps in (radii if ev.epoch_radii == "all" else sorted(radii)[-1:])]
        return cls(task, attacks, steps=ev.epoch_steps, max_samples=ev.epoch_max_samples,
                   clamp=cfg.data.intensity_range,
                   overlay_cases=ev.overlay_cases if overlay_cases is None else overlay_cases,
                   every=ev.epoch_every, last_epoch=cfg.train.epochs)

    def attach(self, engine: Engine, name: str = "adversarial_validation", usage=EpochWise()) -> None:
        """Attach to the validator (a MONAI evaluator): its inferer and network are what the attacks see."""
        self.model = InfererModel(engine.inferer, engine.network)
        if not engine.has_event_handler(keep_roi, IterationEvents.FORWARD_COMPLETED):
            engine.add_event_handler(IterationEvents.FORWARD_COMPLETED, keep_roi)
        super().attach(engine, name, usage)

    def due(self, epoch: int) -> bool:
        """Attack at this (training) epoch: every ``every``-th one, and the last."""
        return epoch % self.every == 0 or epoch == self.last_epoch

    def names(self) -> list[str]:
        return [metric_name(n, e, pooled) for n, e in self.attacks for pooled in (False, True)]

    def started(self, engine: Engine) -> None:
        self.active = self.due(engine.state.epoch)
        super().started(engine)

    @reinit__is_reduced
    def reset(self) -> None:
        self.seen = 0                                   # samples attacked on this rank
        self._dice_sum = torch.zeros(len(self.attacks), dtype=torch.float64)
        # per attack: (intersection, prediction + label) per foreground class, over the voxels of all images
        self._pooled = torch.zeros(len(self.attacks), 2, self.task.num_classes - 1, dtype=torch.float64)
        self._next_cases: list[OverlayCase] = []

    @reinit__is_reduced
    def update(self, output: tuple) -> None:
        image, label, pred, roi = output
        take = min(image.shape[0], self.max_samples - self.seen)
        if take <= 0 or not self.attacks or not self.active:
            return
        x = convert_to_tensor(image[:take], track_meta=False).float()
        y = convert_to_tensor(label[:take], track_meta=False)
        roi = None if roi is None else convert_to_tensor(roi[:take], device=x.device, track_meta=False)
        keep = min(take, self.overlay_cases - len(self._next_cases))
        for a, (norm, eps) in enumerate(self.attacks):
            adv = self.pgd[norm](self.model, x, y, eps, roi=roi)
            with attack_mode(self.model) as net, torch.no_grad():
                logits = net(adv)
            self._dice_sum[a] += float(self.task.dice(logits, y, roi).sum())
            batch = PooledDice(self.task.num_classes)
            batch.update(logits, y, roi)
            self._pooled[a, 0] += batch.intersection
            self._pooled[a, 1] += batch.total
            if keep > 0 and (norm, eps) == self.overlay_attack:
                clean = pred[:keep].argmax(dim=1, keepdim=True)
                adv_pred = logits[:keep].argmax(dim=1, keepdim=True)
                self._next_cases += [OverlayCase(x[i].cpu(), y[i].cpu(), convert_to_tensor(clean[i]).cpu(),
                                                 adv_pred[i].cpu(), eps, norm) for i in range(keep)]
        self.seen += take

    @sync_all_reduce("seen", "_dice_sum", "_pooled")
    def compute(self) -> dict[str, float]:
        out = {}
        for i, (norm, eps) in enumerate(self.attacks):
            out[metric_name(norm, eps)] = float(self._dice_sum[i]) / self.seen if self.seen else float("nan")
            out[metric_name(norm, eps, pooled=True)] = _pooled_value(self.task.num_classes, self._pooled[i].cpu())
        return out

    def completed(self, engine: Engine, name: str) -> None:
        if not self.active:   # the validator keeps its metrics between runs: drop last time's attacked values
            for key in self.names():
                engine.state.metrics.pop(key, None)
            self.cases = []
            return
        super().completed(engine, name)
        self.cases = self._next_cases
