"""Stratified report: groups, counts and per-group metrics."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.evaluation.results import CLEAN, Condition, Outcome, SuiteResult
from pipeline.evaluation.stratified import age_band, plot_stratified, stratified_table


def constructed_result() -> SuiteResult:
    labels = np.array([0, 0, 0, 1, 1, 1])
    clean_pred = np.array([0, 0, 1, 1, 1, 1])     # one class-0 sample wrong
    adv_pred = np.array([1, 0, 1, 0, 1, 1])       # broken: samples 0 and 3 as well
    probs = lambda p: np.eye(2)[p] * 0.8 + 0.1  # noqa: E731
    return SuiteResult(
        task="classification", labels=labels, index=np.arange(6), class_names=["benign", "malignant"],
        outcomes={CLEAN: Outcome(probs=probs(clean_pred)), Condition("pgd", "L2", 0.5): Outcome(probs=probs(adv_pred))},
        meta={"sex": ["female", "male", "female", "male", None, "female"], "age": [25, 47, 50, 81, None, 33]})


def test_groups_counts_and_metrics(tmp_path):
    result = constructed_result()
    table = stratified_table(result, ["label", "sex", "age_band", "localization"])
    assert set(table["column"]) == {"class", "sex", "age_band"}          # localization absent: skipped
    counts = table.drop_duplicates(["column", "group"]).set_index(["column", "group"])["n"].to_dict()
    assert counts == {("class", "benign"): 3, ("class", "malignant"): 3, ("sex", "female"): 3,
                      ("sex", "male"): 2, ("sex", "unknown"): 1, ("age_band", "20-39"): 2,
                      ("age_band", "40-59"): 2, ("age_band", "80-99"): 1, ("age_band", "unknown"): 1}

    def value(column, group, attack, metric="accuracy"):
        sel = table[(table["column"] == column) & (table["group"] == group) & (table["attack"] == attack)
                    & (table["metric"] == metric)]
        assert len(sel) == 1
        return float(sel["value"].iloc[0])

    assert value("class", "benign", "clean") == pytest.approx(2 / 3)      # accuracy within a class = its recall
    assert value("class", "benign", "pgd") == pytest.approx(1 / 3)
    assert value("class", "malignant", "pgd") == pytest.approx(2 / 3)
    assert value("sex", "female", "clean") == pytest.approx(2 / 3)       # samples 0, 2, 5
    assert value("sex", "female", "pgd") == pytest.approx(1 / 3)
    assert value("sex", "male", "pgd") == pytest.approx(1 / 2)           # samples 1, 3
    path = plot_stratified(table, result, tmp_path / "stratified.png")
    assert path.exists() and path.stat().st_size > 1000


def test_age_bands():
    assert age_band(0) == "0-19" and age_band(45) == "40-59" and age_band(60.0) == "60-79"
    assert age_band(None) == "unknown" and age_band("n/a") == "unknown" and age_band(float("nan")) == "unknown"
