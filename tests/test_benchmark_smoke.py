"""The step-cost benchmark runs end to end on CPU at tiny sizes and writes complete results; its pass log and
floor see exactly the passes each method computes.

Only that it works, what it writes and which passes it counts are checked: timing targets are read from the
benchmark's output, never asserted here.
"""

from __future__ import annotations

import json
import os
import platform
import re
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks.step_cost import METHODS, WORKLOADS, Floor, PassLog, pass_mode, recipe
from pipeline.adversarial.tasks import Task

REPO = Path(__file__).resolve().parents[1]
K, B, BISECTION = 2, 2, 10   # --steps 2, --tiny batch 2, method_config(name="ima").bisection_steps

# the passes of one iteration of each method with a fixed row count (B rows, K attack steps)
FIXED = {
    "standard": [("S", B)],
    "pgd_at": [("N", B)] + [("A", B)] * K + [("S", B)],       # clean pred (no grad), K steps, adversarial step
    # attack first (KL reference, K steps), then the clean step and the KL pass: no graph held through the attack
    "trades": [("N", B)] + [("A", B)] * K + [("S", B), ("T", B)],
    "dpaat": [("S", B)] + [("A", B)] * K + [("T", B)],
    "mart": [("A", B)] * K + [("S", B), ("T", B)],                  # K steps, then the clean and adversarial passes
}


def ima_passes_ok(log: list, found_frac: float, first_wrong: bool) -> bool:
    """IMA: the clean step; K attack steps on the correctly handled rows (``first_wrong``: rows leave at their
    first wrong iterate, so the steps shrink and may end early), then the final-iterate check on the rows still
    attacked (none if every row left); ``bisection_steps`` no-grad forwards on the crossed rows; the adversarial
    pass on those (a single row doubled)."""
    kinds = "".join("a" if k == "A" else k for k, _ in log)
    if not re.fullmatch(r"S(a{1,%d}N?)?(N{%d}T)?" % (K, BISECTION), kinds):
        return False
    attack = [rows for kind, rows in log if kind == "A"]
    if attack != sorted(attack, reverse=True):
        return False
    if attack and not first_wrong and (len(attack) != K or len(set(attack)) != 1 or log[K + 1] != ("N", attack[0])):
        return False
    hit = round(found_frac * B)
    if hit:
        return log[-1] == ("T", max(hit, 2)) and log[-1 - BISECTION:-1] == [("N", hit)] * BISECTION
    return log[-1][0] != "T"


def test_step_cost_tiny_cpu_run(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    result = subprocess.run(
        [sys.executable, "-m", "benchmarks.step_cost", "--tiny", "--device", "cpu", "--iters", "1", "--warmup", "1",
         "--steps", str(K), "--ima-radii", "4", "--data", str(tmp_path / "no-data"), "--out", str(tmp_path)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    report = json.loads((tmp_path / "step_cost.json").read_text())
    assert report["settings"]["tiny"] is True and report["settings"]["steps"] == K
    assert report["settings"]["cpu_allocator"] == ("keep" if platform.libc_ver()[0] == "glibc" else "system")
    assert report["torch"] and report["device"]
    rows = {(r["workload"], r["method"]): r for r in report["rows"]}
    assert set(rows) == {(w, m) for w in WORKLOADS for m in METHODS}
    for (workload, method), row in rows.items():
        assert row["batch"] == B and row["K"] == (0 if method == "standard" else K)
        assert row["full_s"] > 0 and row["floor_s"] > 0 and row["images_per_s"] > 0, (workload, method)
        assert row["faults"] >= 0                           # minor page faults of a step (median)
        assert len(row["pass_log"]) == len(row["full_iter_s"]) == len(row["floor_iter_s"]) == 1  # --iters 1
        # the floor: every logged pass at its time alone; the ratio: median of the per-iteration ratios
        log = [tuple(p) for p in row["pass_log"][0]]
        assert row["floor_iter_s"][0] == pytest.approx(sum(row["pass_s"][f"{k}{n}"] for k, n in log), rel=1e-9)
        assert row["ratio"] == statistics.median(f / g for f, g in zip(row["full_iter_s"], row["floor_iter_s"]))
        assert row["ratio_runs"] == [row["ratio"]]   # --repeats 1
        assert row["passes"] == recipe(log, B)
        if method == "ima":
            found = row["method_metrics"]["found_frac"]
            assert ima_passes_ok(log, found, first_wrong=False), log
            # "handled correctly" checks: the clean batch, every iterate (x_0..x_K), every bisection halving
            attacked = any(kind == "A" for kind, _ in log)
            assert row["checks"] == 1 + (K + 1) * attacked + BISECTION * (found > 0)
        else:
            assert log == FIXED[method], (workload, method, log)
            assert row["checks"] == (1 if method == "dpaat" else 0)   # DPAAT records the clean flags
        assert row["check_s"] >= 0 and (row["check_s"] > 0) == (row["checks"] > 0)
        assert row["ratio_without_checks"] == statistics.median(
            (f - c) / g for f, c, g in zip(row["full_iter_s"], row["check_iter_s"], row["floor_iter_s"]))
        assert row["peak_mem_mib"] is None  # CPU: no CUDA memory statistics
    for workload in WORKLOADS:
        assert rows[(workload, "standard")]["vs_monai"] > 0
        assert rows[(workload, "ima")]["vs_pgd_at"] == (rows[(workload, "ima")]["full_s"]
                                                        / rows[(workload, "pgd_at")]["full_s"])  # one run each

    sweep = report["ima_sweep"]
    assert [(e["workload"], e["eps"]) for e in sweep] == [(w, 4.0) for w in WORKLOADS]
    for entry in sweep:
        pgd_at, ima = entry["pgd_at"], entry["ima"]
        assert pgd_at["eps"] == ima["eps"] == 4.0 and ima["bracket"] == "first_wrong"
        assert [tuple(p) for p in pgd_at["pass_log"][0]] == FIXED["pgd_at"]
        assert ima_passes_ok([tuple(p) for p in ima["pass_log"][0]], ima["method_metrics"]["found_frac"],
                             first_wrong=True), ima["pass_log"]
        assert entry["found_frac"] == ima["found_frac"] and 0 <= entry["found_frac"] <= 1
        assert entry["vs_pgd_at"] == ima["full_s"] / pgd_at["full_s"]
    assert report["data_wait"] and all("skipped" in r for r in report["data_wait"])

    table = (tmp_path / "step_cost.md").read_text()
    assert report["device"] in table and f"torch {report['torch']}" in table
    assert table.count("| resnet18_224 |") == len(METHODS) + 1   # the methods, then the IMA/PGD-AT sweep row


def test_recipe_groups_runs_and_marks_partial_rows():
    log = [("S", 8), ("A", 8), ("A", 8), ("A", 5), ("N", 5), ("N", 3), ("N", 3), ("T", 3)]
    assert recipe(log, 8) == "S 2A A[5] N[5] 2N[3] T[3]"
    assert recipe([], 8) == ""


def test_pass_log_kinds_and_floor_leave_the_network_unchanged():
    """A small BatchNorm network: the log names each forward by autograd and mode; timing the floor's passes
    (an Adam step among them) moves neither a weight nor a BatchNorm statistic, and logs nothing."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
                              torch.nn.Flatten(), torch.nn.Linear(4 * 6 * 6, 3))
    task = Task.make("classification", 3)
    batch = {"image": torch.rand(4, 1, 8, 8), "label": torch.tensor([0, 1, 2, 0])}
    log = PassLog(net)
    floor = Floor(log, net, task, batch, torch.device("cpu"), amp=False)
    x = batch["image"]
    log.new_iteration()
    net.train()
    net(x)                        # S: first training forward
    with torch.no_grad():
        net(x[:3])                # Nt: no grad, train mode
    net.eval()
    net(x[:2] + 0.5)              # A: autograd on, eval mode (at a perturbed input)
    with torch.no_grad():
        net(x)                    # N
    net.train()
    net(x[:2])                    # T: a further training forward
    assert log.iterations == [[("S", 4), ("Nt", 3), ("A", 2), ("N", 4), ("T", 2)]]
    # each pass is timed on the input it had (the last one of its kind and rows)
    assert sorted(log.inputs) == sorted(log.iterations[0])
    assert torch.equal(log.inputs[("A", 2)], x[:2] + 0.5)
    assert all(torch.equal(log.inputs[key], x[:key[1]]) for key in log.inputs if key != ("A", 2))

    before = {k: v.clone() for k, v in net.state_dict().items()}
    floor()
    log.close()
    assert log.iterations == [[("S", 4), ("Nt", 3), ("A", 2), ("N", 4), ("T", 2)]]
    after = net.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    times = floor.pass_times(0)
    assert sorted(times) == ["A2", "N4", "Nt3", "S4", "T2"] and all(t > 0 for t in times.values())
    assert floor.floors(0) == [pytest.approx(sum(times.values()))]


def test_floor_times_attack_passes_with_the_methods_batchnorm_rule():
    """``A`` and ``N`` passes are timed in the method's attack network: with ``attack_bn: batch`` (IMA) the
    network normalises with the clean batch's statistics (its output at x is the train-mode output), with
    ``running`` it is the eval-mode network; eval mode inside both, the training mode restored after."""
    import copy

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.PReLU(),
                              torch.nn.Flatten(), torch.nn.Linear(4 * 6 * 6, 3))
    batch = {"image": torch.rand(4, 1, 8, 8) * 3 + 1, "label": torch.tensor([0, 1, 2, 0])}
    x = batch["image"]
    saved = copy.deepcopy(net.state_dict())
    with torch.no_grad():
        train_out = copy.deepcopy(net).train()(x)
        eval_out = copy.deepcopy(net).eval()(x)
    assert not torch.allclose(train_out, eval_out, atol=1e-2)     # the two rules differ on this input
    net.train()
    for bn, expected in (("batch", train_out), ("running", eval_out)):
        for kind in ("A", "N"):
            net.load_state_dict(saved)                                # as Floor restores the buffers
            with pass_mode(kind, net, batch, False, bn):
                assert not net.training
                out = net(x)
            assert net.training
            torch.testing.assert_close(out.detach(), expected)


def test_floor_with_the_batch_rule_times_each_pass_on_its_input_and_restores_the_network():
    """The floor of a method with ``attack_bn: batch``: each pass is run on the input it had in the step (here
    an attack step at x + 0.25), BatchNorm buffers and the network's mode are what they were before, although
    the rule's recording forward ran in train mode."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.PReLU(),
                              torch.nn.Flatten(), torch.nn.Linear(4 * 6 * 6, 3))
    task = Task.make("classification", 3)
    batch = {"image": torch.rand(4, 1, 8, 8), "label": torch.tensor([0, 1, 2, 0])}
    x = batch["image"]
    log = PassLog(net)
    floor = Floor(log, net, task, batch, torch.device("cpu"), amp=False, bn="batch")
    log.new_iteration()
    net.eval()
    net(x + 0.25)                                   # A: the step's attack iterate
    log.stop()
    seen = []
    hook = net.register_forward_pre_hook(lambda module, args: seen.append((module.training, args[0].clone())))
    before = {k: v.clone() for k, v in net.state_dict().items()}
    floor()
    hook.remove()
    log.close()
    assert not net.training                                     # as it was
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    timed = [inp for training, inp in seen if not training]     # the timed runs (eval), after each recording
    assert len(timed) == 2 and all(torch.equal(inp, x + 0.25) for inp in timed)
    recorded = [inp for training, inp in seen if training]      # the rule's recording forwards: the clean batch
    assert len(recorded) == 2 and all(torch.equal(inp, x) for inp in recorded)


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_keep_freed_memory_stops_page_faults_of_repeated_allocations():
    """Tensors of 4 to 20 MiB allocated and freed over and over, under glibc's static default threshold (128 KiB,
    set through the environment: left to itself glibc moves it with the history of the process, so a baseline
    without it would depend on what ran before): each is mapped and faulted in again, thousands of minor page
    faults; after keep_freed_memory, none."""
    script = (
        "import resource, sys, torch\n"
        "kept = None\n"
        "if sys.argv[1] == 'keep':\n"    # the import alone moves glibc's thresholds: only here
        "    from benchmarks.step_cost import keep_freed_memory\n"
        "    kept = keep_freed_memory()\n"
        "def rounds(n):\n"
        "    for _ in range(n):\n"
        "        batch = [torch.ones(2**20 * (1 + k % 5)) for k in range(10)]\n"
        "        del batch\n"
        "rounds(3)\n"
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt\n"
        "rounds(10)\n"
        "print(kept, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)\n")
    faults = {}
    for mode in ("system", "keep"):
        result = subprocess.run([sys.executable, "-c", script, mode], cwd=REPO, capture_output=True, text=True,
                                env=dict(os.environ, PYTHONPATH=str(REPO), MALLOC_MMAP_THRESHOLD_="131072"),
                                timeout=120)
        assert result.returncode == 0, result.stderr[-2000:]
        kept, count = result.stdout.split()
        faults[mode] = int(count)
        assert kept == ("True" if mode == "keep" else "None")
    assert faults["keep"] == 0 and faults["system"] > 1000, faults


def test_data_wait_on_real_data(tmp_path, shared_data):
    """DermaMNIST through the config's CacheDataset + ThreadDataLoader: a share between 0 and 1."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    result = subprocess.run(
        [sys.executable, "-m", "benchmarks.step_cost", "--tiny", "--device", "cpu", "--iters", "2", "--warmup", "1",
         "--steps", "1", "--workloads", "unet2d_256", "--methods", "standard", "--data-methods", "standard",
         "--ima-radii", "", "--data", str(shared_data), "--out", str(tmp_path)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    waits = {r["dataset"]: r for r in json.loads((tmp_path / "step_cost.json").read_text())["data_wait"]}
    assert set(waits) == {"dermamnist", "isic2017"}
    for row in waits.values():
        assert "skipped" not in row
        assert 0 <= row["share"] < 1 and row["total_s"] > 0 and row["iterations"] == 2


def test_eval_cost_small_dermamnist_run(shared_data, tmp_path):
    """eval_cost end to end on a small DermaMNIST model: exit 0 (no early-exit accuracy above the exhaustive one),
    early exit cheaper, and the suite floor (attacks on samples that hold) never above what early exit spent."""
    from benchmarks.eval_cost import main

    npz = shared_data / "dermamnist" / "dermamnist.npz"
    if not npz.is_file():
        pytest.skip(f"{npz} is absent")
    out = tmp_path / "eval-cost"
    assert main(["--samples", "6", "--steps", "5", "--setups", "dermamnist", "--train-limit", "200", "--epochs", "1",
                 "--data", str(shared_data), "--out", str(out)]) == 0
    report = json.loads((out / "eval_cost.json").read_text())
    runs = report["setups"]["dermamnist"]["runs"]
    old, new = runs["exhaustive"], runs["early_exit"]
    assert set(old["accuracy"]) == set(new["accuracy"]) and len(new["accuracy"]) == 19
    assert all(new["accuracy"][k] <= old["accuracy"][k] + 1e-12 for k in old["accuracy"])
    assert new["grad"] < old["grad"] and new["suite"]["floor"] <= new["suite"]["grad"] <= old["suite"]["grad"]
    assert "x fewer gradient evaluations" in (out / "eval_cost.md").read_text()
