"""The prepared splits as torch Datasets of (uint8 (C, H, W), label).

Workers only decode and, for image folders, crop to a fixed uint8 size; the float conversion
and the batched augmentations run on the training device (:mod:`mfm.data.augment`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch.utils.data import Dataset

from mfm.config import CropScale, PretrainParams
from mfm.data.meta import PREPARE_HINT, Split, load_meta
from mfm.data.prepared import read_manifest
from mfm.errors import UserError

if TYPE_CHECKING:
    from mfm.data.jpeg_draft import Drafting

CROP_RATIO = (3 / 4, 4 / 3)  # RandomResizedCrop's aspect-ratio range (timm's and torchvision's)
EVAL_CROP_RATIO = 0.875  # evaluation resizes to img_size / 0.875, then centre-crops img_size
# The pretraining recipe's crop area range (its params default), for callers that give none.
PRETRAIN_CROP_SCALE: CropScale = PretrainParams.model_fields["crop_scale"].default


class ArrayImages(Dataset):
    """Images from a prepared ``.npy`` (memory-mapped, so workers share the page cache)."""

    def __init__(self, images_path: str | Path, labels_path: str | Path) -> None:
        self.images_path = Path(images_path)
        for path in (self.images_path, Path(labels_path)):
            if not path.is_file():
                raise UserError(f"{path} not found; {PREPARE_HINT}")
        self.labels = np.load(labels_path).astype(np.int64)
        self._images: np.ndarray | None = None
        length = len(self._open())
        if length != len(self.labels):
            raise UserError(
                f"{self.images_path} has {length} images for {len(self.labels)} labels; "
                f"{PREPARE_HINT.replace('first', 'again')}"
            )

    def _open(self) -> np.ndarray:
        """The memory map, opened lazily so a pickled dataset (spawned worker) reopens it."""
        if self._images is None:
            self._images = np.load(self.images_path, mmap_mode="r")
        return self._images

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_images": None}

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image = np.array(self._open()[index].transpose(2, 0, 1))  # copy out of the map, CHW
        return torch.from_numpy(image), int(self.labels[index])


class ImageReadError(UserError):
    """An image file Pillow cannot decode (the message names it and the fix).

    A DataLoader worker's exception is re-raised in the main process as the same type, built
    from "Caught ... Original Traceback ...": keep only the original message, so the CLI
    still prints one line.
    """

    def __init__(self, message: str) -> None:
        tag = f"{type(self).__module__}.{type(self).__qualname__}: "
        if "Original Traceback" in message and tag in message:
            message = message.rpartition(tag)[2].strip()
        super().__init__(message)


class ManifestImages(Dataset):
    """Image files listed in a manifest, decoded with PIL and cropped to a fixed uint8 size."""

    def __init__(
        self,
        paths: Sequence[str],
        labels: Sequence[int],
        transform: Callable[[Any], torch.Tensor],
        channels: int = 3,
        draft: Drafting | None = None,
    ) -> None:
        if len(paths) != len(labels):
            raise ValueError("paths and labels differ in length")
        self.paths = list(paths)
        self.labels = list(labels)
        self.transform = transform
        self.draft = draft  # reduced JPEG decoding, planned on the opened file (jpeg_draft)
        self.mode = "L" if channels == 1 else "RGB"

    def __len__(self) -> int:
        return len(self.paths)

    def _decode(self, path: str) -> tuple[Any, Callable[[Any], torch.Tensor]]:
        """Open and decode one image (at a reduced scale where ``draft`` plans one), with
        what turns it into the tensor; a bad file is the user's to fix, so say which."""
        from PIL import Image

        try:
            with Image.open(path) as image:
                finish = self.transform if self.draft is None else self.draft.plan(image)
                return image.convert(self.mode), finish
        except (OSError, ValueError, Image.DecompressionBombError) as err:
            raise ImageReadError(
                f"cannot read image {path} ({err.__class__.__name__}); remove or replace it, "
                "then rerun prepare"
            ) from None

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image, finish = self._decode(self.paths[index])
        return finish(image), self.labels[index]


def image_transform(
    img_size: int, train: bool, crop_scale: CropScale = PRETRAIN_CROP_SCALE
) -> Callable[[Any], torch.Tensor]:
    """Per-image PIL -> uint8 (C, size, size), from timm's transform factory.

    Train: bicubic RandomResizedCrop to ``img_size`` over ``crop_scale`` (the flip happens on
    the device, batched). Eval: bicubic resize of the short side to ``img_size /
    EVAL_CROP_RATIO``, then a centre crop. With ``use_prefetcher`` and no flip, jitter or
    auto-augment, timm builds exactly these steps plus a uint8 ``pil_to_tensor``; its crop
    draws from Python's ``random``, which the loaders seed per sample.
    """
    from timm.data.transforms_factory import transforms_imagenet_eval, transforms_imagenet_train

    if train:
        return transforms_imagenet_train(
            img_size,
            scale=tuple(crop_scale),
            ratio=CROP_RATIO,
            hflip=0.0,
            color_jitter=None,  # None leaves colour jitter out (0 would add an identity step)
            interpolation="bicubic",
            use_prefetcher=True,
        )
    return transforms_imagenet_eval(
        img_size, crop_pct=EVAL_CROP_RATIO, interpolation="bicubic", use_prefetcher=True
    )


def image_dataset(
    prepared_dir: str | Path,
    split: Split,
    img_size: int,
    train: bool,
    crop_scale: CropScale = PRETRAIN_CROP_SCALE,
    decode_on_device: bool = False,
    jpeg_draft: bool = False,
) -> Dataset:
    """The prepared ``split`` as a Dataset of (uint8 (C, H, W), label); with
    ``decode_on_device``, training images of a manifest come as (file bytes, crop box, label)
    for ``mfm.data.device_decode``; with ``jpeg_draft``, a manifest's JPEGs are decoded at a
    reduced scale where the crop allows (``mfm.data.jpeg_draft``). Arrays are unaffected."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', not {split!r}")
    prepared_dir = Path(prepared_dir)
    meta = load_meta(prepared_dir)
    if meta.kind == "arrays":
        return ArrayImages(
            prepared_dir / f"{split}_images.npy", prepared_dir / f"{split}_labels.npy"
        )
    paths, labels = read_manifest(prepared_dir / f"{split}.csv", meta.source)
    if decode_on_device and train:
        from mfm.data.device_decode import EncodedCrops

        return EncodedCrops(paths, labels, tuple(crop_scale), CROP_RATIO)
    transform = image_transform(img_size, train, crop_scale)
    draft = drafting(transform, img_size, train, crop_scale) if jpeg_draft else None
    return ManifestImages(paths, labels, transform, meta.channels, draft)


def drafting(
    transform: Callable[[Any], torch.Tensor], img_size: int, train: bool, crop_scale: CropScale
) -> Drafting:
    """The reduced-decode counterpart of :func:`image_transform`'s ``transform``: the same
    crop (train) or resize target (eval), planned on the opened file."""
    from mfm.data.jpeg_draft import DraftEvalResize, DraftTrainCrop

    if train:
        return DraftTrainCrop(img_size, tuple(crop_scale), CROP_RATIO)
    resize = transform.transforms[0].size  # timm's eval Resize of the short side (an int)
    return DraftEvalResize(img_size, resize, transform)
