"""Image folders decoded on the training device (``runtime.loader: device``).

With PIL, every worker decodes whole JPEGs and resamples the crop, a few milliseconds per
image per core: a GPU at thousands of images a second needs more cores than a node gives it.
Here the workers only read the file's bytes and draw the crop box (from the header's size,
with the same per-sample-seeded draw as timm's ``RandomResizedCropAndInterpolation`` on the
PIL path, so both paths crop the same boxes); the main process decodes the batch with
torchvision's ``decode_jpeg`` on the training device (nvJPEG on CUDA, libjpeg-turbo on a CPU)
and resizes each crop with antialiased bicubic interpolation. Files that are not JPEGs are
decoded on the CPU and moved. The pixels differ from PIL's bicubic by rounding only.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from timm.data.transforms import RandomResizedCropAndInterpolation
from torch import Tensor
from torch.utils.data import Dataset
from torchvision.io import ImageReadMode, decode_image, decode_jpeg, read_file

from mfm.data.datasets import ImageReadError

JPEG_MAGIC = (0xFF, 0xD8)


def decodes_on_device(loader: str, kind: str) -> bool:
    """Whether ``runtime.loader`` puts decoding on the device for prepared data of ``kind``:
    image folders (manifests) only; arrays are decoded already."""
    return loader == "device" and kind != "arrays"


def batch_collate(on_device: bool) -> Callable[[list[Any]], list[Tensor]] | None:
    """The DataLoader ``collate_fn`` for a loader: encoded batches, or torch's default."""
    return collate_encoded if on_device else None


def batch_images(
    batch: list[Tensor], on_device: bool, size: int, channels: int, device: torch.device
) -> Tensor:
    """A training batch as uint8 (B, C, size, size) on ``device``: moved there, or decoded
    and cropped there."""
    if on_device:
        return decode_crops(*batch[:3], size, channels, device)
    return batch[0].to(device, non_blocking=True)


class EncodedCrops(Dataset):
    """(file bytes, crop box (top, left, height, width), label) per image of a manifest."""

    def __init__(
        self,
        paths: Sequence[str],
        labels: Sequence[int],
        scale: tuple[float, float],
        ratio: tuple[float, float],
    ) -> None:
        self.paths, self.labels = list(paths), list(labels)
        self.scale, self.ratio = tuple(scale), tuple(ratio)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor, int]:
        from PIL import Image

        path = self.paths[index]
        try:
            with Image.open(path) as header:  # the size only: nothing is decoded here
                box = RandomResizedCropAndInterpolation.get_params(header, self.scale, self.ratio)
            data = read_file(path)
        except (OSError, ValueError, Image.DecompressionBombError) as err:
            raise ImageReadError(
                f"cannot read image {path} ({err.__class__.__name__}); remove or replace it, "
                "then rerun prepare"
            ) from None
        return data, torch.tensor(box, dtype=torch.int64), self.labels[index]


def collate_encoded(batch: list[tuple[Tensor, Tensor, int]]) -> list[Tensor]:
    """[boxes (B, 4), all files' bytes end to end, their lengths, labels]: a handful of
    tensors per batch for the workers to hand over (one per file exhausts file handles)."""
    data, boxes, labels = zip(*batch, strict=True)
    lengths = torch.tensor([len(d) for d in data], dtype=torch.int64)
    return [torch.stack(boxes), torch.cat(data), lengths, torch.tensor(labels)]


def decode_crops(
    boxes: Tensor, data: Tensor, lengths: Tensor, size: int, channels: int, device: torch.device
) -> Tensor:
    """The batch as uint8 (B, C, size, size) on ``device``: decoded there, each box cropped
    and resized (bicubic, antialiased), as the PIL path's RandomResizedCrop would."""
    mode = ImageReadMode.GRAY if channels == 1 else ImageReadMode.RGB
    files = list(torch.split(data, lengths.tolist()))
    images: list[Tensor | None] = [None] * len(files)
    jpegs = [i for i, d in enumerate(files) if tuple(d[:2].tolist()) == JPEG_MAGIC]
    if jpegs:
        decoded = decode_jpeg([files[i] for i in jpegs], mode=mode, device=device)
        for i, image in zip(jpegs, decoded, strict=True):
            images[i] = image
    for i, image in enumerate(images):
        if image is None:  # PNG, BMP, ...: the CPU decodes, the device crops
            images[i] = decode_image(files[i], mode=mode).to(device)
    out = torch.empty(len(files), channels, size, size, dtype=torch.uint8, device=device)
    for i, (image, box) in enumerate(zip(images, boxes.tolist(), strict=True)):
        top, left, height, width = box
        crop = image[:, top : top + height, left : left + width].unsqueeze(0).float()
        resized = F.interpolate(crop, size=(size, size), mode="bicubic", antialias=True)
        out[i] = resized[0].round().clamp(0, 255).to(torch.uint8)
    return out
