"""Per-sample margins: the closed-form distance to a linear decision boundary is recovered."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from evaluation_toys import Affine2

from pipeline.adversarial.tasks import Classification
from pipeline.evaluation.margin import estimate_margin, margin_summary, plot_margins, radius_grid


def linear_problem(n=32, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    w, b = torch.randn(d, generator=g), 0.3
    x = torch.randn(n, d, generator=g)
    z = x @ w + b
    return Affine2(w, b).eval(), x, (z > 0).long(), z, w


def test_l2_margin_of_a_linear_model_is_the_distance_to_its_hyperplane():
    model, x, y, z, w = linear_problem()
    expected = z.abs() / w.norm()                               # |w.x + b| / ||w||
    found = estimate_margin(model, x, y, task=Classification(), norm="L2", radii=radius_grid([0.5, 1.0, 2.0]),
                            losses=["ce", "margin"], steps=20, bisection_steps=10)
    assert torch.isfinite(found).all()
    torch.testing.assert_close(found, expected, rtol=0.05, atol=1e-3)
    assert (found >= expected * 0.999).all()                    # a found break is never inside the true margin


def test_linf_margin_of_a_linear_model_uses_the_dual_norm():
    model, x, y, z, w = linear_problem(seed=1)
    expected = z.abs() / w.abs().sum()                          # |w.x + b| / ||w||_1
    found = estimate_margin(model, x, y, task=Classification(), norm="Linf", radii=radius_grid([0.1, 0.5]),
                            losses=["margin"], steps=20, bisection_steps=10)
    assert torch.isfinite(found).all()
    torch.testing.assert_close(found, expected, rtol=0.05, atol=1e-3)


def test_wrong_on_clean_is_zero_and_out_of_grid_is_censored(tmp_path):
    model, x, y, z, w = linear_problem()
    y = y.clone()
    y[0] = 1 - y[0]
    grid = [0.01, 0.02]                                         # far too small for most samples
    found = estimate_margin(model, x, y, task=Classification(), norm="L2", radii=grid, losses=["margin"],
                            steps=10, bisection_steps=2)
    assert found[0] == 0
    assert torch.isinf(found[1:]).sum() >= len(x) - 5
    summary = margin_summary(found.numpy(), grid_max=0.02)
    assert summary["unbroken_fraction"] == pytest.approx(float(torch.isinf(found).float().mean()))
    assert summary["p90"] == pytest.approx(0.02)                # censored samples count as the top radius
    assert summary["p10"] <= summary["p50"] <= summary["p90"]
    path = plot_margins(found.numpy(), tmp_path / "margin.png", "L2", 0.02)
    assert path.stat().st_size > 1000


def test_quantiles_by_hand():
    values = np.array([0.0, 1.0, 2.0, 3.0, 4.0, np.inf])
    s = margin_summary(values, grid_max=5.0)
    assert s["p50"] == pytest.approx(np.quantile([0, 1, 2, 3, 4, 5], 0.5))
    assert s["mean_broken"] == pytest.approx(2.0)
    assert s["unbroken_fraction"] == pytest.approx(1 / 6)
