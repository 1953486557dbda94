"""IMA behaves as the authors' released code on cases whose answer is known in closed form (issue 11, SPEC 3).

A fixed linear two-class model z1 - z0 = w.x + b has, for every input, the distance d* = |w.x + b| / ||w|| to its
decision boundary. The released code (MedMNIST defaults: bracket [x, final PGD iterate], estimate reset to the radius
every epoch, correct-side end of the last bracket) drives each radius to d*: from eps = 2 d* the estimate halves the
excess every epoch (2 -> 1.5 -> 1.25 -> ... -> 1 + 2**-8 after 8 epochs), and from delta each radius grows to d*
and then stays within [d*, d* + delta]. The network is fixed (no optimizer step): only the radii move.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from pipeline.adversarial.boundary import BoundaryPGD
from pipeline.adversarial.context import BatchStatistics
from pipeline.adversarial.methods import build_method
from pipeline.adversarial.tasks import Classification, Segmentation
from pipeline.config import method_config

N, SIDE = 32, 28


class Linear2(nn.Module):
    """Logits (-s/2, s/2) with s = w.x + b: class 1 iff s > 0; for maps, the same logits at every pixel."""

    def __init__(self, w: torch.Tensor, b: float, pixels: int | None = None):
        super().__init__()
        self.w, self.b, self.pixels = w.flatten(), b, pixels

    def forward(self, x):
        s = x.flatten(1) @ self.w + self.b
        z = torch.stack([-s / 2, s / 2], dim=1)
        if self.pixels is None:
            return z
        return z[:, :, None, None].expand(-1, -1, self.pixels, self.pixels)


def linear_case(seed: int = 0, segmentation: bool = False):
    """32 inputs in [0.3, 0.7]-ish with closed-form distances d* spread over [0.2, 1.0]; labels = the model's."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(SIDE * SIDE, generator=g)
    n = w / w.norm()
    x = 0.5 + 0.05 * torch.randn(N, SIDE * SIDE, generator=g)
    b = -float(x.mean(0) @ w)
    d_star = torch.linspace(0.2, 1.0, N)
    sign = torch.where(torch.arange(N) % 2 == 0, 1.0, -1.0)
    s = x @ w + b
    x = x + ((sign * d_star * w.norm() - s) / w.norm())[:, None] * n[None]   # now w.x + b = sign * d* * ||w||
    x = x.reshape(N, 1, SIDE, SIDE)
    model = Linear2(w, b, pixels=SIDE if segmentation else None)
    y = (sign > 0).long()
    if segmentation:
        y = torch.ones(N, 1, SIDE, SIDE, dtype=torch.long) * y[:, None, None, None]
        y = y.clone()
        y[sign < 0] = 0
    return model, x, y, d_star


def run_ima(model, x, y, epochs: int, eps0: torch.Tensor | None, task, **cfg) -> list[torch.Tensor]:
    method = build_method(method_config(name="ima", **cfg), task, N, clamp=None)
    if eps0 is not None:
        method.state.eps = eps0.clone()
        method.state.reset_epoch()
    index = torch.arange(N)
    history = []
    torch.manual_seed(1)
    for _ in range(epochs):
        method.loss(model, x, y, index)
        method.epoch_completed()
        history.append(method.state.eps.clone())
    return history


def test_linear_closed_form_distance():
    model, x, _, d_star = linear_case()
    s = x.flatten(1) @ model.w + model.b
    assert torch.allclose(s.abs() / model.w.norm(), d_star, rtol=1e-4)


def test_from_twice_the_distance_eps_converges_within_8_epochs():
    model, x, y, d_star = linear_case()
    history = run_ima(model, x, y, 8, 2 * d_star, Classification())
    ratio = history[-1] / d_star
    # halving of the excess per epoch: 1.5, 1.25, ..., 1 + 2**-8; bisection puts the estimate a hair inside
    assert float(ratio.mean()) <= 1.10
    assert float(ratio.mean()) == pytest.approx(1 + 2 ** -8, abs=0.01)
    assert float(history[0].div(d_star).mean()) == pytest.approx(1.5, abs=0.02)
    assert float(ratio.min()) >= 0.99


def test_from_delta_eps_settles_at_the_distance():
    model, x, y, d_star = linear_case()
    history = run_ima(model, x, y, 60, None, Classification(), delta=0.03)
    late = torch.stack(history[40:]) / d_star
    assert float(late.min()) >= 0.90 and float(late.max()) <= 1.25
    # it settles inside [d*, d* + delta], up to the resolution of the attack and the bisection
    excess = torch.stack(history[40:]) - d_star
    assert float(excess.min()) >= -1e-3 and float(excess.max()) <= 0.03 + 5e-3


def test_first_wrong_bracket_converges_too_from_delta():
    model, x, y, d_star = linear_case()
    history = run_ima(model, x, y, 60, None, Classification(), delta=0.03, boundary_bracket="first_wrong")
    late = torch.stack(history[40:]) / d_star
    assert float(late.min()) >= 0.90 and float(late.max()) <= 1.25


def test_segmentation_analogue_converges():
    model, x, y, d_star = linear_case(segmentation=True)
    task = Segmentation(2, dice_threshold=0.6)
    assert bool(task.correct(model(x), y).all())
    history = run_ima(model, x, y, 8, 2 * d_star, task)
    assert float((history[-1] / d_star).mean()) <= 1.10
    history = run_ima(model, x, y, 60, None, task, delta=0.03)
    late = torch.stack(history[40:]) / d_star
    assert float(late.min()) >= 0.90 and float(late.max()) <= 1.25


def test_boundary_point_is_on_the_correct_side_and_at_the_distance():
    model, x, y, d_star = linear_case()
    res = BoundaryPGD(Classification(), steps=20, bisection_steps=10)(model, x, y, 1.5 * d_star)
    assert bool(res.crossed.all()) and bool(res.correct.all())
    assert bool(Classification().correct(model(res.x_adv), y).all())     # correct-side end of the bracket
    assert torch.allclose(res.dist, d_star, rtol=0.01)
    assert bool((res.dist <= d_star * (1 + 1e-3)).all())   # the end point lies a hair off the normal


class SmallBNCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                  nn.Conv2d(8, 8, 3, padding=1, stride=2), nn.BatchNorm2d(8), nn.ReLU(),
                                  nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3))

    def forward(self, x):
        return self.body(x)


def test_batchnorm_network_early_in_training_gets_no_collapsed_distances():
    """Untrained BN CNN in train mode: flags, attack and bisection all use the clean batch's statistics, so a
    sample correct in that mode is correct at the start of its bracket and its distance cannot collapse to ~0."""
    torch.manual_seed(0)
    model = SmallBNCNN().train()
    x = torch.rand(64, 1, 16, 16)
    y = torch.randint(0, 3, (64,))
    cfg = method_config(name="ima", steps=10)
    method = build_method(cfg, Classification(), 64, clamp=(0.0, 1.0))
    method.state.eps = torch.full((64,), 2.0)
    method.state.reset_epoch()
    before = {k: v.clone() for k, v in model.state_dict().items() if "running" in k}
    out = method.loss(model, x, y, torch.arange(64))
    hit = method.state.found
    assert int(hit.sum()) >= 5                       # the case is not vacuous
    dist = (out.adv - x).flatten(1).norm(dim=1)
    assert float(dist[hit].min()) >= 0.01 * 2.0
    # the two training forwards (clean batch, adversarial rows) moved the running statistics; no attack forward did
    model2 = SmallBNCNN()
    model2.load_state_dict({**model.state_dict(), **before})
    model2.train()(x)
    model2(out.adv[hit])
    for key, value in model2.state_dict().items():
        if "running_mean" in key or "running_var" in key:
            assert torch.allclose(value, model.state_dict()[key]), key


def test_batch_rule_matches_the_training_forward_at_the_clean_input():
    torch.manual_seed(0)
    model = SmallBNCNN().train()
    x = torch.rand(16, 1, 16, 16)
    with BatchStatistics(model) as stats:
        train_out = model(x)
    from pipeline.adversarial.context import attack_mode
    with attack_mode(model, "batch", stats) as net, torch.no_grad():
        frozen = net(x)
        single = net(x[:3])                      # each sample independent of the others in the batch
    assert torch.allclose(frozen, train_out.detach(), atol=1e-5)
    assert torch.allclose(single, frozen[:3], atol=1e-5)
    assert model.training and all(m.training for m in model.modules())


def test_mismatched_modes_are_what_collapses_the_radius():
    """Contrast: flags from the train-mode forward but the attack on running statistics (today's main) put many
    'correct' samples on the wrong side at x; their bracket has no correct end and the distance is ~0."""
    torch.manual_seed(0)
    model = SmallBNCNN().train()
    x = torch.rand(64, 1, 16, 16)
    y = torch.randint(0, 3, (64,))
    train_out = model(x)
    correct_train = Classification().correct(train_out, y)
    res = BoundaryPGD(Classification(), steps=10, bn="running", clamp=(0.0, 1.0))(model, x, y, 2.0, clean=train_out)
    hit = res.crossed & correct_train
    assert int(hit.sum()) >= 1
    assert float(res.dist[hit].min()) < 0.01 * 2.0 or math.isclose(float(res.dist[hit].min()), 0.0, abs_tol=0.02)
