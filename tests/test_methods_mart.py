"""MART: the loss against a hand computation, the per-sample weighting, segmentation, and a config that runs."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from pipeline.adversarial.methods import MART, build_method
from pipeline.adversarial.tasks import Classification, Segmentation
from pipeline.config import method_config, load_config

CLS = Classification()


class Fixed(nn.Module):
    """Logits = x itself (inputs are 3 numbers per sample): everything can be computed by hand."""

    def forward(self, x):
        return x.flatten(1)


def test_zero_radius_loss_is_the_boosted_cross_entropy_by_hand():
    x = torch.tensor([[2.0, 0.0, 0.0], [0.0, 1.0, 3.0]])
    y = torch.tensor([0, 1])
    method = build_method(method_config(name="mart", eps=0.0, steps=1), CLS, 2)
    assert isinstance(method, MART) and method.beta == 6.0
    out = method.loss(Fixed(), x, y, torch.arange(2))
    # sample 0: p = (e^2, 1, 1) / (e^2 + 2); sample 1: p = (1, e, e^3) / (1 + e + e^3)
    z0 = math.exp(2) + 2
    z1 = 1 + math.e + math.exp(3)
    bce0 = -math.log(math.exp(2) / z0) - math.log(1 - 1 / z0)
    bce1 = -math.log(math.e / z1) - math.log(1 - math.exp(3) / z1)
    assert float(out.loss) == pytest.approx((bce0 + bce1) / 2, rel=1e-5)     # x_adv = x: the KL term is 0
    assert out.metrics["kl"] == pytest.approx(0.0, abs=1e-7)


def test_kl_term_is_weighted_by_the_clean_misclassification_probability():
    torch.manual_seed(0)
    x = torch.tensor([[4.0, 0.0, 0.0], [0.0, 0.1, 0.0]])                # confident / unsure about class 0 / 1
    y = torch.tensor([0, 1])
    method = build_method(method_config(name="mart", eps=0.5, steps=3, beta=2.0), CLS, 2)
    out = method.loss(Fixed(), x, y, torch.arange(2))
    p, q = x.softmax(1), out.adv.flatten(1).softmax(1)
    kl = (p * (p.log() - q.log())).sum(1)
    weight = 1 - p[torch.arange(2), y]
    wrong = q.clone()
    wrong[torch.arange(2), y] = 0
    boosted = nn.functional.cross_entropy(out.adv.flatten(1), y, reduction="none") - torch.log(1 - wrong.amax(1))
    expect = boosted.mean() + 2.0 * (kl * weight).mean()
    assert float(out.loss) == pytest.approx(float(expect), rel=1e-5)
    assert float(weight[0]) < 0.05 < 0.6 < float(weight[1])
    assert torch.allclose((out.adv - x).norm(dim=1), torch.full((2,), 0.5), atol=1e-5)


def test_segmentation_maps_and_gradients():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 2, 1)).train()
    x = torch.rand(3, 1, 8, 8)
    y = (x > 0.5).long()
    method = build_method(method_config(name="mart", eps=0.5, steps=2), Segmentation(2), 3, clamp=(0.0, 1.0))
    out = method.loss(model, x, y, torch.arange(3))
    assert out.pred.shape == (3, 2, 8, 8) and torch.isfinite(out.loss)
    out.loss.backward()
    assert all(p.grad is not None for p in model.parameters())


def test_config_file_loads():
    cfg = load_config("configs/dermamnist_mart.yaml")
    assert cfg.method.name == "mart" and cfg.method.beta == 6.0
