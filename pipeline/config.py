"""Experiment configuration: a YAML file validated by pydantic, with dotted ``--set key=value`` overrides.

Every section forbids unknown keys, so a typo is an error that names the key and the file.
"""

from __future__ import annotations

import copy
import difflib
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from pipeline.errors import InputError


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class CsvColumns(_Section):
    """Column names of a ``source: csv`` table; a column that is absent is simply not used (``image`` is required,
    ``label`` for classification, ``mask`` for segmentation). Every other column is kept as metadata."""

    image: str = "image"
    label: str = "label"
    mask: str = "mask"
    roi: str = "roi"
    split: str = "split"
    group: str | None = Field(default=None, description="rows sharing a value (a patient) stay in one split")


class DataConfig(_Section):
    source: Literal["medmnist", "ham10000", "isic2017", "nifti", "dicom", "synthetic", "folder", "csv"]
    root: Path | None = None
    limit: int | None = Field(default=None, ge=1, description="cap on training samples, for quick runs")
    val_fraction: float = Field(default=0.15, ge=0.0, lt=1.0)
    test_fraction: float = Field(default=0.15, ge=0.0, lt=1.0)
    split_seed: int = 0
    cache: Literal["none", "cache", "persistent"] = "cache"
    cache_dir: Path | None = None
    skip_missing: bool = Field(default=False, description="skip images listed in a CSV but absent (counted)")
    image_size: list[int] | None = Field(default=None, description="resize 2D images to this size (H, W)")
    spacing: list[float] | None = Field(default=None, description="3D: resample to this voxel spacing (mm)")
    orientation: str | None = Field(default=None, description="3D: reorient to these axis codes, e.g. RAS")
    patch_size: list[int] | None = Field(default=None, description="3D: training patch size")
    patches_per_volume: int = Field(default=2, ge=1)
    image_series: list[str] | None = Field(default=None, description="DICOM: series folder patterns stacked as channels")
    mask_series: str | None = Field(default=None, description="DICOM: series folder pattern of the label mask")
    intensity_range: tuple[float, float] | None = Field(
        default=(0.0, 1.0), description="valid intensity range after preprocessing; attacks clamp to it")
    preprocess: list[dict[str, Any]] = Field(
        default_factory=list, description="our transforms by name with their arguments, e.g. {name: shades_of_gray}")
    num_classes: int | None = None
    synthetic_size: int = Field(default=600, ge=8, description="synthetic source: number of images")
    class_names: list[str] | None = Field(default=None, description="class names in label order; overrides "
                                                                    "the names found in the data")
    # folder and csv sources (generic 2D images: PNG, JPEG, TIFF, BMP, GIF)
    images_dir: str = Field(default="images", description="folder: the images (classification: one subfolder "
                                                          "per class)")
    image_suffix: str = Field(default="", description="folder: end of every image stem, not part of the id")
    masks_dir: str = Field(default="masks", description="folder: the masks, named <id><mask_suffix>.<ext>")
    mask_suffix: str = Field(default="", description="folder: e.g. _mask, _segmentation, _manual1")
    roi_dir: str | None = Field(default=None, description="folder: optional region-of-interest (field-of-view) "
                                                         "masks, named <id><roi_suffix>.<ext>")
    roi_suffix: str = ""
    columns: CsvColumns = Field(default_factory=CsvColumns, description="csv: column names")
    mask_mode: Literal["binary", "labels"] = Field(
        default="binary", description="binary: > 127 is foreground (0/1 masks: 1); labels: integer classes kept")
    resize_mode: Literal["stretch", "pad"] = Field(
        default="stretch", description="stretch to image_size, or keep the aspect ratio and zero-pad")
    channels: Literal[1, 3] | None = Field(default=None, description="folder/csv: 1 grey, 3 RGB; None: as the "
                                                                     "first image")
    augment: Literal["flips", "none"] = Field(default="flips", description="folder/csv: random flips and "
                                                                            "quarter turns in training, or none")

    def dataset_tag(self) -> str:
        """The MLflow dataset tag: the source and the name of the data folder (a file's folder), e.g.
        ``folder:kvasir``; just the source when there is no root."""
        if self.root is None:
            return self.source
        root = Path(self.root).expanduser().absolute()
        folder = root.parent if self.source in ("csv", "medmnist") or root.is_file() else root
        return f"{self.source}:{folder.name}"


class ModelConfig(_Section):
    name: Literal["resnet18", "resnet34", "densenet121", "small_cnn", "unet", "segresnet"] = "resnet18"
    channels: list[int] | None = Field(default=None, description="UNet/SegResNet channels per level")
    dropout: float = 0.0


class MethodConfig(_Section):
    name: Literal["standard", "pgd_at", "trades", "ima", "dpaat", "mart"] = "standard"
    norm: Literal["L2", "Linf"] = "L2"
    eps: float = Field(default=0.5, ge=0.0, description="fixed radius (pgd_at, trades, mart) / initial radius (dpaat)")
    steps: int = Field(default=10, ge=1, description="K attack steps")
    alpha: float = Field(default=4.0, gt=0.0, description="step size = alpha * eps / K")
    beta: float | None = Field(default=None, ge=0.0, description="loss weight; None: the method's default")
    delta: float = Field(default=0.03, gt=0.0, description="IMA/DPAAT radius increment")
    eps_max: float = Field(default=3.0, gt=0.0)
    eps_min: float = Field(default=0.0, ge=0.0)
    bisection_steps: int = Field(default=10, ge=0)
    dice_threshold: float = Field(default=0.6, gt=0.0, le=1.0, description="segmentation: 'handled correctly'")
    quantile: float = Field(default=0.5, gt=0.0, lt=1.0, description="DPAAT q")
    momentum: float = Field(default=0.5, ge=0.0, le=1.0, description="DPAAT m")
    attack_loss: Literal["ce", "margin", "slm"] | None = Field(
        default=None, description="what the attack maximises; None: the method's default (IMA classification: "
                                  "slm, the soft logit margin of the released code; otherwise ce = the training loss)")
    attack_bn: Literal["batch", "running"] | None = Field(
        default=None, description="BatchNorm in the attack, its flags and bisection: 'batch' = statistics of the "
                                  "clean training batch, 'running' = running statistics (eval mode); None: the "
                                  "method's default (IMA batch, as the released code; the others running). Attack "
                                  "forwards never move the running statistics")
    boundary_bracket: Literal["final", "first_wrong"] = Field(
        default="final", description="IMA: bisect [x, final PGD iterate] (released code) or [x, first iterate "
                                     "not handled correctly] (faster, less exact boundary distances)")
    random_start: bool = True


class TrainConfig(_Section):
    epochs: int = Field(default=10, ge=1)
    batch_size: int = Field(default=64, ge=1)
    lr: float = Field(default=1e-3, gt=0.0)
    optimizer: Literal["adam", "adamw", "sgd"] = "adam"
    weight_decay: float = Field(default=0.0, ge=0.0)
    scheduler: Literal["none", "cosine"] = Field(default="none", description="learning-rate schedule per epoch")
    device: str = Field(default="auto", description="auto, cpu, cuda, cuda:N")
    amp: bool = False
    amp_dtype: Literal["bfloat16", "float16"] = "bfloat16"
    channels_last: bool = False
    compile: bool = False
    num_workers: int = Field(default=0, ge=0)
    shuffle: bool = True
    output_dir: Path | None = None
    checkpoint_every_iters: int = Field(default=0, ge=0, description="0: every epoch only")
    val_every: int = Field(default=1, ge=1)
    deterministic: bool = False
    progress: bool = True


class TrackingConfig(_Section):
    uri: str | None = Field(default=None, description="None: MLFLOW_TRACKING_URI or MLflow's local default")
    experiment: str | None = None
    run_name: str | None = None
    offline_ok: bool = False
    log_model: bool = Field(default=True, description="log the final network with mlflow.pytorch (an export)")
    parent_run_id: str | None = Field(default=None, description="nest the run under this MLflow run (a study's)")


class EvaluateConfig(_Section):
    eps_l2: list[float] = Field(default_factory=lambda: [0.25, 0.5, 1.0])
    eps_linf: list[float] = Field(default_factory=lambda: [1 / 255, 2 / 255, 4 / 255])
    norms: list[Literal["L2", "Linf"]] = Field(default_factory=lambda: ["L2", "Linf"])
    steps: int = Field(default=100, ge=1)
    restarts: int = Field(default=1, ge=1, description="PGD runs per attack loss (each on the samples still unbroken)")
    losses: list[Literal["ce", "margin"]] = Field(default_factory=lambda: ["ce", "margin"])
    apgd: bool = Field(default=True, description="APGD-CE and APGD-T (targeted DLR) with the same steps join PGD "
                                                 "in the reported worst case")
    apgd_targets: int = Field(default=3, ge=0, description="APGD-T runs, one per target class (the most likely "
                                                           "other classes on the clean input; classification)")
    schedule: Literal["early_exit", "exhaustive"] = Field(
        default="early_exit", description="early_exit: attack only samples still handled correctly, radii in "
                                          "increasing order; exhaustive: every attack on every sample and radius")
    batch_size: int = Field(default=128, ge=1)
    max_samples: int | None = Field(default=None, ge=1)
    split: Literal["val", "test"] = "test"
    fgsm: bool = True
    noise: bool = True
    margin: bool = True
    gradcam_per_class: int = Field(default=2, ge=0)
    stratify: list[str] = Field(default_factory=lambda: ["label", "sex", "age_band", "localization"])
    # per-epoch validation under attack (segmentation): a cheap trend, not the protocol above (medrobust evaluate);
    # by default 4% of a training epoch of the ISIC 2017 standard config, the cheapest (docs/evaluation.md)
    epoch_steps: int = Field(default=5, ge=0, description="segmentation: PGD steps of the per-epoch validation "
                                                          "under attack; 0: off")
    epoch_max_samples: int = Field(default=16, ge=1, description="the first N validation samples are attacked")
    epoch_every: int = Field(default=1, ge=1, description="attack at every N-th validation epoch (and the last)")
    epoch_radii: Literal["largest", "all"] = Field(
        default="largest", description="per epoch: the largest eps of each norm, or every eps of the lists")
    overlay_cases: int = Field(default=4, ge=0, description="validation cases in the per-epoch overlay figure")


class Config(_Section):
    experiment: str
    task: Literal["classification", "segmentation"] = "classification"
    seed: int = 0
    data: DataConfig
    model: ModelConfig = Field(default_factory=ModelConfig)
    method: MethodConfig = Field(default_factory=MethodConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    evaluate: EvaluateConfig = Field(default_factory=EvaluateConfig)

    @model_validator(mode="after")
    def _coherent(self) -> Config:
        if self.data.val_fraction + self.data.test_fraction >= 1.0:
            raise ValueError("data.val_fraction + data.test_fraction must be below 1")
        if self.method.eps_min > self.method.eps_max:
            raise ValueError("method.eps_min must not exceed method.eps_max")
        return self

    def resolved(self) -> dict[str, Any]:
        """The resolved configuration as plain data (paths as strings), for MLflow params and artifacts."""
        return self.model_dump(mode="json")


def parse_override(text: str) -> tuple[list[str], Any]:
    """``a.b.c=value`` -> (["a", "b", "c"], value parsed as YAML, so numbers, bools, lists keep their type)."""
    if "=" not in text:
        raise InputError(f"--set {text}: expected key=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise InputError(f"--set {text}: empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    out = copy.deepcopy(raw)
    for text in overrides:
        parts, value = parse_override(text)
        node = out
        for part in parts[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise InputError(f"--set {text}: '{part}' is not a section")
            node = child
        node[parts[-1]] = value
    return out


def _closest_key(loc: tuple) -> str:
    """`` (did you mean data.mask_suffix?)`` for an unknown key close to a valid one of its section, else ``""``."""
    model: type[BaseModel] = Config
    for part in loc[:-1]:
        field = model.model_fields.get(str(part))
        if field is None or not (isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel)):
            return ""
        model = field.annotation
    match = difflib.get_close_matches(str(loc[-1]), list(model.model_fields), n=1, cutoff=0.6)
    return f" (did you mean {'.'.join([*map(str, loc[:-1]), match[0]])}?)" if match else ""


def _format_errors(source: str, exc: ValidationError) -> list[str]:
    lines = []
    for err in exc.errors():
        key = ".".join(str(p) for p in err["loc"]) or "(top level)"
        if err["type"] == "extra_forbidden":
            lines.append(f"{source}: {key}: unknown key{_closest_key(tuple(err['loc']))}")
        elif err["type"] == "missing":
            lines.append(f"{source}: {key}: required key is missing")
        else:
            got = err.get("input")
            shown = "" if isinstance(got, dict) else f" (got {got!r})"
            lines.append(f"{source}: {key}: {err['msg']}{shown}")
    return lines


def config_from_dict(raw: Any, source: str = "<config>") -> Config:
    if not isinstance(raw, dict):
        raise InputError(f"{source}: expected a mapping of sections at the top level")
    try:
        return Config.model_validate(raw)
    except ValidationError as exc:
        raise InputError(_format_errors(source, exc)) from None


def load_config(path: str | Path, overrides: list[str] | None = None) -> Config:
    """Read a YAML experiment config with a safe loader, apply ``--set`` overrides, validate."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: config file not found")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise InputError(f"{path}: not valid YAML ({reason})") from None
    raw = apply_overrides(raw or {}, list(overrides or []))
    if isinstance(raw, dict) and raw.get("experiment") is None:
        raw["experiment"] = path.stem  # the config file names the experiment unless it sets one
    return config_from_dict(raw, str(path))
