"""The joint segmentation augmentation: image and mask stay aligned, padding is ignored,
crops are exactly crop_size, flips happen to both, and a per-sample seed replays a crop."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset
from torchvision import tv_tensors
from torchvision.transforms import v2

from mfm.data.loaders import PerSampleSeeded
from mfm.data.segmentation_augment import train_transform
from mfm.seeding import sample_seed, seeded
from mfm.segment_params import IGNORE_INDEX, SegmentParams

BLOCK = 12
CFG = SegmentParams(crop_size=40, resize=(48, 72), scale_range=(0.5, 2.0))
SEEDS = range(40)


def encoded_sample(channels: int = 1) -> tuple[tv_tensors.Image, tv_tensors.Mask]:
    """A 48x72 mask of 12-px blocks labelled 1-5 (no two neighbours alike, left and right
    halves different) and an image whose every pixel is 40 * its label."""
    rng = np.random.default_rng(0)
    grid = np.zeros((4, 6), dtype=np.int64)
    for row in range(4):
        for col in range(6):
            taken = {grid[row - 1, col] if row else 0, grid[row, col - 1] if col else 0}
            grid[row, col] = rng.choice([v for v in range(1, 6) if v not in taken])
    labels = torch.from_numpy(np.kron(grid, np.ones((BLOCK, BLOCK), dtype=np.int64)))
    image = (40 * labels).to(torch.uint8)[None].expand(channels, -1, -1).clone()
    return tv_tensors.Image(image), tv_tensors.Mask(labels)


def interior(mask: torch.Tensor, radius: int = 2) -> torch.Tensor:
    """Pixels whose (2 radius + 1)^2 neighbourhood lies in the crop and holds one label only:
    there the bilinear image and the nearest-neighbour mask must agree exactly."""
    as_float = mask[None, None].float()
    size = 2 * radius + 1
    high = F.max_pool2d(as_float, size, stride=1)
    low = -F.max_pool2d(-as_float, size, stride=1)
    return F.pad(high == low, [radius] * 4)[0, 0]  # unknown neighbourhood near the edges


def run(transform: v2.Transform, seed: int, sample: tuple[Any, Any]) -> tuple[Any, Any]:
    with seeded(seed):
        return transform(*sample)


@pytest.mark.parametrize("channels", [1, 3])
def test_image_and_mask_stay_aligned(channels: int) -> None:
    transform, sample = train_transform(CFG), encoded_sample(channels)
    padded = checked = 0
    for seed in SEEDS:
        image, mask = run(transform, seed, sample)
        assert type(image) is tv_tensors.Image and type(mask) is tv_tensors.Mask
        assert image.dtype == torch.uint8 and mask.dtype == torch.int64
        assert image.shape == (channels, CFG.crop_size, CFG.crop_size)
        assert mask.shape == (CFG.crop_size, CFG.crop_size)
        assert set(mask.unique().tolist()) <= {1, 2, 3, 4, 5, IGNORE_INDEX}  # no interpolation
        pad = mask == IGNORE_INDEX
        assert (image[:, pad] == 0).all()  # padding: image 0 exactly where the mask ignores
        padded += bool(pad.any())
        inside = interior(mask) & ~pad
        assert torch.equal(
            image[:, inside], (40 * mask[inside]).to(torch.uint8).expand(channels, -1)
        )
        checked += int(inside.sum())
    assert 0 < padded < len(SEEDS)  # both small (padded) and large scales were drawn
    assert checked > len(SEEDS) * CFG.crop_size**2 // 3


def test_unscaled_crops_are_pixel_exact() -> None:
    """Without rescaling (jitter factor 1, target = image size) crop, pad and flip must cut
    image and mask at exactly the same pixels: no block edge is blurred to hide behind."""
    cfg = CFG.model_copy(update={"crop_size": 56, "scale_range": (1.0, 1.0)})  # pads height
    transform, sample = train_transform(cfg), encoded_sample()
    for seed in SEEDS:
        image, mask = run(transform, seed, sample)
        expected = torch.where(mask == IGNORE_INDEX, 0, 40 * mask).to(torch.uint8)
        assert torch.equal(image[0], expected)
        assert (mask == IGNORE_INDEX).any()


def test_flips_move_image_and_mask_together() -> None:
    transform, sample = train_transform(CFG), encoded_sample()
    assert isinstance(transform.transforms[-1], v2.RandomHorizontalFlip)
    unflipped = v2.Compose(transform.transforms[:-1])  # same draws, then no flip draw
    flips = 0
    for seed in SEEDS:
        image, mask = run(transform, seed, sample)
        plain_image, plain_mask = run(unflipped, seed, sample)
        if torch.equal(image, plain_image) and torch.equal(mask, plain_mask):
            continue
        assert torch.equal(image, plain_image.flip(-1))
        assert torch.equal(mask, plain_mask.flip(-1))
        flips += 1
    assert 0 < flips < len(SEEDS)


@pytest.mark.parametrize("height, width", [(5, 3), (10, 200), (300, 40), (48, 72)])
def test_output_is_always_the_crop_size(height: int, width: int) -> None:
    transform = train_transform(SegmentParams(crop_size=32, resize=(64, 64)))
    sample = (
        tv_tensors.Image(torch.full((3, height, width), 9, dtype=torch.uint8)),
        tv_tensors.Mask(torch.ones(height, width, dtype=torch.int64)),
    )
    for seed in range(10):
        image, mask = run(transform, seed, sample)
        assert image.shape == (3, 32, 32) and mask.shape == (32, 32)
        assert torch.equal(mask == IGNORE_INDEX, image[0] == 0)


def test_resize_target_is_height_width() -> None:
    """``cfg.resize`` is (h, w): a 20x50 image fits (40, 200) at scale 2 (height-bound)."""
    jitter = train_transform(SegmentParams(resize=(40, 200), scale_range=(1.0, 1.0)))
    image = tv_tensors.Image(torch.zeros(1, 20, 50, dtype=torch.uint8))
    assert jitter.transforms[0](image).shape == (1, 40, 100)


def test_same_seed_same_crop() -> None:
    transform, sample = train_transform(CFG), encoded_sample()
    first = run(transform, sample_seed(0, 0, 7), sample)
    torch.rand(5)  # the global stream moving in between changes nothing
    again = run(transform, sample_seed(0, 0, 7), sample)
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    others = {run(transform, sample_seed(0, 0, i), sample)[1].sum().item() for i in range(8)}
    assert len(others) > 1


class _Augmented(Dataset):
    """The same encoded sample at every index, augmented like a segmentation set."""

    def __init__(self) -> None:
        self.sample, self.transform = encoded_sample(), train_transform(CFG)

    def __len__(self) -> int:
        return 8

    def __getitem__(self, index: int) -> Any:
        return self.transform(*self.sample)


def test_per_sample_seeding_replays_crops() -> None:
    dataset = _Augmented()
    epoch0 = PerSampleSeeded(dataset, seed=0, epoch=0)
    first = [epoch0[i] for i in range(len(dataset))]
    torch.manual_seed(123)
    again = [PerSampleSeeded(dataset, seed=0, epoch=0)[i] for i in reversed(range(8))][::-1]
    for (image, mask), (image2, mask2) in zip(first, again, strict=True):
        assert torch.equal(image, image2) and torch.equal(mask, mask2)
    epoch1 = PerSampleSeeded(dataset, seed=0, epoch=1)
    assert any(not torch.equal(first[i][1], epoch1[i][1]) for i in range(8))
