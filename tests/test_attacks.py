"""Attacks: geometry, effect on small trained models, bisection, no parameter gradients, model state."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from pipeline.adversarial.attack import input_gradient
from pipeline.adversarial.bisection import bisect
from pipeline.adversarial.boundary import BoundaryPGD
from pipeline.adversarial.context import BatchStatistics, attack_mode
from pipeline.adversarial.pgd import FGSM, PGD
from pipeline.adversarial.tasks import Classification, Segmentation, Task, logit_margin

CLS = Classification()


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny tensors: one intra-op thread is faster and immune to a loaded machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _norm(v: torch.Tensor, norm: str) -> torch.Tensor:
    flat = v.flatten(1)
    return flat.norm(dim=1) if norm == "L2" else flat.abs().amax(dim=1)


def _images(n: int, seed: int = 0, size: int = 8):
    """Two classes of 1 x size x size images: dark (0.35) or bright (0.65), plus noise, inside [0, 1]."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 2
    x = (0.35 + 0.3 * y.float()).view(n, 1, 1, 1) + 0.05 * torch.randn(n, 1, size, size, generator=g)
    return x.clamp(0, 1), y


def _cnn() -> nn.Module:
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                         nn.Linear(4 * 64, 2))


@pytest.fixture(scope="module")
def trained():
    torch.manual_seed(0)
    model = _cnn()
    x, y = _images(64)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(150):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    model.eval()
    for p in model.parameters():
        p.grad = None
    x_test, y_test = _images(32, seed=1)
    assert CLS.correct(model(x_test), y_test).float().mean() > 0.95
    return model, x_test, y_test


def _seg_data(n: int, dims: int, seed: int = 0, size: int = 8):
    """A bright cube/square at a random place on a dark noisy background; the label is the cube."""
    g = torch.Generator().manual_seed(seed)
    shape = (n, 1) + (size,) * dims
    y = torch.zeros(shape, dtype=torch.long)
    for i in range(n):
        lo = torch.randint(0, size - 4, (dims,), generator=g).tolist()
        y[(i, 0) + tuple(slice(a, a + 4) for a in lo)] = 1
    x = (0.3 + 0.4 * y.float() + 0.05 * torch.randn(shape, generator=g)).clamp(0, 1)
    return x, y


def _seg_net(dims: int) -> nn.Module:
    conv = nn.Conv2d if dims == 2 else nn.Conv3d
    return nn.Sequential(conv(1, 8, 3, padding=1), nn.ReLU(), conv(8, 8, 3, padding=1), nn.ReLU(), conv(8, 2, 1))


@pytest.fixture(scope="module", params=[2, 3], ids=["2d", "3d"])
def trained_seg(request):
    dims = request.param
    torch.manual_seed(0)
    task = Segmentation(2)
    model = _seg_net(dims)
    x, y = _seg_data(16, dims)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(120):
        opt.zero_grad()
        task.per_sample_loss(model(x), y).mean().backward()
        opt.step()
    for p in model.parameters():
        p.grad = None
    x_test, y_test = _seg_data(8, dims, seed=1)
    assert task.dice(model(x_test), y_test).mean() > 0.8
    return task, model, x_test, y_test


# ------------------------------------------------------------------------------------------ tasks
def test_classification_targets_both_shapes_and_margin():
    z = torch.tensor([[2.0, 0.5, 1.0], [0.0, 3.0, -1.0]])
    y = torch.tensor([0, 2])
    assert torch.equal(CLS.per_sample_loss(z, y), CLS.per_sample_loss(z, y[:, None]))
    assert torch.equal(CLS.correct(z, y[:, None]), torch.tensor([True, False]))
    assert torch.allclose(CLS.attack_loss(z, y, "margin"), torch.tensor([1.0 - 2.0, 3.0 - (-1.0)]))
    assert torch.allclose(logit_margin(z, y[:, None]), torch.tensor([-1.0, 4.0]))
    with pytest.raises(Exception):
        CLS.attack_loss(z, y, "dice_ce")


def _logits_from_labels(labels: torch.Tensor, classes: int) -> torch.Tensor:
    return nn.functional.one_hot(labels[:, 0], classes).movedim(-1, 1).float() * 10


def test_segmentation_dice_flags_on_constructed_predictions():
    task = Segmentation(2, dice_threshold=0.6)
    y = torch.zeros(3, 1, 4, 4, dtype=torch.long)
    y[:, 0, :2, :] = 1                                   # 8 foreground pixels per image
    p = torch.zeros_like(y)
    p[0, 0, 0, :] = 1                                    # 4 of 8: Dice 8/12 = 0.667
    p[1, 0, 0, :2] = 1                                   # 2 of 8: Dice 4/10 = 0.4
    p[2] = y[2]                                          # perfect
    pred = _logits_from_labels(p, 2)
    assert torch.allclose(task.dice(pred, y), torch.tensor([2 / 3, 0.4, 1.0]), atol=1e-6)
    assert torch.equal(task.correct(pred, y), torch.tensor([True, False, True]))
    # three classes: the mean over the two foreground classes; a class absent from both counts as 1
    task3 = Segmentation(3, dice_threshold=0.6)
    y3 = y[:1].clone()
    p3 = p[1:2].clone()
    assert torch.allclose(task3.dice(_logits_from_labels(p3, 3), y3), torch.tensor([(0.4 + 1.0) / 2]))
    assert task3.correct(_logits_from_labels(p3, 3), y3).tolist() == [True]          # 0.7 >= 0.6
    # per-image Dice+CE: the batch mean equals MONAI's DiceCELoss on the same batch
    from monai.losses import DiceCELoss
    logits = torch.randn(3, 2, 4, 4)
    ref = DiceCELoss(softmax=True, to_onehot_y=True)(logits, y)
    assert torch.allclose(task.per_sample_loss(logits, y).mean(), ref, atol=1e-5)
    assert Task.make("segmentation", 2, 0.7).dice_threshold == 0.7


# ------------------------------------------------------------------------------------------ geometry
@pytest.mark.parametrize("norm", ["L2", "Linf"])
@pytest.mark.parametrize("dims", [2, 3])
def test_pgd_stays_in_each_ball_and_range(norm, dims):
    torch.manual_seed(0)
    conv = nn.Conv2d if dims == 2 else nn.Conv3d
    model = nn.Sequential(conv(1, 3, 3, padding=1), nn.Flatten(), nn.LazyLinear(3))
    x = torch.rand((6, 1) + (5,) * dims)
    model(x)
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    eps = torch.tensor([0.0, 0.01, 0.1, 0.5, 2.0, 10.0]) if norm == "L2" else torch.tensor(
        [0.0, 1 / 255, 4 / 255, 0.1, 0.3, 1.0])
    for attack in (dict(steps=5, restarts=3), dict(steps=5, loss="margin"), dict(steps=5, loss="slm", early_stop=True),
                   None):
        x_adv = (FGSM(CLS, norm=norm, clamp=(0.0, 1.0))(model, x, y, eps) if attack is None
                 else PGD(CLS, norm=norm, clamp=(0.0, 1.0), **attack)(model, x, y, eps))
        assert x_adv.shape == x.shape and x_adv.dtype == x.dtype
        assert (_norm(x_adv - x, norm) <= eps * (1 + 1e-5) + 1e-6).all()
        assert x_adv.min() >= 0 and x_adv.max() <= 1
        assert torch.equal(x_adv[0], x[0])                   # radius 0: unchanged
    # a scalar radius is broadcast; without clamp the iterate may leave [0, 1] but not the ball
    x_adv = PGD(CLS, norm=norm, steps=3)(model, x, y, 0.2)
    assert (_norm(x_adv - x, norm) <= 0.2 * (1 + 1e-5)).all()


def test_pgd_and_fgsm_raise_loss_and_flip_at_large_radius(trained):
    model, x, y = trained
    clean = CLS.per_sample_loss(model(x), y)
    for norm, eps in (("L2", 0.3), ("Linf", 0.03)):
        adv = PGD(CLS, norm=norm, steps=10, clamp=(0, 1))(model, x, y, eps)
        assert CLS.per_sample_loss(model(adv), y).mean() > clean.mean() * 1.5
        one = FGSM(CLS, norm=norm, clamp=(0, 1))(model, x, y, eps)
        assert CLS.per_sample_loss(model(one), y).mean() > clean.mean()
    adv = PGD(CLS, norm="L2", steps=20, restarts=2, clamp=(0, 1))(model, x, y, 4.0)
    assert (~CLS.correct(model(adv), y)).float().mean() > 0.9
    adv = PGD(CLS, norm="Linf", steps=20, loss="margin", clamp=(0, 1))(model, x, y, 0.4)
    assert (~CLS.correct(model(adv), y)).float().mean() > 0.9


def test_segmentation_pgd_lowers_dice(trained_seg):
    task, model, x, y = trained_seg
    clean = task.dice(model(x), y).mean()
    radius = 0.125 * x[0].numel() ** 0.5                 # the L2 radius scales with the image size
    adv = PGD(task, norm="L2", steps=10, clamp=(0, 1))(model, x, y, radius)
    assert (_norm(adv - x, "L2") <= radius * (1 + 1e-5)).all()
    assert task.dice(model(adv), y).mean() < clean - 0.2
    margin = PGD(task, norm="Linf", steps=10, loss="margin", clamp=(0, 1))(model, x, y, 0.25)
    assert task.dice(model(margin), y).mean() < clean - 0.2


def test_attacks_work_under_bf16_autocast(trained):
    model, x, y = trained
    with torch.autocast("cpu", dtype=torch.bfloat16):
        adv = PGD(CLS, norm="L2", steps=5, clamp=(0, 1))(model, x, y, 0.3)
        found = BoundaryPGD(CLS, steps=5)(model, x, y, torch.full((x.shape[0],), 2.0))
    assert adv.dtype == torch.float32 and torch.isfinite(adv).all()
    assert (_norm(adv - x, "L2") <= 0.3 * (1 + 1e-5)).all()
    assert found.crossed.any() and (found.dist <= 2.0 + 1e-4).all()
    with torch.no_grad():
        assert CLS.per_sample_loss(model(adv), y).mean() > CLS.per_sample_loss(model(x), y).mean()


# ------------------------------------------------------------------------------------------ bisection
def _linear(d: int = 20, seed: int = 0):
    torch.manual_seed(seed)
    model = nn.Linear(d, 2)
    w = model.weight[1] - model.weight[0]
    b = model.bias[1] - model.bias[0]
    return model, w.detach(), b.detach()


def test_bisection_lands_on_the_boundary_of_a_linear_model():
    model, w, b = _linear()
    x = torch.randn(64, 20)
    y = (x @ w + b > 0).long()                       # every point correct by construction
    away = torch.where(y.bool(), -1.0, 1.0)[:, None] * w / w.norm()
    dist = (x @ w + b).abs() / w.norm()
    x_out = x + away * (dist + 0.5 + torch.rand(64))[:, None]      # beyond the boundary
    assert not CLS.correct(model(x_out), y).any()
    mid = bisect(model, x, x_out, lambda out: CLS.correct(out, y), steps=12)
    tol = (x_out - x).norm(dim=1) / 2 ** 12
    residual = (mid @ w + b).abs() / w.norm()
    assert (residual <= tol + 1e-5).all()
    assert CLS.correct(model(mid), y).all()                         # the correctly handled end of the bracket
    assert torch.allclose((mid - x).norm(dim=1), dist, atol=float(tol.max()) + 1e-5)


def test_boundary_attack_on_a_linear_model_finds_the_closest_boundary_point():
    model, w, b = _linear(seed=1)
    x = torch.randn(32, 20)
    y = (x @ w + b > 0).long()
    y[0] = 1 - y[0]                                  # one sample wrong on clean input
    true = (x @ w + b).abs() / w.norm()
    eps = torch.where(torch.arange(32) % 2 == 0, true * 3, true * 0.5)   # odd rows cannot cross
    res = BoundaryPGD(CLS, norm="L2", steps=20, bisection_steps=12)(model, x, y, eps)
    expect = torch.arange(32) % 2 == 0
    expect[0] = False
    assert torch.equal(res.crossed, expect)
    assert torch.equal(res.x_adv[0], x[0]) and res.dist[0] == 0
    hit = res.crossed
    residual = (res.x_adv[hit] @ w + b).abs() / w.norm()
    assert (residual < 0.02 * true[hit] + 1e-4).all()                  # on the boundary
    assert (res.dist[hit] >= true[hit] * (1 - 0.02) - 1e-4).all()      # never closer than the closest point
    assert (res.dist <= eps * (1 + 1e-5)).all()
    assert CLS.correct(model(res.x_adv[~hit]), y[~hit])[1:].all()       # final iterates, still correct


def test_boundary_attack_active_set_shrinks(trained):
    model, x, y = trained
    sizes: list[int] = []
    handle = model[0].register_forward_hook(lambda m, inp, out: sizes.append(inp[0].shape[0]))
    try:
        eps = torch.linspace(0.05, 4.0, x.shape[0])
        res = BoundaryPGD(CLS, norm="L2", steps=20, bisection_steps=10, bracket="first_wrong")(model, x, y, eps)
    finally:
        handle.remove()
    n_clean = 1 + 21                                  # clean check + K gradient steps + final check
    pgd_sizes = sizes[1:n_clean]
    assert sizes[0] == x.shape[0]
    assert all(a >= b for a, b in zip(pgd_sizes, pgd_sizes[1:]))
    assert pgd_sizes[-1] < pgd_sizes[0]
    bisection = sizes[n_clean:]
    assert len(bisection) == 10 and set(bisection) == {int(res.crossed.sum())}
    assert res.crossed.sum() > 0
    assert (res.dist <= eps * (1 + 1e-5) + 1e-6).all()


# ------------------------------------------------------------------------------------------ model hygiene
def test_no_parameter_gradient_and_no_grad_context(trained):
    model, x, y = trained
    model.zero_grad(set_to_none=True)
    with torch.no_grad():                               # attacks also work inside an evaluation loop
        PGD(CLS, steps=2, restarts=2)(model, x, y, 0.5)
        FGSM(CLS)(model, x, y, 0.1)
        BoundaryPGD(CLS, steps=3)(model, x, y, 1.0)
        bisect(model, x, x + 1, lambda out: CLS.correct(out, y))
    PGD(CLS, steps=2)(model, x, y, 0.5)
    assert all(p.grad is None for p in model.parameters())


def test_mode_and_batchnorm_statistics_restored(trained):
    model, x, y = trained
    model.train()
    model[1].momentum = 0.5
    before = {k: v.clone() for k, v in model.state_dict().items()}
    try:
        PGD(CLS, steps=3)(model, x, y, 0.5)
        BoundaryPGD(CLS, steps=3)(model, x, y, 1.0)
        assert model.training and all(m.training for m in model.modules())
        after = model.state_dict()
        assert all(torch.equal(before[k], after[k]) for k in before)
        with BatchStatistics(model) as stats:
            model(x)                                                     # the training forward moves them once
        moved = {k: v.clone() for k, v in model.state_dict().items()}
        assert not torch.equal(before["1.running_mean"], moved["1.running_mean"])
        PGD(CLS, steps=3, bn="batch")(model, x, y, 0.5, stats=stats)
        BoundaryPGD(CLS, steps=3, bn="batch")(model, x, y, 1.0, stats=stats)
        assert all(torch.equal(moved[k], v) for k, v in model.state_dict().items())   # swapped back exactly
        assert model.training and all(m.training for m in model.modules())
        with pytest.raises(ValueError, match="clean batch"):
            PGD(CLS, steps=1, bn="batch")(model, x, y, 0.5)
        model.load_state_dict(before)
        model[3].eval()                                                  # a mixed-mode model keeps its modes
        with pytest.raises(RuntimeError):
            with attack_mode(model) as net:
                assert not net.training
                raise RuntimeError("boom")
        assert model.training and model[0].training and not model[3].training
    finally:
        model.load_state_dict(before)
        model.eval()


def test_soft_logit_margin_value():
    z = torch.tensor([[1.0, 2.0, 0.0], [3.0, -1.0, 0.5]])
    y = torch.tensor([1, 0])
    expect = torch.stack([torch.logsumexp(torch.tensor([1.0, 0.0]), 0) - 2.0,
                          torch.logsumexp(torch.tensor([-1.0, 0.5]), 0) - 3.0])
    assert torch.allclose(CLS.attack_loss(z, y, "slm"), expect)


def test_early_stop_keeps_the_first_wrong_iterate():
    """A linear model and a step that crosses the boundary at step 2 of 10: early stop keeps that iterate, the
    plain run goes on to the ball's edge."""
    model, w, b = _linear(seed=3)
    x = torch.randn(8, 20)
    y = (x @ w + b > 0).long()
    dist = (x @ w + b).abs() / w.norm()
    eps = dist * 4
    step = dist * 0.6                                   # crosses at step 2 (1.2 d*), not at step 1 (0.6 d*)
    early = PGD(CLS, steps=10, step_size=step, random_start=False, early_stop=True)(model, x, y, eps)
    plain = PGD(CLS, steps=10, step_size=step, random_start=False)(model, x, y, eps)
    assert torch.allclose((early - x).norm(dim=1), 2 * step, rtol=1e-4)
    assert torch.allclose((plain - x).norm(dim=1), eps, rtol=1e-4)
    assert not CLS.correct(model(early), y).any()


class _Fp16Grad(torch.autograd.Function):
    """Identity whose backward rounds the gradient through float16, as a float16 network's backward does."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        return g.half().float()


def test_input_gradient_does_not_underflow_under_float16():
    torch.manual_seed(0)
    a = torch.randn(20) * 1e-9                          # gradients of ~1e-9: zero in float16 without scaling

    def model(v):                                       # elementwise ops: float32 even under CPU autocast
        s = (v * a).sum(dim=1)
        return torch.stack([-s, s], dim=1)

    class Net(nn.Module):
        def forward(self, x):
            return model(_Fp16Grad.apply(x))

    x, y = torch.randn(4, 20), torch.tensor([0, 1, 0, 1])
    grad, _ = input_gradient(Net(), x, lambda out: CLS.per_sample_loss(out, y), torch.float32)
    assert torch.count_nonzero(grad) == 0                         # unscaled: underflow, the attack would stall
    with torch.autocast("cpu", dtype=torch.float16):
        grad, _ = input_gradient(Net(), x, lambda out: CLS.per_sample_loss(out, y), torch.float32)
    assert torch.count_nonzero(grad) == grad.numel()
    x_req = x.clone().requires_grad_(True)
    (expect,) = torch.autograd.grad(CLS.per_sample_loss(model(x_req), y).sum(), x_req)
    assert torch.allclose(grad, expect, rtol=1e-2)
