"""The preprocessing a model was trained with, for new inputs: MONAI bundle config items.

``preprocessing_spec(cfg, data)`` describes, as a list of ``{"_target_": ..., ...}`` items, what the data
source of ``cfg`` does to an image when it is loaded for validation, starting from a file instead of the
source's own layout: MedMNIST and synthetic images (arrays in training) come from PNG/JPEG files here and
are resized to the training size; HAM10000, ISIC 2017 and the generic folders read files as in training;
NIfTI and DICOM volumes are reoriented, resampled and scaled as in training. ``build`` parses the items with
MONAI's ``ConfigParser`` (so ``predict`` runs exactly what a bundle runs); ``monai_only`` says whether the
items need anything besides MONAI (our ``data.preprocess`` transforms, the DICOM reader).
"""

from __future__ import annotations

from typing import Any

from monai.bundle import ConfigParser
from monai.transforms import Compose, Orientationd, Spacingd

from pipeline.config import Config
from pipeline.errors import InputError

ARRAY_SOURCES = {"medmnist", "synthetic"}      # arrays in training, image files here
FILE_SOURCES = {"ham10000", "isic2017"}        # image files read by PILReader, as in training
GENERIC_SOURCES = {"folder", "csv"}
VOLUME_SOURCES = {"nifti", "dicom"}
OURS = ("transforms.", "pipeline.")

Spec = list[dict[str, Any]]


def _item(target: str, **kwargs: Any) -> dict[str, Any]:
    return {"_target_": target, **kwargs}


def _ours(specs: list[dict[str, Any]]) -> Spec:
    """``data.preprocess`` specs as config items naming our transform classes."""
    if not specs:
        return []
    from transforms.registry import REGISTRY  # noqa: PLC0415 - only models trained with them need it

    items = []
    for i, spec in enumerate(specs):
        args = dict(spec)
        cls = REGISTRY.get(args.pop("name", None))
        if cls is None:
            raise InputError(f"data.preprocess[{i}]: unknown transform {spec.get('name')!r}")
        items.append(_item(f"{cls.__module__}.{cls.__name__}", keys=args.pop("keys", ["image"]), **args))
    return items


def _scale_0_255() -> dict[str, Any]:
    return _item("ScaleIntensityRanged", keys="image", a_min=0.0, a_max=255.0, b_min=0.0, b_max=1.0, clip=True)


def _float() -> dict[str, Any]:
    return _item("EnsureTyped", keys="image", dtype="$torch.float32")


def _resize(size: list[int], mode: str = "stretch") -> Spec:
    if mode == "stretch":
        return [_item("Resized", keys="image", spatial_size=list(size), mode="bilinear", anti_aliasing=True)]
    return [_item("Resized", keys="image", spatial_size=max(size), size_mode="longest", mode="bilinear",
                  anti_aliasing=True), _item("ResizeWithPadOrCropd", keys="image", spatial_size=list(size))]


def _load_2d(converter: str | dict[str, Any]) -> Spec:
    reader = _item("PILReader", converter=converter, reverse_indexing=False)
    return [_item("LoadImaged", keys="image", reader=reader, image_only=True),
            _item("EnsureChannelFirstd", keys="image")]


def preprocessing_spec(cfg: Config, data: dict[str, Any]) -> Spec:
    """The validation-time preprocessing of a model trained with ``cfg`` (``data``: the checkpoint's data
    description: in_channels, image_size, spacing, orientation), from an input file to the network's input."""
    source, channels = cfg.data.source, int(data["in_channels"])
    ours = _ours(cfg.data.preprocess)
    size = list(data.get("image_size") or [])
    if source in ARRAY_SOURCES | FILE_SOURCES:
        mode = "RGB" if channels == 3 else "L"
        load = _load_2d(f"$lambda im: im.convert('{mode}')")
        if source in ARRAY_SOURCES:   # load_2d_arrays: scale, float, ours, then the training size
            return [*load, _scale_0_255(), _float(), *ours, *_resize(size)]
        return [*load, _scale_0_255(), *ours, *_resize(size), _float()]  # load_2d_files
    if source in GENERIC_SOURCES:      # generic2d.load_transforms, its 16-bit aware converters
        converter = {"_target_": f"pipeline.data.masks.{'to_grey8' if channels == 1 else 'to_rgb8'}",
                     "_mode_": "callable"}
        return [*_load_2d(converter), _scale_0_255(), *ours, *_resize(size, cfg.data.resize_mode), _float()]
    if source in VOLUME_SOURCES:       # loading.load_3d
        reader = ("NibabelReader" if source == "nifti"
                  else _item("pipeline.data.dicom_series.PositionSortedDicomReader"))
        steps = [_item("LoadImaged", keys="image", reader=reader, image_only=True),
                 _item("EnsureChannelFirstd", keys="image")]
        if data.get("orientation"):
            steps.append(_item("Orientationd", keys="image", axcodes=data["orientation"],
                               labels=[["L", "R"], ["P", "A"], ["I", "S"]]))
        if data.get("spacing"):
            steps.append(_item("Spacingd", keys="image", pixdim=list(data["spacing"]), mode="bilinear"))
        steps += ours or [_item("ScaleIntensityRangePercentilesd", keys="image", lower=0.5, upper=99.5, b_min=0.0,
                                b_max=1.0, clip=True, channel_wise=True)]
        return [*steps, _float()]
    raise InputError(f"data.source: no inference preprocessing is known for '{source}'")


def build(spec: Spec) -> Compose:
    """The spec as a MONAI ``Compose``, parsed by MONAI's ``ConfigParser`` as a bundle would parse it."""
    return ConfigParser({"preprocessing": _item("Compose", transforms=spec)}).get_parsed_content("preprocessing")


def monai_only(spec: Spec) -> bool:
    """True when every item (readers and converters included) is MONAI's or plain Python."""
    def targets(value: Any):
        if isinstance(value, dict):
            if "_target_" in value:
                yield str(value["_target_"])
            for v in value.values():
                yield from targets(v)
        elif isinstance(value, list):
            for v in value:
                yield from targets(v)
        elif isinstance(value, str) and value.startswith(OURS):
            yield value
    return not any(t.startswith(OURS) for t in targets(spec))


def geometry_of(load_transforms: Compose, patch_size: Any = None) -> dict[str, Any]:
    """What a 3D model's preprocessing needs beyond its config: the orientation and voxel spacing its volumes
    were resampled to (a NIfTI source picks the finest spacing found when ``data.spacing`` is unset), and the
    sliding-window size; empty for 2D sources. Recorded in the checkpoint's ``data``."""
    out: dict[str, Any] = {}
    for t in getattr(load_transforms, "transforms", []):
        if isinstance(t, Orientationd):
            out["orientation"] = t.ornt_transform.axcodes
        elif isinstance(t, Spacingd):
            out["spacing"] = [float(v) for v in t.spacing_transform.pixdim]
    if patch_size:
        out["patch_size"] = [int(v) for v in patch_size]
    return out
