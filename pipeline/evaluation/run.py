"""``medrobust evaluate``: the robustness evaluation of a trained model, logged into its own MLflow run.

1. The model: ``--checkpoint PATH`` or ``--run-id ID`` (its artifact ``checkpoints/last.pt``).
2. The data: ``cfg.evaluate.split`` of ``cfg.data`` (optionally ``evaluate.max_samples`` of it, a seeded
   random subset), loaded with the same transforms as validation.
3. The suite (``robustness.run_suite``), the margins (``margin``), Grad-CAM panels (``gradcam``), and the
   stratified report, written to ``<output folder>`` and logged to the training run under ``evaluation/``
   (metric names in ``results``), so that one MLflow run holds training and evaluation side by side.

Tracking goes through ``TrackingSession`` like training does. A tracking server that is away does not stop an
evaluation of a checkpoint file: the results are written locally, what could not be logged is recorded in
``<output folder>/unlogged.json``, one line says so, and ``medrobust sync <output folder>`` uploads it later.
``--run-id`` needs the server (the checkpoint is downloaded from it).
"""

from __future__ import annotations

import random
import tempfile
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from mlflow.tracking import MlflowClient
from monai.data import DataLoader
from tqdm.auto import tqdm

from pipeline.adversarial.tasks import Task
from pipeline.config import Config
from pipeline.data import build_data, make_dataset
from pipeline.device import resolve_device
from pipeline.errors import InputError
from pipeline.evaluation.artifacts import write_json, write_suite
from pipeline.evaluation.degenerate import Verdict, classification_verdict, segmentation_verdict
from pipeline.evaluation.gradcam import gradcam_panels, select_cases
from pipeline.evaluation.loading import download_run_checkpoint, inference_model, load_model
from pipeline.evaluation.margin import estimate_margin, known_brackets, margin_summary, plot_margins, radius_grid
from pipeline.evaluation.results import CLEAN, Condition, SuiteResult
from pipeline.names import Keys as Ours, format_eps
from pipeline.evaluation.robustness import Scorer, as_plain, attack_losses, run_suite, worst_case
from pipeline.tracking.session import TrackingSession, latest_run

ARTIFACT_DIR = "evaluation"


@dataclass
class Evaluation:
    run_id: str | None              # None only while the run could not be created (server away; see sync)
    tracking_uri: str
    output_dir: Path
    metrics: dict[str, float]
    result: SuiteResult
    margins: dict[str, np.ndarray] = field(default_factory=dict)
    verdict: Verdict = field(default_factory=lambda: Verdict(False))


def _subset(items: list[dict[str, Any]], limit: int | None, seed: int) -> list[dict[str, Any]]:
    """``limit`` items drawn with a fixed seed, in their original order (all of them without a limit)."""
    if limit is None or limit >= len(items):
        return list(items)
    keep = sorted(random.Random(seed).sample(range(len(items)), limit))
    return [items[i] for i in keep]


def _eps_lists(cfg: Config) -> dict[str, list[float]]:
    return {"L2": list(cfg.evaluate.eps_l2), "Linf": list(cfg.evaluate.eps_linf)}


def margins_over(model: torch.nn.Module, batches: Iterable[dict[str, Any]], task: Task, cfg: Config,
                 device: torch.device, suite: SuiteResult | None = None) -> dict[str, np.ndarray]:
    """Per-sample margins per norm, in data order (``margin.estimate_margin``), started from the brackets of
    ``suite`` (the attack suite's result on the same batches) under the early-exit schedule."""
    ev, eps = cfg.evaluate, _eps_lists(cfg)
    losses = attack_losses(task, ev.losses)
    early = ev.schedule == "early_exit"
    known = {n: known_brackets(suite, n) for n in ev.norms} if early and suite is not None else {}
    parts: dict[str, list[np.ndarray]] = {n: [] for n in ev.norms}
    offset = 0
    for batch in tqdm(batches, desc="margins", unit="batch", leave=False):
        x, y = as_plain(batch["image"], device).float(), as_plain(batch["label"], device)
        y = y if task.name == "segmentation" else y.reshape(-1).long()
        roi = as_plain(batch[Ours.ROI.value], device) if Ours.ROI.value in batch else None
        rows = slice(offset, offset + x.shape[0])
        offset += x.shape[0]
        for norm in ev.norms:
            lo, hi = (known[norm][0][rows], known[norm][1][rows]) if norm in known else (None, None)
            m = estimate_margin(model, x, y, task=task, norm=norm, radii=radius_grid(eps[norm]), losses=losses,
                                steps=ev.steps, restarts=ev.restarts, clamp=cfg.data.intensity_range,
                                early_stop=early, lo=lo, hi=hi, roi=roi)
            parts[norm].append(m.cpu().numpy())
    return {n: np.concatenate(p) if p else np.zeros(0) for n, p in parts.items()}


def write_margins(margins: dict[str, np.ndarray], index: np.ndarray, eps: dict[str, list[float]],
                  out_dir: Path) -> dict[str, float]:
    metrics: dict[str, float] = {}
    frame = pd.DataFrame({"index": index})
    for norm, values in margins.items():
        top = radius_grid(eps[norm])[-1]
        frame[f"margin_{norm}"] = values
        plot_margins(values, out_dir / f"margin_{norm.lower()}.png", norm, top)
        metrics.update({f"eval/margin_{norm.lower()}/{k}": v for k, v in margin_summary(values, top).items()})
    frame.to_csv(out_dir / "margins.csv", index=False)
    return metrics


def gradcam_cases(model: torch.nn.Module, batches: Iterable[dict[str, Any]], task: Task, cfg: Config,
                  num_classes: int, device: torch.device) -> tuple[torch.Tensor, ...] | None:
    """(clean, adversarial, labels, roi or None) of ``gradcam_per_class`` cases per class, adversarial = PGD at
    the middle radius of the first configured norm (inside the cases' region of interest when the data has one,
    as in the suite); None when there are no cases."""
    ev, key = cfg.evaluate, Ours.ROI.value

    def plain(batch):
        case = {"image": as_plain(batch["image"], "cpu"), "label": as_plain(batch["label"], "cpu")}
        return {**case, key: as_plain(batch[key], "cpu")} if key in batch else case

    x, y, roi = select_cases((plain(b) for b in batches), num_classes, ev.gradcam_per_class)
    if not len(x):
        return None
    x, y, roi = x.to(device), y.to(device), None if roi is None else roi.to(device)
    norm = ev.norms[0]
    radii = _eps_lists(cfg)[norm]
    cond = Condition("pgd", norm, radii[len(radii) // 2])
    worst = worst_case(model, x, y, cond, task=task, scorer=Scorer(task, num_classes), ev=ev,
                       clamp=cfg.data.intensity_range, keep_inputs=True, roi=roi)
    return x, worst.inputs, y, roi


def write_gradcam(model: torch.nn.Module, batches: Iterable[dict[str, Any]], task: Task, cfg: Config,
                  num_classes: int, class_names: Sequence[str], device: torch.device, out_dir: Path) -> list[Path]:
    """Grad-CAM panels of :func:`gradcam_cases` under ``out_dir/gradcam``."""
    cases = gradcam_cases(model, batches, task, cfg, num_classes, device)
    if cases is None:
        return []
    x, adv, y, roi = cases
    return gradcam_panels(model, x, adv, y, class_names, out_dir / "gradcam", roi=roi)


def _loader(cfg: Config, items: list[dict[str, Any]], transform, spatial_dims: int, cache_dir: Path) -> DataLoader:
    dataset = make_dataset(items, transform, cfg, cache_dir=cache_dir)
    batch = cfg.evaluate.batch_size if spatial_dims == 2 else 1  # volumes differ in shape
    return DataLoader(dataset, batch_size=batch, shuffle=False, num_workers=cfg.train.num_workers)


def _target_run(session: TrackingSession, cfg: Config, run_id: str | None) -> str | None:
    """The run to log into: the given/trained run, else a new evaluation run in the config's experiment (also
    when the checkpoint's run is not in this tracking store). While the server is away, the new run's creation
    is recorded for ``medrobust sync`` and None is returned."""
    if run_id:
        if session.attach(run_id):
            return run_id
        print(f"MLflow run {run_id} (the checkpoint's) is not in {session.uri}; the evaluation goes to a new run",
              flush=True)
    return session.open_run(f"evaluate-{cfg.method.name}", tags={
        "medrobust.kind": "evaluation", "medrobust.method": cfg.method.name, "medrobust.task": cfg.task,
        "medrobust.dataset": cfg.data.dataset_tag()})


def log_to_run(session: TrackingSession, metrics: dict[str, float], out_dir: Path, tags: dict[str, str]) -> None:
    """The finite metrics (step 0), the tags, and every file of ``out_dir`` under ``evaluation/``, into the
    session's run; what fails is recorded by the session."""
    session.log_metrics({k: float(v) for k, v in metrics.items() if np.isfinite(v)}, step=0)
    session.set_tags(tags)
    session.log_artifacts(out_dir, ARTIFACT_DIR)


def format_summary(result: SuiteResult, metrics: dict[str, float], verdict: Verdict | None = None) -> str:
    """A short text table: the headline metric (and the balanced accuracy beside the accuracy) per attack
    family and radius, the curve areas, and a warning line when the model is degenerate."""
    head = result.headline
    nan = float("nan")
    shown = [head, "balanced_accuracy"] if head == "accuracy" else [head]
    clean = "  ".join(f"{m} {metrics.get(f'eval/clean/{m}', nan):.4f}" for m in shown)
    lines = [f"clean        {clean}" + ("  DEGENERATE" if verdict else "")]
    for family, conds in result.families().items():
        for metric in shown:
            cells = "  ".join(f"eps={format_eps(c.eps)}: {metrics.get(c.metric(metric), nan):.4f}" for c in conds)
            tail = f"  auc_norm={metrics.get(f'eval/{family}/auc_norm', nan):.4f}" if metric == head else ""
            lines.append(f"{family:<12} {metric + ':':<19}{cells}{tail}")
    for key in sorted(k for k in metrics if k.startswith("eval/margin_") and k.endswith("/p50")):
        lines.append(f"{key.split('/')[1]:<12} median margin {metrics[key]:.4g}")
    if verdict:
        lines.append(f"WARNING: degenerate model: {verdict.reason}; its numbers under attack say nothing about "
                     "robustness")
    return "\n".join(lines)


class SuiteProgress(torch.nn.Module):
    """The evaluated model, counting its forward passes on a progress bar over the batches of the suite (an
    attack at 100 steps takes minutes per batch on a CPU: the count shows that it is moving)."""

    def __init__(self, model: torch.nn.Module, batches: int, desc: str = "attack suite"):
        super().__init__()
        self.model = model
        self.bar = tqdm(total=batches, desc=desc, unit="batch", dynamic_ncols=True)
        self.forwards = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.forwards += 1
        self.bar.set_postfix_str(f"{self.forwards} forward passes", refresh=False)
        self.bar.update(0)
        return self.model(x)

    def batch_done(self, _batch: int) -> None:
        self.bar.update(1)

    def close(self) -> None:
        self.bar.close()


def clean_verdict(model: torch.nn.Module, result: SuiteResult, loader: Iterable[dict[str, Any]],
                  device: torch.device) -> Verdict:
    """Degenerate-model check on the clean predictions (segmentation: one more clean pass for the masks)."""
    outcome = result.outcomes[CLEAN]
    if outcome.probs is not None:
        return classification_verdict(outcome.probs.argmax(axis=1), result.labels, result.class_names)
    fractions = []
    with torch.no_grad():
        for batch in loader:
            pred = model(as_plain(batch["image"], device).float()).argmax(dim=1)
            fractions.append((pred > 0).flatten(1).float().mean(dim=1).cpu().numpy())
    return segmentation_verdict(np.concatenate(fractions) if fractions else np.zeros(0))


def latest_run_id(tracking: TrackingSession | MlflowClient, cfg: Config) -> str:
    """The newest finished training run of ``cfg``'s experiment with ``cfg``'s method (``--run-id latest``)."""
    client = tracking.client if isinstance(tracking, TrackingSession) else tracking
    name, method = cfg.tracking.experiment or cfg.experiment, cfg.method.name
    found = latest_run(client, name, {"medrobust.method": method})
    if found is None:
        raise InputError(f"--run-id latest: no finished '{method}' run in MLflow experiment '{name}' "
                         f"({client.tracking_uri}); train one first")
    return found


def evaluate(cfg: Config, checkpoint: str | None = None, run_id: str | None = None) -> Evaluation:
    """Evaluate a checkpoint (or a run's final checkpoint) on ``cfg.evaluate.split``; log into that run."""
    if (checkpoint is None) == (run_id is None):
        raise InputError("evaluate: give exactly one of --checkpoint PATH or --run-id ID")
    base = Path(cfg.train.output_dir or Path("outputs") / cfg.experiment)
    session = TrackingSession(cfg.tracking.uri, cfg.tracking.experiment or cfg.experiment, base,
                              unreachable="record", activity="evaluation")
    uri = session.uri
    if run_id is not None and session.down:
        raise InputError(f"--run-id {run_id}: MLflow server {uri} is unreachable ({session.down}); the run's "
                         "checkpoint cannot be downloaded. Start the server, or evaluate the checkpoint file with "
                         "--checkpoint PATH (its results are then recorded for medrobust sync)")
    if run_id == "latest":
        run_id = latest_run_id(session, cfg)
    device = resolve_device(cfg.train.device)
    with tempfile.TemporaryDirectory(prefix="medrobust-eval-") as tmp:
        path = Path(checkpoint) if checkpoint else download_run_checkpoint(session.client, run_id, Path(tmp))
        loaded = load_model(path, cfg, device)
    target = _target_run(session, cfg, run_id or loaded.run_id)
    data = loaded.data
    num_classes, spatial_dims = int(data["num_classes"]), int(data["spatial_dims"])
    class_names = list(data.get("class_names") or []) or [str(c) for c in range(num_classes)]
    task = cfg.build_task(num_classes)
    model = inference_model(loaded.network, spatial_dims, cfg.data.patch_size)

    splits = build_data(cfg)
    items = _subset(splits.split(cfg.evaluate.split), cfg.evaluate.max_samples, cfg.seed)
    if not items:
        raise InputError(f"evaluate.split: the '{cfg.evaluate.split}' split of data.root is empty")
    out_dir = base / (f"evaluation-{target[:12]}" if target else f"evaluation-{time.strftime('%Y%m%d-%H%M%S')}")
    session.output_dir = out_dir                        # unlogged.json goes beside the results
    loader = _loader(cfg, items, splits.load_transforms, spatial_dims, base / "cache")
    ev = cfg.evaluate
    wanted = [*ev.stratify, *(["age"] if "age_band" in ev.stratify else [])]  # age only to derive bands
    meta_keys = [k for k in dict.fromkeys(wanted) if k != "label"]
    print(f"evaluating {len(items)} {ev.split} samples: PGD-{ev.steps} x {ev.restarts} restart(s), losses "
          f"{attack_losses(task, ev.losses)}, radii {_eps_lists(cfg)}", flush=True)
    progress = SuiteProgress(model, len(loader))
    try:
        result = run_suite(progress, loader, task, ev, num_classes=num_classes, clamp=cfg.data.intensity_range,
                           device=device, class_names=class_names, meta_keys=meta_keys, seed=cfg.seed,
                           on_batch=progress.batch_done)
    finally:
        progress.close()
    verdict = clean_verdict(model, result, loader, device)
    settings = {"split": ev.split, "samples": len(items), "steps": ev.steps, "restarts": ev.restarts,
                "losses": attack_losses(task, ev.losses), "norms": list(ev.norms), "eps": _eps_lists(cfg),
                "intensity_range": list(cfg.data.intensity_range or []), "checkpoint_run": loaded.run_id}
    metrics = write_suite(result, out_dir, list(ev.stratify), settings)
    metrics["eval/clean/degenerate"] = float(verdict.degenerate)
    margins = {}
    if ev.margin:
        started = time.perf_counter()
        margins = margins_over(model, loader, task, cfg, device, suite=result)
        print(f"margins: done in {time.perf_counter() - started:.0f} s", flush=True)
        metrics.update(write_margins(margins, result.index, _eps_lists(cfg), out_dir))
    if ev.gradcam_per_class and task.name == "classification":
        write_gradcam(model, loader, task, cfg, num_classes, class_names, device, out_dir)
    write_json(out_dir / "summary.json", {"metrics": metrics, "settings": settings,
                                          "degenerate": {"flag": verdict.degenerate, "reason": verdict.reason}})
    log_to_run(session, metrics, out_dir, {"medrobust.evaluated": "true", "medrobust.eval.split": ev.split,
                                           "medrobust.degenerate": verdict.reason or "no"})
    session.end(status=None)                            # the training run keeps its own status
    print(format_summary(result, metrics, verdict))
    note = session.summary()
    if note:
        print(note)
        print(f"evaluation done, files in {out_dir}; not yet (completely) in MLflow run {target or '(to be created)'} "
              f"({uri})")
    else:
        print(f"evaluation logged to MLflow run {target} ({uri}), files in {out_dir}")
    return Evaluation(target, uri, out_dir, metrics, result, margins, verdict)
