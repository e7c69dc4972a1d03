"""Per-pixel predictions of a segmentation model on test images of any size, and their score.

Two inference modes, as the benchmark code does: ``whole`` runs the image at once (padded to
a multiple of the deepest stride, the padding cropped off again); ``slide`` runs crop-size
windows ``stride`` apart and averages the logits where windows overlap. Logits are resized
to the stored mask's size before the argmax, so scores are taken at the labels' resolution
whatever ``eval_short_side`` the image was resized to.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from mfm.segment_params import SegmentParams
from mfm.segmentation_metrics import ConfusionMeter

PAD_MULTIPLE = 32  # the pyramid's deepest stride: whole images are padded to a multiple of it


def _pad_to(images: Tensor, height: int, width: int) -> Tensor:
    """Zero-pad (B, C, H, W) at the bottom and right to at least ``height`` x ``width``."""
    return F.pad(
        images, (0, max(0, width - images.shape[-1]), 0, max(0, height - images.shape[-2]))
    )


def whole_logits(model: nn.Module, images: Tensor) -> Tensor:
    """Logits of whole images, padded to a multiple of ``PAD_MULTIPLE`` and cropped back."""
    height, width = images.shape[-2:]
    padded = _pad_to(
        images,
        math.ceil(height / PAD_MULTIPLE) * PAD_MULTIPLE,
        math.ceil(width / PAD_MULTIPLE) * PAD_MULTIPLE,
    )
    return model(padded)[..., :height, :width]


def window_starts(length: int, crop: int, stride: int) -> list[int]:
    """Window offsets along one side: ``stride`` apart, the last one flush with the end."""
    if length <= crop:
        return [0]
    count = math.ceil((length - crop) / stride) + 1
    return [min(i * stride, length - crop) for i in range(count)]


def slide_logits(model: nn.Module, images: Tensor, crop: int, stride: int, classes: int) -> Tensor:
    """Logits averaged over crop-size windows ``stride`` apart (images smaller than the crop
    are padded, the padding cropped off again)."""
    height, width = images.shape[-2:]
    padded = _pad_to(images, crop, crop)
    full_h, full_w = padded.shape[-2:]
    total = padded.new_zeros((images.shape[0], classes, full_h, full_w), dtype=torch.float32)
    count = padded.new_zeros((1, 1, full_h, full_w), dtype=torch.float32)
    for top in window_starts(full_h, crop, stride):
        for left in window_starts(full_w, crop, stride):
            window = padded[..., top : top + crop, left : left + crop]
            total[..., top : top + crop, left : left + crop] += model(window).float()
            count[..., top : top + crop, left : left + crop] += 1
    return (total / count)[..., :height, :width]


def resize_short_side(images: Tensor, short_side: int | None) -> Tensor:
    """Bilinear resize so the shorter side is ``short_side`` (None: unchanged)."""
    if short_side is None or min(images.shape[-2:]) == short_side:
        return images
    scale = short_side / min(images.shape[-2:])
    size = [round(side * scale) for side in images.shape[-2:]]
    return F.interpolate(images, size=size, mode="bilinear", align_corners=False, antialias=True)


def predictor(
    model: nn.Module, cfg: SegmentParams, normalize: nn.Module, classes: int
) -> Callable[[Tensor, tuple[int, int]], Tensor]:
    """uint8 (B, C, H, W) images -> (B, K, h, w) float logits at the labels' size (h, w)."""

    def predict(images: Tensor, label_size: tuple[int, int]) -> Tensor:
        images = resize_short_side(images.float() / 255, cfg.eval_short_side)
        images = normalize(images)
        if cfg.eval_mode == "slide":
            logits = slide_logits(model, images, cfg.crop_size, cfg.slide_stride(), classes)
        else:
            logits = whole_logits(model, images)
        if tuple(logits.shape[-2:]) != tuple(label_size):
            logits = F.interpolate(logits, size=label_size, mode="bilinear", align_corners=False)
        return logits.float()

    return predict


@dataclass
class SegmentationEvaluation:
    """The test set's confusion matrix, its speed and the first images' predictions."""

    confusion: Tensor
    images_per_second: float
    samples: list[tuple[Tensor, Tensor, Tensor]]  # (image uint8, mask, prediction)


@torch.inference_mode()
def evaluate_segmentation(
    model: nn.Module,
    dataset: Dataset,
    cfg: SegmentParams,
    normalize: nn.Module,
    classes: int,
    device: torch.device,
    batch_size: int = 1,
    keep: int = 0,
    workers: int = 0,
) -> SegmentationEvaluation:
    """Score ``model`` on every image of ``dataset`` ((uint8 image, mask) pairs); batches
    larger than one need images of one size. Keeps the first ``keep`` predictions."""
    model.eval()
    predict = predictor(model, cfg, normalize, classes)
    meter = ConfusionMeter(classes).to(device)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers)
    samples: list[tuple[Tensor, Tensor, Tensor]] = []
    images_seen, start = 0, time.perf_counter()
    for images, masks in loader:
        images, masks = images.to(device), masks.to(device)
        preds = predict(images, tuple(masks.shape[-2:])).argmax(dim=1)
        meter.update(preds, masks)
        images_seen += images.shape[0]
        for image, mask, pred in zip(images, masks, preds, strict=True):
            if len(samples) < keep:
                samples.append((image.cpu(), mask.cpu(), pred.cpu()))
    seconds = time.perf_counter() - start
    return SegmentationEvaluation(meter.compute().cpu(), images_seen / max(seconds, 1e-9), samples)
