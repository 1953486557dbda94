"""``RobustTrainer``: MONAI's SupervisedTrainer with the loss of each iteration delegated to an adversarial method.

The iteration fires MONAI's iteration events in the same order as the base class (FORWARD_COMPLETED,
LOSS_COMPLETED, BACKWARD_COMPLETED, MODEL_COMPLETED), so handlers, AMP, checkpointing, validation and MLflow
logging keep working. Everything adversarial lives in the method object (``pipeline.adversarial.methods``).

AMP: the loss scaler is made once, at construction, and only for float16 autocast (bf16 keeps float32's exponent
range and needs none); ``run`` keeps it, where MONAI's ``Trainer.run`` would replace it by a fresh GradScaler, so a
scaler state restored from a checkpoint survives and a bf16 run never scales its loss.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from monai.engines import SupervisedTrainer
from monai.engines.utils import IterationEvents
from monai.engines.workflow import Workflow
from monai.utils import convert_to_tensor
from monai.utils.enums import CommonKeys as Keys
from torch.nn.parallel import DistributedDataParallel

from pipeline.adversarial.methods.base import Method
from pipeline.names import Keys as Ours



class RobustTrainer(SupervisedTrainer):
    """A SupervisedTrainer whose ``_iteration`` asks ``method`` for the loss of each batch.

    Args:
        method: the adversarial training method (``standard``, ``pgd_at``, ``trades``, ``ima``, ``dpaat``).
        All other arguments are those of ``monai.engines.SupervisedTrainer``. ``loss_function`` defaults to
        the method's per-sample training loss; the method, not the loss function, defines what is optimised.
        Each batch dict must carry ``index``, the stable integer id of every sample (per-sample state key);
        one that carries ``roi`` (a region-of-interest mask per image) has it passed to the method, which then
        restricts its loss (segmentation) and its attacks to the ROI.
    """

    def __init__(self, *args: Any, method: Method, **kwargs: Any):
        kwargs.setdefault("loss_function", lambda pred, target: method.task.per_sample_loss(pred, target).mean())
        # torch's own zero_grad default (MONAI's is False): no memset of every gradient before each step and no
        # accumulation into it after (measured: 11% of a ResNet-18 CPU training step, benchmarks/step_cost.py)
        kwargs.setdefault("optim_set_to_none", True)
        if kwargs.get("accumulation_steps", 1) != 1:
            raise ValueError("RobustTrainer does not support gradient accumulation (per-sample state is per step)")
        super().__init__(*args, **kwargs)
        self.method = method
        self.scaler = self._make_scaler()

    def _make_scaler(self) -> torch.amp.GradScaler | None:
        """A GradScaler for float16 autocast on the training device; None without AMP or with bf16."""
        if not self.amp:
            return None
        device_type = torch.device(self.state.device).type
        dtype = self.amp_kwargs.get("dtype") or torch.get_autocast_dtype(device_type)
        return torch.amp.GradScaler(device_type) if dtype == torch.float16 else None

    def run(self) -> None:  # type: ignore[override]
        """Train; unlike MONAI's ``Trainer.run`` this does not re-create ``self.scaler`` (see the module note)."""
        Workflow.run(self)

    def _autocast(self, engine: SupervisedTrainer):
        if not engine.amp:
            return contextlib.nullcontext()
        return torch.autocast(torch.device(engine.state.device).type, **engine.amp_kwargs)

    def _iteration(self, engine: SupervisedTrainer, batchdata: dict[str, torch.Tensor]) -> dict:
        if batchdata is None:
            raise ValueError("Must provide batch data for current iteration.")
        if Ours.INDEX not in batchdata:
            raise ValueError("RobustTrainer needs the stable sample id 'index' in every batch")
        inputs, targets = engine.prepare_batch(batchdata, engine.state.device, engine.non_blocking,
                                               **engine.to_kwargs)[:2]
        # plain tensors: MetaTensor's __torch_function__ costs host time on every op of the K attack steps,
        # and torch.compile does not trace it
        inputs, targets = convert_to_tensor(inputs, track_meta=False), convert_to_tensor(targets, track_meta=False)
        index = torch.as_tensor(batchdata[Ours.INDEX]).to(engine.state.device, non_blocking=engine.non_blocking)
        roi = batchdata.get(Ours.ROI.value)
        extra = {} if roi is None else {"roi": convert_to_tensor(roi, device=engine.state.device, track_meta=False)}
        engine.state.output = {Keys.IMAGE: inputs, Keys.LABEL: targets}

        engine.network.train()
        engine.optimizer.zero_grad(set_to_none=engine.optim_set_to_none)
        scaler = engine.scaler if engine.amp else None

        def backward(loss: torch.Tensor) -> None:
            (scaler.scale(loss) if scaler is not None else loss).backward()

        # a method may back-propagate its clean term before its attack (Method.backward_now); not under DDP,
        # where each backward would all-reduce the gradients again
        self.method.backward_hook = None if isinstance(engine.network, DistributedDataParallel) else backward
        with self._autocast(engine):
            out = self.method.loss(engine.network, inputs, targets, index, **extra)
            engine.state.output[Keys.PRED] = out.pred
            engine.state.output[Ours.ADV] = out.adv  # before the events: guards check the attack's inputs too
            engine.state.output[Ours.METRICS] = out.metrics
            engine.fire_event(IterationEvents.FORWARD_COMPLETED)
            engine.state.output[Keys.LOSS] = out.loss if out.done is None else out.loss.detach() + out.done
            engine.fire_event(IterationEvents.LOSS_COMPLETED)

        if out.done is None or out.loss.requires_grad:
            backward(out.loss)
        engine.fire_event(IterationEvents.BACKWARD_COMPLETED)
        if scaler is not None:
            scaler.step(engine.optimizer)
            scaler.update()
        else:
            engine.optimizer.step()
        engine.fire_event(IterationEvents.MODEL_COMPLETED)
        return engine.state.output

