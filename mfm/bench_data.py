"""The pretrain stage's input path on an image folder, for ``python -m mfm bench --data DIR``.

:func:`folder_input` scans ``DIR`` as the ``imagefolder`` data set does (``train/<class>/``
images next to ``val/`` or ``test/``; :func:`mfm.data.sources.imagefolder.load_imagefolder`),
writes the manifest and ``meta.json`` prepare would write into a temporary folder and opens
its training split with :func:`mfm.data.datasets.image_dataset`. The benchmark therefore
reads the folder with the pretrain stage's own Dataset for ``runtime.loader`` (``pil``:
Pillow decode and timm's bicubic RandomResizedCrop to ``img_size`` in the workers;
``device``: the workers read the bytes and draw the crop boxes, :func:`decode` decodes on
the training device) and batches with its :func:`mfm.data.loaders.training_loader`
(seeded shuffle, per-sample seeds, ``workers`` processes, pinned memory on CUDA), one fresh
loader per timing, as each pretrain epoch has.

A folder smaller than the batches one timing takes has its file list repeated, so a timing
never crosses an epoch's end (where the stage's loader restarts its workers, a cost that an
ImageNet-sized epoch spreads over thousands of batches); ``repeats`` says how often.
"""

from __future__ import annotations

import math
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from torch.utils.data import Dataset

from mfm.config import Params
from mfm.data.device_decode import batch_collate, batch_images, decodes_on_device
from mfm.data.meta import DatasetMeta
from mfm.errors import UserError

MAKE_HINT = "python -m mfm bench --make-jpeg-folder DIR writes one"
LAYOUT = "train/<class>/<image> and val/<class>/<image> (or test/)"


@dataclass
class FolderInput:
    """The training split of an image folder, as the pretrain stage reads it."""

    root: Path
    dataset: Dataset
    meta: DatasetMeta
    images: int  # distinct training images in the folder
    repeats: int  # how often the file list is repeated in ``dataset``
    on_device: bool  # runtime.loader: device (batches of bytes and crop boxes)
    jpeg_draft: bool  # reduced JPEG decoding on the PIL path (runtime.jpeg_draft)


def check_folder(root: str | Path) -> Path:
    """``root`` resolved, or a one-line UserError naming what is missing and the fix."""
    path = Path(root).expanduser().resolve()
    if not path.is_dir():
        raise UserError(
            f"bench --data {root}: no such folder; pass an image folder laid out as {LAYOUT} "
            f"({MAKE_HINT})"
        )
    missing = [
        name
        for name, found in (
            ("train/", (path / "train").is_dir()),
            ("val/ (or test/)", (path / "val").is_dir() or (path / "test").is_dir()),
        )
        if not found
    ]
    if missing:
        raise UserError(
            f"bench --data {root}: no {' and no '.join(missing)} sub-folder; lay it out as "
            f"{LAYOUT} ({MAKE_HINT})"
        )
    return path


def resolve_workers(workers: int | str) -> int:
    """DataLoader processes for ``workers`` (``auto``: the CPUs this job may use, minus one),
    as the pretrain stage's loader resolves them for an image folder."""
    from mfm.data.workers import resolve_workers as resolve

    return resolve(workers)


def folder_input(
    params: Params, root: str | Path, img_size: int, crop_scale: Any, least_images: int = 0
) -> FolderInput:
    """The folder's training images as ``image_dataset`` serves them to the pretrain stage
    (for ``params.runtime.loader``), the file list repeated until it holds at least
    ``least_images``."""
    from mfm.data.datasets import image_dataset
    from mfm.data.prepared import write_prepared
    from mfm.data.sources.common import ManifestData
    from mfm.data.sources.imagefolder import load_imagefolder
    from mfm.prepare import build_meta

    path = check_folder(root)
    scan = params.model_copy(update={"data": params.data.model_copy(update={"root": str(path)})})
    try:
        found = load_imagefolder(scan)
    except UserError as err:  # an empty or mismatched class folder, named in the message
        raise UserError(f"bench --data {root}: {err}") from None
    assert isinstance(found, ManifestData)
    if not found.train:
        raise UserError(f"bench --data {root}: no training images in {path / 'train'}; add some")
    images = len(found.train)
    repeats = max(1, math.ceil(least_images / images))
    data = replace(found, train=found.train * repeats)
    meta = build_meta(data, "imagefolder")
    on_device = decodes_on_device(params.runtime.loader, meta.kind)  # as pretrain decides
    with tempfile.TemporaryDirectory(prefix="mfm-bench-") as prepared:
        write_prepared(data, meta, prepared)
        dataset = image_dataset(
            prepared, "train", img_size, True, crop_scale, on_device, params.runtime.jpeg_draft
        )
    jpeg_draft = getattr(dataset, "draft", None) is not None
    return FolderInput(path, dataset, meta, images, repeats, on_device, jpeg_draft)


def batches(
    source: FolderInput, batch_size: int, seed: int, workers: int, epoch: int
) -> Iterator[Any]:
    """One epoch of the pretrain stage's batches (its ``training_loader``), started."""
    from mfm.data.loaders import training_loader

    collate = batch_collate(source.on_device)
    loader = training_loader(source.dataset, batch_size, seed, workers, epoch, collate=collate)
    return iter(loader)


def images_of(source: FolderInput, batch: Any, img_size: int, device: Any) -> Any:
    """A batch as uint8 (B, C, img_size, img_size) on ``device``, as the pretrain step gets
    it: moved there, or (``runtime.loader: device``) decoded and cropped there."""
    return batch_images(batch, source.on_device, img_size, source.meta.channels, device)
