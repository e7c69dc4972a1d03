"""What every source loader returns: a small data set in memory, or an image-folder manifest."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from mfm.data.meta import Kind

RAW_DIR = Path("data/raw")  # where downloads go (relative to the project root)
REFETCH = "delete it and fetch the data set again"


@dataclass
class ArrayData:
    """A small data set held in memory: images (N, H, W, C) uint8, labels (N,) int64."""

    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    classes: list[str]
    source: str
    kind: Kind = "arrays"


@dataclass
class ManifestData:
    """An image-folder data set as (path, label) lists: the files stay where they are."""

    train: list[tuple[str, int]]
    test: list[tuple[str, int]]
    classes: list[str]
    source: str
    channels: Literal[1, 3] = 3
    kind: Kind = "manifest"


SourceData = ArrayData | ManifestData


def as_images(array: np.ndarray) -> np.ndarray:
    """(N, H, W) grey or (N, H, W, C) -> (N, H, W, C) uint8, the one arrays layout."""
    array = np.asarray(array, dtype=np.uint8)
    return array[..., None] if array.ndim == 3 else array
