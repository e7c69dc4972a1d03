"""The segmentation data sets (ADE20K, an image/mask folder, the built scenes), read one way.

Every format becomes a list of (image, mask) file pairs plus class names, served as
``(tv_tensors.Image uint8 (C, H, W), tv_tensors.Mask int64 (H, W))`` with 255 = ignore.
All user mistakes (a wrong root, a missing mask, a mask of the wrong size or with labels
outside the classes) are found by :func:`segmentation_split` before any training, so a
stage fails at once with one line instead of hours later inside a DataLoader worker.

* ``ade20k``: the released ``ADEChallengeData2016/``: ``images/{training,validation}/*.jpg``
  and ``annotations/{training,validation}/*.png``; 150 classes; label 0 ("other") is ignored
  and the others shift down by one (mmseg's ``reduce_zero_label``).
* ``folder``: ``images/{train,test}/*`` + ``masks/{train,test}/<stem>.png`` + ``classes.txt``
  (line i = class i); labels are class indices, 255 = ignore.
* ``scenes``: the folder layout :func:`mfm.data.scenes.build_scenes` writes.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision import tv_tensors

from mfm.data.datasets import ImageReadError
from mfm.data.files import is_hidden, is_image_file
from mfm.data.meta import Split
from mfm.errors import UserError
from mfm.paths import SCENES_DIR  # where the scenes stage writes
from mfm.segment_params import IGNORE_INDEX, SegmentParams

Pair = tuple[Path, Path]  # (image file, mask file)
Sample = tuple[tv_tensors.Image, tv_tensors.Mask]

SCENES_HINT = "run the scenes stage first (python -m mfm scenes)"
CLASSES_FILE = "classes.txt"
ADE20K_CLASSES = 150
ADE20K_NAMES = "objectInfo150.txt"
ADE20K_SPLITS: dict[str, str] = {"train": "training", "test": "validation"}
MASK_MODES = ("L", "P")  # single-channel 8-bit index maps (P: the palette index is the label)
ROOT_WHAT = {
    "ade20k": "the ADEChallengeData2016 folder",
    "folder": "a folder holding images/, masks/ and classes.txt",
}
_SHOWN_VALUES = 5  # bad label values quoted in an error message


@dataclass(frozen=True)
class SegmentationFiles:
    """One split of a segmentation data set: its (image, mask) pairs, the class names
    (index i = class i, after the label shift) and whether ADE20K's shift applies."""

    pairs: list[Pair]
    classes: list[str]
    reduce_zero_label: bool = False

    @property
    def num_classes(self) -> int:
        return len(self.classes)


def label_table(reduce_zero_label: bool) -> np.ndarray:
    """Stored mask value -> training label, as a 256-entry uint8 lookup table.

    With ``reduce_zero_label`` 0 ("other") becomes the ignore index and c becomes c - 1;
    255 stays 255 either way.
    """
    table = np.arange(256, dtype=np.uint8)
    if reduce_zero_label:
        table = (table - 1).astype(np.uint8)  # 0 -> 255, 255 -> 254 (put back below)
        table[255] = IGNORE_INDEX
    return table


def _stored_values_allowed(files: SegmentationFiles) -> np.ndarray:
    """Which stored mask values (0-255) are a class or the ignore index after the shift."""
    labels = label_table(files.reduce_zero_label)
    return (labels < files.num_classes) | (labels == IGNORE_INDEX)


def dataset_root(cfg: SegmentParams, scenes_dir: Path = SCENES_DIR) -> Path:
    """The folder ``cfg`` points at; a missing one names the param (or stage) that fixes it."""
    if cfg.dataset == "scenes":
        if cfg.root is None:
            if not Path(scenes_dir).is_dir():
                raise UserError(f"scenes folder {scenes_dir} not found; {SCENES_HINT}")
            return Path(scenes_dir)
        if not Path(cfg.root).is_dir():
            raise UserError(
                f"segment.root {cfg.root} not found; set it to null (the scenes stage's "
                f"{scenes_dir}) or to a folder of built scenes"
            )
        return Path(cfg.root)
    what = ROOT_WHAT[cfg.dataset]
    if cfg.root is None:
        raise UserError(
            f"segment.root is not set for segment.dataset {cfg.dataset}; set it to {what}"
        )
    root = Path(cfg.root)
    if not root.is_dir():
        raise UserError(f"segment.root {root} not found; set segment.root to {what}")
    return root


def _list_images(folder: Path) -> dict[str, Path]:
    """The images of a split folder by stem; an empty (or missing) folder is refused."""
    found: dict[str, Path] = {}
    files = sorted(folder.iterdir()) if folder.is_dir() else []
    for path in files:
        if path.is_file() and is_image_file(path.name):
            if path.stem in found:
                raise UserError(
                    f"{found[path.stem]} and {path} share a name (masks are matched by name); "
                    "rename or remove one"
                )
            found[path.stem] = path
    if not found:
        raise UserError(f"no images in {folder}; put the split's images there or fix segment.root")
    return found


def _pair_up(image_dir: Path, mask_dir: Path) -> list[Pair]:
    """Each image with ``mask_dir/<stem>.png``; an image without a mask, or a mask without
    an image, is refused (a silently dropped file would change the data set)."""
    images = _list_images(image_dir)
    masks: dict[str, Path] = {}
    if mask_dir.is_dir():
        for path in sorted(mask_dir.iterdir()):
            if path.is_file() and not is_hidden(path.name) and path.suffix.lower() == ".png":
                masks[path.stem] = path
    for stem, image in images.items():
        if stem not in masks:
            raise UserError(
                f"image {image} has no mask {mask_dir / stem}.png; add the mask or remove the image"
            )
    for stem, mask in masks.items():
        if stem not in images:
            raise UserError(
                f"mask {mask} has no image {image_dir / stem}.*; add the image or remove the mask"
            )
    return [(images[stem], masks[stem]) for stem in sorted(images)]


def read_classes(path: Path, hint: str) -> list[str]:
    """``classes.txt``: line i names class i (trailing blank lines are ignored)."""
    if not path.is_file():
        raise UserError(f"{path} not found; {hint}")
    lines = [line.strip() for line in path.read_text(errors="replace").splitlines()]
    while lines and not lines[-1]:
        lines.pop()
    if not lines:
        raise UserError(f"{path} is empty; {hint}")
    for number, name in enumerate(lines, start=1):
        if not name:
            raise UserError(f"{path} line {number} is empty; {hint}")
    if len(lines) > IGNORE_INDEX:
        raise UserError(
            f"{path} lists {len(lines)} classes; masks are 8-bit with {IGNORE_INDEX} = ignore, "
            f"so at most {IGNORE_INDEX}: merge classes"
        )
    return lines


def ade20k_classes(root: Path) -> list[str]:
    """The 150 class names: the first name of each row of ``objectInfo150.txt`` (tab-separated
    Idx, Ratio, Train, Val, Name, after a header) if the release has it, else ``class_000``...

    Names are lists of synonyms ("building, edifice"; the devkit's copy uses ";"): the first
    one is kept, as mmseg's class names do.
    """
    path = root / ADE20K_NAMES
    if not path.is_file():
        return [f"class_{index:03d}" for index in range(ADE20K_CLASSES)]
    fix = "restore it from the ADE20K release or delete it (names become class_000...)"
    names: dict[int, str] = {}
    for number, line in enumerate(path.read_text(errors="replace").splitlines(), start=1):
        if number == 1 or not line.strip():
            continue  # the header
        fields = line.split("\t") if "\t" in line else line.split(None, 4)
        try:
            names[int(fields[0])] = re.split(r"[,;]", fields[4])[0].strip()
        except (IndexError, ValueError):
            raise UserError(
                f"{path} line {number} is not 'Idx Ratio Train Val Name'; {fix}"
            ) from None
    if sorted(names) != list(range(1, ADE20K_CLASSES + 1)):
        raise UserError(f"{path} does not list classes 1-{ADE20K_CLASSES} once each; {fix}")
    return [names[index] for index in range(1, ADE20K_CLASSES + 1)]


def find_split(
    cfg: SegmentParams, split: Split, scenes_dir: Path = SCENES_DIR
) -> SegmentationFiles:
    """The (image, mask) pairs and classes of ``split`` (file names only: nothing decoded)."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', not {split!r}")
    root = dataset_root(cfg, scenes_dir)
    if cfg.dataset == "ade20k":
        folder = ADE20K_SPLITS[split]
        pairs = _pair_up(root / "images" / folder, root / "annotations" / folder)
        return SegmentationFiles(pairs, ade20k_classes(root), reduce_zero_label=True)
    hint = (
        SCENES_HINT
        if cfg.dataset == "scenes" and not cfg.root
        else "write one class name per line (line i = class i)"
    )
    classes = read_classes(root / CLASSES_FILE, hint)
    pairs = _pair_up(root / "images" / split, root / "masks" / split)
    return SegmentationFiles(pairs, classes)


def _bad_labels_fix(files: SegmentationFiles) -> str:
    if files.reduce_zero_label:
        return (
            f"ADE20K annotations hold 0 (other) to {ADE20K_CLASSES} and {IGNORE_INDEX}: "
            "restore the file from the release"
        )
    return f"fix the mask, or name the missing classes in {CLASSES_FILE}"


def _check_pair(pair: Pair, allowed: np.ndarray, fix: str, valid: str) -> tuple[int, int] | str:
    """One pair's image size (h, w), or the one-line problem with it.

    The image's size comes from its header; the mask is decoded for its label histogram
    (Pillow's, which is several times faster than ``np.unique`` on the array).
    """
    image_path, mask_path = pair
    try:
        with Image.open(image_path) as image:
            width, height = image.size
    except (OSError, ValueError, Image.DecompressionBombError) as err:
        return f"cannot read image {image_path} ({err.__class__.__name__}); replace it"
    try:
        with Image.open(mask_path) as mask:
            if mask.size != (width, height):
                return (
                    f"mask {mask_path} is {mask.size[0]}x{mask.size[1]} (w x h) but its image "
                    f"{image_path} is {width}x{height}; make the mask the image's size"
                )
            if mask.mode not in MASK_MODES:
                return (
                    f"mask {mask_path} has mode {mask.mode}; save it as a single-channel "
                    "8-bit PNG (mode L or P) of class indices"
                )
            counts = np.asarray(mask.histogram()[:256])
    except (OSError, ValueError, Image.DecompressionBombError) as err:
        return f"cannot read mask {mask_path} ({err.__class__.__name__}); replace it"
    bad = np.flatnonzero((counts > 0) & ~allowed)
    if len(bad):
        shown = ", ".join(str(v) for v in bad[:_SHOWN_VALUES]) + (
            ", ..." if len(bad) > _SHOWN_VALUES else ""
        )
        return f"mask {mask_path} holds label values {shown} (valid: {valid}); {fix}"
    return height, width


def check_split(files: SegmentationFiles) -> list[tuple[int, int]]:
    """Check every pair (readable, same size, labels valid) and return the image sizes (h, w).

    Masks are decoded on a thread pool (Pillow's decoder releases the GIL), fast enough for
    ADE20K's 22k masks; the first problem in file order is raised.
    """
    allowed = _stored_values_allowed(files)
    top = ADE20K_CLASSES if files.reduce_zero_label else files.num_classes - 1
    valid = f"0-{top} and {IGNORE_INDEX}"
    check = partial(_check_pair, allowed=allowed, fix=_bad_labels_fix(files), valid=valid)
    pool = ThreadPoolExecutor()
    sizes: list[tuple[int, int]] = []
    try:
        for result in pool.map(check, files.pairs):
            if isinstance(result, str):
                raise UserError(result)
            sizes.append(result)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    return sizes


class SegmentationSet(Dataset):
    """(image, mask) pairs decoded with Pillow as ``(tv_tensors.Image uint8 (C, H, W),
    tv_tensors.Mask int64 (H, W))``, after the optional joint ``transform``.

    Images are converted to ``channels`` (L or RGB), so an encoder of either channel count
    works on any data set; masks get the format's label shift.
    """

    def __init__(
        self,
        files: SegmentationFiles,
        channels: int,
        transform: Callable[[tv_tensors.Image, tv_tensors.Mask], Any] | None = None,
        sizes: Sequence[tuple[int, int]] | None = None,
    ) -> None:
        if channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, not {channels}")
        self.files = files
        self.classes = files.classes
        self.num_classes = files.num_classes
        self.mode = "L" if channels == 1 else "RGB"
        self.transform = transform
        self.sizes = list(sizes) if sizes is not None else None  # (h, w) each, if known
        self._labels = label_table(files.reduce_zero_label)

    def __len__(self) -> int:
        return len(self.files.pairs)

    def _image(self, path: Path) -> torch.Tensor:
        try:
            with Image.open(path) as image:
                pixels = np.array(image.convert(self.mode))
        except (OSError, ValueError, Image.DecompressionBombError) as err:
            raise ImageReadError(
                f"cannot read image {path} ({err.__class__.__name__}); replace it"
            ) from None
        tensor = torch.from_numpy(pixels)
        return tensor[None] if tensor.ndim == 2 else tensor.permute(2, 0, 1).contiguous()

    def _mask(self, path: Path) -> torch.Tensor:
        try:
            with Image.open(path) as mask:
                stored = np.asarray(mask)  # L: the values; P: the palette indices
        except (OSError, ValueError, Image.DecompressionBombError) as err:
            raise ImageReadError(
                f"cannot read mask {path} ({err.__class__.__name__}); replace it"
            ) from None
        return torch.from_numpy(self._labels[stored].astype(np.int64))

    def __getitem__(self, index: int) -> Any:
        image_path, mask_path = self.files.pairs[index]
        sample: Sample = (
            tv_tensors.Image(self._image(image_path)),
            tv_tensors.Mask(self._mask(mask_path)),
        )
        return self.transform(*sample) if self.transform is not None else sample


def segmentation_split(
    cfg: SegmentParams,
    split: Split,
    channels: int,
    scenes_dir: Path = SCENES_DIR,
    transform: Callable[[tv_tensors.Image, tv_tensors.Mask], Any] | None = None,
) -> SegmentationSet:
    """``split`` of ``cfg.dataset``, every pair checked up front (see :func:`check_split`)."""
    files = find_split(cfg, split, scenes_dir)
    sizes = check_split(files)
    return SegmentationSet(files, channels, transform, sizes)


def _header_size(path: Path) -> tuple[int, int]:
    with Image.open(path) as image:
        return image.size[1], image.size[0]


def uniform_size(dataset: SegmentationSet) -> tuple[int, int] | None:
    """The common (h, w) of all images, or None when they differ (then evaluation has to go
    one image at a time). Sizes come from the check, else from the file headers."""
    sizes = dataset.sizes
    if sizes is None:
        with ThreadPoolExecutor() as pool:
            sizes = list(pool.map(_header_size, (image for image, _ in dataset.files.pairs)))
    if not sizes:
        return None
    return sizes[0] if all(size == sizes[0] for size in sizes) else None
