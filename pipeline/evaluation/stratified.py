"""Stratified report: every metric of every condition, split by the metadata columns that are present.

A clinical group asks "is the model as good (and as robust) for women as for men, for older patients, for
lesions on the face?". The table answers it in long format, one row per (column, group, condition,
metric), with the number of samples ``n`` in the group, so that small groups are visible as such.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from pipeline.evaluation.results import CLEAN, Condition, SuiteResult  # noqa: E402
from pipeline.names import format_eps  # noqa: E402

COLUMNS = ["column", "group", "n", "attack", "norm", "eps", "metric", "value"]
MISSING = "unknown"


def age_band(age: object, width: int = 20) -> str:
    """``45`` -> ``"40-59"``; missing or non-numeric ages -> ``"unknown"``."""
    try:
        value = float(age)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return MISSING
    if not np.isfinite(value):
        return MISSING
    start = int(value // width) * width
    return f"{start}-{start + width - 1}"


def _present(values: Sequence | None) -> bool:
    """The data has this column: some value is set (a column the data lacks arrives as all None)."""
    return values is not None and any(v is not None and v != "" for v in values)


def strata(result: SuiteResult, columns: Sequence[str]) -> dict[str, np.ndarray]:
    """The requested columns that exist, as string arrays (``label`` as class name; ``age_band`` from ``age``)."""
    out: dict[str, np.ndarray] = {}
    for col in columns:
        if col == "label" and result.task == "classification":
            names = result.class_names
            out["class"] = np.array([names[int(c)] if names else str(int(c)) for c in result.labels], dtype=object)
        elif _present(result.meta.get(col)):
            out[col] = np.array([MISSING if v is None or v == "" else str(v) for v in result.meta[col]], dtype=object)
        elif col == "age_band" and _present(result.meta.get("age")):
            out[col] = np.array([age_band(v) for v in result.meta["age"]], dtype=object)
    return out


def stratified_table(result: SuiteResult, columns: Sequence[str]) -> pd.DataFrame:
    """Long table (column, group, n, attack, norm, eps, metric, value) over all conditions."""
    rows = []
    for col, values in strata(result, columns).items():
        for group in sorted(set(values)):
            mask = values == group
            for cond in sorted(result.outcomes):
                for name, value in result.metrics_of(cond, mask).items():
                    rows.append([col, group, int(mask.sum()), cond.attack, cond.norm, cond.eps, name, value])
    return pd.DataFrame(rows, columns=COLUMNS)


def _shown_conditions(result: SuiteResult) -> list[Condition]:
    """Clean plus PGD at the middle radius of each norm: the bars of the plot."""
    shown = [CLEAN]
    for family, conds in result.families().items():
        if family.startswith("pgd_"):
            shown.append(conds[len(conds) // 2])
    return shown


def plot_stratified(table: pd.DataFrame, result: SuiteResult, path: str | Path) -> Path | None:
    """One panel per column: grouped bars of the headline metric, clean vs PGD at the middle radius."""
    if table.empty:
        return None
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    metric = result.headline
    conds = _shown_conditions(result)
    cols = list(dict.fromkeys(table["column"]))
    fig, axes = plt.subplots(len(cols), 1, figsize=(8, 3 * len(cols)), squeeze=False)
    width = 0.8 / len(conds)
    for ax, col in zip(axes[:, 0], cols, strict=True):
        part = table[(table["column"] == col) & (table["metric"] == metric)]
        groups = list(dict.fromkeys(part["group"]))
        for k, cond in enumerate(conds):
            sel = part[(part["attack"] == cond.attack) & (part["norm"] == cond.norm) & (part["eps"] == cond.eps)]
            values = [float(sel[sel["group"] == g]["value"].iloc[0]) if (sel["group"] == g).any() else np.nan
                      for g in groups]
            label = "clean" if cond.attack == "clean" else f"{cond.family} eps={format_eps(cond.eps)}"
            ax.bar(np.arange(len(groups)) + k * width, values, width, label=label)
        counts = part.drop_duplicates("group").set_index("group")["n"]
        ax.set_xticks(np.arange(len(groups)) + width * (len(conds) - 1) / 2)
        ax.set_xticklabels([f"{g}\n(n={counts[g]})" for g in groups], fontsize=8)
        ax.set_ylim(0, 1.05)
        ax.set_ylabel(metric)
        ax.set_title(f"by {col}")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
