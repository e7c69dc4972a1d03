"""The corrupted test set on disk: its file layout and reading it back, checked.

The ``corrupt`` stage writes it (:mod:`mfm.corrupt`), the ``robustness`` stage reads it. Kept
apart from the writer so the reader needs neither the corruption library nor its worker pool,
and free of torch like the writer, whose worker processes import it.

Layout of the folder: ``<corruption>.npy`` of shape (S * N, H, W, C) uint8, the N test images
(arrays at their stored size, image folders as ``data.img_size`` evaluation crops)
repeated for every severity in ascending blocks of N; ``clean.npy`` (N, H, W, C) uint8, the
same N images uncorrupted; ``labels.npy`` (N,) int64; ``info.json``.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mfm.errors import UserError
from mfm.paths import CORRUPTED_DIR

INFO_FILE = "info.json"
LABELS_FILE = "labels.npy"
CLEAN_FILE = "clean.npy"  # the uncorrupted images, so clean error uses the very same subset
REBUILD_HINT = "run `dvc repro corrupt` (or python -m mfm corrupt)"


@dataclass(frozen=True)
class CorruptedSet:
    """The stage's output, read back: ``images(name, severity)`` is an (N, H, W, C) view."""

    info: dict[str, Any]
    labels: np.ndarray
    clean: np.ndarray
    arrays: dict[str, np.ndarray]

    def images(self, name: str, severity: int) -> np.ndarray:
        """The N images of one corruption at one severity (memory-mapped)."""
        if name not in self.arrays or severity not in self.info["severities"]:
            raise KeyError(f"no {name!r} at severity {severity} in this set")
        block = self.info["severities"].index(severity)
        num = self.info["num_images"]
        return self.arrays[name][block * num : (block + 1) * num]

    def items(self) -> Iterator[tuple[str, int, np.ndarray]]:
        """Every (corruption, severity, images), corruptions in mCE order."""
        for name in self.info["corruptions"]:
            for severity in self.info["severities"]:
                yield name, severity, self.images(name, severity)


def _read_info(out_dir: Path) -> dict[str, Any]:
    """``info.json`` with the keys a reader needs."""
    path = out_dir / INFO_FILE
    info = json.loads(path.read_text())
    keys = ("corruptions", "severities", "num_images", "image_size", "channels")
    if not isinstance(info, dict) or any(key not in info for key in keys):
        raise ValueError(f"{path} lacks one of {keys}")
    return info


def _read_checked(path: Path, shape: tuple[int, ...], dtype: Any) -> np.ndarray:
    """Memory-map ``path`` and insist on the shape and dtype ``info.json`` promises."""
    array = np.load(path, mmap_mode="r")
    if array.shape != shape or array.dtype != dtype:
        raise ValueError(f"{path.name} is {array.shape} {array.dtype}, expected {shape}")
    return array


def _read_set(out_dir: Path) -> CorruptedSet:
    """Every file of the set, checked against ``info.json``."""
    info = _read_info(out_dir)
    num = info["num_images"]
    shape = (len(info["severities"]) * num, *info["image_size"], info["channels"])
    labels = _read_checked(out_dir / LABELS_FILE, (num,), np.int64)
    clean = _read_checked(
        out_dir / CLEAN_FILE, (num, *info["image_size"], info["channels"]), np.uint8
    )
    arrays = {
        name: _read_checked(out_dir / f"{name}.npy", shape, np.uint8)
        for name in info["corruptions"]
    }
    return CorruptedSet(info, np.asarray(labels), clean, arrays)


def check_crop_size(corrupted: CorruptedSet, img_size: int, out_dir: str | Path) -> None:
    """An image folder's set holds evaluation's ``data.img_size`` crops, which robustness
    does not resize again: refuse one cut at another size (params changed since corrupt)."""
    height, width = corrupted.info["image_size"]
    if (height, width) != (img_size, img_size):
        raise UserError(
            f"{out_dir} holds {height}x{width} crops but data.img_size is {img_size}; "
            f"{REBUILD_HINT} again"
        )


def load_corrupted(out_dir: str | Path = CORRUPTED_DIR) -> CorruptedSet:
    """The corrupted test set, or a ``UserError`` saying how to rebuild a missing/damaged one."""
    out_dir = Path(out_dir)
    if not (out_dir / INFO_FILE).is_file():
        raise UserError(f"{out_dir / INFO_FILE} not found; {REBUILD_HINT} first")
    try:
        return _read_set(out_dir)
    except (OSError, ValueError, TypeError, KeyError) as err:
        raise UserError(
            f"{out_dir} is damaged ({err.__class__.__name__}: {err}); {REBUILD_HINT} again"
        ) from None
