"""An ImageNet-like JPEG folder from real photos, for ``python -m mfm bench --data``.

``root/train/<class>/*.JPEG`` and ``root/val/<class>/*.JPEG`` (the layout the ``imagefolder``
data set reads), each image a random crop of one of scikit-image's bundled sample photos
(``skimage.data``: astronaut, chelsea, coffee, rocket, ...; nothing is downloaded, and a
photo the installed copy does not ship is skipped), one class per photo. Each crop is
resized (Lanczos) to an ImageNet-like size, the long side 500 px for half the images (where
ImageNet's Flickr photos pile up) and 350-500 px for the rest, with ImageNet's mix of aspect
ratios (mostly 4:3 landscape, some portrait, square and wide), flipped half the time, its
exposure and white balance varied a little, and saved with Pillow at ``quality`` (4:2:0
chroma, as cameras and Flickr write them).

The sample photos are softer and cleaner than ImageNet's downscaled camera photos: at
quality 90 they compress to ~50 kB at 500x375, under half of ImageNet's ~110 kB mean (about
0.6 bytes a pixel), and a JPEG decoder's entropy-decoding work grows with the bytes. A light
unsharp mask (``sharpen``), sensor-like grain (``grain``, the luma noise's standard
deviation in 8-bit levels) and quality 95 bring the defaults to ~100 kB at ~165k pixels
(~0.63 bytes a pixel; at quality 90 the same images are ~70 kB); set ``sharpen`` and
``grain`` to 0 for the plain photos.

Every image is drawn from its own generator of (seed, split, index), so a folder is a
function of its arguments alone (the same bytes on every run with the same Pillow).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mfm.errors import UserError
from mfm.io import atomic_dir

# skimage.data's bundled colour photos: class name -> how to load it
PHOTOS: dict[str, Callable[[Any], np.ndarray]] = {
    "astronaut": lambda data: data.astronaut(),
    "chelsea": lambda data: data.chelsea(),
    "coffee": lambda data: data.coffee(),
    "rocket": lambda data: data.rocket(),
    "motorcycle": lambda data: data.stereo_motorcycle()[0],
    "hubble_deep_field": lambda data: data.hubble_deep_field(),
    "immunohistochemistry": lambda data: data.immunohistochemistry(),
    "retina": lambda data: data.retina(),
}
# (width / height, weight): 4:3 landscape most, then portrait, 3:2, wide and square
ASPECTS = ((4 / 3, 0.45), (3 / 4, 0.15), (3 / 2, 0.15), (16 / 9, 0.1), (1.0, 0.1), (2 / 3, 0.05))
LONG_SIDE = (350, 500)  # px; half the images get the maximum, the rest a uniform draw
MIN_CROP_AREA = 0.35  # of the largest crop of the drawn aspect that fits in the photo
QUALITY = 95  # with SHARPEN and GRAIN: ImageNet's bytes per pixel (90 gives ~70 kB)
SHARPEN = 150  # unsharp-mask strength in percent (radius 1.5 px); 0 = off
GRAIN = 6.0  # luma noise std in 8-bit levels (chroma gets a third of it); 0 = off
SPLITS = ("train", "val")


@dataclass(frozen=True)
class FolderSummary:
    """What was written: counts, the mean image size and the mean file size."""

    root: str
    classes: int
    train_images: int
    val_images: int
    images: int
    mean_width: float
    mean_height: float
    mean_pixels: float
    mean_kb: float  # 1000 bytes
    total_mb: float
    quality: int

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def source_photos() -> dict[str, np.ndarray]:
    """The bundled photos this scikit-image has, as (H, W, 3) uint8 arrays."""
    try:
        import skimage.data as data
    except ImportError:
        raise UserError(
            "writing a JPEG folder needs scikit-image's sample photos; pip install scikit-image"
        ) from None
    photos: dict[str, np.ndarray] = {}
    for name, load in PHOTOS.items():
        try:  # a photo that is not bundled would need pooch and the network: skip it
            image = np.asarray(load(data))
        except Exception:  # noqa: BLE001, S112 - any failure just leaves that photo out
            continue
        if image.ndim == 3 and image.shape[-1] >= 3 and image.dtype == np.uint8:
            photos[name] = np.ascontiguousarray(image[..., :3])
    if not photos:
        raise UserError(
            "this scikit-image ships none of the sample photos "
            f"({', '.join(PHOTOS)}); reinstall scikit-image (pip install -U scikit-image)"
        )
    return photos


def _output_size(rng: np.random.Generator, long_side: tuple[int, int]) -> tuple[int, int]:
    """(width, height): an ImageNet-like aspect ratio and long side."""
    ratios, weights = zip(*ASPECTS, strict=True)
    aspect = float(rng.choice(ratios, p=np.asarray(weights) / sum(weights)))
    low, high = long_side
    long = high if rng.random() < 0.5 else int(rng.integers(low, high + 1))
    short = max(1, round(long / aspect if aspect >= 1 else long * aspect))
    return (long, short) if aspect >= 1 else (short, long)


def render(
    photo: np.ndarray,
    rng: np.random.Generator,
    long_side: tuple[int, int] = LONG_SIDE,
    sharpen: int = SHARPEN,
    grain: float = GRAIN,
) -> Any:
    """One ImageNet-like picture (a PIL image) from ``photo``: crop, resize, flip, vary the
    exposure and white balance, sharpen and add grain."""
    from PIL import Image, ImageFilter

    width, height = _output_size(rng, long_side)
    photo_h, photo_w = photo.shape[:2]
    # the largest crop of the output's aspect that fits, then a random share of its area
    fit_w = min(photo_w, photo_h * width / height)
    fit_h = fit_w * height / width
    scale = math.sqrt(rng.uniform(MIN_CROP_AREA, 1.0))
    crop_w, crop_h = fit_w * scale, fit_h * scale
    left = rng.uniform(0, photo_w - crop_w)
    top = rng.uniform(0, photo_h - crop_h)
    box = (left, top, left + crop_w, top + crop_h)
    image = Image.fromarray(photo).resize((width, height), Image.Resampling.LANCZOS, box=box)
    if rng.random() < 0.5:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    if sharpen > 0:
        image = image.filter(ImageFilter.UnsharpMask(radius=1.5, percent=sharpen, threshold=0))
    pixels = np.asarray(image, dtype=np.float32) / 255
    gamma = rng.uniform(0.8, 1.25)  # exposure
    gains = rng.uniform(0.92, 1.08, size=3).astype(np.float32)  # white balance
    pixels = np.clip(pixels, 0, 1) ** gamma * gains * 255
    if grain > 0:
        luma = rng.normal(0.0, grain, size=(height, width, 1))
        chroma = rng.normal(0.0, grain / 3, size=(height, width, 3))
        pixels = pixels + (luma + chroma).astype(np.float32)
    return Image.fromarray(np.clip(pixels + 0.5, 0, 255).astype(np.uint8))


def write_jpeg_folder(
    root: str | Path,
    images: int = 256,
    val_images: int | None = None,
    seed: int = 0,
    long_side: tuple[int, int] = LONG_SIDE,
    quality: int = QUALITY,
    sharpen: int = SHARPEN,
    grain: float = GRAIN,
) -> FolderSummary:
    """Write ``images`` training and ``val_images`` (default: a tenth, at least one)
    validation JPEGs under ``root`` in the ImageNet layout; returns what was written.

    ``root`` must not exist or be empty; the folder appears complete or not at all.
    """
    root = Path(root).expanduser()
    val_images = max(1, images // 10) if val_images is None else val_images
    if images < 1 or val_images < 1:
        raise UserError(
            f"a JPEG folder needs at least 1 training and 1 validation image, got {images} "
            f"and {val_images}; ask for more images"
        )
    if not 1 <= long_side[0] <= long_side[1]:
        raise UserError(f"long side range {long_side} is not 1 <= min <= max; fix it")
    if not 1 <= quality <= 100:
        raise UserError(f"JPEG quality {quality} is outside 1..100; pick e.g. 90")
    if root.exists() and (not root.is_dir() or any(root.iterdir())):
        raise UserError(f"{root} exists and is not an empty folder; remove it or pick another")
    photos = source_photos()
    classes = list(photos)[:images]  # every class gets training images
    sizes: list[tuple[int, int]] = []
    written = 0
    with atomic_dir(root) as tmp:
        counts = (images, val_images)
        for split_index, (split, count) in enumerate(zip(SPLITS, counts, strict=True)):
            for index in range(count):
                name = classes[index % len(classes)]
                (tmp / split / name).mkdir(parents=True, exist_ok=True)  # no empty class
                rng = np.random.default_rng([seed, split_index, index])
                picture = render(photos[name], rng, long_side, sharpen, grain)
                path = tmp / split / name / f"{name}_{index:06d}.JPEG"
                picture.save(path, "JPEG", quality=quality)
                sizes.append(picture.size)
                written += path.stat().st_size
    count = len(sizes)
    widths, heights = np.array(sizes, dtype=np.float64).T
    return FolderSummary(
        root=str(root),
        classes=len(classes),
        train_images=images,
        val_images=val_images,
        images=count,
        mean_width=float(widths.mean()),
        mean_height=float(heights.mean()),
        mean_pixels=float((widths * heights).mean()),
        mean_kb=written / count / 1000,
        total_mb=written / 1e6,
        quality=quality,
    )
