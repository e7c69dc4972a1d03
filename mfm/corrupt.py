"""The ``corrupt`` stage: an ImageNet-C-style copy of the prepared test split (CIFAR-10-C layout).

The output folder's layout, and reading it back, live in :mod:`mfm.corrupted_set`; which
clean images are corrupted, in :mod:`mfm.clean_subset`: arrays as stored, image folders
(the user's own photos, ImageNet too) as evaluation's ``data.img_size`` centre crops. For
ImageNet the released ImageNet-C JPEGs (``robustness.imagenet_c``) stay the reference that
published numbers use; on-the-fly corruption of the crops does not reproduce them.

Every image is corrupted under its own seed, derived from (runtime.seed, corruption,
severity, image index), so any image can be rebuilt alone and the output is the same
whatever the number of worker processes or the chunking.

Worker processes are started with ``forkserver`` (``spawn`` where that is missing): the
parent has imported torch and may run tqdm's monitor thread, and forking a process with
threads is unsafe. This module therefore imports nothing heavy at the top; the data layer
(torch) comes in through :mod:`mfm.clean_subset`, imported inside :func:`run` only, so
workers start in about a second. As with
any such pool, a script that calls :func:`build` or :func:`run` with several workers needs
an ``if __name__ == "__main__":`` guard (``python -m mfm corrupt`` has one).
"""

from __future__ import annotations

import multiprocessing
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
from PIL import Image
from tqdm import tqdm

from mfm.config import Params
from mfm.corrupted_set import CLEAN_FILE, INFO_FILE, LABELS_FILE
from mfm.data.workers import usable_cpus
from mfm.errors import UserError
from mfm.io import atomic_dir, write_json
from mfm.paths import CORRUPTED_DIR, PREPARED_DIR
from mfm.robustness_metrics import IMAGENET_C_CORRUPTIONS, IMAGENET_C_EXTRAS

# ImageNet-C's 15 mCE corruptions in the paper's order, then the 4 held-out extras.
COMMON_CORRUPTIONS = IMAGENET_C_CORRUPTIONS
EXTRA_CORRUPTIONS = IMAGENET_C_EXTRAS
ALL_CORRUPTIONS = COMMON_CORRUPTIONS + EXTRA_CORRUPTIONS

MIN_SIDE = 32  # imagecorruptions refuses smaller images
CHUNK_IMAGES = 32  # images per work item: small enough to balance 2..64 workers
SEED_MASK = (1 << 64) - 1  # negative runtime seeds map onto distinct non-negative ones

Which = Literal["common", "all"]


# --------------------------------------------------------------------------- names


def corruption_names(which: Which = "common") -> list[str]:
    """The corruptions to build, in mCE order; refuses a library whose list has drifted."""
    from imagecorruptions import get_corruption_names

    expected = list(COMMON_CORRUPTIONS if which == "common" else ALL_CORRUPTIONS)
    found = list(get_corruption_names(which))
    if found != expected:
        raise RuntimeError(
            f"imagecorruptions lists {found} for {which!r}, expected {expected}; "
            "install imagecorruptions-imaug 1.1.5"
        )
    return expected


# --------------------------------------------------------------------------- one image


def image_seed(seed: int, corruption: str, severity: int, index: int) -> int:
    """A 32-bit seed for one image: a hash of everything that identifies it."""
    entropy = [seed & SEED_MASK, ALL_CORRUPTIONS.index(corruption), severity, index]
    return int(np.random.SeedSequence(entropy).generate_state(1)[0])


@contextmanager
def seeded_numpy(seed: int) -> Iterator[None]:
    """Make the library's random draws a function of ``seed`` alone, then undo it.

    Most corruptions draw from numpy's legacy global RNG, which ``np.random.seed`` fixes.
    glass_blur (for its numba shuffle) and impulse_noise (through scikit-image) call
    ``np.random.default_rng()`` without a seed, looked up on the ``numpy.random`` module at
    call time: while the block runs that name returns generators spawned in order from
    ``seed``. Both the legacy state and the function are restored, even on error. Not
    thread-safe: the patch is process-wide.
    """
    real_default_rng = np.random.default_rng
    legacy_state = np.random.get_state()
    children = np.random.SeedSequence(seed)

    def default_rng(entropy: Any = None) -> np.random.Generator:
        return real_default_rng(children.spawn(1)[0] if entropy is None else entropy)

    np.random.seed(seed)
    np.random.default_rng = default_rng
    try:
        yield
    finally:
        np.random.default_rng = real_default_rng
        np.random.set_state(legacy_state)


def _library_size(height: int, width: int) -> tuple[int, int]:
    """(H, W) scaled up, aspect kept, until the short side is at least ``MIN_SIDE``."""
    short = min(height, width)
    if short >= MIN_SIDE:
        return height, width
    factor = MIN_SIDE / short
    return max(MIN_SIDE, round(height * factor)), max(MIN_SIDE, round(width * factor))


def _resize(plane: np.ndarray, height: int, width: int) -> np.ndarray:
    """Bicubic PIL resize of an (H, W) or (H, W, 3) uint8 array."""
    resized = Image.fromarray(plane).resize((width, height), Image.Resampling.BICUBIC)
    return np.asarray(resized, dtype=np.uint8)


def _check_image(image: np.ndarray) -> None:
    """The one layout this stage handles: (H, W, 1 or 3) uint8."""
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] not in (1, 3):
        raise ValueError(f"expected (H, W, 1 or 3) uint8, got {image.shape} {image.dtype}")


def corrupt_image(image: np.ndarray, name: str, severity: int, seed: int) -> np.ndarray:
    """One corrupted copy of an (H, W, C) uint8 image, same shape, reproducible from ``seed``.

    Grey images go through the library as three equal channels and come back as their mean;
    images under 32 px a side are corrupted at 32 px (bicubic up, then back down).
    """
    from imagecorruptions import corrupt

    _check_image(image)
    if name not in ALL_CORRUPTIONS:
        raise ValueError(f"unknown corruption {name!r}; expected one of {ALL_CORRUPTIONS}")
    height, width, channels = image.shape
    plane = image[..., 0] if channels == 1 else image
    size = _library_size(height, width)
    if size != (height, width):
        plane = _resize(plane, *size)
    rgb = np.repeat(plane[..., None], 3, axis=-1) if channels == 1 else plane
    with seeded_numpy(seed):
        out = np.asarray(corrupt(rgb, severity=severity, corruption_name=name))
    if out.shape != rgb.shape:
        raise RuntimeError(f"{name} returned shape {out.shape} for an input of {rgb.shape}")
    if channels == 1:
        out = np.rint(out.mean(axis=-1)).astype(np.uint8)
    if size != (height, width):
        out = _resize(out, height, width)
    return out.reshape(height, width, channels)


# --------------------------------------------------------------------------- many images


@dataclass(frozen=True)
class Chunk:
    """One work item: a block of images under one corruption and severity."""

    name: str
    severity: int
    block: int  # position of the severity in the output file
    start: int
    stop: int


def plan_chunks(num_images: int, names: Sequence[str], severities: Sequence[int]) -> list[Chunk]:
    """Every (corruption, severity, block of images) to corrupt, in output order."""
    return [
        Chunk(name, severity, block, start, min(start + CHUNK_IMAGES, num_images))
        for name in names
        for block, severity in enumerate(severities)
        for start in range(0, num_images, CHUNK_IMAGES)
    ]


def corrupt_chunk(chunk: Chunk, images: np.ndarray, seed: int) -> tuple[Chunk, np.ndarray]:
    """Corrupt ``images`` (the chunk's block); image seeds use positions in the full set."""
    out = np.empty_like(images)
    for offset, image in enumerate(images):
        index = chunk.start + offset
        out[offset] = corrupt_image(
            image, chunk.name, chunk.severity, image_seed(seed, chunk.name, chunk.severity, index)
        )
    return chunk, out


def _corrupt_task(task: tuple[Chunk, np.ndarray, int]) -> tuple[Chunk, np.ndarray]:
    """Pool entry point (one picklable argument)."""
    return corrupt_chunk(*task)


def _init_worker() -> None:
    """One OpenCV thread per worker: the pool is the parallelism, threads would oversubscribe."""
    try:
        import cv2
    except ImportError:  # a library without OpenCV has nothing to tune
        return
    cv2.setNumThreads(1)


def _pool_context() -> multiprocessing.context.BaseContext:
    """forkserver where available (a clean parent without torch's threads), else spawn."""
    methods = multiprocessing.get_all_start_methods()
    return multiprocessing.get_context("forkserver" if "forkserver" in methods else "spawn")


@contextmanager
def _results(
    tasks: list[tuple[Chunk, np.ndarray, int]], workers: int
) -> Iterator[Iterator[tuple[Chunk, np.ndarray]]]:
    """Corrupted chunks in any order: inline for one worker, else from worker processes.

    A ``ProcessPoolExecutor`` rather than a ``Pool``: when a worker dies (out of memory, or
    a script that calls this without an ``if __name__ == "__main__":`` guard) it fails at
    once instead of replacing the worker and waiting forever for the lost chunk.
    """
    if workers <= 1:
        yield map(_corrupt_task, tasks)
        return
    executor = ProcessPoolExecutor(
        min(workers, len(tasks)), mp_context=_pool_context(), initializer=_init_worker
    )
    try:
        futures = [executor.submit(_corrupt_task, task) for task in tasks]
        yield (future.result() for future in as_completed(futures))
    except BrokenProcessPool:
        raise UserError(
            "a corruption worker process died (out of memory?); lower runtime.workers "
            "(1 runs in-process), and guard scripts with `if __name__ == '__main__':`"
        ) from None
    finally:
        executor.shutdown(wait=True, cancel_futures=True)


def _open_outputs(
    out_dir: Path, names: Sequence[str], shape: tuple[int, ...]
) -> dict[str, np.ndarray]:
    """One writable memory-mapped ``<corruption>.npy`` per corruption (RAM stays flat)."""
    return {
        name: np.lib.format.open_memmap(out_dir / f"{name}.npy", "w+", np.uint8, shape)
        for name in names
    }


def build(
    images: np.ndarray,
    labels: np.ndarray,
    names: Sequence[str],
    severities: Sequence[int],
    seed: int,
    out_dir: str | Path,
    workers: int,
) -> float:
    """Write every corruption of ``images`` into ``out_dir``; returns the seconds it took."""
    started = time.perf_counter()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    num, height, width, channels = images.shape
    chunks = plan_chunks(num, names, severities)
    tasks = [(chunk, images[chunk.start : chunk.stop], seed) for chunk in chunks]
    outputs = _open_outputs(out_dir, names, (len(severities) * num, height, width, channels))
    with _results(tasks, workers) as results:
        for chunk, out in tqdm(
            results, total=len(tasks), desc="corrupt", unit="chunk", disable=None
        ):
            base = chunk.block * num
            outputs[chunk.name][base + chunk.start : base + chunk.stop] = out
    for array in outputs.values():
        array.flush()
    np.save(out_dir / LABELS_FILE, np.asarray(labels, dtype=np.int64))
    np.save(out_dir / CLEAN_FILE, np.ascontiguousarray(images, dtype=np.uint8))
    info = {
        "corruptions": list(names),
        "severities": list(severities),
        "num_images": num,
        "seed": seed,
        "image_size": [height, width],
        "channels": channels,
    }
    write_json(out_dir / INFO_FILE, info)
    return time.perf_counter() - started


# --------------------------------------------------------------------------- the stage


def _workers(params: Params) -> int:
    """``runtime.workers`` processes, or one per CPU this process may use when it is 0 or
    auto (a SLURM job's allocation, not the whole node)."""
    if params.runtime.workers and params.runtime.workers != "auto":
        return int(params.runtime.workers)
    return usable_cpus()


def run(
    params: Params, prepared_dir: str | Path = PREPARED_DIR, out_dir: str | Path = CORRUPTED_DIR
) -> dict[str, Any]:
    """Corrupt a seeded subset of the prepared test split into ``out_dir`` atomically."""
    from mfm.clean_subset import images_to_corrupt

    robustness, seed = params.robustness, params.runtime.seed
    names = corruption_names(robustness.corruptions)
    images, labels = images_to_corrupt(params, prepared_dir, _workers(params))
    severities = list(robustness.severities)
    num = len(labels)
    workers = min(_workers(params), len(plan_chunks(num, names, severities)))
    with atomic_dir(out_dir) as tmp:
        seconds = build(images, labels, names, severities, seed, tmp, workers)
    written = len(names) * len(severities) * num
    return {
        "corruptions": len(names),
        "severities": len(severities),
        "num_images": num,
        "images_written": written,
        "seconds": round(seconds, 3),
        "images_per_second": round(written / seconds, 2) if seconds > 0 else None,
        "workers": workers,
    }
