"""The torch device a run asks for (``train.device``), checked against this machine."""

from __future__ import annotations

import torch

from pipeline.errors import InputError


def resolve_device(name: str, setting: str = "train.device") -> torch.device:
    """``auto``: the GPU when there is one, else the CPU; a CUDA device where there is none is an
    ``InputError`` naming ``setting``."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"{setting}: '{name}' asked for, but CUDA is not available on this machine")
    return device
