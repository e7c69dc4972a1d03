"""Fashion-MNIST from its four IDX files, wherever they are found first.

The reader is our own rather than torchvision's: Debian's ``dataset-fashion-mnist`` package
ships the ``.gz`` files only, and a truncated or foreign file must be named with the fix, not
surface as a shape error during training. torchvision is used for the download alone.
"""

from __future__ import annotations

import gzip
import zlib
from pathlib import Path

import numpy as np
from tqdm import tqdm

from mfm.config import DataParams, Params
from mfm.data.sources import common
from mfm.data.sources.common import REFETCH, ArrayData, as_images
from mfm.errors import UserError

DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
FASHION_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
FASHION_ROOT_HINT = "a folder holding train-images-idx3-ubyte.gz and the other three IDX files"
FASHION_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
IDX_UBYTE = 0x08


def _read_bytes(path: Path) -> bytes:
    """Read a file, gunzipping when it is gzip (by content, not by name)."""
    try:
        raw = path.read_bytes()
        return gzip.decompress(raw) if raw[:2] == b"\x1f\x8b" else raw
    except (OSError, EOFError, zlib.error) as err:
        raise UserError(
            f"{path} is unreadable or truncated ({err.__class__.__name__}); {REFETCH}"
        ) from None


def read_idx(path: str | Path, ndim: int) -> np.ndarray:
    """Parse an IDX file of unsigned bytes with ``ndim`` dimensions (big-endian header).

    Checks the magic number and that the payload has exactly the size the header promises,
    so a truncated download is caught here rather than as a wrong shape during training.
    """
    path = Path(path)
    data = _read_bytes(path)
    header = 4 + 4 * ndim
    if len(data) < header or data[:2] != b"\0\0" or data[2] != IDX_UBYTE or data[3] != ndim:
        expected = 0x800 + ndim
        raise UserError(
            f"{path} is not an IDX file of {ndim}-d bytes (magic {expected:#06x}); {REFETCH}"
        )
    dims = tuple(int(d) for d in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    size = int(np.prod(dims))
    if len(data) - header != size:
        got = len(data) - header
        raise UserError(
            f"{path} is truncated or corrupt ({got} bytes of {size} expected); {REFETCH}"
        )
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(dims)


def _idx_file(folder: Path, name: str) -> Path | None:
    """``name`` or ``name.gz`` inside ``folder``, whichever exists."""
    for candidate in (folder / f"{name}.gz", folder / name):
        if candidate.is_file():
            return candidate
    return None


def _fashion_files(folder: Path) -> dict[str, Path] | None:
    """The four Fashion-MNIST files in ``folder``, or None unless all four are there."""
    found = {key: _idx_file(folder, name) for key, name in FASHION_FILES.items()}
    if any(path is None for path in found.values()):
        return None
    return {key: path for key, path in found.items() if path is not None}


def _candidates(data: DataParams) -> list[Path]:
    """Folders to search, in order: data.root (plain or torchvision layout), Debian, data/raw."""
    places: list[Path] = []
    if data.root:
        root = Path(data.root).expanduser()
        places += [root, root / "FashionMNIST" / "raw"]
    places += [DEBIAN_FASHION_MNIST, common.RAW_DIR / "FashionMNIST" / "raw"]
    return places


def _download() -> str | None:
    """torchvision's download into ``RAW_DIR``; returns the failure reason, None on success."""
    from torchvision.datasets import FashionMNIST

    try:
        FashionMNIST(str(common.RAW_DIR), train=True, download=True)
    except Exception as err:  # network, disk, checksum: all reported the same way
        return f"{err.__class__.__name__}: {err}".splitlines()[0]
    return None


def _find(data: DataParams) -> Path:
    """The first folder holding all four IDX files, downloading if allowed and needed."""
    places = _candidates(data)
    for folder in places:
        if _fashion_files(folder):
            return folder
    looked = ", ".join(str(p) for p in places)
    if data.download:
        reason = _download()
        folder = common.RAW_DIR / "FashionMNIST" / "raw"
        if reason is None and _fashion_files(folder):
            return folder
        raise UserError(
            f"Fashion-MNIST not found in {looked} and the download failed ({reason}); "
            f"run `apt-get install dataset-fashion-mnist` or set data.root to {FASHION_ROOT_HINT}"
        )
    raise UserError(
        f"Fashion-MNIST not found in {looked} (data.download is false); "
        "run `apt-get install dataset-fashion-mnist`, set data.download: true (needs internet), "
        f"or set data.root to {FASHION_ROOT_HINT}"
    )


def _read_split_pair(images_path: Path, labels_path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Images and labels of one split, checked to have the same length."""
    images = read_idx(images_path, ndim=3)
    labels = read_idx(labels_path, ndim=1).astype(np.int64)
    if len(images) != len(labels):
        raise UserError(
            f"{images_path} holds {len(images)} images but {labels_path} holds {len(labels)} "
            "labels; replace the pair with matching files"
        )
    return as_images(images), labels


def load_fashion_mnist(params: Params) -> ArrayData:
    """Fashion-MNIST from its IDX files (gz or not), wherever they are found first."""
    folder = _find(params.data)
    files = _fashion_files(folder) or {}
    pairs = [("train_images", "train_labels"), ("test_images", "test_labels")]
    arrays = [
        _read_split_pair(files[img], files[lab])
        for img, lab in tqdm(pairs, desc="fashion_mnist", unit="split", disable=None)
    ]
    (train_x, train_y), (test_x, test_y) = arrays
    return ArrayData(train_x, train_y, test_x, test_y, list(FASHION_CLASSES), str(folder))
