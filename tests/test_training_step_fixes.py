"""The training step you can trust (issue 11): AMP loss scaling, exact resume, DDP-safe guards and averages, and
PGD-AT's clean prediction. Each test here failed before its fix."""

from __future__ import annotations

import copy
import json
import multiprocessing
from datetime import timedelta
from pathlib import Path

import mlflow
import pytest
import torch
from ignite.engine import Engine, Events
from monai.data import DataLoader, Dataset
from monai.engines.utils import IterationEvents
from monai.utils.enums import CommonKeys as Keys

from pipeline.adversarial.methods import build_method
from pipeline.adversarial.tasks import Classification
from pipeline.config import config_from_dict, method_config
from pipeline.model.checkpoint import load_checkpoint, rng_state, set_rng_state
from pipeline.engine.handlers import BatchAverages, FiniteLossGuard
from pipeline.engine.run import train
from pipeline.engine.trainer import RobustTrainer
from pipeline.names import Keys as Ours
from pipeline.errors import NumericalFault


def toy_trainer(amp_dtype: torch.dtype | None, n: int = 12) -> RobustTrainer:
    g = torch.Generator().manual_seed(0)
    items = [{"image": torch.rand(1, 8, 8, generator=g) + i % 2, "label": i % 2, "index": i} for i in range(n)]
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 2))
    method = build_method(method_config(name="standard"), Classification(), n)
    return RobustTrainer(device=torch.device("cpu"), max_epochs=1, network=net, method=method,
                         train_data_loader=DataLoader(Dataset(items), batch_size=4),
                         optimizer=torch.optim.SGD(net.parameters(), lr=0.1), decollate=False,
                         amp=amp_dtype is not None, amp_kwargs={"dtype": amp_dtype} if amp_dtype else None)


def tiny_config(out: Path, epochs: int, **train_extra) -> dict:
    return {
        "experiment": "step-fixes", "task": "classification", "seed": 3,
        "data": {"source": "synthetic", "synthetic_size": 48, "cache": "none"},
        "model": {"name": "small_cnn", "channels": [8, 16]},
        "method": {"name": "standard"},
        "train": {"epochs": epochs, "batch_size": 16, "lr": 0.01, "device": "cpu", "progress": False,
                  "deterministic": True, "output_dir": str(out), **train_extra},
        "tracking": {"run_name": "step-fixes", "log_model": False},
    }


# --- AMP ---------------------------------------------------------------------------------------------------------

def test_bf16_trains_without_a_loss_scaler():
    trainer = toy_trainer(torch.bfloat16)
    before = [p.detach().clone() for p in trainer.network.parameters()]
    trainer.run()
    assert trainer.scaler is None                   # MONAI's Trainer.run() used to put a GradScaler here
    assert trainer.state.iteration == 3 and torch.isfinite(trainer.state.output[Keys.LOSS])
    assert any(not torch.equal(a, b) for a, b in zip(before, trainer.network.parameters()))


def test_float16_scaler_state_set_before_run_survives_run():
    trainer = toy_trainer(torch.float16)
    assert isinstance(trainer.scaler, torch.amp.GradScaler)
    trainer.scaler.load_state_dict({"scale": 8.0, "growth_factor": 2.0, "backoff_factor": 0.5,
                                    "growth_interval": 2000, "_growth_tracker": 5})
    trainer.run()
    # 3 finite steps at scale 8 after the restored 5: no growth before 2000, tracker 5 + 3
    assert trainer.scaler.state_dict()["scale"] == 8.0
    assert trainer.scaler.state_dict()["_growth_tracker"] == 8


@pytest.mark.slow
def test_float16_resume_continues_the_loss_scale(tmp_path, mlflow_uri):
    full = train(config_from_dict(tiny_config(tmp_path / "full", 2, amp=True, amp_dtype="float16")))
    part = train(config_from_dict(tiny_config(tmp_path / "part", 1, amp=True, amp_dtype="float16")))
    after_one = load_checkpoint(part.checkpoint)["scaler"]
    resumed = train(config_from_dict(tiny_config(tmp_path / "part", 2, amp=True, amp_dtype="float16")),
                    resume=str(part.checkpoint))
    a, b = load_checkpoint(full.checkpoint), load_checkpoint(resumed.checkpoint)
    assert a["epoch"] == b["epoch"] == 2 and a["iteration"] == b["iteration"] == 4   # 32 training images, batch 16
    assert (after_one["scale"], after_one["_growth_tracker"]) != (65536.0, 0)   # moved on from a fresh scaler
    assert b["scaler"] == a["scaler"]
    for key in a["network"]:
        torch.testing.assert_close(b["network"][key], a["network"][key], rtol=0, atol=0, msg=key)


# --- resume --------------------------------------------------------------------------------------------------------

def test_resume_keeps_best_checkpoint_when_the_metric_does_not_improve(tmp_path, mlflow_uri):
    # lr ~ 0: the validation accuracy is the same every epoch, so epoch 1 stays the best (MONAI: strictly greater)
    first = train(config_from_dict(tiny_config(tmp_path, 1, lr=1e-12)))
    assert load_checkpoint(tmp_path / "checkpoints" / "best.pt")["epoch"] == 1
    resumed = train(config_from_dict(tiny_config(tmp_path, 2, lr=1e-12)), resume=str(first.checkpoint))
    history = mlflow.MlflowClient(mlflow_uri).get_metric_history(resumed.run_id, "val_accuracy")
    values = {m.step: m.value for m in history}
    assert sorted(values) == [1, 2] and values[1] == values[2]
    best = load_checkpoint(tmp_path / "checkpoints" / "best.pt")
    assert best["epoch"] == 1                       # epoch 2 used to overwrite it: "no best yet" after a resume
    assert best["best"] == {"best_metric": pytest.approx(values[1]), "best_metric_epoch": 1}
    last = load_checkpoint(resumed.checkpoint)
    assert last["epoch"] == 2
    assert last["best"] == {"best_metric": pytest.approx(values[1]), "best_metric_epoch": 1}


def test_rng_state_has_a_gpu_slot_that_is_none_off_cuda():
    state = rng_state(torch.device("cpu"))
    assert state["cuda"] is None
    x = torch.rand(3)
    set_rng_state(state, torch.device("cpu"))
    assert torch.equal(torch.rand(3), x)


def test_gpu_rng_is_saved_and_restored_only_for_a_cuda_device(monkeypatch):
    # this machine has no GPU: stand-ins for the two torch.cuda RNG calls record what the logic asks of them
    calls = []
    marker = torch.arange(4, dtype=torch.uint8)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device="cuda": calls.append(("get", str(device))) or marker)
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda s, device="cuda": calls.append(("set", str(device), s)))

    state = rng_state(torch.device("cuda", 1))
    assert state["cuda"] is marker and calls == [("get", "cuda:1")]
    set_rng_state(state, torch.device("cpu"))      # training on the CPU: the GPU generator is left alone
    assert len(calls) == 1
    set_rng_state(state, torch.device("cuda", 1))
    assert calls[1][:2] == ("set", "cuda:1") and calls[1][2] is marker
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    set_rng_state(state, torch.device("cuda", 1))  # a GPU checkpoint resumed where there is none
    assert len(calls) == 2


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_random_draws_resume_exactly():
    device = torch.device("cuda", 0)
    state = rng_state(device)
    first = torch.randn(5, device=device)
    set_rng_state(state, device)
    assert torch.equal(torch.randn(5, device=device), first)


# --- DDP: the guard and the batch averages over 2 gloo processes ---------------------------------------------------

def _ddp_worker(rank: int, store: str, result: str) -> None:
    import torch.distributed as td

    torch.set_num_threads(1)
    td.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2,
                          timeout=timedelta(seconds=20))
    report: dict = {}
    try:
        # rank 1's loss turns NaN at iteration 2; the step then "backpropagates": a collective, as in DDP
        def step(engine, _):
            bad = rank == 1 and engine.state.iteration == 2
            engine.state.output = {Keys.IMAGE: torch.zeros(2, 1),
                                   Keys.LOSS: torch.tensor(float("nan") if bad else 1.0)}
            engine.fire_event(IterationEvents.LOSS_COMPLETED)
            td.all_reduce(torch.ones(1))
            return engine.state.output

        guarded = Engine(step)
        guarded.register_events(*IterationEvents)
        FiniteLossGuard("toy").attach(guarded)
        try:
            guarded.run(range(4), max_epochs=1)
            report["guard"] = None
        except NumericalFault as exc:
            report["guard"] = str(exc)
        except Exception as exc:  # noqa: BLE001  (a collective that failed because the other rank left)
            report["guard"] = f"{type(exc).__name__}: {exc}"[:300]

        # batch averages: rank 0 has batches of 2 samples, rank 1 of 3
        n = 2 + rank
        losses, adv = [[1.0, 3.0], [2.0, 4.0]][rank], [10.0, 20.0][rank]

        def batch(engine, _):
            return {Keys.IMAGE: torch.zeros(n, 1), Keys.LOSS: torch.tensor(losses[engine.state.iteration - 1]),
                    Ours.METRICS: {"adv_loss": adv}}

        averaged = Engine(batch)
        averages = BatchAverages()
        averages.attach(averaged)
        averaged.add_event_handler(Events.ITERATION_COMPLETED(once=1),
                                   lambda _: report.setdefault("after_first", averages.state_dict()))
        averaged.run(range(2), max_epochs=1)
        report["metrics"] = dict(averaged.state.metrics)
    finally:
        Path(result).write_text(json.dumps(report))
        td.destroy_process_group()


def test_ddp_guard_stops_every_rank_and_averages_cover_all_ranks(tmp_path):
    ctx = multiprocessing.get_context("fork")   # the children need nothing the parent has not imported
    results = [tmp_path / f"rank{r}.json" for r in (0, 1)]
    procs = [ctx.Process(target=_ddp_worker, args=(r, str(tmp_path / "store"), str(results[r]))) for r in (0, 1)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(90)
    for p in procs:
        if p.is_alive():
            p.kill()
    reports = [json.loads(r.read_text()) if r.exists() else {} for r in results]
    assert [r.get("guard", "")[:24] for r in reports] == ["non-finite training loss"] * 2, reports
    assert [p.exitcode for p in procs] == [0, 0]
    for rank, report in enumerate(reports):
        guard = report["guard"]
        assert guard is not None and guard.startswith("non-finite training loss (on 1 of 2 ranks; "), (rank, guard)
        assert "at epoch 1, iteration 2 (method toy)" in guard, guard
        # sample-weighted over both ranks: (2*1 + 2*3 + 3*2 + 3*4) / 10; adv (4*10 + 6*20) / 10
        assert report["metrics"] == {"train_loss": pytest.approx(2.6), "train_adv_loss": pytest.approx(16.0)}
        # synced after iteration 1 (the mid-epoch checkpoint's view): both ranks' first batches
        assert report["after_first"] == {"sums": {"adv_loss": 80.0, "loss": 8.0}, "count": 5}
    assert "rank 1: nan" in reports[1]["guard"] and "rank 0: 1" in reports[0]["guard"]


def test_guard_message_with_one_process_is_unchanged():
    out = {Keys.IMAGE: torch.zeros(4, 1), Keys.LOSS: torch.tensor(float("inf")),
           "adv": torch.tensor([[0.0], [float("nan")], [1.0], [float("inf")]])}
    assert FiniteLossGuard.counts(out) == (2, 4, 1)
    assert FiniteLossGuard.counts({Keys.IMAGE: torch.zeros(2, 1), Keys.LOSS: torch.tensor(0.5)}) == (0, 0, 0)


# --- PGD-AT --------------------------------------------------------------------------------------------------------

def test_pgd_at_reports_the_clean_output_as_pred():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
                                torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(4, 2))
    model.train()
    model(torch.rand(8, 1, 8, 8))                   # running statistics that differ from the first batch's
    x, y = torch.rand(4, 1, 8, 8), torch.tensor([0, 1, 0, 1])
    reference = copy.deepcopy(model).eval()
    with torch.no_grad():
        expected = reference(x)
    method = build_method(method_config(name="pgd_at", eps=0.5, steps=3), Classification(), n_train=4)
    out = method.loss(model, x, y, torch.arange(4))
    assert model.training                           # the training forward stays in train mode
    assert not out.pred.requires_grad              # no gradient spent on the clean output
    torch.testing.assert_close(out.pred, expected)  # clean, eval mode (attack_bn: running)
    with torch.no_grad():
        adv_out = reference(out.adv)
    assert (out.pred - adv_out).abs().max() > 1e-3  # not the output on the adversarial inputs
    assert out.loss.requires_grad and set(out.metrics) == {"adv_loss"}
