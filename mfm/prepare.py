"""The ``prepare`` stage: one data set, from wherever it lives, into the prepared format.

Everything is built in a temporary sibling of ``out_dir`` and swapped in at the end, so a
missing data set, a corrupt file or a killed process leaves the previous output untouched.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from mfm.config import Params
from mfm.data.meta import DatasetMeta
from mfm.data.prepared import write_prepared
from mfm.data.sources import load_source
from mfm.data.sources.common import ArrayData, ManifestData, SourceData
from mfm.data.sources.imagefolder import check_images
from mfm.data.subsets import TEST_STREAM, TRAIN_STREAM, subset_indices
from mfm.errors import UserError
from mfm.io import atomic_dir
from mfm.paths import PREPARED_DIR

STATS_CHUNK = 4096  # images per chunk when computing mean/std (bounds memory on CIFAR)


def apply_limits(data: SourceData, params: Params) -> SourceData:
    """Apply ``data.train_limit`` / ``data.test_limit`` (seeded by ``runtime.seed``)."""
    seed = params.runtime.seed
    if isinstance(data, ArrayData):
        train = subset_indices(len(data.train_labels), params.data.train_limit, seed, TRAIN_STREAM)
        test = subset_indices(len(data.test_labels), params.data.test_limit, seed, TEST_STREAM)
        if train is not None:
            data = replace(
                data, train_images=data.train_images[train], train_labels=data.train_labels[train]
            )
        if test is not None:
            data = replace(
                data, test_images=data.test_images[test], test_labels=data.test_labels[test]
            )
        return data
    train = subset_indices(len(data.train), params.data.train_limit, seed, TRAIN_STREAM)
    test = subset_indices(len(data.test), params.data.test_limit, seed, TEST_STREAM)
    if train is not None:
        data = replace(data, train=[data.train[i] for i in train])
    if test is not None:
        data = replace(data, test=[data.test[i] for i in test])
    return data


def channel_stats(images: np.ndarray) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of (N, H, W, C) uint8 images on the [0, 1] scale.

    Sums are accumulated in float64 chunk by chunk so CIFAR-sized arrays never get a full
    float copy.
    """
    channels = images.shape[-1]
    total = np.zeros(channels)
    squares = np.zeros(channels)
    for start in range(0, len(images), STATS_CHUNK):
        chunk = images[start : start + STATS_CHUNK].reshape(-1, channels).astype(np.float64) / 255
        total += chunk.sum(axis=0)
        squares += np.square(chunk).sum(axis=0)
    count = images.size // channels
    mean = total / count
    std = np.sqrt(np.maximum(squares / count - np.square(mean), 0.0))
    return [float(v) for v in mean], [float(v) for v in std]


def build_meta(data: SourceData, dataset: str) -> DatasetMeta:
    """``meta.json`` contents: stats from the (limited) training images, or ImageNet's."""
    if isinstance(data, ArrayData):
        _, height, width, channels = data.train_images.shape
        mean, std = channel_stats(data.train_images)
        image_size: tuple[int, int] | None = (height, width)
        num_train, num_test = len(data.train_labels), len(data.test_labels)
    else:
        channels = data.channels
        mean, std = _manifest_stats(data)
        image_size = None
        num_train, num_test = len(data.train), len(data.test)
    return DatasetMeta(
        dataset=dataset,
        kind=data.kind,
        classes=list(data.classes),
        num_classes=len(data.classes),
        channels=channels,
        image_size=image_size,
        mean=mean,
        std=std,
        num_train=num_train,
        num_test=num_test,
        source=data.source,
    )


def _manifest_stats(data: ManifestData) -> tuple[list[float], list[float]]:
    """ImageNet's statistics for colour folders (reading 1M files for them is not worth it)."""
    if data.channels == 1:
        return [float(np.mean(IMAGENET_DEFAULT_MEAN))], [float(np.mean(IMAGENET_DEFAULT_STD))]
    return list(IMAGENET_DEFAULT_MEAN), list(IMAGENET_DEFAULT_STD)


def _check_not_empty(data: SourceData, dataset: str) -> None:
    """An empty split would only fail later, inside training; say so now."""
    sizes = (
        (len(data.train_labels), len(data.test_labels))
        if isinstance(data, ArrayData)
        else (len(data.train), len(data.test))
    )
    if min(sizes) == 0:
        raise UserError(
            f"{dataset} has {sizes[0]} training and {sizes[1]} test images; "
            "point data.root at a complete copy of the data set"
        )


def _check_labels(data: SourceData, dataset: str) -> None:
    """Labels outside the class list would crash (or silently mislead) a classifier later."""
    if not isinstance(data, ArrayData):
        return  # manifest labels are indices into the class list by construction
    for split, labels in (("train", data.train_labels), ("test", data.test_labels)):
        if len(labels) and (labels.min() < 0 or labels.max() >= len(data.classes)):
            raise UserError(
                f"{dataset} {split} labels span {labels.min()}..{labels.max()} but there are "
                f"{len(data.classes)} classes; the files in {data.source} are damaged, replace them"
            )


def run(params: Params, out_dir: str | Path = PREPARED_DIR) -> dict[str, Any]:
    """Prepare ``params.data.dataset`` into ``out_dir`` atomically; return a metrics dict."""
    dataset = params.data.dataset
    with atomic_dir(out_dir) as tmp:
        data = apply_limits(load_source(params), params)
        _check_not_empty(data, dataset)
        _check_labels(data, dataset)
        if isinstance(data, ManifestData):  # a garbage file would only fail mid-training
            check_images([path for path, _ in data.train + data.test])
        meta = build_meta(data, dataset)
        write_prepared(data, meta, tmp)
    return {
        "dataset": dataset,
        "num_train": meta.num_train,
        "num_test": meta.num_test,
        "num_classes": meta.num_classes,
        "image_size": list(meta.image_size) if meta.image_size else None,
        "channels": meta.channels,
    }
