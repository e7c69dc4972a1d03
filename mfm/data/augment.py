"""Device-side, batched: uint8 batches to float crops, and the per-channel standardisation."""

from __future__ import annotations

import torch
from torch import nn

from mfm.config import CropScale
from mfm.data.datasets import PRETRAIN_CROP_SCALE
from mfm.data.meta import DatasetMeta


class ToUnitFloat(nn.Module):
    """uint8 [0, 255] -> float32 [0, 1] (float input is taken as already scaled)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x if x.is_floating_point() else x.to(torch.float32) / 255


class Clamp01(nn.Module):
    """Bicubic resampling overshoots; keep pixels in [0, 1]."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.clamp(0.0, 1.0)


class ResizeSquare(nn.Module):
    """Bicubic resize of a batch to (size, size); a no-op when it already is that size."""

    def __init__(self, size: int) -> None:
        super().__init__()
        self.size = size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-2:] == (self.size, self.size):
            return x
        return nn.functional.interpolate(
            x, size=(self.size, self.size), mode="bicubic", align_corners=False, antialias=True
        )


def device_augment(
    meta: DatasetMeta, img_size: int, train: bool, crop_scale: CropScale = PRETRAIN_CROP_SCALE
) -> nn.Module:
    """Batched augmentation on the training device: uint8 (B, C, H, W) -> float [0, 1] crops.

    Arrays are stored at native size, so they are cropped (train) or resized (eval) here;
    manifest images arrive already cropped by the workers, so only the flip is left.
    """
    import kornia.augmentation as K

    steps: list[nn.Module] = [ToUnitFloat()]
    if meta.kind == "arrays" and train:
        size = (img_size, img_size)
        crop = K.RandomResizedCrop(size, scale=crop_scale, resample="bicubic")
        steps += [crop, K.RandomHorizontalFlip(), Clamp01()]
    elif meta.kind == "arrays":
        steps += [ResizeSquare(img_size), Clamp01()]
    elif train:
        steps += [K.RandomHorizontalFlip()]
    return nn.Sequential(*steps)


def normalizer(meta: DatasetMeta) -> nn.Module:
    """Per-channel standardisation with the prepared mean/std (applied after corruption)."""
    import kornia.enhance

    return kornia.enhance.Normalize(torch.tensor(meta.mean), torch.tensor(meta.std))
