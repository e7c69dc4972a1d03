"""The clean images the ``corrupt`` stage corrupts: a seeded subset of the prepared test split.

Arrays are taken as stored (robustness resizes them on the device, as evaluation does). Image
folders are decoded, resized and centre-cropped to ``data.img_size`` by the very Dataset that
evaluation reads (:func:`mfm.data.datasets.image_dataset`), so the stored crops are the pixels
a classifier sees at test time and robustness only has to turn them into floats. Both kinds
keep the same images for a seed (:func:`mfm.data.subsets.subset_indices`, ``CORRUPT_STREAM``).

Nothing heavy at the top, like :mod:`mfm.corrupt`: torch comes with the data layer, imported
where an image folder is decoded.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from tqdm import tqdm

from mfm.config import Params
from mfm.data.meta import PREPARE_HINT, DatasetMeta, load_meta
from mfm.data.subsets import CORRUPT_STREAM, subset_indices
from mfm.errors import UserError

DECODE_BATCH = 64  # images per decoding batch (and per DataLoader worker task)


def images_to_corrupt(
    params: Params, prepared_dir: str | Path, workers: int
) -> tuple[np.ndarray, np.ndarray]:
    """(N, H, W, C) uint8 images and (N,) int64 labels of the subset to corrupt, in memory.

    ``workers`` processes decode an image folder (one or fewer: in this process); the crops
    do not depend on it, since evaluation's transform draws nothing.
    """
    prepared_dir = Path(prepared_dir)
    meta = load_meta(prepared_dir, params.data.dataset)
    limit, seed = params.robustness.num_images, params.runtime.seed
    if meta.kind == "arrays":
        return _array_subset(prepared_dir, limit, seed)
    return _folder_subset(prepared_dir, meta, params.data.img_size, limit, seed, workers)


def _array_subset(
    prepared_dir: Path, limit: int | None, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """The seeded subset of the prepared test arrays (sorted indices), or all of them."""
    try:
        images = np.load(prepared_dir / "test_images.npy", mmap_mode="r")
        labels = np.load(prepared_dir / "test_labels.npy").astype(np.int64)
    except (OSError, ValueError) as err:
        raise UserError(
            f"{prepared_dir} test arrays are missing or damaged ({err.__class__.__name__}); "
            f"{PREPARE_HINT.replace('first', 'again')}"
        ) from None
    keep = subset_indices(len(labels), limit, seed, CORRUPT_STREAM)
    if keep is None:
        return np.ascontiguousarray(images), labels
    return np.ascontiguousarray(images[keep]), labels[keep]


def _folder_subset(
    prepared_dir: Path,
    meta: DatasetMeta,
    img_size: int,
    limit: int | None,
    seed: int,
    workers: int,
) -> tuple[np.ndarray, np.ndarray]:
    """The seeded subset of the test manifest, decoded into evaluation's uint8 crops.

    A file that no longer decodes stops the stage with one line naming it
    (:class:`mfm.data.datasets.ImageReadError`, also from a DataLoader worker).
    """
    from torch.utils.data import DataLoader, Subset

    from mfm.data.datasets import image_dataset

    dataset = image_dataset(prepared_dir, "test", img_size, train=False)
    keep = subset_indices(len(dataset), limit, seed, CORRUPT_STREAM)
    indices = list(range(len(dataset))) if keep is None else keep.tolist()
    processes = min(workers, -(-len(indices) // DECODE_BATCH))  # no more than batches
    loader = DataLoader(
        Subset(dataset, indices),
        batch_size=DECODE_BATCH,
        num_workers=processes if processes > 1 else 0,
    )
    images = np.empty((len(indices), img_size, img_size, meta.channels), np.uint8)
    labels = np.empty(len(indices), np.int64)
    start = 0
    for crops, targets in tqdm(loader, desc="decode", unit="batch", disable=None):
        stop = start + len(crops)
        images[start:stop] = crops.permute(0, 2, 3, 1).numpy()
        labels[start:stop] = targets.numpy()
        start = stop
    return images, labels
