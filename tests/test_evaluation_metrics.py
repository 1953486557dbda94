"""Evaluation metrics against values computed by hand."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.evaluation.curves import normalised_auc
from pipeline.dice import PooledDice, dice_per_image
from pipeline.evaluation.metrics import classification_metrics, macro_auc


def one_hot_probs(preds, num_classes):
    probs = np.full((len(preds), num_classes), 0.1 / max(1, num_classes - 1))
    probs[np.arange(len(preds)), preds] = 0.9
    return probs


def test_balanced_accuracy_on_a_constructed_confusion():
    # 8 samples of class 0, all right; 2 of class 1, one right: accuracy 9/10, balanced (1 + 1/2) / 2
    labels = np.array([0] * 8 + [1] * 2)
    preds = np.array([0] * 8 + [1, 0])
    m = classification_metrics(one_hot_probs(preds, 2), labels, ["nevus", "melanoma"])
    assert m["accuracy"] == pytest.approx(0.9)
    assert m["balanced_accuracy"] == pytest.approx(0.75)
    assert m["recall/nevus"] == pytest.approx(1.0)
    assert m["recall/melanoma"] == pytest.approx(0.5)


def test_auc_is_one_when_classes_are_separable():
    labels = np.array([0, 0, 1, 1, 2, 2])
    probs = np.eye(3)[labels] * 0.8 + 0.2 / 3
    assert classification_metrics(probs, labels)["auc_macro"] == pytest.approx(1.0)
    assert classification_metrics(probs, labels)["mean_ap"] == pytest.approx(1.0)


def test_auc_and_average_precision_by_hand():
    labels = np.array([0, 0, 1, 1])
    p1 = np.array([0.1, 0.4, 0.35, 0.8])
    probs = np.stack([1 - p1, p1], axis=1)
    # positives (0.35, 0.8) vs negatives (0.1, 0.4): 3 of 4 pairs ordered -> 0.75, for both classes
    assert macro_auc(probs, labels) == pytest.approx(0.75)
    labels = np.array([0, 1, 1])
    p1 = np.array([0.9, 0.8, 0.7])
    probs = np.stack([1 - p1, p1], axis=1)
    # class 1 ranked neg, pos, pos: AP = (1/2 + 2/3) / 2; class 0 (score 1 - p) ranked last: AP = 1/3
    expected = ((1 / 2 + 2 / 3) / 2 + 1 / 3) / 2
    assert classification_metrics(probs, labels)["mean_ap"] == pytest.approx(expected)


def test_a_class_absent_from_the_split_is_left_out_of_macro_scores():
    labels = np.array([0, 0, 1, 1])           # class 2 of 3 never occurs
    p = np.array([[0.7, 0.2, 0.1], [0.3, 0.6, 0.1], [0.2, 0.7, 0.1], [0.1, 0.8, 0.1]])
    m = classification_metrics(p, labels, ["a", "b", "c"])
    assert np.isfinite(m["auc_macro"]) and np.isfinite(m["mean_ap"])
    # class a: positives (0.7, 0.3) vs negatives (0.2, 0.1) -> 1.0; class b: (0.7, 0.8) vs (0.2, 0.6) -> 1.0
    assert m["auc_macro"] == pytest.approx(1.0)
    assert "recall/c" not in m and m["recall/a"] == pytest.approx(0.5)
    assert m["balanced_accuracy"] == pytest.approx((0.5 + 1.0) / 2)


def test_dice_per_image_and_pooled():
    label = torch.zeros(2, 1, 4, 4, dtype=torch.long)
    pred = torch.zeros(2, 1, 4, 4, dtype=torch.long)
    label[0, 0, 0, :2] = 1                     # image 0: 2 label voxels, 2 predicted, 1 shared -> 0.5
    pred[0, 0, 0, 1:3] = 1
    label[1, 0, 1:3, 0:3] = 1                  # image 1: 6 and 6, all shared -> 1.0
    pred[1, 0, 1:3, 0:3] = 1
    logits = torch.nn.functional.one_hot(pred[:, 0], 2).movedim(-1, 1).float()
    per_image = dice_per_image(logits, label, 2)
    torch.testing.assert_close(per_image, torch.tensor([0.5, 1.0]))
    pooled = PooledDice(2)
    pooled.update(logits[:1], label[:1])
    pooled.update(logits[1:], label[1:])
    assert pooled.value() == pytest.approx(2 * 7 / (8 + 8))   # differs from the per-image mean 0.75


def test_dice_of_an_empty_mask_predicted_empty_is_one():
    label = torch.zeros(1, 1, 3, 3, dtype=torch.long)
    logits = torch.zeros(1, 2, 3, 3)
    logits[:, 0] = 1.0
    assert float(dice_per_image(logits, label, 2)[0]) == pytest.approx(1.0)


def test_normalised_auc_on_known_curves():
    # linear drop from 1 at eps 0 to 0 at eps 2: area 1, range 2 -> 0.5 (order of points does not matter)
    assert normalised_auc([2.0, 0.0, 1.0], [0.0, 1.0, 0.5]) == pytest.approx(0.5)
    # a flat curve keeps its value
    assert normalised_auc([0, 0.25, 0.5, 1.0], [0.8] * 4) == pytest.approx(0.8)
    # uneven spacing: trapezoids 0.1 * (1 + 0.6) / 2 + 0.9 * (0.6 + 0.2) / 2 = 0.44 over a range of 1
    assert normalised_auc([0, 0.1, 1.0], [1.0, 0.6, 0.2]) == pytest.approx(0.44)
    assert normalised_auc([0.0], [0.7]) == pytest.approx(0.7)
    with pytest.raises(ValueError):
        normalised_auc([0, 1], [1.0])


def test_dice_matches_monai_compute_dice_per_image_and_pooled():
    """The class-by-class counts give MONAI's ``compute_dice`` (one-hot, ignore_empty=False) per image, with
    classes absent from label, prediction or both, with and without a region of interest, 2D and 3D."""
    import torch.nn.functional as F
    from monai.metrics import compute_dice

    g = torch.Generator().manual_seed(3)
    for spatial in ((9, 11), (5, 6, 7)):
        logits = torch.randn(4, 4, *spatial, generator=g)
        label = torch.randint(0, 3, (4, 1, *spatial), generator=g)   # class 3 never in the label
        logits[1, 2] = -10                                              # image 1 never predicts class 2
        label[2] = 0                                                    # image 2: empty label
        logits[3, 1:] = -10                                             # image 3: predicts background only
        label[3] = 0                                                    #   and has an empty label: Dice 1
        roi = (torch.rand(4, 1, *spatial, generator=g) > 0.3).long()
        for mask in (None, roi):
            keep = torch.ones_like(label) if mask is None else mask
            pred = F.one_hot(logits.argmax(1), 4).movedim(-1, 1) * keep
            true = F.one_hot(label[:, 0], 4).movedim(-1, 1) * keep
            expected = compute_dice(pred, true, include_background=False, ignore_empty=False)
            torch.testing.assert_close(dice_per_image(logits, label, 4, mask), expected.float().mean(dim=1))
            pooled = PooledDice(4)
            pooled.update(logits[:2], label[:2], None if mask is None else mask[:2])
            pooled.update(logits[2:], label[2:], None if mask is None else mask[2:])
            inter = (pred * true)[:, 1:].sum(dim=(0, *range(2, pred.dim())))
            total = (pred + true)[:, 1:].sum(dim=(0, *range(2, pred.dim())))
            assert pooled.value() == pytest.approx(float((2 * inter / total).mean()))
        assert float(dice_per_image(logits, label, 4)[3]) == 1.0


def test_label_map_is_argmax_with_ties_to_the_first_class():
    """Two classes: one comparison; more: max(...).indices. Both equal argmax, ties included (first class)."""
    from pipeline.dice import label_map

    g = torch.Generator().manual_seed(5)
    for classes in (2, 3):
        logits = torch.randn(3, classes, 6, 7, generator=g).round()    # rounded: many exact ties
        logits[0, :, :2] = 0.5                                           # every class tied on two rows
        expected = logits.argmax(dim=1)
        assert torch.equal(label_map(logits).long(), expected)
        assert int((expected[0, :2] == 0).sum()) == 14
    binary = torch.tensor([[[1.0, 2.0, 3.0]], [[0.0, 2.0, 4.0]]]).permute(1, 0, 2)   # (1, 2, 3): z0, z1
    assert label_map(binary).tolist() == [[False, False, True]]
    nan, inf = float("nan"), float("inf")
    odd = torch.tensor([[1.0, nan], [nan, 1.0], [nan, nan], [0.0, -0.0], [inf, inf], [-inf, 0.0]])   # (z0, z1)
    odd = odd.T.reshape(1, 2, 6)
    assert label_map(odd).long().tolist() == odd.argmax(dim=1).tolist() == [[1, 0, 0, 0, 0, 1]]
