"""Robust segmentation: IMA's Dice criterion, per-sample radii in 2D/3D batches, the state of patched volumes,
sliding-window validation, Dice under PGD every epoch and a 3D training run's MLflow record."""

from __future__ import annotations

import math

import mlflow
import nibabel as nib
import numpy as np
import pytest
import torch
from monai.data import DataLoader, Dataset
from monai.engines import SupervisedEvaluator
from torch import nn

from pipeline.adversarial.bisection import bisect
from pipeline.adversarial.boundary import BoundaryPGD
from pipeline.adversarial.methods.ima import IMA
from pipeline.adversarial.pgd import PGD
from pipeline.adversarial.state import SampleState
from pipeline.adversarial.tasks import Segmentation
from pipeline.config import config_from_dict, method_config
from pipeline.data.loading import patches_3d
from pipeline.engine.robust_validation import AdversarialValidation, InfererModel, metric_name
from pipeline.engine.run import train
from pipeline.engine.validation import build_validator, sliding_window_inferer
from pipeline.dice import PooledDice


def _norm(v: torch.Tensor, norm: str) -> torch.Tensor:
    flat = v.flatten(1)
    return flat.norm(dim=1) if norm == "L2" else flat.abs().amax(dim=1)


class Threshold(nn.Module):
    """Voxel-wise: foreground where the first channel exceeds 0.5 (logits [0, k (x - 0.5)])."""

    def __init__(self, k: float = 20.0):
        super().__init__()
        self.k = nn.Parameter(torch.tensor(k))

    def forward(self, x):
        fg = self.k * (x[:, :1] - 0.5)
        return torch.cat([torch.zeros_like(fg), fg], dim=1)


class Fixed(nn.Module):
    """Row r of ``logits`` for an input whose first voxel is about 10 r, whatever the perturbation (plus
    0 * input, so attacks have a graph but no effect)."""

    def __init__(self, logits: torch.Tensor):
        super().__init__()
        self.register_buffer("logits", logits)

    def forward(self, x):
        rows = (x.flatten(1)[:, 0].detach() / 10).round().long()
        return self.logits[rows] + 0 * x


def _logits(mask: torch.Tensor) -> torch.Tensor:
    return torch.cat([torch.zeros_like(mask), 10 * mask], dim=1).float()


# ------------------------------------------------------------------------------------------ IMA's Dice flags
@pytest.mark.parametrize("threshold, correct", [(0.6, [True, False, True]), (0.3, [True, True, True]),
                                                (0.7, [False, False, True])])
def test_ima_flags_follow_per_image_dice_and_its_threshold(threshold, correct):
    """Predictions with Dice 2/3, 0.4 and 1 (8 foreground pixels per image): IMA records "correct" exactly
    where the Dice reaches the configured threshold, and grows only those radii at the epoch's end."""
    y = torch.zeros(3, 1, 4, 4)
    y[:, 0, :2, :] = 1
    p = torch.zeros_like(y)
    p[0, 0, 0, :] = 1          # 4 of 8 found: Dice 8 / 12
    p[1, 0, 0, :2] = 1         # 2 of 8 found: Dice 4 / 10
    p[2] = y[2]
    task = Segmentation(2, dice_threshold=threshold)
    torch.testing.assert_close(task.dice(_logits(p), y), torch.tensor([2 / 3, 0.4, 1.0]))
    cfg = method_config(name="ima", steps=2, delta=0.1, eps_max=1.0, bisection_steps=2)   # the task holds the threshold
    method = IMA(task, cfg, SampleState(5, 0.1))
    index = torch.tensor([4, 0, 2])
    inputs = 10 * torch.arange(3.0).view(3, 1, 1, 1) + 0.1 * torch.rand(3, 1, 4, 4)
    method.loss(Fixed(_logits(p)), inputs, y, index)
    state = method.state
    assert state.correct[index].tolist() == correct
    assert not state.found.any()                       # the output does not depend on the input
    method.epoch_completed()
    expected = torch.full((5,), 0.1)
    expected[index[torch.tensor(correct)]] = 0.2        # correct and nothing found inside eps: eps += delta
    torch.testing.assert_close(state.eps, expected)


def test_segmentation_bisection_lands_where_dice_crosses_the_threshold():
    """From an image segmented perfectly towards a dark one, the foreground voxels (intensities 0.55..0.95) drop
    below the network's 0.5 one after the other, so Dice falls monotonically along the segment; bisection
    returns a point with Dice >= 0.6 just before it and < 0.6 just after it."""
    y = torch.zeros(2, 1, 8, 8)
    y[:, :, 2:6, 2:6] = 1
    ramp = torch.linspace(0.55, 0.95, 16).view(4, 4)
    x_in = torch.zeros(2, 1, 8, 8)
    x_in[:, 0, 2:6, 2:6] = ramp
    x_out = torch.zeros_like(x_in)
    x_out[1] = 0.3 * x_in[1]
    task, net, steps = Segmentation(2, dice_threshold=0.6), Threshold(), 12
    assert task.correct(net(x_in), y).all() and not task.correct(net(x_out), y).any()
    mid = bisect(net, x_in, x_out, lambda out: task.correct(out, y), steps=steps)
    t = ((mid - x_in).flatten(1).norm(dim=1) / (x_out - x_in).flatten(1).norm(dim=1)).view(2, 1, 1, 1)
    h = 2.0 ** -steps
    before, after = x_in + (t - h) * (x_out - x_in), x_in + (t + h) * (x_out - x_in)
    assert task.correct(net(before), y).all() and not task.correct(net(after), y).any()
    assert (task.dice(net(before), y) >= 0.6).all() and (task.dice(net(after), y) < 0.6).all()


# ------------------------------------------------------------------------------------------ per-sample radii
@pytest.mark.parametrize("norm", ["L2", "Linf"])
@pytest.mark.parametrize("dims", [2, 3])
def test_segmentation_perturbations_respect_each_samples_radius(norm, dims):
    torch.manual_seed(0)
    n, size = 5, 8
    y = torch.zeros((n, 1) + (size,) * dims)
    y[(slice(None), slice(None)) + (slice(2, 6),) * dims] = 1
    x = (0.3 + 0.4 * y + 0.05 * torch.randn_like(y)).clamp(0, 1)
    conv = nn.Conv2d if dims == 2 else nn.Conv3d
    model = nn.Sequential(conv(1, 4, 3, padding=1), nn.ReLU(), conv(4, 2, 1))
    task = Segmentation(2, dice_threshold=0.0)          # every clean image "correct": all are attacked
    scale = math.sqrt(y[0].numel()) if norm == "L2" else 1.0
    eps = torch.tensor([0.0, 0.01, 0.05, 0.2, 0.5]) * scale
    adv = PGD(task, norm=norm, steps=4, clamp=(0.0, 1.0))(model, x, y, eps)
    assert (_norm(adv - x, norm) <= eps * (1 + 1e-5) + 1e-6).all()
    assert torch.equal(adv[0], x[0]) and adv.min() >= 0 and adv.max() <= 1
    assert (_norm(adv - x, norm)[1:] > 0).all()
    found = BoundaryPGD(Segmentation(2, dice_threshold=0.99), norm=norm, steps=4, clamp=(0.0, 1.0),
                        bisection_steps=3)(model, x, y, eps)
    assert (found.dist <= eps * (1 + 1e-5) + 1e-6).all()
    assert (_norm(found.x_adv - x, norm) <= eps * (1 + 1e-5) + 1e-6).all()


# ------------------------------------------------------------------------------------------ patches of volumes
def _volume(seed: int, inverted: bool) -> dict:
    g = torch.Generator().manual_seed(seed)
    label = torch.zeros(1, 16, 16, 8)
    label[:, 4:12, 4:12, 2:6] = 1
    image = 0.2 + 0.6 * label + 0.05 * torch.rand(label.shape, generator=g)
    return {"image": 1.0 - image if inverted else image, "label": label}


def test_patches_of_one_volume_share_its_index_radius_and_flags():
    """batch_size counts volumes: MONAI's collate puts all patches_per_volume patches of a volume in one batch,
    every patch carrying the volume's index. IMA attacks every patch at its volume's radius; the volume is
    correct only if all its patches are (volume 1's inverted contrast breaks every patch), and its radius is
    updated once, as one sample."""
    items = [{**_volume(0, inverted=False), "index": 0}, {**_volume(1, inverted=True), "index": 1}]
    dataset = Dataset(items, transform=patches_3d([8, 8, 8], num_samples=3, has_label=True))
    batch = next(iter(DataLoader(dataset, batch_size=2, shuffle=False)))
    assert batch["index"].tolist() == [0, 0, 0, 1, 1, 1]
    assert tuple(batch["image"].shape) == (6, 1, 8, 8, 8)

    task = Segmentation(2, dice_threshold=0.6)
    cfg = method_config(name="ima", steps=3, delta=0.25, eps_max=10.0, bisection_steps=3)
    state = SampleState(2, 0.1)
    state.eps = torch.tensor([0.5, 2.0])
    method = IMA(task, cfg, state)
    x, y = batch["image"].as_tensor(), batch["label"].as_tensor()
    out = method.loss(Threshold(), x, y, batch["index"])
    per_patch = task.correct(Threshold()(x), y)
    assert per_patch[:3].all() and not per_patch[3:].any()
    radius = state.eps[batch["index"]]
    assert (_norm(out.adv - x, "L2") <= radius * (1 + 1e-5)).all()
    assert state.correct.tolist() == [True, False] and state.seen.all()
    # volume 0: radius 0.5 is far too small to break a patch; volume 1 is not attacked (handled incorrectly)
    assert state.found.tolist() == [False, False]
    method.epoch_completed()
    assert state.eps.tolist() == pytest.approx([0.75, 2.0])   # one update per volume: += delta / unchanged


# ------------------------------------------------------------------------------------------ sliding window
def test_sliding_window_validation_equals_full_volume_inference():
    torch.manual_seed(0)
    volume = torch.rand(1, 1, 20, 18, 11)
    voxelwise = nn.Sequential(nn.Conv3d(1, 4, 1), nn.Tanh(), nn.Conv3d(4, 2, 1)).eval()
    conv = nn.Sequential(nn.Conv3d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv3d(4, 2, 3, padding=1)).eval()
    with torch.no_grad():
        # windows smaller than the volume (padded at the border, overlapping, Gaussian-blended): a voxel-wise
        # network gives exactly the full-volume output
        windows = sliding_window_inferer([8, 8, 8], spatial_dims=3)(volume, voxelwise)
        torch.testing.assert_close(windows, voxelwise(volume), atol=1e-5, rtol=1e-5)
        # one window covering the whole volume: any network, including one with a receptive field
        whole = sliding_window_inferer([20, 18, 11], spatial_dims=3)(volume, conv)
        torch.testing.assert_close(whole, conv(volume), atol=1e-5, rtol=1e-5)

    # the per-epoch validator with the sliding window reports the Dice of full-volume inference
    label = (volume > 0.5).float()
    data = [{"image": volume[0], "label": label[0]}, {"image": volume[0] * 0.8, "label": label[0]}]
    loader = DataLoader(Dataset(data), batch_size=1)
    validator = build_validator(task="segmentation", num_classes=2, network=Threshold(), loader=loader,
                                device=torch.device("cpu"), inferer=sliding_window_inferer([8, 8, 8], 3))
    validator.run()
    task, pooled = Segmentation(2), PooledDice(2)
    full = [Threshold()(d["image"][None]) for d in data]
    for logits, d in zip(full, data):
        pooled.update(logits, d["label"][None])
    expected = float(torch.cat([task.dice(f, d["label"][None]) for f, d in zip(full, data)]).mean())
    assert expected < 0.99                                # the 0.8-scaled volume loses foreground
    assert validator.state.metrics["val_dice"] == pytest.approx(expected, abs=1e-6)
    assert validator.state.metrics["val_dice_pooled"] == pytest.approx(pooled.value(), abs=1e-6)


# ------------------------------------------------------------------------------------------ Dice under PGD
def test_adversarial_validation_metrics_and_overlay_cases():
    torch.manual_seed(0)
    label = torch.zeros(4, 1, 12, 12, 8)
    label[:, :, 3:9, 3:9, 2:6] = 1
    image = (0.25 + 0.5 * label + 0.05 * torch.randn(label.shape)).clamp(0, 1)
    data = [{"image": image[i], "label": label[i]} for i in range(4)]
    validator = SupervisedEvaluator(device=torch.device("cpu"), val_data_loader=DataLoader(Dataset(data), batch_size=2),
                                    network=Threshold(), inferer=sliding_window_inferer([8, 8, 8], 3),
                                    decollate=False)
    check = AdversarialValidation(Segmentation(2), [("L2", 0.0), ("L2", 6.0), ("Linf", 0.3)], steps=5,
                                  max_samples=3, clamp=(0.0, 1.0), overlay_cases=2)
    check.attach(validator)
    validator.run()
    m = validator.state.metrics
    assert check.seen == 3                               # capped at max_samples
    assert m[metric_name("L2", 0.0)] == pytest.approx(1.0) and m[metric_name("L2", 0.0, pooled=True)] == 1.0
    assert m["val_pgd_l2_dice_at_6"] < 0.9 and m["val_pgd_linf_dice_at_0.3"] < 0.5
    assert m["val_pgd_linf_dice_pooled_at_0.3"] < 0.5
    assert len(check.cases) == 2 and check.cases[0].eps == 6.0 and check.cases[0].norm == "L2"
    case = check.cases[0]
    assert tuple(case.image.shape) == (1, 12, 12, 8) and torch.equal(case.clean, case.label.long())
    assert not torch.equal(case.adversarial, case.clean)
    # the attacked model is the inferer around the network: the same output as the validator's
    x = image[:1]
    torch.testing.assert_close(InfererModel(validator.inferer, validator.network)(x), Threshold()(x))


# ------------------------------------------------------------------------------------------ end to end, 3D
def _nifti_folder(root):
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    rng = np.random.default_rng(0)
    for i in range(2):
        label = np.zeros((16, 16, 8), dtype=np.uint8)
        label[4 + i:12, 4:12 - i, 2:6] = 1
        image = (100 + 300 * label.astype(np.float32) + rng.normal(0, 10, label.shape)).astype(np.float32)
        for folder, array in (("imagesTr", image), ("labelsTr", label)):
            nib.save(nib.Nifti1Image(array, np.eye(4)), str(root / folder / f"vol_{i}.nii.gz"))


def test_3d_training_run_logs_segmentation_metrics_and_overlays(tmp_path, mlflow_uri, monkeypatch):
    monkeypatch.chdir(tmp_path)                          # MLflow's default artifact root is ./mlruns
    _nifti_folder(tmp_path / "data")
    cfg = config_from_dict({
        "experiment": "seg3d", "task": "segmentation", "seed": 0,
        "data": {"source": "nifti", "root": str(tmp_path / "data"), "spacing": [1.0, 1.0, 1.0],
                 "patch_size": [8, 8, 8], "patches_per_volume": 2, "cache": "none"},
        "model": {"name": "unet", "channels": [4, 8]},
        "method": {"name": "ima", "steps": 2, "delta": 0.2, "eps_max": 2.0, "bisection_steps": 2},
        "train": {"epochs": 2, "batch_size": 2, "device": "cpu", "progress": False,
                  "output_dir": str(tmp_path / "out")},
        "evaluate": {"eps_l2": [0.5], "eps_linf": [0.01], "epoch_steps": 2, "overlay_cases": 1},
        "tracking": {"run_name": "seg3d"},
    })
    result = train(cfg)
    client = mlflow.MlflowClient(mlflow_uri)
    assert client.get_run(result.run_id).info.status == "FINISHED"
    for key in ["val_dice", "val_dice_pooled", "val_pgd_l2_dice_at_0.5", "val_pgd_l2_dice_pooled_at_0.5",
                "val_pgd_linf_dice_at_0.01", "val_pgd_linf_dice_pooled_at_0.01", "eps_mean", "val_time_s"]:
        history = client.get_metric_history(result.run_id, key)
        assert [h.step for h in history] == [1, 2], key
        assert all(0.0 <= h.value <= 1.0 for h in history) or key in ("eps_mean", "val_time_s"), key
    overlays = [a.path for a in client.list_artifacts(result.run_id, "segmentation_overlays")]
    assert overlays == ["segmentation_overlays/overlays_epoch001.png", "segmentation_overlays/overlays_epoch002.png"]
