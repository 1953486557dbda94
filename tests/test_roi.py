"""Region of interest (a field-of-view mask per image, batch key ``roi``): the segmentation loss and Dice count
only its pixels, every attack perturbs only inside it, the trainer, the per-epoch validation and the evaluation
suite pass it on; a one-epoch ``train`` on a folder layout with ``data.roi_dir``."""

from __future__ import annotations

from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from monai.data import DataLoader, Dataset
from PIL import Image
from torch import nn

from pipeline.adversarial.apgd import APGD
from pipeline.adversarial.boundary import BoundaryPGD
from pipeline.adversarial.methods import METHODS, build_method
from pipeline.adversarial.pgd import FGSM, PGD
from pipeline.adversarial.tasks import Classification, Segmentation
from pipeline.cli import main
from pipeline.config import EvaluateConfig, method_config, method_knobs
from pipeline.dice import PooledDice, dice_per_image
from pipeline.engine.robust_validation import AdversarialValidation, metric_name
from pipeline.engine.trainer import RobustTrainer
from pipeline.engine.validation import build_validator
from pipeline.evaluation.results import CLEAN, Condition
from pipeline.evaluation.robustness import Scorer, run_suite, worst_case

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def _box(shape, boxes) -> torch.Tensor:
    """(B, 1, H, W) float 0/1 mask, image i is 1 on rows/cols ``boxes[i] = (r0, r1, c0, c1)`` (None: empty)."""
    roi = torch.zeros(len(boxes), 1, *shape)
    for i, box in enumerate(boxes):
        if box is not None:
            r0, r1, c0, c1 = box
            roi[i, :, r0:r1, c0:c1] = 1.0
    return roi


# ------------------------------------------------------------------------------------------ loss and Dice
def test_segmentation_loss_equals_the_loss_on_the_roi_pixels_by_hand():
    g = torch.Generator().manual_seed(0)
    task = Segmentation(3)
    logits = torch.randn(2, 3, 6, 7, generator=g) * 3
    labels = torch.randint(0, 3, (2, 1, 6, 7), generator=g)
    roi = _box((6, 7), [(1, 5, 0, 4), (0, 6, 2, 7)])
    got = task.per_sample_loss(logits, labels, roi)
    for i in range(2):
        inside = roi[i, 0] > 0
        p = logits[i].softmax(dim=0)[:, inside]                       # (C, n): only the ROI pixels
        t = F.one_hot(labels[i, 0][inside], 3).T.float()
        dice = (1 - (2 * (p * t).sum(1) + 1e-5) / (p.sum(1) + t.sum(1) + 1e-5)).mean()
        ce = -(p * t).sum(0).log().mean()
        assert float(got[i]) == pytest.approx(float(dice + ce), rel=1e-5)
    assert not torch.allclose(got, task.per_sample_loss(logits, labels))   # the whole image is another number
    # a prediction error outside the ROI changes nothing, bit for bit
    outside = (roi == 0).expand_as(logits)
    worse = torch.where(outside, -logits * 10, logits)
    assert torch.equal(task.per_sample_loss(worse, labels, roi), got)
    for kind in ("margin", "slm", "dice_ce"):
        assert torch.equal(task.attack_loss(worse, labels, kind, roi), task.attack_loss(logits, labels, kind, roi))
    margin = task.attack_loss(logits, labels, "margin", roi)
    pixel = task.attack_loss(logits, labels, "margin")                    # whole-image mean, for the pixel values
    z = logits.scatter(1, labels, float("-inf")).amax(1) - logits.gather(1, labels).squeeze(1)
    assert float(pixel[0]) == pytest.approx(float(z[0].mean()), rel=1e-5)
    assert float(margin[0]) == pytest.approx(float(z[0][roi[0, 0] > 0].mean()), rel=1e-5)
    kl = task.divergence(logits, logits.flip(1), roi)
    assert torch.equal(kl, task.divergence(worse, worse.flip(1), roi))
    # classification: the ROI restricts only the attack, never the loss
    cls, x = Classification(), torch.randn(2, 4, generator=g)
    assert torch.equal(cls.per_sample_loss(x, torch.tensor([1, 3]), roi), cls.per_sample_loss(x, torch.tensor([1, 3])))


def test_dice_counts_only_roi_pixels():
    """Inside the ROI (left half, 32 pixels): label 8 foreground pixels, prediction 6 of them + 2 false positives:
    Dice 2 * 6 / (8 + 8) = 0.75. Outside: 10 false positives, which bring the whole-image Dice to 12 / 26."""
    label = torch.zeros(1, 1, 8, 8, dtype=torch.long)
    label[0, 0, 2:4, 0:4] = 1                                         # 8 pixels, inside
    pred = label.clone()
    pred[0, 0, 3, 2:4] = 0                                            # 2 missed
    pred[0, 0, 6, 0:2] = 1                                            # 2 false positives inside
    pred[0, 0, 0:5, 5:7] = 1                                          # 10 false positives outside
    logits = torch.cat([1 - pred, pred], dim=1).float()
    roi = _box((8, 8), [(0, 8, 0, 4)])
    assert float(dice_per_image(logits, label, 2, roi)[0]) == pytest.approx(0.75)
    assert float(dice_per_image(logits, label, 2)[0]) == pytest.approx(12 / 26)
    assert float(Segmentation(2).dice(logits, label, roi)[0]) == pytest.approx(0.75)
    strict = Segmentation(2, 0.7)
    assert bool(strict.correct(logits, label, roi)) and not bool(strict.correct(logits, label))
    pooled, whole = PooledDice(2), PooledDice(2)
    pooled.update(logits, label, roi)
    whole.update(logits, label)
    assert pooled.value() == pytest.approx(0.75) and whole.value() == pytest.approx(12 / 26)
    assert (float(pooled.intersection[0]), float(pooled.total[0])) == (6.0, 16.0)


# ------------------------------------------------------------------------------------------ attacks
def _seg_model() -> nn.Module:
    """A 3x3 convolution: each output pixel sees its neighbours, so the input gradient is non-zero outside the ROI."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.Tanh(), nn.Conv2d(8, 2, 3, padding=1)).eval()


@pytest.fixture(scope="module")
def seg_batch():
    g = torch.Generator().manual_seed(1)
    x = torch.rand(4, 3, 8, 8, generator=g)
    model = _seg_model()
    with torch.no_grad():
        y = model(x).argmax(dim=1, keepdim=True)                      # the model's own answer: clean Dice 1
    roi = _box((8, 8), [(1, 6, 1, 6), (0, 8, 0, 3), (2, 8, 2, 8), None])
    return model, x, y, roi


def _check_inside(x, x_adv, roi, eps, norm, moves=True):
    outside = (roi <= 0).expand_as(x)
    assert torch.equal(x_adv[outside], x[outside])                   # exactly unchanged outside
    delta = (x_adv - x).flatten(1)
    size = delta.norm(dim=1) if norm == "L2" else delta.abs().amax(dim=1)
    assert bool((size <= eps + 1e-5).all())
    assert float(x_adv.min()) >= 0.0 and float(x_adv.max()) <= 1.0
    moved = (x_adv - x).abs().flatten(1).sum(dim=1)
    assert float(moved[3]) == 0.0                                     # image 3 has an empty ROI
    assert bool((moved[:3] > 0).all()) or not moves


@pytest.mark.parametrize("norm, eps", [("L2", 1.5), ("Linf", 0.1)])
def test_pgd_apgd_and_boundary_attack_stay_inside_the_roi_and_the_ball(seg_batch, norm, eps):
    model, x, y, roi = seg_batch
    task = Segmentation(2)
    torch.manual_seed(0)
    free = PGD(task, norm=norm, steps=4, clamp=(0.0, 1.0))(model, x, y, eps)
    assert float((free - x)[(roi <= 0).expand_as(x)].abs().sum()) > 0  # without a ROI the outside moves
    for early_stop in (False, True):
        attack = PGD(task, norm=norm, steps=4, clamp=(0.0, 1.0), early_stop=early_stop, restarts=2)
        _check_inside(x, attack(model, x, y, eps, roi=roi), roi, eps, norm)
    # TRADES' start (x + 0.001 N(0, 1)) and FGSM (no random start) too
    _check_inside(x, PGD(task, norm=norm, steps=2, random_start=0.001, clamp=(0.0, 1.0))(model, x, y, eps, roi=roi),
                  roi, eps, norm)
    _check_inside(x, FGSM(task, norm=norm, clamp=(0.0, 1.0))(model, x, y, eps, roi=roi), roi, eps, norm)
    for early_stop in (False, True):
        attack = APGD(task, norm=norm, steps=6, clamp=(0.0, 1.0), early_stop=early_stop)
        _check_inside(x, attack(model, x, y, eps, roi=roi), roi, eps, norm)
    found = BoundaryPGD(task, norm=norm, steps=6, loss="ce", clamp=(0.0, 1.0), bisection_steps=4)(model, x, y, eps * 3,
                                                                                                   roi=roi)
    assert bool(found.correct.all()) and bool(found.crossed[:3].any()) and not bool(found.crossed[3])
    _check_inside(x, found.x_adv, roi, eps * 3, norm, moves=False)   # a boundary point may lie at x itself


def test_classification_attack_perturbs_only_the_roi():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 64, 3)).eval()
    x = 0.3 + 0.4 * torch.rand(3, 3, 8, 8)                            # far from the clamp bounds
    y = torch.tensor([0, 1, 2])
    roi = _box((8, 8), [(0, 4, 0, 4), (4, 8, 0, 8), (1, 7, 1, 7)])
    outside = (roi <= 0).expand_as(x)
    for norm, eps in (("L2", 1.0), ("Linf", 0.05)):
        x_adv = PGD(Classification(), norm=norm, steps=3, clamp=(0.0, 1.0))(model, x, y, eps, roi=roi)
        assert torch.equal(x_adv[outside], x[outside]) and float((x_adv - x).abs().sum()) > 0
    # the step direction is the gradient inside the ROI, normalised there: one L2 step of 0.1 is 0.1 long
    step = FGSM(Classification(), norm="L2", clamp=(0.0, 1.0))(model, x, y, 0.1, roi=roi) - x
    torch.testing.assert_close(step.flatten(1).norm(dim=1), torch.full((3,), 0.1))
    assert torch.equal(step[outside], torch.zeros_like(step[outside]))


def test_trainer_passes_the_roi_to_the_method():
    """PGD-AT on a batch with ``roi``: the attack leaves the outside alone, the loss is the ROI loss."""
    g = torch.Generator().manual_seed(2)
    items = [{"image": torch.rand(3, 8, 8, generator=g), "label": torch.randint(0, 2, (1, 8, 8), generator=g),
              "roi": _box((8, 8), [(1, 7, 0, 5)])[0], "index": i} for i in range(4)]
    net = _seg_model()
    task = Segmentation(2)
    method = build_method(method_config(name="pgd_at", eps=1.0, steps=2, norm="L2"), task, len(items))
    trainer = RobustTrainer(device=torch.device("cpu"), max_epochs=1, network=net, method=method, decollate=False,
                            train_data_loader=DataLoader(Dataset(items), batch_size=4),
                            optimizer=torch.optim.SGD(net.parameters(), lr=0.0))
    trainer.run()
    out = trainer.state.output
    roi = torch.stack([it["roi"] for it in items])
    outside = (roi <= 0).expand_as(out["image"])
    assert torch.equal(out["adv"][outside], out["image"][outside])
    assert float((out["adv"] - out["image"]).abs().sum()) > 0
    with torch.no_grad():
        expected = task.per_sample_loss(net(out["adv"]), out["label"], roi).mean()
        whole = task.per_sample_loss(net(out["adv"]), out["label"]).mean()
    loss = float(out["loss"].detach())
    assert loss == pytest.approx(float(expected), rel=1e-5) and abs(loss - float(whole)) > 1e-3


@pytest.mark.parametrize("name", sorted(METHODS))
def test_every_method_restricts_loss_and_attack_to_the_roi(seg_batch, name):
    """Labels changed outside the ROI change neither the loss nor the attack (same seed: the same number, bit for
    bit); the adversarial inputs equal the clean ones outside."""
    model, x, y, roi = seg_batch
    other = torch.where(roi > 0, y, 1 - y)
    cfg = method_config(**method_knobs(name, eps=1.0, steps=2, norm="L2", bisection_steps=2))
    out = {}
    cases = (("roi", y, roi), ("roi_other", other, roi), ("whole", y, None), ("whole_other", other, None))
    for key, labels, mask in cases:
        torch.manual_seed(0)
        out[key] = build_method(cfg, Segmentation(2), 4).loss(model, x, labels, torch.arange(4), roi=mask)
    assert torch.equal(out["roi"].loss, out["roi_other"].loss)
    assert not torch.equal(out["whole"].loss, out["whole_other"].loss)
    if out["roi"].adv is not None:
        outside = (roi <= 0).expand_as(x)
        assert torch.equal(out["roi"].adv[outside], x[outside])


# ------------------------------------------------------------------------------------------ evaluation
class Threshold(nn.Module):
    """Pixel-wise: foreground where the first channel exceeds 0.5 (logits [0, 20 (x - 0.5)])."""

    def forward(self, x):
        fg = 20.0 * (x[:, :1] - 0.5)
        return torch.cat([torch.zeros_like(fg), fg], dim=1)


def _eval_items() -> list[dict]:
    """8x8 images at 0.2 (0.8 where foreground). ROI: the left half. Label: 8 foreground pixels inside it, all
    predicted; outside, 8 bright pixels labelled background: whole-image Dice 2 * 8 / (16 + 8) = 2/3, ROI Dice 1."""
    items = []
    for i in range(2):
        label = torch.zeros(1, 8, 8)
        label[0, 2 + 2 * i:4 + 2 * i, 0:4] = 1
        image = 0.2 + 0.6 * label
        image[0, 5:7, 4:8] = 0.8
        items.append({"image": image, "label": label, "roi": _box((8, 8), [(0, 8, 0, 4)])[0], "index": i})
    return items


def _drop_roi(items):
    return [{k: v for k, v in it.items() if k != "roi"} for it in items]


def test_evaluation_dice_respects_the_roi():
    """A pixel flips only under a change above 0.3: L2 0.25 and Linf 0.25 cannot flip any (Dice as clean), Linf 0.35
    flips every pixel it may touch, i.e. inside the ROI only."""
    ev = EvaluateConfig(norms=["L2", "Linf"], eps_l2=[0.25], eps_linf=[0.25, 0.35], steps=5, apgd=True, fgsm=True,
                        noise=True, margin=False)
    task = Segmentation(2)
    results = {}
    for name, items in (("roi", _eval_items()), ("whole", _drop_roi(_eval_items()))):
        torch.manual_seed(0)
        results[name] = run_suite(Threshold(), DataLoader(Dataset(items), batch_size=2), task, ev, num_classes=2,
                                  clamp=(0.0, 1.0))
    roi, whole = results["roi"], results["whole"]
    small = [CLEAN, Condition("pgd", "L2", 0.25), Condition("pgd", "Linf", 0.25), Condition("fgsm", "L2", 0.25),
             Condition("noise", "Linf", 0.25)]
    for cond in small:
        np.testing.assert_allclose(roi.outcomes[cond].dice, [1.0, 1.0])
        np.testing.assert_allclose(whole.outcomes[cond].dice, [2 / 3, 2 / 3], rtol=1e-6)
        assert roi.outcomes[cond].dice_pooled == pytest.approx(1.0)
        assert whole.outcomes[cond].dice_pooled == pytest.approx(2 / 3)
    big = roi.outcomes[Condition("pgd", "Linf", 0.35)]
    assert float(big.dice.max()) < 0.5
    # the worst-case inputs themselves: changed inside the ROI only
    items = _eval_items()
    x, y, mask = (torch.stack([it[k] for it in items]) for k in ("image", "label", "roi"))
    outside = (mask <= 0).expand_as(x)
    for cond in (Condition("pgd", "Linf", 0.35), Condition("fgsm", "Linf", 0.35)):
        torch.manual_seed(0)
        worst = worst_case(Threshold(), x, y, cond, task=task, scorer=Scorer(task, 2), ev=ev, clamp=(0.0, 1.0),
                           keep_inputs=True, roi=mask)
        assert torch.equal(worst.inputs[outside], x[outside]) and float(worst.score.max()) < 0.5


def test_per_epoch_validation_dice_respects_the_roi():
    """Clean and at L2 0.25 (no pixel can flip): Dice 1 on the ROI, 2/3 on the whole image. Under Linf 0.35 the
    adversarial prediction of the overlay differs from the clean one inside the ROI only."""
    for name, items, expected in (("roi", _eval_items(), 1.0), ("whole", _drop_roi(_eval_items()), 2 / 3)):
        validator = build_validator(task="segmentation", num_classes=2, network=Threshold(), device=torch.device("cpu"),
                                    loader=DataLoader(Dataset(items), batch_size=2))
        check = AdversarialValidation(Segmentation(2), [("Linf", 0.35), ("L2", 0.25)], steps=3, clamp=(0.0, 1.0),
                                      overlay_cases=2)
        check.attach(validator)
        torch.manual_seed(0)
        validator.run()
        m = validator.state.metrics
        assert m["val_dice"] == pytest.approx(expected), name
        assert m["val_dice_pooled"] == pytest.approx(expected), name
        assert m[metric_name("L2", 0.25)] == pytest.approx(expected), name
        assert m[metric_name("L2", 0.25, pooled=True)] == pytest.approx(expected), name
        assert m[metric_name("Linf", 0.35)] < 0.5, name
        changed = torch.stack([(c.adversarial != c.clean)[0] for c in check.cases])
        assert bool(changed[:, :, :4].any())                          # inside the ROI
        assert bool(changed[:, :, 4:].any()) == (name == "whole")     # outside only without a ROI


# ------------------------------------------------------------------------------------------ end to end
def _fov_folder(shared: Path, root: Path, n: int = 6) -> None:
    """ISIC 2017 images (PNG) and masks (GIF) at 30x40, and a field-of-view disc per image (GIF) in fov/."""
    for sub in ("images", "masks", "fov"):
        (root / sub).mkdir(parents=True)
    base = shared / "isic2017"
    ids = sorted(p.stem for p in (base / "ISIC-2017_Training_Data").glob("*.jpg"))[:n]
    yy, xx = np.mgrid[:30, :40]
    disc = ((yy - 15) ** 2 + (xx - 20) ** 2 <= 14 ** 2).astype(np.uint8) * 255
    for image_id in ids:
        Image.open(base / "ISIC-2017_Training_Data" / f"{image_id}.jpg").convert("RGB").resize((40, 30)).save(
            root / "images" / f"{image_id}.png")
        mask = Image.open(base / "ISIC-2017_Training_Part1_GroundTruth_256" / f"{image_id}_segmentation.png")
        mask.convert("L").resize((40, 30), Image.NEAREST).save(root / "masks" / f"{image_id}_segmentation.gif")
        Image.fromarray(disc).save(root / "fov" / f"{image_id}_fov.gif")


def test_one_epoch_train_with_a_field_of_view_folder(shared_data, tmp_path, mlflow_uri, capsys):
    root = tmp_path / "data"
    _fov_folder(shared_data, root)
    sets = {"data.root": root, "data.mask_suffix": "_segmentation", "data.roi_dir": "fov", "data.roi_suffix": "_fov",
            "data.image_size": "[32,32]", "data.cache": "none", "model.channels": "[4,8]", "method.steps": 2,
            "method.bisection_steps": 2, "train.epochs": 1, "train.batch_size": 4, "train.device": "cpu",
            "train.progress": "false", "train.output_dir": tmp_path / "out", "evaluate.epoch_steps": 2,
            "tracking.log_model": "false"}
    argv = ["train", CONFIGS / "folder_seg_ima.yaml"] + [a for k, v in sets.items() for a in ("--set", f"{k}={v}")]
    code = main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert code == 0, err
    client = mlflow.MlflowClient(mlflow_uri)
    (run,) = client.search_runs([client.get_experiment_by_name("folder_seg_ima").experiment_id])
    metrics = run.data.metrics
    assert run.info.status == "FINISHED"
    assert 0.0 <= metrics["val_dice"] <= 1.0 and 0.0 <= metrics["val_dice_pooled"] <= 1.0
    assert 0.0 <= metrics[metric_name("L2", 4.0)] <= 1.0
