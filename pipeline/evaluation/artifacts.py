"""Files written by an evaluation (the MLflow artifacts under ``evaluation/``).

Layout of the output folder::

    summary.json            every logged metric name -> value, plus the evaluation settings
    metrics.csv / .json     long table: attack, norm, eps, metric, value (per-class recall included)
    curves.json             per attack family: eps (0 = clean) and the headline metric
    robustness_curves.png   headline metric vs eps, one panel per norm, one line per attack
    per_sample.csv          index, label, metadata, and per condition whether the sample was handled correctly
    stratified.csv / .json  every metric split by the metadata columns present; stratified.png
    margins.csv             per-sample smallest breaking radius per norm; margin_<norm>.png histograms
    gradcam/<class>.png     Grad-CAM panels (classification)

Only the data dicts' ``index``, label and the configured metadata columns are written per sample: no file
names, no header fields.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pipeline.evaluation.curves import plot_curves
from pipeline.evaluation.results import SuiteResult
from pipeline.evaluation.stratified import plot_stratified, stratified_table


def _json_ready(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_ready(v) for v in value]
    if isinstance(value, np.generic):
        return _json_ready(value.item())
    return value


def write_json(path: Path, data: Any) -> Path:
    path.write_text(json.dumps(_json_ready(data), indent=1, allow_nan=False))
    return path


def write_table(frame: pd.DataFrame, out_dir: Path, stem: str) -> list[Path]:
    """``<stem>.csv`` and ``<stem>.json`` (records) of one table."""
    csv, js = out_dir / f"{stem}.csv", out_dir / f"{stem}.json"
    frame.to_csv(csv, index=False)
    write_json(js, frame.to_dict(orient="records"))
    return [csv, js]


def curve_panels(result: SuiteResult) -> dict[str, dict[str, tuple[list[float], list[float]]]]:
    """{norm: {attack: (eps, values)}} for the robustness-curve figure."""
    panels: dict[str, dict[str, tuple[list[float], list[float]]]] = {}
    for family, conds in result.families().items():
        panels.setdefault(conds[0].norm, {})[conds[0].attack] = result.curve(family)
    return panels


def write_suite(result: SuiteResult, out_dir: Path, stratify: list[str], settings: dict[str, Any]) -> dict[str, float]:
    """Write the tables, curves and stratified report of one suite; returns the flat metrics."""
    out_dir.mkdir(parents=True, exist_ok=True)
    metrics = result.metrics()
    write_json(out_dir / "summary.json", {"metrics": metrics, "settings": settings})
    write_table(result.table(), out_dir, "metrics")
    panels = curve_panels(result)
    write_json(out_dir / "curves.json", {"metric": result.headline, "curves": {
        f"{attack}_{norm.lower()}": {"eps": xs, "values": ys}
        for norm, lines in panels.items() for attack, (xs, ys) in lines.items()}})
    if panels:
        plot_curves(panels, out_dir / "robustness_curves.png", ylabel=result.headline)
    result.per_sample().to_csv(out_dir / "per_sample.csv", index=False)
    table = stratified_table(result, stratify)
    if not table.empty:
        write_table(table, out_dir, "stratified")
        plot_stratified(table, result, out_dir / "stratified.png")
    return metrics
