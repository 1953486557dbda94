"""``medrobust predict RUN_ID|CHECKPOINT INPUTS... [--out DIR] [--margin]``: a trained model on new inputs.

Inputs are image files (PNG, JPEG, TIFF, BMP, GIF) or folders of them for a 2D model; NIfTI files or folders of
them, or DICOM series / study folders, for a 3D model. Each is preprocessed as validation data were in
training (``preprocessing``) and predicted: 2D as is, 3D through MONAI's ``SlidingWindowInferer`` over the
training patch size. Written to ``--out``:

* classification: ``predictions.csv``: file, predicted class, one probability column per class;
* segmentation: one mask per input in the input's format and geometry (PNG for 2D images, resized back to the
  input's size, binary masks as 0/255; NIfTI for volumes, resampled back onto the input's voxel grid), and
  ``predictions.csv``: file, mask file, predicted foreground fraction.

With ``--margin``, each prediction's smallest breaking radius per norm of the model's evaluation settings
(``evaluate.norms``, PGD with the evaluation's losses, radius grid and restarts; ``--steps`` overrides the PGD
steps): how much noise it takes to change this answer (segmentation: to bring the Dice with the clean mask
below ``dice_threshold``). ``inf``: not changed within the largest radius tried.
"""

from __future__ import annotations

import csv
import fnmatch
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.data import DataLoader, MetaTensor, decollate_batch
from monai.transforms import Invertd, SaveImage
from PIL import Image
from tqdm.auto import tqdm

from pipeline.adversarial.tasks import Task
from pipeline.data.dicom_series import is_series_folder
from pipeline.data.problems import describe_exception
from pipeline.model.preprocessing import build, preprocessing_spec
from pipeline.deploy.source import TrainedModel, open_model
from pipeline.errors import InputError, ProblemList
from pipeline.evaluation.loading import inference_model
from pipeline.evaluation.margin import estimate_margin, radius_grid
from pipeline.evaluation.robustness import as_plain, attack_losses
from pipeline.device import resolve_device

IMAGE_EXT = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".gif")
VOLUME_EXT = (".nii", ".nii.gz")


# -- inputs -------------------------------------------------------------------------------------------------
def _files(folder: Path, ext: tuple[str, ...]) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.name.lower().endswith(ext))


def _dicom_item(folder: Path, trained: TrainedModel, problems: ProblemList) -> list[str] | None:
    """A series folder (one channel), or a study folder whose series the training config selects."""
    if is_series_folder(folder):
        return [str(folder)]
    series = sorted(s for s in folder.iterdir() if is_series_folder(s))
    patterns = trained.cfg.data.image_series
    if patterns:
        chosen = [next((s for s in series if fnmatch.fnmatch(s.name, p)), None) for p in patterns]
        missing = [p for p, s in zip(patterns, chosen, strict=True) if s is None]
        if missing:
            problems.add(folder, f"no series folder matches data.image_series {', '.join(missing)}")
            return None
        return [str(s) for s in chosen]
    mask = trained.cfg.data.mask_series
    chosen = [str(s) for s in series if not (mask and fnmatch.fnmatch(s.name, mask))]
    if not chosen:
        problems.add(folder, "not a DICOM series folder, and holds no series folders")
        return None
    return chosen


def collect_inputs(inputs: list[str], trained: TrainedModel) -> list[dict[str, Any]]:
    """Data dicts ``{"image": ..., "name": ...}`` for every input; all problems reported at once."""
    volumes = int(trained.data["spatial_dims"]) == 3
    dicom = trained.cfg.data.source == "dicom"
    ext = VOLUME_EXT if volumes else IMAGE_EXT
    kinds = "NIfTI volumes (.nii, .nii.gz)" if volumes else "images (" + ", ".join(e[1:] for e in IMAGE_EXT) + ")"
    problems, items = ProblemList(), []
    for text in inputs:
        path = Path(text)
        if not path.exists():
            problems.add(text, "no such file or folder")
        elif dicom and path.is_dir():
            image = _dicom_item(path, trained, problems)
            if image is not None:
                items.append({"image": image if len(image) > 1 else image[0], "name": text})
        elif path.is_dir():
            found = _files(path, ext)
            if not found:
                problems.add(text, f"folder holds no {kinds}")
            items += [{"image": str(p), "name": str(p)} for p in found]
        elif not path.name.lower().endswith(ext):
            problems.add(text, f"not one of the {kinds} this {'3D' if volumes else '2D'} model predicts on")
        else:
            items.append({"image": str(path), "name": text})
    problems.raise_if_any()
    if not items:
        raise InputError("predict: no inputs given")
    return items


class PreparedInputs(torch.utils.data.Dataset):
    """Inputs through the training preprocessing; a file that cannot be read is an input error naming it."""

    def __init__(self, items: list[dict[str, Any]], transform):
        self.items, self.transform = items, transform

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict[str, Any]:
        item = self.items[i]
        try:
            out = self.transform({"image": item["image"]})
        except Exception as exc:  # noqa: BLE001 - readers raise many types; each becomes one line
            raise InputError(f"{item['name']}: {describe_exception(exc, [str(item['image'])])}") from None
        return {**out, "name": item["name"]}


# -- outputs ------------------------------------------------------------------------------------------------
def _stem(name: str) -> str:
    base = Path(name.rstrip("/\\")).name
    for ext in (*VOLUME_EXT, *IMAGE_EXT):
        if base.lower().endswith(ext):
            return base[: -len(ext)]
    return base


@dataclass
class MaskWriter:
    """Masks back in the input's geometry and format: PNG for 2D, NIfTI for volumes."""

    out_dir: Path
    preprocessing: Any
    binary: bool
    used: set[str] = field(default_factory=set)

    def _name(self, name: str, ext: str) -> Path:
        stem, n = _stem(name), 1
        candidate = f"{stem}_mask{ext}"
        while candidate in self.used:
            n += 1
            candidate = f"{stem}_{n}_mask{ext}"
        self.used.add(candidate)
        return self.out_dir / candidate

    def write(self, item: dict[str, Any], label: torch.Tensor, volume: bool) -> Path:
        inverter = Invertd(keys="pred", transform=self.preprocessing, orig_keys="image", nearest_interp=True,
                           to_tensor=True)
        pred = inverter({"image": item["image"], "pred": MetaTensor(label.detach().cpu().float())})["pred"]
        self.out_dir.mkdir(parents=True, exist_ok=True)
        if volume:
            path = self._name(item["name"], ".nii.gz")
            saver = SaveImage(output_dir=str(self.out_dir), output_ext=".nii.gz", output_dtype=np.uint8,
                              resample=False, separate_folder=False, print_log=False)
            saver(pred.round().to(torch.uint8), filename=str(path)[: -len(".nii.gz")])
            return path
        path = self._name(item["name"], ".png")
        values = np.rint(np.asarray(pred.detach().cpu())[0]).astype(np.uint8)
        Image.fromarray(values * 255 if self.binary else values).save(path)
        return path


@dataclass
class PredictResult:
    out_dir: Path
    table: Path
    rows: list[dict[str, Any]]


def _margins(net, x, y, task: Task, trained: TrainedModel, steps: int | None) -> dict[str, np.ndarray]:
    """Smallest breaking radius of each prediction ``y`` per norm of the model's evaluation settings."""
    ev = trained.cfg.evaluate
    eps = {"L2": list(ev.eps_l2), "Linf": list(ev.eps_linf)}
    out = {}
    for norm in ev.norms:
        m = estimate_margin(net, x, y, task=task, norm=norm, radii=radius_grid(eps[norm]),
                            losses=attack_losses(task, ev.losses), steps=steps or ev.steps, restarts=ev.restarts,
                            clamp=trained.cfg.data.intensity_range)
        out[f"margin_{norm}"] = m.cpu().numpy()
    return out


def predict(model: str, inputs: list[str], out: str | Path | None = None, *, margin: bool = False,
            steps: int | None = None, batch_size: int = 16, device: str = "auto",
            tracking_uri: str | None = None) -> PredictResult:
    """Predict ``inputs`` with the model of a checkpoint or MLflow run; write the results to ``out``."""
    dev = resolve_device(device, setting="--device")
    trained = open_model(model, dev, tracking_uri)
    items = collect_inputs(inputs, trained)
    spatial_dims, num_classes = int(trained.data["spatial_dims"]), int(trained.data["num_classes"])
    preprocessing = build(preprocessing_spec(trained.cfg, trained.data))
    patch = trained.cfg.data.patch_size or trained.data.get("patch_size")
    net = inference_model(trained.network, spatial_dims, patch)
    task = trained.cfg.build_task(num_classes)
    segmentation = task.name == "segmentation"
    out_dir = Path(out or "predictions")
    writer = MaskWriter(out_dir / "masks", preprocessing, binary=num_classes == 2)
    loader = DataLoader(PreparedInputs(items, preprocessing), batch_size=batch_size if spatial_dims == 2 else 1,
                        shuffle=False, num_workers=0)
    names = trained.class_names
    rows: list[dict[str, Any]] = []
    for batch in tqdm(loader, desc="predict", unit="batch", dynamic_ncols=True):
        x = as_plain(batch["image"], dev).float()
        with torch.no_grad():
            logits = net(x).float()
        y = task.predict(logits)
        extra = _margins(net, x, y, task, trained, steps) if margin else {}
        if segmentation:
            fraction = (y > 0).flatten(1).float().mean(dim=1).cpu().numpy()
            for i, item in enumerate(decollate_batch(batch, detach=True)):
                path = writer.write(item, y[i], volume=spatial_dims == 3)
                rows.append({"file": item["name"], "mask": str(path), "foreground_fraction": float(fraction[i]),
                             **{k: float(v[i]) for k, v in extra.items()}})
        else:
            probs = logits.softmax(dim=1).cpu().numpy()
            for i, name in enumerate(batch["name"]):
                rows.append({"file": name, "class": names[int(y[i])],
                             **{f"prob_{c}": float(probs[i, j]) for j, c in enumerate(names)},
                             **{k: float(v[i]) for k, v in extra.items()}})
    out_dir.mkdir(parents=True, exist_ok=True)
    table = out_dir / "predictions.csv"
    with table.open("w", newline="") as fh:
        writer_csv = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer_csv.writeheader()
        writer_csv.writerows(rows)
    what = "masks in " + str(writer.out_dir) + ", " if segmentation else ""
    print(f"predicted {len(rows)} input(s) with {trained.cfg.method.name} model "
          f"{trained.run_id or model}: {what}table {table}", flush=True)
    return PredictResult(out_dir, table, rows)
