"""``medrobust report``: the runs of one MLflow experiment side by side (table + robustness-curve overlay).

Everything is read through ``MlflowClient`` (``search_runs``, ``get_metric_history``), so the same command
works against a local SQLite store and a remote ``mlflow server``. The table has one row per run: method,
dataset, whether the model is degenerate (``pipeline.evaluation.degenerate``: one class for almost every image,
balanced accuracy at chance, empty or full masks; such a model looks robust in every other column, so the row
says so and a warning line follows the table), clean metrics, the headline metric (and the balanced accuracy
beside the accuracy) under PGD at every radius, the normalised curve areas, the median robustness margin and
the training time (sum of the per-epoch ``epoch_time_s``; the run's wall time
when that is absent). It is written as Markdown, HTML and CSV next to ``robustness_curves.png``, and all of
it is logged as the artifacts of a new run of the experiment tagged ``medrobust.kind=report``.
"""

from __future__ import annotations

import html
import math
import re
import time
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
from mlflow.entities import Run
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from pipeline.errors import InputError
from pipeline.evaluation.curves import plot_curves
from pipeline.evaluation.degenerate import verdict_from_metrics
from pipeline.tracking.session import resolve_uri

KIND_TAG = "medrobust.kind"
CLEAN_METRICS = ("accuracy", "balanced_accuracy", "auc_macro", "mean_ap", "dice", "dice_pooled")
_AT = re.compile(r"^eval/(?P<family>pgd_(?P<norm>l2|linf))/(?P<metric>accuracy|balanced_accuracy|dice)"
                 r"_at_(?P<eps>[0-9.e+-]+)$")


@dataclass
class Report:
    run_id: str
    out_dir: Path
    table: pd.DataFrame


def _fetch_runs(client: MlflowClient, experiment: str) -> tuple[str, list[Run]]:
    try:
        exp = client.get_experiment_by_name(experiment)
    except MlflowException as exc:
        raise InputError(f"--tracking-uri {client.tracking_uri}: cannot read experiments "
                         f"({str(exc).splitlines()[0][:160]})") from None
    if exp is None:
        raise InputError(f"--experiment {experiment}: no such MLflow experiment at {client.tracking_uri}")
    runs = client.search_runs([exp.experiment_id], max_results=5000, order_by=["attributes.start_time ASC"])
    runs = [r for r in runs if r.data.tags.get(KIND_TAG) != "report"]
    if not runs:
        raise InputError(f"--experiment {experiment}: the experiment has no runs to compare")
    return exp.experiment_id, runs


def training_seconds(client: MlflowClient, run: Run) -> float:
    """Sum of the per-epoch ``epoch_time_s`` history; the run's wall time when the trainer did not log it."""
    history = client.get_metric_history(run.info.run_id, "epoch_time_s")
    if history:
        last = {m.step: m.value for m in sorted(history, key=lambda m: m.timestamp)}
        return float(sum(last.values()))
    if run.info.end_time and run.info.start_time:
        return (run.info.end_time - run.info.start_time) / 1000.0
    return float("nan")


def robust_points(metrics: dict[str, float]) -> dict[tuple[str, str], list[tuple[float, float]]]:
    """{(norm, metric): [(eps, value), ...]} parsed from ``eval/pgd_<norm>/<metric>_at_<eps>``, sorted by eps."""
    points: dict[tuple[str, str], list[tuple[float, float]]] = {}
    for key, value in metrics.items():
        match = _AT.match(key)
        if match:
            points.setdefault((match["norm"], match["metric"]), []).append((float(match["eps"]), value))
    return {k: sorted(v) for k, v in points.items()}


def run_row(client: MlflowClient, run: Run) -> dict[str, object]:
    tags, metrics, params = run.data.tags, run.data.metrics, run.data.params
    row: dict[str, object] = {
        "run": tags.get("mlflow.runName", run.info.run_id[:8]), "run_id": run.info.run_id,
        "method": tags.get("medrobust.method") or params.get("method.name", "?"),
        "dataset": tags.get("medrobust.dataset") or params.get("data.source", "?"),
    }
    evaluated = any(k.startswith("eval/clean/") for k in metrics)
    row["degenerate"] = verdict_from_metrics(metrics, tags).cell if evaluated else "not evaluated"
    for name in CLEAN_METRICS:
        if f"eval/clean/{name}" in metrics:
            row[f"clean {name}"] = metrics[f"eval/clean/{name}"]
    points = robust_points(metrics)
    for norm in sorted({n for n, _ in points}):
        by_eps: dict[float, list[tuple[str, float]]] = {}
        for (n, metric), pts in sorted(points.items()):
            for eps, value in pts if n == norm else []:
                by_eps.setdefault(eps, []).append((metric, value))
        for eps, values in sorted(by_eps.items()):  # balanced accuracy beside accuracy, radius by radius
            for metric, value in values:
                row[f"pgd_{norm} {metric} @{eps:g}"] = value
    for key in sorted(k for k in metrics if k.endswith("/auc_norm")):
        row[f"{key.split('/')[1]} auc_norm"] = metrics[key]
    for key in sorted(k for k in metrics if k.startswith("eval/margin_") and k.endswith("/p50")):
        row[f"{key.split('/')[1]} p50"] = metrics[key]
    row["training time (s)"] = training_seconds(client, run)
    return row


def _cell(value: object) -> str:
    if isinstance(value, float):
        return "" if math.isnan(value) else f"{value:.4f}" if abs(value) < 1000 else f"{value:.0f}"
    return str(value)


def to_markdown(table: pd.DataFrame) -> str:
    head = "| " + " | ".join(table.columns) + " |"
    rule = "|" + "|".join("---" for _ in table.columns) + "|"
    body = ["| " + " | ".join(_cell(v).replace("|", "\\|") for v in row) + " |"
            for row in table.itertuples(index=False)]
    return "\n".join([head, rule, *body]) + "\n"


def degenerate_warnings(rows: list[dict[str, object]]) -> list[str]:
    """One warning line per degenerate run of the table."""
    return [f"WARNING: {row['run']} ({row['method']}) is a degenerate model: {str(row['degenerate'])[12:]}; its "
            "numbers under attack say nothing about robustness"
            for row in rows if str(row.get("degenerate", "")).startswith("DEGENERATE")]


def to_html(table: pd.DataFrame, title: str, figure: str | None, warnings: list[str] | None = None) -> str:
    body = table.to_html(index=False, na_rep="", float_format=lambda v: f"{v:.4f}", border=0, classes="runs")
    body += "".join(f'<p style="color:#b00"><b>{html.escape(w)}</b></p>' for w in warnings or [])
    img = f'<p><img src="{html.escape(figure)}" alt="robustness curves"></p>' if figure else ""
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            "<style>body{font-family:sans-serif} table.runs{border-collapse:collapse} "
            "table.runs td,table.runs th{padding:4px 8px;border-bottom:1px solid #ccc;text-align:right}</style>"
            f"</head><body><h1>{html.escape(title)}</h1>{body}{img}</body></html>\n")


def curve_overlay(rows: list[dict[str, object]], runs: list[Run], path: Path) -> Path | None:
    """PGD curves of every run (clean point at eps 0), one panel per norm."""
    panels: dict[str, dict[str, tuple[list[float], list[float]]]] = {}
    for row, run in zip(rows, runs, strict=True):
        metrics = run.data.metrics
        for (norm, metric), pts in sorted(robust_points(metrics).items()):
            clean = metrics.get(f"eval/clean/{metric}")
            if clean is None:
                continue
            label = f"{row['method']} ({row['run']})"
            panels.setdefault(f"PGD {norm.upper().replace('LINF', 'Linf')} ({metric})", {})[label] = (
                [0.0] + [e for e, _ in pts], [clean] + [v for _, v in pts])
    if not panels:
        return None
    return plot_curves(panels, path, ylabel="metric under attack", title="robustness curves")


def report(experiment: str, out: str | Path | None = None, tracking_uri: str | None = None) -> Report:
    """Compare the runs of ``experiment``; write the table and plot to ``out``; log them as a report run."""
    uri = resolve_uri(tracking_uri)
    client = MlflowClient(tracking_uri=uri)
    exp_id, runs = _fetch_runs(client, experiment)
    rows = [run_row(client, run) for run in runs]
    table = pd.DataFrame(rows)
    out_dir = Path(out) if out else Path(f"report-{experiment}")
    out_dir.mkdir(parents=True, exist_ok=True)
    figure = curve_overlay(rows, runs, out_dir / "robustness_curves.png")
    shown = table.drop(columns=["run_id"])
    title = f"medrobust report: {experiment}"
    warnings = degenerate_warnings(rows)
    notes = "".join(f"\n**{w}**\n" for w in warnings)
    (out_dir / "report.md").write_text(f"# {title}\n\n{to_markdown(shown)}{notes}"
                                       + ("\n![robustness curves](robustness_curves.png)\n" if figure else ""))
    (out_dir / "report.html").write_text(to_html(shown, title, figure.name if figure else None, warnings))
    table.to_csv(out_dir / "report.csv", index=False)
    summary = client.create_run(exp_id, run_name=f"report-{time.strftime('%Y%m%d-%H%M%S')}",
                                tags={KIND_TAG: "report", "medrobust.report.runs": str(len(runs))})
    client.log_artifacts(summary.info.run_id, str(out_dir), "report")
    client.set_terminated(summary.info.run_id)
    for line in warnings:
        print(line)
    print(f"report of {len(runs)} runs: {out_dir / 'report.md'} (MLflow run {summary.info.run_id})")
    return Report(summary.info.run_id, out_dir, table)
