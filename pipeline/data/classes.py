"""Known class-name tables (index order as published) and normalisation of patient metadata."""

from __future__ import annotations

import math
from typing import Any

# DermaMNIST / HAM10000 diagnosis codes, in the MedMNIST label order.
DERMA_CLASSES = ["akiec", "bcc", "bkl", "df", "mel", "nv", "vasc"]

MEDMNIST_CLASSES: dict[str, list[str]] = {
    "dermamnist": DERMA_CLASSES,
    "pneumoniamnist": ["normal", "pneumonia"],
    "breastmnist": ["malignant", "normal_or_benign"],
    "bloodmnist": ["basophil", "eosinophil", "erythroblast", "immature_granulocytes", "lymphocyte",
                   "monocyte", "neutrophil", "platelet"],
    "pathmnist": ["adipose", "background", "debris", "lymphocytes", "mucus", "smooth_muscle",
                  "normal_colon_mucosa", "cancer_associated_stroma", "colorectal_adenocarcinoma_epithelium"],
    "octmnist": ["choroidal_neovascularization", "diabetic_macular_edema", "drusen", "normal"],
    "organamnist": ["bladder", "femur_left", "femur_right", "heart", "kidney_left", "kidney_right", "liver",
                    "lung_left", "lung_right", "pancreas", "spleen"],
}

ISIC2017_CLASSES = ["nevus", "melanoma", "seborrheic_keratosis"]

UNKNOWN = "unknown"
UNKNOWN_AGE = -1.0
AGE_BANDS = ((0, 19), (20, 39), (40, 59), (60, 79))


def age_value(raw: Any) -> float:
    """Age in years as float; missing or unparsable -> -1.0 (collates, unlike None/NaN)."""
    try:
        value = float(raw)
    except (TypeError, ValueError):
        return UNKNOWN_AGE
    return value if math.isfinite(value) and value >= 0 else UNKNOWN_AGE


def age_band(age: float) -> str:
    """``"40-59"`` style bands, ``"80+"`` at the top, ``"unknown"`` for the sentinel."""
    if age < 0:
        return UNKNOWN
    for low, high in AGE_BANDS:
        if age <= high:
            return f"{low}-{high}"
    return "80+"


def text_value(raw: Any) -> str:
    """A metadata string; missing/NaN/blank -> ``"unknown"``."""
    if raw is None or (isinstance(raw, float) and not math.isfinite(raw)):
        return UNKNOWN
    text = str(raw).strip()
    return text if text and text.lower() != "nan" else UNKNOWN
