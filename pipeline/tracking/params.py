"""A run's MLflow params: the config fields the run uses.

Fields that only some sources or tasks use are left out of the runs that do not use them (a DermaMNIST run has
no ``data.spacing``, a classification run no ``dice_threshold``), so that MLflow's compare view shows real
differences only. The method section needs no such list: it holds only the knobs of its method (a ``standard``
run has no ``method.eps``). Every field stays in the run's ``config.yaml`` artifact; fields not listed here are
always kept.
"""

from __future__ import annotations

import copy
from typing import Any

VOLUMES = {"nifti", "dicom"}
DATA_FIELDS = {
    "synthetic_size": {"synthetic"}, "spacing": VOLUMES, "orientation": VOLUMES, "patch_size": VOLUMES,
    "patches_per_volume": VOLUMES, "image_series": {"dicom"}, "mask_series": {"dicom"}, "columns": {"csv"},
    "images_dir": {"folder"}, "image_suffix": {"folder"}, "masks_dir": {"folder"}, "mask_suffix": {"folder"},
    "roi_dir": {"folder"}, "roi_suffix": {"folder"}, "mask_mode": {"folder", "csv"},
    "resize_mode": {"folder", "csv"}, "channels": {"folder", "csv"}, "augment": {"folder", "csv"},
}
# (section, key); section "" is the top level
SEGMENTATION_ONLY = {("", "dice_threshold"), ("evaluate", "epoch_steps"), ("evaluate", "epoch_max_samples"),
                     ("evaluate", "epoch_every"), ("evaluate", "epoch_radii"), ("evaluate", "overlay_cases")}


def used_params(resolved: dict[str, Any]) -> dict[str, Any]:
    """The resolved config without the fields this run does not use: other sources' layout keys,
    segmentation-only settings in a classification run, the radii of a norm not evaluated. Fields not listed
    above are always kept."""
    out = copy.deepcopy(resolved)
    data, ev = out.get("data", {}), out.get("evaluate", {})
    for key, users in DATA_FIELDS.items():
        if data.get("source") not in users:
            data.pop(key, None)
    if out.get("task") != "segmentation":
        for section, key in SEGMENTATION_ONLY:
            (out.get(section, {}) if section else out).pop(key, None)
    for norm, key in (("L2", "eps_l2"), ("Linf", "eps_linf")):
        if norm not in ev.get("norms", [norm]):
            ev.pop(key, None)
    return out
