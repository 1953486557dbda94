"""Models for the predict / export / degenerate tests: checkpoints written as ``medrobust train`` writes them,
either untrained (seeded, for exactness checks that do not depend on training) or trained for one epoch."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from pipeline.config import config_from_dict
from pipeline.data import build_data
from pipeline.data.synthetic import make_image
from pipeline.model.preprocessing import geometry_of
from pipeline.model.checkpoint import save_checkpoint
from pipeline.model.networks import build_network
from pipeline.engine.data import image_size_of

QUICK_EVAL = {"norms": ["L2"], "eps_l2": [0.5], "steps": 2, "losses": ["ce"], "fgsm": False, "noise": False,
              "margin": False, "gradcam_per_class": 0, "stratify": ["label"], "apgd": False}


def untrained_checkpoint(raw: dict, path: Path, seed: int = 0):
    """A seeded, untrained network of ``raw`` saved with the config and data description that training saves."""
    cfg = config_from_dict(raw)
    splits = build_data(cfg)
    size = image_size_of(splits)
    torch.manual_seed(seed)
    net = build_network(cfg.model, task=cfg.task, spatial_dims=splits.spatial_dims, in_channels=splits.in_channels,
                        num_classes=splits.num_classes, image_size=size)
    data = {"class_names": splits.class_names or [], "spatial_dims": splits.spatial_dims,
            "in_channels": splits.in_channels, "num_classes": splits.num_classes, "image_size": list(size or []),
            "n_train": len(splits.train),
            **geometry_of(splits.load_transforms, getattr(splits, "patch_size", None) or cfg.data.patch_size)}
    save_checkpoint(path, {"network": net.state_dict(), "config": cfg.resolved(), "data": data, "epoch": 1,
                           "iteration": 1})
    return cfg, splits


def synthetic_raw(tmp_path: Path, name: str = "deploy") -> dict:
    """One epoch of clean training on 48 synthetic 32x32 images (a few seconds)."""
    return {"experiment": name, "task": "classification", "seed": 1,
            "data": {"source": "synthetic", "synthetic_size": 48, "cache": "none"},
            "model": {"name": "small_cnn", "channels": [8, 16]}, "method": {"name": "standard"},
            "train": {"epochs": 1, "batch_size": 16, "lr": 0.01, "device": "cpu", "progress": False,
                      "output_dir": str(tmp_path / name)},
            "tracking": {"run_name": name, "log_model": False}, "evaluate": dict(QUICK_EVAL)}


def write_pngs(folder: Path, n: int, start: int = 1000) -> list[Path]:
    """``n`` synthetic dermatoscopy-like images as PNG files (classes in rotation)."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        path = folder / f"lesion_{i:02d}.png"
        Image.fromarray(make_image(start + i, i % 4)).save(path)
        paths.append(path)
    return paths


def one_class_npz(path: Path, n_train: int = 48, n_test: int = 24) -> Path:
    """A MedMNIST-layout file whose training images are all of class 0 (val/test: four classes in rotation)."""
    images = np.stack([make_image(i, i % 4) for i in range(n_train + n_test)])
    test_labels = (np.arange(n_test) % 4).reshape(-1, 1).astype(np.uint8)
    np.savez(path, train_images=images[:n_train], train_labels=np.zeros((n_train, 1), np.uint8),
             val_images=images[n_train:], val_labels=test_labels, test_images=images[n_train:],
             test_labels=test_labels)
    return path
