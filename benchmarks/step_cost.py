"""Step cost of adversarial training on the current device (SPEC 6; GitHub issue "GPU speed").

For every workload and method, in one run:

* ``clean``:  a plain-PyTorch training step (forward, backward, optimizer step) on clean inputs;
* ``attack``: one attack step (forward in eval mode + ``torch.autograd.grad`` w.r.t. the input only);
* ``full``:   the method's training step through ``RobustTrainer``'s iteration (ignite engine, MONAI events);
* ``ratio``:  full / (clean + K * attack), the cost over the floor (target for PGD-AT: <= 1.05);
* ``standard`` also runs through a plain ``monai.engines.SupervisedTrainer`` (``vs_monai``, target <= 1.03),
  and ``ima`` is compared with ``pgd_at`` at the same K (``vs_pgd_at``);
* data-wait share of the DermaMNIST and ISIC 2017 input pipelines (CacheDataset + ThreadDataLoader), when
  the data folder exists (target < 5%).

Run from the repository root (see benchmarks/README.md):

    python -m benchmarks.step_cost --tiny --device cpu --out outputs/bench    # CPU smoke run, seconds
    python -m benchmarks.step_cost --device cuda --out outputs/bench          # the real GPU run
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import platform
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import monai
import torch
from ignite.engine import Events
from monai.engines import SupervisedTrainer

from pipeline.adversarial.methods import build_method
from pipeline.adversarial.tasks import Task
from pipeline.config import Config, MethodConfig, ModelConfig, load_config
from pipeline.data import build_data
from pipeline.engine.networks import build_network
from pipeline.engine.run import image_size_of, make_loader
from pipeline.engine.seeding import SampleSeededCompose
from pipeline.engine.trainer import METRICS, RobustTrainer

REPO = Path(__file__).resolve().parents[1]
METHODS = ("standard", "pgd_at", "trades", "ima", "dpaat")
CLAMP = (0.0, 1.0)  # inputs are in [0, 1]; attacks clamp to it as the configs do


@dataclass(frozen=True)
class Workload:
    task: str
    model: str
    spatial_dims: int
    in_channels: int
    num_classes: int
    size: tuple[int, ...]
    batch: int

    def tiny(self) -> Workload:
        size = (16,) * 3 if self.spatial_dims == 3 else (32, 32)
        return Workload(self.task, self.model, self.spatial_dims, self.in_channels, self.num_classes, size, 2)


WORKLOADS = {
    "resnet18_224": Workload("classification", "resnet18", 2, 3, 7, (224, 224), 64),
    "unet2d_256": Workload("segmentation", "unet", 2, 3, 2, (256, 256), 16),
    "unet3d_96": Workload("segmentation", "unet", 3, 1, 2, (96, 96, 96), 4),
}


# ------------------------------------------------------------------------------------------------- timing
class Clock:
    """Durations of repeated steps: CUDA events on GPU (no host sync inside the loop), perf_counter on CPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.spans: list = []
        self._begin: Any = None

    def _now(self):
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def start(self, *_: Any) -> None:
        self._begin = self._now()

    def stop(self, *_: Any) -> None:
        self.spans.append((self._begin, self._now()))

    def median(self, skip: int) -> float:
        """Median duration in seconds, leaving out the first ``skip`` (warm-up) steps."""
        if self.cuda:
            torch.cuda.synchronize()
            times = [begin.elapsed_time(end) / 1000.0 for begin, end in self.spans]
        else:
            times = [end - begin for begin, end in self.spans]
        return statistics.median(times[skip:])


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_loop(step: Callable[[], None], device: torch.device, warmup: int, iters: int) -> float:
    clock = Clock(device)
    for _ in range(warmup + iters):
        clock.start()
        step()
        clock.stop()
    return clock.median(warmup)


def autocast(device: torch.device, amp: bool):
    return torch.autocast(device.type, dtype=torch.bfloat16) if amp else contextlib.nullcontext()


# ------------------------------------------------------------------------------------------------- setup
def make_model(work: Workload, device: torch.device, channels_last: bool, compile_: bool) -> torch.nn.Module:
    model = build_network(ModelConfig(name=work.model), task=work.task, spatial_dims=work.spatial_dims,
                          in_channels=work.in_channels, num_classes=work.num_classes, image_size=work.size)
    model = model.to(device)
    if channels_last:
        model = model.to(memory_format=memory_format(work.spatial_dims))
    return torch.compile(model) if compile_ else model


def memory_format(spatial_dims: int) -> torch.memory_format:
    return torch.channels_last_3d if spatial_dims == 3 else torch.channels_last


def make_task(work: Workload) -> Task:
    return Task.make(work.task, work.num_classes)


def make_batch(work: Workload, device: torch.device, channels_last: bool) -> dict[str, torch.Tensor]:
    """A random batch in [0, 1]: random class labels, or a centred blob that is brighter than the noise
    around it (so that a network learns it in a few steps and Dice is meaningful)."""
    g = torch.Generator().manual_seed(0)
    image = torch.rand((work.batch, work.in_channels, *work.size), generator=g)
    if work.task == "classification":
        label = torch.randint(0, work.num_classes, (work.batch,), generator=g)
    else:
        grids = torch.meshgrid(*[torch.linspace(-1, 1, s) for s in work.size], indexing="ij")
        blob = (sum(c ** 2 for c in grids) < 0.3).float()
        label = blob.expand(work.batch, 1, *work.size).clone()
        image = 0.5 * image + 0.5 * label
    image = image.to(device)
    if channels_last:
        image = image.contiguous(memory_format=memory_format(work.spatial_dims))
    return {"image": image, "label": label.to(device), "index": torch.arange(work.batch, device=device)}


def make_optimizer(model: torch.nn.Module) -> torch.optim.Optimizer:
    return torch.optim.Adam(model.parameters(), lr=1e-4)


# ------------------------------------------------------------------------------------------------- steps
def clean_step(model, task: Task, batch, amp: bool) -> Callable[[], None]:
    """(a) plain PyTorch: forward, loss, backward, optimizer step."""
    optimizer = make_optimizer(model)
    x, y = batch["image"], batch["label"]

    def step():
        model.train()
        optimizer.zero_grad(set_to_none=True)
        with autocast(x.device, amp):
            loss = task.per_sample_loss(model(x), y).mean()
        loss.backward()
        optimizer.step()

    return step


def fit_batch(model, task: Task, batch, amp: bool, max_steps: int) -> float:
    """Train on the batch until every sample is handled correctly (at most ``max_steps``), so that the
    attacks of IMA, which skip samples already wrong, run on the whole batch. Returns the fraction correct."""
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    x, y = batch["image"], batch["label"]
    correct = 0.0
    model.train()
    for _ in range(max_steps):
        optimizer.zero_grad(set_to_none=True)
        with autocast(x.device, amp):
            pred = model(x)
            loss = task.per_sample_loss(pred, y).mean()
        correct = float(task.correct(pred.detach(), y).float().mean())
        if correct == 1.0:
            break
        loss.backward()
        optimizer.step()
    return correct


def attack_step(model, task: Task, batch, amp: bool) -> Callable[[], None]:
    """(b) one attack step: eval-mode forward + gradient w.r.t. the input only (no parameter gradient)."""
    x, y = batch["image"], batch["label"]

    def step():
        model.eval()
        x_adv = x.detach().float().requires_grad_(True)
        with autocast(x.device, amp):
            loss = task.attack_loss(model(x_adv), y).sum()
        torch.autograd.grad(loss, x_adv)
        model.train()

    return step


def make_trainer(engine_cls, device, data, epoch_length: int, model, args, **kwargs):
    """A MONAI trainer set up as ``medrobust train`` sets up RobustTrainer: no decollation, bf16 without a
    loss scaler (``monai.engines.SupervisedTrainer`` keeps its default GradScaler under AMP)."""
    engine = engine_cls(device=device, max_epochs=1, train_data_loader=data, epoch_length=epoch_length,
                        network=model, optimizer=make_optimizer(model), amp=args.amp == "bf16",
                        amp_kwargs={"dtype": torch.bfloat16}, decollate=False, **kwargs)
    if engine_cls is RobustTrainer:
        engine.scaler = None
    return engine


def engine_step_time(engine_cls, model, batch, device, args, **kwargs) -> tuple[float, dict]:
    """(c) median iteration time of a trainer fed the same device-resident batch over and over, and the
    last iteration's output."""
    n = args.warmup + args.iters
    engine = make_trainer(engine_cls, device, [batch] * n, n, model, args, **kwargs)
    clock = Clock(device)
    engine.add_event_handler(Events.ITERATION_STARTED, clock.start)
    engine.add_event_handler(Events.ITERATION_COMPLETED, clock.stop)
    engine.run()
    return clock.median(args.warmup), engine.state.output


def full_step_time(model, method, batch, device, args) -> tuple[float, dict]:
    """The method's step through RobustTrainer; also its batch metrics (IMA: ``found_frac`` crossed)."""
    seconds, output = engine_step_time(RobustTrainer, model, batch, device, args, method=method)
    return seconds, dict(output.get(METRICS) or {})


def monai_step_time(model, task: Task, batch, device, args) -> float:
    return engine_step_time(SupervisedTrainer, model, batch, device, args,
                            loss_function=lambda pred, target: task.per_sample_loss(pred, target).mean())[0]


# ------------------------------------------------------------------------------------------------- workloads
def peak_memory_mib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def bench_workload(name: str, work: Workload, device: torch.device, args) -> list[dict]:
    torch.manual_seed(0)
    amp = args.amp == "bf16"
    model = make_model(work, device, args.channels_last, args.compile)
    task = make_task(work)
    batch = make_batch(work, device, args.channels_last)
    clean = time_loop(clean_step(model, task, batch, amp), device, args.warmup, args.iters)
    attack = time_loop(attack_step(model, task, batch, amp), device, args.warmup, args.iters)
    rows = []
    for method_name in args.methods:
        k = 0 if method_name == "standard" else args.steps
        cfg = MethodConfig(name=method_name, steps=max(k, 1))
        method = build_method(cfg, task, work.batch, clamp=CLAMP)
        if method_name == "ima":  # attack in PGD-AT's ball (IMA would start at delta): same radius, same K
            method.state.eps.fill_(cfg.eps)
            method.state.dist.fill_(cfg.eps)
        fitted = fit_batch(model, task, batch, amp, args.fit_steps)  # the previous method may have unfitted it
        reset_peak_memory(device)
        full, metrics = full_step_time(model, method, batch, device, args)
        floor = clean + k * attack
        row = {"workload": name, "method": method_name, "K": k, "batch": work.batch, "size": list(work.size),
               "clean_s": clean, "attack_s": attack, "full_s": full, "floor_s": floor, "ratio": full / floor,
               "images_per_s": work.batch / full, "clean_images_per_s": work.batch / clean,
               "peak_mem_mib": peak_memory_mib(device), "fit_correct": fitted,
               "method_metrics": metrics}
        if method_name == "standard":
            row["monai_s"] = monai_step_time(model, task, batch, device, args)
            row["vs_monai"] = full / row["monai_s"]
        rows.append(row)
        print(f"{name:14s} {method_name:9s} full {full * 1e3:9.2f} ms  floor {floor * 1e3:9.2f} ms  "
              f"ratio {row['ratio']:.3f}", flush=True)
    by_method = {r["method"]: r for r in rows}
    if "ima" in by_method and "pgd_at" in by_method:
        by_method["ima"]["vs_pgd_at"] = by_method["ima"]["full_s"] / by_method["pgd_at"]["full_s"]
    return rows


# ------------------------------------------------------------------------------------------------- data wait
# config file, and where its data lies under --data
DATASETS = {"dermamnist": ("configs/dermamnist_ima.yaml", "dermamnist/dermamnist.npz"),
            "isic2017": ("configs/isic2017_seg_ima.yaml", "isic2017")}


def data_config(dataset: str, method_name: str, args) -> Config | None:
    """The dataset's config with the data under ``--data``, ``method_name`` at K steps, enough training
    samples for the timed iterations only (``data.limit``); None when the data is absent."""
    path, sub = DATASETS[dataset]
    root = Path(args.data) / sub
    if not root.exists():
        return None
    cfg = load_config(REPO / path)
    cfg.data.root = root
    cfg.method.name, cfg.method.steps = method_name, args.steps
    if args.tiny:
        cfg.train.batch_size = 4
        if cfg.data.image_size:
            cfg.data.image_size = [32, 32]
    cfg.data.limit = cfg.train.batch_size * (args.warmup + args.iters)
    return cfg


class DataWait:
    """Host time spent between GET_BATCH_STARTED and GET_BATCH_COMPLETED, and the wall time of the run,
    both after the warm-up iterations."""

    def __init__(self, device: torch.device, warmup: int):
        self.device, self.warmup = device, warmup
        self.waits: list[float] = []
        self.began = self.ended = self._t = 0.0

    def attach(self, engine) -> None:
        engine.add_event_handler(Events.GET_BATCH_STARTED, self._get_started)
        engine.add_event_handler(Events.GET_BATCH_COMPLETED, self._get_completed)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self._finished)

    def _get_started(self, engine) -> None:
        if len(self.waits) == self.warmup:
            synchronize(self.device)
            self.began = time.perf_counter()
        self._t = time.perf_counter()

    def _get_completed(self, engine) -> None:
        self.waits.append(time.perf_counter() - self._t)

    def _finished(self, engine) -> None:
        synchronize(self.device)
        self.ended = time.perf_counter()

    def share(self) -> tuple[float, float]:
        total = self.ended - self.began
        return sum(self.waits[self.warmup:]), total


def data_wait_rows(args, device: torch.device) -> list[dict]:
    rows = []
    for dataset in DATASETS:
        for method_name in args.data_methods:
            cfg = data_config(dataset, method_name, args)
            if cfg is None:
                rows.append({"dataset": dataset, "method": method_name, "skipped": f"no data under {args.data}"})
                print(f"data wait: {dataset} skipped (no data under {args.data})", flush=True)
                continue
            rows.append(data_wait_run(dataset, cfg, device, args))
    return rows


def data_wait_run(dataset: str, cfg: Config, device: torch.device, args) -> dict:
    """A training run as ``medrobust train`` builds it (data, CacheDataset + ThreadDataLoader, network, method,
    RobustTrainer), without validation, checkpoints or tracking; timed from the ignite GET_BATCH events."""
    torch.manual_seed(0)
    splits = build_data(cfg)
    image_size = image_size_of(splits)
    transform = SampleSeededCompose([splits.load_transforms, splits.train_transforms], seed=cfg.seed)  # as train
    loader = make_loader(cfg, splits.train, transform, train=True, cache_dir=Path(args.out) / "cache")
    work = Workload(cfg.task, cfg.model.name, splits.spatial_dims, splits.in_channels, splits.num_classes,
                    image_size, cfg.train.batch_size)
    model = build_network(cfg.model, task=cfg.task, spatial_dims=splits.spatial_dims,
                          in_channels=splits.in_channels, num_classes=splits.num_classes,
                          image_size=image_size).to(device)
    if args.channels_last:
        model = model.to(memory_format=memory_format(work.spatial_dims))
    if args.compile:
        model = torch.compile(model)
    task = Task.make(cfg.task, splits.num_classes, cfg.method.dice_threshold)
    method = build_method(cfg.method, task, len(splits.train), clamp=cfg.data.intensity_range)
    engine = make_trainer(RobustTrainer, device, loader, args.warmup + args.iters, model, args, method=method)
    probe = DataWait(device, args.warmup)
    probe.attach(engine)
    engine.run()
    wait, total = probe.share()
    print(f"data wait: {dataset} {cfg.method.name}: {100 * wait / total:.2f}% of {total:.2f} s", flush=True)
    return {"dataset": dataset, "method": cfg.method.name, "batch": work.batch, "size": list(work.size),
            "iterations": args.iters, "wait_s": wait, "total_s": total, "share": wait / total}


# ------------------------------------------------------------------------------------------------- report
def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU {platform.processor() or platform.machine()}, {torch.get_num_threads()} torch thread(s)"


def _ms(value: float | None) -> str:
    return "" if value is None else f"{value * 1e3:.2f}"


def _x(value: float | None) -> str:
    return "" if value is None else f"{value:.3f}"


def markdown(result: dict) -> str:
    s = result["settings"]
    lines = [f"# Step cost: {result['device']}", "",
             f"Date {result['date']}, torch {result['torch']}, MONAI {result['monai']}, "
             f"AMP {s['amp']}, channels_last {s['channels_last']}, compile {s['compile']}, K {s['steps']}, "
             f"median of {s['iters']} iterations after {s['warmup']} warm-up{', TINY sizes' if s['tiny'] else ''}.",
             "",
             "| workload | method | K | batch | clean ms | attack ms | full ms | floor ms | full/floor | img/s "
             "| peak MiB | IMA/PGD-AT | ours/MONAI | fit correct |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        mem = "" if r["peak_mem_mib"] is None else f"{r['peak_mem_mib']:.0f}"
        lines.append(f"| {r['workload']} | {r['method']} | {r['K']} | {r['batch']} | {_ms(r['clean_s'])} "
                     f"| {_ms(r['attack_s'])} | {_ms(r['full_s'])} | {_ms(r['floor_s'])} | {_x(r['ratio'])} "
                     f"| {r['images_per_s']:.1f} | {mem} | {_x(r.get('vs_pgd_at'))} | {_x(r.get('vs_monai'))} "
                     f"| {r['fit_correct']:.2f} |")
    if result["data_wait"]:
        lines += ["", "| data | method | batch | size | wait s | total s | data-wait share |", "|---|---|---|---|---|---|---|"]
        for r in result["data_wait"]:
            if "skipped" in r:
                lines.append(f"| {r['dataset']} | skipped: {r['skipped']} | | | | | |")
            else:
                size = "x".join(map(str, r["size"]))
                lines.append(f"| {r['dataset']} | {r['method']} | {r['batch']} | {size} | {r['wait_s']:.3f} "
                             f"| {r['total_s']:.3f} | {100 * r['share']:.2f}% |")
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------------- main
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--amp", choices=("bf16", "none"), default=None, help="default: bf16 on CUDA, none on CPU")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--compile", action="store_true", help="torch.compile the networks")
    p.add_argument("--steps", type=int, default=10, help="K attack steps of every adversarial method")
    p.add_argument("--iters", type=int, default=20, help="timed iterations (the median is reported)")
    p.add_argument("--warmup", type=int, default=5, help="untimed iterations first")
    p.add_argument("--workloads", default=",".join(WORKLOADS), help="comma-separated subset of " + ",".join(WORKLOADS))
    p.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset of " + ",".join(METHODS))
    p.add_argument("--data", default="../shared/data", help="data folder for the data-wait measurement (skipped if absent)")
    p.add_argument("--data-methods", default="standard,ima", help="methods of the data-wait runs ('' for none)")
    p.add_argument("--fit-steps", type=int, default=None,
                   help="clean steps that fit the network to the batch first (default 200, 10 with --tiny)")
    p.add_argument("--tiny", action="store_true", help="tiny sizes: a CPU smoke run in seconds")
    p.add_argument("--out", default="outputs/benchmarks", help="folder for step_cost.json and step_cost.md")
    args = p.parse_args(argv)
    args.workloads = [w for w in args.workloads.split(",") if w]
    args.methods = [m for m in args.methods.split(",") if m]
    args.data_methods = [m for m in args.data_methods.split(",") if m]
    for w in args.workloads:
        if w not in WORKLOADS:
            p.error(f"--workloads: unknown workload '{w}'")
    for m in args.methods + args.data_methods:
        if m not in METHODS:
            p.error(f"--methods: unknown method '{m}'")
    if args.fit_steps is None:
        args.fit_steps = 10 if args.tiny else 200
    if args.amp is None:
        args.amp = "bf16" if args.device.startswith("cuda") else "none"
    if args.iters < 1 or args.warmup < 0 or args.steps < 1:
        p.error("--iters and --steps must be >= 1, --warmup >= 0")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    rows = []
    for name in args.workloads:
        work = WORKLOADS[name].tiny() if args.tiny else WORKLOADS[name]
        rows += bench_workload(name, work, device, args)
    result = {
        "device": device_name(device),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "torch": torch.__version__, "monai": monai.__version__,
        "settings": {"device": args.device, "amp": args.amp, "channels_last": args.channels_last,
                     "compile": args.compile, "steps": args.steps, "iters": args.iters, "warmup": args.warmup,
                     "fit_steps": args.fit_steps, "tiny": args.tiny},
        "rows": rows,
        "data_wait": data_wait_rows(args, device),
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "step_cost.json").write_text(json.dumps(result, indent=2), encoding="utf-8")
    (out / "step_cost.md").write_text(markdown(result), encoding="utf-8")
    print(f"wrote {out / 'step_cost.json'} and {out / 'step_cost.md'}")
    return result


if __name__ == "__main__":
    main()
