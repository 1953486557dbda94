"""Build our transforms from config specs: ``data.preprocess: [{name: shades_of_gray, power: 6}, ...]``.

Each spec is a dict with ``name`` (one of :data:`REGISTRY`) and that transform's keyword arguments. A spec may
give ``keys`` to override the default keys. Any problem raises :class:`pipeline.errors.InputError` naming the
spec as ``data.preprocess[i]``.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from typing import Any

from monai.transforms import MapTransform

from pipeline.errors import InputError
from transforms.dermatology import LesionCentredCropd, RemoveHaird, ShadesOfGrayd
from transforms.radiology import CTWindowd, MRIPercentileNormalised

__all__ = ["REGISTRY", "build_preprocess"]

#: Config name -> dictionary transform class. Arguments are the class's keyword arguments other than keys.
REGISTRY: dict[str, Callable[..., MapTransform]] = {
    "remove_hair": RemoveHaird,
    "shades_of_gray": ShadesOfGrayd,
    "lesion_crop": LesionCentredCropd,
    "ct_window": CTWindowd,
    "mri_percentile": MRIPercentileNormalised,
}

def _allowed_arguments(name: str) -> set[str]:
    """Keyword arguments of a registered class (``keys`` included; ``**kwargs`` not)."""
    params = inspect.signature(REGISTRY[name]).parameters
    return {p for p, v in params.items() if v.kind not in (v.VAR_KEYWORD, v.VAR_POSITIONAL)}


def build_preprocess(specs: Sequence[dict[str, Any]], keys: Sequence[str] = ("image",),
                     where: str = "data.preprocess") -> list[MapTransform]:
    """One dictionary transform per spec, in order. ``keys`` default to ``["image"]``; ``lesion_crop`` with a
    ``mask_key`` also crops that key."""
    built: list[MapTransform] = []
    for i, spec in enumerate(specs):
        at = f"{where}[{i}]"
        if not isinstance(spec, dict) or "name" not in spec:
            raise InputError(f"{at}: expected a mapping with a 'name', got {spec!r}")
        args = dict(spec)
        name = args.pop("name")
        if not isinstance(name, str) or name not in REGISTRY:
            raise InputError(f"{at}: unknown transform {name!r} (known: {', '.join(sorted(REGISTRY))})")
        unknown = sorted(set(args) - _allowed_arguments(name))
        if unknown:
            allowed = sorted(_allowed_arguments(name) - {"allow_missing_keys"})
            raise InputError(f"{at}: {name} has no argument {', '.join(map(repr, unknown))} "
                             f"(arguments: {', '.join(allowed)})")
        spec_keys = args.pop("keys", list(keys) or ["image"])
        try:
            built.append(REGISTRY[name](keys=spec_keys, **args))
        except (TypeError, ValueError) as exc:
            raise InputError(f"{at}: {name}: {exc}") from None
    return built
