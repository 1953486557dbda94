"""Dermatology transforms: hair removal, Shades-of-Gray colour constancy, lesion-centred crop.

All take channel-first 2D images ``(C, H, W)`` as numpy arrays, torch tensors or MetaTensors and return the
same type (MetaTensor metadata and affine kept). Hair removal and colour constancy work in any intensity range:
uint8 images stay uint8 in [0, 255], float images in [0, 1] stay in [0, 1] (see :func:`intensity_range`).

The lesion crop is MONAI's :class:`~monai.transforms.CropForeground` with our own bounding box (lesion found
from a mask or by thresholding, margin as a fraction of the lesion size, optional square box), so it is
traced on MetaTensors and inverted by MONAI's ``inverse`` like any MONAI crop.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np
from monai.config import KeysCollection
from monai.transforms import CropForeground, CropForegroundd, MapTransform, Transform
from monai.transforms.utils import generate_spatial_bounding_box
from monai.utils import convert_to_dst_type, convert_to_numpy
from scipy import ndimage
from skimage.filters import threshold_otsu
from skimage.measure import label as connected_components
from skimage.morphology import black_tophat, closing, disk
from skimage.restoration import inpaint_biharmonic

__all__ = [
    "intensity_range", "RemoveHair", "RemoveHaird", "ShadesOfGray", "ShadesOfGrayd",
    "LesionCentredCrop", "LesionCentredCropd", "find_lesion",
]


def intensity_range(array: np.ndarray) -> tuple[float, float]:
    """The nominal intensity range of an image: uint8 -> (0, 255); float with max <= 1 -> (0, 1); float with
    max <= 255 -> (0, 255); anything else -> (min(0, actual min), actual max). Negative values lower the bottom."""
    lo = min(0.0, float(array.min())) if array.size else 0.0
    if array.dtype == np.uint8:
        return 0.0, 255.0
    top = float(array.max()) if array.size else 1.0
    hi = 1.0 if top <= 1.0 else 255.0 if top <= 255.0 else top
    return lo, hi


def _restore(result: np.ndarray, img: Any, source_dtype: np.dtype, lo: float, hi: float) -> Any:
    """Clip to ``[lo, hi]``, round for integer inputs, and convert back to the input's type, dtype and device."""
    result = np.clip(result, lo, hi)
    if np.issubdtype(source_dtype, np.integer):
        result = np.rint(result)
    return convert_to_dst_type(result, img)[0]


def _grey(image: np.ndarray) -> np.ndarray:
    """Mean over channels of a (C, H, W) float array."""
    return image.mean(axis=0)


# ----------------------------------------------------------------------------------------------- hair removal
def _line_footprints(radius: int) -> list[np.ndarray]:
    """Four line footprints of length ``2 * radius + 1`` at 0, 45, 90 and 135 degrees."""
    n = 2 * radius + 1
    horizontal = np.zeros((n, n), bool)
    horizontal[radius, :] = True
    diagonal = np.eye(n, dtype=bool)
    return [horizontal, horizontal.T.copy(), diagonal, diagonal[::-1].copy()]


def _diffusion_inpaint(image: np.ndarray, mask: np.ndarray, iterations: int) -> np.ndarray:
    """Fill ``mask`` pixels of a (C, H, W) image: nearest unmasked value, then Jacobi iterations of the
    4-neighbour mean on the masked pixels only (a discrete harmonic fill; values stay inside the known range)."""
    _, nearest = ndimage.distance_transform_edt(mask, return_indices=True)
    out = image[:, nearest[0], nearest[1]]
    rows, cols = np.nonzero(mask)
    for _ in range(iterations):
        padded = np.pad(out, ((0, 0), (1, 1), (1, 1)), mode="edge")
        mean = (padded[:, rows, cols + 1] + padded[:, rows + 2, cols + 1]
                + padded[:, rows + 1, cols] + padded[:, rows + 1, cols + 2]) / 4.0
        out[:, rows, cols] = mean
    return out


class RemoveHair(Transform):
    """Remove thin dark hair from a dermoscopy image (``(C, H, W)``, any intensity range).

    1. Black-hat (closing minus image) of the channel-mean image with a ``disk`` of radius ``size`` or, with
       ``footprint="lines"``, the largest black-hat over four line footprints of length ``2 * size + 1``.
       Dark structures narrower than the footprint respond; larger dark blobs (the lesion) do not.
    2. Hair mask: response above ``threshold`` (a fraction of the image's intensity range), grown by
       ``dilate`` pixels to cover the soft hair edges.
    3. Inpaint the masked pixels in every channel: ``"diffusion"`` (nearest fill plus harmonic smoothing, fast)
       or ``"biharmonic"`` (:func:`skimage.restoration.inpaint_biharmonic`, smoother, slower on much hair).

    Output has the input's type, dtype and intensity range.
    """

    backend = ["numpy", "torch"]

    def __init__(self, size: int = 5, footprint: str = "disk", threshold: float = 0.1, dilate: int = 1,
                 method: str = "diffusion", iterations: int = 30) -> None:
        if int(size) < 1:
            raise ValueError(f"size must be >= 1, got {size}")
        if footprint not in ("disk", "lines"):
            raise ValueError(f"footprint must be 'disk' or 'lines', got {footprint!r}")
        if not 0.0 < float(threshold) < 1.0:
            raise ValueError(f"threshold is a fraction of the intensity range in (0, 1), got {threshold}")
        if int(dilate) < 0:
            raise ValueError(f"dilate must be >= 0, got {dilate}")
        if method not in ("diffusion", "biharmonic"):
            raise ValueError(f"method must be 'diffusion' or 'biharmonic', got {method!r}")
        self.size, self.footprint, self.threshold = int(size), footprint, float(threshold)
        self.dilate, self.method, self.iterations = int(dilate), method, int(iterations)

    def hair_mask(self, image: np.ndarray, lo: float, hi: float) -> np.ndarray:
        """Boolean (H, W) hair mask of a float (C, H, W) image whose range is ``[lo, hi]``."""
        grey = (_grey(image) - lo) / max(hi - lo, 1e-12)
        if self.footprint == "disk":
            response = black_tophat(grey, disk(self.size))
        else:
            response = np.max([black_tophat(grey, f) for f in _line_footprints(self.size)], axis=0)
        mask = response > self.threshold
        if self.dilate and mask.any():
            mask = ndimage.binary_dilation(mask, structure=disk(self.dilate))
        return mask

    def __call__(self, img: Any) -> Any:
        source = convert_to_numpy(img)
        if source.ndim != 3:
            raise ValueError(f"RemoveHair expects a channel-first 2D image (C, H, W), got shape {source.shape}")
        lo, hi = intensity_range(source)
        image = source.astype(np.float64)
        mask = self.hair_mask(image, lo, hi)
        if not mask.any() or mask.all():
            return _restore(image, img, source.dtype, lo, hi)
        if self.method == "biharmonic":
            result = np.moveaxis(inpaint_biharmonic(np.moveaxis(image, 0, -1), mask, channel_axis=-1), -1, 0)
        else:
            result = _diffusion_inpaint(image, mask, self.iterations)
        return _restore(result, img, source.dtype, lo, hi)


class RemoveHaird(MapTransform):
    """Dictionary version of :class:`RemoveHair`."""

    backend = RemoveHair.backend

    def __init__(self, keys: KeysCollection, size: int = 5, footprint: str = "disk", threshold: float = 0.1,
                 dilate: int = 1, method: str = "diffusion", iterations: int = 30,
                 allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.transform = RemoveHair(size=size, footprint=footprint, threshold=threshold, dilate=dilate,
                                    method=method, iterations=iterations)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.transform(d[key])
        return d


# ------------------------------------------------------------------------------------------ colour constancy
class ShadesOfGray(Transform):
    """Shades-of-Gray colour constancy (Finlayson & Trezzi 2004) for a ``(C, H, W)`` image.

    The illuminant of channel c is its Minkowski p-mean ``e_c = mean(x_c ** p) ** (1 / p)`` (``power=1``: grey
    world, ``power=inf``: max-RGB / white patch). Each channel is multiplied by ``rms(e) / e_c``, so that the
    illuminant becomes neutral grey while its overall strength (root mean square over channels) is kept; the
    result is clipped to the input's intensity range and returned in its type and dtype.
    """

    backend = ["numpy", "torch"]

    def __init__(self, power: float = 6.0, eps: float = 1e-8) -> None:
        if not float(power) >= 1.0:
            raise ValueError(f"power must be >= 1 (or inf), got {power}")
        self.power, self.eps = float(power), float(eps)

    def illuminant(self, image: np.ndarray) -> np.ndarray:
        """Per-channel Minkowski p-mean of a non-negative float (C, H, W) image."""
        flat = np.abs(image.reshape(image.shape[0], -1))
        if np.isinf(self.power):
            return flat.max(axis=1)
        scale = flat.max(axis=1, keepdims=True) + self.eps  # keeps x ** p away from overflow and underflow
        return np.mean((flat / scale) ** self.power, axis=1) ** (1.0 / self.power) * scale[:, 0]

    def __call__(self, img: Any) -> Any:
        source = convert_to_numpy(img)
        lo, hi = intensity_range(source)
        image = source.astype(np.float64)
        e = self.illuminant(image)
        gains = np.sqrt(np.mean(e ** 2)) / np.maximum(e, self.eps)
        return _restore(image * gains.reshape((-1,) + (1,) * (image.ndim - 1)), img, source.dtype, lo, hi)


class ShadesOfGrayd(MapTransform):
    """Dictionary version of :class:`ShadesOfGray`."""

    backend = ShadesOfGray.backend

    def __init__(self, keys: KeysCollection, power: float = 6.0, allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.transform = ShadesOfGray(power=power)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.transform(d[key])
        return d


# ------------------------------------------------------------------------------------------ lesion-centred crop
def find_lesion(img: Any) -> np.ndarray:
    """Lesion mask ``(1, H, W)`` of a dermoscopy image ``(C, H, W)`` without a segmentation.

    Otsu threshold of the channel-mean image after a grey closing (removes hair); pixels darker than it are lesion candidates. Of their connected
    components the largest that does not touch the image border is kept (dark vignette corners touch it);
    if every component touches the border, the largest one. An empty mask when nothing is darker than the skin.
    """
    grey = _grey(convert_to_numpy(img).astype(np.float64))
    grey = closing(grey, disk(max(1, min(grey.shape) // 64)))  # erase thin hair, which joins lesion and border
    if grey.max() <= grey.min():
        return np.zeros((1, *grey.shape), bool)
    components = connected_components(grey < threshold_otsu(grey), connectivity=2)
    sizes = np.bincount(components.ravel())
    sizes[0] = 0
    border = np.unique(np.concatenate([components[0], components[-1], components[:, 0], components[:, -1]]))
    inner = sizes.copy()
    inner[border] = 0
    best = int(np.argmax(inner)) if inner.any() else int(np.argmax(sizes))
    return (components == best)[None] if best else np.zeros((1, *grey.shape), bool)


def _is_positive(x: Any) -> Any:
    return x > 0


class LesionCentredCrop(CropForeground):
    """Crop a ``(C, H, W)`` image around its lesion, with MONAI's cropping (traced, invertible).

    The lesion is ``select_fn(img)`` (default :func:`find_lesion`; pass ``select_fn=lambda m: m > 0`` to crop
    a mask by itself, or give ``mask=`` to ``__call__``). Its bounding box grows by ``margin`` times its
    height/width on each side; with ``square=True`` the shorter side grows to the longer one, about the same
    centre. Parts of the box outside the image are padded (``mode``, MONAI padding modes), unless
    ``allow_smaller=True``, which clips the box to the image. When no lesion is found, the whole image is kept.
    A numpy input gives a numpy output; tensors give MetaTensors, which carry the crop for ``inverse``.
    """

    def __init__(self, margin: float = 0.1, square: bool = True, select_fn: Any = find_lesion,
                 allow_smaller: bool = False, mode: str = "constant", **pad_kwargs: Any) -> None:
        if not float(margin) >= 0.0:
            raise ValueError(f"margin is a fraction of the lesion size, >= 0, got {margin}")
        super().__init__(select_fn=select_fn, margin=0, allow_smaller=True, mode=mode, **pad_kwargs)
        self.margin_fraction, self.square, self.clip_to_image = float(margin), bool(square), bool(allow_smaller)

    def compute_bounding_box(self, img: Any) -> tuple[np.ndarray, np.ndarray]:
        """``(start, end)`` of the crop box over the spatial dims of ``img`` (the image or the mask)."""
        shape = np.asarray(img.shape[1:])
        start, end = generate_spatial_bounding_box(img, self.select_fn, allow_smaller=True)
        start, end = np.asarray(start, float), np.asarray(end, float)
        if np.any(end <= start):  # nothing found: keep everything
            return np.zeros(len(shape), int), shape.astype(int)
        centre, size = (start + end) / 2.0, (end - start) * (1.0 + 2.0 * self.margin_fraction)
        if self.square:
            size[:] = size.max()
        size = np.ceil(size - 1e-6)
        start = np.floor(centre - size / 2.0 + 0.5).astype(int)
        end = start + size.astype(int)
        if self.clip_to_image:
            start, end = np.maximum(start, 0), np.minimum(end, shape)
        return start, end

    def __call__(self, img: Any, mask: Any = None, mode: str | None = None, lazy: bool | None = None,
                 **pad_kwargs: Any) -> Any:
        """Crop ``img`` around the lesion of ``mask`` (anything > 0) when given, else of ``select_fn(img)``."""
        if mask is None:
            start, end = self.compute_bounding_box(img)
        else:
            select, self.select_fn = self.select_fn, _is_positive
            try:
                start, end = self.compute_bounding_box(mask)
            finally:
                self.select_fn = select
        lazy_ = self.lazy if lazy is None else lazy
        cropped = self.crop_pad(img, start, end, mode, lazy=lazy_, **pad_kwargs)
        return convert_to_numpy(cropped) if isinstance(img, np.ndarray) else cropped


class LesionCentredCropd(CropForegroundd):
    """Dictionary version of :class:`LesionCentredCrop`: one box for all ``keys``, found in ``mask_key``
    (anything > 0) when given, else in the first key by :func:`find_lesion`. ``mask_key`` is cropped too.

    The box is stored under ``start_coord_key`` / ``end_coord_key`` as in ``CropForegroundd``; ``inverse``
    restores the original size (MONAI's crop/pad inverse).
    """

    def __init__(self, keys: KeysCollection, mask_key: str | None = None, margin: float = 0.1,
                 square: bool = True, allow_smaller: bool = False, mode: Sequence[str] | str = "constant",
                 start_coord_key: str | None = "foreground_start_coord",
                 end_coord_key: str | None = "foreground_end_coord", allow_missing_keys: bool = False,
                 **pad_kwargs: Any) -> None:
        keys = [keys] if isinstance(keys, str) else list(keys)
        if mask_key is not None and mask_key not in keys:
            keys.append(mask_key)
        super().__init__(keys, source_key=mask_key if mask_key is not None else keys[0], mode=mode,
                         start_coord_key=start_coord_key, end_coord_key=end_coord_key,
                         allow_missing_keys=allow_missing_keys)
        self.mask_key = mask_key
        self.cropper = LesionCentredCrop(margin=margin, square=square, allow_smaller=allow_smaller,
                                         select_fn=find_lesion if mask_key is None else _is_positive, **pad_kwargs)
