"""``medrobust quickstart`` (reduced to one epoch on 48 images): standard and IMA side by side in one MLflow
experiment, progress bars while it runs, and an evaluate command that runs as printed."""

from __future__ import annotations

import shlex

import mlflow

from pipeline.cli import main


def test_quickstart_prints_both_methods_and_a_working_evaluate_command(tmp_path, mlflow_uri, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code = main(["quickstart", "--epochs", "1", "--samples", "48", "--output-dir", str(tmp_path / "qs")])
    captured = capsys.readouterr()
    out, err = captured.out, captured.err
    assert code == 0
    lines = out.splitlines()
    header = next(line for line in lines if line.split() == ["standard", "ima"])
    table = lines[lines.index(header) + 2:]
    rows = {line[:32].strip(): line[32:].split() for line in table[:12]}
    assert len(rows["clean accuracy"]) == 2
    for eps in ("0.25", "0.5", "1"):
        values = rows[f"PGD-20 L2 accuracy @ eps {eps}"]
        assert len(values) == 2 and all(0.0 <= float(v) <= 1.0 for v in values)
        assert len(rows[f"balanced accuracy @ eps {eps}"]) == 2
    assert rows["IMA mean per-sample radius"][0] == "-" and float(rows["IMA mean per-sample radius"][1]) > 0
    assert "compare them:   medrobust report --experiment quickstart" in out
    # progress bars: the training epochs (ignite) and the attack suite
    assert "train: [1/1] 100%" in err and "attack suite: 100%" in err

    client = mlflow.MlflowClient(mlflow_uri)
    runs = client.search_runs([client.get_experiment_by_name("quickstart").experiment_id])
    assert sorted(r.data.tags["medrobust.method"] for r in runs) == ["ima", "standard"]
    assert all("eval/pgd_l2/accuracy_at_0.5" in r.data.metrics for r in runs)

    command = next(line for line in lines if line.startswith("evaluate again: ")).split(": ", 1)[1]
    argv = shlex.split(command)
    assert argv[:2] == ["medrobust", "evaluate"]
    assert main(argv[1:]) == 0
    ima = next(r for r in runs if r.data.tags["medrobust.method"] == "ima").info.run_id
    assert argv[-1] == ima
    assert f"evaluation logged to MLflow run {ima}" in capsys.readouterr().out
