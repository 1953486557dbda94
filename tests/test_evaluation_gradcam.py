"""Grad-CAM panels on clean and adversarial inputs."""

from __future__ import annotations

import torch
from evaluation_toys import ToyCNN, batches, toy_images
from PIL import Image

from pipeline.evaluation.gradcam import cams, default_target_layer, gradcam_panels, select_cases


def test_panels_have_one_file_per_class_and_the_expected_size(tmp_path):
    torch.manual_seed(0)
    model = ToyCNN(3).eval()
    x, y = toy_images(30, num_classes=3)
    cx, cy = select_cases(batches(x, y, 8), num_classes=3, per_class=2)
    assert cy.tolist() == [0, 0, 1, 1, 2, 2]
    adv = (cx + 0.1 * torch.randn_like(cx)).clamp(0, 1)
    written = gradcam_panels(model, cx, adv, cy, ["a", "b", "c"], tmp_path / "gradcam")
    assert sorted(p.name for p in written) == ["a.png", "b.png", "c.png"]
    for path in written:
        assert Image.open(path).size == (4 * 250, 2 * 250)      # 4 panels of 2.5 in at 100 dpi, 2 cases


def test_cam_maps_are_normalised_and_full_size():
    model = ToyCNN(2).eval()
    assert default_target_layer(model) == "features.2"
    x, _ = toy_images(4)
    maps, preds = cams(model, x)
    assert maps.shape == (4, 8, 8) and preds.shape == (4,)
    assert maps.min() >= 0.0 and maps.max() <= 1.0 + 1e-6
    assert all(p.grad is None for p in model.parameters())    # no parameter gradients left behind
