"""The one evaluation: exact counts over uneven batches, the loss over the whole set, class
subsets (ImageNet-A/R), the test-time preprocessing and an empty set."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import TensorDataset

from mfm.data.meta import DatasetMeta
from mfm.errors import UserError
from mfm.evaluation import evaluate, evaluate_batches, topk_hits

# Six classes; per image the logits rank its label first, second, ... or last.
LOGITS = torch.tensor(
    [
        [5.0, 4.0, 3.0, 2.0, 1.0, 0.0],
        [5.0, 4.0, 3.0, 2.0, 1.0, 0.0],
        [0.0, 5.0, 4.0, 3.0, 2.0, 1.0],
        [1.0, 0.0, 5.0, 4.0, 3.0, 2.0],
        [2.0, 1.0, 0.0, 5.0, 4.0, 3.0],
        [3.0, 2.0, 1.0, 0.0, 5.0, 4.0],
        [4.0, 3.0, 2.0, 1.0, 0.0, 5.0],
    ]
)
LABELS = torch.tensor([0, 5, 2, 2, 0, 4, 1])  # label ranks: 1, 6, 2, 1, 4, 1, 3


def batches(size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The images are the logits themselves; ``forward`` is the identity."""
    return list(zip(LOGITS.split(size), LABELS.split(size), strict=True))


def test_topk_hits_by_hand() -> None:
    preds, hits1, hits3 = topk_hits(LOGITS, LABELS, 3)
    assert preds.tolist() == [0, 0, 1, 2, 3, 4, 5]
    assert (hits1, hits3) == (3, 5)  # ranks 1; ranks 1 to 3
    assert topk_hits(LOGITS, LABELS, 6)[2] == 7


@pytest.mark.parametrize("batch_size", [1, 3, 7])
def test_scores_do_not_depend_on_the_batching(batch_size: int) -> None:
    result = evaluate_batches(lambda x: x, batches(batch_size), "cpu", k=3)
    assert (result.count, result.correct1, result.correctk) == (7, 3, 5)
    scores = result.scores()
    assert set(scores) == {"top1", "top3", "loss"}
    assert scores["top1"] == pytest.approx(300 / 7) and scores["top3"] == pytest.approx(500 / 7)
    # the mean over images, not the mean of per-batch means
    assert scores["loss"] == pytest.approx(F.cross_entropy(LOGITS, LABELS).item(), rel=1e-6)
    assert result.labels.tolist() == LABELS.tolist()
    assert result.predictions.tolist() == [0, 0, 1, 2, 3, 4, 5]


def test_k_is_capped_at_the_classes_that_compete() -> None:
    result = evaluate_batches(lambda x: x, batches(4), "cpu", k=10)
    assert result.k == 6 and result.correctk == 7 and "top6" in result.scores()


def test_a_class_subset_slices_the_logits_and_maps_predictions_back() -> None:
    subset = [2, 4, 5]  # ascending, as ImageNet-A/R's are
    inside = [i for i, label in enumerate(LABELS.tolist()) if label in subset]  # 1, 2, 3, 5
    data = [(LOGITS[inside], LABELS[inside])]
    result = evaluate_batches(lambda x: x, data, "cpu", k=2, class_subset=subset)
    # among columns 2, 4, 5 only: image 1 -> 2 (label 5: 3rd), image 2 -> 2 (label 2: hit),
    # image 3 -> 2 (label 2: hit), image 5 -> 4 (label 4: hit)
    assert result.predictions.tolist() == [2, 2, 2, 4]
    assert (result.correct1, result.correctk) == (3, 3)
    assert result.labels.tolist() == [5, 2, 2, 4]
    outside = [(LOGITS[:1], LABELS[:1])]  # label 0 is not in the subset
    with pytest.raises(UserError, match="outside the class subset"):
        evaluate_batches(lambda x: x, outside, "cpu", class_subset=subset)


def test_nothing_to_evaluate_is_a_user_error() -> None:
    with pytest.raises(UserError, match="no images to evaluate"):
        evaluate_batches(lambda x: x, [], "cpu")


class MeanBrightness(nn.Module):
    """Class 1 when the (normalised) image is brighter than 0, else class 0."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        brightness = x.mean(dim=(1, 2, 3))
        return torch.stack([-brightness, brightness], dim=1)


def test_evaluate_preprocesses_as_at_test_time() -> None:
    """uint8 images at another size are resized, scaled and normalised before the model."""
    meta = DatasetMeta(
        dataset="toy",
        kind="arrays",
        classes=["dark", "bright"],
        num_classes=2,
        channels=1,
        image_size=(5, 5),
        mean=[0.5],
        std=[0.25],
        num_train=0,
        num_test=4,
        source="toy",
    )
    levels = torch.tensor([10, 100, 160, 250], dtype=torch.uint8)  # 0.5 * 255 = 127.5 splits
    images = levels.view(4, 1, 1, 1).expand(4, 1, 5, 5).contiguous()
    labels = torch.tensor([0, 0, 1, 0])
    scores, actual, predicted = evaluate(
        MeanBrightness(), TensorDataset(images, labels), meta, 8, 3, torch.device("cpu")
    )
    assert predicted.tolist() == [0, 0, 1, 1]
    assert np.array_equal(actual, labels.numpy())
    assert scores["top1"] == pytest.approx(75.0) and scores["top2"] == pytest.approx(100.0)
