"""Reduced JPEG decoding (runtime.jpeg_draft): the same crops as the plain PIL path, decoded
at 1/2-1/8 scale only where the crop still spans the output's pixels."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import functional as F

from mfm import jpeg_folder
from mfm.data import jpeg_draft
from mfm.data.datasets import ManifestImages, drafting, image_transform
from mfm.data.jpeg_draft import centre_crop_region, draft

SCALE = (0.2, 1.0)


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    """Twelve photo JPEGs with long sides of 200-260 px, from the bench's folder writer."""
    root = tmp_path_factory.mktemp("draft") / "jpegs"
    jpeg_folder.write_jpeg_folder(root, images=12, val_images=1, seed=0, long_side=(200, 260))
    return sorted(str(p) for p in (root / "train").rglob("*.JPEG"))


def _jpeg(path: Path, size: tuple[int, int]) -> Path:
    y, x = np.mgrid[: size[1], : size[0]]
    pixels = np.stack([x * 255 // size[0], y * 255 // size[1], (x + y) % 256], -1)
    Image.fromarray(pixels.astype(np.uint8)).save(path, quality=95)
    return path


@pytest.mark.parametrize(
    ("region", "target", "divisor"),
    [
        ((640, 480), (80, 60), 8),
        ((640, 480), (160, 120), 4),
        ((640, 480), (100, 75), 4),  # 1/8 would leave 80 x 60 < 100 x 75
        ((200, 150), (64, 64), 2),  # the crop's short side limits it
        ((640, 480), (321, 100), 1),  # half the width would not span 321 px
    ],
)
def test_draft_picks_the_coarsest_scale_that_keeps_the_region(tmp_path, region, target, divisor):
    with Image.open(_jpeg(tmp_path / "a.jpg", (640, 480))) as image:
        assert draft(image, region, target) == divisor
        assert image.size == (640 // divisor, 480 // divisor)
        image.load()  # decodes at that scale
        assert image.size == (640 // divisor, 480 // divisor)


def test_draft_leaves_other_formats_alone(tmp_path):
    path = tmp_path / "a.png"
    Image.open(_jpeg(tmp_path / "a.jpg", (640, 480))).save(path)
    with Image.open(path) as image:
        assert draft(image, (640, 480), (80, 60)) == 1 and image.size == (640, 480)


def _items(dataset: ManifestImages, seeds: range) -> list[torch.Tensor]:
    out = []
    for seed in seeds:  # the loaders seed Python's random per sample
        random.seed(seed)
        out.append(dataset[seed % len(dataset)][0])
    return out


def _error(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean absolute difference in grey levels."""
    return (a.float() - b.float()).abs().mean().item()


def _pair(paths: list[str], size: int, train: bool) -> tuple[ManifestImages, ManifestImages]:
    transform = image_transform(size, train, SCALE)
    labels = [0] * len(paths)
    return (
        ManifestImages(paths, labels, transform),
        ManifestImages(paths, labels, transform, draft=drafting(transform, size, train, SCALE)),
    )


@pytest.mark.parametrize("train", [True, False])
def test_identical_where_no_reduced_scale_applies(photos, train):
    plain, drafted = _pair(photos, 160, train)  # no crop spans 2 x 160 px of a 260 px photo
    for a, b in zip(_items(plain, range(24)), _items(drafted, range(24)), strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("train", [True, False])
def test_reduced_decode_keeps_the_crop(photos, train, monkeypatch):
    divisors: list[int] = []

    def counted(*args):
        divisors.append(draft(*args))
        return divisors[-1]

    monkeypatch.setattr(jpeg_draft, "draft", counted)
    plain, drafted = _pair(photos, 24, train)
    seeds = range(24)
    expected, got = _items(plain, seeds), _items(drafted, seeds)
    assert min(divisors) >= 2 and max(divisors) >= 4  # the decoder did scale down
    errors = [_error(a, b) for a, b in zip(expected, got, strict=True)]
    assert max(errors) < 6  # grey levels: the decoder's downscale, not another crop
    if train:  # a box drawn differently (another seed) is far off: the boxes are the same
        other = _items(drafted, range(100, 124))
        moved = [_error(a, b) for a, b in zip(expected, other, strict=True)]
        assert np.mean(moved) > 3 * np.mean(errors)
    assert all(t.shape == (3, 24, 24) and t.dtype == torch.uint8 for t in got)


@pytest.mark.parametrize("size", [(400, 300), (300, 400), (257, 256), (500, 333)])
def test_centre_crop_region_is_the_plain_resize_and_crop(size):
    """Resizing the region in one step matches torchvision's Resize + CenterCrop."""
    rng = np.random.default_rng(0)
    smooth = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
    image = Image.fromarray(smooth).resize(size, Image.Resampling.BICUBIC)
    bicubic = InterpolationMode.BICUBIC
    expected = F.center_crop(F.resize(image, 73, interpolation=bicubic), [64, 64])
    region = centre_crop_region(size, 73, 64)
    got = image.resize((64, 64), Image.Resampling.BICUBIC, box=region)
    diff = np.abs(np.asarray(expected, float) - np.asarray(got, float))
    assert diff.mean() < 1.0
    shifted = tuple(v + 3 for v in region)
    off = np.abs(np.asarray(expected, float) - np.asarray(image.resize((64, 64), box=shifted)))
    assert off.mean() > 2 * diff.mean()


def test_unreadable_jpeg_is_still_one_line(tmp_path):
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(_jpeg(tmp_path / "a.jpg", (640, 480)).read_bytes()[:600])  # truncated
    _, drafted = _pair([str(bad)], 32, True)
    with pytest.raises(Exception, match=r"cannot read image .*bad.jpg .*remove or replace it"):
        drafted[0]


def test_training_stages_read_image_folders_reduced(tmp_path, monkeypatch):
    """pretrain, finetune and linprobe all honour runtime.jpeg_draft."""
    from mfm import finetune, linprobe, prepare, pretrain
    from mfm.config import Params

    photos = tmp_path / "photos"
    jpeg_folder.write_jpeg_folder(photos, images=8, val_images=4, seed=1, long_side=(200, 240))
    settings = {
        "data": {"dataset": "imagefolder", "root": str(photos), "img_size": 16},
        "model": {
            "name": "vit_tiny_patch16_224",
            "patch_size": 8,
            "kwargs": {"depth": 1, "embed_dim": 32, "num_heads": 2},
        },
        "pretrain": {"epochs": 1, "batch_size": 4, "warmup_epochs": 0.0},
        "finetune": {"epochs": 1, "batch_size": 4, "warmup_epochs": 0.0, "mixup": 0.0},
        "linprobe": {"c_grid": [1.0], "knn_k": 2},
        "runtime": {"device": "cpu", "jpeg_draft": True},
    }
    params = Params.model_validate(settings)
    prepare.run(params, tmp_path / "prepared")
    reduced: list[int] = []

    def counted(*args):
        reduced.append(draft(*args))
        return reduced[-1]

    monkeypatch.setattr(jpeg_draft, "draft", counted)
    calls = {}
    pretrain.run(params, tmp_path / "prepared", tmp_path / "pretrain")
    calls["pretrain"], reduced[:] = [d for d in reduced if d > 1], []
    finetune.run(params, "mfm", tmp_path / "prepared", tmp_path / "pretrain", tmp_path / "ft")
    calls["finetune"], reduced[:] = [d for d in reduced if d > 1], []
    linprobe.run(params, tmp_path / "prepared", tmp_path / "pretrain")
    calls["linprobe"] = [d for d in reduced if d > 1]
    assert all(len(found) >= 8 for found in calls.values()), calls  # >= one pass over train/
