"""``medrobust quickstart``: IMA on a built-in synthetic dermatoscopy-like dataset, evaluated and logged to MLflow.

No download, no arguments: the images are generated deterministically, a small CNN is trained with IMA for a
few epochs on the CPU (or GPU), clean and PGD accuracy are measured on the held-out split, and the run lands
in MLflow's default local store (``./mlflow.db``, artifacts in ``./mlruns``).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from pipeline.config import config_from_dict

QUICKSTART = {
    "experiment": "quickstart",
    "task": "classification",
    "seed": 0,
    "data": {"source": "synthetic", "synthetic_size": 720, "val_fraction": 0.15, "test_fraction": 0.15,
             "cache": "cache"},
    "model": {"name": "small_cnn", "channels": [16, 32, 64]},
    "method": {"name": "ima", "norm": "L2", "steps": 10, "alpha": 4.0, "beta": 0.5, "delta": 0.05,
               "eps_max": 1.0, "bisection_steps": 8},
    "train": {"epochs": 6, "batch_size": 64, "lr": 0.003, "device": "auto", "progress": False,
              "deterministic": True},
    "tracking": {"run_name": None},
    "evaluate": {"norms": ["L2"], "eps_l2": [0.25, 0.5, 1.0], "steps": 20, "restarts": 1,
                 "losses": ["ce", "margin"], "fgsm": False, "noise": True, "margin": False,
                 "gradcam_per_class": 1, "stratify": ["label"], "split": "test"},
}


def quickstart(epochs: int | None = None, output_dir: str | None = None) -> dict[str, float]:
    from pipeline.engine.run import train
    from pipeline.evaluation.results import format_eps
    from pipeline.evaluation.run import evaluate

    raw = {**QUICKSTART, "train": dict(QUICKSTART["train"]), "tracking": dict(QUICKSTART["tracking"])}
    if epochs is not None:
        raw["train"]["epochs"] = epochs
    raw["train"]["output_dir"] = output_dir or str(Path("outputs") / "quickstart" / time.strftime("%Y%m%d-%H%M%S"))
    raw["tracking"]["run_name"] = f"quickstart-ima-{time.strftime('%H%M%S')}"
    cfg = config_from_dict(raw, "quickstart")

    start = time.perf_counter()
    print(f"medrobust quickstart: IMA on {cfg.data.synthetic_size} synthetic dermatoscopy-like images, "
          f"{cfg.train.epochs} epochs")
    result = train(cfg)
    metrics = evaluate(cfg, checkpoint=str(result.checkpoint), run_id=None).metrics
    elapsed = time.perf_counter() - start

    rows = [("clean accuracy", metrics.get("eval/clean/accuracy"))]
    for eps in cfg.evaluate.eps_l2:
        rows.append((f"PGD-{cfg.evaluate.steps} L2 accuracy @ eps {eps:g}", metrics.get(f"eval/pgd_l2/accuracy_at_{format_eps(eps)}")))
    if result.state is not None:
        rows.append(("IMA mean per-sample radius", float(result.state["eps"].float().mean())))
    width = max(len(name) for name, _ in rows)
    print("\n" + "-" * (width + 12))
    for name, value in rows:
        shown = "n/a" if value is None else f"{value:.3f}"
        print(f"{name:<{width}}  {shown:>8}")
    print("-" * (width + 12))
    print(f"finished in {elapsed:.0f} s; MLflow run {result.run_id} in {result.tracking_uri}")
    uri = result.tracking_uri
    if uri.startswith("sqlite:///") and not os.environ.get("MLFLOW_TRACKING_URI"):
        print(f"open it with:  mlflow ui --backend-store-uri {uri}")
    else:
        print(f"open it with:  MLFLOW_TRACKING_URI={uri} mlflow ui")
    return metrics
