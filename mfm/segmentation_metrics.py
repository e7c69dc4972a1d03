"""The segmentation benchmark's numbers: mIoU, pixel accuracy and mean class accuracy.

All of them come from one (K, K) confusion matrix summed over the whole test set (rows =
ground truth, columns = prediction), as mmseg computes them: per-image averages would weight
small images like large ones. torchmetrics keeps the matrix and drops ``IGNORE_INDEX``
pixels itself.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torchmetrics.classification import MulticlassConfusionMatrix

from mfm.errors import UserError
from mfm.segment_params import IGNORE_INDEX


class ConfusionMeter:
    """A running (K, K) confusion matrix over pixels whose label is not ``IGNORE_INDEX``.

    Local to the process that updates it: the stages score the test set on rank 0 alone, so
    ``compute`` must not wait for the other ranks (torchmetrics' default would gather from
    them and deadlock while they wait for rank 0's scores).
    """

    def __init__(self, num_classes: int) -> None:
        self.num_classes = num_classes
        self.metric = MulticlassConfusionMatrix(
            num_classes, ignore_index=IGNORE_INDEX, sync_on_compute=False
        )

    def to(self, device: torch.device | str) -> ConfusionMeter:
        """Keep the counts on the device the predictions are on; returns the meter."""
        self.metric = self.metric.to(device)
        return self

    def update(self, logits_or_preds: torch.Tensor, target: torch.Tensor) -> None:
        """Add a batch: (B, K, H, W) logits or (B, H, W) class ids, and (B, H, W) labels."""
        preds = logits_or_preds
        if preds.ndim == target.ndim + 1:
            preds = preds.argmax(dim=1)  # one map of ids instead of K float maps
        self.metric.update(preds.detach(), target.detach())

    def compute(self) -> torch.Tensor:
        """The (K, K) int64 counts summed over every update (and process), on the CPU;
        ``segmentation_scores`` takes it as it is or as ``.numpy()``."""
        return self.metric.compute().detach().to("cpu", torch.int64)

    def reset(self) -> None:
        self.metric.reset()


def _percent(value: float) -> float | None:
    """A ratio as a 0-100 float, or None where it is undefined (JSON has no NaN)."""
    return None if np.isnan(value) else float(100.0 * value)


def segmentation_scores(confusion: np.ndarray | torch.Tensor, classes: list[str]) -> dict[str, Any]:
    """mIoU, pixel accuracy and mean class accuracy (0-100) and the per-class IoUs.

    A class's IoU is TP / (TP + FP + FN) over the whole set; a class absent from both the
    ground truth and the predictions has none (None) and does not count in the mean. Class
    accuracy (TP / (TP + FN)) is averaged over the classes present in the ground truth.
    """
    confusion = np.asarray(confusion, dtype=np.float64)
    if confusion.shape != (len(classes), len(classes)):
        raise ValueError(f"confusion is {confusion.shape} for {len(classes)} classes")
    labelled = confusion.sum()
    if labelled == 0:
        raise UserError(
            f"the test set has no labelled pixels (all are {IGNORE_INDEX}); "
            "check the test masks and segment.dataset"
        )
    hits = np.diag(confusion)
    truth = confusion.sum(axis=1)
    predicted = confusion.sum(axis=0)
    union = truth + predicted - hits
    with np.errstate(divide="ignore", invalid="ignore"):
        iou = np.where(union > 0, hits / union, np.nan)
        class_accuracy = np.where(truth > 0, hits / truth, np.nan)
    return {
        "miou": _percent(np.nanmean(iou)),
        "pixel_accuracy": _percent(hits.sum() / labelled),
        "mean_class_accuracy": _percent(np.nanmean(class_accuracy)),
        "per_class_iou": {name: _percent(value) for name, value in zip(classes, iou, strict=True)},
    }
