"""Experiment configuration: a YAML file validated by pydantic, with dotted ``--set key=value`` overrides.

Every section forbids unknown keys, so a typo is an error that names the key and the file. The ``method:``
section is the config class of the method it names (``name``, standard when absent): each method's file in
``pipeline/adversarial/methods`` defines its class and its config class, and the section's type is built here
from their registry, so a knob of another method is an unknown key too.
"""

from __future__ import annotations

import copy
import difflib
from pathlib import Path
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import yaml
from pydantic import (BaseModel, ConfigDict, Discriminator, Field, Tag, TypeAdapter, ValidationError, create_model,
                      model_validator)

from pipeline.adversarial.methods import METHODS, BaseMethodConfig
from pipeline.adversarial.tasks import Task
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


def _method_tag(value: Any) -> str | None:
    """The ``name`` that picks a method's config class: from a mapping (absent: standard) or a config object."""
    name = value.get("name", "standard") if isinstance(value, dict) else getattr(value, "name", None)
    return None if name is None else str(name)


def method_union() -> Any:
    """The type of the ``method:`` section: the config classes of the registered methods (:data:`METHODS`), a
    union told apart by ``name``. Pydantic puts the name into the location of an error inside it
    (``method.ima.eps_min``); :func:`_format_errors` shows ``method.eps_min``."""
    ordered = sorted(METHODS.items(), key=lambda item: item[0] != "standard")   # standard first, then as found
    members = tuple(Annotated[cls.config_class, Tag(name)] for name, cls in ordered)
    return Annotated[Union[members], Discriminator(_method_tag)]  # noqa: UP007 (a union built at run time)


MethodConfig = method_union()   # the union of every method of pipeline/adversarial/methods
_ADAPTER: tuple[tuple, TypeAdapter] = (tuple(METHODS.items()), TypeAdapter(MethodConfig))


def method_config(**fields: Any) -> BaseMethodConfig:
    """The config object of the method ``fields["name"]`` (standard when absent), validated like the
    ``method:`` section of a YAML file, e.g. ``method_config(name="pgd_at", eps=0.5, steps=3)``."""
    global _ADAPTER
    key = tuple(METHODS.items())
    if _ADAPTER[0] != key:       # a method registered since (or removed)
        _ADAPTER = (key, TypeAdapter(method_union()))
    return _ADAPTER[1].validate_python(fields)


def method_knobs(name: str, /, **knobs: Any) -> dict[str, Any]:
    """The ``method:`` section ``{"name": name, ...}`` with those of ``knobs`` that method ``name`` has: one set
    of knobs for several methods (a benchmark, a test), e.g. ``method_knobs("standard", steps=2) ==
    {"name": "standard"}``. A config file gets no such filter: a knob its method lacks is an error."""
    fields = METHODS[name].config_class.model_fields
    return {"name": name, **{k: v for k, v in knobs.items() if k in fields and k != "name"}}


def _method_field() -> Any:
    return Field(default_factory=lambda: method_config(name="standard"),
                 description="the training method: its name (standard when absent) and the knobs of that method "
                             "only, as its config class in pipeline/adversarial/methods/<name>.py defines them")


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
    dice_threshold: float = Field(
        default=0.6, gt=0.0, le=1.0, description="segmentation: a sample is handled correctly when its Dice with "
                                                 "the mask is >= this; used by the training methods, validation "
                                                 "under attack, evaluation and predict --margin")
    seed: int = 0
    data: DataConfig
    model: ModelConfig = Field(default_factory=ModelConfig)
    method: MethodConfig = _method_field()
    train: TrainConfig = Field(default_factory=TrainConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    evaluate: EvaluateConfig = Field(default_factory=EvaluateConfig)

    @model_validator(mode="after")
    def _coherent(self) -> Config:
        if self.data.val_fraction + self.data.test_fraction >= 1.0:
            raise ValueError("data.val_fraction + data.test_fraction must be below 1")
        return self

    def build_task(self, num_classes: int) -> Task:
        """The task's losses and its "handled correctly" criterion (segmentation: ``dice_threshold``), for
        training, validation, evaluation and predict alike."""
        return Task.make(self.task, num_classes, self.dice_threshold)

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


# keys that moved: old location -> (new location, what it is)
MOVED = {("method", "dice_threshold"): ("dice_threshold", "the segmentation criterion of the task, a top-level "
                                                          "key next to task:")}
_BUILT_WITH = tuple(METHODS.items())   # the methods that Config's method: section knows
_CONFIG_MODEL: tuple[tuple, type[Config]] = (_BUILT_WITH, Config)


def _config_model() -> type[Config]:
    """``Config``, or a subclass of it whose ``method:`` section also knows the methods registered after this
    module was imported (a method class defined later, e.g. in a test)."""
    global _CONFIG_MODEL
    key = tuple(METHODS.items())
    if _CONFIG_MODEL[0] != key:
        model = Config if key == _BUILT_WITH else create_model(
            "Config", __base__=Config, __module__=__name__, method=(method_union(), _method_field()))
        _CONFIG_MODEL = (key, model)
    return _CONFIG_MODEL[1]


def _tagged_members(annotation: Any) -> dict[str, type[BaseModel]]:
    """tag -> member class of a tagged union (the ``method:`` section), {} for any other annotation."""
    if get_origin(annotation) is not Union:
        return {}
    members = {}
    for arg in get_args(annotation):
        cls, *meta = get_args(arg) if get_origin(arg) is Annotated else (arg,)
        tags = [m.tag for m in meta if isinstance(m, Tag)]
        if tags and isinstance(cls, type) and issubclass(cls, BaseModel):
            members[tags[0]] = cls
    return members


def _walk(loc: tuple, model: type[BaseModel]) -> tuple[tuple[str, ...], type[BaseModel] | None]:
    """(the key as written in the file, the section class holding its last part, None if unknown) for an error
    location: the tag pydantic adds after a tagged union's field (``method.ima.eps_min``) is left out."""
    shown: list[str] = []
    section: type[BaseModel] | None = model
    parts = [str(p) for p in loc]
    i = 0
    while i < len(parts):
        part = parts[i]
        shown.append(part)
        i += 1
        if i == len(parts):
            break
        field = section.model_fields.get(part) if section is not None else None
        annotation = field.annotation if field is not None else None
        members = _tagged_members(annotation)
        if members and parts[i] in members:
            section = members[parts[i]]
            i += 1          # the tag
        elif isinstance(annotation, type) and issubclass(annotation, BaseModel):
            section = annotation
        else:
            section = None
    return tuple(shown), section


def _closest_key(loc: tuple, model: type[BaseModel] = Config) -> str:
    """`` (did you mean data.mask_suffix?)`` for an unknown key close to a valid one of its section, else ``""``."""
    shown, section = _walk(loc, model)
    if section is None:
        return ""
    match = difflib.get_close_matches(shown[-1], list(section.model_fields), n=1, cutoff=0.6)
    return f" (did you mean {'.'.join([*shown[:-1], match[0]])}?)" if match else ""


def _unknown_key(source: str, loc: tuple, model: type[BaseModel]) -> str:
    shown, section = _walk(loc, model)
    key = ".".join(shown)
    if shown in MOVED:
        new, what = MOVED[shown]
        return f"{source}: {key}: this key moved: set {new} instead ({what})"
    hint = _closest_key(loc, model)
    if section is not None and issubclass(section, BaseMethodConfig):
        name = section.model_fields["name"].default
        owners = [other for other, cls in METHODS.items() if shown[-1] in cls.config_class.model_fields]
        # a knob of other methods: say whose (a close name of this method's, e.g. eps -> steps, would mislead)
        notes = [f"a knob of {', '.join(owners)}"] if owners else [hint.strip(" ()")] if hint else []
        if not notes:
            notes = [f"its keys: {', '.join(k for k in section.model_fields if k != 'name') or 'none'}"]
        return f"{source}: {key}: unknown key for method '{name}' ({'; '.join(notes)})"
    return f"{source}: {key}: unknown key{hint}"


def _format_errors(source: str, exc: ValidationError, model: type[BaseModel] = Config) -> list[str]:
    lines = []
    for err in exc.errors():
        loc = tuple(err["loc"])
        key = ".".join(_walk(loc, model)[0]) or "(top level)"
        if err["type"] == "extra_forbidden":
            lines.append(_unknown_key(source, loc, model))
        elif err["type"] == "missing":
            lines.append(f"{source}: {key}: required key is missing")
        elif err["type"] == "union_tag_invalid":   # method.name: not a registered method
            tag, expected = str(err["ctx"]["tag"]), str(err["ctx"]["expected_tags"])
            match = difflib.get_close_matches(tag, [t.strip(" '") for t in expected.split(",")], n=1)
            hint = f" (did you mean {match[0]}?)" if match else ""
            lines.append(f"{source}: {key}.name: Input should be one of {expected} (got {tag!r}){hint}")
        elif err["type"] == "union_tag_not_found":
            lines.append(f"{source}: {key}: expected a mapping with the method's name and knobs, e.g. "
                         f"{{name: pgd_at, eps: 0.5}} (got {err.get('input')!r})")
        else:
            got = err.get("input")
            shown = "" if isinstance(got, dict) else f" (got {got!r})"
            msg = str(err["ctx"]["error"]) if err["type"] == "value_error" and "error" in err.get("ctx", {}) \
                else err["msg"]
            lines.append(f"{source}: {key}: {msg}{shown}")
    return lines


def config_from_dict(raw: Any, source: str = "<config>") -> Config:
    if not isinstance(raw, dict):
        raise InputError(f"{source}: expected a mapping of sections at the top level")
    model = _config_model()
    try:
        return model.model_validate(raw)
    except ValidationError as exc:
        raise InputError(_format_errors(source, exc, model)) from None


def stored_config(raw: Any, source: str = "<stored config>") -> Config:
    """A resolved config stored by this or an earlier version (a checkpoint's ``config``), validated.

    Earlier versions kept ``dice_threshold`` in the method section, and one flat method section with every
    method's knobs (those of other methods unused, ``null`` meaning the method's default): the key moves to the
    top level, the knobs the method does not have and the nulls are dropped. A user's YAML gets no such help:
    :func:`config_from_dict` reports those keys."""
    if isinstance(raw, dict) and isinstance(raw.get("method"), dict):
        raw = copy.deepcopy(raw)
        method = raw["method"]
        if "dice_threshold" in method:
            raw.setdefault("dice_threshold", method.pop("dice_threshold"))
        cls = METHODS.get(_method_tag(method) or "")
        if cls is not None:
            knobs = cls.config_class.model_fields
            raw["method"] = {k: v for k, v in method.items() if k in knobs and v is not None}
    return config_from_dict(raw, source)


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
