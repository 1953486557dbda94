"""``medrobust report`` over real MLflow runs in a local SQLite store."""

from __future__ import annotations

import mlflow
import pytest
from evaluation_toys import log_evaluated_run

from pipeline.errors import InputError
from pipeline.evaluation.report import report, to_markdown


@pytest.fixture()
def two_runs(mlflow_uri):
    client = mlflow.MlflowClient(mlflow_uri)
    exp = client.create_experiment("compare")
    a = log_evaluated_run(client, exp, "standard", 0.9, [0.4, 0.05], [0.5, 1.0], [10.0, 12.0])
    b = log_evaluated_run(client, exp, "ima", 0.85, [0.7, 0.5], [0.5, 1.0], [30.0, 31.5])
    return client, exp, a, b


def test_report_table_has_both_methods_and_the_plot(two_runs, tmp_path, mlflow_uri):
    client, exp, a, b = two_runs
    rep = report("compare", out=tmp_path / "rep", tracking_uri=mlflow_uri)
    table = rep.table.set_index("method")
    assert set(table.index) == {"standard", "ima"}
    assert table.loc["ima", "clean accuracy"] == pytest.approx(0.85)
    assert table.loc["standard", "pgd_l2 accuracy @1"] == pytest.approx(0.05)
    assert table.loc["ima", "pgd_l2 accuracy @0.5"] == pytest.approx(0.7)
    assert table.loc["ima", "training time (s)"] == pytest.approx(61.5)      # sum of the epoch times
    assert table.loc["ima", "pgd_l2 auc_norm"] > table.loc["standard", "pgd_l2 auc_norm"]
    md = (tmp_path / "rep" / "report.md").read_text()
    assert "| standard-run | standard | synthetic |" in md
    assert md.count("\n|") >= 3 and "ima" in md and "pgd_l2 accuracy @0.5" in md
    html = (tmp_path / "rep" / "report.html").read_text()
    assert "<table" in html and "ima" in html and "robustness_curves.png" in html
    assert (tmp_path / "rep" / "robustness_curves.png").stat().st_size > 5000
    # the report itself is a run of the experiment, tagged as such, holding the files
    summary = client.get_run(rep.run_id)
    assert summary.data.tags["medrobust.kind"] == "report"
    files = {f.path for f in client.list_artifacts(rep.run_id, "report")}
    assert {"report/report.md", "report/report.html", "report/robustness_curves.png"} <= files
    # a second report does not list the first report as a run to compare
    again = report("compare", out=tmp_path / "rep2", tracking_uri=mlflow_uri)
    assert len(again.table) == 2


def test_unknown_experiment_is_an_input_error(mlflow_uri, tmp_path):
    with pytest.raises(InputError) as err:
        report("no-such-experiment", out=tmp_path / "r", tracking_uri=mlflow_uri)
    assert err.value.problems[0].startswith("--experiment no-such-experiment: no such MLflow experiment")


def test_empty_experiment_is_an_input_error(mlflow_uri, tmp_path):
    mlflow.MlflowClient(mlflow_uri).create_experiment("empty")
    with pytest.raises(InputError, match="no runs to compare"):
        report("empty", out=tmp_path / "r", tracking_uri=mlflow_uri)


def test_markdown_table_shape():
    import pandas as pd

    md = to_markdown(pd.DataFrame({"method": ["a|b"], "x": [0.123456], "y": [float("nan")]}))
    assert md.splitlines() == ["| method | x | y |", "|---|---|---|", "| a\\|b | 0.1235 |  |"]
