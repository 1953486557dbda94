"""IMA: the loss of one batch and the end-of-epoch radius update, against hand computations."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from pipeline.adversarial.methods import IMA, build_method
from pipeline.adversarial.tasks import Classification
from pipeline.config import method_config

CLS = Classification()


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny tensors: one intra-op thread is faster and immune to a loaded machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _method(**overrides) -> IMA:
    cfg = method_config(name="ima", norm="L2", steps=10, delta=0.1, eps_max=1.0, **overrides)
    method = build_method(cfg, CLS, n_train=8)
    assert isinstance(method, IMA) and method.beta == 0.5
    return method


def test_epoch_end_update_all_four_flag_combinations_and_clamp():
    method = _method()
    state = method.state
    assert torch.allclose(state.eps, torch.full((8,), 0.1))                 # radii start at delta
    state.eps = torch.tensor([0.5, 0.5, 0.5, 0.5, 0.95, 0.3, 0.2, 0.4])
    state.dist = torch.tensor([0.2, 0.2, 0.2, 0.2, 0.2, 0.2, 0.2, 1.7])
    state.correct = torch.tensor([True, True, False, False, True, True, False, True])
    state.found = torch.tensor([False, True, False, True, False, True, False, True])
    summary = method.epoch_completed()
    # correct&~found: +delta; correct&found: dist; not correct: unchanged; clamp to [0, eps_max=1]
    expect = torch.tensor([0.6, 0.2, 0.5, 0.5, 1.0, 0.2, 0.2, 1.0])
    assert torch.allclose(state.eps, expect)
    assert summary["eps_max"] == pytest.approx(1.0) and summary["eps_mean"] == pytest.approx(float(expect.mean()))
    assert not state.found.any() and not state.correct.any() and state.epoch == 1    # flags reset


def test_loss_and_state_match_a_hand_computation():
    torch.manual_seed(0)
    model = nn.Linear(4, 2)
    w = (model.weight[1] - model.weight[0]).detach()
    b = (model.bias[1] - model.bias[0]).detach()
    x = torch.randn(6, 4)
    y = (x @ w + b > 0).long()
    y[5] = 1 - y[5]                                                   # wrong on clean input
    gap = ((x @ w + b).abs() / w.norm())
    method = _method(bisection_steps=12, random_start=False)
    method.state.eps = torch.tensor([0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0])
    index = torch.tensor([7, 1, 4, 0, 2, 6])
    method.state.eps[index] = torch.stack([gap[0] * 2, gap[1] * 0.5, gap[2] * 3, gap[3] * 0.5,
                                          gap[4] * 2, gap[5] * 2])
    method.state.dist[index] = method.state.eps[index]
    dist_before = method.state.dist.clone()
    out = method.loss(model, x, y, index)

    correct = torch.tensor([True, True, True, True, True, False])
    crossed = torch.tensor([True, False, True, False, True, False])
    clean = nn.functional.cross_entropy(model(x), y, reduction="none")
    adv = nn.functional.cross_entropy(model(out.adv), y, reduction="none")
    expect = 0.5 * clean.mean() + 0.5 * adv[crossed].sum() / 6
    assert torch.allclose(out.loss, expect, atol=1e-6)
    assert torch.allclose(out.pred, model(x))                          # pred: the clean output
    residual = (out.adv[crossed] @ w + b).abs() / w.norm()
    assert (residual < 0.01 * gap[crossed]).all()                       # boundary points
    state = method.state
    assert state.correct[index].tolist() == correct.tolist()
    assert state.found[index].tolist() == crossed.tolist()
    moved = (out.adv - x).norm(dim=1)
    new_dist = torch.where(crossed, (dist_before[index] + moved) / 2, dist_before[index])
    assert torch.allclose(state.dist[index], new_dist)
    assert torch.allclose(state.clean_loss[index], clean.detach())
    assert out.metrics["found_frac"] == pytest.approx(0.5)
    out.loss.backward()
    assert model.weight.grad is not None


def test_no_crossing_means_only_the_clean_term():
    torch.manual_seed(1)
    model = nn.Linear(4, 2)
    x = torch.randn(5, 4)
    y = model(x).argmax(1)
    method = _method()
    method.state.eps.zero_()                                            # radius 0: nothing can cross
    out = method.loss(model, x, y, torch.arange(5))
    assert torch.allclose(out.loss, 0.5 * nn.functional.cross_entropy(model(x), y))
    assert not method.state.found.any() and method.state.correct[:5].all()
    method.epoch_completed()
    assert torch.allclose(method.state.eps[:5], torch.full((5,), 0.1))  # 0 + delta
