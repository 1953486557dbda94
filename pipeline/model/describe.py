"""What a trained model is, for those who deploy it: task, classes, input and output description, and the
preprocessing it was trained with. Used as the MLflow model's metadata and in the bundle's metadata.json."""

from __future__ import annotations

from typing import Any

import numpy as np

from pipeline.config import Config
from pipeline.model.preprocessing import preprocessing_spec


def model_metadata(cfg: Config, data: dict[str, Any]) -> dict[str, Any]:
    """Plain data (JSON and YAML safe) about the model trained with ``cfg`` on ``data``."""
    n = int(data["num_classes"])
    names = list(data.get("class_names") or []) or [str(c) for c in range(n)]
    return {
        "task": cfg.task, "method": cfg.method.name, "network": cfg.model.name, "dataset": cfg.data.source,
        "class_names": names, "spatial_dims": int(data["spatial_dims"]), "in_channels": int(data["in_channels"]),
        "num_classes": n, "image_size": list(data.get("image_size") or []),
        "patch_size": list(cfg.data.patch_size or data.get("patch_size") or []),
        "intensity_range": list(cfg.data.intensity_range or []),
        "preprocessing": preprocessing_spec(cfg, data),
        "output": ("logits, one per class (softmax for probabilities)" if cfg.task == "classification"
                   else "logits per class and voxel (argmax for the label map)"),
    }


def input_example(image: Any, patch_size: list[int] | tuple[int, ...] | None = None) -> np.ndarray:
    """A real preprocessed input as a float32 batch of one; a volume is cut (or zero-padded) to its central
    patch of the training patch size (an input example is stored as JSON)."""
    array = np.asarray(image.detach().cpu() if hasattr(image, "detach") else image, dtype=np.float32)
    if patch_size and array.ndim == len(patch_size) + 1:
        cut = []
        for size, want in zip(array.shape[1:], patch_size, strict=True):
            start = max(0, (size - int(want)) // 2)
            cut.append(slice(start, start + int(want)))
        array = array[(slice(None), *cut)]
        array = np.pad(array, [(0, 0), *((0, int(w) - s) for s, w in zip(array.shape[1:], patch_size, strict=True))])
    return np.ascontiguousarray(array[None])
