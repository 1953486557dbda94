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
    cx, cy, roi = select_cases(batches(x, y, 8), num_classes=3, per_class=2)
    assert cy.tolist() == [0, 0, 1, 1, 2, 2] and roi is None
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


def test_cases_with_a_region_of_interest_are_attacked_inside_it_and_outlined(tmp_path):
    """Data with a ``roi``: the cases keep their own masks, the adversarial version of each differs from it
    inside its mask only (as the attack suite perturbs), and the panels draw the outline."""
    from pipeline.adversarial.tasks import Classification
    from pipeline.config import config_from_dict
    from pipeline.evaluation.run import gradcam_cases

    torch.manual_seed(0)
    model = ToyCNN(3).eval()
    x, y = toy_images(30, num_classes=3)
    roi = torch.zeros(30, 1, *x.shape[2:])
    for i in range(30):
        roi[i, :, i % 4: i % 4 + 4, 1:6] = 1                          # a different box per image
    data = [{"image": x[i:i + 8], "label": y[i:i + 8], "roi": roi[i:i + 8]} for i in range(0, 30, 8)]
    cx, cy, croi = select_cases(data, num_classes=3, per_class=2)
    picked = [int(torch.nonzero((x == c).flatten(1).all(dim=1))[0]) for c in cx]
    assert torch.equal(croi, roi[picked])

    cfg = config_from_dict({"experiment": "gradcam-roi", "task": "classification",
                            "data": {"source": "synthetic", "intensity_range": [0.0, 1.0]},
                            "model": {"name": "small_cnn"},
                            "evaluate": {"norms": ["Linf"], "eps_linf": [0.05, 0.1, 0.2], "steps": 5,
                                         "gradcam_per_class": 2}})
    clean, adv, labels, masks = gradcam_cases(model, data, Classification(), cfg, 3, torch.device("cpu"))
    assert torch.equal(clean, cx) and torch.equal(labels, cy) and torch.equal(masks, croi)
    outside = (masks <= 0).expand_as(clean)
    moved = (adv - clean).abs()
    assert torch.equal(moved[outside], torch.zeros_like(moved[outside])) and float(moved.sum()) > 0
    assert float(moved.flatten(1).amax(dim=1).max()) <= 0.1 + 1e-6      # the middle radius, Linf

    written = gradcam_panels(model, clean, adv, labels, ["a", "b", "c"], tmp_path / "roi", roi=masks)
    assert sorted(p.name for p in written) == ["a.png", "b.png", "c.png"]
    assert Image.open(written[0]).size == (4 * 250, 2 * 250)
    import numpy as np

    def green_pixels(path):                 # the outline's lime in the two image panels (grey images)
        rgb = np.asarray(Image.open(path).convert("RGB")).astype(int)[:, :500]
        return int(((rgb[..., 1] > 180) & (rgb[..., 0] < 80) & (rgb[..., 2] < 80)).sum())

    plain = gradcam_panels(model, clean, adv, labels, ["a", "b", "c"], tmp_path / "plain")
    assert green_pixels(written[0]) > 20 and green_pixels(plain[0]) == 0
