"""mIoU, pixel accuracy and mean class accuracy from a whole-set confusion matrix."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from mfm.errors import UserError
from mfm.segment_params import IGNORE_INDEX
from mfm.segmentation_metrics import ConfusionMeter, segmentation_scores

# Rows = ground truth, columns = prediction.
CONFUSION = np.array(
    [
        [5, 1, 0],
        [2, 3, 1],
        [0, 0, 4],
    ]
)
CLASSES = ["background", "shirt", "shoe"]


def test_scores_of_a_hand_made_confusion() -> None:
    scores = segmentation_scores(CONFUSION, CLASSES)
    # background: TP 5, FP 2 (column), FN 1 (row) -> 5/8; shirt: 3 / (3 + 1 + 3); shoe: 4/5.
    ious = {"background": 100 * 5 / 8, "shirt": 100 * 3 / 7, "shoe": 100 * 4 / 5}
    assert scores["per_class_iou"] == pytest.approx(ious)
    assert scores["miou"] == pytest.approx(sum(ious.values()) / 3)
    assert scores["pixel_accuracy"] == pytest.approx(100 * 12 / 16)
    # Class accuracy: 5/6, 3/6, 4/4.
    assert scores["mean_class_accuracy"] == pytest.approx(100 * (5 / 6 + 3 / 6 + 4 / 4) / 3)


def test_a_class_absent_everywhere_has_no_iou_and_no_weight() -> None:
    confusion = np.zeros((4, 4), dtype=np.int64)
    confusion[:3, :3] = CONFUSION
    scores = segmentation_scores(confusion, [*CLASSES, "bag"])
    assert scores["per_class_iou"]["bag"] is None
    reference = segmentation_scores(CONFUSION, CLASSES)
    for key in ("miou", "pixel_accuracy", "mean_class_accuracy"):
        assert scores[key] == pytest.approx(reference[key])
    json.dumps(scores, allow_nan=False)  # what the stage writes must be valid JSON


def test_a_class_only_predicted_counts_in_miou_but_not_in_class_accuracy() -> None:
    confusion = np.zeros((4, 4), dtype=np.int64)
    confusion[:3, :3] = CONFUSION
    confusion[0, 3] = 2  # two background pixels called "bag": bag's IoU is 0, not undefined
    scores = segmentation_scores(confusion, [*CLASSES, "bag"])
    assert scores["per_class_iou"]["bag"] == 0.0
    ious = [100 * 5 / 10, 100 * 3 / 7, 100 * 4 / 5, 0.0]
    assert scores["miou"] == pytest.approx(sum(ious) / 4)
    assert scores["mean_class_accuracy"] == pytest.approx(100 * (5 / 8 + 3 / 6 + 4 / 4) / 3)


def test_no_labelled_pixels_is_a_user_error() -> None:
    with pytest.raises(UserError, match="no labelled pixels"):
        segmentation_scores(np.zeros((3, 3), dtype=np.int64), CLASSES)


def _hand_confusion(preds: torch.Tensor, target: torch.Tensor, classes: int) -> np.ndarray:
    keep = target != IGNORE_INDEX
    confusion = np.zeros((classes, classes), dtype=np.int64)
    np.add.at(confusion, (target[keep].numpy(), preds[keep].numpy()), 1)
    return confusion


def test_ignored_pixels_count_nowhere() -> None:
    generator = torch.Generator().manual_seed(0)
    target = torch.randint(0, 3, (2, 5, 7), generator=generator)
    preds = torch.randint(0, 3, (2, 5, 7), generator=generator)
    target[0, :2] = IGNORE_INDEX
    target[1, :, 3] = IGNORE_INDEX
    meter = ConfusionMeter(3)
    meter.update(preds, target)
    confusion = meter.compute()
    assert confusion.sum() == int((target != IGNORE_INDEX).sum())
    np.testing.assert_array_equal(confusion, _hand_confusion(preds, target, 3))


def test_logits_count_as_their_argmax() -> None:
    generator = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 4, 6, 6, generator=generator)
    target = torch.randint(0, 4, (2, 6, 6), generator=generator)
    from_logits, from_preds = ConfusionMeter(4), ConfusionMeter(4)
    from_logits.update(logits, target)
    from_preds.update(logits.argmax(dim=1), target)
    np.testing.assert_array_equal(from_logits.compute(), from_preds.compute())
    np.testing.assert_array_equal(
        from_logits.compute(), _hand_confusion(logits.argmax(dim=1), target, 4)
    )


def test_two_updates_sum_like_one() -> None:
    generator = torch.Generator().manual_seed(2)
    preds = torch.randint(0, 3, (4, 8, 8), generator=generator)
    target = torch.randint(0, 3, (4, 8, 8), generator=generator)
    target[1, 2:5] = IGNORE_INDEX
    split, whole = ConfusionMeter(3), ConfusionMeter(3)
    split.update(preds[:1], target[:1])
    split.update(preds[1:], target[1:])
    whole.update(preds, target)
    np.testing.assert_array_equal(split.compute(), whole.compute())
    assert split.compute().sum() == int((target != IGNORE_INDEX).sum())
    split.reset()
    split.update(preds[:1], target[:1])
    assert split.compute().sum() == int((target[:1] != IGNORE_INDEX).sum())


def test_the_meter_feeds_the_scores() -> None:
    target = torch.tensor(CONFUSION).nonzero()  # one (truth, prediction) pair per nonzero cell
    counts = torch.tensor(CONFUSION)[target[:, 0], target[:, 1]]
    truth = target[:, 0].repeat_interleave(counts).reshape(1, 1, -1)
    preds = target[:, 1].repeat_interleave(counts).reshape(1, 1, -1)
    meter = ConfusionMeter(3)
    assert meter.to("cpu") is meter
    meter.update(preds, truth)
    confusion = meter.compute()
    assert confusion.dtype == torch.int64
    np.testing.assert_array_equal(confusion.numpy(), CONFUSION)
    assert segmentation_scores(confusion, CLASSES) == segmentation_scores(CONFUSION, CLASSES)
