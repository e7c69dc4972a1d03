"""Segmentation scenes from the prepared classification images (``segment.dataset: scenes``).

A dense-transfer check needs pixel labels, and the small array data sets have none: pasting
a few of their images at random places and scales onto a blank canvas gives a segmentation
task whose labels are exact (an object's pixels are its bright ones) and whose objects the
encoder was pretrained on. Train scenes use training images only and test scenes test
images only, so the test score never rewards memorised pretraining images.

The scenes are written in the generic "folder" layout (:mod:`mfm.data.segmentation_sets`):
``images/{train,test}/00000.png``, ``masks/{train,test}/00000.png`` (0 = background, class
c + 1 for an object of prepared class c) and ``classes.txt``. Image folders work too: their
photos are decoded when drawn and shrunk to objects of the canvas; bright pixels (most of a
photo) make the object, so they segment as overlapping labelled patches.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from mfm.data.meta import PREPARE_HINT, DatasetMeta, Split, load_meta
from mfm.data.prepared import read_manifest
from mfm.errors import UserError
from mfm.io import atomic_dir
from mfm.segment_params import ScenesParams

BACKGROUND = "background"
CLASSES_FILE = "classes.txt"
# Image-folder photos become objects of this fraction of the canvas (28 px garments on 64 px)
FILE_OBJECT_SIDE = 0.45
MAX_PENDING_WRITES = 512  # PNGs drawn but not yet written: bounds memory on big builds
SPLITS: tuple[Split, Split] = ("train", "test")
# Per axis, at most this share of an object may hang off the canvas: 1/sqrt(2) of each side
# inside keeps at least half of the object's area inside.
MAX_OVERHANG = 1.0 - 1.0 / math.sqrt(2.0)


@dataclass(frozen=True)
class SceneObject:
    """One pasted object: its resized pixels (h, w, C), where its top-left corner lands
    (may be negative or past the canvas: clipped) and its scene label (class + 1)."""

    pixels: np.ndarray
    top: int
    left: int
    label: int


def compose_scene(
    size: int, channels: int, objects: Sequence[SceneObject], threshold: int
) -> tuple[np.ndarray, np.ndarray]:
    """The scene image (size, size, C) uint8 and its label map (size, size) uint8.

    Each object covers the canvas only where it is brighter than ``threshold`` (max over
    channels), so a labelled pixel always shows its object; later objects occlude earlier
    ones there.
    """
    image = np.zeros((size, size, channels), dtype=np.uint8)
    labels = np.zeros((size, size), dtype=np.uint8)
    for obj in objects:
        height, width = obj.pixels.shape[:2]
        top, left = max(obj.top, 0), max(obj.left, 0)
        bottom, right = min(obj.top + height, size), min(obj.left + width, size)
        if bottom <= top or right <= left:
            continue
        part = obj.pixels[top - obj.top : bottom - obj.top, left - obj.left : right - obj.left]
        mask = part.max(axis=2) > threshold
        image[top:bottom, left:right][mask] = part[mask]
        labels[top:bottom, left:right][mask] = obj.label
    return image, labels


def _corner(rng: np.random.Generator, side: int, size: int) -> int:
    """A random offset along one axis that keeps >= 1/sqrt(2) of ``side`` on the canvas
    (the whole canvas covered when the object is larger than it)."""
    overhang = int(side * MAX_OVERHANG)
    low, high = -overhang, size - side + overhang
    if high < low:  # larger than the canvas even with the overhang: cover it fully
        low, high = size - side, 0
    return int(rng.integers(low, high + 1))


def _resize(pixels: np.ndarray, factor: float) -> np.ndarray:
    """``pixels`` (H, W, C) uint8 scaled by ``factor`` with Pillow's bilinear filter (which
    widens its support when shrinking, i.e. antialiases)."""
    height, width, channels = pixels.shape
    new_size = (max(1, round(width * factor)), max(1, round(height * factor)))
    image = Image.fromarray(pixels[..., 0] if channels == 1 else pixels)
    resized = np.asarray(image.resize(new_size, Image.Resampling.BILINEAR))
    return resized[..., None] if channels == 1 else resized


def _scene_objects(
    rng: np.random.Generator, images: np.ndarray, labels: np.ndarray, cfg: ScenesParams
) -> list[SceneObject]:
    """One scene's objects: how many, which images, their scales and places."""
    count = int(rng.integers(cfg.objects[0], cfg.objects[1] + 1))
    objects = []
    for _ in range(count):
        index = int(rng.integers(len(images)))
        pixels = _resize(np.asarray(images[index]), float(rng.uniform(*cfg.scale)))
        top = _corner(rng, pixels.shape[0], cfg.size)
        left = _corner(rng, pixels.shape[1], cfg.size)
        objects.append(SceneObject(pixels, top, left, int(labels[index]) + 1))
    return objects


class FileObjects:
    """The images of a manifest split (image folders), decoded when a scene draws one: grey
    or RGB as the prepared data, the longer side scaled to ``side`` (an array data set's
    native size plays that part), so photos become objects of a canvas like garments do."""

    def __init__(self, paths: list[str], channels: int, side: int) -> None:
        self.paths, self.mode, self.side = paths, "L" if channels == 1 else "RGB", side

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> np.ndarray:
        try:
            with Image.open(self.paths[index]) as image:
                image = image.convert(self.mode)
                image.thumbnail((self.side, self.side), Image.Resampling.BILINEAR)
                pixels = np.asarray(image)
        except (OSError, ValueError) as err:
            raise UserError(
                f"{self.paths[index]} is not a readable image ({err.__class__.__name__}); "
                "remove or replace it, then rerun prepare"
            ) from None
        return pixels[..., None] if pixels.ndim == 2 else pixels


def _load_split(
    prepared_dir: Path, split: Split, meta: DatasetMeta, side: int
) -> tuple[np.ndarray | FileObjects, np.ndarray]:
    """A prepared split's images (memory-mapped arrays, or files decoded on demand) and
    labels; an empty split, or labels outside meta.json's classes, mean the prepared data is
    stale or damaged."""
    num_classes = len(meta.classes)
    if meta.kind == "manifest":
        files, targets = read_manifest(prepared_dir / f"{split}.csv", meta.source)
        images: np.ndarray | FileObjects = FileObjects(files, meta.channels, side)
        labels = np.asarray(targets, dtype=np.int64)
        paths = [prepared_dir / f"{split}.csv"]
    else:
        paths = [prepared_dir / f"{split}_{part}.npy" for part in ("images", "labels")]
        for path in paths:
            if not path.is_file():
                raise UserError(f"{path} not found; {PREPARE_HINT}")
        images, labels = np.load(paths[0], mmap_mode="r"), np.load(paths[1])
    if (
        len(images) == 0
        or len(images) != len(labels)
        or not 0 <= labels.min() <= labels.max() < num_classes
    ):
        raise UserError(
            f"{paths[0]} holds {len(images)} images for {len(labels)} labels of "
            f"{num_classes} classes; {PREPARE_HINT.replace('first', 'again')}"
        )
    return images, labels


def _save_png(array: np.ndarray, path: Path) -> None:
    Image.fromarray(array[..., 0] if array.ndim == 3 and array.shape[2] == 1 else array).save(path)


def _write_split(
    rng: np.random.Generator,
    source: tuple[np.ndarray | FileObjects, np.ndarray],
    cfg: ScenesParams,
    channels: int,
    count: int,
    out_dir: Path,
    split: Split,
    num_classes: int,
) -> np.ndarray:
    """Draw ``count`` scenes from ``source`` (images, labels) and write them as ``split``;
    returns the pixel count of each class.

    The draws run in order (determinism); PNG encoding, which releases the GIL, runs on a
    thread pool alongside.
    """
    images, labels = source
    image_dir, mask_dir = out_dir / "images" / split, out_dir / "masks" / split
    image_dir.mkdir(parents=True)
    mask_dir.mkdir(parents=True)
    pixels = np.zeros(num_classes, dtype=np.int64)
    with ThreadPoolExecutor() as pool:
        jobs: deque[Future[None]] = deque()
        for number in range(count):
            objects = _scene_objects(rng, images, labels, cfg)
            image, label_map = compose_scene(cfg.size, channels, objects, cfg.threshold)
            pixels += np.bincount(label_map.ravel(), minlength=num_classes)[:num_classes]
            name = f"{number:05d}.png"
            jobs.append(pool.submit(_save_png, image, image_dir / name))
            jobs.append(pool.submit(_save_png, label_map, mask_dir / name))
            while len(jobs) > MAX_PENDING_WRITES:
                jobs.popleft().result()  # bounds memory; re-raises a failed write here
        for job in jobs:
            job.result()
    return pixels


def build_scenes(prepared_dir: Path, cfg: ScenesParams, seed: int, out_dir: Path) -> dict[str, Any]:
    """Write ``cfg.train`` + ``cfg.test`` scenes into ``out_dir`` (atomically); returns the
    numbers for the metrics JSON.

    Train and test scenes come from two independent streams of ``seed``, so changing the
    number of training scenes leaves the test scenes as they were.
    """
    prepared_dir, out_dir = Path(prepared_dir), Path(out_dir)
    meta = load_meta(prepared_dir)
    classes = [BACKGROUND, *meta.classes]
    if len(classes) > 255:
        raise UserError(
            f"{prepared_dir} has {len(meta.classes)} classes; scene masks are 8-bit with 255 "
            "= ignore, so at most 254: set segment.dataset to folder or ade20k instead"
        )
    streams = np.random.SeedSequence(seed).spawn(2)
    pixels: dict[str, np.ndarray] = {}
    with atomic_dir(out_dir) as tmp:
        for split, count, stream in zip(SPLITS, (cfg.train, cfg.test), streams, strict=True):
            source = _load_split(prepared_dir, split, meta, round(cfg.size * FILE_OBJECT_SIDE))
            rng = np.random.default_rng(stream)
            pixels[split] = _write_split(
                rng, source, cfg, meta.channels, count, tmp, split, len(classes)
            )
        (tmp / CLASSES_FILE).write_text("".join(f"{name}\n" for name in classes))
    fractions = pixels["train"] / pixels["train"].sum()
    return {
        "num_train": cfg.train,
        "num_test": cfg.test,
        "size": cfg.size,
        "num_classes": len(classes),
        "train_pixel_fraction": {
            name: float(fraction) for name, fraction in zip(classes, fractions, strict=True)
        },
    }
