"""What a finished run sends to its MLflow artifact store: the final network, not the whole training state.

A training checkpoint holds the optimizer's moments too (for Adam twice the network's size), the scheduler,
scaler and RNG states: what ``--resume`` needs, which reads the local file. The artifact store gets
``checkpoints/last.pt`` with the network, the per-sample adversarial state, the config and the data description
(what ``evaluate``, ``predict`` and ``export`` read), and ``best.pt`` only when the best validation epoch is
not the last one (otherwise it is the same network).
"""

from __future__ import annotations

from pathlib import Path

from pipeline.model.checkpoint import load_checkpoint, save_checkpoint

KEEP = ("network", "method_state", "epoch", "iteration", "config", "data", "mlflow_run_id")


def slim_copy(checkpoint: Path, out_dir: Path) -> Path:
    """``out_dir/<name>``: the checkpoint without optimizer, scheduler, scaler and RNG states."""
    ckpt = load_checkpoint(checkpoint)
    return save_checkpoint(Path(out_dir) / Path(checkpoint).name, {k: ckpt[k] for k in KEEP if k in ckpt})


def final_weights(last: Path, best: Path, out_dir: Path) -> list[Path]:
    """Slim copies of ``last`` and, when it holds another epoch, of ``best``."""
    files = [slim_copy(last, out_dir)]
    if Path(best).exists() and load_checkpoint(best).get("epoch") != load_checkpoint(files[0]).get("epoch"):
        files.append(slim_copy(best, out_dir))
    return files
