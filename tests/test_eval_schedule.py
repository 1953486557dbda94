"""The early-exit evaluation schedule against the exhaustive one, margins from the suite's brackets, the
per-epoch check's defaults."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from evaluation_toys import Affine2, batches, toy_images, train_toy
from monai.data import DataLoader, Dataset
from monai.engines import SupervisedEvaluator
from torch import nn

from pipeline.adversarial.tasks import Classification, Segmentation
from pipeline.config import EvaluateConfig, config_from_dict
from pipeline.engine.robust_validation import AdversarialValidation, metric_name
from pipeline.errors import InputError
from pipeline.evaluation.margin import estimate_margin, known_brackets, radius_grid
from pipeline.evaluation.results import CLEAN, Condition
from pipeline.evaluation.robustness import plan, run_suite

RADII = [0.25, 0.5, 1.0]
DISTANCES = [0.1, 0.2, 0.35, 0.7, 0.8, 1.6, 2.5, 3.0]     # L2 distances to the decision boundary


class Counted(nn.Module):
    def __init__(self, model: nn.Module):
        super().__init__()
        self.model, self.grad_rows = model, 0

    def forward(self, x):
        if torch.is_grad_enabled():
            self.grad_rows += x.shape[0]
        return self.model(x)


def linear_points():
    """16 points at the DISTANCES from an affine boundary, one on each side."""
    g = torch.Generator().manual_seed(0)
    w, b = torch.randn(16, generator=g), 0.1
    u = w / w.norm()
    base = torch.randn(16, 16, generator=g)
    base = base - ((base @ w + b) / w.norm() ** 2)[:, None] * w
    t = torch.tensor(DISTANCES).repeat_interleave(2)
    side = torch.tensor([1.0, -1.0]).repeat(8)
    x = (base + (side * t)[:, None] * u).reshape(16, 1, 4, 4)
    return Affine2(w, b).eval(), x, (side > 0).long(), t


class Recorded(nn.Module):
    """The model, with every forward's (autograd on, input) kept in ``calls``."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.calls: list[tuple[bool, torch.Tensor]] = []

    def forward(self, inputs):
        self.calls.append((torch.is_grad_enabled(), inputs.detach().clone()))
        return self.model(inputs)


def linear_suite(schedule, labels=None, **ev):
    model, x, y, t = linear_points()
    y = y if labels is None else labels
    counted = Counted(model)
    cfg = EvaluateConfig(norms=["L2"], eps_l2=RADII, steps=20, fgsm=False, noise=False, schedule=schedule, **ev)
    torch.manual_seed(0)
    result = run_suite(counted, batches(x, y, 16), Classification(), cfg, num_classes=2)
    return result, counted.grad_rows, t


def test_plan_of_the_default_protocol():
    names = [str(a) for a in plan("pgd", Classification(), EvaluateConfig(), 7)]
    assert names == ["pgd-ce", "pgd-margin", "apgd-ce", "apgd-dlr-t1", "apgd-dlr-t2", "apgd-dlr-t3"]
    assert [str(a) for a in plan("pgd", Classification(), EvaluateConfig(restarts=2, apgd=False), 2)] == \
        ["pgd-ce", "pgd-margin", "pgd-ce", "pgd-margin"]
    assert [str(a) for a in plan("pgd", Segmentation(2), EvaluateConfig(), 2)] == ["pgd-ce", "pgd-margin", "apgd-ce"]
    assert [str(a) for a in plan("fgsm", Classification(), EvaluateConfig(), 2)] == ["fgsm-ce", "fgsm-margin"]


def test_early_exit_reports_the_exhaustive_numbers_on_a_linear_model_for_fewer_gradients():
    exhaustive, cost_all, t = linear_suite("exhaustive")
    early, cost_early, _ = linear_suite("early_exit")
    for eps in RADII:
        cond = Condition("pgd", "L2", eps)
        expected = (t > eps).numpy()                       # held exactly when the boundary is farther than eps
        np.testing.assert_array_equal(exhaustive.correct(cond), expected)
        np.testing.assert_array_equal(early.correct(cond), expected)
    assert early.metrics()["eval/pgd_l2/accuracy_at_0.5"] == pytest.approx(10 / 16)
    # plan: PGD ce, PGD margin, APGD-CE, APGD-T (one other class): 4 attacks x 20 steps, 16 samples, 3 radii
    assert cost_all == 4 * 20 * 16 * 3
    # early exit: a sample that holds costs the whole plan, a broken one stops at its first wrong iterate and
    # is not attacked again at larger radii; held at 0.25 / 0.5 / 1.0: 12, 10, 6 samples; broken first: 4, 2, 4
    held = (12 + 10 + 6) * 4 * 20
    assert held + 10 <= cost_early <= held + 10 * 20
    assert cost_all / cost_early > 1.5


def test_samples_wrong_on_clean_input_are_never_attacked():
    _, x, y, _ = linear_points()
    early, cost_early, _ = linear_suite("early_exit", labels=1 - y)
    exhaustive, cost_all, _ = linear_suite("exhaustive", labels=1 - y)
    assert cost_early == 0 and cost_all == 4 * 20 * 16 * 3
    for result in (early, exhaustive):
        for cond in result.outcomes:
            assert not result.correct(cond).any()


@pytest.fixture(scope="module")
def toy():
    x, y = toy_images(48, num_classes=3, seed=0)
    model = train_toy(x, y, num_classes=3, steps=100)
    xt, yt = toy_images(48, num_classes=3, seed=1)
    return model, xt, yt


def test_on_a_cnn_early_exit_is_never_more_accurate_and_monotone_in_eps(toy):
    model, x, y = toy
    results, costs = {}, {}
    for schedule in ("exhaustive", "early_exit"):
        counted = Counted(model)
        cfg = EvaluateConfig(eps_l2=[1.0, 1.2, 1.4], eps_linf=[0.15, 0.2, 0.25], steps=10, noise=False,
                             schedule=schedule)
        torch.manual_seed(0)
        results[schedule] = run_suite(counted, batches(x, y, 24), Classification(), cfg, num_classes=3)
        costs[schedule] = counted.grad_rows
    old, new = results["exhaustive"], results["early_exit"]
    assert new.metrics_of(CLEAN)["accuracy"] == old.metrics_of(CLEAN)["accuracy"] == 1.0
    for cond in old.outcomes:
        assert new.metrics_of(cond)["accuracy"] <= old.metrics_of(cond)["accuracy"], cond
    for family, conds in new.families().items():                 # broken at a smaller eps: broken at larger ones
        for small, large in zip(conds, conds[1:]):
            assert not (new.correct(large) & ~new.correct(small)).any(), (family, small.eps)
    assert 0.2 < old.metrics()["eval/pgd_l2/accuracy_at_1.4"] < 0.8   # the attacks break part of the test set
    # exhaustive: 48 samples x 6 radii x (PGD ce + margin, APGD-CE, APGD-T x 2 targets: 5 x 10 steps + 2 FGSM)
    assert costs["exhaustive"] == 48 * 6 * (5 * 10 + 2)
    # early exit: each sample that holds at a radius costs the whole PGD plan there, and nothing else is free
    held = sum(int(new.correct(c).sum()) for c in new.outcomes if c.attack == "pgd")
    assert held * 5 * 10 <= costs["early_exit"] < 0.7 * costs["exhaustive"]


def test_margin_from_the_suites_brackets_matches_the_closed_form_for_fewer_gradients():
    result, _, t = linear_suite("early_exit")
    lo, hi = known_brackets(result, "L2")
    np.testing.assert_array_equal(hi, np.repeat([0.25, 0.25, 0.5, 1.0, 1.0, np.inf, np.inf, np.inf], 2))
    np.testing.assert_array_equal(lo, np.repeat([0.0, 0.0, 0.25, 0.5, 0.5, 1.0, 1.0, 1.0], 2))
    model, x, y, _ = linear_points()
    kwargs = dict(task=Classification(), norm="L2", radii=radius_grid(RADII), losses=["ce", "margin"], steps=20)
    found, cost = {}, {}
    for name, extra in (("old", {"early_stop": False}), ("reuse", {"lo": lo, "hi": hi})):
        counted = Counted(model)
        torch.manual_seed(0)
        found[name] = estimate_margin(counted, x, y, **kwargs, **extra)
        cost[name] = counted.grad_rows
    for name in found:
        torch.testing.assert_close(found[name], t, rtol=0.05, atol=1e-3)
        assert (found[name] >= t * 0.999).all()
    assert cost["reuse"] < cost["old"] / 2


def test_wrong_on_clean_has_bracket_zero():
    _, x, y, _ = linear_points()
    result, _, _ = linear_suite("early_exit", labels=1 - y)
    lo, hi = known_brackets(result, "L2")
    assert (hi == 0).all() and (lo == 0).all()


def test_evaluate_settings_are_validated():
    cfg = EvaluateConfig()
    assert cfg.schedule == "early_exit" and cfg.apgd and cfg.apgd_targets == 3 and cfg.epoch_every == 1
    with pytest.raises(InputError, match="evaluate.schedule"):
        config_from_dict({"experiment": "x", "data": {"source": "synthetic"}, "evaluate": {"schedule": "fast"}})


class Threshold(nn.Module):
    def forward(self, x):
        fg = 8 * (x[:, :1] - 0.5)
        return torch.cat([torch.zeros_like(fg), fg], dim=1)


def test_per_epoch_check_defaults_and_every_n_epochs():
    cfg = config_from_dict({"experiment": "seg", "task": "segmentation", "data": {"source": "synthetic"},
                            "train": {"epochs": 5}, "evaluate": {"eps_l2": [0.5, 6.0, 2.0], "eps_linf": [0.3, 0.1],
                                                                 "epoch_every": 2, "epoch_steps": 3}})
    check = AdversarialValidation.from_config(Segmentation(2), cfg)
    assert check.attacks == [("L2", 6.0), ("Linf", 0.3)]             # the largest radius of each norm
    assert [check.due(e) for e in range(1, 6)] == [False, True, False, True, True]   # and the last epoch
    label = torch.zeros(2, 1, 8, 8)
    label[:, :, 2:6, 2:6] = 1
    data = [{"image": 0.2 + 0.6 * label[i], "label": label[i]} for i in range(2)]
    validator = SupervisedEvaluator(device=torch.device("cpu"), val_data_loader=DataLoader(Dataset(data), batch_size=2),
                                    network=Threshold(), decollate=False)
    check.attach(validator)
    name = metric_name("L2", 6.0)
    validator.run(1)
    assert name not in validator.state.metrics and check.seen == 0
    validator.run(2)
    assert validator.state.metrics[name] < 0.6 and check.seen == 2
    validator.run(3)                                                  # the value of epoch 2 is not logged again
    assert name not in validator.state.metrics and check.cases == []


def test_pgd_from_a_given_start_projects_it_and_stops_at_once():
    """``start``: the first iterate, projected into each ball; a start already across the boundary costs one
    gradient evaluation per sample under early stop."""
    from pipeline.adversarial.pgd import PGD

    model, x, y, t = linear_points()
    u = (model.w / model.w.norm()).reshape(1, 1, 4, 4)
    side = torch.where(y > 0, 1.0, -1.0).reshape(-1, 1, 1, 1)
    start = x - side * 3 * t.reshape(-1, 1, 1, 1) * u              # 3 d* across the boundary, straight on
    counted = Counted(model)
    eps = 1.5 * t
    x_adv = PGD(Classification(), norm="L2", steps=20, early_stop=True)(counted, x, y, eps, start=start)
    assert counted.grad_rows == 16
    torch.testing.assert_close((x_adv - x).flatten(1).norm(dim=1), eps, rtol=1e-5, atol=1e-6)
    assert (model(x_adv).argmax(1) != y).all()
    inside = x - side * 0.5 * t.reshape(-1, 1, 1, 1) * u            # a start inside the ball is kept as it is
    counted = Counted(model)
    x_adv = PGD(Classification(), norm="L2", steps=1, alpha=1e-9)(counted, x, y, eps, start=inside)
    torch.testing.assert_close(x_adv, inside, rtol=0, atol=1e-6)


def test_margin_bisection_starts_where_the_last_attack_ended():
    """Early exit: after a sample's first attack every bisection step starts from the previous step's point, so
    a step that breaks costs a few gradients (here: at most 2 per sample and loss) and the estimate stays on the
    closed form; without that, a break near the boundary costs a large part of the steps."""
    model, x, y, t = linear_points()
    kwargs = dict(task=Classification(), norm="L2", radii=radius_grid(RADII), losses=["margin"], steps=50,
                  lo=torch.zeros(16), hi=torch.full((16,), 4.0), bisection_steps=8)
    counted = Counted(model)
    torch.manual_seed(0)
    found = estimate_margin(counted, x, y, **kwargs)
    torch.testing.assert_close(found, t, rtol=0.02, atol=4.0 / 2 ** 8)
    assert (found >= t * 0.999).all()
    # the same bisection on the exact distances: a test below t holds (50 gradients), one at or above breaks
    bound = 0
    for d in t.tolist():
        lo, hi = 0.0, 4.0
        for k in range(8):
            mid = (lo + hi) / 2
            held = mid < d
            bound += 50 if held or k == 0 else 2        # a sample's first attack starts at random
            lo, hi = (mid, hi) if held else (lo, mid)
    assert counted.grad_rows <= bound


def test_margin_restarts_after_a_warm_start_start_at_random():
    """With restarts, only the first run of each loss starts where the last attack ended; the other restarts
    start at random, so they are not a copy of the first (and the search stays as strong as its restarts)."""
    from pipeline.evaluation.margin import broken, margin_attacks

    model, x, y, t = linear_points()
    attacks = margin_attacks(task=Classification(), norm="L2", losses=["margin"], steps=3, restarts=3, alpha=0.1)
    start = x.clone()                          # the clean input: a start that the tiny steps cannot break from
    eps = t * 0.5                              # every sample holds: all three restarts run on every sample
    recorded = Recorded(model)
    torch.manual_seed(0)
    hit, _ = broken(recorded, x, y, eps, attacks, start=start)
    seen = [inputs for grad, inputs in recorded.calls if grad]
    assert not hit.any() and len(seen) == 3 * 3                 # 3 restarts x 3 steps, every sample every time
    torch.testing.assert_close(seen[0], x)                       # the warm start: the given point
    for first_of_restart in (seen[3], seen[6]):                  # the others: random points in the ball
        d = (first_of_restart - x).flatten(1).norm(dim=1)
        assert (d > 0).all() and (d <= eps + 1e-5).all()
    assert not torch.equal(seen[3], seen[6])


def test_margin_search_takes_the_attacks_own_verdict():
    """With early stop each attack's verdict comes from the forward that evaluated the point it kept, so
    ``broken`` runs no forward of its own: per attack one no-grad forward only, the final iterate of the samples
    that held (before: a second one on every attacked sample). The verdict equals a fresh check of the point."""
    from pipeline.adversarial.pgd import PGD
    from pipeline.evaluation.margin import broken, margin_attacks

    model, x, y, t = linear_points()
    attacks = margin_attacks(task=Classification(), norm="L2", losses=["ce", "margin"], steps=20)
    eps = torch.where(torch.arange(16) % 4 == 0, t * 0.5, t * 3.0)        # 4 samples hold, 12 break
    recorded = Recorded(model)
    torch.manual_seed(0)
    hit, found = broken(recorded, x, y, eps, attacks)
    no_grad_rows = [inputs.shape[0] for grad, inputs in recorded.calls if not grad]
    with torch.no_grad():
        assert torch.equal(hit, model(found).argmax(dim=1) != y)
    assert hit.sum() == 12 and not hit[::4].any()
    # one per loss: the final iterate of the samples that held it (ce: 5; margin, on those: the last 4)
    assert no_grad_rows == [5, 4]
    with pytest.raises(ValueError, match="early_stop"):
        PGD(Classification(), early_stop=False).judged(model, x, y, 0.1)


def test_margin_inside_a_region_of_interest_is_the_distance_within_it():
    """With a ``roi`` the margin search perturbs only its pixels: on the affine model the smallest L2 change
    inside the ROI that crosses the boundary is |w.x + b| / ||w restricted to the ROI|| (larger than without)."""
    model, x, y, t = linear_points()
    roi = torch.zeros(16, 1, 4, 4)
    roi[:, :, :2] = 1                                             # the top half of every image
    w = model.w.detach().reshape(1, 1, 4, 4)
    inside = (w * roi).flatten(1).norm(dim=1)
    expected = t * model.w.detach().norm() / inside               # |w.x + b| = t ||w||
    kwargs = dict(task=Classification(), norm="L2", radii=radius_grid([e * 1.0 for e in (0.5, 2.0, 8.0)]),
                  losses=["margin"], steps=50, bisection_steps=10)
    torch.manual_seed(0)
    found = estimate_margin(model, x, y, roi=roi, **kwargs)
    finite = torch.isfinite(found)
    assert int(finite.sum()) >= 12
    torch.testing.assert_close(found[finite], expected[finite], rtol=0.02, atol=1e-3)
    torch.manual_seed(0)
    free = estimate_margin(model, x, y, **kwargs)
    assert bool((free[finite] < found[finite]).all())             # the whole image gives more room
