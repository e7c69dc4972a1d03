"""Top-1/top-k accuracy and loss of a classifier: the one evaluation every stage uses.

Fine-tuning scores the test split after every epoch, robustness scores the corrupted copies
of it, and the ImageNet benchmarks score the released sets, slicing the logits to
ImageNet-A's or -R's 200 classes. Hits are counted per batch and summed (timm's ``accuracy``
gives per-batch percentages instead), so a score is exact whatever the batch size.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torch.utils.data import Dataset

from mfm.data.augment import device_augment, normalizer
from mfm.data.loaders import make_loader
from mfm.data.meta import DatasetMeta
from mfm.data.workers import Workers
from mfm.errors import UserError

TOP_K = 5


def topk_hits(logits: Tensor, targets: Tensor, k: int) -> tuple[Tensor, int, int]:
    """(top-1 predictions, how many labels are the top-1, how many are among the top ``k``)."""
    best = logits.topk(k, dim=1).indices
    hits = best == targets[:, None]
    return best[:, 0], int(hits[:, 0].sum()), int(hits.any(dim=1).sum())


@dataclass(frozen=True)
class Evaluation:
    """Counts over a whole data set, with each image's label and top-1 prediction."""

    count: int
    k: int
    correct1: int
    correctk: int
    loss_sum: float
    labels: np.ndarray
    predictions: np.ndarray

    @property
    def top1(self) -> float:
        return 100.0 * self.correct1 / self.count

    @property
    def topk(self) -> float:
        return 100.0 * self.correctk / self.count

    def scores(self) -> dict[str, float]:
        """Top-1 and top-k in percent (``topk`` keyed by its k) and the mean cross-entropy."""
        return {"top1": self.top1, f"top{self.k}": self.topk, "loss": self.loss_sum / self.count}


def _subset_targets(labels: Tensor, columns: Tensor, num_logits: int) -> Tensor:
    """Labels mapped to their positions in ``columns`` (the sliced logits' columns)."""
    lookup = torch.full((num_logits,), -1, dtype=torch.long, device=labels.device)
    lookup[columns] = torch.arange(len(columns), device=labels.device)
    targets = lookup[labels]
    if (targets < 0).any():
        raise UserError(
            "an image's class is outside the class subset the logits are sliced to; check "
            "that the images belong to the benchmark"
        )
    return targets


@torch.inference_mode()
def evaluate_batches(
    forward: Callable[[Tensor], Tensor],
    batches: Iterable[tuple[Tensor, Tensor]],
    device: torch.device | str,
    k: int = TOP_K,
    class_subset: Sequence[int] | None = None,
) -> Evaluation:
    """Score the logits ``forward`` gives for each batch of (images, labels).

    With ``class_subset`` (ascending class indices) only those logits compete, and the
    predictions are mapped back to the full indices. ``k`` is capped at the classes that
    compete.
    """
    columns = None if class_subset is None else torch.as_tensor(list(class_subset), device=device)
    count = correct1 = correctk = 0
    loss_sum, labels_all, preds_all = 0.0, [], []
    for images, labels in batches:
        logits = forward(images.to(device)).float()
        targets = labels.to(device).long()
        if columns is not None:
            targets = _subset_targets(targets, columns, logits.shape[1])
            logits = logits[:, columns]
        k = min(k, logits.shape[1])
        preds, hits1, hitsk = topk_hits(logits, targets, k)
        loss_sum += F.cross_entropy(logits, targets, reduction="sum").item()
        correct1, correctk, count = correct1 + hits1, correctk + hitsk, count + len(targets)
        labels_all.append(labels.numpy(force=True))
        preds_all.append((preds if columns is None else columns[preds]).numpy(force=True))
    if count == 0:
        raise UserError("no images to evaluate; check the test split (rerun prepare) or the root")
    return Evaluation(
        count,
        k,
        correct1,
        correctk,
        loss_sum,
        np.concatenate(labels_all),
        np.concatenate(preds_all),
    )


def evaluate(
    model: nn.Module,
    dataset: Dataset,
    meta: DatasetMeta,
    img_size: int,
    batch_size: int,
    device: torch.device,
    workers: Workers = 0,
) -> tuple[dict[str, float], np.ndarray, np.ndarray]:
    """Top-1/top-5 (percent) and mean cross-entropy of ``model`` on ``dataset`` (uint8
    images, preprocessed as at test time); also the labels and top-1 predictions."""
    prepare = nn.Sequential(device_augment(meta, img_size, train=False), normalizer(meta))
    prepare = prepare.to(device)
    model.eval()
    loader = make_loader(dataset, batch_size, False, 0, workers, drop_last=False)
    result = evaluate_batches(lambda images: model(prepare(images)), loader, device)
    return result.scores(), result.labels, result.predictions
