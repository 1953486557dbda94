"""A deterministic synthetic dermatoscopy-like dataset for the quickstart: no files, no download.

Each image is a skin-coloured background with uneven illumination and a lesion whose shape, colour and
texture depend on the class: ``nevus`` (round, even brown), ``melanoma`` (large, irregular border, dark
with blue-grey patches), ``keratosis`` (tan, speckled), ``vascular`` (small, red-purple). Sizes, colours and
positions vary so that the task is learnable by a small CNN but not trivial. Image ``i`` depends only on
``i`` (a fixed seed), so the data never change between runs; ``data.split_seed`` drives the split.
Data dict keys: ``image`` (uint8 H x W x 3 array), ``label``, ``id``, ``sex``, ``age``, ``age_band``,
``localization``, ``index``.
"""

from __future__ import annotations

import numpy as np

from pipeline.config import Config
from pipeline.data.base import DataSplits
from pipeline.data.classes import age_band
from pipeline.data.loading import IMAGE, flips_2d, load_2d_arrays, preprocess_transforms
from pipeline.data.split import finalize, split_items

CLASS_NAMES = ["nevus", "melanoma", "keratosis", "vascular"]
SIZE = 32
_SEED = 20240517
_SITES = ["back", "trunk", "face", "lower extremity", "upper extremity"]


def _background(rng: np.random.Generator, size: int, yy: np.ndarray, xx: np.ndarray) -> np.ndarray:
    skin = np.array([224.0, 182.0, 152.0]) + rng.normal(0, 12, 3)
    tilt = rng.normal(0, 0.6, 2)
    light = 1.0 + 0.08 * (tilt[0] * (yy / size - 0.5) + tilt[1] * (xx / size - 0.5))
    return skin[None, None, :] * light[..., None] + rng.normal(0, 4, (size, size, 3))


def _lesion_mask(rng: np.random.Generator, label: int, yy, xx, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Soft mask in [0, 1] and the normalised radial distance (for colour gradients)."""
    cy, cx = size / 2 + rng.normal(0, size * 0.08, 2)
    radius = size * {0: rng.uniform(0.17, 0.25), 1: rng.uniform(0.26, 0.36), 2: rng.uniform(0.2, 0.3),
                     3: rng.uniform(0.13, 0.2)}[label]
    angle = np.arctan2(yy - cy, xx - cx)
    wobble = 0.04 if label != 1 else 0.22
    border = 1.0 + sum(rng.uniform(0, wobble) * np.cos(k * angle + rng.uniform(0, 2 * np.pi)) for k in (2, 3, 5))
    dist = np.hypot(yy - cy, xx - cx) / (radius * border)
    softness = 0.08 if label != 1 else 0.2
    return np.clip((1.0 - dist) / softness, 0.0, 1.0), dist


def _lesion_colour(rng: np.random.Generator, label: int, dist: np.ndarray, size: int) -> np.ndarray:
    base = {0: [125, 78, 52], 1: [62, 42, 44], 2: [182, 148, 104], 3: [170, 36, 74]}[label]
    colour = np.array(base, dtype=float) + rng.normal(0, 7, 3)
    img = np.broadcast_to(colour, (size, size, 3)).copy()
    if label == 1:  # blue-grey veil and dark blotches
        blotch = rng.random((size // 4, size // 4)) > 0.6
        blotch = np.kron(blotch, np.ones((4, 4)))[:size, :size]
        img += blotch[..., None] * np.array([-25.0, 5.0, 35.0])
    elif label == 2:  # speckled, waxy texture
        img += (rng.random((size, size)) > 0.75)[..., None] * rng.uniform(-45, -30)
    elif label == 0:
        img += dist[..., None] * 15.0  # lighter towards the border
    return img


def make_image(i: int, label: int, size: int = SIZE) -> np.ndarray:
    rng = np.random.default_rng([_SEED, i])
    yy, xx = np.mgrid[0:size, 0:size].astype(float)
    background = _background(rng, size, yy, xx)
    mask, dist = _lesion_mask(rng, label, yy, xx, size)
    lesion = _lesion_colour(rng, label, dist, size)
    img = background * (1 - mask[..., None]) + lesion * mask[..., None]
    return np.clip(img + rng.normal(0, 3, img.shape), 0, 255).astype(np.uint8)


def _metadata(i: int) -> dict:
    rng = np.random.default_rng([_SEED + 1, i])
    age = float(rng.integers(15, 90))
    return {"sex": ["female", "male"][int(rng.integers(2))], "age": age, "age_band": age_band(age),
            "localization": _SITES[int(rng.integers(len(_SITES)))]}


def make_items(n: int, size: int = SIZE) -> list[dict]:
    """``n`` samples, classes in rotation (balanced), each fully determined by its position."""
    items = []
    for i in range(n):
        label = i % len(CLASS_NAMES)
        items.append({IMAGE: make_image(i, label, size), "label": label, "id": f"synthetic_{i:05d}", **_metadata(i)})
    return items


def build(cfg: Config) -> DataSplits:
    items = make_items(cfg.data.synthetic_size)
    train, val, test = split_items(items, val_fraction=cfg.data.val_fraction, test_fraction=cfg.data.test_fraction,
                                   seed=cfg.data.split_seed, stratify_key="label")
    train, val, test = finalize(train, val, test, limit=cfg.data.limit, seed=cfg.data.split_seed)
    size = tuple(cfg.data.image_size) if cfg.data.image_size else (SIZE, SIZE)
    return DataSplits(
        train=train, val=val, test=test, spatial_dims=2, in_channels=3, num_classes=len(CLASS_NAMES),
        class_names=list(CLASS_NAMES),
        load_transforms=load_2d_arrays(channels_last=True, image_size=cfg.data.image_size,
                                       preprocess=preprocess_transforms(cfg.data.preprocess, [IMAGE])),
        train_transforms=flips_2d([IMAGE]), notes=["synthetic images generated in memory (fixed seed)"],
        image_size=size)
