"""The attack suite on a toy classifier trained in the test, and on a toy segmenter (2D and 3D)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from evaluation_toys import Affine2, batches, toy_images, train_toy
from mlflow.utils.validation import _validate_metric_name
from torch import nn

from pipeline.adversarial.tasks import Classification, Segmentation
from pipeline.config import EvaluateConfig
from pipeline.evaluation import robustness
from pipeline.evaluation.loading import SlidingWindowModel
from pipeline.evaluation.results import CLEAN, Condition
from pipeline.evaluation.robustness import run_suite

EPS_L2 = [0.25, 1.0, 4.0]


@pytest.fixture(scope="module")
def toy():
    x, y = toy_images(96, seed=0)
    model = train_toy(x, y, steps=100)
    xt, yt = toy_images(48, seed=1)
    return model, xt, yt


def suite(model, x, y, **ev):
    cfg = EvaluateConfig(**{"eps_l2": EPS_L2, "eps_linf": [0.3], "steps": 10, **ev})
    return run_suite(model, batches(x, y, 16), Classification(), cfg, num_classes=2, clamp=(0.0, 1.0),
                     class_names=["left", "right"])


def test_standard_model_breaks_under_pgd_but_not_under_noise(toy):
    model, x, y = toy
    result = suite(model, x, y)
    m = result.metrics()
    assert m["eval/clean/accuracy"] == pytest.approx(1.0)
    assert m["eval/pgd_l2/accuracy_at_4"] <= 0.05          # a standard-trained model has no robustness
    assert m["eval/pgd_linf/accuracy_at_0.3"] <= 0.05
    assert m["eval/noise_l2/accuracy_at_4"] >= 0.9          # random noise of the same radius barely matters
    assert m["eval/noise_l2/auc_norm"] > m["eval/pgd_l2/auc_norm"] + 0.3
    # the robustness curve starts at the clean point and its area matches the trapezoid rule
    xs, ys = result.curve("pgd_l2")
    assert xs == [0.0, *EPS_L2] and ys[0] == m["eval/clean/accuracy"]
    area = sum((xs[i + 1] - xs[i]) * (ys[i + 1] + ys[i]) / 2 for i in range(len(xs) - 1)) / (xs[-1] - xs[0])
    assert m["eval/pgd_l2/auc_norm"] == pytest.approx(area)
    for name in m:
        _validate_metric_name(name)                          # every name is accepted by MLflow


def test_a_sample_wrong_on_clean_input_is_wrong_under_every_attack():
    torch.manual_seed(0)
    w = torch.randn(64)
    model = Affine2(w, 0.0).eval()
    x = torch.randn(40, 1, 8, 8) * 0.1
    z = x.flatten(1) @ w
    y = (z > 0).long()
    y[:20] = 1 - y[:20]                                       # the first 20 are wrong on clean input
    # large noise moves about half of the wrong samples across the boundary, i.e. makes them "right"
    cfg = EvaluateConfig(eps_l2=[5.0], eps_linf=[0.5], steps=5, fgsm=True)
    result = run_suite(model, batches(x, y, 8), Classification(), cfg, num_classes=2)
    for cond in result.outcomes:
        correct = result.correct(cond)
        assert not correct[:20].any(), cond
    # and the noise really did flip some of those samples: without the rule they would count as right
    noisy = model(x + 5.0 * torch.nn.functional.normalize(torch.randn_like(x).flatten(1), dim=1).view_as(x))
    assert (noisy.argmax(1)[:20] == y[:20]).any()


def test_worst_case_over_losses_is_the_union_of_the_single_loss_breaks(toy, monkeypatch):
    model, x, y = toy
    class SeededPGD(robustness.PGD):
        def __call__(self, *args, **kwargs):                 # same random start whatever ran before
            torch.manual_seed(123)
            return super().__call__(*args, **kwargs)

    monkeypatch.setattr(robustness, "PGD", SeededPGD)
    common = {"eps_l2": [0.5, 1.0, 1.5], "norms": ["L2"], "fgsm": False, "noise": False, "steps": 3}
    both = suite(model, x, y, losses=["ce", "margin"], **common)
    ce = suite(model, x, y, losses=["ce"], **common)
    margin = suite(model, x, y, losses=["margin"], **common)
    for eps in common["eps_l2"]:
        cond = Condition("pgd", "L2", eps)
        ok_both, ok_ce, ok_margin = both.correct(cond), ce.correct(cond), margin.correct(cond)
        np.testing.assert_array_equal(ok_both, ok_ce & ok_margin)
        assert ok_both.mean() <= min(ok_ce.mean(), ok_margin.mean())


def test_tables_and_per_sample_view(toy):
    model, x, y = toy
    result = suite(model, x, y, eps_linf=[0.01], norms=["Linf"], fgsm=False, noise=False)
    table = result.table()
    assert set(table["attack"]) == {"clean", "pgd"}
    assert "recall/left" in set(table["metric"]) and "accuracy_auc_norm" in set(table["metric"])
    frame = result.per_sample()
    assert len(frame) == len(x) and list(frame["index"]) == list(range(len(x)))
    assert set(frame["class"]) == {"left", "right"}
    assert "correct:clean" in frame and "correct:pgd_linf@0.01" in frame


class Threshold(nn.Module):
    """A 'segmenter' that marks voxels brighter than 0.5: logits (0, 8 * (x - 0.5)) per voxel."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(8.0))

    def forward(self, x):
        fg = self.scale * (x[:, :1] - 0.5)
        return torch.cat([torch.zeros_like(fg), fg], dim=1)


def seg_batches(shape):
    g = torch.Generator().manual_seed(0)
    x = 0.2 * torch.rand(4, 1, *shape, generator=g)
    y = torch.zeros(4, 1, *shape, dtype=torch.long)
    sl = (slice(None), slice(None), *[slice(s // 4, s // 2 + s // 4) for s in shape])
    x[sl] += 0.6
    y[sl] = 1
    return [{"image": x[:2], "label": y[:2], "index": torch.arange(2)},
            {"image": x[2:], "label": y[2:], "index": torch.arange(2, 4)}]


def test_segmentation_dice_clean_and_under_pgd():
    cfg = EvaluateConfig(eps_l2=[0.5, 4.0], norms=["L2"], steps=10, fgsm=False)
    result = run_suite(Threshold(), seg_batches((16, 16)), Segmentation(2, 0.6), cfg, num_classes=2, clamp=(0, 1))
    m = result.metrics()
    assert m["eval/clean/dice"] == pytest.approx(1.0) and m["eval/clean/dice_pooled"] == pytest.approx(1.0)
    assert m["eval/pgd_l2/dice_at_4"] < 0.8 * m["eval/clean/dice"]
    assert m["eval/noise_l2/dice_at_0.5"] > m["eval/pgd_l2/dice_at_4"]
    for cond in result.outcomes:                              # never better than clean, per image
        assert (result.outcomes[cond].dice <= result.outcomes[CLEAN].dice + 1e-6).all()
    assert 0.0 <= m["eval/pgd_l2/dice_pooled_at_4"] <= 1.0


def test_3d_attack_runs_on_the_whole_volume_through_the_sliding_window():
    net = Threshold()
    model = SlidingWindowModel(net, [8, 8, 8]).eval()
    data = seg_batches((12, 12, 12))
    x = data[0]["image"]
    torch.testing.assert_close(model(x), net(x), atol=1e-5, rtol=1e-5)   # a voxel-wise net: windows are exact
    cfg = EvaluateConfig(eps_l2=[6.0], norms=["L2"], steps=5, fgsm=False, noise=False)
    result = run_suite(model, data, Segmentation(2, 0.6), cfg, num_classes=2, clamp=(0, 1))
    m = result.metrics()
    assert m["eval/clean/dice"] == pytest.approx(1.0)
    assert m["eval/pgd_l2/dice_at_6"] < 0.9
