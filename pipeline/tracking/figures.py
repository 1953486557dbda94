"""Figures logged as MLflow artifacts: the eps histogram, the clean / adversarial / difference grid and the
segmentation overlays (image, ground truth, clean and adversarial prediction)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from monai.visualize import blend_images  # noqa: E402


def to_display(image: torch.Tensor) -> np.ndarray:
    """(C, *spatial) -> an (H, W) or (H, W, 3) array for imshow; 3D volumes show their middle slice."""
    x = image.detach().float().cpu()
    if x.ndim == 4:  # (C, H, W, D): middle slice of the last axis
        x = x[..., x.shape[-1] // 2]
    x = x[:3] if x.shape[0] >= 3 else x[:1]
    lo, hi = float(x.min()), float(x.max())
    x = (x - lo) / (hi - lo) if hi > lo else torch.zeros_like(x)
    return x.permute(1, 2, 0).numpy() if x.shape[0] == 3 else x[0].numpy()


def eps_histogram(eps: torch.Tensor, path: str | Path, title: str) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    values = eps.detach().float().cpu().numpy()
    fig, ax = plt.subplots(figsize=(5, 3.2))
    ax.hist(values, bins=min(40, max(5, len(np.unique(values)))), color="#3b6ea8")
    ax.set_xlabel("per-sample radius eps")
    ax.set_ylabel("samples")
    ax.set_title(f"{title}: mean {values.mean():.3g}, median {np.median(values):.3g}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def adversarial_grid(clean: torch.Tensor, adv: torch.Tensor, path: str | Path, n: int = 8) -> Path:
    """Rows: clean, adversarial, |difference| (amplified to full range), for the first ``n`` samples."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    n = min(n, clean.shape[0])
    fig, axes = plt.subplots(3, n, figsize=(1.6 * n, 5.0), squeeze=False)
    for i in range(n):
        diff = (adv[i].float() - clean[i].float()).abs()
        norm = float(diff.flatten().norm())
        for row, (img, label) in enumerate([(clean[i], "clean"), (adv[i], "adversarial"),
                                            (diff, f"|diff| L2={norm:.2f}")]):
            ax = axes[row][i]
            ax.imshow(to_display(img), cmap="gray" if img.shape[0] != 3 else None)
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_ylabel(label.split(" ")[0], fontsize=8)
            if row == 2:
                ax.set_xlabel(label.split(" ", 1)[1], fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def middle_slice(label: torch.Tensor) -> int:
    """3D: the middle slice (last axis) of the ground-truth foreground's extent, or of the volume if empty."""
    depth = label.shape[-1]
    hit = (label.reshape(-1, depth) > 0).any(dim=0).nonzero().squeeze(1)
    return int(hit[0] + hit[-1]) // 2 if hit.numel() else depth // 2


def segmentation_overlays(cases, path: str | Path) -> Path:
    """One row per case (objects with ``image``, ``label``, ``clean``, ``adversarial``, ``eps``, ``norm``):
    the image, then the ground truth, the clean prediction and the adversarial prediction blended over it
    (``monai.visualize.blend_images``). 3D volumes show one axial slice: the middle of the ground truth."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, axes = plt.subplots(len(cases), 4, figsize=(9.6, 2.5 * len(cases)), squeeze=False)
    for row, case in enumerate(cases):
        image = case.image.detach().float().cpu()
        masks = [m.detach().float().cpu() for m in (case.label, case.clean, case.adversarial)]
        if image.ndim == 4:
            z = middle_slice(case.label)
            image, masks = image[..., z], [m[..., z] for m in masks]
        image = image if image.shape[0] == 3 else image[:1]   # RGB, else the first channel in grey
        lo, hi = float(image.min()), float(image.max())
        image = (image - lo) / (hi - lo) if hi > lo else torch.zeros_like(image)
        titles = ["image", "ground truth", "clean prediction",
                  f"adversarial ({case.norm} eps {case.eps:.3g})"]
        panels = [image.repeat(3 // image.shape[0], 1, 1)] + [
            torch.as_tensor(blend_images(image, m.clamp(0, 1), alpha=0.45, rescale_arrays=False)) for m in masks]
        for col, (panel, title) in enumerate(zip(panels, titles)):
            ax = axes[row][col]
            ax.imshow(panel.permute(1, 2, 0).clamp(0, 1).numpy())
            ax.set_xticks([])
            ax.set_yticks([])
            if row == 0:
                ax.set_title(title, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path
