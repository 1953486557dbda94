"""IMA and DPAAT back-propagate their clean term before the attack when the trainer lets them
(``Method.backward_now``): the same gradients and reported loss as one backward of the whole loss."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from pipeline.adversarial.methods import build_method
from pipeline.adversarial.tasks import Classification
from pipeline.config import method_config


def small_bn_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                         nn.Linear(4 * 8 * 8, 3)).train()


def grads_and_loss(method, net, x, y, index, early: bool):
    net.zero_grad(set_to_none=True)
    calls = []

    def hook(part):
        calls.append(float(part.detach()))
        part.backward()

    method.backward_hook = hook if early else None
    torch.manual_seed(1)                                   # the same random starts in both runs
    out = method.loss(net, x, y, index)
    if out.done is None or out.loss.requires_grad:
        out.loss.backward()
    reported = float(out.loss.detach() + (out.done if out.done is not None else 0))
    return [p.grad.clone() for p in net.parameters()], reported, calls, out


@pytest.mark.parametrize("name, knobs", [("ima", {"delta": 2.0, "steps": 5}), ("dpaat", {"eps": 0.5, "steps": 5})])
def test_clean_term_back_propagated_early_gives_the_same_gradients(name, knobs):
    net = small_bn_net()
    x = torch.rand(8, 1, 8, 8, generator=torch.Generator().manual_seed(2))
    y = torch.arange(8) % 3
    index = torch.arange(8)
    results = {}
    for early in (False, True):   # each run from the same weights and BatchNorm buffers (train forwards move them)
        method = build_method(method_config(name=name, **knobs), Classification(), 8, clamp=(0.0, 1.0))
        results[early] = grads_and_loss(method, copy.deepcopy(net), x, y, index, early)
    (g_once, loss_once, calls_once, out_once), (g_early, loss_early, calls_early, out_early) = results[False], results[True]
    assert calls_once == [] and out_once.done is None
    beta = 0.5
    assert len(calls_early) == 1 and calls_early[0] == pytest.approx((1 - beta) * out_early.metrics["clean_loss"])
    assert float(out_early.done) == pytest.approx(calls_early[0])
    assert loss_early == pytest.approx(loss_once, rel=1e-6)
    for a, b in zip(g_once, g_early):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    if name == "ima":
        assert out_early.metrics["found_frac"] > 0           # the adversarial term took part in the gradients
