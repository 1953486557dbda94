"""MONAI-style transforms of our own: dermatology (hair removal, Shades-of-Gray, lesion-centred crop) and
radiology (CT window presets, MRI foreground percentile normalisation), plus ``build_preprocess`` that builds
them from config specs."""

from transforms.dermatology import (
    LesionCentredCrop,
    LesionCentredCropd,
    RemoveHair,
    RemoveHaird,
    ShadesOfGray,
    ShadesOfGrayd,
    find_lesion,
    intensity_range,
)
from transforms.radiology import CT_WINDOWS, CTWindow, CTWindowd, MRIPercentileNormalise, MRIPercentileNormalised
from transforms.registry import REGISTRY, build_preprocess

__all__ = [
    "CT_WINDOWS", "CTWindow", "CTWindowd", "LesionCentredCrop", "LesionCentredCropd", "MRIPercentileNormalise",
    "MRIPercentileNormalised", "REGISTRY", "RemoveHair", "RemoveHaird", "ShadesOfGray", "ShadesOfGrayd",
    "build_preprocess", "find_lesion", "intensity_range",
]
