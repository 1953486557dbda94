"""``medrobust train``: data -> validated datasets -> network + method -> RobustTrainer with handlers -> MLflow.

Everything that can be wrong with the input (config, data, tracking server) is reported before the first
training step. Under ``torchrun`` the same code runs one process per GPU (DDP); rank 0 alone logs and saves.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from ignite.engine import Events
from monai.data import DataLoader, ThreadDataLoader
from monai.handlers import ValidationHandler
from monai.transforms import Compose
from monai.utils import set_determinism
from torch.utils.data.distributed import DistributedSampler

from pipeline.adversarial.methods import build_method
from pipeline.adversarial.tasks import Task
from pipeline.config import Config
from pipeline.data import build_data, make_dataset
from pipeline.data.base import DataSplits
from pipeline.data.scan import validate
from pipeline.engine import distributed as dist
from pipeline.model.checkpoint import load_checkpoint, rng_state, set_rng_state
from pipeline.engine.handlers import BatchAverages, CheckpointEveryEpoch, FiniteLossGuard, MethodEpochUpdate
from pipeline.model.networks import build_network
from pipeline.engine.robust_validation import AdversarialValidation
from pipeline.engine.sampler import ResumableSampler
from pipeline.engine.seeding import SampleSeededCompose
from pipeline.engine.trainer import RobustTrainer
from pipeline.engine.validation import build_validator, sliding_window_inferer
from pipeline.errors import InputError, NumericalFault
from pipeline.model.preprocessing import geometry_of
from pipeline.tracking.handler import MlflowTracking
from pipeline.tracking.session import TrackingSession

log = logging.getLogger(__name__)


@dataclass
class TrainResult:
    run_id: str | None
    output_dir: Path
    checkpoint: Path
    metrics: dict[str, float] = field(default_factory=dict)
    tracking_uri: str = ""
    state: dict[str, Any] | None = None


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"train.device: '{name}' asked for, but CUDA is not available on this machine")
    return device


def default_output_dir(cfg: Config, run_name: str) -> Path:
    return cfg.train.output_dir or Path("outputs") / cfg.experiment / run_name


def image_size_of(splits: DataSplits) -> tuple[int, ...] | None:
    if not splits.train:
        return None
    sample = splits.load_transforms(dict(splits.train[0]))
    return tuple(int(s) for s in sample["image"].shape[1:])


def make_loader(cfg: Config, items: list[dict], transform: Compose, *, train: bool, cache_dir: Path):
    dataset = make_dataset(items, transform, cfg, cache_dir=cache_dir)
    batch = cfg.train.batch_size if train else max(1, cfg.train.batch_size if cfg.data.patch_size is None else 1)
    if train:
        sampler = ResumableSampler(dataset, shuffle=cfg.train.shuffle, seed=cfg.seed)
    else:
        sampler = DistributedSampler(dataset, shuffle=False) if dist.world_size() > 1 else None
    loader_cls = ThreadDataLoader if cfg.data.cache != "none" and cfg.train.num_workers == 0 else DataLoader
    # a generator of its own: creating the loader's iterator must not advance the global torch RNG, whose
    # state a checkpoint restores (a resumed run creates one iterator more than the uninterrupted one)
    return loader_cls(dataset, batch_size=batch, sampler=sampler, num_workers=cfg.train.num_workers,
                      drop_last=False, generator=torch.Generator().manual_seed(cfg.seed))


def _optimizer(cfg: Config, params) -> torch.optim.Optimizer:
    t = cfg.train
    if t.optimizer == "sgd":
        return torch.optim.SGD(params, lr=t.lr, momentum=0.9, weight_decay=t.weight_decay, nesterov=True)
    cls = torch.optim.AdamW if t.optimizer == "adamw" else torch.optim.Adam
    return cls(params, lr=t.lr, weight_decay=t.weight_decay)


def train(cfg: Config, resume: str | None = None) -> TrainResult:
    """Train ``cfg`` (optionally continuing ``resume``) and return where the results are."""
    ckpt = load_checkpoint(resume) if resume else None
    dist.init_from_env(cuda=resolve_device(cfg.train.device).type == "cuda")
    if cfg.train.deterministic:
        set_determinism(seed=cfg.seed)
    else:
        torch.manual_seed(cfg.seed)
    device = dist.local_device(resolve_device(cfg.train.device))
    run_name = dist.from_rank0(cfg.tracking.run_name or f"{cfg.method.name}-{time.strftime('%Y%m%d-%H%M%S')}")
    if ckpt is not None:
        output_dir = Path(resume).resolve().parent.parent
    else:
        output_dir = default_output_dir(cfg, run_name)

    session = None
    if dist.is_main():
        session = TrackingSession(cfg.tracking.uri, cfg.tracking.experiment or cfg.experiment, output_dir,
                                  offline_ok=cfg.tracking.offline_ok)

    splits = build_data(cfg)
    validate(splits)
    if not splits.train:
        raise InputError(f"data.root: {cfg.data.root}: no training samples")
    image_size = image_size_of(splits)
    train_tf = SampleSeededCompose([splits.load_transforms, splits.train_transforms], seed=cfg.seed)
    cache_dir = cfg.data.cache_dir or output_dir / "cache"
    train_loader = make_loader(cfg, splits.train, train_tf, train=True, cache_dir=cache_dir)
    val_items = splits.val or splits.test
    val_loader = make_loader(cfg, val_items, splits.load_transforms, train=False, cache_dir=cache_dir)

    network = build_network(cfg.model, task=cfg.task, spatial_dims=splits.spatial_dims,
                            in_channels=splits.in_channels, num_classes=splits.num_classes,
                            image_size=image_size).to(device)
    if cfg.train.channels_last:
        network = network.to(memory_format=torch.channels_last if splits.spatial_dims == 2
                             else torch.channels_last_3d)
    task = Task.make(cfg.task, num_classes=splits.num_classes, dice_threshold=cfg.method.dice_threshold)
    method = build_method(cfg.method, task, len(splits.train), clamp=cfg.data.intensity_range)
    optimizer = _optimizer(cfg, network.parameters())
    scheduler = (torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=cfg.train.epochs)
                 if cfg.train.scheduler == "cosine" else None)
    # compiled inside DDP, not around it: the attacks run on the module inside DDP (no gradient sync), which
    # then is the compiled one; checkpoints and validation use the plain ``network`` (same parameters)
    train_net = dist.wrap(torch.compile(network) if cfg.train.compile else network, device)
    amp_kwargs = {"dtype": getattr(torch, cfg.train.amp_dtype)}

    trainer = RobustTrainer(device=device, max_epochs=cfg.train.epochs, train_data_loader=train_loader,
                            network=train_net, optimizer=optimizer, method=method, amp=cfg.train.amp,
                            amp_kwargs=amp_kwargs, decollate=False)  # a GradScaler for float16 AMP only
    validator = build_validator(task=cfg.task, num_classes=splits.num_classes, network=network, loader=val_loader,
                                device=device, inferer=sliding_window_inferer(cfg.data.patch_size,
                                                                              splits.spatial_dims),
                                amp=cfg.train.amp, amp_kwargs=amp_kwargs)

    adversarial_validation = None
    if cfg.task == "segmentation" and cfg.evaluate.epoch_steps:
        adversarial_validation = AdversarialValidation.from_config(
            task, cfg, overlay_cases=cfg.evaluate.overlay_cases if dist.is_main() else 0)
        adversarial_validation.attach(validator)

    data_info = {"class_names": splits.class_names or [], "spatial_dims": splits.spatial_dims,
                 "in_channels": splits.in_channels, "num_classes": splits.num_classes,
                 "image_size": list(image_size or []), "n_train": len(splits.train),
                 **geometry_of(splits.load_transforms, getattr(splits, "patch_size", None) or cfg.data.patch_size)}
    run_id = None
    if session is not None:
        run_id = session.start(run_name, cfg.resolved(), tags={
            "medrobust.method": cfg.method.name, "medrobust.task": cfg.task,
            "medrobust.dataset": cfg.data.dataset_tag(), "medrobust.experiment": cfg.experiment,
            "medrobust.output_dir": str(output_dir.resolve())},
            run_id=ckpt.get("mlflow_run_id") if ckpt else None)
        if ckpt is None:
            session.log_dataset(cfg.data.dataset_tag(), str(Path(cfg.data.root).resolve()) if cfg.data.root
                                else f"{cfg.data.source} (generated in memory)",
                                {"train": splits.train, "val": splits.val, "test": splits.test})

    averages = BatchAverages(sync_every=cfg.train.checkpoint_every_iters)  # DDP: a mid-epoch checkpoint's sums

    def payload(engine) -> dict[str, Any]:
        return {"network": network.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict() if scheduler is not None else {},
                "scaler": trainer.scaler.state_dict() if trainer.scaler is not None else {},
                "method_state": method.state.state_dict() if method.state is not None else {},
                "batch_averages": averages.state_dict(),
                "epoch": engine.state.epoch, "iteration": engine.state.iteration,
                "config": cfg.resolved(), "data": data_info, "rng": rng_state(device), "best": saver.state_dict(),
                "mlflow_run_id": run_id}

    @trainer.on(Events.EPOCH_STARTED)
    def _seed_augmentation(engine) -> None:  # a sample's augmentation depends on (seed, epoch, index) only
        train_tf.epoch = engine.state.epoch

    averages.attach(trainer)
    MethodEpochUpdate(method).attach(trainer)
    if scheduler is not None:
        trainer.add_event_handler(Events.EPOCH_COMPLETED, lambda _: scheduler.step())  # before the checkpoint
    FiniteLossGuard(cfg.method.name).attach(trainer)
    ValidationHandler(validator=validator, interval=cfg.train.val_every, epoch_level=True).attach(trainer)
    saver = CheckpointEveryEpoch(output_dir / "checkpoints", payload, cfg.train.checkpoint_every_iters, validator)
    if method.state is not None and cfg.train.checkpoint_every_iters and dist.world_size() > 1:
        # DDP: a mid-epoch checkpoint (rank 0) must hold every rank's records of the epoch so far; all ranks
        # sync here, before the saver (collective, so attached on every rank)
        trainer.add_event_handler(Events.ITERATION_COMPLETED(every=cfg.train.checkpoint_every_iters),
                                  lambda _: method.state.sync_())
    if dist.is_main():
        saver.attach(trainer)
        MlflowTracking(session, output_dir, method.state, validator, iteration_every=max(1, len(train_loader) // 10),
                       overlays=adversarial_validation).attach(trainer)
        if cfg.train.progress:
            _attach_progress(trainer, validator)

    if ckpt is not None:
        _restore(ckpt, network, optimizer, trainer, method, scheduler=scheduler, averages=averages, saver=saver)

    if dist.is_main():
        output_dir.mkdir(parents=True, exist_ok=True)
        resolved = output_dir / "config.yaml"
        resolved.write_text(yaml.safe_dump(cfg.resolved(), sort_keys=False))
        session.log_artifact(resolved)
    try:
        trainer.run()
    except NumericalFault as exc:
        if session is not None:
            session.end("FAILED")
        kept = (f"the last good checkpoint is kept: {saver.last}" if saver.last.exists()
                else "no checkpoint had been written yet")
        raise NumericalFault(f"{exc}; {kept}") from None
    except BaseException:
        if session is not None:
            session.end("KILLED")
        raise
    result = TrainResult(run_id, output_dir, saver.last, metrics=_final_metrics(trainer, validator),
                         state=method.state.state_dict() if method.state is not None else None)
    if session is not None:
        from pipeline.model.describe import input_example, model_metadata
        from pipeline.model.network_def import takes_any_size
        from pipeline.model.weights import final_weights

        result.tracking_uri = session.uri
        # the final network (and best.pt when it is another epoch) without the optimizer state; a local copy
        # stays only while it could not be logged (``medrobust sync`` uploads it later)
        for path in final_weights(saver.last, saver.best, output_dir / "to_log"):
            if session.log_artifact(path, "checkpoints"):
                path.unlink()
        if not any((output_dir / "to_log").iterdir()):
            (output_dir / "to_log").rmdir()
        if cfg.tracking.log_model:
            sample = splits.load_transforms(dict((splits.val or splits.test or splits.train)[0]))["image"]
            session.log_model(network, input_example(sample, data_info.get("patch_size")),
                              metadata=model_metadata(cfg, data_info), variable_size=takes_any_size(cfg.model))
        session.end("FINISHED")
        note = session.summary()
        if note:
            print(note)
        print(f"run {run_id} finished: MLflow {session.uri}, experiment '{cfg.tracking.experiment or cfg.experiment}'; "
              f"outputs in {output_dir}\nMLflow run: {session.run_url()}\n"
              f"evaluate it with: medrobust evaluate {output_dir / 'config.yaml'} --run-id {run_id}", flush=True)
    dist.barrier()
    return result


def _final_metrics(trainer, validator) -> dict[str, float]:
    out = {k: float(v) for k, v in trainer.state.metrics.items() if isinstance(v, (int, float))}
    out.update({k: float(v) for k, v in validator.state.metrics.items() if isinstance(v, (int, float))})
    return out


def _restore(ckpt: dict[str, Any], network, optimizer, trainer, method, *, scheduler=None,
             averages: BatchAverages | None = None, saver: CheckpointEveryEpoch | None = None) -> None:
    """Continue from ``ckpt``; before ``trainer.run()``, which keeps the scaler restored here (RobustTrainer)."""
    network.load_state_dict(ckpt["network"])
    optimizer.load_state_dict(ckpt["optimizer"])
    if scheduler is not None and ckpt.get("scheduler"):
        scheduler.load_state_dict(ckpt["scheduler"])
    if trainer.scaler is not None and ckpt.get("scaler"):
        trainer.scaler.load_state_dict(ckpt["scaler"])
    if method.state is not None and ckpt.get("method_state"):
        method.state.load_state_dict(ckpt["method_state"])
    epoch_length = trainer.state.epoch_length or len(trainer.data_loader)
    iteration, epoch = int(ckpt["iteration"]), int(ckpt["epoch"])
    done_in_epoch = iteration - (epoch - 1) * epoch_length
    if 0 < done_in_epoch < epoch_length:  # written mid-epoch: finish that epoch without its first batches
        trainer.data_loader.sampler.skip_once(done_in_epoch * trainer.data_loader.batch_size)
        if averages is not None and ckpt.get("batch_averages"):
            averages.load_state_dict(ckpt["batch_averages"])  # the epoch's means include the batches before
        epoch -= 1
    trainer.state.iteration, trainer.state.epoch = iteration, epoch
    if saver is not None and ckpt.get("best"):
        saver.load_state_dict(ckpt["best"])  # else the first validation after the resume always writes best.pt
    if ckpt.get("rng"):
        set_rng_state(ckpt["rng"], trainer.state.device)


def _attach_progress(trainer, validator) -> None:
    from ignite.contrib.handlers import ProgressBar

    ProgressBar(persist=False, desc="train").attach(trainer, output_transform=lambda out: {"loss": float(out["loss"].detach())})

    @trainer.on(Events.EPOCH_COMPLETED)
    def _summary(engine) -> None:
        merged = {**engine.state.metrics, **validator.state.metrics}
        shown = {k: round(float(v), 4) for k, v in merged.items() if isinstance(v, (int, float))}
        took = engine.state.times.get(Events.EPOCH_COMPLETED.name) or 0.0
        print(f"epoch {engine.state.epoch}/{engine.state.max_epochs} ({took:.1f} s): {shown}", flush=True)
