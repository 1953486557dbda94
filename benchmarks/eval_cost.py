"""What the robustness evaluation costs: the exhaustive schedule against early exit (issue 14, evaluation part).

For each model the same evaluation runs twice, on the same test samples and from the same seed:

* ``exhaustive``: every attack of the protocol (FGSM per loss; PGD per loss, APGD-CE, APGD-T) on every sample at
  every radius for all its steps, and the margin search of earlier versions (its own radius grid, full PGD runs);
* ``early_exit``: the default (``evaluate.schedule``): radii in increasing order from the worst case below, each
  attack only on the samples still handled correctly, PGD and APGD stopping per sample at the first wrong
  iterate, and the margin search started from the suite's brackets.

and, with ``--head-protocol``, a third time as the protocol was before APGD joined it (PGD only, exhaustive).
The network is wrapped in a counter: a *gradient evaluation* is one sample (one row of a batch) through a
forward pass with autograd enabled, i.e. one forward + input-gradient; no-grad forwards are counted apart.
Every reported accuracy of ``early_exit`` is checked against ``exhaustive``'s (never higher).

Models (CPU, minutes): the quickstart model (``medrobust quickstart``'s config: IMA, small CNN, synthetic
dermatoscopy-like images, trained here; robust at the protocol's smaller radii), and a small CNN trained
without attacks on a DermaMNIST subset (skipped with the reason when the data folder is absent; a small CNN
trained with PGD-AT at eps 0.5 on such a subset predicts the majority class for every image, which no attack
changes, so it would measure nothing). The protocol is ``EvaluateConfig()``'s default (L2 and Linf, 3
radii each, 100 steps, losses ce and margin, FGSM, noise, APGD, margins).

    python -m benchmarks.eval_cost --samples 16 --head-protocol --out outputs/eval-cost    # benchmarks/README.md
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import platform
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

REPO = Path(__file__).resolve().parents[1]


class Counted(nn.Module):
    """The model, counting the samples it sees with autograd enabled (gradient evaluations) and without."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.grad_rows = 0
        self.forward_rows = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled():
            self.grad_rows += x.shape[0]
        else:
            self.forward_rows += x.shape[0]
        return self.model(x)


@dataclass
class Setup:
    name: str
    model: nn.Module
    batches: list[dict[str, torch.Tensor]]
    task: Any
    num_classes: int
    clamp: tuple[float, float] | None
    note: str


def _test_batches(cfg, samples: int, batch: int, seed: int) -> tuple[list[dict[str, torch.Tensor]], int]:
    """``samples`` test items (seeded subset, data order), loaded with the validation transforms, as batches."""
    import random

    from pipeline.data import build_data
    from pipeline.evaluation.robustness import as_plain

    splits = build_data(cfg)
    items = splits.split("test")
    if samples < len(items):
        items = [items[i] for i in sorted(random.Random(seed).sample(range(len(items)), samples))]
    loaded = [splits.load_transforms(dict(item)) for item in items]
    x = torch.stack([as_plain(d["image"], "cpu").float() for d in loaded])
    y = torch.as_tensor([int(as_plain(d["label"], "cpu").reshape(-1)[0]) for d in loaded])
    out = [{"image": x[i:i + batch], "label": y[i:i + batch], "index": torch.arange(i, min(i + batch, len(x)))}
           for i in range(0, len(x), batch)]
    return out, splits.num_classes


def _train(raw: dict[str, Any], work: Path) -> nn.Module:
    """Train ``raw`` (a config dict) into ``work`` with a throw-away local MLflow store; the network, eval mode."""
    from pipeline.config import config_from_dict
    from pipeline.engine.run import train
    from pipeline.evaluation.loading import load_model

    raw = copy.deepcopy(raw)
    raw["train"].update({"device": "cpu", "progress": False, "output_dir": str(work / raw["experiment"])})
    raw["tracking"] = {"uri": f"sqlite:///{work / 'mlflow.db'}", "run_name": f"eval-cost-{raw['experiment']}",
                       "log_model": False}
    cfg = config_from_dict(raw, "eval_cost")
    here = Path.cwd()
    work.mkdir(parents=True, exist_ok=True)
    os.chdir(work)  # MLflow puts the artifacts of a SQLite store into ./mlruns: keep them in the work folder
    try:
        result = train(cfg)
    finally:
        os.chdir(here)
    return load_model(result.checkpoint, cfg, torch.device("cpu")).network.eval()


def quickstart_setup(work: Path, samples: int, seed: int) -> Setup:
    from pipeline.adversarial.tasks import Task
    from pipeline.config import config_from_dict
    from pipeline.quickstart import QUICKSTART

    raw = copy.deepcopy(QUICKSTART)
    model = _train(raw, work)
    batches, classes = _test_batches(config_from_dict(raw, "quickstart"), samples, samples, seed)
    note = (f"quickstart config (IMA, small_cnn {raw['model']['channels']}, {raw['train']['epochs']} epochs on "
            f"{raw['data']['synthetic_size']} synthetic 32x32 images), {len(torch.cat([b['label'] for b in batches]))}"
            " test images")
    return Setup("quickstart", model, batches, Task.make("classification", classes), classes, (0.0, 1.0), note)


def dermamnist_setup(data: Path, work: Path, samples: int, seed: int, train_limit: int, epochs: int) -> Setup:
    from pipeline.adversarial.tasks import Task
    from pipeline.config import load_config

    npz = (data / "dermamnist" / "dermamnist.npz").resolve()
    if not npz.is_file():
        raise FileNotFoundError(f"{npz} is absent")
    cfg = load_config(REPO / "configs" / "dermamnist_standard.yaml", [
        f"data.root={npz}", f"data.limit={train_limit}", "data.cache=none", "model.name=small_cnn",
        "model.channels=[16, 32, 64]", f"train.epochs={epochs}"])
    model = _train(cfg.resolved(), work)
    batches, classes = _test_batches(cfg, samples, samples, seed)
    note = (f"configs/dermamnist_standard.yaml with small_cnn [16, 32, 64], standard training, {epochs} epochs on "
            f"{train_limit} training images; {len(torch.cat([b['label'] for b in batches]))} test images")
    return Setup("dermamnist", model, batches, Task.make("classification", classes), classes, (0.0, 1.0), note)


def measure(setup: Setup, ev, seed: int) -> dict[str, Any]:
    """Run the suite and the margins under ``ev`` (its schedule) on a counted model; counts, times, results."""
    from pipeline.evaluation.margin import estimate_margin, known_brackets, margin_summary, radius_grid
    from pipeline.evaluation.robustness import attack_losses, run_suite

    early = ev.schedule == "early_exit"
    counted = Counted(setup.model).eval()
    torch.manual_seed(seed)
    started = time.perf_counter()
    result = run_suite(counted, setup.batches, setup.task, ev, num_classes=setup.num_classes, clamp=setup.clamp,
                       seed=seed)
    suite = {"grad": counted.grad_rows, "forward": counted.forward_rows, "seconds": time.perf_counter() - started,
             "floor": suite_floor(result, setup, ev)}
    counted.grad_rows = counted.forward_rows = 0
    started = time.perf_counter()
    margins: dict[str, Any] = {}
    eps = {"L2": list(ev.eps_l2), "Linf": list(ev.eps_linf)}
    for norm in ev.norms:
        brackets = known_brackets(result, norm) if early else None
        parts, offset = [], 0
        for batch in setup.batches:
            x, y = batch["image"], batch["label"]
            rows = slice(offset, offset + len(y))
            offset += len(y)
            lo, hi = (brackets[0][rows], brackets[1][rows]) if early else (None, None)
            parts.append(estimate_margin(counted, x, y, task=setup.task, norm=norm, radii=radius_grid(eps[norm]),
                                         losses=attack_losses(setup.task, ev.losses), steps=ev.steps,
                                         restarts=ev.restarts, clamp=setup.clamp, early_stop=early, lo=lo,
                                         hi=hi).numpy())
        values = np.concatenate(parts)
        margins[norm] = {"p50": margin_summary(values, radius_grid(eps[norm])[-1])["p50"],
                         "values": values.tolist()}
    margin = {"grad": counted.grad_rows, "forward": counted.forward_rows, "seconds": time.perf_counter() - started}
    accuracy = {_cond_name(c): result.metrics_of(c)["accuracy"] for c in sorted(result.outcomes)}
    return {"schedule": ev.schedule, "apgd": ev.apgd, "suite": suite, "margin": margin,
            "grad": suite["grad"] + margin["grad"], "forward": suite["forward"] + margin["forward"],
            "seconds": suite["seconds"] + margin["seconds"], "accuracy": accuracy, "margins": margins}


def suite_floor(result, setup: Setup, ev) -> int:
    """Gradient evaluations that no schedule reporting the same accuracies can skip: at every radius, every attack
    of the plan runs for all its steps on each sample that holds there (FGSM: one gradient per loss), since only
    the last attack tried shows that it holds."""
    from pipeline.evaluation.robustness import plan

    cost = {family: sum(1 if one.kind == "fgsm" else ev.steps for one in plan(family, setup.task, ev, setup.num_classes))
            for family in ("fgsm", "pgd")}
    return int(sum(cost[cond.attack] * result.correct(cond).sum() for cond in result.outcomes
                   if cond.attack in cost))


def _cond_name(cond) -> str:
    return "clean" if cond.attack == "clean" else f"{cond.family}@{cond.eps:.6g}"


def compare(old: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    """Reduction factors and the conditions where early exit reports a higher accuracy (should be none)."""
    higher = {k: (old["accuracy"][k], v) for k, v in new["accuracy"].items() if v > old["accuracy"][k] + 1e-12}
    return {"grad_ratio": old["grad"] / max(new["grad"], 1), "suite_grad_ratio": old["suite"]["grad"] /
            max(new["suite"]["grad"], 1), "margin_grad_ratio": old["margin"]["grad"] / max(new["margin"]["grad"], 1),
            "time_ratio": old["seconds"] / max(new["seconds"], 1e-9), "higher_accuracy": higher}


def markdown(report: dict[str, Any]) -> str:
    s = report["settings"]
    lines = [f"Date {report['date']}, {report['machine']}, torch {report['torch']}, {s['threads']} thread(s); "
             f"protocol: {s['protocol']}.", ""]
    for name, entry in report["setups"].items():
        if "skipped" in entry:
            lines += [f"**{name}**: skipped ({entry['skipped']})", ""]
            continue
        runs, cmp_ = entry["runs"], entry["compare"]
        lines += [f"**{name}**: {entry['note']}.", "",
                  "| schedule | grad evals: suite | suite floor | margins | total | no-grad forwards | wall s |",
                  "|---|---|---|---|---|---|---|"]
        for key, run in runs.items():
            lines.append(f"| {key} | {run['suite']['grad']:,} | {run['suite']['floor']:,} | {run['margin']['grad']:,} "
                         f"| {run['grad']:,} | {run['forward']:,} | {run['seconds']:.1f} |")
        lines += ["", f"early_exit: **{cmp_['grad_ratio']:.1f} x fewer gradient evaluations** than exhaustive "
                      f"(suite {cmp_['suite_grad_ratio']:.1f} x, margins {cmp_['margin_grad_ratio']:.1f} x), "
                      f"{cmp_['time_ratio']:.1f} x less wall time; conditions where early_exit reports a higher "
                      f"accuracy: {len(cmp_['higher_accuracy']) or 'none'}. Suite floor (the attacks on samples "
                      f"that hold, which every schedule must run): {runs['early_exit']['suite']['floor']:,}, i.e. at "
                      f"most {runs['exhaustive']['grad'] / max(runs['early_exit']['suite']['floor'], 1):.1f} x fewer "
                      "than exhaustive for any schedule that reports the same numbers.", ""]
        keys = list(runs)
        lines += ["| condition | " + " | ".join(f"accuracy {k}" for k in keys) + " |",
                  "|---|" + "---|" * len(keys)]
        for cond in runs["exhaustive"]["accuracy"]:
            lines.append(f"| {cond} | " + " | ".join(f"{runs[k]['accuracy'][cond]:.4f}" for k in keys) + " |")
        lines += ["", "| median margin | " + " | ".join(keys) + " |", "|---|" + "---|" * len(keys)]
        for norm in runs["exhaustive"]["margins"]:
            lines.append(f"| {norm} | " + " | ".join(f"{runs[k]['margins'][norm]['p50']:.4g}" for k in keys) + " |")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=16, help="test images per model (one batch)")
    parser.add_argument("--steps", type=int, default=None, help="attack steps (default: the protocol's 100)")
    parser.add_argument("--setups", default="quickstart,dermamnist")
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data")
    parser.add_argument("--train-limit", type=int, default=3000, help="DermaMNIST training images")
    parser.add_argument("--epochs", type=int, default=8, help="DermaMNIST training epochs")
    parser.add_argument("--head-protocol", action="store_true",
                        help="also run the protocol as before APGD (PGD only, exhaustive)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=Path("outputs") / "eval-cost")
    args = parser.parse_args(argv)

    from pipeline.config import EvaluateConfig

    torch.set_num_threads(args.threads)
    os.environ.setdefault("GIT_PYTHON_REFRESH", "quiet")
    protocol = EvaluateConfig(batch_size=args.samples, **({"steps": args.steps} if args.steps else {}))
    report: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs", "torch": torch.__version__,
        "settings": {**vars(args), "data": str(args.data), "out": str(args.out),
                     "protocol": (f"L2 {protocol.eps_l2} and Linf {[round(e, 6) for e in protocol.eps_linf]}, "
                                  f"{protocol.steps} steps, losses {protocol.losses}, restarts {protocol.restarts}, "
                                  f"APGD-CE + {protocol.apgd_targets} APGD-T, FGSM, noise, margins")},
        "setups": {}}
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="eval-cost-") as tmp:
        for name in [n for n in args.setups.split(",") if n]:
            work = Path(tmp) / name
            try:
                setup = (quickstart_setup(work, args.samples, args.seed) if name == "quickstart" else
                         dermamnist_setup(args.data, work, args.samples, args.seed, args.train_limit, args.epochs))
            except FileNotFoundError as exc:
                report["setups"][name] = {"skipped": str(exc)}
                print(f"{name}: skipped ({exc})", flush=True)
                continue
            runs = {}
            variants = [("exhaustive", {"schedule": "exhaustive"}), ("early_exit", {"schedule": "early_exit"})]
            if args.head_protocol:
                variants.append(("exhaustive, PGD only", {"schedule": "exhaustive", "apgd": False}))
            for key, change in variants:
                runs[key] = measure(setup, protocol.model_copy(update=change), args.seed)
                print(f"{name} {key}: {runs[key]['grad']:,} gradient evaluations, {runs[key]['seconds']:.1f} s",
                      flush=True)
            entry = {"note": setup.note, "runs": runs, "compare": compare(runs["exhaustive"], runs["early_exit"])}
            report["setups"][name] = entry
            print(f"{name}: {entry['compare']['grad_ratio']:.1f} x fewer gradient evaluations; higher accuracies: "
                  f"{entry['compare']['higher_accuracy'] or 'none'}", flush=True)
    (args.out / "eval_cost.json").write_text(json.dumps(report, indent=1))
    (args.out / "eval_cost.md").write_text(markdown(report))
    print(markdown(report))
    bad = [n for n, e in report["setups"].items() if e.get("compare", {}).get("higher_accuracy")]
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
