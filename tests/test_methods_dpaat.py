"""DPAAT: the online criterion tau and the radius updates, against hand computations."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from pipeline.adversarial.methods import DPAAT, build_method
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


def _method(clamp=None, **overrides) -> DPAAT:
    settings = dict(eps=0.5, delta=0.1, eps_min=0.2, eps_max=0.8, quantile=0.5, momentum=0.25)
    cfg = method_config(name="dpaat", **{**settings, **overrides})
    method = build_method(cfg, CLS, n_train=6, clamp=clamp)
    assert isinstance(method, DPAAT) and method.beta == 0.5
    return method


def test_tau_first_epoch_then_smoothed_and_radius_updates_with_clamps():
    method = _method()
    state = method.state
    assert torch.allclose(state.eps, torch.full((6,), 0.5))
    state.eps = torch.tensor([0.5, 0.75, 0.25, 0.5, 0.5, 0.5])
    # samples 0..4 seen; sample 5 unseen keeps its radius
    state.record(torch.tensor([0, 1, 2, 3, 4]), clean_loss=torch.tensor([1.0, 2.0, 3.0, 4.0, 10.0]),
                 adv_loss=torch.tensor([2.0, 3.0, 3.5, 3.0, 9.0]))
    summary = method.epoch_completed()
    assert state.tau == pytest.approx(3.0)                                   # median of the clean losses
    assert summary["tau"] == pytest.approx(3.0)
    # robust (adv <= 3): 0 -> 0.6, 1 -> min(0.8, 0.85) = 0.8, 3 -> 0.6; not robust: 2 -> max(0.2, 0.15) = 0.2,
    # 4 -> 0.4; unseen 5 unchanged
    assert torch.allclose(state.eps, torch.tensor([0.6, 0.8, 0.2, 0.6, 0.4, 0.5]))
    assert state.epoch == 1 and not state.seen.any()

    state.record(torch.tensor([0, 1, 2, 3]), clean_loss=torch.tensor([4.0, 5.0, 6.0, 7.0]),
                 adv_loss=torch.tensor([3.25, 3.5, 3.0, 8.0]))
    method.epoch_completed()
    assert state.tau == pytest.approx(0.75 * 3.0 + 0.25 * 5.5)               # (1 - m) tau + m new = 3.625
    assert torch.allclose(state.eps, torch.tensor([0.7, 0.8, 0.3, 0.5, 0.4, 0.5]))


def test_quantile_is_configurable():
    method = _method(quantile=0.25)
    method.state.record(torch.arange(5), clean_loss=torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0]),
                        adv_loss=torch.zeros(5))
    method.epoch_completed()
    assert method.state.tau == pytest.approx(2.0)


def test_loss_matches_a_hand_computation_and_fills_the_bank():
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    x, y = torch.rand(5, 4), torch.tensor([0, 1, 2, 0, 1])
    method = _method(clamp=(0.0, 1.0))
    index = torch.tensor([5, 0, 3, 1, 2])
    out = method.loss(model, x, y, index)
    clean = nn.functional.cross_entropy(model(x), y, reduction="none")
    adv = nn.functional.cross_entropy(model(out.adv), y, reduction="none")
    assert torch.allclose(out.loss, 0.5 * clean.mean() + 0.5 * adv.mean(), atol=1e-6)
    assert ((out.adv - x).norm(dim=1) <= 0.5 + 1e-5).all() and out.adv.min() >= 0 and out.adv.max() <= 1
    assert torch.allclose(method.state.clean_loss[index], clean.detach())
    assert torch.allclose(method.state.adv_loss[index], adv.detach())
    assert (adv >= clean - 1e-6).all()
    assert method.state.seen.sum() == 5 and not method.state.seen[4]
