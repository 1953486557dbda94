"""Grad-CAM (``monai.visualize.GradCAM``) on clean and adversarial inputs, as image panels.

One PNG per class, one row per test case of that class: the image, its adversarial version, the CAM of the
clean prediction and the CAM of the adversarial prediction (each for the class the model predicts on that
input), so a reader sees where the evidence moved. Classification only; 3D inputs show the middle slice.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from monai.visualize import GradCAM  # noqa: E402
from torch import nn  # noqa: E402

from pipeline.names import Keys, metric_safe  # noqa: E402

PANEL_INCHES = 2.5
DPI = 100
COLUMNS = ("image", "adversarial", "Grad-CAM clean", "Grad-CAM adversarial")


def default_target_layer(model: nn.Module) -> str:
    """The name of the last convolution of the network (the usual Grad-CAM layer)."""
    name = None
    for key, module in model.named_modules():
        if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            name = key
    if name is None:
        raise ValueError("Grad-CAM needs a convolutional network: no Conv layer found")
    return name


def select_cases(batches: Iterable[dict[str, Any]], num_classes: int,
                 per_class: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The first ``per_class`` samples of every class in data order: images (N, C, ...), labels (N,) and, when
    the batches carry a region of interest (``roi``, (B, 1, ...)), the cases' masks (N, 1, ...), else None."""
    chosen: dict[int, list[tuple[torch.Tensor, torch.Tensor | None]]] = {c: [] for c in range(num_classes)}
    for batch in batches:
        labels = batch["label"].reshape(-1).long()
        rois = batch.get(Keys.ROI.value)
        for i, (image, label) in enumerate(zip(batch["image"], labels, strict=True)):
            if len(chosen[int(label)]) < per_class:
                chosen[int(label)].append((image, None if rois is None else rois[i]))
        if all(len(v) >= per_class for v in chosen.values()):
            break
    cases = [case for c in range(num_classes) for case in chosen[c]]
    labels = [c for c in range(num_classes) for _ in chosen[c]]
    if not cases:
        return torch.zeros(0), torch.zeros(0, dtype=torch.long), None
    rois = None if cases[0][1] is None else torch.stack([roi for _, roi in cases])
    return torch.stack([image for image, _ in cases]).float(), torch.tensor(labels), rois


def cams(model: nn.Module, x: torch.Tensor, target_layer: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Grad-CAM maps (N, *spatial) in [0, 1] for the predicted class, and the predicted classes (N,)."""
    model.eval()
    layer = target_layer or default_target_layer(model)
    with torch.enable_grad():
        maps = GradCAM(nn_module=model, target_layers=layer)(x.detach().clone())
    model.zero_grad(set_to_none=True)
    with torch.no_grad():
        preds = model(x).argmax(dim=1)
    return maps[:, 0].detach().cpu().numpy(), preds.cpu().numpy()


def _display(image: np.ndarray) -> np.ndarray:
    """(C, *spatial) -> 2D grey or (H, W, 3) RGB in [0, 1]; 3D volumes give their middle slice."""
    if image.ndim == 4:
        image = image[..., image.shape[-1] // 2]
    lo, hi = float(image.min()), float(image.max())
    image = (image - lo) / (hi - lo) if hi > lo else np.zeros_like(image)
    return image[0] if image.shape[0] != 3 else np.moveaxis(image, 0, -1)


def _slice(cam: np.ndarray) -> np.ndarray:
    return cam[..., cam.shape[-1] // 2] if cam.ndim == 3 else cam


def plot_panels(path: str | Path, clean: torch.Tensor, adv: torch.Tensor, cam_clean: np.ndarray,
                cam_adv: np.ndarray, pred_clean: np.ndarray, pred_adv: np.ndarray, labels: Sequence[int],
                class_names: Sequence[str], roi: torch.Tensor | None = None) -> Path:
    """Rows of (image, adversarial, CAM clean, CAM adversarial): ``4 * 250`` by ``rows * 250`` pixels; with
    ``roi`` its outline on the two image panels (the attack perturbed inside it only)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = len(clean)
    fig = plt.figure(figsize=(len(COLUMNS) * PANEL_INCHES, rows * PANEL_INCHES), dpi=DPI)
    axes = fig.subplots(rows, len(COLUMNS), squeeze=False)
    for r in range(rows):
        img, img_adv = _display(clean[r].cpu().numpy()), _display(adv[r].cpu().numpy())
        cmap = "gray" if img.ndim == 2 else None
        shown = [(img, None, f"label {class_names[labels[r]]}"),
                 (img_adv, None, f"adversarial -> {class_names[pred_adv[r]]}"),
                 (img, _slice(cam_clean[r]), f"CAM {class_names[pred_clean[r]]}"),
                 (img_adv, _slice(cam_adv[r]), f"CAM {class_names[pred_adv[r]]}")]
        outline = None if roi is None else _slice(roi[r, 0].float().cpu().numpy())
        for k, (ax, (base, overlay, title)) in enumerate(zip(axes[r], shown, strict=True)):
            ax.imshow(base, cmap=cmap)
            if overlay is not None:
                ax.imshow(overlay, cmap="jet", alpha=0.45, vmin=0, vmax=1)
            if outline is not None and k < 2 and 0 < outline.max() and outline.min() <= 0:
                ax.contour(outline > 0, levels=[0.5], colors="lime", linewidths=0.8)
            ax.set_title(title, fontsize=8)
            ax.axis("off")
    fig.subplots_adjust(left=0.01, right=0.99, bottom=0.01, top=0.92, wspace=0.05, hspace=0.25)
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


def gradcam_panels(model: nn.Module, clean: torch.Tensor, adv: torch.Tensor, labels: torch.Tensor,
                   class_names: Sequence[str], out_dir: str | Path, target_layer: str | None = None,
                   roi: torch.Tensor | None = None) -> list[Path]:
    """One panel file per class that has cases: ``<out_dir>/<class>.png`` (``roi``: see :func:`plot_panels`)."""
    if not len(clean):
        return []
    cam_clean, pred_clean = cams(model, clean, target_layer)
    cam_adv, pred_adv = cams(model, adv, target_layer)
    written = []
    labels_np = labels.cpu().numpy()
    for c in sorted(set(labels_np.tolist())):
        rows = np.nonzero(labels_np == c)[0]
        written.append(plot_panels(Path(out_dir) / f"{metric_safe(class_names[c])}.png", clean[rows], adv[rows],
                                   cam_clean[rows], cam_adv[rows], pred_clean[rows], pred_adv[rows],
                                   labels_np[rows].tolist(), class_names, None if roi is None else roi[rows]))
    return written
