"""A tiny folder of "photos" in the ImageNet layout: sizes, aspects and formats all mixed."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

# (width, height): landscape, portrait, square, and a short side under the library's 32 px
SIZES = [(40, 22), (21, 38), (31, 31), (36, 27), (24, 40), (29, 20)]
SUFFIXES = [".png", ".jpg", ".JPEG"]


def photo(size: tuple[int, int], mode: str, seed: int) -> Image.Image:
    """A smooth random image (a tilted ramp plus noise), so blurs and crops change pixels."""
    width, height = size
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    slope = rng.uniform(-3, 3, size=2)
    base = 128 + slope[0] * (x - width / 2) + slope[1] * (y - height / 2)
    channels = 3 if mode == "RGB" else 1
    noise = rng.integers(-30, 30, size=(height, width, channels))
    pixels = np.clip(base[..., None] + noise, 0, 255).astype(np.uint8)
    return Image.fromarray(pixels if channels == 3 else pixels[..., 0], mode=mode)


def write_photos(root: Path, counts: dict[str, int], classes: int = 3, mode: str = "RGB") -> Path:
    """``root/<split>/class<k>/img<i><suffix>``, ``counts[split]`` images per class."""
    seed = 0
    for split, count in counts.items():
        for label in range(classes):
            folder = root / split / f"class{label}"
            folder.mkdir(parents=True, exist_ok=True)
            for index in range(count):
                seed += 1
                size = SIZES[seed % len(SIZES)]
                photo(size, mode, seed).save(folder / f"img{index}{SUFFIXES[seed % 3]}")
    return root
