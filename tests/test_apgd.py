"""APGD: its step-size checkpoints and targeted DLR loss by hand, convergence on a linear model, early stopping."""

from __future__ import annotations

import pytest
import torch
from evaluation_toys import Affine2
from torch import nn

from pipeline.adversarial.apgd import APGD, checkpoints, dlr_targeted, top_other_classes
from pipeline.adversarial.tasks import Classification, Segmentation


class Counted(nn.Module):
    """Counts the samples that go through forward with autograd on (gradient evaluations) and off."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model, self.grad_rows, self.forward_rows = model, 0, 0

    def forward(self, x):
        if torch.is_grad_enabled():
            self.grad_rows += x.shape[0]
        else:
            self.forward_rows += x.shape[0]
        return self.model(x)


def linear_problem(n=12, d=16, seed=0):
    """Affine2 model and points at known L2 distances ``t`` on either side of its hyperplane."""
    g = torch.Generator().manual_seed(seed)
    w, b = torch.randn(d, generator=g), 0.2
    u = w / w.norm()
    base = torch.randn(n, d, generator=g)
    base = base - ((base @ w + b) / w.norm() ** 2)[:, None] * w          # onto the hyperplane
    t = torch.linspace(0.2, 1.2, n)
    side = torch.tensor([1.0, -1.0]).repeat(n // 2)
    x = base + (side * t)[:, None] * u
    return Affine2(w, b).eval(), x, (side > 0).long(), t, w


def test_checkpoints_follow_the_papers_recursion():
    # p = 0, 0.22, 0.41, 0.57, 0.70, 0.80, 0.87, 0.93, 0.99: p_{j+1} = p_j + max(p_j - p_{j-1} - 0.03, 0.06)
    assert checkpoints(100) == [22, 41, 57, 70, 80, 87, 93, 99]
    assert checkpoints(10) == [3, 5, 6, 7, 8, 9]


def test_targeted_dlr_loss_by_hand():
    task_logits = torch.tensor([[3.0, 1.0, 0.0, -1.0, 2.0]])
    # sorted 3, 2, 1, 0, -1: -(z_y - z_t) / (z_pi1 - (z_pi3 + z_pi4) / 2) = -(3 - 2) / (3 - 0.5) = -0.4
    assert dlr_targeted(task_logits, torch.tensor([0]), torch.tensor([4])).item() == pytest.approx(-0.4)
    # three classes: denominator z_pi1 - z_pi3 = 2 - 0; -(2 - 1) / 2
    assert dlr_targeted(torch.tensor([[2.0, 0.0, 1.0]]), torch.tensor([0]), torch.tensor([2])).item() == \
        pytest.approx(-0.5)
    # two classes: the plain logit margin z_t - z_y
    assert dlr_targeted(torch.tensor([[1.0, 3.0]]), torch.tensor([1]), torch.tensor([0])).item() == pytest.approx(-2.0)
    ranked = top_other_classes(task_logits, torch.tensor([0]), 3)
    assert ranked.tolist() == [[4, 1, 2]]


@pytest.mark.parametrize("loss", ["ce", "dlr"])
def test_on_a_linear_model_apgd_breaks_exactly_the_samples_inside_the_radius(loss):
    model, x, y, t, w = linear_problem()
    task = Classification()
    eps = 0.7
    torch.manual_seed(0)
    x_adv = APGD(task, norm="L2", steps=20, loss=loss)(model, x, y, eps)
    assert ((x_adv - x).norm(dim=1) <= eps + 1e-5).all()
    wrong = ~task.correct(model(x_adv), y)
    assert torch.equal(wrong, t < eps)
    # samples it cannot break: the best point moves the score by (almost) eps * ||w||, the optimum in the ball
    held = t >= eps
    z_clean, z_adv = x @ model.w + model.b, x_adv @ model.w + model.b
    moved = (z_clean - z_adv) * torch.where(y == 1, 1.0, -1.0)
    assert (moved[held] >= 0.97 * eps * w.norm()).all()


def test_linf_stays_in_the_cube_and_the_intensity_range():
    model, x, y, t, w = linear_problem()
    x = x.sigmoid()                                                      # inside (0, 1)
    torch.manual_seed(0)
    x_adv = APGD(Classification(), norm="Linf", steps=10, clamp=(0.0, 1.0))(model, x, y, 0.05)
    assert (x_adv - x).abs().max() <= 0.05 + 1e-6
    assert x_adv.min() >= 0.0 and x_adv.max() <= 1.0


def test_early_stop_returns_the_same_points_for_fewer_gradient_evaluations():
    model, x, y, t, w = linear_problem()
    full, early = Counted(model), Counted(model)
    torch.manual_seed(3)
    a = APGD(Classification(), norm="L2", steps=20)(full, x, y, 0.7)
    torch.manual_seed(3)
    b = APGD(Classification(), norm="L2", steps=20, early_stop=True)(early, x, y, 0.7)
    torch.testing.assert_close(a, b, atol=1e-4, rtol=0)       # the same iterates (up to batch-size rounding)
    assert full.grad_rows == 12 * 20 and full.forward_rows == 12 + 0   # 20 gradient steps, 1 final forward
    held = int((t >= 0.7).sum())
    # every sample that holds costs all 20 steps; each broken one at least its first
    assert held * 20 + (12 - held) <= early.grad_rows < full.grad_rows


def test_no_parameter_gradient_and_train_mode_and_bn_statistics_restored():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                        nn.Linear(4 * 36, 3)).train()
    x, y = torch.rand(5, 1, 6, 6), torch.tensor([0, 1, 2, 0, 1])
    before = net[1].running_mean.clone()
    APGD(Classification(), steps=4, loss="dlr")(net, x, y, 0.3)
    assert net.training and net[1].training
    assert torch.equal(net[1].running_mean, before)
    assert all(p.grad is None for p in net.parameters())


def test_segmentation_ce_runs_and_dlr_is_refused():
    class Threshold(nn.Module):
        def forward(self, x):
            fg = 8 * (x[:, :1] - 0.5)
            return torch.cat([torch.zeros_like(fg), fg], dim=1)

    y = torch.zeros(2, 1, 8, 8, dtype=torch.long)
    y[:, :, 2:6, 2:6] = 1
    x = 0.2 + 0.6 * y.float()
    task = Segmentation(2)
    torch.manual_seed(0)
    x_adv = APGD(task, norm="L2", steps=10, clamp=(0.0, 1.0))(Threshold(), x, y, 4.0)
    # Dice < 0.6 once 10 of the 16 foreground pixels fall below 0.5 (L2 about 0.95, well inside 4)
    assert (task.dice(Threshold()(x_adv), y) < 0.6).all()
    with pytest.raises(ValueError, match="classification only"):
        APGD(task, loss="dlr")(Threshold(), x, y, 1.0)
