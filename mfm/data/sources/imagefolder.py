"""Image folders in the ImageNet layout, ``root/{train, val|test}/<class>/<image>``.

torchvision finds the class folders and the images (``find_classes``, ``make_dataset``);
what is added here are the errors a user can act on, and that hidden entries
(``.ipynb_checkpoints``, ``.DS_Store``, ``._*``) are never classes or images. Nothing is
copied: prepare writes (path, label) manifests.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from tqdm import tqdm

from mfm.config import Params
from mfm.data.files import IMAGE_EXTENSIONS, is_hidden, is_image_file
from mfm.data.sources.common import ManifestData
from mfm.errors import UserError

HEADER_CHECK_THREADS = 8  # header reads wait on the file system (network mounts above all)
HEADER_CHECK_CHUNK = 4096


def _class_folders(split_dir: Path) -> list[str]:
    """Sorted names of the class sub-folders of one split, hidden folders left out."""
    from torchvision.datasets.folder import find_classes

    try:
        found, _ = find_classes(split_dir)
    except FileNotFoundError:  # torchvision's "Couldn't find any class folder"
        return []
    return [name for name in found if not is_hidden(name)]


def _image_test(split_dir: Path) -> Callable[[str], bool]:
    """``is_valid_file`` for torchvision: an image, and nothing under a hidden folder."""

    def valid(path: str) -> bool:
        parts = Path(path).relative_to(split_dir).parts
        return is_image_file(path) and not any(is_hidden(part) for part in parts)

    return valid


def _scan_split(split_dir: Path, classes: list[str]) -> list[tuple[str, int]]:
    """(path, label) rows for one split, labels indexing the training classes."""
    from torchvision.datasets.folder import make_dataset

    index = {name: i for i, name in enumerate(classes)}
    valid = _image_test(split_dir)
    rows: list[tuple[str, int]] = []
    for name in tqdm(
        _class_folders(split_dir), desc=f"scan {split_dir.name}", unit="class", disable=None
    ):
        if name not in index:
            raise UserError(
                f"class folder {split_dir / name} has no counterpart in "
                f"{split_dir.parent / 'train'}; add it to train/ or remove it"
            )
        found = make_dataset(split_dir, {name: index[name]}, is_valid_file=valid, allow_empty=True)
        if not found:
            allowed = " ".join(sorted(IMAGE_EXTENSIONS))
            raise UserError(
                f"class folder {split_dir / name} holds no images ({allowed}); add images or "
                "remove the folder"
            )
        rows += found
    return rows


def load_imagefolder(params: Params) -> ManifestData:
    """``data.root/{train, val|test}/<class>/<image>`` as manifests; nothing is copied."""
    if not params.data.root:
        raise UserError(
            "data.dataset is imagefolder but data.root is not set; set data.root to a folder "
            "holding train/ and val/ (or test/) with one sub-folder per class"
        )
    root = Path(params.data.root).expanduser().resolve()
    if not root.is_dir():
        raise UserError(
            f"data.root {root} does not exist; fix data.root (imagefolder needs train/ and val/ "
            "or test/ sub-folders of class folders)"
        )
    train_dir = root / "train"
    test_dir = next((root / n for n in ("val", "test") if (root / n).is_dir()), None)
    if not train_dir.is_dir() or test_dir is None:
        raise UserError(
            f"{root} needs train/ and val/ (or test/) sub-folders of class folders; "
            "fix data.root or the folder layout"
        )
    classes = _class_folders(train_dir)
    if not classes:
        raise UserError(f"{train_dir} has no class folders; add one folder of images per class")
    train = _scan_split(train_dir, classes)
    test = _scan_split(test_dir, classes)
    return ManifestData(train, test, classes, str(root))


def _unreadable(path: str) -> str | None:
    """Why Pillow cannot identify ``path`` as an image (it reads the header only), else None."""
    from PIL import Image

    try:
        with Image.open(path):
            return None
    except (OSError, ValueError, Image.DecompressionBombError) as err:
        return err.__class__.__name__


def check_images(paths: Sequence[str]) -> None:
    """Open every image's header with Pillow (no pixel decoding), so that prepare, not a
    training run much later, names a garbage or non-image file."""
    bad: list[tuple[str, str]] = []
    bar = tqdm(total=len(paths), desc="check images", unit="img", disable=None)
    with ThreadPoolExecutor(HEADER_CHECK_THREADS) as pool, bar:
        for start in range(0, len(paths), HEADER_CHECK_CHUNK):
            chunk = paths[start : start + HEADER_CHECK_CHUNK]
            reasons = pool.map(_unreadable, chunk)
            bad += [(path, why) for path, why in zip(chunk, reasons, strict=True) if why]
            bar.update(len(chunk))
    if len(bad) == 1:
        path, why = bad[0]
        raise UserError(
            f"cannot read image {path} ({why}); remove or replace it, then rerun prepare"
        )
    if bad:
        path, why = bad[0]
        raise UserError(
            f"cannot read {len(bad)} images, e.g. {path} ({why}); remove or replace them, "
            "then rerun prepare"
        )
