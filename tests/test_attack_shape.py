"""The attack objects: settings checked once in the constructor, one call shape, the optional ``clean`` output and
``start`` point changing nothing but the forward they save or the first iterate."""

from __future__ import annotations

from dataclasses import FrozenInstanceError

import pytest
import torch
from torch import nn

from pipeline.adversarial.apgd import APGD
from pipeline.adversarial.attack import Attack
from pipeline.adversarial.boundary import BoundaryPGD
from pipeline.adversarial.context import attack_mode
from pipeline.adversarial.pgd import FGSM, PGD, START_STD, TradesKL
from pipeline.adversarial.tasks import Classification

CLS = Classification()


def _case(seed: int = 0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                          nn.Linear(4 * 36, 3))
    x, y = torch.rand(6, 1, 6, 6), torch.tensor([0, 1, 2, 0, 1, 2])
    model.train()(x)                                     # running statistics away from their start
    return model.eval(), x, y


def _clean(model, x):
    with attack_mode(model) as net, torch.no_grad():
        return net(x)


def test_settings_are_checked_once_and_frozen():
    for build in (lambda: PGD(CLS, norm="L1"), lambda: FGSM(CLS, steps=3), lambda: FGSM(CLS, random_start=True),
                  lambda: TradesKL(CLS, early_stop=True), lambda: TradesKL(CLS, loss="ce"),
                  lambda: BoundaryPGD(CLS, bracket="middle"), lambda: BoundaryPGD(CLS, restarts=2),
                  lambda: BoundaryPGD(CLS, early_stop=True)):
        with pytest.raises(ValueError):
            build()
    attack = PGD(CLS, steps=3)
    with pytest.raises(FrozenInstanceError):
        attack.steps = 5
    assert all(isinstance(a, Attack) for a in (attack, FGSM(CLS), TradesKL(CLS), BoundaryPGD(CLS), APGD(CLS)))
    assert TradesKL(CLS).random_start == START_STD and TradesKL(CLS, random_start=False).random_start is False


def test_fgsm_is_one_pgd_step_of_size_eps():
    model, x, y = _case()
    eps = torch.linspace(0.1, 0.6, 6)
    for norm in ("L2", "Linf"):
        one = FGSM(CLS, norm=norm, clamp=(0.0, 1.0))(model, x, y, eps)
        step = PGD(CLS, norm=norm, steps=1, step_size=eps, random_start=False, clamp=(0.0, 1.0))(model, x, y, eps)
        assert torch.equal(one, step)


def test_a_given_clean_output_changes_nothing_but_the_forward():
    model, x, y = _case(1)
    clean = _clean(model, x)
    for attack in (TradesKL(CLS, steps=3), APGD(CLS, steps=5, loss="dlr", target=1), BoundaryPGD(CLS, steps=3)):
        torch.manual_seed(2)
        own = attack(model, x, y, 0.8)
        torch.manual_seed(2)
        given = attack(model, x, y, 0.8, clean=clean)
        if isinstance(own, torch.Tensor):
            assert torch.equal(own, given)
        else:
            assert all(torch.equal(a, b) for a, b in zip(vars(own).values(), vars(given).values()))


def test_a_start_across_the_boundary_is_kept_by_every_attack():
    """A start already not handled correctly (inside the ball): APGD and early-stopping PGD return it, the
    boundary attack counts every sample as crossed."""
    model, x, _ = _case(4)
    y = _clean(model, x).argmax(dim=1)                                  # every clean input handled correctly
    pool = 4 * torch.randn(64, *x.shape[1:])
    label = _clean(model, pool).argmax(dim=1)
    far = pool[torch.stack([(label != c).nonzero()[0, 0] for c in y])]  # a point of another class per sample
    assert not CLS.correct(_clean(model, far), y).any()
    eps = (far - x).flatten(1).norm(dim=1) * 1.01
    for attack in (APGD(CLS, steps=5, early_stop=True), PGD(CLS, steps=5, early_stop=True)):
        torch.testing.assert_close(attack(model, x, y, eps, start=far), far, rtol=0, atol=1e-5)
    found = BoundaryPGD(CLS, steps=2, bisection_steps=3)(model, x, y, eps, start=far)
    assert bool(found.correct.all()) and bool(found.crossed.all())
