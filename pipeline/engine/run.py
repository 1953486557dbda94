"""``medrobust train``: the assembly of a run. Data, then network and method, then the engines (trainer and
validator), then their handlers, then the run; every piece lives in a module of its own:

* the data (checked splits, loaders, the data description): :mod:`pipeline.engine.data`;
* the training step and the validator: :mod:`pipeline.engine.trainer`, :mod:`pipeline.engine.validation`;
* checkpoints, save and restore in one handler: :mod:`pipeline.engine.checkpointing`;
* metrics and handlers (batch averages, learning rate, guard, progress): :mod:`pipeline.engine.handlers`;
* the MLflow run, opened and ended: :mod:`pipeline.engine.recording`; per epoch: :mod:`pipeline.tracking.handler`.

Everything that can be wrong with the input (config, data, tracking server) is reported before the first
training step. Under ``torchrun`` the same code runs one process per GPU (DDP); rank 0 alone logs and saves.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from monai.handlers import LrScheduleHandler, ValidationHandler
from monai.utils import set_determinism

from pipeline.adversarial.methods import build_method
from pipeline.config import Config
from pipeline.device import resolve_device
from pipeline.engine import distributed as dist
from pipeline.engine.checkpointing import Checkpoints
from pipeline.engine.data import RunData
from pipeline.engine.handlers import BatchAverages, FiniteLossGuard, LearningRate, MethodEpochUpdate, Progress
from pipeline.engine.optim import build_optimizer, build_scheduler
from pipeline.engine.recording import ended_as, finish_run, start_run
from pipeline.engine.robust_validation import AdversarialValidation
from pipeline.engine.trainer import RobustTrainer
from pipeline.engine.validation import build_validator, sliding_window_inferer
from pipeline.model.networks import build_network
from pipeline.tracking.handler import MlflowTracking
from pipeline.tracking.session import TrackingSession


@dataclass
class TrainResult:
    run_id: str | None
    output_dir: Path
    checkpoint: Path
    metrics: dict[str, float] = field(default_factory=dict)
    tracking_uri: str = ""
    state: dict[str, Any] | None = None


def default_output_dir(cfg: Config, run_name: str) -> Path:
    return cfg.train.output_dir or Path("outputs") / cfg.experiment / run_name


def train(cfg: Config, resume: str | None = None) -> TrainResult:
    """Train ``cfg`` (optionally continuing the checkpoint ``resume``) and return where the results are."""
    ckpt = Checkpoints.load(resume) if resume else None
    dist.init_from_env(cuda=resolve_device(cfg.train.device).type == "cuda")
    if cfg.train.deterministic:
        set_determinism(seed=cfg.seed)
    else:
        torch.manual_seed(cfg.seed)
    device = dist.local_device(resolve_device(cfg.train.device))
    run_name = dist.from_rank0(cfg.tracking.run_name or f"{cfg.method.name}-{time.strftime('%Y%m%d-%H%M%S')}")
    output_dir = Path(resume).resolve().parent.parent if ckpt is not None else default_output_dir(cfg, run_name)
    session = TrackingSession(cfg.tracking.uri, cfg.tracking.experiment or cfg.experiment, output_dir,
                              offline_ok=cfg.tracking.offline_ok) if dist.is_main() else None

    # data
    data = RunData.build(cfg, cache_dir=cfg.data.cache_dir or output_dir / "cache")
    splits = data.splits

    # network and method
    network = build_network(cfg.model, task=cfg.task, spatial_dims=splits.spatial_dims,
                            in_channels=splits.in_channels, num_classes=splits.num_classes,
                            image_size=data.image_size).to(device)
    if cfg.train.channels_last:
        network = network.to(memory_format=torch.channels_last if splits.spatial_dims == 2
                             else torch.channels_last_3d)
    task = cfg.build_task(splits.num_classes)
    method = build_method(cfg.method, task, len(splits.train), clamp=cfg.data.intensity_range)
    optimizer = build_optimizer(cfg, network.parameters())
    scheduler = build_scheduler(cfg, optimizer)

    # engines: compiled inside DDP, not around it: the attacks run on the module inside DDP (no gradient sync),
    # which then is the compiled one; checkpoints and validation use the plain ``network`` (same parameters)
    train_net = dist.wrap(torch.compile(network) if cfg.train.compile else network, device)
    amp_kwargs = {"dtype": getattr(torch, cfg.train.amp_dtype)}
    trainer = RobustTrainer(device=device, max_epochs=cfg.train.epochs, train_data_loader=data.train_loader,
                            network=train_net, optimizer=optimizer, method=method, amp=cfg.train.amp,
                            amp_kwargs=amp_kwargs, decollate=False)  # a GradScaler for float16 AMP only
    validator = build_validator(task=cfg.task, num_classes=splits.num_classes, network=network,
                                loader=data.val_loader, device=device, amp=cfg.train.amp, amp_kwargs=amp_kwargs,
                                inferer=sliding_window_inferer(cfg.data.patch_size, splits.spatial_dims))
    adversarial_validation = None
    if cfg.task == "segmentation" and cfg.evaluate.epoch_steps:
        adversarial_validation = AdversarialValidation.from_config(
            task, cfg, overlay_cases=cfg.evaluate.overlay_cases if dist.is_main() else 0)
        adversarial_validation.attach(validator)

    # handlers, in the order they run at an epoch end: the epoch's metrics, the method's update, the learning
    # rate and the scheduler's step, validation, then the checkpoint of it all; MLflow and progress on rank 0
    run_id = start_run(session, cfg, run_name, output_dir, data, resume=ckpt)
    averages = BatchAverages()
    data.train_transform.attach(trainer)   # a sample's augmentation depends on (seed, epoch, index) only
    averages.attach(trainer)
    MethodEpochUpdate(method).attach(trainer)
    LearningRate(optimizer).attach(trainer)
    if scheduler is not None:
        LrScheduleHandler(scheduler, print_lr=False).attach(trainer)
    FiniteLossGuard(cfg.method.name).attach(trainer)
    ValidationHandler(validator=validator, interval=cfg.train.val_every, epoch_level=True).attach(trainer)
    checkpoints = Checkpoints(
        output_dir / "checkpoints",
        {"network": network, "optimizer": optimizer, "scheduler": scheduler, "scaler": trainer.scaler,
         "method_state": method.state, "batch_averages": averages},
        {"config": cfg.resolved(), "data": data.info, "mlflow_run_id": run_id},
        every_iters=cfg.train.checkpoint_every_iters, validator=validator, resume=ckpt)
    checkpoints.attach(trainer)   # every rank: a checkpoint's batch averages and per-sample state are collective
    if session is not None:
        MlflowTracking(session, output_dir, method.state, validator, overlays=adversarial_validation,
                       iteration_every=max(1, len(data.train_loader) // 10)).attach(trainer)
        if cfg.train.progress:
            Progress(validator).attach(trainer)

    with ended_as(session, checkpoints):
        trainer.run()
    metrics = {k: float(v) for engine in (trainer, validator) for k, v in engine.state.metrics.items()
               if isinstance(v, (int, float))}
    result = TrainResult(run_id, output_dir, checkpoints.last, metrics=metrics,
                         state=method.state.state_dict() if method.state is not None else None,
                         tracking_uri=session.uri if session is not None else "")
    finish_run(session, run_id, cfg, checkpoints, network, data, output_dir)
    dist.barrier()
    return result
