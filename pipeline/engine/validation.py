"""The per-epoch validator: a MONAI SupervisedEvaluator with the task's metrics (ignite and MONAI handlers).

Segmentation: ``val_dice`` (mean per-image Dice over the foreground classes, MONAI ``MeanDice``, the key metric)
and ``val_dice_pooled`` (Dice pooled over all voxels of all images per foreground class, i.e. MONAI's
``ConfusionMatrix`` F1 on the summed confusion matrices, then the mean over the classes). 3D volumes are
predicted through ``SlidingWindowInferer``; the Dice under attack is added by
:class:`pipeline.engine.robust_validation.AdversarialValidation`. A batch with ``roi`` (a region-of-interest
mask per image) has its Dice counted on the pixels with roi > 0 only.
"""

from __future__ import annotations

import torch
from ignite.metrics import Accuracy, ConfusionMatrix, MetricsLambda
from monai.engines import SupervisedEvaluator
from monai.engines.utils import IterationEvents
from monai.handlers import ConfusionMatrix as ConfusionMatrixHandler, MeanDice
from monai.inferers import SimpleInferer, SlidingWindowInferer
from monai.networks.utils import one_hot
from monai.utils import convert_to_tensor
from monai.utils.enums import CommonKeys as Keys

from pipeline.names import Keys as Ours


def _class_outputs(out: dict) -> tuple[torch.Tensor, torch.Tensor]:
    return out[Keys.PRED].float(), out[Keys.LABEL].long().reshape(-1)


def balanced_accuracy(cm: torch.Tensor) -> float:
    """Mean recall over the classes present in the labels (rows of the confusion matrix)."""
    support = cm.sum(dim=1)
    present = support > 0
    recall = cm.diag()[present].double() / support[present].double()
    return float(recall.mean()) if present.any() else float("nan")


def _seg_outputs(num_classes: int):
    def transform(out: dict) -> tuple[torch.Tensor, torch.Tensor]:
        pred = one_hot(out[Keys.PRED].argmax(dim=1, keepdim=True), num_classes)
        label = one_hot(out[Keys.LABEL].long(), num_classes)
        roi = out.get(Ours.ROI.value)
        return (pred, label) if roi is None else (pred * (roi > 0), label * (roi > 0))
    return transform


def keep_roi(engine: SupervisedEvaluator) -> None:
    """The batch's ``roi`` into the step's output, where the Dice transforms read it (fired before the metrics)."""
    batch = engine.state.batch
    if isinstance(batch, dict) and Ours.ROI.value in batch:
        engine.state.output[Ours.ROI.value] = convert_to_tensor(batch[Ours.ROI.value], device=engine.state.device,
                                                                track_meta=False)


def _mean_over_classes(value) -> float:
    return float(torch.as_tensor(value, dtype=torch.float64).mean())


def sliding_window_inferer(patch_size: list[int] | None, spatial_dims: int):
    """3D volumes are validated patch-wise with Gaussian blending; 2D images in one pass."""
    if spatial_dims == 3 and patch_size:
        return SlidingWindowInferer(roi_size=patch_size, sw_batch_size=4, overlap=0.25, mode="gaussian")
    return SimpleInferer()


def build_validator(*, task: str, num_classes: int, network: torch.nn.Module, loader, device: torch.device,
                    inferer=None, amp: bool = False, amp_kwargs: dict | None = None) -> SupervisedEvaluator:
    if task == "classification":
        cm = ConfusionMatrix(num_classes, output_transform=_class_outputs)
        key = {"val_accuracy": Accuracy(output_transform=_class_outputs)}
        extra = {"val_balanced_accuracy": MetricsLambda(balanced_accuracy, cm)}
    else:
        key = {"val_dice": MeanDice(include_background=False, output_transform=_seg_outputs(num_classes))}
        pooled = ConfusionMatrixHandler(include_background=False, metric_name="f1 score", compute_sample=False,
                                        reduction="sum_batch", output_transform=_seg_outputs(num_classes),
                                        save_details=False)
        extra = {"val_dice_pooled": MetricsLambda(_mean_over_classes, pooled)}
    evaluator = SupervisedEvaluator(device=device, val_data_loader=loader, network=network,
                                    inferer=inferer or SimpleInferer(), key_val_metric=key, additional_metrics=extra,
                                    amp=amp and device.type == "cuda", amp_kwargs=amp_kwargs, decollate=False)
    if task != "classification":
        evaluator.add_event_handler(IterationEvents.FORWARD_COMPLETED, keep_roi)
    return evaluator
