"""A study's comparison: the results table, per-class recall under attack, and the overlaid robustness curves.

Everything is read from each variant's evaluation folder (``metrics.csv``, the long table written by
``medrobust evaluate``), so a variant evaluated by an earlier invocation is tabled exactly like a new one.

Files written into the study's output folder::

    results.md / results.csv          one row per variant: clean metrics, the headline metric (and balanced
                                      accuracy) under PGD at every radius, each curve's normalised area, the
                                      noise baseline at the largest radius, wall times, a degenerate-model flag
    robustness_curves.png             PGD curves of every variant, one panel per norm
    per_class_recall.csv / .md        recall of every class, clean and under PGD at every radius
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from pipeline.evaluation.curves import plot_curves
from pipeline.evaluation.report import to_markdown
from pipeline.names import format_eps
from pipeline.study.checks import protocol_checks

NORMS = ("L2", "Linf")


@dataclass
class VariantResult:
    name: str
    method: str
    metrics: pd.DataFrame          # attack, norm, eps, metric, value
    train_s: float
    eval_s: float
    degenerate: str | None = None


def read_metrics(path: Path) -> pd.DataFrame:
    frame = pd.read_csv(path)
    frame["norm"] = frame["norm"].fillna("")
    return frame


def _value(frame: pd.DataFrame, attack: str, metric: str, norm: str = "", eps: float | None = None) -> float:
    rows = frame[(frame["attack"] == attack) & (frame["norm"] == norm) & (frame["metric"] == metric)]
    if eps is not None:
        rows = rows[(rows["eps"] - eps).abs() <= 1e-12 * max(1.0, abs(eps))]
    return float(rows["value"].iloc[0]) if len(rows) else math.nan


def _radii(frame: pd.DataFrame, attack: str, norm: str) -> list[float]:
    rows = frame[(frame["attack"] == attack) & (frame["norm"] == norm) & frame["eps"].notna()]
    return sorted(set(rows["eps"].tolist()))


def curves(v: VariantResult, headline: str) -> dict[tuple[str, str], list[tuple[float, float]]]:
    """{(attack, norm): [(eps, headline value), ...]} of every attacked family, sorted by eps."""
    out = {}
    for attack in sorted(set(v.metrics["attack"]) - {"clean"}):
        for norm in NORMS:
            radii = _radii(v.metrics, attack, norm)
            if radii:
                out[(attack, norm)] = [(e, _value(v.metrics, attack, headline, norm, e)) for e in radii]
    return out


def _row(v: VariantResult, classification: bool) -> dict[str, object]:
    m = v.metrics
    headline, short = ("accuracy", "acc") if classification else ("dice", "dice")
    row: dict[str, object] = {"variant": v.name, "method": v.method}
    clean = ("accuracy", "balanced_accuracy", "auc_macro") if classification else ("dice", "dice_pooled")
    for name in clean:
        row[f"clean {name.replace('balanced_accuracy', 'bal_acc').replace('auc_macro', 'AUC')}"] = \
            _value(m, "clean", name)
    for norm in NORMS:
        for eps in _radii(m, "pgd", norm):
            row[f"PGD-{norm} {short}@{format_eps(eps)}"] = _value(m, "pgd", headline, norm, eps)
            if classification:
                row[f"PGD-{norm} bal_acc@{format_eps(eps)}"] = _value(m, "pgd", "balanced_accuracy", norm, eps)
        for attack in ("pgd", "fgsm", "noise"):
            radii = _radii(m, attack, norm)
            if not radii:
                continue
            if attack == "noise":
                row[f"noise-{norm} {short}@{format_eps(radii[-1])}"] = _value(m, "noise", headline, norm, radii[-1])
            row[f"{attack.upper() if attack != 'noise' else 'noise'}-{norm} AUC_norm"] = _value(
                m, attack, f"{headline}_auc_norm", norm)
    row.update({"train s": round(v.train_s), "eval s": round(v.eval_s), "total s": round(v.train_s + v.eval_s),
                "degenerate": f"DEGENERATE: {v.degenerate}" if v.degenerate else "no"})
    return row


def results_table(variants: list[VariantResult], task: str) -> pd.DataFrame:
    return pd.DataFrame([_row(v, task == "classification") for v in variants])


def per_class_recall(variants: list[VariantResult]) -> pd.DataFrame:
    """Long table: variant, condition (clean or pgd-<norm>@<eps>), class, recall."""
    rows = []
    for v in variants:
        m = v.metrics
        recall = m[m["metric"].str.startswith("recall/") & m["attack"].isin(["clean", "pgd"])]
        for r in recall.itertuples(index=False):
            condition = "clean" if r.attack == "clean" else f"PGD-{r.norm}@{format_eps(r.eps)}"
            rows.append({"variant": v.name, "condition": condition, "class": r.metric.split("/", 1)[1],
                         "recall": r.value})
    return pd.DataFrame(rows, columns=["variant", "condition", "class", "recall"])


def recall_wide(long: pd.DataFrame) -> pd.DataFrame:
    """One row per (variant, condition) in their original order, one column per class."""
    if long.empty:
        return long
    order = list(dict.fromkeys(zip(long["variant"], long["condition"], strict=True)))
    wide = long.pivot_table(index=["variant", "condition"], columns="class", values="recall", sort=False)
    wide = wide.reindex(order)[list(dict.fromkeys(long["class"]))]
    return wide.reset_index()


@dataclass
class Written:
    files: list[Path]              # results.md first
    table: pd.DataFrame
    checks: list[str]              # PASS / FAIL / n/a lines
    warnings: list[str]            # degenerate models


def write_results(out_dir: Path, title: str, protocol: str, variants: list[VariantResult], task: str) -> Written:
    """Write the table, curves and per-class recall into ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    headline = "accuracy" if task == "classification" else "dice"
    table = results_table(variants, task)
    table.to_csv(out_dir / "results.csv", index=False)
    written = [out_dir / "results.md", out_dir / "results.csv"]

    per_variant = [{"variant": v.name, "method": v.method, "clean": _value(v.metrics, "clean", headline),
                    "curves": curves(v, headline)} for v in variants]
    panels: dict[str, dict[str, tuple[list[float], list[float]]]] = {}
    for r in per_variant:
        for (attack, norm), points in r["curves"].items():
            if attack == "pgd":
                panels.setdefault(f"PGD {norm} ({headline})", {})[r["variant"]] = (
                    [0.0] + [e for e, _ in points], [r["clean"]] + [y for _, y in points])
    if panels:
        written.append(plot_curves(panels, out_dir / "robustness_curves.png", ylabel=headline, title=title))
    recall = per_class_recall(variants)
    if not recall.empty:
        recall.to_csv(out_dir / "per_class_recall.csv", index=False)
        (out_dir / "per_class_recall.md").write_text(
            f"# {title}: per-class recall, clean and under PGD\n\n{to_markdown(recall_wide(recall))}")
        written += [out_dir / "per_class_recall.csv", out_dir / "per_class_recall.md"]

    checks = protocol_checks(per_variant, headline)
    warnings = [f"warning: variant '{v.name}' looks degenerate: {v.degenerate}" for v in variants if v.degenerate]
    lines = [f"# {title}", "", protocol, "", to_markdown(table)]
    lines += [f"> {w}" for w in warnings] + ([""] if warnings else [])
    lines += ["## Protocol checks", "", *[f"- {c}" for c in checks], ""]
    if panels:
        lines += ["![robustness curves](robustness_curves.png)", ""]
    if not recall.empty:
        lines += ["Per-class recall under attack: [per_class_recall.md](per_class_recall.md)", ""]
    (out_dir / "results.md").write_text("\n".join(lines))
    return Written(written, table, checks, warnings)
