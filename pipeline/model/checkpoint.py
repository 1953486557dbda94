"""Checkpoint files: written atomically (temp file, fsync, rename), read only with ``weights_only=True``.

A checkpoint is a plain dict of tensors, numbers, strings, lists and dicts: ``network``, ``optimizer``,
``scheduler``, ``scaler``, ``method_state`` (per-sample adversarial state), ``batch_averages`` (the epoch's
per-batch sums so far), ``best`` (the validator's best metric and its epoch), ``epoch``, ``iteration``,
``config`` (the resolved config), ``data`` (class names, channels, spatial dims), ``rng`` (Python, NumPy, torch
CPU and, when training on CUDA, the training GPU's generator) and ``mlflow_run_id``. Training builds and
restores it in one handler, :class:`pipeline.engine.checkpointing.Checkpoints`; this module only writes and
reads files.
"""

from __future__ import annotations

import os
import pickle
import random
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.errors import InputError

FORMAT = "medrobust-checkpoint/1"


def save_checkpoint(path: str | Path, payload: dict[str, Any]) -> Path:
    """Write ``payload`` to ``path`` so that a crash at any moment leaves either the old or the new file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            torch.save({"format": FORMAT, **payload}, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint with ``weights_only=True``: a file that carries code (a pickled object) is refused."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: checkpoint file not found")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else "unsafe content"
        raise InputError(f"{path}: refused to load: the file holds more than weights ({first[:160]})") from None
    except (RuntimeError, EOFError, OSError, ValueError) as exc:
        raise InputError(f"{path}: not a readable checkpoint ({type(exc).__name__}: {str(exc)[:160]})") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT or "network" not in ckpt:
        raise InputError(f"{path}: not a medrobust checkpoint (no '{FORMAT}' format marker)")
    return ckpt


def rng_state(device: torch.device | str | None = None) -> dict[str, Any]:
    """The Python, NumPy, torch CPU and (``device`` a CUDA device) that GPU's RNG states, weights-only-safe.

    ``cuda`` is None when not training on a GPU. Under DDP rank 0 writes the checkpoint: its own GPU's state.
    """
    np_state = np.random.get_state()
    return {
        "python": [list(x) if isinstance(x, tuple) else x for x in random.getstate()],
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "gauss": float(np_state[4])},
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state(device) if _on_cuda(device) else None,
    }


def set_rng_state(state: dict[str, Any], device: torch.device | str | None = None) -> None:
    """Restore ``rng_state``'s states; the GPU one onto ``device`` when that is a CUDA device and it was saved."""
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and _on_cuda(device):
        torch.cuda.set_rng_state(state["cuda"], device)


def _on_cuda(device: torch.device | str | None) -> bool:
    return device is not None and torch.device(device).type == "cuda" and torch.cuda.is_available()
