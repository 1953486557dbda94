"""Every method on classification and segmentation, 2D and 3D, with and without bf16 autocast; baselines."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from pipeline.adversarial.methods import METHODS, PGDAT, TRADES, build_method
from pipeline.adversarial.tasks import Classification, Task
from pipeline.config import method_config, method_knobs

CLS = Classification()


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny tensors: one intra-op thread is faster and immune to a loaded machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _setup(task_name: str, dims: int):
    torch.manual_seed(0)
    conv, bn = (nn.Conv2d, nn.BatchNorm2d) if dims == 2 else (nn.Conv3d, nn.BatchNorm3d)
    shape = (4, 1) + (6,) * dims
    x = torch.rand(shape)
    if task_name == "classification":
        model = nn.Sequential(conv(1, 4, 3, padding=1), bn(4), nn.ReLU(), nn.Flatten(), nn.LazyLinear(3))
        y = torch.tensor([0, 1, 2, 1])
    else:
        model = nn.Sequential(conv(1, 4, 3, padding=1), bn(4), nn.ReLU(), conv(4, 3, 1))
        y = (x * 3).long().clamp(max=2)
    model(x)
    return Task.make(task_name, 3, 0.6), model.train(), x, y


@pytest.mark.parametrize("amp", [False, True], ids=["fp32", "bf16"])
@pytest.mark.parametrize("task_name,dims", [("classification", 2), ("segmentation", 2), ("segmentation", 3)])
@pytest.mark.parametrize("name", sorted(METHODS))
def test_every_method_runs_everywhere(name, task_name, dims, amp):
    task, model, x, y = _setup(task_name, dims)
    cfg = method_config(**method_knobs(name, steps=2, eps=0.5, delta=0.5))
    method = build_method(cfg, task, n_train=10, clamp=(0.0, 1.0))
    index = torch.tensor([3, 7, 3, 0])                        # a duplicate, as 3D patches of one volume
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
        out = method.loss(model, x, y, index)
    assert out.loss.dim() == 0 and torch.isfinite(out.loss)
    assert out.pred.shape[0] == x.shape[0]
    assert model.training
    if out.adv is not None:
        assert out.adv.shape == x.shape and not out.adv.requires_grad
        assert out.adv.min() >= 0 and out.adv.max() <= 1
    out.loss.backward()
    assert all(p.grad is not None for p in model.parameters())
    logged = method.epoch_completed()
    assert all(isinstance(v, float) for v in logged.values())
    if method.state is not None:
        assert {"eps_mean", "eps_p10", "eps_p50", "eps_p90", "eps_max"} <= set(logged)
        assert method.state.epoch == 1


def test_standard_loss_is_the_task_loss():
    task, model, x, y = _setup("classification", 2)
    method = build_method(method_config(name="standard"), task, n_train=4)
    out = method.loss(model, x, y, torch.arange(4))
    assert method.state is None and out.adv is None and out.metrics == {}
    assert torch.allclose(out.loss, nn.functional.cross_entropy(out.pred, y))


def test_pgd_at_trains_on_adversarial_inputs_and_reports_the_clean_output():
    task, model, x, y = _setup("classification", 2)
    model.eval()
    method = build_method(method_config(name="pgd_at", eps=0.3, steps=5), task, n_train=4)
    assert isinstance(method, PGDAT)
    out = method.loss(model, x, y, torch.arange(4))
    assert ((out.adv - x).flatten(1).norm(dim=1) <= 0.3 + 1e-5).all()
    assert torch.allclose(out.pred, model(x))                       # pred: the clean output, as for every method
    assert torch.allclose(out.loss, nn.functional.cross_entropy(model(out.adv), y))
    assert out.loss > nn.functional.cross_entropy(model(x), y)


@pytest.mark.parametrize("task_name,dims", [("classification", 2), ("segmentation", 2)])
def test_trades_loss_is_clean_plus_beta_kl(task_name, dims):
    task, model, x, y = _setup(task_name, dims)
    model.eval()                                                     # same outputs in and out of the attack
    method = build_method(method_config(name="trades", eps=0.3, steps=5, norm="Linf"), task, n_train=4)
    assert isinstance(method, TRADES) and method.beta == 6.0
    out = method.loss(model, x, y, torch.arange(4))
    assert ((out.adv - x).abs().flatten(1).amax(dim=1) <= 0.3 + 1e-6).all()
    clean, adv = model(x), model(out.adv)
    p = clean.softmax(1)
    kl = (p * (clean.log_softmax(1) - adv.log_softmax(1))).sum(1)
    kl = kl.flatten(1).mean(1) if kl.dim() > 1 else kl
    expect = task.per_sample_loss(clean, y).mean() + 6.0 * kl.mean()
    assert torch.allclose(out.loss, expect, atol=1e-5)
    assert kl.mean() > 1e-4                                          # the attack found a divergent point
    assert torch.allclose(out.pred, clean)
