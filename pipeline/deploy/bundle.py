"""``medrobust export RUN_ID|CHECKPOINT --bundle DIR``: a trained model as a MONAI bundle.

Layout (MONAI's bundle specification)::

    configs/metadata.json    versions, the network's input and output description, class names, the training
                             method, dataset and robustness figures (under ``medrobust``)
    configs/inference.json   data list, preprocessing (``preprocessing.preprocessing_spec``), network
                             (``network_def``), inferer (sliding window for volumes), postprocessing, evaluator
    models/model.pt          the network's weights (a state dict)
    docs/README.md           what the model is, how it was trained, how robust it was found, how to run it

``python -m monai.bundle run --config_file configs/inference.json --dataset_dir IMAGES`` (from the bundle
folder) predicts every image of a folder with MONAI alone when the preprocessing uses MONAI transforms only
(``preprocessing.monai_only``; otherwise medrobust must be installed too): classification writes
``eval/predictions.csv`` (file, then one probability per class, MONAI's ``ClassificationSaver``),
segmentation one mask per input (NIfTI for volumes, PNG for 2D images) under ``eval/``. The same folder is
logged to the model's MLflow run as the artifact ``bundle/``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import monai
import numpy as np
import torch
from mlflow.tracking import MlflowClient

from pipeline.model.describe import model_metadata
from pipeline.model.network_def import network_def
from pipeline.model.preprocessing import monai_only, preprocessing_spec
from pipeline.deploy.source import TrainedModel, open_model
from pipeline.errors import InputError

IMAGE_GLOB = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".gif")


@dataclass
class Bundle:
    root: Path
    monai_only: bool
    logged_to: str | None


def _datalist(trained: TrainedModel) -> str:
    if trained.cfg.data.source == "dicom":  # one series folder per case
        return ("$[{'image': os.path.join(@dataset_dir, f)} for f in sorted(os.listdir(@dataset_dir)) "
                "if os.path.isdir(os.path.join(@dataset_dir, f))]")
    ext = (".nii", ".nii.gz") if int(trained.data["spatial_dims"]) == 3 else IMAGE_GLOB
    return (f"$[{{'image': f}} for f in sorted(glob.glob(os.path.join(@dataset_dir, '**', '*'), recursive=True)) "
            f"if f.lower().endswith({ext!r})]")


def _postprocessing(trained: TrainedModel) -> list[Any]:
    if trained.cfg.task == "classification":
        return [{"_target_": "Activationsd", "keys": "pred", "softmax": True}]
    if int(trained.data["spatial_dims"]) == 3:
        save: Any = {"_target_": "SaveImaged", **_save_options(trained)}
    else:  # images are read rows first (PILReader reverse_indexing=False): masks are written the same way
        save = "$monai.transforms.SaveImaged(**@save_options).set_options(write_kwargs={'reverse_indexing': False})"
    return [{"_target_": "Activationsd", "keys": "pred", "softmax": True},
            {"_target_": "AsDiscreted", "keys": "pred", "argmax": True},
            {"_target_": "Invertd", "keys": "pred", "transform": "@preprocessing", "orig_keys": "image",
             "nearest_interp": True, "to_tensor": True},
            save]


def inference_config(trained: TrainedModel) -> dict[str, Any]:
    """The bundle's ``configs/inference.json``."""
    classification = trained.cfg.task == "classification"
    volume = int(trained.data["spatial_dims"]) == 3
    patch = trained.cfg.data.patch_size or trained.data.get("patch_size")
    handlers: list[dict[str, Any]] = [
        {"_target_": "CheckpointLoader", "load_path": "$@bundle_root + '/models/model.pt'",
         "load_dict": {"model": "@network"}, "map_location": "@device"}]
    if classification:
        handlers.append({"_target_": "ClassificationSaver", "output_dir": "@output_dir",
                         "filename": "predictions.csv",
                         "batch_transform": "$lambda batch: [item['image'].meta for item in batch]",
                         "output_transform": "$lambda output: [item['pred'] for item in output]"})
    config: dict[str, Any] = {
        "imports": ["$import glob", "$import os", "$import numpy"],
        "bundle_root": ".",
        "output_dir": "$@bundle_root + '/eval'",
        "dataset_dir": "$@bundle_root + '/sample_data'",
        "device": "$torch.device('cuda' if torch.cuda.is_available() else 'cpu')",
        "datalist": _datalist(trained),
        "network_def": network_def(trained.cfg.model, task=trained.cfg.task,
                                   spatial_dims=int(trained.data["spatial_dims"]),
                                   in_channels=int(trained.data["in_channels"]),
                                   num_classes=int(trained.data["num_classes"]),
                                   image_size=trained.data.get("image_size")),
        "network": "$@network_def.to(@device)",
        "preprocessing": {"_target_": "Compose",
                          "transforms": preprocessing_spec(trained.cfg, trained.data)},
        "dataset": {"_target_": "Dataset", "data": "@datalist", "transform": "@preprocessing"},
        "dataloader": {"_target_": "DataLoader", "dataset": "@dataset", "batch_size": 1 if volume else 16,
                       "shuffle": False, "num_workers": 0},
        "inferer": ({"_target_": "SlidingWindowInferer", "roi_size": list(patch), "sw_batch_size": 4,
                     "overlap": 0.25, "mode": "gaussian"} if volume and patch else {"_target_": "SimpleInferer"}),
        "postprocessing": {"_target_": "Compose", "transforms": _postprocessing(trained)},
        "handlers": handlers,
        "evaluator": {"_target_": "SupervisedEvaluator", "device": "@device", "val_data_loader": "@dataloader",
                      "network": "@network", "inferer": "@inferer", "postprocessing": "@postprocessing",
                      "val_handlers": "@handlers", "amp": False},
        "initialize": ["$monai.utils.set_determinism(seed=0)"],
        "run": ["$@evaluator.run()"],
    }
    if not classification and not volume:
        config["save_options"] = _save_options(trained)
    return config


def _save_options(trained: TrainedModel) -> dict[str, Any]:
    """SaveImaged's arguments: NIfTI for volumes; PNG for 2D images (binary masks as 0/255)."""
    options = {"keys": "pred", "output_dir": "@output_dir", "output_postfix": "mask", "resample": False,
               "separate_folder": False, "output_dtype": "$numpy.uint8", "print_log": False}
    if int(trained.data["spatial_dims"]) == 3:
        return {**options, "output_ext": ".nii.gz"}
    return {**options, "output_ext": ".png", "writer": "PILWriter",
            "scale": 255 if int(trained.data["num_classes"]) == 2 else None}


def _robustness(trained: TrainedModel) -> tuple[dict[str, float], dict[str, str]]:
    """The run's evaluation metrics and tags, when its MLflow store can be read."""
    if not trained.run_id:
        return {}, {}
    try:
        run = MlflowClient(tracking_uri=trained.tracking_uri).get_run(trained.run_id)
    except Exception:  # noqa: BLE001 - a checkpoint whose run is elsewhere still exports, without the figures
        return {}, {}
    metrics = {k: float(v) for k, v in run.data.metrics.items()
               if k.startswith("eval/") and "/recall/" not in k or k.startswith("val_")}
    return dict(sorted(metrics.items())), dict(run.data.tags)


def metadata(trained: TrainedModel, figures: dict[str, float], tags: dict[str, str]) -> dict[str, Any]:
    """The bundle's ``configs/metadata.json`` (MONAI's metadata layout)."""
    card = model_metadata(trained.cfg, trained.data)
    classification = trained.cfg.task == "classification"
    spatial = card["patch_size"] if card["spatial_dims"] == 3 else card["image_size"]
    names = {str(i): n for i, n in enumerate(card["class_names"])}
    pure = monai_only(card["preprocessing"])
    return {
        "version": "0.1.0",
        "changelog": {"0.1.0": f"exported by medrobust from MLflow run {trained.run_id or 'unknown'}"},
        "monai_version": monai.__version__, "pytorch_version": torch.__version__.split("+")[0],
        "numpy_version": np.__version__,
        "required_packages_version": {} if pure else {"medrobust": _medrobust_version()},
        "name": f"medrobust {trained.cfg.method.name} {trained.cfg.task} ({trained.cfg.data.source})",
        "task": f"{trained.cfg.task} of {trained.cfg.data.source} images, adversarially trained with "
                f"{trained.cfg.method.name}",
        "description": f"{trained.cfg.model.name} trained by medrobust with method '{trained.cfg.method.name}'; "
                       "see docs/README.md for its robustness figures",
        "authors": "exported by medrobust", "copyright": "see the training data's licence",
        "intended_use": "research only, not for clinical use",
        "network_data_format": {
            "inputs": {"image": {
                "type": "image", "format": "magnitude", "modality": trained.cfg.data.source,
                "num_channels": card["in_channels"], "spatial_shape": spatial, "dtype": "float32",
                "value_range": card["intensity_range"] or [0, 1], "is_patch_data": card["spatial_dims"] == 3,
                "channel_def": {str(i): f"channel {i}" for i in range(card["in_channels"])}}},
            "outputs": {"pred": {
                "type": "probabilities" if classification else "image",
                "format": "classes" if classification else "segmentation",
                "num_channels": card["num_classes"], "spatial_shape": [card["num_classes"]] if classification
                else spatial, "dtype": "float32", "value_range": [0, 1], "is_onehot": classification,
                "channel_def": names}},
        },
        "medrobust": {**card, "run_id": trained.run_id, "epoch": trained.epoch, "robustness": figures,
                      "degenerate": tags.get("medrobust.degenerate"), "monai_only": pure},
    }


def _medrobust_version() -> str:
    from importlib.metadata import PackageNotFoundError, version  # noqa: PLC0415

    try:
        return version("medrobust")
    except PackageNotFoundError:
        return "unknown"


def readme(trained: TrainedModel, meta: dict[str, Any]) -> str:
    card, figures = meta["medrobust"], meta["medrobust"]["robustness"]
    lines = [f"# {meta['name']}", "", meta["description"] + ".", "",
             f"* training method: `{card['method']}` (medrobust), network `{card['network']}`, "
             f"epochs trained: {trained.epoch}", f"* data: `{card['dataset']}`, classes: "
             + ", ".join(card["class_names"]), f"* MLflow run: `{trained.run_id}`", "",
             "## Robustness figures", ""]
    if figures:
        lines += ["| metric | value |", "|---|---|", *(f"| `{k}` | {v:.4f} |" for k, v in figures.items()), ""]
    else:
        lines += ["Not evaluated (run `medrobust evaluate` on the training run, then export again).", ""]
    if card.get("degenerate") and card["degenerate"] != "no":
        lines += [f"**WARNING: degenerate model: {card['degenerate']}.**", ""]
    lines += ["## Run it", "", "From this folder:", "", "```bash",
              "python -m monai.bundle run --config_file configs/inference.json --dataset_dir /path/to/images "
              "--output_dir ./eval", "```", "",
              ("Classification: `eval/predictions.csv` (file, then one probability per class, in the order of "
               "`channel_def` in configs/metadata.json)." if trained.cfg.task == "classification"
               else "Segmentation: one mask per input under `eval/`."),
              "", "Preprocessing (configs/inference.json `preprocessing`) is the one used in training"
              + ("; it uses MONAI transforms only." if card["monai_only"]
                 else "; it uses medrobust's own transforms or readers, so install medrobust too.")]
    return "\n".join(lines) + "\n"


def export_bundle(model: str, bundle: str | Path, *, tracking_uri: str | None = None, log: bool = True) -> Bundle:
    """Write the bundle of a checkpoint / MLflow run to ``bundle``; log it to the run as ``bundle/``."""
    trained = open_model(model, "cpu", tracking_uri)
    root = Path(bundle)
    if root.exists() and not root.is_dir():
        raise InputError(f"--bundle {root}: exists and is not a folder")
    for sub in ("configs", "models", "docs"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    torch.save(trained.network.state_dict(), root / "models" / "model.pt")
    figures, tags = _robustness(trained)
    meta = metadata(trained, figures, tags)
    (root / "configs" / "inference.json").write_text(json.dumps(inference_config(trained), indent=2) + "\n")
    (root / "configs" / "metadata.json").write_text(json.dumps(meta, indent=2) + "\n")
    (root / "docs" / "README.md").write_text(readme(trained, meta))
    logged = None
    if log and trained.run_id:
        try:
            MlflowClient(tracking_uri=trained.tracking_uri).log_artifacts(trained.run_id, str(root), "bundle")
            logged = trained.run_id
        except Exception as exc:  # noqa: BLE001 - the bundle on disk is the result; logging is a copy
            print(f"medrobust: warning: bundle not logged to MLflow run {trained.run_id} "
                  f"({type(exc).__name__}: {str(exc)[:120]})")
    pure = meta["medrobust"]["monai_only"]
    print(f"MONAI bundle written to {root}" + (f", logged to MLflow run {logged} as bundle/" if logged else "")
          + ("" if pure else " (its preprocessing needs medrobust installed)")
          + f"\nrun it with: cd {root} && python -m monai.bundle run --config_file configs/inference.json "
            "--dataset_dir /path/to/images", flush=True)
    return Bundle(root, pure, logged)
