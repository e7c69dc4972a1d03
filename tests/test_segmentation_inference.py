"""Whole-image and sliding-window inference, and scoring at the labels' resolution."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import Dataset

from mfm.segment_params import IGNORE_INDEX, SegmentParams
from mfm.segmentation_inference import (
    evaluate_segmentation,
    resize_short_side,
    slide_logits,
    whole_logits,
    window_starts,
)


class PixelClassifier(nn.Module):
    """A 1x1 conv: each pixel's logits depend on that pixel only, so any tiling of the image
    gives the same logits as the whole image."""

    def __init__(self, channels: int = 1, classes: int = 3) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(channels, classes, kernel_size=1)
        self.calls: list[tuple[int, int]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls.append(tuple(x.shape[-2:]))
        return self.conv(x)


@pytest.mark.parametrize(
    ("length", "crop", "stride", "expected"),
    [
        (512, 512, 341, [0]),
        (300, 512, 341, [0]),  # smaller than a window: padded, one window
        (683, 512, 341, [0, 171]),  # the last window flush with the end
        (1024, 512, 341, [0, 341, 512]),
        (10, 4, 3, [0, 3, 6]),
    ],
)
def test_window_starts_cover_the_side(
    length: int, crop: int, stride: int, expected: list[int]
) -> None:
    starts = window_starts(length, crop, stride)
    assert starts == expected
    covered = set().union(*(range(s, s + min(crop, length)) for s in starts))
    assert covered == set(range(length))


def test_sliding_windows_of_a_local_model_equal_the_whole_image() -> None:
    model = PixelClassifier()
    images = torch.randn(2, 1, 37, 50)
    with torch.no_grad():
        whole = model.conv(images)
        slid = slide_logits(model, images, crop=16, stride=11, classes=3)
        padded = whole_logits(model, images)
    assert slid.shape == whole.shape == padded.shape == (2, 3, 37, 50)
    torch.testing.assert_close(slid, whole)
    torch.testing.assert_close(padded, whole)
    # every slide window is crop-sized; the whole image is padded to a multiple of 32
    assert set(model.calls[:-1]) == {(16, 16)} and model.calls[-1] == (64, 64)


def test_resize_short_side_keeps_the_aspect_ratio() -> None:
    images = torch.rand(1, 3, 40, 100)
    assert resize_short_side(images, 20).shape[-2:] == (20, 50)
    assert resize_short_side(images, None) is images


class Scenes(Dataset):
    """Two 8x8 grey images whose labels are a threshold of the pixel value."""

    def __init__(self) -> None:
        generator = torch.Generator().manual_seed(0)
        self.images = torch.randint(0, 256, (2, 1, 8, 8), dtype=torch.uint8, generator=generator)
        self.masks = (self.images[:, 0] > 127).long()
        self.masks[1, 0, :] = IGNORE_INDEX  # an ignored row counts nowhere

    def __len__(self) -> int:
        return 2

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.images[index], self.masks[index]


class Threshold(nn.Module):
    """Class 1 where the (normalised) pixel is above 0.5: a perfect model for ``Scenes``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([0.5 - x, x - 0.5], dim=1) * 100


@pytest.mark.parametrize("mode", ["whole", "slide"])
def test_evaluation_scores_every_labelled_pixel_once(mode: str) -> None:
    cfg = SegmentParams(crop_size=16, eval_mode=mode, eval_stride=5)
    data = Scenes()
    result = evaluate_segmentation(
        Threshold(), data, cfg, nn.Identity(), 2, torch.device("cpu"), batch_size=2, keep=1
    )
    labelled = data.masks[data.masks != IGNORE_INDEX]
    assert int(result.confusion.sum()) == labelled.numel()  # the ignored row is left out
    assert int(result.confusion.trace()) == labelled.numel()  # all right
    assert result.confusion[1, 1] == int((labelled == 1).sum())
    assert len(result.samples) == 1 and result.samples[0][2].shape == (8, 8)


def test_predictions_are_scored_at_the_labels_size() -> None:
    """Test images resized to eval_short_side are predicted there, then scored at the size
    their masks were stored at."""
    cfg = SegmentParams(crop_size=16, eval_short_side=16)
    result = evaluate_segmentation(
        Threshold(), Scenes(), cfg, nn.Identity(), 2, torch.device("cpu"), batch_size=1, keep=2
    )
    labelled = int((Scenes().masks != IGNORE_INDEX).sum())
    assert int(result.confusion.sum()) == labelled
    assert result.samples[1][2].shape == (8, 8)
