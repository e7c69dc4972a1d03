"""Reduced JPEG decoding on the PIL path (``runtime.jpeg_draft``).

libjpeg(-turbo) can decode a JPEG straight to 1/2, 1/4 or 1/8 of its size by scaling its
DCT blocks, much faster than a full decode that the crop's resize then throws away. Pillow
exposes it as ``Image.draft``, which must be asked before the pixels are decoded, so these
transforms receive the opened, not yet decoded image:

- training: the crop box is drawn on the full size with timm's
  ``RandomResizedCropAndInterpolation.get_params`` and the same per-sample-seeded draws as
  the plain path, so both paths crop the same boxes; the file is then decoded at the
  coarsest scale at which the box still spans the output's pixels in both directions, and
  the box, mapped to that scale, is resized to the output (bicubic, as before);
- evaluation: the coarsest scale at which the short side still spans the resize target
  (``img_size / EVAL_CROP_RATIO``); the region the plain path's resize and centre crop keep
  is then resized to the output in one step.

Where no scale applies (a box or image smaller than twice the output, or not a JPEG) the
plain path's operations run on the full decode, so the pixels are identical; where one
does, only the decoder's downscale differs (a few grey levels, tested).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Protocol

import torch
from PIL import Image
from timm.data.transforms import RandomResizedCropAndInterpolation
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import functional as F

Finish = Callable[[Image.Image], torch.Tensor]  # the decoded image -> uint8 (C, H, W)


class Drafting(Protocol):
    """What :class:`mfm.data.datasets.ManifestImages` asks of a reduced-decode transform."""

    def plan(self, image: Image.Image) -> Finish:
        """Called on the opened file before decoding: ask for a reduced decode (``draft``)
        and return what turns the decoded image into the tensor."""
        ...


def draft(image: Image.Image, region: tuple[float, float], target: tuple[int, int]) -> int:
    """Ask Pillow to decode ``image`` (opened, not yet decoded) at the coarsest of 1/2, 1/4
    and 1/8 scale at which a ``region`` (width, height) of the full image still spans
    ``target`` (width, height) pixels. Returns the scale's divisor: 1 where none applies."""
    width, height = image.size
    request = (
        math.ceil(width * target[0] / region[0]),
        math.ceil(height * target[1] / region[1]),
    )
    if request[0] * 2 > width or request[1] * 2 > height:
        return 1  # not even 1/2 keeps the region's pixels: decode in full
    drafted = image.draft(image.mode, request)  # None for formats without DCT scaling
    if drafted is None:
        return 1
    _, box = drafted  # the full image's extent at the reduced scale
    return round(width / box[2])


class DraftTrainCrop:
    """The training crop (bicubic RandomResizedCrop to ``size``) with a reduced decode."""

    def __init__(self, size: int, scale: tuple[float, float], ratio: tuple[float, float]):
        self.size, self.scale, self.ratio = size, tuple(scale), tuple(ratio)

    def plan(self, image: Image.Image) -> Finish:
        """Draw the crop box on ``image``'s full size, ask for the reduced decode, and return
        what crops and resizes the decoded image."""
        top, left, height, width = RandomResizedCropAndInterpolation.get_params(
            image, self.scale, self.ratio
        )
        divisor = draft(image, (width, height), (self.size, self.size))
        if divisor == 1:
            return lambda decoded: F.pil_to_tensor(
                F.resized_crop(
                    decoded, top, left, height, width, [self.size] * 2, InterpolationMode.BICUBIC
                )
            )
        box = tuple(v / divisor for v in (left, top, left + width, top + height))
        return lambda decoded: F.pil_to_tensor(
            decoded.resize((self.size, self.size), Image.Resampling.BICUBIC, box=box)
        )


class DraftEvalResize:
    """The evaluation transform (bicubic resize of the short side to ``resize_to``, centre
    crop of ``size``) with a reduced decode; ``plain`` is that transform itself."""

    def __init__(self, size: int, resize_to: int, plain: Finish):
        self.size, self.resize_to, self.plain = size, resize_to, plain

    def plan(self, image: Image.Image) -> Finish:
        """Ask for the coarsest decode whose short side still spans ``resize_to``; on it, the
        plain path's resize-then-crop becomes one resize of the same region of the image."""
        full = image.size  # before draft() shrinks it
        divisor = draft(image, (min(full), min(full)), (self.resize_to, self.resize_to))
        if divisor == 1:
            return self.plain
        region = centre_crop_region(full, self.resize_to, self.size)
        box = tuple(v / divisor for v in region)
        return lambda decoded: F.pil_to_tensor(
            decoded.resize((self.size, self.size), Image.Resampling.BICUBIC, box=box)
        )


def centre_crop_region(
    size: tuple[int, int], resize_to: int, crop: int
) -> tuple[float, float, float, float]:
    """The (left, top, right, bottom) of a ``size`` (width, height) image that torchvision's
    ``Resize(resize_to)`` (short side) and ``CenterCrop(crop)`` keep, in its own pixels."""
    width, height = size
    short, long = sorted(size)
    resized_long = int(resize_to * long / short)  # as torchvision rounds the long side
    resized = (resize_to, resized_long) if width <= height else (resized_long, resize_to)
    left = int(round((resized[0] - crop) / 2.0))
    top = int(round((resized[1] - crop) / 2.0))
    x_scale, y_scale = width / resized[0], height / resized[1]
    return (left * x_scale, top * y_scale, (left + crop) * x_scale, (top + crop) * y_scale)
