"""Radiology intensity transforms: CT window presets and MRI percentile normalisation over the foreground.

Both accept channel-first images of any spatial dimension (``(C, H, W)`` or ``(C, D, H, W)``) as numpy arrays,
torch tensors or MetaTensors, return the same type (metadata kept) and a float result in [0, 1].
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.transforms import MapTransform, ScaleIntensityRange, Transform
from monai.utils import convert_data_type, convert_to_dst_type

__all__ = ["CT_WINDOWS", "CTWindow", "CTWindowd", "MRIPercentileNormalise", "MRIPercentileNormalised"]

#: CT window presets as (width, level) in Hounsfield units.
CT_WINDOWS: dict[str, tuple[float, float]] = {
    "brain": (80.0, 40.0),
    "subdural": (200.0, 80.0),
    "soft_tissue": (400.0, 40.0),
    "lung": (1500.0, -600.0),
    "bone": (1800.0, 400.0),
    "liver": (150.0, 30.0),
}


def resolve_window(preset: str | None, width: float | None, level: float | None) -> tuple[float, float]:
    """(width, level) of a preset name, or the explicit pair; exactly one of the two must be given."""
    if preset is not None:
        if width is not None or level is not None:
            raise ValueError("give either a preset or width and level, not both")
        if preset not in CT_WINDOWS:
            raise ValueError(f"unknown CT window preset {preset!r} (known: {', '.join(CT_WINDOWS)})")
        return CT_WINDOWS[preset]
    if width is None or level is None:
        raise ValueError(f"give a preset ({', '.join(CT_WINDOWS)}) or both width and level")
    if not float(width) > 0:
        raise ValueError(f"window width must be > 0, got {width}")
    return float(width), float(level)


class CTWindow(ScaleIntensityRange):
    """A CT window: Hounsfield units ``[level - width / 2, level + width / 2]`` -> [0, 1], clipped outside.

    A preset of :data:`CT_WINDOWS` (brain, subdural, soft_tissue, lung, bone, liver) or explicit
    ``width`` and ``level``. This is MONAI's :class:`~monai.transforms.ScaleIntensityRange` with those bounds.
    """

    def __init__(self, preset: str | None = None, width: float | None = None, level: float | None = None,
                 dtype: Any = np.float32) -> None:
        self.width, self.level = resolve_window(preset, width, level)
        self.preset = preset
        super().__init__(a_min=self.level - self.width / 2.0, a_max=self.level + self.width / 2.0,
                         b_min=0.0, b_max=1.0, clip=True, dtype=dtype)

    def __call__(self, img: Any) -> Any:
        """MONAI's scaling; a numpy input comes back as numpy (MONAI itself returns a MetaTensor)."""
        out = super().__call__(img)
        return convert_to_dst_type(out, img, dtype=self.dtype)[0] if isinstance(img, np.ndarray) else out


class CTWindowd(MapTransform):
    """Dictionary version of :class:`CTWindow`."""

    backend = CTWindow.backend

    def __init__(self, keys: KeysCollection, preset: str | None = None, width: float | None = None,
                 level: float | None = None, dtype: Any = np.float32, allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.transform = CTWindow(preset=preset, width=width, level=level, dtype=dtype)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.transform(d[key])
        return d


class MRIPercentileNormalise(Transform):
    """Per-channel percentile scaling of an MRI volume over its foreground (non-zero) voxels only.

    For each channel, ``lower`` and ``upper`` percentiles of the non-zero voxels map to 0 and 1, values are
    clipped to [0, 1], and background voxels (exactly zero) stay 0. MONAI's ``ScaleIntensityRangePercentiles``
    computes the percentiles over all voxels, where a large zero background drags the lower one to 0.
    A channel with no foreground stays all zero; one whose foreground is constant maps it to 0.
    """

    backend = [*ScaleIntensityRange.backend]

    def __init__(self, lower: float = 1.0, upper: float = 99.0, dtype: Any = np.float32) -> None:
        if not 0.0 <= float(lower) < float(upper) <= 100.0:
            raise ValueError(f"need 0 <= lower < upper <= 100, got lower={lower}, upper={upper}")
        self.lower, self.upper, self.dtype = float(lower), float(upper), dtype

    def __call__(self, img: Any) -> Any:
        x, *_ = convert_data_type(img, output_type=torch.Tensor, dtype=torch.float64, wrap_sequence=True)
        x = x.as_tensor() if hasattr(x, "as_tensor") else x
        out = torch.zeros_like(x)
        for c in range(x.shape[0]):
            channel = x[c]
            foreground = channel != 0
            if not foreground.any():
                continue
            values = channel[foreground].cpu().numpy()
            lo, hi = np.percentile(values, [self.lower, self.upper])
            scaled = (channel - lo) / max(hi - lo, np.finfo(np.float64).tiny)
            out[c] = torch.where(foreground, scaled.clamp(0.0, 1.0), torch.zeros_like(channel))
        return convert_to_dst_type(out, img, dtype=self.dtype)[0]


class MRIPercentileNormalised(MapTransform):
    """Dictionary version of :class:`MRIPercentileNormalise`."""

    backend = MRIPercentileNormalise.backend

    def __init__(self, keys: KeysCollection, lower: float = 1.0, upper: float = 99.0, dtype: Any = np.float32,
                 allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.transform = MRIPercentileNormalise(lower=lower, upper=upper, dtype=dtype)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.transform(d[key])
        return d
