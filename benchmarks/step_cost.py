"""Step cost of adversarial training on the current device (SPEC 6; GitHub issues "GPU speed" and 14).

For every workload and method, in one run:

* ``full``:  the method's training step through ``RobustTrainer``'s iteration (ignite engine, MONAI events);
* ``floor``: the passes that step computed and nothing else, each timed alone right after the iteration on
  the same network and rows (``PassLog`` names them from autograd and the network's mode): ``S`` the training
  step (forward, loss, backward, optimizer step), ``T`` a further training pass (forward, backward into the
  same step: TRADES, IMA, DPAAT, MART), ``A`` an attack step (eval forward + input-only gradient), ``N``/``Nt``
  a no-grad forward (eval/train mode: PGD-AT's clean prediction, TRADES' KL reference, IMA's final-iterate
  check and bisection);
* ``ratio``: median over the iterations of full / floor (target: <= 1.05 for every method);
* ``standard`` also runs through a plain ``monai.engines.SupervisedTrainer`` (``vs_monai``, target <= 1.03),
  ``ima`` is compared with ``pgd_at`` at the same K and radius (``vs_pgd_at``), and at each ``--ima-radii``
  IMA with ``boundary_bracket: first_wrong`` (a sample stops costing compute at its first wrong iterate)
  against PGD-AT, with the fraction of the batch found (crossed and bisected);
* data-wait share of the DermaMNIST and ISIC 2017 input pipelines (CacheDataset + ThreadDataLoader), when
  the data folder exists (target < 5%).

Run from the repository root (see benchmarks/README.md):

    python -m benchmarks.step_cost --tiny --device cpu --out outputs/bench    # CPU smoke run, about a minute
    python -m benchmarks.step_cost --device cuda --out outputs/bench          # the real GPU run
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import ctypes
import dataclasses
import datetime
import json
import platform
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

try:
    import resource
except ImportError:  # not on Windows
    resource = None

import monai
import torch
from ignite.engine import Events
from monai.engines import SupervisedTrainer

from pipeline.adversarial.context import BatchStatistics, attack_mode
from pipeline.adversarial.methods import build_method
from pipeline.adversarial.tasks import Task
from pipeline.config import Config, MethodConfig, ModelConfig, load_config, method_config, method_knobs
from pipeline.data import build_data
from pipeline.model.networks import build_network
from pipeline.engine.data import image_size_of, make_loader
from pipeline.engine.seeding import SampleSeededCompose
from pipeline.engine.trainer import RobustTrainer
from pipeline.names import Keys as Ours

REPO = Path(__file__).resolve().parents[1]
METHODS = ("standard", "pgd_at", "trades", "ima", "dpaat", "mart")
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
    """Durations of repeated steps: CUDA events on GPU (no host sync inside the loop); on CPU ``cpu_clock``:
    wall time (``time.perf_counter``, the default) or, ``--clock cpu``, the process's CPU time
    (``time.process_time``: on a machine shared with other jobs, the time this process computed, not the
    time it waited for a core; meant for one torch thread). Also counts the process's minor page faults of each
    step (``faults``: what the allocator cost, see :func:`keep_freed_memory`)."""

    cpu_clock: Callable[[], float] = time.perf_counter

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.spans: list = []
        self.faults: list[int] = []
        self._begin: Any = None
        self._faults = 0

    def _now(self):
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return Clock.cpu_clock()

    def start(self, *_: Any) -> None:
        self._faults = minor_faults()
        self._begin = self._now()

    def stop(self, *_: Any) -> None:
        self.spans.append((self._begin, self._now()))
        self.faults.append(minor_faults() - self._faults)

    def times(self) -> list[float]:
        """Every duration in seconds (CUDA: waits for the device)."""
        if self.cuda:
            torch.cuda.synchronize()
            return [begin.elapsed_time(end) / 1000.0 for begin, end in self.spans]
        return [end - begin for begin, end in self.spans]

    def median(self, skip: int) -> float:
        """Median duration in seconds, leaving out the first ``skip`` (warm-up) steps."""
        return statistics.median(self.times()[skip:])


def minor_faults() -> int:
    """The process's minor page faults so far (0 where ``resource`` is missing)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt if resource is not None else 0


# glibc's mallopt parameters
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3


def keep_freed_memory() -> bool:
    """Make glibc's malloc keep freed memory in the process, as a caching allocator (CUDA's, jemalloc) does:
    no block below 32 MiB from its own mmap, no trimming of the heap. Returns False where that is not possible
    (not glibc).

    By default glibc gives large freed blocks back to the system and the next allocation of the same size
    page-faults its memory in again, zeroed: a UNet step at 128 x 128, batch 4 took about 36,000 minor page
    faults on this CPU, 7-13% of its time, in amounts that changed from step to step and from pass to pass
    (benchmarks/README.md). On a GPU the caching allocator keeps its blocks, so there are none. Blocks of 32 MiB
    or more (glibc's largest threshold) are still mapped and faulted in at every allocation."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        settings = ((_M_MMAP_THRESHOLD, 32 * 2**20), (_M_TRIM_THRESHOLD, 2**31 - 1), (_M_TOP_PAD, 256 * 2**20))
        return all(libc.mallopt(key, value) == 1 for key, value in settings)
    except (OSError, AttributeError):
        return False


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


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


# ------------------------------------------------------------------------------------------------- passes
class PassLog:
    """Every forward of the network during a method's step, per iteration, as ``(kind, rows)``: a forward
    pre-hook on the network (one Python call per forward), recording from ITERATION_STARTED until ``stop``.
    The kind follows from autograd and the network's mode at the call (``PASSES``). ``inputs``: the input of
    the iteration's last pass of each ``(kind, rows)`` (a reference, not a copy), on which the floor times it."""

    def __init__(self, model: torch.nn.Module):
        self.iterations: list[list[tuple[str, int]]] = []
        self.inputs: dict[tuple[str, int], torch.Tensor] = {}
        self.recording = False
        self._handle = model.register_forward_pre_hook(self._record)

    def new_iteration(self, *_: Any) -> None:
        self.iterations.append([])
        self.inputs = {}
        self.recording = True

    def stop(self) -> None:
        self.recording = False

    def _record(self, module: torch.nn.Module, args: tuple) -> None:
        if not self.recording:
            return
        passes = self.iterations[-1]
        if not torch.is_grad_enabled():
            kind = "Nt" if module.training else "N"
        elif not module.training:
            kind = "A"
        else:
            kind = "T" if any(k == "S" for k, _ in passes) else "S"
        key = (kind, int(args[0].shape[0]))
        passes.append(key)
        self.inputs[key] = args[0].detach()

    def close(self) -> None:
        self._handle.remove()


PASSES = {
    "S": "training step: forward, loss, backward, optimizer step (the iteration's first training forward)",
    "T": "further training pass: forward, loss, backward accumulated into the same step's gradients",
    "A": "attack step: eval-mode forward + gradient of the attack loss w.r.t. the input only",
    "N": "no-grad forward, eval mode",
    "Nt": "no-grad forward, train mode",
}


def pass_step(kind: str, x: torch.Tensor, y: torch.Tensor, model, task: Task, amp: bool,
              optimizer) -> Callable[[], None]:
    """One pass of ``kind`` on input x (the input this pass had in the method's step) with labels y, alone;
    ``A`` and ``N`` run inside :func:`pass_mode`, which sets the network as the method's attack sees it."""

    def train_loss():
        model.train()
        with autocast(x.device, amp):
            return task.per_sample_loss(model(x), y).mean()

    def step():
        optimizer.zero_grad(set_to_none=True)
        train_loss().backward()
        optimizer.step()

    def attack():
        x_adv = x.detach().float().requires_grad_(True)
        with autocast(x.device, amp):
            loss = task.attack_loss(model(x_adv.to(x.dtype)), y).sum()
        torch.autograd.grad(loss, x_adv)

    def no_grad():
        if kind == "Nt":
            model.train()
        with torch.no_grad(), autocast(x.device, amp):
            model(x)

    return {"S": step, "T": lambda: train_loss().backward(), "A": attack, "N": no_grad, "Nt": no_grad}[kind]


@contextlib.contextmanager
def pass_mode(kind: str, model, batch, amp: bool, bn: str):
    """The network as the method runs a pass of ``kind``: ``A`` and ``N`` inside the attack's network
    (:func:`~pipeline.adversarial.context.attack_mode`, eval mode) with the method's BatchNorm rule ``bn``
    (``method.attack_bn``): running statistics, or with ``"batch"`` (IMA's default) the statistics of the clean
    batch, recorded by a train-mode forward before the clock starts, as the method's clean forward records them.
    The other kinds set their own (train) mode.

    The rule can change what a pass costs, not only what it computes: normalised with the batch's own statistics
    the activations are centred, so about half of each PReLU's inputs are negative, and on CPU PReLU's forward
    and backward run 4-5x slower on mixed signs than on inputs of one sign (branch misprediction, (4, 16, 128,
    128))."""
    if kind not in ("A", "N"):
        yield
        return
    stats = None
    modes = [(m, m.training) for m in model.modules()]
    try:
        if bn == "batch":
            model.train()
            with torch.no_grad(), autocast(batch["image"].device, amp), BatchStatistics(model) as stats:
                model(batch["image"])
        with attack_mode(model, bn, stats):
            yield
    finally:                  # the modes the network had before the recording forward
        for m, training in modes:
            m.training = training


class Floor:
    """After every iteration of a method (outside its clock, in the same run), each pass it computed, timed
    alone per distinct ``(kind, rows)`` on the input of its last occurrence in the step (on CPU run twice, the
    warm second run timed); an iteration's floor is
    the sum over its passes (:meth:`floors`). Attack steps and no-grad eval forwards run with the method's
    BatchNorm rule ``bn`` (:func:`pass_mode`). The passes leave the network as it was (their optimizer has lr 0;
    BatchNorm buffers are restored)."""

    def __init__(self, log: PassLog, model, task: Task, batch, device: torch.device, amp: bool,
                 bn: str = "running"):
        self.log, self.model, self.device = log, model, device
        self.mode = lambda kind: pass_mode(kind, model, batch, amp, bn)   # the method's attack_bn
        # CPU: run twice, time the second (warm caches, as for a pass inside a step: K attack steps in a row)
        self.runs = 1 if device.type == "cuda" else 2
        optimizer = torch.optim.Adam(model.parameters(), lr=0.0)   # a real Adam step that moves nothing
        # on the input the pass had in the step (on CPU a pass's cost depends on its values, see pass_mode);
        # labels of the batch's first rows
        self.make = lambda kind, rows: pass_step(kind, log.inputs.get((kind, rows), batch["image"][:rows]),
                                                 batch["label"][:rows], model, task, amp, optimizer)
        self.iterations: list[list[tuple[tuple[str, int], int, Clock]]] = []

    def __call__(self, *_: Any) -> None:
        self.log.stop()
        counts = collections.Counter(self.log.iterations[-1])
        buffers = [b.clone() for b in self.model.buffers()]
        timed = []
        for key in sorted(counts):
            step = self.make(*key)
            for _ in range(self.runs):
                clock = Clock(self.device)
                with self.mode(key[0]):
                    clock.start()
                    step()
                    clock.stop()
            timed.append((key, counts[key], clock))
        with torch.no_grad():
            for b, saved in zip(self.model.buffers(), buffers):
                b.copy_(saved)
        self.iterations.append(timed)

    def floors(self, skip: int) -> list[float]:
        """Each iteration's floor: its passes, each at its median time alone over the iterations (a pass
        timed once would carry its noise K times into the floor of K attack steps)."""
        times = self.pass_times(skip)
        return [sum(n * times[f"{kind}{rows}"] for (kind, rows), n, _ in timed) for timed in self.iterations[skip:]]

    def pass_times(self, skip: int) -> dict[str, float]:
        """Median time of each pass ``(kind, rows)`` over the iterations, keyed ``"A8"``, ``"N3"``, ..."""
        times = collections.defaultdict(list)
        for timed in self.iterations[skip:]:
            for (kind, rows), _, clock in timed:
                times[f"{kind}{rows}"].append(clock.median(0))
        return {key: statistics.median(values) for key, values in sorted(times.items())}


class Checks:
    """Times every ``task.correct`` call during a method's steps: the "handled correctly" checks of IMA's attack
    iterates and bisection. They are not passes (no network forward), so not part of the floor; shown beside it."""

    def __init__(self, task: Task, device: torch.device):
        self.task, self.device = task, device
        self.iterations: list[list[Clock]] = []
        self._correct = task.correct
        task.correct = self._timed   # on the instance, for this run only (``close``)

    def new_iteration(self, *_: Any) -> None:
        self.iterations.append([])

    def _timed(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        clock = Clock(self.device)
        clock.start()
        out = self._correct(*args, **kwargs)
        clock.stop()
        if self.iterations:
            self.iterations[-1].append(clock)
        return out

    def close(self) -> None:
        del self.task.correct

    def times(self, skip: int) -> list[float]:
        """Each iteration's total time in checks."""
        return [sum(clock.median(0) for clock in clocks) for clocks in self.iterations[skip:]]


def recipe(passes: list[tuple[str, int]], batch: int) -> str:
    """A compact list of passes: a run of one kind on the same rows as ``10A``, the rows in brackets when they
    are not the whole batch (``10N[3]``)."""
    groups: list[list] = []
    for kind, rows in passes:
        if groups and groups[-1][:2] == [kind, rows]:
            groups[-1][2] += 1
        else:
            groups.append([kind, rows, 1])
    return " ".join(f"{n if n > 1 else ''}{kind}{'' if rows == batch else f'[{rows}]'}" for kind, rows, n in groups)


# ------------------------------------------------------------------------------------------------- steps
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


def make_trainer(engine_cls, device, data, epoch_length: int, model, args, **kwargs):
    """A MONAI trainer set up as ``medrobust train`` sets up RobustTrainer: no decollation, bf16 without a
    loss scaler (``monai.engines.SupervisedTrainer`` keeps its default GradScaler under AMP)."""
    engine = engine_cls(device=device, max_epochs=1, train_data_loader=data, epoch_length=epoch_length,
                        network=model, optimizer=make_optimizer(model), amp=args.amp == "bf16",
                        amp_kwargs={"dtype": torch.bfloat16}, decollate=False, **kwargs)
    if engine_cls is RobustTrainer:
        engine.scaler = None
    return engine


def engine_run(engine_cls, model, batch, device, args, after: tuple = (), **kwargs) -> tuple[Clock, list]:
    """Run a trainer fed the same device-resident batch over and over: its iteration clock, and each
    iteration's output ``METRICS`` (RobustTrainer's method). ``after``: handlers of ITERATION_STARTED and
    ITERATION_COMPLETED outside the clock, ``(started, completed or None)``."""
    n = args.warmup + args.iters
    engine = make_trainer(engine_cls, device, [batch] * n, n, model, args, **kwargs)
    clock, metrics = Clock(device), []
    for started, _ in after:
        engine.add_event_handler(Events.ITERATION_STARTED, started)
    engine.add_event_handler(Events.ITERATION_STARTED, clock.start)
    engine.add_event_handler(Events.ITERATION_COMPLETED, clock.stop)
    engine.add_event_handler(Events.ITERATION_COMPLETED,
                             lambda e: metrics.append(dict(e.state.output.get(Ours.METRICS) or {})))
    for _, completed in after:
        if completed is not None:
            engine.add_event_handler(Events.ITERATION_COMPLETED, completed)
    engine.run()
    return clock, metrics


def monai_step_time(model, task: Task, batch, device, args) -> float:
    clock, _ = engine_run(SupervisedTrainer, model, batch, device, args,
                          loss_function=lambda pred, target: task.per_sample_loss(pred, target).mean())
    return clock.median(args.warmup)


# ------------------------------------------------------------------------------------------------- workloads
def peak_memory_mib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


@dataclass
class Bench:
    """One workload's network, fitted once to its batch; every method starts from that same fitted state."""

    name: str
    work: Workload
    model: torch.nn.Module
    task: Task
    batch: dict
    device: torch.device
    args: Any
    fitted: float
    start: dict

    @classmethod
    def make(cls, name: str, work: Workload, device: torch.device, args) -> Bench:
        torch.manual_seed(0)
        model = make_model(work, device, args.channels_last, args.compile)
        task, batch = make_task(work), make_batch(work, device, args.channels_last)
        fitted = fit_batch(model, task, batch, args.amp == "bf16", args.fit_steps)
        start = {k: v.detach().clone() for k, v in model.state_dict().items()}
        return cls(name, work, model, task, batch, device, args, fitted, start)

    def run(self, cfg: MethodConfig, radius: float | None = None) -> dict:
        """The method's step through RobustTrainer against its floor: after each iteration, the passes it
        computed, each timed alone (same network, same rows). ``ratio``: median of the per-iteration
        full/floor (robust to the load of a shared machine drifting during the run). ``radius``: IMA's radius
        for every sample (None: PGD-AT's default ``eps``)."""
        args, work = self.args, self.work
        self.model.load_state_dict(self.start)
        torch.manual_seed(0)
        method = build_method(cfg, self.task, work.batch, clamp=CLAMP)
        eps = getattr(cfg, "eps", None)   # the fixed or starting radius of methods that have one
        if cfg.name == "ima":  # attack in PGD-AT's ball (IMA would start at delta): same radius, same K
            eps = method_config(name="pgd_at").eps if radius is None else radius
            method.state.eps.fill_(eps)
            method.state.dist.fill_(eps)
        reset_peak_memory(self.device)
        log, checks = PassLog(self.model), Checks(self.task, self.device)
        floor = Floor(log, self.model, self.task, self.batch, self.device, args.amp == "bf16",
                      getattr(cfg, "attack_bn", "running"))
        try:
            clock, metrics = engine_run(RobustTrainer, self.model, self.batch, self.device, args,
                                        after=[(log.new_iteration, floor), (checks.new_iteration, None)],
                                        method=method)
        finally:
            log.close()
            checks.close()
        fulls, floors = clock.times()[args.warmup:], floor.floors(args.warmup)
        check_s = checks.times(args.warmup)
        timed = log.iterations[args.warmup:]
        pass_s = floor.pass_times(args.warmup)
        found = [m["found_frac"] for m in metrics[args.warmup:] if "found_frac" in m]
        full_s = statistics.median(fulls)
        row = {"workload": self.name, "method": cfg.name, "K": 0 if cfg.name == "standard" else cfg.steps,
               "eps": eps, "batch": work.batch, "size": list(work.size),
               "bracket": cfg.boundary_bracket if cfg.name == "ima" else None,
               "clean_s": pass_s.get(f"S{work.batch}"), "attack_s": pass_s.get(f"A{work.batch}"),
               "full_s": full_s, "floor_s": statistics.median(floors),
               "ratio": statistics.median(f / g for f, g in zip(fulls, floors)),
               "check_s": statistics.median(check_s), "checks": len(checks.iterations[-1]),
               "faults": statistics.median(clock.faults[args.warmup:]),
               "ratio_without_checks": statistics.median((f - c) / g for f, c, g in zip(fulls, check_s, floors)),
               "passes": recipe(timed[-1], work.batch), "pass_log": timed, "pass_s": pass_s,
               "full_iter_s": fulls, "floor_iter_s": floors, "check_iter_s": check_s,
               "images_per_s": work.batch / full_s, "peak_mem_mib": peak_memory_mib(self.device),
               "fit_correct": self.fitted, "found_frac": statistics.median(found) if found else None,
               "method_metrics": metrics[-1]}
        print(f"{self.name:14s} {cfg.name:8s} eps {row['eps'] or 0:<5g} {row['passes']:30s} "
              f"full {full_s * 1e3:9.2f} ms  floor {row['floor_s'] * 1e3:9.2f} ms  ratio {row['ratio']:.3f}",
              flush=True)
        return row


    def median_run(self, cfg: MethodConfig, radius: float | None = None) -> dict:
        return median_row([self.run(cfg, radius) for _ in range(self.args.repeats)])


def median_row(runs: list[dict]) -> dict:
    """Of several runs of one method (``--repeats``), the one with the median full/floor, with every run's
    ratio and full step time."""
    row = sorted(runs, key=lambda r: r["ratio"])[len(runs) // 2]
    return dict(row, ratio_runs=[r["ratio"] for r in runs], full_runs_s=[r["full_s"] for r in runs])


def bench_workload(name: str, work: Workload, device: torch.device, args, emit: Callable[[str, dict], None]) -> None:
    """Every method at the default radius (``emit("rows", row)``), then IMA with ``first_wrong`` against
    PGD-AT at each of ``--ima-radii`` (``emit("ima_sweep", entry)``)."""
    bench = Bench.make(name, work, device, args)
    by_method = {}
    for method_name in args.methods:
        row = bench.median_run(method_config(**method_knobs(method_name, steps=args.steps)))
        if method_name == "standard":
            row["monai_s"] = monai_step_time(bench.model, bench.task, bench.batch, device, args)
            row["vs_monai"] = row["full_s"] / row["monai_s"]
        if method_name == "ima" and "pgd_at" in by_method:
            row["vs_pgd_at"] = statistics.median(
                i / p for i, p in zip(row["full_runs_s"], by_method["pgd_at"]["full_runs_s"]))
        by_method[method_name] = row
        emit("rows", row)
    for radius in args.ima_radii:   # PGD-AT and IMA in turns, so that a drift of the machine hits both alike
        pairs = [(bench.run(method_config(name="pgd_at", steps=args.steps, eps=radius)),
                  bench.run(method_config(name="ima", steps=args.steps, boundary_bracket="first_wrong"), radius))
                 for _ in range(args.repeats)]
        pgd_at, ima = median_row([p for p, _ in pairs]), median_row([i for _, i in pairs])
        emit("ima_sweep", {"workload": name, "eps": radius, "K": args.steps, "found_frac": ima["found_frac"],
                           "vs_pgd_at": statistics.median(i["full_s"] / p["full_s"] for p, i in pairs),
                           "pgd_at": pgd_at, "ima": ima})


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
    kept = cfg.method.model_dump(exclude_unset=True)   # the YAML's knobs, those that this method has
    cfg.method = method_config(**method_knobs(method_name, **{**kept, "steps": args.steps}))
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
    task = cfg.build_task(splits.num_classes)
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


def _frac(value: float | None) -> str:
    return "" if value is None else f"{value:.2f}"


def markdown(result: dict) -> str:
    s = result["settings"]
    lines = [f"# Step cost: {result['device']}", "",
             f"Date {result['date']}, torch {result['torch']}, MONAI {result['monai']}, "
             f"AMP {s['amp']}, channels_last {s['channels_last']}, compile {s['compile']}, K {s['steps']}, "
             f"median of {s['iters']} iterations after {s['warmup']} warm-up{', TINY sizes' if s['tiny'] else ''}"
             f", batch {s['batch'] or 'of the workload'}"
             f"{f', size {sz} along each axis' if (sz := s.get('size')) else ''}, clock {s['clock']}"
             f"{', freed memory kept (mallopt)' if s.get('cpu_allocator') == 'keep' else ''}"
             f"{f', the median of {rep} runs' if (rep := s['repeats']) > 1 else ''}.",
             "",
             "Passes: " + "; ".join(f"{k} {v}" for k, v in PASSES.items())
             + ". Floor: the sum of the passes the method computed in an iteration, each at its median time alone; "
             "full/floor: median over the iterations; checks: the `task.correct` calls inside the step.",
             "",
             "| workload | method | K | batch | passes | S ms | A ms | floor ms | full ms | full/floor | checks ms "
             "| (full-checks)/floor | img/s | peak MiB | page faults | found | IMA/PGD-AT | ours/MONAI | fit correct |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        mem = "" if r["peak_mem_mib"] is None else f"{r['peak_mem_mib']:.0f}"
        lines.append(f"| {r['workload']} | {r['method']} | {r['K']} | {r['batch']} | {r['passes']} "
                     f"| {_ms(r['clean_s'])} | {_ms(r['attack_s'])} | {_ms(r['floor_s'])} | {_ms(r['full_s'])} "
                     f"| {_x(r['ratio'])} | {_ms(r['check_s'])} ({r['checks']}) | {_x(r['ratio_without_checks'])} "
                     f"| {r['images_per_s']:.1f} | {mem} | {r.get('faults', 0):.0f} | {_frac(r['found_frac'])} "
                     f"| {_x(r.get('vs_pgd_at'))} | {_x(r.get('vs_monai'))} | {r['fit_correct']:.2f} |")
    if result["ima_sweep"]:
        lines += ["", "IMA with `boundary_bracket: first_wrong` against PGD-AT, same K and radius (L2 eps), "
                  "the same fitted network; found = fraction of the batch crossed and bisected (median).", "",
                  "| workload | eps | K | found | PGD-AT passes | PGD-AT ms | PGD-AT full/floor | IMA passes "
                  "| IMA ms | IMA full/floor | IMA checks ms | IMA/PGD-AT |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for e in result["ima_sweep"]:
            pgd_at, ima = e["pgd_at"], e["ima"]
            lines.append(f"| {e['workload']} | {e['eps']:g} | {e['K']} | {_frac(e['found_frac'])} "
                         f"| {pgd_at['passes']} | {_ms(pgd_at['full_s'])} | {_x(pgd_at['ratio'])} | {ima['passes']} "
                         f"| {_ms(ima['full_s'])} | {_x(ima['ratio'])} | {_ms(ima['check_s'])} ({ima['checks']}) "
                         f"| {_x(e['vs_pgd_at'])} |")
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


def write(result: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "step_cost.json").write_text(json.dumps(result, indent=2), encoding="utf-8")
    (out / "step_cost.md").write_text(markdown(result), encoding="utf-8")


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
    p.add_argument("--repeats", type=int, default=1,
                   help="runs of every method (each with its warm-up); the run with the median full/floor is reported")
    p.add_argument("--workloads", default=",".join(WORKLOADS), help="comma-separated subset of " + ",".join(WORKLOADS))
    p.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset of " + ",".join(METHODS))
    p.add_argument("--data", default="../shared/data", help="data folder for the data-wait measurement (skipped if absent)")
    p.add_argument("--data-methods", default="standard,ima", help="methods of the data-wait runs ('' for none)")
    p.add_argument("--fit-steps", type=int, default=None,
                   help="clean steps that fit the network to the batch first (default 200, 10 with --tiny)")
    p.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                   help="CPU device: wall time, or the process's CPU time (a machine shared with other jobs)")
    p.add_argument("--cpu-allocator", choices=("keep", "system"), default="keep",
                   help="CPU device: 'keep' (default) makes glibc keep freed blocks under 32 MiB, as a caching "
                        "allocator does, so that steps are not timed with their page faults; 'system': glibc's "
                        "defaults")
    p.add_argument("--tiny", action="store_true", help="tiny sizes (32x32 / 16^3, batch 2): a CPU run in seconds")
    p.add_argument("--batch", type=int, default=None, help="batch size of every workload (default: the workload's)")
    p.add_argument("--size", type=int, default=None,
                   help="spatial size of every workload along each axis, e.g. 128 (default: the workload's)")
    p.add_argument("--ima-radii", default=None,
                   help="L2 radii at which IMA with first_wrong is compared with PGD-AT ('' for none; default "
                        "1,4,16, none with --compile, whose graphs recompile for every new row count)")
    p.add_argument("--out", default="outputs/benchmarks", help="folder for step_cost.json and step_cost.md")
    args = p.parse_args(argv)
    args.workloads = [w for w in args.workloads.split(",") if w]
    args.methods = [m for m in args.methods.split(",") if m]
    args.data_methods = [m for m in args.data_methods.split(",") if m]
    if args.ima_radii is None:
        args.ima_radii = "" if args.compile else "1,4,16"
    try:
        args.ima_radii = [float(r) for r in args.ima_radii.split(",") if r]
    except ValueError:
        p.error(f"--ima-radii: not a list of numbers: '{args.ima_radii}'")
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
    if min(args.iters, args.steps, args.repeats) < 1 or args.warmup < 0 or (args.batch is not None and args.batch < 2):
        p.error("--iters, --steps and --repeats must be >= 1, --warmup >= 0, --batch >= 2")
    if args.size is not None and args.size < 16:
        p.error("--size must be >= 16 (the UNets halve it three times)")
    if any(r <= 0 for r in args.ima_radii):
        p.error("--ima-radii: every radius must be > 0")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    Clock.cpu_clock = time.process_time if args.clock == "cpu" else time.perf_counter
    allocator = "keep" if device.type == "cpu" and args.cpu_allocator == "keep" and keep_freed_memory() else "system"
    out = Path(args.out)
    result = {
        "device": device_name(device),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "torch": torch.__version__, "monai": monai.__version__,
        "settings": {"device": args.device, "amp": args.amp, "channels_last": args.channels_last,
                     "compile": args.compile, "steps": args.steps, "iters": args.iters, "warmup": args.warmup,
                     "fit_steps": args.fit_steps, "tiny": args.tiny, "batch": args.batch, "size": args.size,
                     "clock": args.clock, "cpu_allocator": allocator,
                     "repeats": args.repeats,
                     "ima_radii": args.ima_radii},
        "rows": [], "ima_sweep": [], "data_wait": [],
    }

    def emit(section: str, entry: dict) -> None:  # written as it comes: a run cut short keeps what it measured
        result[section].append(entry)
        write(result, out)

    for name in args.workloads:
        work = WORKLOADS[name].tiny() if args.tiny else WORKLOADS[name]
        if args.batch:
            work = dataclasses.replace(work, batch=args.batch)
        if args.size:
            work = dataclasses.replace(work, size=(args.size,) * work.spatial_dims)
        bench_workload(name, work, device, args, emit)
    result["data_wait"] = data_wait_rows(args, device)
    write(result, out)
    print(f"wrote {out / 'step_cost.json'} and {out / 'step_cost.md'}")
    return result


if __name__ == "__main__":
    main()
